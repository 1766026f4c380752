"""Child process of the sink tests: follows a run file while another process writes it.

    python sink_reader.py PATH FINAL_ROWS TIMEOUT_S

Prints ``open`` once it has opened the file, then polls ``refresh()`` until FINAL_ROWS rows are
committed (or the timeout), checks every newly committed row and the snapshot at each poll, and
prints one JSON line with the counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sink_rows  # noqa: E402,F401  (first: it makes ``import qkprobe`` skip torch, see there)

import numpy as np  # noqa: E402

from qkprobe.sinks.run_file import open_run  # noqa: E402
from sink_rows import DIMS, row_values, sample_id  # noqa: E402


def main() -> int:
    path, final_rows, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.monotonic() + timeout
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = {"polls": 0, "distinct_counts": 0, "rows": 0, "decreases": 0, "bad_rows": 0, "problems": []}
    with open_run(path) as run:
        print("open", flush=True)
        seen = 0
        while time.monotonic() < deadline:
            rows = run.refresh()
            summary["polls"] += 1
            if rows < seen:
                summary["decreases"] += 1
            if rows > seen:
                summary["distinct_counts"] += 1
                check(run, seen, rows, summary)
                seen = rows
            if rows >= final_rows:
                break
            time.sleep(0.002)
        summary["rows"] = seen
    print(json.dumps(summary), flush=True)
    return 0


def check(run, start: int, stop: int, summary: dict) -> None:
    """Check rows start..stop and the commit-level invariants of the current state."""
    bad = np.zeros(stop - start, dtype=bool)
    ids = run.ids[start:stop]
    bad |= np.array([ids[k] != sample_id(start + k) for k in range(stop - start)])
    for layer in range(len(DIMS)):
        got = run.stats(layer, rows=slice(start, stop))
        bad |= np.any(got != row_values(start, stop, layer), axis=(1, 2, 3))
        count = int(run.snapshot(layer, "count")[0])
        if count < stop:
            summary["problems"].append(f"snapshot count {count} < rows {stop}")
    summary["bad_rows"] += int(bad.sum())
    steps = run.steps
    if len(run.skipped) != int(steps[-1]) + 1:
        summary["problems"].append(f"{len(run.skipped)} skipped entries for {int(steps[-1]) + 1} batches")


if __name__ == "__main__":
    sys.exit(main())
