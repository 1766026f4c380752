"""The Triton statistics kernels compiled ahead of time for real NVIDIA targets, on a CPU-only machine.

:func:`compile_launch` compiles one :class:`~qkprobe.reduce.triton_stats.Launch` (the kernel, its
arguments and constexprs exactly as the launcher passes them; tensors may be on the ``meta``
device) for one :class:`Target` with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
specializing the arguments as Triton's launcher does (integers equal to 1 become constexprs,
16-divisible integers and pointers get the divisibility attribute), and reads back what the
bundled ``ptxas -v`` says (registers, spill bytes), the shared memory the kernel asks for and
whether its PTX has tensor-core instructions (``mma.sync`` / ``wgmma``). Results are cached per
process. Needs triton with its NVIDIA backend, not the interpreter (``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Tuple

KB = 1024


@dataclass(frozen=True)
class Target:
    """One NVIDIA compute capability and the most shared memory one block may use there."""

    name: str
    capability: int
    shared_limit: int  # bytes per block (opt-in maximum)


TARGETS: Dict[str, Target] = {t.name: t for t in (
    Target("sm_75", 75, 64 * KB),
    Target("sm_80", 80, 163 * KB),
    Target("sm_86", 86, 99 * KB),
    Target("sm_89", 89, 99 * KB),
    Target("sm_90", 90, 227 * KB),
)}


@dataclass(frozen=True)
class CompileReport:
    """What one kernel compiled to on one target."""

    kernel: str
    target: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes per block
    tensor_cores: str  # "wgmma", "mma" or "" (none in the PTX)
    num_warps: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_CACHE: Dict[Tuple, CompileReport] = {}


def specialization(fn, args, constexprs):
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``, as the launcher makes them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    names = list(fn.arg_names)
    values = list(args) + [constexprs[n] for n in names[len(args):]]
    if len(values) != len(names):
        raise TypeError(f"{fn.__name__} takes {len(names)} arguments, got {len(values)}")
    signature, consts, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, values)):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer 1
            consts[name] = attr
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, consts, attrs


def _tensor_cores(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else ""


def ptxas_report(ptx: str, target: Target) -> str:
    """What the bundled ``ptxas -v`` says of this PTX, with the options Triton compiles it with
    (run here: a kernel from Triton's cache was not assembled in this process)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(target.capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(target.capability)}", src, "-o", src + ".o"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def compile_launch(name: str, fn, args, constexprs, num_warps: int, num_stages: int, target: Target,
                   maxnreg=None) -> CompileReport:
    """Compile ``fn`` with these arguments for ``target`` and report registers, spills, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("triton_aot: the kernels are interpreted (TRITON_INTERPRET=1); compile them in a process "
                           "without it.")
    signature, consts, attrs = specialization(fn, args, constexprs)
    key = (name, tuple(signature.items()), tuple(sorted(consts.items())), tuple(sorted(attrs)), num_warps,
           num_stages, maxnreg, target.name)
    if key in _CACHE:
        return _CACHE[key]
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", target.capability, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    text = ptxas_report(kernel.asm["ptx"], target)
    spill = _PTXAS_SPILL.findall(text)
    regs = _PTXAS_REGS.findall(text)
    if not spill or not regs:
        raise RuntimeError(f"triton_aot: no ptxas -v report for {name} on {target.name}: {text[-500:]!r}")
    report = CompileReport(name, target.name, int(regs[-1]), sum(int(s) for s, _ in spill),
                           sum(int(v) for _, v in spill), int(kernel.metadata.shared),
                           _tensor_cores(kernel.asm["ptx"]), num_warps)
    _CACHE[key] = report
    return report


def problems(report: CompileReport, target: Target, dots: bool = True):
    """What is wrong with this compile (empty if nothing): spills, shared memory over the
    target's per-block limit, dots without tensor-core instructions."""
    out = []
    if report.spills:
        out.append(f"{report.spill_stores} B spill stores, {report.spill_loads} B spill loads")
    if report.shared > target.shared_limit:
        out.append(f"{report.shared / KB:.0f} KB shared > {target.shared_limit // KB} KB")
    if dots and not report.tensor_cores:
        out.append("no mma/wgmma")
    return out
