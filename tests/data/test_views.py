"""View samplers and patch augmentation on single patches."""

from __future__ import annotations

import pytest
import torch

from data_modules import OverlappingViews, PatchAugmentation, SingleView, TwoOverlappingViews, build_view_sampler


def _numbered_patch(size=12):
    """Every voxel holds its own flat index, so a crop reveals where it was taken."""
    return torch.arange(size**3, dtype=torch.float32).reshape(1, size, size, size)


def _offset(view, size=12):
    first = int(view[0, 0, 0, 0])
    return first // size**2, (first // size) % size, first % size


def test_single_view_is_the_patch_itself():
    patch = _numbered_patch()
    (view,) = SingleView()(patch, torch.Generator().manual_seed(0))
    assert view is patch


def test_two_overlapping_views_are_crops_of_the_context_patch_that_overlap():
    patch, sampler = _numbered_patch(12), TwoOverlappingViews(8)
    generator = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(30):
        first, second = sampler(patch, generator)
        for view in (first, second):
            a, b, c = _offset(view)
            assert view.shape == (1, 8, 8, 8)
            torch.testing.assert_close(view, patch[:, a : a + 8, b : b + 8, c : c + 8])
            offsets.add((a, b, c))
        shared = set(first.flatten().tolist()) & set(second.flatten().tolist())
        assert len(shared) >= (2 * 8 - 12) ** 3  # two 8³ crops of a 12³ patch always share at least 4³ voxels
    assert {a for a, _, _ in offsets} == set(range(5))  # every start position is reachable


def test_views_are_reproducible_from_the_generator_seed():
    patch, sampler = _numbered_patch(), OverlappingViews((8, 6, 4), num_views=3)
    def draw(seed):
        return [_offset(v) for v in sampler(patch, torch.Generator().manual_seed(seed))]
    assert draw(3) == draw(3) and draw(3) != draw(4)
    assert [v.shape for v in sampler(patch, torch.Generator())] == [(1, 8, 6, 4)] * 3


def test_view_sampler_errors():
    with pytest.raises(ValueError, match="does not fit in the patch"):
        TwoOverlappingViews(16)(_numbered_patch(12), torch.Generator())
    with pytest.raises(ValueError, match="needs a view_size"):
        build_view_sampler(num_views=2)
    assert isinstance(build_view_sampler(2, 8), TwoOverlappingViews) and isinstance(build_view_sampler(), SingleView)


def test_flips_and_intensity_jitter():
    patch = _numbered_patch(4)
    flipped = PatchAugmentation(flip_prob=1.0)(patch, torch.Generator())
    torch.testing.assert_close(flipped, patch.flip(-3, -2, -1))
    assert PatchAugmentation()(patch, torch.Generator()) is patch

    jitter = PatchAugmentation(intensity_scale=0.1, intensity_shift=0.05)
    for seed in range(10):
        out = jitter(patch, torch.Generator().manual_seed(seed))
        shift = float(out.flatten()[0])  # voxel value 0 -> 0 * scale + shift
        scale = float(out.flatten()[1]) - shift
        assert abs(shift) <= 0.05 and 0.9 <= scale <= 1.1
        torch.testing.assert_close(out, patch * scale + shift)
    with pytest.raises(ValueError, match="flip_prob"):
        PatchAugmentation(flip_prob=2)
