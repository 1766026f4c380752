"""Summaries of a head's modes that work on torch tensors and numpy arrays alike (no imports)."""


def weighted_cosine(S, cosine):
    """The paper's singular-value-weighted cosine over the last (mode) axis:

        Σ_r s_r cos(u_r, v_r) / Σ_r s_r        S, cosine: (..., R) → (...)

    0 where every s_r is 0. Torch tensors or numpy arrays (the same operations exist in both).
    """
    total = S.sum(-1)
    return (S * cosine).sum(-1) / (total + (total == 0))
