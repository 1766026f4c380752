"""Hostile inputs other than damaged run files (issue 11): resume ids, odd image folders, run files
shared by someone else given to ``report``, stray files after failures, option checks, and the
format document's plain-h5py example."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import qkprobe
from qkprobe.cli.main import main
from qkprobe.data import skimage_images

HELPERS = Path(__file__).resolve().parent / "helpers"
ROOT = Path(__file__).resolve().parent.parent
SPEC = "timm:test_vit"
sys.path.insert(0, str(HELPERS))


def cli(*args, cwd=None, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "qkprobe.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return skimage_images(str(tmp_path_factory.mktemp("sk")))


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, photos):
    """Three images (one with two $ in its name, one 16-bit greyscale PNG) and a FIFO named a.png."""
    d = tmp_path_factory.mktemp("odd") / "imgs"
    d.mkdir()
    shutil.copy(photos[0], d / "astronaut.png")
    shutil.copy(photos[1], d / "budget $5_$10.png")
    import skimage.data
    Image.fromarray(skimage.data.camera().astype(np.uint16) * 257).save(d / "grey16.png")
    os.mkfifo(d / "a.png")
    return d


@pytest.fixture(scope="module")
def odd_run(odd_folder):
    out = odd_folder.parent / "run.h5"
    r = cli("run", SPEC, "--random-init", "--images", odd_folder, "--out", out, "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    return out


# --------------------------------------------------------------------------- image folders

def test_fifo_is_skipped_and_listed_never_opened(odd_run):
    with qkprobe.open_run(str(odd_run)) as run:
        assert sorted(run.ids) == ["astronaut.png", "budget $5_$10.png", "grey16.png"]
        assert [s for s, _ in run.skipped] == ["a.png"]
        assert "FIFO" in run.skipped[0][1]


def test_16_bit_png_is_scaled_not_clipped(odd_folder):
    import skimage.data

    from qkprobe.data import ImageDataset
    x, _, ok, _ = ImageDataset([str(odd_folder / "grey16.png")], transform=None)[0]
    assert ok
    grey = (x[0].numpy() * 255).round()
    assert np.abs(grey - skimage.data.camera()).max() <= 1
    assert (grey == 255).mean() < 0.05            # convert("RGB") made 99.99 % of the pixels white


def test_report_draws_names_with_dollars_and_escapes_json(odd_run, tmp_path):
    out = tmp_path / "report"
    r = cli("report", odd_run, "--out", out, "--no-progress", "--modes", "1", "--topk", "3", timeout=300)
    assert r.returncode == 0, r.stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    data = _json(page, "report-data")["runs"][0]
    shown = {i["id"] for e in data["optimal"]["entries"] for i in e["items"]}
    assert "budget $5_$10.png" in shown and data["missing_images"] == []
    for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', page, re.S):
        assert "<" not in block


def _json(page: str, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_json_blocks_cannot_be_closed_or_commented():
    from qkprobe.report.html import json_block
    block = json_block("x", {"id": "</script><!--<script>alert(1)</script>"})
    inner = block[block.index(">") + 1: block.rindex("</script>")]
    assert "<" not in inner and json.loads(inner) == {"id": "</script><!--<script>alert(1)</script>"}


# --------------------------------------------------------------------------- resume ids

def test_resume_spelled_three_ways_from_two_folders_counts_each_image_once(tmp_path, photos):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in photos[:3]:
        shutil.copy(p, imgs)
    out = tmp_path / "run.h5"
    r = cli("run", SPEC, "--random-init", "--images", "imgs", "--out", "run.h5", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and "3 new images, 0 already" in r.stdout, r.stderr
    shutil.copy(photos[3], imgs)
    r = cli("run", SPEC, "--random-init", "--images", "./imgs", "--out", "run.h5", "--resume", "--no-progress",
            cwd=tmp_path)
    assert r.returncode == 0 and "1 new images, 3 already" in r.stdout, r.stderr
    (tmp_path / "elsewhere").mkdir()
    r = cli("run", SPEC, "--random-init", "--images", imgs, "--out", out, "--resume", "--no-progress",
            cwd=tmp_path / "elsewhere")
    assert r.returncode == 0 and "0 new images, 4 already" in r.stdout, r.stderr
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 4 and len(set(run.ids)) == 4
        assert run.metadata["image_root"] == os.path.realpath(imgs)
        counts = run.snapshot(0, "agg_count")
        assert int(counts.max()) == 4


def test_resume_matching_no_committed_id_stops(tmp_path, photos):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(photos[0], a)
    shutil.copy(photos[1], b)
    out = tmp_path / "run.h5"
    assert cli("run", SPEC, "--random-init", "--images", a, "--out", out, "--no-progress").returncode == 0
    r = cli("run", SPEC, "--random-init", "--images", b, "--out", out, "--resume", "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "None of the 1 images" in r.stderr
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 1


# --------------------------------------------------------------------------- untrusted run files in report

def _retag(src: Path, dst: Path, **attrs) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
    return dst


def test_report_never_runs_code_a_file_names(odd_run, tmp_path):
    model = tmp_path / "evil_model"
    model.mkdir()
    sentinel = tmp_path / "code_ran"
    (model / "config.json").write_text(json.dumps({"model_type": "qkevil", "architectures": ["QKEvil"],
                                                   "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                "AutoModel": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                   "from transformers import PretrainedConfig\n"
                                   "class EvilConfig(PretrainedConfig):\n    model_type = 'qkevil'\n")
    shared = _retag(odd_run, tmp_path / "shared.h5", model_spec=f"hf:{model}")
    out = tmp_path / "report"
    r = cli("report", shared, "--out", out, "--no-progress", "--modes", "1", "--topk", "1", input="y\ny\n",
            timeout=300)
    assert r.returncode == 0, r.stderr
    assert not sentinel.exists()
    data = _json((out / "index.html").read_text(encoding="utf-8"), "report-data")["runs"][0]
    assert data["optimal"]["maps"]["loaded"] is False
    assert any("could not be rebuilt" in n for n in data["optimal"]["maps"]["notes"])


def test_report_reads_images_only_under_the_image_root(tmp_path, photos):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(photos[0], secret / "x.png")
    shutil.copy(photos[1], root / "ok.png")
    os.symlink(secret / "x.png", root / "link.png")
    ids = ["ok.png", "../secret/x.png", str(secret / "x.png"), "link.png"]
    import timm
    model = timm.create_model("test_vit", pretrained=False).eval()
    out = tmp_path / "run.h5"
    import torch
    with qkprobe.attach(model, out=str(out), metadata={"model_spec": SPEC, "random_init": True, "seed": 0,
                                                       "image_root": str(root)}) as probe:
        probe.set_ids(ids)
        model(torch.randn(4, 3, 160, 160))
    from qkprobe.report.build import read_run, resolve_image
    run = read_run(out)
    assert [resolve_image(i, run.meta["image_root"]) for i in ids] == [os.path.realpath(root / "ok.png"), None,
                                                                       None, None]
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report), "--no-progress", "--no-maps", "--topk", "4",
                 "--modes", "1"]) == 0
    data = _json((report / "index.html").read_text(encoding="utf-8"), "report-data")["runs"][0]
    assert set(data["missing_images"]) >= {"../secret/x.png", str(secret / "x.png"), "link.png"}
    assert "ok.png" not in data["missing_images"]


# --------------------------------------------------------------------------- stray files

def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_at_creation_is_one_sentence_and_leaves_nothing(tmp_path, photos):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(photos[0], imgs)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qkprobe.cli.main", "run", SPEC, "--random-init", "--images",
                        str(imgs), "--out", str(tmp_path / "run.h5"), "--no-progress"], capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_file_size, env=env)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "can be written" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_stale_creating_file_of_a_dead_process_is_removed(tmp_path):
    from sink_rows import METADATA, STAT_NAMES, layer_specs

    from qkprobe.sinks.hdf5_writer import RunWriter
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".run.h5.creating-{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    with RunWriter(tmp_path / "run.h5", layer_specs(), STAT_NAMES, METADATA):
        pass
    assert sorted(os.listdir(tmp_path)) == ["run.h5"]



def _child(code: str, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env=env)


MERGE_CHILD = """
import sys, time, qkprobe.sinks.merge as d
def stall(*a, **k):
    print("ready", flush=True); time.sleep(120)
d._add_virtual_stats = stall
d.merge_shards(sys.argv[1:3], sys.argv[3])
"""


def _shards(tmp_path):
    import timm
    import torch
    model = timm.create_model("test_vit", pretrained=False).eval()
    paths = []
    for rank in range(2):
        path = tmp_path / f"run.rank{rank}.h5"
        with qkprobe.attach(model, out=str(path), metadata={"model_spec": SPEC}) as probe:
            probe.set_ids([f"r{rank}a", f"r{rank}b"])
            model(torch.randn(2, 3, 160, 160))
        paths.append(path)
    return paths


def test_kill_9_during_merge_leaves_no_temporary_after_the_next_merge(tmp_path):
    shards = _shards(tmp_path)
    out = tmp_path / "run.h5"
    child = _child(MERGE_CHILD, *shards, out)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [n for n in os.listdir(tmp_path) if ".merging-" in n]
    assert left and not out.exists()                 # the kill landed mid-merge
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 0
    assert not [n for n in os.listdir(tmp_path) if ".merging-" in n]
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 4


REPORT_CHILD = """
import sys, time, qkprobe.report.build as b
save = b._Ctx.save
def slow(self, fig, name):
    rel = save(self, fig, name)
    if len(self.files) == 3:
        print("ready", flush=True); time.sleep(120)
    return rel
b._Ctx.save = slow
b.build_report([sys.argv[1]], sys.argv[2], maps=False, progress=False)
"""


def test_kill_9_during_report_leaves_the_old_report_whole(odd_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(odd_run), "--out", str(out), "--no-progress", "--no-maps"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    child = _child(REPORT_CHILD, odd_run, out)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [n for n in os.listdir(tmp_path) if ".report-" in n]       # killed while building
    assert main(["report", str(odd_run), "--out", str(out), "--no-progress", "--no-maps"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_report_refuses_an_index_html_it_did_not_write(odd_run, tmp_path, capsys):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<html>my own page</html>")
    (out / "notes.txt").write_text("keep")
    assert main(["report", str(odd_run), "--out", str(out), "--no-progress", "--no-maps"]) == 2
    assert "not written by qkprobe" in capsys.readouterr().err
    assert (out / "index.html").read_text() == "<html>my own page</html>"
    assert main(["report", str(odd_run), "--out", str(out), "--no-progress", "--no-maps", "--force"]) == 0
    assert "qkprobe report" in (out / "index.html").read_text() and (out / "notes.txt").read_text() == "keep"
    assert main(["report", str(odd_run), "--out", str(out), "--no-progress", "--no-maps"]) == 0   # ours now


def test_bases_out_folder_leaves_no_partial(tmp_path):
    (tmp_path / "dir").mkdir()
    r = cli("bases", SPEC, "--random-init", "--out", tmp_path / "dir")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "is a folder" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["dir"] and not os.listdir(tmp_path / "dir")


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("extra, words", [
    (["--device", "cuda:99"], "GPU"),
    (["--device", "banana"], "not a device"),
    (["--topk-mean", "0"], "--topk-mean must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--topk", "0"], "--topk must be at least 1"),
])
def test_run_options_are_checked_before_a_file_exists(tmp_path, capsys, extra, words):
    out = tmp_path / "run.h5"
    assert main(["run", SPEC, "--random-init", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and os.listdir(tmp_path) == []


def test_out_folder_is_named_honestly_with_and_without_resume(tmp_path, capsys):
    for extra in ([], ["--resume"]):
        assert main(["run", SPEC, "--random-init", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "is a folder" in err and "already exists" not in err and "does not exist" not in err


def test_any_other_exception_is_one_line_naming_debug(monkeypatch, capsys, tmp_path):
    from qkprobe.cli import run_cmd

    def boom(args):
        raise ZeroDivisionError("division by zero deep inside")
    monkeypatch.setattr(run_cmd, "inspect", boom)
    assert main(["inspect", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--debug" in err[0] and "ZeroDivisionError" in err[0]


# --------------------------------------------------------------------------- docs/format.md

def test_reading_without_qkprobe_example_runs(odd_run, tmp_path):
    text = (ROOT / "docs" / "format.md").read_text(encoding="utf-8")
    section = text.split("## Reading without qkprobe", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(odd_run, tmp_path / "run.h5")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope = {}
        exec(compile(code, "format.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    with qkprobe.open_run(str(odd_run)) as run:
        assert scope["ids"] == run.ids
        np.testing.assert_array_equal(scope["mean"], run.stats(3, "q_mean"))
        np.testing.assert_array_equal(scope["topk"], run.snapshot(3, "topk_scores"))
