"""Test helpers for Hugging Face models: small peaked models and the library's own probabilities.

Written against the transformers modules directly (not through qkprobe's adapter), so that a
wrong match, head split or capture in the adapter shows up as a mismatch.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

BOOST = 6.0
TOL = 1e-4


def qk_linears(m: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear]]:
    """The q/k Linear children of an HF attention module, or None."""
    for qn, kn in (("q_proj", "k_proj"), ("query", "key")):
        q, k = getattr(m, qn, None), getattr(m, kn, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


def hf_attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """name → every transformers module with q/k Linear children, in registration order."""
    return {n: m for n, m in model.named_modules()
            if type(m).__module__.startswith("transformers.") and qk_linears(m) is not None}


def build(config_cls, model_cls, seed: int = 0, peak: bool = True, **config_kw) -> nn.Module:
    """A random-init model from a small config, eager attention, eval mode, attention peaked."""
    config = config_cls(**config_kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if peak:
        peak_hf(model, seed)
    return model


@torch.no_grad()
def peak_hf(model: nn.Module, seed: int = 0) -> None:
    """Boost the q/k rows ×BOOST and draw the q/k biases from N(0, 1) in every attention layer
    (random init gives near-uniform maps, which any decomposition would match)."""
    g = torch.Generator().manual_seed(seed)
    for m in hf_attention_modules(model).values():
        for lin in qk_linears(m):
            lin.weight *= BOOST
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


def record_probs(model: nn.Module) -> Dict[str, List[torch.Tensor]]:
    """Forward hooks appending each attention module's probabilities (its ``output[1]``, which
    eager attention returns) under the module's name; the hooks stay installed. Works where
    ``output_attentions`` does not list every layer (Swin keeps only the last block of a stage)."""
    out: Dict[str, List[torch.Tensor]] = {}
    for name, m in hf_attention_modules(model).items():
        def hook(mod, args, output, name=name):
            if output[1] is not None:  # None under sdpa
                out.setdefault(name, []).append(output[1].detach())
        m.register_forward_hook(hook)
    return out


def record_inputs(model: nn.Module) -> Dict[str, List[torch.Tensor]]:
    """Forward pre-hooks appending each attention module's input hidden states (B, N, D) by name."""
    out: Dict[str, List[torch.Tensor]] = {}
    for name, m in hf_attention_modules(model).items():
        def hook(mod, args, kwargs, name=name):
            out.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"]).detach())
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return out


def reference_qk(m: nn.Module, num_heads: int, num_kv_heads: Optional[int] = None):
    """Per-head (W_q (H, R, D), W_k (H, R, D)) straight from the Linear weights (keys expanded)."""
    q, k = qk_linears(m)
    Hkv = num_kv_heads or num_heads
    W_q = q.weight.reshape(num_heads, -1, q.in_features)
    W_k = k.weight.reshape(Hkv, -1, k.in_features).repeat_interleave(num_heads // Hkv, dim=0)
    return W_q, W_k


def apply_mask(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Add an HF attention mask: boolean keep-mask (sdpa) or additive float (eager)."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def assert_peaked(p: torch.Tensor, floor: float = 0.3) -> None:
    """The reference map is far from uniform (mean row-max above ``floor``)."""
    rowmax = p.max(-1).values.mean().item()
    assert rowmax > floor, f"attention not peaked enough for a meaningful test: mean row-max {rowmax:.3f}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
