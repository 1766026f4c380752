"""Write and read ``qkprobe ablate`` output: what removing (or scaling) each mode does.

Layout (HDF5): root attrs ``kind="qkprobe-ablation"``, ``schema_version``, ``qkprobe_version``,
``created`` and the run files' metadata (``model_spec``, ``weights_file``, ``random_init``,
``seed``, ``weights_hash``, ``versions``, ``options``; non-strings as JSON, listed in
``json_keys``), plus ``measure`` (``kl`` or ``1-cos``) once known. Datasets, M modes × I images:

- ``modes/layer``, ``modes/head``, ``modes/mode`` (M,) int32; ``modes/layer_name`` (M,) strings;
  ``modes/singular_value``, ``modes/cosine``, ``modes/attn_share`` (M,) float64: the mode's s_r,
  cos(u_r, v_r) and mean attention share over the images;
- ``images`` (I,) strings (paths);
- ``effect``, ``top1_agreement``, ``attn_change`` (M, I) float32, NaN until done;
- ``done`` (M, I) uint8: 1 once (mode, image) is written. Results are written and flushed before
  their ``done`` flags, so a resume recomputes exactly what is not flagged.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np

from .._version import __version__
from ..errors import RunFileError
from . import schema

KIND = "qkprobe-ablation"
SCHEMA_VERSION = 1
RESULTS = ("effect", "top1_agreement", "attn_change")
MODE_INFO = ("singular_value", "cosine", "attn_share")
_STR = h5py.string_dtype("utf-8")


@dataclass
class Ablation:
    """An ablation file read back. Arrays as numpy; per-mode means over the images done."""

    path: str
    meta: dict
    layer: np.ndarray
    head: np.ndarray
    mode: np.ndarray
    layer_name: List[str]
    singular_value: np.ndarray
    cosine: np.ndarray
    attn_share: np.ndarray
    images: List[str]
    effect: np.ndarray
    top1_agreement: np.ndarray
    attn_change: np.ndarray
    done: np.ndarray

    @property
    def measure(self) -> str:
        return str(self.meta.get("measure", "kl"))

    def labels(self) -> List[str]:
        return [f"L{l}H{h}M{m}" for l, h, m in zip(self.layer, self.head, self.mode)]

    def mean(self, name: str) -> np.ndarray:
        """(M,) mean over done images of ``effect`` / ``top1_agreement`` / ``attn_change`` (NaN if none)."""
        x = np.where(self.done.astype(bool), getattr(self, name), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: modes not done yet
            return np.nanmean(x, axis=1)


def is_ablation_file(path) -> bool:
    """Whether ``path`` is an HDF5 file written by ``qkprobe ablate``. Only a regular file is
    opened (a pipe named like a file would block the open forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with h5py.File(path, "r") as f:
            return schema.to_python(f.attrs.get("kind")) == KIND
    except (OSError, ValueError):
        return False


def create(path: str, metadata: Dict, modes: Dict[str, Sequence], images: Sequence[str]) -> None:
    """A new ablation file at ``path``: ``modes`` maps layer/head/mode/layer_name and the MODE_INFO
    names to (M,) values; results start NaN and not done."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RunFileError(f"The output folder {folder} does not exist; create it or choose another --out.")
    M, n = len(modes["layer"]), len(images)
    tmp = path + ".partial"
    with h5py.File(tmp, "w") as f:
        f.attrs["kind"] = KIND
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["qkprobe_version"] = __version__
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        schema.encode_attrs(f, metadata)
        g = f.create_group("modes")
        for key in ("layer", "head", "mode"):
            g.create_dataset(key, data=np.asarray(modes[key], dtype=np.int32))
        g.create_dataset("layer_name", data=list(modes["layer_name"]), dtype=_STR)
        for key in MODE_INFO:
            g.create_dataset(key, data=np.asarray(modes[key], dtype=np.float64))
        f.create_dataset("images", data=list(images), dtype=_STR)
        for key in RESULTS:
            f.create_dataset(key, shape=(M, n), dtype=np.float32, fillvalue=np.nan, chunks=(1, max(1, min(n, 4096))))
        f.create_dataset("done", shape=(M, n), dtype=np.uint8, fillvalue=0, chunks=(1, max(1, min(n, 4096))))
    os.replace(tmp, path)


class AblationWriter:
    """Appends results to an ablation file (open for the whole run)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = h5py.File(path, "r+")
        except OSError as e:
            raise RunFileError(f"Cannot open {path} for writing ({e}); check the path or start a new file.") from e
        self.images = [schema.to_python(s) for s in self.f["images"][()]]
        self.done = self.f["done"][()].astype(bool)

    def set_attrs(self, values: Dict) -> None:
        schema.encode_attrs(self.f, values)

    def write(self, mode: int, image_index: np.ndarray, results: Dict[str, np.ndarray]) -> None:
        """Results of one mode for the images ``image_index`` (sorted ascending), then their done flags."""
        idx = np.asarray(image_index)
        for key in RESULTS:
            self.f[key][mode, idx] = np.asarray(results[key], dtype=np.float32)
        self.f.flush()
        self.f["done"][mode, idx] = 1
        self.f.flush()
        self.done[mode, idx] = True

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def read_metadata(path: str) -> dict:
    with h5py.File(path, "r") as f:
        return schema.decode_attrs(f)


def open_ablation(path) -> Ablation:
    """Read an ablation file written by ``qkprobe ablate``."""
    path = str(path)
    if not is_ablation_file(path):
        raise RunFileError(f"{path} is not a qkprobe ablation file; make one with qkprobe ablate.")
    with h5py.File(path, "r") as f:
        meta = schema.decode_attrs(f)
        g = f["modes"]
        return Ablation(path=path, meta=meta, layer=g["layer"][()], head=g["head"][()], mode=g["mode"][()],
                        layer_name=[schema.to_python(s) for s in g["layer_name"][()]],
                        singular_value=g["singular_value"][()], cosine=g["cosine"][()],
                        attn_share=g["attn_share"][()],
                        images=[schema.to_python(s) for s in f["images"][()]],
                        effect=f["effect"][()], top1_agreement=f["top1_agreement"][()],
                        attn_change=f["attn_change"][()], done=f["done"][()].astype(bool))


def stored_modes(path: str) -> Optional[List[tuple]]:
    """[(layer, head, mode), ...] stored in ``path``."""
    with h5py.File(path, "r") as f:
        g = f["modes"]
        return list(zip(g["layer"][()].tolist(), g["head"][()].tolist(), g["mode"][()].tolist()))
