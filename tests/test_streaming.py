"""TopKSamples and Aggregates against a global sort / numpy over all the data at once."""

import warnings

import numpy as np
import pytest
import torch

from qkprobe.core.streaming import Aggregates, TopKSamples
from qkprobe.errors import ShapeError

H, R, K = 2, 3, 5
SIZES = [3, 1, 7, 4, 9, 2, 6]  # uneven batches, 32 samples


def _scores(n, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, H, R)), g.standard_normal((n, H, R))  # continuous: no ties


def _stream(pos, neg, sizes, first_index=0, topk=None):
    topk = topk or TopKSamples(H, R, k=K)
    start = 0
    for n in sizes:
        sl = slice(start, start + n)
        topk.update(torch.from_numpy(pos[sl]), torch.from_numpy(neg[sl]),
                    torch.arange(first_index + start, first_index + start + n))
        start += n
    return topk


def _global_topk(pos, neg, k):
    """Loop reference: sort every (head, mode, sign) column of all samples."""
    scores = np.full((H, R, 2, k), -np.inf, dtype=np.float32)
    index = np.full((H, R, 2, k), -1, dtype=np.int64)
    for h in range(H):
        for r in range(R):
            for s, x in enumerate((pos, neg)):
                col = x[:, h, r].astype(np.float32)
                order = sorted(range(len(col)), key=lambda i: -col[i])[:k]
                scores[h, r, s, :len(order)] = col[order]
                index[h, r, s, :len(order)] = order
    return scores, index


def test_topk_stream_equals_global_sort():
    pos, neg = _scores(sum(SIZES), 0)
    t = _stream(pos, neg, SIZES)
    ref_s, ref_i = _global_topk(pos, neg, K)
    np.testing.assert_array_equal(t.scores.numpy(), ref_s)
    np.testing.assert_array_equal(t.index.numpy(), ref_i)
    assert t.scores.dtype == torch.float32 and t.index.dtype == torch.int64


def test_topk_fewer_samples_than_k():
    pos, neg = _scores(3, 1)
    t = _stream(pos, neg, [2, 1])
    ref_s, ref_i = _global_topk(pos, neg, K)
    np.testing.assert_array_equal(t.scores.numpy(), ref_s)
    np.testing.assert_array_equal(t.index.numpy(), ref_i)
    assert (t.index[..., 3:] == -1).all() and torch.isneginf(t.scores[..., 3:]).all()


def test_topk_merge_of_halves_equals_one_stream():
    pos, neg = _scores(sum(SIZES), 2)
    one = _stream(pos, neg, SIZES)
    first = _stream(pos[:14], neg[:14], [3, 1, 7, 3])
    second = _stream(pos[14:], neg[14:], [5, 9, 4], first_index=14)
    second.merge(first)  # either order
    np.testing.assert_array_equal(second.scores.numpy(), one.scores.numpy())
    np.testing.assert_array_equal(second.index.numpy(), one.index.numpy())


def test_topk_ties_go_to_lower_index_whatever_the_order():
    pos = np.ones((6, H, R))
    a = _stream(pos, -pos, [6])
    b = _stream(pos[3:], -pos[3:], [3], first_index=3)
    b.merge(_stream(pos[:3], -pos[:3], [3]))
    np.testing.assert_array_equal(a.index[0, 0, 0].numpy(), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b.index.numpy(), a.index.numpy())


def test_topk_nonfinite_scores_are_skipped():
    pos, neg = _scores(8, 3)
    pos[2, 0, 0] = np.nan
    pos[5, 0, 1] = np.inf
    t = _stream(pos, neg, [4, 4])
    assert 2 not in t.index[0, 0, 0].tolist() and 5 not in t.index[0, 0, 1].tolist()
    assert torch.isfinite(t.scores).all()


def test_topk_state_roundtrip_and_shape_checks():
    pos, neg = _scores(10, 4)
    t = _stream(pos, neg, [10])
    u = TopKSamples(H, R, k=K)
    u.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(u.index.numpy(), t.index.numpy())
    _stream(pos, neg, [4], topk=u)  # resumed state keeps working
    with pytest.raises(ShapeError):
        TopKSamples(H, R, k=K + 1).load_state_dict(t.state_dict())
    with pytest.raises(ShapeError):
        t.update(torch.zeros(2, H, R + 1), torch.zeros(2, H, R + 1), torch.arange(2))
    with pytest.raises(ShapeError):
        t.merge(TopKSamples(H, R, k=K + 1))


S_ = 4


def _data(n, seed, bad=True):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, H, R, S_)) * 3 + 10
    if bad:
        x[g.random(x.shape) < 0.1] = np.nan
        x[1, 0, 0, 0] = np.inf
        x[2, 0, 0, 1] = -np.inf
        x[:, 1, 2, 3] = np.nan  # an element that never sees a finite value
    return x


def _agg(x, sizes):
    agg = Aggregates((H, R, S_))
    start = 0
    for n in sizes:
        agg.update(torch.from_numpy(x[start:start + n]))
        start += n
    return agg


def _check_against_numpy(agg, x):
    ok = np.isfinite(x)
    count = ok.sum(0)
    xm = np.where(ok, x, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN elements
        mean, var = np.nanmean(xm, 0), np.nanvar(xm, 0)
        lo, hi = np.nanmin(xm, 0), np.nanmax(xm, 0)
    has = count > 0
    np.testing.assert_array_equal(agg.count.numpy(), count)
    np.testing.assert_array_equal(agg.nonfinite.numpy(), (~ok).sum(0))
    np.testing.assert_allclose(agg.mean.numpy()[has], mean[has], rtol=1e-12)
    np.testing.assert_allclose(agg.variance.numpy()[has], var[has], rtol=1e-10)
    np.testing.assert_array_equal(agg.min.numpy()[has], lo[has])
    np.testing.assert_array_equal(agg.max.numpy()[has], hi[has])
    assert np.isnan(agg.variance.numpy()[~has]).all() and (~has).any()


def test_aggregates_stream_equals_numpy_with_nonfinite():
    x = _data(sum(SIZES), 5)
    _check_against_numpy(_agg(x, SIZES), x)


def test_aggregates_clean_data():
    x = _data(sum(SIZES), 6, bad=False)
    agg = _agg(x, SIZES)
    np.testing.assert_allclose(agg.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(agg.variance.numpy(), x.var(0), rtol=1e-10)
    np.testing.assert_array_equal(agg.count.numpy(), np.full((H, R, S_), len(x)))


def test_aggregates_merge_is_associative_and_matches_stream():
    x = _data(sum(SIZES), 7)
    parts = [x[:5], x[5:6], x[6:]]
    A, B, C = (_agg(p, [len(p)]) for p in parts)
    left = _agg(parts[0], [5])
    left.merge(B)
    left.merge(C)  # (A + B) + C
    bc = _agg(parts[1], [1])
    bc.merge(C)
    right = _agg(parts[0], [5])
    right.merge(bc)  # A + (B + C)
    stream = _agg(x, SIZES)
    for agg in (left, right, stream):
        _check_against_numpy(agg, x)
    for f in ("count", "min", "max", "nonfinite"):
        torch.testing.assert_close(getattr(left, f), getattr(right, f), rtol=0, atol=0)
    torch.testing.assert_close(left.mean, right.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(left.m2, right.m2, rtol=1e-12, atol=0)
    empty = Aggregates((H, R, S_))
    empty.merge(A)  # merging into an empty state is the identity
    torch.testing.assert_close(empty.mean, A.mean, rtol=0, atol=0)


def test_aggregates_state_roundtrip():
    x = _data(12, 8)
    agg = _agg(x[:6], [6])
    again = Aggregates((H, R, S_))
    again.load_state_dict(agg.state_dict())
    again.update(torch.from_numpy(x[6:]))
    _check_against_numpy(again, x)
    with pytest.raises(ShapeError):
        Aggregates((H, R, S_ + 1)).load_state_dict(agg.state_dict())
    with pytest.raises(ShapeError):
        agg.update(torch.zeros(2, H, R))


def _two_sorts(scores, index, k):
    """The lexicographic rule (score descending, index ascending) by two stable sorts."""
    bad = ~torch.isfinite(scores)
    scores, index = scores.masked_fill(bad, float("-inf")), index.masked_fill(bad, -1)
    order = torch.sort(index, dim=-1, stable=True).indices
    scores, index = torch.gather(scores, -1, order), torch.gather(index, -1, order)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(scores, -1, order), torch.gather(index, -1, order)


def test_packed_key_selection_equals_two_stable_sorts():
    from qkprobe.core.streaming import _select_topk
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-4, 5, (50, 24), generator=g).float() * 0.5  # many ties, negatives, zeros
    scores[0, :3] = -0.0
    scores[1, 2] = float("nan")
    scores[2, 5] = float("inf")
    scores[3, :] = float("-inf")
    scores[4, 7] = -3.4e38
    scores[5, 1] = 1.2e-45  # a subnormal
    index = torch.stack([torch.randperm(1000, generator=g)[:24] for _ in range(50)])
    index[6, :10] = -1  # empty slots
    for k in (1, 5, 16, 24):
        got = _select_topk(scores, index, k)
        ref = _two_sorts(scores, index, k)
        assert torch.equal(got[1], ref[1]), k
        assert torch.equal(got[0], ref[0]), k
    big = index + (1 << 32)  # beyond the packed key: the sorting path
    got = _select_topk(scores, big, 8)
    ref = _two_sorts(scores, big, 8)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_layer_axis_state_equals_one_state_per_layer():
    rng = np.random.default_rng(5)
    L = 3
    pos, neg = rng.standard_normal((20, L, H, R)), rng.standard_normal((20, L, H, R))
    stats = rng.standard_normal((20, L, H, R, 4))
    stats[3, 1, 0, 2, 1] = np.nan
    together_t, together_a = TopKSamples(L, H, R, k=K), Aggregates((L, H, R, 4))
    alone = [(TopKSamples(H, R, k=K), Aggregates((H, R, 4))) for _ in range(L)]
    for start, n in ((0, 7), (7, 13)):
        sl, idx = slice(start, start + n), torch.arange(start, start + n)
        together_t.update(torch.from_numpy(pos[sl]), torch.from_numpy(neg[sl]), idx)
        together_a.update(torch.from_numpy(stats[sl]))
        for j, (t, a) in enumerate(alone):
            t.update(torch.from_numpy(pos[sl, j]), torch.from_numpy(neg[sl, j]), idx)
            a.update(torch.from_numpy(stats[sl, j]))
    assert together_t.shape == (L, H, R)
    for j, (t, a) in enumerate(alone):
        for key, value in together_t.select(j).state_dict().items():
            np.testing.assert_array_equal(value, t.state_dict()[key])
        for key, value in together_a.select(j).state_dict().items():
            np.testing.assert_allclose(value, a.state_dict()[key], rtol=1e-12)
    assert together_a.select(1).nonfinite.sum() == 1 and together_a.select(0).nonfinite.sum() == 0


def test_empty_batch_changes_nothing():
    agg = Aggregates((H, R, 2))
    agg.update(torch.ones(3, H, R, 2))
    before = agg.state_dict()
    agg.update(torch.zeros(0, H, R, 2))
    for key, value in agg.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
