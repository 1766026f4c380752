"""Run files under crashes, real write errors and live readers in other processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import pytest

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

from qkprobe.errors import RunFileError  # noqa: E402
from qkprobe.sinks import schema  # noqa: E402
from qkprobe.sinks.hdf5_writer import RunWriter  # noqa: E402
from qkprobe.sinks.recover import read_superblock, recover  # noqa: E402
from qkprobe.sinks.run_file import open_run  # noqa: E402
from sink_rows import METADATA, STAT_NAMES, batch, layer_specs, problems, snapshot_matches_rows  # noqa: E402

KILLS = 40


class Child:
    """A ``sink_child.py`` process whose stdout lines are collected by a thread."""

    def __init__(self, path: Path, seed: int, *args: str):
        command = [sys.executable, str(HELPERS / "sink_child.py"), str(path), str(seed), *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.started = threading.Event()
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith("start"):
                self.started.set()
            if line.startswith("ready"):
                self.ready.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()

    def finish(self, timeout: float) -> None:
        self.proc.wait(timeout=timeout)
        self._reader.join()

    @property
    def last_ack(self) -> int:
        acks = [int(line.split()[1]) for line in self.lines if line.startswith("ack ")]
        return max(acks, default=0)


def _open_checked(path: Path) -> tuple[int, bool]:
    """Open a killed writer's file (with recover only if needed); check it; return (rows, needed recover)."""
    needed = False
    try:
        run = open_run(path)
    except RunFileError as error:
        assert "qkprobe recover" in str(error)
        recover(path)
        run, needed = open_run(path), True
    with run:
        assert problems(run) == [], problems(run)
        assert snapshot_matches_rows(run), "the snapshot does not belong to the committed rows"
        return len(run), needed


def _kill_and_check(tmp_path: Path, rep: int) -> dict:
    path = tmp_path / f"run{rep}.h5"
    rng = random.Random(rep)
    child = Child(path, rep, "--sleep", "0.002")
    if rep % 4 == 0:
        assert child.started.wait(30)
        time.sleep(rng.uniform(0.0, 0.05))       # before, during or just after creating the file
    else:
        assert child.ready.wait(30)
        time.sleep(rng.uniform(0.0, 0.4))
    child.kill()
    acked = child.last_ack
    if not path.exists():                        # killed while creating: no half-made run file
        assert acked == 0
        return {"file": False, "acked": 0}
    rows, needed_recover = _open_checked(path)
    assert rows >= acked, f"rep {rep}: {rows} committed rows < {acked} acknowledged"
    if rep % 2:
        # Resume straight away: the writer recovers the file itself and continues after the counter.
        with RunWriter(path, layer_specs(), STAT_NAMES, METADATA, resume=True) as writer:
            assert len(writer.existing_ids()) == rows
            with open_run(path) as run:
                next_batch = int(run.steps[-1]) + 1 if rows else 0
            writer.write(**batch(rows, 3, next_batch))
        rows += 3
    assert recover(path) == rows
    assert read_superblock(path).flags == 0
    with h5py.File(path, "r") as f:              # a plain (non-SWMR) reader opens it now
        assert f[schema.SAMPLE_STEP].shape == (rows,)
        assert f["layers/01/stats"].shape[0] == rows
        assert f[schema.SAMPLE_ID][schema.STRING_END].shape == (rows,)
    with open_run(path) as run:
        assert len(run) == rows and problems(run) == [] and snapshot_matches_rows(run)
    return {"file": True, "rows": rows, "acked": acked, "needed_recover": needed_recover}


def test_kill_9_at_random_moments_keeps_every_acknowledged_row(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda rep: _kill_and_check(tmp_path, rep), range(KILLS)))
    print("kill -9 results:", results)
    # Most kills must land while rows are being written, or the test checks nothing.
    assert sum(r["acked"] > 0 for r in results) >= KILLS // 2, results


def test_disk_running_full_stops_cleanly(tmp_path):
    """RLIMIT_FSIZE acts as a 2 MB disk: the writer stops before it fails and closes the file.

    The reserve (1 MB) must exceed what one commit can allocate (new chunks of every growing
    dataset, ~0.4 MB here), or HDF5 hits the limit first.
    """
    path = tmp_path / "run.h5"
    child = Child(path, 7, "--max-file-bytes", str(2_000_000), "--min-free-bytes", str(1_000_000))
    child.finish(timeout=60)
    errors = [line for line in child.lines if line.startswith("error ")]
    assert child.proc.returncode == 0 and len(errors) == 1, child.lines
    assert "stopped because only" in errors[0] and "the file is valid up to row" in errors[0]
    acked = child.last_ack
    assert acked > 0 and f"valid up to row {acked}:" in errors[0]
    assert read_superblock(path).flags == 0          # closed cleanly
    rows, needed_recover = _open_checked(path)
    assert rows == acked and not needed_recover
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA, resume=True) as writer:
        assert len(writer.existing_ids()) == rows


def test_real_write_error_from_the_os_keeps_committed_rows(tmp_path):
    """With the free-space check off, write(2) fails with EFBIG inside HDF5.

    HDF5 2.0 may then crash the child while it exits (it cannot close a file it cannot write),
    so only the message and the file are checked, not the exit code.
    """
    path = tmp_path / "run.h5"
    # paced, so the writer keeps up and commits batch by batch before the limit: unpaced on a
    # loaded machine it may queue every batch up to the limit without a commit (it then commits
    # every commit_interval_s), and there are no committed rows to keep
    child = Child(path, 7, "--max-file-bytes", str(1_000_000), "--min-free-bytes", "0", "--sleep", "0.01")
    child.finish(timeout=60)
    errors = [line for line in child.lines if line.startswith("error ")]
    assert len(errors) == 1, child.lines
    assert "file too large" in errors[0].lower() and "the file is valid up to row" in errors[0]
    acked = child.last_ack
    assert acked > 0
    rows, _ = _open_checked(path)
    assert rows >= acked
    # The file may be shorter than HDF5 recorded (its last writes failed); resume recovers it.
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA, resume=True) as writer:
        assert len(writer.existing_ids()) == rows
    assert read_superblock(path).flags == 0
    with h5py.File(path, "r") as f:
        assert f[schema.SAMPLE_STEP].shape == (rows,)
    with open_run(path) as run:
        assert len(run) == rows and problems(run) == []


def test_live_reader_in_another_process(tmp_path):
    path = tmp_path / "run.h5"
    sizes = [1 + (7 * i) % 12 for i in range(300)]
    total = sum(sizes)
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA) as writer:
        command = [sys.executable, str(HELPERS / "sink_reader.py"), str(path), str(total), "40"]
        reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "open"     # the reader follows from the first row
        row = 0
        for index, size in enumerate(sizes):
            writer.write(**batch(row, size, index))
            row += size
            time.sleep(0.004)
    out, _ = reader.communicate(timeout=60)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rows"] == total
    assert summary["decreases"] == 0 and summary["bad_rows"] == 0 and summary["problems"] == []
    assert summary["distinct_counts"] >= 20, summary      # it really read while the file grew


def test_recover_refuses_while_the_writer_runs(tmp_path):
    path = tmp_path / "run.h5"
    child = Child(path, 3, "--sleep", "0.01")
    try:
        assert child.ready.wait(30)
        with pytest.raises(RunFileError, match="may still be open in writer process"):
            recover(path)
        with pytest.raises(RunFileError, match="may still be open in writer process"):
            RunWriter(path, layer_specs(), STAT_NAMES, METADATA, resume=True)
    finally:
        child.kill()
    rows, _ = _open_checked(path)
    assert recover(path) == rows


def test_file_left_open_by_a_non_swmr_writer_needs_recover(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA) as writer:
        writer.write(**batch(0, 4, 0))
    code = ("import h5py, os, sys; f = h5py.File(sys.argv[1], 'r+', libver=('v110', 'v110')); "
            "f.attrs['touched'] = 1; f.flush(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert read_superblock(path).flags & 1
    with pytest.raises(RunFileError, match=f"run `qkprobe recover {path}`"):
        open_run(path)
    assert recover(path) == 4
    with open_run(path) as run:
        assert len(run) == 4 and problems(run) == []


def test_recover_on_a_clean_file_changes_nothing(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA) as writer:
        writer.write(**batch(0, 5, 0))
    before = os.path.getsize(path)
    assert recover(path) == 5
    assert os.path.getsize(path) <= before
    with open_run(path) as run:
        assert problems(run) == [] and len(run) == 5
