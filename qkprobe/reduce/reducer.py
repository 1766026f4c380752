"""Where statistics are computed: a reducer turns one :class:`~qkprobe.capture.events.QKEvent`
into the layer's per-sample statistics (B, H, R, len(STAT_NAMES)), one reducer per backend.

- :class:`TorchReducer`: mode coordinates a = q @ coord_q, b = k @ coord_k, then
  :func:`qkprobe.core.stats.mode_statistics` (torch ops, or the compiled CPU kernels: ``native``);
- :class:`TritonReducer`: :func:`qkprobe.reduce.triton_stats.mode_statistics_qk`, which reads q and
  k once and applies the coordinate maps in the kernel.

Both use the module's actual attention for ``attn_contrib`` / ``attn_share`` (the event's
:class:`~qkprobe.adapters.base.AttentionTerms`). :func:`make_reducer` builds the one a backend
name (:func:`qkprobe.reduce.backend.resolve`) stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..bases import LayerBases
from ..capture.attention import ShareInputs, real_probs, share_inputs
from ..capture.coordinates import per_head_matmul
from ..capture.events import QKEvent
from ..core import native
from ..core.stats import mode_statistics

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
        return st if self.heads is None else st.index_select(1, self.heads.to(st.device))


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
        from .triton_stats import mode_statistics_qk
        o, lb = self.options, maps.bases
        q, k = event.q, event.k
        coord_q, coord_k, S, _ = maps.float_maps(q.device)
        probs, bias = self.share(event, lb.scale) if o.attention else (None, None)
        padding = {} if event.token_mask is None else {"token_mask": event.token_mask}
        return mode_statistics_qk(q, k, coord_q, coord_k, S, lb.scale, prefix_tokens=lb.prefix_tokens or 0,
                                  include_prefix=o.include_prefix, topk=o.topk, probs=probs, attn_bias=bias,
                                  attention=o.attention, out=out, **padding)

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
