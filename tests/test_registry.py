"""Custom attention through register_attention, clear errors, and harmless hooks."""

import pytest
import timm
import torch
import torch.nn as nn

import qkprobe
from qkprobe.adapters.base import project, split_heads
from qkprobe.errors import NoAttention, UnsupportedAttention
from peaked import peak_timm


class MyAttention(nn.Module):
    """A home-made attention with raw parameters (no Linear), batch-first."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.wq = nn.Parameter(torch.randn(dim, dim) * 0.5)
        self.wk = nn.Parameter(torch.randn(dim, dim) * 0.5)
        self.bq = nn.Parameter(torch.randn(dim))
        self.wv = nn.Parameter(torch.randn(dim, dim) * 0.1)
        self.last_probs = None

    def forward(self, x):
        B, N, D = x.shape
        q = (x @ self.wq.T + self.bq).view(B, N, self.heads, -1).transpose(1, 2)
        k = (x @ self.wk.T).view(B, N, self.heads, -1).transpose(1, 2)
        v = (x @ self.wv.T).view(B, N, self.heads, -1).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * (D // self.heads) ** -0.5).softmax(-1)
        self.last_probs = p.detach()
        return x + (p @ v).transpose(1, 2).reshape(B, N, D)


class MyAdapter(qkprobe.AttentionAdapter):
    name = "mine"

    def matches(self, module):
        return isinstance(module, MyAttention)

    def weights(self, m):
        H = m.heads
        return qkprobe.QKWeights(W_q=split_heads(m.wq, H), W_k=split_heads(m.wk, H),
                                 b_q=m.bq.reshape(H, -1), b_k=None, scale=(m.wq.shape[0] // H) ** -0.5)

    def capture(self, m, emit):
        def pre(mod, args):
            x = args[0]
            emit(project(x, mod.wq, mod.bq, mod.heads), project(x, mod.wk, None, mod.heads), {})
        return [m.register_forward_pre_hook(pre)]


def test_register_custom_attention():
    torch.manual_seed(0)
    model = nn.Sequential(MyAttention(), nn.LayerNorm(32), MyAttention())
    with pytest.raises(UnsupportedAttention, match="register_attention"):
        qkprobe.compute_bases(model)
    qkprobe.register_attention(MyAttention, MyAdapter())
    try:
        coords = qkprobe.mode_coordinates(model, torch.randn(2, 6, 32))
        assert [c.name for c in coords] == ["0", "2"]
        for c, m in zip(coords, (model[0], model[2])):
            assert m.last_probs.max(-1).values.mean() > 0.3
            assert (c.probs() - m.last_probs).abs().max() <= 1e-4
        assert qkprobe.compute_bases(model)[0].family == "mine"
    finally:
        qkprobe.unregister_attention(MyAttention)
    with pytest.raises(UnsupportedAttention):
        qkprobe.compute_bases(model)


def test_no_attention_is_a_clear_error():
    with pytest.raises(NoAttention, match="no attention"):
        qkprobe.compute_bases(nn.Sequential(nn.Linear(3, 3)))


def test_unknown_attention_beside_known_warns_or_raises_when_strict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True), MyAttention())
    with pytest.warns(UserWarning, match="register_attention"):
        assert len(qkprobe.compute_bases(model)) == 1
    with pytest.raises(UnsupportedAttention, match="MyAttention"):
        qkprobe.compute_bases(model, strict=True)


def test_capture_is_harmless_outputs_gradients_and_hooks():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32)
    peak_timm(model)
    model.train()  # dropout is 0 in timm defaults: deterministic
    x = torch.randn(2, 3, 32, 32)

    def loss_and_grads():
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads()
    from qkprobe.adapters.discover import find_attention
    from qkprobe.capture.coordinates import capture_qk
    seen = []
    with capture_qk(find_attention(model), lambda i, q, k, info: seen.append(q.requires_grad or k.requires_grad)):
        loss, grads = loss_and_grads()
    assert seen == [False, False]  # hooks see detached tensors
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert hooks == 0
