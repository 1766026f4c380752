"""Cost of the probe against the plain forward pass, and against the official pipeline's algorithm.

    python benchmarks/overhead.py [--model vit_small_patch16_224] [--batch 8] [--batches 4] [--rounds 5]

All in one run, same model (random init: speed does not depend on the weights), same inputs, in
rounds of plain, A, plain, B, plain, C, plain blocks, so that every ratio compares times taken
seconds apart (this machine's speed drifts by ±10 % within minutes):
1. plain forward, batch B (no_grad, eval);
2. forward with ``qkprobe.attach`` (default statistics, writing HDF5 with per-sample rows);
3. the same with per-sample rows off (aggregates and top-k only);
4. the same with every statistic (``stats="all"``: + the attention share, one more attention
   pass per layer);
5. the official pipeline's algorithm: batch 1, the attention input of each layer projected onto
   the D × D singular bases head by head (U_h and V_h of the full SVD of W_q,hᵀW_k,h), each
   statistic copied to the host head by head.
Prints per variant the median over rounds of (variant / mean of the plain blocks just before and
just after it) with the range
(goal ≤ 1.15× for ViT-S/16, batch 8, 2 CPU cores, default statistics), images/s, the speed-up
over the official algorithm, whether the writer kept up (time the forward thread spent blocked
on a full writer queue) and whether the compiled CPU kernels were used.
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


VARIANTS = {
    "probe": dict(),
    "probe_no_rows": dict(per_sample=False),
    "probe_all_stats": dict(stats="all"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--official-images", type=int, default=2, help="images timed for the official algorithm")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    from qkprobe.core import native
    print(f"{args.model}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, compiled CPU kernels: {'yes' if native.library() else 'no (torch path)'}")

    def plain():
        with torch.no_grad():
            model(x)

    plain()  # warm-up
    tmp = tempfile.mkdtemp()
    bases = qkprobe.compute_bases(model)  # attach without recomputing them every round
    times = {name: [] for name in ["plain", *VARIANTS]}
    ratios = {name: [] for name in VARIANTS}
    blocked = {name: 0.0 for name in VARIANTS}
    for r in range(args.rounds):
        # plain, A, plain, B, plain, C, plain: every probe block is bracketed by two plain blocks,
        # and its ratio is taken against their mean (this machine's speed drifts within minutes)
        before = median_time(plain, args.batches)
        times["plain"].append(before)
        for name, options in VARIANTS.items():
            probe = qkprobe.attach(model, os.path.join(tmp, f"{name}{r}.h5"), bases=bases, **options)
            plain()  # warm-up with hooks
            t = median_time(plain, args.batches)
            probe.close()
            blocked[name] += probe.writer.blocked_seconds
            after = median_time(plain, args.batches)
            times["plain"].append(after)
            times[name].append(t)
            ratios[name].append(t / ((before + after) / 2))
            before = after
    base = statistics.median(times["plain"])
    print(f"plain forward          {base * 1e3:8.1f} ms/batch  {args.batch / base:7.1f} img/s  "
          f"(blocks {min(times['plain']) * 1e3:.0f}–{max(times['plain']) * 1e3:.0f} ms)")
    for name in VARIANTS:
        t = statistics.median(times[name])
        q = sorted(ratios[name])
        print(f"{name:22s} {t * 1e3:8.1f} ms/batch  {args.batch / t:7.1f} img/s  ratio {statistics.median(q):5.3f}x "
              f"(rounds {q[0]:.3f}–{q[-1]:.3f})  writer blocked {blocked[name]:.3f} s")

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
    speedup = (args.batch / statistics.median(times['probe'])) * t_off
    print(f"probe speed-up over the official algorithm: {speedup:.1f}x")


if __name__ == "__main__":
    main()
