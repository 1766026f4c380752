"""``mode_coordinates``: the per-mode coordinates of every token, from the module's own q and k.

For head h and mode r, with q, k captured inside the module (biases included, before qk-norm or
rope):

    a[b, h, i, r] = q_i · coord_q[h, :, r] = u_r · x_i + a_offset[h, r]
    b[b, h, j, r] = k_j · coord_k[h, :, r] = v_r · x'_j + b_offset[h, r]

and ``Σ_r S[h, r] a_ir b_jr = q_i · k_j`` exactly, so ``softmax_j(scale · Σ_r S a b)`` is the
module's attention wherever ``extras`` is empty. ``x`` is the module's input (after the block's
norm; with ``fold_ln=True`` bases, the normalized token before the norm's affine map).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence

import torch
import torch.nn as nn

from ..adapters.base import ATTENTION, AttentionTerms
from ..adapters.discover import AttentionSite, find_attention, prefix_tokens
from ..adapters.base import TOKEN_MASK
from ..bases import LayerBases, layer_bases
from ..errors import UsageError

Tensor = torch.Tensor


@dataclass
class ModeCoordinates:
    """Mode coordinates of one layer for one forward pass.

    a: (B, H, N, R) query-side coordinates; b: (B, H, Nk, R) key-side ones (batch-first; for
    windowed attention B counts windows). S: (H, R). ``info`` holds what the forward revealed
    (``rope``, ``attn_mask``, ``rel_pos_bias``), ``extras`` the static and run-time extras.
    ``token_mask``: (B, N) bool, True = real token, where the module got a padding mask (text
    batches); None when every token is real.
    """

    name: str
    a: Tensor
    b: Tensor
    S: Tensor
    scale: float
    prefix_tokens: Optional[int]
    extras: FrozenSet[str]
    info: Dict[str, Any] = field(default_factory=dict)
    token_mask: Optional[Tensor] = None

    def logits(self) -> Tensor:
        """(B, H, N, Nk) the bilinear logits scale · Σ_r S_r a_ir b_jr (= scale · q·k)."""
        S = self.S.to(self.a.dtype)
        return self.scale * torch.einsum("bhir,hr,bhjr->bhij", self.a, S, self.b)

    def probs(self) -> Tensor:
        """(B, H, N, Nk) softmax of :meth:`logits` (the module's attention when ``extras`` is empty)."""
        return self.logits().softmax(-1)

    def attention_probs(self) -> Tensor:
        """(B, H, N, Nk) the module's actual attention probabilities: its own, or from the q, k it
        multiplies (after qk-norm / rope) with its mask and bias, as the attention share uses them."""
        from .attention import attention_terms, real_probs
        calls = self.info.get("calls") or [self.info]
        if len(calls) == 1:
            S = self.S.to(self.a.dtype)
            return real_probs(attention_terms(calls[0], self.a * S.unsqueeze(-2), self.b), self.scale)
        if not all(isinstance(c.get(ATTENTION), AttentionTerms) for c in calls):
            raise UsageError(f"{self.name} was called {len(calls)} times and its adapter hands no attention "
                             f"terms; call attention_probs() on one forward per call")
        return torch.cat([real_probs(c[ATTENTION], self.scale) for c in calls])


def coordinates_from_qk(q: Tensor, k: Tensor, bases: LayerBases, dtype: torch.dtype = torch.float32):
    """a = q @ coord_q, b = k @ coord_k per head. q (B, H, N, R), k (B, H, Nk, R) → (B, H, ·, R)."""
    cq = bases.coord_q.to(device=q.device, dtype=dtype)
    ck = bases.coord_k.to(device=k.device, dtype=dtype)
    return per_head_matmul(q.to(dtype), cq), per_head_matmul(k.to(dtype), ck)


def per_head_matmul(x: Tensor, m: Tensor) -> Tensor:
    """x (B, H, N, R) @ m (H, R, M) per head, as one bmm over H with B·N rows each.

    For q, k sliced out of a fused qkv projection, (H, B·N, R) is a view (no copy) and the H
    products have B·N rows instead of N: about 2× faster on CPU than a (B·H)-batched matmul.
    The result is a (B, H, N, M) view of an (H, B, N, M) tensor.
    """
    B, H, N, R = x.shape
    out = torch.bmm(x.permute(1, 0, 2, 3).reshape(H, B * N, R), m)
    return out.view(H, B, N, m.shape[-1]).permute(1, 0, 2, 3)


def _merge_info(infos: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``info`` for several calls of a module: extras united; tensors of all calls
    concatenated along the batch axis where they have one, else the first call's (shared
    tables such as a rel-pos bias), and every call's dict kept in ``info["calls"]``."""
    if len(infos) == 1:
        return dict(infos[0])
    out: Dict[str, Any] = {"extras": set().union(*(i.get("extras", set()) for i in infos)), "calls": infos}
    for key in {k for i in infos for k in i} - {"extras"}:
        vals = [i.get(key) for i in infos]
        if all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals) and \
                len({v.shape[1:] for v in vals}) == 1 and any(v.shape[0] > 1 for v in vals):
            out[key] = torch.cat(vals)
        else:
            out[key] = vals[0]
    return out


@contextmanager
def capture_qk(sites: Sequence[AttentionSite], on_qk: Callable[[int, Tensor, Tensor, Dict[str, Any]], None]):
    """Hooks on every site calling ``on_qk(layer_index, q, k, info)`` (detached tensors) during
    forwards inside the ``with`` block; every hook is removed on exit, even after an error."""
    handles: List[Any] = []
    try:
        for i, site in enumerate(sites):
            def emit(q, k, info, i=i):
                on_qk(i, q.detach(), k.detach(), info)
            handles.extend(site.adapter.capture(site.module, emit))
        yield
    finally:
        for h in handles:
            h.remove()


def mode_coordinates(model: nn.Module, *args, bases: Optional[List[LayerBases]] = None,
                     dtype: torch.dtype = torch.float32, **kwargs) -> List[ModeCoordinates]:
    """Run one no-grad forward ``model(*args, **kwargs)`` and return the mode coordinates of
    every attention layer, aligned with ``bases`` (computed with ``compute_bases(model)`` when
    None). ``dtype``: precision of a and b (float32; float64 for references). A module called
    several times in one forward gets its calls concatenated along the batch axis.

    A tokenizer's output (a ``BatchEncoding`` or a plain dict, e.g. ``dict(enc)``) as the only
    positional argument is passed as keyword arguments: ``mode_coordinates(model, enc)`` is
    ``mode_coordinates(model, **enc)``.
    """
    if len(args) == 1 and isinstance(args[0], Mapping):
        args, kwargs = (), {**args[0], **kwargs}
    sites = find_attention(model)
    if bases is None:
        n_prefix = prefix_tokens(model)
        bases = [layer_bases(s, model, n_prefix=n_prefix, spectra=False) for s in sites]
    by_name = {b.name: b for b in bases}
    missing = [s.name for s in sites if s.name not in by_name]
    if missing:
        raise UsageError(f"bases do not cover the attention layer {missing[0]!r}; "
                         f"compute them with qkprobe.compute_bases(model) for this model")
    seen: Dict[int, List[tuple]] = {}

    def on_qk(i, q, k, info):
        seen.setdefault(i, []).append((q, k, info))

    with capture_qk(sites, on_qk), torch.no_grad():
        model(*args, **kwargs)

    out = []
    for i, site in enumerate(sites):
        if i not in seen:
            continue
        lb = by_name[site.name]
        calls = seen[i]
        parts = [coordinates_from_qk(q, k, lb, dtype) for q, k, _ in calls]
        a = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        b = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        info = _merge_info([c[2] for c in calls])
        tokens = info.pop(TOKEN_MASK, None)
        extras = set(lb.extras) | set(info.pop("extras", set()))
        out.append(ModeCoordinates(name=site.name, a=a, b=b, S=lb.S.to(dtype), scale=lb.scale,
                                   prefix_tokens=lb.prefix_tokens, extras=frozenset(extras), info=info,
                                   token_mask=tokens if isinstance(tokens, Tensor) else None))
    return out
