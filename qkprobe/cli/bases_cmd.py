"""``qkprobe bases SPEC [SPEC ...] --out bases.h5 [--plot layers.png]``: the modes of every layer.

One spec: a single-model bases file (``layers/<i>``). Several specs, wildcards over a library's
registry (``'timm:vit_*'``, ``'open_clip:*'``) or ``--zoo``: a model-zoo file with one group per
model, resumable (models already in it are skipped on rerun), failures listed with their reason.
"""

from __future__ import annotations

from .common import add_model_args, check_out_file, load_from_args, make_out_folder


def add_parsers(sub) -> None:
    p = sub.add_parser("bases", help="singular modes of W_q^T W_k for every attention layer (one model or a zoo)")
    add_model_args(p, nargs="+")
    p.add_argument("--fold-ln", action="store_true", help="fold the affine map of the norm feeding attention")
    p.add_argument("--out", required=True, help="HDF5 file to write (its folder is created if missing)")
    p.add_argument("--plot", help="PNG of the layer curve (one model: mean and S-weighted cosine per layer; "
                                  "zoo: every model's S-weighted curve over relative depth, the paper's Figure 2)")
    p.add_argument("--name", help="short label of the model in the plot's legend and title (default: its spec)")
    p.add_argument("--zoo", action="store_true", help="write a model-zoo file even for one spec")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over models")
    p.set_defaults(func=run)


def format_table(bases) -> str:
    """The per-layer cosine table of ``qkprobe inspect`` for LayerBases."""
    from .inspect_cmd import cosine_table
    return cosine_table([{"S": lb.S.cpu().numpy(), "cosine": lb.cosine.cpu().numpy(), "name": lb.name,
                          "extras": lb.extras} for lb in bases])


def _zoo_mode(args) -> bool:
    from ..sinks.bases_file import ZOO_KIND, file_kind
    from ..zoo import is_wildcard
    return bool(args.zoo or len(args.spec) > 1 or any(is_wildcard(s) for s in args.spec)
                or file_kind(args.out) == ZOO_KIND)


def run(args) -> int:
    from ..errors import RunFileError

    check_out_file(args.out, example="bases.h5")
    if args.plot:
        check_out_file(args.plot, "--plot", example="layers.png")
    if _zoo_mode(args):
        if args.weights:
            raise RunFileError("--weights loads one model's file, so it cannot go with several specs or a zoo "
                               "file; run qkprobe bases SPEC --weights PATH for that model alone.")
        return run_zoo_cmd(args)
    args.spec = args.spec[0]
    return run_one(args)


def run_one(args) -> int:
    from ..bases import compute_bases
    from ..metadata import versions
    from ..plot import layer_curve, layer_summaries
    from ..sinks.bases_file import write_bases

    model, _, meta = load_from_args(args)
    bases = compute_bases(model, fold_ln=args.fold_ln)
    meta.update(versions=versions(), options={"fold_ln": bool(args.fold_ln)})
    make_out_folder(args.out)
    write_bases(args.out, bases, meta)
    print(format_table(bases))
    print(f"wrote {len(bases)} layers to {args.out}")
    if args.plot:
        make_out_folder(args.plot, "--plot")
        name = args.name or args.spec + (" (random init)" if args.random_init else "")
        fig = layer_curve({name: layer_summaries(bases)}, title=name)
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"wrote the layer curve to {args.plot}")
    return 0


def run_zoo_cmd(args) -> int:
    from ..errors import QKProbeError
    from ..plot import layer_curves
    from ..sinks.bases_file import read_zoo
    from ..zoo import run_zoo

    make_out_folder(args.out)
    res = run_zoo(args.spec, args.out, random_init=args.random_init, seed=args.seed, fold_ln=args.fold_ln,
                  progress=not args.no_progress)
    zoo = read_zoo(args.out)
    print(f"{args.out}: {len(zoo['models'])} models ({len(res.done)} done now, {len(res.skipped)} already in the "
          f"file), {len(zoo['failed'])} failed")
    for key, reason in zoo["failed"].items():  # every failure the file records, of this run or earlier ones
        print(f"  failed: {key}: {reason}")
    if args.plot and zoo["models"]:
        make_out_folder(args.plot, "--plot")
        fig = layer_curves(args.out, title=f"S-weighted query-key cosine per layer — {args.name}"
                           if args.name else "")
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"wrote the layer curves to {args.plot}")
    if not zoo["models"]:
        raise QKProbeError(f"No model could be done for {args.out} ({len(res.failed)} failed); see the reasons "
                           f"above.")
    return 0
