"""Issue 18 item 3: every qkprobe file kind is first-class.

``qkprobe inspect`` summarises bases, model-zoo and ablation files (per-layer cosine table: the
S-weighted cosine and the fraction of modes with cos > 0; what was ablated and its effect);
``qkprobe report`` draws layer curves and spectra from a bases or zoo file alone and the ablation
section from an ablation file alone; ``--name`` labels a file in legends and titles.
"""

import json
import re

import numpy as np
import pytest

from qkprobe.cli.main import main
from qkprobe.sinks import ablate_file
from qkprobe.sinks.bases_file import read_bases, read_zoo

SPEC = "timm:test_vit"   # 6 layers, 2 heads: CI-sized


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    bases, zoo, abl = d / "tmpq8x2" / "b.h5", d / "zoo.h5", d / "a.h5"
    assert main(["bases", SPEC, "--random-init", "--out", str(bases)]) == 0
    assert main(["bases", SPEC, "timm:test_vit2", "--random-init", "--out", str(zoo), "--no-progress"]) == 0
    modes = {"layer": [0, 3], "head": [1, 0], "mode": [0, 2], "layer_name": ["blocks.0.attn", "blocks.3.attn"],
             "singular_value": [2.0, 1.0], "cosine": [0.25, -0.5], "attn_share": [0.3, 0.1]}
    ablate_file.create(str(abl), {"model_spec": SPEC, "random_init": True,
                                  "options": {"modes": "L0H1M0,L3H0M2", "top": None, "scale": 0.0}},
                       modes, ["x.png", "y.png"])
    w = ablate_file.AblationWriter(str(abl))
    w.set_attrs({"measure": "kl"})
    for m, eff in ((0, [0.5, 0.7]), (1, [0.01, 0.03])):
        w.write(m, np.arange(2), {"effect": np.array(eff), "top1_agreement": np.array([1.0, 0.0]),
                                  "attn_change": np.array([0.1, 0.2])})
    w.close()
    return {"bases": bases, "zoo": zoo, "ablation": abl}


def _table_rows(text):
    """[S-w cos, mean cos, cos>0] of every row of the cosine tables printed by inspect, in order."""
    return [[float(v) for v in line.split()[4:7]] for line in text.splitlines()
            if len(line.split()) >= 8 and line.split()[0].isdigit()]


def _check(printed, expected):
    """The printed cosines (4 decimals) and fractions of positive modes (2 decimals) are the file's."""
    printed, expected = np.asarray(printed), np.asarray(expected)
    assert printed.shape == expected.shape
    np.testing.assert_allclose(printed[:, :2], expected[:, :2], atol=6e-5)
    np.testing.assert_allclose(printed[:, 2], expected[:, 2], atol=6e-3)


def _expected(layer):
    S, cos = np.asarray(layer["S"], dtype=np.float64), np.asarray(layer["cosine"], dtype=np.float64)
    wc = ((S / S.sum(1, keepdims=True)) * cos).sum(1).mean()
    return [wc, cos.mean(), (cos > 0).mean()]


def test_inspect_bases_file_prints_the_cosine_table(files, capsys):
    assert main(["inspect", str(files["bases"])]) == 0
    out = capsys.readouterr().out
    assert "qkprobe bases file, 6 layers" in out and f"model_spec: {SPEC}" in out and "cos>0" in out
    layers = read_bases(str(files["bases"]))
    _check(_table_rows(out), [_expected(lay) for lay in layers])


def test_inspect_zoo_file_prints_every_model(files, capsys):
    assert main(["inspect", str(files["zoo"])]) == 0
    out = capsys.readouterr().out
    zoo = read_zoo(str(files["zoo"]))
    assert f"{len(zoo['models'])} models" in out and SPEC in out and "timm:test_vit2" in out
    expected = [_expected(lay) for m in zoo["models"].values() for lay in m["layers"]]
    assert len(expected) == 6 + 8
    _check(_table_rows(out), expected)


def test_inspect_ablation_file_says_what_was_ablated_and_the_effect(files, capsys):
    assert main(["inspect", str(files["ablation"])]) == 0
    out = capsys.readouterr().out
    assert "qkprobe ablation file, 2 modes × 2 images, 4 of 4 pairs done" in out
    assert "modes L0H1M0,L3H0M2" in out and "times 0 (removed)" in out and "KL" in out
    first = next(ln for ln in out.splitlines() if ln.strip().startswith("L0H1M0")).split()
    assert float(first[3]) == pytest.approx(0.6, rel=1e-3) and float(first[4]) == pytest.approx(0.5)


def _json(page, element_id):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_report_from_a_bases_and_a_zoo_file_alone(files, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(files["bases"]), str(files["zoo"]), "--name", "mine", "--name", "z", "--out", str(out),
                 "--no-progress"]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    curve = _json(page, "layer-curve-data")["runs"]
    assert [c["label"] for c in curve] == ["mine", f"z: {SPEC} (random init)", "z: timm:test_vit2 (random init)"]
    layers = read_bases(str(files["bases"]))
    np.testing.assert_allclose(curve[0]["weighted_cosine"], [_expected(lay)[0] for lay in layers], rtol=1e-9)
    assert "tmpq8x2" not in " ".join(c["label"] for c in curve)   # no folder of a path in a label
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "layer_curve.png" in figures
    assert len([f for f in figures if f.startswith("run0_spectrum_L")]) == 6
    assert len([f for f in figures if f.startswith("run2_spectrum_L")]) == 8   # test_vit2: 8 layers


def test_report_from_an_ablation_file_alone(files, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(files["ablation"]), "--name", "short", "--out", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    [d] = _json(page, "report-data")["ablation"]
    np.testing.assert_allclose(d["effect"], [0.6, 0.02], rtol=1e-6)
    assert "what removing each mode does" in page.lower() and (out / "figures" / "ablation0.png").is_file()


def test_report_name_count_must_match(files, tmp_path, capsys):
    assert main(["report", str(files["bases"]), "--name", "a", "--name", "b", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--name" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
