"""torch.distributed: one shard file per rank, merged into one run file by rank 0.

Under DDP (or any initialized process group) ``qkprobe.attach(model, "run.h5")`` writes
``run.rank<k>.h5`` on rank k; at ``close()`` all ranks meet at a barrier and rank 0 writes
``run.h5``: an HDF5 file of the same schema whose per-sample rows are virtual datasets over the
committed rows of every shard (relative paths, so the folder can move), with ids and steps copied
and top-k and aggregates merged exactly. PyPI h5py has no MPI, so no rank writes another's file.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Sequence, TypeVar

from .sinks.merge import MergeResult, merge_shards  # noqa: F401  (merging lives with the run-file reader)

T = TypeVar("T")


def is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    import torch.distributed as dist
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_path(out: str, rank: int) -> str:
    """``run.h5`` → ``run.rank3.h5`` (same folder)."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.rank{rank}{ext or '.h5'}"


def split(items: Sequence[T], rank: int, world: int) -> List[T]:
    """This rank's share of ``items``: every world-th item from ``rank`` (disjoint, complete)."""
    return list(items[rank::world])


def shard_paths(out: str) -> Dict[int, str]:
    """The shard files of ``out`` that exist: rank → path (``run.rank<k>.h5`` next to ``run.h5``)."""
    stem, ext = os.path.splitext(out)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"\.rank(\d+)" + re.escape(ext or ".h5") + "$")
    folder = os.path.dirname(os.path.abspath(out))
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(os.path.dirname(out), name)
    return dict(sorted(found.items()))


def finish_shards(out: str, rank: int, world: int) -> None:
    """Barrier, then rank 0 merges the shards into ``out``; a second barrier so no rank leaves
    before the merged file exists. A failed merge is raised on rank 0 after the second barrier
    (the other ranks do not hang); the shards stay, and ``qkprobe merge`` can be run again."""
    import torch.distributed as dist
    dist.barrier()
    error = None
    if rank == 0:
        try:
            merge_shards([shard_path(out, r) for r in range(world)], out)
        except Exception as exc:  # noqa: BLE001 - raised below, after the barrier
            error = exc
    dist.barrier()
    if error is not None:
        raise error
