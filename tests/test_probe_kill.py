"""The crash promise with time-based snapshots: kill -9 of a recording probe at random moments.

A killed run loses at most the batches after its last commit; the file opens; resuming it ends
with exactly the full sample set, and top-k and aggregates equal to an uninterrupted run (the
rows committed after the last snapshot are replayed into the state on resume)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

import qkprobe  # noqa: E402
from qkprobe.errors import RunFileError  # noqa: E402
from qkprobe.sinks.recover import recover  # noqa: E402
import probe_kill as pk  # noqa: E402

KILLS = int(os.environ.get("QKPROBE_KILL_REPEATS", "24"))


def snapshots(path, layers):
    with qkprobe.open_run(str(path)) as run:
        return sorted(run.ids), [{k: run.snapshot(i, k) for k in run.snapshot_names(i)} for i in range(layers)]


def test_kill_9_between_snapshots_then_resume_equals_an_uninterrupted_run(tmp_path):
    model, batches = pk.make_model(), pk.make_batches()
    layers = len(model.blocks)
    pk.record(model, batches, tmp_path / "ref.h5")
    ref_ids, ref = snapshots(tmp_path / "ref.h5", layers)
    assert len(ref_ids) == pk.BATCHES * pk.BATCH

    killed = tmp_path / "killed"
    killed.mkdir()
    r = subprocess.run([sys.executable, str(HELPERS / "probe_kill.py"), str(killed), str(KILLS), "7"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    acked = {int(rep): int(n) for _, rep, n in (line.split() for line in r.stdout.split("\n") if line)}
    assert len(acked) == KILLS
    lagging, between, counts = 0, 0, []
    for rep, ack in acked.items():
        path = killed / f"k{rep}.h5"
        if not path.exists():
            assert ack == 0
            continue
        try:
            run = qkprobe.open_run(str(path))
        except RunFileError:
            recover(str(path))
            run = qkprobe.open_run(str(path))
        with run:  # at most the batches after the last commit are lost, and they are whole batches
            n = len(run)
            assert n >= ack and n % pk.BATCH == 0 and run.ids == [f"img{j}" for j in range(n)]
            covered = int(run.snapshot(0, "snapshot_rows"))
            assert covered <= n
            lagging += covered < n
            between += 0 < covered < n
        counts.append(n)
        pk.record(model, batches, path, resume=True)
        ids, got = snapshots(path, layers)
        assert ids == ref_ids  # exactly the full set, no duplicates
        for mine, theirs in zip(got, ref):
            assert int(mine["snapshot_rows"]) == len(ref_ids)
            for name in ("topk_scores", "topk_index", "agg_count", "agg_min", "agg_max", "agg_nonfinite",
                         "nonfinite_values"):
                np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"{name} after kill {rep}")
            for name in ("agg_mean", "agg_m2"):  # the replay groups rows otherwise: float64 rounding
                np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-10, atol=1e-12)
    assert len(set(counts)) > 3  # the kills landed at different moments
    assert lagging >= 3 and between >= 1  # and often after or between snapshots: rows were replayed


def test_snapshot_is_written_on_its_interval_and_at_close_not_every_batch(tmp_path):
    model, batches = pk.make_model(), pk.make_batches()
    for every, mid in ((3600.0, 0), (0.0, 3 * pk.BATCH)):
        path = tmp_path / f"every{every}.h5"
        probe = qkprobe.attach(model, str(path), top_samples=pk.TOP, snapshot_every_s=every)
        for ids, x in batches[:3]:
            probe.set_ids(ids)
            model(x)
        probe.writer.commit(wait=True)
        with qkprobe.open_run(str(path)) as run:  # a live reader
            assert len(run) == 3 * pk.BATCH
            assert int(run.snapshot(0, "snapshot_rows")) == mid
        probe.close()
        with qkprobe.open_run(str(path)) as run:
            assert int(run.snapshot(0, "snapshot_rows")) == 3 * pk.BATCH
            assert (run.snapshot(0, "topk_index") >= 0).all()


def test_file_from_before_snapshot_rows_resumes_with_a_snapshot_every_batch(tmp_path, monkeypatch):
    import qkprobe.capture.probe as probe_module
    model, batches = pk.make_model(), pk.make_batches()
    path = tmp_path / "old.h5"
    with monkeypatch.context() as m:  # as the probe made files before snapshot_rows
        m.setattr(probe_module, "stores_snapshot_rows", lambda path, resume: False)
        pk.record(model, batches[:3], path)
    with qkprobe.open_run(str(path)) as run:
        assert "snapshot_rows" not in run.snapshot_names(0)
    pk.record(model, batches, path, resume=True)
    ids, got = snapshots(path, len(model.blocks))
    pk.record(model, batches, tmp_path / "ref.h5")
    ref_ids, ref = snapshots(tmp_path / "ref.h5", len(model.blocks))
    assert ids == ref_ids and "snapshot_rows" not in got[0]
    np.testing.assert_array_equal(got[1]["topk_index"], ref[1]["topk_index"])
