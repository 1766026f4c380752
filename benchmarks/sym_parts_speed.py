"""Symmetric/antisymmetric spectra of W_qᵀW_k: the 2R-span route vs the D×D reference, and what
the route adds to one layer's bases (qk_modes), same run, same weights.

    python benchmarks/sym_parts_speed.py [--rounds 7] [--full-heads 2]

Rounds alternate (2R route, qk_modes, 2R route, ...), medians and ranges printed. The D×D reference
(eigvalsh + general eigvals per head, minutes per layer on 2 cores) is timed once on ``--full-heads``
heads, scaled to the layer, and checked against the 2R route (max difference relative to max |λ|).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkprobe.core.modes import full_sym_antisym, qk_modes, sym_antisym_spectra

SHAPES = {"ViT-B/16": (768, 12), "ViT-L/16": (1024, 16)}


def once(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--full-heads", type=int, default=2, help="heads timed with the D×D reference")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for label, (D, H) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        W_q = torch.randn(H, 64, D, generator=g) * 0.05
        W_k = torch.randn(H, 64, D, generator=g) * 0.05
        low, modes = [], []
        for _ in range(args.rounds):
            t, a = once(sym_antisym_spectra, W_q, W_k)
            low.append(t)
            modes.append(once(qk_modes, W_q, W_k)[0])
        h = args.full_heads
        t_full, b = once(full_sym_antisym, W_q[:h], W_k[:h])
        n = a.sym.shape[1]
        scale = b.sym.abs().max()
        err = max(float((a.sym[:h, :n // 2] - b.sym[:, :n // 2]).abs().max() / scale),
                  float((a.sym[:h, -(n // 2):] - b.sym[:, -(n // 2):]).abs().max() / scale),
                  float((a.antisym[:h] - b.antisym[:, :a.antisym.shape[1]]).abs().max() / scale))
        ml, mm, mf = statistics.median(low), statistics.median(modes), t_full * H / h
        print(f"{label}: 2R route {ml * 1e3:.0f} ms/layer [{min(low) * 1e3:.0f}–{max(low) * 1e3:.0f}], "
              f"qk_modes {mm * 1e3:.0f} ms/layer [{min(modes) * 1e3:.0f}–{max(modes) * 1e3:.0f}] "
              f"(route/qk_modes {ml / mm:.2f}); D×D ≈ {mf:.0f} s/layer ({mf / ml:.0f}× the route); "
              f"max rel diff {err:.1e}")

if __name__ == "__main__":
    main()
