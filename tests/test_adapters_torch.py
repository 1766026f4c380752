"""nn.MultiheadAttention in every layout, open_clip vision towers and torchvision ViT."""

import pytest
import torch
import torch.nn as nn

import qkprobe
from qkprobe.core.modes import full_svd_modes
from peaked import assert_peaked, peak_mha, peak_timm, record_mha_probs, record_timm_probs

TOL = 1e-4


class MHAModel(nn.Module):
    """Two self-attention layers (or one cross-attention layer with kdim != embed_dim)."""

    def __init__(self, E=64, H=4, batch_first=True, kdim=None):
        super().__init__()
        self.batch_first = batch_first
        self.kdim = kdim
        self.layers = nn.ModuleList([nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)
                                     for _ in range(1 if kdim else 2)])
        self.ctx = torch.randn(2, 7, kdim) if kdim else None

    def forward(self, x):
        for layer in self.layers:
            if self.kdim:
                ctx = self.ctx if self.batch_first else self.ctx.transpose(0, 1)
                x = x + layer(x, ctx, ctx)[0]
            else:
                x = x + layer(x, x, x)[0]
        return x


@pytest.mark.parametrize("batch_first,kdim", [(True, None), (False, None), (True, 48), (False, 48)])
def test_mha_layouts(batch_first, kdim):
    torch.manual_seed(0)
    model = MHAModel(batch_first=batch_first, kdim=kdim).eval()
    peak_mha(model)
    probs = record_mha_probs(model)
    x = torch.randn(2, 9, 64) if batch_first else torch.randn(9, 2, 64)
    coords = qkprobe.mode_coordinates(model, x)
    assert len(coords) == len(probs) == len(model.layers)
    for c, p in zip(coords, probs):
        assert c.a.shape == (2, 4, 9, 16) and c.b.shape == (2, 4, 7 if kdim else 9, 16)
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
    lb = qkprobe.compute_bases(model)[0]
    if kdim:
        assert lb.V.shape == (4, kdim, 16) and torch.isnan(lb.cosine).all()
    else:
        W = model.layers[0].in_proj_weight
        U, S, V = full_svd_modes(W[:64].reshape(4, 16, 64), W[64:128].reshape(4, 16, 64))
        assert (lb.S - S).abs().max().item() <= 1e-6 * S.max().item()
        assert (lb.cosine - (U * V).sum(-2)).abs().max().item() <= 1e-6


def test_mha_native_fast_path_outputs_unchanged():
    """eval + no_grad + batch_first self-attention takes the fused fast path: still captured."""
    torch.manual_seed(0)
    model = MHAModel(batch_first=True).eval()
    peak_mha(model)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        ref = model(x)
    coords = qkprobe.mode_coordinates(model, x)
    assert len(coords) == 2
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_open_clip_vision_tower_mha():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).visual.eval()
    model.transformer.resblocks = model.transformer.resblocks[:2]
    peak_mha(model)
    probs = record_mha_probs(model)
    coords = qkprobe.mode_coordinates(model, torch.randn(2, 3, 224, 224))
    assert len(coords) == 2
    for c, p in zip(coords, probs):
        assert c.prefix_tokens == 1 and c.extras == frozenset()
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
    assert qkprobe.compute_bases(model, fold_ln=True)[0].fold_ln


def test_open_clip_timm_backed_trunk():
    from open_clip.timm_model import TimmModel
    torch.manual_seed(0)
    tower = TimmModel("vit_tiny_patch16_224", embed_dim=32, pretrained=False).eval()
    tower.trunk.blocks = tower.trunk.blocks[:2]
    peak_timm(tower)
    probs = record_timm_probs(tower)
    coords = qkprobe.mode_coordinates(tower, torch.randn(2, 3, 224, 224))
    assert [c.name for c in coords] == ["trunk.blocks.0.attn", "trunk.blocks.1.attn"]
    for c, p in zip(coords, probs):
        assert c.prefix_tokens == 1
        assert (c.probs() - p).abs().max().item() <= TOL


def test_torchvision_vit_b_16():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    model.encoder.layers = model.encoder.layers[:2]
    peak_mha(model)
    probs = record_mha_probs(model)
    coords = qkprobe.mode_coordinates(model, torch.randn(1, 3, 224, 224))
    assert len(coords) == 2
    for c, p in zip(coords, probs):
        assert c.prefix_tokens == 1 and c.a.shape == (1, 12, 197, 64)
        assert_peaked(p)
        assert (c.probs() - p).abs().max().item() <= TOL
