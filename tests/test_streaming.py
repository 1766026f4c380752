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
