"""Deterministic, checkable run-file content for the sink tests (also used by child processes).

Every value is a function of its row (or batch) number, so a reader can tell a correct row from
a stale, shifted or half-written one:

- row r has id ``img/ü{r:06d}.png`` (non-ASCII on purpose), stats ``row_values(r, layer)``;
- each batch b writes its rows with step b and one skipped entry ``bad/{b}``;
- the snapshot passed with a batch holds the number of rows written so far (``count`` (1,)
  and every element of ``topk`` (H, R, 2, K)).

A committed file is consistent when rows, skipped entries and snapshot agree on the same set of
whole batches (see ``problems``).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

if "qkprobe" not in sys.modules:
    # Child processes start many times per test run: load qkprobe.sinks without the package
    # __init__, which imports torch (~1.5 s per process); the sinks need only numpy and h5py.
    _package = types.ModuleType("qkprobe")
    _package.__path__ = [str(Path(__file__).resolve().parents[2] / "qkprobe")]
    sys.modules["qkprobe"] = _package

from qkprobe.sinks.hdf5_writer import LayerSpec  # noqa: E402

DIMS = [(2, 4), (3, 16)]          # (heads, modes) per layer
STAT_NAMES = ["mean", "std", "max"]
TOPK = 2
METADATA = {"model": "test-vit", "options": {"per_sample": True, "k": TOPK}, "weights_sha256": "abc123"}


def layer_specs(dims=DIMS) -> list:
    specs = []
    for i, (heads, modes) in enumerate(dims):
        specs.append(LayerSpec(
            name=f"blocks.{i}.attn", num_heads=heads, num_modes=modes,
            snapshot={"count": ((1,), np.int64), "topk": ((heads, modes, 2, TOPK), np.float32)},
            bases={"S": np.arange(heads * modes, dtype=np.float64).reshape(heads, modes) + i,
                   "U": np.full((heads, 5, modes), float(i), dtype=np.float32)},
            attrs={"adapter": "timm", "qkv_layout": [3, heads, modes]}))
    return specs


def sample_id(row: int) -> str:
    return f"img/ü{row:06d}.png"


def row_values(start: int, stop: int, layer: int, dims=DIMS, num_stats: int = len(STAT_NAMES)) -> np.ndarray:
    """(stop - start, H, R, S) float32, exact in float16 too (integers below 2048)."""
    heads, modes = dims[layer]
    size = heads * modes * num_stats
    rows = np.arange(start, stop, dtype=np.int64)[:, None]
    values = (rows * 131 + layer * 17 + np.arange(size)[None, :]) % 2039
    return values.astype(np.float32).reshape(stop - start, heads, modes, num_stats)


def batch(start: int, size: int, batch_index: int, dims=DIMS) -> dict:
    """Keyword arguments of ``RunWriter.write`` for rows start..start+size of batch ``batch_index``."""
    total = start + size
    return dict(
        ids=[sample_id(r) for r in range(start, total)],
        rows=[row_values(start, total, i, dims) for i in range(len(dims))],
        steps=[batch_index] * size,
        snapshot=[{"count": np.array([total]), "topk": np.full((h, m, 2, TOPK), total, np.float32)}
                  for h, m in dims],
        skipped=[(f"bad/{batch_index}", f"unreadable {batch_index}")],
    )


def problems(run, dims=DIMS) -> list:
    """What is wrong with an open RunFile (empty list when every committed row checks out)."""
    found = []
    n = len(run)
    if run.ids != [sample_id(r) for r in range(n)]:
        found.append("ids differ")
    steps = run.steps
    batches = int(steps[-1]) + 1 if n else 0
    if n and (steps[0] != 0 or np.any(np.diff(steps) < 0) or np.any(np.diff(steps) > 1)):
        found.append(f"steps are not consecutive batches: {steps}")
    for i in range(len(dims)):
        if not np.array_equal(run.stats(i), row_values(0, n, i, dims)):
            found.append(f"layer {i}: stats differ")
        if int(run.snapshot(i, "count")[0]) < n:
            found.append(f"layer {i}: snapshot count {run.snapshot(i, 'count')[0]} < rows {n}")
        topk = run.snapshot(i, "topk")
        if not np.all(topk == topk.flat[0]):
            found.append(f"layer {i}: torn topk snapshot")
    skipped = run.skipped
    if skipped != [(f"bad/{b}", f"unreadable {b}") for b in range(len(skipped))]:
        found.append(f"skipped entries out of order: {skipped[:3]}...")
    if len(skipped) != batches:
        found.append(f"{len(skipped)} skipped entries for {batches} committed batches")
    return found


def snapshot_matches_rows(run, dims=DIMS) -> bool:
    """True when every layer's snapshot was taken after exactly the committed rows."""
    return all(int(run.snapshot(i, "count")[0]) == len(run) for i in range(len(dims)))
