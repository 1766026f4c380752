"""Issue 18 item 4, messages: each one says what is wrong (or what happened) and what to do.

--images FILE, a corrupt image named, the real count after --resume, a closed pipe ends quietly,
missing output folders made by every command, help on every option, the ablate progress bar's
estimate, no top-1 line for feature models.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qkprobe.cli.main import build_parser, main
from qkprobe.data import skimage_images

SPEC = "timm:test_vit"   # 6 layers, 2 heads, 160 px: CI-sized


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("msg_photos")
    paths = skimage_images(str(d / "all"))[:4]
    sub = d / "four"
    sub.mkdir()
    for p in paths:
        shutil.copy(p, sub / os.path.basename(p))
    return sub


def test_images_given_a_file_says_it_is_a_file(photos, tmp_path, capsys):
    one = sorted(photos.iterdir())[0]
    assert main(["run", SPEC, "--random-init", "--images", str(one), "--out", str(tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "--list" in err and str(photos) in err
    assert "does not exist" not in err and len(err.strip().splitlines()) == 1


def _run_args(photos, tmp_path, n, corrupt=False):
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    for p in sorted(photos.iterdir())[:n]:
        shutil.copy(p, images / p.name)
    if corrupt:
        (images / "corrupt_one.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return ["run", SPEC, "--random-init", "--images", str(images), "--out", str(tmp_path / "run.h5"),
            "--no-progress", "--batch-size", "2", "--workers", "0"]


def test_corrupt_image_is_named(photos, tmp_path, capsys):
    assert main(_run_args(photos, tmp_path, 2, corrupt=True)) == 0
    captured = capsys.readouterr()
    assert "corrupt_one.jpg" in captured.err and "skipped" in captured.err
    assert "wrote 2 images" in captured.out


def test_resume_counts_the_images_it_wrote(photos, tmp_path, capsys):
    assert main(_run_args(photos, tmp_path, 2)) == 0
    capsys.readouterr()
    args = _run_args(photos, tmp_path, 4)   # two more images, then resume: it writes those two only
    assert main(args + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 images" in printed and "2 were there already" in printed, printed


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    out = tmp_path / "b.h5"
    assert main(["bases", SPEC, "--random-init", "--out", str(out)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "qkprobe.cli.main", "inspect", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    proc.stdout.close()                 # the reader is gone before anything is written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == "", err


def test_every_command_makes_its_missing_output_folder(photos, tmp_path, capsys):
    b = tmp_path / "new" / "deeper" / "b.h5"
    assert main(["bases", SPEC, "--random-init", "--out", str(b), "--plot", str(tmp_path / "plots" / "l.png")]) == 0
    assert b.is_file() and (tmp_path / "plots" / "l.png").is_file()
    r = tmp_path / "runs" / "r.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(photos), "--out", str(r), "--no-progress",
                 "--workers", "0"]) == 0
    assert r.is_file()
    a = tmp_path / "ablations" / "a.h5"
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--modes", "L0H0M0", "--out", str(a),
                 "--no-progress"]) == 0
    assert a.is_file()
    (tmp_path / "blocker").write_text("")
    for cmd in (["bases", SPEC, "--random-init"], ["run", SPEC, "--random-init"]):
        assert main(cmd + ["--out", str(tmp_path / "blocker" / "x.h5")]) == 2
        err = capsys.readouterr().err
        assert "is a file" in err and len(err.strip().splitlines()) == 1


def test_every_option_has_help():
    import argparse
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.help is None]
    assert not missing, missing   # e.g. run --batch-size, --device had none


def test_ablate_progress_is_one_update_per_batch_on_the_average_rate(photos, tmp_path, monkeypatch):
    from tqdm import tqdm

    from qkprobe.cli import ablate_cmd
    bars = []

    class Recorder(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    made = ablate_cmd.progress_bar

    def recording(total, disable=False):
        bar = made(total, disable=disable)
        assert bar.smoothing == 0   # the rate, so the time left, averaged over the whole run
        return Recorder(total=total, disable=True, smoothing=bar.smoothing)

    monkeypatch.setattr(ablate_cmd, "progress_bar", recording)
    out = tmp_path / "a.h5"
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--modes", "L0H0M0,L1H1M0,L5H0M1",
                 "--out", str(out), "--batch-size", "2"]) == 0
    [bar] = bars
    assert bar.updates == [6, 6]   # 2 batches of 2 images × 3 modes: one update per batch


def test_feature_model_ablation_has_no_top1():
    from qkprobe.cli.ablate_cmd import effect_table
    from qkprobe.report.ablation import has_top1
    from qkprobe.sinks.ablate_file import Ablation

    def ablation(measure, top1):
        M, n = 2, 3
        return Ablation(path="a.h5", meta={"measure": measure}, layer=np.array([0, 1]), head=np.array([0, 0]),
                        mode=np.array([0, 1]), layer_name=["b0", "b1"], singular_value=np.ones(M),
                        cosine=np.array([0.1, -0.2]), attn_share=np.array([0.3, 0.1]), images=["x"] * n,
                        effect=np.full((M, n), 0.01), top1_agreement=np.full((M, n), top1),
                        attn_change=np.full((M, n), 0.02), done=np.ones((M, n), np.uint8))

    features = ablation("1-cos", np.nan)
    assert not has_top1(features)
    table = effect_table(features)
    assert "top-1" not in table and "nan" not in table.lower() and "L1H0M1" in table
    classifier = ablation("kl", 1.0)
    assert has_top1(classifier) and "top-1" in effect_table(classifier) and "1.00" in effect_table(classifier)
