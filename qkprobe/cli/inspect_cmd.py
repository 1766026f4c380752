"""``qkprobe inspect FILE``: what any qkprobe file holds, by its kind.

Run files: samples, layers, statistics, labels. Bases files: the per-layer cosine table. Model-zoo
files: that table per model, and the models that failed. Ablation files: what was ablated
(modes, scale, images) and the effect of the modes that changed the output most.
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence

import numpy as np

from ..plot import layer_summaries

#: Metadata shown for every kind of file, when present.
META_KEYS = ("model_spec", "random_init", "weights_hash", "qkprobe_version", "created")


def inspect_file(path: str) -> None:
    """Print the summary of ``path`` for its kind (a run file when it is none of the others; a file
    that is no qkprobe file at all fails there with one sentence)."""
    from ..sinks.ablate_file import is_ablation_file
    from ..sinks.bases_file import BASES_KIND, ZOO_KIND, file_kind
    if is_ablation_file(path):
        print(ablation_summary(path))
        return
    kind = file_kind(path)
    if kind == BASES_KIND:
        print(bases_summary(path))
    elif kind == ZOO_KIND:
        print(zoo_summary(path))
    else:
        print(run_summary(path))


def _meta_lines(meta: dict) -> List[str]:
    lines = [f"  {key}: {meta[key]}" for key in META_KEYS if key in meta]
    if "options" in meta:
        options = meta["options"]
        options = json.loads(options) if isinstance(options, str) else options
        lines.append(f"  options: {json.dumps(options, sort_keys=True)}")
    return lines


def cosine_table(layers: Sequence[Dict]) -> str:
    """Per layer: name, heads H, modes R, the S-weighted cosine (mean over heads of
    Σ_r (s_r/Σs) cos(u_r, v_r)), the mean cosine, the fraction of modes with cos > 0 and the
    extras. ``layers``: dicts with ``S``, ``cosine`` (H, R), ``name`` and ``extras``."""
    rows = [f"{'layer':>5}  {'name':<32} {'H':>3} {'R':>4}  {'S-w cos':>8} {'mean cos':>8} {'cos>0':>6}  extras"]
    for i, (lay, s) in enumerate(zip(layers, layer_summaries(layers))):
        H, R = np.asarray(lay["S"]).shape
        extras = ",".join(sorted(lay.get("extras") or [])) or "-"
        rows.append(f"{i:>5}  {str(lay.get('name', ''))[-32:]:<32} {H:>3} {R:>4}  {s['weighted_cosine']:>+8.4f} "
                    f"{s['mean_cosine']:>+8.4f} {s['positive_fraction']:>6.2f}  {extras}")
    return "\n".join(rows)


def bases_summary(path: str) -> str:
    import h5py

    from ..sinks.bases_file import read_bases
    with h5py.File(path, "r") as f:
        meta = {k: f.attrs[k] for k in f.attrs}
    layers = read_bases(path)
    return "\n".join([f"{path}: qkprobe bases file, {len(layers)} layers", *_meta_lines(meta),
                      cosine_table(layers)])


def zoo_summary(path: str) -> str:
    from ..sinks.bases_file import read_zoo
    zoo = read_zoo(path)
    out = [f"{path}: qkprobe model-zoo bases file, {len(zoo['models'])} models, {len(zoo['failed'])} failed",
           f"  options: {json.dumps(zoo['options'], sort_keys=True)}"]
    for key, m in zoo["models"].items():
        attrs = m["attrs"]
        group = attrs.get("group", "")
        out.append(f"\n{attrs.get('model_spec', key)}" + (f" — {group}" if group else "") +
                   f" ({len(m['layers'])} layers)")
        out.append(cosine_table(m["layers"]))
    for key, reason in zoo["failed"].items():
        out.append(f"  failed: {key}: {reason}")
    return "\n".join(out)


def ablation_summary(path: str, n: int = 10) -> str:
    from ..report.ablation import has_top1
    from ..sinks.ablate_file import open_ablation
    from .ablate_cmd import effect_table
    ab = open_ablation(path)
    options = ab.meta.get("options") or {}
    what = f"modes {options['modes']}" if options.get("modes") else f"the top {options.get('top')} modes per layer"
    measure = "KL of the class probabilities" if ab.measure == "kl" else "1 − cos of the embedding"
    lines = [f"{path}: qkprobe ablation file, {len(ab.labels())} modes × {len(ab.images)} images, "
             f"{int(ab.done.sum())} of {ab.done.size} pairs done",
             *_meta_lines(ab.meta),
             f"  ablated: {what}, coordinates times {float(options.get('scale', 0.0)):g}"
             f"{' (removed)' if float(options.get('scale', 0.0)) == 0.0 else ''}",
             f"  effect: {measure}, mean over images" + ("; top-1: share of images whose top class stays"
                                                        if has_top1(ab) else ""),
             effect_table(ab, n)]
    return "\n".join(lines)


def _label_counts(labels) -> str:
    """``"cat 7, dog 5, ..."``: the most frequent labels first (at most 10 named)."""
    from collections import Counter
    counts = Counter(v for v in labels if v).most_common()
    text = ", ".join(f"{name} {n}" for name, n in counts[:10])
    return text + (f", ... ({len(counts) - 10} more classes)" if len(counts) > 10 else "")


def run_summary(path: str) -> str:
    from ..sinks.run_file import open_run
    with open_run(path) as run:
        meta = run.metadata
        out = [f"{path}: {len(run)} committed samples, {len(run.layer_names)} layers, "
               f"statistics: {', '.join(run.stat_names)}"]
        out += _meta_lines(meta)
        out += [f"  layer {i:2d} {name}" for i, name in enumerate(run.layer_names)]
        if run.skipped:
            out.append(f"  skipped inputs: {len(run.skipped)} (first: {run.skipped[0][0]}: {run.skipped[0][1]})")
        labels = run.labels
        if labels is not None:
            unlabelled = sum(1 for v in labels if not v)
            out.append(f"  labels: {len({v for v in labels if v})} classes: {_label_counts(labels)}"
                       + (f"; {unlabelled} rows without a label" if unlabelled else ""))
    return "\n".join(out)
