"""Find the attention modules of a model (by class and attributes) and its prefix tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import NoAttention, UnsupportedAttention
from . import hf, timm, torch_mha  # noqa: F401  (registers the built-in families)
from . import open_clip_attn, timm_parallel, torchvision_swin  # noqa: F401  (issue 12: more families)
from .base import AttentionAdapter, adapter_for, looks_like_attention


@dataclass
class AttentionSite:
    """One attention module of a model: its path, the module, its adapter and its parent."""

    name: str
    module: nn.Module
    adapter: AttentionAdapter
    parent: Optional[nn.Module]
    ancestors: Tuple[nn.Module, ...] = ()  # above the parent, nearest first


def find_attention(model: nn.Module, strict: bool = False) -> List[AttentionSite]:
    """Every attention module an adapter knows, in registration order (= forward order for
    the supported families). Modules nested inside a matched one are not searched.

    Attention-like modules (class name contains "Attention") that no adapter knows and that hold
    no known module raise :class:`UnsupportedAttention` when nothing else is found or when
    ``strict``; otherwise they are skipped with a warning.
    """
    sites: List[AttentionSite] = []
    unknown: List[str] = []
    parents = {}
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            parents[id(child)] = (parent, f"{pname}.{cname}" if pname else cname)
    matched_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in matched_prefixes):
            continue
        adapter = adapter_for(module)
        if adapter is not None:
            chain = _ancestors(module, parents)
            sites.append(AttentionSite(name or "<root>", module, adapter, chain[0] if chain else None,
                                       tuple(chain[1:])))
            matched_prefixes.append(name)
        elif looks_like_attention(module):
            unknown.append(name)
    unknown = [u for u in unknown
               if not any(s.name.startswith(u + ".") for s in sites)
               and not any(u.startswith(s.name + ".") for s in sites)]
    if unknown:
        cls = type(model.get_submodule(unknown[0])).__name__
        msg = (f"No qkprobe adapter knows the attention module {unknown[0]!r} ({cls}"
               f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}); "
               f"teach it with qkprobe.register_attention({cls}, adapter).")
        if strict or not sites:
            raise UnsupportedAttention(msg)
        warnings.warn(msg + " These modules are skipped.", stacklevel=3)
    if not sites:
        raise NoAttention(f"Found no attention module in {type(model).__name__}; pass a transformer, "
                          f"or register its attention class with qkprobe.register_attention.")
    return sites


def _ancestors(module: nn.Module, parents) -> List[nn.Module]:
    """Parent, grandparent, ... of ``module`` (nearest first)."""
    chain = []
    while id(module) in parents:
        module = parents[id(module)][0]
        chain.append(module)
    return chain


_CLS_ATTRS = ("cls_token", "class_token", "class_embedding")
_DIST_ATTRS = ("dist_token", "distillation_token")
_REG_ATTRS = ("reg_token", "register_tokens")


def prefix_tokens(model: nn.Module) -> Optional[int]:
    """Number of non-patch tokens at the start of the sequence (class, distillation, registers).

    timm models say so (``num_prefix_tokens``); elsewhere they are counted from the token
    parameters the embeddings hold (HF ``cls_token``/``distillation_token``/``register_tokens``,
    torchvision ``class_token``, open_clip ``class_embedding``). 0 when the model has none.
    """
    for m in model.modules():
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    count, seen = 0, set()
    for m in model.modules():
        for attrs, size in ((_CLS_ATTRS, None), (_DIST_ATTRS, None), (_REG_ATTRS, "rows")):
            for attr in attrs:
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and (attrs, attr) not in seen:
                    seen.add((attrs, attr))
                    count += t.shape[-2] if size == "rows" and t.dim() >= 2 else 1
    return count
