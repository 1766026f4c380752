"""``intervene``: scale or remove chosen singular modes of chosen heads while the model runs.

For head h with mode coordinates ``a = q @ C`` (C = ``LayerBases.coord_q[h]``, R × R, biases
included since q has them), the logit is ``scale · Σ_r S_r a_r b_r``. Multiplying the chosen
modes' coordinates by m_r (``scale`` for the chosen r, 1 elsewhere) gives

    a' = a · diag(m),   q' = a' C⁻¹ = q (C diag(m) C⁻¹) = q + q Δ,   Δ = C diag(m − 1) C⁻¹,

so each chosen mode's contribution ``S_r a_r b_r`` to the logits of that head is multiplied by
m_r and every other term is untouched. In column form q' = T q with T = (C diag(m) C⁻¹)ᵀ: the
same change as the weight surgery W_q' = T W_q, b_q' = T b_q. The library's own attention then
runs on q' (outputs, later layers and gradients all see the change).

Where q enters the attention (found from the module's class and attributes, never from
parameter names):

- timm modules with ``q_norm``/``k_norm`` children (Identity when off, always called): a forward
  pre-hook on ``q_norm`` edits q (B, H, N, R) before qk-norm and rotary embeddings;
- a q Linear child (Hugging Face ``q_proj``/``query``): a forward hook edits its output;
- a packed ``qkv`` Linear child (timm BEiT, Swin): a forward hook edits the q slice of its output
  (BEiT's separate ``q_bias`` is then added after the Linear, through the module's own
  ``qkv_bias_separate`` switch, and the hook includes it);
- ``nn.MultiheadAttention`` (also open_clip, torchvision), where q is never a module output:
  ``torch.nn.utils.parametrize`` replaces the q rows of ``in_proj_weight`` / ``q_proj_weight``
  and ``in_proj_bias`` by T W_q, T b_q computed from the original parameters (gradients flow to
  them);
- a module of a user's adapter (``qkprobe.register_attention``) that defines
  ``q_parameters(module) -> [(owner module, attribute name), ...]``: the weight (H·R, D) and bias
  (H·R,) whose rows are W_q and b_q, parametrized the same way.

Hooks are prepended, so a probe from :func:`qkprobe.attach` (before or after) records the
intervened q. Heads whose factors are all 1 get no hook: ``scale=1`` is bit-identical to no
intervention. With qk-norm or rope (``extras``) the change acts on the bilinear part (q before
the norm / rotation) and is not an exact scaling of the final logits: an
:class:`InterventionWarning` says so and :attr:`Intervention.approximate` lists those layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..adapters.base import COSINE_ATTN, QK_NORM, ROPE
from ..adapters.discover import AttentionSite, find_attention
from ..bases import LayerBases, compute_bases
from ..errors import InterventionError

Tensor = torch.Tensor
LayerKey = Union[int, str]
ModeSpec = Mapping[Tuple[LayerKey, int], Sequence[int]]

#: Extras under which scaling q's mode coordinates is not an exact scaling of the logit terms.
INEXACT_EXTRAS = frozenset({QK_NORM, ROPE, COSINE_ATTN})
_Q_LINEAR_NAMES = ("q_proj", "query")


class InterventionWarning(UserWarning):
    """The intervened layer's logits are not a bilinear form of q (qk-norm, rope): approximate."""


@dataclass
class LayerEdit:
    """What changes in one attention layer.

    index: position in ``compute_bases`` order; name: module path; factors: (H, R) float64
    m_r per head and mode (1 = untouched); heads: the heads with some m_r != 1;
    delta: (len(heads), R, R) float64 Δ = C diag(m − 1) C⁻¹ of those heads; extras: the
    layer's extras that make the intervention approximate (empty when exact).
    """

    index: int
    name: str
    factors: Tensor
    heads: List[int]
    delta: Tensor
    extras: FrozenSet[str]

    def transform(self) -> Tensor:
        """(H, R, R) float64 T per head in column form: q' = T q (identity for untouched heads)."""
        H, R = self.factors.shape
        T = torch.eye(R, dtype=torch.float64).repeat(H, 1, 1)
        for i, h in enumerate(self.heads):
            T[h] += self.delta[i].T
        return T


def resolve_layer(key: LayerKey, bases: Sequence[LayerBases]) -> int:
    """The index (``compute_bases`` order) of a layer given as an index or a module name."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise InterventionError(f"intervene: a layer is an int index or a module name, got {key!r}.")
    if isinstance(key, int):
        if not -len(bases) <= key < len(bases):
            raise InterventionError(f"intervene: layer {key} is out of range; the model has {len(bases)} "
                                    f"attention layers (indices 0..{len(bases) - 1}).")
        return key % len(bases)
    names = [b.name for b in bases]
    if key not in names:
        raise InterventionError(f"intervene: no attention layer is named {key!r}; the layers are "
                                f"{names[0]!r} ... {names[-1]!r} (see qkprobe.compute_bases(model)).")
    return names.index(key)


def mode_factors(bases: Sequence[LayerBases], modes: Optional[ModeSpec] = None, scale: float = 0.0,
                 keep: Optional[ModeSpec] = None) -> Dict[int, Tensor]:
    """Per layer index the (H, R) float64 factors m: ``scale`` for the modes listed in ``modes``
    (or, with ``keep``, for every mode of the named heads except those listed), 1 elsewhere."""
    if (modes is None) == (keep is None):
        raise InterventionError("intervene: pass either modes={(layer, head): [modes]} or keep={...}, not "
                                "both and not neither.")
    spec = modes if modes is not None else keep
    out: Dict[int, Tensor] = {}
    for key, chosen in spec.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InterventionError(f"intervene: keys are (layer, head) pairs, got {key!r}.")
        li = resolve_layer(key[0], bases)
        lb = bases[li]
        head = key[1]
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < lb.num_heads:
            raise InterventionError(f"intervene: head {head!r} of layer {lb.name!r} does not exist; it has "
                                    f"{lb.num_heads} heads (0..{lb.num_heads - 1}).")
        chosen = [int(r) for r in chosen]
        bad = [r for r in chosen if not 0 <= r < lb.num_modes]
        if bad:
            raise InterventionError(f"intervene: mode {bad[0]} of layer {lb.name!r} head {head} does not exist; "
                                    f"it has {lb.num_modes} modes (0 = largest singular value).")
        m = out.setdefault(li, torch.ones(lb.num_heads, lb.num_modes, dtype=torch.float64))
        if modes is not None:
            m[head, chosen] = float(scale)
        else:
            row = torch.full((lb.num_modes,), float(scale), dtype=torch.float64)
            row[chosen] = 1.0
            m[head] = row
    return out


def layer_edit(index: int, lb: LayerBases, factors: Tensor) -> LayerEdit:
    """The :class:`LayerEdit` of one layer from its bases and (H, R) factors."""
    heads = [h for h in range(factors.shape[0]) if bool((factors[h] != 1).any())]
    C = lb.coord_q.to(torch.float64)  # (H, R, M)
    deltas = []
    for h in heads:
        Ch = C[h]
        # pinv = inverse for full-rank heads; rank-deficient modes have zero columns and no effect
        deltas.append(Ch @ torch.diag(factors[h] - 1) @ torch.linalg.pinv(Ch))
    R = C.shape[1]
    delta = torch.stack(deltas) if deltas else torch.zeros(0, R, R, dtype=torch.float64)
    return LayerEdit(index=index, name=lb.name, factors=factors, heads=heads, delta=delta,
                     extras=frozenset(lb.extras) & INEXACT_EXTRAS)


# ----------------------------------------------------------------------------- editing q

def _edit_heads_first(q: Tensor, heads: Tensor, delta: Tensor) -> Tensor:
    """q (B, H, N, R) → q + q Δ on the chosen heads (differentiable, out of place)."""
    sel = q.index_select(1, heads)  # (B, h', N, R)
    return q.index_add(1, heads, sel @ delta.to(dtype=q.dtype, device=q.device))


def _edit_flat(x: Tensor, cols: Tensor, R: int, delta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., C) holding q heads in columns ``cols`` (h'·R,) → x + (x_q + b_q) Δ on those heads.

    ``bias`` (h'·R,): a q bias the module adds after this tensor (then x + bias gets q')."""
    sel = x.index_select(-1, cols)  # (..., h'·R)
    if bias is not None:
        sel = sel + bias.to(sel.dtype)
    sel = sel.unflatten(-1, (-1, R))  # (..., h', R)
    d = torch.einsum("...hr,hrs->...hs", sel, delta.to(dtype=x.dtype, device=x.device))
    return x.index_add(-1, cols, d.flatten(-2).to(x.dtype))


def _columns(heads: Sequence[int], R: int, offset: int = 0) -> Tensor:
    return torch.cat([torch.arange(offset + h * R, offset + (h + 1) * R) for h in heads])


class _QRows(nn.Module):
    """Parametrization: rows ``cols`` of a weight (C, D) or bias (C,) become T·(those rows) per head."""

    def __init__(self, cols: Tensor, R: int, delta: Tensor):
        super().__init__()
        self.cols, self.R, self.delta = cols, R, delta

    def forward(self, W: Tensor) -> Tensor:
        cols = self.cols.to(W.device)
        rows = W.index_select(0, cols)  # (h'·R, ...)
        rows = rows.unflatten(0, (-1, self.R))  # (h', R, ...)
        dT = self.delta.to(dtype=W.dtype, device=W.device).transpose(-1, -2)  # Δᵀ per head
        d = torch.einsum("hrs,hs...->hr...", dT, rows)
        return W.index_add(0, cols, d.flatten(0, 1))


def _parametrize_q_rows(params, cols: Tensor, R: int, delta: Tensor) -> List[Any]:
    """Parametrize each (owner module, attribute) — a weight (C, D) or bias (C,) whose rows
    h·R:(h+1)·R are head h's q rows — to T·(those rows); returns the undo callables."""
    undo = []
    try:
        for owner, name in params:
            parametrize.register_parametrization(owner, name, _QRows(cols, R, delta))
            undo.append(lambda o=owner, n=name: parametrize.remove_parametrizations(o, n, leave_parametrized=False))
    except BaseException:
        for u in reversed(undo):
            u()
        raise
    return undo


@dataclass
class _Site:
    edit: LayerEdit
    site: AttentionSite
    R: int


def _hook_points(s: _Site) -> Tuple[List[Any], List[Any]]:
    """Install the edit of one layer; returns (hook handles, undo callables)."""
    module, edit, R = s.site.module, s.edit, s.R
    heads = torch.tensor(edit.heads, dtype=torch.long)
    delta = edit.delta
    cols = _columns(edit.heads, R)
    q_norm, k_norm = module._modules.get("q_norm"), module._modules.get("k_norm")
    if s.site.adapter.name == "timm" and isinstance(q_norm, nn.Module) and isinstance(k_norm, nn.Module):
        def pre_q_norm(mod, args):
            return (_edit_heads_first(args[0], heads.to(args[0].device), delta),) + tuple(args[1:])
        return [q_norm.register_forward_pre_hook(pre_q_norm, prepend=True)], []
    for name in _Q_LINEAR_NAMES:
        lin = module._modules.get(name)
        if isinstance(lin, nn.Linear):
            def on_q(mod, args, out):
                return _edit_flat(out, cols.to(out.device), R, delta)
            return [lin.register_forward_hook(on_q, prepend=True)], []
    qkv = module._modules.get("qkv")
    if isinstance(qkv, nn.Linear):
        undo = []
        q_bias = None
        if qkv.bias is None and isinstance(getattr(module, "q_bias", None), torch.Tensor):
            if not hasattr(module, "qkv_bias_separate"):
                raise InterventionError(f"intervene: {edit.name!r} ({type(module).__name__}) adds its q bias inside "
                                        f"F.linear with no way to edit q; register an adapter with a q Linear.")
            before = module.qkv_bias_separate
            module.qkv_bias_separate = True  # the bias is then added after self.qkv(x): hookable
            undo.append(lambda: setattr(module, "qkv_bias_separate", before))
            q_bias = module.q_bias

        def on_qkv(mod, args, out):
            b = None if q_bias is None else q_bias.index_select(0, cols.to(q_bias.device))
            return _edit_flat(out, cols.to(out.device), R, delta, bias=b)
        return [qkv.register_forward_hook(on_qkv, prepend=True)], undo
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"]
        if module.in_proj_bias is not None:
            names.append("in_proj_bias")
        return [], _parametrize_q_rows([(module, n) for n in names], cols, R, delta)
    q_parameters = getattr(s.site.adapter, "q_parameters", None)
    if callable(q_parameters):
        return [], _parametrize_q_rows(list(q_parameters(module)), cols, R, delta)
    raise InterventionError(f"intervene: cannot find where q is made in {edit.name!r} ({type(module).__name__}); "
                            f"give its adapter a q_parameters(module) method returning [(module, 'weight name'), "
                            f"(module, 'bias name')] of the q rows.")


class Intervention:
    """Installed mode interventions (a context manager; :meth:`remove` also undoes them).

    Attributes:
        edits: one :class:`LayerEdit` per changed layer, in layer order.
        approximate: layer name → extras (qk_norm, rope) under which the change acts on the
            bilinear part only (empty dict when every change is exact).
    """

    def __init__(self, model: nn.Module, edits: List[LayerEdit], sites: Sequence[AttentionSite]):
        self.model = model
        self.edits = edits
        self.approximate: Dict[str, FrozenSet[str]] = {e.name: e.extras for e in edits if e.extras}
        self._handles: List[Any] = []
        self._undo: List[Any] = []
        by_name = {s.name: s for s in sites}
        try:
            for e in edits:
                site = by_name[e.name]
                h, u = _hook_points(_Site(e, site, e.delta.shape[-1]))
                self._handles += h
                self._undo += u
        except BaseException:
            self.remove()
            raise
        for name, extras in self.approximate.items():
            warnings.warn(f"qkprobe.intervene: layer {name!r} has {', '.join(sorted(extras))}; the modes are "
                          f"scaled in q before it, so their logit contributions change only approximately.",
                          InterventionWarning, stacklevel=3)

    def remove(self) -> None:
        """Remove every hook and parametrization (idempotent)."""
        for h in self._handles:
            h.remove()
        for u in reversed(self._undo):
            u()
        self._handles, self._undo = [], []

    def __enter__(self) -> "Intervention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def intervene(model: nn.Module, modes: Optional[ModeSpec] = None, scale: float = 0.0, *,
              keep: Optional[ModeSpec] = None, bases: Optional[Sequence[LayerBases]] = None,
              fold_ln: bool = False) -> Intervention:
    """Scale the chosen modes' contributions to the attention logits while the model runs.

    ``with qkprobe.intervene(model, {(5, 3): [0, 1]}, scale=0.0): model(x)`` removes modes 0 and 1
    (0 = largest singular value) of head 3 of layer 5 (an index in ``compute_bases`` order or a
    module name); ``scale=2`` doubles them; ``keep={(5, 3): [0]}`` keeps only mode 0 of that head
    (the others get ``scale``). Several layers and heads at once. Modes are those of ``bases``
    (default ``compute_bases(model, fold_ln=fold_ln)``, from the current weights). The hooks are
    installed now and removed on leaving the block (or by ``.remove()``).
    """
    sites = find_attention(model)
    if bases is None:
        bases = compute_bases(model, fold_ln=fold_ln)
    bases = list(bases)
    names = {s.name for s in sites}
    missing = [b.name for b in bases if b.name not in names]
    if missing:
        raise InterventionError(f"intervene: the bases name layer {missing[0]!r}, which this model does not have; "
                                f"compute them with qkprobe.compute_bases(model).")
    factors = mode_factors(bases, modes, scale, keep)
    edits = [layer_edit(i, bases[i], factors[i]) for i in sorted(factors)]
    return Intervention(model, [e for e in edits if e.heads], sites)
