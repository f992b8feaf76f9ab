import torch

from lightning_mim.losses.reconstruction import masked_patch_loss, masked_voxel_l1, normalize_patches


def test_perfect_reconstruction_has_zero_loss():
    target = torch.randn(2, 8, 64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    loss, _ = masked_patch_loss(normalize_patches(target), target, mask, norm_pix=True)
    assert loss.item() < 1e-10


def test_loss_is_blind_to_visible_patches():
    target = torch.randn(2, 8, 64)
    pred = torch.randn(2, 8, 64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 4:] = True
    loss, loss_map = masked_patch_loss(pred, target, mask, norm_pix=False)
    pred2 = pred.clone()
    pred2[:, :4] += 100.0
    loss2, _ = masked_patch_loss(pred2, target, mask, norm_pix=False)
    assert torch.allclose(loss, loss2)
    assert torch.allclose(loss, loss_map[:, 4:].mean())


def test_masked_voxel_l1_known_value():
    pred = torch.zeros(1, 2, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2, 2)
    vox = torch.zeros(1, 1, 2, 2, 2)
    vox[..., 0] = 1.0
    # each masked voxel has |error| 1 in both channels → mean 1
    assert abs(masked_voxel_l1(pred, target, vox).item() - 1.0) < 1e-4
    pred[..., 1] = 5.0  # visible voxels do not count
    assert abs(masked_voxel_l1(pred, target, vox).item() - 1.0) < 1e-4
