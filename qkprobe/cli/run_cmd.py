"""``qkprobe run`` over an image set, ``qkprobe inspect`` and ``qkprobe recover`` of run files."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import RunFileError
from .common import (add_model_args, add_transform_args, check_at_least, check_device, check_out_file,
                     load_from_args, make_out_folder, transform_from_args)


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="record per-mode statistics over an image set into a run file")
    add_model_args(p)
    p.add_argument("--out", required=True, help="HDF5 run file (its folder is created if missing)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of images (recursive); default: scikit-image's photographs")
    src.add_argument("--list", help="text file with one image path per line (path<TAB>label lines give class "
                                    "labels)")
    src.add_argument("--text", help="sentences for a text model (hf: with a tokenizer): one a line, or JSON "
                                    "lines (.jsonl, or with --text-field)")
    p.add_argument("--text-field", help="the JSON field holding each sentence of a --text JSONL file (default: text)")
    p.add_argument("--labels", help="text file of path<TAB>label lines: the class label stored with each image "
                                    "(default: the class sub-folders of --images, ImageFolder layout, or the "
                                    "labels of a --list file)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu); on CUDA the statistics "
                                                   "run in Triton kernels")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: one per CPU core but one, at most 16)")
    p.add_argument("--resume", action="store_true", help="continue a killed run: write exactly the missing images")
    p.add_argument("--topk", type=int, default=16, help="optimal images kept per layer, head, mode and sign "
                                                        "(default 16)")
    p.add_argument("--topk-mean", type=int, default=5, help="k of the top-k-mean statistics")
    p.add_argument("--no-per-sample", action="store_true", help="store only aggregates and top-k, not per-image rows")
    p.add_argument("--include-prefix", action="store_true", help="keep cls/register tokens in the maps")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                   help="precision of the stored per-image statistics (default float32)")
    p.add_argument("--stats", help="'all', or comma-separated statistics to store (default: the map statistics "
                                   "and scores; 'all' adds attn_contrib,attn_share, one more attention pass "
                                   "per layer)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton"],
                   help="who computes the statistics: auto (Triton on CUDA, compiled C kernels on the CPU), "
                        "or force one")
    p.add_argument("--snapshot-every", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between snapshots of the top-k and aggregates (rows are committed every batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print the committed row count after every batch")
    add_transform_args(p)
    p.set_defaults(func=run)

    p = sub.add_parser("inspect", help="print what a qkprobe file holds: run, bases, model zoo or ablation")
    p.add_argument("file", help="a file written by qkprobe run, bases or ablate")
    p.set_defaults(func=inspect)

    p = sub.add_parser("recover", help="make a run file left open by a crash readable again")
    p.add_argument("file", help="the run file to recover")
    p.add_argument("--force", action="store_true",
                   help="recover even if the writer recorded in the file seems alive (pid reused)")
    p.set_defaults(func=recover)


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qkprobe", "skimage")


def image_paths(args, what: str) -> list:
    """The images of ``--images`` / ``--list``, else scikit-image's photographs (cached); one
    sentence when there are none (``what``: "run on", "ablate on")."""
    from ..data import list_images, skimage_images
    if args.images or args.list:
        paths = list_images(images_dir=args.images, list_file=args.list)
    else:
        paths = skimage_images(_cache_dir())
    if not paths:
        raise RunFileError(f"Found no images to {what}; check --images or --list.")
    return paths


def _check_options(args) -> None:
    """Every option of ``qkprobe run``, before a model is loaded or a file written."""
    check_at_least(args, 1, "--batch-size", "--topk", "--topk-mean")
    check_at_least(args, 0, "--workers")
    check_device(args.device)
    check_out_file(args.out)


def _check_out(args, group=None) -> None:
    if group is not None:
        return _check_out_distributed(args, group)
    shards = _metadata(args.out).get("merged_from") if args.resume and os.path.exists(args.out) else None
    if shards:
        raise RunFileError(f"{args.out} was merged from {len(shards)} shards; resume it under torchrun with "
                           f"--nproc_per_node {len(shards)}.")
    if os.path.exists(args.out) and not args.resume:
        raise RunFileError(f"{args.out} already exists; pass --resume to continue it or choose another --out.")
    if args.resume and not os.path.exists(args.out):
        raise RunFileError(f"There is no {args.out} to resume; run without --resume to start it.")


def _stats_option(text: Optional[str]):
    """--stats: None (default set), "all", or a comma-separated list of names."""
    if not text:
        return None
    return "all" if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]


def _loader_options(workers: Optional[int], cuda: bool) -> dict:
    """DataLoader settings: workers from the machine unless given; on CUDA pinned batches and a
    deeper prefetch, so decoding and the host→device copy overlap the forward pass."""
    from ..data import default_workers
    workers = default_workers() if workers is None else max(0, int(workers))
    return {"workers": workers, "pin_memory": cuda, "prefetch": 4 if cuda and workers > 0 else None}


def _check_resumable(path: str, meta: dict, options: dict) -> None:
    from ..sinks.hdf5_writer import read_metadata
    old = read_metadata(path)
    for key in ("model_spec", "weights_hash"):
        if str(old.get(key)) != str(meta[key]):
            raise RunFileError(f"Cannot resume {path}: it was made with {key} {old.get(key)!r}, not {meta[key]!r}; "
                               f"use the same model and weights or start a new file.")
    old_tf, new_tf = old.get("transform_overrides"), meta.get("transform_overrides")
    old_tf = json.loads(old_tf) if isinstance(old_tf, str) else old_tf
    if (old_tf or None) != (new_tf or None):
        raise RunFileError(f"Cannot resume {path}: it was made with the preprocessing overrides {old_tf or 'none'}, "
                           f"not {new_tf or 'none'}; pass the same --image-size/--mean/--std or start a new file.")
    old_opts = old.get("options")
    old_opts = json.loads(old_opts) if isinstance(old_opts, str) else old_opts
    if old_opts != options:
        diff = sorted(k for k in set(old_opts or {}) | set(options) if (old_opts or {}).get(k) != options.get(k))
        raise RunFileError(f"Cannot resume {path}: its options differ in {', '.join(diff)}; "
                           f"pass the options it was started with or start a new file.")


# ---- torchrun: one shard per rank, merged by rank 0 (qkprobe/distributed.py) -------------------

@dataclass
class _Group:
    rank: int
    world: int
    owned: bool   # this command initialized the process group (and destroys it)


def _start_distributed(args) -> Optional[_Group]:
    """Under torchrun (RANK, WORLD_SIZE > 1, LOCAL_RANK set): join the process group, gloo on CPU,
    nccl with a CUDA --device (bare ``cuda`` becomes ``cuda:<LOCAL_RANK>``). None otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "RANK" not in os.environ:
        return None
    import torch
    import torch.distributed as dist
    cuda = str(args.device).startswith("cuda")
    if cuda:
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _Group(dist.get_rank(), dist.get_world_size(), owned)


def _stop_distributed(group: Optional[_Group]) -> None:
    if group is not None and group.owned:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _metadata(path: str) -> dict:
    from ..sinks.hdf5_writer import read_metadata
    return read_metadata(path)


def wrote_line(written: int, noun: str, unit: str, out: str, before: Optional[int], rate: float) -> str:
    """The closing line of a run: what this invocation wrote (not the file's total), and with a
    resume how many were there already."""
    already = f"; {before} were there already" if before is not None else ""
    return f"wrote {written} {noun} to {out}{already} ({rate:.1f} {unit}/s)"


def probe_options(args):
    """The probe's ``ProbeOptions`` from ``qkprobe run``'s arguments (images and --text alike)."""
    from ..capture.probe import ProbeOptions
    return ProbeOptions(top_samples=args.topk, topk=args.topk_mean, per_sample=not args.no_per_sample,
                        include_prefix=args.include_prefix, store_dtype=args.store_dtype,
                        stats=_stats_option(args.stats), backend=args.backend, snapshot_every_s=args.snapshot_every)


def _check_out_distributed(args, group: _Group) -> None:
    from ..distributed import shard_paths
    shards = shard_paths(args.out)
    if not args.resume:
        existing = ([args.out] if os.path.exists(args.out) else []) + list(shards.values())
        if existing:
            raise RunFileError(f"{existing[0]} already exists; pass --resume to continue it or choose "
                               f"another --out.")
        return
    if not shards and not os.path.exists(args.out):
        raise RunFileError(f"There is no {args.out} nor any of its shards to resume; run without --resume to "
                           f"start it.")
    if os.path.exists(args.out) and "merged_from" not in _metadata(args.out):
        raise RunFileError(f"{args.out} was written by a single process; resume it without torchrun.")
    extra = [r for r in shards if r >= group.world]
    if extra:
        raise RunFileError(f"{args.out} has a shard of rank {max(extra)}, more ranks than the {group.world} "
                           f"of this run; resume it with --nproc_per_node {max(extra) + 1}.")


def _done_in_shards(args, meta: dict, options: dict) -> set:
    """Ids (and skipped inputs) committed in any shard of ``args.out``: every rank skips them,
    so a resume writes each missing image exactly once whichever rank had it before."""
    from ..distributed import shard_paths
    from ..sinks.run_file import open_run
    done = set()
    for path in shard_paths(args.out).values():
        _check_resumable(path, meta, options)
        with open_run(path) as run:
            done.update(run.ids)
            done.update(s for s, _ in run.skipped)
    return done


def _ids_for(args, paths: list, meta: dict, done: set) -> dict:
    """path → sample id (relative to the image root, recorded in ``meta["image_root"]``).

    A file from before image roots were recorded holds paths as ids: they are matched by the
    absolute path they name, so such a file resumes without counting an image twice. A resume
    that matches none of the committed ids stops: it would only add a second image set.
    """
    from ..data import image_ids

    recorded = _recorded_root(args) if done else None
    images_dir = args.images if args.images or args.list else None
    if images_dir is None and not args.list:
        images_dir = _cache_dir()
    if recorded:  # a resume: ids relative to the root the file recorded, however the images are given now
        root, ids = image_ids(paths, root=recorded)
    else:
        root, ids = image_ids(paths, images_dir=images_dir)
    meta["image_root"] = root
    id_of = dict(zip(paths, ids))
    if done and recorded is None:      # ids that are paths: compare the files they name
        by_path = {os.path.realpath(i): i for i in done}
        id_of = {p: by_path.get(os.path.realpath(p), i) for p, i in id_of.items()}
    if done and not done.intersection(id_of.values()):
        raise RunFileError(f"None of the {len(paths)} images given is among the {len(done)} already in {args.out}; "
                           f"resume with the images the run started with, or write a new file with another --out.")
    return id_of


def _recorded_root(args):
    from ..distributed import shard_paths
    files = [args.out] if os.path.exists(args.out) else list(shard_paths(args.out).values())[:1]
    return _metadata(files[0]).get("image_root") if files else None


def run(args) -> int:
    _check_options(args)
    if args.text or args.text_field:   # sentences for a text model: qkprobe/cli/text_cmd.py
        from .text_cmd import run_text
        return run_text(args)
    group = _start_distributed(args)
    try:
        return _run(args, group)
    finally:
        _stop_distributed(group)


def _run(args, group: Optional[_Group]) -> int:
    import torch
    from tqdm import tqdm

    from ..capture.probe import attach
    from ..data import make_loader
    from ..distributed import split
    from ..metadata import versions

    _check_out(args, group)
    paths = image_paths(args, "run on")
    make_out_folder(args.out)
    label_of = _image_labels(args, paths)
    model, transform, meta = load_from_args(args, device=args.device)
    transform = transform_from_args(transform, args, meta)
    if transform is None or not callable(transform) or hasattr(transform, "tokenize"):
        raise RunFileError(f"{args.spec} has no image preprocessing, so it cannot run on images; for a text model "
                           f"pass its sentences with --text FILE (one a line).")
    options = probe_options(args)
    meta["versions"] = versions()
    done = set()
    total, rows_before = len(paths), 0
    if group is not None:
        import torch.distributed as dist
        if args.resume:
            done = _done_in_shards(args, meta, options.record())
        id_of = _ids_for(args, paths, meta, done)
        paths = [p for p in paths if id_of[p] not in done]
        todo = len(paths)
        paths = split(paths, group.rank, group.world)
        dist.barrier()   # every rank has checked and read the shards before any opens its own
    elif args.resume:
        _check_resumable(args.out, meta, options.record())
        from ..sinks.run_file import open_run
        with open_run(args.out) as done_run:
            done = set(done_run.ids) | {s for s, _ in done_run.skipped}
            rows_before = len(done_run.ids)
        id_of = _ids_for(args, paths, meta, done)
        paths = [p for p in paths if id_of[p] not in done]
    else:
        id_of = _ids_for(args, paths, meta, done)
    if group is None or group.rank == 0:
        print(f"{len(paths) if group is None else todo} new images, {total - (len(paths) if group is None else todo)} "
              f"already in {args.out}", flush=True)
    probe = attach(model, args.out, options=options, metadata=meta, resume=args.resume,
                   chunk_rows=min(max(args.batch_size, 8), 256))
    loader = make_loader(paths, transform, batch_size=args.batch_size,
                         labels=None if label_of is None else [label_of.get(p, "") for p in paths],
                         **_loader_options(args.workers, str(args.device).startswith("cuda")))
    t0, seen, written = time.perf_counter(), 0, 0   # written: rows this invocation added
    lead = group is None or group.rank == 0
    bar = tqdm(total=len(paths), unit="img", disable=args.no_progress or not lead, desc="qkprobe run")
    try:
        with torch.no_grad():
            for images, batch_paths, ok, reasons, *batch_labels in loader:
                for p, good, why in zip(batch_paths, ok.tolist(), reasons):
                    if not good:
                        probe.skip(id_of[p], why)
                        bar.write(f"warning: skipped {p}: {why}", file=sys.stderr)
                keep = [i for i, good in enumerate(ok.tolist()) if good]
                written += len(keep)
                if keep:
                    probe.set_ids([id_of[batch_paths[i]] for i in keep],
                                  labels=[batch_labels[0][i] for i in keep] if batch_labels else None)
                    images = images if len(keep) == len(batch_paths) else images[keep]
                    model(images.to(args.device, non_blocking=True))
                seen += len(batch_paths)
                if args.verbose:
                    where = "" if group is None else f"rank {group.rank} "
                    print(f"{where}committed {probe.writer.acknowledged}", flush=True)
                bar.update(len(batch_paths))
                bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    finally:
        bar.close()
        probe.close()   # under torchrun: barrier, rank 0 merges the shards into args.out
    for name, count in probe.nonfinite().items():
        print(f"warning: {count} non-finite mode coordinates (NaN/Inf activations) in {name}; "
              f"counted in the file, the run went on", file=sys.stderr)
    if group is None:
        print(wrote_line(written, "images", "img", args.out, rows_before if args.resume else None,
                         seen / (time.perf_counter() - t0)))
    elif group.rank == 0:
        from ..sinks.run_file import open_run
        with open_run(args.out) as merged:
            rows = len(merged)
        print(f"wrote {rows} images to {args.out} from {group.world} ranks "
              f"({todo / (time.perf_counter() - t0):.1f} img/s)")
    return 0


def _image_labels(args, paths):
    """{path: class label} from --labels, the tabs of a --list file or the class sub-folders of
    --images (ImageFolder layout); None when the images have no labels."""
    from ..data import folder_labels, labels_file, labels_for, list_file_labels
    if getattr(args, "labels", None):
        labels, source = labels_for(paths, labels_file(args.labels)), f"the labels file {args.labels}"
    elif args.list:
        labels, source = list_file_labels(args.list), "the list file"
    elif args.images:
        labels, source = folder_labels(paths, args.images), "class sub-folders"
    else:
        labels = None
    if not labels or not any(labels):
        return None
    classes = {v for v in labels if v}
    missing = sum(1 for v in labels if not v)
    print(f"labels: {len(classes)} classes over {len(labels) - missing} images, from {source}"
          + (f" ({missing} images without a label)" if missing else ""), file=sys.stderr)
    return dict(zip(paths, labels))


def inspect(args) -> int:
    from .inspect_cmd import inspect_file
    inspect_file(args.file)
    return 0


def recover(args) -> int:
    from ..sinks.recover import recover as do_recover
    rows = do_recover(args.file, force=args.force)
    print(f"{args.file}: readable, {rows} committed rows kept")
    return 0
