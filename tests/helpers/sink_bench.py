"""Throughput of RunWriter for ViT-S-like rows (not a test; run by hand).

    python tests/helpers/sink_bench.py [--rows 4096] [--batch 64] [--dir /tmp]

One row = 12 layers x 6 heads x 64 modes x 14 statistics float32 (258 KiB). The producer
calls ``write`` as fast as it can; times include the final commit, fsync and close. Rows are
random normal float32 (about as compressible as real per-mode statistics: barely).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from qkprobe.sinks.hdf5_writer import LayerSpec, RunWriter  # noqa: E402

LAYERS, HEADS, MODES, STATS, TOPK = 12, 6, 64, 14, 16

CONFIGS = [
    ("blosc-lz4 float32 (default)", {}),
    ("blosc-lz4 float32, commit every batch", {"commit_interval_s": 0.0}),
    ("blosc-lz4 float16", {"store_dtype": "float16"}),
    ("blosc-zstd float32", {"compression": "blosc-zstd"}),
    ("no compression float32", {"compression": None}),
    ("per_sample=False (ids + snapshot only)", {"per_sample": False}),
]


def specs() -> list:
    snapshot = {"topk_scores": ((HEADS, MODES, 2, TOPK), np.float32),
                "topk_rows": ((HEADS, MODES, 2, TOPK), np.int64),
                "mean": ((HEADS, MODES, STATS), np.float64), "m2": ((HEADS, MODES, STATS), np.float64)}
    return [LayerSpec(f"blocks.{i}.attn", HEADS, MODES, snapshot=snapshot) for i in range(LAYERS)]


def run(path: Path, rows: int, batch: int, options: dict) -> dict:
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((batch, HEADS, MODES, STATS)).astype(np.float32) for _ in range(LAYERS)]
    snap = [{name: np.ones(shape, dtype) for name, (shape, dtype) in spec.snapshot.items()}
            for spec in specs()]
    per_sample = options.get("per_sample", True)
    start = time.perf_counter()
    blocked = 0.0
    with RunWriter(path, specs(), [f"s{i}" for i in range(STATS)], {"bench": True}, **options) as writer:
        for first in range(0, rows, batch):
            ids = [f"/data/imagenet/val/{r:08d}.JPEG" for r in range(first, first + batch)]
            t = time.perf_counter()
            writer.write(ids, data if per_sample else None, snapshot=snap)
            blocked += time.perf_counter() - t
    seconds = time.perf_counter() - start
    raw = rows * LAYERS * HEADS * MODES * STATS * 4
    return {"rows_per_s": rows / seconds, "raw_MB_per_s": raw / seconds / 1e6, "seconds": seconds,
            "caller_in_write_s": blocked, "file_MB": os.path.getsize(path) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for index, (name, options) in enumerate(CONFIGS):
            path = Path(tmp) / f"bench{index}.h5"
            r = run(path, args.rows, args.batch, options)
            print(f"{name:42s} {r['rows_per_s']:7.0f} rows/s  {r['raw_MB_per_s']:6.0f} MB/s raw  "
                  f"{r['seconds']:5.2f} s  file {r['file_MB']:6.0f} MB", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
