"""Figures of the paper as matplotlib figures (shared by the CLI and, later, the report).

All functions take plain per-layer summaries so they serve bases files, run files and live
:class:`~qkprobe.bases.LayerBases` alike.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def layer_summaries(bases: Sequence) -> List[Dict[str, float]]:
    """Per layer: ``mean_cosine`` (mean over heads and modes of u_r·v_r) and
    ``weighted_cosine`` (mean over heads of Σ_r (s_r/Σs) cos_r, the paper's S-weighted cosine).

    ``bases``: LayerBases objects, or dicts with arrays ``S`` (H, R) and ``cosine`` (H, R).
    """
    out = []
    for lb in bases:
        S = np.asarray(lb["S"] if isinstance(lb, dict) else lb.S.cpu().numpy(), dtype=np.float64)
        cos = np.asarray(lb["cosine"] if isinstance(lb, dict) else lb.cosine.cpu().numpy(), dtype=np.float64)
        w = S / np.maximum(S.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
        out.append({"mean_cosine": float(np.nanmean(cos)),
                    "weighted_cosine": float(np.nanmean((w * cos).sum(-1)))})
    return out


def relative_depth(n_layers: int) -> np.ndarray:
    """x axis of the layer curve: 0 for the first layer, 1 for the last."""
    return np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)


def layer_curve(series: Dict[str, Sequence[Dict[str, float]]], ax=None, title: str = ""):
    """The paper's layer curve: mean cosine (dashed) and S-weighted cosine (solid) per layer,
    x = relative depth, one colour per series (e.g. per model). Returns the figure."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (label, rows) in enumerate(series.items()):
        x = relative_depth(len(rows))
        color = f"C{i}"
        ax.plot(x, [r["weighted_cosine"] for r in rows], "-o", color=color, ms=3, label=f"{label} (S-weighted)")
        ax.plot(x, [r["mean_cosine"] for r in rows], "--", color=color, alpha=0.7, label=f"{label} (mean)")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("cosine(u_r, v_r)")
    ax.set_title(title or "query-key mode cosine per layer")
    ax.legend(fontsize=7)
    return fig or ax.figure
