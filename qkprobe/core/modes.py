"""Singular modes of one attention layer's query-key interaction, by the low-rank route.

For head h the attention logit between token i (query side) and token j (key side) is

    scale * q_i · k_j,   q = W_q x + b_q,   k = W_k x' + b_k,

with ``W_q`` (R, D) and ``W_k`` (R, D') (R = head_dim; D' = D for self-attention). The bilinear
part ``x_iᵀ W_qᵀ W_k x_j`` has rank ≤ R. Its SVD ``W_qᵀ W_k = U S Vᵀ`` is computed without the
D × D' matrix:

    W_qᵀ = Q_q R_q,  W_kᵀ = Q_k R_k        (reduced QR, Q: (D, R), R: (R, R); Cholesky-QR of
                                            the R × R Gram matrices, Householder as fallback)
    W_qᵀ W_k = Q_q (R_q R_kᵀ) Q_kᵀ,  R_q R_kᵀ = U_c S V_cᵀ   (SVD of the R × R core)
    U = Q_q U_c,  V = Q_k V_c.

Mode coordinates from the captured q and k (one R × R matrix per head and side):

    a_r = q · (W_k v_r) / s_r = u_r · x + α_r,   α_r = b_q · (W_k v_r) / s_r
    b_r = k · (W_q u_r) / s_r = v_r · x' + β_r,  β_r = b_k · (W_q u_r) / s_r

and, exactly, ``Σ_r s_r a_r b_r = q · k`` (``W_k V S⁻¹ Uᵀ W_qᵀ = I_R`` when W_q, W_k have full
rank R). The offsets α, β carry the biases: α_r s_r b_r holds the key-dependent bias term
``b_qᵀ W_k x'`` (it changes attention); β only adds terms constant over keys for a given query
(softmax ignores them) and the constant ``b_qᵀ b_k``.

Everything here is plain tensor math; nothing knows about model libraries.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ShapeError

Tensor = torch.Tensor


@dataclass
class QKModes:
    """The modes of all heads of one layer (float64 unless stated).

    Shapes: H heads, R = head_dim, M = number of modes (= R when W_q, W_k have full rank),
    D query-side model width, Dk key-side width.

    Attributes:
        U: (H, D, M) query-side singular vectors u_r (columns).
        S: (H, M) singular values, descending.
        V: (H, Dk, M) key-side singular vectors v_r.
        cosine: (H, M) u_r · v_r, or None when D != Dk (cross-attention with another width).
        coord_q: (H, R, M) maps q (bias included) to query coordinates: a = q @ coord_q.
        coord_k: (H, R, M) maps k to key coordinates: b = k @ coord_k.
        a_offset: (H, M) α_r: a_r − u_r·x, from the query bias.
        b_offset: (H, M) β_r: b_r − v_r·x', from the key bias.
        key_bias_term: (H, Dk) b_qᵀ W_k, the bias term that depends on the key token.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    cosine: Optional[Tensor]
    coord_q: Tensor
    coord_k: Tensor
    a_offset: Tensor
    b_offset: Tensor
    key_bias_term: Tensor


def sign_probe(D: int, dtype=torch.float64, device=None) -> Tensor:
    """The fixed vector w (D,) that sets the signs of the modes: u_r · w > 0 for every mode.

    The SVD leaves each pair (u_r, v_r) free up to a common sign; fixing it makes results
    reproducible across runs, devices and solvers (flipping both keeps s_r u_r v_rᵀ). A fixed
    generic vector (seeded Gaussian) gives a rule that needs only R × R work: u_r · w =
    x_rᵀ (W_q w) with U = W_qᵀ X.
    """
    g = torch.Generator().manual_seed(20240522)
    return torch.randn(D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _signs(proj: Tensor) -> Tensor:
    """(H, M) ±1 from the projections u_r · w (0 counts as +)."""
    return torch.where(proj < 0, -torch.ones_like(proj), torch.ones_like(proj))


@contextmanager
def _one_thread():
    """Batched R × R LAPACK calls gain nothing from threads, and OpenMP spin-waiting makes
    them up to 40× slower when another process shares the cores: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def qk_modes(
    W_q: Tensor,
    W_k: Tensor,
    b_q: Optional[Tensor] = None,
    b_k: Optional[Tensor] = None,
    rtol: float = 1e-10,
) -> QKModes:
    """Modes of ``W_q,hᵀ W_k,h`` for every head, in float64, never forming the D × Dk matrix.

    Args:
        W_q: (H, R, D) query weights per head.
        W_k: (H, R, Dk) key weights per head.
        b_q, b_k: (H, R) biases, or None (zero).
        rtol: modes with s_r ≤ rtol · s_max get zero coordinate columns (rank-deficient heads;
            they add nothing to q·k).
    """
    with _one_thread():
        return _qk_modes(W_q, W_k, b_q, b_k, rtol)


def _qk_modes(W_q, W_k, b_q, b_k, rtol) -> QKModes:
    if W_q.dim() != 3 or W_k.dim() != 3 or W_q.shape[:2] != W_k.shape[:2]:
        raise ShapeError(f"W_q and W_k must be (H, R, D) with the same H and R, got "
                         f"{tuple(W_q.shape)} and {tuple(W_k.shape)}; an adapter's weights() gives them per head.")
    H, R, D = W_q.shape
    Dk = W_k.shape[-1]
    W_q = W_q.detach().to(torch.float64)
    W_k = W_k.detach().to(torch.float64)
    b_q = torch.zeros(H, R, dtype=torch.float64, device=W_q.device) if b_q is None \
        else b_q.detach().to(torch.float64).reshape(H, R)
    b_k = torch.zeros(H, R, dtype=torch.float64, device=W_q.device) if b_k is None \
        else b_k.detach().to(torch.float64).reshape(H, R)

    U, S, V, U_c, V_c, R_q, R_k = _low_rank_svd(W_q, W_k)
    keep = S > rtol * S[:, :1].clamp_min(torch.finfo(S.dtype).tiny)
    inv_s = torch.where(keep, 1.0 / S.where(keep, torch.ones_like(S)), torch.zeros_like(S))
    # W_k v_r = R_kᵀ Q_kᵀ Q_k v_c,r = R_kᵀ v_c,r: R × R work instead of R × D
    coord_q = (R_k.transpose(-1, -2) @ V_c) * inv_s.unsqueeze(-2)  # (H, R, M): columns W_k v_r / s_r
    coord_k = (R_q.transpose(-1, -2) @ U_c) * inv_s.unsqueeze(-2)  # (H, R, M): columns W_q u_r / s_r
    a_off = torch.einsum("hr,hrm->hm", b_q, coord_q)
    b_off = torch.einsum("hr,hrm->hm", b_k, coord_k)
    cosine = (U * V).sum(dim=-2) if D == Dk else None
    key_bias_term = torch.einsum("hr,hrd->hd", b_q, W_k)
    return QKModes(U=U, S=S, V=V, cosine=cosine, coord_q=coord_q, coord_k=coord_k,
                   a_offset=a_off, b_offset=b_off, key_bias_term=key_bias_term)


def _cholesky_r(W: Tensor):
    """Upper-triangular R with W Wᵀ = Rᵀ R, so that Wᵀ = Q R with Q = Wᵀ R⁻¹ orthonormal
    (Cholesky-QR). W (H, R, D) → (R (H, R, R), Gram W Wᵀ), or (None, None) when W Wᵀ is not
    positive definite."""
    G = W @ W.transpose(-1, -2)
    L, info = torch.linalg.cholesky_ex(G)
    return (None, None) if bool((info != 0).any()) else (L.transpose(-1, -2), G)


def _orthonormality_error(X: Tensor, G: Tensor) -> float:
    """max |UᵀU − I| for U = Wᵀ X, from the Gram matrix G = W Wᵀ: UᵀU = Xᵀ G X (R × R work)."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return float((X.transpose(-1, -2) @ G @ X - eye).abs().max())


def _low_rank_svd(W_q: Tensor, W_k: Tensor, orth_tol: float = 1e-9):
    """SVD of W_qᵀ W_k through the R × R core R_q R_kᵀ, where W_qᵀ = Q_q R_q, W_kᵀ = Q_k R_k.

    The R factors come from Cholesky-QR (R × R Gram matrices; Q never formed: U = W_qᵀ R_q⁻¹ U_c)
    and, when that loses orthogonality (Cholesky squares the condition number) or the Gram
    matrix is singular, from Householder QR. Returns U (H, D, M), S (H, M), V (H, Dk, M), the
    core's U_c, V_c (H, m, M) and R_q, R_k (H, m, R).
    """
    (R_q, G_q), (R_k, G_k) = _cholesky_r(W_q), _cholesky_r(W_k)
    if R_q is not None and R_k is not None:
        U_c, S, V_ch = torch.linalg.svd(R_q @ R_k.transpose(-1, -2), full_matrices=False)
        V_c = V_ch.transpose(-1, -2)
        X_q = torch.linalg.solve_triangular(R_q, U_c, upper=True)
        X_k = torch.linalg.solve_triangular(R_k, V_c, upper=True)
        if max(_orthonormality_error(X_q, G_q), _orthonormality_error(X_k, G_k)) <= orth_tol:
            w = sign_probe(W_q.shape[-1], W_q.dtype, W_q.device)
            sign = _signs((X_q * (W_q @ w).unsqueeze(-1)).sum(-2)).unsqueeze(-2)  # (H, 1, M)
            X_q, X_k, U_c, V_c = X_q * sign, X_k * sign, U_c * sign, V_c * sign
            # built as (H, M, D) so reductions over D (sign canonicalization) run contiguously
            U = (X_q.transpose(-1, -2) @ W_q).transpose(-1, -2)
            V = (X_k.transpose(-1, -2) @ W_k).transpose(-1, -2)
            return U, S, V, U_c, V_c, R_q, R_k
    Q_q, R_q = torch.linalg.qr(W_q.transpose(-1, -2))  # (H, D, m), (H, m, R)
    Q_k, R_k = torch.linalg.qr(W_k.transpose(-1, -2))  # (H, Dk, m'), (H, m', R)
    U_c, S, V_ch = torch.linalg.svd(R_q @ R_k.transpose(-1, -2), full_matrices=False)
    U_c, V_c = _align_signs(Q_q @ U_c, U_c, V_ch.transpose(-1, -2))
    return Q_q @ U_c, S, Q_k @ V_c, U_c, V_c, R_q, R_k


def _align_signs(U: Tensor, *factors: Tensor):
    """Flip the columns of ``factors`` so that u_r · w > 0 (U (H, D, M), factors (H, ·, M))."""
    sign = _signs(U.transpose(-1, -2) @ sign_probe(U.shape[-2], U.dtype, U.device)).unsqueeze(-2)
    return tuple(f * sign for f in factors)


def full_svd_modes(W_q: Tensor, W_k: Tensor):
    """Reference: SVD of the full D × Dk matrix ``W_qᵀ W_k`` per head, top R modes, float64.

    Slow (O(D³) per head); used by tests and ``benchmarks/bases_speed.py`` only.
    Returns (U (H, D, R), S (H, R), V (H, Dk, R)) with the same sign convention as ``qk_modes``.
    """
    R = W_q.shape[1]
    M = W_q.detach().to(torch.float64).transpose(-1, -2) @ W_k.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, S, V = U[..., :R], S[..., :R], Vh[..., :R, :].transpose(-1, -2)
    U, V = _align_signs(U, U, V)
    return U, S, V


def fold_affine_norm(W: Tensor, b: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor]):
    """Fold a norm's affine map x = γ ⊙ x̂ + β into a projection ``W x + b``.

    W (H, R, D), b (H, R) or None, γ and β (D,) or None. Returns (W', b') with
    ``W' x̂ + b' = W (γ ⊙ x̂ + β) + b``: W' = W diag(γ), b' = b + W β.
    """
    W = W.to(torch.float64)
    b = torch.zeros(W.shape[:2], dtype=torch.float64, device=W.device) if b is None else b.to(torch.float64)
    if beta is not None:
        b = b + W @ beta.detach().to(torch.float64)
    if gamma is not None:
        W = W * gamma.detach().to(torch.float64)
    return W, b


# ----------------------------------------------------------------------------- symmetric / antisymmetric parts

@dataclass
class SymParts:
    """Spectra of the symmetric and antisymmetric parts of M_h = W_q,hᵀ W_k,h, all heads (float64).

    Shapes: H heads, n = min(2R, D) (the dimension of the span of W_q,hᵀ and W_k,hᵀ).

    Attributes:
        sym: (H, n) eigenvalues of (M + Mᵀ)/2, descending (signed; the other D − n are 0).
            Positive: directions a token shares with the tokens it attends to (grouping-like).
        antisym: (H, n // 2) ω_j ≥ 0 of the eigenvalue pairs ±iω_j of (M − Mᵀ)/2, descending
            (rotation-like: a plane in which query and key directions are turned by 90°).
    """

    sym: Tensor
    antisym: Tensor


def sym_antisym_spectra(W_q: Tensor, W_k: Tensor) -> Optional[SymParts]:
    """Eigenvalues of the symmetric part and the imaginary-pair magnitudes of the antisymmetric
    part of ``M_h = W_q,hᵀ W_k,h`` for every head, in float64, never forming the D × D matrix.

    M maps into span(W_qᵀ) and from span(W_kᵀ), so with Q (D, 2R) an orthonormal basis of the
    span of ``[W_qᵀ W_kᵀ]`` (Householder QR ``[W_qᵀ W_kᵀ] = Q T``), ``M = Q C Qᵀ`` exactly with the
    2R × 2R core ``C = T[:, :R] T[:, R:]ᵀ``; (C ± Cᵀ)/2 then have the non-zero spectra of
    (M ± Mᵀ)/2. W_q: (H, R, D), W_k: (H, R, Dk). None when D != Dk (M is not square: no
    symmetric part). When 2R ≥ D the D × D matrix itself is no larger and is used.
    """
    if W_q.dim() != 3 or W_k.dim() != 3 or W_q.shape[:2] != W_k.shape[:2]:
        raise ShapeError(f"W_q and W_k must be (H, R, D) with the same H and R, got "
                         f"{tuple(W_q.shape)} and {tuple(W_k.shape)}; an adapter's weights() gives them per head.")
    H, R, D = W_q.shape
    if W_k.shape[-1] != D:
        return None
    W_q = W_q.detach().to(torch.float64)
    W_k = W_k.detach().to(torch.float64)
    with _one_thread():
        if 2 * R >= D:
            C = W_q.transpose(-1, -2) @ W_k  # (H, D, D): no larger than the 2R × 2R core
        else:
            # Householder QR, R factor only (Q is never needed): (H, 2R, 2R)
            T = torch.linalg.qr(torch.cat([W_q, W_k], dim=1).transpose(-1, -2), mode="r").R
            C = T[..., :R] @ T[..., R:].transpose(-1, -2)  # (H, 2R, 2R) = Qᵀ M Q
        return _sym_parts(C)


def _sym_parts(C: Tensor) -> SymParts:
    """Spectra of the parts of C (H, n, n): eigvalsh of (C + Cᵀ)/2 and, for K = (C − Cᵀ)/2, the
    ω_j of its eigenvalue pairs ±iω_j. K is normal, so its singular values are the |±iω_j|, each
    twice (descending): every other one is the pair's ω (absolute accuracy ε‖K‖, unlike
    square roots of the eigenvalues of KᵀK)."""
    Ct = C.transpose(-1, -2)
    sym = torch.linalg.eigvalsh((C + Ct) / 2).flip(-1)  # (H, n) descending
    n = C.shape[-1]
    omega = torch.linalg.svdvals((C - Ct) / 2)[..., 0:2 * (n // 2):2]  # (H, n // 2)
    return SymParts(sym=sym, antisym=omega)


def full_sym_antisym(W_q: Tensor, W_k: Tensor) -> SymParts:
    """Reference: the same spectra from the full D × D matrix per head (O(D³); tests only).
    sym: (H, D) descending; antisym: (H, D // 2) descending."""
    M = W_q.detach().to(torch.float64).transpose(-1, -2) @ W_k.detach().to(torch.float64)
    sym = torch.linalg.eigvalsh((M + M.transpose(-1, -2)) / 2).flip(-1)
    imag = torch.linalg.eigvals((M - M.transpose(-1, -2)) / 2).imag  # ±ω_j (and zeros)
    omega = imag.sort(dim=-1, descending=True).values[..., : M.shape[-1] // 2].clamp_min(0.0)
    return SymParts(sym=sym, antisym=omega)
