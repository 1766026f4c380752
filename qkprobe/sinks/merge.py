"""Merging the shard files of a torch.distributed run into one run file, read through the run-file reader.

Each shard is read with :class:`qkprobe.sinks.run_file.RunFile` (one consistent commit, also of a
shard still being written); the run state merges the snapshots (:func:`qkprobe.state.merge_snapshots`);
:class:`qkprobe.sinks.hdf5_writer.RunWriter` writes the merged file, whose per-sample rows are HDF5
virtual datasets over the shards' committed rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from ..errors import RunFileError
from ..state import ShardSnapshot, merge_series, merge_snapshots
from ..state.run_state import covered_rows
from . import schema

log = logging.getLogger(__name__)


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
    after: List[Optional[np.ndarray]]    # per layer, its rows after the snapshot (replayed), or None
    series_steps: np.ndarray             # (points,) committed time-series steps
    series: List[Dict[str, np.ndarray]]  # per layer, name → (points, *shape)
    meta: dict
    layers: List["_LayerInfo"]
    stat_names: List[str]
    per_sample: bool
    store_dtype: str
    unclosed: bool
    labels: Optional[List[str]] = None   # one class label per row ("" = none), None when none stored


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
    from .validate import check_file, open_h5
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
    from .recover import needs_recover
    from .run_file import open_run

    if not os.path.isfile(path):
        raise _ShardUnreadable(path, "is missing", "check that every rank wrote its shard, or pass "
                               "--allow-missing to merge the others")
    try:
        with open_run(path) as run:   # checks that it is a run file of this schema
            merged = "merged_from" in run.metadata
            shard = None if merged else _committed_state(run, path)
        unclosed = needs_recover(path)
    except (RunFileError, OSError, KeyError) as exc:
        raise _unreadable(path, exc) from exc
    if shard is None:
        raise RunFileError(f"{path} is itself a merged file; merge the shards listed in its merged_from.")
    shard.unclosed = unclosed
    return shard


def _unreadable(path: str, exc: BaseException) -> "_ShardUnreadable":
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return _ShardUnreadable(path, f"cannot be read ({reason})", "pass --allow-missing to merge the others")


def _committed_state(run, path: str) -> _Shard:
    """One consistent commit of a shard (its writer may still be adding rows): the snapshot of
    one commit, the rows of that commit or a later one, and the rows each snapshot leaves out."""
    snapshots = run.committed_snapshots()
    rows, names = len(run), list(run.stat_names)
    layers, after, series = [], [], []
    series_steps = run.series_steps
    for i, values in enumerate(snapshots):
        attrs = run.layer_attrs(i)
        extra = {k: v for k, v in attrs.items() if k not in schema.RESERVED_LAYER_ATTRS}
        points = {name: run.series(i, name)[:len(series_steps)] for name in run.series_names(i)}
        series.append(points)
        layers.append(_LayerInfo(run.layer_names[i], int(attrs["num_heads"]), int(attrs["num_modes"]),
                                 {name: (tuple(v.shape), v.dtype.str) for name, v in values.items()},
                                 {name: (tuple(v.shape[1:]), v.dtype.str) for name, v in points.items()},
                                 extra, run.bases(i)))
        covered = covered_rows(values, rows)
        after.append(run.stats(i, rows=slice(covered, rows)) if run.per_sample and covered < rows else None)
    meta = run.metadata
    return _Shard(path=path, rows=rows, skipped=run.skipped, ids=run.ids, steps=run.steps, snapshots=snapshots,
                  after=after, series_steps=series_steps, series=series, meta=meta, layers=layers,
                  stat_names=names, per_sample=run.per_sample,
                  store_dtype=schema.to_python(meta.get("store_dtype", "float32")), unclosed=False,
                  labels=run.labels)


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


def _write_merged(shards: List[_Shard], out: str, missing: List[Tuple[str, str]]) -> MergeResult:
    from .hdf5_writer import LayerSpec, RunWriter

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
    series = merge_series([s.series_steps for s in shards], [s.series for s in shards])
    snapshots = [merge_snapshots([ShardSnapshot(s.path, s.snapshots[i], offset, s.rows, s.stat_names, s.after[i])
                                  for s, offset in zip(shards, offsets)]) for i in range(len(specs))]
    ids = [i for s in shards for i in s.ids]
    if len(set(ids)) != len(ids):
        log.warning("The shards of %s share %d sample ids; pass distinct ids per rank (probe.set_ids).",
                    out, len(ids) - len(set(ids)))
    steps = np.concatenate([s.steps for s in shards]) if ids else np.zeros(0, np.int64)
    labels = [v for s in shards for v in (s.labels or [""] * s.rows)]
    skipped = [entry for s in shards for entry in s.skipped]
    compression = schema.to_python(first.meta.get("compression", "none"))

    tmp = os.path.join(folder, f".{os.path.basename(out)}.merging-{os.getpid()}")
    from .recover import remove_stale_temporaries
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
    from .hdf5_writer import label_layer
    total = sum(s.rows for s in shards)
    with h5py.File(path, "r+", libver=schema.LIBVER) as f:
        groups = [f[schema.LAYERS][key] for key in sorted(f[schema.LAYERS], key=int)]
        dtype = np.dtype(shards[0].store_dtype)
        for layer, group in zip(shards[0].layers, groups):
            row_shape = (layer.num_heads, layer.num_modes, len(shards[0].stat_names))
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
