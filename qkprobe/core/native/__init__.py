"""Compiled CPU kernels, built on first use with the system C compiler (optional).

:func:`map_stats` computes the map statistics of one layer (mean, max, min, top-k means of both
signs for a and b, and the two scores) in one pass over the tokens, instead of a dozen torch
reductions and two top-k selections; :func:`aggregate_update` and :func:`topk_update` fold a
batch into the streaming states of :mod:`qkprobe.core.streaming` in place. The kernels are plain
C (``map_stats.c``, ``streaming.c``; no Python or torch headers), compiled once per machine into a
cache directory (``$QKPROBE_CACHE``, else ``$XDG_CACHE_HOME/qkprobe``, else ``~/.cache/qkprobe``;
the temp directory if neither is writable) and called through ctypes (which releases the GIL) on
the caller's thread. Without a compiler, or with
``QKPROBE_NATIVE=0``, the functions return False and callers use the torch path; both paths give
the same results (tests compare them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

Tensor = torch.Tensor
log = logging.getLogger("qkprobe")

_SOURCES = [Path(__file__).with_name(n) for n in ("map_stats.c", "streaming.c")]
_FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC"]  # native: AVX-512 / AVX2 paths
# OpenMP where the compiler has it. Loaded after torch, the library binds to the libgomp.so.1
# torch already loaded (same soname), so its parallel loops use torch's threads and thread count.
_OPENMP = ["-fopenmp"]
KMAX = 64  # as in map_stats.c
N_MAP_STATS = 12  # columns written: 5 per side + 2 scores

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_off = threading.local()  # disabled(): the torch path on this thread


def enabled() -> bool:
    """Whether the compiled kernels may be used (``QKPROBE_NATIVE=0`` or :func:`disabled` turn them off)."""
    return os.environ.get("QKPROBE_NATIVE", "1") != "0" and not getattr(_off, "active", False)


@contextmanager
def disabled():
    """Inside the block, on this thread, callers use the torch path (``backend="torch"``)."""
    before = getattr(_off, "active", False)
    _off.active = True
    try:
        yield
    finally:
        _off.active = before


def _cache_dir() -> Path:
    env = os.environ.get("QKPROBE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qkprobe"
    for d in (base, Path(tempfile.gettempdir()) / f"qkprobe-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory for qkprobe's compiled kernels")


def _compiler() -> Optional[str]:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    source = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, *_OPENMP, platform.machine(),
                                            platform.node()]).encode()).hexdigest()
    target = _cache_dir() / f"kernels-{key[:16]}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"]
        try:
            subprocess.run(command + _OPENMP, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        except subprocess.CalledProcessError:  # no OpenMP: the same kernels, one thread
            subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders (DDP ranks) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, building it on first call; None where that is impossible."""
    global _lib, _tried
    if _tried or not enabled():
        return _lib if enabled() else None
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None or sys.platform == "win32":
            log.info("qkprobe: no C compiler found; using the torch statistics path")
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.qkprobe_map_stats.argtypes = [p, p, i64, p, p, i64, i64, i64, i64, i64, p, p, i64, i64, p, i64]
            lib.qkprobe_map_stats.restype = ctypes.c_int
            lib.qkprobe_share.argtypes = [p, p, i64, p, p, p, p, i64, i64, i64, i64, p, ctypes.c_float, p, p, i64,
                                          p, i64]
            lib.qkprobe_share.restype = None
            lib.qkprobe_aggregate.argtypes = [p, i64, i64, i64, p, p, i64, p, p, p, p, p, p]
            lib.qkprobe_aggregate.restype = None
            lib.qkprobe_topk_update.argtypes = [p, i64, i64, i64, p, i64, i64, p, p, p, i64]
            lib.qkprobe_topk_update.restype = None
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("qkprobe: could not build the compiled statistics kernel (%s %s); using the torch "
                        "path", e, detail.decode(errors="replace")[:500])
        return _lib


def compiling() -> bool:
    """Whether torch.compile is tracing: opaque calls (ctypes, as_strided views) are avoided then."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check and check())


def _mask_arg(mask: Optional[Tensor], B: int, Na: int, Nb: int):
    """(mask as contiguous CPU bytes or None, its pointer or None); ``False`` where a given mask is
    not (B, Na) with Na == Nb."""
    if mask is None:
        return None, None
    if tuple(mask.shape) != (B, Na) or Na != Nb:
        return False, None
    mask = mask.to("cpu", torch.bool).contiguous()  # one byte per token, 1 = real
    return mask, mask.data_ptr()


def map_stats(a: Tensor, b: Tensor, prefix: int, k: int, out: Tensor, mask: Optional[Tensor] = None) -> bool:
    """Write the map statistics of a (B, H, Na, R) and b (B, H, Nb, R) into ``out[..., :12]``.

    ``out`` (B, H, R, S ≥ 12) float32 on the CPU; columns in the order of
    :data:`qkprobe.core.stats.STAT_NAMES` (q_mean, q_max, q_min, q_top_pos, q_top_neg, k_*, score_pos,
    score_neg); tokens before ``prefix`` are left out; ``k`` ≤ the map tokens of either side.
    ``mask`` (B, N) bool (Na = Nb = N): only the real tokens (True) count, top-k clipped per sample
    to their number, NaN for a sample with none. Returns False (nothing written) where the kernel
    does not apply: not float32 CPU tensors, a strided mode axis, k > 64, or no compiler; the
    caller then uses the torch path.
    """
    if compiling():  # inside torch.compile: the traced torch path, not an opaque ctypes call
        return False
    if not (a.device.type == b.device.type == out.device.type == "cpu"
            and a.dtype == b.dtype == out.dtype == torch.float32
            and a.stride(-1) == 1 and b.stride(-1) == 1 and out.shape[-1] >= N_MAP_STATS
            and 1 <= k <= KMAX and prefix + k <= min(a.shape[-2], b.shape[-2])):
        return False
    lib = library()
    if lib is None:
        return False
    B, H, Na, R = a.shape
    mask, mask_ptr = _mask_arg(mask, B, Na, b.shape[-2])
    if mask is False:
        return False
    strides = [(ctypes.c_int64 * 4)(*t.stride()) for t in (a, b, out)]

    # Parallel over items through OpenMP (torch's runtime, see _OPENMP); a Python helper thread
    # instead measured no faster in the forward pass, competing with torch's workers.
    code = lib.qkprobe_map_stats(a.data_ptr(), strides[0], Na, b.data_ptr(), strides[1], b.shape[-2], H, R,
                                 prefix, k, out.data_ptr(), strides[2], 0, B * H, mask_ptr, Na)
    if code:
        raise RuntimeError("qkprobe_map_stats rejected its arguments")  # guarded above: a bug if reached
    return True


def share_stats(a: Tensor, pb: Tensor, b: Tensor, S: Tensor, scale: float, out: Tensor, col: int,
                mask: Optional[Tensor] = None) -> bool:
    """Write the attention contribution and share of every mode into ``out[..., col]`` and
    ``out[..., col + 1]`` (formula in map_stats.c). a, pb (B, H, N, R), b (B, H, Nk, R), S (H, R),
    out (B, H, R, ·), float32 on the CPU with a unit stride over R; ``mask`` (B, N) bool (N = Nk):
    sums over the real queries and keys only. Returns False where the kernel does not apply
    (nothing written)."""
    if compiling() or not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (a, pb, b, S, out)):
        return False
    if not (a.stride(-1) == pb.stride(-1) == b.stride(-1) == 1 and pb.shape == a.shape and col + 1 < out.shape[-1]):
        return False
    lib = library()
    if lib is None:
        return False
    B, H, N, R = a.shape
    mask, mask_ptr = _mask_arg(mask, B, N, b.shape[-2])
    if mask is False:
        return False
    S = S.contiguous()
    st = [(ctypes.c_int64 * 4)(*t.stride()) for t in (a, pb, b, out)]
    lib.qkprobe_share(a.data_ptr(), st[0], N, pb.data_ptr(), st[1], b.data_ptr(), st[2], b.shape[-2], B, H, R,
                      S.data_ptr(), float(scale), out.data_ptr(), st[3], col, mask_ptr, N)
    return True


def _cpu_contiguous(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _blgs(x: Tensor):
    """x (B, L, *G, S) as sizes (B, L, G) and strides (B, L, G, S) of a 4-D view, or None where
    the G axes do not merge into one stride."""
    if x.dim() == 2:  # (B, S)
        return (x.shape[0], 1, 1), (x.stride(0), 0, 0, x.stride(1))
    if x.dim() < 2:
        return None
    B, L = x.shape[0], x.shape[1] if x.dim() > 3 else 1
    g_dims = list(range(2, x.dim() - 1)) if x.dim() > 3 else list(range(1, x.dim() - 1))
    G = 1
    for d in g_dims:
        G *= x.shape[d]
    for d in g_dims[:-1]:
        if x.shape[d] > 1 and x.stride(d) != x.stride(d + 1) * x.shape[d + 1]:
            return None
    g_stride = x.stride(g_dims[-1]) if g_dims else 0
    l_stride = x.stride(1) if x.dim() > 3 else 0
    return (B, L, G), (x.stride(0), l_stride, g_stride, x.stride(-1))


def _view(x: Tensor):
    view = _blgs(x)
    if view is None:
        x = x.contiguous()
        view = _blgs(x)
    return x, view


def aggregate_update(x: Tensor, columns: Optional[Tensor], count: Tensor, mean: Tensor, m2: Tensor, lo: Tensor,
                     hi: Tensor, nonfinite: Tensor) -> bool:
    """Fold x (B, L, *G, S) float32, its ``columns`` of the last axis (None: all), into the
    aggregate state tensors (L, *G, C) in place (see streaming.c); any strides.

    State: count, nonfinite int64; mean, m2, lo, hi float64; all contiguous on the CPU.
    Returns False (nothing changed) where the kernel does not apply."""
    if compiling() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if not (_cpu_contiguous(count, mean, m2, lo, hi, nonfinite)
            and count.dtype == nonfinite.dtype == torch.int64
            and mean.dtype == m2.dtype == lo.dtype == hi.dtype == torch.float64):
        return False
    lib = library()
    if lib is None:
        return False
    x, ((B, L, G), xs) = _view(x)
    cols = torch.arange(x.shape[-1]) if columns is None else columns.to("cpu", torch.int64).contiguous()
    if L * G * len(cols) != count.numel():
        return False
    lib.qkprobe_aggregate(x.data_ptr(), B, L, G, (ctypes.c_int64 * 4)(*xs), cols.data_ptr(), len(cols),
                          count.data_ptr(), mean.data_ptr(), m2.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                          nonfinite.data_ptr())
    return True


def topk_update(x: Tensor, pos: int, neg: int, sample_index: Tensor, scores: Tensor, index: Tensor) -> bool:
    """Fold the scores ``x[..., pos]``, ``x[..., neg]`` of x (B, L, *G, S) float32 with
    sample_index (B,) into the top-k state scores (L, *G, 2, K) float32 / index int64, in place
    (see streaming.c). Returns False (nothing changed) where the kernel does not apply."""
    if compiling() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if not (_cpu_contiguous(scores, index) and scores.dtype == torch.float32 and index.dtype == torch.int64):
        return False
    lib = library()
    if lib is None:
        return False
    x, ((B, L, G), xs) = _view(x)
    if L * G * 2 * scores.shape[-1] != scores.numel():
        return False
    sample_index = sample_index.to("cpu", torch.int64).contiguous()
    lib.qkprobe_topk_update(x.data_ptr(), B, L, G, (ctypes.c_int64 * 4)(*xs), pos, neg, sample_index.data_ptr(),
                            scores.data_ptr(), index.data_ptr(), scores.shape[-1])
    return True
