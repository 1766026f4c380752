"""The optimal-sentences section of the report, for a run of ``qkprobe run --text``.

A text run's sample ids name sentences (``"<file>:<line>"`` under the recorded text root, see
:mod:`qkprobe.text`), not images. For each chosen head, its top modes and both signs, the section
lists the top sentences of the run with the *query token* (largest ±a, red) and the *key token*
(largest ±b, cyan) of the mode highlighted: the pair of tokens that gives the sentence its score
``max(±a)·max(±b)``. The coordinates are recomputed from the recorded model and tokenizer on each
sentence alone, with the modes' signs aligned to the recorded U as for images
(:mod:`qkprobe.report.maps`); a figure per head shows the same with every token shaded by its
query (red) and key (cyan) coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..text import TEXT_FIELD, TEXT_ROOT, resolve_sentence
from . import html as H
from .maps import LayerRef, _keep_probs, _sign_alignment

QUERY_RGB = (0.85, 0.1, 0.1)   # as the image overlays: query red, key cyan
KEY_RGB = (0.0, 0.75, 0.85)


def is_text_run(run) -> bool:
    """Whether a run (:class:`qkprobe.report.build.RunData`) recorded sentences (``--text``)."""
    return bool(run.meta.get(TEXT_ROOT))


def run_sentence(run, sample_id: str) -> Optional[str]:
    """The sentence a text run's sample id names (None: gone from its file)."""
    return resolve_sentence(sample_id, run.meta.get(TEXT_ROOT), run.meta.get(TEXT_FIELD) or None)


@dataclass
class SentenceCoords:
    """Recomputed coordinates of the chosen layers for a few sentences (what
    :class:`qkprobe.report.maps.MapResult` is for images; the viewer reads either)."""

    noun: ClassVar[str] = "sentences"
    loaded: bool = False                                                           # the model was rebuilt
    notes: List[str] = field(default_factory=list)
    texts: Dict[str, str] = field(default_factory=dict)                            # id → sentence
    tokens: Dict[str, List[str]] = field(default_factory=dict)                     # id → tokens
    coords: Dict[Tuple[int, str], Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (H, N, R) each
    layers: Dict[int, LayerRef] = field(default_factory=dict)
    bad_layers: Dict[int, str] = field(default_factory=dict)
    scales: Dict[int, float] = field(default_factory=dict)        # layer → the bases' logit scale
    # (layer, head, id) → (N, N) the head's actual attention probabilities (only ``keep_probs`` heads)
    probs: Dict[Tuple[int, int, str], np.ndarray] = field(default_factory=dict)

    def has(self, layer: int, sample_id: str) -> bool:
        return (layer, sample_id) in self.coords


def _load(meta: dict, notes: List[str], device: str):
    """(model, tokenizer) rebuilt from the run's metadata, or None with a note why not."""
    from ..models import weights_hash
    from ..text import is_tokenizer
    from .maps import rebuild_model
    spec = meta.get("model_spec")
    if not spec:
        notes.append("The run file records no model spec, so the query and key tokens cannot be recomputed.")
        return None
    try:
        model, tok = rebuild_model(meta, device)
    except Exception as exc:  # noqa: BLE001 - whatever a file's spec makes a library raise is a note
        notes.append(f"The model {spec} could not be rebuilt, so no query and key tokens are shown "
                     f"({' '.join(str(exc).split()) or type(exc).__name__}).")
        return None
    recorded = str(meta.get("weights_hash") or "")
    if recorded and weights_hash(model) != recorded:
        notes.append(f"The model rebuilt from {spec} has other weights than the run was recorded with: the "
                     f"highlighted tokens come from different weights than the scores.")
    if not is_tokenizer(tok):
        notes.append(f"{spec} has no tokenizer, so no query and key tokens are shown.")
        return None
    return model, tok


def recompute(meta: dict, layers: Sequence[LayerRef], texts: Dict[str, str], device: str = "cpu",
              keep_probs: Optional[Dict[int, Sequence[int]]] = None) -> SentenceCoords:
    """Coordinates a, b (signs aligned to the recorded modes) of ``layers`` for each sentence
    (id → text), each run alone. ``keep_probs``: layer → heads whose actual attention
    probabilities (the adapter's, as for images) are kept in ``probs``. Never raises for a model
    that cannot be rebuilt (a note)."""
    import torch

    from ..adapters.discover import find_attention
    from ..bases import layer_bases
    from ..capture.coordinates import capture_qk, coordinates_from_qk
    from ..text import encode

    res = SentenceCoords(layers={ref.index: ref for ref in layers})
    loaded = _load(meta, res.notes, device) if texts else None
    if loaded is None:
        return res
    model, tok = loaded
    res.loaded = True
    sites = {s.name: s for s in find_attention(model)}
    chosen = []
    for ref in layers:
        site = sites.get(ref.name)
        if site is None:
            res.bad_layers[ref.index] = f"the rebuilt model has no attention layer {ref.name}"
            res.notes.append(f"The rebuilt model has no attention layer {ref.name}.")
            continue
        lb = layer_bases(site, model, fold_ln=ref.fold_ln, spectra=False)
        sign, agree = _sign_alignment(lb.U.numpy(), ref.U.astype(np.float64), lb.V.numpy(), ref.V.astype(np.float64))
        if agree < 0.99:
            res.notes.append(f"Layer {ref.index} ({ref.name}): recomputed modes differ from the recorded ones.")
        chosen.append((ref, site, lb, sign))
    for sid, text in texts.items():
        enc = encode(tok, [text], device)
        seen: Dict[int, tuple] = {}

        def on_qk(i, q, k, info, seen=seen):
            seen.setdefault(i, (q, k, info))

        with capture_qk([c[1] for c in chosen], on_qk), torch.no_grad():
            model(**enc)
        res.texts[sid] = text
        res.tokens[sid] = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
        for ci, (ref, _site, lb, sign) in enumerate(chosen):
            if ci in seen:
                q, k, info = seen[ci]
                a, b = coordinates_from_qk(q, k, lb)
                s = torch.as_tensor(sign, dtype=a.dtype).unsqueeze(-2)  # (H, 1, R)
                res.coords[(ref.index, sid)] = ((a[0] * s).cpu().numpy(), (b[0] * s).cpu().numpy())
                res.scales[ref.index] = float(lb.scale)
                _keep_probs(res, ref.index, (keep_probs or {}).get(ref.index, ()), [sid], q, k, info, lb.scale)
    return res


@dataclass
class Highlight:
    """One sentence of a mode's top list: its tokens, the query and key token and the maps."""

    sid: str
    score: float
    tokens: List[str]
    qmap: np.ndarray            # (N,) ±a of the mode
    kmap: np.ndarray            # (N,) ±b
    query: int                  # index of the query token
    key: int
    recomputed: float
    start: int                  # the first map token (prefix tokens before it)


def highlight(sid: str, score: float, tokens: List[str], a: np.ndarray, b: np.ndarray, head: int, mode: int,
              sign: int, start: int) -> Highlight:
    """The query token (argmax of ±a) and key token (argmax of ±b) over the tokens from ``start``."""
    s = 1.0 if sign == 0 else -1.0
    qa, kb = s * a[head, :, mode], s * b[head, :, mode]
    qi, ki = start + int(np.argmax(qa[start:])), start + int(np.argmax(kb[start:]))
    return Highlight(sid, score, tokens, qa, kb, qi, ki, float(qa[qi] * kb[ki]), start)


def _token_html(h: Highlight) -> str:
    spans = []
    for i, t in enumerate(h.tokens):
        style = []
        if i == h.query:
            style.append("background:#d91a1a;color:#fff")
        if i == h.key:
            style.append("box-shadow:inset 0 -4px 0 #00bfd9" if i == h.query else "background:#00bfd9")
        text = H.esc(t[2:] if t.startswith("##") else t)
        glue = "" if t.startswith("##") or i == 0 else " "
        spans.append(glue + (f'<span style="{";".join(style)};padding:0 2px;border-radius:3px">{text}</span>'
                             if style else text))
    return "".join(spans)


def _shades(x: np.ndarray, start: int) -> np.ndarray:
    """x (N,) scaled to [0, 1] by its maximum over the map tokens (from ``start``); prefix tokens 0."""
    out = np.clip(x / max(float(x[start:].max()), 1e-12), 0, 1)
    out[:start] = 0
    return out


def sentence_figure(rows: List[Tuple[str, List[Highlight]]], title: str = ""):
    """A figure of rows (label, highlighted sentences): tokens in a monospace font on a background
    as red as their query coordinate, over a bar as cyan as their key coordinate (each scaled to
    the sentence's maximum over its map tokens); the query token framed, the key token's bar solid."""
    from matplotlib import pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.patches import Rectangle

    lines = []
    for label, items in rows:
        lines.append((label, None))
        lines.extend((None, h) for h in items)
    width = max([len(label or "") for label, _ in lines]
                + [sum(len(t) + 1 for t in h.tokens) + 8 for _, h in lines if h is not None] + [40])
    size = 10
    fig = plt.figure(figsize=(min(width, 160) * 0.6 * size / 72 + 0.6, 0.24 * (len(lines) + 1) + 0.3), dpi=110)
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98])
    ax.set_xlim(0, min(width, 160) + 2)
    ax.set_ylim(len(lines) - 0.3, -0.7 - bool(title))
    ax.axis("off")
    if title:
        ax.text(0, -1, title, fontsize=size + 1, weight="bold", va="center")
    for y, (label, h) in enumerate(lines):
        if h is None:
            ax.text(0, y, label, fontsize=size, weight="bold", va="center")
            continue
        qn, kn = _shades(h.qmap, h.start), _shades(h.kmap, h.start)
        x = 1.0
        for i, t in enumerate(h.tokens):
            rgb = 1 - 0.75 * qn[i] * (1 - np.array(QUERY_RGB))  # the query map: the token's background
            ax.text(x, y, t, family="monospace", fontsize=size, va="center",
                    bbox=dict(facecolor=to_hex(np.clip(rgb, 0, 1)), edgecolor="#b00000" if i == h.query else "none",
                              linewidth=1.6, boxstyle="square,pad=0.15"))
            if kn[i] > 0:  # the key map: a bar under the token
                ax.add_patch(Rectangle((x - 0.15, y + 0.27), len(t) + 0.3, 0.2,
                                       color="#007a90" if i == h.key else KEY_RGB,
                                       alpha=1.0 if i == h.key else 0.7 * float(kn[i]), linewidth=0))
            x += len(t) + 1
        ax.text(x + 1, y, f"{h.score:+.2f}", fontsize=size - 1, color="#5f6670", va="center")
    return fig


def text_section(ctx, r, ri: int, choices, n_modes: int, topk: int, maps: bool, device: str):
    """(HTML, data, []) of the optimal-sentences section of a text run (``r``: RunData): no image is
    missing; sentences gone from their files are listed in ``data["missing_sentences"]`` and marked
    in the list."""
    data: dict = {"chosen_heads": [[c.layer, c.head] for c in choices], "entries": [], "kind": "text"}
    head = [f'<h3 id="run{ri}-optimal">Optimal sentences</h3>']
    if not choices:
        head.append('<p class="note">The file holds no top-k samples, so there are no optimal sentences.</p>')
        return "\n".join(head), data, []
    plan, texts = [], {}
    for c in choices:
        l = r.layers[c.layer]
        hi = l.heads.index(c.head)
        rows = []
        for m in [int(m) for m in np.argsort(-l.S[c.head], kind="stable")[:n_modes]]:
            for sign in (0, 1):
                items = []
                for k in range(min(topk, l.topk_index.shape[-1])):
                    idx, score = int(l.topk_index[hi, m, sign, k]), float(l.topk_scores[hi, m, sign, k])
                    if 0 <= idx < len(r.ids) and np.isfinite(score):
                        items.append((r.ids[idx], score))
                        if r.ids[idx] not in texts:
                            texts[r.ids[idx]] = run_sentence(r, r.ids[idx])
                rows.append((m, sign, items))
        plan.append((c, l, rows))
    data["missing_sentences"] = sorted(s for s, t in texts.items() if t is None)
    include = bool(r.options.get("include_prefix", False))
    refs = [LayerRef(index=l.index, name=l.name, U=l.U, V=l.V, fold_ln=l.fold_ln, prefix_tokens=l.prefix_tokens,
                     include_prefix=include) for l in {c.layer: r.layers[c.layer] for c in choices}.values()]
    found = {s: t for s, t in texts.items() if t is not None}
    res = recompute(r.meta, refs, found, device) if maps else SentenceCoords()
    head += [H.warning(n) for n in res.notes]
    if not maps:
        head.append('<p class="note">Query and key tokens were not recomputed (<code>--no-maps</code>).</p>')
    head.append('<p class="note">For each chosen head, its top modes by singular value, both signs: sign + ranks '
                'sentences by max(a)·max(b), sign − by min(a)·min(b), where a is the query-side coordinate u_r·x of '
                'a token and b the key-side one v_r·x. In each sentence the <b style="color:#d91a1a">query token</b> '
                '(largest ±a) and the <b style="color:#00a0b8">key token</b> (largest ±b) are highlighted: that '
                'query attends to that key through this mode. A leading special token (BERT\'s [CLS]) is a prefix '
                'token, left out of the maps; [SEP] is a token like any other. In the figure every token is '
                'shaded by its query coordinate (red) and its key coordinate (cyan bar under it); the query token '
                'is framed, the key token\'s bar dark. Scores are the ones stored in the run.</p>')
    body = []
    for c, l, rows in plan:
        start = 0 if include else max(l.prefix_tokens, 0)
        fig_rows, html_rows = [], []
        for m, sign, items in rows:
            label = f"L{c.layer} H{c.head} M{m} {'+' if sign == 0 else '−'}"
            entry = {"layer": c.layer, "head": c.head, "mode": m, "sign": sign, "label": label,
                     "cosine": float(l.cosine[c.head, m]), "items": []}
            shown = []
            for sid, score in items:
                item = {"id": sid, "score": score, "text": texts.get(sid), "missing": texts.get(sid) is None}
                if (c.layer, sid) in res.coords:
                    h = highlight(sid, score, res.tokens[sid], *res.coords[(c.layer, sid)], c.head, m, sign, start)
                    shown.append(h)
                    item.update(query_token=h.tokens[h.query], key_token=h.tokens[h.key], query_index=h.query,
                                key_index=h.key, recomputed_score=h.recomputed)
                entry["items"].append(item)
            data["entries"].append(entry)
            fig_rows.append((f"{label}   cos(u, v) = {l.cosine[c.head, m]:+.2f}", shown))
            html_rows.append(_entry_html(label, entry, {h.sid: h for h in shown}))
        body.append(f"<h4>L{c.layer} H{c.head} <span class=\"muted\">— <code>{H.esc(l.name)}</code> head "
                    f"{c.head}; {H.esc(c.why)}</span></h4>")
        if any(shown for _, shown in fig_rows):
            src = ctx.save(sentence_figure(fig_rows), f"run{ri}_sentences_L{c.layer:02d}_H{c.head:02d}.png")
            body.append(H.figure(src, f"optimal sentences of layer {c.layer} head {c.head}"))
        body += html_rows
    return "\n".join(head + body), data, []


def _entry_html(label: str, entry: dict, shown: Dict[str, Highlight]) -> str:
    items = []
    for it in entry["items"]:
        h: Optional[Highlight] = shown.get(it["id"])
        if h is not None:
            text = _token_html(h)
        elif it["text"] is not None:
            text = H.esc(it["text"])
        else:
            text = '<span class="muted">(the sentence is no longer in its file)</span>'
        items.append(f'<li><span class="muted">{it["score"]:+.3f} <code>{H.esc(it["id"])}</code></span> {text}</li>')
    return (f'<p><b>{H.esc(label)}</b> <span class="muted">cos(u, v) = {entry["cosine"]:+.3f}</span></p>'
            f'<ol class="sentences">{"".join(items)}</ol>')
