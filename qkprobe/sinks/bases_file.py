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
from typing import Any, Dict, List

import h5py
import numpy as np

from ..errors import RunFileError
from ..metadata import to_attr

SCHEMA_VERSION = 1
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


def write_bases(path: str, bases: List, metadata: Dict[str, Any]) -> None:
    """Write ``bases`` (list of LayerBases) and ``metadata`` to a new HDF5 file at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RunFileError(f"The output folder {folder} does not exist; create it or choose another --out.")
    tmp = path + ".partial"
    with h5py.File(tmp, "w") as f:
        f.attrs["kind"] = "qkprobe-bases"
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in metadata.items():
            f.attrs[k] = to_attr(v)
        for i, lb in enumerate(bases):
            g = f.create_group(f"layers/{layer_group_name(i, len(bases))}")
            for k, arr in bases_arrays(lb).items():
                g.create_dataset(k, data=arr)
            for k, v in bases_attrs(lb).items():
                g.attrs[k] = to_attr(v)  # lists (extras, notes) as JSON text
    os.replace(tmp, path)  # a crash never leaves a half-written file under the final name


def read_bases(path: str) -> List[Dict[str, Any]]:
    """The layers of a bases file as dicts of arrays and attrs, in forward order."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != "qkprobe-bases":
            raise RunFileError(f"{path} is not a qkprobe bases file; make one with `qkprobe bases`.")
        out = []
        for key in sorted(f["layers"]):
            g = f["layers"][key]
            d = {k: g[k][()] for k in g}
            d.update({k: g.attrs[k] for k in g.attrs})
            d["extras"] = json.loads(d["extras"])
            d["notes"] = json.loads(d["notes"])
            out.append(d)
        return out
