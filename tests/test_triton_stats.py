"""The Triton statistics kernels against the torch path, on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (torch imports it): run alone,
this module sets it before anything else; in a session that imported torch already, one test
runs this module in a fresh process instead (and the others skip).
"""

import os
import re
import subprocess
import sys

FRESH = "torch" not in sys.modules  # nothing imported triton yet: the interpreter can be turned on here
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import qkprobe  # noqa: E402
from qkprobe.capture.coordinates import per_head_matmul  # noqa: E402
from qkprobe.core.stats import STAT_INDEX, STAT_NAMES, mode_statistics  # noqa: E402
from qkprobe.errors import BackendError, ShapeError  # noqa: E402
from peaked import peak_timm  # noqa: E402

triton_stats = pytest.importorskip("qkprobe.reduce.triton_stats")



@pytest.mark.skipif(FRESH or not triton_stats.available(), reason="this process runs the interpreter tests itself")
def test_in_a_fresh_process_with_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    counts = dict((w, int(n)) for n, w in re.findall(r"(\d+) (passed|skipped|failed)", r.stdout))
    assert r.returncode == 0 and counts.get("passed", 0) >= 10 and counts.get("skipped") == 1, \
        r.stdout[-3000:] + r.stderr[-3000:]


#: the tests below run only where this process could turn the interpreter on
interpreted = pytest.mark.skipif(not (FRESH and triton_stats.available() and triton_stats.interpreting()),
                                 reason="runs in a fresh process (TRITON_INTERPRET=1 before triton imports)")

MAP = slice(0, STAT_INDEX["attn_contrib"])


def layer(B, H, N, D, R, dtype=torch.float32, seed=0, boost=3.0):
    """q, k (B, H, N, D) as views of one fused qkv tensor (as timm makes them), maps, S."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k = qkv[0] * boost, qkv[1]
    coord_q = torch.randn(H, D, R, generator=g) / D ** 0.5
    coord_k = torch.randn(H, D, R, generator=g) / D ** 0.5
    S = torch.rand(H, R, generator=g) + 0.1
    return q.to(dtype), k.to(dtype), coord_q, coord_k, S


def reference(q, k, coord_q, coord_k, S, scale, **kw):
    """The torch path (core/stats.py) from the same inputs, in float32 (no C kernels)."""
    a, b = per_head_matmul(q.float(), coord_q), per_head_matmul(k.float(), coord_k)
    from qkprobe.core import native
    with native.disabled():
        return mode_statistics(a, b, S, scale, q=q.float(), k=k.float(), **kw)


def compare(got, ref, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=rtol, atol=atol, equal_nan=True)


# (B, H, N, D, R, prefix, topk, dtype): ViT-S/16 (6 heads) and ViT-B/16 (12 heads) at 224 px with
# a head subset, ViT-L/14 (N=257), 4 registers + cls, R = 32 / 80, k up to 16, fp32 and bf16
CASES = [
    pytest.param(1, 2, 197, 64, 64, 1, 5, torch.float32, id="vit_s16-fp32"),
    pytest.param(2, 1, 197, 64, 64, 1, 5, torch.bfloat16, id="vit_b16-bf16"),
    pytest.param(1, 1, 257, 64, 64, 1, 16, torch.float32, id="vit_l14-k16"),
    pytest.param(1, 2, 201, 64, 64, 5, 9, torch.bfloat16, id="registers-bf16"),
    pytest.param(2, 2, 37, 32, 32, 0, 16, torch.float16, id="r32-fp16"),
    pytest.param(1, 2, 51, 80, 80, 1, 7, torch.float32, id="r80"),
]


@interpreted
@pytest.mark.parametrize("B,H,N,D,R,P,K,dtype", CASES)
def test_kernels_match_the_torch_path(B, H, N, D, R, P, K, dtype):
    q, k, cq, ck, S = layer(B, H, N, D, R, dtype)
    scale = D ** -0.5
    got = triton_stats.mode_statistics_qk(q, k, cq, ck, S, scale, prefix_tokens=P, topk=K)
    ref = reference(q, k, cq, ck, S, scale, prefix_tokens=P, topk=K)
    assert got.dtype == torch.float32 and got.shape == (B, H, R, len(STAT_NAMES))
    compare(got[..., MAP], ref[..., MAP])
    contrib = ref[..., STAT_INDEX["attn_contrib"]]
    compare(got[..., STAT_INDEX["attn_contrib"]], contrib, rtol=1e-4, atol=1e-5 * float(contrib.abs().max()))
    compare(got[..., STAT_INDEX["attn_share"]], ref[..., STAT_INDEX["attn_share"]], rtol=1e-3, atol=1e-4)


@interpreted
@pytest.mark.parametrize("capability, B, H, N, D, R, P, K, dtype", [
    pytest.param(80, 2, 1, 197, 64, 64, 1, 5, torch.bfloat16, id="sm80-vit_b16-bf16"),
    pytest.param(90, 1, 2, 51, 80, 80, 1, 7, torch.bfloat16, id="sm90-r80-bf16"),  # a partial 32-dim chunk
    pytest.param(90, 1, 1, 51, 80, 80, 5, 9, torch.float32, id="sm90-r80-fp32"),
])
def test_gpu_block_configurations_match_the_torch_path(monkeypatch, capability, B, H, N, D, R, P, K, dtype):
    """The interpreter runs large blocks by default (quick); here the blocks a GPU would run."""
    monkeypatch.setattr(triton_stats, "INTERPRETER_CAPABILITY", capability)
    assert triton_stats.block_config(D, R, dtype, capability).map_n == 16
    test_kernels_match_the_torch_path(B, H, N, D, R, P, K, dtype)


@interpreted
def test_fewer_queries_than_keys_keep_the_longer_top_k_list():
    """Cross-attention shapes: 4 map queries, 19 map keys, k = 8: the key side's list must hold 8
    (a list sized for the shorter side averaged 4 keys over 8)."""
    q, _, cq, ck, S = layer(1, 2, 5, 16, 16, seed=21)
    _, k, _, _, _ = layer(1, 2, 20, 16, 16, seed=22)
    got = triton_stats.mode_statistics_qk(q, k, cq, ck, S, 0.25, prefix_tokens=1, topk=8)
    ref = reference(q, k, cq, ck, S, 0.25, prefix_tokens=1, topk=8)
    compare(got[..., MAP], ref[..., MAP])
    c = STAT_INDEX["attn_contrib"]
    compare(got[..., c], ref[..., c], rtol=1e-4, atol=1e-5 * float(ref[..., c].abs().max()))


@interpreted
def test_ties_and_nonfinite_tokens_as_the_torch_path():
    """Quantized coordinates (many ties); an inf or NaN entry of a token makes its coordinates NaN
    (inf · 0 in the map), which voids the five statistics of that side, the other side intact."""
    q, k, cq, ck, S = layer(1, 2, 29, 16, 16, seed=3)
    eye = torch.eye(16).expand(2, 16, 16).contiguous()
    q, k = q.round().contiguous(), k.round().contiguous()  # identity maps: a = q, b = k, ties galore
    got = triton_stats.mode_statistics_qk(q, k, eye, eye, S, 0.25, prefix_tokens=1, topk=4, attention=False)
    ref = reference(q, k, eye, eye, S, 0.25, prefix_tokens=1, topk=4, attention=False)
    compare(got[..., MAP], ref[..., MAP], rtol=0, atol=1e-6)
    assert torch.isnan(got[..., STAT_INDEX["attn_contrib"]:]).all()  # attention=False: NaN columns
    q[0, 0, 5, 3] = float("inf")
    k[0, 1, 9, 4] = float("nan")
    q[0, 1, 0, 2] = float("nan")  # a prefix token: left out of the map statistics
    got = triton_stats.mode_statistics_qk(q, k, eye, eye, S, 0.25, prefix_tokens=1, topk=4, attention=False)
    ref = reference(q, k, eye, eye, S, 0.25, prefix_tokens=1, topk=4, attention=False)
    compare(got[..., MAP], ref[..., MAP], rtol=0, atol=1e-6)
    others = [r for r in range(16) if r != 3]  # inf · 1 stays inf in mode 3: ranked as a number
    assert torch.isnan(got[0, 0, others, :5]).all() and torch.isfinite(got[0, 0, :, 5:10]).all()
    assert got[0, 0, 3, STAT_INDEX["q_max"]] == float("inf") and torch.isfinite(got[0, 0, 3, STAT_INDEX["q_min"]])
    assert torch.isnan(got[0, 1, :, 5:10]).all() and torch.isfinite(got[0, 1, :, :5]).all()


@interpreted
def test_share_from_given_probabilities_and_biases():
    q, k, cq, ck, S = layer(1, 2, 40, 16, 16, seed=5)
    scale = 0.25
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(2, 40, 40, generator=g) * 3  # (H, N, Nk): a rel-pos table, broadcast over B
    mask = torch.rand(1, 1, 40, 40, generator=g) > 0.3
    mask[..., 0] = True
    probs = torch.softmax(torch.randn(1, 2, 40, 40, generator=g) * 4, -1)
    for kw in ({"attn_bias": bias}, {"attn_bias": mask}, {"probs": probs}):
        got = triton_stats.mode_statistics_qk(q, k, cq, ck, S, scale, prefix_tokens=1, **kw)
        ref = reference(q, k, cq, ck, S, scale, prefix_tokens=1, **kw)
        c = STAT_INDEX["attn_contrib"]
        compare(got[..., c], ref[..., c], rtol=1e-4, atol=1e-5 * float(ref[..., c].abs().max()))
    # the bias must matter, or the test above could not fail
    plain = triton_stats.mode_statistics_qk(q, k, cq, ck, S, scale, prefix_tokens=1)
    assert not torch.allclose(plain[..., c], got[..., c], rtol=1e-2)


@interpreted
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_token_mask_gives_each_padded_sample_its_statistics_alone(monkeypatch, share):
    """Samples of 40, 23, 3 and 1 real tokens padded (NaN) to 40 and batched: each gets what it
    gets alone, unpadded (top-k clipped to its own 2 map tokens for the 3-token one); the one with
    only its cls token has no map tokens: NaN map statistics. sm_90 blocks: 16-token tiles."""
    monkeypatch.setattr(triton_stats, "INTERPRETER_CAPABILITY", 90)
    lengths, N, P, K, scale = (40, 23, 3, 1), 40, 1, 4, 0.25
    q, k, cq, ck, S = layer(len(lengths), 2, N, 16, 16, seed=11)
    q, k = q.contiguous(), k.contiguous()
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    g = torch.Generator().manual_seed(12)
    alone_probs = [torch.softmax(torch.randn(1, 2, n, n, generator=g) * 3, -1) for n in lengths]
    probs = torch.zeros(len(lengths), 2, N, N)
    for i, (n, pr) in enumerate(zip(lengths, alone_probs)):
        probs[i, :, :n, :n] = pr[0]
    q[~mask[:, None, :, None].expand_as(q)] = float("nan")  # padding must not leak anywhere
    k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    kw = {"probs": probs} if share == "probs" else {}
    got = triton_stats.mode_statistics_qk(q, k, cq, ck, S, scale, prefix_tokens=P, topk=K, token_mask=mask, **kw)
    for i, n in enumerate(lengths[:3]):
        kw = {"probs": alone_probs[i]} if share == "probs" else {}
        alone = triton_stats.mode_statistics_qk(q[i:i + 1, :, :n], k[i:i + 1, :, :n], cq, ck, S, scale,
                                                prefix_tokens=P, topk=K, **kw)
        compare(got[i], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isnan(got[3, ..., :10]).all() and torch.isfinite(got[:3]).all()
    with pytest.raises(ShapeError, match="token_mask"):
        triton_stats.mode_statistics_qk(q, k[:, :, :30], cq, ck, S, scale, token_mask=mask)


@interpreted
def test_split_maps_are_made_once_per_map_until_it_changes():
    from qkprobe.reduce import triton_stats as ts
    coord = torch.randn(2, 16, 8)
    parts, factor = ts.split_maps(coord, torch.bfloat16, "cpu", "tf32x3")
    assert ts.split_maps(coord, torch.bfloat16, "cpu", "tf32x3")[0] is parts        # cached
    assert torch.allclose(sum(p.float() * factor ** i for i, p in enumerate(parts)), coord, rtol=0, atol=1e-6)
    assert ts.split_maps(coord, torch.float16, "cpu", "tf32x3")[0].dtype == torch.float16   # per dtype
    coord.mul_(2)                                                                    # changed in place
    again, _ = ts.split_maps(coord, torch.bfloat16, "cpu", "tf32x3")
    assert again is not parts and torch.allclose(sum(p.float() * factor ** i for i, p in enumerate(again)), coord,
                                                 rtol=0, atol=1e-6)


def test_bad_shapes_say_what_is_wrong():
    q, k, cq, ck, S = layer(1, 2, 20, 16, 16)
    with pytest.raises(ShapeError, match="coord_q"):
        triton_stats.mode_statistics_qk(q, k, cq[:, :8], ck, S, 1.0)
    with pytest.raises(ShapeError, match="prefix_tokens"):
        triton_stats.mode_statistics_qk(q, k, cq, ck, S, 1.0, prefix_tokens=20)
    with pytest.raises(ShapeError, match="topk"):
        triton_stats.mode_statistics_qk(q.expand(1, 2, 20, 16).repeat(1, 1, 5, 1),
                                        k.repeat(1, 1, 5, 1), cq, ck, S, 1.0, topk=65)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              num_heads=2, **kw).eval()
    peak_timm(model, seed=seed)
    return model


@interpreted
@pytest.mark.parametrize("stats, kw", [(None, dict(reg_tokens=2)), ("all", dict(reg_tokens=2)),
                                       ("all", dict(qk_norm=True))])  # share from the module's real P
def test_attach_with_triton_backend_records_what_the_torch_backend_records(tmp_path, stats, kw):
    model = tiny_vit(**kw)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    paths = {}
    for backend in ("torch", "triton"):
        paths[backend] = str(tmp_path / f"{backend}.h5")
        with qkprobe.attach(model, paths[backend], backend=backend, stats=stats, top_samples=3), torch.no_grad():
            for x in xs:
                model(x)
    with qkprobe.open_run(paths["triton"]) as fast, qkprobe.open_run(paths["torch"]) as ref:
        assert len(fast) == len(ref) == 4 and fast.stat_names == ref.stat_names
        for i in range(len(model.blocks)):
            np.testing.assert_allclose(fast.stats(i), ref.stats(i), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(fast.snapshot(i, "topk_index"), ref.snapshot(i, "topk_index"))
            np.testing.assert_allclose(fast.snapshot(i, "agg_mean"), ref.snapshot(i, "agg_mean"), rtol=1e-4, atol=1e-5)


@interpreted
def test_forced_backend_that_cannot_run_says_so(monkeypatch):
    from qkprobe.reduce import backend
    model = tiny_vit()
    with pytest.raises(BackendError, match="unknown statistics backend"):
        qkprobe.attach(model, backend="gpu")
    with pytest.raises(BackendError, match="cannot run on cuda"):
        backend.resolve("native", "cuda")
    monkeypatch.setattr(triton_stats, "interpreting", lambda: False)
    with pytest.raises(BackendError, match="backend 'triton' cannot run here"):
        qkprobe.attach(model, backend="triton")
    assert backend.resolve("auto", "cpu") in ("native", "torch")
