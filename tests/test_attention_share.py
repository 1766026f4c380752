"""attn_contrib / attn_share use the module's actual attention: after qk-norm and rope, with the
mask and bias it applied. Stored rows equal the formula of core/stats.py with the library's own
probabilities (non-fused path or ``output_attentions``), and differ from the bilinear softmax."""

import pytest
import timm
import torch
import torch.nn as nn
import transformers as T

import qkprobe
from qkprobe.sinks.run_file import open_run
from hf_helpers import build as build_hf
from peaked import assert_peaked, peak_mha, peak_timm, record_timm_probs

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            initializer_range=0.04)


def formula(c, P):
    """attn_contrib of core/stats.py: scale · S_r · mean_i a_ir ((P b)_ir − mean_j b_jr), (B, H, R);
    the means over the real tokens of each sample where the adapter saw padding (``c.token_mask``)."""
    a, b = c.a.double(), c.b.double()
    real = torch.ones(a.shape[0], a.shape[-2], dtype=torch.bool) if c.token_mask is None else c.token_mask
    w = real[:, None, :, None].double()  # (B, 1, N, 1)
    lift = a * (P.double() @ (b * w) - (b * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True)) * w
    return c.scale * c.S.double() * lift.sum(-2) / w.sum(-2)


def share(contrib):
    return contrib / contrib.sum(-1, keepdim=True)


def stored(model, tmp_path, *args, **kwargs):
    """(attn_contrib, attn_share) rows of every layer from a probe run with every statistic."""
    path = tmp_path / "run.h5"
    with qkprobe.attach(model, out=str(path), stats="all", per_sample=True):
        with torch.no_grad():
            model(*args, **kwargs)
    with open_run(path) as run:
        n = len(run.layer_names)
        return ([torch.from_numpy(run.stats(i, "attn_contrib")).double() for i in range(n)],
                [torch.from_numpy(run.stats(i, "attn_share")).double() for i in range(n)])


def close(x, ref, rel=2e-4):
    err = (x - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item() + 1e-7, f"max error {err:.3g} vs scale {ref.abs().max().item():.3g}"


def far(x, ref, rel=0.02):
    """The real-P statistic differs from the bilinear one (the test can fail)."""
    assert (x - ref).abs().max().item() > rel * ref.abs().max().item()


def check(coords, probs, contrib, shares, fold=None):
    """``fold``: windows per sample (None: from the shapes, P has B·nW rows)."""
    assert len(coords) == len(probs) == len(contrib)
    for c, p, got, got_share in zip(coords, probs, contrib, shares):
        windows = p.shape[0] // got.shape[0] if fold is None else fold
        assert_peaked(p, 0.2)
        close(c.attention_probs(), p.float(), rel=1e-4)  # the module's probabilities, reconstructed
        want = formula(c, p)
        bilinear = formula(c, c.probs())
        if windows > 1:  # windowed: one row per sample is the mean over its windows
            want = want.view(-1, windows, *want.shape[1:]).mean(1)
            bilinear = bilinear.view(-1, windows, *bilinear.shape[1:]).mean(1)
        else:
            close(got_share, share(want), rel=1e-3)
        close(got, want)
        yield got, bilinear


def timm_model(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    peak_timm(model)  # also the non-fused path, whose softmax output is the reference
    return model


def images(size, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def run_timm(model, size, tmp_path, fold=None):
    probs = record_timm_probs(model)
    x = images(size)
    coords = qkprobe.mode_coordinates(model, x, dtype=torch.float64)
    contrib, shares = stored(model, tmp_path, x)
    return list(check(coords, probs[:len(coords)], contrib, shares, fold))


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224",  # EvaAttention
                                  "vit_small_patch16_rope_224"])  # AttentionRope
def test_timm_rope(tmp_path, name):
    model = timm_model(name, depth=2, img_size=56)
    for got, bil in run_timm(model, 56, tmp_path):
        far(got, bil)


def test_vit_qk_norm(tmp_path):
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=64, qk_norm=True)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.q_norm.weight.normal_(1, 1)
            blk.attn.k_norm.weight.normal_(1, 1)
    for got, bil in run_timm(model, 64, tmp_path):
        far(got, bil)


def test_beit_rel_pos_bias(tmp_path):
    model = timm_model("beit_base_patch16_224", depth=2, img_size=64, embed_dim=96, num_heads=3)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 2)
    for got, bil in run_timm(model, 64, tmp_path):
        far(got, bil)


def test_swin_rel_pos_bias_and_shift_mask(tmp_path):
    model = timm_model("swin_tiny_patch4_window7_224", depths=(2,), num_heads=(3,), embed_dim=96, img_size=56)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 2)
    coords = qkprobe.mode_coordinates(model, images(56))
    assert "attn_mask" in coords[1].extras  # the second block is shifted: the mask matters there
    for got, bil in run_timm(model, 56, tmp_path, fold=4):
        far(got, bil)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_padded_batch(tmp_path, impl):
    model = build_hf(T.BertConfig, T.BertModel, **TEXT)
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model.set_attn_implementation(impl)  # sdpa: no probabilities returned, the mask is used
    coords = qkprobe.mode_coordinates(model, input_ids=ids, attention_mask=mask, dtype=torch.float64)
    assert all((c.info["attention"].probs is None) == (impl == "sdpa") for c in coords)  # the route tested
    contrib, shares = stored(model, tmp_path, input_ids=ids, attention_mask=mask)
    for got, bil in check(coords, ref, contrib, shares):
        far(got, bil)


def test_torch_mha_padding_and_attn_mask(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, pad, causal):
            return self.attn(x, x, x, pad, True, causal, False)[0]  # positional, as in the signature

    torch.manual_seed(0)
    model = Net().eval()
    peak_mha(model)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True  # MHA: True = ignore
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ref = model.attn(x, x, x, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False)[1]
    coords = qkprobe.mode_coordinates(model, x, pad, causal, dtype=torch.float64)
    contrib, shares = stored(model, tmp_path, x, pad, causal)
    for got, bil in check(coords, [ref], contrib, shares):
        far(got, bil)


def test_custom_adapter_info_keys_still_work():
    """An adapter that hands no AttentionTerms: rel_pos_bias and attn_mask of ``info`` are used."""
    from qkprobe.capture.attention import attention_terms, real_probs
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    bias = torch.randn(1, 2, 5, 5)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    P = real_probs(attention_terms({"rel_pos_bias": bias, "attn_mask": keep}, q, k), 0.5)
    ref = (0.5 * q @ k.transpose(-2, -1) + bias).masked_fill(~keep, float("-inf")).softmax(-1)
    close(P, ref, rel=1e-6)


VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           image_size=32, patch_size=8, initializer_range=0.04)


def hf_run(model, tmp_path, impl, **inputs):
    """The eager reference P (``output_attentions``), then the stored share under ``impl``."""
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    model.set_attn_implementation(impl)
    coords = qkprobe.mode_coordinates(model, dtype=torch.float64, **inputs)
    assert all((c.info["attention"].probs is None) == (impl == "sdpa") for c in coords)  # the route tested
    contrib, shares = stored(model, tmp_path, **inputs)
    return list(check(coords, ref, contrib, shares))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_dinov3_rope(tmp_path, impl):
    """sdpa returns no P: the module's apply_rotary_pos_emb rotates q, k (prefix tokens untouched)."""
    model = build_hf(T.DINOv3ViTConfig, T.DINOv3ViTModel, num_register_tokens=4, **VIT)
    for got, bil in hf_run(model, tmp_path, impl, pixel_values=images(32)):
        far(got, bil)


def test_hf_llama_gqa_causal_rope_sdpa(tmp_path):
    model = build_hf(T.LlamaConfig, T.LlamaModel, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    for got, bil in hf_run(model, tmp_path, "sdpa", input_ids=ids):
        far(got, bil)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_swin_rel_pos_bias_and_shift_mask(tmp_path, impl):
    from hf_helpers import record_probs
    model = build_hf(T.SwinConfig, T.SwinModel, image_size=32, patch_size=4, embed_dim=64, depths=[2, 2],
                     num_heads=[4, 8], window_size=4)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 3)
    probs = record_probs(model)  # eager: every block's probabilities, (B·nW, H, N, N)
    x = images(32)
    with torch.no_grad():
        model(pixel_values=x)
    ref = [p[0] for p in probs.values()]
    model.set_attn_implementation(impl)
    coords = qkprobe.mode_coordinates(model, pixel_values=x, dtype=torch.float64)
    assert sum("attn_mask" in c.extras for c in coords) == 1  # one shifted block
    assert all((c.info["attention"].probs is None) == (impl == "sdpa") for c in coords)  # the route tested
    contrib, shares = stored(model, tmp_path, pixel_values=x)
    for got, bil in check(coords, ref, contrib, shares):
        far(got, bil)


def _scale_qk_norms(model, seed=3):
    """Random qk-norm gains (init is all ones), so that the norm changes the logits and the
    attention stays peaked after it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("q_norm", "k_norm")) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g).abs() * 3 + 1)
    return model


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_qwen3_head_dim_qk_norm_gqa_rope(tmp_path, impl):
    """qk-norm on each head's (B, N, H, R) view, then rope, grouped keys, causal: under sdpa the
    share takes q, k after the module's own norms, not the projections'."""
    model = _scale_qk_norms(build_hf(T.Qwen3Config, T.Qwen3Model, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=128, vocab_size=100))
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    for got, bil in hf_run(model, tmp_path, impl, input_ids=ids):
        far(got, bil)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_internvl_vision_full_width_qk_norm(tmp_path, impl):
    """InternViT normalizes q and k over the full width (B, N, H·R) before splitting heads."""
    model = _scale_qk_norms(build_hf(T.InternVLVisionConfig, T.InternVLVisionModel, use_qk_norm=True, **VIT))
    for got, bil in hf_run(model, tmp_path, impl, pixel_values=images(32)):
        far(got, bil)


def test_hf_gemma3_qk_norm_on_heads_first_view_sdpa(tmp_path):
    """Gemma 3 normalizes the (B, H, N, R) view after the transpose: the head axis read from strides."""
    model = _scale_qk_norms(build_hf(T.Gemma3TextConfig, T.Gemma3TextModel, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=128, vocab_size=100, sliding_window=64))
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    for got, bil in hf_run(model, tmp_path, "sdpa", input_ids=ids):
        far(got, bil)
