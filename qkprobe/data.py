"""Image sets for ``qkprobe run``: file listing, a fault-tolerant dataset, a loader, bundled photos.

A corrupt or unreadable image never stops a run: :class:`ImageDataset` returns a zero tensor with
``ok=False`` and the reason, and the caller records the image as skipped.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import QKProbeError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "list_images", "skimage_images", "make_loader",
           "collate", "LabelledImageDataset", "folder_labels", "list_file_labels", "labels_file", "labels_for"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

#: Real photographs bundled with scikit-image (no download), in a fixed order.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "retina", "motorcycle_left", "camera", "moon", "coins", "clock", "grass", "gravel",
                   "brick")


def list_images(images_dir: Optional[str] = None, list_file: Optional[str] = None) -> List[str]:
    """Image paths from a directory (sorted, recursive) or from a list file (one path a line).

    In a list file, blank lines and lines starting with ``#`` are skipped, and relative paths are
    taken relative to the list file's folder; listed files that are missing are kept (the dataset
    reports them as unreadable).
    """
    if (images_dir is None) == (list_file is None):
        raise QKProbeError("Give exactly one image source: an images directory or a list file of "
                           "image paths.")
    if list_file is not None:
        list_file = os.path.expanduser(str(list_file))
        if not os.path.isfile(list_file):
            raise QKProbeError(f"The image list file {list_file} does not exist; pass a text file with one "
                               f"image path a line.")
        base = os.path.dirname(os.path.abspath(list_file))
        with open(list_file, encoding="utf-8") as fh:
            lines = [ln.split("\t", 1)[0].strip() for ln in fh]  # "path<TAB>label" lines: the path
        paths = [ln if os.path.isabs(os.path.expanduser(ln)) else os.path.join(base, ln)
                 for ln in lines if ln and not ln.startswith("#")]
        paths = [os.path.expanduser(p) for p in paths]
        if not paths:
            raise QKProbeError(f"The image list file {list_file} lists no images; write one image path "
                               f"a line.")
        return paths
    images_dir = os.path.expanduser(str(images_dir))
    if os.path.isfile(images_dir):
        raise QKProbeError(f"--images {images_dir} is a file, not a folder; pass the folder that holds it "
                           f"({os.path.dirname(os.path.abspath(images_dir))}), or list the images in a text file "
                           f"and pass --list.")
    if not os.path.isdir(images_dir):
        raise QKProbeError(f"The images directory {images_dir} does not exist; pass an existing folder "
                           f"of images.")
    found = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise QKProbeError(f"The images directory {images_dir} holds no image files "
                           f"({', '.join(IMAGE_EXTENSIONS)}); pass a folder with images in it.")
    return sorted(found, key=lambda p: os.path.relpath(p, images_dir))


def image_ids(paths: Sequence[str], images_dir: Optional[str] = None,
              root: Optional[str] = None) -> Tuple[str, List[str]]:
    """``(image root, ids)`` of image paths: ids are the paths relative to the root, with ``/``.

    The root is ``images_dir`` (for a folder), else ``root`` (e.g. the one a resumed file
    recorded), else the deepest folder holding every path. Ids do not depend on how the folder
    is spelled (``imgs``, ``./imgs``, an absolute path) nor on the working directory, so a
    resume matches images exactly; the root is returned resolved (symlinks followed).
    """
    def real(p: str) -> str:   # the folder resolved, the file's own name kept (it may be a link)
        p = os.path.abspath(os.path.expanduser(str(p)))
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))

    if images_dir is not None:
        base = os.path.expanduser(str(images_dir))
        ids = [os.path.relpath(p, base) for p in paths]
        root = os.path.realpath(base)
    else:
        full = [real(p) for p in paths]
        root = os.path.realpath(root) if root else os.path.commonpath([os.path.dirname(p) for p in full])
        ids = [os.path.relpath(p, root) for p in full]
    return root, [i.replace(os.sep, "/") for i in ids]


class ImageDataset(Dataset):
    """``(tensor, path, ok, reason)`` per image; an unreadable image gives zeros, ``ok=False`` and why.

    The zero tensor has the shape the transform gives a blank 256×256 RGB image, which is the
    batch shape whenever the transform ends in a fixed-size crop or resize.
    """

    def __init__(self, paths: Sequence[str], transform: Optional[Callable[[Any], torch.Tensor]] = None):
        self.paths = [str(p) for p in paths]
        if transform is None:
            from torchvision import transforms as T
            transform = T.ToTensor()
        self.transform = transform
        self._blank_shape: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.paths)

    def blank(self) -> torch.Tensor:
        if self._blank_shape is None:
            from PIL import Image
            self._blank_shape = tuple(self.transform(Image.new("RGB", (256, 256))).shape)
        return torch.zeros(self._blank_shape)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, str, bool, str]:
        path = self.paths[i]
        try:
            from PIL import Image
            check_regular_file(path)  # a FIFO or device would block or never end
            with Image.open(path) as im:
                im.seek(0)  # first frame of a GIF or multi-page TIFF
                rgb = to_rgb(im)  # forces a full decode, so truncation shows here
            x = self.transform(rgb)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"the transform returned {type(x).__name__}, not a tensor")
            return x, path, True, ""
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, not fatal
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return self.blank(), path, False, reason


class NotARegularFile(OSError):
    """An image path that names a FIFO, socket, device or folder (never opened)."""


def check_regular_file(path: str) -> None:
    """Raise :class:`NotARegularFile` unless ``path`` is a regular file (symlinks followed)."""
    import stat
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise NotARegularFile(f"{kind}, not an image file; it was not opened")


def to_rgb(im):
    """A PIL image as 8-bit RGB; 16- and 32-bit integer greyscale (PNG/TIFF "I;16", "I") scaled to
    0..255 by their bit depth instead of clipped (``convert("RGB")`` clips them to white)."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "I" and arr.max(initial=0) > 65535:
            top = float(2 ** 32 - 1)
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def collate(batch: Sequence[Tuple[torch.Tensor, str, bool, str]]):
    """Stack a batch into ``(images (B,3,H,W), paths, ok (B,) bool tensor, reasons)``, plus
    ``labels`` (a list) when the dataset gives them."""
    images, paths, ok, reasons, *labels = zip(*batch)
    out = (torch.stack(images), list(paths), torch.tensor(ok, dtype=torch.bool), list(reasons))
    return out + (list(labels[0]),) if labels else out


def make_loader(paths: Sequence[str], transform, batch_size: int = 32, workers: int = 0,
                labels: Optional[Sequence[str]] = None, pin_memory: bool = False,
                prefetch: Optional[int] = None) -> DataLoader:
    """A DataLoader over :class:`ImageDataset` in path order, yielding ``(images, paths, ok, reasons)``,
    or ``(images, paths, ok, reasons, labels)`` when ``labels`` (one class label per path) are given.

    ``pin_memory`` (for a CUDA model: batches arrive page-locked, copied asynchronously) and
    ``prefetch`` (batches loaded ahead per worker) are passed on to the DataLoader."""
    dataset = ImageDataset(paths, transform) if labels is None else LabelledImageDataset(paths, labels, transform)
    workers = max(0, int(workers))
    extra = {"prefetch_factor": int(prefetch)} if prefetch and workers > 0 else {}
    return DataLoader(dataset, batch_size=max(1, int(batch_size)), shuffle=False,
                      num_workers=workers, collate_fn=collate, drop_last=False, pin_memory=bool(pin_memory),
                      persistent_workers=False, **extra)


def default_workers() -> int:
    """Decoding processes for ``qkprobe run``: one per usable CPU core but one (for the main
    process), at most 16; 0 (decode in the main process) on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(cores - 1, 16)


# ----------------------------------------------------------------------------- class labels

class LabelledImageDataset(ImageDataset):
    """:class:`ImageDataset` whose items end with the image's class label: ``(tensor, path, ok, reason, label)``."""

    def __init__(self, paths: Sequence[str], labels: Sequence[str], transform=None):
        super().__init__(paths, transform)
        if len(labels) != len(self.paths):
            raise QKProbeError(f"Got {len(labels)} labels for {len(self.paths)} images; give one label per image.")
        self.labels = ["" if v is None else str(v) for v in labels]

    def __getitem__(self, i: int):
        return (*super().__getitem__(i), self.labels[i])


def folder_labels(paths: Sequence[str], images_dir: str) -> Optional[List[str]]:
    """Class labels of the ImageFolder layout (``images_dir/<class>/.../image``): the name of each
    image's top-level sub-folder. None when any image lies directly in ``images_dir``."""
    root = os.path.expanduser(str(images_dir))
    labels = []
    for p in paths:
        parts = os.path.relpath(p, root).split(os.sep)
        if len(parts) < 2 or parts[0] in (os.curdir, os.pardir):
            return None
        labels.append(parts[0])
    return labels


def list_file_labels(list_file: str) -> Optional[List[str]]:
    """The labels of a list file of ``path<TAB>label`` lines, aligned with ``list_images(list_file=...)``
    ("" for a line without a label); None when no line has one."""
    with open(os.path.expanduser(str(list_file)), encoding="utf-8") as fh:
        lines = [ln.rstrip("\r\n") for ln in fh]
    labels = [ln.split("\t", 1)[1].strip() if "\t" in ln else "" for ln in lines
              if ln.split("\t", 1)[0].strip() and not ln.strip().startswith("#")]
    return labels if any(labels) else None


def labels_file(path: str) -> Dict[str, str]:
    """``path<TAB>label`` lines (blank and ``#`` lines skipped, relative paths from the file's folder)
    as {absolute normalized path: label}."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise QKProbeError(f"The labels file {path} does not exist; pass a text file of path<TAB>label lines.")
    base = os.path.dirname(os.path.abspath(path))
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for number, ln in enumerate(fh, 1):
            ln = ln.rstrip("\r\n")
            if not ln.strip() or ln.strip().startswith("#"):
                continue
            if "\t" not in ln:
                raise QKProbeError(f"Line {number} of the labels file {path} has no tab; write path<TAB>label.")
            image, label = (t.strip() for t in ln.split("\t", 1))
            out[_norm(os.path.join(base, os.path.expanduser(image)))] = label
    return out


def labels_for(paths: Sequence[str], table: Dict[str, str]) -> List[str]:
    """The label of each path in a :func:`labels_file` table ("" where it has none)."""
    return [table.get(_norm(p), "") for p in paths]


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _skimage_array(name: str):
    import skimage.data as sd

    if name == "motorcycle_left":
        return sd.stereo_motorcycle()[0]
    return getattr(sd, name)()


def skimage_images(out_dir: str) -> List[str]:
    """Write scikit-image's bundled photographs as RGB PNGs into ``out_dir`` and return their paths.

    Files already there are kept as they are; the default image set of ``qkprobe run``.
    """
    import numpy as np
    from PIL import Image

    out_dir = os.path.expanduser(str(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in _SKIMAGE_PHOTOS:
        path = os.path.join(out_dir, f"{name}.png")
        if not os.path.isfile(path):
            try:
                arr = np.asarray(_skimage_array(name))
            except Exception:  # noqa: BLE001 - an image a scikit-image version lacks is left out
                continue
            if arr.dtype != np.uint8:
                arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
            tmp = f"{path}.{os.getpid()}.tmp"
            Image.fromarray(arr).convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, path)  # never leave a half-written PNG behind
        paths.append(path)
    if not paths:
        raise QKProbeError(f"No scikit-image sample photograph could be written to {out_dir}; "
                           f"pass your own images with --images.")
    return paths
