"""compute_bases' low-rank route vs a full D×D SVD per head, same run, same weights.

    python benchmarks/bases_speed.py [--layers 2] [--repeats 5]

Prints seconds per layer for both routes and their ratio for ViT-B/16 (D=768, 12 heads) and
ViT-L/16 (D=1024, 16 heads) shapes (R = 64). Goal: ratio ≥ 50× at ViT-B on 2 CPU cores.
Also checks that both routes agree (max |ΔS| relative, max |Δcos|).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkprobe.core.modes import full_svd_modes, qk_modes

SHAPES = {"ViT-B/16": (768, 12), "ViT-L/16": (1024, 16)}


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="layers timed per shape (full SVD is slow)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the low-rank route per layer")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for label, (D, H) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        low, full = [], []
        for _ in range(args.layers):
            W_q = torch.randn(H, 64, D, generator=g) * D ** -0.5
            W_k = torch.randn(H, 64, D, generator=g) * D ** -0.5
            qk_modes(W_q, W_k)  # warm-up (LAPACK workspace, threads)
            t_low, m = timed(lambda W_q=W_q, W_k=W_k: qk_modes(W_q, W_k), args.repeats)
            t_full, (U, S, V) = timed(lambda W_q=W_q, W_k=W_k: full_svd_modes(W_q, W_k), 1)
            low.append(t_low)
            full.append(t_full)
            dS = ((m.S - S).abs().max() / S.max()).item()
            dcos = (m.cosine - (U * V).sum(-2)).abs().max().item()
        tl, tf = statistics.median(low), statistics.median(full)
        print(f"{label:9s} D={D:5d} H={H:3d}  low-rank {tl * 1e3:8.1f} ms/layer  full SVD {tf * 1e3:9.1f} ms/layer  "
              f"ratio {tf / tl:7.1f}x  (max rel dS {dS:.1e}, max dcos {dcos:.1e})")


if __name__ == "__main__":
    main()
