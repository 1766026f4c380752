"""Reducers: per-batch statistics of one layer's q and k, one backend per device.

- ``torch``: :func:`qkprobe.core.stats.mode_statistics` on torch ops (the reference, any device);
- ``native``: the same function through the compiled CPU kernels of :mod:`qkprobe.core.native`;
- ``triton``: :mod:`qkprobe.reduce.triton_stats`, GPU kernels that read q and k once and apply the
  coordinate maps in the kernel (also runs on CPU tensors under ``TRITON_INTERPRET=1``).

:func:`qkprobe.reduce.backend.resolve` picks one (``"auto"``) or checks a forced one.
"""
