"""Positional modes: modes whose query and key maps are explained by token position alone.

Criterion (computed from the maps the report already recomputes for a mode's top images, both
signs): for one side (query coordinates a, or key coordinates b) stack the maps of the n images
as A (n, T), T tokens of the patch grid. The share of A's variance that position explains is

    R²_pos = Σ_t n (Ā_t − Ā)² / Σ_i,t (A_it − Ā)²,

Ā_t the mean over images of token t, Ā the grand mean: 1 when every image has the same map (a
pure function of position), near 1/n for maps unrelated to position (the chance level of n
images). A mode is **positional** when R²_pos ≥ :data:`POSITIONAL_R2` on both the query and the
key side, over at least :data:`MIN_IMAGES` images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: Both sides' share of variance explained by position at or above this: a positional mode.
POSITIONAL_R2 = 0.5
#: Fewer images than this: no verdict (the chance level 1/n is too high).
MIN_IMAGES = 4


def position_r2(maps: Sequence) -> Optional[float]:
    """R²_pos of maps (n images, each (gh, gw) or (T,)) of one side of one mode; None for fewer
    than :data:`MIN_IMAGES` maps or maps without variance."""
    if len(maps) < MIN_IMAGES:
        return None
    A = np.stack([np.asarray(m, dtype=np.float64).ravel() for m in maps])   # (n, T)
    centred = A - A.mean()
    total = float((centred ** 2).sum())
    if not np.isfinite(total) or total <= 0.0:
        return None
    between = float(A.shape[0] * ((A.mean(0) - A.mean()) ** 2).sum())
    return between / total


def is_positional(r2_query: Optional[float], r2_key: Optional[float]) -> bool:
    return r2_query is not None and r2_key is not None and min(r2_query, r2_key) >= POSITIONAL_R2
