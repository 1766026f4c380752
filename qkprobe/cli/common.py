"""Options shared by the subcommands (model spec, weights) and loading the model from them."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="timm:<name> | open_clip:<arch>[/<tag>] | hf:<repo or dir> | "
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


# ---- checks of options, made before anything is loaded or written ------------------------------

def check_out_file(path: str, option: str = "--out", example: str = "run.h5") -> None:
    """``path`` can be written as a file: not a folder, in a folder that exists."""
    import os

    from ..errors import QKProbeError
    if os.path.isdir(path):
        raise QKProbeError(f"{option} {path} is a folder; give the path of a file to write, e.g. "
                           f"{os.path.join(path, example)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise QKProbeError(f"The output folder {folder} does not exist; create it or choose another {option}.")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has (cpu, cuda[:N], mps)."""
    import torch

    from ..errors import QKProbeError
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise QKProbeError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise QKProbeError(f"--device {device} asks for a CUDA GPU, but PyTorch sees none on this machine; use "
                               f"--device cpu.")
        if dev.index is not None and dev.index >= count:
            raise QKProbeError(f"--device {device} asks for GPU {dev.index}, but this machine has {count}; use "
                               f"cuda:0 to cuda:{count - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise QKProbeError(f"--device {device} asks for Apple's MPS, which PyTorch cannot use here; use "
                               f"--device cpu.")
    elif dev.type != "cpu":
        raise QKProbeError(f"--device {device} is not supported by qkprobe; use cpu, cuda, cuda:N or mps.")


def check_at_least(args, minimum: int, *names: str) -> None:
    """Each option ``--name`` in ``names`` (attribute name_with_underscores) is at least ``minimum``."""
    from ..errors import QKProbeError
    for name in names:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value < minimum:
            raise QKProbeError(f"{name} must be at least {minimum}, not {value}.")
