"""The crash promise under many kill -9 at uniformly random moments of a run's whole life.

A fork server (this file run as a script) loads torch, a tiny ViT and qkprobe once, records one
uninterrupted reference run and measures its lifetime (fork to exit: file creation, batches,
snapshots, commits, close). Then, KILLS times, it forks a child that records the same run into a
new file through the probe (``qkprobe.attach``: the writer path of ``qkprobe run``), SIGKILLs it
after a delay drawn uniformly over that lifetime, and

1. opens the file (``open_run``); when that asks for ``qkprobe recover``, runs ``recover`` and
   opens it again; anything else is a broken promise;
2. resumes it to completion in another forked child (``attach(..., resume=True)``);
3. compares the result with the reference: exactly the same sample ids, no duplicates, top-k
   (scores and sample indices), counts, minima, maxima and non-finite counters equal, means and
   M2 equal up to float64 rounding.

It prints one line per kill, ``kill REP OUTCOME ROWS PROBLEM``: OUTCOME is ``opens``,
``recovered``, ``absent`` (killed before the file got its name) or ``broken``; PROBLEM is ``-``
or what went wrong. ``QKPROBE_STRESS_KILLS`` sets the number of kills (default 200).

    python tests/test_kill_stress.py FOLDER KILLS SEED
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

HELPERS = Path(__file__).resolve().parent / "helpers"
KILLS = int(os.environ.get("QKPROBE_STRESS_KILLS", "200"))
BATCHES = 8
SNAPSHOT_S = 0.02   # several snapshots per run, so kills land between them and inside them
EXACT = ("topk_scores", "topk_index", "agg_count", "agg_min", "agg_max", "agg_nonfinite", "nonfinite_values")
ROUNDED = ("agg_mean", "agg_m2")   # a resume replays rows in other groups: float64 rounding


def test_kill_9_at_uniformly_random_moments_then_recover_and_resume(tmp_path):
    r = subprocess.run([sys.executable, __file__, str(tmp_path), str(KILLS), "11"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    kills = [line.split(maxsplit=4)[1:] for line in r.stdout.splitlines() if line.startswith("kill ")]
    assert len(kills) == KILLS, r.stdout[-3000:]
    broken = [k for k in kills if k[1] == "broken" or k[3] != "-"]
    outcomes = Counter(k[1] for k in kills)
    print(f"{KILLS} kills: {dict(outcomes)}")
    assert not broken, "\n".join(" ".join(k) for k in broken[:10])
    rows = Counter(int(k[2]) for k in kills if k[1] != "absent")
    # the kills landed all over the run: before the file existed, at the start, mid-way, at the end
    assert outcomes["absent"] >= 1 and rows[0] >= 1 and rows[BATCHES * 2] >= 1 and len(rows) >= BATCHES // 2


# ------------------------------------------------------------------------------- the fork server

def _serve(folder: str, kills: int, seed: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HELPERS))
    import torch

    import probe_kill as pk
    torch.set_num_threads(1)
    model, batches = pk.make_model(), pk.make_batches()[:BATCHES]
    _record(model, batches, os.path.join(folder, "warm.h5"))   # imports and kernels: before the forks
    ref = os.path.join(folder, "ref.h5")
    start = time.perf_counter()
    _wait(_fork(lambda: _record(model, batches, ref)), "the reference run")
    lifetime = time.perf_counter() - start
    expected = _contents(ref)
    print(f"lifetime {lifetime:.3f} s", flush=True)
    rng = random.Random(seed)
    for rep in range(kills):
        path = os.path.join(folder, f"k{rep}.h5")
        pid = _fork(lambda: _record(model, batches, path))
        time.sleep(rng.uniform(0.0, lifetime))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome, rows, problem = _after_kill(path)
        if outcome != "broken":
            problem = _resume_and_compare(model, batches, path, expected)
        print(f"kill {rep} {outcome} {rows} {problem}", flush=True)
        for name in (path, path + ".err"):
            if problem == "-" and os.path.exists(name):
                os.unlink(name)


def _record(model, batches, path: str, resume: bool = False) -> None:
    """Record the batches not yet in ``path`` (as ``probe_kill.record``, with faster snapshots)."""
    import torch

    import probe_kill as pk
    import qkprobe
    probe = qkprobe.attach(model, path, top_samples=pk.TOP, snapshot_every_s=SNAPSHOT_S, resume=resume)
    done = set(probe.writer.existing_ids())
    with torch.no_grad():
        for ids, x in batches:
            if ids[0] in done:
                if not all(i in done for i in ids):
                    raise AssertionError("a batch was committed in part")
                continue
            probe.set_ids(ids)
            model(x)
    probe.close()


def _fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child: its exit status says whether ``work`` finished
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, what: str) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{what} failed (see its traceback above)")


def _after_kill(path: str) -> tuple:
    """Open the killed run's file, recovering it when the reader asks for that."""
    import qkprobe
    from qkprobe.errors import RunFileError
    from qkprobe.sinks.recover import recover

    if not os.path.exists(path):
        return "absent", 0, "-"
    outcome = "opens"
    try:
        run = qkprobe.open_run(path)
    except RunFileError as exc:
        if "recover" not in str(exc):
            return "broken", -1, _one_line(exc)
        outcome = "recovered"
        try:
            recover(path)
            run = qkprobe.open_run(path)
        except RunFileError as again:
            return "broken", -1, _one_line(again)
    with run:
        return outcome, len(run), "-"


def _resume_and_compare(model, batches, path: str, expected: tuple) -> str:
    pid = _fork(lambda: _record(model, batches, path, resume=True))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "the resume failed"
    import numpy as np
    ids, snapshots = _contents(path)
    want_ids, want = expected
    if ids != want_ids:
        return f"ids differ: {len(ids)} ids, {len(set(ids))} distinct, {len(want_ids)} expected"
    for layer, (mine, theirs) in enumerate(zip(snapshots, want)):
        if int(mine["snapshot_rows"]) != len(want_ids):
            return f"layer {layer}: the snapshot covers {int(mine['snapshot_rows'])} rows"
        for name in EXACT:
            if not np.array_equal(mine[name], theirs[name]):
                return f"layer {layer}: {name} differs"
        for name in ROUNDED:
            if not np.allclose(mine[name], theirs[name], rtol=1e-10, atol=1e-12):
                return f"layer {layer}: {name} differs beyond rounding"
    return "-"


def _contents(path: str) -> tuple:
    import qkprobe
    with qkprobe.open_run(path) as run:
        ids = sorted(run.ids)
        return ids, [{k: run.snapshot(i, k) for k in run.snapshot_names(i)} for i in range(len(run.layer_names))]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
