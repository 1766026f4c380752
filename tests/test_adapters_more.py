"""Adapters of issue 12: torchvision Swin (V1, V2 cosine attention flagged), timm ParallelScalingBlock,
open_clip's own Attention (qk-norm, scaled cosine flagged). Exact against the library's probabilities."""

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qkprobe
from qkprobe.adapters.discover import find_attention
from qkprobe.core.modes import full_svd_modes
from peaked import BOOST, assert_peaked

TOL = 1e-4


def _recording_F(module, monkeypatch, name="softmax"):
    """Replace the ``F`` a library module calls with one whose ``softmax`` (or SDPA) records its
    probabilities; everything else is torch.nn.functional."""
    out = []
    proxy = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    if name == "softmax":
        def softmax(x, dim=-1, **kw):
            p = F.softmax(x, dim=dim, **kw)
            out.append(p.detach())
            return p
        proxy.softmax = softmax
    else:  # scaled_dot_product_attention, written out so its probabilities can be kept
        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
            logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
            if attn_mask is not None:
                logits = logits + attn_mask
            p = logits.softmax(-1)
            out.append(p.detach())
            return p @ v
        proxy.scaled_dot_product_attention = sdpa
    monkeypatch.setattr(module, "F", proxy)
    return out


def _raw_qk(model, x):
    """(q, k, info) per site straight from each adapter's capture (for the non-bilinear checks)."""
    sites, got = find_attention(model), []
    handles = [h for s in sites for h in s.adapter.capture(s.module, lambda q, k, info: got.append((q, k, info)))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _with_mask(logits, mask):
    if mask is None:
        return logits
    nW = mask.shape[0]
    return (logits.view(-1, nW, *logits.shape[1:]) + mask.unsqueeze(1).unsqueeze(0)).view_as(logits)


# --------------------------------------------------------------------------- torchvision Swin

def _swin(v2: bool):
    import torchvision
    torch.manual_seed(0)
    model = (torchvision.models.swin_v2_t if v2 else torchvision.models.swin_t)(weights=None).eval()
    model.features = model.features[:2]  # patch embedding + the first stage: a plain and a shifted block
    model.norm, model.head = nn.Identity(), nn.Identity()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.features[1]:
            a = blk.attn
            C = a.qkv.weight.shape[1]
            a.qkv.weight[:2 * C] *= BOOST
            a.qkv.bias.copy_(torch.randn(a.qkv.bias.shape, generator=g))
            if v2:
                a.logit_scale.copy_(4.0 + torch.rand(a.logit_scale.shape, generator=g))  # some above the log 100 clamp
                for p in a.cpb_mlp.parameters():
                    p.normal_(0, 1, generator=g)
            else:
                a.relative_position_bias_table.normal_(0, 2, generator=g)
    return model


def test_torchvision_swin_v1_exact_with_windows_padding_bias_and_shift_mask(monkeypatch):
    import torchvision.models.swin_transformer as tv_swin
    model = _swin(v2=False)
    x = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(2))  # 25×25 tokens: padded to 28
    with torch.no_grad():
        ref = model(x)
    probs = _recording_F(tv_swin, monkeypatch)
    coords = qkprobe.mode_coordinates(model, x)
    assert [c.name for c in coords] == ["features.1.0.attn", "features.1.1.attn"] and len(probs) == 2
    for c, p in zip(coords, probs):
        assert c.a.shape == (2 * 16, 3, 49, 32) and c.prefix_tokens == 0
        assert_peaked(p)
        assert c.extras >= {"rel_pos_bias"}
        assert (c.probs() - p).abs().max().item() > 0.05  # the flag is deserved
        logits = _with_mask(c.logits() + c.info["rel_pos_bias"], c.info.get("attn_mask"))
        assert (logits.softmax(-1) - p).abs().max().item() <= TOL
    assert "attn_mask" in coords[1].extras and "attn_mask" not in coords[0].extras
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # hooks gone, output unchanged
    # bases equal the full SVD of the library's own weights
    for lb, blk in zip(qkprobe.compute_bases(model), model.features[1]):
        W = blk.attn.qkv.weight
        U, S, V = full_svd_modes(W[:96].reshape(3, 32, 96), W[96:192].reshape(3, 32, 96))
        assert (lb.S - S).abs().max().item() <= 1e-6 * S.max().item() and lb.family == "torchvision_swin"
    assert qkprobe.compute_bases(model, fold_ln=True)[0].fold_ln  # norm1 of the block feeds it


def test_torchvision_swin_v2_cosine_attention_is_flagged_and_reproduced_from_the_info(monkeypatch):
    import torchvision.models.swin_transformer as tv_swin
    model = _swin(v2=True)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    probs = _recording_F(tv_swin, monkeypatch)
    coords = qkprobe.mode_coordinates(model, x)
    raw = _raw_qk(model, x)
    assert len(coords) == 2 and len(probs) == 4  # two forwards recorded
    for c, p, (q, k, info) in zip(coords, probs[:2], raw):
        assert c.extras >= {"cosine_attn", "rel_pos_bias"}
        assert_peaked(p)
        bilinear = _with_mask(c.logits() + info["rel_pos_bias"], info.get("attn_mask")).softmax(-1)
        assert (bilinear - p).abs().max().item() > 0.05  # cosine attention is not the bilinear form
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = _with_mask(info["logit_scale"].view(1, -1, 1, 1) * cos + info["rel_pos_bias"], info.get("attn_mask"))
        assert (logits.softmax(-1) - p).abs().max().item() <= TOL
    lb = qkprobe.compute_bases(model)[0]
    assert "cosine_attn" in lb.extras and any("cosine" in n for n in lb.notes)
    # V2's forward zeroes the key bias whatever the parameter holds: so do the weights
    w = find_attention(model)[0].adapter.weights(model.features[1][0].attn)
    assert w.b_k.abs().max() == 0 and w.b_q.abs().max() > 0


# --------------------------------------------------------------------------- timm ParallelScalingBlock

def _parallel_vit(qk_norm=False):
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, qkv_bias=True,
                              qk_norm=qk_norm, block_fn=ParallelScalingBlock).eval()
    g = torch.Generator().manual_seed(1)
    probs = []
    with torch.no_grad():
        for blk in model.blocks:
            blk.fused_attn = False
            mlp, dim = blk.in_split[0], blk.in_split[1]
            blk.in_proj.weight[mlp:mlp + 2 * dim] *= BOOST
            blk.in_proj.bias.copy_(torch.randn(blk.in_proj.bias.shape, generator=g))
            blk.in_norm.weight.normal_(1, 0.5, generator=g)
            if qk_norm:
                blk.q_norm.weight.normal_(1, 1, generator=g)
                blk.k_norm.weight.normal_(1, 1, generator=g)
            blk.attn_drop.register_forward_pre_hook(lambda m, a: probs.append(a[0].detach()))
    return model, probs


def test_timm_parallel_scaling_block_exact_and_folded():
    model, probs = _parallel_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    coords = qkprobe.mode_coordinates(model, x)
    assert [c.name for c in coords] == ["blocks.0", "blocks.1"]
    for c, p in zip(coords, probs):
        assert c.extras == frozenset() and c.prefix_tokens == 1 and c.a.shape == (2, 4, 17, 16)
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
    blk = model.blocks[0]
    W = blk.in_proj.weight[256:384]  # in_split = [mlp 256, q 64, k 64, v 64]
    U, S, V = full_svd_modes(W[:64].reshape(4, 16, 64), W[64:].reshape(4, 16, 64))
    lb = qkprobe.compute_bases(model)[0]
    assert (lb.S - S).abs().max().item() <= 1e-6 * S.max().item()
    assert (lb.cosine - (U * V).sum(-2)).abs().max().item() <= 1e-6
    # fold_ln folds the block's own in_norm, and the folded modes still reproduce the attention
    folded = qkprobe.compute_bases(model, fold_ln=True)
    assert all(b.fold_ln for b in folded) and (folded[0].S - lb.S).abs().max() > 1e-3
    probs.clear()
    for c, p in zip(qkprobe.mode_coordinates(model, x, bases=folded), probs):
        assert (c.probs() - p).abs().max().item() <= TOL


def test_timm_parallel_scaling_block_qk_norm_flagged():
    model, probs = _parallel_vit(qk_norm=True)
    coords = qkprobe.mode_coordinates(model, torch.randn(2, 3, 32, 32))
    for c, p in zip(coords, probs):
        assert c.extras == {"qk_norm"}
        assert (c.probs() - p).abs().max().item() > 0.05  # the flag is deserved


# --------------------------------------------------------------------------- open_clip Attention

def _open_clip_vit(**kw):
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
                              output_dim=32, block_type="custom", **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.transformer.resblocks:
            a = blk.attn
            a.in_proj_weight[:128] *= BOOST
            a.in_proj_bias.copy_(torch.randn(a.in_proj_bias.shape, generator=g))
            if not isinstance(a.ln_q, nn.Identity):
                a.ln_q.weight.normal_(1, 1, generator=g)
                a.ln_k.weight.normal_(1, 1, generator=g)
    return model


def test_open_clip_attention_exact(monkeypatch):
    import open_clip.transformer as oc
    model = _open_clip_vit(scale_heads=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    probs = _recording_F(oc, monkeypatch, "sdpa")
    coords = qkprobe.mode_coordinates(model, x)
    assert [c.name for c in coords] == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    for c, p in zip(coords, probs):
        assert c.extras == frozenset() and c.prefix_tokens == 1
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
    lb = qkprobe.compute_bases(model, fold_ln=True)[0]
    assert lb.family == "open_clip" and lb.fold_ln and any("head_scale" in n for n in lb.notes)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_open_clip_attention_with_a_causal_mask(monkeypatch):
    import open_clip.transformer as oc
    attn = _open_clip_vit().transformer.resblocks[0].attn
    L = 9
    mask = torch.full((L, L), float("-inf")).triu(1)
    probs = _recording_F(oc, monkeypatch, "sdpa")
    x = torch.randn(2, L, 64, generator=torch.Generator().manual_seed(3))
    c = qkprobe.mode_coordinates(attn, x, attn_mask=mask)[0]
    assert "attn_mask" in c.extras and torch.equal(c.info["attn_mask"], mask)
    assert_peaked(probs[0])
    assert ((c.logits() + mask).softmax(-1) - probs[0]).abs().max().item() <= TOL


def test_open_clip_qk_norm_and_scaled_cosine_flagged():
    model = _open_clip_vit(qk_norm=True)
    import open_clip.transformer as oc
    with pytest.MonkeyPatch.context() as mp:
        probs = _recording_F(oc, mp, "sdpa")
        coords = qkprobe.mode_coordinates(model, torch.randn(2, 3, 32, 32))
        for c, p in zip(coords, probs):
            assert c.extras == {"qk_norm"}
            assert (c.probs() - p).abs().max().item() > 0.05  # the flag is deserved
    cos_model = _open_clip_vit(scaled_cosine_attn=True)
    lb = qkprobe.compute_bases(cos_model)[0]
    assert lb.extras == {"cosine_attn"}
    # the cosine path skips ln_q/ln_k: q and k are recomputed from the input, the factor is in the info
    attn = cos_model.transformer.resblocks[0].attn
    x = torch.randn(2, 5, 64)
    got = []
    handles = find_attention(cos_model)[0].adapter.capture(attn, lambda q, k, info: got.append((q, k, info)))
    try:
        with torch.no_grad():
            try:
                attn(x)
            except RuntimeError:  # open_clip 3.3's cosine path calls bmm on 4-D tensors and fails itself
                pass
    finally:
        for h in handles:
            h.remove()
    q, k, info = got[0]
    W, b = attn.in_proj_weight, attn.in_proj_bias
    assert torch.allclose(q, F.linear(x, W[:64], b[:64]).view(2, 5, 4, 16).transpose(1, 2), atol=1e-6)
    assert torch.allclose(k, F.linear(x, W[64:128], b[64:128]).view(2, 5, 4, 16).transpose(1, 2), atol=1e-6)
    assert torch.allclose(info["logit_scale"], torch.full((4,), 10.0)) and "cosine_attn" in info["extras"]
