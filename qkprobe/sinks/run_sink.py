"""Where a probe's bytes go: each batch's ids and per-sample rows, and the run state's snapshot
every ``snapshot_every_s`` seconds, handed to the background HDF5 writer
(:class:`~qkprobe.sinks.hdf5_writer.RunWriter`).

The forward pass never waits for the device→host copy: on CUDA the rows are copied into reused
pinned buffers on a side stream and handed to the writer when their event has fired (at the next
batch or at close); on the CPU they are plain views the writer copies.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence

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
    """

    def __init__(self, writer: RunWriter, groups: Sequence[List[int]], columns, *,
                 snapshot_every_s: Optional[float], release: Callable[[int, Tensor, Any], None]):
        self.writer = writer
        self.groups = [list(g) for g in groups]
        self.columns = columns
        self.per_sample = writer.per_sample
        self.snapshot_every_s = snapshot_every_s
        self.release = release
        self._last_snapshot = time.monotonic()
        self._in_flight: Optional[dict] = None  # a CUDA batch whose rows are still being copied
        self._pinned: List[Optional[List[Tensor]]] = [None] * len(self.groups)  # two per group
        self._turn = [0] * len(self.groups)
        self._copy_stream = None

    # ---- per batch ----------------------------------------------------------------------------

    def put(self, state: RunState, stats: Sequence[Tensor], ids: List[str], labels, steps: List[int],
            series: TrainingSeries) -> None:
        """One batch, after ``state`` took it: stats per group (L, B, H, R, len(STAT_NAMES))."""
        layers = sum(len(g) for g in self.groups)
        rows: List[Any] = [None] * layers
        ready = None  # CUDA: event of the asynchronous row copies of this batch
        if self.per_sample:
            for gi, (members, st) in enumerate(zip(self.groups, stats)):
                host, ready = self._rows_to_host(gi, st, ready)
                for j, i in enumerate(members):
                    rows[i] = host[j][..., self.columns]  # copied by writer.write
        snapshot = state.snapshot() if self._snapshot_due() else None
        self._hand_off(dict(ids=ids, rows=rows if self.per_sample else None, steps=steps, snapshot=snapshot,
                            series=series.take(), labels=labels), ready)

    def _snapshot_due(self) -> bool:
        if self.snapshot_every_s is None:
            return True
        if time.monotonic() - self._last_snapshot < self.snapshot_every_s:
            return False
        self._last_snapshot = time.monotonic()
        return True

    def _rows_to_host(self, gi: int, st: Tensor, ready):
        """The rows (L, B, H, R, S) as a host array. CPU: a view (the writer copies it). CUDA: an
        asynchronous copy into a reused pinned buffer on a side stream; ``ready`` is the event the
        writer waits for."""
        if st.device.type != "cuda":
            return st.cpu().numpy(), ready
        main = torch.cuda.current_stream(st.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(st.device)
        pinned = self._pinned[gi]
        if pinned is None or pinned[0].shape != st.shape:
            pinned = self._pinned[gi] = [torch.empty(st.shape, dtype=st.dtype, pin_memory=True) for _ in range(2)]
            self._turn[gi] = 0
        if self._in_flight is not None:  # its rows still sit in the other pinned buffer
            self._write_in_flight()
        buf = pinned[self._turn[gi]]
        self._turn[gi] ^= 1
        self._copy_stream.wait_stream(main)  # the statistics of this forward are written
        with torch.cuda.stream(self._copy_stream):
            buf.copy_(st, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        st.record_stream(self._copy_stream)  # its memory is not reused before the copy is done
        self.release(gi, st, ready)
        return buf.numpy(), ready

    def _hand_off(self, batch: dict, ready) -> None:
        """To the writer now (CPU, or with a snapshot), else once the row copy is done (at the next
        batch or at close): the forward never waits for the device→host copy."""
        now = ready is None or batch["snapshot"] is not None
        if self._in_flight is not None and now:
            self._write_in_flight()
        if not now:
            self._in_flight = dict(batch, ready=ready)
            return
        if ready is not None:
            ready.synchronize()
        self.writer.write(batch.pop("ids"), batch.pop("rows"), **batch)

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
