"""mode_statistics against plain float64 loops over samples, heads and modes."""

import math

import numpy as np
import pytest
import torch

from qkprobe.core.modes import qk_modes
from qkprobe.core.stats import STAT_INDEX, STAT_NAMES, count_nonfinite, mode_statistics
from qkprobe.errors import ShapeError


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _softmax_rows(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _reference(a, b, S, scale, prefix, topk, P):
    """float64 loops. a (B,H,N,R), b (B,H,Nk,R), S (H,R), P (B,H,N,Nk) numpy."""
    B, H, N, R = a.shape
    Nk = b.shape[2]
    out = np.zeros((B, H, R, len(STAT_NAMES)))
    for s in range(B):
        for h in range(H):
            contribs = []
            for r in range(R):
                row = {}
                for side, x in (("q", a[s, h, prefix:, r]), ("k", b[s, h, prefix:, r])):
                    vals = sorted(float(v) for v in x)
                    kk = min(topk, len(vals))
                    row[side + "_mean"] = sum(vals) / len(vals)
                    row[side + "_max"] = vals[-1]
                    row[side + "_min"] = vals[0]
                    row[side + "_top_pos"] = sum(vals[-kk:]) / kk
                    row[side + "_top_neg"] = sum(vals[:kk]) / kk
                row["score_pos"] = row["q_max"] * row["k_max"]
                row["score_neg"] = row["q_min"] * row["k_min"]
                # Explicit N × Nk logit share of this mode.
                c = 0.0
                for i in range(N):
                    ell = [scale * S[h, r] * a[s, h, i, r] * b[s, h, j, r] for j in range(Nk)]
                    c += sum(P[s, h, i, j] * ell[j] for j in range(Nk)) - sum(ell) / Nk
                row["attn_contrib"] = c / N
                contribs.append(row["attn_contrib"])
                for name, v in row.items():
                    out[s, h, r, STAT_INDEX[name]] = v
            total = sum(contribs)
            for r in range(R):
                out[s, h, r, STAT_INDEX["attn_share"]] = contribs[r] / total if total != 0 else 0.0
    return out


def _random_probs(B, H, N, Nk, seed):
    return torch.softmax(3 * _rand(B, H, N, Nk, seed=seed), dim=-1)


@pytest.mark.parametrize("prefix,include,topk", [(0, False, 3), (2, False, 3), (2, True, 2),
                                                 (1, False, 50)])
def test_statistics_match_float64_loops(prefix, include, topk):
    B, H, N, Nk, R = 2, 3, 7, 6, 4
    a, b = _rand(B, H, N, R, seed=1), _rand(B, H, Nk, R, seed=2)
    S = _rand(H, R, seed=3).abs() + 0.1
    P = _random_probs(B, H, N, Nk, 4)
    got = mode_statistics(a, b, S, 0.7, prefix_tokens=prefix, include_prefix=include, topk=topk,
                          probs=P)
    assert got.shape == (B, H, R, len(STAT_NAMES)) and got.dtype == torch.float64
    ref = _reference(a.numpy(), b.numpy(), S.numpy(), 0.7, 0 if include else prefix, topk, P.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_prefix_changes_map_stats_not_attention():
    B, H, N, R = 1, 2, 6, 3
    a, b = _rand(B, H, N, R, seed=5), _rand(B, H, N, R, seed=6)
    a[..., 0, :] = 100.0  # a huge cls token
    S = torch.ones(H, R, dtype=torch.float64)
    with_p = mode_statistics(a, b, S, 1.0, prefix_tokens=1)
    without = mode_statistics(a, b, S, 1.0, prefix_tokens=1, include_prefix=True)
    assert (without[..., STAT_INDEX["q_max"]] == 100).all()
    assert (with_p[..., STAT_INDEX["q_max"]] < 100).all()
    att = [STAT_INDEX["attn_contrib"], STAT_INDEX["attn_share"]]
    torch.testing.assert_close(with_p[..., att], without[..., att])


def test_low_precision_inputs_are_upcast():
    B, H, N, R = 2, 2, 9, 5
    a = _rand(B, H, N, R, seed=7).to(torch.bfloat16)
    b = _rand(B, H, N, R, seed=8).to(torch.bfloat16)
    S = _rand(H, R, seed=9).abs().float()
    P = _random_probs(B, H, N, N, 10).float()
    got = mode_statistics(a, b, S, 0.5, prefix_tokens=1, topk=4, probs=P)
    assert got.dtype == torch.float32
    ref = _reference(a.double().numpy(), b.double().numpy(), S.double().numpy(), 0.5, 1, 4,
                     P.double().numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    got16 = mode_statistics(a.half(), b.half(), S, 0.5, prefix_tokens=1, topk=4, probs=P.half())
    assert got16.dtype == torch.float32


def _layer(seed, B=2, N=8, D=12, H=3, R=4, bias=True):
    """Random q, k of one layer and their mode coordinates through qk_modes."""
    W_q, W_k = _rand(H, R, D, seed=seed), _rand(H, R, D, seed=seed + 1)
    b_q = _rand(H, R, seed=seed + 2) if bias else None
    b_k = _rand(H, R, seed=seed + 3) if bias else None
    x = _rand(B, N, D, seed=seed + 4)
    m = qk_modes(W_q, W_k, b_q, b_k)
    q = torch.einsum("bnd,hrd->bhnr", x, W_q) + (0 if b_q is None else b_q[None, :, None, :])
    k = torch.einsum("bnd,hrd->bhnr", x, W_k) + (0 if b_k is None else b_k[None, :, None, :])
    a = torch.einsum("bhnr,hrm->bhnm", q, m.coord_q)
    b = torch.einsum("bhnr,hrm->bhnm", k, m.coord_k)
    return q, k, a, b, m.S


def test_contributions_sum_to_logit_lift_and_share_sums_to_one():
    q, k, a, b, S = _layer(20)
    scale = q.shape[-1] ** -0.5
    st = mode_statistics(a, b, S, scale, q=q, k=k)
    L = scale * (q @ k.transpose(-1, -2))  # (B, H, N, N)
    P = torch.softmax(L, dim=-1)
    lift = ((P * L).sum(-1) - L.mean(-1)).mean(-1)  # (B, H)
    contrib = st[..., STAT_INDEX["attn_contrib"]]
    torch.testing.assert_close(contrib.sum(-1), lift, rtol=1e-9, atol=1e-12)
    assert (lift > 0).all()
    torch.testing.assert_close(st[..., STAT_INDEX["attn_share"]].sum(-1),
                               torch.ones_like(lift), rtol=1e-9, atol=1e-12)


def test_probs_recomputed_and_reconstructed_agree():
    q, k, a, b, S = _layer(30)
    scale = 0.37
    bias = _rand(1, 3, 8, 8, seed=31)  # varies over keys: changes P, so it must be honored
    P = torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1)
    given = mode_statistics(a, b, S, scale, probs=P)
    from_qk = mode_statistics(a, b, S, scale, q=q, k=k, attn_bias=bias)
    recon = mode_statistics(a, b, S, scale, attn_bias=bias)
    torch.testing.assert_close(from_qk, given, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(recon, given, rtol=1e-9, atol=1e-12)
    no_bias = mode_statistics(a, b, S, scale, q=q, k=k)
    assert not torch.allclose(no_bias[..., STAT_INDEX["attn_contrib"]],
                              given[..., STAT_INDEX["attn_contrib"]])

    mask = torch.ones(8, 8, dtype=torch.bool).tril()  # True = may attend
    Pm = torch.softmax((scale * q @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf), dim=-1)
    torch.testing.assert_close(mode_statistics(a, b, S, scale, q=q, k=k, attn_bias=mask),
                               mode_statistics(a, b, S, scale, probs=Pm), rtol=1e-9, atol=1e-12)


def test_float32_recompute_close_to_float64():
    q, k, a, b, S = _layer(40)
    ref = mode_statistics(a, b, S, 0.5, q=q, k=k)
    got = mode_statistics(a.float(), b.float(), S.float(), 0.5, q=q.float(), k=k.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_zero_contribution_gives_zero_share():
    a = torch.zeros(1, 2, 5, 3)
    b = _rand(1, 2, 5, 3, seed=50).float()
    st = mode_statistics(a, b, torch.ones(2, 3), 1.0)
    assert torch.isfinite(st).all()
    assert (st[..., STAT_INDEX["attn_share"]] == 0).all()


def test_bad_input_raises():
    a = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ShapeError):
        mode_statistics(a, a, torch.ones(2, 4), 1.0, prefix_tokens=3)
    with pytest.raises(ShapeError):
        mode_statistics(a, a, torch.ones(2, 3), 1.0)
    with pytest.raises(ShapeError):
        mode_statistics(a, a[..., :3], torch.ones(2, 4), 1.0)
    with pytest.raises(ShapeError):
        mode_statistics(a, a, torch.ones(2, 4), 1.0, q=a)
    with pytest.raises(ValueError):
        mode_statistics(a, a, torch.ones(2, 4), 1.0, topk=0)


def test_count_nonfinite():
    a = torch.zeros(2, 3)
    b = torch.zeros(4)
    assert count_nonfinite(a, b) == 0
    a[0, 1] = float("nan")
    b[2] = float("inf")
    b[3] = float("-inf")
    assert count_nonfinite(a, b) == 3
    assert count_nonfinite(a) == 1


def test_chunked_top_sum_equals_topk_for_many_shapes_and_ties():
    from qkprobe.core.stats import _top_sum
    g = torch.Generator().manual_seed(0)
    for n in (5, 14, 49, 50, 196, 197, 256):
        for k in (1, 3, 5, 16):
            if k > n:
                continue
            x = torch.randn(3, n, 4, generator=g)  # (..., N, R): tokens on dim -2
            x[0, : n // 2, 0] = 1.5  # ties across chunks
            x[1, : n // 2, 1] = -1.5
            for largest in (True, False):
                ref = torch.topk(x, k, dim=-2, largest=largest).values.sum(-2)
                assert torch.allclose(_top_sum(x, k, largest), ref, atol=1e-5), (n, k, largest)
            xs = torch.randn(2, n + 2, 3, generator=g)[:, 2:]  # a prefix-sliced view
            assert torch.allclose(_top_sum(xs, k), torch.topk(xs, k, dim=-2).values.sum(-2), atol=1e-5)


# ---- padded tokens (token_mask): every statistic as for the sample alone ----------------------

def _padded_batch(lengths, N=11, H=2, R=6, seed=20):
    """Random coordinates of len(lengths) samples padded to N tokens (padding: huge / NaN values
    that would win every max, min and top-k), the mask, and q, k for the attention."""
    B = len(lengths)
    a, b = _rand(B, H, N, R, seed=seed), _rand(B, H, N, R, seed=seed + 1)
    q, k = _rand(B, H, N, 4, seed=seed + 2), _rand(B, H, N, 4, seed=seed + 3)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        a[i, :, n:], b[i, :, n:] = 1e6, -1e6
        if n + 1 < N:
            a[i, :, n + 1], k[i, :, n + 1] = float("nan"), float("nan")
    return a, b, q, k, mask


@pytest.mark.parametrize("prefix,include,topk", [(1, False, 5), (0, False, 3), (2, True, 4), (1, False, 50)])
def test_padded_sample_equals_the_sample_alone(prefix, include, topk):
    lengths = [11, 4, 7, 2]
    a, b, q, k, mask = _padded_batch(lengths)
    S = _rand(2, 6, seed=3).abs() + 0.1
    got = mode_statistics(a, b, S, 0.6, prefix_tokens=prefix, include_prefix=include, topk=topk, q=q, k=k,
                          token_mask=mask)
    assert torch.isfinite(got).all()
    for i, n in enumerate(lengths):
        alone = mode_statistics(a[i:i + 1, :, :n], b[i:i + 1, :, :n], S, 0.6, prefix_tokens=prefix,
                                include_prefix=include, topk=topk, q=q[i:i + 1, :, :n], k=k[i:i + 1, :, :n])
        torch.testing.assert_close(got[i], alone[0], rtol=1e-10, atol=1e-10)
    # with the module's probabilities: padded keys get zero weight, whatever P held there
    P = _random_probs(4, 2, 11, 11, 7)
    got = mode_statistics(a, b, S, 0.6, prefix_tokens=prefix, include_prefix=include, topk=topk, probs=P,
                          token_mask=mask)
    n = lengths[1]
    Pn = P[1:2, :, :n, :n]
    alone = mode_statistics(a[1:2, :, :n], b[1:2, :, :n], S, 0.6, prefix_tokens=prefix, include_prefix=include,
                            topk=topk, probs=Pn)
    torch.testing.assert_close(got[1, ..., :STAT_INDEX["attn_contrib"]], alone[0, ..., :STAT_INDEX["attn_contrib"]])
    masked = P[1:2].masked_fill(~mask[1][None, None, None, :], 0)[:, :, :n, :n]
    ref = mode_statistics(a[1:2, :, :n], b[1:2, :, :n], S, 0.6, prefix_tokens=prefix, include_prefix=include,
                          topk=topk, probs=masked)
    torch.testing.assert_close(got[1], ref[0])


def test_padded_sample_without_map_tokens_is_nan_and_mask_is_checked():
    a, b, q, k, mask = _padded_batch([5, 1, 0], N=6)
    S = _rand(2, 6, seed=3).abs() + 0.1
    got = mode_statistics(a, b, S, 0.6, prefix_tokens=1, topk=3, q=q, k=k, token_mask=mask)
    assert torch.isfinite(got[0]).all()
    assert got[1, ..., :STAT_INDEX["attn_contrib"]].isnan().all()       # only the prefix token: no map
    assert torch.isfinite(got[1, ..., STAT_INDEX["attn_contrib"]:]).all()  # the attention of [CLS] alone
    assert got[2].isnan().all()                                           # no real token at all
    with pytest.raises(ShapeError, match="token_mask"):
        mode_statistics(a, b, S, 0.6, token_mask=mask[:, :5])
    with pytest.raises(ShapeError, match="token_mask"):
        mode_statistics(a, b[:, :, :5], S, 0.6, token_mask=mask)
