"""The Triton statistics kernels compiled ahead of time for real NVIDIA targets (no GPU needed).

Every launch is made by the launcher's own :func:`qkprobe.reduce.triton_stats.plan` from meta
tensors of real model shapes (ViT-B/16, ViT-L/14, ViT-H/14, registers; bf16, fp16, fp32; k up to
16; with and without bias or probabilities), so what compiles here is what would be launched; each
compile must not spill, must fit the target's shared memory per block and must put its dots on
tensor cores (mma / wgmma in the PTX). The interpreter tests (test_triton_stats.py) check the math.

CI runs a subset (bf16 on sm_80 and sm_90 for ViT-B/16, ViT-H/14 and registers, k = 5 and 16;
fp16 / fp32 for ViT-B/16 on sm_90; 45 cases, ~110 s on 2 cores with a cold Triton cache);
``QKPROBE_AOT_FULL=1`` runs every combination, also ViT-L/14 and sm_89. Not sm_75: Triton 3.8
emits no mma for it in any dtype (its dots there are FFMA).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

triton_stats = pytest.importorskip("qkprobe.reduce.triton_stats")
if not triton_stats.available():
    pytest.skip("triton is not installed", allow_module_level=True)
pytest.importorskip("triton.backends.nvidia.compiler")

from qkprobe.reduce.triton_aot import TARGETS, compile_launch, problems  # noqa: E402

FULL = os.environ.get("QKPROBE_AOT_FULL") == "1"
COMPILING = not triton_stats.interpreting()

# (name, heads, N, D, R, prefix tokens)
SHAPES = {
    "vit_b16": (12, 197, 64, 64, 1),
    "vit_l14": (16, 257, 64, 64, 1),
    "vit_h14": (16, 257, 80, 80, 1),
    "vit_b16_reg4": (12, 201, 64, 64, 5),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases():
    """(shape, dtype, k, share source, target), the CI subset first-class, the rest only when FULL."""
    out = []
    for shape in SHAPES:
        for dt in DTYPES:
            for topk in (5, 16):
                for share in ("off", "none", "bias", "probs"):
                    for target in ("sm_80", "sm_90", "sm_89"):  # Triton 3.8 has no tensor-core path for sm_75
                        if target == "sm_89" and not FULL:
                            continue
                        ci = dt == "bf16" or (shape == "vit_b16" and target == "sm_90" and topk == 5)
                        ci = ci and shape != "vit_l14" and (share in ("off", "none") or topk == 5)
                        if ci or FULL:
                            out.append(pytest.param(shape, dt, topk, share, target,
                                                    id=f"{shape}-{dt}-k{topk}-{share}-{target}"))
    return out


def launches(shape, dt, topk, share, target, B=128):
    """The launches the launcher makes for one batch of this model layer (meta tensors)."""
    H, N, D, R, P = SHAPES[shape]
    qkv = torch.empty(B, N, 3, H, D, device="meta", dtype=DTYPES[dt]).permute(2, 0, 3, 1, 4)  # timm's fused qkv
    maps = torch.empty(H, D, R, device="meta")
    kw = {}
    if share == "probs":
        kw["probs"] = torch.empty(B, H, N, N, device="meta", dtype=DTYPES[dt])
    elif share == "bias":
        kw["attn_bias"] = torch.empty(H, N, N, device="meta")  # a rel-pos table, broadcast over B
    plan = triton_stats.plan(qkv[0], qkv[1], maps, maps, torch.empty(H, R, device="meta"), D ** -0.5,
                             prefix_tokens=P, topk=topk, attention=share != "off",
                             capability=TARGETS[target].capability, **kw)
    return plan.launches


@pytest.mark.skipif(COMPILING, reason="this process compiles the kernels itself")
def test_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


compiling = pytest.mark.skipif(not COMPILING, reason="runs in a process without TRITON_INTERPRET")


@compiling
@pytest.mark.parametrize("shape, dt, topk, share, target", cases())
def test_kernels_compile_without_spills_within_shared_memory_on_tensor_cores(shape, dt, topk, share, target):
    for launch in launches(shape, dt, topk, share, target):
        if share != "none" and launch.kernel == "map":
            continue  # the map kernel does not see the share's inputs: compiled in the "none" cases
        if share == "off":
            assert [launch.kernel for launch in launches(shape, dt, topk, share, target)] == ["map"]
        report = compile_launch(launch.kernel, triton_stats.KERNELS[launch.kernel], launch.args, launch.constexprs,
                                launch.num_warps, launch.num_stages, TARGETS[target], launch.maxnreg)
        assert not problems(report, TARGETS[target]), (report, problems(report, TARGETS[target]))


@compiling
def test_the_checks_can_fail():
    """The ieee fp32 dots never reach tensor cores: the check must say so."""
    launch = launches("vit_b16", "fp32", 5, "off", "sm_80")[0]
    constexprs = dict(launch.constexprs, PREC="ieee")
    report = compile_launch(launch.kernel, triton_stats.KERNELS[launch.kernel], launch.args, constexprs,
                            launch.num_warps, launch.num_stages, TARGETS["sm_80"], launch.maxnreg)
    assert "no mma/wgmma" in problems(report, TARGETS["sm_80"])
    bad = dataclasses.replace(report, spill_stores=8, spill_loads=0, shared=200 * 1024)
    assert problems(bad, TARGETS["sm_86"], dots=False) == ["8 B spill stores, 0 B spill loads",
                                                          "200 KB shared > 99 KB"]
