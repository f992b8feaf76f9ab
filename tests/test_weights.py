"""Encoder export files and loading them into segmentation networks (MONAI UNETR / SwinUNETR, project CNNs)."""

import pickle

import lightning as L
import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR

from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.backbones.vit import ViT3D, unetr_encoder_export
from lightning_mim.callbacks.export import EncoderExport
from lightning_mim.methods.base import ExportedEncoder
from lightning_mim.methods.mae import MAE3D
from lightning_mim.segmentation.module import SegmentationModule, resolve_network
from lightning_mim.segmentation.networks import ViTUNETR, build_network, layer_ids, skip_blocks
from lightning_mim.segmentation.weights import (
    FORMAT,
    EncoderFile,
    EncoderFileError,
    PretrainedLoadError,
    adapt_input_channels,
    encoder_metadata,
    export_checkpoint,
    export_module,
    interpolate_position_embedding,
    load_pretrained,
    read_encoder_file,
    save_encoder,
)


def tiny_mae(depth: int = 12, img_size: int = 32) -> MAE3D:
    torch.manual_seed(0)
    return MAE3D(img_size=img_size, embed_dim=48, depth=depth, num_heads=4, decoder_dim=24, decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory) -> tuple[MAE3D, EncoderFile, object]:
    model = tiny_mae()
    file = export_module(model, data={"modality": "ct", "spacing": [1.5, 1.5, 2.0], "preprocessing": {"intensity": "window"}},
                         config={"model": {"class_path": "lightning_mim.methods.mae.MAE3D"}})
    path = save_encoder(file, tmp_path_factory.mktemp("enc") / "encoder.pt")
    return model, file, path


def unetr_for(file: EncoderFile, roi: int = 32, in_channels: int = 1, out_channels: int = 3) -> UNETR:
    kwargs = {k: v for k, v in file.network_kwargs.items() if k != "in_channels"}
    return build_network("unetr", in_channels, out_channels, roi, **kwargs)


# --------------------------------------------------------------------------- format
def test_file_is_plain_and_self_describing(mae_file):
    _, _, path = mae_file
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    meta = payload["meta"]
    for key in ("method", "target", "network_kwargs", "patch_size", "roi_size", "spacing", "modality", "preprocessing",
                "git", "config", "versions", "checksum"):
        assert key in meta, key
    assert meta["method"] == "mae3d" and meta["target"] == "unetr"
    assert meta["patch_size"] == 16 and meta["roi_size"] == [32, 32, 32] and meta["spacing"] == [1.5, 1.5, 2.0]
    assert meta["network_kwargs"]["hidden_size"] == 48 and meta["network_kwargs"]["qkv_bias"] is True
    assert all(k.startswith("vit.") for k in payload["state_dict"])
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temporary behind


def test_mae_export_loads_strictly_into_monai_unetr_vit_and_matches_vit3d(mae_file):
    model, _, path = mae_file
    file = read_encoder_file(path)
    net = unetr_for(file).eval()
    net.vit.load_state_dict({k[len("vit."):]: v for k, v in file.state_dict.items()}, strict=True)
    for key, value in net.vit.state_dict().items():
        assert torch.equal(value, file.state_dict[f"vit.{key}"]), key
    vit = ViT3D(32, 16, 1, 48, 12, 4, use_cls_token=False).eval()
    vit.load_state_dict({k: v for k, v in model.encoder.state_dict().items() if k != "cls_token"})
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        monai_tokens, _ = net.vit(x)
    # MONAI's LayerNorm eps (1e-5) vs timm's (1e-6) is the only difference.
    assert torch.allclose(monai_tokens, vit(x), atol=1e-4)


def test_load_pretrained_copies_the_encoder_and_reports_the_decoder_as_new(mae_file, capsys):
    _, file, path = mae_file
    net = unetr_for(file)
    report = load_pretrained(net, path)
    printed = capsys.readouterr().out
    assert report.ok and not report.adapted
    assert len(report.loaded) == len(file.state_dict)
    assert report.from_scratch and all(not k.startswith("vit.") for k in report.from_scratch)
    assert "initialised from scratch" in printed and "loaded" in printed
    for key, value in file.state_dict.items():
        assert torch.equal(net.state_dict()[key], value)


def test_unetr_export_refuses_a_patch_size_unetr_cannot_take():
    with pytest.raises(ValueError, match="patch size 8"):
        unetr_encoder_export(ViT3D(32, 8, 1, 48, 12, 4))


def test_vit_unetr_is_monai_unetr_at_depth_12():
    torch.manual_seed(0)
    kwargs = dict(hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8)
    monai_net = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), **kwargs).eval()
    ours = ViTUNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), num_layers=12, **kwargs).eval()
    ours.load_state_dict(monai_net.state_dict(), strict=True)  # same names and shapes, every key
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai_net(x))
    assert skip_blocks(12) == (3, 6, 9) and skip_blocks(2) == (0, 1, 1) and skip_blocks(6) == (2, 3, 4)


def test_a_shallow_vit_is_fine_tuned_with_the_any_depth_unetr_chosen_from_the_file(tmp_path, capsys):
    mae = tiny_mae(depth=2)
    path = save_encoder(export_module(mae), tmp_path / "shallow.pt")
    module = SegmentationModule(num_classes=3, pretrained=str(path), roi_size=32, warmup_epochs=0)
    assert isinstance(module.network, ViTUNETR) and len(module.network.vit.blocks) == 2
    assert module.load_report.ok and not module.load_report.missing
    for key, value in read_encoder_file(path).state_dict.items():
        assert torch.equal(module.network.state_dict()[key], value), key
    assert module(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    depth, top = layer_ids("unetr", module.network)
    assert depth["vit.norm.weight"] == 3 and top == 4  # stem 0, blocks 1-2, final norm 3


def test_swin_export_round_trips_into_monai_swinunetr(tmp_path):
    torch.manual_seed(0)
    encoder = MaskedSwinEncoder.from_config("swin_smit", img_size=32, feature_size=12, depths=(1, 1, 1, 1))
    export = ExportedEncoder("swin_unetr", encoder.swin_unetr_state_dict(), encoder.swin_unetr_kwargs(), {"method": "smit"})
    path = save_encoder(EncoderFile(export.state_dict, encoder_metadata(export)), tmp_path / "swin.pt")
    file = read_encoder_file(path)
    kwargs = {k: v for k, v in file.network_kwargs.items() if k != "in_channels"}
    net = build_network("swin_unetr", 1, 4, 32, **kwargs)
    report = load_pretrained(net, path, log=None)
    assert report.ok and len(report.loaded) == len(export.state_dict)
    fresh = SwinUNETR(in_channels=1, out_channels=4, **kwargs)
    fresh.swinViT.load_state_dict({k[len("swinViT."):]: v for k, v in file.state_dict.items()}, strict=True)
    for key, value in fresh.swinViT.state_dict().items():
        assert torch.equal(net.swinViT.state_dict()[key], value), key
        assert torch.equal(value, export.state_dict[f"swinViT.{key}"]), key


def test_cnn_exports_load_into_the_project_networks(tmp_path):
    stunet = STUNetEncoder(1, (8, 16, 32, 64, 64))  # AnatoMask exports the bare encoder keys
    export = ExportedEncoder("stunet_encoder", stunet.state_dict(), stunet.network_kwargs(), {"method": "anatomask"})
    net = build_network("stunet_encoder", 1, 3, 32, **{k: v for k, v in export.network_kwargs.items() if k != "in_channels"})
    report = load_pretrained(net, EncoderFile(export.state_dict, encoder_metadata(export)), log=None)
    assert report.ok and all(torch.equal(net.encoder.state_dict()[k], v) for k, v in stunet.state_dict().items())
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)

    unet = UNet3D(1, 1, channels=(8, 8, 16, 16, 32), strides=(2, 2, 2, 1))  # HybridMIM: encoder + decoder, no head
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("decoder.out.")}
    kwargs = {"in_channels": 1, "channels": [8, 8, 16, 16, 32], "strides": [2, 2, 2, 1], "dropout": 0.1}
    export = ExportedEncoder("hybridmim_unet", state, kwargs, {"method": "hybridmim"})
    target = build_network("hybridmim_unet", 1, 5, 32, **{k: v for k, v in kwargs.items() if k != "in_channels"})
    report = load_pretrained(target, EncoderFile(export.state_dict, encoder_metadata(export)), log=None)
    assert report.ok and sorted(report.from_scratch) == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]


# --------------------------------------------------------------------------- wrong files fail loudly
def test_wrong_network_fails_with_a_readable_report(mae_file):
    _, file, path = mae_file
    wider = build_network("unetr", 1, 3, 32, **{**{k: v for k, v in file.network_kwargs.items() if k != "in_channels"},
                                                 "hidden_size": 96, "mlp_dim": 192})
    with pytest.raises(PretrainedLoadError) as error:
        load_pretrained(wider, path, log=None)
    text = str(error.value)
    assert "mismatched" in text and "vit.blocks.0.attn.qkv.weight: file 144×48 vs network 288×96" in text
    assert "refusing to load" in text
    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
    with pytest.raises(PretrainedLoadError, match="not a unetr network"):
        load_pretrained(swin, path, log=None)


def test_missing_and_unexpected_encoder_keys_are_errors(mae_file):
    _, file, _ = mae_file
    state = dict(file.state_dict)
    state.pop("vit.blocks.3.mlp.linear1.weight")
    state["vit.blocks.3.mlp.fc1.weight"] = torch.zeros(192, 48)  # timm name that was never mapped
    broken = EncoderFile(state, file.meta, "broken.pt")
    with pytest.raises(PretrainedLoadError) as error:
        load_pretrained(unetr_for(file), broken, log=None)
    report = error.value.report
    assert report.missing == ["vit.blocks.3.mlp.linear1.weight"]
    assert report.unexpected == ["vit.blocks.3.mlp.fc1.weight"]
    assert "vit.blocks.3.mlp.fc1.weight" in str(error.value)


def test_tampered_truncated_and_foreign_files_are_rejected(mae_file, tmp_path):
    _, _, path = mae_file
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["vit.norm.weight"] = payload["state_dict"]["vit.norm.weight"] + 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(EncoderFileError, match="modified"):
        read_encoder_file(tmp_path / "tampered.pt")

    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EncoderFileError, match="truncated or corrupt"):
        read_encoder_file(tmp_path / "truncated.pt")

    with open(tmp_path / "foreign.pt", "wb") as handle:
        pickle.dump({"format": FORMAT, "meta": L.LightningModule}, handle)
    with pytest.raises(EncoderFileError, match="foreign.pt"):
        read_encoder_file(tmp_path / "foreign.pt")

    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(EncoderFileError, match="not a lightning-mim encoder file"):
        read_encoder_file(tmp_path / "other.pt")


# --------------------------------------------------------------------------- adaptation
def test_position_interpolation_keeps_a_constant_embedding_constant():
    table = torch.full((1, 2 * 3 * 4, 6), 0.7)
    resized = interpolate_position_embedding(table, (2, 3, 4), (5, 5, 3))
    assert resized.shape == (1, 75, 6)
    assert torch.allclose(resized, torch.full_like(resized, 0.7))


def test_position_interpolation_preserves_axis_order():
    """A table varying along axis 0 only must still vary along axis 0 only (row-major flattening)."""
    grid = torch.arange(2.0).view(2, 1, 1).expand(2, 3, 3).reshape(1, 18, 1).repeat(1, 1, 6)
    resized = interpolate_position_embedding(grid, (2, 3, 3), (4, 3, 3)).reshape(4, 3, 3, 6)
    assert torch.allclose(resized[:, 0, 0], resized[:, 2, 1]) and resized[0, 0, 0, 0] < resized[3, 0, 0, 0]


def test_finetuning_roi_differs_from_pretraining(mae_file):
    _, file, path = mae_file
    net = unetr_for(file, roi=64)
    report = load_pretrained(net, path, log=None)
    assert report.adapted == ["vit.patch_embedding.position_embeddings: token grid 2×2×2 → 4×4×4 (trilinear)"]
    assert net.vit.patch_embedding.position_embeddings.shape == (1, 64, 48)
    assert net(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def test_stem_adaptation_gives_the_pretrained_response_on_repeated_channels(mae_file):
    _, file, path = mae_file
    single, multi = unetr_for(file), unetr_for(file, in_channels=3)
    load_pretrained(single, path, log=None)
    report = load_pretrained(multi, path, log=None)
    assert any("1 → 3 input channels" in note for note in report.adapted)
    x = torch.rand(1, 1, 32, 32, 32)
    embed_one = single.vit.patch_embedding.patch_embeddings(x)
    embed_three = multi.vit.patch_embedding.patch_embeddings(x.repeat(1, 3, 1, 1, 1))
    assert torch.allclose(embed_one, embed_three, atol=1e-5)
    kernel = torch.randn(4, 2, 3, 3, 3)
    assert torch.allclose(adapt_input_channels(kernel, 4).sum(1), kernel.sum(1), atol=1e-6)


# --------------------------------------------------------------------------- from checkpoints
class _Volumes(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return {"image": torch.rand(1, 32, 32, 32)}


def _fit_one_step(model, tmp_path, callbacks=()):
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(model, torch.utils.data.DataLoader(_Volumes(), batch_size=2))
    return trainer


def test_export_from_a_checkpoint_and_load_pretrained_from_the_checkpoint(tmp_path):
    model = tiny_mae()
    trainer = _fit_one_step(model, tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(EncoderFileError, match="cannot tell which method"):
        export_checkpoint(checkpoint)
    file = export_checkpoint(checkpoint, "lightning_mim.methods.mae.MAE3D")
    assert file.meta["global_step"] == 1 and file.meta["source_checkpoint"].endswith("last.ckpt")
    exported = model.export_encoder().state_dict
    assert all(torch.equal(file.state_dict[k], v) for k, v in exported.items())

    # load_pretrained(network, "x.ckpt") finds the class in the run's lightning_config.yaml
    (tmp_path / "run" / "lightning_config.yaml").write_text("model:\n  class_path: lightning_mim.methods.mae.MAE3D\n")
    net = unetr_for(file)
    assert load_pretrained(net, checkpoint, log=None).ok
    assert torch.equal(net.vit.norm.weight, exported["vit.norm.weight"])


def test_export_callback_writes_the_file_and_warns_when_the_method_cannot_export(tmp_path):
    callback = EncoderExport()
    _fit_one_step(tiny_mae(), tmp_path / "ok", [callback])
    assert read_encoder_file(callback.path).target == "unetr"
    fine_patches = EncoderExport()
    torch.manual_seed(0)
    model = MAE3D(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, decoder_dim=24, decoder_depth=1,
                  decoder_heads=2)
    with pytest.warns(UserWarning, match="encoder not exported: .*patch size 8"):
        _fit_one_step(model, tmp_path / "fine", [fine_patches])
    assert fine_patches.path is None


def test_configured_network_only_fills_in_what_the_file_leaves_open(mae_file):
    _, file, _ = mae_file
    target, kwargs, notes = resolve_network(file, "unetr", {"feature_size": 8, "hidden_size": 768})
    assert target == "unetr" and kwargs["feature_size"] == 8 and kwargs["hidden_size"] == 48
    assert len(notes) == 1 and "hidden_size=768 ignored" in notes[0]
    target, kwargs, notes = resolve_network(file, "swin_unetr", {"feature_size": 48})
    assert target == "unetr" and "feature_size" not in kwargs and "network='swin_unetr'" in notes[0]


def test_layer_ids_order_the_encoder_for_layer_decay(mae_file):
    _, file, _ = mae_file
    depth, top = layer_ids("unetr", unetr_for(file))
    assert depth["vit.patch_embedding.patch_embeddings.weight"] == 0
    assert depth["vit.blocks.0.attn.qkv.weight"] == 1 and depth["vit.blocks.11.mlp.linear2.bias"] == 12
    assert depth["out.conv.conv.weight"] == top == 14


def test_segmentation_module_builds_its_network_from_the_file_alone(mae_file):
    from lightning_mim.segmentation.module import SegmentationModule

    _, file, path = mae_file
    model = SegmentationModule(num_classes=4, pretrained=str(path), roi_size=32, network_kwargs={"feature_size": 8})
    assert isinstance(model.network, UNETR) and model.method_name == "mae3d" and model.load_report.ok
    assert torch.equal(model.network.vit.blocks[5].attn.qkv.weight, file.state_dict["vit.blocks.5.attn.qkv.weight"])
    assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


# (experiment recipe, its tiny test overrides): every pre-training method's export must load into its network.
METHOD_CONFIGS = [("selfmedhpm", "selfmedhpm_tiny"), ("simmim", "simmim_tiny"), ("smit", "smit_tiny"),
                  ("anatomask", "anatomask_tiny"), ("hybridmim_swin", "hybridmim_swin_tiny"),
                  ("hybridmim_unet", "hybridmim_unet_tiny")]


@pytest.mark.parametrize(("recipe", "tiny"), METHOD_CONFIGS)
def test_every_method_export_loads_strictly_into_its_segmentation_network(recipe, tiny):
    import importlib
    from pathlib import Path

    import yaml

    from lightning_mim.segmentation.module import resolve_network

    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "configs" / f"{tiny}.yaml").is_file():
        pytest.skip(f"tests/configs/{tiny}.yaml is gone; update METHOD_CONFIGS")
    model_config = yaml.safe_load((root / "experiments" / f"{recipe}.yaml").read_text())["model"]
    overrides = (yaml.safe_load((root / "tests" / "configs" / f"{tiny}.yaml").read_text()).get("model") or {}).get("init_args", {})
    args = {**model_config["init_args"], **overrides}
    if "depth" in args:  # ViT methods: UNETR-style networks take 16³ token patches
        args.update(patch_size=16)
    module_name, _, class_name = model_config["class_path"].rpartition(".")
    torch.manual_seed(0)
    method = getattr(importlib.import_module(module_name), class_name)(**args)
    file = export_module(method)
    target, kwargs, notes = resolve_network(file, None, None)
    kwargs.pop("in_channels", None)
    roi = file.meta.get("roi_size") or file.meta.get("img_size")
    network = build_network(target, 1, 3, roi, **kwargs)
    report = load_pretrained(network, file, log=None)
    assert report.ok and not notes and len(report.loaded) == len(file.state_dict)
    state = network.state_dict()  # AnatoMask writes bare encoder keys; the loader adds the "encoder." prefix
    assert all(torch.equal(state[k if k in state else f"encoder.{k}"], v) for k, v in file.state_dict.items())


def test_export_encoder_command_ends_in_one_line_naming_the_checkpoint(tmp_path, capsys):
    from lightning_mim.cli import main

    torch.manual_seed(0)
    model = MAE3D(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, decoder_dim=24, decoder_depth=1,
                  decoder_heads=2)
    checkpoint = tmp_path / "fine_patches.ckpt"
    _fit_one_step(model, tmp_path).save_checkpoint(checkpoint)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    capsys.readouterr()  # what fitting printed
    for path, reason in ((checkpoint, "this ViT cannot be exported for MONAI UNETR: patch size 8"),
                         (garbage, "not a readable Lightning checkpoint")):
        assert main(["export-encoder", "--checkpoint", str(path), "--model_class", "lightning_mim.methods.mae.MAE3D"]) == 1
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
        assert captured.err.startswith(f"export-encoder: {path}: ") and reason in captured.err
    assert not (tmp_path / "encoder.pt").exists()


def test_fine_tuning_warns_for_each_preprocessing_difference_and_stops_on_a_channel_count(mae_file, tmp_path):
    from data_modules.presets import preset
    from data_modules.segmentation import SegmentationDataModule
    from lightning_mim.segmentation.weights import preprocessing_differences

    _, _, path = mae_file
    pretraining = SegmentationDataModule(preprocessing="ct_abdomen_btcv", patch_size=32, augmentation=None).describe()
    meta = {**read_encoder_file(path).meta, "preprocessing": pretraining["preprocessing"], "modality": "ct",
            "roi_size": [32, 32, 32]}
    same = SegmentationDataModule(preprocessing="ct_abdomen_btcv", patch_size=32, augmentation=None)
    assert preprocessing_differences(meta, same.describe()) == []

    lps = {**preset("mri_zscore").to_dict(), "orientation": "LPS"}
    other = SegmentationDataModule(preprocessing=preset("mri_zscore").__class__(**lps), patch_size=64,
                                   augmentation=None)
    notes = preprocessing_differences(meta, other.describe())
    fields = [note.split(":")[0] for note in notes]
    assert fields == ["preprocessing orientation", "preprocessing spacing", "preprocessing intensity",
                      "preprocessing modality", "patch size"]
    assert "encoder pre-trained with 'RAS', fine-tuning data use 'LPS'" in notes[0]

    file = read_encoder_file(path)
    save_encoder(EncoderFile(file.state_dict, meta), tmp_path / "encoder.pt")
    module = SegmentationModule(num_classes=3, pretrained=str(tmp_path / "encoder.pt"), roi_size=32, warmup_epochs=0)
    with pytest.warns(UserWarning, match=r"encoder.pt: preprocessing orientation: encoder pre-trained with 'RAS'"):
        module.check_data_matches(SegmentationDataModule(preprocessing=preset("mri_zscore").__class__(**lps),
                                                         patch_size=32, augmentation=None))
    two_channels = SegmentationDataModule(preprocessing="ct_abdomen_btcv", patch_size=32, augmentation=None,
                                          in_channels=2)
    with pytest.raises(ValueError, match=r"the data have 2 image channel\(s\) but the network takes 1; set model.in_channels: 2"):
        module.check_data_matches(two_channels)
