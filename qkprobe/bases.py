"""``compute_bases``: the singular modes of every attention layer of a model.

Bias treatment. With x the attention input (after the block's norm), q = W_q x + b_q and
k = W_k x + b_k, the logit is

    s·q_i·k_j = s·[x_iᵀ W_qᵀW_k x_j  +  b_qᵀW_k x_j  +  x_iᵀ W_qᵀ b_k  +  b_qᵀ b_k].

``U, S, V`` decompose the first (bilinear) term. The second, ``key_bias_term`` = b_qᵀW_k (one
D-vector per head), depends on the key token and so changes attention; the last two are constant
over keys for a given query and cancel in the softmax. The mode coordinates of
:func:`qkprobe.mode_coordinates` carry all terms exactly through their offsets
(``a_offset``, ``b_offset``).

``fold_ln=True`` folds the affine weight γ and bias β of the LayerNorm feeding each attention
module into the factors (W' = W diag(γ), b' = b + Wβ), so U and V live in the space of the
normalized, un-scaled token x̂. Layers without such a norm (post-LN models like BERT) are left
as they are and say so in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn

from .adapters.base import QKWeights
from .adapters.discover import AttentionSite, find_attention, prefix_tokens
from .core.modes import QKModes, fold_affine_norm, qk_modes, sym_antisym_spectra
from .core.summary import symmetric_energy_fraction, weighted_cosine

Tensor = torch.Tensor


@dataclass
class LayerBases:
    """Singular modes of one attention layer (all tensors float64, on the CPU).

    Shapes: H = ``num_heads``, R = ``head_dim`` (= number of modes), D = model width at the
    query input, Dk = at the key input.

    Attributes:
        name: module path in the model. family: adapter name.
        U: (H, D, R) query-side singular vectors. V: (H, Dk, R) key-side ones.
        S: (H, R) singular values of W_q,hᵀW_k,h, descending.
        cosine: (H, R) u_r·v_r (NaN when D != Dk).
        scale: logit scale. prefix_tokens: class/distillation/register tokens (None if unknown).
        extras: what makes the logits not a pure bilinear form of the input
            (``qk_norm``, ``rope``, ``rel_pos_bias``; empty when exactly bilinear).
        key_bias_term: (H, Dk) b_qᵀ W_k. a_offset, b_offset: (H, R) coordinate offsets.
        coord_q, coord_k: (H, R, R) maps from captured q, k to mode coordinates.
        fold_ln: whether a norm's affine map was folded in. notes: remarks for the user.
        sym_eigvals: (H, n) eigenvalues of the symmetric part (M + Mᵀ)/2 of M = W_q,hᵀW_k,h,
            descending, n = min(2R, D); antisym_eigvals: (H, n // 2) magnitudes ω of the
            eigenvalue pairs ±iω of (M − Mᵀ)/2 (see :func:`qkprobe.core.modes.sym_antisym_spectra`).
            Both None when D != Dk.
    """

    name: str
    family: str
    num_heads: int
    head_dim: int
    U: Tensor
    S: Tensor
    V: Tensor
    cosine: Tensor
    scale: float
    prefix_tokens: Optional[int]
    extras: FrozenSet[str]
    key_bias_term: Tensor
    a_offset: Tensor
    b_offset: Tensor
    coord_q: Tensor
    coord_k: Tensor
    fold_ln: bool = False
    notes: Tuple[str, ...] = field(default_factory=tuple)
    sym_eigvals: Optional[Tensor] = None
    antisym_eigvals: Optional[Tensor] = None

    @property
    def num_modes(self) -> int:
        return self.S.shape[-1]

    def weighted_cosine(self) -> Tensor:
        """(H,) the paper's singular-value-weighted cosine per head: Σ_r (s_r/Σs) cos_r."""
        return weighted_cosine(self.S, self.cosine)

    def symmetric_energy_fraction(self) -> Tensor:
        """(H,) ‖(M + Mᵀ)/2‖²_F / ‖M‖²_F per head (NaN when D != Dk): grouping-like (1) vs
        rotation-like (0); see :func:`qkprobe.core.summary.symmetric_energy_fraction`."""
        if self.sym_eigvals is None or self.antisym_eigvals is None:
            return torch.full((self.num_heads,), float("nan"), dtype=torch.float64)
        return symmetric_energy_fraction(self.sym_eigvals, self.antisym_eigvals)

    def layer_summary(self) -> dict:
        """Mean cosine and mean (over heads) S-weighted cosine of the layer."""
        return {"mean_cosine": float(self.cosine.mean()),
                "weighted_cosine": float(self.weighted_cosine().mean())}


def _weights_of(site: AttentionSite, fold_ln: bool) -> Tuple[QKWeights, bool, Tuple[str, ...]]:
    w = site.adapter.weights(site.module)
    notes = tuple(w.notes)
    if not fold_ln:
        return w, False, notes
    norm = site.adapter.input_norm(site.module, site.parent, ancestors=site.ancestors)
    if norm is None:
        return w, False, notes + ("fold_ln: no LayerNorm feeds this module directly (post-norm?); not folded",)
    gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
    W_q, b_q = fold_affine_norm(w.W_q, w.b_q, gamma, beta)
    W_k, b_k = fold_affine_norm(w.W_k, w.b_k, gamma, beta)
    folded = QKWeights(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=w.scale, extras=w.extras, notes=w.notes)
    return folded, True, notes + (f"fold_ln: folded {type(norm).__name__} affine weight/bias",)


def layer_bases(site: AttentionSite, model: nn.Module, fold_ln: bool = False,
                n_prefix: Optional[int] = None, spectra: bool = True) -> LayerBases:
    """The modes of one attention site (see :func:`compute_bases`). ``spectra=False`` leaves out
    the symmetric/antisymmetric spectra (``sym_eigvals``, ``antisym_eigvals`` None), about half
    the cost, for callers that only need the modes and coordinate maps."""
    w, folded, notes = _weights_of(site, fold_ln)
    with torch.no_grad():
        m: QKModes = qk_modes(w.W_q.detach().cpu(), w.W_k.detach().cpu(),
                              None if w.b_q is None else w.b_q.detach().cpu(),
                              None if w.b_k is None else w.b_k.detach().cpu())
        parts = sym_antisym_spectra(w.W_q.detach().cpu(), w.W_k.detach().cpu()) if spectra else None
    extras = w.extras
    refine = getattr(site.adapter, "model_extras", None)
    if refine is not None:
        extras = refine(site.module, model, extras)
    cosine = m.cosine if m.cosine is not None else torch.full_like(m.S, float("nan"))
    return LayerBases(name=site.name, family=site.adapter.name, num_heads=w.num_heads, head_dim=w.head_dim,
                      U=m.U, S=m.S, V=m.V, cosine=cosine, scale=w.scale, prefix_tokens=n_prefix,
                      extras=frozenset(extras), key_bias_term=m.key_bias_term, a_offset=m.a_offset,
                      b_offset=m.b_offset, coord_q=m.coord_q, coord_k=m.coord_k, fold_ln=folded, notes=notes,
                      sym_eigvals=None if parts is None else parts.sym,
                      antisym_eigvals=None if parts is None else parts.antisym)


def compute_bases(model: nn.Module, fold_ln: bool = False, strict: bool = False) -> List[LayerBases]:
    """One :class:`LayerBases` per attention layer of ``model``, in forward order.

    Uses the low-rank route in float64 (QR of W_qᵀ and W_kᵀ, SVD of the R × R core); the
    D × D matrix W_qᵀW_k is never formed. See the module docstring for biases and ``fold_ln``.
    ``strict=True`` raises on attention-like modules no adapter knows instead of skipping them.
    """
    sites = find_attention(model, strict=strict)
    n_prefix = prefix_tokens(model)
    return [layer_bases(s, model, fold_ln=fold_ln, n_prefix=n_prefix) for s in sites]
