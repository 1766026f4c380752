"""Class labels: ImageFolder sub-folders, path<TAB>label list files and --labels files store one
label per row aligned with the ids (also across a resume and a recover); ``open_run(...).labels``;
the report writes them under the optimal images and names each mode's most frequent classes;
``qkprobe inspect`` counts them. Files without labels keep working."""

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import pytest

import qkprobe
from qkprobe.cli.main import main
from qkprobe.errors import QKProbeError
from qkprobe.data import (folder_labels, labels_file, labels_for, list_file_labels, list_images, make_loader,
                          skimage_images)
from qkprobe.sinks import schema
from qkprobe.sinks.recover import truncate_rows

SPEC = "timm:test_vit"  # 6 layers, 2 heads, 160 px: CI-sized
CLASSES = ("cat", "dog", "rocket")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageFolder layout: root/<class>/<image>.png, the scikit-image photos spread over 3 classes."""
    d = tmp_path_factory.mktemp("labels")
    photos = skimage_images(str(d / "photos"))
    root = d / "train"
    for i, p in enumerate(photos):
        cls = root / CLASSES[i % 3]
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, cls / os.path.basename(p))
    return root


def expected_label(sample_id: str) -> str:
    return Path(sample_id).parent.name


def test_data_labels_from_folders_and_list_files(image_folder, tmp_path):
    paths = list_images(images_dir=str(image_folder))
    labels = folder_labels(paths, str(image_folder))
    assert labels == [expected_label(p) for p in paths] and set(labels) == set(CLASSES)
    shutil.copy(paths[0], image_folder / "loose.png")  # an image outside any class folder: no layout
    try:
        assert folder_labels(list_images(images_dir=str(image_folder)), str(image_folder)) is None
    finally:
        (image_folder / "loose.png").unlink()
    listing = tmp_path / "list.txt"
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    listing.write_text("# header\n\n" + "".join(f"{r}\tclass {i % 2}\n" for i, r in enumerate(rel[:-1]))
                       + f"{rel[-1]}\n", encoding="utf-8")
    assert list_images(list_file=str(listing)) == [os.path.join(str(tmp_path), r) for r in rel]
    assert list_file_labels(str(listing)) == [f"class {i % 2}" for i in range(len(rel) - 1)] + [""]
    with pytest.raises(QKProbeError, match="Line 17 .* has no tab"):  # a labels file needs a label a line
        labels_file(str(listing))
    table_file = tmp_path / "labels.tsv"
    table_file.write_text("".join(f"{r}\tclass {i % 2}\n" for i, r in enumerate(rel[:-1])), encoding="utf-8")
    assert labels_for(paths, labels_file(str(table_file))) == [f"class {i % 2}" for i in range(len(rel) - 1)] + [""]
    loader = make_loader(paths[:3], None, batch_size=2, labels=["a", "b", "c"])
    batches = list(loader)
    assert [b[4] for b in batches] == [["a", "b"], ["c"]]
    assert len(next(iter(make_loader(paths[:1], None)))) == 4  # without labels: the old 4-tuple


def absolute_ids(path) -> list:
    """The run's ids as absolute image paths (ids are relative to the image root it records)."""
    with h5py.File(path, "r") as f:
        root = f.attrs["image_root"]
    with qkprobe.open_run(str(path)) as run:
        return [os.path.normpath(os.path.join(root, i)) for i in run.ids]


@pytest.fixture(scope="module")
def folder_run(image_folder, tmp_path_factory):
    """A run over the ImageFolder layout: one label per row from the class sub-folders."""
    out = tmp_path_factory.mktemp("folder_run") / "run.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(image_folder), "--out", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    return out


def test_run_stores_folder_labels_inspect_counts_them(folder_run, capsys):
    out = folder_run
    with qkprobe.open_run(str(out)) as run:
        assert len(run) >= 10
        assert run.labels == [expected_label(i) for i in run.ids]
        ds = run.to_xarray(0)
        assert ds["label"].values.tolist() == run.labels
        counts = Counter(run.labels)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "labels:" in ln)
    assert "3 classes" in line
    for name, n in counts.items():
        assert f"{name} {n}" in line


def test_list_file_labels_survive_resume_and_recover(image_folder, tmp_path):
    paths = list_images(images_dir=str(image_folder))
    first, full = tmp_path / "first.txt", tmp_path / "all.txt"
    first.write_text("".join(f"{p}\tL{i}\n" for i, p in enumerate(paths[:5])), encoding="utf-8")
    full.write_text("".join(f"{p}\tL{i}\n" for i, p in enumerate(paths)), encoding="utf-8")
    want = {p: f"L{i}" for i, p in enumerate(paths)}
    out = tmp_path / "run.h5"
    assert main(["run", SPEC, "--random-init", "--list", str(first), "--out", str(out), "--batch-size", "2",
                 "--no-progress"]) == 0
    with h5py.File(out, "r+", libver=schema.LIBVER) as f:   # a crash after 3 committed rows, 5 written
        f[schema.COMMITTED][0] = 3
    with h5py.File(out, "r+", libver=schema.LIBVER) as f:   # rows past the record dropped, series kept
        truncate_rows(f, 3, 0, series=int(f[schema.COMMITTED][2]))
    assert main(["run", SPEC, "--random-init", "--list", str(full), "--out", str(out), "--batch-size", "4",
                 "--resume", "--no-progress"]) == 0
    ids = absolute_ids(out)
    with qkprobe.open_run(str(out)) as run:
        assert sorted(ids) == sorted(paths)
        assert run.labels == [want[i] for i in ids]


def test_labels_file_option_and_unlabelled_runs(image_folder, tmp_path):
    paths = list_images(images_dir=str(image_folder))
    table = tmp_path / "labels.tsv"
    table.write_text("".join(f"{os.path.relpath(p, tmp_path)}\tk{i % 4}\n" for i, p in enumerate(paths)),
                     encoding="utf-8")
    out = tmp_path / "run.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(image_folder), "--labels", str(table),
                 "--out", str(out), "--batch-size", "8", "--no-progress"]) == 0
    want = {p: f"k{i % 4}" for i, p in enumerate(paths)}
    with qkprobe.open_run(str(out)) as run:
        assert run.labels == [want[i] for i in absolute_ids(out)]
    plain = tmp_path / "plain.h5"   # flat folder: no labels
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths[:3]:
        shutil.copy(p, flat / os.path.basename(p))
    assert main(["run", SPEC, "--random-init", "--images", str(flat), "--out", str(plain), "--no-progress"]) == 0
    with qkprobe.open_run(str(plain)) as run:
        assert len(run) == 3 and run.labels is None
        assert "label" not in run.to_xarray(0).coords


def _json(page: Path, element_id: str):
    import json
    text = page.read_text(encoding="utf-8")
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', text, re.S)
    assert m, f"no {element_id} block"
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_report_shows_labels_and_top_classes(folder_run, tmp_path):
    report = tmp_path / "report"
    assert main(["report", str(folder_run), "--out", str(report), "--no-maps", "--no-progress"]) == 0
    index = report / "index.html"
    data = _json(index, "report-data")
    entries = [e for r in data["runs"] for e in r["optimal"]["entries"]] if "runs" in data else \
        data["optimal"]["entries"]
    assert entries
    for e in entries:
        classes = [it["class"] for it in e["items"]]
        assert classes == [expected_label(it["id"]) for it in e["items"]]
        top = Counter(classes).most_common(3)
        assert [c for _, c in e["top_classes"]] == [c for _, c in top]
        assert {name for name, _ in e["top_classes"]} <= set(CLASSES)
    html = index.read_text(encoding="utf-8")
    assert "Most frequent classes among the top images" in html
    first = entries[0]
    name, count = first["top_classes"][0]
    assert f"{first['label']}: {name} ×{count}" in html.replace("&#x27;", "'")
    if os.environ.get("QKPROBE_SKIP_BROWSER") != "1":
        from qkprobe.report.browser import check_page
        check = check_page(index)
        assert check.console_errors == [] and all(i["naturalWidth"] > 0 for i in check.images)


def test_merged_shards_keep_labels_aligned(tmp_path):
    import sys

    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
    from dist_common import BATCHES, make_inputs, make_model
    from qkprobe.distributed import merge_shards
    model, x = make_model(), make_inputs()
    for rank in range(2):
        with qkprobe.attach(model, str(tmp_path / f"run.rank{rank}.h5"), top_samples=4) as probe, torch.no_grad():
            for batch in BATCHES[rank]:
                # rank 1 stores no labels: its rows get "" in the merged file
                probe.set_ids([f"s{i}" for i in batch], labels=[f"c{i % 3}" for i in batch] if rank == 0 else None)
                model(x[batch])
    merge_shards([str(tmp_path / f"run.rank{r}.h5") for r in range(2)], str(tmp_path / "run.h5"))
    with qkprobe.open_run(str(tmp_path / "run.h5")) as run:
        rank0 = {f"s{i}" for b in BATCHES[0] for i in b}
        assert run.labels == [f"c{int(i[1:]) % 3}" if i in rank0 else "" for i in run.ids]
        ds = run.to_xarray(1)
        assert ds["stats"].dims == ("sample", "head", "mode", "statistic") and ds.sizes["sample"] == len(run)
    import xarray as xr
    with xr.open_dataset(tmp_path / "run.h5", engine="h5netcdf", group="layers/01", phony_dims="access") as ds:
        assert ds["stats"].dims == ("sample", "head", "mode", "statistic") and ds.sizes["sample"] == 15


def test_file_from_before_labels_reads_and_resumes(image_folder, tmp_path, caplog):
    out = tmp_path / "old.h5"
    paths = list_images(images_dir=str(image_folder))
    listing = tmp_path / "first.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[:4]), encoding="utf-8")
    assert main(["run", SPEC, "--random-init", "--list", str(listing), "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out, "r+", libver=schema.LIBVER) as f:   # as written by a qkprobe without labels
        del f[schema.SAMPLE_LABEL]
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == 4 and run.labels is None
    with caplog.at_level("WARNING"):
        assert main(["run", SPEC, "--random-init", "--images", str(image_folder), "--out", str(out), "--resume",
                     "--no-progress"]) == 0
    assert "without class labels" in caplog.text
    ids = absolute_ids(out)
    with qkprobe.open_run(str(out)) as run:
        assert sorted(ids) == sorted(paths) and run.labels is None
