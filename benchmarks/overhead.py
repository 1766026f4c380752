"""Cost of the probe against the plain forward pass, and against the official pipeline's algorithm.

    python benchmarks/overhead.py [--model vit_small_patch16_224] [--batch 8] [--batches 6]

All in one run, same model (random init: speed does not depend on the weights), same inputs:
1. plain forward, batch B (no_grad, eval);
2. forward with ``qkprobe.attach`` (default statistics, writing HDF5 with per-sample rows);
3. the same with per-sample rows off (aggregates and top-k only);
   and with per-sample rows but without the attention-share statistics (``stats=``);
4. the official pipeline's algorithm: batch 1, the attention input of each layer projected onto
   the D × D singular bases head by head (U_h and V_h of the full SVD of W_q,hᵀW_k,h), each
   statistic copied to the host head by head.
Prints seconds per batch, images/s, the probe/plain ratio (goal ≤ 1.15× for ViT-S/16, batch 8,
2 CPU cores), the speed-up over the official algorithm, and whether the writer kept up (time the
forward thread spent blocked on a full writer queue).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import timm
import torch

import qkprobe
from qkprobe.core.stats import STAT_NAMES


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def official_algorithm(model, images, sites, full_bases):
    """Batch 1, hidden states projected onto D×D bases head by head, stats copied head by head."""
    stats = []
    xs = {}
    hooks = [s.module.register_forward_pre_hook(lambda m, a, kw, i=i: xs.__setitem__(i, a[0] if a else kw["x"]),
                                                with_kwargs=True) for i, s in enumerate(sites)]
    try:
        for img in images:
            with torch.no_grad():
                model(img[None])
                for i, (U, V) in enumerate(full_bases):
                    x = xs[i][0, 1:]  # patch tokens
                    for h in range(U.shape[0]):
                        qm = x @ U[h]  # (N, D): all D directions of the full basis
                        km = x @ V[h]
                        for arr in (qm.mean(0), qm.amax(0), qm.amin(0), km.mean(0), km.amax(0), km.amin(0),
                                    qm.amax(0) * km.amax(0), qm.amin(0) * km.amin(0)):
                            stats.append(arr.numpy().copy())
    finally:
        for h in hooks:
            h.remove()
    return len(stats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per variant")
    ap.add_argument("--official-images", type=int, default=2, help="images timed for the official algorithm")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"{args.model}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus")

    def plain():
        with torch.no_grad():
            model(x)

    plain()  # warm-up
    tmp = tempfile.mkdtemp()
    results = {}
    order = ["plain", "probe", "probe_no_rows", "probe_no_share", "plain_again"]
    no_share = [n for n in STAT_NAMES if not n.startswith("attn_")]
    for name in order:
        if name.startswith("plain"):
            results[name] = median_time(plain, args.batches)
            continue
        path = os.path.join(tmp, f"{name}.h5")
        probe = qkprobe.attach(model, path, per_sample=(name != "probe_no_rows"),
                               stats=no_share if name == "probe_no_share" else None)
        plain()  # warm-up with hooks
        t = median_time(plain, args.batches)
        t_close = time.perf_counter()
        probe.close()
        results[name] = t
        results[name + "_close"] = time.perf_counter() - t_close
        results[name + "_blocked"] = probe.writer.blocked_seconds if probe.writer is not None else 0.0
    base = min(results["plain"], results["plain_again"])
    ips = args.batch / base
    print(f"plain forward          {base * 1e3:8.1f} ms/batch  {ips:7.1f} img/s")
    for name in ("probe", "probe_no_rows", "probe_no_share"):
        t = results[name]
        print(f"{name:22s} {t * 1e3:8.1f} ms/batch  {args.batch / t:7.1f} img/s  ratio {t / base:5.3f}x  "
              f"writer blocked {results[name + '_blocked']:.3f} s, close {results[name + '_close']:.2f} s")

    sites = qkprobe.adapters.discover.find_attention(model)
    full = []
    for s in sites:
        w = s.adapter.weights(s.module)
        Wq, Wk = w.W_q.double(), w.W_k.double()
        M = Wq.transpose(-1, -2) @ Wk
        U, _, Vh = torch.linalg.svd(M)
        full.append((U.float(), Vh.transpose(-1, -2).float()))
    imgs = x[: args.official_images]
    t = time.perf_counter()
    official_algorithm(model, imgs, sites, full)
    t_off = (time.perf_counter() - t) / len(imgs)
    print(f"official algorithm     {t_off * 1e3:8.1f} ms/image  {1 / t_off:7.2f} img/s")
    print(f"probe speed-up over the official algorithm: {(args.batch / results['probe']) * t_off:.1f}x")


if __name__ == "__main__":
    main()
