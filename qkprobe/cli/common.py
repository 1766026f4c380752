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
