"""``qkprobe run``: skimage default set, corrupt images, resume, kill -9 at random moments."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import qkprobe
from qkprobe.cli.main import main
from qkprobe.data import skimage_images
from qkprobe.errors import RunFileError

SPEC = "timm:test_vit"  # 6 layers, 2 heads, 160 px: CI-sized
KILLS = int(os.environ.get("QKPROBE_KILL_REPEATS", "20"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = skimage_images(str(d / "sk"))
    for i in range(3):  # more images, so a run lasts long enough to be killed mid-way
        for p in paths:
            shutil.copy(p, d / f"copy{i}_{os.path.basename(p)}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return d


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qkprobe.cli.main", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def all_images(d):
    """The sample ids of a folder's images: paths relative to the folder (its image root)."""
    from qkprobe.data import list_images
    return [os.path.relpath(p, d) for p in list_images(images_dir=str(d))]


def test_run_default_images_and_inspect(tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(["run", SPEC, "--random-init", "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    run = qkprobe.open_run(str(out))
    n = len(skimage_images(os.path.join(os.path.expanduser("~"), ".cache", "qkprobe", "skimage")))
    assert len(run) == n >= 10 and all(i.endswith(".png") for i in run.ids)
    assert run.metadata["model_spec"] == SPEC and run.metadata["options"]["top_samples"] == 16
    assert run.stats(0, "score_pos").shape == (n, 2, 32)
    run.close()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{n} committed samples" in text and "blocks.5.attn" in text


def test_corrupt_image_is_skipped_listed_and_run_continues(tmp_path, image_dir):
    out = tmp_path / "run.h5"
    r = cli("run", SPEC, "--random-init", "--images", str(image_dir), "--out", str(out), "--batch-size", "8",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    run = qkprobe.open_run(str(out))
    paths = all_images(image_dir)
    assert sorted(run.ids) == sorted(p for p in paths if not p.endswith("broken.png"))
    assert [s for s, _ in run.skipped] == ["broken.png"]
    run.close()


def test_output_errors_are_one_sentence(tmp_path):
    out = tmp_path / "run.h5"
    out.write_bytes(b"")
    r = cli("run", SPEC, "--random-init", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr
    r = cli("run", SPEC, "--random-init", "--out", str(out / "sub" / "run.h5"))   # a missing folder is made, a file
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr  # in the way is said


def test_resume_refuses_other_options_or_model(tmp_path, image_dir):
    out = tmp_path / "run.h5"
    assert cli("run", SPEC, "--random-init", "--images", str(image_dir), "--out", str(out),
               "--no-progress").returncode == 0
    r = cli("run", SPEC, "--random-init", "--images", str(image_dir), "--out", str(out), "--resume",
            "--topk", "3")
    assert r.returncode == 2 and "options differ" in r.stderr and "top_samples" in r.stderr
    r = cli("run", SPEC, "--random-init", "--seed", "1", "--images", str(image_dir), "--out", str(out), "--resume")
    assert r.returncode == 2 and "weights_hash" in r.stderr


def _check_file(out, last_ack, expected_ids):
    """Opens (after recover if needed), counter ≥ last acknowledged commit, rows below it valid."""
    try:
        run = qkprobe.open_run(str(out))
    except RunFileError as e:
        assert "recover" in str(e)
        r = cli("recover", str(out))
        assert r.returncode == 0, r.stderr
        run = qkprobe.open_run(str(out))
    with run:
        n = len(run)
        assert n >= last_ack
        assert len(set(run.ids)) == n and set(run.ids) <= expected_ids
        rows = run.stats(0)
        assert rows.shape[0] == n and np.isfinite(rows).all()
        return n


def test_kill_at_random_moments_then_resume(tmp_path, image_dir):
    """kill -9 of a run at random moments; every file opens, keeps its acknowledged rows, and
    --resume ends with exactly the full image set, no duplicates."""
    expected = {p for p in all_images(image_dir) if not p.endswith("broken.png")}
    rng = random.Random(1234)
    args = ["run", SPEC, "--random-init", "--images", str(image_dir), "--batch-size", "2", "--no-progress",
            "--verbose"]
    counts = []
    for rep in range(KILLS):
        out = tmp_path / f"k{rep}.h5"
        err = open(tmp_path / f"k{rep}.err", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "qkprobe.cli.main", *args, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        # wait for the first commit of a few so the kill lands mid-run, then a random moment more
        acks = []
        target = rng.randint(1, 12)
        while len(acks) < target:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("committed "):
                acks.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # it must still be running: a crash is a failure, not a kill
            err.seek(0)
            assert proc.returncode == 0, err.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err.close()
        last_ack = max(acks, default=0)
        if not out.exists():
            assert last_ack == 0
            continue
        counts.append(_check_file(out, last_ack, expected))
        if rep % 5 == 0:  # resume some of them to the end (each resume is a full process start)
            r = cli(*args[:-1], "--out", str(out), "--resume")
            assert r.returncode == 0, r.stderr
            with qkprobe.open_run(str(out)) as run:
                assert sorted(run.ids) == sorted(expected)
                assert len(run) == len(expected)
                assert [s for s, _ in run.skipped].count("broken.png") == 1
    assert len(counts) >= KILLS // 2 and len(set(counts)) > 1  # kills landed at different moments
