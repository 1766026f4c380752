"""Crash-safe, live-readable HDF5 run files, written by a background thread.

The caller hands batches to :meth:`RunWriter.write`; a thread appends them to the file and
commits. A commit is: append rows → write the snapshot arrays into their inactive slot →
``flush`` → write ``/committed`` (rows, skipped, snapshot generation) in one small write →
``flush``. Readers trust nothing past ``/committed``, so a writer killed at any moment leaves
a file whose committed rows, skipped list and snapshot agree with each other.

The file is built under a temporary name, switched to SWMR (from then on readers in other
processes can follow it), and only then linked to its final name: a run file at ``path`` always
has the full layout. Layout: ``qkprobe/sinks/schema.py`` and ``docs/format.md``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import hdf5plugin
import numpy as np

from .._version import __version__
from ..errors import RunFileError, ShapeError
from . import recover as _recover
from . import schema
from .run_file import read_metadata  # noqa: F401  (re-exported: resume checks use it)

try:
    import resource
except ImportError:  # Windows
    resource = None

log = logging.getLogger(__name__)

COMPRESSIONS = ("blosc-zstd", "blosc-lz4", "gzip", "lzf", None)
STORE_DTYPES = ("float32", "float16")
MIN_FREE_BYTES = 64 << 20   # default disk space kept free (see RunWriter's min_free_bytes)
ROW_CHUNK = 4096          # chunk length of the small per-row datasets (steps, string ends)
BYTES_CHUNK = 1 << 16     # chunk length of the utf8 bytes of string columns
#: HDF5 file space is handed out in pages of this size ("paged aggregation"), so no metadata block
#: smaller than a page straddles a page boundary. A commit rewrites the headers of the growing
#: datasets in place, and a process killed inside such a ``pwrite`` keeps the part the kernel
#: copied so far, whole memory pages only: a straddling header could be left half new, half old,
#: with a bad checksum (issue 17: ``layers/01/sample``'s 268-byte header across 450,560).
FILE_SPACE_PAGE = 4096


@dataclass
class LayerSpec:
    """What the file holds for one attention layer.

    Attributes:
        name: module path, e.g. ``blocks.3.attn``.
        num_heads: H.
        num_modes: R, modes per head.
        snapshot: declared snapshot arrays, name → (shape, dtype). SWMR forbids creating
            datasets later, so every array the caller will pass to ``write(snapshot=...)``
            must be declared here. Their values are zeros until the first commit.
        bases: arrays written once (U, S, V, cosine, ...), name → array.
        attrs: extra attributes of the layer group (str, or anything JSON can encode).
        series: declared time-series arrays, name → (shape of one point, dtype); each
            ``write(series=...)`` point appends one entry (training: singular values, cosines,
            drift at each basis refresh).
    """

    name: str
    num_heads: int
    num_modes: int
    snapshot: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)


@dataclass
class _Batch:
    ids: list
    rows: Optional[list]          # per layer (B, H, R, S) in the store dtype, or None
    steps: np.ndarray             # (B,) int64
    snapshot: list                # per layer {name: array}
    skipped: list                 # [(id, reason)]
    series: list                  # [(step, per layer {name: array})]
    labels: Optional[list] = None  # B class labels ("" = none), or None


class RunWriter:
    """Writes one run file from a background thread; see the module docstring for the protocol.

    Args:
        path: the run file to create (or to continue with ``resume=True``).
        layers: one :class:`LayerSpec` per layer, in order.
        stat_names: names of the S statistics (last axis of every ``stats`` row).
        metadata: stored as root attributes (str as is, anything else as JSON).
        per_sample: store one (H, R, S) row per sample and layer; ids and steps are always stored.
        store_dtype: "float32" or "float16" for the per-sample rows.
        compression: "blosc-zstd", "blosc-lz4", "gzip", "lzf" or None (per-sample rows only).
        chunk_rows: rows per chunk of ``stats``. A commit compresses and rewrites the last, partly
            filled chunk (and HDF5 does not reuse the space it leaves), so keep it at most the batch
            size, ideally a divisor of it: with 64-row chunks and batches of 8, every chunk was
            compressed 8 times and the file grew to 3x its size.
        resume: continue an existing file (rows past its counter are dropped); a missing file
            is created.
        queue_size: batches waiting for the thread before ``write`` blocks.
        commit_interval_s: the writer commits after every batch while it keeps up; when batches
            queue up behind it, it commits at least this often.
        fsync_interval_s: ``os.fsync`` at most this often (and at close): ``flush`` alone
            survives a killed process, not a power cut.
        id_is_unique: refuse a sample id that is already in the file or in an earlier batch.
        min_free_bytes: stop cleanly (RunFileError, file closed) before a batch when less disk
            space than this (or than 4x the batch) is left; None: 64 MiB; 0: never check.
            HDF5 cannot close a file cleanly once a write has failed for lack of space.
    """

    def __init__(self, path, layers: Sequence[LayerSpec], stat_names: Sequence[str], metadata: dict, *,
                 per_sample: bool = True, store_dtype: str = "float32",
                 compression: Optional[str] = "blosc-lz4", chunk_rows: int = 8,
                 resume: bool = False, queue_size: int = 4,
                 commit_interval_s: float = 30.0, fsync_interval_s: float = 60.0,
                 id_is_unique: bool = True, min_free_bytes: Optional[int] = None):
        self.path = Path(path)
        self.layers = list(layers)
        self.stat_names = [str(s) for s in stat_names]
        self.per_sample = bool(per_sample)
        self.store_dtype = np.dtype(_check_choice("store_dtype", store_dtype, STORE_DTYPES))
        self.compression = _check_choice("compression", compression, COMPRESSIONS)
        self.chunk_rows = int(chunk_rows)
        self.commit_interval_s = float(commit_interval_s)
        self.fsync_interval_s = float(fsync_interval_s)
        self.id_is_unique = bool(id_is_unique)
        self.min_free_bytes = MIN_FREE_BYTES if min_free_bytes is None else int(min_free_bytes)
        self._validate_layers()
        _check_directory(self.path)

        if self.path.exists() and not resume:
            raise RunFileError(f"{self.path} already exists; pass resume=True to continue it, "
                               f"or choose another file name.")
        self._file = self._open_for_resume() if self.path.exists() else self._create(metadata)
        try:
            self._bind_datasets()
        except BaseException:
            self._file.close()
            raise

        self._seen = set(self._existing_ids) if self.id_is_unique else set()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._tickets = 0
        #: seconds the caller spent blocked on a full queue: > 0 means the writer did not keep up
        self.blocked_seconds = 0.0
        self._error: Optional[RunFileError] = None
        self._error_reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qkprobe-run-writer", daemon=True)
        self._thread.start()

    # ---- caller side ---------------------------------------------------------------------

    def write(self, ids: Sequence[str], rows: Optional[Sequence[np.ndarray]] = None, steps=None,
              snapshot: Optional[Sequence[Optional[dict]]] = None, skipped: Sequence[tuple] = (),
              series: Sequence[tuple] = (), labels: Optional[Sequence[str]] = None) -> int:
        """Queue one batch; block while the queue is full.

        Args:
            ids: B sample ids.
            rows: per layer i an array (B, H_i, R_i, S); None when ``per_sample=False``.
            steps: B training steps, or None (stored as -1).
            snapshot: per layer a dict {declared name: full new array} (or None / {} for no
                change). The arrays must describe the state *after* this batch.
            skipped: (id, reason) of inputs that could not be read.
            series: time-series points ``(step, [per layer {declared name: array}])``.
            labels: B class labels, stored aligned with the ids ("" for a sample without one);
                None: no labels for this batch.

        Returns:
            The ticket of the batch (batch number in this session, from 0).

        Raises:
            RunFileError: the writer thread failed earlier (the file is valid up to its last commit).
        """
        self._raise_if_failed()
        self._raise_if_closed()
        batch = self._prepare(ids, rows, steps, snapshot, skipped, series)
        batch.labels = self._prepare_labels(labels, len(batch.ids))
        self._put(("batch", batch))
        ticket = self._tickets
        self._tickets += 1
        return ticket

    def commit(self, wait: bool = False) -> None:
        """Ask for a commit now; with ``wait`` block until it is on disk (flushed, not fsynced)."""
        self._raise_if_failed()
        self._raise_if_closed()
        done = threading.Event()
        self._put(("commit", done))
        if wait:
            self._wait(done)
            self._raise_if_failed()

    @property
    def acknowledged(self) -> int:
        """Rows in the file known to be committed (including rows from before a resume)."""
        return self._acknowledged

    def existing_ids(self) -> list[str]:
        """The ids committed in the file when it was opened (empty for a new file)."""
        return list(self._existing_ids)

    def close(self) -> None:
        """Write what is queued, commit, fsync and close. Safe to call twice.

        Raises:
            RunFileError: the writer failed and this was not yet reported by another call.
        """
        if not self._closed:
            self._closed = True
            if self._error is None:
                done = threading.Event()
                self._put(("close", done), check_failed=False)
                self._wait(done)
            else:
                self._put(("close", None), check_failed=False)
            self._thread.join()
        if self._error is not None and not self._error_reported:
            self._error_reported = True
            raise self._error

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except RunFileError as error:   # do not hide the exception already on its way out
            log.error("%s", error)

    # ---- file creation and resume (caller thread, before the writer thread starts) ---------

    def _validate_layers(self) -> None:
        if not self.layers:
            raise RunFileError("A run file needs at least one layer; pass one LayerSpec per attention layer.")
        if not self.stat_names:
            raise RunFileError("A run file needs at least one statistic name; pass stat_names.")
        if self.chunk_rows < 1:
            raise RunFileError(f"chunk_rows must be at least 1, not {self.chunk_rows}.")

    def _create(self, metadata: dict) -> h5py.File:
        clash = schema.RESERVED_ROOT_ATTRS.intersection(metadata)
        if clash:
            raise RunFileError(f"Metadata keys {sorted(clash)} are reserved by the run file; rename them.")
        tmp = self.path.with_name(f".{self.path.name}.creating-{os.getpid()}")
        _recover.remove_stale_temporaries(str(self.path.parent), f".{self.path.name}.creating-")
        self._check_room()
        f = None
        try:
            f = h5py.File(tmp, "w", libver=schema.LIBVER, fs_strategy="page", fs_page_size=FILE_SPACE_PAGE,
                          fs_persist=False, **self._cache_options())
            self._write_layout(f, metadata)
            self._mark_writer(f)
            f.flush()
            f.swmr_mode = True
            _publish(tmp, self.path)
        except BaseException as exc:
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - a full disk fails the close too; the file goes anyway
                    pass
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)) and _space_error(exc):
                raise RunFileError(f"{self.path} could not be created: the disk is full ({_reason(exc)}); free "
                                   f"some space or choose another folder.") from None
            raise
        self._existing_ids: list = []
        return f

    def _check_room(self) -> None:
        """Refuse before creating anything when the layout (bases, two slots of every snapshot
        array) cannot fit: a write that fails inside HDF5 cannot be cleaned up well."""
        need = (64 << 10) + (16 << 10) * len(self.layers)   # groups, attributes, dimension scales
        for spec in self.layers:
            need += sum(np.asarray(a).nbytes for a in spec.bases.values())
            need += sum(2 * int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in spec.snapshot.values())
        room = shutil.disk_usage(self.path.parent).free if self.min_free_bytes else need
        if resource is not None and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            room = min(room, resource.getrlimit(resource.RLIMIT_FSIZE)[0])   # a file size limit acts like a full disk
        if room < need:
            raise RunFileError(f"{self.path} needs about {need >> 10} KiB to be created but only {room >> 10} KiB "
                               f"can be written there (disk full or a file size limit); free some space or choose "
                               f"another folder.")

    def _cache_options(self) -> dict:
        # Every head's last, partly filled chunk of ``stats`` stays cached between commits,
        # so a commit does not read and decompress it back.
        if not self.per_sample:
            return {}
        largest = max(spec.num_heads * spec.num_modes for spec in self.layers)
        chunk = self.chunk_rows * largest * len(self.stat_names) * self.store_dtype.itemsize
        return {"rdcc_nbytes": max(1 << 20, int(chunk * 1.25)), "rdcc_nslots": 10007}

    def _write_layout(self, f: h5py.File, metadata: dict) -> None:
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs["qkprobe_version"] = __version__
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["per_sample"] = self.per_sample
        f.attrs["store_dtype"] = self.store_dtype.name
        f.attrs["compression"] = self.compression or "none"
        f.attrs["chunk_rows"] = self.chunk_rows
        schema.encode_attrs(f, metadata)
        committed = f.create_dataset(schema.COMMITTED, data=np.zeros(len(schema.COMMIT_FIELDS), np.int64))
        committed.attrs["fields"] = list(schema.COMMIT_FIELDS)
        for column in schema.STRING_COLUMNS:
            _create_string_column(f, column)
        f.create_dataset(schema.SAMPLE_STEP, shape=(0,), maxshape=(None,), dtype=np.int64,
                         chunks=(ROW_CHUNK,))
        f.create_dataset(schema.SERIES_STEP, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
        names = f.create_dataset(schema.STAT_NAMES, data=self.stat_names, dtype=h5py.string_dtype())
        names.make_scale("statistic")
        for index, spec in enumerate(self.layers):
            self._write_layer(f, index, spec)

    def _write_layer(self, f: h5py.File, index: int, spec: LayerSpec) -> None:
        group = f.create_group(schema.layer_path(index, len(self.layers)))
        clash = schema.RESERVED_LAYER_ATTRS.intersection(spec.attrs)
        if clash:
            raise RunFileError(f"Layer attrs {sorted(clash)} of {spec.name} are reserved; rename them.")
        group.attrs["name"] = spec.name
        group.attrs["num_heads"] = spec.num_heads
        group.attrs["num_modes"] = spec.num_modes
        schema.encode_attrs(group, spec.attrs)
        group.create_dataset(schema.HEAD_INDEX, data=np.arange(spec.num_heads, dtype=np.int32))
        group.create_dataset(schema.MODE_INDEX, data=np.arange(spec.num_modes, dtype=np.int32))
        if self.per_sample:
            shape = (spec.num_heads, spec.num_modes, len(self.stat_names))
            # The head axis is declared unlimited too (it never grows): with two unlimited axes HDF5
            # indexes the chunks with a version 2 B-tree of small nodes (2 KiB), where one unlimited
            # axis gets an extensible array whose data blocks outgrow a page (7.7 KB from ~8,000 chunks)
            # and are rewritten in place by every commit (see FILE_SPACE_PAGE).
            stats = group.create_dataset(
                schema.STATS, shape=(0, *shape), maxshape=(None, None, *shape[1:]), dtype=self.store_dtype,
                chunks=(self.chunk_rows, 1, *shape[1:]), **_compression_options(self.compression))
            for axis, label in enumerate(schema.STATS_DIMS):
                stats.dims[axis].label = label
        snapshot = group.create_group(schema.SNAPSHOT)
        for name, (shape, dtype) in spec.snapshot.items():
            snapshot.create_dataset(name, data=np.zeros((2, *tuple(shape)), dtype=np.dtype(dtype)))
        bases = group.create_group(schema.BASES)
        for name, array in spec.bases.items():
            bases.create_dataset(name, data=np.asarray(array))
        series = group.create_group(schema.SERIES)
        for name, (shape, dtype) in spec.series.items():
            shape = tuple(shape)
            series.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.dtype(dtype),
                                  chunks=(16, *shape))
        label_layer(group, self.stat_names, spec.attrs.get("heads"))

    def _mark_writer(self, f: h5py.File) -> None:
        # Lets ``recover`` refuse to touch a file whose writer is still running.
        f.attrs[schema.WRITER_PID] = os.getpid()
        f.attrs[schema.WRITER_HOST] = socket.gethostname()

    def _open_for_resume(self) -> h5py.File:
        if _recover.needs_recover(self.path):
            log.warning("%s was not closed by its writer; recovering it before resuming.", self.path)
            _recover.recover(self.path)
        try:
            f = h5py.File(self.path, "r+", libver=schema.LIBVER, **self._cache_options())
        except OSError as exc:
            raise RunFileError(f"{self.path} cannot be opened for writing ({_reason(exc)}); close other "
                               f"programs that have it open and try again.") from exc
        try:
            self._check_resumable(f)
            committed = f[schema.COMMITTED][()]
            _recover.truncate_rows(f, int(committed[schema.ROWS]), int(committed[schema.SKIPPED]),
                                   schema.series_points(committed))
            self._existing_ids = schema.read_strings(f[schema.SAMPLE_ID], 0, int(committed[schema.ROWS]))
            self._mark_writer(f)
            f.flush()
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        return f

    def _check_resumable(self, f: h5py.File) -> None:
        version = f.attrs.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise RunFileError(f"{self.path} has run-file schema version {version}, this qkprobe writes "
                               f"version {schema.SCHEMA_VERSION}; write to a new file instead.")
        expected = {"per_sample": self.per_sample, "store_dtype": self.store_dtype.name,
                    "stat_names": self.stat_names,
                    "layers": [(s.name, s.num_heads, s.num_modes, _declared(s.snapshot))
                               for s in self.layers]}
        found = {"per_sample": bool(f.attrs["per_sample"]),
                 "store_dtype": schema.to_python(f.attrs["store_dtype"]),
                 "stat_names": [schema.to_python(s) for s in f[schema.STAT_NAMES][()]],
                 "layers": _file_layers(f)}
        for key in expected:
            if expected[key] != found[key]:
                raise RunFileError(f"{self.path} was written with other {key.replace('_', ' ')} than this "
                                   f"run asks for; resume with the same settings or write to a new file.")

    def _bind_datasets(self) -> None:
        f = self._file
        self._committed = f[schema.COMMITTED]
        state = self._committed_state = self._committed[()]
        self._rows = int(state[schema.ROWS])
        self._acknowledged = self._rows
        self._generation = int(state[schema.GENERATION])
        self._steps = f[schema.SAMPLE_STEP]
        self._ids = _StringColumn(f[schema.SAMPLE_ID], self._rows)
        # one label per row ("" = none); files from before labels have no column
        self._labels = _StringColumn(f[schema.SAMPLE_LABEL], self._rows) if schema.SAMPLE_LABEL in f else None
        self._skipped_ids = _StringColumn(f[schema.SKIPPED_ID], int(state[schema.SKIPPED]))
        self._skipped_reasons = _StringColumn(f[schema.SKIPPED_REASON], int(state[schema.SKIPPED]))
        groups = [f[schema.layer_path(i, len(self.layers))] for i in range(len(self.layers))]
        self._stats = [g[schema.STATS] for g in groups] if self.per_sample else None
        self._snapshot_sets = [g[schema.SNAPSHOT] for g in groups]
        slot = schema.snapshot_slot(self._generation)
        # Latest snapshot values; every commit that changes one writes all of them to the new slot.
        self._snapshot_values = [{name: ds[slot] for name, ds in g.items()} for g in self._snapshot_sets]
        self._snapshot_slots = [{name: (_slot_writer(ds, 0), _slot_writer(ds, 1)) for name, ds in g.items()}
                                for g in self._snapshot_sets]
        self._snapshot_dirty = False
        self._pending_skipped: list = []
        self._series_step = f[schema.SERIES_STEP]
        self._series_sets = [g[schema.SERIES] for g in groups]
        # coordinate scales that grow with the rows / series points (absent in older files)
        self._growing = {dim: [g[dim] for g in groups if dim in g] for dim in schema.GROWING_DIMS}
        self._series = self._series_committed = schema.series_points(state)
        self._last_commit = self._last_fsync = time.monotonic()
        self._unsynced = False

    # ---- batch preparation (caller thread) ------------------------------------------------

    def _prepare(self, ids, rows, steps, snapshot, skipped, series=()) -> _Batch:
        ids = [str(i) for i in ids]
        self._check_ids(ids)
        batch = _Batch(ids=ids, rows=self._prepare_rows(rows, len(ids)),
                       steps=self._prepare_steps(steps, len(ids)),
                       snapshot=self._prepare_snapshot(snapshot),
                       skipped=[(str(i), str(r)) for i, r in skipped],
                       series=[self._prepare_series_point(step, layers) for step, layers in series])
        if self.id_is_unique:
            self._seen.update(ids)
        return batch

    def _check_ids(self, ids: list) -> None:
        if not self.id_is_unique:
            return
        in_batch = set()
        for sample_id in ids:
            if sample_id in self._seen or sample_id in in_batch:
                raise RunFileError(f"Sample id {sample_id!r} is already in {self.path}; skip the ids of "
                                   f"existing_ids() when resuming, or pass id_is_unique=False.")
            in_batch.add(sample_id)

    def _prepare_rows(self, rows, batch: int) -> Optional[list]:
        if not self.per_sample:
            if rows is not None:
                raise ShapeError("This run file stores no per-sample rows (per_sample=False); "
                                 "pass rows=None.")
            return None
        if rows is None or len(rows) != len(self.layers):
            got = "None" if rows is None else f"{len(rows)} arrays"
            raise ShapeError(f"write() needs one rows array per layer ({len(self.layers)}), got {got}.")
        out = []
        for spec, array in zip(self.layers, rows):
            array = np.array(array, dtype=self.store_dtype, copy=True)
            expected = (batch, spec.num_heads, spec.num_modes, len(self.stat_names))
            if array.shape != expected:
                raise ShapeError(f"Rows of layer {spec.name} have shape {array.shape}, expected {expected} "
                                 f"(batch, heads, modes, statistics).")
            out.append(array)
        return out

    def _prepare_labels(self, labels, batch: int) -> Optional[list]:
        if labels is None:
            return None
        labels = ["" if label is None else str(label) for label in labels]
        if len(labels) != batch:
            raise ShapeError(f"write() got {len(labels)} labels for {batch} ids; pass one label per id.")
        if self._labels is None and any(labels):
            if not getattr(self, "_warned_labels", False):
                self._warned_labels = True
                log.warning("%s was created by a qkprobe without class labels; its new rows are stored "
                            "without them (write to a new file to keep labels).", self.path)
            return None
        return labels

    @staticmethod
    def _prepare_steps(steps, batch: int) -> np.ndarray:
        if steps is None:
            return np.full(batch, -1, dtype=np.int64)
        steps = np.array(steps, dtype=np.int64).reshape(-1)
        if steps.shape != (batch,):
            raise ShapeError(f"write() got {steps.shape[0]} steps for {batch} ids; pass one step per id.")
        return steps

    def _prepare_snapshot(self, snapshot) -> list:
        if snapshot is None:
            return [{} for _ in self.layers]
        if len(snapshot) != len(self.layers):
            raise ShapeError(f"write() needs one snapshot dict per layer ({len(self.layers)}), "
                             f"got {len(snapshot)}.")
        out = []
        for spec, arrays in zip(self.layers, snapshot):
            layer = {}
            for name, array in (arrays or {}).items():
                if name not in spec.snapshot:
                    raise RunFileError(f"Snapshot array {name!r} of layer {spec.name} was not declared "
                                       f"in its LayerSpec; declare every snapshot array when creating the "
                                       f"writer.")
                shape, dtype = spec.snapshot[name]
                array = np.array(array, dtype=np.dtype(dtype), copy=True)
                if array.shape != tuple(shape):
                    raise ShapeError(f"Snapshot {name!r} of layer {spec.name} has shape {array.shape}, "
                                     f"declared {tuple(shape)}.")
                layer[name] = array
            out.append(layer)
        return out

    def _prepare_series_point(self, step, layers) -> tuple:
        if len(layers) != len(self.layers):
            raise ShapeError(f"A series point needs one dict per layer ({len(self.layers)}), got {len(layers)}.")
        out = []
        for spec, arrays in zip(self.layers, layers):
            if set(arrays) != set(spec.series):
                raise RunFileError(f"Series point of layer {spec.name} has arrays {sorted(arrays)}, declared "
                                   f"{sorted(spec.series)}; give every declared series array.")
            point = {}
            for name, (shape, dtype) in spec.series.items():
                array = np.array(arrays[name], dtype=np.dtype(dtype), copy=True)
                if array.shape != tuple(shape):
                    raise ShapeError(f"Series {name!r} of layer {spec.name} has shape {array.shape}, "
                                     f"declared {tuple(shape)}.")
                point[name] = array
            out.append(point)
        return int(step), out

    def _put(self, item, check_failed: bool = True) -> None:
        start = time.perf_counter()
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        try:
            self._put_waiting(item, check_failed)
        finally:
            self.blocked_seconds += time.perf_counter() - start

    def _put_waiting(self, item, check_failed: bool) -> None:
        while True:
            if check_failed:
                self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                if not self._thread.is_alive():
                    raise RunFileError(f"The writer of {self.path} stopped; the file is valid up to "
                                       f"row {self._acknowledged}.") from None
                continue
            if check_failed:   # the writer may have failed (and freed this place) while we waited
                self._raise_if_failed()
            return

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(0.05):
            if self._error is not None or not self._thread.is_alive():
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._error_reported = True
            raise self._error

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise RunFileError(f"The writer of {self.path} is closed; open a new RunWriter with resume=True "
                               f"to add rows.")

    # ---- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except _OutOfSpace as exc:
            self._close_after_stop()   # commits the rows appended so far: report after it
            self._error = RunFileError(f"Writing {self.path} stopped because only {_size(exc.free)} are "
                                       f"free and {_size(exc.needed)} are kept in reserve; the file is valid "
                                       f"up to row {self._acknowledged}: free some space and resume.")
            self._discard_until_close()
        except BaseException as exc:  # surfaces in the caller at its next call
            self._error = RunFileError(f"Writing {self.path} failed: {_reason(exc)}; the file is valid up to "
                                       f"row {self._acknowledged}.")
            self._error.__cause__ = exc
            log.debug("writer thread failed", exc_info=True)
            self._close_after_failure()
            self._discard_until_close()

    def _loop(self) -> None:
        while True:
            try:
                kind, payload = self._queue.get(timeout=self._idle_timeout())
            except queue.Empty:
                self._maybe_fsync()
                continue
            if kind == "batch":
                self._append(payload)
                if self._queue.empty() or self._commit_overdue():
                    self._commit()
            elif kind == "commit":
                self._commit()
                payload.set()
            else:  # close
                self._commit()
                self._fsync()
                self._file.close()
                payload.set()
                return

    def _append(self, batch: _Batch) -> None:
        self._check_space(batch)
        start, stop = self._rows, self._rows + len(batch.ids)
        if stop > start:
            if self.per_sample:
                for dataset, rows in zip(self._stats, batch.rows):
                    dataset.resize(stop, axis=0)
                    _write_rows(dataset, start, rows)
            self._steps.resize((stop,))
            self._steps[start:stop] = batch.steps
            _grow_scales(self._growing[schema.DIM_SAMPLE], start, stop)
            self._ids.append(batch.ids)
            if self._labels is not None:
                self._labels.append(batch.labels or [""] * len(batch.ids))
            self._rows = stop
        for latest, update in zip(self._snapshot_values, batch.snapshot):
            if update:
                latest.update(update)
                self._snapshot_dirty = True
        self._pending_skipped.extend(batch.skipped)
        if batch.series:
            start, stop = self._series, self._series + len(batch.series)
            self._series_step.resize((stop,))
            self._series_step[start:stop] = [step for step, _ in batch.series]
            for i, datasets in enumerate(self._series_sets):
                for name, dataset in datasets.items():
                    dataset.resize(stop, axis=0)
                    dataset[start:stop] = np.stack([layers[i][name] for _, layers in batch.series])
            _grow_scales(self._growing[schema.DIM_POINT], start, stop)
            self._series = stop

    def _commit(self) -> None:
        if not self._has_uncommitted():
            return
        if self._pending_skipped:
            self._skipped_ids.append([i for i, _ in self._pending_skipped])
            self._skipped_reasons.append([r for _, r in self._pending_skipped])
            self._pending_skipped = []
        generation = self._generation
        if self._snapshot_dirty:
            generation += 1
            slot = schema.snapshot_slot(generation)
            for slots, values in zip(self._snapshot_slots, self._snapshot_values):
                for name, value in values.items():
                    slots[name][slot](value)
        self._file.flush()
        state = np.array([self._rows, self._skipped_ids.count, generation, self._series], dtype=np.int64)
        self._committed[...] = state
        self._file.flush()
        self._committed_state = state
        self._generation, self._snapshot_dirty = generation, False
        self._acknowledged = self._rows
        self._last_commit = time.monotonic()
        self._unsynced = True
        self._maybe_fsync()

    def _has_uncommitted(self) -> bool:
        return (self._rows != self._committed_state[schema.ROWS] or bool(self._pending_skipped)
                or self._snapshot_dirty or self._series != schema.series_points(self._committed_state))

    def _commit_overdue(self) -> bool:
        return time.monotonic() - self._last_commit >= self.commit_interval_s

    def _idle_timeout(self) -> Optional[float]:
        if not self._unsynced:
            return None
        return max(0.0, self._last_fsync + self.fsync_interval_s - time.monotonic())

    def _maybe_fsync(self) -> None:
        if self._unsynced and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            self._fsync()

    def _fsync(self) -> None:
        os.fsync(self._file.id.get_vfd_handle())
        self._last_fsync = time.monotonic()
        self._unsynced = False

    def _check_space(self, batch: _Batch) -> None:
        if not self.min_free_bytes:
            return
        batch_bytes = sum(rows.nbytes for rows in batch.rows) if batch.rows else 0
        needed = max(self.min_free_bytes, 4 * batch_bytes) + self._page_slack()
        free = self._free_bytes()
        if free < needed:
            raise _OutOfSpace(free, needed)

    def _page_slack(self) -> int:
        """What paged file space can add to one commit beyond its data: every dataset may start a
        new raw-data page and a new metadata page (FILE_SPACE_PAGE each)."""
        if getattr(self, "_slack", None) is None:
            count = [0]
            self._file.visititems(lambda _name, obj: count.__setitem__(0, count[0] + isinstance(obj, h5py.Dataset)))
            self._slack = 2 * FILE_SPACE_PAGE * count[0]
        return self._slack

    def _free_bytes(self) -> int:
        free = shutil.disk_usage(self.path.parent).free
        if resource is not None:
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY:   # a file size limit acts like a full disk
                free = min(free, limit - os.fstat(self._file.id.get_vfd_handle()).st_size)
        return free

    def _close_after_stop(self) -> None:
        try:
            self._commit()
            self._fsync()
            self._file.close()
        except Exception:
            log.debug("closing %s after running out of space failed", self.path, exc_info=True)
            self._close_after_failure()

    def _close_after_failure(self) -> None:
        # Drop the uncommitted rows first: HDF5 (2.0) crashes the process when it closes a
        # dataset whose dirty chunks it cannot write, e.g. on a full disk.
        state = self._committed_state
        try:
            _recover.truncate_rows(self._file, int(state[schema.ROWS]), int(state[schema.SKIPPED]))
        except Exception:
            log.debug("dropping uncommitted rows of %s failed", self.path, exc_info=True)
        try:
            self._file.close()
        except Exception:  # the file is already failing; its committed rows are what counts
            log.debug("closing %s after a failure failed too", self.path, exc_info=True)

    def _discard_until_close(self) -> None:
        # Keep taking items so that a caller blocked in write() wakes up and sees the error.
        while True:
            try:
                kind, _ = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if kind == "close":
                return


class _OutOfSpace(Exception):
    def __init__(self, free: int, needed: int):
        super().__init__(free, needed)
        self.free, self.needed = free, needed


class _StringColumn:
    """Appends to a string column (``utf8`` bytes + ``end`` offsets), see ``schema``."""

    def __init__(self, group: h5py.Group, count: int):
        self.bytes = group[schema.STRING_BYTES]
        self.ends = group[schema.STRING_END]
        self.count = count
        self.nbytes = schema.string_column_nbytes(group, count)

    def append(self, strings: Sequence[str]) -> None:
        if not strings:
            return
        blob, ends = schema.join_strings(strings, self.nbytes)
        if blob.size:
            self.bytes.resize((self.nbytes + blob.size,))
            self.bytes[self.nbytes:] = blob
        self.ends.resize((self.count + len(strings),))
        self.ends[self.count:] = ends
        self.count += len(strings)
        self.nbytes += blob.size


def _create_string_column(f: h5py.File, path: str) -> None:
    group = f.create_group(path)
    group.create_dataset(schema.STRING_BYTES, shape=(0,), maxshape=(None,), dtype=np.uint8,
                         chunks=(BYTES_CHUNK,))
    group.create_dataset(schema.STRING_END, shape=(0,), maxshape=(None,), dtype=np.int64,
                         chunks=(ROW_CHUNK,))


def label_layer(group: h5py.Group, stat_names: Sequence[str], heads: Optional[Sequence[int]] = None,
                rows: int = 0) -> None:
    """Attach named coordinate scales (``schema.LAYER_DIMS``) to every dataset of a layer group
    not labelled yet, creating the scales in the group (before SWMR starts).

    ``heads``: the model's indices of the recorded heads (None: all, and arrays over the model's
    heads share the ``head`` dimension). ``rows``: current length of the growing ``sample`` scale.
    A dataset whose shape disagrees with a scale stays unlabelled.
    """
    datasets: list = []
    group.visititems(lambda path, obj: datasets.append((path, obj)) if isinstance(obj, h5py.Dataset) else None)
    scales = {path: ds for path, ds in datasets if ds.is_scale}

    def scale(dim: str, length: int, growing: bool):
        if dim in scales:
            ds = scales[dim]
            return ds if (growing and ds.maxshape[0] is None) or ds.shape[0] == length else None
        if dim in schema.GROWING_DIMS:
            if not growing and length != (rows if dim == schema.DIM_SAMPLE else 0):
                return None  # a fixed axis of another length (a merged file's virtual stats: rows)
            ds = group.create_dataset(dim, data=np.arange(rows if dim == schema.DIM_SAMPLE else 0, dtype=np.int64),
                                      maxshape=(None,), chunks=(ROW_CHUNK if dim == schema.DIM_SAMPLE else 256,))
        elif dim == schema.DIM_STATISTIC:
            if length != len(stat_names):
                return None
            ds = group.create_dataset(dim, data=list(stat_names), dtype=h5py.string_dtype())
        elif dim == schema.DIM_SIGN:
            if length != len(schema.SIGN_VALUES):
                return None
            ds = group.create_dataset(dim, data=list(schema.SIGN_VALUES), dtype=h5py.string_dtype())
        elif dim == schema.DIM_HEAD and heads is not None:
            if length != len(heads):
                return None
            ds = group.create_dataset(dim, data=np.asarray(heads, dtype=np.int32))
        else:
            ds = group.create_dataset(dim, data=np.arange(length, dtype=np.int32))
        ds.make_scale(dim)
        scales[dim] = ds
        return ds

    def attempt(ds, dims):
        if dims is None or len(dims) != ds.ndim:
            return None
        if heads is None:
            dims = tuple(schema.DIM_HEAD if d == schema.DIM_MODEL_HEAD else d for d in dims)
        found = [scale(d, n, ds.maxshape[a] is None) for a, (d, n) in enumerate(zip(dims, ds.shape))]
        return None if any(s is None for s in found) else list(zip(dims, found))

    for path, ds in datasets:
        if ds.is_scale or ds.ndim == 0 or any(len(ds.dims[a]) for a in range(ds.ndim)):
            continue
        # named in LAYER_DIMS, else (an array another caller declared) its own dimensions
        found = attempt(ds, schema.layer_dims(path)) or attempt(ds, _own_dims(path, ds))
        for axis, (dim, sc) in enumerate(found or ()):
            ds.dims[axis].attach_scale(sc)
            ds.dims[axis].label = dim


def _own_dims(path: str, ds: h5py.Dataset) -> tuple:
    """Dimensions of a dataset ``LAYER_DIMS`` does not name: the leading slot (snapshots), point
    (series) or sample (other growing arrays), then ``<path>_dim<i>`` of its own."""
    sub = path.rpartition("/")[0]
    lead = {schema.SNAPSHOT: schema.DIM_SLOT, schema.SERIES: schema.DIM_POINT}.get(sub)
    if lead is None and ds.maxshape[0] is None:
        lead = schema.DIM_SAMPLE
    own = [f"{path.replace('/', '_')}_dim{axis}" for axis in range(ds.ndim)]
    return tuple([lead] + own[1:]) if lead else tuple(own)


def _grow_scales(scales: list, start: int, stop: int) -> None:
    """Extend growing coordinate scales to ``stop`` entries (values: their indices)."""
    if stop <= start:
        return
    values = np.arange(start, stop, dtype=np.int64)
    for ds in scales:
        ds.resize((stop,))
        _write_rows(ds, start, values)  # low-level write: no Python selection handling per layer


def _compression_options(name: Optional[str]) -> dict:
    """create_dataset keywords for a compression choice (levels measured in hdf5-notes.md)."""
    if name == "blosc-zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def _space_error(exc: BaseException) -> bool:
    import errno
    text = str(exc).lower()
    return (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            or any(w in text for w in ("no space left", "file too large", "quota exceeded", "errno = 27",
                                       "errno = 28")))


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished file its name, refusing to replace a file created meanwhile."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RunFileError(f"{path} already exists; pass resume=True to continue it, or choose another "
                           f"file name.") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise RunFileError(f"{path} already exists; pass resume=True to continue it, or choose another "
                               f"file name.") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_directory(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise RunFileError(f"The directory {parent} does not exist; create it first or choose another "
                           f"output path.")
    if not os.access(parent, os.W_OK):
        raise RunFileError(f"The directory {parent} is not writable; choose another output path.")


def _slot_writer(dataset: h5py.Dataset, slot: int):
    """A function writing one full entry ``dataset[slot]`` through h5py's low-level API.

    A commit writes every snapshot array of every layer (about ten per layer); ``dataset[slot] =``
    costs ~50 µs of Python selection handling per call, all of it under the GIL that the model's
    forward thread waits for. The dataspaces are built once here."""
    shape = dataset.shape[1:]
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((slot,) + (0,) * len(shape), (1,) + shape)
    memory_space = h5py.h5s.create_simple((1,) + shape)
    dtype = dataset.dtype

    def write(value: np.ndarray) -> None:
        dataset.id.write(memory_space, file_space, np.ascontiguousarray(value, dtype=dtype).reshape((1,) + shape))
    return write


def _write_rows(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """``dataset[start:start + len(rows)] = rows`` (already resized) through the low-level API."""
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    dataset.id.write(h5py.h5s.create_simple(rows.shape), file_space,
                     np.ascontiguousarray(rows, dtype=dataset.dtype))


def _check_choice(name: str, value, choices) -> Any:
    if value not in choices:
        raise RunFileError(f"{name}={value!r} is not supported; use one of {list(choices)}.")
    return value


def _declared(snapshot: dict) -> dict:
    return {name: (tuple(int(n) for n in shape), np.dtype(dtype).str)
            for name, (shape, dtype) in snapshot.items()}


def _file_layers(f: h5py.File) -> list:
    out = []
    for key in sorted(f[schema.LAYERS], key=int):
        group = f[schema.LAYERS][key]
        snapshot = {name: (tuple(ds.shape[1:]), ds.dtype.str) for name, ds in group[schema.SNAPSHOT].items()}
        out.append((schema.to_python(group.attrs["name"]), int(group.attrs["num_heads"]),
                    int(group.attrs["num_modes"]), snapshot))
    return out


def _size(nbytes: int) -> str:
    nbytes = max(0, nbytes)
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.0f} KiB"


_HDF5_ERRNO_TEXT = re.compile(r"error message = '([^']+)'")


def _reason(exc: BaseException) -> str:
    """A short reason for an exception: the OS message when there is one."""
    text = str(exc)
    found = _HDF5_ERRNO_TEXT.search(text)   # h5py errors carry the OS message inside HDF5's text
    if found:
        return found.group(1)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__
