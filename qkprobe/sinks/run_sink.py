"""Where a probe's bytes go: each batch's ids and per-sample rows, and the run state's snapshot
every ``snapshot_every_s`` seconds, handed to the background HDF5 writer
(:class:`~qkprobe.sinks.hdf5_writer.RunWriter`).

The forward pass never waits for the device→host copy: on CUDA the rows are copied into reused
pinned buffers on a side stream and handed to the writer once their event has fired, seen
without waiting at a later batch; the host waits for a copy only where its pinned buffer is
about to be reused (:data:`MAX_IN_FLIGHT` batches on their way), and with a snapshot or at close.
On the CPU the rows are plain views the writer copies.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..state import RunState, TrainingSeries, series_spec
from .hdf5_writer import LayerSpec, RunWriter

Tensor = torch.Tensor
#: batches whose rows may be on their way to the host at once (at most this many pinned buffers per group)
MAX_IN_FLIGHT = 3


def layer_specs(names: Sequence[str], bases: Sequence, heads: Sequence[Optional[Tensor]], state: RunState) -> list:
    """One :class:`LayerSpec` per recorded layer: its bases, recorded heads, snapshot and series arrays."""
    from .bases_file import bases_arrays, bases_attrs
    specs = []
    for i, (name, lb, h) in enumerate(zip(names, bases, heads)):
        g, _ = state.place[i]
        nh, R = g.topk.shape[1:]
        attrs = {k: v for k, v in bases_attrs(lb).items() if k != "name"}
        attrs["heads"] = None if h is None else h.tolist()
        specs.append(LayerSpec(name=name, num_heads=nh, num_modes=R, snapshot=state.snapshot_spec(i),
                               bases=bases_arrays(lb), attrs=attrs, series=series_spec(lb.num_heads, R)))
    return specs


def host_view(group: int, stats: Tensor) -> Tuple[np.ndarray, None]:
    """CPU rows (L, B, H, R, S): a view the writer copies; nothing to wait for."""
    return stats.cpu().numpy(), None


class PinnedCopies:
    """CUDA rows (L, B, H, R, S): an asynchronous copy into a pinned host buffer of the group, on
    a side stream of the rows' device; returns the host array and the CUDA event that fires when
    it is filled. The buffer is the copier's again after ``recycle(group, host)`` (the rows were
    written); a new one is made only while every buffer of the group is lent.
    ``release(group, stats, event)`` lets the statistics' owner keep the next forward off the
    device buffer until the event."""

    def __init__(self, release: Callable[[int, Tensor, Any], None]):
        self.release = release
        self._free: dict = {}     # group → pinned buffers not lent
        self._lent: dict = {}     # id of a lent host array → its pinned buffer
        self._streams: dict = {}  # device → its copy stream

    def __call__(self, group: int, st: Tensor):
        stream = self._streams.get(st.device)
        if stream is None:
            stream = self._streams[st.device] = torch.cuda.Stream(st.device)
        buf, host = self._lend(group, st)
        stream.wait_stream(torch.cuda.current_stream(st.device))  # the statistics of this forward are written
        with torch.cuda.stream(stream):
            buf.copy_(st, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        st.record_stream(stream)  # its memory is not reused before the copy is done
        self.release(group, st, ready)
        return host, ready

    def recycle(self, group: int, host: np.ndarray) -> None:
        """The rows in ``host`` were written: its buffer may take another batch."""
        self._free.setdefault(group, []).append(self._lent.pop(id(host)))

    def _lend(self, group: int, st: Tensor) -> Tuple[Tensor, np.ndarray]:
        """A pinned buffer of ``st``'s shape not lent (a new one where there is none), and its host array."""
        free = self._free.setdefault(group, [])
        buf = None
        while free and buf is None:
            buf = free.pop()
            buf = buf if buf.shape == st.shape and buf.dtype == st.dtype else None  # a smaller last batch
        if buf is None:
            buf = torch.empty(st.shape, dtype=st.dtype, pin_memory=True)
        host = buf.numpy()
        self._lent[id(host)] = buf
        return buf, host


@dataclass
class _InFlight:
    """A batch whose rows are still being copied: the writer's arguments (rows as whole host rows
    of every statistic, the stored columns taken once they are filled), the events that fire
    when they are, and per group the host array to give back to the copier."""

    batch: dict
    events: list
    hosts: List[Tuple[int, Any]]

    def done(self) -> bool:
        return all(e.query() for e in self.events)

    def wait(self) -> None:
        for e in self.events:
            if not e.query():
                e.synchronize()


class RunSink:
    """Feeds one run file from a probe.

    Args:
        writer: the open run writer.
        groups: per group of the run state, its layers (indices), as the statistics arrive.
        columns: the stored entries of a statistics row (a slice where they are consecutive).
        snapshot_every_s: seconds between snapshots of the run state (also at close); None: with
            every batch (a file from before ``snapshot_rows`` is continued as it was made).
        release: called as ``release(group, stats, event)`` when a group's device statistics are
            being copied until the CUDA ``event`` (the next forward must not overwrite them).
        copier: ``copier(group, stats) -> (host array, event or None)``, where an event has
            ``query()`` and ``synchronize()``, and the copier may have ``recycle(group, host)``
            (called once the host array was written); None: :func:`host_view` for CPU statistics,
            :class:`PinnedCopies` for CUDA ones.
    """

    def __init__(self, writer: RunWriter, groups: Sequence[List[int]], columns, *,
                 snapshot_every_s: Optional[float], release: Callable[[int, Tensor, Any], None],
                 copier: Optional[Callable] = None):
        self.writer = writer
        self.groups = [list(g) for g in groups]
        self.columns = columns
        self.per_sample = writer.per_sample
        self.snapshot_every_s = snapshot_every_s
        self.release = release
        self.copier = copier
        self._last_snapshot = time.monotonic()
        self._in_flight: Deque[_InFlight] = deque()  # oldest first

    # ---- per batch ----------------------------------------------------------------------------

    def put(self, state: RunState, stats: Sequence[Tensor], ids: List[str], labels, steps: List[int],
            series: TrainingSeries) -> None:
        """One batch, after ``state`` took it: stats per group (L, B, H, R, len(STAT_NAMES))."""
        while self._in_flight and self._in_flight[0].done():  # copied meanwhile: no wait
            self._write_oldest()
        while len(self._in_flight) >= MAX_IN_FLIGHT:  # its pinned buffers are about to be reused
            self._write_oldest()
        rows: List[Any] = [None] * sum(len(g) for g in self.groups)
        events, hosts = [], []
        if self.per_sample:
            for gi, (members, st) in enumerate(zip(self.groups, stats)):
                host, event = self._copier(st)(gi, st)
                hosts.append((gi, host))
                events += [] if event is None else [event]
                for j, i in enumerate(members):
                    rows[i] = host[j]  # (B, H, R, len(STAT_NAMES)): filled once the event fired
        batch = dict(ids=ids, rows=rows if self.per_sample else None, steps=steps,
                     snapshot=state.snapshot() if self._snapshot_due() else None, series=series.take(),
                     labels=labels)
        self._in_flight.append(_InFlight(batch, events, hosts))
        if not events or batch["snapshot"] is not None:  # a snapshot: its views of the live state cannot wait
            self._write_all()

    def _copier(self, st: Tensor) -> Callable:
        if self.copier is None:
            self.copier = PinnedCopies(self.release) if st.device.type == "cuda" else host_view
        return self.copier

    def _snapshot_due(self) -> bool:
        if self.snapshot_every_s is None:
            return True
        if time.monotonic() - self._last_snapshot < self.snapshot_every_s:
            return False
        self._last_snapshot = time.monotonic()
        return True

    def _write_oldest(self) -> None:
        """The oldest batch in flight to the writer, after its copy (waited for where not done)."""
        entry = self._in_flight.popleft()
        entry.wait()
        batch = dict(entry.batch)
        rows = batch.pop("rows")
        if rows is not None:  # the stored columns: only now, a fancy index would copy the host rows
            rows = [r[..., self.columns] for r in rows]
        self.writer.write(batch.pop("ids"), rows, **batch)  # copies the rows
        recycle = getattr(self.copier, "recycle", None)
        for group, host in entry.hosts if recycle is not None else ():
            recycle(group, host)

    def _write_all(self) -> None:
        """Every batch in flight to the writer: one wait, for the newest (its copies come last on
        their streams), then the others are done."""
        if self._in_flight:
            self._in_flight[-1].wait()
        while self._in_flight:
            self._write_oldest()

    # ---- other entries ------------------------------------------------------------------------

    def skip(self, sample_id: str, reason: str, series: TrainingSeries) -> None:
        """An input that could not be used (unreadable image, ...)."""
        self.writer.write([], self._empty_rows(), skipped=[(str(sample_id), str(reason))], series=series.take())

    def _empty_rows(self):
        if not self.per_sample:
            return None
        S = len(self.writer.stat_names)
        return [np.zeros((0, spec.num_heads, spec.num_modes, S), np.float32) for spec in self.writer.layers]

    def close(self, state: RunState, series: TrainingSeries) -> None:
        """The batches in flight, the final snapshot and the series points left; then the file is
        closed (also when the writer failed)."""
        try:
            self._write_all()
            self.writer.write([], self._empty_rows(), snapshot=state.snapshot(), series=series.take())
        finally:
            self.writer.close()
