"""Checks of a parsed configuration that run before any model or data module is built.

Sizes that must agree (the model's input with the data's patches or views, Swin's multiple of 32,
the ViT token grid, the fine-tuning ROI with the data's patches, the class count with the data's
labels) are compared on the configuration itself, so a mistake costs a second and prints one line
naming the argument and the fix, instead of a traceback after a large network has been built.
The CLI calls :func:`check_config` between parsing and instantiation; every problem found is
reported, one line each.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Side every fine-tuning ROI must be divisible by, per segmentation network (token patch or total stride).
ROI_MULTIPLE = {"unetr": 16, "swin_unetr": 32}
#: Swin transformers downsample five times by 2 (patch embedding then four merges).
SWIN_MULTIPLE = 32


class ConfigError(ValueError):
    """The configuration cannot work; the message has one line per problem, each naming the argument and the fix."""


def _class(section: Any) -> type | None:
    path = section.get("class_path") if isinstance(section, Mapping) else None
    if not path:
        return None
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the parser reports classes it cannot import


def _triple(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * 3
    return values if len(values) == 3 else None


def _size(value: tuple[int, ...]) -> str:
    return str(value[0]) if len(set(value)) == 1 else "×".join(map(str, value))


def _next_multiple(size: tuple[int, ...], multiple: int) -> str:
    return _size(tuple(max(multiple, -(-s // multiple) * multiple) for s in size))


def _pretraining_problems(model_cls: type, model: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    from lightning_mim.methods.hybridmim import HybridMIM
    from lightning_mim.methods.mae_base import MaskedAutoencoderBase
    from lightning_mim.methods.simmim import SimMIM3D
    from lightning_mim.methods.smit import SMIT

    problems = []
    img, patch, view = _triple(model.get("img_size")), _triple(data.get("patch_size")), _triple(data.get("view_size"))
    if issubclass(model_cls, SMIT) and (view is None or int(data.get("num_views") or 1) != 2):
        problems.append("SMIT compares two views of each patch: set --data.num_views 2 and --data.view_size "
                        "(the model's img_size, e.g. 96 views inside 128 patches)")
    if view is not None and patch is not None and any(v > p for v, p in zip(view, patch)):
        problems.append(f"data.view_size {_size(view)} does not fit inside data.patch_size {_size(patch)}: "
                        f"set --data.view_size to at most {_size(patch)} (or enlarge --data.patch_size)")
    delivered, name = (view, "view_size") if view is not None else (patch, "patch_size")
    if img is not None and delivered is not None and img != delivered:
        problems.append(f"model.img_size {_size(img)} differs from data.{name} {_size(delivered)}; they must change "
                        f"together: set --model.img_size {_size(delivered)} (or --data.{name} {_size(img)})")
    swin = issubclass(model_cls, (SMIT, SimMIM3D)) or (issubclass(model_cls, HybridMIM)
                                                         and model.get("backbone", "swin") == "swin")
    if swin and img is not None and any(s % SWIN_MULTIPLE for s in img):
        problems.append(f"model.img_size {_size(img)}: Swin encoders need every side divisible by {SWIN_MULTIPLE}; "
                        f"use e.g. {_next_multiple(img, SWIN_MULTIPLE)} (and the same data size)")
    token = model.get("patch_size")
    if issubclass(model_cls, MaskedAutoencoderBase) and img is not None and token and any(s % int(token) for s in img):
        problems.append(f"model.img_size {_size(img)} is not a whole number of {token}³ ViT token patches "
                        f"(model.patch_size); use e.g. {_next_multiple(img, int(token))}")
    return problems


def _declared_classes(data_cls: type, data: Mapping[str, Any]) -> tuple[int, str] | None:
    """(classes incl. background, where that number comes from) as the data configuration declares them."""
    if data.get("class_names"):
        return len(data["class_names"]) + 1, "data.class_names"
    datalist = data.get("datalist")
    if datalist:
        try:
            labels = json.loads(Path(datalist).expanduser().read_text()).get("labels")
        except (OSError, ValueError, AttributeError):
            return None  # discovery reports an unreadable datalist with its own message
        if isinstance(labels, dict) and labels:
            return max(int(k) for k in labels) + 1, f"the 'labels' of {datalist}"
        return None
    if not data.get("folder") and not data.get("csv"):
        from data_modules.phantoms import ORGAN_NAMES

        return len(ORGAN_NAMES) + 1, "the phantom cohort's organs"
    return None


def _segmentation_problems(model: Mapping[str, Any], data_cls: type | None, data: Mapping[str, Any]) -> list[str]:
    from lightning_mim.segmentation.weights import EncoderFileError, read_encoder_file

    problems = []
    roi, patch = _triple(model.get("roi_size")), _triple(data.get("patch_size"))
    if roi is not None and patch is not None and roi != patch:
        problems.append(f"model.roi_size {_size(roi)} differs from data.patch_size {_size(patch)}; they must change "
                        f"together: set --model.roi_size {_size(patch)} (or --data.patch_size {_size(roi)})")
    target = model.get("network") or "unetr"
    pretrained = model.get("pretrained")
    if pretrained and str(pretrained).endswith(".ckpt"):
        target = None  # a pre-training checkpoint names its network only once its module is rebuilt
    elif pretrained:
        try:
            target = read_encoder_file(pretrained).target
        except EncoderFileError as error:
            problems.append(f"model.pretrained: {error}")
    multiple = ROI_MULTIPLE.get(target)
    if roi is not None and multiple and any(s % multiple for s in roi):
        problems.append(f"model.roi_size {_size(roi)}: the {target} network needs every side divisible by {multiple}; "
                        f"use e.g. {_next_multiple(roi, multiple)} (and the same --data.patch_size)")
    declared = _declared_classes(data_cls, data) if data_cls is not None else None
    classes = model.get("num_classes")
    if declared is not None and classes is not None and int(classes) != declared[0]:
        problems.append(f"model.num_classes {classes} but {declared[1]} give {declared[0]} classes (background "
                        f"included): set --model.num_classes {declared[0]}")
    channels, data_channels = model.get("in_channels"), data.get("in_channels")
    if channels is not None and data_channels is not None and int(channels) != int(data_channels):
        problems.append(f"model.in_channels {channels} differs from data.in_channels {data_channels}: set both to "
                        "the image's channel count")
    return problems


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Every size/count disagreement in a parsed ``{model, data, ...}`` configuration (empty when it fits)."""
    from data_modules.segmentation import SegmentationDataModule
    from lightning_mim.methods.base import MIMModule
    from lightning_mim.segmentation.module import SegmentationModule

    model_section, data_section = config.get("model") or {}, config.get("data") or {}
    model_cls, data_cls = _class(model_section), _class(data_section)
    model = dict(model_section.get("init_args") or {}) if isinstance(model_section, Mapping) else {}
    data = dict(data_section.get("init_args") or {}) if isinstance(data_section, Mapping) else {}
    if model_cls is None:
        return []
    if issubclass(model_cls, MIMModule):
        return _pretraining_problems(model_cls, model, data)
    if issubclass(model_cls, SegmentationModule):
        segmentation_data = data_cls if data_cls is not None and issubclass(data_cls, SegmentationDataModule) else None
        return _segmentation_problems(model, segmentation_data, data)
    return []


def check_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`config_problems`."""
    problems = config_problems(config)
    if problems:
        raise ConfigError("\n".join(problems))
