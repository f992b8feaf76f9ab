"""MLP projectors of the contrastive methods (SimCLR, VoCo) and the multi-scale pooled feature they read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def linear_stack(in_dim: int, hidden_dim: int, out_dim: int, layers: int,
                 between: Callable[[int], list[nn.Module]]) -> nn.Sequential:
    """``layers`` Linear layers ``in_dim → hidden_dim … → out_dim``, with ``between(width)`` after each hidden one.

    The MLP of the projection heads (SimCLR / VoCo projectors, the DINO / iBOT head); the Sequential's
    indices are the heads' state-dict keys.
    """
    if layers < 1:
        raise ValueError(f"an MLP head needs at least one Linear layer, got layers={layers}")
    widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        modules.append(nn.Linear(w_in, w_out))
        if i < layers - 1:
            modules += between(w_out)
    return nn.Sequential(*modules)


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
        self.net = linear_stack(in_dim, hidden_dim, out_dim, layers,
                                lambda width: [_norm(norm, width), nn.ReLU(inplace=True)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pooled_pyramid(features: Sequence[Tensor]) -> Tensor:
    """Global average pool of every ``B, C_i, …`` map, concatenated: ``B, Σ C_i`` (nnssl SimCLR / VoCo)."""
    return torch.cat([f.float().mean(dim=tuple(range(2, f.ndim))) for f in features], dim=1)
