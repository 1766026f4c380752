"""The probe on one CUDA GPU: ViT-B/16 and ViT-L/14, batch 128, bf16 — sized for a few minutes.

    python benchmarks/gpu_overhead.py [--models vit_base_patch16_224,vit_large_patch14_224] [--batch 128]
                                      [--batches 10] [--rounds 3] [--out-dir DIR]

All in one run, per model (random init; speed does not depend on the weights), same inputs:
0. correctness checks: the Triton statistics (backend "triton", the default on CUDA) against the
   torch path on one batch (max abs difference per statistic, printed), and the asynchronous row
   copies (pinned buffers on a side stream, handed to the writer a batch later) against the same
   batches handed over synchronously (a snapshot with every batch): rows, ids and top-k must be
   identical. The run stops if either check fails;
1. plain forward (bf16 weights and inputs, no_grad, eval), images/s;
2. the probe with default statistics writing HDF5, per-sample rows on (float32) and off, in
   rounds of plain, rows-on, plain, rows-off, plain: each ratio is against the mean of the two
   plain blocks around it;
3. the extra GPU memory of the probe (peak allocated with the probe minus peak without);
4. the official pipeline's algorithm (batch 1, the attention input of every layer projected onto
   the full D × D singular bases head by head, each statistic copied to the host head by head).
Goals (issue 10): ≤ 1.05× rows off, ≤ 1.10× rows on (or the disk bounds it: the MB/s of rows is
printed), extra memory ≤ 10 %, ≥ 300× the official algorithm. Without CUDA it stops at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def fail(message: str) -> None:
    print(f"gpu_overhead: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_base_patch16_224,vit_large_patch14_224")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per block")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--official-images", type=int, default=4)
    ap.add_argument("--out-dir", default=None, help="folder for the run files (default: the temp folder)")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False); run it on a GPU machine.")
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("needs triton (pip install triton) for the probe's GPU statistics.")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"batch {args.batch}, bf16, {args.batches} batches per block, {args.rounds} rounds")
    tmp = tempfile.mkdtemp(prefix="qkprobe-gpu-", dir=args.out_dir)
    for name in args.models.split(","):
        bench_model(name, args, tmp, dev)
        torch.cuda.empty_cache()


def bench_model(name, args, tmp, dev) -> None:
    import timm
    import torch

    import qkprobe
    from qkprobe.core.stats import DEFAULT_STATS
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(dev).eval()
    bases = qkprobe.compute_bases(model)  # float32 weights, float64 math
    model = model.to(torch.bfloat16)
    x = torch.randn(args.batch, 3, *model.default_cfg["input_size"][1:], device=dev, dtype=torch.bfloat16)
    check(model, x[:8], bases, tmp, DEFAULT_STATS)
    check_pinned(model, x[:16], bases, tmp)

    def block():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.batches):
                model(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.batches

    block()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    block()
    plain_peak = torch.cuda.max_memory_allocated()
    times = {"plain": [], "rows": [], "no_rows": []}
    ratios = {"rows": [], "no_rows": []}
    peaks, closes, mb_s = {}, {"rows": [], "no_rows": []}, []
    before = block()
    times["plain"].append(before)
    for r in range(args.rounds):
        for variant, options in (("rows", {}), ("no_rows", {"per_sample": False})):
            path = os.path.join(tmp, f"{name}-{variant}-{r}.h5")
            probe = qkprobe.attach(model, path, bases=bases, chunk_rows=args.batch, **options)
            with torch.no_grad():
                model(x)  # warm-up with hooks (kernels compiled in check())
            torch.cuda.reset_peak_memory_stats()
            t = block()
            peaks[variant] = max(peaks.get(variant, 0), torch.cuda.max_memory_allocated())
            c = time.perf_counter()
            probe.close()
            closes[variant].append(time.perf_counter() - c)
            if variant == "rows":
                rows_bytes = os.path.getsize(path)
                mb_s.append(rows_bytes / (t * (args.batches + 1) + closes[variant][-1]) / 1e6)
            after = block()
            times[variant].append(t)
            times["plain"].append(after)
            ratios[variant].append(t / ((before + after) / 2))
            before = after
            os.unlink(path)
    base = statistics.median(times["plain"])
    print(f"{name}: plain {args.batch / base:8.0f} img/s ({base * 1e3:.1f} ms/batch, peak "
          f"{plain_peak / 2**30:.2f} GiB)")
    for variant, label in (("rows", "probe, rows on "), ("no_rows", "probe, rows off")):
        t, q = statistics.median(times[variant]), sorted(ratios[variant])
        extra = (peaks[variant] - plain_peak) / plain_peak
        print(f"  {label} {args.batch / t:8.0f} img/s  ratio {statistics.median(q):.3f}x "
              f"(rounds {q[0]:.3f}–{q[-1]:.3f})  extra GPU memory {extra:+.1%}  close "
              f"{statistics.median(closes[variant]):.2f} s")
    print(f"  rows on wrote {statistics.median(mb_s):.0f} MB/s of file (compressed rows)")
    t_off = official(model, x[: args.official_images], dev)
    speed = args.batch / statistics.median(times["rows"])
    print(f"  official algorithm {1 / t_off:8.1f} img/s; the probe (rows on) is {speed * t_off:.0f}x faster")


def check(model, x, bases, tmp, stat_names) -> None:
    """Triton backend against the torch path on one batch; stops the run if they disagree."""
    import numpy as np
    import torch

    import qkprobe
    got = {}
    for backend in ("torch", "triton"):
        path = os.path.join(tmp, f"check-{backend}.h5")
        with qkprobe.attach(model, path, bases=bases, backend=backend), torch.no_grad():
            model(x)
        with qkprobe.open_run(path) as run:
            got[backend] = np.stack([run.stats(i) for i in range(len(run.layer_names))])
        os.unlink(path)
    diff = np.abs(got["triton"] - got["torch"])  # (L, B, H, R, S)
    scale = np.maximum(np.abs(got["torch"]), 1.0)
    worst = (diff / scale).max(axis=(0, 1, 2, 3))
    print("  check triton vs torch, max |Δ| / max(|x|, 1): " + ", ".join(
        f"{n} {w:.1e}" for n, w in zip(stat_names, worst)))
    if not np.all(worst < 1e-2):
        fail("the Triton statistics disagree with the torch path; report this with the line above.")


def check_pinned(model, x, bases, tmp, batches: int = 6) -> None:
    """The CUDA row hand-off: batches of different images recorded with deferred copies (the
    default) and with a synchronous hand-off every batch give the same file."""
    import numpy as np
    import torch

    import qkprobe
    from qkprobe.state import TOPK_INDEX
    inputs = [x.roll(i, dims=0) * (1 + 0.1 * i) for i in range(batches)]
    got = {}
    for name, every in (("deferred", 3600.0), ("synchronous", 0.0)):
        path = os.path.join(tmp, f"pinned-{name}.h5")
        with qkprobe.attach(model, path, bases=bases, snapshot_every_s=every) as probe, torch.no_grad():
            for i, xi in enumerate(inputs):
                probe.set_ids([f"b{i}s{j}" for j in range(len(xi))])
                model(xi)
        with qkprobe.open_run(path) as run:
            got[name] = (run.ids, [run.stats(i) for i in range(len(run.layer_names))],
                         [run.snapshot(i, TOPK_INDEX) for i in range(len(run.layer_names))])
        os.unlink(path)
    (ids, rows, topk), (ids2, rows2, topk2) = got["deferred"], got["synchronous"]
    same = ids == ids2 and all(np.array_equal(a, b, equal_nan=True) for a, b in zip(rows, rows2)) \
        and all(np.array_equal(a, b) for a, b in zip(topk, topk2))
    print(f"  check pinned row copies over {batches} batches: {'identical' if same else 'DIFFERENT'}")
    if not same:
        fail("the asynchronous row copies differ from a synchronous hand-off; report this with the line above.")


def official(model, images, dev) -> float:
    """Seconds per image of the official pipeline's algorithm (see the module docstring)."""
    import torch

    from qkprobe.adapters.discover import find_attention
    sites = find_attention(model)
    full = []
    for s in sites:
        w = s.adapter.weights(s.module)
        M = w.W_q.double().transpose(-1, -2) @ w.W_k.double()
        U, _, Vh = torch.linalg.svd(M)
        full.append((U.to(torch.bfloat16), Vh.transpose(-1, -2).to(torch.bfloat16)))
    xs = {}
    hooks = [s.module.register_forward_pre_hook(lambda m, a, kw, i=i: xs.__setitem__(i, a[0] if a else kw["x"]),
                                                with_kwargs=True) for i, s in enumerate(sites)]
    stats = []
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for img in images:
            with torch.no_grad():
                model(img[None])
                for i, (U, V) in enumerate(full):
                    h_in = xs[i][0, 1:]
                    for h in range(U.shape[0]):
                        qm, km = h_in @ U[h], h_in @ V[h]
                        for arr in (qm.mean(0), qm.amax(0), qm.amin(0), km.mean(0), km.amax(0), km.amin(0),
                                    qm.amax(0) * km.amax(0), qm.amin(0) * km.amin(0)):
                            stats.append(arr.float().cpu().numpy())
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(images)
    finally:
        for hk in hooks:
            hk.remove()


if __name__ == "__main__":
    main()
