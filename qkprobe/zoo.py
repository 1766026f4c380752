"""Model-zoo scale: the bases of many models into one file (``qkprobe bases SPEC [SPEC ...]``).

- :func:`expand_specs` turns wildcards over a library's registry into specs: ``timm:vit_*``
  (``timm.list_models``), ``open_clip:*`` / ``open_clip:ViT-B-*/laion*`` (``open_clip.list_models``,
  ``open_clip.list_pretrained``), ``torchvision:vit_*`` (``torchvision.models.list_models``). With
  pretrained weights a wildcard gives every published (model, tag) pair; with random init, every
  architecture (tags do not change random weights).
- :func:`model_info` says the family and, where the library's metadata says it (timm
  ``pretrained_cfg`` tags, open_clip pretrained tags, the HF ``model_type``, torchvision weight
  names), the training objective; :func:`group_of` picks what the Figure 2 curves are coloured by.
- :func:`run_zoo` computes and stores one model at a time, resumable: models already in the file are
  skipped, a model that cannot be loaded or has no supported attention is listed with its one-line
  reason and the rest go on.

The layer summary stored and plotted is the paper's S-weighted cosine Σ_r (s_r/Σs) cos_r per head,
averaged over heads. The official notebook's "weighted cosine" is mean_r(cos_r · s_r/Σs), i.e. this
value divided by R (the number of modes): the same curve shape on another scale.
"""

from __future__ import annotations

import fnmatch
import gc
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import QKProbeError, UnknownModelSpec
from .models import parse_spec

_WILD = set("*?[")

#: (keyword in a pretrained tag or model type, training objective), first match wins.
_OBJECTIVES = (
    ("siglip", "language-image (SigLIP)"), ("webli", "language-image (SigLIP)"),
    ("coca", "language-image (CoCa)"),
    ("dino", "self-supervised (DINO)"), ("mae", "self-supervised (MAE)"), ("mim", "self-supervised (MIM)"),
    ("beit", "self-supervised (MIM)"), ("ijepa", "self-supervised (I-JEPA)"),
    ("clip", "language-image (CLIP)"), ("openai", "language-image (CLIP)"), ("laion", "language-image (CLIP)"),
    ("datacomp", "language-image (CLIP)"), ("dfn", "language-image (CLIP)"), ("yfcc", "language-image (CLIP)"),
    ("cc12m", "language-image (CLIP)"), ("commonpool", "language-image (CLIP)"),
    ("swag", "weakly supervised (SWAG)"),
    ("in21k", "supervised (ImageNet)"), ("in22k", "supervised (ImageNet)"), ("in12k", "supervised (ImageNet)"),
    ("in1k", "supervised (ImageNet)"), ("augreg", "supervised (ImageNet)"), ("imagenet", "supervised (ImageNet)"),
)


def is_wildcard(spec: str) -> bool:
    return bool(_WILD & set(spec.partition(":")[2]))


def expand_specs(specs: Sequence[str], pretrained: bool = True) -> List[str]:
    """Specs with every wildcard replaced by the registry entries it matches (order kept, no repeats).

    A wildcard that matches nothing raises :class:`UnknownModelSpec`."""
    out: List[str] = []
    for spec in specs:
        found = _expand(spec, pretrained) if is_wildcard(spec) else [spec]
        if not found:
            raise UnknownModelSpec(f"The wildcard {spec!r} matches no model of that library"
                                   f"{'' if pretrained else ' (random init: architectures)'}; check the "
                                   f"pattern against the library's list_models().")
        out.extend(s for s in found if s not in out)
    return out


def _expand(spec: str, pretrained: bool) -> List[str]:
    s = parse_spec(spec)
    if s.library == "timm":
        import timm
        if s.tag is not None:  # pattern over name.tag
            pat = f"{s.name}.{s.tag}"
            return [f"timm:{n}" for n in timm.list_pretrained() if fnmatch.fnmatchcase(n, pat)]
        return [f"timm:{n}" for n in timm.list_models(s.name, pretrained=pretrained)]
    if s.library == "open_clip":
        import open_clip
        if pretrained or s.tag is not None:
            tag_pat = s.tag or "*"
            return [f"open_clip:{a}/{t}" for a, t in open_clip.list_pretrained()
                    if fnmatch.fnmatchcase(a, s.name) and fnmatch.fnmatchcase(t, tag_pat)]
        return [f"open_clip:{a}" for a in open_clip.list_models() if fnmatch.fnmatchcase(a, s.name)]
    if s.library == "torchvision":
        import torchvision
        return [f"torchvision:{n}" for n in torchvision.models.list_models() if fnmatch.fnmatchcase(n, s.name)]
    raise UnknownModelSpec(f"Wildcards work over the timm, open_clip and torchvision registries, not in "
                           f"{spec!r}; list Hugging Face models one by one.")


def model_key(spec: str, random_init: bool, seed: int) -> str:
    """The group name of a model in a zoo file: the spec (``/`` replaced), plus the seed for random
    weights; a short hash keeps names that differ only in replaced characters apart."""
    name = f"{spec} (random init, seed {seed})" if random_init else spec
    safe = re.sub(r"[^A-Za-z0-9_.:@+\- (),=]", "_", name)
    if safe != name:
        safe += "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def _objective(text: Optional[str]) -> Optional[str]:
    if not text:
        return None
    low = text.lower().split("_ft_")[0]  # the pretraining part of "clip_laion2b_ft_in12k_in1k"
    for word, objective in _OBJECTIVES:
        if word in low:
            return objective
    return None


def model_info(spec: str, model: Any = None) -> Dict[str, Optional[str]]:
    """``family`` (architecture family) and ``objective`` (training objective where the library's
    metadata says it, else None) of a spec, and the ``tag`` they came from."""
    s = parse_spec(spec)
    family, objective, tag = s.name, None, s.tag
    if s.library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        tag = s.tag or cfg.get("tag")  # without a tag timm loads its default one
        family = "timm " + re.split(r"[_.]", cfg.get("architecture") or s.name)[0]
        objective = _objective(tag)
    elif s.library == "open_clip":
        family = "open_clip " + re.split(r"[-_]", s.name)[0]
        objective = _objective(s.name) or ("language-image (CLIP)" if tag else None)
    elif s.library == "torchvision":
        family = "torchvision " + s.name.split("_")[0]
        objective = _objective(tag) or ("supervised (ImageNet)" if tag else None)
    elif s.library == "hf":
        config = getattr(model, "config", None)
        mtype = getattr(config, "model_type", None) or "hf"
        family = "hf " + mtype
        objective = _objective(mtype)
    return {"family": family, "objective": objective, "tag": tag}


def group_of(info: Dict[str, Any], random_init: bool) -> str:
    """What a model's curve is coloured by: the objective where known, else the family; random
    weights have no objective and are grouped by family."""
    if random_init:
        return f"{info['family']} (random init)"
    return info.get("objective") or info["family"]


@dataclass
class ZooResult:
    """What one :func:`run_zoo` call did: keys done now, skipped (already in the file), failed (key → reason)."""

    done: List[str]
    skipped: List[str]
    failed: Dict[str, str]
    keys: Dict[str, str]  # spec → key


def one_line(exc: BaseException) -> str:
    """The reason a model failed, on one line: a qkprobe error's sentence, else type and message."""
    text = str(exc) if isinstance(exc, QKProbeError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text[:400] + ("…" if len(text) > 400 else "")


def run_zoo(specs: Sequence[str], out: str, *, random_init: bool = False, seed: int = 0, fold_ln: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> ZooResult:
    """Bases of every model of ``specs`` (wildcards expanded) into the zoo file ``out``.

    One model at a time: load, :func:`qkprobe.compute_bases`, write its group atomically, free it.
    Models already complete in ``out`` are skipped; a model that fails is recorded in the file's
    ``failed`` attribute with its one-line reason and the rest go on.
    """
    from tqdm import tqdm

    from .bases import compute_bases
    from .metadata import versions
    from .models import load_model, weights_hash
    from .plot import layer_summaries
    from .sinks.bases_file import zoo_open, zoo_set_failed, zoo_write_model

    expanded = expand_specs(specs, pretrained=not random_init)
    done_before = zoo_open(out, {"fold_ln": bool(fold_ln)}, versions())
    keys = {s: model_key(s, random_init, seed) for s in expanded}
    result = ZooResult(done=[], skipped=[], failed={}, keys=keys)
    bar = tqdm(expanded, unit="model", desc="qkprobe bases", disable=not progress)
    for spec in bar:
        key = keys[spec]
        bar.set_postfix_str(spec[-40:])
        if key in done_before:
            result.skipped.append(key)
            continue
        try:
            model, _ = load_model(spec, pretrained=not random_init, seed=seed)
            bases = compute_bases(model, fold_ln=fold_ln)
            info = model_info(spec, model)
            rows = layer_summaries(bases)
            attrs = {"model_spec": spec, "random_init": bool(random_init), "seed": int(seed),
                     "weights_hash": weights_hash(model), "family": info["family"],
                     "objective": "" if random_init else info["objective"] or "",
                     "tag": "" if random_init else info["tag"] or "",
                     "group": group_of(info, random_init), "num_layers": len(bases),
                     "weighted_cosine": [r["weighted_cosine"] for r in rows],
                     "mean_cosine": [r["mean_cosine"] for r in rows]}
            zoo_write_model(out, key, bases, attrs)
            result.done.append(key)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the zoo
            reason = one_line(exc)
            zoo_set_failed(out, key, reason)
            result.failed[key] = reason
            (bar.write if progress else log)(f"failed: {spec}: {reason}")
        finally:
            model = bases = None
            gc.collect()
    bar.close()
    return result
