"""The base of the masked autoencoders on a ViT-3D (MAE-3D, SelfMedHPM): their networks, arguments and export."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_mim.backbones.vit import ViT3D, unetr_encoder_export
from lightning_mim.heads.mae_decoder import MAEDecoder
from lightning_mim.masking.random import num_masked
from lightning_mim.methods.base import ExportedEncoder, MIMModule


class MaskedAutoencoderBase(MIMModule):
    """ViT-3D encoder that sees the visible tokens only + MAE decoder; a method adds its step and losses.

    Args:
        img_size: input side (or sizes) the networks are built for; must equal the data's patch size.
        in_channels: image channels.
        patch_size: token patch side (16 → 6³ tokens at 96³).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, use_cls_token: encoder ViT.
        decoder_dim, decoder_depth, decoder_heads: MAE decoder (SelfMedMAE: 384 / 8 / 12).
        mask_ratio: fraction of tokens hidden; kept count is ``floor(L·(1-r))`` as in MAE.
        norm_pix_loss: regress per-patch normalised voxels.
        norm_pix_unbiased: unbiased patch variance (MAE) instead of the biased LayerNorm (SelfMedMAE).
        **kwargs: optimisation arguments of :class:`MIMModule` (lr, weight_decay, betas, warm-up...).
    """

    #: The method's name in the exported encoder's metadata.
    export_name: ClassVar[str]

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 96,
        in_channels: int = 1,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_cls_token: bool = True,
        decoder_dim: int = 384,
        decoder_depth: int = 8,
        decoder_heads: int = 12,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        norm_pix_unbiased: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = ViT3D(img_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                             drop_path_rate, use_cls_token)
        self.decoder = MAEDecoder(embed_dim, self.encoder.grid, patch_size**3 * in_channels, decoder_dim, decoder_depth,
                                  decoder_heads, mlp_ratio)
        self.mask_ratio = mask_ratio
        self.num_masked = num_masked(self.encoder.num_patches, mask_ratio, "floor", by_keep=True)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.encoder.img_size

    def export_encoder(self) -> ExportedEncoder:
        """The ViT encoder for MONAI ``UNETR`` (``vit.*`` keys; sin-cos table copied into the learned positions).

        Raises with the reason when UNETR cannot hold this ViT (it hard-codes 12 blocks and 16³ patches).
        """
        state_dict, network_kwargs = unetr_encoder_export(self.encoder)
        metadata = {"method": self.export_name, "patch_size": self.encoder.patch_size,
                    "roi_size": list(self.encoder.img_size), "mask_ratio": self.mask_ratio}
        return ExportedEncoder("unetr", state_dict, network_kwargs, metadata)
