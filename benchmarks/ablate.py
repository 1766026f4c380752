"""Cost of ablating every mode of one head, per mode, against one plain forward of the same images.

    python benchmarks/ablate.py [--model vit_small_patch16_224] [--images 16] [--layers 0,6,11] [--head 0]

Same model (random init: speed does not depend on the weights), the scikit-image photos (the
first ``--images``, repeated if fewer), one batch. For each layer in ``--layers``: one plain pass
of :class:`qkprobe.capture.ablate.Ablator` (output, q/k of the layer, the kept output of the block
below), then every mode of ``--head`` ablated one by one (the forward from the intervened block on,
under ``qkprobe.intervene``, plus the output comparison and the head's attention change), in
chunks of ``--chunk`` modes bracketed by timed plain forwards, so that every ratio compares times
taken seconds apart (the machine's speed drifts). Prints per layer the median over chunks of
(mean time per mode / mean of the plain forwards just before and after the chunk) with the range,
the one-off costs (the plain pass, the first mode's check of the cache against a full forward),
and the same with ``cache=False`` (full forwards) for the first chunk. Goal: ≤ 1.2× a plain
forward per mode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import qkprobe
from qkprobe.capture.ablate import Ablator, ModeRef
from qkprobe.data import make_loader, skimage_images


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--layers", default="0,6,11")
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, transform = qkprobe.load_model(f"timm:{args.model}", pretrained=False)
    model.eval()
    paths = skimage_images(tempfile.mkdtemp(prefix="qkprobe-bench-"))
    paths = (paths * (-(-args.images // len(paths))))[:args.images]
    x = next(iter(make_loader(paths, transform, batch_size=len(paths))))[0]
    bases = qkprobe.compute_bases(model)

    def plain_forward():
        with torch.no_grad():
            model(x)

    plain_forward()  # warm-up
    print(f"{args.model}, {len(paths)} images, head {args.head}, {bases[0].num_modes} modes per layer, "
          f"{torch.get_num_threads()} threads")
    print(f"{'layer':>5} {'plain ms':>9} {'ms/mode':>8} {'ratio (median, range over chunks)':>34} "
          f"{'plain pass ms':>13} {'check ms':>9} {'full fwd/mode':>13}")
    for layer in (int(s) for s in args.layers.split(",")):
        bench_layer(model, bases, x, layer, args.head, args.chunk, plain_forward)


def bench_layer(model, bases, x, layer, head, chunk_size, plain_forward):
    R = bases[layer].num_modes
    modes = [ModeRef(layer, head, r) for r in range(R)]
    ab = Ablator(model, bases, modes)
    t_plain_pass, plain = timed(lambda: ab.plain(x, [layer]))
    t_check, _ = timed(lambda: ab.ablate(0, plain))  # first mode: also compares with a full forward
    ratios, per_mode = [], []
    before, _ = timed(plain_forward)
    for start in range(1, R, chunk_size):
        chunk = range(start, min(start + chunk_size, R))
        t, _ = timed(lambda chunk=chunk: [ab.ablate(i, plain) for i in chunk])
        after, _ = timed(plain_forward)
        per_mode.append(t / len(chunk))
        ratios.append(per_mode[-1] / ((before + after) / 2))
        before = after
    full = Ablator(model, bases, modes, cache=False)
    full_plain = full.plain(x, [layer])
    t_full, _ = timed(lambda: [full.ablate(i, full_plain) for i in range(1, 1 + chunk_size)])
    after, _ = timed(plain_forward)
    print(f"{layer:>5} {before * 1e3:>9.0f} {statistics.median(per_mode) * 1e3:>8.0f} "
          f"{statistics.median(ratios):>12.3f}× ({min(ratios):.3f}–{max(ratios):.3f}){'':>8} "
          f"{t_plain_pass * 1e3:>13.0f} {t_check * 1e3:>9.0f} "
          f"{t_full / chunk_size / ((before + after) / 2):>12.3f}×", flush=True)
    if ab.notes:
        print("  note:", "; ".join(ab.notes))

if __name__ == "__main__":
    main()
