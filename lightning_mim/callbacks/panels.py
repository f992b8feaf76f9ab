"""Tri-planar (axial / coronal / sagittal) panels of input, masked input, reconstruction and heat maps."""

from __future__ import annotations

import lightning as L
import numpy as np
from matplotlib import colormaps
from torch import Tensor

from lightning_mim.run_files import run_directory

HEAT_PREFIX = "heat/"


def mid_slices(volume: Tensor) -> list[np.ndarray]:
    """Middle axial, coronal and sagittal slices of a ``D, H, W`` volume in RAS tensor order (x, y, z)."""
    x, y, z = (s // 2 for s in volume.shape)
    v = volume.float().numpy()
    return [np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])]


def _to_unit(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((img - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def _pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), dtype=img.dtype)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def render_panel(visuals: dict[str, Tensor]) -> np.ndarray:
    """One RGB ``uint8`` image: a row per visual, a column per plane.

    Grey-scale volumes share the input's intensity range so they are comparable; ``heat/*`` volumes
    (e.g. predicted-loss or teacher-loss maps, masks) are drawn as a colour map over the input.
    """
    if not visuals:
        raise ValueError("no visuals to render")
    first = next(v for k, v in visuals.items() if not k.startswith(HEAT_PREFIX))
    base = first[0, 0] if first.ndim == 5 else first[0]
    lo, hi = float(base.min()), float(base.max())
    base_slices = mid_slices(base)
    heat_map = colormaps["inferno"]
    rows = []
    for name, volume in visuals.items():
        vol = volume[0, 0] if volume.ndim == 5 else volume[0]
        slices = mid_slices(vol)
        if name.startswith(HEAT_PREFIX):
            vlo, vhi = float(vol.min()), float(vol.max())
            row = []
            for grey, heat in zip(base_slices, slices):
                g = np.repeat(_to_unit(grey, lo, hi)[..., None], 3, axis=2)
                row.append(0.5 * g + 0.5 * heat_map(_to_unit(heat, vlo, vhi))[..., :3])
        else:
            row = [np.repeat(_to_unit(s, lo, hi)[..., None], 3, axis=2) for s in slices]
        rows.append(row)
    h = max(img.shape[0] for row in rows for img in row)
    w = max(img.shape[1] for row in rows for img in row)
    grid = np.concatenate([np.concatenate([_pad_to(img, h, w) for img in row], axis=1) for row in rows], axis=0)
    return (grid * 255).astype(np.uint8)


class TriplanarPanels(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log the method's visuals as one image (rank 0 only).

    The image goes to the logger (``log_image``, e.g. W&B) and, with ``save_png``, to
    ``<run dir>/panels/step_<n>.png``.
    """

    def __init__(self, every_n_steps: int = 200, save_png: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.save_png = save_png
        self._step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        pl_module.capture_visuals = (
            self.every_n_steps > 0 and trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0
        )
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        visuals = getattr(pl_module, "latest_visuals", None)
        if not pl_module.capture_visuals or not visuals:
            return
        pl_module.capture_visuals = False
        pl_module.latest_visuals = {}
        image = render_panel(visuals)
        caption = " | ".join(visuals)
        step = self._step
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="train/panel", images=[image], caption=[caption], step=step)
        if self.save_png:
            from PIL import Image

            folder = run_directory(trainer) / "panels"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"step_{step:07d}.png")

