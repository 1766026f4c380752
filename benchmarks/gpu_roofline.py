"""Roofline of the Triton statistics kernels on an H200, from their launch configurations and what
they compile to (no GPU needed): bytes and flops per layer per batch, time lower bounds, the
predicted fraction of a plain forward, and the per-kernel compile table per target.

    PYTHONPATH=. python benchmarks/gpu_roofline.py [--targets sm_80,sm_90] [--no-compile]

Compile-time numbers and lower bounds, not GPU measurements. The forward time per layer is the
measured ViT-B/16 one (8,800 img/s on an H200, bf16, batch 128: ≈ 1.21 ms per layer per batch),
scaled by the layer's flops for ViT-L/14 and ViT-H/14 (not measured).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, not the interpreter

import torch  # noqa: E402

from qkprobe.reduce import triton_stats  # noqa: E402
from qkprobe.reduce.triton_aot import KB, TARGETS, compile_launch, problems  # noqa: E402

HBM = 4.8e12  # bytes/s
BF16_TC = 990e12  # dense bf16 tensor-core flop/s
TF32_TC = 495e12  # dense tf32 tensor-core flop/s
FP32 = 67e12  # fp32 FFMA flop/s
B = 128
VIT_B_LAYER_S = 128 / 8800 / 12  # measured: ViT-B/16 bf16 batch 128 on an H200


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    tokens: int
    head_dim: int
    modes: int
    width: int
    mlp: int


MODELS = [Model("vit_b16", 12, 197, 64, 64, 768, 3072), Model("vit_l14", 16, 257, 64, 64, 1024, 4096),
          Model("vit_h14", 16, 257, 80, 80, 1280, 5120)]


def layer_flops(m: Model) -> float:
    """Flops of one transformer layer for one image (qkv, proj, mlp, attention)."""
    n, d = m.tokens, m.width
    return 2 * n * (4 * d * d + 2 * d * m.mlp) + 4 * n * n * d


def forward_layer_s(m: Model) -> float:
    return VIT_B_LAYER_S * layer_flops(m) / layer_flops(MODELS[0])


@dataclass
class Cost:
    bytes: float
    tc_bf16: float  # flops on bf16 tensor cores
    tc_tf32: float  # flops on tf32 tensor cores (tf32x3: three passes counted)
    fp32: float  # other fp32 ops (sums, compares, exp, the top-k merge)

    def seconds(self) -> float:
        return max(self.bytes / HBM, self.tc_bf16 / BF16_TC + self.tc_tf32 / TF32_TC, self.fp32 / FP32)


def map_cost(m: Model, topk: int, store: bool, split: int = 3, elt: int = 2) -> Cost:
    """The map kernel: q and k read once (HBM), the (N, R) coordinates of both sides made by
    ``split`` bf16 dots, ~12 fp32 ops per coordinate (sum, max, min, NaN, top-k gate, Horner) and
    k extractions of ~8 ops per (16 × 16) tile element on the first block and ~1 after; ``store``:
    a and b written in fp32 for the share."""
    blk = triton_stats.block_config(m.head_dim, m.modes)
    bh, n, d, r = B * m.heads, m.tokens, m.head_dim, m.modes
    coords = 2 * bh * n * r
    blocks = -(-n // blk.map_n)
    extract = 2 * 2 * bh * r * blk.map_n * 8 * (topk + blocks)
    written = bh * r * 14 * 4 + (coords * 4 if store else 0)
    return Cost(2 * bh * n * d * elt + written, 2 * coords * d * split, 0.0, 12 * coords + extract)


def share_cost(m: Model, probs: bool, elt: int = 2) -> Cost:
    """The share kernel: a and b (fp32) read, k re-read per query block (L2; HBM once), P read
    when given; logits q kᵀ on bf16 tensor cores, P·b in tf32x3, exp and the softmax bookkeeping."""
    bh, n, d, r = B * m.heads, m.tokens, m.head_dim, m.modes
    read = 2 * bh * n * r * 4 + (bh * n * n * elt if probs else bh * n * d * elt * 2)
    logits = 0.0 if probs else 2 * bh * n * n * d
    pb = 3 * 2 * bh * n * n * r
    return Cost(read + bh * 4 * r * 4, logits, pb, (0 if probs else 6) * bh * n * n)


def roofline():
    print(f"H200 limits: {HBM / 1e12:.1f} TB/s HBM, {BF16_TC / 1e12:.0f} TFLOP/s bf16 TC, "
          f"{TF32_TC / 1e12:.0f} TFLOP/s tf32 TC, {FP32 / 1e12:.0f} TFLOP/s fp32; batch {B}, bf16, k = 5")
    print(f"{'model':8} {'kernel':18} {'MB':>8} {'TC GFLOP':>9} {'fp32 GOP':>9} {'bound µs':>9}")
    for m in MODELS:
        fwd = forward_layer_s(m)
        rows = [("map (default)", map_cost(m, 5, False)), ("map (+a, b)", map_cost(m, 5, True)),
                ("share (logits)", share_cost(m, False)), ("share (probs)", share_cost(m, True))]
        for name, c in rows:
            print(f"{m.name:8} {name:18} {c.bytes / 1e6:8.1f} {(c.tc_bf16 + c.tc_tf32) / 1e9:9.1f} "
                  f"{c.fp32 / 1e9:9.1f} {c.seconds() * 1e6:9.1f}")
        default = rows[0][1].seconds()
        share = rows[1][1].seconds() + rows[2][1].seconds()
        print(f"{m.name:8} forward layer ≈ {fwd * 1e3:.2f} ms{' (measured)' if m is MODELS[0] else ' (scaled)'}: "
              f"default stats ≥ {100 * default / fwd:.1f} %, with the attention share ≥ {100 * share / fwd:.1f} %")


def compile_table(targets):
    print(f"\n{'model':8} {'kernel':14} {'dtype':5} {'target':6} {'regs':>4} {'spill B':>7} {'smem KB':>7} {'TC':6} "
          f"problems")
    for m in MODELS:
        qkv = torch.empty(B, m.tokens, 3, m.heads, m.head_dim, device="meta", dtype=torch.bfloat16)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        maps = torch.empty(m.heads, m.head_dim, m.modes, device="meta")
        S = torch.empty(m.heads, m.modes, device="meta")
        for t in targets:
            target = TARGETS[t]
            probs = torch.empty(B, m.heads, m.tokens, m.tokens, device="meta", dtype=torch.bfloat16)
            variants = [("map", dict(attention=False)), ("map+store", dict()), ("share", dict()),
                        ("share+probs", dict(probs=probs))]
            for name, kw in variants:
                plan = triton_stats.plan(q, k, maps, maps, S, m.head_dim ** -0.5, prefix_tokens=1, topk=5,
                                         capability=target.capability, **kw)
                launch = plan.launches[0 if name.startswith("map") else 1]
                try:
                    r = compile_launch(launch.kernel, triton_stats.KERNELS[launch.kernel], launch.args,
                                       launch.constexprs, launch.num_warps, launch.num_stages, target, launch.maxnreg)
                except Exception as e:  # an unsupported target: say so and go on
                    print(f"{m.name:8} {name:14} bf16  {t:6} does not compile: {str(e).splitlines()[0][:60]}")
                    continue
                print(f"{m.name:8} {name:14} bf16  {t:6} {r.registers:4d} {r.spills:7d} {r.shared / KB:7.0f} "
                      f"{r.tensor_cores or '-':6} {'; '.join(problems(r, target)) or 'ok'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="sm_80,sm_86,sm_89,sm_90")
    ap.add_argument("--no-compile", action="store_true", help="only the roofline")
    args = ap.parse_args()
    roofline()
    if not args.no_compile:
        compile_table(args.targets.split(","))


if __name__ == "__main__":
    main()
