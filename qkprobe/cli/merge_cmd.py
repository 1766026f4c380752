"""``qkprobe merge SHARDS... --out F``: merge the shard files of a torchrun run by hand.

``qkprobe run`` and ``qkprobe.attach`` under torchrun merge at the end by themselves; this is for
a run whose ranks did not all finish (a dead rank), or to merge again while shards grow.
"""

from __future__ import annotations


def add_parsers(sub) -> None:
    p = sub.add_parser("merge", help="merge the per-rank shard files of a torchrun run into one run file")
    p.add_argument("shards", nargs="+", help="shard files (run.rank0.h5 run.rank1.h5 ...), in rank order")
    p.add_argument("--out", required=True, help="merged run file to write (a previous merge is replaced; its folder "
                                                "is created if missing)")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge the shards that can be read, leaving out missing or unreadable ones")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sinks.merge import merge_shards
    from .common import check_out_file, make_out_folder

    check_out_file(args.out)
    make_out_folder(args.out)
    result = merge_shards(args.shards, args.out, allow_missing=args.allow_missing)
    for _path, reason in result.missing:
        print(f"left out: {reason}")
    for path in result.unclosed:
        rows = result.rows_per_shard[result.shards.index(path)]
        print(f"short: {path} was not closed by its writer (killed, or still writing); merged its {rows} "
              f"committed rows")
    print(f"merged {result.rows} rows from {len(result.shards)} shards into {args.out}")
    return 0
