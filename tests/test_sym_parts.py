"""Symmetric / antisymmetric parts of W_qᵀW_k: the 2R-dim route against the D × D reference, the
energy fraction, and their storage in bases files and run files."""

import numpy as np
import pytest
import timm
import torch

import qkprobe
from qkprobe.core.modes import full_sym_antisym, sym_antisym_spectra
from qkprobe.core.summary import symmetric_energy_fraction
from qkprobe.sinks.bases_file import read_bases, write_bases
from peaked import peak_timm

REL = 1e-8


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _pad(x, n):
    """Pad the (H, m) spectrum with zeros to n and sort descending (the D × D reference has D − m zeros)."""
    z = torch.zeros(x.shape[0], n - x.shape[1], dtype=x.dtype)
    return torch.cat([x, z], -1).sort(-1, descending=True).values


def assert_equal_to_full(W_q, W_k):
    got, ref = sym_antisym_spectra(W_q, W_k), full_sym_antisym(W_q, W_k)
    D = W_q.shape[-1]
    tol = REL * max(ref.sym.abs().max(), ref.antisym.max())  # relative to the spectral norm of M's parts
    assert (_pad(got.sym, D) - ref.sym).abs().max() <= tol
    assert (_pad(got.antisym, D // 2) - ref.antisym).abs().max() <= tol
    return got, ref


@pytest.mark.parametrize("H,R,D", [(3, 8, 64), (2, 16, 40), (2, 8, 16), (1, 6, 10)])  # 2R < D, 2R ≥ D
def test_low_rank_route_equals_dxd_reference(H, R, D):
    W_q, W_k = rand(H, R, D, seed=1), rand(H, R, D, seed=2)
    got, ref = assert_equal_to_full(W_q, W_k)
    assert got.sym.shape == (H, min(2 * R, D)) and got.antisym.shape == (H, min(2 * R, D) // 2)
    # both parts are orthogonal, so their energies add up to ‖M‖²_F = Σ s²
    S = torch.linalg.svdvals(W_q.transpose(-1, -2) @ W_k)
    total = (got.sym ** 2).sum(-1) + 2 * (got.antisym ** 2).sum(-1)
    assert torch.allclose(total, (S ** 2).sum(-1), rtol=1e-10)


def test_symmetric_and_antisymmetric_heads_are_told_apart():
    """W_k = W_q: M = W_qᵀW_q is symmetric positive semidefinite (fraction 1, no rotation);
    M = W_qᵀ J W_q with J antisymmetric is purely rotation-like (fraction 0)."""
    W = rand(2, 8, 48, seed=3)
    sym = sym_antisym_spectra(W, W)
    assert torch.allclose(symmetric_energy_fraction(sym.sym, sym.antisym), torch.ones(2, dtype=torch.float64))
    assert sym.antisym.abs().max() <= 1e-10 * sym.sym.abs().max() and (sym.sym >= -1e-10).all()
    J = rand(8, 8, seed=4)
    J = J - J.T
    rot = sym_antisym_spectra(W, J.T @ W)  # W_qᵀ W_k = Wᵀ J W
    assert symmetric_energy_fraction(rot.sym, rot.antisym).abs().max() <= 1e-12
    assert_equal_to_full(W, J.T @ W)
    assert sym_antisym_spectra(rand(2, 8, 48), rand(2, 8, 24)) is None  # cross-attention D != Dk


def test_rank_deficient_span_is_still_exact():
    """W_k shares half its rows with W_q: [W_qᵀ W_kᵀ] has rank < 2R, the QR basis still spans it."""
    W_q = rand(2, 8, 48, seed=5)
    W_k = torch.cat([W_q[:, :4], rand(2, 4, 48, seed=6)], 1)
    assert_equal_to_full(W_q, W_k)


def test_layer_bases_field_matches_library_weights_and_is_stored(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    peak_timm(model)
    bases = qkprobe.compute_bases(model, fold_ln=True)
    for blk, lb in zip(model.blocks, bases):
        W = blk.attn.qkv.weight.detach().double() * blk.norm1.weight.detach().double()  # folded γ
        W_q, W_k = W[:192].reshape(3, 64, 192), W[192:384].reshape(3, 64, 192)
        ref = full_sym_antisym(W_q, W_k)
        assert lb.sym_eigvals.shape == (3, 128) and lb.antisym_eigvals.shape == (3, 64)
        assert (_pad(lb.sym_eigvals, 192) - ref.sym).abs().max() <= REL * ref.sym.abs().max()
        assert (_pad(lb.antisym_eigvals, 96) - ref.antisym).abs().max() <= REL * ref.sym.abs().max()
        M = W_q.transpose(-1, -2) @ W_k
        frac = ((M + M.transpose(-1, -2)) / 2).square().sum((-1, -2)) / M.square().sum((-1, -2))
        assert torch.allclose(lb.symmetric_energy_fraction(), frac, rtol=1e-10)
    write_bases(str(tmp_path / "b.h5"), bases, {})
    for got, lb in zip(read_bases(str(tmp_path / "b.h5")), bases):
        np.testing.assert_array_equal(got["sym_eigvals"], lb.sym_eigvals.numpy())
        np.testing.assert_array_equal(got["antisym_eigvals"], lb.antisym_eigvals.numpy())


def test_run_file_stores_the_parts(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    with qkprobe.attach(model, str(tmp_path / "r.h5")):
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    ref = qkprobe.compute_bases(model)
    from qkprobe.sinks.run_file import open_run
    with open_run(str(tmp_path / "r.h5")) as run:
        for i, lb in enumerate(ref):
            b = run.bases(i)
            np.testing.assert_allclose(b["sym_eigvals"], lb.sym_eigvals.numpy(), rtol=1e-12, atol=0)
            np.testing.assert_allclose(b["antisym_eigvals"], lb.antisym_eigvals.numpy(), rtol=1e-12, atol=1e-300)
