"""Files to batches for lightning-mim: discovery, presets, cache, phantoms, views, data modules.

Names are imported on first use (PEP 562), so ``import data_modules.cache`` in a preprocessing
worker process does not pay for Lightning and the data modules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "base": ("VolumeDataModule",),
    "cache": ("CachedVolume", "default_cache_dir", "ensure_cached", "read_cached_array", "volume_subject"),
    "phantoms": ("ORGAN_NAMES", "default_phantom_root", "ensure_phantom_cohort"),
    "presets": ("PRESETS", "Preprocessing", "PreprocessingError", "preset", "resolve_preprocessing"),
    "pretrain": ("FixedPatchDataset", "PatchCollator", "PretrainDataModule", "collate_views"),
    "sources": (
        "Case",
        "DataSourceError",
        "cases_from_csv",
        "cases_from_datalist",
        "cases_from_folder",
        "read_image",
        "read_label",
        "split_by_subject",
    ),
    "views": ("OverlappingViews", "PatchAugmentation", "SingleView", "TwoOverlappingViews", "build_view_sampler"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
