"""Write the pre-trained encoder (``encoder.pt``) into the run folder when pre-training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_mim.run_files import run_directory


class EncoderExport(L.Callback):
    """At the end of ``fit``, rank 0 asks the method for its encoder and saves it with its metadata.

    The file (format in :mod:`lightning_mim.segmentation.weights`) goes to
    ``<run folder>/<filename>``, beside ``checkpoints/`` and ``lightning_config.yaml`` — fine-tune
    with ``--model.pretrained <run folder>/encoder.pt``. Modules without ``export_encoder`` (e.g.
    the segmentation module) are skipped. It is one of the CLI's default callbacks.

    Args:
        filename: file name inside the run folder.
        raise_on_error: a method that cannot export (not implemented, or a configuration its
            target network cannot hold, such as a ViT depth UNETR does not build) fails the run;
            by default it only warns — the checkpoint is already saved and
            ``python -m lightning_mim export-encoder`` can be run on it later.
    """

    def __init__(self, filename: str = "encoder.pt", raise_on_error: bool = False) -> None:
        self.filename = filename
        self.raise_on_error = raise_on_error
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_mim.segmentation.weights import export_module, save_encoder

        if not trainer.is_global_zero or not callable(getattr(pl_module, "export_encoder", None)):
            return
        folder = run_directory(trainer)
        config_path = folder / "lightning_config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        describe = getattr(trainer.datamodule, "describe", None) if trainer.datamodule is not None else None
        try:
            file = export_module(pl_module, describe() if callable(describe) else None, config,
                                 epoch=trainer.current_epoch, global_step=trainer.global_step)
        except (NotImplementedError, ValueError) as error:
            if self.raise_on_error:
                raise
            rank_zero_warn(f"encoder not exported: {error}")
            return
        self.path = save_encoder(file, folder / self.filename)
        rank_zero_info(f"encoder ({file.target}, {file.method}) exported to {self.path}")
