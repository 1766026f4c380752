"""The low-rank route against the full SVD, and the coordinate identities, on random matrices."""

import pytest
import timm
import torch
import torch.nn as nn

import qkprobe
from qkprobe.core.modes import fold_affine_norm, full_svd_modes, qk_modes
from peaked import peak_mha, peak_timm


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("H,R,D,Dk", [(3, 8, 32, 32), (2, 16, 48, 24), (1, 4, 4, 4)])
def test_low_rank_equals_full_svd(H, R, D, Dk):
    W_q, W_k = rand(H, R, D, seed=1), rand(H, R, Dk, seed=2)
    m = qk_modes(W_q, W_k)
    U, S, V = full_svd_modes(W_q, W_k)
    assert (m.S - S).abs().max() < 1e-10 * S.max()
    assert (m.U - U).abs().max() < 1e-8 and (m.V - V).abs().max() < 1e-8
    # U S Vᵀ is W_qᵀ W_k
    full = W_q.transpose(-1, -2) @ W_k
    assert (m.U @ torch.diag_embed(m.S) @ m.V.transpose(-1, -2) - full).abs().max() < 1e-10 * full.abs().max()
    if D == Dk:
        assert (m.cosine - (U * V).sum(-2)).abs().max() < 1e-10
    else:
        assert m.cosine is None


def test_coordinates_reconstruct_qk_and_carry_bias_offsets():
    H, R, D, N = 3, 8, 32, 11
    W_q, W_k, b_q, b_k = rand(H, R, D, seed=1), rand(H, R, D, seed=2), rand(H, R, seed=3), rand(H, R, seed=4)
    m = qk_modes(W_q, W_k, b_q, b_k)
    x = rand(N, D, seed=5)
    q = torch.einsum("hrd,nd->hnr", W_q, x) + b_q[:, None]
    k = torch.einsum("hrd,nd->hnr", W_k, x) + b_k[:, None]
    a, b = q @ m.coord_q, k @ m.coord_k
    assert (torch.einsum("hm,him,hjm->hij", m.S, a, b) - q @ k.transpose(-1, -2)).abs().max() < 1e-9
    assert (a - torch.einsum("hdm,nd->hnm", m.U, x) - m.a_offset[:, None]).abs().max() < 1e-9
    assert (b - torch.einsum("hdm,nd->hnm", m.V, x) - m.b_offset[:, None]).abs().max() < 1e-9
    # the key-dependent bias term b_qᵀ W_k x_j equals Σ_r s_r α_r (v_r·x_j)
    kb = torch.einsum("hd,nd->hn", m.key_bias_term, x)
    via_modes = torch.einsum("hm,hm,hnm->hn", m.S, m.a_offset, torch.einsum("hdm,nd->hnm", m.V, x))
    assert (kb - via_modes).abs().max() < 1e-9


def test_signs_are_canonical_and_deterministic():
    W_q, W_k = rand(2, 8, 32, seed=1), rand(2, 8, 32, seed=2)
    m1, m2 = qk_modes(W_q, W_k), qk_modes(-W_q, -W_k)  # same product, SVD may flip signs
    assert torch.allclose(m1.U, m2.U) and torch.allclose(m1.V, m2.V)
    from qkprobe.core.modes import sign_probe
    assert (torch.einsum("hdm,d->hm", m1.U, sign_probe(32)) > 0).all()


def test_ill_conditioned_weights_take_the_householder_route_and_stay_exact():
    """Cholesky-QR squares the condition number; past the orthogonality check the Householder
    QR route takes over. Both must equal the full SVD."""
    W_q, W_k = rand(2, 8, 40, seed=1), rand(2, 8, 40, seed=2)
    W_q[:, 1] = W_q[:, 0] + 1e-7 * rand(2, 40, seed=3)  # nearly parallel rows: cond(W_q) ~ 1e7
    calls = []
    real_qr = torch.linalg.qr
    torch.linalg.qr = lambda *a, **k: calls.append(1) or real_qr(*a, **k)
    try:
        m = qk_modes(W_q, W_k)
    finally:
        torch.linalg.qr = real_qr
    assert calls  # the fallback ran
    U, S, V = full_svd_modes(W_q, W_k)
    assert (m.S - S).abs().max() < 1e-8 * S.max()
    assert (m.cosine - (U * V).sum(-2)).abs().max() < 1e-8
    assert (m.U.transpose(-1, -2) @ m.U - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-10


def test_rank_deficient_head_gets_zero_coordinates_not_nan():
    W_q = rand(1, 4, 16, seed=1)
    W_q[0, 3] = W_q[0, 2]  # rank 3
    m = qk_modes(W_q, rand(1, 4, 16, seed=2))
    assert m.S[0, -1] < 1e-10 * m.S[0, 0]
    assert torch.isfinite(m.coord_q).all() and (m.coord_q[0, :, -1] == 0).all()


def test_fold_affine_norm():
    W, b = rand(2, 4, 8, seed=1), rand(2, 4, seed=2)
    g, beta, xh = rand(8, seed=3), rand(8, seed=4), rand(8, seed=5)
    W2, b2 = fold_affine_norm(W, b, g, beta)
    assert torch.allclose(W2 @ xh + b2, W @ (g * xh + beta) + b)


def _attention_inputs(model, kinds):
    """Record each attention module's (query) input tensor with a pre-hook."""
    xs = []
    for m in model.modules():
        if isinstance(m, kinds):
            m.register_forward_pre_hook(lambda mod, args, kw: xs.append(
                (args[0] if args else kw["x"]).detach()), with_kwargs=True)
    return xs


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", dict(depth=1, img_size=32)),   # qkv.bias
                                     ("eva02_tiny_patch14_224", dict(depth=1, img_size=28)),  # q_bias + zero k_bias
                                     ("mha", {})])
def test_offsets_match_the_library_biases(name, kw):
    """a − u·x and b − v·x equal a_offset and b_offset: catches a bias read wrongly by an adapter."""
    torch.manual_seed(0)
    if name == "mha":
        model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True)).eval()
        peak_mha(model)
        kinds, x = nn.MultiheadAttention, torch.randn(2, 5, 32)
        forward = lambda: model[0](x, x, x)  # noqa: E731
    else:
        model = timm.create_model(name, pretrained=False, **kw).eval()
        peak_timm(model)
        from qkprobe.adapters.timm import _timm_classes
        kinds, x = _timm_classes(), torch.randn(2, 3, kw["img_size"], kw["img_size"])
        forward = None
    xs = _attention_inputs(model, kinds)
    lb = qkprobe.compute_bases(model)[0]
    if forward is None:
        c = qkprobe.mode_coordinates(model, x, dtype=torch.float64)[0]
    else:
        from qkprobe.adapters.discover import find_attention
        from qkprobe.capture.coordinates import capture_qk, coordinates_from_qk
        got = []
        with capture_qk(find_attention(model), lambda i, q, k, info: got.append((q, k))):
            forward()
        a, b = coordinates_from_qk(*got[0], lb, torch.float64)
        c = type("C", (), {"a": a, "b": b})
    xin = xs[0].double()
    assert (lb.a_offset.abs() > 1e-3).any()  # biases are there to be found
    assert (c.a - torch.einsum("bnd,hdr->bhnr", xin, lb.U) - lb.a_offset[None, :, None]).abs().max() < 1e-4
    assert (c.b - torch.einsum("bnd,hdr->bhnr", xin, lb.V) - lb.b_offset[None, :, None]).abs().max() < 1e-4


def test_principal_angles_of_a_known_rotation():
    from qkprobe.core.drift import principal_angles
    D, theta = 6, 0.3
    U0 = torch.eye(D, dtype=torch.float64)[:, :2].unsqueeze(0)  # span(e0, e1)
    U1 = U0.clone()
    U1[0, :, 1] = torch.cos(torch.tensor(theta)) * U0[0, :, 1] + torch.sin(torch.tensor(theta)) * torch.eye(D)[:, 4]
    ang = principal_angles(U0, U1)
    assert ang.shape == (1, 2)
    assert abs(ang[0, 0].item()) < 1e-6 and abs(ang[0, 1].item() - theta) < 1e-6  # ascending
    assert torch.isnan(principal_angles(U0, U1 * float("nan"))).all()


def test_weighted_cosine_same_for_torch_and_numpy():
    import numpy as np
    from qkprobe.core.summary import weighted_cosine
    S = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    cos = torch.tensor([[0.5, -1.0, 0.9], [0.2, 0.3, 0.4]], dtype=torch.float64)
    expected = [(3 * 0.5 - 1.0) / 4, 0.0]  # all-zero spectrum: 0
    torch.testing.assert_close(weighted_cosine(S, cos), torch.tensor(expected, dtype=torch.float64))
    np.testing.assert_allclose(weighted_cosine(S.numpy(), cos.numpy()), expected)
