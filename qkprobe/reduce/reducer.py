"""Where statistics are computed: a reducer turns one :class:`~qkprobe.capture.events.QKEvent`
into the layer's per-sample statistics (B, H, R, len(STAT_NAMES)), one reducer per backend.

- :class:`TorchReducer`: mode coordinates a = q @ coord_q, b = k @ coord_k, then
  :func:`qkprobe.core.stats.mode_statistics` (torch ops, or the compiled CPU kernels: ``native``);
- :class:`TritonReducer`: :func:`qkprobe.reduce.triton_stats.mode_statistics_qk`, which reads q and
  k once and applies the coordinate maps in the kernel.

Both use the module's actual attention for ``attn_contrib`` / ``attn_share`` (the event's
:class:`~qkprobe.adapters.base.AttentionTerms`). :func:`make_reducer` builds the one a backend
name (:func:`qkprobe.reduce.backend.resolve`) stands for; :func:`reducer_for` the one a probe
uses, where ``auto`` falls back to the torch path (:class:`FallbackReducer`, one warning per probe)
when the fast backend cannot run or fails.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..bases import LayerBases
from ..capture.attention import ShareInputs, real_probs, share_inputs
from ..capture.coordinates import per_head_matmul
from ..capture.events import QKEvent
from ..core import native
from ..core.stats import mode_statistics
from ..errors import BackendError, QKProbeError
from . import backend

Tensor = torch.Tensor


@dataclass
class ReduceOptions:
    """What every reducer computes: ``topk`` of the top-k-mean statistics, whether prefix tokens
    (cls, registers) are in the maps, and whether the attention-share statistics are wanted."""

    topk: int = 5
    include_prefix: bool = False
    attention: bool = False


class LayerMaps:
    """One recorded layer's bases, its recorded heads (None: all) and the coordinate maps as
    float32 on the device of the last event (cached until :meth:`set_bases`)."""

    def __init__(self, bases: LayerBases, heads: Optional[Tensor] = None):
        self.heads = heads
        self._heads_on: Optional[Tensor] = heads  # the heads on the statistics' device (no copy per call)
        self.set_bases(bases)

    def set_bases(self, bases: LayerBases) -> None:
        self.bases = bases
        self._cache: Optional[tuple] = None

    def float_maps(self, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(coord_q (H, Dh, R), coord_k (H, Dh, R), S (H, R), [coord_q; coord_k] (2H, Dh, R))."""
        if self._cache is None or self._cache[0].device != torch.device(device):
            b = self.bases
            maps = tuple(t.detach().to(device, torch.float32) for t in (b.coord_q, b.coord_k, b.S))
            self._cache = (*maps, torch.cat(maps[:2]))
        return self._cache

    def coordinates(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """a = q @ coord_q (B, H, N, R), b = k @ coord_k (B, H, Nk, R) per head (float32 q, k).

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

    def select_heads(self, st: Tensor) -> Tensor:
        """(B, H, R, S) of every head → the recorded heads'."""
        if self.heads is None:
            return st
        if self._heads_on.device != st.device:  # once: a host→device copy per call would sync the device
            self._heads_on = self.heads.to(st.device)
        return st.index_select(1, self._heads_on)


class TorchReducer:
    """Statistics by torch ops (``native=False``) or the compiled CPU kernels where they apply."""

    def __init__(self, options: ReduceOptions, native: bool = True):
        self.options = options
        self.native = native
        self.name = "native" if native else "torch"

    def __call__(self, event: QKEvent, maps: LayerMaps, out: Optional[Tensor] = None) -> Tensor:
        """(B, H, R, len(STAT_NAMES)) of every head, written into ``out`` where given."""
        if not self.native and native.enabled():
            with native.disabled():
                return self._reduce(event, maps, out)
        return self._reduce(event, maps, out)

    def _reduce(self, event: QKEvent, maps: LayerMaps, out: Optional[Tensor]) -> Tensor:
        o, lb = self.options, maps.bases
        q, k = event.q.float(), event.k.float()
        a, b = maps.coordinates(q, k)
        S = maps.float_maps(q.device)[2]
        # the share uses the module's actual attention (after qk-norm / rope, its mask and bias)
        share = share_inputs(event.attention, lb.scale) if o.attention else ShareInputs()
        return mode_statistics(a, b, S, lb.scale, prefix_tokens=lb.prefix_tokens or 0,
                               include_prefix=o.include_prefix, topk=o.topk, probs=share.probs, q=share.q,
                               k=share.k, attn_bias=share.attn_bias, attention=o.attention, out=out,
                               token_mask=event.token_mask)


class TritonReducer:
    """Statistics by the Triton kernels (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(self, options: ReduceOptions):
        self.options = options

    def __call__(self, event: QKEvent, maps: LayerMaps, out: Optional[Tensor] = None) -> Tensor:
        """As :class:`TorchReducer`, launched on the tensors' own device. Raises BackendError for
        what the kernels do not take (float64, topk past their lists) and where they fail to
        compile or launch (the cause chained)."""
        from . import triton_stats
        unsupported = self.unsupported(event, maps)
        if unsupported:
            raise BackendError(f"reduce: {unsupported}; choose backend 'torch' (or 'auto', which falls back to it).")
        try:
            with on_device(event.q.device):  # a model on cuda:1 launches there, whatever the current device
                return self._launch(triton_stats.mode_statistics_qk, event, maps, out)
        except (QKProbeError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - compile errors, out of shared memory, no C compiler, ...
            raise BackendError(f"reduce: the Triton kernels failed ({type(exc).__name__}: {_first_line(exc)}); "
                               f"choose backend 'torch' (or 'auto', which falls back to it).") from exc

    def unsupported(self, event: QKEvent, maps: LayerMaps) -> Optional[str]:
        """Why the kernels do not take this call, or None (the kernels' own rule)."""
        from .triton_stats import unsupported
        prefix = 0 if self.options.include_prefix else (maps.bases.prefix_tokens or 0)
        return unsupported(event.q, event.k, self.options.topk, prefix)

    def _launch(self, mode_statistics_qk, event: QKEvent, maps: LayerMaps, out: Optional[Tensor]) -> Tensor:
        o, lb = self.options, maps.bases
        q, k = event.q, event.k
        coord_q, coord_k, S, _ = maps.float_maps(q.device)
        probs, bias = self.share(event, lb.scale) if o.attention else (None, None)
        return mode_statistics_qk(q, k, coord_q, coord_k, S, lb.scale, prefix_tokens=lb.prefix_tokens or 0,
                                  include_prefix=o.include_prefix, topk=o.topk, probs=probs, attn_bias=bias,
                                  attention=o.attention, out=out, token_mask=event.token_mask)

    @staticmethod
    def share(event: QKEvent, scale: float) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(probs, attn_bias) for the kernel's share: the module's actual attention. Where the
        module multiplies the emitted q, k themselves, only its mask goes in (the kernel's online
        softmax); after qk-norm or rope, or with the module's own P, the probabilities go in."""
        terms, q, k = event.attention, event.q, event.k
        if terms.probs is not None:
            return terms.probs, None
        same = terms.rotary is None and (terms.scale is None or float(terms.scale) == float(scale)) and all(
            t.data_ptr() == e.data_ptr() and t.shape == e.shape and t.stride() == e.stride()
            for t, e in ((terms.q, q), (terms.k, k)))
        if same:
            return None, share_inputs(terms, scale).attn_bias
        return real_probs(terms, scale), None


def make_reducer(backend: str, options: ReduceOptions):
    """The reducer of a resolved backend name (``torch``, ``native`` or ``triton``)."""
    if backend == "triton":
        return TritonReducer(options)
    return TorchReducer(options, native=backend == "native")


def on_device(device: torch.device):
    """Kernel launches on ``device``: CUDA tensors' own device made the current one (Triton launches
    on the current device), nothing to do for others."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Fallback:
    """One probe's move from ``auto``'s fast backend to the torch path: said by one warning, and
    once it happened (a fast reducer failed) every :class:`FallbackReducer` of the probe takes the
    torch path directly."""

    def __init__(self):
        self.said = False
        self.failed = False

    def warn(self, reason: str) -> None:
        if not self.said:
            self.said = True
            warnings.warn(f"qkprobe: backend 'auto' computes the statistics by the torch path: {reason}.",
                          RuntimeWarning, stacklevel=2)


class FallbackReducer:
    """``auto``'s fast reducer (``triton`` or ``native``) until a call of it fails where the torch
    path succeeds; then the torch path, for that call and every later one."""

    def __init__(self, fast, fallback: Fallback, options: ReduceOptions):
        self.fast, self.fallback = fast, fallback
        self.torch = make_reducer("torch", options)

    @property
    def name(self) -> str:
        return self.torch.name if self.fallback.failed else self.fast.name

    def __call__(self, event: QKEvent, maps: LayerMaps, out: Optional[Tensor] = None) -> Tensor:
        if self.fallback.failed:
            return self.torch(event, maps, out)
        check = getattr(self.fast, "unsupported", None)
        unsupported = check(event, maps) if check is not None else None
        if unsupported:
            return self._fall_back(event, maps, out, unsupported)
        try:
            return self.fast(event, maps, out)
        except Exception as exc:  # noqa: BLE001 - whatever the fast path raised
            cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ is not None else exc
            return self._fall_back(event, maps, out, f"backend {self.fast.name!r} failed "
                                                     f"({type(cause).__name__}: {_first_line(cause)})")

    def _fall_back(self, event: QKEvent, maps: LayerMaps, out: Optional[Tensor], reason: str) -> Tensor:
        st = self.torch(event, maps, out)  # raises the user's own error where the torch path fails too
        self.fallback.failed = True
        self.fallback.warn(reason)
        return st


def reducer_for(name: str, device, options: ReduceOptions, fallback: Optional[Fallback] = None):
    """The reducer a probe uses for tensors on ``device``: ``name`` resolved
    (:func:`qkprobe.reduce.backend.choose`); under ``auto`` a fast backend falls back to the torch
    path (:class:`FallbackReducer`), and one that cannot run here is said by ``fallback``'s warning.
    A forced backend runs as chosen and raises where it cannot."""
    fallback = fallback or Fallback()
    choice = backend.choose(name, device)
    if choice.missed:
        fallback.warn(choice.missed)
    reducer = make_reducer(choice.name, options)
    if name == "auto" and choice.name != "torch":
        return FallbackReducer(reducer, fallback, options)
    return reducer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
