"""``qkprobe.attach``: record per-mode statistics of every forward pass of an unchanged model.

    with qkprobe.attach(model, out="run.h5") as probe:
        for images, paths in loader:
            probe.set_ids(paths)        # optional; default ids are running sample numbers
            model(images)

A :class:`Probe` runs the stages of a recording, each in its own module:

- **capture** (:mod:`qkprobe.capture.events`): the adapters' hooks make one typed
  :class:`~qkprobe.capture.events.QKEvent` per attention call: the layer, its q and k (read-only,
  detached) and what the module applies beyond ``scale·q·k``;
- **reduce** (:mod:`qkprobe.reduce.reducer`): a reducer per backend turns each event into the
  layer's statistics (B, H, R, S) (:data:`qkprobe.core.stats.STAT_NAMES`) on the model's device,
  gathered per forward by :class:`~qkprobe.reduce.batch.ForwardStats`;
- **state** (:mod:`qkprobe.state`): top-k optimal samples per (layer, head, mode, sign), exactly
  mergeable aggregates and the training series; it alone names what the file stores of them,
  and loads it back on resume;
- **sinks** (:mod:`qkprobe.sinks.run_sink`, :mod:`qkprobe.sinks.tensorboard`): rows, snapshots
  and series points go to the background HDF5 writer, and to TensorBoard.

The model's outputs and gradients are unchanged; ``close()`` removes every hook.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..adapters.discover import AttentionSite, find_attention, prefix_tokens
from ..bases import LayerBases, layer_bases
from ..core.stats import ATTENTION_STATS, DEFAULT_STATS, STAT_INDEX, STAT_NAMES
from ..core.streaming import Aggregates
from ..distributed import finish_shards, rank_and_world, shard_path
from ..errors import QKProbeError, UsageError
from ..reduce.batch import ForwardStats
from ..reduce.reducer import Fallback, LayerMaps, ReduceOptions, reducer_for
from ..state import RunState, TrainingSeries
from ..state.run_state import SCORES, stores_snapshot_rows
from .events import QKEvent, capture_events

Tensor = torch.Tensor
#: the columns of a statistics row the top-k ranks samples by
_SCORE_COLUMNS = tuple(STAT_INDEX[s] for s in SCORES)


@dataclass
class ProbeOptions:
    """What a probe records. Stored in the run file; ``--resume`` requires them unchanged.

    layers: indices or module names of the attention layers to record (None: all).
    heads: head indices to record in every layer (None: all).
    topk: k of the top-k-mean statistics. top_samples: optimal samples kept per
    (layer, head, mode, sign). include_prefix: prefix tokens (cls, registers) in the maps.
    every: record every N-th forward. per_sample: store per-sample rows (else only aggregates
    and top-k). store_dtype: dtype of stored rows. compression: HDF5 filter.
    refresh_every: recompute the bases from the current weights every M steps (training; the
    step is the one given to ``Probe.step``, else the forward count). Each refresh adds a point
    to the time series (singular values, cosines, drift).
    stats: names of the statistics to store, or ``"all"`` for every one of
    :data:`qkprobe.core.stats.STAT_NAMES`. None: :data:`qkprobe.core.stats.DEFAULT_STATS`, the
    paper's map statistics and scores without ``attn_contrib`` / ``attn_share``, which cost one
    more attention pass per layer (on CPU about as much as the model's own attention). Top-k
    optimal samples use the scores either way.
    backend: who computes the statistics: "auto" (Triton kernels for CUDA tensors, the compiled
    C kernels on the CPU, else torch; where they cannot run or fail, the torch path after one
    warning), "torch", "native" or "triton" (:mod:`qkprobe.reduce`; these raise where they cannot run).
    snapshot_every_s: seconds between writes of the top-k and aggregate snapshot (also written
    at close); rows are committed every batch. backend and snapshot_every_s change how, not what,
    a probe records: they are not part of :meth:`record` (a resume may change them).
    """

    layers: Optional[List[Union[int, str]]] = None
    heads: Optional[List[int]] = None
    topk: int = 5
    top_samples: int = 16
    include_prefix: bool = False
    every: int = 1
    per_sample: bool = True
    store_dtype: str = "float32"
    compression: Optional[str] = "blosc-lz4"
    refresh_every: Optional[int] = None
    stats: Union[None, str, List[str]] = None
    backend: str = "auto"
    snapshot_every_s: float = 5.0

    def record(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_OPTIONS}


#: ProbeOptions fields that do not change what is recorded (left out of the stored options)
RUNTIME_OPTIONS = ("backend", "snapshot_every_s")


class Probe:
    """A recording attached to a model (see module docstring). Use :func:`attach` to make one."""

    def __init__(self, model: nn.Module, out: Optional[str] = None, *, options: Optional[ProbeOptions] = None,
                 bases: Optional[List[LayerBases]] = None, metadata: Optional[Dict[str, Any]] = None,
                 resume: bool = False, tensorboard=None, chunk_rows: int = 8, **option_kwargs):
        self.model = model
        self.options = o = options or ProbeOptions(**option_kwargs)
        if o.every < 1:
            raise UsageError(f"attach: every={o.every} records no forward; pass every ≥ 1.")
        if o.topk < 1:
            raise UsageError(f"attach: topk={o.topk} averages no tokens; pass topk ≥ 1.")
        self.stat_names = _stat_names(o.stats)
        cols = [STAT_INDEX[n] for n in self.stat_names]
        device = _model_device(model)
        # the aggregated columns, on the state's device (a host index would be copied, and the
        # device synchronized, with every batch)
        self._stored = None if len(cols) == len(STAT_NAMES) else torch.tensor(cols, device=device)
        # the stored columns of a row; a slice (a view, no copy) when they are consecutive, as
        # the default set is
        row_cols = slice(cols[0], cols[-1] + 1) if cols == list(range(cols[0], cols[-1] + 1)) else np.asarray(cols)
        self._n_prefix = prefix_tokens(model)
        by_name = {b.name: b for b in bases} if bases is not None else {}
        self.sites = _select(find_attention(model), o.layers)
        self._reduce_options = ReduceOptions(o.topk, o.include_prefix,
                                             attention=bool(set(ATTENTION_STATS) & set(self.stat_names)))
        self._fallback = Fallback()  # auto's move to the torch path: one warning per probe
        self._reducers = {device: reducer_for(o.backend, device, self._reduce_options, self._fallback)}
        self.maps: List[LayerMaps] = []
        for site in self.sites:
            lb = by_name.get(site.name) or layer_bases(site, model, n_prefix=self._n_prefix)
            self.maps.append(LayerMaps(lb, _heads(o.heads, site.name, lb.num_heads)))
        shapes = [(m.bases.num_heads if m.heads is None else len(m.heads), m.bases.num_modes) for m in self.maps]
        self.rank, self.world = rank_and_world()
        self.out = out
        path = None if out is None else (shard_path(out, self.rank) if self.world > 1 else out)
        self.state = RunState(shapes, len(self.stat_names), top_samples=o.top_samples, device=device,
                              snapshot_rows=path is None or stores_snapshot_rows(path, resume))
        self.collected = ForwardStats([g.layers for g in self.state.groups], shapes,
                                      [m.heads is not None for m in self.maps], [s.name for s in self.sites])
        self.training = TrainingSeries(self.bases())
        self._tensorboard = None
        if tensorboard is not None:
            from ..sinks.tensorboard import TensorBoardSink
            self._tensorboard = TensorBoardSink(tensorboard)
        self.tensorboard = tensorboard
        self._add_series_point(step=-1)
        self.sink = None
        if path is not None:
            self.sink = self._open_sink(path, metadata or {}, resume, chunk_rows, row_cols)
            if resume:
                from ..sinks.run_file import open_run
                with open_run(path) as run:
                    self.state.load(run, replay=o.per_sample)
        self._forwards = 0
        self._recording = False
        self._ids: Optional[List[str]] = None
        self._labels: Optional[List[str]] = None
        self._step = -1
        self._batch: Optional[int] = None
        self._last_refresh: Optional[int] = None
        self.paused = False  # True: forwards are neither recorded nor counted (evaluation)
        self._handles = [model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
                         model.register_forward_hook(self._on_forward_end)]
        self._capture = capture_events(self.sites, self._on_event)
        self._capture.__enter__()
        self.closed = False

    def _open_sink(self, path: str, metadata: Dict[str, Any], resume: bool, chunk_rows: int, row_cols):
        from ..metadata import versions
        from ..sinks.hdf5_writer import RunWriter
        from ..sinks.run_sink import RunSink, layer_specs
        o = self.options
        specs = layer_specs([s.name for s in self.sites], self.bases(), [m.heads for m in self.maps], self.state)
        meta = dict(metadata)
        meta.setdefault("versions", versions())
        meta["options"] = o.record()
        writer = RunWriter(path, specs, self.stat_names, meta, per_sample=o.per_sample, store_dtype=o.store_dtype,
                           compression=o.compression, chunk_rows=chunk_rows, resume=resume)
        # a file from before snapshot_rows gets a snapshot with every batch, as it was made
        every = o.snapshot_every_s if self.state.snapshot_rows else None
        return RunSink(writer, [g.layers for g in self.state.groups], row_cols, snapshot_every_s=every,
                       release=self.collected.copying)

    @property
    def writer(self):
        """The run file's background writer (None without ``out``)."""
        return None if self.sink is None else self.sink.writer

    @property
    def series(self) -> List[Dict[str, Any]]:
        """The training-series points so far (see :class:`qkprobe.state.TrainingSeries`)."""
        return self.training.points

    @property
    def samples(self) -> int:
        """Samples recorded in the run (with a resume, those in the file before it too)."""
        return self.state.samples

    # ------------------------------------------------------------------ user API
    def set_ids(self, ids: Sequence, labels: Optional[Sequence] = None) -> None:
        """Sample ids for the next recorded forward (one per batch element), and optionally their
        class labels (stored aligned with the ids; ``open_run(...).labels``)."""
        self._ids = [str(i) for i in ids]
        self._labels = None if labels is None else ["" if v is None else str(v) for v in labels]

    def step(self, global_step: int) -> None:
        """The training step stored with the rows of the following forwards."""
        self._step = int(global_step)

    def skip(self, sample_id: str, reason: str) -> None:
        """Record an input that could not be used (unreadable image, ...)."""
        if self.sink is not None:
            self.sink.skip(sample_id, reason, self.training)

    def bases(self) -> List[LayerBases]:
        return [m.bases for m in self.maps]

    def top_samples(self, layer: int) -> Dict[str, np.ndarray]:
        """Current top-k state of a layer: scores and global sample indices, (H, R, 2, K)."""
        return self.state.top_samples(layer)

    def aggregates(self, layer: int) -> Aggregates:
        """Current aggregates of a layer (count, mean, m2, min, max, nonfinite; (H, R, S))."""
        return self.state.aggregates(layer)

    def nonfinite(self) -> Dict[str, int]:
        """Non-finite per-sample statistics (from NaN/Inf in q or k) seen so far, per layer name
        (only layers with any)."""
        return {s.name: n for s, n in zip(self.sites, self.state.nonfinite()) if n}

    # ------------------------------------------------------------------ hooks
    def _on_forward_start(self, module, args, kwargs):
        if self.paused:
            self._recording = False
            return
        step = self._step if self._step >= 0 else self._forwards
        self._recording = (step % self.options.every) == 0  # every N-th step (or forward)
        self.collected.clear()  # left over by a forward that raised: never part of this batch
        self._forwards += 1
        M = self.options.refresh_every
        if M and (self._last_refresh is None or step - self._last_refresh >= M):
            self._last_refresh = step
            self.refresh(step)
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        self._batch = None if first is None or first.dim() == 0 else int(first.shape[0])

    def _on_event(self, event: QKEvent) -> None:
        if not self._recording:
            return
        reducer = self._reducers.get(event.q.device)
        if reducer is None:
            reducer = self._reducers[event.q.device] = reducer_for(
                self.options.backend, event.q.device, self._reduce_options, self._fallback)
        maps = self.maps[event.layer]
        with torch.no_grad():
            try:
                # straight into the group's buffer (no copy at the end of the forward) where possible
                st = reducer(event, maps, out=self.collected.out_for(event.layer, event.batch, event.q.device))
            except QKProbeError as exc:  # name the layer and its shapes
                site = self.sites[event.layer]
                raise type(exc)(f"{site.name} ({type(site.module).__name__}, q {tuple(event.q.shape)}, "
                                f"k {tuple(event.k.shape)}): {exc}") from exc
            self.collected.add(event.layer, maps.select_heads(st))  # NaN/Inf are counted by the aggregates

    def _on_forward_end(self, module, args, output):
        if not self._recording:
            return
        self._recording = False
        with torch.no_grad():
            self._finish_batch()

    def _finish_batch(self) -> None:
        if not self.collected.any():
            return
        B = self.collected.batch()
        if self._batch and B != self._batch and B % self._batch == 0:
            B = self._batch  # windowed attention sees B · windows rows
        ids, labels = self._take_ids(B)
        stats = self.collected.finish(B)  # per group (L, B, H, R, len(STAT_NAMES))
        self.state.add(stats, _SCORE_COLUMNS, self._stored)
        if self.sink is not None:
            self.sink.put(self.state, stats, ids, labels, [self._step] * B, self.training)

    def _take_ids(self, B: int):
        """The ids and labels of this batch of B samples (default ids: running sample numbers)."""
        prefix = f"rank{self.rank}:" if self.world > 1 else ""  # default ids stay unique across shards
        start = self.state.samples
        ids = self._ids if self._ids is not None else [f"{prefix}{start + j}" for j in range(B)]
        labels, self._ids, self._labels = self._labels, None, None
        for what, given in (("ids", ids), ("labels", labels)):
            if given is not None and len(given) != B:
                raise UsageError(f"set_ids gave {len(given)} {what} for a batch of {B} samples; pass one per "
                                 f"sample of the next forward.")
        return ids, labels

    # ------------------------------------------------------------------ training
    def refresh(self, step: Optional[int] = None) -> None:
        """Recompute every layer's bases from the current weights and add a series point.

        A layer whose W_q or W_k holds NaN/Inf keeps its previous bases and is flagged
        (``nonfinite_weights``) in the series; training goes on.
        """
        step = (self._step if self._step >= 0 else self._forwards) if step is None else int(step)
        flags = []
        for site, maps in zip(self.sites, self.maps):
            w = site.adapter.weights(site.module)
            ok = bool(torch.isfinite(w.W_q).all() and torch.isfinite(w.W_k).all())
            if ok:
                # the series stores S, cosines and drift: the sym spectra are not needed
                maps.set_bases(layer_bases(site, self.model, n_prefix=self._n_prefix, spectra=False))
            flags.append(not ok)
        self._add_series_point(step, flags)

    def _add_series_point(self, step: int, nonfinite=None) -> None:
        point = self.training.add(step, self.bases(), nonfinite)
        if self._tensorboard is not None:
            self._tensorboard.add_point(point)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush everything, close the file and remove every hook. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        self._capture.__exit__(None, None, None)
        if self.sink is not None:
            self.sink.close(self.state, self.training)
            if self.world > 1:
                finish_shards(self.out, self.rank, self.world)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stat_names(wanted: Union[None, str, List[str]]) -> List[str]:
    if wanted is None:
        return list(DEFAULT_STATS)
    if wanted == "all":
        return list(STAT_NAMES)
    if isinstance(wanted, str):
        wanted = [wanted]
    unknown = [n for n in wanted if n not in STAT_INDEX]
    if unknown or not wanted:
        raise UsageError(f"attach: unknown statistics {unknown}; choose from {list(STAT_NAMES)} or 'all'.")
    return [n for n in STAT_NAMES if n in set(wanted)]  # canonical order


def _select(sites: List[AttentionSite], layers) -> List[AttentionSite]:
    """The recorded sites: all, or those named by index or module name (in the order given)."""
    if layers is None:
        return sites
    out = []
    for key in layers:
        if isinstance(key, int):
            if not -len(sites) <= key < len(sites):
                raise UsageError(f"attach: layer {key} is out of range for a model with {len(sites)} attention "
                                 f"layers; pass an index below {len(sites)} or a module name.")
            out.append(sites[key])
        else:
            match = [s for s in sites if s.name == key]
            if not match:
                raise UsageError(f"attach: no attention layer named {key!r}; layers are {[s.name for s in sites]}.")
            out.append(match[0])
    return out


def _heads(heads: Optional[List[int]], layer: str, num_heads: int) -> Optional[Tensor]:
    """The recorded heads of a layer as an index tensor (None: all)."""
    if heads is None:
        return None
    index = torch.as_tensor(heads, dtype=torch.long)
    if index.numel() == 0 or index.min() < 0 or index.max() >= num_heads:
        raise UsageError(f"attach: heads {list(heads)} are out of range for {layer} with {num_heads} heads; "
                         f"pass indices from 0 to {num_heads - 1}.")
    return index


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def attach(model: nn.Module, out: Optional[str] = None, **kwargs) -> Probe:
    """Attach a :class:`Probe` to ``model``; use as a context manager or call ``close()``.

    Keyword arguments: the fields of :class:`ProbeOptions`, plus ``bases`` (precomputed
    LayerBases), ``metadata`` (dict stored in the file: model spec, weights hash, ...) and
    ``resume`` (continue an existing file) and ``chunk_rows`` (rows per HDF5 chunk of the per-sample
    statistics, default 8: a commit rewrites a partly filled chunk, so keep it at most the batch
    size; the file's own chunking is kept on resume).
    """
    return Probe(model, out, **kwargs)
