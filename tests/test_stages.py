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


class _Event:
    def __init__(self, log, n):
        self.log, self.n = log, n

    def synchronize(self):
        self.log.append(("sync", self.n))


class _Writer:
    """What RunSink needs of a RunWriter, recording each write."""

    def __init__(self, layers, stat_names):
        self.layers, self.stat_names, self.per_sample, self.log = layers, stat_names, True, []

    def write(self, ids, rows, **kw):
        self.log.append(("write", list(ids), None if rows is None else [np.array(r) for r in rows],
                         kw.get("snapshot") is not None))

    def close(self):
        self.log.append(("close",))


def test_rows_copied_asynchronously_reach_the_writer_in_order_and_never_before_their_copy():
    from qkprobe.sinks.hdf5_writer import LayerSpec
    from qkprobe.sinks.run_sink import RunSink
    from qkprobe.state import TrainingSeries
    shapes, S = [(2, 3), (2, 3)], len(STAT_NAMES)
    state = RunState(shapes, 4, top_samples=2)
    writer = _Writer([LayerSpec(f"l{i}", 2, 3) for i in range(2)], list(STAT_NAMES[:4]))
    log, copies = writer.log, []

    def copier(group, st):  # as PinnedCopies: a host buffer filled "later", and its event
        copies.append(len(copies))
        return st.numpy().copy(), _Event(log, copies[-1])

    sink = RunSink(writer, [g.layers for g in state.groups], slice(0, 4), snapshot_every_s=3600.0,
                   release=lambda *a: None, copier=copier)
    series = TrainingSeries([])
    batches = [_stats(2, 2, 2, 3, S, seed) for seed in range(3)]
    for n, st in enumerate(batches):
        state.add([st], (STAT_INDEX["score_pos"], STAT_INDEX["score_neg"]), torch.arange(4))
        sink.put(state, [st], [f"b{n}a", f"b{n}b"], None, [-1, -1], series)
        # the forward never waits: only the batch before this one has been written
        assert [e[1] for e in log if e[0] == "write"] == [[f"b{m}a", f"b{m}b"] for m in range(n)]
    sink.snapshot_every_s = 0.0  # a snapshot is due: this batch goes to the writer at once, after its copy
    state.add([batches[0]], (STAT_INDEX["score_pos"], STAT_INDEX["score_neg"]), torch.arange(4))
    sink.put(state, [batches[0]], ["c", "d"], None, [-1, -1], series)
    sink.close(state, series)
    writes = [e for e in log if e[0] == "write"]
    assert [w[1] for w in writes] == [["b0a", "b0b"], ["b1a", "b1b"], ["b2a", "b2b"], ["c", "d"], []]
    assert [w[3] for w in writes] == [False, False, False, True, True]
    for n, w in enumerate(writes[:3]):  # each after its own copy's event, with the stored columns
        assert log.index(("sync", n)) < log.index(w)
        np.testing.assert_array_equal(w[2][1], batches[n][1][..., :4].numpy())
    assert log[-1] == ("close",)
