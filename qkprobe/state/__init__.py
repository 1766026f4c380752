"""Run state: what a recording accumulates (top-k, aggregates, training series) and the names
under which a run file stores it. See :mod:`.run_state` and :mod:`.series`."""

from .run_state import (AGG, AGG_COUNT, AGG_MEAN, NONFINITE_VALUES, SNAPSHOT_ROWS, TOPK, TOPK_INDEX,
                        TOPK_SCORES, LayerGroup, RunState, ShardSnapshot, merge_snapshots)
from .series import (DRIFT_K, DRIFT_Q, NONFINITE_WEIGHTS, SERIES, SERIES_COSINE, SERIES_S, TrainingSeries,
                     merge_series, series_spec)

__all__ = ["AGG", "AGG_COUNT", "AGG_MEAN", "NONFINITE_VALUES", "SNAPSHOT_ROWS", "TOPK", "TOPK_INDEX",
           "TOPK_SCORES", "LayerGroup", "RunState", "ShardSnapshot", "merge_snapshots", "DRIFT_K", "DRIFT_Q",
           "NONFINITE_WEIGHTS", "SERIES", "SERIES_COSINE", "SERIES_S", "TrainingSeries", "merge_series", "series_spec"]
