"""lightning-mim: masked image modeling pre-training and segmentation transfer for 3D medical images."""

__version__ = "0.1.0"
