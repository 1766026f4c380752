"""The probe at dataset scale: end to end against plain inference, and the host-side ceiling.

    python benchmarks/pipeline.py [--part a|b|both] [--rounds 3] [--images 480] [--seconds 8]

(a) End to end: ``qkprobe run`` (timm:vit_small_patch16_224, random init, HDF5 rows, default
    statistics) against a plain inference loop over the same folder of JPEGs made from
    scikit-image's photographs (random crops, so no two are the same), same batch size, same
    decoding (qkprobe.data's loader, DataLoader with the same workers), both timed from model
    creation to the last batch, on the device given. Rounds of plain, run, plain, run, ...,
    plain: each ratio is the run over the mean of the plain passes around it (goal ≤ 1.10×).
(b) Host-side ceiling: the probe's own run state (``qkprobe.state.RunState``: top-k and
    aggregates) and run sink (``qkprobe.sinks.run_sink.RunSink`` and its HDF5 writer) fed
    synthetic statistics (L, B, H, R, S) at ViT-B/16 (12 layers, 12 heads) and ViT-L/14 (24
    layers, 16 heads) layer shapes, R = 64, batch 128, as fast as they take them, snapshots
    every 5 s and at close: images/s with rows off and with float16 rows,
    beside the raw write speed of the same disk (sequential 8 MiB writes + fsync) measured in
    the same run. Goals: rows off ≥ 20,000 images/s at ViT-B/16; fp16 rows ≥ 50 % of raw disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

SPEC = "timm:vit_small_patch16_224"


# ----------------------------------------------------------------------------------- (a) end to end

def make_jpegs(folder: str, n: int, seed: int = 0) -> list:
    """n JPEGs (256 × 256 random crops of scikit-image's photographs, quality 90)."""
    from PIL import Image

    from qkprobe.data import skimage_images
    os.makedirs(folder, exist_ok=True)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in skimage_images(os.path.join(folder, ".src"))]
    photos = [p for p in photos if min(p.shape[:2]) >= 256] or photos
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        y = rng.integers(0, max(1, p.shape[0] - 256 + 1))
        x = rng.integers(0, max(1, p.shape[1] - 256 + 1))
        crop = Image.fromarray(p[y:y + 256, x:x + 256]).resize((256, 256))
        path = os.path.join(folder, f"img{i:05d}.jpg")
        crop.save(path, quality=90)
        paths.append(path)
    shutil.rmtree(os.path.join(folder, ".src"), ignore_errors=True)
    return paths


def plain_pass(folder: str, batch: int, workers: int, device: str) -> float:
    """Model creation + a plain no-grad inference loop over the folder; seconds."""
    from qkprobe.cli.run_cmd import _loader_options
    from qkprobe.data import list_images, make_loader
    from qkprobe.models import load_model
    t = time.perf_counter()
    model, transform = load_model(SPEC, pretrained=False, seed=0, device=device)
    loader = make_loader(list_images(images_dir=folder), transform, batch_size=batch,
                         **_loader_options(workers, device.startswith("cuda")))
    with torch.no_grad():
        for images, _paths, _ok, _why in loader:
            model(images.to(device, non_blocking=True))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_pass(folder: str, out: str, batch: int, workers: int, device: str) -> float:
    """``qkprobe run`` in this process (model creation, bases, loop, close); seconds."""
    from qkprobe.cli.main import main
    if os.path.exists(out):
        os.unlink(out)
    t = time.perf_counter()
    code = main(["run", SPEC, "--random-init", "--images", folder, "--out", out, "--batch-size", str(batch),
                 "--workers", str(workers), "--device", device, "--no-progress"])
    elapsed = time.perf_counter() - t
    if code != 0:
        sys.exit(f"qkprobe run failed with exit code {code}")
    return elapsed


def part_a(args) -> None:
    from qkprobe.data import default_workers
    workers = default_workers() if args.workers is None else args.workers
    tmp = tempfile.mkdtemp(prefix="qkprobe-pipeline-")
    folder = os.path.join(tmp, "jpegs")
    make_jpegs(folder, args.images)
    print(f"(a) {SPEC}, {args.images} JPEGs, batch {args.batch}, {workers} workers, device {args.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    plain_pass(folder, args.batch, workers, args.device)  # warm-up: file cache, imports, kernels
    run_pass(folder, os.path.join(tmp, "warm.h5"), args.batch, workers, args.device)
    plains, runs, ratios = [], [], []
    before = plain_pass(folder, args.batch, workers, args.device)
    plains.append(before)
    for r in range(args.rounds):
        t = run_pass(folder, os.path.join(tmp, f"run{r}.h5"), args.batch, workers, args.device)
        after = plain_pass(folder, args.batch, workers, args.device)
        plains.append(after)
        runs.append(t)
        ratios.append(t / ((before + after) / 2))
        before = after
    n = args.images
    p, q = statistics.median(plains), statistics.median(runs)
    print(f"plain inference loop  {p:7.2f} s  {n / p:8.1f} img/s  (passes {min(plains):.2f}–{max(plains):.2f} s)")
    print(f"qkprobe run           {q:7.2f} s  {n / q:8.1f} img/s  ratio {statistics.median(ratios):.3f}x "
          f"(rounds {min(ratios):.3f}–{max(ratios):.3f})")
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- (b) host ceiling

SHAPES = {"ViT-B/16": (12, 12, 64), "ViT-L/14": (24, 16, 64)}  # layers, heads, modes


def raw_disk_speed(folder: str, total: int = 1 << 30, block: int = 8 << 20) -> float:
    """Sequential writes of incompressible bytes + fsync into ``folder``: bytes/s."""
    data = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
    path = os.path.join(folder, "raw.bin")
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(total // block):
            f.write(data)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    os.unlink(path)
    return total / elapsed


def host_ceiling(folder: str, shape: tuple, batch: int, seconds: float, per_sample: bool, store_dtype: str,
                 compression, state: str) -> tuple:
    """Images/s and row bytes/s of the probe's run state and run sink fed synthetic statistics.

    ``state``: where top-k and aggregates are updated, "cuda" (as the probe does on a GPU: the host
    then only hands rows, ids and the interval snapshots to the writer), "cpu", or "none" (the
    sink and writer alone: the host's share of a GPU run, measurable without a GPU)."""
    from qkprobe.core.stats import DEFAULT_STATS, STAT_INDEX, STAT_NAMES
    from qkprobe.sinks.hdf5_writer import LayerSpec, RunWriter
    from qkprobe.sinks.run_sink import RunSink
    from qkprobe.state import RunState, TrainingSeries
    from qkprobe.state.run_state import SCORES
    L, H, R = shape
    names = list(DEFAULT_STATS)
    cols = [STAT_INDEX[n] for n in names]
    device = "cpu" if state == "none" else state
    run_state = RunState([(H, R)] * L, len(names), top_samples=16, device=device)
    specs = [LayerSpec(name=f"blocks.{i}.attn", num_heads=H, num_modes=R, snapshot=run_state.snapshot_spec(i))
             for i in range(L)]
    path = os.path.join(folder, f"ceiling-{L}-{per_sample}-{store_dtype}.h5")
    if os.path.exists(path):
        os.unlink(path)
    writer = RunWriter(path, specs, names, {}, per_sample=per_sample, store_dtype=store_dtype,
                       compression=compression, chunk_rows=batch)
    sink = RunSink(writer, [g.layers for g in run_state.groups], slice(cols[0], cols[-1] + 1), snapshot_every_s=5.0,
                   release=lambda *_: None)
    series = TrainingSeries([])
    stored = None if len(names) == len(STAT_NAMES) else torch.tensor(cols, device=device)
    scores = tuple(STAT_INDEX[s] for s in SCORES)
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(L, batch, H, R, len(STAT_NAMES), generator=g).to(device) for _ in range(4)]  # (L, B, H, R, S)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        st = pool[(n // batch) % len(pool)]
        if state != "none":
            run_state.add([st], scores, stored)
        else:
            run_state.samples += batch
        sink.put(run_state, [st], [f"s{n + j}" for j in range(batch)], None, [-1] * batch, series)
        n += batch
    sink.close(run_state, series)
    elapsed = time.perf_counter() - start
    row_bytes = L * H * R * len(names) * np.dtype(store_dtype).itemsize if per_sample else 0
    os.unlink(path)
    return n / elapsed, n * row_bytes / elapsed, writer.blocked_seconds / elapsed


def part_b(args) -> None:
    folder = tempfile.mkdtemp(prefix="qkprobe-ceiling-", dir=args.dir)
    print(f"(b) host-side ceiling in {folder}, batch {args.batch_b}, {args.seconds:.0f} s per configuration, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    states = ["cuda"] if torch.cuda.is_available() else ["none", "cpu"]
    what = {"cuda": "state on the GPU", "none": "writer alone (the host's share when the state is on a GPU)",
            "cpu": "state on the CPU"}
    disk = [raw_disk_speed(folder)]
    for state in states:
        print(f"-- {what[state]}")
        for name, shape in SHAPES.items():
            off = host_ceiling(folder, shape, args.batch_b, args.seconds, False, "float32", None, state)
            disk.append(raw_disk_speed(folder))
            rows = host_ceiling(folder, shape, args.batch_b, args.seconds, True, "float16", args.compression, state)
            disk.append(raw_disk_speed(folder))
            raw = statistics.median(disk[-3:])
            print(f"{name}: rows off {off[0]:9.0f} img/s | fp16 rows {rows[0]:8.0f} img/s = {rows[1] / 1e6:7.1f} "
                  f"MB/s of rows ({rows[1] / raw:5.1%} of the raw disk, {raw / 1e6:.0f} MB/s; writer queue full "
                  f"{rows[2]:.0%} of the time)")
    shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="both", choices=["a", "b", "both"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--batch", type=int, default=8, help="(a) batch size")
    ap.add_argument("--workers", type=int, default=None, help="(a) DataLoader workers (default: from the machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-b", type=int, default=128, help="(b) batch size")
    ap.add_argument("--seconds", type=float, default=8.0, help="(b) seconds per configuration")
    ap.add_argument("--compression", default="blosc-lz4", help="(b) compression of the fp16 rows ('none': off)")
    ap.add_argument("--dir", default=None, help="(b) folder on the disk to measure (default: the temp folder)")
    args = ap.parse_args()
    args.compression = None if args.compression == "none" else args.compression
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
