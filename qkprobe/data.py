"""Image sets for ``qkprobe run``: file listing, a fault-tolerant dataset, a loader, bundled photos.

A corrupt or unreadable image never stops a run: :class:`ImageDataset` returns a zero tensor with
``ok=False`` and the reason, and the caller records the image as skipped.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import QKProbeError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "list_images", "skimage_images", "make_loader",
           "collate"]

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
            lines = [ln.strip() for ln in fh]
        paths = [ln if os.path.isabs(os.path.expanduser(ln)) else os.path.join(base, ln)
                 for ln in lines if ln and not ln.startswith("#")]
        paths = [os.path.expanduser(p) for p in paths]
        if not paths:
            raise QKProbeError(f"The image list file {list_file} lists no images; write one image path "
                               f"a line.")
        return paths
    images_dir = os.path.expanduser(str(images_dir))
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
            with Image.open(path) as im:
                im.seek(0)  # first frame of a GIF or multi-page TIFF
                rgb = im.convert("RGB")  # convert() forces a full decode, so truncation shows here
            x = self.transform(rgb)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"the transform returned {type(x).__name__}, not a tensor")
            return x, path, True, ""
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, not fatal
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return self.blank(), path, False, reason


def collate(batch: Sequence[Tuple[torch.Tensor, str, bool, str]]):
    """Stack a batch into ``(images (B,3,H,W), paths, ok (B,) bool tensor, reasons)``."""
    images, paths, ok, reasons = zip(*batch)
    return torch.stack(images), list(paths), torch.tensor(ok, dtype=torch.bool), list(reasons)


def make_loader(paths: Sequence[str], transform, batch_size: int = 32, workers: int = 0,
                pin_memory: bool = False, prefetch: Optional[int] = None) -> DataLoader:
    """A DataLoader over :class:`ImageDataset` in path order, yielding ``(images, paths, ok, reasons)``.

    ``pin_memory`` (for a CUDA model: batches arrive page-locked, copied asynchronously) and
    ``prefetch`` (batches loaded ahead per worker) are passed on to the DataLoader."""
    workers = max(0, int(workers))
    extra = {"prefetch_factor": int(prefetch)} if prefetch and workers > 0 else {}
    return DataLoader(ImageDataset(paths, transform), batch_size=max(1, int(batch_size)), shuffle=False,
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
