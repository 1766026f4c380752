"""qkprobe ablate: the block cache reproduces full forwards, the metrics equal a direct computation,
the CLI writes a resumable file with the run files' metadata, and the report shows it."""

import json
import re

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import qkprobe
from qkprobe.capture.ablate import (COSINE, KL, Ablator, BlockCache, ModeRef, block_of, parse_modes,
                                    top_modes)
from qkprobe.cli.main import main
from qkprobe.data import skimage_images
from qkprobe.errors import InterventionError
from qkprobe.sinks.ablate_file import open_ablation
from peaked import peak_mha, peak_timm

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def vit(depth=4):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, img_size=64).eval()
    peak_timm(model)
    return model


def test_block_cache_reproduces_the_full_forward():
    model = vit()
    seq, i = block_of(model, "blocks.2.attn")
    assert seq is model.blocks and i == 2
    cache = BlockCache(seq, i)
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, j=j: calls.append(j)) for j, b in enumerate(model.blocks)]
    with torch.no_grad():
        h = cache.keep_hook()
        full = model(X)
        h.remove()
        calls.clear()
        with cache.skipping():
            part = model(X)
        assert torch.equal(part, full)
        assert not any("forward" in b.__dict__ for b in model.blocks)
        with qkprobe.intervene(model, {(2, 1): [0]}):
            ref = model(X)
            with cache.skipping():
                out = model(X)
    assert torch.equal(out, ref) and not torch.equal(out, full)
    for h in handles:
        h.remove()


def direct(model, x, layer, head, mode, kind):
    with torch.no_grad():
        y0 = model(x)
        with qkprobe.intervene(model, {(layer, head): [mode]}):
            y1 = model(x)
    if kind == KL:
        lp0, lp1 = F.log_softmax(y0, -1), F.log_softmax(y1, -1)
        return (lp0.exp() * (lp0 - lp1)).sum(-1), (y0.argmax(-1) == y1.argmax(-1)).float()
    return 1 - F.cosine_similarity(y0, y1, dim=-1), None


def test_ablator_equals_direct_computation_with_and_without_cache():
    model = vit()
    bases = qkprobe.compute_bases(model)
    modes = [ModeRef(0, 0, 0), ModeRef(2, 1, 0), ModeRef(3, 2, 1)]
    with_cache = Ablator(model, bases, modes).run_batch(X)
    no_cache = Ablator(model, bases, modes, cache=False).run_batch(X)
    for i, m in enumerate(modes):
        kl, top1 = direct(model, X, m.layer, m.head, m.mode, KL)
        torch.testing.assert_close(with_cache[i]["effect"], kl, rtol=1e-4, atol=1e-7)
        assert torch.equal(with_cache[i]["top1"], top1)
        for key in ("effect", "top1", "attn_change"):
            torch.testing.assert_close(with_cache[i][key], no_cache[i][key], rtol=1e-5, atol=1e-8)
        assert (with_cache[i]["attn_change"] > 1e-4).all()  # the head's attention did move
    assert all(bool((with_cache[i]["effect"] > 1e-8).all()) for i in range(3))


def test_attention_change_is_that_heads_own():
    """|ΔP| from the module's own probabilities (timm's unfused path) equals the ablator's."""
    from peaked import record_timm_probs
    model = vit(depth=2)
    bases = qkprobe.compute_bases(model)
    got = Ablator(model, bases, [ModeRef(1, 2, 0)]).run_batch(X)[0]["attn_change"]
    probs = record_timm_probs(model)  # per forward: layer 0, layer 1
    with torch.no_grad():
        model(X)
        with qkprobe.intervene(model, {(1, 2): [0]}, bases=bases):
            model(X)
    expect = (probs[3][:, 2] - probs[1][:, 2]).abs().flatten(1).mean(-1)
    assert (expect > 1e-4).all()
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-8)


def test_feature_model_open_clip_uses_cosine_and_the_cache():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).visual.eval()
    model.transformer.resblocks = model.transformer.resblocks[:3]
    peak_mha(model)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    ab = Ablator(model, bases, [ModeRef(2, 1, 0)])
    assert ab.caches[2] is not None and ab.caches[2].seq is model.transformer.resblocks
    r = ab.run_batch(x)[0]
    assert ab.kind == COSINE and ab.notes == [] and ab.checked[2]
    effect, _ = direct(model, x, 2, 1, 0, COSINE)
    torch.testing.assert_close(r["effect"], effect, rtol=1e-3, atol=1e-7)
    assert torch.isnan(r["top1"]).all() and (r["effect"] > 0).all()


def test_hf_classifier_cache():
    import transformers as T
    from hf_helpers import build
    model = build(T.ViTConfig, T.ViTForImageClassification, hidden_size=64, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ab = Ablator(model, bases, [ModeRef(2, 0, 0), ModeRef(1, 3, 2)])
    r = ab.run_batch(x)
    assert ab.kind == KL and ab.notes == [] and ab.caches[2] is not None
    full = Ablator(model, bases, [ModeRef(2, 0, 0), ModeRef(1, 3, 2)], cache=False).run_batch(x)
    for i in r:
        torch.testing.assert_close(r[i]["effect"], full[i]["effect"], rtol=1e-5, atol=1e-9)


def test_parse_and_top_modes():
    bases = qkprobe.compute_bases(vit(depth=2))
    assert parse_modes("L1H2M0, L0H0M3,L1H2M0", bases) == [ModeRef(1, 2, 0), ModeRef(0, 0, 3)]
    with pytest.raises(InterventionError, match="like L5H3M0"):
        parse_modes("5:3:0", bases)
    with pytest.raises(InterventionError, match="does not exist"):
        parse_modes("L2H0M0", bases)
    shares = [torch.tensor([[0.1, 0.5], [0.3, 0.2]]), torch.tensor([[0.0, 0.1], [0.9, float("nan")]])]
    assert top_modes(shares, 2) == [ModeRef(0, 0, 1), ModeRef(0, 1, 0), ModeRef(1, 1, 0), ModeRef(1, 0, 1)]


# ----------------------------------------------------------------------------- CLI, file, report

SPEC = "timm:test_vit"  # 6 layers, 2 heads, 160 px


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("ablate_photos")
    paths = skimage_images(str(d / "all"))[:4]
    sub = d / "four"
    sub.mkdir()
    for p in paths:
        (sub / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    return sub


@pytest.fixture(scope="module")
def ablation(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "ablate.h5"
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--modes", "L3H1M0,L5H0M1,L0H1M2",
                 "--out", str(out), "--batch-size", "3", "--no-progress"]) == 0
    return out


def test_cli_file_has_metadata_and_results(ablation):
    ab = open_ablation(ablation)
    assert ab.labels() == ["L3H1M0", "L5H0M1", "L0H1M2"] and len(ab.images) == 4 and ab.done.all()
    assert ab.meta["model_spec"] == SPEC and ab.meta["random_init"] is True
    assert len(ab.meta["weights_hash"]) >= 16 and "torch" in ab.meta["versions"]
    assert ab.meta["options"] == {"modes": "L3H1M0,L5H0M1,L0H1M2", "top": None, "scale": 0.0, "fold_ln": False}
    assert ab.measure == KL and np.isfinite(ab.effect).all() and (ab.effect >= 0).all()
    model, _ = qkprobe.load_model(SPEC, pretrained=False)
    bases = qkprobe.compute_bases(model)
    assert ab.singular_value[0] == pytest.approx(float(bases[3].S[1, 0]))
    assert ab.cosine[2] == pytest.approx(float(bases[0].cosine[1, 2]))
    assert np.isfinite(ab.attn_share).all() and ab.layer_name[1] == bases[5].name


def test_cli_resume_computes_only_what_is_missing(ablation, photos, tmp_path):
    out = tmp_path / "partial.h5"
    out.write_bytes(ablation.read_bytes())
    before = open_ablation(out)
    with h5py.File(out, "r+") as f:
        f["done"][1, 2:] = 0
        f["effect"][1, 2:] = np.nan
        f["effect"][0, :] = -1.0   # done: must stay as it is
        f["effect"][1, 0] = -2.0   # done, in a batch that is recomputed for the pairs that are not
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--modes", "L3H1M0,L5H0M1,L0H1M2",
                 "--out", str(out), "--batch-size", "3", "--no-progress", "--resume"]) == 0
    after = open_ablation(out)
    assert after.done.all() and (after.effect[0] == -1.0).all() and after.effect[1, 0] == -2.0
    np.testing.assert_allclose(after.effect[1, 1:], before.effect[1, 1:], rtol=1e-4)
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--modes", "L3H1M0,L5H0M1,L0H1M2",
                 "--scale", "2", "--out", str(out), "--no-progress", "--resume"]) == 2
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--top", "1",
                 "--out", str(out), "--no-progress"]) == 2   # exists, no --resume


def test_cli_top_picks_largest_share_per_layer(photos, tmp_path, capsys):
    out = tmp_path / "top.h5"
    assert main(["ablate", SPEC, "--random-init", "--images", str(photos), "--top", "1", "--scale", "0.5",
                 "--out", str(out), "--batch-size", "4", "--no-progress", "--no-cache"]) == 0
    ab = open_ablation(out)
    assert list(ab.layer) == list(range(6))
    model, transform = qkprobe.load_model(SPEC, pretrained=False)
    from qkprobe.capture.ablate import attention_shares
    from qkprobe.data import make_loader
    x = next(iter(make_loader(ab.images, transform, batch_size=4)))[0]
    shares = attention_shares(model, [x], qkprobe.compute_bases(model))
    for i in range(6):
        assert float(shares[i][ab.head[i], ab.mode[i]]) == pytest.approx(float(shares[i].max()), rel=1e-5)
        assert ab.attn_share[i] == pytest.approx(float(shares[i].max()), rel=1e-4)
    assert "L0H" in capsys.readouterr().out


def test_report_section(ablation, photos, tmp_path):
    run = tmp_path / "run.h5"
    assert main(["run", SPEC, "--random-init", "--images", str(photos), "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "report"
    assert main(["report", str(run), str(ablation), "--out", str(out), "--no-maps", "--no-progress"]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "What removing each mode does" in page and 'href="#ablation"' in page
    assert (out / "figures" / "ablation0.png").stat().st_size > 5000
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    ab = open_ablation(ablation)
    [d] = data["ablation"]
    assert d["labels"] == ab.labels()
    np.testing.assert_allclose(d["effect"], ab.effect.mean(1), rtol=1e-6)
    assert main(["report", str(ablation), "--out", str(tmp_path / "r2"), "--no-progress"]) == 0  # alone, too
    assert "What removing each mode does" in (tmp_path / "r2" / "index.html").read_text(encoding="utf-8")


def test_ablation_plot_scales_and_labels():
    from qkprobe import plot
    cos, share = np.array([0.1, -0.2, 0.5]), np.array([0.2, 0.1, 0.3])
    fig = plot.ablation_effects(cos, share, np.array([1e-3, 1e-5, np.nan]), labels=["a", "b", "c"],
                                layers=[0, 1, 2], n_labels=1)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes) == 3  # two panels and the layer colour bar
    assert [t.get_text() for t in fig.axes[0].texts] == ["a"]
    fig = plot.ablation_effects(cos, share, np.array([0.0, 1e-5, 2e-5]), measure="1-cos")
    assert fig.axes[0].get_yscale() == "linear" and "1 − cos" in fig.axes[0].get_ylabel()


def test_torchvision_named_blocks_are_reused():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128).eval()  # vit_b_16's class, small
    peak_mha(model)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero
    seq, i = block_of(model, "encoder.layers.encoder_layer_2.self_attention")
    assert seq is model.encoder.layers and i == 2
    bases = qkprobe.compute_bases(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    ab = Ablator(model, bases, [ModeRef(2, 3, 0)])
    r = ab.run_batch(x)[0]
    assert ab.kind == KL and ab.caches[2] is not None and ab.checked[2] and ab.notes == []
    kl, _ = direct(model, x, 2, 3, 0, KL)
    assert (kl > 1e-9).all()
    torch.testing.assert_close(r["effect"], kl, rtol=1e-3, atol=1e-9)


def test_top_ranks_modes_by_the_share_of_the_actual_attention():
    """BEiT adds a relative-position bias: --top's shares use the library's own probabilities
    (as the probe's attn_share does), not the softmax of the bilinear logits."""
    from peaked import record_timm_probs
    from qkprobe.capture.ablate import attention_shares
    from qkprobe.core.stats import STAT_INDEX, mode_statistics
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, depth=2, img_size=64, embed_dim=96,
                              num_heads=3).eval()
    peak_timm(model)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 2)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    bases = qkprobe.compute_bases(model)
    probs = record_timm_probs(model)
    coords = qkprobe.mode_coordinates(model, x, bases=bases, dtype=torch.float64)
    got = attention_shares(model, [x], bases)
    share = STAT_INDEX["attn_share"]
    for c, p, g in zip(coords, probs, got):
        ref = mode_statistics(c.a, c.b, c.S, c.scale, prefix_tokens=c.prefix_tokens, probs=p.double())
        bilinear = mode_statistics(c.a, c.b, c.S, c.scale, prefix_tokens=c.prefix_tokens)
        want, old = ref[..., share].mean(0), bilinear[..., share].mean(0)
        torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-4)
        assert (want - old).abs().max() > 0.02 * want.abs().max()  # the bias matters
