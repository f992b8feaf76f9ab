"""MLP projectors of the contrastive methods (SimCLR, VoCo) and the multi-scale pooled feature they read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

ProjectorNorm = Literal["batch", "sample", "none"]


def _norm(kind: ProjectorNorm, width: int) -> nn.Module:
    """``batch``: VoCo's non-affine BatchNorm on batch statistics, also in eval (``track_running_stats``
    off); ``sample``: nnssl's ``InstanceNorm1d`` on a ``B, D`` matrix, i.e. each embedding normalised
    over its own features (a LayerNorm without affine); ``none``: identity."""
    if kind == "batch":
        return nn.BatchNorm1d(width, affine=False, track_running_stats=False)
    if kind == "sample":
        return nn.LayerNorm(width, elementwise_affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"projector norm must be 'batch', 'sample' or 'none', got {kind!r}")


class MLPProjector(nn.Module):
    """``{Linear → norm → ReLU} × (layers − 1) → Linear`` (SimCLR / VoCo projection head).

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: embedding width.
        layers: number of Linear layers (≥ 1).
        norm: see :func:`_norm`.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, layers: int = 3,
                 norm: ProjectorNorm = "batch") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a projector needs at least one layer, got {layers}")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(w_in, w_out))
            if i < layers - 1:
                modules += [_norm(norm, w_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pooled_pyramid(features: Sequence[Tensor]) -> Tensor:
    """Global average pool of every ``B, C_i, …`` map, concatenated: ``B, Σ C_i`` (nnssl SimCLR / VoCo)."""
    return torch.cat([f.float().mean(dim=tuple(range(2, f.ndim))) for f in features], dim=1)
