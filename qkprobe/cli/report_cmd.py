"""``qkprobe report``: an HTML page of the paper's figures from one or more run files."""

from __future__ import annotations

import argparse

from ..errors import QKProbeError


def _heads(text: str):
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer, head = part.split(":")
            out.append((int(layer), int(head)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes LAYER:HEAD pairs separated by commas, like 3:1,7:0; "
                                             f"got {part!r}") from None
    return out


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="write an HTML page of the paper's figures from qkprobe files")
    p.add_argument("files", nargs="+", metavar="FILE.h5",
                   help="files of qkprobe run (everything), bases or a model zoo (layer curves and spectra) and "
                        "ablate (the section on removing modes), in any mix; layer curves compare them all")
    p.add_argument("--out", required=True, help="output folder (index.html and figures/ are written there; "
                                                "created with its parents)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="short label of a file in legends and titles (default: its model spec); give one "
                        "--name per file, in the order of the files")
    p.add_argument("--heads", type=_heads, default=None, metavar="L:H,...",
                   help="heads whose optimal images are shown, in every file (default: the most extreme "
                        "S-weighted cosines and one head each from early, middle and late layers)")
    p.add_argument("--extreme", type=int, default=1, help="how many most positive and most negative heads (default 1)")
    p.add_argument("--modes", type=int, default=2, help="top modes per chosen head (default 2)")
    p.add_argument("--topk", type=int, default=4, help="optimal images shown per mode and sign (default 4)")
    p.add_argument("--no-maps", action="store_true", help="do not rebuild the model to draw query/key maps")
    p.add_argument("--image-root", help="folder to look for images that moved since the run")
    p.add_argument("--device", default="cpu", help="device for recomputing the maps: cpu, cuda, cuda:N or mps "
                                                    "(default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help="open the page in headless Chromium; fail on console errors or images that do not load")
    p.add_argument("--screenshot", help="also save a PNG screenshot of the page (needs Chromium)")
    p.add_argument("--force", action="store_true", help="replace an index.html in --out that qkprobe did not write")
    p.set_defaults(func=report)


def report(args) -> int:
    from ..report.build import build_report
    for n, name in ((args.modes, "--modes"), (args.topk, "--topk")):
        if n < 1:
            raise QKProbeError(f"{name} must be at least 1.")
    from .common import check_device
    check_device(args.device)
    index = build_report(args.files, args.out, heads=args.heads, n_extreme=max(0, args.extreme), n_modes=args.modes,
                         topk=args.topk, maps=not args.no_maps, image_root=args.image_root, device=args.device,
                         progress=not args.no_progress, force=args.force, names=args.name)
    print(f"wrote {index}")
    if args.check or args.screenshot:
        from ..report.browser import check_page
        check = check_page(index, screenshot=args.screenshot)
        if args.screenshot:
            print(f"wrote {args.screenshot}")
        if not check.ok:
            problems = check.console_errors + [f"image did not load: {s}" for s in check.broken_images]
            raise QKProbeError(f"The page has {len(problems)} problem(s) in Chromium, first: {problems[0]}")
        print(f"checked in Chromium: {len(check.images)} images loaded, no console errors")
    return 0
