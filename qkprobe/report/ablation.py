"""The report section "what removing each mode does", from ``qkprobe ablate`` files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .. import plot
from ..sinks.ablate_file import open_ablation
from . import html as H

MAX_ROWS = 20


def has_top1(ab) -> bool:
    """Whether an ablation has a top-1 agreement to show: a classifier's (measure ``kl``) with at
    least one finite value (a feature model has no classes, so no top-1)."""
    return ab.measure == "kl" and bool(np.isfinite(ab.mean("top1_agreement")).any())


def ablation_section(ctx, paths: Sequence, band_quantile: float = 0.99,
                     names: Optional[Sequence[str]] = None) -> Tuple[str, list]:
    """HTML of the section and its data (per file: mode labels, cosine, share, mean effects);
    ``names``: a short label per file (default its model spec)."""
    if not paths:
        return "", []
    parts = ['<h2 id="ablation">What removing each mode does</h2>']
    data = []
    for ai, path in enumerate(paths):
        ab = open_ablation(path)
        eff, top1, dp = ab.mean("effect"), ab.mean("top1_agreement"), ab.mean("attn_change")
        spec = str(ab.meta.get("model_spec", "")) + (" (random init)" if ab.meta.get("random_init") else "")
        spec = (names[ai] if names and names[ai] else "") or spec
        scale = (ab.meta.get("options") or {}).get("scale", 0.0)
        labels = ab.labels()
        width = ab.meta.get("model_width")  # the random-pair band needs the width of u_r, v_r
        band = plot.random_cosine_band(width, band_quantile) if isinstance(width, int) and width > 1 else None
        measure = "KL(p ‖ p′) of the class probabilities" if ab.measure == "kl" else \
            "1 − cos(e, e′) of the embedding"
        fig = plot.ablation_effects(ab.cosine, ab.attn_share, eff, measure=ab.measure, band=band, labels=labels,
                                    layers=ab.layer, title=f"what removing each mode does — {spec}")
        src = ctx.save(fig, f"ablation{ai}.png")
        done = int(ab.done.sum())
        top1_text = "top-1: share of images whose top class stays; " if has_top1(ab) else ""
        parts.append(f'<p class="note"><code>{H.esc(Path(path).name)}</code>: {len(labels)} modes × '
                     f'{len(ab.images)} images ({done} of {ab.done.size} pairs done) of {H.esc(spec)}; '
                     f'each mode\'s coordinate times {scale:g} during the forward (<code>qkprobe.intervene</code>). '
                     f'Effect: {measure}, mean over '
                     f'images; {top1_text}|ΔP|: mean absolute change of the head\'s attention.</p>')
        parts.append(H.figure(src, "output change against the mode's cosine and attention share"))
        order = np.argsort(-np.nan_to_num(eff, nan=-np.inf))[:MAX_ROWS]
        cols = ["mode", "layer", "s", "cos", "share", "effect"] + (["top-1"] if has_top1(ab) else []) + ["|ΔP|"]
        rows = [[labels[i], f"<code>{H.esc(ab.layer_name[i])}</code>", f"{ab.singular_value[i]:.3g}",
                 f"{ab.cosine[i]:+.3f}", f"{ab.attn_share[i]:+.3f}", f"{eff[i]:.3g}"]
                + (["–" if not np.isfinite(top1[i]) else f"{top1[i]:.2f}"] if has_top1(ab) else []) + [f"{dp[i]:.3g}"]
                for i in order]
        parts.append(H.table(cols, rows, numeric=tuple(range(2, len(cols)))))
        data.append({"file": str(path), "measure": ab.measure, "labels": labels, "cosine": ab.cosine.tolist(),
                     "attn_share": ab.attn_share.tolist(), "effect": eff.tolist(), "top1_agreement": top1.tolist(),
                     "attn_change": dp.tolist()})
    return "\n".join(parts), data
