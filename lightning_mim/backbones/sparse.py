"""SparK-style sparse execution of a dense CNN encoder (methods.md §2.2 "sparse_conv", §4.2).

Masked pre-training of a CNN must not let hidden regions leak back in through convolutions and
normalisation statistics. SparK emulates sparse convolutions on dense tensors: the input is zeroed
at hidden cells, every convolution/pooling output is multiplied by the visibility mask at its
resolution, and every norm layer computes its statistics over visible positions only (and writes
zeros at hidden ones).

:class:`SparseEncoder` does this to an *unmodified* dense encoder: for the duration of one forward
pass (a mask context) it adds forward hooks to the convolutions/pools and swaps each norm layer's
``forward`` for its visible-only version, then restores everything. No parameter is renamed or
replaced, so ``wrapper.encoder.state_dict()`` loads strictly into the same dense encoder for
fine-tuning, and nothing mask-related survives outside the forward (the EMA teacher's deep copy is
a plain copy). Consequence: re-running a forward outside the context (activation checkpointing)
would run dense — do not checkpoint inside a sparse encoder.

Assumptions about the dense encoder: it returns a list of feature maps (finest first), exposes
``downsample_ratio()`` and ``feature_channels()``, and its element-wise layers map 0 to 0
(ReLU/LeakyReLU/GELU, residual adds), so hidden positions stay exactly zero between hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mim.masking.grid import upsample_mask

NormStatistics = Literal["batch", "sample"]

MASKED_OUTPUT_TYPES = (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d)
ANY_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def expand_visibility(visible: Tensor, spatial: Sequence[int]) -> Tensor:
    """Cell-grid visibility ``B, G0, G1, G2`` → ``B, 1, *spatial`` by nearest repeat (same factor per axis)."""
    grid = visible.shape[1:]
    spatial = tuple(int(s) for s in spatial)
    factors = {s // g for s, g in zip(spatial, grid)}
    if any(s % g for s, g in zip(spatial, grid)) or len(factors) != 1 or 0 in factors:
        raise ValueError(f"a feature map of size {spatial} is not an integer refinement of the mask grid {tuple(grid)}")
    return upsample_mask(visible, factors.pop()).unsqueeze(1)


def sparse_norm(norm: nn.Module, x: Tensor, visible: Tensor, instance_statistics: NormStatistics = "batch") -> Tensor:
    """Apply ``norm`` (InstanceNorm3d or BatchNorm3d) using visible positions only; hidden outputs are 0.

    ``visible`` is ``B, 1, *x.shape[2:]``. Statistics per channel are pooled over the visible voxels
    of the whole batch for BatchNorm — and for InstanceNorm too when ``instance_statistics="batch"``,
    which is what SparK/AnatoMask's "sparse instance norm" does (it behaves like a batch norm without
    running statistics, so results depend on the batch composition). ``"sample"`` gives true
    per-sample instance statistics over each sample's visible voxels. Computed in float32.
    """
    v = visible.to(torch.float32)
    xf = x.float()
    is_batch_norm = isinstance(norm, nn.BatchNorm3d)
    dims = (0, 2, 3, 4) if is_batch_norm or instance_statistics == "batch" else (2, 3, 4)
    count = v.sum(dim=dims, keepdim=True).clamp_min(1.0)
    shape = (1, -1, 1, 1, 1)
    if is_batch_norm and not norm.training and norm.running_mean is not None:
        centered = (xf - norm.running_mean.float().view(shape)) * v
        var = norm.running_var.float().view(shape)
    else:
        mean = (xf * v).sum(dim=dims, keepdim=True) / count
        centered = (xf - mean) * v  # zero at hidden positions from here on
        var = centered.square().sum(dim=dims, keepdim=True) / count
        if is_batch_norm and norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean, var, count)
    scale = torch.rsqrt(var + norm.eps)
    if not norm.affine:
        return (centered * scale).to(x.dtype)
    # Few full-size temporaries on purpose: these maps are the largest activations of the network.
    out = centered * (scale * norm.weight.float().view(shape))
    return torch.addcmul(out, v, norm.bias.float().view(shape)).to(x.dtype)


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm3d, mean: Tensor, var: Tensor, count: Tensor) -> None:
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    n = count.reshape(-1)[0]  # kept on the device: no host sync per step
    unbiased = var.reshape(-1) * n / (n - 1.0).clamp_min(1.0)
    norm.running_mean.mul_(1 - factor).add_(mean.reshape(-1).to(norm.running_mean.dtype), alpha=factor)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


class SparseEncoder(nn.Module):
    """Runs a dense CNN encoder SparK-style under a cell mask aligned with its coarsest feature grid.

    Args:
        encoder: the dense encoder (kept as ``self.encoder`` with its own parameter names).
        instance_statistics: ``"batch"`` (SparK/AnatoMask code: pool the visible voxels of all
            samples per channel) or ``"sample"`` (per-sample statistics); see :func:`sparse_norm`.
    """

    def __init__(self, encoder: nn.Module, instance_statistics: NormStatistics = "batch") -> None:
        super().__init__()
        for attr in ("downsample_ratio", "feature_channels"):
            if not callable(getattr(encoder, attr, None)):
                raise TypeError(f"the dense encoder must expose {attr}(), {type(encoder).__name__} does not")
        if instance_statistics not in ("batch", "sample"):
            raise ValueError(f"instance_statistics must be 'batch' or 'sample', got {instance_statistics!r}")
        self.encoder = encoder
        self.instance_statistics = instance_statistics
        for name, module in encoder.named_modules():
            if isinstance(module, ANY_NORM_TYPES) and not _supported_norm(module):
                raise TypeError(
                    f"{name} ({type(module).__name__}) cannot run sparsely: only InstanceNorm3d without running "
                    "statistics and BatchNorm3d are supported"
                )

    def downsample_ratio(self) -> int:
        return int(self.encoder.downsample_ratio())

    def feature_channels(self) -> tuple[int, ...]:
        return tuple(self.encoder.feature_channels())

    @contextlib.contextmanager
    def masked(self, visible: Tensor) -> Iterator[None]:
        """Within this context the dense encoder runs sparsely for the cell visibility ``B, G0, G1, G2``."""
        cache: dict[tuple[int, ...], Tensor] = {}

        def visible_at(spatial: Sequence[int]) -> Tensor:
            key = tuple(int(s) for s in spatial)
            if key not in cache:
                cache[key] = expand_visibility(visible, key)
            return cache[key]

        def mask_output(module: nn.Module, args, output: Tensor) -> Tensor:
            return output * visible_at(output.shape[2:]).to(output.dtype)

        def norm_forward(module: nn.Module, x: Tensor) -> Tensor:
            return sparse_norm(module, x, visible_at(x.shape[2:]), self.instance_statistics)

        handles, swapped = [], []
        try:
            for module in self.encoder.modules():
                if isinstance(module, MASKED_OUTPUT_TYPES):
                    handles.append(module.register_forward_hook(mask_output))
                elif _supported_norm(module):
                    module.forward = partial(norm_forward, module)
                    swapped.append(module)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in swapped:
                del module.forward

    def forward(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        """Features (finest first) of ``images`` seen through ``mask`` (``B, G0, G1, G2``, True = hidden)."""
        ratio = self.downsample_ratio()
        expected = tuple(s // ratio for s in images.shape[2:])
        if any(s % ratio for s in images.shape[2:]) or tuple(mask.shape[1:]) != expected:
            raise ValueError(
                f"input {tuple(images.shape[2:])} and mask grid {tuple(mask.shape[1:])} do not match the encoder's "
                f"downsample ratio {ratio} (the mask cell must equal the coarsest feature voxel)"
            )
        visible = ~mask.bool()
        with self.masked(visible):
            return self.encoder(images * expand_visibility(visible, images.shape[2:]).to(images.dtype))


def _supported_norm(module: nn.Module) -> bool:
    if type(module) is nn.BatchNorm3d:
        return True
    return type(module) is nn.InstanceNorm3d and not module.track_running_stats
