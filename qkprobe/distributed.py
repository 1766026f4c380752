"""torch.distributed: one shard file per rank, merged into one run file by rank 0.

Under DDP (or any initialized process group) ``qkprobe.attach(model, "run.h5")`` writes
``run.rank<k>.h5`` on rank k; at ``close()`` all ranks meet at a barrier and rank 0 writes
``run.h5``: an HDF5 file of the same schema whose per-sample rows are virtual datasets over the
committed rows of every shard (relative paths, so the folder can move), with ids and steps copied
and top-k and aggregates merged exactly. PyPI h5py has no MPI, so no rank writes another's file.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import h5py
import hdf5plugin  # noqa: F401  (the shards' stats may be Blosc-compressed)
import numpy as np
import torch

from .core.streaming import Aggregates, TopKSamples
from .errors import RunFileError
from .sinks import schema

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    import torch.distributed as dist
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_path(out: str, rank: int) -> str:
    """``run.h5`` → ``run.rank3.h5`` (same folder)."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.rank{rank}{ext or '.h5'}"


def split(items: Sequence[T], rank: int, world: int) -> List[T]:
    """This rank's share of ``items``: every world-th item from ``rank`` (disjoint, complete)."""
    return list(items[rank::world])


def shard_paths(out: str) -> Dict[int, str]:
    """The shard files of ``out`` that exist: rank → path (``run.rank<k>.h5`` next to ``run.h5``)."""
    stem, ext = os.path.splitext(out)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"\.rank(\d+)" + re.escape(ext or ".h5") + "$")
    folder = os.path.dirname(os.path.abspath(out))
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(os.path.dirname(out), name)
    return dict(sorted(found.items()))


def finish_shards(out: str, rank: int, world: int) -> None:
    """Barrier, then rank 0 merges the shards into ``out``; a second barrier so no rank leaves
    before the merged file exists. A failed merge is raised on rank 0 after the second barrier
    (the other ranks do not hang); the shards stay, and ``qkprobe merge`` can be run again."""
    import torch.distributed as dist
    dist.barrier()
    error = None
    if rank == 0:
        try:
            merge_shards([shard_path(out, r) for r in range(world)], out)
        except Exception as exc:  # noqa: BLE001 - raised below, after the barrier
            error = exc
    dist.barrier()
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------
# Merging shards


@dataclass
class MergeResult:
    """What :func:`merge_shards` wrote.

    out: the merged file. rows, skipped: its committed rows and skipped entries.
    shards: the merged shard paths, in order; rows_per_shard: their committed rows (the merged
    rows of shard k start at sum(rows_per_shard[:k])). missing: (path, reason) of shards left
    out (only with ``allow_missing``). unclosed: shards whose writer did not close them (killed,
    or still writing): only their committed rows are merged.
    """

    out: str
    rows: int
    skipped: int
    shards: List[str]
    rows_per_shard: List[int]
    missing: List[Tuple[str, str]] = field(default_factory=list)
    unclosed: List[str] = field(default_factory=list)


@dataclass
class _LayerInfo:
    name: str
    num_heads: int
    num_modes: int
    snapshot: dict        # name → (shape, dtype str)
    series: dict          # name → (shape of a point, dtype str)
    attrs: dict
    bases: dict

    def structure(self) -> tuple:
        return self.name, self.num_heads, self.num_modes, self.snapshot, self.series


@dataclass
class _Shard:
    path: str
    rows: int
    skipped: List[Tuple[str, str]]
    ids: List[str]
    steps: np.ndarray
    snapshots: List[Dict[str, np.ndarray]]
    stats_shape: List[Optional[tuple]]   # per layer, the (rows in the dataset, H, R, S) or None
    series_steps: np.ndarray             # (points,) committed time-series steps
    series: List[Dict[str, np.ndarray]]  # per layer, name → (points, *shape)
    meta: dict
    layers: List["_LayerInfo"]
    stat_names: List[str]
    per_sample: bool
    store_dtype: str
    unclosed: bool
    labels: Optional[List[str]] = None   # one class label per row ("" = none), None in older files


# Metadata that must agree between shards of one run (when present in any of them).
_SAME_METADATA = ("model_spec", "weights_hash", "options")


def merge_shards(shards: Sequence[str], out: str, *, allow_missing: bool = False) -> MergeResult:
    """Merge the committed rows of several run files (one per rank) into one run file ``out``.

    ``out`` has the schema :func:`qkprobe.open_run` reads. Root attributes come from the first
    shard, plus ``merged_from`` (the shard paths relative to ``out``'s folder) and
    ``merged_rows`` (committed rows taken from each). Sample ids, steps and skipped inputs are
    copied in shard order; each layer's ``stats`` is an HDF5 virtual dataset over rows
    ``[0, committed)`` of the shards' ``stats`` (relative source paths: move the folder with the
    shards, not the merged file alone; a source that is gone reads as NaN). Top-k states are
    merged exactly after turning each shard's row numbers into merged row numbers, aggregates by
    Chan's formula, non-finite counters summed.

    A shard still being written, or whose writer was killed, contributes the rows it had
    committed when the merge read it. An ``out`` that already exists is replaced only when it
    is itself a merged file.

    Args:
        shards: the shard files, in rank order.
        out: the merged file to write.
        allow_missing: leave out shards that are missing or unreadable (listed in the result and
            in the ``merged_missing`` attribute) instead of refusing.

    Raises:
        RunFileError: a shard is missing or unreadable (without ``allow_missing``), the shards
            belong to different runs, or ``out`` exists and is not a merged file.
    """
    if not shards:
        raise RunFileError("merge needs at least one shard file; pass the run.rank<k>.h5 files.")
    out = str(out)
    out_abs = os.path.abspath(out)
    folder = os.path.dirname(out_abs)
    if not os.path.isdir(folder):
        raise RunFileError(f"The output folder {folder} does not exist; create it or choose another --out.")
    if out_abs in {os.path.abspath(s) for s in shards}:
        raise RunFileError(f"{out} is one of the shards; choose another output file.")
    _refuse_overwrite(out)

    loaded, missing = [], []
    for path in shards:
        try:
            loaded.append(_read_shard(str(path)))
        except _ShardUnreadable as exc:
            if not allow_missing:
                raise
            missing.append((str(path), exc.reason))
    if not loaded:
        raise RunFileError(f"None of the {len(shards)} shards could be read; check the paths.")
    _check_same_run(loaded)
    return _write_merged(loaded, out, missing)


def _refuse_overwrite(out: str) -> None:
    if not os.path.exists(out):
        return
    from .sinks.validate import check_file, open_h5
    try:
        check_file(out)
        with open_h5(out) as f:
            merged = "merged_from" in f.attrs
    except (OSError, RunFileError):
        merged = False
    if not merged:
        raise RunFileError(f"{out} already exists and is not a merged file; choose another output file.")


class _ShardUnreadable(RunFileError):
    """A shard that is missing or cannot be opened (what ``allow_missing`` leaves out)."""

    def __init__(self, path: str, what: str, advice: str):
        super().__init__(f"Shard {path} {what}; {advice}.")
        self.reason = f"shard {path} {what}"


def _read_shard(path: str) -> _Shard:
    from .sinks.recover import needs_recover
    from .sinks.run_file import open_run
    from .sinks.validate import open_h5

    if not os.path.isfile(path):
        raise _ShardUnreadable(path, "is missing", "check that every rank wrote its shard, or pass "
                               "--allow-missing to merge the others")
    try:
        with open_run(path) as run:   # checks that it is a run file of this schema
            meta = run.metadata
            stat_names = list(run.stat_names)
            layer_attrs = [run.layer_attrs(i) for i in range(len(run.layer_names))]
            bases = [run.bases(i) for i in range(len(run.layer_names))]
        unclosed = needs_recover(path)
        f = open_h5(path)          # checked by open_run just above
    except (RunFileError, OSError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise _ShardUnreadable(path, f"cannot be read ({reason})",
                               "pass --allow-missing to merge the others") from exc
    if "merged_from" in meta:
        f.close()
        raise RunFileError(f"{path} is itself a merged file; merge the shards listed in its merged_from.")
    with f:
        return _read_committed_state(f, path, meta, stat_names, layer_attrs, bases, unclosed)


def _read_committed_state(f: h5py.File, path: str, meta: dict, stat_names, layer_attrs, bases,
                          unclosed: bool) -> _Shard:
    """One consistent commit of a shard (its writer may still be adding rows): read the record,
    the snapshot slot it names and the rows below it, and accept them only if the record did not
    move meanwhile (the writer overwrites a slot only two commits later)."""
    committed = f[schema.COMMITTED]
    groups = [f[schema.LAYERS][key] for key in sorted(f[schema.LAYERS], key=int)]
    for _ in range(200):
        committed.refresh()
        state = committed[()].copy()
        rows, skipped = int(state[schema.ROWS]), int(state[schema.SKIPPED])
        generation, points = int(state[schema.GENERATION]), schema.series_points(state)
        slot = schema.snapshot_slot(generation)
        snapshots = []
        for group in groups:
            values = {}
            for name, dataset in group[schema.SNAPSHOT].items():
                dataset.refresh()
                values[name] = dataset[slot]
            snapshots.append(values)
        committed.refresh()
        if np.array_equal(committed[()], state):
            break
        time.sleep(0.05)
    else:
        raise RunFileError(f"Shard {path} kept changing while it was read; merge again.")
    ids = _column(f, schema.SAMPLE_ID, rows)
    labels = _column(f, schema.SAMPLE_LABEL, rows) if schema.SAMPLE_LABEL in f else None
    steps_ds = f[schema.SAMPLE_STEP]
    steps_ds.refresh()
    steps = steps_ds[:rows]
    skipped_list = list(zip(_column(f, schema.SKIPPED_ID, skipped),
                            _column(f, schema.SKIPPED_REASON, skipped)))
    per_sample = bool(f.attrs.get("per_sample", True))
    series_steps = (_points(f[schema.SERIES_STEP], points) if schema.SERIES_STEP in f
                    else np.zeros(0, np.int64))
    layers, stats_shape, series = [], [], []
    for group, attrs, layer_bases in zip(groups, layer_attrs, bases):
        declared = {name: (tuple(ds.shape[1:]), ds.dtype.str) for name, ds in group[schema.SNAPSHOT].items()}
        extra = {k: v for k, v in attrs.items() if k not in schema.RESERVED_LAYER_ATTRS}
        datasets = dict(group[schema.SERIES].items()) if schema.SERIES in group else {}
        series_declared = {name: (tuple(ds.shape[1:]), ds.dtype.str) for name, ds in datasets.items()}
        series.append({name: _points(ds, len(series_steps)) for name, ds in datasets.items()})
        layers.append(_LayerInfo(schema.to_python(group.attrs["name"]), int(group.attrs["num_heads"]),
                                 int(group.attrs["num_modes"]), declared, series_declared, extra,
                                 layer_bases))
        if per_sample and schema.STATS in group:
            group[schema.STATS].refresh()
            stats_shape.append(tuple(group[schema.STATS].shape))
        else:
            stats_shape.append(None)
    for shape in stats_shape:
        if shape is not None and shape[0] < rows:
            raise RunFileError(f"Shard {path} has fewer stats rows ({shape[0]}) than it committed ({rows}); "
                               f"it is damaged.")
    return _Shard(path=path, rows=rows, skipped=skipped_list, ids=ids, steps=steps, snapshots=snapshots, labels=labels,
                  stats_shape=stats_shape, series_steps=series_steps, series=series, meta=meta,
                  layers=layers, stat_names=stat_names,
                  per_sample=per_sample, store_dtype=schema.to_python(f.attrs.get("store_dtype", "float32")),
                  unclosed=unclosed)


def _points(dataset: h5py.Dataset, points: int) -> np.ndarray:
    dataset.refresh()
    return dataset[:min(points, dataset.shape[0])]


def _column(f: h5py.File, path: str, count: int) -> List[str]:
    group = f[path]
    group[schema.STRING_END].refresh()
    group[schema.STRING_BYTES].refresh()
    return schema.read_strings(group, 0, count)


def _check_same_run(shards: List[_Shard]) -> None:
    first = shards[0]
    for shard in shards[1:]:
        for key in _SAME_METADATA:
            if first.meta.get(key) != shard.meta.get(key):
                raise RunFileError(f"Shard {shard.path} was written with another {key.replace('_', ' ')} "
                                   f"than {first.path}; merge only the shards of one run.")
        checks = (("statistic names", first.stat_names, shard.stat_names),
                  ("per-sample setting", first.per_sample, shard.per_sample),
                  ("store dtype", first.store_dtype, shard.store_dtype),
                  ("layers", [x.structure() for x in first.layers], [x.structure() for x in shard.layers]))
        for what, a, b in checks:
            if a != b:
                raise RunFileError(f"Shard {shard.path} has other {what} than {first.path}; merge only the "
                                   f"shards of one run.")


def _merge_snapshots(shards: List[_Shard], offsets: List[int], layer: int) -> Dict[str, np.ndarray]:
    """Exact merge of one layer's snapshot arrays across shards (probe.py names them)."""
    names = set(shards[0].snapshots[layer])
    out: Dict[str, np.ndarray] = {}
    topk, agg = None, None
    for shard, offset in zip(shards, offsets):
        values = shard.snapshots[layer]
        if "topk_scores" in names:
            state = {"scores": values["topk_scores"],
                     "index": _global_index(values["topk_index"], offset, shard)}
            one = TopKSamples(*state["scores"].shape[:2], k=state["scores"].shape[-1])
            one.load_state_dict(state)
            _replay_after_snapshot(shard, layer, values, offset, topk=one)
            if topk is None:
                topk = one
            else:
                topk.merge(one)
        agg_fields = {name[4:]: v for name, v in values.items() if name.startswith("agg_")}
        if agg_fields:
            one = Aggregates(agg_fields["count"].shape)
            one.load_state_dict(agg_fields)
            _replay_after_snapshot(shard, layer, values, offset, agg=one)
            if agg is None:
                agg = one
            else:
                agg.merge(one)
        if "nonfinite_values" in names:
            out["nonfinite_values"] = out.get("nonfinite_values", 0) + values["nonfinite_values"]
        if "snapshot_rows" in names:  # rows each shard's state covers (all of them, once it closed)
            out["snapshot_rows"] = out.get("snapshot_rows", 0) + values["snapshot_rows"]
    if topk is not None:
        out.update({f"topk_{k}": v for k, v in topk.state_dict().items()})
    if agg is not None:
        out.update({f"agg_{k}": v for k, v in agg.state_dict().items()})
    unknown = names - set(out)
    if unknown:
        raise RunFileError(f"Shard {shards[0].path} has snapshot arrays {sorted(unknown)} that merge does "
                           f"not know how to combine; merge only files written by qkprobe's probe.")
    return out


def _replay_after_snapshot(shard: _Shard, layer: int, values: Dict[str, np.ndarray], offset: int,
                           topk: Optional[TopKSamples] = None, agg: Optional[Aggregates] = None) -> None:
    """A shard killed between snapshots: fold its rows committed after the snapshot (the probe's
    ``snapshot_rows``) into its state, as a resume does; nothing to fold without stored rows."""
    covered = int(values.get("snapshot_rows", shard.rows))
    if covered >= shard.rows or not shard.per_sample or shard.stats_shape[layer] is None:
        return
    names = list(shard.stat_names)
    if covered == 0:  # no snapshot yet: its arrays are zeros, not a state
        if topk is not None:
            topk.load_state_dict(TopKSamples(*topk.shape, k=topk.k).state_dict())
        if agg is not None:
            agg.load_state_dict(Aggregates(agg.shape).state_dict())
    with h5py.File(shard.path, "r", swmr=True) as f:
        stats = f[schema.layer_path(layer, len(shard.layers))][schema.STATS]
        stats.refresh()
        x = torch.as_tensor(np.asarray(stats[covered:shard.rows], dtype=np.float32))  # (B, H, R, S)
    if topk is not None and {"score_pos", "score_neg"} <= set(names):
        index = torch.arange(offset + covered, offset + shard.rows)
        topk.update_columns(x, names.index("score_pos"), names.index("score_neg"), index)
    if agg is not None:
        agg.update(x)


def _global_index(index: np.ndarray, offset: int, shard: _Shard) -> np.ndarray:
    index = np.asarray(index, dtype=np.int64)
    used = index >= 0
    if used.any() and int(index[used].max()) >= shard.rows:
        raise RunFileError(f"Shard {shard.path} has top-k samples past its committed rows ({shard.rows}); "
                           f"it is damaged.")
    return np.where(used, index + offset, -1)


def _write_merged(shards: List[_Shard], out: str, missing: List[Tuple[str, str]]) -> MergeResult:
    from .sinks.hdf5_writer import LayerSpec, RunWriter

    out_abs = os.path.abspath(out)
    folder = os.path.dirname(out_abs)
    relative = [os.path.relpath(os.path.abspath(s.path), folder) for s in shards]
    rows = [s.rows for s in shards]
    offsets = [int(v) for v in np.concatenate([[0], np.cumsum(rows)[:-1]])]
    first = shards[0]
    meta = {k: v for k, v in first.meta.items() if k not in schema.RESERVED_ROOT_ATTRS}
    meta["merged_from"] = relative
    meta["merged_rows"] = rows
    if missing:
        meta["merged_missing"] = [os.path.relpath(os.path.abspath(p), folder) for p, _ in missing]
    specs = [LayerSpec(name=x.name, num_heads=x.num_heads, num_modes=x.num_modes, snapshot=x.snapshot,
                       bases=x.bases, attrs=x.attrs, series=x.series) for x in first.layers]
    # Every rank holds the same weights (DDP), so the first shard's time series stands for all.
    series = [(int(step), [{name: values[p] for name, values in layer.items()} for layer in first.series])
              for p, step in enumerate(first.series_steps)]
    snapshots = [_merge_snapshots(shards, offsets, i) for i in range(len(specs))]
    ids = [i for s in shards for i in s.ids]
    if len(set(ids)) != len(ids):
        log.warning("The shards of %s share %d sample ids; pass distinct ids per rank (probe.set_ids).",
                    out, len(ids) - len(set(ids)))
    steps = np.concatenate([s.steps for s in shards]) if ids else np.zeros(0, np.int64)
    labels = [v for s in shards for v in (s.labels or [""] * s.rows)]
    skipped = [entry for s in shards for entry in s.skipped]
    compression = schema.to_python(first.meta.get("compression", "none"))

    tmp = os.path.join(folder, f".{os.path.basename(out)}.merging-{os.getpid()}")
    from .sinks.recover import remove_stale_temporaries
    remove_stale_temporaries(folder, f".{os.path.basename(out)}.merging-")
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        writer = RunWriter(tmp, specs, first.stat_names, meta, per_sample=False,
                           store_dtype=first.store_dtype,
                           compression=None if compression == "none" else compression,
                           chunk_rows=int(first.meta.get("chunk_rows", 64)), id_is_unique=False)
        with writer:
            for start in range(0, len(ids), _ID_BATCH):
                writer.write(ids[start:start + _ID_BATCH], None, steps=steps[start:start + _ID_BATCH],
                             labels=labels[start:start + _ID_BATCH])
            writer.write([], None, snapshot=snapshots, skipped=skipped, series=series)
        if first.per_sample:
            _add_virtual_stats(tmp, shards, relative, offsets)
        _fsync(tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return MergeResult(out=out, rows=sum(rows), skipped=len(skipped), shards=[s.path for s in shards],
                       rows_per_shard=rows, missing=missing, unclosed=[s.path for s in shards if s.unclosed])


_ID_BATCH = 1 << 16


def _add_virtual_stats(path: str, shards: List[_Shard], relative: List[str], offsets: List[int]) -> None:
    """Per layer, ``stats`` as a virtual dataset over the committed rows of every shard."""
    from .sinks.hdf5_writer import label_layer
    total = sum(s.rows for s in shards)
    with h5py.File(path, "r+", libver=schema.LIBVER) as f:
        groups = [f[schema.LAYERS][key] for key in sorted(f[schema.LAYERS], key=int)]
        dtype = np.dtype(shards[0].store_dtype)
        for index, group in enumerate(groups):
            row_shape = tuple(shards[0].stats_shape[index][1:])
            layout = h5py.VirtualLayout(shape=(total, *row_shape), dtype=dtype)
            for shard, name, offset in zip(shards, relative, offsets):
                if shard.rows:
                    source = h5py.VirtualSource(name, group.name + "/" + schema.STATS,
                                                shape=(shard.rows, *row_shape), dtype=dtype)
                    layout[offset:offset + shard.rows] = source
            group.create_virtual_dataset(schema.STATS, layout, fillvalue=np.nan)
            label_layer(group, shards[0].stat_names, schema.decode_attrs(group).get("heads"), rows=total)
        f.attrs["per_sample"] = True


def _fsync(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
