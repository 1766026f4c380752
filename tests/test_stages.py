"""The stages of a recording, each on its own: capture makes typed events, a reducer per backend
computes statistics, the run state alone names, snapshots, loads and merges what the file stores,
and every error a user can cause is a QKProbeError that names the layer and the shapes."""

import dataclasses
import pathlib
import re

import numpy as np
import pytest
import timm
import torch

import qkprobe
from qkprobe.adapters.base import AttentionTerms
from qkprobe.adapters.discover import find_attention
from qkprobe.bases import layer_bases
from qkprobe.capture.events import QKEvent, capture_events
from qkprobe.core.stats import STAT_INDEX, STAT_NAMES
from qkprobe.errors import QKProbeError, ShapeError, UsageError
from qkprobe.reduce.reducer import LayerMaps, ReduceOptions, TorchReducer, make_reducer
from qkprobe.state import (AGG, NONFINITE_VALUES, SNAPSHOT_ROWS, TOPK, TOPK_INDEX, TOPK_SCORES, RunState,
                           ShardSnapshot, merge_snapshots)
from peaked import peak_timm

PACKAGE = pathlib.Path(qkprobe.__file__).parent


def small_vit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    peak_timm(model, seed=seed)
    return model


def test_capture_makes_one_typed_event_per_call_with_the_modules_own_q_and_k():
    model = small_vit()
    sites = find_attention(model)
    events = []
    with capture_events(sites, events.append), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert [e.layer for e in events] == [0, 1]
    for e in events:
        assert isinstance(e, QKEvent) and isinstance(e.attention, AttentionTerms)
        assert e.q.shape == (2, 3, 5, 64) and e.k.shape == e.q.shape and e.batch == 2
        assert not e.q.requires_grad
    # the hooks are gone after the block
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_torch_and_native_reducers_agree_on_one_event():
    model = small_vit()
    site = find_attention(model)[0]
    events = []
    with capture_events([site], events.append), torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    maps = LayerMaps(layer_bases(site, model, n_prefix=1, spectra=False))
    options = ReduceOptions(topk=3, attention=True)
    plain = TorchReducer(options, native=False)(events[0], maps)
    fast = make_reducer("native", options)(events[0], maps)
    assert plain.shape == (3, 3, 64, len(STAT_NAMES))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    # the attention share sums to one per head, from the module's real probabilities
    torch.testing.assert_close(plain[..., STAT_INDEX["attn_share"]].sum(-1), torch.ones(3, 3))


def _stats(B, L, H, R, S, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, H, R, S, generator=g)


def test_run_state_names_its_snapshot_and_merges_shards_with_rows_after_their_snapshot():
    shapes, S = [(2, 3), (2, 3), (4, 3)], len(STAT_NAMES)
    scores = (STAT_INDEX["score_pos"], STAT_INDEX["score_neg"])
    batches = [[_stats(5, 2, 2, 3, S, seed), _stats(5, 1, 4, 3, S, seed + 100)] for seed in range(6)]
    whole = RunState(shapes, S, top_samples=4)
    for b in batches:
        whole.add(b, scores)
    assert [g.layers for g in whole.groups] == [[0, 1], [2]] and whole.samples == 30
    spec = whole.snapshot_spec(2)
    assert set(spec) == {TOPK_SCORES, TOPK_INDEX, *(AGG + f for f in qkprobe.core.streaming.Aggregates.FIELDS),
                         NONFINITE_VALUES, SNAPSHOT_ROWS}
    assert spec[TOPK_SCORES][0] == (4, 3, 2, 4)

    # two shards of 3 batches each; shard 0's snapshot covers only its first batch
    parts = []
    for rank, chunk in enumerate((batches[:3], batches[3:])):
        state = RunState(shapes, S, top_samples=4)
        state.add(chunk[0], scores)
        early = [{k: np.array(v) for k, v in layer.items()} for layer in state.snapshot()]
        for b in chunk[1:]:
            state.add(b, scores)
        final = state.snapshot()
        parts.append((early if rank == 0 else final, chunk))
    for layer in range(3):
        group, j = (0, layer) if layer < 2 else (1, 0)
        shard_parts = []
        for rank, (snap, chunk) in enumerate(parts):
            covered = int(snap[layer][SNAPSHOT_ROWS])
            rows = np.concatenate([b[group][j].numpy() for b in chunk])  # (15, H, R, S)
            shard_parts.append(ShardSnapshot(f"shard{rank}", snap[layer], 15 * rank, 15, list(STAT_NAMES),
                                             after=rows[covered:]))
        merged = merge_snapshots(shard_parts)
        ref = whole.snapshot()[layer]
        np.testing.assert_array_equal(merged[TOPK_INDEX], ref[TOPK_INDEX])
        np.testing.assert_array_equal(merged[TOPK_SCORES], ref[TOPK_SCORES])
        np.testing.assert_array_equal(merged[AGG + "count"], ref[AGG + "count"])
        np.testing.assert_allclose(merged[AGG + "mean"], ref[AGG + "mean"], rtol=1e-12, atol=1e-12)
        assert int(merged[SNAPSHOT_ROWS]) == 30


def test_snapshot_names_are_defined_only_by_the_run_state():
    literal = re.compile(r"""["'](topk_|agg_)|["'](nonfinite_values|snapshot_rows)["']""")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.parent.name != "state" and literal.search(p.read_text())]
    assert offenders == []
    assert TOPK == "topk_" and AGG == "agg_"  # the file format (docs/format.md)


@pytest.mark.parametrize("kwargs, words", [
    (dict(heads=[0, 9]), ["blocks.0.attn", "3 heads"]),
    (dict(layers=[5]), ["layer 5", "2 attention layers"]),
    (dict(layers=["nope"]), ["'nope'", "blocks.0.attn"]),
    (dict(every=0), ["every=0"]),
    (dict(stats=["nope"]), ["unknown statistics"]),
])
def test_bad_attach_options_are_usage_errors_that_say_what_to_do(kwargs, words):
    with pytest.raises(UsageError) as info:
        qkprobe.attach(small_vit(), **kwargs)
    assert isinstance(info.value, QKProbeError) and isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


def test_ids_of_the_wrong_count_are_a_usage_error(tmp_path):
    model = small_vit()
    with qkprobe.attach(model, str(tmp_path / "r.h5")) as probe:
        probe.set_ids(["a", "b"])
        with pytest.raises(UsageError, match="2 ids for a batch of 3"), torch.no_grad():
            model(torch.randn(3, 3, 32, 32))


def test_an_error_inside_a_reducer_names_the_layer_and_the_shapes():
    model = small_vit()
    bases = [dataclasses.replace(b, prefix_tokens=99) for b in qkprobe.compute_bases(model)]
    with qkprobe.attach(model, bases=bases):
        with pytest.raises(ShapeError) as info, torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    text = str(info.value)
    assert "blocks.0.attn" in text and "(2, 3, 5, 64)" in text and "prefix_tokens=99" in text


class _CopyStream:
    """A fake CUDA copy stream: ``copier(group, stats)`` returns, as PinnedCopies does, a host buffer
    (stale until its copy lands: NaN) and an event; the copies land in order, only when the test
    lets the device run (:meth:`run`) or the host waits for one (``event.synchronize()``, logged)."""

    def __init__(self, log):
        self.log, self.copies, self.landed = log, [], 0

    def copier(self, group, st):
        host = np.full(tuple(st.shape), np.nan, np.float32)
        self.copies.append((host, st.numpy().copy()))
        return host, _Event(self, len(self.copies) - 1)

    def run(self, upto=None):
        upto = len(self.copies) if upto is None else upto
        for host, src in self.copies[self.landed:upto]:
            host[...] = src
        self.landed = max(self.landed, upto)


class _Event:
    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def query(self):
        return self.n < self.stream.landed

    def synchronize(self):
        self.stream.log.append(("sync", self.n))
        self.stream.run(self.n + 1)


class _Writer:
    """What RunSink needs of a RunWriter, recording each write."""

    def __init__(self, layers, stat_names):
        self.layers, self.stat_names, self.per_sample, self.log = layers, stat_names, True, []

    def write(self, ids, rows, **kw):
        self.log.append(("write", list(ids), None if rows is None else [np.array(r) for r in rows],
                         kw.get("snapshot") is not None))

    def close(self):
        self.log.append(("close",))


SCORE_COLUMNS = (STAT_INDEX["score_pos"], STAT_INDEX["score_neg"])


def _sink(columns, every_s=3600.0):
    """A RunSink of two layers (one group) on a fake copy stream, its run state and its log."""
    from qkprobe.sinks.hdf5_writer import LayerSpec
    from qkprobe.sinks.run_sink import RunSink
    state = RunState([(2, 3), (2, 3)], 4, top_samples=2)
    writer = _Writer([LayerSpec(f"l{i}", 2, 3) for i in range(2)], list(STAT_NAMES[:4]))
    stream = _CopyStream(writer.log)
    sink = RunSink(writer, [g.layers for g in state.groups], columns, snapshot_every_s=every_s,
                   release=lambda *a: None, copier=stream.copier)
    return sink, state, stream, writer.log


def _put(sink, state, st, ids, series):
    state.add([st], SCORE_COLUMNS, torch.arange(4))
    sink.put(state, [st], ids, None, [-1] * len(ids), series)


def _writes(log):
    return [e for e in log if e[0] == "write"]


@pytest.mark.parametrize("columns", [slice(0, 4), np.array([0, 2, 5, 11])], ids=["consecutive", "scattered"])
def test_stored_columns_are_taken_from_the_host_rows_only_after_their_copy_landed(columns):
    from qkprobe.state import TrainingSeries
    sink, state, stream, log = _sink(columns)
    series = TrainingSeries([])
    batches = [_stats(2, 2, 2, 3, len(STAT_NAMES), seed) for seed in range(4)]
    for n, st in enumerate(batches):
        _put(sink, state, st, [f"b{n}a", f"b{n}b"], series)
    sink.close(state, series)
    writes = _writes(log)
    assert [w[1] for w in writes] == [[f"b{n}a", f"b{n}b"] for n in range(4)] + [[]]
    for n, w in enumerate(writes[:4]):  # never the stale (NaN) pinned memory
        for layer in range(2):
            np.testing.assert_array_equal(w[2][layer], batches[n][layer][..., columns].numpy())


def test_rows_copied_asynchronously_reach_the_writer_in_order_and_the_host_waits_only_to_reuse_a_buffer():
    from qkprobe.sinks.run_sink import MAX_IN_FLIGHT
    from qkprobe.state import TrainingSeries
    sink, state, stream, log = _sink(slice(0, 4))
    series = TrainingSeries([])
    batches = [_stats(2, 2, 2, 3, len(STAT_NAMES), seed) for seed in range(MAX_IN_FLIGHT + 2)]
    for n, st in enumerate(batches):  # a device that never gets ahead: the copies land only when waited for
        _put(sink, state, st, [f"b{n}a", f"b{n}b"], series)
        written = max(0, n + 1 - MAX_IN_FLIGHT)  # a batch is written where its buffer is about to be reused
        assert [w[1] for w in _writes(log)] == [[f"b{m}a", f"b{m}b"] for m in range(written)]
    assert [e for e in log if e[0] == "sync"] == [("sync", m) for m in range(2)]
    stream.run()  # the device caught up: the rest is written at the next batch, with no wait
    sink.snapshot_every_s = 0.0  # a snapshot is due: this batch goes to the writer at once, after its copy
    _put(sink, state, batches[0], ["c", "d"], series)
    sink.close(state, series)
    writes = _writes(log)
    assert [w[1] for w in writes] == [[f"b{m}a", f"b{m}b"] for m in range(len(batches))] + [["c", "d"], []]
    assert [w[3] for w in writes] == [False] * len(batches) + [True, True]
    assert [e for e in log if e[0] == "sync"] == [("sync", 0), ("sync", 1), ("sync", len(batches))]
    for n, w in enumerate(writes[:len(batches)]):  # each after its own copy, with the stored columns
        np.testing.assert_array_equal(w[2][1], batches[n][1][..., :4].numpy())
    assert log[-1] == ("close",)


def test_the_host_waits_for_the_device_only_with_a_snapshot_and_at_close(monkeypatch):
    from qkprobe.sinks import run_sink
    from qkprobe.state import TrainingSeries
    clock = [0.0]
    monkeypatch.setattr(run_sink.time, "monotonic", lambda: clock[0])
    sink, state, stream, log = _sink(slice(0, 4), every_s=4.0)
    snapshots = []
    monkeypatch.setattr(state, "snapshot", lambda: snapshots.append(len(snapshots)) or RunState.snapshot(state))
    series = TrainingSeries([])
    N = 13
    for n in range(N):  # one batch a second; the copy of each lands during the next forward
        clock[0] += 1.0
        _put(sink, state, _stats(2, 2, 2, 3, len(STAT_NAMES), n), [f"b{n}a", f"b{n}b"], series)
        if n < N - 1:
            stream.run()
    sink.close(state, series)  # the last batch's copy has not landed yet
    writes = _writes(log)
    assert [w[1] for w in writes[:N]] == [[f"b{n}a", f"b{n}b"] for n in range(N)]
    assert [n for n, w in enumerate(writes[:N]) if w[3]] == [3, 7, 11]  # every 4 s
    assert len(snapshots) == 3 + 1  # and at close: the state is read from the device nowhere else
    # one wait per snapshot (for its own batch's copy) and one at close (the batch in flight)
    assert [e for e in log if e[0] == "sync"] == [("sync", 3), ("sync", 7), ("sync", 11), ("sync", N - 1)]


def test_pinned_buffers_are_lent_again_only_after_their_rows_were_written(monkeypatch):
    from qkprobe.sinks.run_sink import PinnedCopies
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))  # no CUDA here
    copies, st = PinnedCopies(release=None), torch.zeros(2, 3, 4)
    lent = [copies._lend(0, st) for _ in range(3)]  # three batches in flight: three buffers
    assert len({buf.data_ptr() for buf, _ in lent}) == 3
    copies.recycle(0, lent[1][1])  # the second batch was written
    again, host = copies._lend(0, st)
    assert again.data_ptr() == lent[1][0].data_ptr() and host.ctypes.data == again.data_ptr()
    assert copies._lend(1, st)[0].data_ptr() not in {buf.data_ptr() for buf, _ in lent}  # per group
    copies.recycle(0, lent[0][1])
    smaller, _ = copies._lend(0, st[:1])  # a smaller last batch: a buffer of its own shape
    assert tuple(smaller.shape) == (1, 3, 4) and copies._free[0] == []
