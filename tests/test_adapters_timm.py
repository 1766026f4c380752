"""timm families: reconstruction of the library's own attention, extras flags, bases vs full SVD."""

import pytest
import timm
import torch

import qkprobe
from qkprobe.core.modes import full_svd_modes
from peaked import assert_peaked, peak_timm, record_timm_probs

TOL = 1e-4


def build(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    peak_timm(model)
    return model


def run(model, size):
    probs = record_timm_probs(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    coords = qkprobe.mode_coordinates(model, x)
    return coords, probs


BILINEAR = [
    # name, kwargs, image size, expected prefix tokens
    ("vit_tiny_patch16_224", dict(depth=2, img_size=64), 64, 1),
    ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64), 64, 2),
    ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=56), 56, 5),
]


@pytest.mark.parametrize("name,kw,size,n_prefix", BILINEAR)
def test_bilinear_reconstruction(name, kw, size, n_prefix):
    model = build(name, **kw)
    coords, probs = run(model, size)
    assert len(coords) == len(probs) == 2
    for c, p in zip(coords, probs):
        assert c.prefix_tokens == n_prefix
        assert c.extras == frozenset()
        assert c.a.shape == (2, c.S.shape[0], p.shape[-1], c.S.shape[1])
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL


def test_qk_norm_flagged_and_not_bilinear():
    model = build("vit_tiny_patch16_224", depth=2, img_size=64, qk_norm=True)
    with torch.no_grad():
        for blk in model.blocks:  # make the norm matter: non-trivial affine
            blk.attn.q_norm.weight.normal_(1, 1)
            blk.attn.k_norm.weight.normal_(1, 1)
    coords, probs = run(model, 64)
    for c, p in zip(coords, probs):
        assert c.extras == {"qk_norm"}
        assert (c.probs() - p).abs().max().item() > 0.05  # the flag is deserved


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224",  # EvaAttention
                                  "vit_small_patch16_rope_224"])  # AttentionRope
def test_rope_flagged_and_bilinear_part_exact(name):
    model = build(name, depth=2, img_size=56)
    coords, probs = run(model, 56)
    for c, p in zip(coords, probs):
        assert c.extras == {"rope"} and c.info["rope"] is not None
        assert (c.probs() - p).abs().max().item() > 0.05  # the flag is deserved
    # the bilinear part is exact: with rope turned off the same modes reproduce the library
    model.rope = None
    coords, probs = run(model, 56)
    for c, p in zip(coords, probs):
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
    assert qkprobe.compute_bases(model)[0].extras == frozenset()


def test_beit_rel_pos_bias_flagged_and_exact_with_bias():
    model = build("beit_base_patch16_224", depth=2, img_size=64, embed_dim=96, num_heads=3)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 2)
    coords, probs = run(model, 64)
    for c, p in zip(coords, probs):
        assert c.extras == {"rel_pos_bias"}
        assert (c.probs() - p).abs().max().item() > 0.05
        with_bias = (c.logits() + c.info["rel_pos_bias"]).softmax(-1)
        assert_peaked(p)
        assert (with_bias - p).abs().max().item() <= TOL


def test_swin_windows_rel_pos_and_shift_mask():
    model = build("swin_tiny_patch4_window7_224", depths=(2,), num_heads=(3,), embed_dim=96, img_size=56)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 2)
    coords, probs = run(model, 56)
    assert len(coords) == 2
    for c, p in zip(coords, probs):
        assert c.extras >= {"rel_pos_bias"}
        assert c.a.shape[0] == p.shape[0] == 2 * 4  # batch × windows
        logits = c.logits() + c.info["rel_pos_bias"]
        mask = c.info.get("attn_mask")
        if mask is not None:
            nW = mask.shape[0]
            logits = (logits.view(-1, nW, *logits.shape[1:]) + mask.unsqueeze(1).unsqueeze(0)).view_as(logits)
        assert (logits.softmax(-1) - p).abs().max().item() <= TOL
    assert "attn_mask" in coords[1].extras and "attn_mask" not in coords[0].extras


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", dict(depth=2, img_size=64)),
                                     ("eva02_tiny_patch14_224", dict(depth=1, img_size=56))])
def test_bases_equal_full_svd(name, kw):
    model = build(name, **kw)
    from qkprobe.adapters.discover import find_attention
    sites = find_attention(model)
    for lb, site in zip(qkprobe.compute_bases(model), sites):
        w = site.adapter.weights(site.module)
        U, S, V = full_svd_modes(w.W_q, w.W_k)
        assert lb.S.shape == S.shape == (lb.num_heads, lb.head_dim)
        assert (lb.S - S).abs().max().item() <= 1e-6 * S.max().item()
        assert (lb.cosine - (U * V).sum(-2)).abs().max().item() <= 1e-6
        assert torch.all(lb.S[:, :-1] >= lb.S[:, 1:])


def test_fold_ln_folds_the_block_norm():
    model = build("vit_tiny_patch16_224", depth=1, img_size=64)
    with torch.no_grad():
        model.blocks[0].norm1.weight.normal_(1, 0.5)
        model.blocks[0].norm1.bias.normal_(0, 0.5)
    plain, folded = qkprobe.compute_bases(model)[0], qkprobe.compute_bases(model, fold_ln=True)[0]
    assert folded.fold_ln and not plain.fold_ln and any("fold_ln" in n for n in folded.notes)
    g = model.blocks[0].norm1.weight.double()
    from qkprobe.adapters.discover import find_attention
    w = find_attention(model)[0].adapter.weights(model.blocks[0].attn)
    U, S, V = full_svd_modes(w.W_q.double() * g, w.W_k.double() * g)
    assert (folded.S - S).abs().max().item() <= 1e-6 * S.max().item()
    assert (plain.S - S).abs().max().item() > 1e-3  # folding changed something
    # coordinates from folded bases still reproduce the attention exactly
    probs = record_timm_probs(model)
    c = qkprobe.mode_coordinates(model, torch.randn(1, 3, 64, 64), bases=[folded])[0]
    assert (c.probs() - probs[0]).abs().max().item() <= TOL
