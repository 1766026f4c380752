"""Which reducer computes a layer's statistics: ``auto``, ``torch``, ``native`` or ``triton``.

``auto`` takes the Triton kernels for CUDA tensors (where triton imports), the compiled C kernels
(:mod:`qkprobe.core.native`) on the CPU where they build, else the torch path; :func:`choose` also
says why ``auto`` missed the fast backend of a device (the probe warns once). A forced backend
that cannot run on the tensors' device raises :class:`qkprobe.errors.BackendError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

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


@dataclass(frozen=True)
class Choice:
    """The backend that runs (``torch``, ``native`` or ``triton``) and, under ``auto``, why the
    device's fast backend does not (None: it does, or the device has none, or it was turned off)."""

    name: str
    missed: Optional[str] = None


def resolve(name: str, device: Union[str, torch.device]) -> str:
    """The backend that runs for tensors on ``device``: ``name`` itself when forced, the best one
    for ``auto``. Raises BackendError where a forced backend cannot run there."""
    return choose(name, device).name


def choose(name: str, device: Union[str, torch.device]) -> Choice:
    """:func:`resolve`, with the reason ``auto`` fell back to the torch path where it did."""
    check(name)
    device = torch.device(device)
    if name == "auto":
        return _auto(device)
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
    return Choice(name)


def _auto(device: torch.device) -> Choice:
    if device.type == "cuda":
        if _triton_supports(device):
            return Choice("triton")
        return Choice("torch", "the Triton kernels cannot run (triton does not import)")
    if device.type == "cpu" and native.enabled():
        try:
            built = native.library() is not None
        except Exception as exc:  # noqa: BLE001 - any build failure: the torch path
            return Choice("torch", f"the compiled C kernels failed to load ({type(exc).__name__}: {exc})")
        if built:
            return Choice("native")
        return Choice("torch", "the compiled C kernels did not build (no C compiler, or its build failed)")
    return Choice("torch")  # another device, or QKPROBE_NATIVE=0: the torch path as asked


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True
