"""PyTorch Lightning: ``Trainer(callbacks=[QKProbeCallback("run.h5", every=10)])``."""

from __future__ import annotations

from typing import Any, Optional

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the classic package name
    from pytorch_lightning.callbacks import Callback


class QKProbeCallback(Callback):
    """Attach a probe to the LightningModule (or to its attribute ``module_attr``) for ``fit``.

    Keyword arguments go to :func:`qkprobe.attach` (``every``, ``refresh_every``, ...). Rows are
    stored with ``trainer.global_step``. Under DDP each rank writes its own shard (see
    :mod:`qkprobe.distributed`) when ``out`` is given.
    """

    def __init__(self, out: Optional[str] = None, module_attr: Optional[str] = None, **probe_kwargs: Any):
        self.out = out
        self.module_attr = module_attr
        self.probe_kwargs = probe_kwargs
        self.probe = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from ..capture.probe import attach
        model = getattr(pl_module, self.module_attr) if self.module_attr else pl_module
        self.probe = attach(model, self.out, **self.probe_kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.probe is not None:
            self.probe.step(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause(True)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._pause(False)

    def _pause(self, paused: bool) -> None:
        if self.probe is not None:
            self.probe.paused = paused

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probe.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.probe is not None:
            self.probe.close()
