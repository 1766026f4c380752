"""timm attention: ``layers.Attention`` (ViT, DeiT, registers, DINOv2, CLIP/SigLIP trunks),
``layers.AttentionRope``, ``models.eva.EvaAttention``, ``models.beit.Attention`` and
``models.swin_transformer.WindowAttention``.

Weights: a packed ``qkv`` Linear (rows [q; k; v], head h = rows h·R:(h+1)·R of each block), or
separate ``q_proj``/``k_proj``. Biases: ``qkv.bias``, or ``q_bias`` with a zero ``k_bias`` buffer
(EVA, BEiT), which these modules apply through ``F.linear`` — a hook on ``qkv`` never fires there.

Capture: where the module has ``q_norm``/``k_norm`` submodules (Identity when qk-norm is off, still
called), forward pre-hooks on them receive q and k as (B, H, N, R) right after the projection and
before qk-norm and rope, at no extra cost; their forward hooks receive the normed q and k, to which
the attention terms apply rope as the module does (prefix tokens untouched) when the share is
recorded. Otherwise (BEiT, Swin) a forward pre-hook on the module recomputes q and k from its
input; the terms then add the rel-pos bias and Swin's shift mask.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

from .base import (ATTENTION, ATTN_MASK, QK_NORM, REL_POS_BIAS, ROPE, AttentionAdapter, AttentionTerms, QKWeights,
                   builtin_adapter, no_grad_hook, project, split_heads)


def _timm_classes():
    try:
        from timm.layers.attention import Attention, AttentionRope
        from timm.models.beit import Attention as BeitAttention
        from timm.models.eva import EvaAttention
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # timm missing or too old: this family is simply unavailable
        return ()
    return Attention, AttentionRope, EvaAttention, BeitAttention, WindowAttention


def _packed_qk(module: nn.Module):
    """(W_q, W_k, b_q, b_k) as flat (H·R, D) / (H·R,) tensors, from whichever layout the module has."""
    if getattr(module, "qkv", None) is not None:
        W = module.qkv.weight
        A = W.shape[0] // 3
        W_q, W_k = W[:A], W[A:2 * A]
        if module.qkv.bias is not None:
            b_q, b_k = module.qkv.bias[:A], module.qkv.bias[A:2 * A]
        else:
            b_q = getattr(module, "q_bias", None)
            b_k = getattr(module, "k_bias", None)
        return W_q, W_k, b_q, b_k
    return module.q_proj.weight, module.k_proj.weight, module.q_proj.bias, module.k_proj.bias


def _expand_kv(t: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Grouped-query attention: head h uses key head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=dim)


@builtin_adapter
class TimmAttentionAdapter(AttentionAdapter):
    name = "timm"

    def matches(self, module: nn.Module) -> bool:
        classes = _timm_classes()
        return bool(classes) and type(module) in classes

    def _kinds(self, module):
        Attention, AttentionRope, EvaAttention, BeitAttention, WindowAttention = _timm_classes()
        return type(module), (AttentionRope, EvaAttention), (BeitAttention, WindowAttention)

    def weights(self, module: nn.Module) -> QKWeights:
        cls, rope_classes, relpos_classes = self._kinds(module)
        H = module.num_heads
        groups = getattr(module, "num_kv_groups", 1)
        W_q, W_k, b_q, b_k = _packed_qk(module)
        W_q = split_heads(W_q, H)
        W_k = _expand_kv(split_heads(W_k, H // groups), groups, 0)
        b_q = None if b_q is None else b_q.reshape(H, -1)
        b_k = None if b_k is None else _expand_kv(b_k.reshape(H // groups, -1), groups, 0)
        extras = set()
        if not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity):
            extras.add(QK_NORM)
        if cls in rope_classes:
            extras.add(ROPE)
        if cls in relpos_classes and getattr(module, "relative_position_bias_table", None) is not None:
            extras.add(REL_POS_BIAS)
        return QKWeights(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=float(module.scale),
                         extras=frozenset(extras))

    def model_extras(self, module: nn.Module, model: nn.Module, extras: frozenset) -> frozenset:
        """Refine static extras with what the whole model shows (rope off, shared rel-pos bias)."""
        extras = set(extras)
        if ROPE in extras and hasattr(model, "rope") and model.rope is None:
            extras.discard(ROPE)  # timm Eva built without rotary embeddings (e.g. EVA-01)
        if getattr(model, "rel_pos_bias", None) is not None and self._kinds(module)[0] in self._kinds(module)[2]:
            extras.add(REL_POS_BIAS)
        return frozenset(extras)

    def capture(self, module: nn.Module, emit) -> List[Any]:
        if hasattr(module, "q_norm") and hasattr(module, "k_norm"):
            return self._capture_norm_hooks(module, emit)
        return self._capture_recompute(module, emit)

    def _capture_norm_hooks(self, module, emit):
        H = module.num_heads
        groups = getattr(module, "num_kv_groups", 1)
        state: Dict[str, Any] = {}
        call = _call_binder(module)

        def on_module(mod, args, kwargs):
            bound = kwargs if len(args) <= 1 else call(args, kwargs)  # blocks pass x alone positionally
            info = {}
            rope = bound.get("rope")
            if rope is not None:
                info["rope"] = rope
                info["extras"] = {ROPE}
            mask = bound.get("attn_mask")
            if mask is not None:
                info["attn_mask"] = mask
                info.setdefault("extras", set()).add(ATTN_MASK)
            causal = bound.get("is_causal") is True
            # what the module multiplies: q, k after q_norm/k_norm (read by the norms' forward
            # hooks), rope applied on demand, its mask (is_causal takes precedence, as in timm)
            state["terms"] = AttentionTerms(mask=None if causal else mask, is_causal=causal,
                                            rotary=None if rope is None else _timm_rotary(mod, rope))
            state["info"] = info

        def on_q(mod, args):
            state["q"] = args[0]

        def on_q_normed(mod, args, out):
            state["q_attn"] = out

        def on_k(mod, args):
            state["k"] = args[0]

        def on_k_normed(mod, args, out):
            k, k_attn = state.pop("k"), out
            if k.dim() == 4 and k.shape[1] != H:
                k, k_attn = _expand_kv(k, groups, 1), _expand_kv(k_attn, groups, 1)
            info = state.pop("info", {})
            terms = state.pop("terms", None)
            if terms is not None:
                terms.q, terms.k = state.pop("q_attn", None), k_attn
                info[ATTENTION] = terms
            emit(state.pop("q"), k, info)

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True),
                module.q_norm.register_forward_pre_hook(no_grad_hook(on_q)),
                module.q_norm.register_forward_hook(no_grad_hook(on_q_normed)),
                module.k_norm.register_forward_pre_hook(no_grad_hook(on_k)),
                module.k_norm.register_forward_hook(no_grad_hook(on_k_normed))]

    def _capture_recompute(self, module, emit):
        H = module.num_heads

        def on_module(mod, args, kwargs):
            x = args[0] if args else kwargs["x"]
            W_q, W_k, b_q, b_k = _packed_qk(mod)
            info: Dict[str, Any] = {}
            bias = mod._get_rel_pos_bias() if getattr(mod, "relative_position_bias_table", None) is not None \
                else None
            shared = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 and
                                not isinstance(mod, _timm_classes()[4]) else None)
            if shared is not None:
                bias = shared if bias is None else bias + shared
            if bias is not None:
                info["rel_pos_bias"] = bias
                info["extras"] = {REL_POS_BIAS}
            mask = kwargs.get("mask", args[1] if len(args) > 1 and isinstance(mod, _timm_classes()[4]) else None)
            if mask is not None:
                info["attn_mask"] = mask  # Swin shift mask (nW, N, N), windows ordered batch-major
                info.setdefault("extras", set()).add(ATTN_MASK)
            q, k = project(x, W_q, b_q, H), project(x, W_k, b_k, H)
            # no qk-norm here: the module multiplies these q, k, then adds the bias and shift mask
            info[ATTENTION] = AttentionTerms(q=q, k=k, mask=bias, window_mask=mask)
            emit(q, k, info)

        return [module.register_forward_pre_hook(no_grad_hook(on_module), with_kwargs=True)]


def _call_binder(module: nn.Module) -> Callable[[tuple, dict], Dict[str, Any]]:
    """A function (args, kwargs) → the module forward's arguments by name (x, rope, attn_mask, ...)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        sig = None

    def bind(args, kwargs):
        if sig is None:
            return dict(kwargs)
        try:
            return dict(sig.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)
    return bind


def _timm_rotary(module: nn.Module, rope: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rope exactly as timm's EvaAttention / AttentionRope apply it: prefix tokens untouched."""
    from timm.layers import apply_rot_embed_cat
    npt = getattr(module, "num_prefix_tokens", 0) or 0
    half = getattr(module, "rotate_half", False)

    def rotary(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, R)
        rotated = apply_rot_embed_cat(x[:, :, npt:, :], rope.to(x.device), half=half)
        return torch.cat([x[:, :, :npt, :], rotated.to(x.dtype)], dim=2)
    return rotary
