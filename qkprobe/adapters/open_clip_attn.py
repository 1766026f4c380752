"""open_clip's own ``transformer.Attention`` (in ``CustomResidualAttentionBlock``: qk-norm, scaled
cosine attention, head scaling), not ``nn.MultiheadAttention``.

Weights: ``in_proj_weight`` (3·dim, dim) packs [q; k; v], ``in_proj_bias`` likewise. Scale:
``module.scale``. ``qk_norm`` (``ln_q``/``ln_k`` LayerNorms) is flagged ``qk_norm``; scaled cosine
attention (``logit_scale``: logits exp(min(logit_scale, logit_scale_max))_h · cos(q, k)) is flagged
``cosine_attn`` with the per-head factor in ``info["logit_scale"]``; ``head_scale`` multiplies each
head's output after attention (probabilities unchanged) and is noted.

Capture: where the module runs its dot-product path, ``ln_q``/``ln_k`` (Identity when qk-norm is off)
are called on q, k (B, heads, L, R) right after the projection; forward pre-hooks on them take q and k
at no extra cost. The cosine path skips them, so a forward pre-hook recomputes q and k from the input.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from .base import (ATTN_MASK, COSINE_ATTN, QK_NORM, AttentionAdapter, QKWeights, builtin_adapter,
                   no_grad_hook, project, split_heads)


def _open_clip_classes():
    try:
        from open_clip.transformer import Attention
    except ImportError:  # open_clip missing
        return ()
    return (Attention,)


def _qk_flat(module: nn.Module):
    W, b = module.in_proj_weight, module.in_proj_bias
    C = W.shape[0] // 3
    return W[:C], W[C:2 * C], (None if b is None else b[:C]), (None if b is None else b[C:2 * C])


def _mask_info(args, kwargs) -> Dict[str, Any]:
    mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
    return {} if mask is None else {"attn_mask": mask, "extras": {ATTN_MASK}}


@builtin_adapter
class OpenClipAttentionAdapter(AttentionAdapter):
    name = "open_clip"

    def matches(self, module: nn.Module) -> bool:
        classes = _open_clip_classes()
        return bool(classes) and type(module) in classes

    def weights(self, module: nn.Module) -> QKWeights:
        H = module.num_heads
        W_q, W_k, b_q, b_k = _qk_flat(module)
        extras, notes = set(), []
        if not isinstance(module.ln_q, nn.Identity):
            extras.add(QK_NORM)
        if getattr(module, "logit_scale", None) is not None:
            extras.add(COSINE_ATTN)
            notes.append("scaled cosine attention: logits are exp(logit_scale)·cos(q, k), not the bilinear form; "
                         "modes describe the projections only")
        if getattr(module, "head_scale", None) is not None:
            notes.append("head_scale multiplies each head's output after attention (probabilities unchanged)")
        return QKWeights(W_q=split_heads(W_q, H), W_k=split_heads(W_k, H),
                         b_q=None if b_q is None else b_q.reshape(H, -1),
                         b_k=None if b_k is None else b_k.reshape(H, -1),
                         scale=float(module.scale), extras=frozenset(extras), notes=tuple(notes))

    def capture(self, module: nn.Module, emit) -> List[Any]:
        H = module.num_heads
        if getattr(module, "logit_scale", None) is not None:
            def on_cosine(mod, args, kwargs):
                x = args[0] if args else kwargs["x"]
                W_q, W_k, b_q, b_k = _qk_flat(mod)
                info = _mask_info(args, kwargs)
                info.setdefault("extras", set()).add(COSINE_ATTN)
                info["logit_scale"] = torch.clamp(mod.logit_scale, max=mod.logit_scale_max).exp().reshape(H)
                emit(project(x, W_q, b_q, H), project(x, W_k, b_k, H), info)

            return [module.register_forward_pre_hook(no_grad_hook(on_cosine), with_kwargs=True)]

        state: Dict[str, Any] = {}

        def on_module(mod, args, kwargs):
            state["info"] = _mask_info(args, kwargs)

        def on_q(mod, args):
            state["q"] = args[0]

        def on_k(mod, args):
            emit(state.pop("q"), args[0], state.pop("info", {}))

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True),
                module.ln_q.register_forward_pre_hook(no_grad_hook(on_q)),
                module.ln_k.register_forward_pre_hook(no_grad_hook(on_k))]
