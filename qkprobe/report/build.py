"""``qkprobe report``: the paper's figures from run files, as one self-contained HTML page.

    build_report(["run.h5"], "report/")   # → report/index.html + report/figures/*.png

Sections: layer curves of all files (relative depth), per-layer/per-head spectra and cosines
with the random-pair band, optimal images of chosen heads with query (red) / key (cyan) overlays
recomputed from the recorded model, mode importance (attention share vs cosine), and the training
series when a file holds one. Every figure is drawn by :mod:`qkprobe.plot`; the numbers behind
the layer curves and the other figures are embedded as JSON (``<script type="application/json">``
with ids ``layer-curve-data`` and ``report-data``) so tests and scripts can check them.

Indices count from 0: "L3 H1 M0 +" is layer 3, head 1, mode 0 (largest singular value), sign +
(the max(a)·max(b) end; sign − is min(a)·min(b)).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import plot
from .._version import __version__
from ..core.summary import symmetric_energy_fraction
from ..errors import QKProbeError
from ..state import (AGG_COUNT, AGG_MEAN, DRIFT_K, DRIFT_Q, NONFINITE_WEIGHTS, SERIES_COSINE, SERIES_S, TOPK_INDEX,
                     TOPK_SCORES)
from . import html as H
from ..sinks.ablate_file import is_ablation_file
from .ablation import ablation_section
from .text import is_text_run, text_section

BAND_QUANTILE = 0.99
FIGURES = "figures"


# --------------------------------------------------------------------------- reading a run

@dataclass
class LayerData:
    index: int
    name: str
    S: np.ndarray                      # (H, R) all heads, from the file's bases
    cosine: np.ndarray                 # (H, R)
    U: np.ndarray                      # (H, D, R)
    V: np.ndarray                      # (H, Dk, R)
    heads: List[int]                   # recorded heads (full indices), in snapshot order
    share: Optional[np.ndarray]        # (len(heads), R) mean attn_share over samples
    share_count: int
    topk_scores: Optional[np.ndarray]  # (len(heads), R, 2, K)
    topk_index: Optional[np.ndarray]
    prefix_tokens: int                 # -1: unknown
    fold_ln: bool
    extras: List[str]
    sym_eigvals: Optional[np.ndarray] = None      # (H, n) eigenvalues of (M+Mᵀ)/2, when stored
    antisym_eigvals: Optional[np.ndarray] = None  # (H, n // 2) ±iω pair magnitudes of (M−Mᵀ)/2


@dataclass
class RunData:
    path: Path
    meta: dict
    rows: int
    ids: List[str]
    skipped: List[Tuple[str, str]]
    layers: List[LayerData]
    options: dict
    series: Optional[dict] = None
    series_note: str = ""
    label: str = ""
    labels: Optional[List[str]] = None   # class label per row ("" = none), None without labels
    kind: str = "run"                    # "run", or "bases" (a bases file or one model of a zoo file: modes only)
    name: str = ""                       # --name: the short label chosen by the user
    _row_of: Optional[Dict[str, int]] = field(default=None, repr=False)

    def class_of(self, sample_id: str) -> Optional[str]:
        """The class label stored with a sample (None: the run has no labels or the row none)."""
        if self.labels is None:
            return None
        if self._row_of is None:
            self._row_of = {sid: i for i, sid in enumerate(self.ids)}
        i = self._row_of.get(sample_id)
        return (self.labels[i] or None) if i is not None else None

    @property
    def dim(self) -> int:
        return int(self.layers[0].U.shape[1]) if self.layers else 0


def _json_attr(value, default):
    if isinstance(value, str):
        import json
        try:
            return json.loads(value)
        except ValueError:
            return default
    return default if value is None else value


def read_run(path) -> RunData:
    """Everything the report needs from one run file (raises RunFileError for a bad file)."""
    from ..sinks.run_file import open_run
    with open_run(path) as run:
        meta = run.metadata
        options = _json_attr(meta.get("options"), {}) or {}
        share_i = run.stat_names.index("attn_share") if "attn_share" in run.stat_names else None
        layers = []
        for i, name in enumerate(run.layer_names):
            attrs = run.layer_attrs(i)
            bases = run.bases(i)
            S = np.asarray(bases["S"], dtype=np.float64)
            heads = _json_attr(attrs.get("heads"), None)
            heads = list(range(S.shape[0])) if heads is None else [int(h) for h in heads]
            snaps = set(run.snapshot_names(i))
            share, count = None, 0
            if share_i is not None and {AGG_MEAN, AGG_COUNT} <= snaps:
                mean = np.asarray(run.snapshot(i, AGG_MEAN), dtype=np.float64)
                cnt = np.asarray(run.snapshot(i, AGG_COUNT))
                count = int(cnt[..., share_i].min()) if cnt.size else 0
                share = np.where(cnt[..., share_i] > 0, mean[..., share_i], np.nan)
            scores = index = None
            if {TOPK_SCORES, TOPK_INDEX} <= snaps:
                scores = np.asarray(run.snapshot(i, TOPK_SCORES), dtype=np.float64)
                index = np.asarray(run.snapshot(i, TOPK_INDEX), dtype=np.int64)
            layers.append(LayerData(
                index=i, name=name, S=S, cosine=np.asarray(bases["cosine"], dtype=np.float64),
                U=np.asarray(bases["U"]), V=np.asarray(bases["V"]), heads=heads, share=share, share_count=count,
                topk_scores=scores, topk_index=index, prefix_tokens=int(attrs.get("prefix_tokens", -1)),
                fold_ln=bool(attrs.get("fold_ln", False)), extras=list(_json_attr(attrs.get("extras"), []) or [])))
            layers[-1].sym_eigvals, layers[-1].antisym_eigvals = _sym_arrays(bases)
        data = RunData(path=Path(path), meta=meta, rows=len(run), ids=run.ids, skipped=run.skipped,
                       layers=layers, options=options)
        data.series, data.series_note = read_series(run)
        data.labels = run.labels
    return data


def read_bases_models(path) -> List[RunData]:
    """The models of a ``qkprobe bases`` file (one) or model-zoo file (one per complete model) as
    :class:`RunData` without images: what the layer curves and spectra need."""
    from ..sinks.bases_file import ZOO_KIND, file_kind, read_bases, read_zoo
    if file_kind(str(path)) == ZOO_KIND:
        zoo = read_zoo(str(path), arrays=None)
        models = [(m["attrs"], m["layers"]) for m in zoo["models"].values()]
    else:
        import h5py
        with h5py.File(path, "r") as f:
            meta = {k: f.attrs[k] for k in f.attrs}
        models = [(meta, read_bases(str(path)))]
    out = []
    for meta, layers in models:
        meta = {k: (v.item() if getattr(v, "size", 0) == 1 else v) for k, v in meta.items()}  # numpy scalars
        data = [LayerData(index=i, name=str(d.get("name", f"layer {i}")), S=np.asarray(d["S"], dtype=np.float64),
                          cosine=np.asarray(d["cosine"], dtype=np.float64), U=np.asarray(d["U"]),
                          V=np.asarray(d["V"]), heads=list(range(np.asarray(d["S"]).shape[0])), share=None,
                          share_count=0, topk_scores=None, topk_index=None,
                          prefix_tokens=int(d.get("prefix_tokens", -1)), fold_ln=bool(d.get("fold_ln", False)),
                          extras=list(d.get("extras") or []))
                for i, d in enumerate(layers)]
        for lay, d in zip(data, layers):
            lay.sym_eigvals, lay.antisym_eigvals = _sym_arrays(d)
        out.append(RunData(path=Path(path), meta=meta, rows=0, ids=[], skipped=[], layers=data, options={},
                           kind="bases"))
    return out


def _sym_arrays(bases: dict):
    """(sym_eigvals, antisym_eigvals) of a layer's stored bases as float64, or (None, None)."""
    if "sym_eigvals" not in bases or "antisym_eigvals" not in bases:
        return None, None
    return np.asarray(bases["sym_eigvals"], dtype=np.float64), np.asarray(bases["antisym_eigvals"], dtype=np.float64)


def read_series(run) -> Tuple[Optional[dict], str]:
    """The training series of an open run file (``run.series_steps`` and per layer
    ``run.series(i, name)``: S, cosine (points, H, R), drift_q, drift_k (points, H),
    nonfinite_weights (points,)), when it has at least two points (a plain run has one, taken at
    attach). Returns (series or None, note)."""
    steps_of = getattr(run, "series_steps", None)
    if steps_of is None:
        return None, ""
    steps = np.asarray(steps_of, dtype=np.int64).reshape(-1)
    if len(steps) < 2 or not run.layer_names:
        return None, ""
    L = len(run.layer_names)
    names = [set(run.series_names(i)) for i in range(L)]
    if not all({"S", "cosine"} <= n for n in names):
        return None, ("The file has a training series without singular values and cosines for every layer, "
                      "so it is not drawn.")
    mc = np.zeros((len(steps), L))
    wc = np.zeros((len(steps), L))
    drift: Dict[str, np.ndarray] = {}
    flagged = []
    for i in range(L):
        S = np.asarray(run.series(i, SERIES_S), dtype=np.float64)[: len(steps)]
        cos = np.asarray(run.series(i, SERIES_COSINE), dtype=np.float64)[: len(steps)]
        mc[:, i] = np.nanmean(cos.reshape(len(steps), -1), axis=1)
        wc[:, i] = np.nanmean(plot.head_weighted_cosine(S, cos), axis=-1)
        for side, name in (("query", DRIFT_Q), ("key", DRIFT_K)):
            if name in names[i]:
                d = np.asarray(run.series(i, name), dtype=np.float64)[: len(steps)]
                drift.setdefault(side, np.full((len(steps), L), np.nan))[:, i] = \
                    np.nanmean(d.reshape(len(steps), -1), axis=1)
        if NONFINITE_WEIGHTS in names[i]:
            bad = np.asarray(run.series(i, NONFINITE_WEIGHTS)).reshape(-1)[: len(steps)]
            flagged += [(i, int(t)) for t, b in zip(steps, bad) if b]
    note = ""
    if flagged:
        note = ("Non-finite weights (bases kept from before) at " +
                ", ".join(f"layer {i} step {t}" for i, t in flagged[:20]) + ("…" if len(flagged) > 20 else "") + ".")
    return {"step": steps, "mean_cosine": mc, "weighted_cosine": wc, "drift": drift or None}, note


# --------------------------------------------------------------------------- choices

@dataclass
class Choice:
    layer: int
    head: int        # full head index
    why: str


def head_table(run: RunData) -> List[Tuple[int, int, float]]:
    """(layer, head, S-weighted cosine) of every recorded head that has at least one top-k sample."""
    out = []
    for l in run.layers:
        if l.topk_index is None:
            continue
        wc = plot.head_weighted_cosine(l.S, l.cosine)
        out.extend((l.index, h, float(wc[h])) for hi, h in enumerate(l.heads)
                   if np.isfinite(wc[h]) and (l.topk_index[hi] >= 0).any())
    return out


def choose_heads(run: RunData, n_extreme: int = 1,
                 explicit: Optional[Sequence[Tuple[int, int]]] = None) -> List[Choice]:
    """The heads whose optimal images are shown.

    ``explicit``: (layer, head) pairs (must be recorded). Default: the ``n_extreme`` heads with the
    most positive and the ``n_extreme`` with the most negative S-weighted cosine, then, from the
    first, middle and last layer, the head with the largest |S-weighted cosine| not yet chosen.
    """
    table = head_table(run)
    if explicit:
        known = {(l, h) for l, h, _ in table}
        out = []
        for l, h in explicit:
            if -len(run.layers) <= l < 0:
                l += len(run.layers)
            if (l, h) not in known:
                raise QKProbeError(f"{run.path} has no optimal images for layer {l} head {h}; choose among its "
                                   f"{len(run.layers)} layers and recorded heads.")
            out.append(Choice(l, h, "chosen"))
        return out
    if not table:
        return []
    chosen: List[Choice] = []
    taken = set()
    by_wc = sorted(table, key=lambda t: t[2])
    for l, h, w in reversed(by_wc[-n_extreme:] if n_extreme > 0 else []):
        if (l, h) not in taken:
            chosen.append(Choice(l, h, f"most positive S-weighted cosine ({w:+.3f})"))
            taken.add((l, h))
    for l, h, w in by_wc[:n_extreme] if n_extreme > 0 else []:
        if (l, h) not in taken:
            chosen.append(Choice(l, h, f"most negative S-weighted cosine ({w:+.3f})"))
            taken.add((l, h))
    layers = sorted({l for l, _, _ in table})
    picks = [("early", layers[0]), ("middle", layers[len(layers) // 2]), ("late", layers[-1])]
    for what, layer in picks:
        cands = [t for t in table if t[0] == layer and (t[0], t[1]) not in taken]
        if not cands:
            continue
        l, h, w = max(cands, key=lambda t: abs(t[2]))
        chosen.append(Choice(l, h, f"{what} layer, largest |S-weighted cosine| ({w:+.3f})"))
        taken.add((l, h))
    return chosen


def resolve_image(sample_id: str, image_root: Optional[str]) -> Optional[str]:
    """The image file of a sample id, looked for only under ``image_root`` (``--image-root``, else
    the root the run recorded): ``root/id``, else ``root/<file name of id>``. A path that leaves
    the root (``..``, an absolute id, a symlink out of it) or is not a regular file is not found,
    so a run file cannot make the report read other files."""
    if not image_root or not sample_id or "\0" in sample_id:
        return None
    root = os.path.realpath(image_root)
    cands = []
    if not os.path.isabs(sample_id):
        cands.append(os.path.join(root, sample_id))
    cands.append(os.path.join(root, os.path.basename(sample_id)))
    for c in cands:
        real = os.path.realpath(c)
        if real != root and os.path.commonpath([real, root]) == root and os.path.isfile(real):
            return real
    return None


def image_root_of(run: "RunData", image_root: Optional[str]) -> Optional[str]:
    """``--image-root`` when given, else the image root recorded in the run file (None if neither)."""
    recorded = run.meta.get("image_root")
    return image_root or (recorded if isinstance(recorded, str) and recorded else None)


def _thumbnail(path: str, size: int = 224) -> Optional[np.ndarray]:
    """The image resized (short side) and centre-cropped to size × size, in [0, 1]."""
    try:
        from PIL import Image

        from ..data import check_regular_file, to_rgb
        check_regular_file(path)
        with Image.open(path) as im:
            im = to_rgb(im)
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    except Exception:  # noqa: BLE001 - an unreadable image is listed, not fatal
        return None


# --------------------------------------------------------------------------- the page

@dataclass
class _Ctx:
    out: Path
    figures: Path
    progress: bool
    files: List[str] = field(default_factory=list)

    def save(self, fig, name: str) -> str:
        from matplotlib import pyplot as plt
        path = self.figures / name
        fig.savefig(path, dpi=fig.dpi, facecolor="white", pil_kwargs={"compress_level": 2})
        plt.close(fig)
        rel = f"{FIGURES}/{name}"
        self.files.append(rel)
        return rel


def _labels(runs: Sequence[RunData]) -> None:
    """Each file's label in legends and titles: ``--name`` (with the model spec for the models of a
    zoo file), else the recorded model spec, never the file's path."""
    base = []
    per_file = {}
    for r in runs:
        per_file[r.path] = per_file.get(r.path, 0) + 1
    for r in runs:
        spec = str(r.meta.get("model_spec") or r.path.stem)
        spec += " (random init)" if r.meta.get("random_init") is True or r.meta.get("random_init") == 1 else ""
        base.append(spec if not r.name else r.name if per_file[r.path] == 1 else f"{r.name}: {spec}")
    for r, b in zip(runs, base):
        r.label = b if base.count(b) == 1 else f"{b} [{r.path.name}]"


def layer_curve_data(runs: Sequence[RunData]) -> dict:
    """The points of the layer-curve figure: per run, x (relative depth) and both cosines."""
    out = []
    for r in runs:
        rows = plot.layer_summaries([{"S": l.S, "cosine": l.cosine} for l in r.layers])
        out.append({"label": r.label, "file": str(r.path), "layers": [l.name for l in r.layers],
                    "x": plot.relative_depth(len(rows)).tolist(),
                    "mean_cosine": [x["mean_cosine"] for x in rows],
                    "weighted_cosine": [x["weighted_cosine"] for x in rows]})
    return {"runs": out}


def _fmt(x, spec="+.3f") -> str:
    return "–" if x is None or not np.isfinite(x) else format(float(x), spec)


def _run_table(runs: Sequence[RunData]) -> str:
    rows = []
    for i, r in enumerate(runs):
        l0 = r.layers[0] if r.layers else None
        rows.append([f'<a href="#run{i}">{H.esc(r.label)}</a>', f"<code>{H.esc(r.path.name)}</code>",
                     r.rows if r.kind == "run" else "– (bases)", len(r.layers), l0.S.shape[0] if l0 else "–",
                     l0.S.shape[1] if l0 else "–", r.dim,
                     f"<code>{H.esc(r.meta.get('weights_hash', '–'))}</code>",
                     H.esc(r.meta.get("created", "–")), H.esc(r.meta.get("qkprobe_version", "–"))])
    return H.table(["model", "file", "images", "layers", "heads", "modes", "width D", "weights hash", "created",
                    "qkprobe"], rows, numeric=(2, 3, 4, 5, 6))


def _spectra_section(ctx: _Ctx, r: RunData, ri: int, band: float) -> str:
    parts = [f'<h3 id="run{ri}-spectra">Spectra and cosines per head</h3>',
             f'<p class="note">Top: singular values s_r of W_qᵀW_k per head. Bottom: cos(u_r, v_r) of every mode '
             f'(red: above the band, grouping similar tokens; blue: below it, attending to dissimilar ones). '
             f'Grey band: ±{band:.4f}, the 99th percentile of |cos| between two independent uniformly random unit '
             f'vectors in D = {r.dim} dimensions, computed exactly from the Beta((D−1)/2, (D−1)/2) distribution of '
             f'(1 + cos)/2.</p>']
    for l in r.layers:
        fig = plot.spectrum_panel(l.S, l.cosine, band=band, title=f"L{l.index}  {l.name}")
        src = ctx.save(fig, f"run{ri}_spectrum_L{l.index:02d}.png")
        extras = f" — logits also depend on {', '.join(l.extras)}" if l.extras else ""
        caption = f"L{l.index} <code>{H.esc(l.name)}</code>{H.esc(extras)}"
        parts.append(H.figure(src, f"spectrum of layer {l.index}", caption))
        parts.append(_sym_figure(ctx, r, ri, l))
    parts.append(_sym_data(r, ri))
    return "\n".join(parts)


def _sym_figure(ctx: _Ctx, r: RunData, ri: int, l: LayerData) -> str:
    """The layer's symmetric / antisymmetric panel beside its spectrum ('' for files without them)."""
    sym, anti = l.sym_eigvals, l.antisym_eigvals
    if sym is None or anti is None:
        return ""
    frac = float(np.mean(symmetric_energy_fraction(sym, anti)))
    fig = plot.sym_antisym_panel(sym, anti, title=f"L{l.index}  {l.name}: symmetric and antisymmetric parts")
    src = ctx.save(fig, f"run{ri}_symparts_L{l.index:02d}.png")
    caption = (f"L{l.index}: eigenvalues of (M+Mᵀ)/2 (top) and magnitudes of the ±iω pairs of (M−Mᵀ)/2 "
               f"(bottom), M = W_qᵀW_k per head — {plot.sym_fraction_reading(frac)} (mean over heads)")
    return H.figure(src, f"symmetric and antisymmetric parts of layer {l.index}", H.esc(caption))


def _sym_data(r: RunData, ri: int) -> str:
    """JSON block with every layer's per-head symmetric energy fraction (None where not stored)."""
    rows = []
    for l in r.layers:
        sym, anti = l.sym_eigvals, l.antisym_eigvals
        rows.append(None if sym is None or anti is None else symmetric_energy_fraction(sym, anti).tolist())
    return H.json_block(f"run{ri}-sym-data", {"symmetric_energy_fraction": rows})


def _optimal_section(ctx: _Ctx, r: RunData, ri: int, choices: List[Choice], n_modes: int, topk: int,
                     maps: bool, image_root: Optional[str], device: str) -> Tuple[str, dict, List[str]]:
    """HTML, data and the missing images of the optimal-images section."""
    from .maps import LayerRef, recompute

    data: dict = {"chosen_heads": [[c.layer, c.head] for c in choices], "entries": [], "maps": None}
    head = [f'<h3 id="run{ri}-optimal">Optimal images</h3>']
    if not choices:
        head.append('<p class="note">The file holds no top-k samples, so there are no optimal images.</p>')
        return "\n".join(head), data, []
    plan = []   # (choice, layer data, [(mode, sign, [(sample id, stored score)])])
    needed: Dict[str, Optional[str]] = {}
    for c in choices:
        l = r.layers[c.layer]
        hi = l.heads.index(c.head)
        modes = [int(m) for m in np.argsort(-l.S[c.head], kind="stable")[:n_modes]]
        rows = []
        for m in modes:
            for sign in (0, 1):
                items = []
                for k in range(min(topk, l.topk_index.shape[-1])):
                    idx = int(l.topk_index[hi, m, sign, k])
                    score = float(l.topk_scores[hi, m, sign, k])
                    if idx < 0 or idx >= len(r.ids) or not np.isfinite(score):
                        continue
                    sid = r.ids[idx]
                    items.append((sid, score))
                    if sid not in needed:
                        needed[sid] = resolve_image(sid, image_root_of(r, image_root))
                rows.append((m, sign, items))
        plan.append((c, l, rows))
    missing = sorted(s for s, p in needed.items() if p is None)

    result = None
    if maps:
        refs = []
        for c in {c.layer for c in choices}:
            l = r.layers[c]
            refs.append(LayerRef(index=l.index, name=l.name, U=l.U, V=l.V, fold_ln=l.fold_ln,
                                 prefix_tokens=l.prefix_tokens,
                                 include_prefix=bool(r.options.get("include_prefix", False))))
        result = recompute(r.meta, sorted(refs, key=lambda x: x.index),
                           {s: p for s, p in needed.items() if p is not None}, device=device, progress=ctx.progress)
        data["maps"] = {"loaded": result.loaded, "hash_ok": result.hash_ok, "recorded_hash": result.recorded_hash,
                        "rebuilt_hash": result.rebuilt_hash, "notes": result.notes}
        for n in result.notes:
            head.append(H.warning(n))
        missing += sorted(s for s in result.failed if s not in missing)
    else:
        head.append('<p class="note">Maps were not recomputed (<code>--no-maps</code>).</p>')
    head.append('<p class="note">For each chosen head, its top modes by singular value, both signs: sign + ranks '
                'images by max(a)·max(b), sign − by min(a)·min(b), where a is the query-side coordinate u_r·x of '
                'a token and b the key-side one v_r·x. Beside each image: the query map (red) and the key map '
                '(cyan) of that sign on a colour scale shared by the row (the colour bars at its end: full colour at '
                'the largest coordinate over the row\'s images); white where both are high. '
                'Scores are the ones stored in the run; names are "L&lt;layer&gt; H&lt;head&gt; M&lt;mode&gt;", '
                'counting from 0, M0 the largest singular value.</p>')
    thumbs: Dict[str, Optional[np.ndarray]] = {}
    body = []
    for c, l, rows in plan:
        grid_rows = []
        positional = _positional_modes(result, c, rows)
        for m, sign, items in rows:
            label = f"L{c.layer} H{c.head} M{m} {'+' if sign == 0 else '−'}"
            entry = {"layer": c.layer, "head": c.head, "mode": m, "sign": sign, "label": label,
                     "cosine": float(l.cosine[c.head, m]), "items": [], **positional[m]}
            cells, qk = [], []
            for sid, score in items:
                img = maps_of = None
                recomputed = None
                if result is not None and sid in result.images:
                    img = result.images[sid]
                    if result.has(c.layer, sid):
                        qm, km, recomputed = result.maps(c.layer, c.head, m, sign, sid)
                        maps_of = (qm, km)
                elif needed.get(sid) is not None:
                    if sid not in thumbs:
                        thumbs[sid] = _thumbnail(needed[sid])
                    img = thumbs[sid]
                qk.append(maps_of)
                cells.append({"image": img, "overlay": None, "score": score, "name": os.path.basename(sid),
                              "class": r.class_of(sid)})
                entry["items"].append({"id": sid, "score": score, "recomputed_score": recomputed,
                                       "missing": sid in missing, "class": r.class_of(sid)})
            scale = _row_scale(cells, qk)
            entry["map_scale"] = scale
            entry["top_classes"] = _top_classes([it["class"] for it in entry["items"]])
            grid_rows.append({"label": label + ("\npositional" if positional[m]["positional"] else ""),
                              "cosine": float(l.cosine[c.head, m]), "items": cells, "scale": scale})
            data["entries"].append(entry)
        fig = plot.optimal_images_grid(grid_rows)
        src = ctx.save(fig, f"run{ri}_optimal_L{c.layer:02d}_H{c.head:02d}.png")
        wc = plot.head_weighted_cosine(l.S[c.head], l.cosine[c.head])
        why = c.why if "cosine" in c.why else f"{c.why}; S-weighted cosine {_fmt(float(wc))}"
        body.append(f"<h4>L{c.layer} H{c.head} <span class=\"muted\">— <code>{H.esc(l.name)}</code> head "
                    f"{c.head}; {H.esc(why)}</span></h4>")
        body.append(H.figure(src, f"optimal images of layer {c.layer} head {c.head}"))
        body.append(_classes_note([e for e in data["entries"] if (e["layer"], e["head"]) == (c.layer, c.head)]))
        body.append(_positional_note(c, positional))
    return "\n".join(head + body), data, missing


def _row_scale(cells: List[dict], qk: List[Optional[tuple]]) -> Optional[Dict[str, float]]:
    """Draw the overlays of one (mode, sign) row on a colour scale shared by its images (query and
    key each their own): sets each cell's ``overlay``; returns {"query": vq, "key": vk} (None
    when the row has no maps)."""
    have = [m for m in qk if m is not None]
    if not have:
        return None
    scale = {"query": plot.shared_scale([q for q, _ in have]), "key": plot.shared_scale([k for _, k in have])}
    for cell, maps_of in zip(cells, qk):
        if maps_of is not None and cell["image"] is not None:
            size = cell["image"].shape[:2]
            cell["overlay"] = plot.overlay(cell["image"], plot.normalize_map(maps_of[0], size, vmax=scale["query"]),
                                           plot.normalize_map(maps_of[1], size, vmax=scale["key"]))
    return scale


def _positional_modes(result, c: Choice, rows) -> Dict[int, dict]:
    """Per mode of a chosen head: the share of its query and key maps' variance that token position
    explains over the mode's recomputed top images of both signs, and the verdict
    (:mod:`qkprobe.report.positional`)."""
    from .positional import is_positional, position_r2
    out: Dict[int, dict] = {}
    for m in dict.fromkeys(m for m, _, _ in rows):
        sids = dict.fromkeys(sid for mm, _, items in rows if mm == m for sid, _ in items)
        maps_of = [result.maps(c.layer, c.head, m, 0, sid)[:2] for sid in sids
                   if result is not None and sid in result.images and result.has(c.layer, sid)]
        r2q, r2k = position_r2([q for q, _ in maps_of]), position_r2([k for _, k in maps_of])
        out[m] = {"position_r2": {"query": r2q, "key": r2k}, "positional": is_positional(r2q, r2k)}
    return out


def _positional_note(c: Choice, positional: Dict[int, dict]) -> str:
    """One line naming the chosen head's positional modes ('' when none)."""
    from .positional import POSITIONAL_R2
    flagged = [(m, v["position_r2"]) for m, v in positional.items() if v["positional"]]
    if not flagged:
        return ""
    names = ", ".join(f"L{c.layer} H{c.head} M{m} (R² query {r['query']:.2f}, key {r['key']:.2f})"
                      for m, r in flagged)
    return (f'<p class="note positional"><strong>Positional modes:</strong> {H.esc(names)}: token position alone '
            f'explains at least {POSITIONAL_R2:.0%} of the variance of both maps over the top images (the per-token '
            f'mean over images against the variance over images and tokens); their maps show where a token is, '
            f'not what it shows.</p>')


def _top_classes(classes: Sequence[Optional[str]], n: int = 3) -> List[List[Any]]:
    """The ``n`` most frequent classes among a mode's top images, as [class, count] (most first)."""
    from collections import Counter
    return [[name, count] for name, count in Counter(c for c in classes if c).most_common(n)]


def _classes_note(entries: Sequence[dict]) -> str:
    """One line per shown (mode, sign): the most frequent classes among its top images."""
    lines = [f"<li>{H.esc(e['label'])}: " + ", ".join(f"{H.esc(str(name))} ×{count}" for name, count in
                                                      e["top_classes"]) + "</li>"
             for e in entries if e.get("top_classes")]
    if not lines:
        return ""
    return '<p class="note">Most frequent classes among the top images:</p><ul class="classes">' + \
        "".join(lines) + "</ul>"


def _importance_section(ctx: _Ctx, r: RunData, ri: int, band: float) -> Tuple[str, dict]:
    parts = [f'<h3 id="run{ri}-importance">Mode importance</h3>']
    layers = [l for l in r.layers if l.share is not None]
    if not layers:
        parts.append('<p class="note">The file has no attention-share statistic, so mode importance is not '
                     'shown (record it with <code>qkprobe run --stats all</code>).</p>')
        return "\n".join(parts), {"layers": []}
    cos = [l.cosine[l.heads] for l in layers]
    share = [l.share for l in layers]
    rows = [plot.share_summary(c, s, band) for c, s in zip(cos, share)]
    src = ctx.save(plot.share_by_sign(rows, title=f"attention share by mode cosine — {r.label}"),
                   f"run{ri}_share_by_sign.png")
    parts.append('<p class="note">Each mode\'s share of the head\'s attention (statistic <code>attn_share</code>: how '
                 'much the mode lifts the attended keys above the average key, over the sum for all modes; mean over '
                 f'images) against its cosine. Modes with cos &gt; {band:.3f} make tokens attend to similar tokens '
                 '(grouping), modes with cos &lt; −band to dissimilar ones (contextualizing): the curves say which '
                 'kind carries the attention the heads actually paid.</p>')
    parts.append(H.figure(src, "attention share by cosine sign per layer"))
    src = ctx.save(plot.mode_importance_layers(cos, share, band=band, names=[f"L{l.index} {l.name}" for l in layers],
                                               heads=[l.heads for l in layers]), f"run{ri}_mode_importance.png")
    parts.append(H.figure(src, "attention share against cosine for every mode",
                          "One dot per mode, one colour per head; grey: the random-pair band."))
    parts.append(H.table(["layer", "share: cos > band", "share: cos < −band", "share: inside band",
                          "share-weighted cos", "images"],
                         [[f"L{l.index} <code>{H.esc(l.name)}</code>", _fmt(x["similar"]), _fmt(x["dissimilar"]),
                           _fmt(x["neutral"]), _fmt(x["share_weighted_cosine"]), l.share_count]
                          for l, x in zip(layers, rows)], numeric=(1, 2, 3, 4, 5)))
    data = {"layers": [dict(layer=l.index, **x) for l, x in zip(layers, rows)]}
    return "\n".join(parts), data


def _series_section(ctx: _Ctx, r: RunData, ri: int) -> Tuple[str, Optional[dict]]:
    if r.series is None:
        return (f'<h3 id="run{ri}-series">Training series</h3><p class="note">{H.esc(r.series_note)}</p>'
                if r.series_note else ""), None
    s = r.series
    fig = plot.training_curves(s["step"], s["mean_cosine"], s["weighted_cosine"], drift=s["drift"])
    src = ctx.save(fig, f"run{ri}_series.png")
    steps = [("start" if t < 0 else str(t)) for t in s["step"].tolist()]
    parts = [f'<h3 id="run{ri}-series">Training series</h3>',
             f'<p class="note">{len(steps)} points, at steps {H.esc(", ".join(steps[:12]))}'
             f'{"…" if len(steps) > 12 else ""} (a point is logged at attach and at every basis refresh). Left: '
             f'the layer curve at up to five of them. Right: drift since the start, the largest principal angle '
             f'(radians) between the query-side (solid) and key-side (dashed) subspaces of each layer, mean over '
             f'heads.</p>']
    if r.series_note:
        parts.append(H.warning(r.series_note))
    parts.append(H.figure(src, "layer curves and drift over training steps"))
    drift = {k: v.tolist() for k, v in (s["drift"] or {}).items()}
    return "\n".join(parts), {"step": s["step"].tolist(), "mean_cosine": s["mean_cosine"].tolist(),
                              "weighted_cosine": s["weighted_cosine"].tolist(), "drift": drift}


def _plain_text(fn):
    """Run ``fn`` with matplotlib's mathtext and TeX off: text from a run file (image names such as
    ``budget $5_$10.png``, layer names, specs) is drawn as it is, never parsed as math."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fn(*args, **kwargs)
    return wrapper


@_plain_text
def build_report(paths: Sequence, out, *, heads: Optional[Sequence[Tuple[int, int]]] = None, n_extreme: int = 1,
                 n_modes: int = 2, topk: int = 4, maps: bool = True, image_root: Optional[str] = None,
                 device: str = "cpu", progress: bool = True, force: bool = False,
                 names: Optional[Sequence[str]] = None) -> Path:
    """Write ``out/index.html`` and its figures for the files ``paths``; returns the page's path.

    Every qkprobe file kind is drawn: run files (everything below), bases and model-zoo files
    (layer curves and spectra), ablation files (what removing each mode does). ``names``: one
    short label per file for legends and titles (default: the recorded model spec).

    heads: (layer, head) pairs whose optimal images are shown (default: see :func:`choose_heads`),
    n_modes modes per head (largest singular values), topk images per mode and sign. maps=False
    skips rebuilding the model. image_root: where to look for images that moved.

    The page is built in a temporary folder beside ``out`` and swapped in when complete, so a
    report killed half-way leaves the previous one whole. An ``index.html`` in ``out`` that
    qkprobe did not write is not overwritten unless ``force``.
    """
    runs, ablation_files, ablation_names = _read_inputs(paths, names)  # a bad file stops here, before writing
    _labels(runs)
    all_choices = [choose_heads(r, n_extreme=n_extreme, explicit=heads) if r.kind == "run" else []
                   for r in runs]  # so do bad --heads
    final = Path(out)
    out = _stage(final, force)                 # everything below is written here, then swapped in
    ctx = _Ctx(out=out, figures=out / FIGURES, progress=progress)
    ctx.figures.mkdir(exist_ok=True)

    body, nav = _curves_part(ctx, runs)
    warn_html: List[str] = []
    report_data = {"runs": [], "band_quantile": BAND_QUANTILE, "band_method": "exact (Beta distribution)"}
    for ri, r in enumerate(runs):
        band = plot.random_cosine_band(r.dim, BAND_QUANTILE)
        choices = all_choices[ri]
        if r.kind == "bases":
            nav.append((f"run{ri}", r.label) if len(runs) > 1 else (f"run{ri}-spectra", "Spectra"))
            body += [f'<h2 id="run{ri}">{H.esc(r.label)} <span class="muted">— {H.esc(r.path.name)}, modes only'
                     f'</span></h2>', H.collapsible(_spectra_section(ctx, r, ri, band), open_=len(runs) == 1)]
            report_data["runs"].append({"file": str(r.path), "label": r.label, "kind": r.kind, "dim": r.dim,
                                        "band": band, "weighted_cosine": [plot.head_weighted_cosine(l.S, l.cosine)
                                                                          .tolist() for l in r.layers]})
            continue
        text = is_text_run(r)   # sentences, not images: qkprobe/report/text.py
        if len(runs) > 1:
            nav.append((f"run{ri}", r.label))
        else:
            if r.series is not None or r.series_note:
                nav.append((f"run{ri}-series", "Training series"))
            nav += [(f"run{ri}-optimal", "Optimal sentences" if text else "Optimal images"),
                    (f"run{ri}-viewer", "Viewer"),
                    (f"run{ri}-importance", "Mode importance"),
                    (f"run{ri}-spectra", "Spectra")]
        sec = [f'<h2 id="run{ri}">{H.esc(r.label)} <span class="muted">— {H.esc(r.path.name)}, {r.rows} '
               f'{"sentences" if text else "images"}</span></h2>']
        spectra = _spectra_section(ctx, r, ri, band)
        if text:
            optimal, odata, missing = text_section(ctx, r, ri, choices, n_modes, topk, maps, device)
        else:
            optimal, odata, missing = _optimal_section(ctx, r, ri, choices, n_modes, topk, maps, image_root, device)
        from .viewer import viewer_section   # here: `python -m qkprobe.report.viewer` imports the package first
        viewer_html, vdata = viewer_section(r, ri, choices, maps=maps, image_root=image_root, device=device,
                                            progress=progress)
        importance, idata = _importance_section(ctx, r, ri, band)
        series_html, sdata = _series_section(ctx, r, ri)
        on_disk_missing = ([s for s in r.ids if resolve_image(s, image_root_of(r, image_root)) is None]
                           if len(r.ids) <= 200000 and not text else [])
        if missing or on_disk_missing:
            items = [f"{s}" for s in missing]
            more = len(set(on_disk_missing) - set(missing))
            title = (f"{r.path.name}: {len(missing)} of the images this page shows are missing on disk "
                     f"(moved or deleted); they are drawn as grey boxes."
                     + (f" {more} more of the run's {r.rows} images are missing too." if more else ""))
            warn_html.append(f'<div id="run{ri}-missing">{H.warning(title, items)}</div>')
        if r.skipped:
            sec.append(H.warning(f"{len(r.skipped)} inputs could not be read during the run and were skipped.",
                                 [f"{s}: {why}" for s, why in r.skipped[:20]]))
        sec += [H.collapsible(series_html), H.collapsible(optimal), H.collapsible(viewer_html),
                H.collapsible(importance), H.collapsible(spectra, open_=False)]   # spectra: one tall figure per layer
        body += sec
        report_data["runs"].append({
            "file": str(r.path), "label": r.label, "kind": r.kind, "dim": r.dim, "band": band, "rows": r.rows,
            "missing_images": missing, "missing_on_disk": len(on_disk_missing), "optimal": odata,
            "importance": idata, "series": sdata, "viewer": vdata,
            "weighted_cosine": [plot.head_weighted_cosine(l.S, l.cosine).tolist() for l in r.layers]})
    ablation_html, report_data["ablation"] = ablation_section(ctx, ablation_files, BAND_QUANTILE, ablation_names)
    if ablation_html:
        body.append(ablation_html)
        nav.append(("ablation", "What removing each mode does"))
    body.append(H.json_block("report-data", report_data))
    if warn_html:
        body.insert(0, '<div id="warnings">' + "".join(warn_html) + "</div>")

    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    labels = [r.label for r in runs] + [n or Path(a).name for a, n in zip(ablation_files, ablation_names)]
    subtitle = [f"{len(labels)} file{'s' if len(labels) != 1 else ''}: " + ", ".join(H.esc(x) for x in labels),
                f"Made {created} by qkprobe {H.esc(__version__)} — method of Pan et al., <em>Dissecting Query-Key "
                f"Interaction in Vision Transformers</em> (NeurIPS 2024)."]
    page = H.page("qkprobe report", subtitle, nav, "\n".join(body))
    index = out / "index.html"
    tmp = out / ".index.html.partial"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    _publish(out, final)
    return final / "index.html"


def _curves_part(ctx: _Ctx, runs: Sequence[RunData]) -> Tuple[List[str], List[tuple]]:
    """(HTML parts, nav entries) of the files table and the layer curves (none without runs or
    bases files, e.g. for ablation files alone)."""
    if not runs:
        return [], []
    curve = layer_curve_data(runs)
    series = {c["label"]: [{"mean_cosine": m, "weighted_cosine": w}
                           for m, w in zip(c["mean_cosine"], c["weighted_cosine"])] for c in curve["runs"]}
    src = ctx.save(plot.layer_curve(series, title="query-key mode cosine per layer"), "layer_curve.png")
    body = ['<h2 id="runs">Files</h2>', _run_table(runs),
            '<h2 id="layer-curves">Layer curves</h2>',
            '<p class="note">Per layer, the mean over heads and modes of cos(u_r, v_r) (dashed) and the mean over '
            'heads of the singular-value-weighted cosine Σ_r (s_r/Σs) cos_r (solid); x is the relative depth, '
            '0 = first recorded layer, 1 = last. Above 0: heads mostly attend to tokens like the query '
            '(grouping); below: to unlike tokens (contextualizing).</p>',
            H.figure(src, "layer curves", width=720), H.json_block("layer-curve-data", curve)]
    if any((r.options.get("layers") is not None) for r in runs):
        body.append('<p class="note">Some files record a subset of layers; '
                    'their depth axis spans the recorded ones.</p>')
    return body, [("runs", "Files"), ("layer-curves", "Layer curves")]


def _read_inputs(paths: Sequence, names: Optional[Sequence[str]]) -> Tuple[List[RunData], List, List[str]]:
    """(runs and bases models as RunData, ablation files, their names) of the report's inputs,
    each read by its file kind; ``names``: one per path (or None)."""
    from ..sinks.bases_file import BASES_KIND, ZOO_KIND, file_kind
    if names is not None and len(names) != len(paths):
        raise QKProbeError(f"Got {len(names)} --name for {len(paths)} files; give one --name per file, in order.")
    if not paths:
        raise QKProbeError("Give at least one file to report on.")
    names = list(names) if names is not None else [""] * len(paths)
    runs: List[RunData] = []
    ablations, ablation_names = [], []
    for p, name in zip(paths, names):
        if is_ablation_file(p):
            ablations.append(p)
            ablation_names.append(name)
            continue
        models = read_bases_models(p) if file_kind(str(p)) in (BASES_KIND, ZOO_KIND) else [read_run(p)]
        for m in models:
            m.name = name
        runs += models
    return runs, ablations, ablation_names


# --------------------------------------------------------------------------- writing the folder

_REPORT_ENTRIES = frozenset({"index.html", FIGURES})


def _stage(out: Path, force: bool) -> Path:
    """A fresh folder beside ``out`` to build the report in (stale ones of killed reports removed),
    after checking that ``out`` is a report of ours or may be replaced."""
    index = out / "index.html"
    if out.exists() and not out.is_dir():
        raise QKProbeError(f"--out {out} is a file; give a folder for the report.")
    if index.exists() and not force:
        try:
            with open(index, "rb") as fh:
                head = fh.read(4096).decode("utf-8", "replace")
        except OSError:
            head = ""
        if H.GENERATOR not in head:
            raise QKProbeError(f"{index} was not written by qkprobe report; choose another --out, or pass --force to "
                               f"replace it.")
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.report-"
    from ..sinks.recover import _process_alive
    for name in os.listdir(parent):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(parent / name, ignore_errors=True)
    stage = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / FIGURES).mkdir(parents=True)
    return stage


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _publish(stage: Path, out: Path) -> None:
    """Put the finished report in ``stage`` at ``out``: one atomic swap when ``out`` holds only a
    report; beside other files, the figures folder and then the page."""
    if not out.exists():
        os.rename(stage, out)
        return
    if set(os.listdir(out)) <= _REPORT_ENTRIES:
        if not _exchange(stage, out):
            old = out.with_name(f"{stage.name}.old")
            os.rename(out, old)
            os.rename(stage, out)
            stage = old
        shutil.rmtree(stage, ignore_errors=True)
        return
    new_figures, figures = stage / FIGURES, out / FIGURES
    if not (figures.exists() and _exchange(new_figures, figures)):
        if figures.exists():
            os.rename(figures, stage / "figures.old")
        os.rename(new_figures, figures)
    os.replace(stage / "index.html", out / "index.html")
    shutil.rmtree(stage, ignore_errors=True)
