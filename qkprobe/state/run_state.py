"""The run state: top-k optimal samples and aggregates of a recording, and what a run file stores of them.

This module alone names the snapshot arrays of a run file (``topk_scores``, ``agg_mean``, ...,
``nonfinite_values``, ``snapshot_rows``), builds the snapshot the writer commits, loads it back
on ``--resume`` and merges the snapshots of several shards. Layers with the same (heads, modes)
share one state with a leading layer axis, updated by one set of tensor ops per batch.

Shapes: L layers of a group, B samples, H heads, R modes, S statistics, K top samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.streaming import Aggregates, TopKSamples
from ..errors import RunFileError

Tensor = torch.Tensor

#: prefixes of the snapshot arrays of :class:`TopKSamples` and :class:`Aggregates`
TOPK, AGG = "topk_", "agg_"
TOPK_SCORES, TOPK_INDEX = (TOPK + f for f in TopKSamples.FIELDS)   # (H, R, 2, K)
AGG_COUNT, AGG_MEAN = AGG + "count", AGG + "mean"                   # (H, R, S), as every agg_ array
#: non-finite per-sample statistics seen, summed over (H, R, S)
NONFINITE_VALUES = "nonfinite_values"
#: how many rows of the file the top-k and aggregates of the snapshot cover
SNAPSHOT_ROWS = "snapshot_rows"
#: the statistics the top-k ranks samples by (columns of every statistics row)
SCORES = ("score_pos", "score_neg")


@dataclass
class LayerGroup:
    """The state of the layers ``layers`` (indices among the recorded layers), all (H, R)."""

    layers: List[int]
    topk: TopKSamples    # (L, H, R, 2, K)
    agg: Aggregates      # (L, H, R, S)

    def nonfinite_per_layer(self) -> List[int]:
        """Non-finite per-sample statistics seen so far, one count per layer of the group."""
        return self.agg.nonfinite.flatten(1).sum(1).tolist()

    def fold(self, stats: Tensor, start: int, scores: Tuple[int, int], columns: Optional[Tensor] = None) -> None:
        """Fold in the rows ``start, start + 1, ...`` of the run: stats (B, L, H, R, S') whose
        columns ``scores`` are score_pos and score_neg; ``columns``: the S' entries to aggregate."""
        index = range(start, start + stats.shape[0])  # known on the host: no device read in the top-k
        self.topk.update_columns(stats, scores[0], scores[1], index)
        self.agg.update(stats, columns=columns)


class RunState:
    """Top-k samples and aggregates of every recorded layer.

    Args:
        shapes: (H, R) of every recorded layer, in model order.
        num_stats: S, the statistics aggregated (the stored ones).
        top_samples: K, optimal samples kept per (layer, head, mode, sign).
        device: where the state lives (the model's device: no host copies per batch).
        snapshot_rows: store :data:`SNAPSHOT_ROWS` (False only to continue a file from before it).
    """

    def __init__(self, shapes: Sequence[Tuple[int, int]], num_stats: int, *, top_samples: int,
                 device="cpu", snapshot_rows: bool = True):
        members: Dict[Tuple[int, int], List[int]] = {}
        for i, shape in enumerate(shapes):
            members.setdefault(tuple(shape), []).append(i)
        self.groups: List[LayerGroup] = [
            LayerGroup(layers, TopKSamples(len(layers), H, R, k=top_samples, device=device),
                       Aggregates((len(layers), H, R, num_stats), device))
            for (H, R), layers in members.items()]
        #: layer → (its group, its entry on the group's first axis)
        self.place = {i: (g, j) for g in self.groups for j, i in enumerate(g.layers)}
        self.num_stats = int(num_stats)
        self.snapshot_rows = snapshot_rows
        #: rows the state covers: the run-wide index of the next sample
        self.samples = 0

    # ---- updates ---------------------------------------------------------------------------

    def add(self, stats: Sequence[Tensor], scores: Tuple[int, int], columns: Optional[Tensor] = None) -> None:
        """One batch: per group (in ``groups`` order) its statistics (L, B, H, R, S'), see
        :meth:`LayerGroup.fold`. The samples get the next B run-wide indices."""
        B = stats[0].shape[1] if stats else 0
        for g, st in zip(self.groups, stats):
            g.fold(st.movedim(0, 1), self.samples, scores, columns)  # (B, L, ...), a view
        self.samples += B

    # ---- what a run file stores --------------------------------------------------------------

    def snapshot_spec(self, layer: int) -> Dict[str, tuple]:
        """The snapshot arrays of one layer: name → (shape, dtype), as the writer declares them."""
        g, j = self.place[layer]
        spec = {TOPK + k: (v.shape, v.dtype) for k, v in g.topk.select(j).state_dict().items()}
        spec.update({AGG + k: (v.shape, v.dtype) for k, v in g.agg.select(j).state_dict().items()})
        spec[NONFINITE_VALUES] = ((), np.dtype(np.int64))
        if self.snapshot_rows:
            spec[SNAPSHOT_ROWS] = ((), np.dtype(np.int64))
        return spec

    def snapshot(self) -> List[Dict[str, np.ndarray]]:
        """Per layer, the snapshot arrays of the state now: views of the live state (the writer
        copies them before ``write`` returns)."""
        out: List[Dict[str, np.ndarray]] = [{} for _ in self.place]
        for g in self.groups:
            state = {TOPK + k: v for k, v in g.topk.state_dict(copy=False).items()}
            state.update({AGG + k: v for k, v in g.agg.state_dict(copy=False).items()})
            for j, (i, nonfinite) in enumerate(zip(g.layers, g.nonfinite_per_layer())):
                out[i] = {name: v[j] for name, v in state.items()}
                out[i][NONFINITE_VALUES] = np.int64(nonfinite)
                if self.snapshot_rows:
                    out[i][SNAPSHOT_ROWS] = np.int64(self.samples)
        return out

    def load(self, run, replay: bool) -> None:
        """Resume from a run file (:class:`qkprobe.sinks.run_file.RunFile`): its committed
        snapshot, then the rows committed after it (``replay``: the file stores rows)."""
        committed = run.committed_snapshots()
        self.samples = len(run)
        for g in self.groups:
            snaps = [committed[i] for i in g.layers]
            covered = covered_rows(snaps[0], self.samples)
            if covered > 0:  # 0: no snapshot yet (its arrays are zeros); the fresh state it is
                g.topk.load_state_dict(_fields(snaps, TOPK))
                g.agg.load_state_dict(_fields(snaps, AGG))
            if replay:
                _replay(g, lambda i, rows: run.stats(i, rows=rows), covered, len(run), list(run.stat_names))

    # ---- what the caller reads ---------------------------------------------------------------

    def top_samples(self, layer: int) -> Dict[str, np.ndarray]:
        """One layer's top-k: scores and run-wide sample indices, (H, R, 2, K)."""
        g, j = self.place[layer]
        return g.topk.select(j).state_dict()

    def aggregates(self, layer: int) -> Aggregates:
        """One layer's aggregates (count, mean, m2, min, max, nonfinite; (H, R, S))."""
        g, j = self.place[layer]
        return g.agg.select(j)

    def nonfinite(self) -> List[int]:
        """Non-finite per-sample statistics seen so far, per layer."""
        counts = {i: n for g in self.groups for i, n in zip(g.layers, g.nonfinite_per_layer())}
        return [int(counts[i]) for i in range(len(self.place))]


def covered_rows(snapshot: Dict[str, np.ndarray], rows: int) -> int:
    """How many of a file's ``rows`` committed rows a layer's snapshot covers: its
    :data:`SNAPSHOT_ROWS`, or all of them in a file from before it (a snapshot with every batch)."""
    return int(snapshot.get(SNAPSHOT_ROWS, rows))


def _fields(snaps: List[Dict[str, np.ndarray]], prefix: str) -> Dict[str, np.ndarray]:
    """The ``prefix`` arrays of several layers' snapshots, stacked on a leading layer axis."""
    names = [k[len(prefix):] for k in snaps[0] if k.startswith(prefix)]
    return {n: np.stack([s[prefix + n] for s in snaps]) for n in names}


def _replay(g: LayerGroup, read: Callable[[int, slice], np.ndarray], covered: int, rows: int,
            stat_names: List[str], chunk: int = 256) -> None:
    """Fold the rows ``[covered, rows)`` (committed after the snapshot) into the group's state.

    ``read(layer, rows)`` gives one layer's stored rows (B, H, R, S). Exact for float32 rows;
    float16 rows enter at their stored precision. Without the scores among the stored
    statistics there is nothing to replay from: those images stay in the file, not in the state."""
    if covered >= rows or not set(SCORES) <= set(stat_names):
        return
    scores = tuple(stat_names.index(s) for s in SCORES)
    device = g.topk.scores.device
    for start in range(covered, rows, chunk):
        part = slice(start, min(rows, start + chunk))
        x = np.stack([read(i, part) for i in g.layers], 1)  # (B, L, H, R, S)
        g.fold(torch.as_tensor(x, dtype=torch.float32).to(device), start, scores)


def stores_snapshot_rows(path, resume: bool) -> bool:
    """Whether the run file at ``path`` declares :data:`SNAPSHOT_ROWS`: new files do; a file
    resumed from before it existed (a snapshot with every batch) is continued as it was made."""
    if not (resume and os.path.exists(path)):
        return True
    from ..sinks.run_file import open_run
    try:
        with open_run(path) as run:
            return SNAPSHOT_ROWS in run.snapshot_names(0)
    except Exception:  # noqa: BLE001 - the writer's own checks report what is wrong with the file
        return True


# ---- merging shards -------------------------------------------------------------------------


@dataclass
class ShardSnapshot:
    """One shard's committed snapshot of one layer, and its rows committed after it.

    values: the layer's snapshot arrays. offset: the shard's first row in the merged run.
    rows: its committed rows. after: its rows ``[snapshot_rows, rows)`` of the layer, (B, H, R, S)
    in ``stat_names`` order; None where it stores none.
    """

    path: str
    values: Dict[str, np.ndarray]
    offset: int
    rows: int
    stat_names: List[str]
    after: Optional[np.ndarray] = None

    @property
    def covered(self) -> int:
        return covered_rows(self.values, self.rows)


def merge_snapshots(parts: Sequence[ShardSnapshot]) -> Dict[str, np.ndarray]:
    """The exact merge of one layer's snapshots across shards: each shard's rows after its
    snapshot are replayed into its state (a killed shard, as a resume does), row numbers become
    merged ones, top-k states are merged exactly, aggregates by Chan's formula, counters summed.

    Raises RunFileError for an array it does not know, or top-k rows past a shard's rows."""
    names = set(parts[0].values)
    topk, agg = None, None
    out: Dict[str, np.ndarray] = {}
    for part in parts:
        one_topk, one_agg, covered = _shard_state(part, names)
        topk = one_topk if topk is None else _merged(topk, one_topk)
        agg = one_agg if agg is None else _merged(agg, one_agg)
        if NONFINITE_VALUES in names:
            out[NONFINITE_VALUES] = out.get(NONFINITE_VALUES, 0) + part.values[NONFINITE_VALUES]
        if SNAPSHOT_ROWS in names:
            out[SNAPSHOT_ROWS] = out.get(SNAPSHOT_ROWS, 0) + covered
    if topk is not None:
        out.update({TOPK + k: v for k, v in topk.state_dict().items()})
    if agg is not None:
        out.update({AGG + k: v for k, v in agg.state_dict().items()})
    unknown = names - set(out)
    if unknown:
        raise RunFileError(f"Shard {parts[0].path} has snapshot arrays {sorted(unknown)} that merge does "
                           f"not know how to combine; merge only files written by qkprobe's probe.")
    return out


def _merged(a, b):
    a.merge(b)
    return a


def _shard_state(part: ShardSnapshot, names) -> Tuple[Optional[TopKSamples], Optional[Aggregates], int]:
    """One shard's top-k (with merged row numbers) and aggregates, its rows after the snapshot
    folded in where it stores them, and how many of its rows they cover."""
    values, covered = part.values, part.covered
    topk = agg = None
    if TOPK_SCORES in names:
        scores = values[TOPK_SCORES]
        topk = TopKSamples(*scores.shape[:2], k=scores.shape[-1])
        if covered > 0:  # 0: no snapshot yet, its arrays are zeros
            topk.load_state_dict({"scores": scores, "index": _global_index(values[TOPK_INDEX], part)})
    fields = {name[len(AGG):]: v for name, v in values.items() if name.startswith(AGG)}
    if fields:
        agg = Aggregates(fields["count"].shape)
        if covered > 0:
            agg.load_state_dict(fields)
    if covered < part.rows and part.after is not None and set(SCORES) <= set(part.stat_names):
        if part.after.shape[0] != part.rows - covered:
            raise RunFileError(f"Shard {part.path} holds {part.after.shape[0]} rows after its snapshot of "
                               f"{covered} rows but commits {part.rows}; it is damaged.")
        x = torch.as_tensor(np.asarray(part.after, dtype=np.float32))  # (B, H, R, S)
        if topk is not None:
            index = torch.arange(part.offset + covered, part.offset + part.rows)
            topk.update_columns(x, *(part.stat_names.index(s) for s in SCORES), index)
        if agg is not None:
            agg.update(x)
        covered = part.rows
    return topk, agg, covered


def _global_index(index: np.ndarray, part: ShardSnapshot) -> np.ndarray:
    index = np.asarray(index, dtype=np.int64)
    used = index >= 0
    if used.any() and int(index[used].max()) >= part.rows:
        raise RunFileError(f"Shard {part.path} has top-k samples past its committed rows ({part.rows}); "
                           f"it is damaged.")
    return np.where(used, index + part.offset, -1)
