"""Child process of the sink tests: writes checkable batches to a run file until stopped.

    python sink_child.py PATH SEED [--max-file-bytes N] [--min-free-bytes N] [--batches N] [--sleep S]

Prints ``start`` after its imports, ``ready`` once the file exists, then ``ack N`` (flushed) each
time the writer reports more committed rows. With ``--max-file-bytes`` the process may not grow
files past N bytes (RLIMIT_FSIZE): the writer stops when less than ``--min-free-bytes`` is left,
or (with ``--min-free-bytes 0``) writing fails with a real OS error (EFBIG). The child then prints
``error MESSAGE`` and the last ``ack``. With ``--batches`` it stops after that many batches.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sink_rows  # noqa: E402,F401  (first: it makes ``import qkprobe`` skip torch, see there)

import numpy as np  # noqa: E402

from qkprobe.errors import RunFileError  # noqa: E402
from qkprobe.sinks.hdf5_writer import RunWriter  # noqa: E402
from sink_rows import METADATA, STAT_NAMES, batch, layer_specs  # noqa: E402


def main() -> int:
    args = _parse()
    rng = np.random.default_rng(args.seed)
    if args.max_file_bytes:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_bytes, args.max_file_bytes))
    print("start", flush=True)
    writer = RunWriter(args.path, layer_specs(), STAT_NAMES, METADATA, queue_size=2, fsync_interval_s=0.5,
                       min_free_bytes=args.min_free_bytes)
    print("ready", flush=True)
    acked, rows = 0, 0
    try:
        for index in range(args.batches or sys.maxsize):
            size = int(rng.integers(1, 13))
            writer.write(**batch(rows, size, index))
            rows += size
            if writer.acknowledged != acked:
                acked = writer.acknowledged
                print(f"ack {acked}", flush=True)
            if args.sleep:
                time.sleep(args.sleep * rng.random())
        writer.close()
    except RunFileError as error:
        print(f"error {error}", flush=True)
        writer.close()
    print(f"ack {writer.acknowledged}", flush=True)
    return 0


def _parse():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("seed", type=int)
    parser.add_argument("--max-file-bytes", type=int, default=0)
    parser.add_argument("--min-free-bytes", type=int, default=None)
    parser.add_argument("--batches", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
