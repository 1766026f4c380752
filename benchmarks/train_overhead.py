"""Cost of the probe on a training step, against the same step without it, in one run.

    python benchmarks/train_overhead.py [--model vit_small_patch16_224] [--batch 8] [--steps 6]

Variants (same model, data and optimizer, SGD): no probe; probe every=1; probe every=10; both
with refresh_every=100 and writing HDF5. Prints ms/step and the ratio to the plain step
(goal: ≤ 1.10× at every=10 on 2 CPU cores).
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 10, (args.batch,))
    tmp = tempfile.mkdtemp()
    print(f"{args.model}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def run(variant, step0):
        probe = None
        if variant is not None:
            probe = qkprobe.attach(model, os.path.join(tmp, f"{variant}.h5"), every=variant, refresh_every=100)
        times = []
        for s in range(args.steps + 1):
            if probe is not None:
                probe.step(step0 + s)
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        if probe is not None:
            probe.close()
        return statistics.mean(times[1:])  # every=10 records 1 step in 10: mean, not median

    results = {}
    for name, variant in (("plain", None), ("every=1", 1), ("every=10", 10), ("plain again", None)):
        results[name] = run(variant, 0)
    base = min(results["plain"], results["plain again"])
    for name, t in results.items():
        print(f"{name:12s} {t * 1e3:8.1f} ms/step  ratio {t / base:5.3f}x")


if __name__ == "__main__":
    main()
