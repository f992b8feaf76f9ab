"""Reliability: data checks before training, exact resume, preemption, NaN guard, atomic checkpoints.

The CLI wires all of it in: ``check-data`` is a command, the callbacks are always added (and
configurable under ``nan_guard``, ``preemption`` and ``resume_state``), ``fit`` resumes the
persisted run's newest checkpoint unless ``--auto_resume false``, and checkpoints are written
through :class:`~lightning_mim.reliability.checkpoint_io.AtomicCheckpointIO`.
"""
