"""``qkprobe ablate SPEC --images DIR --modes L5H3M0,L5H3M1 | --top N [--scale S] --out ablate.h5``.

For each chosen mode (or the N modes with the largest attention share in every layer, from
``core.stats.mode_statistics`` over the images), over the image set: the change of the model's
output (KL of class probabilities, or 1 − cosine of the embedding for feature models), top-1
agreement and the mean absolute change of that head's attention, with the mode's coordinates
times ``--scale`` (0 = removed). Layers below the intervened block are computed once per batch
and reused. Resumable: (mode, image) pairs already in the file are skipped.
"""

from __future__ import annotations

import os
import sys

from ..errors import RunFileError
from .common import add_model_args, load_from_args, make_out_folder


def add_parsers(sub) -> None:
    p = sub.add_parser("ablate", help="what removing (or scaling) each mode does to the model's output")
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of images (recursive); default: scikit-image's photographs")
    src.add_argument("--list", help="text file with one image path per line")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--modes", help="modes to ablate, like L5H3M0,L5H3M1 (layer, head, mode; 0 = largest s)")
    which.add_argument("--top", type=int, help="ablate the N modes with the largest attention share in each layer")
    p.add_argument("--scale", type=float, default=0.0, help="factor on the mode's coordinates (default 0: remove)")
    p.add_argument("--out", required=True, help="HDF5 ablation file (its folder is created if missing)")
    p.add_argument("--fold-ln", action="store_true", help="modes of the bases with the norm's affine map folded in")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--no-cache", action="store_true", help="run full forwards instead of reusing the layers below")
    p.add_argument("--resume", action="store_true", help="continue a file: compute only what it lacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check_out(args) -> None:
    if os.path.isdir(args.out):
        raise RunFileError(f"--out {args.out} is a folder; give the path of a file to write, e.g. "
                           f"{os.path.join(args.out, 'ablate.h5')}.")
    if os.path.exists(args.out) and not args.resume:
        raise RunFileError(f"{args.out} already exists; pass --resume to continue it or choose another --out.")
    if args.resume and not os.path.exists(args.out):
        raise RunFileError(f"There is no {args.out} to resume; run without --resume to start it.")


def _options(args) -> dict:
    return {"modes": args.modes, "top": args.top, "scale": float(args.scale), "fold_ln": bool(args.fold_ln)}


def _check_resumable(path: str, meta: dict, options: dict) -> None:
    from ..sinks.ablate_file import is_ablation_file, read_metadata
    if not is_ablation_file(path):
        raise RunFileError(f"{path} is not a qkprobe ablation file; choose another --out.")
    old = read_metadata(path)
    for key in ("model_spec", "weights_hash"):
        if str(old.get(key)) != str(meta[key]):
            raise RunFileError(f"Cannot resume {path}: it was made with {key} {old.get(key)!r}, not {meta[key]!r}; "
                               f"use the same model and weights or start a new file.")
    if old.get("options") != options:
        diff = sorted(k for k in options if (old.get("options") or {}).get(k) != options[k])
        raise RunFileError(f"Cannot resume {path}: its options differ in {', '.join(diff)}; pass the options "
                           f"it was started with or start a new file.")


def _good_batches(loader, skipped: list):
    for images, paths, ok, reasons in loader:
        keep = [i for i, good in enumerate(ok.tolist()) if good]
        for p, good, why in zip(paths, ok.tolist(), reasons):
            if not good:
                skipped.append((p, why))
        if keep:
            yield images[keep], [paths[i] for i in keep]


def run(args) -> int:
    import numpy as np

    from ..bases import compute_bases
    from ..capture.ablate import Ablator, ModeRef, attention_shares, parse_modes, top_modes
    from ..capture.intervene import INEXACT_EXTRAS
    from ..data import make_loader
    from ..metadata import versions
    from ..sinks import ablate_file
    from .run_cmd import image_paths

    _check_out(args)
    if args.batch_size < 1:
        raise RunFileError("--batch-size must be at least 1.")
    make_out_folder(args.out)
    model, transform, meta = load_from_args(args, device=args.device)
    if transform is None or not callable(transform) or hasattr(transform, "tokenize"):
        raise RunFileError(f"{args.spec} has no image preprocessing; qkprobe ablate needs a vision model.")
    model.eval()
    bases = compute_bases(model, fold_ln=args.fold_ln)
    options = _options(args)
    skipped: list = []
    if args.resume:
        _check_resumable(args.out, meta, options)
        modes = [ModeRef(*m) for m in ablate_file.stored_modes(args.out)]
    else:
        paths = image_paths(args, "ablate on")
        good: list = []

        def share_batches():
            loader = make_loader(paths, transform, batch_size=args.batch_size)
            for x, names in _good_batches(loader, skipped):
                good.extend(names)
                yield x.to(args.device)

        shares = attention_shares(model, share_batches(), bases)
        if not good:
            raise RunFileError("None of the images could be read; check --images or --list.")
        modes = parse_modes(args.modes, bases) if args.modes else top_modes(shares, args.top)
        info = {"layer": [m.layer for m in modes], "head": [m.head for m in modes], "mode": [m.mode for m in modes],
                "layer_name": [bases[m.layer].name for m in modes],
                "singular_value": [float(bases[m.layer].S[m.head, m.mode]) for m in modes],
                "cosine": [float(bases[m.layer].cosine[m.head, m.mode]) for m in modes],
                "attn_share": [float(shares[m.layer][m.head, m.mode]) for m in modes]}
        meta.update(versions=versions(), options=options, model_width=int(bases[0].U.shape[1]))
        ablate_file.create(args.out, meta, info, good)
    approx = sorted({bases[m.layer].name for m in modes if INEXACT_EXTRAS & set(bases[m.layer].extras)})
    if approx:
        print(f"note: {len(approx)} layers have qk-norm or rope ({approx[0]}, ...); their modes are scaled in q "
              f"before it, an approximate ablation of the logit terms", file=sys.stderr)

    writer = ablate_file.AblationWriter(args.out)
    images = writer.images
    ablator = Ablator(model, bases, modes, scale=args.scale, cache=not args.no_cache)
    bar = progress_bar(int((~writer.done).sum()), disable=args.no_progress)
    start = 0
    try:
        loader = make_loader(images, transform, batch_size=args.batch_size)
        for x_all, names, ok, reasons in loader:
            idx_all = np.arange(start, start + len(names))
            start += len(names)
            for p, good_, why in zip(names, ok.tolist(), reasons):
                if not good_:
                    skipped.append((p, why))
            keep = [i for i, g in enumerate(ok.tolist()) if g]
            if not keep:
                continue
            idx = idx_all[keep]
            todo = [m for m in range(len(modes)) if not writer.done[m, idx].all()]
            if not todo:
                continue
            results = ablator.run_batch(x_all[keep].to(args.device), todo)
            if "measure" not in writer.f.attrs:
                writer.set_attrs({"measure": ablator.kind})
            written = 0
            for m, r in results.items():
                new = ~writer.done[m, idx]  # pairs already in the file keep their values
                writer.write(m, idx[new], {"effect": r["effect"].cpu().numpy()[new],
                                           "top1_agreement": r["top1"].cpu().numpy()[new],
                                           "attn_change": r["attn_change"].cpu().numpy()[new]})
                written += int(new.sum())
            bar.update(written)   # once per batch: the modes of a batch are computed together
        if ablator.notes:
            writer.set_attrs({"notes": ablator.notes})
    finally:
        bar.close()
        writer.close()
    for p, why in skipped[:5]:
        print(f"warning: skipped {p}: {why}", file=sys.stderr)
    print(effect_table(ablate_file.open_ablation(args.out)))
    print(f"wrote {len(modes)} modes × {len(images)} images to {args.out}")
    return 0


def progress_bar(total: int, disable: bool = False):
    """The bar over (mode, image) pairs. Updated once per batch and its rate averaged over the whole
    run (``smoothing=0``), so the first estimate of the time left is the first batch's pace, not a
    burst of per-mode updates after a long wait (which gave hours for a minutes-long job)."""
    from tqdm import tqdm
    return tqdm(total=total, unit="mode·img", disable=disable, desc="qkprobe ablate", smoothing=0.0)


def effect_table(ab, n: int = 10) -> str:
    """The modes with the largest mean effect, as a small table (a top-1 column only for a
    classifier: a feature model has no classes)."""
    import numpy as np

    from ..report.ablation import has_top1
    eff = ab.mean("effect")
    order = np.argsort(-np.nan_to_num(eff, nan=-np.inf))[:n]
    top1_col = has_top1(ab)
    rows = [f"{'mode':>10} {'cos':>7} {'share':>7} {ab.measure:>9}" + (f" {'top-1':>6}" if top1_col else "")
            + f" {'|ΔP|':>9}"]
    top1, dp = ab.mean("top1_agreement"), ab.mean("attn_change")
    for i in order:
        rows.append(f"{ab.labels()[i]:>10} {ab.cosine[i]:>+7.3f} {ab.attn_share[i]:>+7.3f} {eff[i]:>9.2e}"
                    + (f" {top1[i]:>6.2f}" if top1_col else "") + f" {dp[i]:>9.2e}")
    return "\n".join(rows)
