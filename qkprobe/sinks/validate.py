"""Checks every reader of a run file makes before and while it reads it, so that a damaged or
crafted file fails in one sentence instead of hanging, allocating without bound or reading
other files.

- :func:`check_file` runs before HDF5 sees the file: a regular file (never a FIFO or a device),
  an HDF5 signature, a superblock whose end-of-file address the file reaches (a truncated
  file otherwise makes SWMR opens retry metadata reads for hours).
- :func:`open_h5` opens it with a bounded number of metadata read attempts (about a second
  of retries instead of HDF5's default of hours for SWMR readers).
- :func:`check_run_file` checks the layout: the groups and attributes readers use, no external
  or dangling links, no HDF5 external storage, virtual sources only relative to the file's
  folder, declared shapes a read can afford, and the commit record against the datasets.

``run_file.open_run``, ``recover``, the shard reader of ``sinks.merge.merge_shards`` (through
``open_run``) and the report (through ``open_run``) all go through :func:`open_run_file`.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time
import h5py
from h5py._objects import phil
import numpy as np

from ..errors import RunFileError
from . import schema

#: Metadata read attempts of a bounded open (HDF5's default for SWMR readers is 100, whose
#: exponential back-off sleeps for hours on a damaged block; 30 sleep about one second).
METADATA_READ_ATTEMPTS = 30
#: A chunk larger than this (uncompressed) is not something qkprobe writes.
MAX_CHUNK_BYTES = 256 << 20
#: A read may decode at most this many times the file's size, plus READ_SLACK bytes
#: (compression of constant rows reaches ~100x; a crafted shape asks for far more).
READ_EXPANSION = 512
READ_SLACK = 64 << 20
#: Run files nest groups four deep (/layers/00/snapshot/x); deeper is not a run file.
MAX_DEPTH = 6
#: A writer still running may have recorded an end address it has not written up to yet.
_LIVE_WAIT_S = 1.0


class TruncatedRunFile(RunFileError):
    """A run file shorter than the end address its superblock records."""


class ShortRunFile(TruncatedRunFile):
    """A file shorter than its superblock records: cut off by a failed copy, or by a full disk
    under its writer (then ``recover`` may keep its committed rows)."""


class DamagedRunFile(RunFileError):
    """A run file whose layout or commit record does not hold together."""


# --------------------------------------------------------------------------- before HDF5

def check_file(path, what: str = "run file"):
    """Check ``path`` without HDF5: a regular HDF5 file that is as long as its superblock says.

    Returns the parsed superblock (``recover.Superblock``)."""
    from .recover import read_superblock

    path = str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RunFileError(f"{path} does not exist; check the path.") from None
    except OSError as exc:
        raise RunFileError(f"{path} cannot be read ({exc.strerror}); check the path and its permissions.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise RunFileError(f"{path} is {kind}, not a qkprobe {what}; give the path of a run file.")
    block = read_superblock(path)
    if block.version < 2:
        raise RunFileError(f"{path} is an HDF5 file but not a qkprobe {what} (superblock version {block.version}, "
                           f"run files use version 3); check the path.")
    deadline = time.monotonic() + (_LIVE_WAIT_S if block.flags else 0.0)
    size = os.path.getsize(path)
    while size < block.eoa and time.monotonic() < deadline:
        time.sleep(0.05)             # a live writer catches up with its recorded end address
        size = os.path.getsize(path)
    if size < block.eoa:
        raise ShortRunFile(
            f"{path} is truncated: it has {size} of the {block.eoa} bytes its HDF5 superblock records, so nothing "
            f"was read; if its writer ran out of disk, `qkprobe recover {path}` keeps the committed rows when they "
            f"all lie in the file, otherwise copy it again from a complete original.")
    return block


# --------------------------------------------------------------------------- bounded open

_SET_ATTEMPTS = None


def _set_attempts_function():
    """``H5Pset_metadata_read_attempts`` of the HDF5 library h5py loaded (None if not found)."""
    global _SET_ATTEMPTS
    if _SET_ATTEMPTS is None:
        _SET_ATTEMPTS = False
        try:
            with open("/proc/self/maps") as fh:
                libs = [ln.split()[-1] for ln in fh if "libhdf5" in ln and "libhdf5_hl" not in ln]
            if libs:
                fn = ctypes.CDLL(libs[0]).H5Pset_metadata_read_attempts
                fn.argtypes = (ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
                _SET_ATTEMPTS = fn
        except (OSError, AttributeError):
            pass
    return _SET_ATTEMPTS or None


def _bounded_fapl():
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    fn = _set_attempts_function()
    if fn is not None:
        # under h5py's own lock: HDF5 is not thread-safe, and a writer thread of this process may be
        # inside the library (h5py releases the GIL there, ctypes does too)
        with phil:
            fn(fapl.id, METADATA_READ_ATTEMPTS)
    return fapl


def open_h5(path, swmr: bool = True) -> h5py.File:
    """Open ``path`` read-only with bounded metadata retries (run :func:`check_file` first)."""
    if _open_here(path):
        # A writer of this process has it open: HDF5 shares that handle, which needs the default access.
        return h5py.File(path, "r", swmr=swmr)
    flags = h5py.h5f.ACC_RDONLY | (h5py.h5f.ACC_SWMR_READ if swmr else 0)
    fid = h5py.h5f.open(os.fsencode(str(path)), flags, fapl=_bounded_fapl())
    try:
        return h5py.File(fid)     # takes its own reference to the file ...
    finally:
        fid.close()               # ... so this one is closed now, not whenever it is collected


def _open_here(path) -> bool:
    """Whether this process already has ``path`` open in HDF5."""
    target = os.path.realpath(str(path))
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            if os.path.realpath(os.fsdecode(h5py.h5f.get_name(fid))) == target:
                return True
        except (OSError, ValueError, RuntimeError):
            continue
    return False


def open_run_file(path, swmr: bool = True) -> h5py.File:
    """:func:`check_file`, :func:`open_h5` and :func:`check_run_file`: the open of every reader."""
    from .run_file import _open_failure

    check_file(path)
    try:
        f = open_h5(path, swmr=swmr)
    except (OSError, RuntimeError) as exc:
        raise RunFileError(_open_failure(path, str(exc))) from exc
    try:
        check_run_file(f, path)
    except BaseException:
        f.close()
        raise
    return f


# --------------------------------------------------------------------------- layout

def damaged(path, what: str) -> DamagedRunFile:
    return DamagedRunFile(f"{path} is damaged ({what}); it cannot be read safely, so use a complete copy or "
                          f"start a new run file.")


def check_run_file(f: h5py.File, path) -> None:
    """Check what readers rely on in an open run file; raises RunFileError naming the problem."""
    try:
        _check_layout(f, path)
    except RunFileError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError, OSError, AttributeError) as exc:
        raise damaged(path, f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}") from exc


def _check_layout(f: h5py.File, path) -> None:
    version = f.attrs.get("schema_version")
    if version is None or schema.COMMITTED not in f:
        raise RunFileError(f"{path} is not a qkprobe run file; check the path.")
    try:
        int(version)
    except (TypeError, ValueError):
        raise damaged(path, f"its schema_version attribute is {schema.to_python(version)!r}, not a number") from None
    size = os.path.getsize(path)
    _walk(f, path, size, "/", 0)
    for key in (schema.SAMPLE_ID, schema.SKIPPED_ID, schema.SKIPPED_REASON):
        for part in (schema.STRING_END, schema.STRING_BYTES):
            _dataset(f, f"{key}/{part}", path, ndim=1)
    _dataset(f, schema.SAMPLE_STEP, path, ndim=1)
    _dataset(f, schema.STAT_NAMES, path, ndim=1)
    layers = f.get(schema.LAYERS)
    if not isinstance(layers, h5py.Group) or not len(layers):
        raise damaged(path, "it has no layers group")
    for key in layers:
        if not key.isdigit():
            raise damaged(path, f"layer group {key!r} is not numbered")
        group = layers[key]
        if not isinstance(group, h5py.Group):
            raise damaged(path, f"layers/{key} is not a group")
        for attr in ("name", "num_heads", "num_modes"):
            if attr not in group.attrs:
                raise damaged(path, f"layers/{key} has no {attr} attribute")
        if not isinstance(schema.to_python(group.attrs["name"]), str):
            raise damaged(path, f"the name attribute of layers/{key} is not text")
        for attr in ("num_heads", "num_modes"):
            value = schema.to_python(group.attrs[attr])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise damaged(path, f"the {attr} attribute of layers/{key} is {value!r}, not a positive count")
        for sub in (schema.SNAPSHOT, schema.BASES):
            if not isinstance(group.get(sub), h5py.Group):
                raise damaged(path, f"layers/{key} has no {sub} group")
        schema.decode_attrs(group)
    committed = f[schema.COMMITTED]
    if (not isinstance(committed, h5py.Dataset) or committed.ndim != 1 or not 3 <= committed.shape[0] <= 16
            or committed.dtype.kind not in "iu"):
        raise damaged(path, "its commit record is not 3 or 4 integers")
    schema.decode_attrs(f)
    check_commit(f, committed[()], path)


def _walk(group: h5py.Group, path, size: int, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise damaged(path, f"{where} nests deeper than any run file")
    for name in group:
        link = group.get(name, getlink=True)
        at = f"{where.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise RunFileError(f"{path} links {at} to another file ({link.filename}); qkprobe does not follow "
                               f"links out of a run file, so use a file written by qkprobe.")
        if isinstance(link, h5py.SoftLink):
            if group.get(name) is None:
                raise damaged(path, f"{at} is a dangling link to {link.path}")
            raise damaged(path, f"{at} is a soft link, which run files do not have")
        if not isinstance(link, h5py.HardLink):
            raise damaged(path, f"{at} is a user-defined link")
        obj = group[name]
        if isinstance(obj, h5py.Group):
            _walk(obj, path, size, at, depth + 1)
        elif isinstance(obj, h5py.Dataset):
            _check_storage(obj, path, size, at)


def _check_storage(ds: h5py.Dataset, path, size: int, at: str) -> None:
    if ds.external:
        raise RunFileError(f"{path} stores {at} in another file ({ds.external[0][0]!r}, HDF5 external storage); "
                           f"qkprobe does not read data from outside a run file, so use a file written by qkprobe.")
    if ds.is_virtual:
        _check_virtual(ds, path, at)
        return
    nbytes = ds.dtype.itemsize * int(np.prod(ds.shape, dtype=np.float64))
    if ds.chunks is not None:
        chunk = ds.dtype.itemsize * int(np.prod(ds.chunks, dtype=np.float64))
        if chunk > MAX_CHUNK_BYTES:
            raise damaged(path, f"{at} declares chunks of {chunk} bytes")
        if ds.maxshape and ds.maxshape[0] is None:
            return          # grows with the rows: its committed part is checked by check_commit
    elif ds.id.get_storage_size() == 0 and nbytes:
        raise damaged(path, f"{at} declares {ds.shape} {ds.dtype} ({nbytes:.0f} bytes) but stores nothing")
    if nbytes > read_limit(size) or (ds.chunks is None and nbytes > size + 4096):
        raise damaged(path, f"{at} declares {ds.shape} {ds.dtype}, {nbytes:.0f} bytes, more than a {size}-byte "
                            f"file can hold")


def _check_virtual(ds: h5py.Dataset, path, at: str) -> None:
    """Virtual datasets (merged files) may only name files by relative paths, as merge writes them."""
    folder = os.path.dirname(os.path.abspath(str(path)))
    for source in ds.virtual_sources():
        name = source.file_name
        if name == ".":
            continue
        if os.path.isabs(name) or name.startswith("~") or "\0" in name:
            raise RunFileError(f"{path} maps {at} onto {name!r}; merged run files name their shards by relative "
                               f"paths, so use a file written by qkprobe merge.")
        target = os.path.join(folder, name)
        if os.path.exists(target) and not os.path.isfile(target):
            raise RunFileError(f"{path} maps {at} onto {name!r}, which is not a regular file; use a file written "
                               f"by qkprobe merge.")


def read_limit(size: int) -> float:
    """The most bytes one read of a ``size``-byte run file may decode."""
    return READ_EXPANSION * float(size) + READ_SLACK


def _dataset(f: h5py.File, key: str, path, ndim: int) -> h5py.Dataset:
    ds = f.get(key)
    if not isinstance(ds, h5py.Dataset):
        raise damaged(path, f"it has no {key} dataset")
    if ds.ndim != ndim:
        raise damaged(path, f"{key} has {ds.ndim} dimensions, not {ndim}")
    return ds


# --------------------------------------------------------------------------- the commit record

def check_commit(f: h5py.File, state, path) -> None:
    """The commit record ``state`` must point only at rows the datasets hold, within read limits."""
    state = np.asarray(state)
    rows, skipped, generation = (int(x) for x in state[:3])
    points = schema.series_points(state)
    if min(rows, skipped, generation, points) < 0:
        raise damaged(path, f"its commit record {state.tolist()} has negative counts")
    limit = read_limit(os.path.getsize(path))

    def length(key: str) -> int:
        ds = f[key]
        ds.refresh()
        return int(ds.shape[0])

    def need(key: str, count: int, what: str) -> None:
        have = length(key)
        if count > have:
            raise damaged(path, f"its commit record counts {count} {what} but {key} holds {have}")

    need(f"{schema.SAMPLE_ID}/{schema.STRING_END}", rows, "rows")
    need(schema.SAMPLE_STEP, rows, "rows")
    for key in (schema.SKIPPED_ID, schema.SKIPPED_REASON):
        need(f"{key}/{schema.STRING_END}", skipped, "skipped inputs")
    if points and schema.SERIES_STEP in f:
        need(schema.SERIES_STEP, points, "series points")
    for key in (schema.SAMPLE_ID, schema.SKIPPED_ID, schema.SKIPPED_REASON):
        count = rows if key == schema.SAMPLE_ID else skipped
        if count:
            group = f[key]
            group[schema.STRING_END].refresh()
            nbytes = int(group[schema.STRING_END][count - 1])
            if nbytes < 0 or nbytes > length(f"{key}/{schema.STRING_BYTES}") or nbytes > limit:
                raise damaged(path, f"the strings of {key} end past its {schema.STRING_BYTES} bytes")
    for key in f[schema.LAYERS]:
        group = f[schema.LAYERS][key]
        stats = group.get(schema.STATS)
        if isinstance(stats, h5py.Dataset):
            stats.refresh()
            if stats.shape[0] < rows:
                raise damaged(path, f"its commit record counts {rows} rows but layers/{key}/stats holds "
                                    f"{stats.shape[0]}")
            _check_read(stats, rows, limit, path, f"layers/{key}/stats")
        for name, ds in (group.get(schema.SERIES) or {}).items():
            ds.refresh()
            if points and ds.shape[0] < points:
                raise damaged(path, f"its commit record counts {points} series points but layers/{key}/series/"
                                    f"{name} holds {ds.shape[0]}")
            _check_read(ds, points, limit, path, f"layers/{key}/series/{name}")


def _check_read(ds: h5py.Dataset, count: int, limit: float, path, at: str) -> None:
    row = ds.dtype.itemsize * float(np.prod(ds.shape[1:], dtype=np.float64))
    if count * row > limit:
        raise damaged(path, f"reading the {count} committed rows of {at} would decode {count * row:.0f} bytes, more "
                            f"than the file can hold")



# --------------------------------------------------------------------------- short files (recover)

def check_inside(f: h5py.File, path, size: int) -> None:
    """Every byte of raw data a reader of the committed rows touches lies below ``size``.

    HDF5 reads raw data past the end of a file as zeros, silently; metadata past it fails its
    checksum (which :func:`open_h5` and :func:`check_run_file` would have reported).
    """
    state = f[schema.COMMITTED][()]
    rows, skipped, points = int(state[schema.ROWS]), int(state[schema.SKIPPED]), schema.series_points(state)
    counts = {schema.SAMPLE_STEP: rows, schema.SERIES_STEP: points}
    for key in schema.STRING_COLUMNS:
        count = rows if key == schema.SAMPLE_ID else skipped
        counts[f"{key}/{schema.STRING_END}"] = count
        counts[f"{key}/{schema.STRING_BYTES}"] = (int(f[key][schema.STRING_END][count - 1]) if count else 0)
    for key in f[schema.LAYERS]:
        group = f[schema.LAYERS][key]
        if isinstance(group.get(schema.STATS), h5py.Dataset):
            counts[group[schema.STATS].name] = rows
        for ds in (group.get(schema.SERIES) or {}).values():
            counts[ds.name] = points
        for sub in (schema.SNAPSHOT, schema.BASES):
            for ds in group[sub].values():
                counts[ds.name] = None
    for key, count in counts.items():
        if key in f:
            _check_extent(f[key], count, size, path)


def _check_extent(ds: h5py.Dataset, rows, size: int, path) -> None:
    if ds.is_virtual or (rows is not None and rows == 0):
        return
    if ds.chunks is None:
        offset = ds.id.get_offset()
        end = (offset or 0) + ds.id.get_storage_size()
        if offset is not None and end > size:
            raise TruncatedRunFile(f"{path} is cut short inside the committed data of {ds.name}, so recover cannot "
                                   f"save it and left the file untouched; copy it again from a complete original.")
        return
    dsid = ds.id
    for i in range(dsid.get_num_chunks()):
        info = dsid.get_chunk_info(i)
        if rows is not None and info.chunk_offset[0] >= rows:
            continue
        if info.byte_offset + info.size > size:
            raise TruncatedRunFile(f"{path} is cut short inside the committed rows of {ds.name}, so recover cannot "
                                   f"save them and left the file untouched; copy it again from a complete original.")
