"""What produced a file: library versions and option records stored in every output."""

from __future__ import annotations

import importlib
import json
import platform
from typing import Any, Dict

from ._version import __version__

_LIBS = ("torch", "torchvision", "timm", "open_clip", "transformers", "numpy", "h5py", "hdf5plugin")


def versions() -> Dict[str, str]:
    """Versions of qkprobe, Python and the libraries it talks to (absent ones are skipped)."""
    out = {"qkprobe": __version__, "python": platform.python_version()}
    for name in _LIBS:
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
        except ImportError:
            continue
    return out


def to_attr(value: Any) -> Any:
    """An HDF5-storable attribute: strings and numbers as they are, anything else as JSON."""
    if isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)
