"""``qkprobe bases SPEC --out bases.h5 [--plot layers.png]``: the modes of every layer."""

from __future__ import annotations

import os

from .common import add_model_args, check_out_file, load_from_args


def add_parsers(sub) -> None:
    p = sub.add_parser("bases", help="singular modes of W_q^T W_k for every attention layer")
    add_model_args(p)
    p.add_argument("--fold-ln", action="store_true", help="fold the affine map of the norm feeding attention")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--plot", help="PNG of the layer curve (mean and S-weighted cosine per layer)")
    p.set_defaults(func=run)


def format_table(bases, summaries) -> str:
    rows = [f"{'layer':>5}  {'name':<32} {'H':>3} {'R':>4}  {'mean cos':>9} {'S-w cos':>9}  extras"]
    for i, (lb, s) in enumerate(zip(bases, summaries)):
        rows.append(f"{i:>5}  {lb.name[-32:]:<32} {lb.num_heads:>3} {lb.head_dim:>4}  "
                    f"{s['mean_cosine']:>9.4f} {s['weighted_cosine']:>9.4f}  {','.join(sorted(lb.extras)) or '-'}")
    return "\n".join(rows)


def run(args) -> int:
    from ..bases import compute_bases
    from ..errors import RunFileError
    from ..metadata import versions
    from ..plot import layer_curve, layer_summaries
    from ..sinks.bases_file import write_bases

    check_out_file(args.out, example="bases.h5")
    if args.plot:
        check_out_file(args.plot, "--plot", example="layers.png")
    for path in (args.out, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise RunFileError(f"The folder of {path} does not exist; create it or choose another path.")
    model, _, meta = load_from_args(args)
    bases = compute_bases(model, fold_ln=args.fold_ln)
    meta.update(versions=versions(), options={"fold_ln": bool(args.fold_ln)})
    write_bases(args.out, bases, meta)
    summaries = layer_summaries(bases)
    print(format_table(bases, summaries))
    print(f"wrote {len(bases)} layers to {args.out}")
    if args.plot:
        fig = layer_curve({args.spec: summaries}, title=args.spec)
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"wrote the layer curve to {args.plot}")
    return 0
