"""Options shared by the subcommands (model spec, weights) and loading the model from them."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, nargs=None) -> None:
    p.add_argument("spec", nargs=nargs, help="timm:<name> | open_clip:<arch>[/<tag>] | hf:<repo or dir> | "
                                             "torchvision:<name>[/<weights>]")
    p.add_argument("--weights", help="local .safetensors or torch state-dict file to load")
    p.add_argument("--random-init", action="store_true", help="random weights (from --seed) instead of pretrained")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")


def load_from_args(args, device: str = "cpu"):
    """(model, transform, metadata) for the spec and weights options."""
    from ..models import load_model, weights_hash
    model, transform = load_model(args.spec, weights=args.weights, pretrained=not args.random_init,
                                  seed=args.seed, device=device)
    meta = {"model_spec": args.spec, "weights_file": args.weights or "", "random_init": bool(args.random_init),
            "seed": args.seed, "weights_hash": weights_hash(model)}
    return model, transform, meta


def _floats3(text: str):
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers (one per RGB channel)")
    return vals


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of pixels")
    return v


def add_transform_args(p: argparse.ArgumentParser) -> None:
    """``--image-size`` / ``--mean`` / ``--std``: override the model's image preprocessing."""
    p.add_argument("--image-size", type=_positive_int, help="input size in pixels (square), instead of the model's")
    p.add_argument("--mean", type=_floats3, help="normalization mean R,G,B (e.g. 0.5,0.5,0.5), instead of the model's")
    p.add_argument("--std", type=_floats3, help="normalization std R,G,B, instead of the model's")


def transform_from_args(transform, args, meta=None):
    """The model's transform with the ``--image-size``/``--mean``/``--std`` overrides applied (recorded
    in ``meta["transform_overrides"]`` when given)."""
    from ..models import override_transform
    given = {k: getattr(args, k, None) for k in ("image_size", "mean", "std")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given or hasattr(transform, "tokenize"):  # a text model's tokenizer is left alone
        return transform
    if meta is not None:
        meta["transform_overrides"] = given
    return override_transform(transform, **given)
