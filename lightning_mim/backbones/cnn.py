"""STU-Net-style residual CNN encoder (methods.md §4.2), the dense network AnatoMask pre-trains.

It is a plain dense module: masking for SparK-style pre-training is added from outside by
:class:`lightning_mim.backbones.sparse.SparseEncoder` without renaming a parameter, so the
pre-trained ``state_dict`` loads strictly into a fresh :class:`STUNetEncoder` for fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """conv3 → InstanceNorm(affine) → LeakyReLU → conv3 → InstanceNorm, + shortcut, → LeakyReLU.

    ``project=True`` (first block of a stage) gives the shortcut a 1×1 convolution with the block's
    stride so it matches the new width and resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        if not project and (in_channels != out_channels or stride != 1):
            raise ValueError("a block that changes width or resolution needs a projection shortcut")
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if project else nn.Identity()
        self.act2 = nn.LeakyReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class STUNetEncoder(nn.Module):
    """Stages of residual blocks; stage 0 keeps the resolution, every later stage halves it.

    Defaults are STU-Net-B's first five stages (one block per stage, widths 32…512), the part
    AnatoMask pre-trains: downsample ratio ``2**(stages − 1) = 16``. STU-Net-L: ``depths=2``,
    ``dims=(64, 128, 256, 512, 1024)``; STU-Net-H: ``depths=3``, ``dims=(96, …, 1536)``.

    Args:
        in_channels: image channels.
        dims: output width of each stage.
        depths: residual blocks per stage (one int for all stages, or one per stage).
    """

    def __init__(
        self,
        in_channels: int = 1,
        dims: Sequence[int] = (32, 64, 128, 256, 512),
        depths: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        dims = tuple(int(d) for d in dims)
        depths = (int(depths),) * len(dims) if isinstance(depths, int) else tuple(int(d) for d in depths)
        if len(dims) < 2 or len(depths) != len(dims) or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"need ≥ 2 stages with one positive depth per width, got dims={dims}, depths={depths}")
        self.in_channels = in_channels
        self.dims = dims
        self.depths = depths
        stages = []
        width = in_channels
        for index, (dim, depth) in enumerate(zip(dims, depths)):
            stride = 1 if index == 0 else 2
            blocks = [ResidualBlock(width, dim, stride, project=True)]
            blocks += [ResidualBlock(dim, dim) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            width = dim
        self.stages = nn.ModuleList(stages)

    def feature_channels(self) -> tuple[int, ...]:
        """Width of each returned feature map, finest first."""
        return self.dims

    def downsample_ratio(self) -> int:
        """Side of the input cube that one voxel of the coarsest feature map covers."""
        return 2 ** (len(self.dims) - 1)

    def network_kwargs(self) -> dict:
        """Constructor arguments that rebuild this encoder (recorded in exports)."""
        return {"in_channels": self.in_channels, "dims": list(self.dims), "depths": list(self.depths)}

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature map of every stage, finest (full resolution) first."""
        ratio = self.downsample_ratio()
        if any(s % ratio for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by the downsample ratio {ratio}")
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
