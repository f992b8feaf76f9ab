"""Reconstruction decoders, projection heads and predictors."""
