"""TensorBoard: each training-series point as scalars (mean and weighted cosine, mean query drift
per layer), for a ``torch.utils.tensorboard.SummaryWriter`` or anything with ``add_scalar``."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..state import DRIFT_Q


class TensorBoardSink:
    def __init__(self, writer):
        self.writer = writer

    def add_point(self, point: Dict[str, Any]) -> None:
        """One point of :class:`qkprobe.state.TrainingSeries` (step -1, the start, is logged at 0)."""
        step = max(int(point["step"]), 0)
        for i, p in enumerate(point["layers"]):
            for key in ("mean_cosine", "weighted_cosine"):
                self.writer.add_scalar(f"qkprobe/{key}/L{i}", p[key], step)
            self.writer.add_scalar(f"qkprobe/{DRIFT_Q}/L{i}", float(np.nanmean(p[DRIFT_Q])), step)
