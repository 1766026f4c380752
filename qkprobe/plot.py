"""Figures of the paper as matplotlib figures (shared by the CLI, notebooks and `qkprobe report`).

All functions take plain per-layer summaries so they serve bases files, run files and live
:class:`~qkprobe.bases.LayerBases` alike.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .core.summary import symmetric_energy_fraction, weighted_cosine


def layer_summaries(bases: Sequence) -> List[Dict[str, float]]:
    """Per layer: ``mean_cosine`` (mean over heads and modes of u_r·v_r),
    ``weighted_cosine`` (mean over heads of Σ_r (s_r/Σs) cos_r, the paper's S-weighted cosine) and
    ``positive_fraction`` (the fraction of the layer's modes with cos(u_r, v_r) > 0).

    ``bases``: LayerBases objects, or dicts with arrays ``S`` (H, R) and ``cosine`` (H, R).
    """
    out = []
    for lb in bases:
        S = np.asarray(lb["S"] if isinstance(lb, dict) else lb.S.cpu().numpy(), dtype=np.float64)
        cos = np.asarray(lb["cosine"] if isinstance(lb, dict) else lb.cosine.cpu().numpy(), dtype=np.float64)
        finite = np.isfinite(cos)
        out.append({"mean_cosine": float(np.nanmean(cos)),
                    "weighted_cosine": float(np.nanmean(head_weighted_cosine(S, cos))),
                    "positive_fraction": float((cos[finite] > 0).mean()) if finite.any() else float("nan")})
    return out


def relative_depth(n_layers: int) -> np.ndarray:
    """x axis of the layer curve: 0 for the first layer, 1 for the last."""
    return np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)


def layer_curve(series: Dict[str, Sequence[Dict[str, float]]], ax=None, title: str = ""):
    """The paper's layer curve: mean cosine (dashed) and S-weighted cosine (solid) per layer,
    x = relative depth, one colour per series (e.g. per model). Returns the figure."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (label, rows) in enumerate(series.items()):
        x = relative_depth(len(rows))
        color = f"C{i}"
        ax.plot(x, [r["weighted_cosine"] for r in rows], "-o", color=color, ms=3, label=f"{label} (S-weighted)")
        ax.plot(x, [r["mean_cosine"] for r in rows], "--", color=color, alpha=0.7, label=f"{label} (mean)")
    return _finish_depth_plot(fig, ax, "cosine(u_r, v_r)", title or "query-key mode cosine per layer", 0.8)


def layer_curves(path, ax=None, title: str = "", per_model_legend: Optional[bool] = None,
                 name: Optional[str] = None):
    """The paper's Figure 2 from a ``qkprobe bases`` file: every model's S-weighted cosine per layer
    (mean over heads of Σ_r (s_r/Σs) cos_r) over relative depth, coloured by the model's group
    (training objective where the library's metadata says it, else family; see
    :func:`qkprobe.zoo.group_of`). A single-model bases file gives one curve.

    The official notebook's "weighted cosine" is mean_r(cos_r · s_r/Σs), i.e. this value divided
    by R: the same curve shape. ``per_model_legend``: one legend entry per model (default when
    there are at most 12), else one per group. ``name``: the legend label of a single-model file
    (default its recorded model spec, never the file's path). Returns the figure.
    """
    from .sinks.bases_file import ZOO_KIND, file_kind, read_bases, read_zoo
    kind = file_kind(str(path))
    if kind == ZOO_KIND:
        zoo = read_zoo(str(path))
        models = [(m["attrs"].get("model_spec", key), str(m["attrs"].get("group", "")), m["layers"])
                  for key, m in zoo["models"].items()]
    else:
        models = [(name or bases_label(str(path)), "", read_bases(str(path)))]
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    groups = list(dict.fromkeys(g for _, g, _ in models))
    per_model = len(models) <= 12 if per_model_legend is None else per_model_legend
    seen: set = set()
    in_group: Dict[str, int] = {}
    for spec, group, layers in models:
        k = in_group[group] = in_group.get(group, -1) + 1  # models of one colour get their own dash
        rows = layer_summaries(layers)
        color = f"C{groups.index(group) % 10}"
        if per_model:
            label = f"{spec} — {group}" if group else spec
        else:
            label = group if group not in seen else None
            seen.add(group)
        ax.plot(relative_depth(len(rows)), [r["weighted_cosine"] for r in rows], marker="o", ms=2.5, lw=1.2,
                color=color, alpha=0.85, label=label,
                linestyle=("-", "--", ":", "-.")[k % 4] if per_model else "-")
    if not models:
        ax.text(0.5, 0.5, "no complete model in the file", ha="center", transform=ax.transAxes)
    return _finish_depth_plot(fig, ax, "S-weighted cosine (mean over heads)",
                              title or "S-weighted query-key cosine per layer", 0.8)


def bases_label(path: str) -> str:
    """A short label of a single-model bases file: its recorded model spec (plus "random init"),
    else the file's name without folder."""
    import os

    import h5py
    with h5py.File(path, "r") as f:
        spec, random_init = f.attrs.get("model_spec"), f.attrs.get("random_init")
    if not isinstance(spec, str) or not spec:
        return os.path.basename(path)
    return spec + (" (random init)" if random_init is not None and bool(random_init) else "")


# --------------------------------------------------------------------------- helpers

def wrap(text: str, width: int = 90) -> str:
    """``text`` broken into lines of at most ``width`` characters (titles never run off a figure)."""
    import textwrap
    return "\n".join(textwrap.wrap(str(text), width)) if len(str(text)) > width else str(text)

def _finish_depth_plot(fig, ax, ylabel: str, title: str, zero_width: float):
    """Zero line, labels, title and legend of a curve over relative depth; the figure (made
    here when ``fig`` is not None, else the axes' own)."""
    ax.axhline(0.0, color="0.5", lw=zero_width)
    ax.set_xlabel("relative depth")
    ax.set_ylabel(ylabel)
    ax.set_title(wrap(title, 70))
    ax.legend(fontsize=7)
    if fig is not None:
        fig.tight_layout()
    return fig or ax.figure


def _pyplot():
    """pyplot, on the Agg backend unless the caller (a notebook, a GUI script, MPLBACKEND) chose one."""
    import os
    import sys
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n: int, max_cols: int):
    cols = max(1, min(n, max_cols))
    return cols, max(1, -(-n // cols))


def random_cosine_band(dim: int, quantile: float = 0.99) -> float:
    """The ``quantile`` of |cos| between two independent uniformly random unit vectors in R^dim.

    Exact: for such vectors t = cos θ has density ∝ (1 − t²)^((dim−3)/2), i.e.
    (1 + t)/2 ~ Beta((dim−1)/2, (dim−1)/2), so the band is 2·F⁻¹((1 + quantile)/2) − 1 with F the
    Beta CDF (scipy's ``betaincinv``). |cos| of a random pair falls inside ±band with probability
    ``quantile``.
    """
    dim = int(dim)
    if dim < 2:
        return 1.0
    from scipy.special import betaincinv
    a = (dim - 1) / 2.0
    return float(2.0 * betaincinv(a, a, (1.0 + float(quantile)) / 2.0) - 1.0)


def head_weighted_cosine(S, cosine) -> np.ndarray:
    """(H,) Σ_r (s_r/Σs) cos_r per head (the S-weighted cosine of each head)."""
    return weighted_cosine(np.asarray(S, dtype=np.float64), np.asarray(cosine, dtype=np.float64))


# --------------------------------------------------------------------------- spectra

def spectrum_panel(S, cosine, band: Optional[float] = None, heads: Optional[Sequence[int]] = None,
                   title: str = "", max_cols: int = 6):
    """Singular values (top row) and cosine(u_r, v_r) (bottom row) of every mode, one column per
    head, with the random-pair band ±``band`` shaded (cosines outside it coloured: red > 0,
    blue < 0). ``S``, ``cosine``: (H, R). ``heads``: labels of the columns (default 0..H-1).
    Returns the figure."""
    plt = _pyplot()
    S = np.atleast_2d(np.asarray(S, dtype=np.float64))
    cos = np.atleast_2d(np.asarray(cosine, dtype=np.float64))
    H, R = S.shape
    heads = list(range(H)) if heads is None else list(heads)
    fig, cells = _head_pairs(plt, H, max_cols, height_ratios=(1, 1.25))
    x = np.arange(R)
    wcos = head_weighted_cosine(S, cos)
    for i, top, bot, first in cells:
        top.bar(x, S[i], width=1.0, color="0.35")
        top.set_title(f"H{heads[i]}  S-wtd cos {wcos[i]:+.3f}", fontsize=8)
        top.tick_params(labelsize=6)
        top.set_xlim(-0.5, R - 0.5)
        if band is not None:
            bot.axhspan(-band, band, color="0.85", lw=0)
        c = cos[i]
        colors = np.where(c > (band or 0.0), "tab:red", np.where(c < -(band or 0.0), "tab:blue", "0.45"))
        bot.scatter(x, c, s=6, c=colors, lw=0)
        bot.axhline(0.0, color="0.5", lw=0.6)
        bot.set_ylim(-1.0, 1.0)
        bot.set_xlim(-0.5, R - 0.5)
        bot.tick_params(labelsize=6)
        if first:
            top.set_ylabel("singular value", fontsize=7)
            bot.set_ylabel("cos(u_r, v_r)", fontsize=7)
        bot.set_xlabel("mode r", fontsize=7)
    return _finish_panel(fig, title)


def _head_pairs(plt, H: int, max_cols: int, height_ratios=(1, 1)):
    """A figure with two stacked axes per head on a grid of at most ``max_cols`` columns: returns
    ``(fig, [(head position i, top axes, bottom axes, first column?), ...])``; the unused cells
    are switched off."""
    cols, rows = _grid(H, max_cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(2.3 * cols, 3.4 * rows), dpi=100, squeeze=False,
                             gridspec_kw={"height_ratios": list(height_ratios) * rows})
    cells = []
    for i in range(rows * cols):
        top, bot = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i >= H:
            top.axis("off")
            bot.axis("off")
        else:
            cells.append((i, top, bot, i % cols == 0))
    return fig, cells


def _finish_panel(fig, title: str):
    if title:
        fig.suptitle(wrap(title, int(fig.get_figwidth() * 14)), fontsize=9)
    fig.tight_layout()
    return fig


def sym_fraction_reading(fraction: float) -> str:
    """One line reading a symmetric energy fraction (of a head, or a layer's mean over heads)."""
    if not np.isfinite(fraction):
        return "no symmetric part (query and key widths differ)"
    kind = ("grouping-like (mostly symmetric: tokens attend to tokens like themselves)" if fraction >= 0.6 else
            "rotation-like (mostly antisymmetric: tokens attend along turned directions)" if fraction <= 0.4 else
            "mixed grouping and rotation")
    return f"symmetric energy fraction {fraction:.2f}: {kind}"


def sym_antisym_panel(sym, antisym, heads: Optional[Sequence[int]] = None, title: str = "", max_cols: int = 6):
    """Symmetric and antisymmetric parts of W_qᵀW_k per head: top row, the eigenvalues of
    (M + Mᵀ)/2 (descending; red > 0, blue < 0); bottom row, the magnitudes ω of the eigenvalue
    pairs ±iω of (M − Mᵀ)/2; each head titled with its symmetric energy fraction.
    ``sym``: (H, n), ``antisym``: (H, n // 2). Returns the figure."""
    plt = _pyplot()
    sym = np.atleast_2d(np.asarray(sym, dtype=np.float64))
    anti = np.atleast_2d(np.asarray(antisym, dtype=np.float64))
    H = sym.shape[0]
    heads = list(range(H)) if heads is None else list(heads)
    frac = symmetric_energy_fraction(sym, anti)
    fig, cells = _head_pairs(plt, H, max_cols)
    top_lim = max(float(np.abs(sym).max(initial=0.0)), float(anti.max(initial=0.0))) * 1.05 or 1.0
    for i, top, bot, first in cells:
        x = np.arange(sym.shape[1])
        top.bar(x, sym[i], width=1.0, color=np.where(sym[i] >= 0, "tab:red", "tab:blue"))
        top.axhline(0.0, color="0.5", lw=0.6)
        top.set_ylim(-top_lim, top_lim)
        top.set_title(f"H{heads[i]}  sym frac {frac[i]:.2f}", fontsize=8)
        bot.bar(np.arange(anti.shape[1]), anti[i], width=1.0, color="tab:purple")
        bot.set_ylim(0.0, top_lim)
        for ax in (top, bot):
            ax.tick_params(labelsize=6)
        if first:
            top.set_ylabel("eig (M+Mᵀ)/2", fontsize=7)
            bot.set_ylabel("|eig| (M−Mᵀ)/2 pairs", fontsize=7)
        bot.set_xlabel("index", fontsize=7)
    return _finish_panel(fig, title)


# --------------------------------------------------------------------------- mode importance

def share_summary(cosine, share, band: float) -> Dict[str, float]:
    """Attention share (mean over heads of Σ share) carried by modes with cos > band
    (``similar``), cos < −band (``dissimilar``) and inside the band (``neutral``), and the
    share-weighted cosine Σ share·cos (mean over heads). ``cosine``, ``share``: (H, R)."""
    cos = np.atleast_2d(np.asarray(cosine, dtype=np.float64))
    sh = np.atleast_2d(np.asarray(share, dtype=np.float64))
    sh = np.where(np.isfinite(sh), sh, 0.0)
    pos, neg = cos > band, cos < -band
    return {"similar": float((sh * pos).sum(-1).mean()), "dissimilar": float((sh * neg).sum(-1).mean()),
            "neutral": float((sh * ~(pos | neg)).sum(-1).mean()),
            "share_weighted_cosine": float((sh * cos).sum(-1).mean())}


def mode_importance(cosine, share, band: Optional[float] = None, heads: Optional[Sequence[int]] = None,
                    ax=None, title: str = ""):
    """Which modes carry a head's attention: x = cosine(u_r, v_r), y = the mode's mean attention
    share (statistic ``attn_share``), one colour per head; the random-pair band is shaded.
    ``cosine``, ``share``: (H, R) or (R,). Returns the figure."""
    plt = _pyplot()
    cos = np.atleast_2d(np.asarray(cosine, dtype=np.float64))
    sh = np.atleast_2d(np.asarray(share, dtype=np.float64))
    heads = list(range(cos.shape[0])) if heads is None else list(heads)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    if band is not None:
        ax.axvspan(-band, band, color="0.88", lw=0)
    for i in range(cos.shape[0]):
        ax.scatter(cos[i], sh[i], s=9, color=f"C{i % 10}", lw=0, label=f"H{heads[i]}")
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.axvline(0.0, color="0.5", lw=0.6)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("cos(u_r, v_r)", fontsize=7)
    ax.set_ylabel("mean attention share", fontsize=7)
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=8)
    if cos.shape[0] <= 12:
        ax.legend(fontsize=5, markerscale=0.8, ncol=2, loc="upper left", frameon=False)
    return fig or ax.figure


def mode_importance_layers(cosines: Sequence, shares: Sequence, band: Optional[float] = None,
                           names: Optional[Sequence[str]] = None, heads: Optional[Sequence] = None,
                           max_cols: int = 4):
    """:func:`mode_importance` for every layer on one figure (one panel per layer)."""
    plt = _pyplot()
    n = len(cosines)
    cols, rows = _grid(n, max_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols, i % cols]
        if i >= n:
            ax.axis("off")
            continue
        mode_importance(cosines[i], shares[i], band=band, ax=ax,
                        heads=None if heads is None else heads[i],
                        title=names[i] if names is not None else f"layer {i}")
    fig.tight_layout()
    return fig


def share_by_sign(rows: Sequence[Dict[str, float]], ax=None, title: str = ""):
    """Per layer (x = relative depth), the attention share carried by modes outside the band on
    the similar side (cos > band), the dissimilar side (cos < −band) and inside it, from
    :func:`share_summary` rows. Returns the figure."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    x = relative_depth(len(rows))
    for key, color, label in (("similar", "tab:red", "cos > band (similar tokens)"),
                              ("dissimilar", "tab:blue", "cos < −band (dissimilar tokens)"),
                              ("neutral", "0.5", "|cos| ≤ band")):
        ax.plot(x, [r[key] for r in rows], "-o", ms=3, color=color, label=label)
    return _finish_depth_plot(fig, ax, "attention share (mean over heads)",
                              title or "which modes carry the attention", 0.6)


# --------------------------------------------------------------------------- optimal images

def overlay(image, qmap, kmap, dim: float = 0.5) -> np.ndarray:
    """The paper's overlay: query map in red, key map in cyan (green + blue) over a dimmed grey
    copy of ``image``, white where both are high.

    image: (h, w, 3) floats in [0, 1] (or uint8). qmap, kmap: (h, w) in [0, 1] (see
    :func:`normalize_map`). Returns (h, w, 3) float in [0, 1].
    """
    img = np.asarray(image, dtype=np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    gray = img[..., :3].mean(-1) if img.ndim == 3 else img
    q = np.clip(np.asarray(qmap, dtype=np.float64), 0, 1)
    k = np.clip(np.asarray(kmap, dtype=np.float64), 0, 1)
    base = dim * gray * (1.0 - np.maximum(q, k))
    return np.clip(np.stack([base + q, base + k, base + k], axis=-1), 0.0, 1.0)


def normalize_map(values, size=None, vmax: Optional[float] = None) -> np.ndarray:
    """A map of mode coordinates (gh, gw) → [0, 1]: the positive part over ``vmax`` (default the
    map's own maximum; give one ``vmax`` to several maps to put them on a shared scale), clipped,
    zeros when nothing is positive, resized bilinearly to ``size`` = (h, w) when given."""
    m = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    top = (m.max() if m.size else 0.0) if vmax is None else float(vmax)
    m = np.clip(m / top, 0.0, 1.0) if top > 0 else np.zeros_like(m)
    if size is not None and m.shape != tuple(size):
        from PIL import Image
        im = Image.fromarray(m.astype(np.float32), mode="F").resize((int(size[1]), int(size[0])), Image.BILINEAR)
        m = np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)
    return m


def shared_scale(maps: Sequence) -> float:
    """The largest positive value over ``maps`` (arrays of mode coordinates): the top of a colour
    scale shared by them (0.0 when none is positive)."""
    return max([float(np.max(np.maximum(np.asarray(m, dtype=np.float64), 0.0), initial=0.0)) for m in maps] + [0.0])


def _tile(image, size: int) -> np.ndarray:
    arr = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.shape[:2] != (size, size):
        from PIL import Image
        im = Image.fromarray((arr[..., :3] * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float64) / 255.0
    return arr[..., :3]


def optimal_images_grid(rows: Sequence[Dict], title: str = "", tile: int = 160, dpi: int = 100):
    """The paper's Fig. 4 layout: one row per (mode, sign), each with its top images, the
    image and beside it the query (red) / key (cyan) overlay, labelled with the row's mode name
    and cosine and each image's score and name.

    rows: dicts with ``label`` (e.g. "L1 H5 M0 +"), ``cosine`` and ``items``: dicts with
    ``image`` ((h, w, 3) in [0, 1] or None when the file is missing), ``overlay`` (same, or None
    when no maps), ``score``, ``name`` and optionally ``class`` (written under the image). A row
    may carry ``scale``: ``{"query": vq, "key": vk}``, the coordinate values at full red and full
    cyan shared by all its overlays (see :func:`shared_scale`); the row then ends with its colour
    bars, 0 at the bottom, vq and vk at the top. Tiles are resized to ``tile`` pixels. Drawn as one
    mosaic image (fast for many rows). Returns the figure.
    """
    plt = _pyplot()
    k = max([len(r["items"]) for r in rows] + [1])
    label_w, head_h, gap_pair, gap, top = 120, 16, 2, 10, (22 if title else 4)
    # a line under each image for its class label, when any item has one
    foot = 12 if any(it.get("class") for r in rows for it in r["items"]) else 0
    row_h = tile + head_h + 4 + foot
    bars_w = 96 if any(r.get("scale") for r in rows) else 0   # two colour bars and their numbers
    width = label_w + k * (2 * tile + gap_pair) + (k - 1) * gap + 4 + bars_w
    height = top + max(len(rows), 1) * row_h
    mosaic = np.ones((height, width, 3))
    texts = []
    for i, row in enumerate(rows):
        y = top + i * row_h + head_h
        texts.append((6, y + tile / 2, f"{row['label']}\ncos {row['cosine']:+.2f}", 8, "left"))
        for j, it in enumerate(row["items"]):
            x = label_w + j * (2 * tile + gap_pair + gap)
            for dx, key, placeholder in ((0, "image", "missing"), (tile + gap_pair, "overlay", "no map")):
                if it.get(key) is None:
                    mosaic[y:y + tile, x + dx:x + dx + tile] = 0.88
                    texts.append((x + dx + tile / 2, y + tile / 2, placeholder, 7, "center"))
                else:
                    mosaic[y:y + tile, x + dx:x + dx + tile] = _tile(it[key], tile)
            name = str(it.get("name", ""))
            name = name if len(name) <= 22 else name[:21] + "…"
            texts.append((x + tile / 2, y - 4, f"score {it['score']:.3g}", 7, "center"))
            texts.append((x + tile + gap_pair + tile / 2, y - 4, name, 6, "center"))
            if foot and it.get("class"):
                cls = str(it["class"])
                texts.append((x + tile / 2, y + tile + foot - 1, cls if len(cls) <= 24 else cls[:23] + "…", 7,
                              "center"))
        if row.get("scale"):
            texts += _colour_bars(mosaic, width - bars_w + 8, y, tile, row["scale"])
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    for x, y, text, size, ha, *va in texts:
        va = va[0] if va else "center" if ha == "left" or text in ("missing", "no map") else "bottom"
        ax.text(x, y, text, fontsize=size, ha=ha, va=va)
    if title:
        ax.text(width / 2, 4, title, fontsize=9, ha="center", va="top")
    return fig


def _colour_bars(mosaic: np.ndarray, x: int, y: int, height: int, scale: Dict[str, float], bar: int = 12,
                 base: float = 0.25) -> list:
    """Paint a red (query) and a cyan (key) colour bar at (x, y) into ``mosaic`` as :func:`overlay`
    colours them over mid grey (0 at the bottom, the row's shared maximum at the top); returns
    the texts (x, y, text, size, ha, va) of their ends."""
    t = np.linspace(1.0, 0.0, height)[:, None]                     # (height, 1), top = full colour
    grey = base * (1.0 - t)
    texts = []
    for j, (key, channels, name) in enumerate((("query", (0,), "q"), ("key", (1, 2), "k"))):
        x0 = x + j * (bar + 34)
        cell = np.repeat(np.repeat(grey[..., None], 3, -1), bar, axis=1)   # (height, bar, 3)
        for c in channels:
            cell[..., c] = grey[:, 0:1] + t
        mosaic[y:y + height, x0:x0 + bar] = np.clip(cell, 0.0, 1.0)
        texts += [(x0 + bar + 2, y + 4, f"{float(scale.get(key, 0.0)):.3g}", 6, "left", "top"),
                  (x0 + bar + 2, y + height - 2, "0", 6, "left", "bottom"),
                  (x0 + bar / 2, y - 4, name, 7, "center", "bottom")]
    return texts


# --------------------------------------------------------------------------- training series

def training_curves(steps, mean_cosine, weighted_cosine, drift=None, max_curves: int = 5):
    """Training series: the layer curve (S-weighted solid, mean dashed) at up to ``max_curves``
    steps (a negative step is labelled "start"), and, when ``drift`` is given, drift per layer over
    steps: a (T, L) array, or a dict of them, e.g. {"query": ..., "key": ...} (drawn solid, dashed, ...).

    steps: (T,). mean_cosine, weighted_cosine: (T, L). Returns the figure."""
    plt = _pyplot()
    steps = np.asarray(steps)
    mc = np.asarray(mean_cosine, dtype=np.float64)
    wc = np.asarray(weighted_cosine, dtype=np.float64)
    T, L = wc.shape
    if drift is not None and not isinstance(drift, dict):
        drift = {"": drift}
    pick = np.unique(np.linspace(0, T - 1, min(T, max_curves)).round().astype(int))
    ncols = 2 if drift else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), dpi=100, squeeze=False)
    ax = axes[0, 0]
    x = relative_depth(L)
    cmap = plt.get_cmap("viridis")
    for j, t in enumerate(pick):
        color = cmap(j / max(len(pick) - 1, 1))
        ax.plot(x, wc[t], "-o", ms=3, color=color, label="start" if steps[t] < 0 else f"step {steps[t]}")
        ax.plot(x, mc[t], "--", color=color, alpha=0.6)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("cosine (solid: S-weighted, dashed: mean)")
    ax.set_title("layer curve over training")
    ax.legend(fontsize=7)
    if drift:
        ax = axes[0, 1]
        xs = np.maximum(steps, 0)
        for (_name, values), style in zip(drift.items(), ("-", "--", ":", "-.")):
            d = np.asarray(values, dtype=np.float64)
            for l in range(d.shape[1]):
                label = f"L{l}" if style == "-" else None
                ax.plot(xs, d[:, l], style, color=cmap(l / max(d.shape[1] - 1, 1)), lw=1, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("drift since start" + (f" ({', '.join(k for k in drift if k)})" if any(drift) else ""))
        ax.set_title("drift per layer")
        if L <= 12:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- ablation

def ablation_effects(cosine, share, effect, measure: str = "kl", band: Optional[float] = None,
                     labels: Optional[Sequence[str]] = None, n_labels: int = 3, layers=None, title: str = ""):
    """What removing each mode does: the mean output change (``measure``: KL of the class
    probabilities, or 1 − cos of the embedding) against the mode's cos(u_r, v_r) (left, with the
    random-pair band shaded) and against its mean attention share (right); one dot per ablated
    mode, the ``n_labels`` largest effects labelled (``L5H3M0``, moved apart where they would
    overlap). Log y axis when every effect is positive, its ticks plain text (``10⁻²``: right
    whether or not matplotlib parses math). ``cosine``, ``share``, ``effect``: (M,); ``layers``
    (M,) layer indices colour the dots by depth. Returns the figure."""
    plt = _pyplot()
    cos, sh, eff = (np.asarray(v, dtype=np.float64).ravel() for v in (cosine, share, effect))
    ok = np.isfinite(eff)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100, sharey=True, layout="constrained")
    top = [i for i in np.argsort(-np.where(ok, eff, -np.inf))[:n_labels] if ok[i]] if labels is not None else []
    ylabel = "KL(p ‖ p′), mean over images" if measure == "kl" else "1 − cos(e, e′), mean over images"
    log = bool(ok.any() and (eff[ok] > 0).all())
    for ax, x, xlabel in ((axes[0], cos, "cos(u_r, v_r)"), (axes[1], sh, "mean attention share")):
        if ax is axes[0] and band is not None:
            ax.axvspan(-band, band, color="0.88", lw=0)
        if layers is None:
            ax.scatter(x[ok], eff[ok], s=12, color="tab:purple", lw=0)
        else:
            lay = np.asarray(layers, dtype=np.float64).ravel()
            pts = ax.scatter(x[ok], eff[ok], s=12, c=lay[ok], cmap="viridis", vmin=0, vmax=max(lay.max(), 1), lw=0)
        if log:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_xlim(-1.0, 1.0)
    axes[0].set_ylabel(ylabel, fontsize=7)
    if layers is not None and ok.any():
        cb = fig.colorbar(pts, ax=axes, fraction=0.03, pad=0.01)
        cb.set_label("layer", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(wrap(title or "what removing each mode does", 100), fontsize=9)
    for ax, x in ((axes[0], cos), (axes[1], sh)):
        _label_points(fig, ax, [(str(labels[i]), x[i], eff[i]) for i in top])
    return fig


def _plain_log_ticks(ax) -> None:
    """Major ticks of a log y axis as plain text (``10⁻²``), minor ones unlabelled: matplotlib's
    default labels are mathtext (``$\\mathdefault{10^{-2}}$``), printed raw where math parsing is off
    (as in ``qkprobe report``, which draws file text as it is)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")

    def fmt(value, _pos):
        if value <= 0:
            return ""
        exp = np.log10(value)
        return f"10{str(int(round(exp))).translate(sup)}" if abs(exp - round(exp)) < 1e-9 else f"{value:.2g}"
    ax.yaxis.set_major_locator(LogLocator(base=10.0))
    ax.yaxis.set_major_formatter(FuncFormatter(fmt))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _label_points(fig, ax, points, step: float = 7.0, tries: int = 12) -> None:
    """Annotate (text, x, y) points, each label moved down in ``step``-point steps until its box
    overlaps no label placed before it (close points keep readable labels)."""
    if not points:
        return
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()   # final layout, so label boxes are measured where they end up
    placed = []
    for text, x, y in points:
        for k in range(tries):
            ann = ax.annotate(text, (x, y), fontsize=5, xytext=(3, 2 - step * k), textcoords="offset points")
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) or k == tries - 1:
                placed.append(box)
                break
            ann.remove()
