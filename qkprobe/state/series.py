"""The training series: one point per basis refresh (singular values, cosines, drift) per layer.

This module alone names the series arrays of a run file (:data:`SERIES`) and builds the points
the writer appends and TensorBoard logs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..bases import LayerBases

#: the series arrays of one layer: singular values (H, R), cosines (H, R), the largest principal
#: angle of each head's query / key subspace from the start (H,), non-finite weights flag ()
SERIES_S, SERIES_COSINE, DRIFT_Q, DRIFT_K, NONFINITE_WEIGHTS = \
    "S", "cosine", "drift_q", "drift_k", "nonfinite_weights"
#: name → the shape and dtype of one point, from (H, R)
SERIES = {SERIES_S: lambda H, R: ((H, R), np.float32), SERIES_COSINE: lambda H, R: ((H, R), np.float32),
          DRIFT_Q: lambda H, R: ((H,), np.float32), DRIFT_K: lambda H, R: ((H,), np.float32),
          NONFINITE_WEIGHTS: lambda H, R: ((), np.int8)}


def series_spec(num_heads: int, num_modes: int) -> Dict[str, tuple]:
    """One layer's series arrays: name → (shape of a point, dtype), as the writer declares them."""
    return {name: shape(num_heads, num_modes) for name, shape in SERIES.items()}


class TrainingSeries:
    """The points of a recording, from the bases it started with.

    ``points`` is a list of ``{"step": int, "layers": [per layer {name: value}]}`` where every
    layer holds the :data:`SERIES` arrays plus ``mean_cosine`` and ``weighted_cosine``.
    Drift is the largest principal angle between each head's current and starting subspaces."""

    def __init__(self, start: Sequence[LayerBases]):
        self.start = list(start)
        self.points: List[Dict[str, Any]] = []
        self._pending: List[Dict[str, Any]] = []

    def add(self, step: int, bases: Sequence[LayerBases], nonfinite: Optional[Sequence[bool]] = None) -> dict:
        """A point for the current bases (``nonfinite``: layers whose weights held NaN/Inf)."""
        from ..core.drift import principal_angles
        point: Dict[str, Any] = {"step": int(step), "layers": []}
        for i, (lb, lb0) in enumerate(zip(bases, self.start)):
            summary = lb.layer_summary()
            point["layers"].append({
                SERIES_S: lb.S.float().numpy(), SERIES_COSINE: lb.cosine.float().numpy(),
                "mean_cosine": summary["mean_cosine"], "weighted_cosine": summary["weighted_cosine"],
                DRIFT_Q: principal_angles(lb0.U, lb.U)[:, -1].float().numpy(),
                DRIFT_K: principal_angles(lb0.V, lb.V)[:, -1].float().numpy(),
                NONFINITE_WEIGHTS: bool(nonfinite[i]) if nonfinite else False})
        self.points.append(point)
        self._pending.append(point)
        return point

    def take(self) -> List[Tuple[int, List[Dict[str, np.ndarray]]]]:
        """The points not yet handed to the writer, as ``(step, [per layer {series name: array}])``."""
        points = [(p["step"], [{k: np.asarray(layer[k]) for k in SERIES} for layer in p["layers"]])
                  for p in self._pending]
        self._pending = []
        return points

    @property
    def pending(self) -> bool:
        return bool(self._pending)


def merge_series(steps: Sequence[np.ndarray], layers: Sequence[List[Dict[str, np.ndarray]]]) -> list:
    """The series of a merged run from its shards' (per shard: the points' steps, and per layer
    name → (points, *shape)), as writer points ``(step, [per layer {name: array}])``. Every rank
    of a DDP run holds the same weights, so the first shard's series stands for all."""
    first = layers[0]
    return [(int(step), [{name: values[p] for name, values in layer.items()} for layer in first])
            for p, step in enumerate(steps[0])]
