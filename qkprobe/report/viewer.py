"""The report's interactive per-mode viewer: one self-contained block of HTML, JSON and script.

Choose a layer and head, one of its modes, and one of the mode's top images (both signs); hover a
patch (or a token of a text) to see its query coordinate a_i and, over all keys j, the mode's
logit contribution ``s_r·a_i·b_j`` beside the head's actual attention row ``P_ij`` (the
probabilities the model used, rel-pos bias, masks, rope and qk-norm included, as the attention
share reads them). The page needs no network: the images are JPEG data URIs, the numbers a JSON
block (``<script type="application/json" id="run<k>-viewer-data">``), the renderer
``viewer.js`` inlined.

Data model (``PAYLOAD_VERSION``): ``items`` are the inputs, each either
``{"kind": "grid", "src", "gh", "gw", "prefix"}`` (an image: prefix tokens, then a gh × gw patch
grid in row order) or ``{"kind": "seq", "tokens": [str, ...], "prefix"}`` (a text: one string
per token); ``heads`` hold per head the shown ``modes`` (mode index, s, cosine, share), per mode
and sign the ``top`` item indices and ``scores``, and per item ``tokens``: query and key
coordinates of the shown modes and the attention rows, packed as below.

Size budget (bounded explicitly, see :class:`ViewerLimits`): per head the top ``modes`` modes
(default 4, by attention share when the run has it, else by singular value) and per mode and
sign the top ``images`` images (default 3), so at most ``2·modes·images`` (24) images per head.
Per (head, image) with N tokens: a and b as int16 with a scale per mode (4·modes·N bytes), the
attention rows as uint8 scaled by each row's maximum (N² bytes) plus the row maxima (float32,
4·N bytes), base64 (×4/3). Per image one JPEG (≈ 10–20 KB at 224 px). ViT-S/16 at 224 px
(N = 197): ≤ 24 × 42 KB × 4/3 ≈ 1.4 MB per head, so the report's five default heads are ≈ 7 MB;
heads beyond ``max_bytes`` (default 12 MiB) are left out and the page says so. Measured: a
random-init ViT-S/16 on the 15 scikit-image photos, five heads, 12 distinct images: 2.7 MB of
viewer data, the whole page 2.8 MB, loaded in Chromium in 0.6 s; a hover repaints in ~10 ms.

Text runs (``qkprobe run --text``): the items are sentences (``seq``), their tokens the
tokenizer's own strings (``[CLS]`` the prefix token, ``##`` word pieces as they are), each
sentence recomputed alone (unpadded) by :func:`qkprobe.report.text.recompute`, with the adapter's
attention probabilities as for images. Measured: MiniLM over the 40 sentences of
examples/sentences.txt, one head, 6 distinct sentences of ≤ 13 tokens: 16 KB of viewer data.

Notebooks: ``qkprobe.report.viewer.show("run.h5")`` displays the viewer (it rebuilds the model),
``qkprobe.open_run("run.h5")`` a summary table.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import html as H

PAYLOAD_VERSION = 1
ASSETS = Path(__file__).parent      # viewer.js, viewer.css (package data)
SIGNS = (0, 1)                       # 0: max(a)·max(b) end, 1: min(a)·min(b) end
JPEG_QUALITY = 85


@dataclass
class ViewerLimits:
    """What the viewer embeds (see the module docstring for the bytes these cost)."""

    modes: int = 4                   # modes per head, by attention share (else singular value)
    images: int = 3                  # top images per mode and sign
    max_bytes: int = 12 * 2 ** 20    # payload budget; heads past it are left out


# --------------------------------------------------------------------------- packing numbers

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def pack_int16(x: np.ndarray) -> Tuple[str, List[float]]:
    """(N, M) floats → base64 of little-endian int16 (row-major) and one scale per column:
    value = int16 · scale (error ≤ max|column| / 65534)."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.abs(x).max(axis=0) if x.size else np.zeros(x.shape[1])
    scale = np.where(peak > 0, peak / 32767.0, 1.0)
    q = np.clip(np.rint(x / scale), -32767, 32767).astype("<i2")
    return _b64(q.tobytes()), scale.tolist()


def pack_probs(p: np.ndarray) -> Tuple[str, str]:
    """(N, Nk) probabilities → base64 of uint8 rows scaled by each row's maximum and base64 of the
    row maxima (little-endian float32): P_ij = byte / 255 · max_i (error ≤ max_i / 510)."""
    p = np.asarray(p, dtype=np.float64)
    peak = p.max(axis=1).astype("<f4")                    # (N,)
    safe = np.where(peak > 0, peak, 1.0).astype(np.float64)
    q = np.clip(np.rint(p / safe[:, None] * 255.0), 0, 255).astype(np.uint8)
    return _b64(q.tobytes()), _b64(peak.tobytes())


def unpack_int16(data: str, scale: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`pack_int16` (what the page's script decodes)."""
    q = np.frombuffer(base64.b64decode(data), dtype="<i2").astype(np.float64)
    return q.reshape(-1, len(scale)) * np.asarray(scale, dtype=np.float64)


def unpack_probs(data: str, peaks: str) -> np.ndarray:
    """The inverse of :func:`pack_probs`."""
    m = np.frombuffer(base64.b64decode(peaks), dtype="<f4").astype(np.float64)
    q = np.frombuffer(base64.b64decode(data), dtype=np.uint8).astype(np.float64)
    return q.reshape(len(m), -1) / 255.0 * m[:, None]


def token_data(a: np.ndarray, b: np.ndarray, probs: Optional[np.ndarray]) -> dict:
    """One (head, item) entry: a (N, M) query and b (Nk, M) key coordinates of the shown modes,
    probs (N, Nk) the head's attention (None: not available)."""
    pa, sa = pack_int16(a)
    pb, sb = pack_int16(b)
    out = {"n": int(a.shape[0]), "nk": int(b.shape[0]), "a": pa, "a_scale": sa, "b": pb, "b_scale": sb,
           "p": None, "p_max": None}
    if probs is not None:
        out["p"], out["p_max"] = pack_probs(probs)
    return out


def image_uri(img: np.ndarray) -> str:
    """(h, w, 3) image in [0, 1] → a JPEG data URI."""
    from PIL import Image
    arr = np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + _b64(buf.getvalue())


def grid_item(sample_id: str, img: np.ndarray, grid: Tuple[int, int], prefix: int,
              label: Optional[str] = None) -> dict:
    return {"kind": "grid", "id": sample_id, "name": os.path.basename(sample_id), "label": label,
            "src": image_uri(img), "gh": int(grid[0]), "gw": int(grid[1]), "prefix": int(prefix)}


def seq_item(sample_id: str, tokens: Sequence[str], prefix: int = 0, label: Optional[str] = None,
             text: Optional[str] = None) -> dict:
    """A text input: one display string per token (prefix tokens first); ``text`` the sentence
    (its button; default the tokens joined)."""
    return {"kind": "seq", "id": sample_id, "name": sample_id, "label": label,
            "tokens": [str(t) for t in tokens], "prefix": int(prefix), "text": text}


def payload_bytes(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


# --------------------------------------------------------------------------- choosing what to show

def rank_modes(S: np.ndarray, share: Optional[np.ndarray], n: int) -> Tuple[List[int], str]:
    """The ``n`` modes of a head with the largest attention share (``share`` (R,), NaN where not
    recorded), else the largest singular values ``S`` (R,); and which of the two ranked them."""
    if share is not None and np.isfinite(share).all():
        return [int(m) for m in np.argsort(-share, kind="stable")[:n]], "attn_share"
    return [int(m) for m in np.argsort(-S, kind="stable")[:n]], "singular value"


@dataclass
class HeadPlan:
    layer: int
    head: int                     # full head index
    name: str
    ranked_by: str
    modes: List[dict]             # {"mode", "s", "cosine", "share"}
    top: List[List[List[str]]]    # [mode][sign] → sample ids, best first
    scores: List[List[List[float]]]


def plan_head(r, layer: int, head: int, limits: ViewerLimits) -> Optional[HeadPlan]:
    """What the viewer shows of one head of a :class:`qkprobe.report.build.RunData` (None: the
    file has no top-k samples for it)."""
    l = r.layers[layer]
    if l.topk_index is None or head not in l.heads:
        return None
    hi = l.heads.index(head)
    share = None if l.share is None else l.share[hi]
    modes, ranked_by = rank_modes(l.S[head], share, limits.modes)
    plan = HeadPlan(layer=layer, head=head, name=l.name, ranked_by=ranked_by, modes=[], top=[], scores=[])
    for m in modes:
        plan.modes.append({"mode": m, "s": float(l.S[head, m]), "cosine": float(l.cosine[head, m]),
                           "share": None if share is None else float(share[m])})
        ids, scores = [], []
        for sign in SIGNS:
            pairs = [(int(i), float(s)) for i, s in zip(l.topk_index[hi, m, sign], l.topk_scores[hi, m, sign])
                     if 0 <= i < len(r.ids) and np.isfinite(s)][: limits.images]
            ids.append([r.ids[i] for i, _ in pairs])
            scores.append([s for _, s in pairs])
        plan.top.append(ids)
        plan.scores.append(scores)
    return plan


def _head_ids(plan: HeadPlan) -> List[str]:
    return list(dict.fromkeys(s for per_mode in plan.top for per_sign in per_mode for s in per_sign))


# --------------------------------------------------------------------------- the payload

def build_payload(r, plans: Sequence[HeadPlan], result, limits: ViewerLimits) -> Tuple[dict, List[str]]:
    """The viewer's JSON from head plans and a :class:`qkprobe.report.maps.MapResult` that holds
    the coordinates and attention of their images. Returns (payload, notes)."""
    items: List[dict] = []
    index: Dict[str, int] = {}
    heads, notes, size = [], [], 0
    done = {layer for layer, _ in result.coords}
    for plan in plans:
        if plan.layer in result.bad_layers or plan.layer not in done:
            notes.append(f"L{plan.layer} H{plan.head} is not in the viewer: "
                         f"{result.bad_layers.get(plan.layer, 'its maps could not be recomputed')}.")
            continue
        head, new_items = _head_entry(r, plan, result, index, len(items))
        if not head["tokens"]:
            notes.append(f"L{plan.layer} H{plan.head} is not in the viewer: none of its top {result.noun} "
                         f"could be read.")
            continue
        cost = payload_bytes(head) + sum(payload_bytes(it) for it in new_items)
        if heads and size + cost > limits.max_bytes:
            notes.append(f"L{plan.layer} H{plan.head} is not in the viewer: the page would exceed its "
                         f"{limits.max_bytes / 2 ** 20:.0f} MiB budget.")
            continue
        for it in new_items:
            index[it["id"]] = len(items)
            items.append(it)
        heads.append(head)
        size += cost
    payload = {"version": PAYLOAD_VERSION, "noun": result.noun, "items": items, "heads": heads,
               "limits": {"modes": limits.modes, "images": limits.images, "max_bytes": limits.max_bytes},
               "bytes": size}
    return payload, notes


def _head_entry(r, plan: HeadPlan, result, index: Dict[str, int], n_items: int) -> Tuple[dict, List[dict]]:
    """One head's JSON and the items it adds to ``index`` (numbered from ``n_items``)."""
    cols = [m["mode"] for m in plan.modes]
    local: Dict[str, int] = {}
    new_items: List[dict] = []
    tokens: Dict[str, dict] = {}
    for sid in _head_ids(plan):
        if not result.has(plan.layer, sid):
            continue
        if sid in index:
            k = index[sid]
        else:
            k = n_items + len(new_items)
            new_items.append(_item(r, result, plan.layer, sid))
        local[sid] = k
        a, b = result.coords[(plan.layer, sid)]                     # (H, N, R), (H, Nk, R)
        tokens[str(k)] = token_data(a[plan.head][:, cols], b[plan.head][:, cols],
                                    result.probs.get((plan.layer, plan.head, sid)))
    top = [[[local[s] for s in ids if s in local] for ids in per_mode] for per_mode in plan.top]
    scores = [[[sc for s, sc in zip(ids, scs) if s in local] for ids, scs in zip(per_mode, per_scores)]
              for per_mode, per_scores in zip(plan.top, plan.scores)]
    head = {"layer": plan.layer, "head": plan.head, "name": plan.name, "scale": result.scales.get(plan.layer),
            "ranked_by": plan.ranked_by, "modes": plan.modes, "top": top, "scores": scores, "tokens": tokens}
    return head, new_items


def _item(r, result, layer: int, sid: str) -> dict:
    """The payload item of one input: an image's patch grid, or a sentence's tokens."""
    prefix = max(int(result.layers[layer].prefix_tokens), 0)
    if sid in getattr(result, "tokens", {}):          # a SentenceCoords (qkprobe/report/text.py)
        return seq_item(sid, result.tokens[sid], prefix, r.class_of(sid), text=result.texts.get(sid))
    return grid_item(sid, result.images[sid], result.grids[layer], prefix, r.class_of(sid))


def recompute_for(r, plans: Sequence[HeadPlan], *, image_root: Optional[str] = None, device: str = "cpu",
                  progress: bool = True):
    """Rebuild the run's model once and capture coordinates and attention of the plans' inputs:
    images (:func:`qkprobe.report.maps.recompute`), or for a text run sentences, each alone
    (:func:`qkprobe.report.text.recompute`)."""
    from .build import image_root_of, resolve_image
    from .maps import LayerRef, recompute
    from .text import is_text_run, run_sentence
    from .text import recompute as recompute_sentences
    refs, keep = {}, {}
    for plan in plans:
        l = r.layers[plan.layer]
        refs[l.index] = LayerRef(index=l.index, name=l.name, U=l.U, V=l.V, fold_ln=l.fold_ln,
                                 prefix_tokens=l.prefix_tokens,
                                 include_prefix=bool(r.options.get("include_prefix", False)))
        keep.setdefault(l.index, []).append(plan.head)
    layers = [refs[i] for i in sorted(refs)]
    ids = [sid for plan in plans for sid in _head_ids(plan)]
    if is_text_run(r):
        texts = {sid: run_sentence(r, sid) for sid in dict.fromkeys(ids)}
        return recompute_sentences(r.meta, layers, {s: t for s, t in texts.items() if t is not None}, device,
                                   keep_probs=keep)
    root = image_root_of(r, image_root)
    paths = {sid: resolve_image(sid, root) for sid in dict.fromkeys(ids)}
    return recompute(r.meta, layers, {s: p for s, p in paths.items() if p is not None}, device=device,
                     progress=progress, keep_probs=keep)


# --------------------------------------------------------------------------- HTML

def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def viewer_block(payload: dict, element_id: str) -> str:
    """The viewer's HTML: its root element, JSON data, style and script (safe to repeat on a page)."""
    data_id = f"{element_id}-data"
    script = _asset("viewer.js").replace("</", "<\\/")
    return (f'<style>{_asset("viewer.css")}</style>\n'
            f'<div class="qkv" id="{H.esc(element_id)}" data-source="{H.esc(data_id)}">'
            f'<noscript><p class="note">The viewer needs JavaScript.</p></noscript></div>\n'
            f'{H.json_block(data_id, payload)}\n<script>{script}</script>')


def viewer_page(payload: dict, title: str = "qkprobe viewer") -> str:
    """A standalone page holding one viewer (for notebooks and tests)."""
    return H.page(title, [], [], viewer_block(payload, "viewer"))


INTRO = ('<p class="note">Choose a head and one of its modes (ranked by {ranked}; at most {modes} per head), '
         'then one of the mode\'s top {noun} of either sign (at most {images} each). Hover a {unit}: left, the '
         'query coordinate a_i of every token (red positive, blue negative); middle, the mode\'s contribution '
         's_r·a_i·b_j to the logits of the hovered query i over all keys j; right, the head\'s actual '
         'attention row P_ij (the model\'s probabilities, everything it adds to the logits included). '
         'Logits are scale·Σ_r s_r·a_ir·b_jr plus the terms outside the bilinear part. Coordinates are '
         'stored as 16-bit integers, attention as 8 bits per row maximum.</p>')


def viewer_section(r, ri: int, choices: Sequence, *, maps: bool = True, image_root: Optional[str] = None,
                   device: str = "cpu", progress: bool = True,
                   limits: Optional[ViewerLimits] = None) -> Tuple[str, Optional[dict]]:
    """The report's viewer section for run ``ri`` over the chosen heads: (HTML, summary for the
    report's JSON, None when there is no viewer)."""
    limits = limits or ViewerLimits()
    head_html = f'<h3 id="run{ri}-viewer">Interactive viewer</h3>'
    if not maps:
        return head_html + '<p class="note">No viewer: maps were not recomputed (<code>--no-maps</code>).</p>', None
    plans = [p for p in (plan_head(r, c.layer, c.head, limits) for c in choices) if p is not None]
    if not plans:
        return head_html + '<p class="note">No viewer: the file holds no top-k samples.</p>', None
    result = recompute_for(r, plans, image_root=image_root, device=device, progress=progress)
    payload, notes = build_payload(r, plans, result, limits)
    notes = ([] if result.loaded else result.notes) + notes
    parts = [head_html] + [H.warning(n) for n in notes]
    if not payload["heads"]:
        return "\n".join(parts), {"heads": [], "bytes": 0, "notes": notes}
    ranked = sorted({h["ranked_by"] for h in payload["heads"]})
    parts.append(INTRO.format(ranked=" / ".join(ranked), modes=limits.modes, images=limits.images,
                              noun=result.noun, unit="token" if result.noun == "sentences" else "patch"))
    parts.append(viewer_block(payload, f"run{ri}-qkv"))
    summary = {"heads": [[h["layer"], h["head"]] for h in payload["heads"]], "bytes": payload["bytes"],
               "items": len(payload["items"]), "notes": notes}
    return "\n".join(parts), summary


# --------------------------------------------------------------------------- notebooks

class Viewer:
    """A viewer for notebooks: ``qkprobe.report.viewer.show("run.h5")`` displays it (an iframe)."""

    def __init__(self, payload: dict, notes: Sequence[str] = ()):
        self.payload, self.notes = payload, list(notes)

    def html(self) -> str:
        return viewer_page(self.payload)

    def save(self, path) -> Path:
        Path(path).write_text(self.html(), encoding="utf-8")
        return Path(path)

    def _repr_html_(self) -> str:
        notes = "".join(H.warning(n) for n in self.notes)
        return (notes + f'<iframe srcdoc="{H.esc(self.html())}" style="width:100%;height:760px;border:0" '
                        f'sandbox="allow-scripts"></iframe>')


def show(path, heads: Optional[Sequence[Tuple[int, int]]] = None, *, limits: Optional[ViewerLimits] = None,
         image_root: Optional[str] = None, device: str = "cpu") -> Viewer:
    """The viewer of a run file's chosen heads (default: the report's choice), rebuilding its model."""
    from .build import choose_heads, read_run
    r = read_run(path)
    limits = limits or ViewerLimits()
    plans = [p for p in (plan_head(r, c.layer, c.head, limits) for c in choose_heads(r, explicit=heads))
             if p is not None]
    result = recompute_for(r, plans, image_root=image_root, device=device, progress=False)
    payload, notes = build_payload(r, plans, result, limits)
    return Viewer(payload, ([] if result.loaded else result.notes) + notes)


def run_summary_html(run) -> str:
    """A compact HTML table of an open run file (``RunFile._repr_html_``): the file, its model and
    per layer the heads, modes and S-weighted cosine."""
    meta = run.metadata
    spec = meta.get("model_spec") or "–"
    rows = []
    for i, name in enumerate(run.layer_names):
        b = run.bases(i)
        S, cos = np.asarray(b["S"], dtype=np.float64), np.asarray(b["cosine"], dtype=np.float64)
        w = S / np.where(S.sum(-1, keepdims=True) > 0, S.sum(-1, keepdims=True), 1.0)
        rows.append([i, f"<code>{H.esc(name)}</code>", S.shape[0], S.shape[1], f"{float(cos.mean()):+.3f}",
                     f"{float((w * cos).sum(-1).mean()):+.3f}"])
    head = (f"<p><b>qkprobe run</b> <code>{H.esc(run.path)}</code>: {len(run)} rows, {len(rows)} layers, model "
            f"<code>{H.esc(spec)}</code>{' (random init)' if meta.get('random_init') else ''}, weights hash "
            f"<code>{H.esc(meta.get('weights_hash') or '–')}</code>; statistics: {H.esc(', '.join(run.stat_names))}"
            f"</p>")
    hint = ('<p class="muted">Interactive per-mode viewer (rebuilds the model): '
            '<code>qkprobe.report.viewer.show(path)</code>.</p>')
    return head + H.table(["layer", "name", "heads", "modes", "mean cos", "S-weighted cos"], rows,
                          numeric=(0, 2, 3, 4, 5)) + hint


def screenshot(page, out, *, viewer: str = ".qkv", token: Optional[int] = None, image: Optional[str] = None,
               width: int = 1280) -> str:
    """PNG of the first viewer on a report page with the mouse on a query token (default: the
    token the viewer opened with, the largest |a_i| of its first mode and image); ``image``: show
    the first top image (or sentence) whose id contains this text::

        python -m qkprobe.report.viewer report/index.html docs/viewer.png --image astronaut --token 49
        python -m qkprobe.report.viewer text_report/index.html docs/viewer_text.png --image sentences.txt:5 --token 4
    """
    from .browser import BrowserError, BrowserSession
    with BrowserSession(page, width=width) as session:
        if not session.evaluate(f"!!document.querySelector({json.dumps(viewer)})?.dataset.ready"):
            raise BrowserError(f"{page} has no interactive viewer; build the report with maps.")
        if image:
            thumbs = json.dumps(viewer + " .qkv-thumb")
            thumb = session.evaluate(f"(() => {{ const b = [...document.querySelectorAll({thumbs})]"
                                     f".find(b => b.title.includes({json.dumps(image)})); if (b) b.click(); "
                                     f"return !!b; }})()")
            if not thumb:
                raise BrowserError(f"No top image or sentence of the viewer's first mode has {image!r} in its "
                                   f"name; pass part of one of its ids to --image.")
        if token is None:
            token = int(session.evaluate(f"document.querySelector({json.dumps(viewer)}).dataset.query"))
        session.hover(f'{viewer} [data-panel="query"] .qkv-tok[data-token="{int(token)}"]')
        shot = session.screenshot(out, selector=viewer)
        errors = session.console_errors()
    if errors:
        raise BrowserError(f"The viewer reported errors: {errors[0]}")
    return shot


if __name__ == "__main__":   # pragma: no cover - the command behind docs/viewer.png
    import argparse
    parser = argparse.ArgumentParser(prog="python -m qkprobe.report.viewer",
                                     description="screenshot the interactive viewer of a report page")
    parser.add_argument("page")
    parser.add_argument("out")
    parser.add_argument("--token", type=int, default=None, help="query token to hover (0 = cls / [CLS])")
    parser.add_argument("--image", default=None,
                        help="show the top image (or sentence) whose id contains this text, e.g. sentences.txt:5")
    args = parser.parse_args()
    print(screenshot(args.page, args.out, token=args.token, image=args.image))
