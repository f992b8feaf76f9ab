"""DINO / iBOT projection head (methods.md §2.4), used by SMIT for the cls and patch tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_mim.heads.projector import linear_stack


class DINOHead(nn.Module):
    """MLP (Linear-GELU-...-Linear → bottleneck), L2 normalisation, weight-normalised last layer.

    The last layer ``Linear(bottleneck → out_dim, bias=False)`` is weight-normalised; its gain
    (``last_layer.parametrizations.weight.original0``) starts at 1 and, with ``norm_last_layer``,
    stays frozen there, so the logits are cosine similarities to ``out_dim`` learnt prototypes —
    the DINO choice that stabilises training. Apply it to ``B, in_dim`` or ``B, L, in_dim``.

    Args:
        in_dim: input width.
        out_dim: number of prototypes (SMIT/iBOT 8192, DINO 65536).
        hidden_dim: MLP width.
        bottleneck_dim: width before the last layer.
        nlayers: number of MLP linear layers (≥ 1).
        norm_last_layer: freeze the weight-norm gain at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = linear_stack(in_dim, hidden_dim, bottleneck_dim, nlayers, lambda width: [nn.GELU()])
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


def drop_last_layer_gradients(heads: Iterable[DINOHead]) -> None:
    """Forget the gradients of the heads' last layers, so the coming optimizer step leaves them unchanged.

    The DINO/iBOT stabiliser of the first epochs (``freeze_last_layer_epochs``).
    """
    for head in heads:
        for param in head.last_layer.parameters():
            param.grad = None
