"""How far a head's singular subspaces moved: principal angles between two bases.

For orthonormal U0, U1 (H, D, R), the cosines of the principal angles between span(U0[h]) and
span(U1[h]) are the singular values of U0[h]ᵀ U1[h] (R × R). Angles are in radians, ascending;
the largest one says how much of the subspace turned.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def principal_angles(U0: Tensor, U1: Tensor) -> Tensor:
    """(H, R) principal angles (radians, ascending) between span(U0[h]) and span(U1[h]).

    U0, U1: (H, D, R) with orthonormal columns (the U or V of :class:`qkprobe.LayerBases`).
    NaN columns (a layer whose weights became NaN) give NaN angles.
    """
    M = U0.transpose(-1, -2).to(torch.float64) @ U1.to(torch.float64)
    if not torch.isfinite(M).all():
        return torch.full(M.shape[:-1], float("nan"), dtype=torch.float64)
    s = torch.linalg.svdvals(M).clamp(-1.0, 1.0)
    return torch.arccos(s)  # svdvals descend, so the angles ascend
