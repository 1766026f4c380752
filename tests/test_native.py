"""The compiled map-statistics kernel against the torch path (itself checked against float64 loops)."""

import logging

import numpy as np

import pytest
import torch

from qkprobe.core import native
from qkprobe.core.stats import STAT_INDEX, STAT_NAMES, _map_stats, mode_statistics

# Only a machine without any C compiler uses the torch path alone; where there is one, the kernels
# must build (test below), so a broken build fails here instead of silently falling back.
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the torch path is the only one")


def test_kernels_build_where_a_compiler_exists():
    assert native.library() is not None


def _torch_map_stats(a, b, p, k):
    q = _map_stats(a[:, :, p:].double(), k)
    kk = _map_stats(b[:, :, p:].double(), k)
    return torch.stack((*q, *kk, q[1] * kk[1], q[2] * kk[2]), -1)


def _native(a, b, p, k, S=14):
    out = torch.full((a.shape[0], a.shape[1], a.shape[-1], S), -7.0)
    assert native.map_stats(a, b, p, k, out)
    return out


@pytest.mark.parametrize("R", [64, 20, 1, 33])
@pytest.mark.parametrize("k", [1, 5, 7, 16, 64])
def test_kernel_equals_torch_path(R, k):
    g = torch.Generator().manual_seed(R * 100 + k)
    B, H, Na, Nb, p = 3, 2, 80, 71, 1
    a = torch.randn(B, H, Na, R, generator=g) * 3
    b = torch.randn(B, H, Nb, R, generator=g)
    got = _native(a, b, p, k)
    torch.testing.assert_close(got[..., :12].double(), _torch_map_stats(a, b, p, k), rtol=1e-5, atol=1e-5)
    assert (got[..., 12:] == -7).all()  # columns past the map statistics untouched


def test_strided_views_ties_and_odd_items():
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (5, 3, 2 * 40, 64), generator=g).float()  # many ties
    a = base[:, :, ::2].permute(1, 0, 2, 3)  # (B=3, H=5, 40, 64), token stride 2 rows, heads outermost
    # (3, 5, 37, 64), tokens outermost
    b = torch.randint(-2, 3, (37, 3, 5, 64), generator=g).float().permute(1, 2, 0, 3)
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and not a.is_contiguous()
    for p, k in ((0, 5), (3, 3), (0, 37)):
        torch.testing.assert_close(_native(a, b, p, k)[..., :12].double(), _torch_map_stats(a, b, p, k))


def test_nan_and_inf_tokens():
    a = torch.randn(2, 2, 30, 18)
    b = torch.randn(2, 2, 30, 18)
    a[1, 0, 7, 3] = float("nan")
    a[0, 1, 9, 17] = float("inf")
    b[0, 0, 4, 16] = float("-inf")
    got = _native(a, b, 1, 5)
    q = [STAT_INDEX[n] for n in ("q_mean", "q_max", "q_min", "q_top_pos", "q_top_neg")]
    assert torch.isnan(got[1, 0, 3, q]).all()  # the NaN mode: every statistic of its side
    assert torch.isfinite(got[1, 0, 3, 5:10]).all() and torch.isfinite(got[1, 0, :3, :10]).all()
    ref = _torch_map_stats(a, b, 1, 5)
    assert torch.isnan(ref[1, 0, 3, :5]).all()  # the torch path marks the whole side too
    finite = ~torch.isnan(ref)
    assert torch.equal(torch.isnan(got[..., :12]), ~finite)
    assert got[0, 1, 17, STAT_INDEX["q_max"]] == float("inf")
    assert got[0, 0, 16, STAT_INDEX["k_min"]] == float("-inf")
    torch.testing.assert_close(got[..., :12].double()[finite], ref[finite])


def test_mode_statistics_same_with_and_without_kernel(monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 50, 24, generator=g), torch.randn(2, 3, 50, 24, generator=g)
    S = torch.rand(3, 24, generator=g) + 0.1
    with_kernel = mode_statistics(a, b, S, 0.3, prefix_tokens=1)
    out = torch.zeros(2, 3, 24, 14)
    assert native.map_stats(a, b, 1, 5, out)  # both kernels take these inputs: the comparison is real
    assert native.share_stats(a, a.flip(-2), b, S, 0.3, out, STAT_INDEX["attn_contrib"])
    monkeypatch.setenv("QKPROBE_NATIVE", "0")
    assert native.map_stats(a, b, 1, 5, torch.empty(2, 3, 24, 14)) is False
    without = mode_statistics(a, b, S, 0.3, prefix_tokens=1)
    assert with_kernel.shape == (2, 3, 24, len(STAT_NAMES))
    torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-6)


def test_kernel_declines_what_it_does_not_handle():
    a = torch.randn(2, 2, 10, 8)
    out = torch.empty(2, 2, 8, 14)
    assert not native.map_stats(a.double(), a.double(), 0, 3, out.double())  # float64: torch path
    assert not native.map_stats(a, a, 0, 65, out)  # k above the kernel's 64
    assert not native.map_stats(a, a, 8, 3, out)  # fewer map tokens than k
    assert not native.map_stats(a.transpose(-1, -2).contiguous().transpose(-1, -2), a, 0, 3, out)  # R strided
    assert not native.map_stats(a, a, 0, 3, torch.empty(2, 2, 8, 11))  # no room for 12 columns


def test_build_is_cached_and_missing_compiler_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("QKPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is not None
    built = list((tmp_path / "cache").glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt

    # a compiler without OpenMP: the same kernels, built single-threaded
    monkeypatch.setenv("QKPROBE_CACHE", str(tmp_path / "no-openmp"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_OPENMP", ["-fno-such-openmp-flag"])
    assert native.library() is not None
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 20, 16, generator=g), torch.randn(2, 3, 20, 16, generator=g)
    torch.testing.assert_close(_native(a, b, 1, 5)[..., :12].double(), _torch_map_stats(a, b, 1, 5))

    # a compiler that fails: one warning, the torch path, same statistics
    monkeypatch.setenv("QKPROBE_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    with caplog.at_level(logging.WARNING, logger="qkprobe"):
        assert native.library() is None
    assert "torch path" in caplog.text
    a = torch.randn(1, 2, 12, 8)
    assert not native.map_stats(a, a, 0, 3, torch.empty(1, 2, 8, 14))
    st = mode_statistics(a, a, torch.ones(2, 8), 1.0)
    torch.testing.assert_close(st[..., STAT_INDEX["q_max"]], a.amax(-2))


def _streams(monkeypatch, use_kernel: bool, batches, L=2, H=3, R=5, S=4, K=6):
    from qkprobe.core.streaming import Aggregates, TopKSamples
    monkeypatch.setenv("QKPROBE_NATIVE", "1" if use_kernel else "0")
    topk, agg = TopKSamples(L, H, R, k=K), Aggregates((L, H, R, S))
    start = 0
    for x in batches:
        idx = torch.arange(start, start + x.shape[0])
        topk.update(x[..., 0], x[..., 1], idx)
        agg.update(x)
        start += x.shape[0]
    return topk.state_dict(), agg.state_dict()


def test_streaming_kernels_equal_torch_path(monkeypatch):
    g = torch.Generator().manual_seed(9)
    batches = [torch.randint(-3, 4, (n, 2, 3, 5, 4), generator=g).float() * 0.25 for n in (3, 1, 8, 5)]
    batches[1][0, 0, 1, 2, 0] = float("nan")  # a non-finite score and statistic
    batches[2][4, 1, 0, 0, 3] = float("inf")
    batches[3][:, 1, 2, 4, 1] = float("-inf")  # a column with no finite value in a batch
    got_t, got_a = _streams(monkeypatch, True, batches)
    ref_t, ref_a = _streams(monkeypatch, False, batches)
    for key in ref_t:
        np.testing.assert_array_equal(got_t[key], ref_t[key])  # ties: lower index first, exactly
    for key in ref_a:
        np.testing.assert_allclose(got_a[key], ref_a[key], rtol=1e-13, atol=1e-13, err_msg=key)
    assert got_a["nonfinite"].sum() == 1 + 1 + 5


def test_streaming_kernels_never_write_into_loaded_arrays(monkeypatch):
    from qkprobe.core.streaming import Aggregates, TopKSamples
    topk, agg = TopKSamples(2, 3, k=4), Aggregates((2, 3, 2))
    t_state, a_state = topk.state_dict(), agg.state_dict()
    topk.load_state_dict(t_state)
    agg.load_state_dict(a_state)
    topk.update(torch.ones(2, 2, 3), torch.ones(2, 2, 3), torch.arange(2))
    agg.update(torch.ones(2, 2, 3, 2))
    assert (t_state["index"] == -1).all() and (a_state["count"] == 0).all()
    assert (topk.index[..., :2] >= 0).all() and (agg.count == 2).all()


@pytest.mark.parametrize("k", [1, 5, 7, 16, 64])
def test_padded_tokens_kernel_equals_torch_path(k):
    """A token mask: the kernels leave padded tokens (huge and NaN values here) out, clip top-k per
    sample, give NaN for a sample without map tokens, as the torch path does."""
    g = torch.Generator().manual_seed(k)
    B, H, N, R = 5, 3, 40, 33
    a, b = torch.randn(B, H, N, R, generator=g), torch.randn(B, H, N, R, generator=g)
    q, kk = torch.randn(B, H, N, 8, generator=g), torch.randn(B, H, N, 8, generator=g)
    S = torch.rand(H, R, generator=g) + 0.1
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, n in enumerate((40, 3, 17, 1, 0)):
        mask[i, :n] = True
        a[i, :, n:], b[i, :, n:] = 1e4, float("nan")
    fast = mode_statistics(a, b, S, 0.5, prefix_tokens=1, topk=k, q=q, k=kk, token_mask=mask)
    with native.disabled():
        slow = mode_statistics(a, b, S, 0.5, prefix_tokens=1, topk=k, q=q, k=kk, token_mask=mask)
    share = STAT_INDEX["attn_share"]  # a ratio: float32 sums in another order, near-zero totals
    torch.testing.assert_close(fast[..., :share], slow[..., :share], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(fast[..., share], slow[..., share], rtol=1e-3, atol=1e-4, equal_nan=True)
    assert torch.isfinite(fast[:3]).all() and fast[4].isnan().all()
    assert fast[3, ..., :12].isnan().all() and torch.isfinite(fast[3, ..., 12:]).all()
    # the kernels themselves ran (not a silent fallback), and declined a mask of another shape
    out = torch.full((B, H, R, 14), -7.0)
    assert native.map_stats(a, b, 1, min(k, N - 1), out, mask=mask)
    assert native.share_stats(a, a, b, S, 0.5, out, 12, mask=mask)
    assert not native.map_stats(a, b, 1, 3, out, mask=mask[:, :30])
    assert not native.map_stats(a, b[:, :, :30], 1, 3, out, mask=mask)
