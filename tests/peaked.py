"""Test helpers: make random-init attention peaked, and read a library's own probabilities.

Random init gives near-uniform attention, which any reconstruction would match; scaling the
W_q/W_k rows and randomizing biases makes maps peaked, so a wrong decomposition fails.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

BOOST = 6.0


@torch.no_grad()
def peak_timm(model: nn.Module, seed: int = 0) -> None:
    """Boost q/k rows and randomize q/k biases of every timm attention module; turn off SDPA."""
    g = torch.Generator().manual_seed(seed)
    from qkprobe.adapters.timm import _timm_classes
    for m in model.modules():
        if type(m) not in _timm_classes():
            continue
        m.fused_attn = False
        if getattr(m, "qkv", None) is not None:
            A = m.qkv.weight.shape[0] // 3
            m.qkv.weight[:2 * A] *= BOOST
            if m.qkv.bias is not None:
                m.qkv.bias.copy_(torch.randn(m.qkv.bias.shape, generator=g))
            if getattr(m, "q_bias", None) is not None:
                m.q_bias.copy_(torch.randn(m.q_bias.shape, generator=g))
        else:
            for lin in (m.q_proj, m.k_proj):
                lin.weight *= BOOST
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


@torch.no_grad()
def peak_mha(model: nn.Module, seed: int = 0) -> None:
    """Boost q/k rows and randomize the packed bias of every nn.MultiheadAttention."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        E = m.embed_dim
        if m._qkv_same_embed_dim:
            m.in_proj_weight[:2 * E] *= BOOST
        else:
            m.q_proj_weight *= BOOST
            m.k_proj_weight *= BOOST
        if m.in_proj_bias is not None:
            m.in_proj_bias.copy_(torch.randn(m.in_proj_bias.shape, generator=g))


def record_timm_probs(model: nn.Module) -> List[torch.Tensor]:
    """Hooks that append each timm attention's softmax output (needs fused_attn=False)."""
    from qkprobe.adapters.timm import _timm_classes
    out: List[torch.Tensor] = []
    for m in model.modules():
        if type(m) in _timm_classes():
            if hasattr(m, "softmax"):  # Swin: probabilities leave an nn.Softmax
                m.softmax.register_forward_hook(lambda mod, a, o: out.append(o.detach()))
            else:
                m.attn_drop.register_forward_pre_hook(lambda mod, a: out.append(a[0].detach()))
    return out


def record_mha_probs(model: nn.Module) -> List[torch.Tensor]:
    """Hooks that make every MHA return per-head weights and append them (outputs unchanged)."""
    out: List[torch.Tensor] = []

    def pre(mod, args, kwargs):
        kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
        return args, kwargs

    def post(mod, args, kwargs, output):
        out.append(output[1].detach())

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_pre_hook(pre, with_kwargs=True)
            m.register_forward_hook(post, with_kwargs=True)
    return out


def assert_peaked(p: torch.Tensor, floor: float = 0.3) -> None:
    """The reference map is far from uniform (mean row-max above ``floor``)."""
    rowmax = p.max(-1).values.mean().item()
    assert rowmax > floor, f"attention not peaked enough for a meaningful test: mean row-max {rowmax:.3f}"
