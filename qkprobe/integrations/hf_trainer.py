"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[QKProbeTrainerCallback("run.h5")])``."""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback


class QKProbeTrainerCallback(TrainerCallback):
    """Attach a probe to the Trainer's model for ``train()``; rows carry ``state.global_step``.

    Keyword arguments go to :func:`qkprobe.attach`. Evaluation forwards are not recorded.
    """

    def __init__(self, out: Optional[str] = None, **probe_kwargs: Any):
        self.out = out
        self.probe_kwargs = probe_kwargs
        self.probe = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..capture.probe import attach
        self.probe = attach(model, self.out, **self.probe_kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.paused = False
            self.probe.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.paused = True  # evaluation between steps is not training data

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.close()
