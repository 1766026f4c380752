"""Damaged and crafted run files: every verb answers in one sentence, within seconds, exit 2,
and reads nothing outside the file (issue 11).

The corpus is made here from one good run file: truncated (100 bytes, half), a commit record of
10**12 rows, missing groups, a short commit record, bad attributes, a dangling link, a huge
declared shape, HDF5 external storage, an external link, a virtual dataset on an absolute path,
not HDF5 at all, and a FIFO. Sentinel files the crafted ones point at are watched with inotify:
no verb may open them.
"""

import ctypes
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkprobe.cli.main import main
from qkprobe.data import skimage_images

HELPERS = Path(__file__).resolve().parent / "helpers"
SPEC = "timm:test_vit"
VERBS = ("inspect", "open_run", "report", "resume", "merge", "recover")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    images = d / "imgs"
    images.mkdir()
    for p in skimage_images(str(d / "sk"))[:2]:
        shutil.copy(p, images)
    out = d / "good.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    return out


def _edit(src: Path, dst: Path, change) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
    return dst


def make_corpus(good: Path, folder: Path, sentinels: dict) -> dict:
    """name → path of each damaged or crafted file, all in ``folder``."""
    folder.mkdir()
    data = good.read_bytes()
    files = {}
    files["truncated_100"] = folder / "truncated_100.h5"
    files["truncated_100"].write_bytes(data[:100])
    files["truncated_half"] = folder / "truncated_half.h5"
    files["truncated_half"].write_bytes(data[: len(data) // 2])
    files["not_hdf5"] = folder / "not_hdf5.h5"
    files["not_hdf5"].write_bytes(np.random.default_rng(0).bytes(4096))

    def huge_commit(f):
        f["committed"][0] = 10 ** 12

    def missing_group(f):
        del f["samples"]

    def missing_layers(f):
        del f["layers"]

    def short_record(f):
        del f["committed"]
        f.create_dataset("committed", data=np.array([1, 0], np.int64))

    def bad_attrs(f):
        f.attrs["json_keys"] = "{not json"

    def bad_layer_attr(f):
        f["layers/00"].attrs["num_heads"] = "many"

    def dangling(f):
        del f["samples/step"]
        f["samples/step"] = h5py.SoftLink("/nowhere/at/all")

    def huge_shape(f):
        del f["layers/00/bases/U"]
        f.create_dataset("layers/00/bases/U", shape=(1 << 17, 1 << 16), dtype="f4")   # 32 GiB declared

    def huge_chunked(f):
        del f["layers/00/snapshot/agg_mean"]
        f.create_dataset("layers/00/snapshot/agg_mean", shape=(2, 1 << 20, 1 << 12), dtype="f8",
                         chunks=(1, 1024, 1024))

    def external_storage(f):
        del f["layers/00/bases/S"]
        f.create_dataset("layers/00/bases/S", shape=(64,), dtype="u1",
                         external=[(str(sentinels["raw"]), 0, 64)])

    def external_link(f):
        del f["layers/00/bases"]
        f["layers/00/bases"] = h5py.ExternalLink(str(sentinels["h5"]), "/bases")

    def virtual_absolute(f):
        stats = f["layers/00/stats"]
        shape, dtype = stats.shape, stats.dtype
        del f["layers/00/stats"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(sentinels["vds"]), "/x", shape=shape, dtype=dtype)
        f.create_virtual_dataset("layers/00/stats", layout)

    for change in (huge_commit, missing_group, missing_layers, short_record, bad_attrs, bad_layer_attr, dangling,
                   huge_shape, huge_chunked, external_storage, external_link, virtual_absolute):
        files[change.__name__] = _edit(good, folder / f"{change.__name__}.h5", change)
    fifo = folder / "fifo.h5"
    os.mkfifo(fifo)
    files["fifo"] = fifo
    return files


# --------------------------------------------------------------------------- inotify

IN_ACCESS, IN_OPEN = 0x1, 0x20


class Watch:
    """inotify watch of files: which were opened or read."""

    def __init__(self, paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        self.names = {}
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(str(p)), IN_ACCESS | IN_OPEN)
            assert wd >= 0, p
            self.names[wd] = str(p)

    def events(self) -> list:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            at = 0
            while at < len(buf):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buf, at)
                out.append((self.names.get(wd), mask))
                at += 16 + size

    def close(self) -> None:
        os.close(self.fd)


def _sha(path: Path):
    return None if not path.is_file() else hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(good, tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    sentinels = {"raw": d / "sentinel.bin", "h5": d / "sentinel.h5", "vds": d / "sentinel_vds.h5"}
    sentinels["raw"].write_bytes(b"SECRET-SENTINEL" * 8)
    for key in ("h5", "vds"):
        with h5py.File(sentinels[key], "w") as f:
            f.create_group("bases").create_dataset("U", data=np.ones(3))
            f.create_dataset("x", data=np.ones((4, 2, 32, 12), np.float32))
    files = make_corpus(good, d / "files", sentinels)
    return d, files, sentinels


def test_every_verb_on_every_damaged_file_answers_in_one_sentence(corpus, good):
    work, files, sentinels = corpus
    images = str(good.parent / "imgs")
    before = {name: _sha(p) for name, p in files.items()}
    listing = sorted(os.listdir(work / "files"))
    watch = Watch(sentinels.values())
    failures = []
    try:
        for verb in VERBS:
            paths = [str(p) for p in files.values()]
            proc = subprocess.run([sys.executable, str(HELPERS / "hostile_verbs.py"), verb, str(work), images, *paths],
                                  capture_output=True, text=True, timeout=300)
            results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            done = {r["file"]: r for r in results if "file" in r}
            started = [r["start"] for r in results if "start" in r]
            if proc.returncode != 0:
                hung = started[-1] if started and started[-1] not in done else "?"
                failures.append(f"{verb}: hung or crashed on {hung}: {proc.stderr[-800:]}")
            for path, r in done.items():
                lines = r["stderr"].strip().splitlines()
                name = Path(path).stem
                if r["rc"] != 2 or len(lines) != 1 or "Traceback" in r["stderr"] or r["seconds"] > 10:
                    failures.append(f"{verb} {name}: rc {r['rc']}, {r['seconds']:.1f} s, stderr {r['stderr']!r}")
                elif "internal error" in lines[0]:
                    failures.append(f"{verb} {name}: not a clear sentence: {lines[0]}")
    finally:
        opened = watch.events()
        watch.close()
    assert not failures, "\n".join(failures)
    assert opened == [], f"files outside the run file were opened: {opened}"
    assert {name: _sha(p) for name, p in files.items()} == before, "a verb changed a damaged file"
    assert sorted(os.listdir(work / "files")) == listing, "a verb left files beside the damaged ones"
    assert not [n for n in os.listdir(work) if n.startswith("out-")], "a verb wrote output for a damaged file"


def test_messages_say_what_is_wrong(corpus):
    from qkprobe.errors import RunFileError
    from qkprobe.sinks.run_file import open_run
    _, files, _ = corpus
    expect = {"truncated_100": "truncated", "truncated_half": "truncated", "huge_commit": "commit record",
              "missing_group": "damaged", "missing_layers": "damaged", "short_record": "commit record",
              "bad_attrs": "damaged", "bad_layer_attr": "num_heads", "dangling": "dangling link",
              "huge_shape": "declares", "huge_chunked": "declares", "external_storage": "external storage",
              "external_link": "links", "virtual_absolute": "relative", "not_hdf5": "not an HDF5 file",
              "fifo": "not a regular file"}
    assert set(expect) == set(files)
    for name, path in files.items():
        with pytest.raises(RunFileError) as info:
            open_run(path)
        assert expect[name] in str(info.value), (name, str(info.value))


def test_recover_of_a_truncated_file_leaves_it_untouched_and_says_so(corpus, tmp_path, capsys):
    _, files, _ = corpus
    for name in ("truncated_half", "truncated_100"):
        path = tmp_path / f"{name}.h5"
        shutil.copy(files[name], path)
        before = path.read_bytes()
        assert main(["recover", str(path)]) == 2
        assert path.read_bytes() == before          # not grown with zeros, not rewritten
        err = capsys.readouterr().err
        assert "truncated" in err and "cannot rebuild" in err and "untouched" in err


def test_huge_commit_record_is_not_trusted_by_resume_or_recover(corpus, tmp_path, capsys):
    from qkprobe.errors import RunFileError
    from qkprobe.sinks.recover import recover, truncate_rows
    _, files, _ = corpus
    path = tmp_path / "huge.h5"
    shutil.copy(files["huge_commit"], path)
    assert main(["inspect", str(path)]) == 2
    assert "1000000000000 committed samples" not in capsys.readouterr().out
    with pytest.raises(RunFileError, match="commit record"):
        recover(path)
    assert path.read_bytes() == files["huge_commit"].read_bytes()
    # the writer's resume shortens datasets through truncate_rows, which never grows them
    with h5py.File(path, "r+") as f:
        with pytest.raises(RunFileError, match="commit record"):
            truncate_rows(f, 10 ** 12, 0)
        assert f["samples/step"].shape[0] == 2
