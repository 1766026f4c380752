"""Summaries of a head's modes that work on torch tensors and numpy arrays alike (no imports)."""


def weighted_cosine(S, cosine):
    """The paper's singular-value-weighted cosine over the last (mode) axis:

        Σ_r s_r cos(u_r, v_r) / Σ_r s_r        S, cosine: (..., R) → (...)

    0 where every s_r is 0. Torch tensors or numpy arrays (the same operations exist in both).
    The official notebook's "weighted cosine" is mean_r(cos_r · s_r/Σs), i.e. this value divided
    by R (the number of modes): the same layer-curve shape.
    """
    total = S.sum(-1)
    return (S * cosine).sum(-1) / (total + (total == 0))


def symmetric_energy_fraction(sym, antisym):
    """The share of a head's query-key matrix M in its symmetric part, over the last axis:

        ‖(M + Mᵀ)/2‖²_F / ‖M‖²_F = Σ λ² / (Σ λ² + 2 Σ ω²)      sym: (..., n), antisym: (..., m) → (...)

    from the eigenvalues λ of the symmetric part and the pair magnitudes ω of the antisymmetric
    part (each pair ±iω contributes 2ω² to ‖(M − Mᵀ)/2‖²_F; the two parts are orthogonal, so
    their energies add to ‖M‖²_F = Σ s_r²). 1: grouping-like (x·Mx' symmetric: similar tokens
    attend to each other); 0: rotation-like (purely antisymmetric). 0 where M = 0.
    """
    e_sym = (sym * sym).sum(-1)
    total = e_sym + 2 * (antisym * antisym).sum(-1)
    return e_sym / (total + (total == 0))
