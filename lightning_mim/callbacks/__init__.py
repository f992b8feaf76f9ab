"""Callbacks: image panels, encoder export, run bookkeeping."""
