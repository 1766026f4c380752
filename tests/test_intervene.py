"""qkprobe.intervene: exact against weight surgery on the library's own models, hooks removed,
scale=1 bit-identical, gradients, probes record the intervened forward, flagged families."""

import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import qkprobe
from qkprobe.capture.intervene import InterventionWarning
from qkprobe.errors import InterventionError
from peaked import peak_mha, peak_timm

REL_TOL = 1e-5


def transform(lb, head, modes, scale, keep=False):
    """T = (C diag(m) C⁻¹)ᵀ for one head, written here from the bases alone (float64)."""
    C = lb.coord_q[head].to(torch.float64)
    m = torch.full((lb.num_modes,), float(scale), dtype=torch.float64) if keep \
        else torch.ones(lb.num_modes, dtype=torch.float64)
    m[list(modes)] = 1.0 if keep else float(scale)
    return (C @ torch.diag(m) @ torch.linalg.inv(C)).T


@torch.no_grad()
def surgery(W, b, head, R, T):
    """Rows head·R:(head+1)·R of a q weight (and bias) replaced by T W_q, T b_q (in place)."""
    rows = slice(head * R, (head + 1) * R)
    W[rows] = (T @ W[rows].double()).to(W.dtype)
    if b is not None:
        b[rows] = (T @ b[rows].double()).to(b.dtype)


def timm_q(attn):
    if getattr(attn, "qkv", None) is not None:
        b = attn.qkv.bias if attn.qkv.bias is not None else getattr(attn, "q_bias", None)
        return attn.qkv.weight, b
    return attn.q_proj.weight, attn.q_proj.bias


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def timm_model(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=3, img_size=64, **kw).eval()
    peak_timm(model)
    return model


X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
SPEC = {(1, 0): [0, 2], (1, 2): [1], (2, 1): [0]}


def apply_surgery(model, bases, spec, scale, get_q, keep=False):
    ref = copy.deepcopy(model)
    sites = dict(ref.named_modules())
    for (layer, head), modes in spec.items():
        lb = bases[layer]
        W, b = get_q(sites[lb.name])
        surgery(W, b, head, lb.head_dim, transform(lb, head, modes, scale, keep))
    return ref


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_timm_equals_weight_surgery(name, scale):
    model = timm_model(name)
    bases = qkprobe.compute_bases(model)
    with torch.no_grad():
        plain = model(X64)
        with qkprobe.intervene(model, SPEC, scale=scale, bases=bases):
            out = model(X64)
        ref = apply_surgery(model, bases, SPEC, scale, timm_q)(X64)
    assert rel_err(out, ref) <= REL_TOL
    assert rel_err(plain, ref) > 1e-3  # the change is large enough that a wrong T would show


def test_keep_equals_surgery_and_names_work():
    model = timm_model("vit_tiny_patch16_224")
    bases = qkprobe.compute_bases(model)
    keep = {(bases[2].name, 1): [0, 3]}
    with torch.no_grad(), qkprobe.intervene(model, keep=keep):
        out = model(X64)
    ref = apply_surgery(model, bases, {(2, 1): [0, 3]}, 0.0, timm_q, keep=True)(X64)
    assert rel_err(out, ref.detach()) <= REL_TOL


def test_scale_one_is_bit_identical_and_hooks_removed():
    model = timm_model("vit_tiny_patch16_224")
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    n0 = hooks()
    with torch.no_grad():
        plain = model(X64)
        with qkprobe.intervene(model, SPEC, scale=1.0):
            same = model(X64)
        with qkprobe.intervene(model, SPEC, scale=0.0):
            assert hooks() > n0
            changed = model(X64)
        after = model(X64)
    assert torch.equal(plain, same)
    assert not torch.equal(plain, changed)
    assert hooks() == n0 and torch.equal(plain, after)


def test_hooks_removed_after_an_error():
    model = timm_model("vit_tiny_patch16_224")
    with torch.no_grad():
        plain = model(X64)
        with pytest.raises(RuntimeError):
            with qkprobe.intervene(model, SPEC):
                raise RuntimeError("boom")
        assert torch.equal(model(X64), plain)


def test_gradients_see_the_change():
    model = timm_model("vit_tiny_patch16_224")
    bases = qkprobe.compute_bases(model)
    ref = apply_surgery(model, bases, SPEC, 0.0, timm_q)
    x1, x2 = X64.clone().requires_grad_(), X64.clone().requires_grad_()
    with qkprobe.intervene(model, SPEC, bases=bases):
        model(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    assert rel_err(x1.grad, x2.grad) <= 1e-4
    # the original weights receive the chain rule through T: dL/dW_q = Tᵀ dL/dW_q'
    W, _ = timm_q(model.blocks[1].attn)
    Wr, _ = timm_q(ref.blocks[1].attn)
    R = bases[1].head_dim
    T = transform(bases[1], 0, [0, 2], 0.0)
    rows = slice(0, R)
    expect = (T.T @ Wr.grad[rows].double()).float()
    assert rel_err(W.grad[rows], expect) <= 1e-4


def test_probe_records_scaled_coordinates(tmp_path):
    """A probe attached before or after the intervention records the intervened forward:
    the chosen modes' a-coordinates times the scale, every other coordinate as it was."""
    model = timm_model("vit_tiny_patch16_224")
    bases = qkprobe.compute_bases(model)
    spec, scale = {(1, 0): [0, 2]}, 0.5
    plain = qkprobe.mode_coordinates(model, X64, bases=bases)
    with qkprobe.intervene(model, spec, scale=scale, bases=bases):
        coords = qkprobe.mode_coordinates(model, X64, bases=bases)
    a0, a1 = plain[1].a, coords[1].a
    torch.testing.assert_close(a1[:, 0, :, [0, 2]], scale * a0[:, 0, :, [0, 2]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a1[:, 0, :, 1], a0[:, 0, :, 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a1[:, 1], a0[:, 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(coords[1].b, plain[1].b)  # keys untouched
    n = bases[1].prefix_tokens
    for order in ("attach_first", "intervene_first"):
        path = str(tmp_path / f"{order}.h5")
        if order == "intervene_first":
            iv = qkprobe.intervene(model, spec, scale=scale, bases=bases)
        with qkprobe.attach(model, out=path) as probe:
            if order == "attach_first":
                iv = qkprobe.intervene(model, spec, scale=scale, bases=bases)
            probe.set_ids(["a", "b"])
            with torch.no_grad():
                model(X64)
            iv.remove()
        run = qkprobe.open_run(path)
        q_max = torch.as_tensor(run.stats(1, "q_max"))  # (rows, H, R)
        for r, f in ((0, scale), (1, 1.0), (2, scale)):
            torch.testing.assert_close(q_max[:, 0, r], (f * a0[:, 0, n:, r]).amax(-1).float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q_max[:, 1], a0[:, 1, n:].amax(-2).float(), rtol=1e-4, atol=1e-4)


def test_several_layers_and_bad_input():
    model = timm_model("vit_tiny_patch16_224")
    with pytest.raises(InterventionError, match="layer 7 is out of range"):
        qkprobe.intervene(model, {(7, 0): [0]})
    with pytest.raises(InterventionError, match="head 9"):
        qkprobe.intervene(model, {(0, 9): [0]})
    with pytest.raises(InterventionError, match="mode 64"):
        qkprobe.intervene(model, {(0, 0): [64]})
    with pytest.raises(InterventionError, match="no attention layer is named"):
        qkprobe.intervene(model, {("blocks.9.attn", 0): [0]})
    with pytest.raises(InterventionError, match="either modes"):
        qkprobe.intervene(model, {(0, 0): [0]}, keep={(0, 0): [0]})
    iv = qkprobe.intervene(model, {(0, 0): [0], (2, 1): [1], ("blocks.1.attn", 2): [3]})
    assert [e.name for e in iv.edits] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert iv.approximate == {}
    iv.remove()


def test_flagged_family_warns_and_acts_on_bilinear_part():
    model = timm_model("vit_tiny_patch16_224", qk_norm=True)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.q_norm.weight.normal_(1, 1)
    bases = qkprobe.compute_bases(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        iv = qkprobe.intervene(model, {(1, 0): [0]}, bases=bases)
    assert any(issubclass(x.category, InterventionWarning) and "qk_norm" in str(x.message) for x in w)
    assert iv.approximate == {"blocks.1.attn": frozenset({"qk_norm"})}
    with torch.no_grad():
        coords = qkprobe.mode_coordinates(model, X64, bases=bases)  # q before the norm
        out = model(X64)
    iv.remove()
    plain = qkprobe.mode_coordinates(model, X64, bases=bases)
    torch.testing.assert_close(coords[1].a[:, 0, :, 0], torch.zeros_like(coords[1].a[:, 0, :, 0]),
                               atol=1e-4, rtol=0)
    assert coords[1].a[:, 0, :, 1].abs().max() > 0.1 and plain[1].a[:, 0, :, 0].abs().max() > 0.1
    with torch.no_grad():
        assert rel_err(out, model(X64)) > 1e-4


# ----------------------------------------------------------------------------- other families

def test_hf_vit_equals_weight_surgery():
    import transformers as T
    from hf_helpers import build, qk_linears
    model = build(T.ViTConfig, T.ViTModel, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=128, image_size=32, patch_size=8)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    spec = {(1, 0): [0, 2], (2, 3): [1]}
    with torch.no_grad():
        plain = model(pixel_values=x).last_hidden_state
        with qkprobe.intervene(model, spec, bases=bases):
            out = model(pixel_values=x).last_hidden_state
        ref = apply_surgery(model, bases, spec, 0.0, lambda m: (qk_linears(m)[0].weight, qk_linears(m)[0].bias))
        ref = ref(pixel_values=x).last_hidden_state
    assert rel_err(out, ref) <= REL_TOL and rel_err(plain, ref) > 1e-3


def mha_q(m):
    return m.in_proj_weight, m.in_proj_bias


def test_open_clip_mha_equals_weight_surgery_with_gradients():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).visual.eval()
    model.transformer.resblocks = model.transformer.resblocks[:3]
    peak_mha(model)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    spec = {(1, 0): [0, 1], (2, 5): [2]}
    ref = apply_surgery(model, bases, spec, 0.0, mha_q)
    W = model.transformer.resblocks[1].attn.in_proj_weight
    with torch.no_grad():
        plain = model(x)
    with qkprobe.intervene(model, spec, bases=bases):
        assert model.transformer.resblocks[1].attn.in_proj_weight is not W  # parametrized
        out = model(x)
        out.sum().backward()
    assert model.transformer.resblocks[1].attn.in_proj_weight is W  # restored, same Parameter
    assert W.grad is not None and W.grad[:64].abs().max() > 0
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())
    with torch.no_grad():
        r = ref(x)
        assert torch.equal(model(x), plain)
    assert rel_err(out.detach(), r) <= REL_TOL and rel_err(plain, r) > 1e-3


def test_plain_mha_seq_first_and_native_fast_path():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0), 2,
                                  enable_nested_tensor=False).eval()
    peak_mha(model)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(10, 2, 32)
    spec = {(0, 1): [0], (1, 2): [0, 1]}
    with torch.no_grad():
        with qkprobe.intervene(model, spec, bases=bases):
            out = model(x)
        ref = apply_surgery(model, bases, spec, 0.0, mha_q)(x)
    assert rel_err(out, ref) <= REL_TOL


def test_bf16_autocast_close_to_surgery():
    """bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.004): the hook's q + qΔ and the
    surgery's (TW)x round differently, by about as much as the bf16 surgery output differs from
    its float32 run (≈ 6e-3 here). 2e-2 allows that and still separates the intervened output from
    the plain one (≈ 9e-2 away); the float32 check of the same model is 1e-5."""
    model = timm_model("vit_tiny_patch16_224")
    bases = qkprobe.compute_bases(model)
    ref = apply_surgery(model, bases, SPEC, 0.0, timm_q)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(X64).float()
        with qkprobe.intervene(model, SPEC, bases=bases):
            out = model(X64)
        r = ref(X64).float()
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), r) <= 2e-2
    assert rel_err(plain, r) > 5e-2


@pytest.mark.parametrize("name,kw,size", [
    ("beit_base_patch16_224", dict(depth=2, img_size=64, embed_dim=96, num_heads=3), 64),   # q_bias via F.linear
    ("swin_tiny_patch4_window7_224", dict(depths=(2,), num_heads=(3,), embed_dim=96, img_size=56), 56),  # qkv
])
def test_packed_qkv_families_equal_weight_surgery(name, kw, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    peak_timm(model)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    spec = {(0, 1): [0, 1], (1, 2): [3]}
    attn = dict(model.named_modules())[bases[0].name]
    flag = getattr(attn, "qkv_bias_separate", None)
    with torch.no_grad():
        plain = model(x)
        with qkprobe.intervene(model, spec, bases=bases):
            out = model(x)
        assert getattr(attn, "qkv_bias_separate", None) == flag  # switched back
        ref = apply_surgery(model, bases, spec, 0.0, timm_q)(x)
        assert torch.equal(model(x), plain)
    assert rel_err(out, ref) <= REL_TOL and rel_err(plain, ref) > 1e-3


def test_custom_adapter_with_q_parameters_equals_surgery():
    from test_registry import MyAdapter, MyAttention

    class QAdapter(MyAdapter):
        def q_parameters(self, m):
            return [(m, "wq"), (m, "bq")]

    torch.manual_seed(0)
    model = nn.Sequential(MyAttention(), nn.LayerNorm(32), MyAttention())
    x = torch.randn(2, 6, 32)
    spec = {(0, 1): [0], (1, 3): [1, 2]}
    qkprobe.register_attention(MyAttention, MyAdapter())
    try:
        bases = qkprobe.compute_bases(model)
        with pytest.raises(InterventionError, match="q_parameters"):
            qkprobe.intervene(model, spec, bases=bases)
    finally:
        qkprobe.unregister_attention(MyAttention)
    qkprobe.register_attention(MyAttention, QAdapter())
    try:
        with torch.no_grad():
            plain = model(x)
            with qkprobe.intervene(model, spec, bases=bases):
                out = model(x)
            assert torch.equal(model(x), plain) and type(model[0]) is MyAttention
            ref = apply_surgery(model, bases, spec, 0.0, lambda m: (m.wq, m.bq))(x)
    finally:
        qkprobe.unregister_attention(MyAttention)
    assert rel_err(out, ref) <= REL_TOL and rel_err(plain, ref) > 1e-3
