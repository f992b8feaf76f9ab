"""Masked reconstruction, distillation, contrastive and ranking losses (plain functions/modules)."""
