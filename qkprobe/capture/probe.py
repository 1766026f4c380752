"""``qkprobe.attach``: record per-mode statistics of every forward pass of an unchanged model.

    with qkprobe.attach(model, out="run.h5") as probe:
        for images, paths in loader:
            probe.set_ids(paths)        # optional; default ids are running sample numbers
            model(images)

For each recorded forward and each attention layer: the layer's q and k are captured by the
adapter's hooks (read-only, detached, under no_grad), turned into mode coordinates a (B, H, N, R)
and b (B, H, Nk, R) by one R × R matrix per head, and reduced on the model's device to
statistics (B, H, R, S) (:data:`qkprobe.core.stats.STAT_NAMES`). Per batch, the probe updates a
streaming top-k of optimal samples per (layer, head, mode, sign) and exactly mergeable
aggregates, and hands rows and state to a background HDF5 writer.

The model's outputs and gradients are unchanged; ``close()`` removes every hook.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..adapters.discover import AttentionSite, find_attention, prefix_tokens
from ..bases import LayerBases, layer_bases
from ..core.stats import ATTENTION_STATS, DEFAULT_STATS, STAT_INDEX, STAT_NAMES, mode_statistics
from ..core import native
from ..core.streaming import Aggregates, TopKSamples
from ..distributed import finish_shards, rank_and_world, shard_path
from ..reduce.backend import resolve as resolve_backend
from .attention import ShareInputs, attention_terms, real_probs, share_inputs
from .coordinates import per_head_matmul, capture_qk

Tensor = torch.Tensor
#: snapshot array: how many rows of the file the top-k and aggregates of the snapshot cover
SNAPSHOT_ROWS = "snapshot_rows"


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
    C kernels on the CPU, else torch), "torch", "native" or "triton" (:mod:`qkprobe.reduce`).
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


@dataclass
class _Layer:
    site: AttentionSite
    bases: LayerBases
    heads: Optional[Tensor]
    group: "_Group"
    slot: int                      # this layer's entry on the group's first axis
    pending: List[Tensor] = field(default_factory=list)
    maps: Optional[tuple] = None   # float_maps() cache

    def float_maps(self, device) -> tuple:
        """(coord_q, coord_k, S, [coord_q; coord_k]) as float32 on ``device``, cached."""
        if self.maps is None or self.maps[0].device != device:
            b = self.bases
            maps = tuple(t.detach().to(device, torch.float32) for t in (b.coord_q, b.coord_k, b.S))
            self.maps = (*maps, torch.cat(maps[:2]))
        return self.maps

    def coordinates(self, q: Tensor, k: Tensor):
        """a = q @ coord_q, b = k @ coord_k per head: (B, H, N, R) each (float32 q, k).

        Where k lies right after q in one tensor (q and k sliced out of a fused qkv
        projection), both are one (B, 2H, N, R) view and take a single batched matmul."""
        coord_q, coord_k, _, both = self.float_maps(q.device)
        H = q.shape[1]
        if q.shape == k.shape and q.stride() == k.stride() and H > 0 and not native.compiling() \
                and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() \
                and k.storage_offset() - q.storage_offset() == H * q.stride(1):
            qk = q.as_strided((q.shape[0], 2 * H, *q.shape[2:]), q.stride(), q.storage_offset())
            ab = per_head_matmul(qk, both)
            return ab[:, :H], ab[:, H:]
        return per_head_matmul(q, coord_q), per_head_matmul(k, coord_k)


@dataclass
class _Group:
    """Layers with the same (heads, modes): their top-k and aggregates are one state with a
    leading layer axis, updated by one set of tensor ops per batch instead of one per layer."""
    layers: List[int]
    topk: TopKSamples    # (L, H, R, 2, K)
    agg: Aggregates      # (L, H, R, S)
    buffer: Optional[Tensor] = None  # (L, B, H, R, len(STAT_NAMES)): every layer's statistics of a forward
    # CUDA rows in flight (probe._rows_to_host): two pinned host buffers, the next one to use, a spare
    # device buffer, and the event of the last copy out of each device buffer
    pinned: Optional[List[Tensor]] = None
    turn: int = 0
    spare: Optional[Tensor] = None
    copied: Dict[int, Any] = field(default_factory=dict)

    def slot(self, j: int, rows: int, device) -> Tensor:
        """Layer j's (rows, H, R, len(STAT_NAMES)) entry of the buffer, reused across forwards."""
        shape = (len(self.layers), rows, *self.topk.shape[1:], len(STAT_NAMES))
        if self.buffer is None or tuple(self.buffer.shape) != shape or self.buffer.device != device:
            self.buffer = torch.empty(shape, dtype=torch.float32, device=device)
        return self.buffer[j]

    def nonfinite_per_layer(self) -> List[int]:
        """Non-finite per-sample statistics seen so far, one count per layer of the group."""
        return self.agg.nonfinite.flatten(1).sum(1).tolist()

    def filled(self, layers: List["_Layer"], rows: int) -> bool:
        """Whether this forward wrote every layer's statistics straight into the buffer."""
        return self.buffer is not None and self.buffer.shape[1] == rows and all(
            len(l.pending) == 1 and l.pending[0].data_ptr() == self.buffer[l.slot].data_ptr()
            and l.pending[0].shape == self.buffer.shape[1:] for l in layers)


class Probe:
    """A recording attached to a model (see module docstring). Use :func:`attach` to make one."""

    def __init__(self, model: nn.Module, out: Optional[str] = None, *, options: Optional[ProbeOptions] = None,
                 bases: Optional[List[LayerBases]] = None, metadata: Optional[Dict[str, Any]] = None,
                 resume: bool = False, tensorboard=None, chunk_rows: int = 8, **option_kwargs):
        self.model = model
        self.options = options or ProbeOptions(**option_kwargs)
        if self.options.every < 1:
            raise ValueError("every must be ≥ 1")
        self.stat_names = self._stat_names(self.options.stats)
        self._stat_cols = torch.tensor([STAT_INDEX[n] for n in self.stat_names])
        # the stored columns of a row; a slice (a view, no copy) when they are consecutive, as
        # the default set is
        cols = self._stat_cols.tolist()
        self._row_cols = slice(cols[0], cols[-1] + 1) if cols == list(range(cols[0], cols[-1] + 1)) \
            else np.asarray(cols)
        self._attention = bool(set(ATTENTION_STATS) & set(self.stat_names))
        sites = find_attention(model)
        n_prefix = prefix_tokens(model)
        by_name = {b.name: b for b in bases} if bases is not None else {}
        chosen = self._select(sites, self.options.layers)
        device = _model_device(model)
        self._backends = {device: resolve_backend(self.options.backend, device)}  # a forced one fails here
        shapes: Dict[tuple, List[tuple]] = {}
        for index, site in enumerate(chosen):
            lb = by_name.get(site.name) or layer_bases(site, model, n_prefix=n_prefix)
            H = lb.num_heads
            heads = None if self.options.heads is None else torch.as_tensor(self.options.heads, dtype=torch.long)
            if heads is not None and (heads.min() < 0 or heads.max() >= H):
                raise ValueError(f"heads {self.options.heads} out of range for {site.name} with {H} heads")
            nh = H if heads is None else len(heads)
            shapes.setdefault((nh, lb.num_modes), []).append((index, site, lb, heads))
        self.groups: List[_Group] = []
        layers: Dict[int, _Layer] = {}
        for (nh, R), members in shapes.items():
            L = len(members)
            group = _Group([index for index, *_ in members],
                           TopKSamples(L, nh, R, k=self.options.top_samples, device=device),
                           Aggregates((L, nh, R, len(self.stat_names)), device))
            self.groups.append(group)
            for slot, (index, site, lb, heads) in enumerate(members):
                layers[index] = _Layer(site, lb, heads, group, slot)
        self.layers: List[_Layer] = [layers[i] for i in range(len(chosen))]  # model order
        self._forwards = 0
        self._recording = False
        self._ids: Optional[List[str]] = None
        self._labels: Optional[List[str]] = None
        self._step = -1
        self.samples = 0
        self._n_prefix = n_prefix
        self._start_bases = [l.bases for l in self.layers]
        self._last_refresh: Optional[int] = None
        self.series: List[Dict[str, Any]] = []
        self._pending_series: List[Dict[str, Any]] = []
        self.tensorboard = tensorboard
        self._add_series_point(step=-1)
        self.writer = None
        self._snapshot_rows_stored = True
        self.out = out
        self.rank, self.world = rank_and_world()
        if out is not None:
            path = shard_path(out, self.rank) if self.world > 1 else out
            self._snapshot_rows_stored = _declares_snapshot_rows(path, resume)
            self.writer = self._open_writer(path, metadata or {}, resume, chunk_rows)
            if resume:
                self._load_state()
        self._batch: Optional[int] = None
        self._last_snapshot = time.monotonic()
        self._in_flight: Optional[dict] = None  # a CUDA batch whose rows are still being copied to the host
        self.paused = False  # True: forwards are neither recorded nor counted (evaluation)
        self._handles = [model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
                         model.register_forward_hook(self._on_forward_end)]
        self._capture = capture_qk([l.site for l in self.layers], self._on_qk)
        self._capture.__enter__()
        self.closed = False

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _stat_names(wanted: Union[None, str, List[str]]) -> List[str]:
        if wanted is None:
            return list(DEFAULT_STATS)
        if wanted == "all":
            return list(STAT_NAMES)
        if isinstance(wanted, str):
            wanted = [wanted]
        unknown = [n for n in wanted if n not in STAT_INDEX]
        if unknown or not wanted:
            raise ValueError(f"unknown statistics {unknown}; choose from {list(STAT_NAMES)}")
        return [n for n in STAT_NAMES if n in set(wanted)]  # canonical order

    @staticmethod
    def _select(sites: List[AttentionSite], layers) -> List[AttentionSite]:
        if layers is None:
            return sites
        out = []
        for key in layers:
            if isinstance(key, int):
                out.append(sites[key])
            else:
                match = [s for s in sites if s.name == key]
                if not match:
                    raise ValueError(f"no attention layer named {key!r}; layers are {[s.name for s in sites]}")
                out.append(match[0])
        return out

    def _open_writer(self, out: str, metadata: Dict[str, Any], resume: bool, chunk_rows: int):
        from ..metadata import versions
        from ..sinks.bases_file import bases_arrays, bases_attrs
        from ..sinks.hdf5_writer import LayerSpec, RunWriter
        specs = []
        for l in self.layers:
            nh, R = l.group.topk.shape[1:]
            snap = {f"topk_{k}": (v.shape, v.dtype) for k, v in self._topk(l).state_dict().items()}
            snap.update({f"agg_{k}": (v.shape, v.dtype) for k, v in self._agg(l).state_dict().items()})
            snap["nonfinite_values"] = ((), np.dtype(np.int64))
            if self._snapshot_rows_stored:
                snap[SNAPSHOT_ROWS] = ((), np.dtype(np.int64))
            attrs = {k: v for k, v in bases_attrs(l.bases).items() if k != "name"}
            attrs["heads"] = None if l.heads is None else l.heads.tolist()
            H = l.bases.num_heads
            series = {"S": ((H, R), np.float32), "cosine": ((H, R), np.float32), "drift_q": ((H,), np.float32),
                      "drift_k": ((H,), np.float32), "nonfinite_weights": ((), np.int8)}
            specs.append(LayerSpec(name=l.site.name, num_heads=nh, num_modes=R, snapshot=snap,
                                   bases=bases_arrays(l.bases), attrs=attrs, series=series))
        meta = dict(metadata)
        meta.setdefault("versions", versions())
        meta["options"] = self.options.record()
        return RunWriter(out, specs, self.stat_names, meta, per_sample=self.options.per_sample,
                         store_dtype=self.options.store_dtype, compression=self.options.compression,
                         chunk_rows=chunk_rows, resume=resume)

    def _load_state(self) -> None:
        """Resume: continue top-k, aggregates and the sample counter from the committed file."""
        from ..sinks.run_file import open_run
        with open_run(self.writer.path) as run:
            self.samples = len(run)
            snaps = [{k: run.snapshot(i, k) for k in run.snapshot_names(i)} for i in range(len(self.layers))]
            for g in self.groups:  # one state per group: stack its layers' snapshots
                def stacked(prefix, g=g):
                    names = [k[len(prefix):] for k in snaps[g.layers[0]] if k.startswith(prefix)]
                    return {n: np.stack([snaps[i][prefix + n] for i in g.layers]) for n in names}
                covered = int(snaps[g.layers[0]].get(SNAPSHOT_ROWS, self.samples))
                if covered > 0:  # 0: no snapshot yet (its arrays are zeros); the fresh state it is
                    g.topk.load_state_dict(stacked("topk_"))
                    g.agg.load_state_dict(stacked("agg_"))
                self._replay(run, g, covered)

    def _replay(self, run, g: "_Group", covered: int, chunk: int = 256) -> None:
        """Fold the rows committed after the snapshot (``covered`` rows) into the group's state.

        Exact for float32 rows; float16 rows enter at their stored precision. Without stored rows
        (``per_sample=False``) or scores, those images stay in the file but not in top-k and
        aggregates (nothing to replay them from)."""
        n = len(run)
        names = list(run.stat_names)
        if covered >= n or not self.options.per_sample or not {"score_pos", "score_neg"} <= set(names):
            return
        device = g.topk.scores.device
        for start in range(covered, n, chunk):
            rows = slice(start, min(n, start + chunk))
            x = torch.as_tensor(np.stack([run.stats(i, rows=rows) for i in g.layers], 1), dtype=torch.float32)
            x = x.to(device)  # (B, L, H, R, S stored)
            index = torch.arange(rows.start, rows.stop, device=device)
            g.topk.update_columns(x, names.index("score_pos"), names.index("score_neg"), index)
            g.agg.update(x)

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
        if self.writer is not None:
            rows = self._empty_rows()
            self.writer.write([], rows, skipped=[(str(sample_id), str(reason))], series=self._take_series())

    def _empty_rows(self):
        if not self.options.per_sample:
            return None
        return [np.zeros((0, *l.group.topk.shape[1:], len(self.stat_names)), np.float32) for l in self.layers]

    def _take_series(self) -> list:
        """Time-series points not yet handed to the writer, as ``(step, [per layer arrays])``."""
        keys = ("S", "cosine", "drift_q", "drift_k", "nonfinite_weights")
        points = [(p["step"], [{k: np.asarray(layer[k]) for k in keys} for layer in p["layers"]])
                  for p in self._pending_series]
        self._pending_series = []
        return points

    def bases(self) -> List[LayerBases]:
        return [l.bases for l in self.layers]

    @staticmethod
    def _topk(l: _Layer) -> TopKSamples:
        return l.group.topk.select(l.slot)

    @staticmethod
    def _agg(l: _Layer) -> Aggregates:
        return l.group.agg.select(l.slot)

    def top_samples(self, layer: int) -> Dict[str, np.ndarray]:
        """Current top-k state of a layer: scores and global sample indices, (H, R, 2, K)."""
        return self._topk(self.layers[layer]).state_dict()

    def aggregates(self, layer: int) -> Aggregates:
        """Current aggregates of a layer (count, mean, m2, min, max, nonfinite; (H, R, S))."""
        return self._agg(self.layers[layer])

    def nonfinite(self) -> Dict[str, int]:
        """Non-finite per-sample statistics (from NaN/Inf in q or k) seen so far, per layer name
        (only layers with any)."""
        counts = {i: n for g in self.groups for i, n in zip(g.layers, g.nonfinite_per_layer())}
        return {l.site.name: int(counts[i]) for i, l in enumerate(self.layers) if counts[i]}

    # ------------------------------------------------------------------ hooks
    def _on_forward_start(self, module, args, kwargs):
        if self.paused:
            self._recording = False
            return
        step = self._step if self._step >= 0 else self._forwards
        self._recording = (step % self.options.every) == 0  # every N-th step (or forward)
        for l in self.layers:  # left over by a forward that raised: never part of this batch
            l.pending = []
        self._forwards += 1
        M = self.options.refresh_every
        if M and (self._last_refresh is None or step - self._last_refresh >= M):
            self._last_refresh = step
            self.refresh(step)
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        self._batch = None if first is None or first.dim() == 0 else int(first.shape[0])

    def _on_qk(self, i: int, q: Tensor, k: Tensor, info: Dict[str, Any]) -> None:
        if not self._recording:
            return
        if self._reduce_elsewhere(i, q, k, info):  # backend "triton", or "torch" over the C kernels
            return
        l = self.layers[i]
        with torch.no_grad():
            q, k = q.float(), k.float()
            a, b = l.coordinates(q, k)
            S = l.float_maps(q.device)[2]
            # the share uses the module's actual attention (after qk-norm / rope, its mask and bias)
            share = share_inputs(attention_terms(info, q, k), l.bases.scale) if self._attention else ShareInputs()
            # straight into the group's buffer (no copy at the end of the forward) where possible
            direct = l.heads is None and not l.pending
            st = mode_statistics(a, b, S, l.bases.scale, prefix_tokens=l.bases.prefix_tokens or 0,
                                 include_prefix=self.options.include_prefix, topk=self.options.topk,
                                 probs=share.probs, q=share.q, k=share.k, attn_bias=share.attn_bias,
                                 attention=self._attention,
                                 out=l.group.slot(l.slot, a.shape[0], a.device) if direct else None)
            if l.heads is not None:
                st = st.index_select(1, l.heads.to(st.device))
            l.pending.append(st)  # NaN/Inf from q or k are counted by the aggregates

    def _reduce_elsewhere(self, i: int, q: Tensor, k: Tensor, info: Dict[str, Any]) -> bool:
        """The one dispatch point of the statistics backends; False: the default path of _on_qk."""
        backend = self._backends.get(q.device)
        if backend is None:
            backend = self._backends[q.device] = resolve_backend(self.options.backend, q.device)
        if backend == "torch" and native.enabled():
            with native.disabled():
                self._on_qk(i, q, k, info)
            return True
        if backend != "triton":
            return False
        from ..reduce.triton_stats import mode_statistics_qk
        l = self.layers[i]
        with torch.no_grad():
            coord_q, coord_k, S, _ = l.float_maps(q.device)
            probs, bias = self._triton_share(info, q, k, l.bases.scale) if self._attention else (None, None)
            direct = l.heads is None and not l.pending
            st = mode_statistics_qk(q, k, coord_q, coord_k, S, l.bases.scale,
                                    prefix_tokens=l.bases.prefix_tokens or 0,
                                    include_prefix=self.options.include_prefix, topk=self.options.topk,
                                    probs=probs, attn_bias=bias, attention=self._attention,
                                    out=l.group.slot(l.slot, q.shape[0], q.device) if direct else None)
            if l.heads is not None:
                st = st.index_select(1, l.heads.to(st.device))
            l.pending.append(st)
        return True

    @staticmethod
    def _triton_share(info: Dict[str, Any], q: Tensor, k: Tensor, scale: float):
        """(probs, attn_bias) for the Triton share: the module's actual attention. Where the module
        multiplies the emitted q, k themselves, only its mask goes in (the kernel's online softmax);
        after qk-norm or rope, or with the module's own P, the probabilities are passed."""
        terms = attention_terms(info, q, k)
        if terms.probs is not None:
            return terms.probs, None
        same = terms.rotary is None and (terms.scale is None or float(terms.scale) == float(scale)) and all(
            t.data_ptr() == e.data_ptr() and t.shape == e.shape and t.stride() == e.stride()
            for t, e in ((terms.q, q), (terms.k, k)))
        if same:
            return None, share_inputs(terms, scale).attn_bias
        return real_probs(terms, scale), None

    def _on_forward_end(self, module, args, output):
        if not self._recording:
            return
        self._recording = False
        with torch.no_grad():
            self._finish_batch()

    def _finish_batch(self) -> None:
        if not any(l.pending for l in self.layers):
            return
        B = next(l.pending[0].shape[0] for l in self.layers if l.pending)
        if self._batch and B != self._batch and B % self._batch == 0:
            B = self._batch  # windowed attention sees B · windows rows
        prefix = f"rank{self.rank}:" if self.world > 1 else ""  # default ids stay unique across shards
        ids = self._ids if self._ids is not None else [f"{prefix}{self.samples + j}" for j in range(B)]
        labels, self._labels = self._labels, None
        self._ids = None
        if len(ids) != B:
            raise ValueError(f"set_ids gave {len(ids)} ids for a batch of {B} samples")
        if labels is not None and len(labels) != B:
            raise ValueError(f"set_ids gave {len(labels)} labels for a batch of {B} samples")
        rows: List[Any] = [None] * len(self.layers)
        snaps: List[Any] = [None] * len(self.layers)
        due = self._snapshot_due()
        ready = None  # CUDA: event of the asynchronous row copies of this batch
        for g in self.groups:
            layers = [self.layers[i] for i in g.layers]
            if g.filled(layers, B):
                st = g.buffer  # (L, B, H, R, S): written by the hooks
            else:  # several calls per forward, a head subset or windowed attention
                per_layer = []
                for l in layers:
                    st = torch.cat(l.pending) if len(l.pending) > 1 else l.pending[0]
                    if st.shape[0] != B and st.shape[0] % B == 0:  # windowed attention: fold windows per sample
                        st = _fold_windows(st, B)
                    per_layer.append(st)
                st = torch.stack(per_layer)
            for l in layers:
                l.pending = []
            index = range(self.samples, self.samples + B)  # known on the host: no device read in top-k
            batch_first = st.movedim(0, 1)  # (B, L, H, R, S), a view
            g.topk.update_columns(batch_first, STAT_INDEX["score_pos"], STAT_INDEX["score_neg"], index)
            stored = None if len(self.stat_names) == len(STAT_NAMES) else self._stat_cols.to(st.device)
            g.agg.update(batch_first, columns=stored)
            if self.writer is None:
                continue
            if self.options.per_sample:
                host, ready = self._rows_to_host(g, st, ready)
                for j, i in enumerate(g.layers):
                    rows[i] = host[j][..., self._row_cols]  # copied by writer.write
            if due:
                self._snapshot_group(g, snaps, covered=self.samples + B)
        self.samples += B
        if self.writer is not None:
            self._hand_off(dict(ids=ids, rows=rows if self.options.per_sample else None, steps=[self._step] * B,
                                snapshot=snaps if due else None, series=self._take_series(), labels=labels), ready)

    # ------------------------------------------------------------------ hand-off to the writer
    def _snapshot_due(self) -> bool:
        """Whether this batch carries a snapshot of top-k and aggregates (every snapshot_every_s)."""
        if self.writer is None:
            return False
        if not self._snapshot_rows_stored:  # a file from before snapshot_rows: a snapshot every batch, as made
            return True
        if time.monotonic() - self._last_snapshot < self.options.snapshot_every_s:
            return False
        self._last_snapshot = time.monotonic()
        return True

    def _rows_to_host(self, g: "_Group", st: Tensor, ready):
        """The rows (L, B, H, R, S) as a host array. CPU: a view (the writer copies it). CUDA: an
        asynchronous copy into a reused pinned buffer on a side stream; ``ready`` is the event the
        writer waits for. The group's device buffer is swapped for a spare so the next forward
        never overwrites rows still being copied."""
        if st.device.type != "cuda":
            return st.cpu().numpy(), ready
        main = torch.cuda.current_stream(st.device)
        if getattr(self, "_copy_stream", None) is None:
            self._copy_stream = torch.cuda.Stream(st.device)
        pinned = g.pinned
        if pinned is None or pinned[0].shape != st.shape:
            pinned = g.pinned = [torch.empty(st.shape, dtype=st.dtype, pin_memory=True) for _ in range(2)]
            g.turn = 0
        if self._in_flight is not None:  # its rows still sit in the other pinned buffer
            self._write_in_flight()
        buf = pinned[g.turn]
        g.turn ^= 1
        self._copy_stream.wait_stream(main)  # the statistics of this forward are written
        with torch.cuda.stream(self._copy_stream):
            buf.copy_(st, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        st.record_stream(self._copy_stream)  # its memory is not reused before the copy is done
        copied = g.copied  # device buffer → event of its last copy
        copied[st.data_ptr()] = ready
        if g.buffer is not None and st.data_ptr() == g.buffer.data_ptr():  # next forward: the spare buffer
            g.buffer, g.spare = g.spare, g.buffer
            if g.buffer is not None and g.buffer.data_ptr() in copied:
                main.wait_event(copied[g.buffer.data_ptr()])  # on the device only: no host wait
        return buf.numpy(), ready

    def _hand_off(self, batch: dict, ready) -> None:
        """To the writer now (CPU, or with a snapshot), else once the row copy is done (at the next
        batch or at close): the forward never waits for the device→host copy."""
        if self._in_flight is not None and (ready is None or batch["snapshot"] is not None):
            self._write_in_flight()
        if ready is None or batch["snapshot"] is not None:
            if ready is not None:
                ready.synchronize()
            self.writer.write(batch.pop("ids"), batch.pop("rows"), **batch)
            return
        self._in_flight = dict(batch, ready=ready)

    def _write_in_flight(self) -> None:
        batch, self._in_flight = self._in_flight, None
        batch.pop("ready").synchronize()
        self.writer.write(batch.pop("ids"), batch.pop("rows"), **batch)

    def _final_snapshot(self) -> None:
        """At close: the batch in flight, then the snapshot of the final state if the last one is older."""
        if self._in_flight is not None:
            self._write_in_flight()
        if self.writer is None:
            return
        snaps: List[Any] = [None] * len(self.layers)
        for g in self.groups:
            self._snapshot_group(g, snaps, covered=self.samples)
        self.writer.write([], self._empty_rows(), snapshot=snaps, series=self._take_series())

    def _snapshot_group(self, g: "_Group", snaps: List[Any], covered: int) -> None:
        """Fill ``snaps[i]`` for the group's layers: views of the live top-k and aggregates (the
        writer copies them before ``write`` returns), the non-finite count and the rows covered."""
        state = {f"topk_{k}": v for k, v in g.topk.state_dict(copy=False).items()}
        state.update({f"agg_{k}": v for k, v in g.agg.state_dict(copy=False).items()})
        nonfinite = g.nonfinite_per_layer()
        for j, i in enumerate(g.layers):
            snaps[i] = {name: v[j] for name, v in state.items()}
            snaps[i]["nonfinite_values"] = np.int64(nonfinite[j])
            if self._snapshot_rows_stored:
                snaps[i][SNAPSHOT_ROWS] = np.int64(covered)

    # ------------------------------------------------------------------ training
    def refresh(self, step: Optional[int] = None) -> None:
        """Recompute every layer's bases from the current weights and add a series point.

        A layer whose W_q or W_k holds NaN/Inf keeps its previous bases and is flagged
        (``nonfinite_weights``) in the series; training goes on.
        """
        step = (self._step if self._step >= 0 else self._forwards) if step is None else int(step)
        flags = []
        for l in self.layers:
            w = l.site.adapter.weights(l.site.module)
            ok = bool(torch.isfinite(w.W_q).all() and torch.isfinite(w.W_k).all())
            if ok:
                # the series stores S, cosines and drift: the sym spectra are not needed
                l.bases = layer_bases(l.site, self.model, n_prefix=self._n_prefix, spectra=False)
                l.maps = None
            flags.append(not ok)
        self._add_series_point(step, flags)

    def _add_series_point(self, step: int, nonfinite=None) -> None:
        from ..core.drift import principal_angles
        point: Dict[str, Any] = {"step": int(step), "layers": []}
        for i, (l, lb0) in enumerate(zip(self.layers, self._start_bases)):
            lb = l.bases
            summary = lb.layer_summary()
            point["layers"].append({
                "S": lb.S.float().numpy(), "cosine": lb.cosine.float().numpy(),
                "mean_cosine": summary["mean_cosine"], "weighted_cosine": summary["weighted_cosine"],
                "drift_q": principal_angles(lb0.U, lb.U)[:, -1].float().numpy(),
                "drift_k": principal_angles(lb0.V, lb.V)[:, -1].float().numpy(),
                "nonfinite_weights": bool(nonfinite[i]) if nonfinite else False})
        self.series.append(point)
        self._pending_series.append(point)
        if self.tensorboard is not None:
            for i, p in enumerate(point["layers"]):
                for key in ("mean_cosine", "weighted_cosine"):
                    self.tensorboard.add_scalar(f"qkprobe/{key}/L{i}", p[key], max(step, 0))
                self.tensorboard.add_scalar(f"qkprobe/drift_q/L{i}", float(np.nanmean(p["drift_q"])), max(step, 0))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush everything, close the file and remove every hook. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        self._capture.__exit__(None, None, None)
        if self.writer is not None:
            try:
                self._final_snapshot()
                if self._pending_series:
                    self.writer.write([], self._empty_rows(), series=self._take_series())
            finally:  # a writer that failed still closes its file
                self.writer.close()
            if self.world > 1:
                finish_shards(self.out, self.rank, self.world)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _declares_snapshot_rows(path, resume: bool) -> bool:
    """Whether the run file declares ``snapshot_rows``: new files do; a file resumed from before it
    existed (a snapshot with every batch) is continued as it was made."""
    import os
    if not (resume and os.path.exists(path)):
        return True
    from ..sinks.run_file import open_run
    try:
        with open_run(path) as run:
            return SNAPSHOT_ROWS in run.snapshot_names(0)
    except Exception:  # noqa: BLE001 - the writer's own checks report what is wrong with the file
        return True


def _fold_windows(st: Tensor, B: int) -> Tensor:
    """Windowed attention (Swin) gives (B·nW, H, R, S): reduce windows to one row per sample
    (means average, max/min/score statistics take the extreme; top-k means average)."""
    nW = st.shape[0] // B
    st = st.view(B, nW, *st.shape[1:])
    out = st.mean(1)
    for name in ("q_max", "k_max", "score_pos"):
        out[..., STAT_INDEX[name]] = st[..., STAT_INDEX[name]].amax(1)
    for name in ("q_min", "k_min"):
        out[..., STAT_INDEX[name]] = st[..., STAT_INDEX[name]].amin(1)
    out[..., STAT_INDEX["score_neg"]] = st[..., STAT_INDEX["score_neg"]].amax(1)
    return out


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
