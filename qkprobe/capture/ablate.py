"""Ablating single modes over an image set: what removing (or scaling) each mode does.

For one batch of images, :class:`Ablator` runs the plain forward once, keeping the model output,
the attention of every head it will change (from the module's own q and k) and the input of
every block it will start from; then, for each mode, the forward under
:func:`qkprobe.intervene` — from the block that holds the intervened attention on: the blocks
before it return the kept output instead of computing (see :class:`BlockCache`). Per image it
returns

- ``effect``: KL(p ‖ p') of the class probabilities (classifiers) or 1 − cos(e, e') of the
  embedding (feature models), plain vs intervened;
- ``top1``: 1 where the intervened top-1 class equals the plain one (NaN for feature models);
- ``attn_change``: mean over query and key tokens of |P' − P| for the intervened head, with
  P = softmax(scale · q kᵀ) from the captured q and k (the module's attention where the layer's
  extras are empty; the bilinear part otherwise).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.discover import AttentionSite, find_attention
from ..bases import LayerBases
from ..errors import InterventionError
from .intervene import Intervention, layer_edit, mode_factors

Tensor = torch.Tensor
KL, COSINE = "kl", "1-cos"
_MODE_RE = re.compile(r"^L(\d+)H(\d+)M(\d+)$")


@dataclass(frozen=True)
class ModeRef:
    """One mode of one head: layer index (``compute_bases`` order), head, mode (0 = largest s)."""

    layer: int
    head: int
    mode: int

    def label(self) -> str:
        return f"L{self.layer}H{self.head}M{self.mode}"


def parse_modes(text: str, bases: Sequence[LayerBases]) -> List[ModeRef]:
    """``"L5H3M0,L5H3M1"`` → ModeRefs, checked against ``bases``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _MODE_RE.match(part)
        if m is None:
            raise InterventionError(f"--modes takes entries like L5H3M0 (layer 5, head 3, mode 0) separated by "
                                    f"commas; got {part!r}.")
        ref = ModeRef(*(int(g) for g in m.groups()))
        if ref.layer >= len(bases) or ref.head >= bases[ref.layer].num_heads or \
                ref.mode >= bases[ref.layer].num_modes:
            raise InterventionError(f"{part} does not exist: the model has {len(bases)} layers of "
                                    f"{bases[0].num_heads} heads and {bases[0].num_modes} modes.")
        out.append(ref)
    if not out:
        raise InterventionError("--modes names no mode; give entries like L5H3M0.")
    return list(dict.fromkeys(out))


def top_modes(shares: Sequence[Tensor], n: int) -> List[ModeRef]:
    """Per layer the ``n`` (head, mode) pairs with the largest mean attention share (H, R)."""
    if n < 1:
        raise InterventionError(f"--top must be at least 1, got {n}.")
    out = []
    for li, s in enumerate(shares):
        flat = torch.nan_to_num(s.flatten().double(), nan=-float("inf"))
        idx = torch.argsort(flat, descending=True, stable=True)[:n]
        out += [ModeRef(li, int(i) // s.shape[1], int(i) % s.shape[1]) for i in idx]
    return out


def attention_shares(model: nn.Module, batches: Iterable[Tensor], bases: Sequence[LayerBases]) -> List[Tensor]:
    """(H, R) per layer: each mode's share of its head's actual attention (``attn_share``: after
    qk-norm and rope, with the bias and masks the module applies), mean over images. Recorded by a
    probe without a file, so the share is the one ``qkprobe run --stats all`` stores."""
    from .probe import attach
    with attach(model, bases=list(bases), stats=["attn_share"], per_sample=False) as probe, torch.no_grad():
        for x in batches:
            model(x)
    return [probe.aggregates(i).mean[..., 0] for i in range(len(probe.maps))]


def output_kind(model: nn.Module, out: Any) -> str:
    """``kl`` for classifiers (class logits), ``1-cos`` for feature models (embeddings)."""
    if hasattr(out, "logits") and getattr(out, "logits", None) is not None:
        return KL
    if isinstance(out, torch.Tensor):
        n = getattr(model, "num_classes", None)
        if (isinstance(n, int) and n > 0) or isinstance(getattr(model, "heads", None), nn.Module):
            return KL
    return COSINE


def output_tensor(out: Any) -> Tensor:
    """(B, C) the model's class logits or embedding, from whatever the forward returned."""
    if isinstance(out, torch.Tensor):
        return out.flatten(1)
    for name in ("logits", "image_embeds", "pooler_output"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t.flatten(1)
    t = getattr(out, "last_hidden_state", None)
    if isinstance(t, torch.Tensor):
        return t[:, 0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].flatten(1)
    raise InterventionError(f"ablate: cannot read an output tensor from {type(out).__name__}; the model must "
                            f"return class logits or an embedding.")


def compare_outputs(plain: Tensor, changed: Tensor, kind: str) -> Tuple[Tensor, Tensor]:
    """Per image (effect, top-1 agreement) of two (B, C) outputs (float32)."""
    p, c = plain.float(), changed.float()
    if kind == KL:
        lp, lc = F.log_softmax(p, -1), F.log_softmax(c, -1)
        effect = (lp.exp() * (lp - lc)).sum(-1).clamp_min(0)
        top1 = (p.argmax(-1) == c.argmax(-1)).float()
    else:
        effect = 1 - F.cosine_similarity(p, c, dim=-1)
        top1 = torch.full_like(effect, float("nan"))
    return effect, top1


# ----------------------------------------------------------------------------- block cache

def block_of(model: nn.Module, name: str) -> Optional[Tuple[nn.Module, int]]:
    """(sequence container, index) of the nearest block above the module ``name`` that is an
    element of an ``nn.ModuleList`` / ``nn.Sequential`` (timm ``blocks``, HF ``encoder.layer``,
    open_clip ``resblocks``, torchvision ``encoder.layers`` with named children), or None."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        container = model.get_submodule(".".join(parts[:k - 1])) if k > 1 else model
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            return container, list(container._modules).index(parts[k - 1])  # torchvision names them
    return None


class BlockCache:
    """Start forwards at block i of a sequence: blocks before it hand over the kept output of
    block i − 1 instead of computing (block i − 1 returns it; the ones before pass their input
    through untouched, since their result is never used)."""

    def __init__(self, seq: nn.Module, index: int):
        self.seq, self.index = seq, index
        self.kept: Any = None

    def keep_hook(self):
        """A forward hook on block i − 1 that keeps its output (installed for the plain pass)."""
        def hook(mod, args, out):
            self.kept = out
        return self.seq[self.index - 1].register_forward_hook(hook)

    def skipping(self, kept: Any = None):
        """Context: forwards start at block i, block i − 1 returning ``kept`` (default: the last kept)."""
        return _Skip(self, self.kept if kept is None else kept)


class _Skip:
    def __init__(self, cache: BlockCache, kept: Any):
        self.cache, self.kept = cache, kept
        self.saved: List[Tuple[nn.Module, Any]] = []

    def __enter__(self):
        seq, i, kept = self.cache.seq, self.cache.index, self.kept
        for j in range(i):
            blk = seq[j]
            self.saved.append((blk, blk.__dict__.get("forward")))
            if j == i - 1:
                blk.forward = lambda *a, **k: kept
            else:
                blk.forward = lambda *a, **k: a[0] if a else next(iter(k.values()))
        return self

    def __exit__(self, *exc):
        for blk, old in self.saved:
            del blk.forward
            if old is not None:
                blk.forward = old
        self.saved = []


# ----------------------------------------------------------------------------- the ablator

def _head_probs(q: Tensor, k: Tensor, head: int, scale: float) -> Tensor:
    """(B, N, Nk) softmax(scale · q_h k_hᵀ) of one head (float32)."""
    qh, kh = q[:, head].float(), k[:, head].float()
    return torch.softmax(scale * qh @ kh.transpose(-1, -2), dim=-1)


@dataclass
class PlainPass:
    """One batch's plain forward: inputs x, output y (B, C), captured (q, k) per layer."""

    x: Tensor
    y: Tensor
    qk: Dict[int, Tuple[Tensor, Tensor]]
    kept: Dict[int, Any]  # layer → output of the block before the intervened one


class Ablator:
    """Ablate each of ``modes`` (``scale`` times its coordinate) on batches of inputs.

    ``cache=True`` reuses the layers below the intervened block (checked once per block against
    a full forward; falls back to full forwards with a warning where they differ).
    """

    def __init__(self, model: nn.Module, bases: Sequence[LayerBases], modes: Sequence[ModeRef],
                 scale: float = 0.0, kind: Optional[str] = None, cache: bool = True):
        self.model, self.bases, self.modes = model, list(bases), list(modes)
        self.scale, self.kind, self.cache = float(scale), kind, cache
        self.sites: List[AttentionSite] = find_attention(model)
        self.caches: Dict[int, Optional[BlockCache]] = {}
        self.checked: Dict[int, bool] = {}
        self.notes: List[str] = []
        for li in sorted({m.layer for m in self.modes}):
            where = block_of(model, self.sites[li].name) if cache else None
            self.caches[li] = BlockCache(*where) if where is not None and where[1] > 0 else None

    def _capture(self, layers: Iterable[int], store: Dict[int, Tuple[Tensor, Tensor]]):
        handles = []
        for li in layers:
            site = self.sites[li]

            def emit(q, k, info, li=li):
                store[li] = (q.detach(), k.detach())
            handles += site.adapter.capture(site.module, emit)
        return handles

    @torch.no_grad()
    def run_batch(self, x: Tensor, todo: Optional[Sequence[int]] = None) -> Dict[int, Dict[str, Tensor]]:
        """Per index into ``modes`` (all, or ``todo``): {"effect", "top1", "attn_change"}, each (B,)."""
        todo = range(len(self.modes)) if todo is None else todo
        plain = self.plain(x, sorted({self.modes[i].layer for i in todo}))
        return {i: self.ablate(i, plain) for i in todo}

    @torch.no_grad()
    def plain(self, x: Tensor, layers: Sequence[int]) -> "PlainPass":
        """The plain forward of a batch: output, q and k of ``layers``, kept block outputs."""
        qk0: Dict[int, Tuple[Tensor, Tensor]] = {}
        handles = self._capture(layers, qk0)
        handles += [self.caches[li].keep_hook() for li in layers if self.caches.get(li) is not None]
        try:
            out0 = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if self.kind is None:
            self.kind = output_kind(self.model, out0)
        kept = {li: self.caches[li].kept for li in layers if self.caches.get(li) is not None}
        for c in self.caches.values():
            if c is not None:
                c.kept = None  # the batch's block outputs live in the PlainPass only
        return PlainPass(x=x, y=output_tensor(out0), qk=qk0, kept=kept)

    @torch.no_grad()
    def ablate(self, i: int, plain: "PlainPass") -> Dict[str, Tensor]:
        """Mode ``modes[i]`` on the batch of ``plain`` (whose layers include its layer)."""
        ref = self.modes[i]
        lb = self.bases[ref.layer]
        qk1: Dict[int, Tuple[Tensor, Tensor]] = {}
        y1 = self._intervened(plain, ref, qk1)
        effect, top1 = compare_outputs(plain.y, y1, self.kind)
        p0 = _head_probs(*plain.qk[ref.layer], ref.head, lb.scale)
        p1 = _head_probs(*qk1[ref.layer], ref.head, lb.scale)
        change = (p1 - p0).abs().reshape(plain.x.shape[0], -1).mean(-1)
        return {"effect": effect, "top1": top1, "attn_change": change}

    def _intervened(self, plain: "PlainPass", ref: ModeRef, qk1: Dict[int, Tuple[Tensor, Tensor]]) -> Tensor:
        x = plain.x
        cache = self.caches.get(ref.layer)
        factors = mode_factors(self.bases, {(ref.layer, ref.head): [ref.mode]}, self.scale)[ref.layer]
        edit = layer_edit(ref.layer, self.bases[ref.layer], factors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # approximate layers are noted once by the caller
            iv = Intervention(self.model, [edit] if edit.heads else [], self.sites)  # = intervene(), sites reused
        handles = self._capture([ref.layer], qk1)
        try:
            if cache is None:
                return output_tensor(self.model(x))
            with cache.skipping(plain.kept[ref.layer]):
                y = output_tensor(self.model(x))
            if not self.checked.get(ref.layer):
                full = output_tensor(self.model(x))
                self.checked[ref.layer] = True
                if not torch.allclose(y, full, rtol=1e-5, atol=1e-6):
                    self.caches[ref.layer] = None
                    self.notes.append(f"layer {ref.layer}: starting at its block does not reproduce the full "
                                      f"forward; it runs full forwards")
                    warnings.warn(f"qkprobe ablate: {self.notes[-1]}.", stacklevel=3)
                    return full
            return y
        finally:
            for h in handles:
                h.remove()
            iv.remove()
