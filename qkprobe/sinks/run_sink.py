"""Where a probe's bytes go: each batch's ids and per-sample rows, and the run state's snapshot
every ``snapshot_every_s`` seconds, handed to the background HDF5 writer
(:class:`~qkprobe.sinks.hdf5_writer.RunWriter`).

The forward pass never waits for the device→host copy: on CUDA the rows are copied into reused
pinned buffers on a side stream and handed to the writer when their event has fired (at the next
batch or at close); on the CPU they are plain views the writer copies.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..state import RunState, TrainingSeries, series_spec
from .hdf5_writer import LayerSpec, RunWriter

Tensor = torch.Tensor


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
    """CUDA rows (L, B, H, R, S): an asynchronous copy into one of two reused pinned host buffers
    per group, on a side stream; returns the host array and the CUDA event that fires when it is
    filled. ``release(group, stats, event)`` lets the statistics' owner keep the next forward off
    the device buffer until then."""

    def __init__(self, release: Callable[[int, Tensor, Any], None]):
        self.release = release
        self._pinned: dict = {}   # group → two pinned buffers
        self._turn: dict = {}     # group → the buffer to fill next
        self._stream = None

    def __call__(self, group: int, st: Tensor):
        main = torch.cuda.current_stream(st.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(st.device)
        pinned = self._pinned.get(group)
        if pinned is None or pinned[0].shape != st.shape:
            pinned = self._pinned[group] = [torch.empty(st.shape, dtype=st.dtype, pin_memory=True) for _ in range(2)]
            self._turn[group] = 0
        buf = pinned[self._turn[group]]
        self._turn[group] ^= 1
        self._stream.wait_stream(main)  # the statistics of this forward are written
        with torch.cuda.stream(self._stream):
            buf.copy_(st, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        st.record_stream(self._stream)  # its memory is not reused before the copy is done
        self.release(group, st, ready)
        return buf.numpy(), ready


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
        copier: ``copier(group, stats) -> (host array, event or None)``; None: :func:`host_view`
            for CPU statistics, :class:`PinnedCopies` for CUDA ones.
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
        self._in_flight: Optional[dict] = None  # a batch whose rows are still being copied

    # ---- per batch ----------------------------------------------------------------------------

    def put(self, state: RunState, stats: Sequence[Tensor], ids: List[str], labels, steps: List[int],
            series: TrainingSeries) -> None:
        """One batch, after ``state`` took it: stats per group (L, B, H, R, len(STAT_NAMES))."""
        if self._in_flight is not None:  # its copy was queued a forward ago; its pinned buffers are reused next
            self._write_in_flight()
        rows: List[Any] = [None] * sum(len(g) for g in self.groups)
        ready = None  # the event of the last row copy of this batch (one stream: it implies the others)
        if self.per_sample:
            for gi, (members, st) in enumerate(zip(self.groups, stats)):
                host, event = self._copier(st)(gi, st)
                ready = event if event is not None else ready
                for j, i in enumerate(members):
                    rows[i] = host[j][..., self.columns]  # copied by writer.write
        batch = dict(ids=ids, rows=rows if self.per_sample else None, steps=steps,
                     snapshot=state.snapshot() if self._snapshot_due() else None, series=series.take(),
                     labels=labels)
        if ready is not None and batch["snapshot"] is None:  # to the writer once the copy is done
            self._in_flight = dict(batch, ready=ready)
            return
        if ready is not None:  # a snapshot: its views of the live state cannot wait for the next forward
            ready.synchronize()
        self.writer.write(batch.pop("ids"), batch.pop("rows"), **batch)

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

    def _write_in_flight(self) -> None:
        batch, self._in_flight = self._in_flight, None
        batch.pop("ready").synchronize()
        self.writer.write(batch.pop("ids"), batch.pop("rows"), **batch)

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
        """The batch in flight, the final snapshot and the series points left; then the file is closed
        (also when the writer failed)."""
        try:
            if self._in_flight is not None:
                self._write_in_flight()
            self.writer.write([], self._empty_rows(), snapshot=state.snapshot(), series=series.take())
        finally:
            self.writer.close()
