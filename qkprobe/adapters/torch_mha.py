"""``torch.nn.MultiheadAttention``: plain PyTorch, open_clip's ``ResidualAttentionBlock`` and
torchvision's ``vit_*`` (all use it).

Weights: ``in_proj_weight`` (3E, E) when q, k, v share the embedding width, else
``q_proj_weight`` (E, E) and ``k_proj_weight`` (E, kdim); ``in_proj_bias`` (3E) is always packed.
Nothing inside the module is hookable (``out_proj`` is used only through its weight) and the
native fast path skips Python code, so a forward pre-hook recomputes q = W_q x_q + b_q and
k = W_k x_k + b_k from the query and key inputs (sequence-first unless ``batch_first``).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn as nn

from .base import (ATTENTION, ATTN_MASK, AttentionAdapter, AttentionTerms, QKWeights, builtin_adapter, no_grad_hook,
                   project, split_heads)


def _qk_flat(m: nn.MultiheadAttention):
    E = m.embed_dim
    if m._qkv_same_embed_dim:
        W_q, W_k = m.in_proj_weight[:E], m.in_proj_weight[E:2 * E]
    else:
        W_q, W_k = m.q_proj_weight, m.k_proj_weight
    b = m.in_proj_bias
    return W_q, W_k, (None if b is None else b[:E]), (None if b is None else b[E:2 * E])


@builtin_adapter
class MultiheadAttentionAdapter(AttentionAdapter):
    name = "torch_mha"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def weights(self, module: nn.MultiheadAttention) -> QKWeights:
        H = module.num_heads
        W_q, W_k, b_q, b_k = _qk_flat(module)
        notes = ()
        if module.bias_k is not None:
            notes = ("add_bias_kv appends a learned key token whose logits are not decomposed",)
        return QKWeights(W_q=split_heads(W_q, H), W_k=split_heads(W_k, H),
                         b_q=None if b_q is None else b_q.reshape(H, -1),
                         b_k=None if b_k is None else b_k.reshape(H, -1),
                         scale=float(module.head_dim) ** -0.5, notes=notes)

    def capture(self, module: nn.MultiheadAttention, emit) -> List[Any]:
        H = module.num_heads

        def on_module(mod, args, kwargs):
            names = ("query", "key", "value")
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs.get(names[1], query)
            if query.dim() == 2:  # unbatched (N, E)
                query, key = query.unsqueeze(0), key.unsqueeze(0)
            elif not mod.batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            W_q, W_k, b_q, b_k = _qk_flat(mod)
            info = {}
            mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            pad = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
            causal = bool(kwargs.get("is_causal", args[7] if len(args) > 7 else False))
            if mask is not None or pad is not None or causal:
                info = {"attn_mask": mask, "key_padding_mask": pad, "extras": {ATTN_MASK}}
            q, k = project(query, W_q, b_q, H), project(key, W_k, b_k, H)
            # the module multiplies these q, k (no qk-norm); its masks in SDPA form
            info[ATTENTION] = AttentionTerms(q=q, k=k, mask=_sdpa_mask(mask, pad, *q.shape[:3], k.shape[2]),
                                             is_causal=causal and mask is None)
            emit(q, k, info)

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True)]


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """An MHA mask as additive floats: boolean True means *may not* attend (the opposite of SDPA)."""
    if mask.dtype != torch.bool:
        return mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, float("-inf"))


def _sdpa_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
               B: int, H: int, N: int, Nk: int) -> Optional[torch.Tensor]:
    """MHA's ``attn_mask`` ((N, Nk) or (B·H, N, Nk)) and ``key_padding_mask`` ((B, Nk)) as one
    additive mask broadcastable to (B, H, N, Nk)."""
    out = None
    if attn_mask is not None:
        out = _additive(attn_mask)
        if out.dim() == 3:
            out = out.reshape(B, H, N, Nk)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask).reshape(B, 1, 1, Nk)
        out = pad if out is None else out + pad
    return out
