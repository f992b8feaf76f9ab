"""``python -m lightning_mim export-encoder``: write the encoder of a pre-training checkpoint to a file."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser


def export_encoder(checkpoint: str, output: str | None = None, model_class: str | None = None) -> Path:
    """Export the encoder of a pre-training checkpoint (``lightning-mim-encoder/1`` file).

    The method is rebuilt from the checkpoint (class from its hyper-parameters or the run's
    ``lightning_config.yaml``) and asked for its encoder; the metadata records the run's config and
    data settings when ``lightning_config.yaml`` is found beside the checkpoint.

    Args:
        checkpoint: pre-training Lightning checkpoint (``<run>/checkpoints/last.ckpt``).
        output: encoder file to write; default ``<run>/encoder.pt``.
        model_class: method class, when the checkpoint does not record it (e.g. ``lightning_mim.methods.mae.MAE3D``).
    """
    from lightning_mim.segmentation.weights import export_checkpoint, save_encoder

    source = Path(checkpoint).expanduser()
    target = Path(output) if output else (source.parent.parent if source.parent.name == "checkpoints" else source.parent) / "encoder.pt"
    file = export_checkpoint(source, model_class)
    return save_encoder(file, target)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m lightning_mim export-encoder", description=export_encoder.__doc__.splitlines()[0])
    parser.add_function_arguments(export_encoder, as_group=False)
    args = parser.parse_args(argv)
    from lightning_mim.segmentation.weights import EncoderFileError

    try:
        path = export_encoder(**args.as_dict())
    except (EncoderFileError, ValueError, NotImplementedError) as error:  # the file or the method cannot export
        message = " ".join(str(error).split())  # loaders' messages span lines; the error is one
        where = "" if message.startswith(str(args.checkpoint)) else f"{args.checkpoint}: "
        print(f"export-encoder: {where}{message}", file=sys.stderr)
        return 1
    print(f"encoder written to {path}")
    return 0
