"""torchvision Swin: ``ShiftedWindowAttention`` (Swin V1) and ``ShiftedWindowAttentionV2``.

Weights: a packed ``qkv`` Linear (rows [q; k; v]); V2 zeroes the key third of the bias inside its
forward, so its ``b_k`` is zero whatever the parameter holds. Scale: head_dim^-0.5 (V1).

Capture: the module calls the free function ``shifted_window_attention`` on its (B, H, W, C) input,
so nothing inside is hookable; a forward pre-hook pads, rolls and partitions the input into windows
as that function does and recomputes q, k (B·nW, heads, N, R), windows batch-major. ``info`` holds
``rel_pos_bias`` (1, heads, N, N) and, for shifted blocks, the shift mask ``attn_mask`` (nW, N, N)
with the library's -100 fill.

V2 uses scaled cosine attention: logits = exp(min(logit_scale, log 100))_h · cos(q_i, k_j) + bias,
not a bilinear form of the input; it is flagged ``cosine_attn`` and ``info["logit_scale"]`` holds the
per-head factor (heads,), so ``softmax(logit_scale · normalize(q)·normalize(k)ᵀ + bias + mask)``
reproduces the library.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (ATTN_MASK, COSINE_ATTN, REL_POS_BIAS, AttentionAdapter, QKWeights, builtin_adapter,
                   no_grad_hook, split_heads)


def _swin_classes():
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:  # torchvision missing or too old: this family is simply unavailable
        return ()
    return ShiftedWindowAttention, ShiftedWindowAttentionV2


def _is_v2(module: nn.Module) -> bool:
    classes = _swin_classes()
    return bool(classes) and isinstance(module, classes[1])


def _qk_flat(module: nn.Module):
    """(W_q, W_k, b_q, b_k) flat (C, C) / (C,), the key bias zeroed for V2 as its forward does."""
    W = module.qkv.weight
    C = W.shape[0] // 3
    b = module.qkv.bias
    b_q = None if b is None else b[:C]
    b_k = None if b is None else (torch.zeros_like(b[C:2 * C]) if _is_v2(module) else b[C:2 * C])
    return W[:C], W[C:2 * C], b_q, b_k


def windows(x: torch.Tensor, window_size, shift_size):
    """As ``shifted_window_attention``: x (B, H, W, C) → (windows (B·nW, N, C), pad_H, pad_W,
    effective shift, nW)."""
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift = list(shift_size)
    if window_size[0] >= pad_H:
        shift[0] = 0
    if window_size[1] >= pad_W:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nW = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * nW, window_size[0] * window_size[1], C)
    return x, pad_H, pad_W, shift, nW


def shift_mask(x: torch.Tensor, pad_H: int, pad_W: int, window_size, shift, nW: int) -> torch.Tensor:
    """The library's shift mask (nW, N, N): 0 within a region, -100 across regions."""
    m = x.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            m[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    m = m.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
    m = m.permute(0, 2, 1, 3).reshape(nW, window_size[0] * window_size[1])
    m = m.unsqueeze(1) - m.unsqueeze(2)
    return m.masked_fill(m != 0, float(-100.0)).masked_fill(m == 0, float(0.0))


@builtin_adapter
class TorchvisionSwinAdapter(AttentionAdapter):
    name = "torchvision_swin"

    def matches(self, module: nn.Module) -> bool:
        classes = _swin_classes()
        return bool(classes) and type(module) in classes

    def weights(self, module: nn.Module) -> QKWeights:
        H = module.num_heads
        W_q, W_k, b_q, b_k = _qk_flat(module)
        extras = {REL_POS_BIAS}
        notes = ()
        if _is_v2(module):
            extras.add(COSINE_ATTN)
            notes = ("Swin V2 scaled cosine attention: logits are exp(logit_scale)·cos(q, k) + bias, not the "
                     "bilinear form; modes describe the projections only",)
        return QKWeights(W_q=split_heads(W_q, H), W_k=split_heads(W_k, H),
                         b_q=None if b_q is None else b_q.reshape(H, -1),
                         b_k=None if b_k is None else b_k.reshape(H, -1),
                         scale=float(W_q.shape[0] // H) ** -0.5, extras=frozenset(extras), notes=notes)

    def capture(self, module: nn.Module, emit) -> List[Any]:
        H = module.num_heads

        def on_module(mod, args, kwargs):
            x = args[0] if args else kwargs["x"]
            xw, pad_H, pad_W, shift, nW = windows(x, mod.window_size, mod.shift_size)
            W_q, W_k, b_q, b_k = _qk_flat(mod)
            q = F.linear(xw, W_q.to(xw.dtype), None if b_q is None else b_q.to(xw.dtype))
            k = F.linear(xw, W_k.to(xw.dtype), None if b_k is None else b_k.to(xw.dtype))
            Bw, N, C = xw.shape
            q = q.view(Bw, N, H, C // H).transpose(1, 2)  # (B·nW, heads, N, R)
            k = k.view(Bw, N, H, C // H).transpose(1, 2)
            info: Dict[str, Any] = {"rel_pos_bias": mod.get_relative_position_bias(), "extras": {REL_POS_BIAS}}
            if sum(shift) > 0:
                info["attn_mask"] = shift_mask(xw, pad_H, pad_W, mod.window_size, shift, nW)
                info["extras"].add(ATTN_MASK)
            if _is_v2(mod):
                info["logit_scale"] = torch.clamp(mod.logit_scale, max=math.log(100.0)).exp().reshape(H)
                info["extras"].add(COSINE_ATTN)
            emit(q, k, info)

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True)]
