"""The module's actual attention for the attention-share statistics, from what its adapter saw.

An adapter hands :class:`qkprobe.adapters.base.AttentionTerms` in ``info["attention"]``: the
module's own probabilities, or the q, k it multiplies (after qk-norm / rope) with the mask and
bias it applied. A custom adapter that hands none is read from its ``info`` keys as before:
``rel_pos_bias`` and ``attn_mask`` (additive, or a boolean keep-mask as in
``F.scaled_dot_product_attention``) added to scale · q·kᵀ of the emitted q, k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..adapters.base import ATTENTION, AttentionTerms, add_masks, as_additive

Tensor = torch.Tensor


def attention_terms(info: Dict[str, Any], q: Tensor, k: Tensor) -> AttentionTerms:
    """The adapter's terms of one call, else terms made from the legacy ``info`` keys."""
    terms = info.get(ATTENTION)
    if isinstance(terms, AttentionTerms):
        return terms
    mask = None
    for key in ("rel_pos_bias", "attn_mask"):
        extra = info.get(key)
        if isinstance(extra, Tensor):
            mask = extra if mask is None else add_masks(mask, extra)
    return AttentionTerms(q=q, k=k, mask=mask, is_causal=bool(info.get("is_causal", False)))


@dataclass
class ShareInputs:
    """The attention arguments of :func:`qkprobe.core.stats.mode_statistics` for one call:
    ``probs`` (B, H, N, Nk), or ``q``, ``k`` (B, H, ·, R') and ``attn_bias`` (SDPA mask), all at
    the bases' logit scale."""

    probs: Optional[Tensor] = None
    q: Optional[Tensor] = None
    k: Optional[Tensor] = None
    attn_bias: Optional[Tensor] = None


def share_inputs(terms: AttentionTerms, scale: float) -> ShareInputs:
    """What ``mode_statistics`` needs to use the module's probabilities (``scale``: the bases')."""
    if terms.probs is not None:
        return ShareInputs(probs=terms.probs.float())
    q, k = terms.attended_qk()
    q, k = q.float(), k.float()
    if terms.scale is not None and float(terms.scale) != float(scale):
        q = q * (float(terms.scale) / float(scale))
    return ShareInputs(q=q, k=k, attn_bias=full_mask(terms, q.shape[0], q.shape[1], q.shape[-2], k.shape[-2],
                                                     q.device))


def full_mask(terms: AttentionTerms, B: int, H: int, N: int, Nk: int, device) -> Optional[Tensor]:
    """One SDPA mask broadcastable to (B, H, N, Nk) from ``mask``, ``window_mask`` and ``is_causal``."""
    mask = terms.mask
    if mask is not None:
        mask = mask.to(device)
        if mask.dtype != torch.bool:
            mask = mask.float()
    if terms.window_mask is not None:
        wm = terms.window_mask.to(device).float()  # (nW, N, Nk), windows batch-major in B
        nW = wm.shape[0]
        wm = wm.unsqueeze(1).expand(nW, H, N, Nk).repeat(B // nW, 1, 1, 1)  # (B, H, N, Nk)
        mask = wm if mask is None else add_masks(mask, wm)
    if terms.is_causal:
        causal = torch.ones(N, Nk, dtype=torch.bool, device=device).tril(Nk - N)
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool else
                                            add_masks(mask, causal))
    return mask


def real_probs(terms: AttentionTerms, scale: float) -> Tensor:
    """(B, H, N, Nk) the module's attention probabilities from its terms (materialized; for
    checks and small inputs)."""
    if terms.probs is not None:
        return terms.probs.float()
    inputs = share_inputs(terms, scale)
    logits = float(scale) * inputs.q @ inputs.k.transpose(-2, -1)
    if inputs.attn_bias is not None:
        logits = logits + as_additive(inputs.attn_bias)
    return logits.softmax(-1)
