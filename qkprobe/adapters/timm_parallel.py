"""timm ``ParallelScalingBlock`` (ViT-22B style: attention and MLP in parallel from one fused
``in_proj``). The block itself is the attention site.

Weights: ``in_proj`` packs [fc1 of the MLP; q; k; v] with the split sizes in ``in_split``; q and k
are the second and third blocks of rows (bias from ``in_proj.bias`` when ``qkv_bias``). The norm
feeding them is the block's own ``in_norm`` (for ``fold_ln``). Scale: ``module.scale``.

Capture: ``q_norm``/``k_norm`` are always called (Identity when qk-norm is off) on q, k viewed as
(B, N, heads, R) right after the projection; forward pre-hooks on them take q and k at no extra cost
and hand them on as (B, heads, N, R). ``attn_mask`` passed to the block is recorded in ``info``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

from .base import ATTN_MASK, QK_NORM, AttentionAdapter, QKWeights, builtin_adapter, no_grad_hook, split_heads


def _parallel_classes():
    try:
        from timm.models.vision_transformer import ParallelScalingBlock
    except ImportError:  # timm missing or too old
        return ()
    return (ParallelScalingBlock,)


def _qk_rows(module: nn.Module):
    """(W_q, W_k, b_q, b_k) from ``in_proj``, located by ``in_split`` = [mlp, dim, dim, dim]."""
    mlp, dim = module.in_split[0], module.in_split[1]
    W = module.in_proj.weight
    b = module.in_proj.bias
    q, k = slice(mlp, mlp + dim), slice(mlp + dim, mlp + 2 * dim)
    return W[q], W[k], (None if b is None else b[q]), (None if b is None else b[k])


@builtin_adapter
class TimmParallelBlockAdapter(AttentionAdapter):
    name = "timm_parallel"

    def matches(self, module: nn.Module) -> bool:
        classes = _parallel_classes()
        return bool(classes) and type(module) in classes

    def weights(self, module: nn.Module) -> QKWeights:
        H = module.num_heads
        W_q, W_k, b_q, b_k = _qk_rows(module)
        extras = frozenset({QK_NORM}) if not isinstance(module.q_norm, nn.Identity) else frozenset()
        return QKWeights(W_q=split_heads(W_q, H), W_k=split_heads(W_k, H),
                         b_q=None if b_q is None else b_q.reshape(H, -1),
                         b_k=None if b_k is None else b_k.reshape(H, -1),
                         scale=float(module.scale), extras=extras)

    def input_norm(self, module: nn.Module, parent: Optional[nn.Module],
                   ancestors: Sequence[nn.Module] = ()) -> Optional[nn.Module]:
        return getattr(module, "in_norm", None)

    def capture(self, module: nn.Module, emit) -> List[Any]:
        state: Dict[str, Any] = {}

        def on_module(mod, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            info: Dict[str, Any] = {}
            if mask is not None or kwargs.get("is_causal", False):
                info = {"attn_mask": mask, "extras": {ATTN_MASK}}
            state["info"] = info

        def on_q(mod, args):
            state["q"] = args[0].transpose(1, 2)  # (B, N, heads, R) → (B, heads, N, R)

        def on_k(mod, args):
            emit(state.pop("q"), args[0].transpose(1, 2), state.pop("info", {}))

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True),
                module.q_norm.register_forward_pre_hook(no_grad_hook(on_q)),
                module.k_norm.register_forward_pre_hook(no_grad_hook(on_k))]
