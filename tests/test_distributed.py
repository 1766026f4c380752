"""torch.distributed: shards per rank merged by rank 0, ``qkprobe merge``, ``qkprobe run`` under torchrun.

The torchrun runs use gloo on CPU with the rendezvous on 127.0.0.1 (loopback only).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import qkprobe
from qkprobe.cli.main import main
from qkprobe.core.stats import STAT_INDEX
from qkprobe.core.streaming import Aggregates, TopKSamples
from qkprobe.data import skimage_images
from qkprobe.distributed import merge_shards, shard_path, split
from qkprobe.errors import RunFileError

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
sys.path.insert(0, HELPERS)
from dist_common import BATCHES, N, make_inputs, make_model  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd=None, timeout=240):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def committed(path):
    with qkprobe.open_run(str(path)) as run:
        return len(run), run.ids, run.steps, [run.stats(i) for i in range(len(run.layer_names))]


def assert_topk_points_at_its_rows(run):
    """Every top-k slot's score is the score_pos / score_neg of the merged row its index names."""
    for layer in range(len(run.layer_names)):
        scores, index = run.snapshot(layer, "topk_scores"), run.snapshot(layer, "topk_index")
        rows = run.stats(layer)
        H, R, _, K = scores.shape
        h, r, k = np.meshgrid(np.arange(H), np.arange(R), np.arange(K), indexing="ij")
        for sign, stat in enumerate(("score_pos", "score_neg")):
            idx = index[:, :, sign, :]
            assert (idx >= 0).all() and idx.max() < len(run)
            np.testing.assert_array_equal(rows[idx, h, r, STAT_INDEX[stat]], scores[:, :, sign, :])


# ---- a real 2-rank DDP run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    out = d / "run.h5"
    r = torchrun(os.path.join(HELPERS, "dist_probe.py"), str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_ddp_merged_file_is_the_union_of_the_shards(ddp_run):
    out = ddp_run
    shards = [shard_path(str(out), r) for r in range(2)]
    parts = [committed(s) for s in shards]
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == sum(p[0] for p in parts) == N
        assert run.ids == parts[0][1] + parts[1][1]
        assert len(set(run.ids)) == N and set(run.ids) == {f"s{i}" for i in range(N)}
        np.testing.assert_array_equal(run.steps, np.concatenate([parts[0][2], parts[1][2]]))
        for layer in range(len(run.layer_names)):
            np.testing.assert_array_equal(run.stats(layer),
                                          np.concatenate([parts[0][3][layer], parts[1][3][layer]]))
        assert run.metadata["merged_from"] == ["run.rank0.h5", "run.rank1.h5"]
        assert run.metadata["merged_rows"] == [9, 6]
        stat_names = run.stat_names
    with h5py.File(out, "r") as f:   # a normal file for plain h5py: virtual stats, labels, scales
        stats = f["layers/00/stats"]
        assert stats.is_virtual and [d.label for d in stats.dims] == ["sample", "head", "mode", "statistic"]
        assert stats.dims[3][0][()].astype(str).tolist() == stat_names
        assert f.attrs["per_sample"]
        sources = {os.path.basename(v.file_name) for v in stats.virtual_sources()}
        assert sources == {"run.rank0.h5", "run.rank1.h5"}
        assert not any(os.path.isabs(v.file_name) for v in stats.virtual_sources())


def test_ddp_topk_and_aggregates_merge_exactly(ddp_run):
    with qkprobe.open_run(str(ddp_run)) as run:
        assert_topk_points_at_its_rows(run)
        for layer in range(len(run.layer_names)):
            rows = torch.from_numpy(run.stats(layer))           # (N, H, R, S)
            H, R = rows.shape[1:3]
            # a direct recomputation over all rows at once
            topk = TopKSamples(H, R, k=4)
            topk.update(rows[..., STAT_INDEX["score_pos"]], rows[..., STAT_INDEX["score_neg"]],
                        torch.arange(len(rows)))
            np.testing.assert_array_equal(run.snapshot(layer, "topk_scores"), topk.scores.numpy())
            np.testing.assert_array_equal(run.snapshot(layer, "topk_index"), topk.index.numpy())
            agg = Aggregates(rows.shape[1:])
            agg.update(rows)
            np.testing.assert_array_equal(run.snapshot(layer, "agg_count"), agg.count.numpy())
            np.testing.assert_array_equal(run.snapshot(layer, "agg_min"), agg.min.numpy())
            np.testing.assert_array_equal(run.snapshot(layer, "agg_max"), agg.max.numpy())
            np.testing.assert_allclose(run.snapshot(layer, "agg_mean"), agg.mean.numpy(),
                                       rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(run.snapshot(layer, "agg_m2"), agg.m2.numpy(), rtol=1e-9, atol=1e-9)


def test_ddp_values_match_a_single_process_probe(ddp_run, tmp_path):
    model, x = make_model(), make_inputs()
    single = tmp_path / "single.h5"
    with qkprobe.attach(model, str(single), top_samples=4) as probe, torch.no_grad():
        for batch in (list(range(0, 8)), list(range(8, N))):
            probe.set_ids([f"s{i}" for i in batch])
            model(x[batch])
    with qkprobe.open_run(str(ddp_run)) as merged, qkprobe.open_run(str(single)) as ref:
        order = [merged.ids.index(i) for i in ref.ids]
        for layer in range(len(ref.layer_names)):
            np.testing.assert_allclose(merged.stats(layer)[order], ref.stats(layer), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(merged.snapshot(layer, "topk_scores"),
                                       ref.snapshot(layer, "topk_scores"), rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(merged.snapshot(layer, "agg_count"),
                                          ref.snapshot(layer, "agg_count"))
            np.testing.assert_allclose(merged.snapshot(layer, "agg_mean"), ref.snapshot(layer, "agg_mean"),
                                       rtol=1e-4, atol=1e-5)


def test_fsdp_refresh_inside_summon_full_params(tmp_path):
    """The FSDP recipe of docs/format.md: attach before wrapping, refresh inside summon_full_params."""
    out = tmp_path / "run.h5"
    r = torchrun(os.path.join(HELPERS, "dist_fsdp.py"), str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 refresh ok" in r.stdout and "rank 1 refresh ok" in r.stdout
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 8 and len(set(run.ids)) == 8
        np.testing.assert_array_equal(run.series_steps, [-1, 0, 1])
        with qkprobe.open_run(shard_path(str(out), 1)) as shard:
            # the same weights on every rank: shard 0's series stands for all
            np.testing.assert_array_equal(run.series(0, "S"), shard.series(0, "S"))


# ---- qkprobe run under torchrun -------------------------------------------------------------

def test_qkprobe_run_under_torchrun_writes_every_image_once_and_resumes(tmp_path):
    images = tmp_path / "images"
    photos = skimage_images(str(images))
    paths = photos[:10]
    ids = [os.path.basename(p) for p in paths]      # sample ids are relative to the image root
    for extra in photos[10:]:
        os.remove(extra)
    out = tmp_path / "run.h5"
    args = ["-m", "qkprobe.cli.main", "run", "timm:test_vit", "--random-init", "--images", str(images),
            "--out", str(out), "--batch-size", "2", "--no-progress"]
    r = torchrun(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("wrote 10 images") == 1   # the summary, on rank 0 only
    with qkprobe.open_run(str(out)) as run:
        assert sorted(run.ids) == sorted(ids) and len(run.ids) == 10
        assert [run.metadata["merged_rows"][r] for r in range(2)] == [5, 5]
    assert set(committed(shard_path(str(out), 0))[1]) == set(split(sorted(ids), 0, 2))

    # a rank's shard is lost: --resume writes exactly its images again, shared by both ranks
    os.remove(shard_path(str(out), 1))
    r = torchrun(*args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with qkprobe.open_run(str(out)) as run:
        assert sorted(run.ids) == sorted(ids) and len(run.ids) == 10
        assert run.metadata["merged_rows"] == [5 + 3, 2]
        assert np.isfinite(run.stats(0)).all()


# ---- merging by hand ------------------------------------------------------------------------

def _write_shard(path, batches, **options):
    model, x = make_model(), make_inputs()
    with qkprobe.attach(model, str(path), top_samples=4, **options) as probe, torch.no_grad():
        for batch in batches:
            probe.set_ids([f"s{i}" for i in batch])
            model(x[batch])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for rank in range(2):
        _write_shard(d / f"run.rank{rank}.h5", BATCHES[rank])
    return d


def test_merge_cli_names_a_missing_shard(shard_dir, tmp_path, capsys):
    missing = str(tmp_path / "run.rank1.h5")
    code = main(["merge", str(shard_dir / "run.rank0.h5"), missing, "--out", str(tmp_path / "run.h5")])
    err = capsys.readouterr().err
    assert code == 2 and missing in err and "missing" in err and "--allow-missing" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run.h5").exists()

    code = main(["merge", str(shard_dir / "run.rank0.h5"), missing, "--out", str(tmp_path / "run.h5"),
                 "--allow-missing"])
    text = capsys.readouterr().out
    assert code == 0 and missing in text and "merged 9 rows from 1 shards" in text
    with qkprobe.open_run(str(tmp_path / "run.h5")) as run:
        assert run.ids == [f"s{i}" for i in range(9)]
        assert run.metadata["merged_missing"] == ["run.rank1.h5"]
        assert_topk_points_at_its_rows(run)


def test_merge_refuses_shards_of_different_runs_and_foreign_outputs(shard_dir, tmp_path):
    other = tmp_path / "other.rank1.h5"
    _write_shard(other, [[9, 10]], topk=3)
    with pytest.raises(RunFileError, match="options"):
        merge_shards([str(shard_dir / "run.rank0.h5"), str(other)], str(tmp_path / "m.h5"))
    plain = tmp_path / "plain.h5"
    _write_shard(plain, [[0]])
    with pytest.raises(RunFileError, match="not a merged file"):
        merge_shards([str(shard_dir / "run.rank0.h5")], str(plain))


def test_merge_of_a_killed_writer_keeps_what_it_committed(shard_dir, tmp_path, capsys):
    shutil.copy(shard_dir / "run.rank0.h5", tmp_path / "run.rank0.h5")
    killed = tmp_path / "run.rank1.h5"
    proc = subprocess.Popen([sys.executable, os.path.join(HELPERS, "dist_writer.py"), str(killed), "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(3):   # a few commits, then kill -9 mid-run
            assert proc.stdout.readline(), "the writer stopped before committing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rows = committed(killed)[0]
    assert rows >= 6
    out = tmp_path / "run.h5"
    assert main(["merge", str(tmp_path / "run.rank0.h5"), str(killed), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"short: {killed}" in text and f"its {rows} committed rows" in text
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 9 + rows
        assert run.ids[9:] == [f"s{i}" for i in range(100, 100 + rows)]
        np.testing.assert_array_equal(run.stats(1)[9:], committed(killed)[3][1])
        assert_topk_points_at_its_rows(run)
    # after `qkprobe recover` of the shard, plain HDF5 readers read the merged file too
    assert main(["recover", str(killed)]) == 0
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["layers/01/stats"][9:], committed(killed)[3][1])


def test_moved_folder_stays_readable(shard_dir, tmp_path, monkeypatch):
    folder = tmp_path / "a"
    folder.mkdir()
    for rank in range(2):
        shutil.copy(shard_dir / f"run.rank{rank}.h5", folder)
    merge_shards([str(folder / "run.rank0.h5"), str(folder / "run.rank1.h5")], str(folder / "run.h5"))
    expected = committed(folder / "run.h5")
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(str(folder), str(moved))
    monkeypatch.chdir(tmp_path)   # neither the old folder nor the new one
    got = committed(moved / "run.h5")
    assert got[1] == expected[1] and len(got[1]) == N
    for a, b in zip(got[3], expected[3]):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()


def test_run_output_checks_under_torchrun(shard_dir, tmp_path):
    from argparse import Namespace

    from qkprobe.cli.run_cmd import _check_out, _Group

    def check(out, resume, world=2):
        _check_out(Namespace(out=str(out), resume=resume), _Group(0, world, False))

    for rank in range(2):
        shutil.copy(shard_dir / f"run.rank{rank}.h5", tmp_path)
    out = tmp_path / "run.h5"
    with pytest.raises(RunFileError, match="run.rank0.h5 already exists; pass --resume"):
        check(out, resume=False)
    check(out, resume=True)
    with pytest.raises(RunFileError, match="shard of rank 1, more ranks than the 1 .*--nproc_per_node 2"):
        check(out, resume=True, world=1)
    with pytest.raises(RunFileError, match="nor any of its shards to resume"):
        check(tmp_path / "new.h5", resume=True)
    _write_shard(tmp_path / "single.h5", [[0]])
    with pytest.raises(RunFileError, match="single process; resume it without torchrun"):
        check(tmp_path / "single.h5", resume=True)
    # a merged file is resumed under torchrun only
    merge_shards([str(tmp_path / "run.rank0.h5"), str(tmp_path / "run.rank1.h5")], str(out))
    check(out, resume=True)
    with pytest.raises(RunFileError, match="merged from 2 shards; resume it under torchrun"):
        _check_out(Namespace(out=str(out), resume=True))
