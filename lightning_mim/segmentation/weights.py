"""Exported encoders: the file format, reading it back, and loading it into a segmentation network.

File format (``lightning-mim-encoder/1``): a ``torch.save``'d dict of tensors and plain Python values
only, so ``torch.load(path, weights_only=True)`` reads it without executing anything::

    {"format": "lightning-mim-encoder/1",
     "state_dict": {key: tensor},   # keys of the TARGET network, e.g. "vit.blocks.0.attn.qkv.weight"
     "meta": {"method", "target", "network_kwargs", "patch_size", "roi_size", "preprocessing",
              "modality", "spacing", "data", "config", "git", "versions", "created", "checksum", ...}}

``state_dict`` keys are those of the whole target network (``vit.*`` for UNETR, ``swinViT.*`` for
Swin UNETR, ``encoder.*`` for the CNNs), so a file may also carry decoder weights (HybridMIM).
``meta["checksum"]`` is a SHA-256 over every key, dtype, shape and byte of the weights: a file
edited after export is rejected. Files are written to a temporary and moved into place.

:func:`load_pretrained` is the one entry point for fine-tuning. It accepts such a file or a
pre-training Lightning checkpoint (whose module is rebuilt and asked for its export), maps keys,
adapts position embeddings and the input stem, and raises — with the full report — if any encoder
key is missing, unexpected or of the wrong shape. Decoder/head keys absent from the file are
reported as initialised from scratch.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import subprocess
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from lightning_mim.methods.base import ExportedEncoder
from lightning_mim.run_files import atomic_write
from lightning_mim.segmentation.networks import network_spec

FORMAT = "lightning-mim-encoder/1"
CONFIG_FILENAME = "lightning_config.yaml"


class EncoderFileError(ValueError):
    """An encoder file (or checkpoint) cannot be read or is not what it claims to be."""


class PretrainedLoadError(RuntimeError):
    """Pre-trained weights do not fit the network; ``report`` says key by key why."""

    def __init__(self, report: LoadReport) -> None:
        super().__init__(report.format())
        self.report = report


# --------------------------------------------------------------------------- the file
def state_checksum(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 over keys, dtypes, shapes and raw bytes (any dtype, bf16 included), in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """``value`` as JSON types (tuples → lists, paths and other objects → str): safe for weights_only."""
    return json.loads(json.dumps(value, default=str))


def git_state(folder: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the repository holding this package, or None outside a checkout."""
    where = str(folder or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@dataclasses.dataclass
class EncoderFile:
    """An exported encoder in memory: weights keyed as the target network plus the metadata block."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    source: str = "<memory>"

    @property
    def target(self) -> str:
        return self.meta["target"]

    @property
    def network_kwargs(self) -> dict[str, Any]:
        return dict(self.meta.get("network_kwargs") or {})

    @property
    def method(self) -> str:
        return str(self.meta.get("method") or "unknown")

    def payload(self) -> dict[str, Any]:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict.items()}
        meta = plain({**self.meta, "checksum": state_checksum(state)})
        return {"format": FORMAT, "state_dict": state, "meta": meta}


def encoder_metadata(
    export: ExportedEncoder,
    module: nn.Module | None = None,
    data: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata block of an export.

    ``data`` is the pre-training data module's ``describe()`` (preprocessing, spacing, modality,
    patch size); ``config`` the resolved LightningCLI config of the run. The method's own metadata
    (``export.metadata``) wins over derived values.
    """
    import monai

    data = dict(data or {})
    preprocessing = data.get("preprocessing") or {}
    roi = getattr(module, "input_size", None) if module is not None else None
    meta: dict[str, Any] = {
        "method": type(module).__name__.lower() if module is not None else "unknown",
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}" if module is not None else None,
        "roi_size": list(roi) if roi is not None else data.get("patch_size"),
        "patch_size": export.network_kwargs.get("patch_size"),
        "modality": data.get("modality", preprocessing.get("modality")),
        "spacing": data.get("spacing", preprocessing.get("spacing")),
        "intensity": {k: preprocessing.get(k) for k in ("intensity", "window", "output_range")} if preprocessing else None,
        "preprocessing": preprocessing or None,
        "data": data or None,
        "config": dict(config) if config else None,
        "git": git_state(),
        "versions": {"torch": torch.__version__, "monai": monai.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    meta.update(export.metadata)
    meta["target"] = export.target
    meta["network_kwargs"] = dict(export.network_kwargs)
    return plain(meta)


def save_encoder(file: EncoderFile, path: str | os.PathLike) -> Path:
    """Write ``file`` atomically (:func:`lightning_mim.run_files.atomic_write`)."""
    return atomic_write(Path(path).expanduser(), lambda handle: torch.save(file.payload(), handle))


def read_encoder_file(path: str | os.PathLike) -> EncoderFile:
    """Read and verify an exported encoder; every failure is an :class:`EncoderFileError` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderFileError(f"{path}: encoder file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise EncoderFileError(f"{path}: not a readable encoder file, it may be truncated or corrupt ({error})"[:600]) from error
    except Exception as error:  # the pickle loader raises UnpicklingError & co for foreign objects
        raise EncoderFileError(f"{path}: holds objects other than tensors and plain values ({error})"[:600]) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise EncoderFileError(f"{path}: not a lightning-mim encoder file (format {found!r}, expected {FORMAT!r})")
    state, meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()) or not isinstance(meta, dict):
        raise EncoderFileError(f"{path}: malformed encoder file (needs a tensor 'state_dict' and a 'meta' dict)")
    for required in ("target", "network_kwargs", "checksum"):
        if required not in meta:
            raise EncoderFileError(f"{path}: metadata lacks {required!r}")
    if state_checksum(state) != meta["checksum"]:
        raise EncoderFileError(f"{path}: weights do not match the checksum recorded at export; the file was modified")
    return EncoderFile(state_dict=state, meta=meta, source=str(path))


# --------------------------------------------------------------------------- from a pre-training checkpoint
def run_config_for(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved config saved beside a checkpoint (``<run>/lightning_config.yaml`` for ``<run>/checkpoints/x.ckpt``)."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        candidate = folder / CONFIG_FILENAME
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    return None


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise EncoderFileError(f"cannot import the module class {class_path!r}: {error}") from error


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EncoderFileError(f"{path}: checkpoint does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any loader failure means the same thing to the user
        raise EncoderFileError(f"{path}: not a readable Lightning checkpoint ({error})"[:600]) from error
    if not isinstance(content, dict) or "state_dict" not in content:
        raise EncoderFileError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return content


def module_from_checkpoint(checkpoint: str | os.PathLike, class_path: str | None = None) -> nn.Module:
    """Rebuild a pre-training LightningModule from its checkpoint.

    The class comes from ``class_path``, else from the ``_class_path`` LightningCLI stores in the
    checkpoint's hyper-parameters, else from ``lightning_config.yaml`` beside it. Only run this on
    checkpoints you trust: importing the named class executes its module.
    """
    from lightning_mim.methods.base import MIMModule

    path = Path(checkpoint).expanduser()
    hparams = _read_checkpoint(path).get("hyper_parameters") or {}
    config = run_config_for(path) or {}
    class_path = class_path or hparams.get("_class_path") or (config.get("model") or {}).get("class_path")
    if not class_path:
        raise EncoderFileError(
            f"{path}: cannot tell which method wrote this checkpoint (no '_class_path' in its hyper-parameters and "
            f"no {CONFIG_FILENAME} beside it); pass the class, e.g. --model_class lightning_mim.methods.mae.MAE3D"
        )
    cls = _import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, MIMModule)):
        raise EncoderFileError(f"{class_path} is not a pre-training method (a lightning_mim MIMModule)")
    return cls.load_from_checkpoint(path, map_location="cpu")


def data_description(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``describe()`` of the data module a resolved config declares (None if it cannot be built)."""
    data = (config or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        return None
    import lightning as L
    from jsonargparse import ArgumentParser

    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(L.LightningDataModule, "data", fail_untyped=False)
        datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data
    except Exception:  # noqa: BLE001 - metadata is best effort; the weights do not depend on it
        return None
    describe = getattr(datamodule, "describe", None)
    return plain(describe()) if callable(describe) else None


def export_module(module: nn.Module, data: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                  **extra: Any) -> EncoderFile:
    """Ask a pre-training module for its encoder and wrap it with the metadata block."""
    export = module.export_encoder()
    return EncoderFile(dict(export.state_dict), encoder_metadata(export, module, data, config, **extra))


def export_checkpoint(checkpoint: str | os.PathLike, class_path: str | None = None) -> EncoderFile:
    """The encoder of a pre-training checkpoint, as if the export callback had written it."""
    module = module_from_checkpoint(checkpoint, class_path)
    config = run_config_for(checkpoint)
    content = _read_checkpoint(Path(checkpoint).expanduser())
    file = export_module(module, data_description(config), config, source_checkpoint=str(Path(checkpoint).resolve()),
                         epoch=content.get("epoch"), global_step=content.get("global_step"))
    file.source = str(checkpoint)
    return file


def read_pretrained(source: str | os.PathLike | EncoderFile) -> EncoderFile:
    """An :class:`EncoderFile` from an export file, a pre-training ``.ckpt``, or one already in memory."""
    if isinstance(source, EncoderFile):
        return source
    path = Path(source).expanduser()
    if path.suffix == ".ckpt":
        return export_checkpoint(path)
    return read_encoder_file(path)


# --------------------------------------------------------------------------- preprocessing check
#: Preprocessing settings an encoder learned under, with what a difference means at fine-tuning.
_PREPROCESSING_FIELDS = {
    "orientation": "the encoder saw the axes in another order/direction",
    "spacing": "anatomy appears at another scale",
    "intensity": "voxel values mean something else",
    "window": "voxel values mean something else",
    "output_range": "voxel values mean something else",
    "suv_clip": "voxel values mean something else",
    "modality": "the encoder was pre-trained on another imaging modality",
}


def preprocessing_differences(meta: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """One sentence per preprocessing setting where the fine-tuning data differ from the encoder's pre-training.

    ``meta`` is an encoder file's metadata, ``data`` the fine-tuning data module's ``describe()``.
    Settings the file does not record are not compared (older exports, hand-made files).
    """
    trained = dict(meta.get("preprocessing") or {})
    if meta.get("modality") is not None:
        trained.setdefault("modality", meta["modality"])
    now = dict(data.get("preprocessing") or {})
    if data.get("modality") is not None:
        now.setdefault("modality", data["modality"])
    uses_window = "window" in (trained.get("intensity"), now.get("intensity"))
    uses_suv = "suv_zscore" in (trained.get("intensity"), now.get("intensity"))
    notes = []
    for field, meaning in _PREPROCESSING_FIELDS.items():
        if (field in ("window", "output_range") and not uses_window) or (field == "suv_clip" and not uses_suv):
            continue
        if field in trained and field in now and plain(trained[field]) != plain(now[field]):
            notes.append(f"preprocessing {field}: encoder pre-trained with {trained[field]!r}, fine-tuning data use "
                         f"{now[field]!r} ({meaning}); use the pre-training preset for fine-tuning if this is unintended")
    roi, patch = meta.get("roi_size"), data.get("patch_size")
    if roi is not None and patch is not None and list(roi) != list(patch):
        notes.append(f"patch size: encoder pre-trained on {list(roi)} patches, fine-tuning uses {list(patch)} "
                     "(ViT position embeddings are interpolated)")
    return notes


# --------------------------------------------------------------------------- adaptation
def interpolate_position_embedding(table: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """``1 × L × D`` position table on ``old_grid`` (row-major) resampled trilinearly to ``new_grid``."""
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if table.ndim != 3 or table.shape[1] != math.prod(old_grid):
        raise ValueError(f"position table {tuple(table.shape)} does not match the token grid {old_grid}")
    dim = table.shape[2]
    volume = table.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3).float()
    resized = F.interpolate(volume, size=new_grid, mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), dim).to(table.dtype)


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A stem kernel ``O × C × k³`` for ``channels`` inputs: the kernels' sum spread evenly over them.

    A single-channel kernel is repeated and divided by ``channels``; several are summed first. An
    input whose channels all carry the same image therefore gives the pre-trained response.
    """
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / channels).repeat(1, channels, *([1] * (weight.ndim - 2))).to(weight.dtype)


def token_grid(network: nn.Module) -> tuple[int, int, int] | None:
    """Token grid of a ViT-based network (MONAI UNETR's ``feat_size``)."""
    size = getattr(network, "feat_size", None)
    return tuple(int(s) for s in size) if size is not None else None


# --------------------------------------------------------------------------- loading
@dataclasses.dataclass
class LoadReport:
    """What :func:`load_pretrained` did, key by key."""

    source: str
    target: str
    method: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    adapted: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    skipped_decoder: list[str] = dataclasses.field(default_factory=list)
    from_scratch: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 40) -> str:
        def block(title: str, keys: list[str]) -> list[str]:
            if not keys:
                return [f"  {title:<13} 0"]
            shown = [f"      {k}" for k in keys[:limit]]
            more = [f"      ... and {len(keys) - limit} more"] if len(keys) > limit else []
            return [f"  {title:<13} {len(keys)}", *shown, *more]

        groups = Counter(k.split(".")[0] for k in self.from_scratch)
        scratch = ", ".join(f"{name} ({count})" for name, count in sorted(groups.items())) or "nothing"
        lines = [
            f"Pre-trained weights from {self.source} (method {self.method}, target {self.target}):",
            f"  loaded        {len(self.loaded)} tensors",
            *[f"  adapted       {note}" for note in self.adapted],
            *block("missing", self.missing),
            *block("unexpected", self.unexpected),
            *block("mismatched", self.mismatched),
        ]
        if self.skipped_decoder:
            lines += block("decoder keys skipped (shape differs, e.g. the class count)", self.skipped_decoder)
        lines.append(f"  initialised from scratch (decoder/head): {len(self.from_scratch)} tensors in {scratch}")
        if not self.ok:
            lines.append("  → refusing to load: every encoder key must be present, expected and of the right shape.")
        return "\n".join(lines)


def _shape(t: Tensor) -> str:
    return "×".join(str(s) for s in t.shape) or "scalar"


def _with_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Files written with encoder-relative keys (``blocks.0...``) get the encoder's prefix (``vit.``)."""
    if not prefix or any(k.startswith(prefix) for k in state):
        return state
    return {prefix + k: v for k, v in state.items()}


def load_pretrained(
    network: nn.Module,
    source: str | os.PathLike | EncoderFile,
    interpolate_positions: bool = True,
    adapt_stem: bool = True,
    log: Callable[[str], None] | None = print,
) -> LoadReport:
    """Load an exported encoder (file, pre-training ``.ckpt`` or :class:`EncoderFile`) into ``network``.

    Keys are those of the file's target network. Position embeddings are resampled trilinearly
    when the network's token grid differs (ViT at another ROI); stem kernels are adapted when the
    network has another number of input channels (:func:`adapt_input_channels`). Raises
    :class:`PretrainedLoadError` with the report if any encoder key is missing from the file, any
    file key has no place in the network, or a shape still differs; decoder keys in the file whose
    shape differs (e.g. an output layer for another class count) are skipped and reported.
    ``log`` receives the printed report (None: silent).
    """
    file = read_pretrained(source)
    spec = network_spec(file.target)
    state = _with_prefix(dict(file.state_dict), spec.encoder_prefix)
    own = network.state_dict()
    report = LoadReport(source=file.source, target=file.target, method=file.method)
    if not any(k.startswith(spec.encoder_prefix) for k in own):
        raise PretrainedLoadError(dataclasses.replace(
            report, unexpected=sorted(state),
            missing=[f"(the network has no '{spec.encoder_prefix}*' parameters: it is not a {file.target} network; "
                     f"it is a {type(network).__name__})"]))
    old_in = int(file.network_kwargs.get("in_channels", 1))
    kwargs_grid = file.network_kwargs.get("img_size")
    to_load: dict[str, Tensor] = {}
    for key, value in sorted(state.items()):
        if key not in own:
            report.unexpected.append(key)
            continue
        wanted = own[key]
        if value.shape != wanted.shape and interpolate_positions and key.endswith("position_embeddings"):
            new_grid = token_grid(network)
            old_grid = [int(s) // spec.roi_multiple for s in kwargs_grid] if kwargs_grid and spec.roi_multiple else None
            if new_grid and old_grid and value.ndim == 3 and value.shape[2] == wanted.shape[2]:
                value = interpolate_position_embedding(value, old_grid, new_grid)
                report.adapted.append(f"{key}: token grid {'×'.join(map(str, old_grid))} → "
                                      f"{'×'.join(map(str, new_grid))} (trilinear)")
        if (value.shape != wanted.shape and adapt_stem and value.ndim == 5 and value.shape[1] == old_in
                and value.shape[0] == wanted.shape[0] and value.shape[2:] == wanted.shape[2:]):
            value = adapt_input_channels(value, wanted.shape[1])
            report.adapted.append(f"{key}: {old_in} → {wanted.shape[1]} input channels (kernel sum spread evenly)")
        if value.shape != wanted.shape:
            entry = f"{key}: file {_shape(value)} vs network {_shape(wanted)}"
            (report.mismatched if key.startswith(spec.encoder_prefix) else report.skipped_decoder).append(entry)
            continue
        to_load[key] = value.to(wanted.dtype)
        report.loaded.append(key)
    report.missing = sorted(k for k in own if k.startswith(spec.encoder_prefix) and k not in state)
    report.from_scratch = sorted(k for k in own if k not in to_load and not k.startswith(spec.encoder_prefix))
    if not report.ok:
        raise PretrainedLoadError(report)
    network.load_state_dict({**own, **to_load}, strict=True)
    if log is not None:
        log(report.format())
    return report
