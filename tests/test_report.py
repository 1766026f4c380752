"""``qkprobe report``: a real run → HTML page checked in headless Chromium; figure data equal the
file's numbers; moved images, changed weights and other schema versions are handled.

The browser test drives Debian's ``chromium`` over the DevTools pipe (qkprobe.report.browser):
console errors, uncaught exceptions and failed loads are collected, every <img>'s naturalWidth is
read after the load event, and a screenshot is saved. Set QKPROBE_SKIP_BROWSER=1 to skip it
where no Chromium can be installed (CI installs it).
"""

import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import qkprobe
from qkprobe.cli.main import main
from qkprobe.data import skimage_images
from qkprobe.report.browser import check_page

from browser_check import needs_browser, require_browser  # tests/ is on sys.path (tests/conftest.py)

SPEC = "timm:test_vit"  # 6 layers, 2 heads, 160 px, random init: CI-sized



@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    images = d / "photos"
    skimage_images(str(images))
    out = d / "run.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(images), "--out", str(out), "--batch-size", "8",
                 "--stats", "all", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def report_dir(run_file):
    out = run_file.parent / "report"
    assert main(["report", str(run_file), "--out", str(out), "--no-progress"]) == 0
    return out


def _json(page: Path, element_id: str):
    text = page.read_text(encoding="utf-8")
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', text, re.S)
    assert m, f"no {element_id} block"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _img_srcs(page: Path):
    return re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))


@needs_browser
def test_page_loads_in_chromium_with_every_image(report_dir, tmp_path):
    require_browser()
    index = report_dir / "index.html"
    html = index.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//', html), "the page must not fetch anything from the network"
    srcs = _img_srcs(index)
    assert len(srcs) >= 6 + 5 + 3  # spectra of 6 layers, optimal images of 5 heads, layer curve + importance
    assert sum("symparts" in s for s in srcs) == 6  # a symmetric/antisymmetric panel beside each spectrum
    shot = tmp_path / "report.png"
    check = check_page(index, screenshot=str(shot))
    assert check.console_errors == []
    assert len(check.images) == len(srcs)
    assert all(i["naturalWidth"] > 0 for i in check.images), check.broken_images
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
    keep = os.environ.get("QKPROBE_REPORT_SCREENSHOT")  # e.g. to attach to a CI run
    if keep:
        shutil.copy(shot, keep)
    for section in ("layer-curves", "run0-spectra", "run0-optimal", "run0-importance"):
        assert f'id="{section}"' in html
    assert 'id="run0-series"' not in html and 'id="warnings"' not in html


@needs_browser
def test_browser_check_can_fail(tmp_path):
    require_browser()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><img src="gone.png">'
                    '<script>console.error("boom"); nope();</script></body></html>')
    check = check_page(page)
    assert check.broken_images == ["gone.png"] and not check.ok
    text = "\n".join(check.console_errors)
    assert "boom" in text and "nope" in text and "gone.png" in text


def test_figure_data_equal_the_file(run_file, report_dir):
    index = report_dir / "index.html"
    curve = _json(index, "layer-curve-data")["runs"]
    data = _json(index, "report-data")["runs"][0]
    with qkprobe.open_run(str(run_file)) as run:
        L = len(run.layer_names)
        mean, wcos = [], []
        for i in range(L):
            b = run.bases(i)
            S, cos = b["S"].astype(np.float64), b["cosine"].astype(np.float64)
            mean.append(cos.mean())
            wcos.append(((S / S.sum(1, keepdims=True)) * cos).sum(1).mean())
        assert len(curve) == 1 and curve[0]["layers"] == run.layer_names
        np.testing.assert_allclose(curve[0]["x"], np.linspace(0, 1, L), rtol=0, atol=1e-15)
        np.testing.assert_allclose(curve[0]["mean_cosine"], mean, rtol=1e-12)
        np.testing.assert_allclose(curve[0]["weighted_cosine"], wcos, rtol=1e-12)

        # band: exact 99th percentile of |cos| of random unit vectors in D dimensions
        from scipy.stats import beta
        D = run.bases(0)["U"].shape[1]
        assert data["band"] == pytest.approx(2 * beta.ppf(0.995, (D - 1) / 2, (D - 1) / 2) - 1, rel=1e-9)

        # optimal images: the stored top-k ids and scores, and maps whose recomputed scores match them
        opt = data["optimal"]
        assert opt["maps"]["hash_ok"] is True and opt["maps"]["notes"] == []
        assert len(opt["chosen_heads"]) == 5  # most positive, most negative, early/middle/late
        wc_all = [(l, h, w) for l, ws in enumerate(data["weighted_cosine"]) for h, w in enumerate(ws)]
        assert opt["chosen_heads"][0] == list(max(wc_all, key=lambda t: t[2])[:2])
        assert opt["chosen_heads"][1] == list(min(wc_all, key=lambda t: t[2])[:2])
        assert len(opt["entries"]) == 5 * 2 * 2
        for e in opt["entries"]:
            scores = run.snapshot(e["layer"], "topk_scores")[e["head"], e["mode"], e["sign"]]
            index_ = run.snapshot(e["layer"], "topk_index")[e["head"], e["mode"], e["sign"]]
            assert e["mode"] in (0, 1)  # modes are stored in descending S
            assert e["cosine"] == pytest.approx(float(run.bases(e["layer"])["cosine"][e["head"], e["mode"]]))
            assert [i["id"] for i in e["items"]] == [run.ids[j] for j in index_[:4]]
            np.testing.assert_allclose([i["score"] for i in e["items"]], scores[:4], rtol=1e-6)
            np.testing.assert_allclose([i["recomputed_score"] for i in e["items"]], scores[:4], rtol=1e-4, atol=1e-5)

        # mode importance: share sums from the aggregates
        k = run.stat_names.index("attn_share")
        band = data["band"]
        for row in data["importance"]["layers"]:
            share = run.snapshot(row["layer"], "agg_mean")[..., k]
            cos = run.bases(row["layer"])["cosine"]
            assert row["similar"] == pytest.approx((share * (cos > band)).sum(1).mean())
            assert row["dissimilar"] == pytest.approx((share * (cos < -band)).sum(1).mean())
            assert row["similar"] + row["dissimilar"] + row["neutral"] == pytest.approx(1.0, abs=1e-5)


def test_symmetric_energy_fraction_equals_the_file(run_file, report_dir):
    index = report_dir / "index.html"
    fracs = _json(index, "run0-sym-data")["symmetric_energy_fraction"]
    html = index.read_text(encoding="utf-8")
    with qkprobe.open_run(str(run_file)) as run:
        assert len(fracs) == len(run.layer_names)
        for i, got in enumerate(fracs):
            b = run.bases(i)
            lam, om = b["sym_eigvals"].astype(np.float64), b["antisym_eigvals"].astype(np.float64)
            ref = (lam ** 2).sum(1) / (b["S"].astype(np.float64) ** 2).sum(1)  # ‖sym‖²/‖M‖², ‖M‖² = Σs²
            np.testing.assert_allclose(got, ref, rtol=1e-9)
            assert (om >= 0).all()
            assert f"symmetric energy fraction {np.mean(ref):.2f}" in html


@needs_browser
def test_moved_images_are_listed_and_page_still_renders(run_file, tmp_path, capsys):
    require_browser()
    photos = run_file.parent / "photos"
    moved = tmp_path / "moved"
    shutil.move(str(photos), str(moved))
    try:
        out = tmp_path / "report"
        assert main(["report", str(run_file), "--out", str(out), "--no-progress", "--modes", "1", "--topk", "2"]) == 0
        index = out / "index.html"
        data = _json(index, "report-data")["runs"][0]
        shown = {i["id"] for e in data["optimal"]["entries"] for i in e["items"]}
        assert set(data["missing_images"]) == shown and shown
        assert data["missing_on_disk"] == data["rows"] >= 10
        html = index.read_text(encoding="utf-8")
        warn = re.search(r'<div id="run0-missing">(.*?)</div></div>', html, re.S).group(1)
        for sid in shown:
            assert f"<li>{sid}</li>" in warn
        check = check_page(index)
        assert check.ok, (check.console_errors, check.broken_images)
        assert len(check.images) == len(_img_srcs(index)) >= 10

        # --image-root finds them where they went
        out2 = tmp_path / "report2"
        assert main(["report", str(run_file), "--out", str(out2), "--no-progress", "--modes", "1", "--topk", "2",
                     "--image-root", str(moved)]) == 0
        data = _json(out2 / "index.html", "report-data")["runs"][0]
        assert data["missing_images"] == [] and data["optimal"]["maps"]["hash_ok"] is True
        assert all(i["recomputed_score"] is not None for e in data["optimal"]["entries"] for i in e["items"])
    finally:
        shutil.move(str(moved), str(photos))


def test_other_weights_are_said_on_the_page(run_file, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(run_file, other)
    with h5py.File(other, "a") as f:
        f.attrs["weights_hash"] = "0123456789abcdef"
        f.attrs["seed"] = "1"
        f.attrs["json_keys"] = json.dumps(sorted(set(json.loads(f.attrs["json_keys"])) - {"seed"}))
    out = tmp_path / "report"
    assert main(["report", str(other), "--out", str(out), "--no-progress", "--modes", "1", "--topk", "1",
                 "--heads", "0:1"]) == 0
    maps = _json(out / "index.html", "report-data")["runs"][0]["optimal"]["maps"]
    assert maps["hash_ok"] is False and maps["recorded_hash"] == "0123456789abcdef"
    assert "different weights" in (out / "index.html").read_text(encoding="utf-8")


def test_other_schema_version_is_one_sentence(run_file, tmp_path, capsys):
    other = tmp_path / "old.h5"
    shutil.copy(run_file, other)
    with h5py.File(other, "a") as f:
        f.attrs["schema_version"] = 99
    assert main(["report", str(run_file), str(other), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schema version 99" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written for a bad input


def test_two_runs_and_a_training_series(run_file, tmp_path):
    import timm
    import torch
    second = tmp_path / "train.h5"
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    with qkprobe.attach(model, out=str(second), metadata={"model_spec": SPEC}) as probe:
        for step in (10, 20):
            probe.step(step)
            probe.set_ids([f"x{step}a", f"x{step}b"])
            model(torch.randn(2, 3, 160, 160))
            with torch.no_grad():
                for blk in model.blocks:
                    blk.attn.qkv.weight.add_(0.2 * torch.randn_like(blk.attn.qkv.weight))
            probe.refresh(step)
    out = tmp_path / "report"
    assert main(["report", str(run_file), str(second), "--out", str(out), "--no-progress", "--no-maps"]) == 0
    index = out / "index.html"
    curve = _json(index, "layer-curve-data")["runs"]
    assert len(curve) == 2 and curve[0]["label"] != curve[1]["label"]
    runs = _json(index, "report-data")["runs"]
    assert runs[0]["series"] is None  # a plain run has only the point taken at attach
    series = runs[1]["series"]
    with qkprobe.open_run(str(second)) as run:
        assert series["step"] == run.series_steps.tolist() and len(series["step"]) == 3
        for i in range(len(run.layer_names)):
            S, cos = run.series(i, "S").astype(np.float64), run.series(i, "cosine").astype(np.float64)
            np.testing.assert_allclose(np.array(series["mean_cosine"])[:, i], cos.mean(axis=(1, 2)), rtol=1e-9)
            w = S / S.sum(-1, keepdims=True)
            np.testing.assert_allclose(np.array(series["weighted_cosine"])[:, i], (w * cos).sum(-1).mean(-1),
                                       rtol=1e-9)
            np.testing.assert_allclose(np.array(series["drift"]["query"])[:, i],
                                       run.series(i, "drift_q").astype(np.float64).mean(-1), rtol=1e-6)
    assert np.array(series["drift"]["query"])[-1].min() > 0  # the weights moved
    html = index.read_text(encoding="utf-8")
    assert 'id="run1-series"' in html and 'id="run0-series"' not in html
    assert all((out / src).is_file() for src in _img_srcs(index))


# --------------------------------------------------------------------------- issue 18: maps, positional, folding

def test_maps_of_a_row_share_one_colour_scale():
    from qkprobe.report.build import _row_scale
    img = np.full((4, 4, 3), 0.5)
    strong, weak = np.zeros((2, 2)), np.zeros((2, 2))
    strong[0, 0], weak[0, 0] = 2.0, 1.0
    cells = [{"image": img, "overlay": None}, {"image": img, "overlay": None}, {"image": None, "overlay": None}]
    scale = _row_scale(cells, [(strong, strong), (weak, -weak), None])
    assert scale == {"query": 2.0, "key": 2.0}
    # the weaker map is drawn at half the colour of the stronger one, not at its own maximum
    assert cells[0]["overlay"][0, 0, 0] == pytest.approx(1.0)
    assert cells[1]["overlay"][0, 0, 0] == pytest.approx(0.5 + 0.25 * 0.5, abs=1e-9)
    assert cells[1]["overlay"][..., 1].max() == pytest.approx(0.25)   # no positive key coordinate: no cyan
    assert cells[2]["overlay"] is None and _row_scale([{"image": img}], [None]) is None


def test_positional_modes_are_flagged_from_the_recomputed_maps():
    from qkprobe.report.build import Choice, _positional_modes, _positional_note
    rng = np.random.default_rng(0)
    grid = np.add.outer(np.arange(4.0), np.arange(4.0))

    class Maps:   # the part of report.maps.MapResult the verdict reads
        images = {f"i{k}": None for k in range(6)}

        def has(self, layer, sid):
            return True

        def maps(self, layer, head, mode, sign, sid):
            if mode == 0:   # the same map in every image: position alone
                return grid, -grid, 1.0
            return rng.standard_normal((4, 4)), rng.standard_normal((4, 4)), 1.0

    rows = [(m, sign, [(f"i{k}", 1.0) for k in range(3 * sign, 3 * sign + 3)]) for m in (0, 1) for sign in (0, 1)]
    verdict = _positional_modes(Maps(), Choice(2, 1, "chosen"), rows)
    assert verdict[0]["positional"] and verdict[0]["position_r2"]["query"] == pytest.approx(1.0)
    assert not verdict[1]["positional"] and verdict[1]["position_r2"]["key"] < 0.5
    note = _positional_note(Choice(2, 1, "chosen"), verdict)
    assert "L2 H1 M0" in note and "L2 H1 M1" not in note
    assert _positional_modes(None, Choice(2, 1, "chosen"), rows)[0]["positional"] is False   # --no-maps


def test_page_folds_spectra_and_records_scales_and_verdicts(report_dir):
    index = report_dir / "index.html"
    html = index.read_text(encoding="utf-8")
    spectra = re.search(r'<details class="section"( open)?><summary><h3 id="run0-spectra">', html)
    assert spectra and spectra.group(1) is None      # the tallest section starts folded
    assert re.search(r'<details class="section" open><summary><h3 id="run0-optimal">', html)
    entries = _json(index, "report-data")["runs"][0]["optimal"]["entries"]
    for e in entries:
        assert e["map_scale"]["query"] >= 0 and e["map_scale"]["key"] >= 0
        r2 = e["position_r2"]
        assert e["positional"] == (r2["query"] is not None and r2["key"] is not None
                                   and min(r2["query"], r2["key"]) >= 0.5)
    assert any(e["map_scale"]["query"] > 0 for e in entries)
    assert ("Positional modes:" in html) == any(e["positional"] for e in entries)


def test_rebuild_model_keeps_one_model_per_recipe(tmp_path, monkeypatch):
    """The optimal images (or sentences) and the viewer share one rebuilt model; another recipe or
    a rewritten weights file is built again."""
    import torch

    import qkprobe.models as models
    from qkprobe.report import maps

    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    monkeypatch.setattr(maps, "_REBUILT", [])
    meta = {"model_spec": SPEC, "random_init": True, "seed": 0}
    first = maps.rebuild_model(meta)
    assert maps.rebuild_model(dict(meta)) is first and len(calls) == 1
    assert maps.rebuild_model(dict(meta, seed=1)) is not first and len(calls) == 2
    weights = tmp_path / "w.pt"
    torch.save(first[0].state_dict(), weights)
    with_file = maps.rebuild_model(dict(meta, weights_file=str(weights)))
    assert maps.rebuild_model(dict(meta, weights_file=str(weights))) is with_file and len(calls) == 3
    os.utime(weights, ns=(0, 0))            # rewritten (another mtime): built again
    assert maps.rebuild_model(dict(meta, weights_file=str(weights))) is not with_file and len(calls) == 4
