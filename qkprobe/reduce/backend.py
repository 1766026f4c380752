"""Which reducer computes a layer's statistics: ``auto``, ``torch``, ``native`` or ``triton``.

``auto`` takes the Triton kernels for CUDA tensors (where triton imports), the compiled C kernels
(:mod:`qkprobe.core.native`) on the CPU where they build, else the torch path. A forced backend
that cannot run on the tensors' device raises :class:`qkprobe.errors.BackendError`.
"""

from __future__ import annotations

from typing import Union

import torch

from ..core import native
from ..errors import BackendError

BACKENDS = ("auto", "torch", "native", "triton")


def check(name: str) -> str:
    """``name`` if it is a backend, else a BackendError naming the choices."""
    if name not in BACKENDS:
        raise BackendError(f"reduce: unknown statistics backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


def _triton_supports(device: torch.device) -> bool:
    try:
        from . import triton_stats
    except Exception:  # a broken triton install: not usable  # noqa: BLE001
        return False
    return triton_stats.supports(device)


def resolve(name: str, device: Union[str, torch.device]) -> str:
    """The backend that runs for tensors on ``device``: ``name`` itself when forced, the best one
    for ``auto``. Raises BackendError where a forced backend cannot run there."""
    check(name)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and _triton_supports(device):
            return "triton"
        if device.type == "cpu" and native.enabled() and native.library() is not None:
            return "native"
        return "torch"
    if name == "triton" and not _triton_supports(device):
        why = "triton does not import" if not _triton_importable() else \
            f"its kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on {device}"
        raise BackendError(f"reduce: backend 'triton' cannot run here: {why}; choose --backend auto or torch.")
    if name == "native":
        if device.type != "cpu":
            raise BackendError(f"reduce: backend 'native' (the compiled CPU kernels) cannot run on {device}; "
                               f"choose --backend auto, torch or triton.")
        if not native.enabled() or native.library() is None:
            raise BackendError("reduce: backend 'native' cannot run: its C kernels are off (QKPROBE_NATIVE=0) or "
                               "did not build (no C compiler); choose --backend auto or torch.")
    return name


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True
