"""qkprobe.attach: harmless, exact statistics, top-k, aggregates, options, stored rows."""

import numpy as np
import pytest
import timm
import torch

import qkprobe
from qkprobe.core.stats import DEFAULT_STATS, STAT_NAMES
from peaked import peak_timm, record_timm_probs

IDX = {n: i for i, n in enumerate(STAT_NAMES)}


def small_vit(seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=48,
                              **kw).eval()
    peak_timm(model, seed=seed)
    return model


def batches(n, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 48, 48, generator=g) for _ in range(n)]


def reference_stats(a, b, P, S, scale, n_prefix, topk=5):
    """Plain float64 loops over samples, heads and modes (numpy), from a, b and the library's P."""
    a, b, P, S = (np.asarray(t, dtype=np.float64) for t in (a, b, P, S))
    B, H, N, R = a.shape
    out = np.zeros((B, H, R, len(STAT_NAMES)))
    for s in range(B):
        for h in range(H):
            for r in range(R):
                qa, kb = a[s, h, n_prefix:, r], b[s, h, n_prefix:, r]
                row = {}
                for side, v in (("q", qa), ("k", kb)):
                    srt = np.sort(v)
                    row.update({f"{side}_mean": v.mean(), f"{side}_max": v.max(), f"{side}_min": v.min(),
                                f"{side}_top_pos": srt[-topk:].mean(), f"{side}_top_neg": srt[:topk].mean()})
                row["score_pos"] = qa.max() * kb.max()
                row["score_neg"] = qa.min() * kb.min()
                ell = scale * S[h, r] * np.outer(a[s, h, :, r], b[s, h, :, r])  # all tokens
                row["attn_contrib"] = np.mean((P[s, h] * ell).sum(1) - ell.mean(1))
                for name, v in row.items():
                    out[s, h, r, IDX[name]] = v
            tot = out[s, h, :, IDX["attn_contrib"]].sum()
            out[s, h, :, IDX["attn_share"]] = out[s, h, :, IDX["attn_contrib"]] / tot
    return out


def test_outputs_identical_and_hooks_removed(tmp_path):
    model = small_vit()
    xs = batches(2)
    with torch.no_grad():
        ref = [model(x) for x in xs]
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with qkprobe.attach(model, str(tmp_path / "r.h5")) as probe:
        with torch.no_grad():
            got = [model(x) for x in xs]
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert probe.samples == 6


def test_statistics_equal_float64_recomputation(tmp_path):
    model = small_vit()
    x = batches(1)[0]
    probs = record_timm_probs(model)
    bases = qkprobe.compute_bases(model)
    coords = qkprobe.mode_coordinates(model, x, bases=bases, dtype=torch.float64)
    with qkprobe.attach(model, str(tmp_path / "r.h5"), bases=bases, stats="all"):
        with torch.no_grad():
            model(x)
    run = qkprobe.open_run(str(tmp_path / "r.h5"))
    assert len(run) == 3 and run.ids == ["0", "1", "2"]
    for i, (c, lb) in enumerate(zip(coords, bases)):
        ref = reference_stats(c.a, c.b, probs[i], lb.S, lb.scale, n_prefix=1)
        got = run.stats(i)
        assert got.shape == ref.shape == (3, 3, 64, len(STAT_NAMES))
        scale = np.abs(ref).max(axis=(0, 1, 2), keepdims=True) + 1e-6
        err = np.abs(got - ref) / scale
        worst = {n: float(err[..., j].max()) for j, n in enumerate(STAT_NAMES)}
        assert max(worst.values()) < 1e-4, worst
        # shares sum to one per head; the sum of contributions is ≥ 0 (softmax favours high logits)
        assert np.allclose(got[..., IDX["attn_share"]].sum(-1), 1.0, atol=1e-3)
        assert (got[..., IDX["attn_contrib"]].sum(-1) >= -1e-5).all()
    run.close()


def test_topk_and_aggregates_match_the_rows(tmp_path):
    model = small_vit()
    path = str(tmp_path / "r.h5")
    with qkprobe.attach(model, path, top_samples=4) as probe:
        for j, x in enumerate(batches(4)):
            probe.set_ids([f"img{j}_{i}" for i in range(3)])
            with torch.no_grad():
                model(x)
    run = qkprobe.open_run(path)
    assert len(run) == 12 and run.ids[:3] == ["img0_0", "img0_1", "img0_2"]
    for layer in range(2):
        rows = run.stats(layer).astype(np.float64)  # (12, H, R, S)
        scores = run.snapshot(layer, "topk_scores")  # (H, R, 2, K)
        index = run.snapshot(layer, "topk_index")
        for sign, name in enumerate(("score_pos", "score_neg")):
            s = rows[..., IDX[name]]  # (12, H, R)
            order = np.argsort(-s, axis=0, kind="stable")[:4]  # (4, H, R)
            np.testing.assert_array_equal(index[:, :, sign, :], order.transpose(1, 2, 0))
            np.testing.assert_allclose(scores[:, :, sign, :], np.take_along_axis(s, order, 0).transpose(1, 2, 0),
                                       rtol=1e-6)
        np.testing.assert_allclose(run.snapshot(layer, "agg_mean"), rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(run.snapshot(layer, "agg_m2") / 12, rows.var(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(run.snapshot(layer, "agg_count"), np.full(rows.shape[1:], 12))
        np.testing.assert_allclose(run.snapshot(layer, "agg_max"), rows.max(0))
    run.close()


def test_every_heads_layers_and_no_per_sample(tmp_path):
    model = small_vit()
    path = str(tmp_path / "r.h5")
    with qkprobe.attach(model, path, every=2, heads=[0, 2], layers=["blocks.1.attn"], per_sample=True):
        for x in batches(4):
            with torch.no_grad():
                model(x)
    run = qkprobe.open_run(path)
    assert len(run) == 6 and run.layer_names == ["blocks.1.attn"]
    assert run.stats(0).shape == (6, 2, 64, len(DEFAULT_STATS))  # default: no attention share
    attrs = run.layer_attrs(0)
    assert attrs["heads"] == [0, 2] and attrs["extras"] == [] and attrs["prefix_tokens"] == 1
    run.close()
    # the same samples without per-sample rows: aggregates agree
    path2 = str(tmp_path / "r2.h5")
    with qkprobe.attach(model, path2, every=2, heads=[0, 2], layers=[1], per_sample=False):
        for x in batches(4):
            with torch.no_grad():
                model(x)
    r1, r2 = qkprobe.open_run(path), qkprobe.open_run(path2)
    assert len(r2) == 6 and r2.ids == r1.ids
    np.testing.assert_allclose(r2.snapshot(0, "agg_mean"), r1.snapshot(0, "agg_mean"))
    with pytest.raises(Exception):  # noqa: B017 - any error: the file has no rows
        r2.stats(0)
    r1.close(), r2.close()


def test_set_ids_must_match_batch(tmp_path):
    model = small_vit()
    probe = qkprobe.attach(model, None)
    probe.set_ids(["a", "b"])
    with pytest.raises(ValueError, match="ids"):
        with torch.no_grad():
            model(batches(1)[0])
    probe.close()


def test_in_memory_probe_and_training_mode_gradients_unchanged():
    model = small_vit()
    model.train()
    x = batches(1)[0]

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads()
    with qkprobe.attach(model) as probe:
        got = grads()
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert probe.samples == 3 and probe.aggregates(0).count.min().item() == 3


def test_swin_windows_fold_to_one_row_per_image(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2,), num_heads=(3,),
                              embed_dim=96, img_size=56).eval()
    path = str(tmp_path / "r.h5")
    with qkprobe.attach(model, path):
        with torch.no_grad():
            model(torch.randn(2, 3, 56, 56))
    run = qkprobe.open_run(path)
    assert len(run) == 2 and run.stats(0).shape[0] == 2
    run.close()


def test_torch_compile_model_gives_the_same_statistics():
    model = small_vit()
    x = batches(1)[0]
    with qkprobe.attach(model) as eager:
        with torch.no_grad():
            model(x)
    compiled = torch.compile(model)
    with qkprobe.attach(compiled) as probe:
        with torch.no_grad():
            compiled(x)
    assert probe.samples == 3
    for i in range(2):
        np.testing.assert_allclose(probe.aggregates(i).mean.numpy(), eager.aggregates(i).mean.numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_nonfinite_activations_are_counted_per_layer(tmp_path):
    model = small_vit()
    with torch.no_grad():
        model.blocks[1].norm1.weight[3] = float("inf")
    path = str(tmp_path / "nan.h5")
    with qkprobe.attach(model, path):
        with torch.no_grad():
            model(batches(1)[0])
    with qkprobe.open_run(path) as run:
        assert int(run.snapshot(0, "nonfinite_values")) == 0
        assert int(run.snapshot(1, "nonfinite_values")) > 0
        assert len(run) == 3


def test_chosen_statistics_are_stored_and_attention_is_skipped(tmp_path, monkeypatch):
    model = small_vit()
    x = batches(1)[0]
    with qkprobe.attach(model, str(tmp_path / "all.h5"), stats="all"):
        with torch.no_grad():
            model(x)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    chosen = ["score_neg", "q_max", "k_top_pos"]
    with qkprobe.attach(model, str(tmp_path / "some.h5"), stats=chosen):
        with torch.no_grad():
            model(x)
    assert calls == []  # timm uses its own SDPA path only when fused; ours was skipped
    full, some = qkprobe.open_run(str(tmp_path / "all.h5")), qkprobe.open_run(str(tmp_path / "some.h5"))
    assert some.stat_names == ["q_max", "k_top_pos", "score_neg"]  # canonical order
    for name in some.stat_names:
        np.testing.assert_array_equal(some.stats(1, name), full.stats(1, name))
    np.testing.assert_array_equal(some.snapshot(1, "topk_index"), full.snapshot(1, "topk_index"))
    assert int(some.snapshot(0, "nonfinite_values")) == 0
    assert full.stat_names == list(STAT_NAMES)
    full.close(), some.close()
    with qkprobe.attach(model, str(tmp_path / "default.h5")):  # the default set skips the attention pass
        with torch.no_grad():
            model(x)
    assert calls == []
    with qkprobe.open_run(str(tmp_path / "default.h5")) as default, \
            qkprobe.open_run(str(tmp_path / "all.h5")) as full:
        assert default.stat_names == list(DEFAULT_STATS) and "attn_share" not in default.stat_names
        for name in DEFAULT_STATS:
            np.testing.assert_array_equal(default.stats(1, name), full.stats(1, name))
    with pytest.raises(ValueError, match="unknown statistics"):
        qkprobe.attach(model, stats=["nope"])


def test_fused_qkv_coordinates_equal_separate_ones():
    from qkprobe.capture.probe import Probe
    model = small_vit()
    probe = Probe(model, None)
    layer = probe.maps[0]
    B, N, H, R = 2, 5, layer.bases.num_heads, layer.bases.num_modes
    qkv = torch.randn(B, N, 3, H, R)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views of one tensor, k right after q
    a, b = layer.coordinates(q, k)  # one batched matmul over the 2H query and key heads
    a2, b2 = layer.coordinates(q.contiguous(), k.contiguous())  # separate tensors: two matmuls
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)
    ref = torch.einsum("bhnr,hrm->bhnm", k.double(), layer.bases.coord_k.double())
    torch.testing.assert_close(b.double(), ref, rtol=1e-5, atol=1e-5)
    probe.close()


def test_forward_that_raises_leaves_nothing_for_the_next_batch(tmp_path):
    model = small_vit()
    x = batches(1)[0]
    fail = {"on": True}

    def boom(module, args, output):
        if fail["on"]:
            raise RuntimeError("boom")
    handle = model.blocks[-1].register_forward_hook(boom)  # after every attention layer has fired
    with qkprobe.attach(model, str(tmp_path / "r.h5")) as probe:
        with pytest.raises(RuntimeError, match="boom"):
            with torch.no_grad():
                model(x)
        fail["on"] = False
        with torch.no_grad():
            model(x[:2])
    handle.remove()
    with qkprobe.attach(model, str(tmp_path / "ref.h5")):
        with torch.no_grad():
            model(x[:2])
    with qkprobe.open_run(str(tmp_path / "r.h5")) as run, qkprobe.open_run(str(tmp_path / "ref.h5")) as ref:
        assert len(run) == 2 and probe.samples == 2
        for i in range(len(probe.maps)):
            np.testing.assert_array_equal(run.stats(i), ref.stats(i))
            np.testing.assert_array_equal(run.snapshot(i, "agg_count"), ref.snapshot(i, "agg_count"))


def test_layers_of_different_shapes_keep_their_own_state(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1), num_heads=(3, 6),
                              embed_dim=48, img_size=56).eval()
    x = torch.randn(3, 3, 56, 56)
    with qkprobe.attach(model, str(tmp_path / "all.h5")) as probe:
        with torch.no_grad():
            model(x)
    assert len(probe.state.groups) == 2 and [len(g.layers) for g in probe.state.groups] == [1, 1]
    with qkprobe.open_run(str(tmp_path / "all.h5")) as run:
        assert [run.stats(i).shape[1] for i in range(2)] == [3, 6]
        for i in range(2):  # each layer alone: the same rows, top-k and aggregates
            with qkprobe.attach(model, str(tmp_path / f"only{i}.h5"), layers=[i]):
                with torch.no_grad():
                    model(x)
            with qkprobe.open_run(str(tmp_path / f"only{i}.h5")) as alone:
                np.testing.assert_array_equal(run.stats(i), alone.stats(0))
                for name in ("topk_index", "agg_mean", "agg_count"):
                    np.testing.assert_array_equal(run.snapshot(i, name), alone.snapshot(0, name))


@pytest.mark.parametrize("stats", [None, "all", ["q_max", "score_pos", "attn_share"]])
def test_probe_without_compiled_kernels_records_the_same(tmp_path, monkeypatch, stats):
    """The torch path (GPUs, no compiler, QKPROBE_NATIVE=0) against the compiled CPU kernels."""
    model = small_vit()
    xs = batches(2)
    paths = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QKPROBE_NATIVE", flag)
        paths[flag] = str(tmp_path / f"native{flag}.h5")
        with qkprobe.attach(model, paths[flag], stats=stats, top_samples=3):
            for x in xs:
                with torch.no_grad():
                    model(x)
    with qkprobe.open_run(paths["1"]) as fast, qkprobe.open_run(paths["0"]) as ref:
        assert fast.stat_names == ref.stat_names and len(fast) == len(ref) == 6
        for i in range(len(model.blocks)):
            np.testing.assert_allclose(fast.stats(i), ref.stats(i), rtol=2e-5, atol=2e-5)
            np.testing.assert_array_equal(fast.snapshot(i, "topk_index"), ref.snapshot(i, "topk_index"))
            np.testing.assert_array_equal(fast.snapshot(i, "agg_count"), ref.snapshot(i, "agg_count"))
            np.testing.assert_allclose(fast.snapshot(i, "agg_mean"), ref.snapshot(i, "agg_mean"), rtol=1e-5, atol=1e-6)
