"""Box-aware decoders (heads/partial_decoder.py): boxes, cropping, and that only the box is ever read."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from lightning_mim.backbones.unet import UNet3D, unet_layers
from lightning_mim.heads.partial_decoder import (
    SubBox,
    SwinUNETRDecoder,
    UNetDecoder,
    crop_to_box,
    default_box_size,
    fixed_box,
    random_box,
)


def test_fixed_box_reproduces_the_official_indices():
    swin = fixed_box((3, 3, 3), default_box_size((3, 3, 3)))  # bottleneck [1:3) of 3
    unet = fixed_box((12, 12, 12), default_box_size((12, 12, 12)))  # bottleneck [4:12) of 12
    assert swin == SubBox((1, 1, 1), (2, 2, 2)) and unet == SubBox((4, 4, 4), (8, 8, 8))
    # Both are voxels [32:96) of a 96³ input.
    assert swin.voxel_slices((32, 32, 32))[0] == slice(32, 96) == unet.voxel_slices((8, 8, 8))[0]
    assert default_box_size((2, 8, 1)) == (2, 5, 1)


def test_random_box_stays_inside_and_moves():
    starts = {random_box((4, 4, 4), (2, 2, 2)).start for _ in range(40)}
    assert len(starts) > 1 and all(0 <= s <= 2 for start in starts for s in start)


def test_bad_boxes_are_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        fixed_box((3, 3, 3), (4, 2, 2))
    with pytest.raises(ValueError, match="multiple"):
        crop_to_box(torch.zeros(1, 1, 10, 12, 12), SubBox((1, 1, 1), (2, 2, 2)), (3, 3, 3))


def test_crop_scales_the_box_to_every_level():
    box = SubBox((1, 0, 1), (2, 1, 1))
    for side in (3, 6, 48, 96):
        factor = side // 3
        cropped = crop_to_box(torch.zeros(1, 2, side, side, side), box, (3, 3, 3))
        assert cropped.shape == (1, 2, 2 * factor, factor, factor)
    volume = torch.arange(96.0).view(1, 1, 96, 1, 1).expand(1, 1, 96, 96, 96)
    assert crop_to_box(volume, box, (3, 3, 3))[0, 0, :, 0, 0].tolist() == list(range(32, 96))


def inside_box(shape, box, grid):
    inside = torch.zeros(shape, dtype=torch.bool)
    factor = [s // g for s, g in zip(shape[2:], grid)]
    inside[(..., *box.voxel_slices(factor))] = True
    return inside


def assert_gradient_only_inside(tensors, box, grid):
    for tensor in tensors:
        inside = inside_box(tensor.shape, box, grid)
        assert tensor.grad[~inside].abs().max() == 0, f"gradient leaks outside the box at size {tuple(tensor.shape)}"
        assert (tensor.grad[inside] != 0).float().mean() > 0.9, f"box not used at size {tuple(tensor.shape)}"


def test_swin_decoder_reads_only_the_box_at_every_scale():
    torch.manual_seed(0)
    f = 12
    decoder = SwinUNETRDecoder(1, 1, f)
    image = torch.rand(1, 1, 96, 96, 96, requires_grad=True)
    stages = [torch.randn(1, f * 2**i, 48 // 2**i, 48 // 2**i, 48 // 2**i, requires_grad=True) for i in range(5)]
    box = fixed_box((3, 3, 3), (2, 2, 2))
    out = decoder(image, stages, box)
    assert out.shape == (1, 1, 64, 64, 64)
    (out * torch.randn_like(out)).sum().backward()
    assert_gradient_only_inside([image, *stages], box, (3, 3, 3))


def test_swin_decoder_has_monai_swin_unetr_names_and_shapes():
    monai_shapes = {k: v.shape for k, v in SwinUNETR(in_channels=2, out_channels=3, feature_size=12).state_dict().items()
                    if not k.startswith("swinViT.")}
    ours = {k: v.shape for k, v in SwinUNETRDecoder(2, 3, 12).state_dict().items()}
    assert ours == monai_shapes


def test_unet_decoder_reads_only_the_box_and_decodes_full_volumes():
    torch.manual_seed(0)
    channels, strides = (4, 4, 8, 8, 16), (2, 2, 2, 1)
    act, norm = unet_layers(0.1)
    decoder = UNetDecoder(channels, strides, 1, act, norm, dropout=0.0)
    sizes = (64, 32, 16, 8, 8)
    features = [torch.randn(1, c, s, s, s, requires_grad=True) for c, s in zip(channels, sizes)]
    box = fixed_box((8, 8, 8), default_box_size((8, 8, 8)))
    out = decoder(features, box)
    assert out.shape == (1, 1, 40, 40, 40)
    (out * torch.randn_like(out)).sum().backward()
    assert_gradient_only_inside(features, box, (8, 8, 8))
    assert decoder(features).shape == (1, 1, 64, 64, 64)


def test_unet_is_a_full_segmentation_network():
    net = UNet3D(in_channels=2, out_channels=4, channels=(4, 4, 8, 8, 16), strides=(2, 2, 2, 1))
    assert net(torch.rand(1, 2, 32, 32, 32)).shape == (1, 4, 32, 32, 32)
    assert net.total_stride == 8
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 2, 36, 32, 32))
    with pytest.raises(ValueError, match="strides"):
        UNet3D(channels=(4, 8, 16), strides=(2, 2, 2))


def test_unet_dropout_is_only_in_the_stem_and_decoder():
    net = UNet3D(1, 1, channels=(4, 4, 8, 8, 16), dropout=0.1)
    dropout_owners = {name.split(".")[0] + "." + name.split(".")[1] for name, module in net.named_modules()
                      if isinstance(module, torch.nn.Dropout) and module.p > 0}
    assert dropout_owners == {"encoder.stem", "decoder.ups"}
