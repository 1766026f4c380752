"""Hugging Face transformers attention with separate q/k projections.

Matched by class and attributes, for any class defined in ``transformers``: direct ``nn.Linear``
children ``q_proj``/``k_proj`` (v5 ViT, DeiT, Dinov2(+registers), ViTMAE, CLIP, SigLIP, BEiT,
Swin, DINOv3, most decoders) or ``query``/``key`` (BERT-style encoders, VideoMAE, YOLOS,
Data2VecVision), plus a head count (``num_heads``, ``num_attention_heads`` or
``config.num_attention_heads``). Outer wrappers such as ``BertAttention`` hold no q/k Linear
themselves and are not matched; their inner module is.

Weights: head h = rows h·R:(h+1)·R of each projection, R = ``head_dim`` /
``attention_head_size`` (else width // heads); scale = ``scaling`` / ``scale``, else R^-0.5.
Grouped-query key heads are expanded (head h uses key head h // groups).

Capture: forward hooks on the q and k Linear children give (B, N, H·R) with bias, before rope
or qk-norm, under every attention implementation (eager, sdpa, ...). A forward pre-hook on the
module resets the state and binds its arguments (``attention_mask``, ``position_embeddings``,
``relative_position_bias``); a forward hook on a ``relative_position_bias`` child (Swin,
Data2VecVision) reads the bias; forward hooks on ``q_norm``/``k_norm`` children read the
normalized q, k the module multiplies (over the full width as in InternViT, or per head as in
Qwen3 and Gemma 3), for the attention share; the module's forward hook emits. With a KV cache, k
holds only the new tokens. ``info`` then holds:

- ``attn_mask``: the ``attention_mask`` exactly as the module received it — an additive float
  mask (eager) or a boolean keep-mask (sdpa), (B, 1, N, Nk); Swin's shift mask is (nW, N, N)
  with windows ordered batch-major in the (B·nW) batch axis;
- ``rel_pos_bias``: (1 or B, H, N, Nk) — Swin's/Data2Vec's table lookup plus any shared bias;
  for BEiT the ``attention_mask`` argument itself, which is where ``BeitLayer`` passes it;
- ``rope``: the ``position_embeddings`` argument, (cos, sin) each (Npatch, R) for DINOv3
  (applied to the trailing Npatch tokens only, ``rotate_half`` layout);
- ``is_causal``: True when the module was asked for a causal mask;
- ``token_mask`` (:data:`TOKEN_MASK`): (B, N) bool, True = real token, for self-attention given a
  padding mask (B or 1, ·, ·, N): a key is real where some query may attend to it (BERT's padding
  mask, additive under eager, boolean under sdpa). Absent without a mask; the reducers leave the
  padded positions out of every statistic.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .base import (ATTENTION, ATTN_MASK, QK_NORM, REL_POS_BIAS, ROPE, TOKEN_MASK, AttentionAdapter, AttentionTerms,
                   QKWeights, add_masks, builtin_adapter, first_norm_before, is_norm, no_grad_hook, split_heads)

_QK_NAMES = (("q_proj", "k_proj"), ("query", "key"))
_QK_NORM_NAMES = (("q_norm", "k_norm"), ("query_norm", "key_norm"))
# Parent attributes that hold the norm feeding attention in pre-norm layers (registration order
# is no guide: ViTLayer and CLIPEncoderLayer register their attention before that norm).
_PRE_NORM_NAMES = ("layernorm_before", "norm1", "layer_norm1", "input_layernorm", "ln_1")


def _int_attr(obj, *names) -> Optional[int]:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _qk_linears(module: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear]]:
    for qn, kn in _QK_NAMES:
        q, k = module._modules.get(qn), module._modules.get(kn)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


def _layout(module: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear, int, int, int]]:
    """(q Linear, k Linear, H, Hkv, R), or None when the module is not a q/k attention."""
    qk = _qk_linears(module)
    if qk is None:
        return None
    H = _int_attr(module, "num_heads", "num_attention_heads")
    if H is None:
        H = _int_attr(getattr(module, "config", None), "num_attention_heads")
    if not H:
        return None
    q, k = qk
    R = _int_attr(module, "head_dim", "attention_head_size") or q.out_features // H
    if R <= 0 or q.out_features != H * R or k.out_features % R:
        return None
    Hkv = k.out_features // R
    if Hkv == 0 or H % Hkv:
        return None
    return q, k, H, Hkv, R


def _scale(module: nn.Module, head_dim: int) -> float:
    for n in ("scaling", "scale"):
        v = getattr(module, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return float(head_dim) ** -0.5


def _config_flag(module: nn.Module, *names) -> bool:
    cfg = getattr(module, "config", None)
    return any(bool(getattr(cfg, n, False)) for n in names)


def _forward_params(module: nn.Module) -> Sequence[str]:
    try:
        return tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return ()


def _bind(sig: Optional[inspect.Signature], args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The forward's arguments by name, with those caught by ``**kwargs`` flattened in."""
    if sig is None:
        return dict(kwargs)
    try:
        bound = dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return bound


def _to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., N, H·R) → (B, H, N, R), leading axes flattened into B."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


@builtin_adapter
class HFAttentionAdapter(AttentionAdapter):
    name = "hf"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__module__.startswith("transformers.") and _layout(module) is not None

    def _rel_bias_via_mask(self, module: nn.Module) -> bool:
        """BEiT: the layer adds its relative-position bias into the ``attention_mask`` argument."""
        return _config_flag(module, "use_relative_position_bias", "use_shared_relative_position_bias") \
            and not isinstance(module._modules.get("relative_position_bias"), nn.Module)

    def weights(self, module: nn.Module) -> QKWeights:
        q, k, H, Hkv, R = _layout(module)
        groups = H // Hkv
        W_k = split_heads(k.weight, Hkv).repeat_interleave(groups, dim=0)
        b_k = None if k.bias is None else k.bias.reshape(Hkv, R).repeat_interleave(groups, dim=0)
        extras, notes = set(), []
        if any(not isinstance(module._modules.get(n, nn.Identity()), nn.Identity)
               for pair in _QK_NORM_NAMES for n in pair):
            extras.add(QK_NORM)
        if "position_embeddings" in _forward_params(module):
            extras.add(ROPE)
        rel_child = isinstance(module._modules.get("relative_position_bias"), nn.Module)
        if rel_child or self._rel_bias_via_mask(module):
            extras.add(REL_POS_BIAS)
        if getattr(module, "is_causal", False) is True:
            extras.add(ATTN_MASK)
        if getattr(getattr(module, "config", None), "attn_logit_softcapping", None):
            notes.append("logits are tanh soft-capped by the model; the modes describe them before capping")
        return QKWeights(W_q=split_heads(q.weight, H), W_k=W_k,
                         b_q=None if q.bias is None else q.bias.reshape(H, R), b_k=b_k,
                         scale=_scale(module, R), extras=frozenset(extras), notes=tuple(notes))

    def capture(self, module: nn.Module, emit) -> List[Any]:
        q_lin, k_lin, H, Hkv, R = _layout(module)
        groups = H // Hkv
        bias_in_mask = self._rel_bias_via_mask(module)
        static = self.weights(module).extras
        # rope as the module applies it: its own module's apply_rotary_pos_emb(q, k, cos, sin)
        rotary = getattr(inspect.getmodule(type(module)), "apply_rotary_pos_emb", None) if ROPE in static else None
        state: Dict[str, Any] = {}
        try:
            sig = inspect.signature(module.forward)
        except (TypeError, ValueError):
            sig = None

        def on_enter(mod, args, kwargs):
            state.clear()
            state["args"] = _bind(sig, args, kwargs)

        def on_q(mod, args, out):
            state["q"] = out

        def on_k(mod, args, out):
            state["k"] = out

        def on_rel_bias(mod, args, out):
            state["rel_pos_bias"] = out

        def on_norm(key):
            def hook(mod, args, out):
                state[key] = (args[0] if args else None, out)
            return hook

        def on_exit(mod, args, kwargs, out):
            if "q" not in state or "k" not in state:
                state.clear()
                return
            call = state.get("args", {})
            info: Dict[str, Any] = {}
            extras = set()
            mask = call.get("attention_mask")
            bias = state.get("rel_pos_bias")
            shared = call.get("relative_position_bias")
            if isinstance(shared, torch.Tensor):
                bias = shared if bias is None else bias + shared
            if bias_in_mask and isinstance(mask, torch.Tensor):
                bias = mask if bias is None else bias + mask
                mask = None
            if bias is not None:
                info["rel_pos_bias"] = bias
                extras.add(REL_POS_BIAS)
            if isinstance(mask, torch.Tensor):
                info["attn_mask"] = mask
                extras.add(ATTN_MASK)
                tokens = token_mask(mask, state["q"].shape[0] if state["q"].dim() == 3 else -1,
                                    state["q"].shape[-2], state["k"].shape[-2])
                if tokens is not None:
                    info[TOKEN_MASK] = tokens
            if call.get("is_causal") is True:
                info["is_causal"] = True
                extras.add(ATTN_MASK)
            rope = call.get("position_embeddings")
            if rope is not None:
                info["rope"] = rope
                extras.add(ROPE)
            if extras:
                info["extras"] = extras
            q, k = _to_heads(state.pop("q"), H), _to_heads(state.pop("k"), Hkv)
            # after qk-norm: the normalized q, k as the module multiplies them (before its rope)
            qn, kn = _normed_heads(state.get("q_norm"), H), _normed_heads(state.get("k_norm"), Hkv)
            state.clear()
            k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
            normed = qn is not None and kn is not None and qn.shape == q.shape and kn.shape[:2] == (q.shape[0], Hkv)
            if normed:
                kn = kn.repeat_interleave(groups, dim=1) if groups > 1 else kn
            exact = (QK_NORM not in static or normed) and (ROPE not in static or bool(rotary))
            terms = _hf_terms(out, qn if normed else q, kn if normed else k, info, exact_qk=exact,
                              rotary=_hf_rotary(rotary, info.get("rope")) if rotary else None,
                              causal=getattr(mod, "is_causal", False) is True)
            if terms is not None:
                info[ATTENTION] = terms
            emit(q, k, info)

        handles = [module.register_forward_pre_hook(no_grad_hook(on_enter), with_kwargs=True),
                   q_lin.register_forward_hook(no_grad_hook(on_q)),
                   k_lin.register_forward_hook(no_grad_hook(on_k))]
        rel = module._modules.get("relative_position_bias")
        if isinstance(rel, nn.Module):
            handles.append(rel.register_forward_hook(no_grad_hook(on_rel_bias)))
        for names in _QK_NORM_NAMES:
            norms = [module._modules.get(n) for n in names]
            if all(isinstance(n, nn.Module) and not isinstance(n, nn.Identity) for n in norms):
                handles += [n.register_forward_hook(no_grad_hook(on_norm(key)))
                            for n, key in zip(norms, ("q_norm", "k_norm"))]
        handles.append(module.register_forward_hook(no_grad_hook(on_exit), with_kwargs=True))
        return handles

    def input_norm(self, module: nn.Module, parent: Optional[nn.Module],
                   ancestors: Sequence[nn.Module] = ()) -> Optional[nn.Module]:
        """The pre-norm of the layer: a known attribute of the parent (``layernorm_before``,
        ``norm1``, ``layer_norm1``, ...), else the first norm registered before the module. When
        the parent is a wrapper without norms (``VideoMAEAttention``), ``ancestors`` (nearest
        first) are searched the same way. None for post-norm layers (BERT), whose norms sit
        inside output submodules.
        """
        width = _layout(module)[0].in_features
        child = module
        for p in (parent, *ancestors):
            if p is None:
                return None
            norm = next((getattr(p, n) for n in _PRE_NORM_NAMES
                         if is_norm(getattr(p, n, nn.Identity()))), None)
            if norm is None:
                norm = first_norm_before(p, child)
            if norm is not None:
                gamma = getattr(norm, "weight", None)
                return norm if gamma is None or gamma.shape[-1] == width else None
            if any(is_norm(c) for c in p.children()):
                return None  # a layer with norms, none before the attention: post-norm
            child = p
        return None


def token_mask(mask: torch.Tensor, B: int, N: int, Nk: int) -> Optional[torch.Tensor]:
    """(B, N) bool, True = real token, from the attention mask of a self-attention call (B, H or 1,
    N or 1, Nk): a key is real where some query may attend to it (boolean keep-mask, or an additive
    mask above half the dtype's lowest value, as HF's ``finfo.min`` padding). None for cross
    attention, windowed masks or shapes that are no per-sample key mask."""
    if N != Nk or B < 1 or mask.dim() != 4 or mask.shape[-1] != Nk or mask.shape[0] not in (1, B):
        return None
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask > (torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else -1)
    return keep.any(dim=2).any(dim=1).expand(B, Nk)  # (B, Nk)


def _normed_heads(seen, num_heads: int) -> Optional[torch.Tensor]:
    """A qk-norm's output as (B, H, N, R), from its (input, output): a norm over the full width
    (B, N, H·R) (InternVL, OLMo2) or over the head dim, on (B, N, H, R) (Qwen3) or (B, H, N, R)
    (Gemma 3). Which axis holds the heads is read from the input, a view of the projection's
    (B, N, H·R) output: its head axis has the smaller stride. None when it cannot be told."""
    if seen is None:
        return None
    x, y = seen
    if not isinstance(y, torch.Tensor):
        return None
    if y.dim() == 3 and y.shape[-1] % num_heads == 0:
        return _to_heads(y, num_heads)
    if y.dim() != 4 or num_heads not in y.shape[1:3]:
        return None
    if y.shape[1] != y.shape[2]:
        heads_first = y.shape[1] == num_heads
    elif isinstance(x, torch.Tensor) and x.shape == y.shape and x.stride(1) != x.stride(2):
        heads_first = x.stride(1) < x.stride(2)
    else:
        return None
    return y if heads_first else y.transpose(1, 2)


def _hf_rotary(apply, rope) -> Optional[Any]:
    """x (B, H, N, R) → x with the module's rope, from its ``apply_rotary_pos_emb`` and the
    ``position_embeddings`` (cos, sin) of the call; None without them."""
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        return None
    cos, sin = rope

    def rotary(x: torch.Tensor) -> torch.Tensor:
        return apply(x, x, cos.to(x.dtype), sin.to(x.dtype))[0]
    return rotary


def _hf_terms(out, q: torch.Tensor, k: torch.Tensor, info: Dict[str, Any], exact_qk: bool,
              rotary=None, causal: bool = False) -> Optional[AttentionTerms]:
    """The module's attention: its own probabilities where it returns them (``output[1]`` under
    eager attention), else the q, k it multiplies (after its qk-norm; rope applied by the
    module's own ``apply_rotary_pos_emb``) with the bias and mask the module received. None
    otherwise (``exact_qk`` False: the share then uses q, k before qk-norm / rope). ``causal``:
    the module's ``is_causal``, which attention functions apply when they get no mask (sdpa)."""
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if isinstance(probs, torch.Tensor) and tuple(probs.shape) == shape:
        return AttentionTerms(probs=probs)
    if not exact_qk or (info.get("rope") is not None and rotary is None):
        return None
    mask, window_mask = info.get("rel_pos_bias"), None
    attn_mask = info.get("attn_mask")
    if isinstance(attn_mask, torch.Tensor):
        if attn_mask.dim() == 3 and attn_mask.shape[0] != q.shape[0]:
            window_mask = attn_mask  # Swin's shift mask (nW, N, N), windows batch-major
        elif mask is None:
            mask = attn_mask
        else:
            mask = add_masks(mask, attn_mask)
    is_causal = bool(info.get("is_causal")) or (causal and attn_mask is None and q.shape[2] > 1)
    return AttentionTerms(q=q, k=k, mask=mask, window_mask=window_mask, is_causal=is_causal, rotary=rotary)
