"""Write and read ``qkprobe bases`` output: the modes of every layer with what produced them.

Layout: root attrs ``kind="qkprobe-bases"``, ``schema_version``, metadata (spec, weights hash,
versions, options; dicts as JSON); one group ``/layers/<i>`` (zero-padded, forward order) with
datasets ``U`` (H, D, R), ``S`` (H, R), ``V`` (H, Dk, R), ``cosine`` (H, R), ``key_bias_term``
(H, Dk), ``a_offset``/``b_offset`` (H, R), ``sym_eigvals`` (H, min(2R, D)) and ``antisym_eigvals``
(H, min(2R, D) // 2) (absent when D != Dk) and attrs ``name``, ``family``, ``scale``,
``prefix_tokens`` (-1 = unknown), ``extras`` and ``notes`` (JSON lists), ``fold_ln``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import h5py
import numpy as np

from ..errors import RunFileError
from ..metadata import to_attr

SCHEMA_VERSION = 1
#: ``kind`` of a single-model bases file (``qkprobe bases SPEC``).
BASES_KIND = "qkprobe-bases"
_ARRAYS = ("U", "S", "V", "cosine", "key_bias_term", "a_offset", "b_offset")
#: Written when present (None for cross-attention with D != Dk, where M has no symmetric part).
_OPTIONAL_ARRAYS = ("sym_eigvals", "antisym_eigvals")


def layer_group_name(i: int, n: int) -> str:
    return str(i).zfill(max(2, len(str(n - 1))))


def bases_arrays(lb) -> Dict[str, np.ndarray]:
    out = {k: getattr(lb, k).detach().cpu().numpy() for k in _ARRAYS}
    out.update({k: getattr(lb, k).detach().cpu().numpy() for k in _OPTIONAL_ARRAYS
                if getattr(lb, k, None) is not None})
    return out


def bases_attrs(lb) -> Dict[str, Any]:
    return {"name": lb.name, "family": lb.family, "scale": float(lb.scale),
            "prefix_tokens": -1 if lb.prefix_tokens is None else int(lb.prefix_tokens),
            "extras": sorted(lb.extras), "notes": list(lb.notes),
            "fold_ln": bool(lb.fold_ln)}


def write_layers(parent: h5py.Group, bases: List) -> None:
    """One group ``layers/<i>`` under ``parent`` per LayerBases, with its arrays and attrs."""
    for i, lb in enumerate(bases):
        g = parent.create_group(f"layers/{layer_group_name(i, len(bases))}")
        for k, arr in bases_arrays(lb).items():
            g.create_dataset(k, data=arr)
        for k, v in bases_attrs(lb).items():
            g.attrs[k] = to_attr(v)  # lists (extras, notes) as JSON text


def write_bases(path: str, bases: List, metadata: Dict[str, Any]) -> None:
    """Write ``bases`` (list of LayerBases) and ``metadata`` to a new HDF5 file at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RunFileError(f"The output folder {folder} does not exist; create it or choose another --out.")
    if os.path.isdir(path):
        raise RunFileError(f"{path} is a folder; give the path of a file to write, e.g. "
                           f"{os.path.join(path, 'bases.h5')}.")
    tmp = path + ".partial"
    try:
        _write_bases_file(tmp, bases, metadata)
        os.replace(tmp, path)  # a crash never leaves a half-written file under the final name
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_bases_file(tmp: str, bases: List, metadata: Dict[str, Any]) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs["kind"] = BASES_KIND
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in metadata.items():
            f.attrs[k] = to_attr(v)
        write_layers(f, bases)


def read_bases(path: str) -> List[Dict[str, Any]]:
    """The layers of a bases file as dicts of arrays and attrs, in forward order."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != BASES_KIND:
            raise RunFileError(f"{path} is not a qkprobe bases file; make one with `qkprobe bases`.")
        return read_layers(f)


def read_layers(parent: h5py.Group, arrays: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The ``layers/<i>`` groups under ``parent`` as dicts of arrays and attrs, in forward order;
    ``arrays``: the dataset names to read (default all)."""
    out = []
    for key in sorted(parent["layers"]):
        g = parent["layers"][key]
        d = {k: g[k][()] for k in g if arrays is None or k in arrays}
        d.update({k: g.attrs[k] for k in g.attrs})
        d["extras"] = json.loads(d["extras"])
        d["notes"] = json.loads(d["notes"])
        out.append(d)
    return out


# --------------------------------------------------------------------------- zoo files

#: ``kind`` of a file with one group per model (``qkprobe bases SPEC SPEC ...``).
ZOO_KIND = "qkprobe-bases-zoo"
ZOO_SCHEMA_VERSION = 1
_PARTIAL = ".partial"


def zoo_open(path: str, options: Dict[str, Any], versions: Dict[str, str]) -> set:
    """Create the zoo file at ``path``, or check an existing one (its ``options`` must equal these)
    and drop groups a killed writer left half-written. Returns the keys of the models done."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RunFileError(f"The output folder {folder} does not exist; create it or choose another --out.")
    exists = os.path.exists(path)
    try:
        f = h5py.File(path, "a")
    except OSError as exc:
        raise RunFileError(f"{path} exists but cannot be opened as HDF5 ({exc}); choose another --out.") from exc
    with f:
        if not exists or len(f.attrs) == 0:
            f.attrs["kind"] = ZOO_KIND
            f.attrs["schema_version"] = ZOO_SCHEMA_VERSION
            f.attrs["options"] = to_attr(options)
            f.attrs["versions"] = to_attr(versions)
            f.attrs["failed"] = to_attr({})
            f.require_group("models")
            return set()
        if f.attrs.get("kind") != ZOO_KIND:
            raise RunFileError(f"{path} is not a qkprobe model-zoo bases file; choose another --out to make one.")
        stored = json.loads(f.attrs["options"])
        if stored != json.loads(to_attr(options)):
            raise RunFileError(f"{path} was made with the options {stored}, not {options}; rerun with those "
                               f"options to resume it or choose another --out.")
        models = f.require_group("models")
        for key in [k for k in models if k.endswith(_PARTIAL) or not models[k].attrs.get("complete", False)]:
            del models[key]  # a writer killed inside this group
        return set(models)


def zoo_write_model(path: str, key: str, bases: List, attrs: Dict[str, Any]) -> None:
    """Add one model's layers as group ``models/<key>``: written under a temporary name, marked
    ``complete`` and renamed last, so readers and resumes never see half a model."""
    with h5py.File(path, "a") as f:
        models = f["models"]
        tmp = key + _PARTIAL
        if tmp in models:
            del models[tmp]
        g = models.create_group(tmp)
        write_layers(g, bases)
        for k, v in attrs.items():
            g.attrs[k] = to_attr(v)
        if key in models:
            del models[key]
        g.attrs["order"] = sum(1 for k in models if not k.endswith(_PARTIAL))  # file order = order done
        g.attrs["complete"] = True
        models.move(tmp, key)
        failed = json.loads(f.attrs.get("failed", "{}"))
        if failed.pop(key, None) is not None:
            f.attrs["failed"] = to_attr(failed)


def zoo_set_failed(path: str, key: str, reason: Optional[str]) -> None:
    """Record (or, with ``reason=None``, clear) why the model ``key`` could not be done."""
    with h5py.File(path, "a") as f:
        failed = json.loads(f.attrs.get("failed", "{}"))
        if reason is None:
            failed.pop(key, None)
        else:
            failed[key] = reason
        f.attrs["failed"] = to_attr(failed)


def read_zoo(path: str, arrays: Optional[Sequence[str]] = ("S", "cosine")) -> Dict[str, Any]:
    """A zoo file: ``{"models": {key: {"attrs": {...}, "layers": [...]}}, "failed": {key: reason},
    "options": {...}}`` with the complete models in file order; ``arrays``: the per-layer datasets
    to read (default S and cosine, what the layer curves need; None for all)."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != ZOO_KIND:
            raise RunFileError(f"{path} is not a qkprobe model-zoo bases file; make one with "
                               f"`qkprobe bases SPEC SPEC ... --out FILE`.")
        models = {}
        for key in f["models"]:
            g = f["models"][key]
            if key.endswith(_PARTIAL) or not g.attrs.get("complete", False):
                continue
            attrs = {k: g.attrs[k] for k in g.attrs}
            models[key] = {"attrs": attrs, "layers": read_layers(g, arrays)}
        order = sorted(models, key=lambda k: int(models[k]["attrs"].get("order", 0)))
        return {"models": {k: models[k] for k in order}, "failed": json.loads(f.attrs.get("failed", "{}")),
                "options": json.loads(f.attrs.get("options", "{}"))}


def file_kind(path: str) -> Optional[str]:
    """The ``kind`` attribute of a qkprobe HDF5 file, or None when it is not one (or is absent)."""
    if not os.path.isfile(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind")
    except OSError:
        return None
    return kind if isinstance(kind, str) else None
