"""RunWriter / open_run round trips, resume, write errors and clear user errors (in-process)."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from qkprobe.errors import RunFileError, ShapeError  # noqa: E402
from qkprobe.sinks import schema  # noqa: E402
from qkprobe.sinks.hdf5_writer import LayerSpec, RunWriter, read_metadata  # noqa: E402
from qkprobe.sinks.recover import lookup3, read_superblock  # noqa: E402
from qkprobe.sinks.run_file import open_run  # noqa: E402
from sink_rows import (DIMS, METADATA, STAT_NAMES, batch, layer_specs, problems, row_values,  # noqa: E402
                       sample_id, snapshot_matches_rows)


def write_batches(writer: RunWriter, sizes, first_row: int = 0, first_batch: int = 0) -> int:
    """Write batches of the given sizes; return the next row number."""
    row = first_row
    for index, size in enumerate(sizes, start=first_batch):
        writer.write(**batch(row, size, index))
        row += size
    return row


def test_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    specs = layer_specs()
    with RunWriter(path, specs, STAT_NAMES, METADATA) as writer:
        rows = write_batches(writer, [5, 1, 7, 3])
    with open_run(path) as run:
        assert len(run) == rows == 16
        assert problems(run) == [] and snapshot_matches_rows(run)
        assert run.ids == [sample_id(r) for r in range(16)]
        assert run.steps.tolist() == [0] * 5 + [1] + [2] * 7 + [3] * 3
        assert run.layer_names == ["blocks.0.attn", "blocks.1.attn"]
        assert run.stat_names == STAT_NAMES
        np.testing.assert_array_equal(run.stats("blocks.1.attn", "std"), row_values(0, 16, 1)[..., 1])
        np.testing.assert_array_equal(run.stats(0, head=1), row_values(0, 16, 0)[:, 1])
        np.testing.assert_array_equal(run.stats(1, rows=slice(3, 9)), row_values(3, 9, 1))
        assert run.snapshot(1, "topk").shape == (3, 16, 2, 2) and np.all(run.snapshot(1, "topk") == 16)
        for i, spec in enumerate(specs):
            bases = run.bases(i)
            assert set(bases) == {"S", "U"}
            np.testing.assert_array_equal(bases["S"], spec.bases["S"])
            assert run.layer_attrs(i) == {"name": spec.name, "num_heads": spec.num_heads,
                                          "num_modes": spec.num_modes, **spec.attrs}
        meta = run.metadata
        assert {k: meta[k] for k in METADATA} == METADATA
        assert meta["schema_version"] == schema.SCHEMA_VERSION
        assert "created" in meta and "qkprobe_version" in meta
        assert run.skipped == [(f"bad/{b}", f"unreadable {b}") for b in range(4)]
    assert read_metadata(path)["options"] == METADATA["options"]


def test_dimension_labels_and_scales_visible_to_plain_h5py(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA) as writer:
        write_batches(writer, [4])
    with h5py.File(path, "r") as f:
        stats = f["layers/01/stats"]
        assert [dim.label for dim in stats.dims] == ["sample", "head", "mode", "statistic"]
        assert [s.decode() for s in stats.dims[3][0][()]] == STAT_NAMES
        assert stats.dims[1][0][()].tolist() == [0, 1, 2]
        assert stats.dims[2][0][()].tolist() == list(range(16))
        assert stats.chunks[1] == 1 and stats.chunks[2:] == (16, 3)
        assert json.loads(f.attrs["options"]) == METADATA["options"]
        assert f.attrs["model"] == "test-vit"
        assert f[schema.COMMITTED][()].tolist()[0] == 4


@pytest.mark.parametrize("compression", ["blosc-lz4", "gzip", "lzf", None])
def test_float16_and_every_compression_round_trip(tmp_path, compression):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, {}, store_dtype="float16", compression=compression) as w:
        write_batches(w, [3, 9])
    with open_run(path) as run:
        assert run.stats(1).dtype == np.float16
        assert problems(run) == []


def test_per_sample_off_keeps_ids_steps_and_snapshot(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, {}, per_sample=False) as writer:
        for index, start in enumerate((0, 4)):
            kwargs = batch(start, 4, index)
            kwargs["rows"] = None
            writer.write(**kwargs)
        with pytest.raises(ShapeError, match="per_sample=False"):
            writer.write(**batch(8, 2, 2))
    with open_run(path) as run:
        assert run.ids == [sample_id(r) for r in range(8)]
        assert int(run.snapshot(0, "count")[0]) == 8
        with pytest.raises(RunFileError, match="per_sample=False"):
            run.stats(0)
    with h5py.File(path, "r") as f:
        assert "stats" not in f["layers/00"]


def test_empty_batches_and_explicit_commit(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, layer_specs(), STAT_NAMES, {})
    write_batches(writer, [2])
    writer.write(ids=[], rows=[np.zeros((0, h, m, 3)) for h, m in DIMS], skipped=[("x.png", "truncated")])
    writer.commit(wait=True)
    assert writer.acknowledged == 2
    with open_run(path) as run:       # live read from the same process
        assert len(run) == 2 and run.skipped[-1] == ("x.png", "truncated")
    writer.close()
    writer.close()                      # twice is fine
    with pytest.raises(RunFileError, match="closed"):
        writer.write(**batch(2, 1, 1))


def test_reader_refresh_follows_writer_and_never_decreases(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, layer_specs(), STAT_NAMES, {})
    run = open_run(path)
    seen = [len(run)]
    row = 0
    for index in range(6):
        writer.write(**batch(row, 3, index))
        row += 3
        writer.commit(wait=True)
        seen.append(run.refresh())
    assert seen == sorted(seen) and seen[-1] == 18
    assert problems(run) == [] and snapshot_matches_rows(run)
    writer.close()
    run.close()


def test_shape_errors_are_clear(tmp_path):
    with RunWriter(tmp_path / "run.h5", layer_specs(), STAT_NAMES, {}) as writer:
        kwargs = batch(0, 2, 0)
        kwargs["rows"] = kwargs["rows"][:1]
        with pytest.raises(ShapeError, match="one rows array per layer"):
            writer.write(**kwargs)
        kwargs = batch(0, 2, 0)
        kwargs["rows"][1] = kwargs["rows"][1][:, :2]
        with pytest.raises(ShapeError, match=r"blocks\.1\.attn.*expected \(2, 3, 16, 3\)"):
            writer.write(**kwargs)
        kwargs = batch(0, 2, 0)
        kwargs["snapshot"][0] = {"unknown": np.zeros(1)}
        with pytest.raises(RunFileError, match="was not declared"):
            writer.write(**kwargs)
        write_batches(writer, [2])      # a refused batch leaves nothing behind (its ids are still free)
    with open_run(tmp_path / "run.h5") as run:
        assert problems(run) == [] and len(run) == 2


def test_duplicate_ids_are_refused(tmp_path):
    with RunWriter(tmp_path / "run.h5", layer_specs(), STAT_NAMES, {}) as writer:
        write_batches(writer, [3])
        with pytest.raises(RunFileError, match="already in"):
            writer.write(**batch(2, 2, 1))
    with RunWriter(tmp_path / "dup.h5", layer_specs(), STAT_NAMES, {}, id_is_unique=False) as writer:
        write_batches(writer, [3])
        writer.write(**batch(2, 2, 1))
        assert writer.existing_ids() == []


def test_missing_directory_and_existing_file_are_clear_errors(tmp_path):
    with pytest.raises(RunFileError, match="does not exist; create it"):
        RunWriter(tmp_path / "nope" / "run.h5", layer_specs(), STAT_NAMES, {})
    path = tmp_path / "run.h5"
    RunWriter(path, layer_specs(), STAT_NAMES, {}).close()
    with pytest.raises(RunFileError, match="already exists; pass resume=True"):
        RunWriter(path, layer_specs(), STAT_NAMES, {})
    with pytest.raises(RunFileError, match="reserved"):
        RunWriter(tmp_path / "r2.h5", layer_specs(), STAT_NAMES, {"created": "yesterday"})
    with pytest.raises(RunFileError, match="compression"):
        RunWriter(tmp_path / "r3.h5", layer_specs(), STAT_NAMES, {}, compression="zip")
    assert not (tmp_path / "r2.h5").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]   # no temporary files left behind


def test_resume_continues_without_duplicates(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA) as writer:
        rows = write_batches(writer, [4, 6])
    assert read_metadata(path)["weights_sha256"] == METADATA["weights_sha256"]
    with RunWriter(path, layer_specs(), STAT_NAMES, METADATA, resume=True) as writer:
        done = set(writer.existing_ids())
        assert done == {sample_id(r) for r in range(rows)}
        assert writer.acknowledged == rows
        todo = [r for r in range(rows + 5) if sample_id(r) not in done]   # the caller's resume filter
        assert todo == list(range(10, 15))
        rows = write_batches(writer, [5, 2], first_row=rows, first_batch=2)
        with pytest.raises(RunFileError, match="already in"):
            writer.write(**batch(0, 1, 9))
    with open_run(path) as run:
        assert len(run) == rows == 17
        assert len(set(run.ids)) == 17
        assert problems(run) == [] and snapshot_matches_rows(run)


def test_resume_drops_uncommitted_rows(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, {}) as writer:
        write_batches(writer, [4, 4])
    with h5py.File(path, "r+", libver=schema.LIBVER) as f:   # rows past the counter, as after a crash
        f[schema.COMMITTED][0] = 4
        f[schema.COMMITTED][1] = 1
    with RunWriter(path, layer_specs(), STAT_NAMES, {}, resume=True) as writer:
        assert len(writer.existing_ids()) == 4
        write_batches(writer, [3], first_row=4, first_batch=1)
    with open_run(path) as run:
        assert len(run) == 7 and problems(run) == []
    with h5py.File(path, "r") as f:
        assert f["samples/step"].shape == (7,) and f["layers/00/stats"].shape[0] == 7


def test_resume_with_another_layout_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    RunWriter(path, layer_specs(), STAT_NAMES, {}).close()
    with pytest.raises(RunFileError, match="other layers"):
        RunWriter(path, layer_specs([(2, 4), (4, 16)]), STAT_NAMES, {}, resume=True)
    with pytest.raises(RunFileError, match="other stat names"):
        RunWriter(path, layer_specs(), ["mean"], {}, resume=True)
    with pytest.raises(RunFileError, match="other store dtype"):
        RunWriter(path, layer_specs(), STAT_NAMES, {}, resume=True, store_dtype="float16")
    with open_run(path) as run:        # the refused resumes left the file as it was
        assert len(run) == 0


def _fail_stats_writes_after(monkeypatch, calls: int):
    """Make the writer thread's stats writes fail with ENOSPC after ``calls`` successful ones."""
    from qkprobe.sinks import hdf5_writer
    original = hdf5_writer._write_rows
    count = {"n": 0}

    def write_rows(dataset, start, rows):
        if dataset.name.endswith("/stats"):
            count["n"] += 1
            if count["n"] > calls:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(dataset, start, rows)

    monkeypatch.setattr(hdf5_writer, "_write_rows", write_rows)


def test_write_error_surfaces_within_one_batch(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, layer_specs(), STAT_NAMES, {}, queue_size=1)
    _fail_stats_writes_after(monkeypatch, calls=2 * len(DIMS))   # batches 0 and 1 succeed
    write_batches(writer, [3, 3])
    writer.commit(wait=True)
    assert writer.acknowledged == 6
    writer.write(**batch(6, 3, 2))                                 # fails in the writer thread
    with pytest.raises(RunFileError) as raised:
        writer.commit(wait=True)
    message = str(raised.value)
    assert "No space left on device" in message and "valid up to row 6" in message and str(path) in message
    writer.close()                                                 # already reported: no second raise
    monkeypatch.undo()
    with open_run(path) as run:
        assert len(run) == 6 and problems(run) == [] and snapshot_matches_rows(run)


def test_write_error_reaches_a_caller_that_only_writes(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path / "run.h5", layer_specs(), STAT_NAMES, {}, queue_size=1)
    _fail_stats_writes_after(monkeypatch, calls=0)
    calls = 0
    with pytest.raises(RunFileError, match="No space left on device"):
        for index in range(50):
            calls += 1
            writer.write(**batch(3 * index, 3, index))
    # The failing batch, at most one queued behind it, and the call that reports it.
    assert calls <= 3
    with pytest.raises(RunFileError, match="No space left"):
        writer.write(**batch(999, 1, 99))
    writer.close()
    monkeypatch.undo()
    with open_run(tmp_path / "run.h5") as run:
        assert len(run) == 0


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(RunFileError, match="does not exist"):
        open_run(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        open_run(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(RunFileError, match="not a qkprobe run file"):
        open_run(tmp_path / "other.h5")
    path = tmp_path / "run.h5"
    RunWriter(path, layer_specs(), STAT_NAMES, {}).close()
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(RunFileError, match="schema version 99"):
        open_run(path)
    with pytest.raises(RunFileError, match="schema version 99"):
        RunWriter(path, layer_specs(), STAT_NAMES, {}, resume=True)


def test_lookup3_matches_reference_values_and_hdf5():
    # Test vectors from Bob Jenkins' lookup3.c driver5().
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def test_superblock_checksum_matches_hdf5(tmp_path):
    for userblock in (0, 512, 2048):
        path = tmp_path / f"u{userblock}.h5"
        with h5py.File(path, "w", libver=schema.LIBVER, userblock_size=userblock or None) as f:
            f["x"] = np.arange(3)
        block = read_superblock(path)   # raises on a checksum mismatch
        assert block.offset == userblock and block.version == 3 and block.flags == 0


def test_layer_names_sort_like_indices(tmp_path):
    specs = [LayerSpec(f"l{i}", 1, 2) for i in range(11)]
    with RunWriter(tmp_path / "run.h5", specs, ["a"], {}) as writer:
        writer.write(["x"], [np.full((1, 1, 2, 1), i, np.float32) for i in range(11)])
    with open_run(tmp_path / "run.h5") as run:
        assert run.layer_names == [f"l{i}" for i in range(11)]
        assert [float(run.stats(i)[0, 0, 0, 0]) for i in range(11)] == list(range(11))
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert sorted(f["layers"]) == [f"{i:02d}" for i in range(11)]
