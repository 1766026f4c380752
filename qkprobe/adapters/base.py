"""What an adapter is, and the registry that finds one for a module.

An adapter knows one family of attention modules (timm ``Attention``, ``nn.MultiheadAttention``,
Hugging Face ``*Attention`` with q/k projections, ...). It answers three questions, found from
the module's class and attributes, never from parameter names in a state dict:

- ``weights(module)``: the per-head ``W_q`` (H, R, D), ``W_k`` (H, R, Dk), biases (H, R), the
  logit scale and the static ``extras`` (what makes the logits not a pure bilinear form);
- ``capture(module, emit)``: hooks that call ``emit(q, k, info)`` on every forward with
  q (B, H, Nq, R) and k (B, H, Nk, R), biases included, before any qk-norm or rotary embedding,
  batch-first whatever the module's layout; ``info`` holds what the forward revealed
  (``attn_mask``, ``rope``, ``rel_pos_bias`` tensors, and ``extras`` seen at run time) and,
  under ``info["attention"]``, the :class:`AttentionTerms` of the module's actual attention
  (its own P, or the q, k it multiplies after qk-norm / rope with its mask) for the share;
- ``input_norm(module, parent)``: the LayerNorm that feeds the module, for ``fold_ln``.

Users add a family with :func:`qkprobe.register_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError

Tensor = torch.Tensor
Emit = Callable[[Tensor, Tensor, Dict[str, Any]], None]

#: Names used in ``extras``.
QK_NORM = "qk_norm"
ROPE = "rope"
REL_POS_BIAS = "rel_pos_bias"
ATTN_MASK = "attn_mask"
COSINE_ATTN = "cosine_attn"
HEAD_SCALE = "head_scale"


@dataclass
class QKWeights:
    """Per-head query/key projections of one attention module.

    W_q: (H, R, D); W_k: (H, R, Dk); b_q, b_k: (H, R) or None; scale: logit scale s in
    ``s · q·k``; extras: names of what makes the logits non-bilinear (empty when exactly
    bilinear); num_kv_heads: key heads before grouped-query expansion (W_k is given expanded).
    """

    W_q: Tensor
    W_k: Tensor
    b_q: Optional[Tensor]
    b_k: Optional[Tensor]
    scale: float
    extras: FrozenSet[str] = frozenset()
    notes: Tuple[str, ...] = ()

    @property
    def num_heads(self) -> int:
        return self.W_q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W_q.shape[1]


class AttentionAdapter:
    """Base class: one attention family. Subclasses override ``matches``, ``weights``, ``capture``."""

    #: Short family name stored in outputs (``"timm"``, ``"torch_mha"``, ...).
    name: str = "custom"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def weights(self, module: nn.Module) -> QKWeights:
        raise NotImplementedError

    def capture(self, module: nn.Module, emit: Emit) -> List[Any]:
        """Install hooks; return their handles (each with ``.remove()``)."""
        raise NotImplementedError

    def input_norm(self, module: nn.Module, parent: Optional[nn.Module],
                   ancestors: Sequence[nn.Module] = ()) -> Optional[nn.Module]:
        """The affine norm whose output is this module's input, or None (then fold_ln is a no-op).

        ``ancestors``: the modules above the parent, nearest first (for wrapped attention).

        Default: the first LayerNorm-like child of the parent registered before the module
        (timm ``Block.norm1``, open_clip ``ln_1``, torchvision ``ln_1``, HF ``layernorm_before``).
        """
        return first_norm_before(parent, module)


# ----------------------------------------------------------------------------- helpers

def split_heads(W: Tensor, num_heads: int) -> Tensor:
    """(H·R, D) → (H, R, D)."""
    return W.reshape(num_heads, W.shape[0] // num_heads, W.shape[1])


def to_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H·R) → (B, H, N, R)."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def project(x: Tensor, W: Tensor, b: Optional[Tensor], num_heads: int) -> Tensor:
    """Recompute q (or k) from the module input: x (B, N, D), W (H·R, D) → (B, H, N, R)."""
    return to_heads(F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype)), num_heads)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm-like: a module with a (D,) affine weight and 'norm' in its class name."""
    return isinstance(m, nn.LayerNorm) or ("norm" in type(m).__name__.lower()
                                          and isinstance(getattr(m, "weight", None), torch.Tensor)
                                          and m.weight.dim() == 1)


def first_norm_before(parent: Optional[nn.Module], module: nn.Module) -> Optional[nn.Module]:
    if parent is None:
        return None
    for child in parent.children():
        if child is module:
            return None
        if is_norm(child):
            return child
    return None


def no_grad_hook(fn):
    """Wrap a hook so that it reads detached tensors and never records autograd history."""

    def wrapped(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- registry

Matcher = Union[type, Callable[[nn.Module], bool]]
_USER: List[Tuple[Matcher, AttentionAdapter]] = []
_BUILTIN: List[AttentionAdapter] = []


def register_attention(cls: Matcher, adapter: AttentionAdapter) -> None:
    """Teach qkprobe a custom attention module.

    Args:
        cls: the module class (subclasses match too), or a predicate ``module -> bool``.
        adapter: an :class:`AttentionAdapter` giving the weights and the q/k capture.

    User registrations are tried before the built-in families, newest first.
    """
    if not isinstance(adapter, AttentionAdapter):
        raise UsageError(f"register_attention: the adapter is a {type(adapter).__name__}, not a "
                         f"qkprobe.AttentionAdapter; pass an instance of a subclass of it.")
    _USER.insert(0, (cls, adapter))


def unregister_attention(cls: Matcher) -> None:
    """Remove what :func:`register_attention` added for ``cls``."""
    _USER[:] = [(c, a) for c, a in _USER if c is not cls]


def builtin_adapter(adapter_cls):
    """Class decorator: add one instance to the built-in families (order = priority)."""
    _BUILTIN.append(adapter_cls())
    return adapter_cls


def adapter_for(module: nn.Module) -> Optional[AttentionAdapter]:
    for matcher, adapter in _USER:
        if (isinstance(matcher, type) and isinstance(module, matcher)) or \
                (not isinstance(matcher, type) and matcher(module)):
            return adapter
    for adapter in _BUILTIN:
        if adapter.matches(module):
            return adapter
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """A module whose class name says attention (used only to report unsupported modules)."""
    return "attention" in type(module).__name__.lower()


# ----------------------------------------------------------------------------- attention terms

#: The ``info`` key under which an adapter hands the :class:`AttentionTerms` of a call.
ATTENTION = "attention"
#: The ``info`` key of the (B, N) token mask (True = real token) an adapter derived from padding
#: (self-attention only); the reducers leave padded positions out of every statistic.
TOKEN_MASK = "token_mask"


@dataclass
class AttentionTerms:
    """What one call's attention probabilities are made of, beside the bilinear q, k of ``emit``.

    The mode coordinates a, b always come from the bilinear q, k; these terms only serve the
    attention-share statistics, so that they use the probabilities the module really applied.
    Either ``probs`` (B, H, N, Nk), the module's own softmax output where it materializes it, or:

    - ``q`` (B, H, N, R'), ``k`` (B, H, Nk, R'): the q and k the module multiplies (after qk-norm;
      ``rotary``, when set, is applied to both on demand by :meth:`attended_qk`, so rope costs
      nothing unless the attention statistics are recorded);
    - ``mask``: what the module adds to scale·q·kᵀ, an additive float tensor or a boolean
      keep-mask (True = may attend) broadcastable to (B, H, N, Nk), as in
      ``F.scaled_dot_product_attention`` (rel-pos bias and padding mask summed);
    - ``window_mask``: (nW, N, Nk) added per window where B counts windows ordered batch-major
      (Swin's shift mask); ``is_causal``: a causal mask on top;
    - ``scale``: the logit scale of q·k (None: the bases' scale).
    """

    q: Optional[Tensor] = None
    k: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    window_mask: Optional[Tensor] = None
    is_causal: bool = False
    probs: Optional[Tensor] = None
    rotary: Optional[Callable[[Tensor], Tensor]] = None
    scale: Optional[float] = None

    def attended_qk(self) -> Tuple[Tensor, Tensor]:
        """(q, k) as the module multiplies them: (B, H, N, R'), (B, H, Nk, R')."""
        if self.rotary is None:
            return self.q, self.k
        return self.rotary(self.q), self.rotary(self.k)


def add_masks(m1: Tensor, m2: Tensor) -> Tensor:
    """Sum of two SDPA masks (boolean keep-masks become 0 / −inf)."""
    return as_additive(m1) + as_additive(m2)


def as_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A boolean keep-mask (True = may attend) as 0 / −inf; float masks unchanged."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
