"""Make a run file left by a killed writer openable by every HDF5 reader again.

A writer using the 1.10 file format (SWMR) marks the superblock "open for write" and clears
the mark when it closes the file. After a crash the mark stays: SWMR readers still open the
file, but plain readers and writers refuse it ("file is already open for write"). ``h5clear``
clears the mark but does not ship with h5py, so this module rewrites the superblock itself
(flags byte + Jenkins lookup3 checksum), then truncates every per-row dataset to the commit
counter, dropping the rows the writer had not committed.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import RunFileError
from . import schema

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def recover(path, force: bool = False) -> int:
    """Clear the "open for write" mark of ``path`` and drop uncommitted rows.

    Run it only when no writer has the file open. The writer's process id is recorded in the
    file; when that process still runs on this host ``recover`` refuses unless ``force``.

    Returns:
        The number of committed rows (the rows the file keeps).
    """
    from . import validate

    path = Path(path)
    try:
        block = validate.check_file(path)
    except validate.ShortRunFile:
        return _recover_short(path, force)
    # Nothing is changed in a file that is not a readable run file (damaged, crafted, linked out):
    # a flagged file is checked with its mark cleared, and gets its superblock back if it fails.
    if not block.flags:
        validate.open_run_file(path).close()
        return truncate_to_committed(path)
    if not force:
        _refuse_if_writer_alive(path)
    clear_open_flags(path, block)
    try:
        validate.open_run_file(path, swmr=False).close()
    except BaseException:
        _write_superblock(path, block.offset, block.raw)
        raise
    return truncate_to_committed(path)


def _recover_short(path: Path, force: bool) -> int:
    """A file shorter than its recorded end: a writer's last writes failed (full disk), or a copy
    was cut off. Recovered only when every committed byte and every metadata block a reader
    needs lie in the file (so the missing tail held uncommitted writes alone); then the tail is
    restored as empty space, as HDF5 expects. Otherwise, and on any failure, the file keeps its
    original bytes."""
    from . import validate

    block = read_superblock(path)
    size = os.path.getsize(path)
    if block.flags and not force:
        _refuse_if_writer_alive(path)
    lost = validate.TruncatedRunFile(
        f"{path} is truncated ({size} of its {block.eoa} bytes) and part of its layout or committed rows lay in the "
        f"missing {block.eoa - size} bytes: recover cannot rebuild them and left the file untouched; copy it again "
        f"from a complete original, or start a new run file.")
    try:
        f = validate.open_h5(path)
    except (OSError, RuntimeError) as exc:
        raise lost from exc
    with f:
        try:
            validate.check_run_file(f, path)
            validate.check_inside(f, path, size)
        except RunFileError as exc:
            raise lost from exc
    try:
        os.truncate(path, block.eoa)
        clear_open_flags(path, block)
        return truncate_to_committed(path)
    except BaseException:
        os.truncate(path, size)
        _write_superblock(path, block.offset, block.raw)
        raise


def needs_recover(path) -> bool:
    """True when plain HDF5 would refuse ``path``: marked open for write, or shorter than recorded."""
    block = read_superblock(path)
    return bool(block.flags) or os.path.getsize(path) < block.eoa


@dataclass
class Superblock:
    """The fields of a version 2/3 superblock that ``recover`` needs."""

    offset: int        # where the superblock starts (0 unless the file has a user block)
    version: int
    size_of_offsets: int
    flags: int         # file consistency flags; bit 0 open for write, bit 2 SWMR write
    eoa: int           # end-of-file address recorded by the library
    raw: bytes         # the whole superblock, checksum included


def read_superblock(path) -> Superblock:
    """Find and parse the superblock (at 0, 512, 1024, 2048, ... bytes)."""
    import stat
    if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO or device would block or never end
        raise RunFileError(f"{path} is not a regular file, so it is not a run file; check the path.")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        offset = 0
        while offset < max(size, 1):
            fh.seek(offset)
            head = fh.read(12)
            if head[:8] == SIGNATURE:
                return _parse_superblock(fh, offset, head, path)
            offset = 512 if offset == 0 else offset * 2
    raise RunFileError(f"{path} is not an HDF5 file; check the path.")


def _parse_superblock(fh, offset: int, head: bytes, path) -> Superblock:
    version, size_of_offsets, _size_of_lengths, flags = head[8:12]
    if version < 2:
        # Versions 0 and 1 are never written with the SWMR format; nothing to clear.
        return Superblock(offset, version, size_of_offsets, 0, 0, head)
    if version > 3:
        raise RunFileError(f"{path} has HDF5 superblock version {version}, which recover does not know; "
                           f"use the h5clear tool of your HDF5 installation instead.")
    length = 12 + 4 * size_of_offsets + 4
    fh.seek(offset)
    raw = fh.read(length)
    stored = struct.unpack("<I", raw[-4:])[0]
    if lookup3(raw[:-4]) != stored:
        raise RunFileError(f"{path} has a damaged HDF5 superblock (bad checksum); it cannot be recovered.")
    eoa_at = 12 + 2 * size_of_offsets
    eoa = int.from_bytes(raw[eoa_at:eoa_at + size_of_offsets], "little")
    return Superblock(offset, version, size_of_offsets, flags, eoa, raw)


def clear_open_flags(path, block: Superblock) -> None:
    """Rewrite the superblock with its consistency flags cleared and a new checksum.

    The end-of-allocation address is raised to the file's size when the file is longer (as
    ``h5clear --increment`` does): a writer killed mid-flush can leave metadata written past the
    address the superblock last recorded, and HDF5 then refuses to touch it ("addr overflow").
    """
    body = bytearray(block.raw[:-4])
    body[11] = 0
    size = os.path.getsize(path)
    if size > block.eoa:
        at = 12 + 2 * block.size_of_offsets
        body[at:at + block.size_of_offsets] = size.to_bytes(block.size_of_offsets, "little")
    new = bytes(body) + struct.pack("<I", lookup3(bytes(body)))
    _write_superblock(path, block.offset, new)


def _write_superblock(path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


def truncate_to_committed(path) -> int:
    """Resize every per-row dataset of a closed run file to its commit counter; return rows."""
    try:
        f = h5py.File(path, "r+", libver=schema.LIBVER)
    except OSError as exc:
        raise RunFileError(f"{path} cannot be opened after clearing its open-for-write mark ({exc}); "
                           f"it cannot be recovered.") from exc
    with f:
        if schema.COMMITTED not in f:
            raise RunFileError(f"{path} is not a qkprobe run file (it has no commit counter); "
                               f"check the path.")
        committed = f[schema.COMMITTED][()]
        try:
            truncate_rows(f, int(committed[schema.ROWS]), int(committed[schema.SKIPPED]),
                          schema.series_points(committed))
        except RuntimeError as exc:
            raise RunFileError(f"{path} keeps its {int(committed[schema.ROWS])} committed rows (readable with "
                               f"qkprobe.open_run), but HDF5 cannot shorten its datasets ({exc}); start a new "
                               f"file to write more.") from exc
        return int(committed[schema.ROWS])


def truncate_rows(f: h5py.File, rows: int, skipped: int, series: int = 0) -> None:
    """Drop everything past ``rows`` samples, ``skipped`` skipped entries and ``series``
    time-series points (file open r+). Never grows a dataset: a record past the stored rows is damage."""
    have = min(f[schema.SAMPLE_ID][schema.STRING_END].shape[0], f[schema.SAMPLE_STEP].shape[0])
    if rows > have or skipped > f[schema.SKIPPED_ID][schema.STRING_END].shape[0] or min(rows, skipped, series) < 0:
        from .validate import damaged
        raise damaged(f.filename, f"its commit record counts {rows} rows and {skipped} skipped inputs but it holds "
                                  f"{have} rows")
    _truncate_column(f[schema.SAMPLE_ID], rows)
    if schema.SAMPLE_LABEL in f:  # files from before labels have none
        _truncate_column(f[schema.SAMPLE_LABEL], rows)
    f[schema.SAMPLE_STEP].resize((rows,))
    _truncate_column(f[schema.SKIPPED_ID], skipped)
    _truncate_column(f[schema.SKIPPED_REASON], skipped)
    for name in f[schema.LAYERS]:
        layer = f[schema.LAYERS][name]
        if schema.STATS in layer:
            layer[schema.STATS].resize(rows, axis=0)
        for dataset in layer.get(schema.SERIES, {}).values():
            dataset.resize(series, axis=0)
        for dim, length in ((schema.DIM_SAMPLE, rows), (schema.DIM_POINT, series)):
            if dim in layer:  # the growing coordinate scales
                layer[dim].resize((length,))
    if schema.SERIES_STEP in f:
        f[schema.SERIES_STEP].resize((series,))


def _truncate_column(group, count: int) -> None:
    nbytes = schema.string_column_nbytes(group, count)
    group[schema.STRING_END].resize((count,))
    group[schema.STRING_BYTES].resize((nbytes,))


def _refuse_if_writer_alive(path) -> None:
    pid, host = _recorded_writer(path)
    if pid is None or host != socket.gethostname():
        return
    if pid == os.getpid() or _process_alive(pid):
        raise RunFileError(f"{path} may still be open in writer process {pid} on this host; stop that "
                           f"process first, or use force=True if it is not writing this file.")


def _recorded_writer(path):
    from .validate import open_h5
    try:
        with open_h5(path) as f:
            pid = f.attrs.get(schema.WRITER_PID)
            host = f.attrs.get(schema.WRITER_HOST)
    except OSError:
        return None, None
    if isinstance(host, bytes):
        host = host.decode()
    return (int(pid) if pid is not None else None), host


def remove_stale_temporaries(folder: str, prefix: str) -> list:
    """Delete ``prefix<PID>`` files in ``folder`` left by processes of this host that no longer run
    (a merge or a file creation killed with -9); returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Bob Jenkins' lookup3 hashlittle, as HDF5's H5_checksum_lookup3 (initval 0) ---------------

def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK
    b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK
    c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK
    a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK
    b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK
    c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rot(b, 14)) & _MASK
    a ^= c; a = (a - _rot(c, 11)) & _MASK
    b ^= a; b = (b - _rot(a, 25)) & _MASK
    c ^= b; c = (c - _rot(b, 16)) & _MASK
    a ^= c; a = (a - _rot(c, 4)) & _MASK
    b ^= a; b = (b - _rot(a, 14)) & _MASK
    c ^= b; c = (c - _rot(b, 24)) & _MASK
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Jenkins lookup3 ``hashlittle`` of ``data`` (the checksum of HDF5 metadata blocks)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    if length == 0:
        return c
    # Whole 12-byte blocks, except that the last (1..12 bytes) goes through the tail path.
    full = (length - 1) // 12
    words = np.frombuffer(data[:full * 12], dtype="<u4").tolist() if full else []
    for i in range(full):
        a = (a + words[3 * i]) & _MASK
        b = (b + words[3 * i + 1]) & _MASK
        c = (c + words[3 * i + 2]) & _MASK
        a, b, c = _mix(a, b, c)
    tail = data[full * 12:] + bytes(12 - (length - full * 12))
    ta, tb, tc = struct.unpack("<III", tail)
    a = (a + ta) & _MASK
    b = (b + tb) & _MASK
    c = (c + tc) & _MASK
    return _final(a, b, c)
