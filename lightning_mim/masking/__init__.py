"""Patch grids and mask generators. Convention everywhere: True = masked/hidden, False = visible."""
