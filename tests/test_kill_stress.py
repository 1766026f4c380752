"""The crash promise under many kill -9 at uniformly random moments of a run's whole life.

Two fork servers (this file run as a script; one per core of a CI machine) each load torch, a
tiny ViT and qkprobe once, record uninterrupted runs (the reference, and the median lifetime of
a child from fork to exit: file creation, batches, snapshots, commits, close). Then, for their
share of KILLS, they fork a child that records the same run into a new file through the probe
(``qkprobe.attach``: the writer path of ``qkprobe run``), SIGKILL it after a delay drawn
uniformly over that lifetime, and

1. open the file (``open_run``; when that asks for ``qkprobe recover``, ``recover`` and open it
   again; anything else is a broken promise) and check its committed rows: whole batches, ids
   and statistics equal to the reference's first rows;
2. resume it to completion in another forked child (``attach(..., resume=True)``, which
   recovers a file its writer left open first); of the kills before the file existed, every
   fourth is resumed too (a plain run over a killed creation's leftovers);
3. compare the result with the reference: the same ids in the same order (no duplicates), the
   same rows, top-k (scores and sample indices), counts, minima, maxima and non-finite counters
   equal, means and M2 equal up to float64 rounding.

They print one line per kill, ``kill REP OUTCOME ROWS PROBLEM``: OUTCOME is ``opens``,
``recovered``, ``absent`` (killed before the file got its name) or ``broken``; ROWS the committed
rows; PROBLEM ``-`` or what went wrong. ``QKPROBE_STRESS_KILLS`` sets the number of kills
(default 200).

    python tests/test_kill_stress.py FOLDER KILLS SEED
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HELPERS = Path(__file__).resolve().parent / "helpers"
KILLS = int(os.environ.get("QKPROBE_STRESS_KILLS", "200"))
SERVERS = 2
BATCHES = 6
SNAPSHOT_S = 0.02   # several snapshots per run, so kills land between them and inside them
EXACT = ("topk_scores", "topk_index", "agg_count", "agg_min", "agg_max", "agg_nonfinite", "nonfinite_values")
ROUNDED = ("agg_mean", "agg_m2")   # a resume replays rows in other groups: float64 rounding


def test_kill_9_at_uniformly_random_moments_then_recover_and_resume(tmp_path):
    # one fork server per core (CI has two): each kills its share of the runs
    servers = []
    for i in range(SERVERS):
        folder = tmp_path / f"server{i}"
        folder.mkdir()
        share = KILLS // SERVERS + (i < KILLS % SERVERS)
        servers.append(subprocess.Popen([sys.executable, __file__, str(folder), str(share), str(11 + i)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    kills = []
    for proc in servers:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        kills += [line.split(maxsplit=4)[1:] for line in out.splitlines() if line.startswith("kill ")]
    assert len(kills) == KILLS
    broken = [k for k in kills if k[1] == "broken" or k[3] != "-"]
    outcomes = Counter(k[1] for k in kills)
    rows = Counter(int(k[2]) for k in kills if k[1] != "absent")
    print(f"{KILLS} kills: {dict(outcomes)}; committed rows of the files: {dict(sorted(rows.items()))}")
    assert not broken, "\n".join(" ".join(k) for k in broken[:10])
    # the kills landed all over the run: before the file existed, mid-way, at or after the close
    assert outcomes["absent"] >= 1 and rows[BATCHES * 2] >= 1 and len(rows) >= BATCHES // 2


def test_no_metadata_block_a_commit_rewrites_straddles_a_page(tmp_path):
    """A commit rewrites metadata blocks in place (headers of the growing datasets, their chunk
    index); a kill -9 inside such a ``pwrite`` keeps whole memory pages only, so a block across a
    page boundary can be left half new, half old, with a bad checksum (issue 17's damaged file:
    ``layers/01/sample``'s 268-byte header across byte 450,560). Run files allocate in 4 KiB pages
    (no block smaller than a page straddles one) and index the chunks of ``stats`` with a B-tree
    of small nodes (an extensible array's data blocks outgrow a page)."""
    sys.path.insert(0, str(HELPERS))
    import sink_rows

    from qkprobe.sinks import schema
    from qkprobe.sinks.hdf5_writer import RunWriter
    dims = [(2, 4), (3, 16), (2, 8), (4, 4), (1, 32), (2, 2)]
    path = tmp_path / "run.h5"
    with RunWriter(path, sink_rows.layer_specs(dims), sink_rows.STAT_NAMES, sink_rows.METADATA) as writer:
        for b in range(6):
            writer.write(**sink_rows.batch(4 * b, 4, b, dims))
    headers = _object_headers(path)
    blocks = [block for blocks, _ in headers.values() for block in blocks]
    assert len(blocks) > 50
    straddling = [(at, n) for at, n in blocks if at // PAGE != (at + n - 1) // PAGE]
    assert not straddling, f"object header blocks across a {PAGE}-byte page: {straddling}"
    for i in range(len(dims)):
        index = _chunk_index(headers[f"/{schema.layer_path(i, len(dims))}/{schema.STATS}"][1])
        assert index == BTREE2, f"layers/{i}/stats: chunk index type {index}, not a version 2 B-tree"


PAGE = 4096
BTREE2 = 5   # chunk indexing type of a version 4 layout message (4: extensible array)


def _object_headers(path) -> dict:
    """name → ([(address, length) of each header block], [(type, body) of each message])."""
    import h5py
    names = {}
    with h5py.File(path, "r") as f:
        names["/"] = h5py.h5o.get_info(f.id).addr
        f.visititems(lambda name, obj: names.update({"/" + name: h5py.h5o.get_info(obj.id).addr}))
    out = {}
    with open(path, "rb") as fh:
        for name, at in names.items():
            fh.seek(at)
            head = fh.read(4 + 1 + 1 + 16 + 4 + 8)
            assert head[:4] == b"OHDR", head[:4]
            flags = head[5]
            pos = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
            width = 1 << (flags & 3)
            size = int.from_bytes(head[pos:pos + width], "little")
            start = pos + width
            fh.seek(at)
            block = fh.read(start + size + 4)
            blocks, messages = [(at, len(block))], []
            _read_messages(fh, block[start:start + size], flags, blocks, messages)
            out[name] = (blocks, messages)
    return out


def _read_messages(fh, chunk: bytes, flags: int, blocks: list, messages: list) -> None:
    """Collect a header chunk's messages, following continuations (OCHK blocks)."""
    pos = 0
    while pos + 4 <= len(chunk):
        kind, size = chunk[pos], int.from_bytes(chunk[pos + 1:pos + 3], "little")
        pos += 4 + (2 if flags & 0x04 else 0)
        body = chunk[pos:pos + size]
        messages.append((kind, body))
        if kind == 0x10:   # continuation: address and length of the next chunk
            at, length = (int.from_bytes(body[i:i + 8], "little") for i in (0, 8))
            blocks.append((at, length))
            fh.seek(at)
            block = fh.read(length)
            assert block[:4] == b"OCHK", block[:4]
            _read_messages(fh, block[4:-4], flags, blocks, messages)
        pos += size


def _chunk_index(messages: list) -> int:
    """The chunk indexing type of a chunked dataset's layout message (version 4)."""
    body = next(body for kind, body in messages if kind == 0x08)
    assert body[0] == 4 and body[1] == 2, "not a version 4 chunked layout"
    rank, width = body[3], body[4]
    return body[5 + rank * width]


# ------------------------------------------------------------------------------- the fork server

def _serve(folder: str, kills: int, seed: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HELPERS))
    import torch

    import probe_kill as pk
    torch.set_num_threads(1)
    model, batches = pk.make_model(), pk.make_batches()[:BATCHES]
    import qkprobe
    # the bases are computed once: each child spends its time on the file, not on an SVD
    record = functools.partial(_record, model, batches, bases=qkprobe.compute_bases(model))
    record(os.path.join(folder, "warm.h5"))   # imports and kernels: before the forks
    lives = []
    for i in range(3):   # the reference run, and the lifetime of an uninterrupted child (median of 3)
        start = time.perf_counter()
        _wait(_fork(functools.partial(record, os.path.join(folder, f"ref{i}.h5"))), "an uninterrupted run")
        lives.append(time.perf_counter() - start)
    lifetime = sorted(lives)[1]
    expected = _contents(os.path.join(folder, "ref0.h5"))
    print(f"lifetime {lifetime:.3f} s", flush=True)
    rng = random.Random(seed)
    for rep in range(kills):
        path = os.path.join(folder, f"k{rep}.h5")
        pid = _fork(functools.partial(record, path))
        time.sleep(rng.uniform(0.0, lifetime))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome, rows, problem = _after_kill(path, expected)
        absent_turn = outcome == "absent" and rep % 4 == 0   # a plain run, but leftovers of a killed creation
        if problem == "-" and (outcome in ("opens", "recovered") or absent_turn):
            problem = _resume_and_compare(record, path, expected)
        print(f"kill {rep} {outcome} {rows} {problem}", flush=True)
        if problem == "-" and os.path.exists(path):
            os.unlink(path)


def _record(model, batches, path: str, resume: bool = False, bases=None) -> None:
    """Record the batches not yet in ``path`` (as ``probe_kill.record``, with faster snapshots)."""
    import torch

    import probe_kill as pk
    import qkprobe
    probe = qkprobe.attach(model, path, top_samples=pk.TOP, snapshot_every_s=SNAPSHOT_S, resume=resume,
                           bases=bases)
    done = set(probe.writer.existing_ids())
    with torch.no_grad():
        for ids, x in batches:
            if ids[0] in done:
                if not all(i in done for i in ids):
                    raise AssertionError("a batch was committed in part")
                continue
            probe.set_ids(ids)
            model(x)
    probe.close()


def _fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child: its exit status says whether ``work`` finished
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, what: str) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{what} failed (see its traceback above)")


def _after_kill(path: str, expected: "Contents") -> tuple:
    """Open the killed run's file (recovering it when the reader asks for that) and check that its
    committed rows are whole batches, the reference's first rows, ids and statistics alike."""
    import numpy as np

    import qkprobe
    from qkprobe.errors import RunFileError
    from qkprobe.sinks.recover import recover

    if not os.path.exists(path):
        return "absent", 0, "-"
    outcome = "opens"
    try:
        run = qkprobe.open_run(path)
    except RunFileError as exc:
        if "recover" not in str(exc):
            return "broken", -1, _one_line(exc)
        outcome = "recovered"
        try:
            recover(path)
            run = qkprobe.open_run(path)
        except RunFileError as again:
            return "broken", -1, _one_line(again)
    with run:
        n = len(run)
        if run.ids != expected.ids[:n] or n % 2:
            return outcome, n, "the committed ids are not whole batches of the reference's"
        for layer, rows in enumerate(expected.stats):
            if not np.array_equal(run.stats(layer), rows[:n]):
                return outcome, n, f"layer {layer}: committed rows differ from the reference's"
        return outcome, n, "-"


def _resume_and_compare(record, path: str, expected: "Contents") -> str:
    pid = _fork(lambda: record(path, resume=True))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "the resume failed"
    import numpy as np
    got = _contents(path)
    if got.ids != expected.ids:
        return f"ids differ: {len(got.ids)} ids, {len(set(got.ids))} distinct, {len(expected.ids)} expected"
    for layer, (mine, theirs) in enumerate(zip(got.snapshots, expected.snapshots)):
        if not np.array_equal(got.stats[layer], expected.stats[layer]):
            return f"layer {layer}: rows differ"
        if int(mine["snapshot_rows"]) != len(expected.ids):
            return f"layer {layer}: the snapshot covers {int(mine['snapshot_rows'])} rows"
        for name in EXACT:
            if not np.array_equal(mine[name], theirs[name]):
                return f"layer {layer}: {name} differs"
        for name in ROUNDED:
            if not np.allclose(mine[name], theirs[name], rtol=1e-10, atol=1e-12):
                return f"layer {layer}: {name} differs beyond rounding"
    return "-"


@dataclass
class Contents:
    """What a finished run holds: ids in row order, per layer its snapshot and its rows."""

    ids: list
    snapshots: list
    stats: list


def _contents(path: str) -> Contents:
    import qkprobe
    with qkprobe.open_run(path) as run:
        layers = range(len(run.layer_names))
        return Contents(run.ids, [{k: run.snapshot(i, k) for k in run.snapshot_names(i)} for i in layers],
                        [run.stats(i) for i in layers])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
