"""``qkprobe bases``: file content, table, plot, and one-sentence errors with exit code 2."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import qkprobe
from qkprobe.cli.main import main
from qkprobe.models import load_model
from qkprobe.sinks.bases_file import read_bases

SPEC = "timm:vit_tiny_patch16_224"


def test_bases_command_writes_modes_metadata_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.h5", tmp_path / "layers.png"
    assert main(["bases", SPEC, "--random-init", "--seed", "3", "--out", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    model, _ = load_model(SPEC, pretrained=False, seed=3)
    ref = qkprobe.compute_bases(model)
    layers = read_bases(str(out))
    assert len(layers) == len(ref) == 12
    for got, lb in zip(layers, ref):
        assert got["name"] == lb.name
        np.testing.assert_allclose(got["S"], lb.S.numpy(), rtol=1e-12)
        np.testing.assert_allclose(got["cosine"], lb.cosine.numpy(), atol=1e-12)
        assert got["U"].shape == (3, 192, 64) and got["prefix_tokens"] == 1 and got["extras"] == []
    with h5py.File(out) as f:
        assert f.attrs["model_spec"] == SPEC and len(f.attrs["weights_hash"]) >= 16
        assert json.loads(f.attrs["versions"])["qkprobe"] == qkprobe.__version__
        assert json.loads(f.attrs["options"]) == {"fold_ln": False}
    # the table shows the paper's two layer summaries
    first = ref[0].layer_summary()
    assert f"{first['mean_cosine']:.4f}" in printed and f"{first['weighted_cosine']:.4f}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qkprobe.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["bases", "timm:not_a_model_xyz", "--random-init", "--out", "{tmp}/x.h5"], "timm"),
    (["bases", "nolib:thing", "--random-init", "--out", "{tmp}/x.h5"], "timm:"),
    (["bases", SPEC, "--random-init", "--out", "{tmp}/afile/x.h5"], "is a file"),  # a missing folder is made
    (["bases", SPEC, "--out", "{tmp}/x.h5"], "--random-init"),  # offline: pretrained cannot be fetched
    (["bases", "torchvision:maxvit_t", "--random-init", "--out", "{tmp}/x.h5"], "register_attention"),
])
def test_bad_input_is_one_sentence_and_nonzero_exit(tmp_path, args, needle):
    (tmp_path / "afile").write_text("")
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "x.h5").exists()


def test_weights_file_that_does_not_fit(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "w.pt")
    r = _cli("bases", SPEC, "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "x.h5"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    r = _cli("--debug", "bases", "nolib:thing", "--out", str(tmp_path / "x.h5"))
    assert r.returncode != 0 and "Traceback" in r.stderr
