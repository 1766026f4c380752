"""qkprobe.data: listing, bundled photographs, and a loader that survives bad images."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from qkprobe.data import ImageDataset, list_images, make_loader, skimage_images
from qkprobe.errors import QKProbeError

TRANSFORM = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor()])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return skimage_images(str(tmp_path_factory.mktemp("photos")))


def test_skimage_images_are_real_rgb_photos_written_once(photos):
    assert len(photos) >= 10
    names = {os.path.basename(p) for p in photos}
    assert {"astronaut.png", "coffee.png", "chelsea.png", "camera.png"} <= names
    for p in photos:
        with Image.open(p) as im:
            assert im.mode == "RGB" and min(im.size) >= 100
    with Image.open(photos[0]) as im:  # astronaut: a real photo, not a flat fill
        assert np.asarray(im).std() > 20
    mtimes = [os.stat(p).st_mtime_ns for p in photos]
    assert skimage_images(os.path.dirname(photos[0])) == photos
    assert [os.stat(p).st_mtime_ns for p in photos] == mtimes


def test_list_images_directory_sorted_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["z.JPG", "a.png", "b/c.webp", "b/d.tiff", "notes.txt", ".x.png", ".hidden/e.png", "f.gif"]:
        (tmp_path / rel).write_bytes(b"")
    got = [os.path.relpath(p, tmp_path) for p in list_images(images_dir=str(tmp_path))]
    assert got == ["a.png", "b/c.webp", "b/d.tiff", "f.gif", "z.JPG"]


def test_list_images_list_file(tmp_path):
    (tmp_path / "sub").mkdir()
    lst = tmp_path / "sub" / "list.txt"
    lst.write_text("# my images\nb.png\n\n/abs/a.jpg\n  c.jpg  \n")
    assert list_images(list_file=str(lst)) == [str(tmp_path / "sub" / "b.png"), "/abs/a.jpg",
                                                str(tmp_path / "sub" / "c.jpg")]


@pytest.mark.parametrize("kwargs, needle", [
    ({"images_dir": "/no/such/dir"}, "does not exist"),
    ({"list_file": "/no/such/list.txt"}, "does not exist"),
    ({}, "exactly one"),
    ({"images_dir": ".", "list_file": "x"}, "exactly one"),
])
def test_list_images_errors(kwargs, needle):
    with pytest.raises(QKProbeError, match=needle):
        list_images(**kwargs)


def test_list_images_empty_dir(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(QKProbeError, match="holds no image files"):
        list_images(images_dir=str(tmp_path))


@pytest.fixture
def mixed(tmp_path, photos):
    """Good photos with a garbage file, a truncated PNG, a missing file and a grey GIF among them."""
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    data = open(photos[0], "rb").read()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 3])
    gif = tmp_path / "grey.gif"
    Image.new("L", (80, 90), 128).save(gif)
    paths = [photos[0], str(bad), photos[1], str(trunc), str(tmp_path / "missing.png"), str(gif), photos[2]]
    return paths, [True, False, True, False, False, True, True]


def test_dataset_marks_bad_images(mixed):
    paths, ok = mixed
    ds = ImageDataset(paths, TRANSFORM)
    for i, want in enumerate(ok):
        x, path, good, reason = ds[i]
        assert path == paths[i] and good is want and x.shape == (3, 64, 64)
        if want:
            assert reason == "" and float(x.abs().sum()) > 0
        else:
            assert reason and "\n" not in reason and float(x.abs().sum()) == 0


def test_loader_keeps_going_with_workers(mixed):
    paths, ok = mixed
    seen_paths, seen_ok, reasons = [], [], []
    loader = make_loader(paths, TRANSFORM, batch_size=3, workers=2)
    for images, batch_paths, batch_ok, batch_reasons in loader:
        assert images.shape == (len(batch_paths), 3, 64, 64) and batch_ok.dtype == torch.bool
        seen_paths += batch_paths
        seen_ok += batch_ok.tolist()
        reasons += batch_reasons
    assert seen_paths == paths and seen_ok == ok
    assert [bool(r) for r in reasons] == [not o for o in ok]
