"""Encoders: ViT-3D (timm blocks), Swin-3D (MONAI), CNNs (UNet / STU-Net style)."""
