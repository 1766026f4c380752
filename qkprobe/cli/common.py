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


# ---- checks of options, made before anything is loaded or written ------------------------------

def check_out_file(path: str, option: str = "--out", example: str = "run.h5") -> None:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made (every
    command creates a missing output folder, with its parents, when it writes: see
    :func:`make_out_folder`)."""
    import os

    from ..errors import QKProbeError
    if os.path.isdir(path):
        raise QKProbeError(f"{option} {path} is a folder; give the path of a file to write, e.g. "
                           f"{os.path.join(path, example)}.")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):        # the nearest existing ancestor must be a folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise QKProbeError(f"Cannot make the folder of {option} {path}: {folder} is a file; choose another "
                           f"{option}.")


def make_out_folder(path: str, option: str = "--out") -> None:
    """Create the folder of the output file ``path`` (and its parents) when it is missing, as
    ``qkprobe report`` does for its folder; one sentence when it cannot be made."""
    import os

    from ..errors import QKProbeError
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise QKProbeError(f"Cannot create the folder {folder} for {option} {path} ({exc.strerror or exc}); "
                           f"choose another {option}.") from None


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
    """Each option ``--name`` in ``names`` (attribute name_with_underscores) is at least ``minimum``
    where given."""
    from ..errors import QKProbeError
    for name in names:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:  # None: the option's default, chosen later
            raise QKProbeError(f"{name} must be at least {minimum}, not {value}.")
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
