"""``qkprobe bases SPEC [SPEC ...]``: model-zoo file, wildcards, resume after an interruption, a
failing model listed with its reason, Figure 2 from the file."""

import json

import h5py
import numpy as np
import pytest

import qkprobe
import qkprobe.bases
import qkprobe.models
from qkprobe.cli.main import main
from qkprobe.errors import UnknownModelSpec
from qkprobe.models import load_model
from qkprobe.sinks.bases_file import read_bases, read_zoo, zoo_open
from qkprobe.zoo import expand_specs, group_of, model_info, model_key


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local Hugging Face ViT directory (config + weights, no preprocessor config)."""
    import transformers
    d = str(tmp_path_factory.mktemp("zoo_hf_vit"))
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, intermediate_size=64)
    transformers.ViTModel(cfg).save_pretrained(d)
    return d


def _specs(hf_dir):
    return ["timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224", "timm:resnet18",  # no attention: fails
            "open_clip:ViT-S-32", "hf:" + hf_dir]


def test_zoo_interrupted_resumed_and_equal_to_compute_bases(tmp_path, hf_dir, monkeypatch, capsys):
    out, png = tmp_path / "zoo.h5", tmp_path / "fig2.png"
    specs = _specs(hf_dir)
    args = ["bases", *specs, "--random-init", "--seed", "2", "--out", str(out), "--no-progress"]

    real_compute, calls = qkprobe.bases.compute_bases, []

    def interrupted(model, **kw):
        calls.append(type(model).__name__)
        if len(calls) == 4:  # the fourth model that loads (open_clip): Ctrl-C in the middle of the zoo
            raise KeyboardInterrupt
        return real_compute(model, **kw)

    monkeypatch.setattr(qkprobe.bases, "compute_bases", interrupted)
    assert main(args) == 130  # interrupted
    zoo = read_zoo(str(out))
    assert [m["attrs"]["model_spec"] for m in zoo["models"].values()] == specs[:2]
    assert list(zoo["failed"]) == [model_key("timm:resnet18", True, 2)]
    assert "no attention" in zoo["failed"][model_key("timm:resnet18", True, 2)].lower()

    # resume: the two models done are not loaded again, the failed one is retried, the rest are done
    monkeypatch.setattr(qkprobe.bases, "compute_bases", real_compute)
    real_load, loaded = qkprobe.models.load_model, []

    def counting_load(spec, **kw):
        loaded.append(spec)
        return real_load(spec, **kw)

    monkeypatch.setattr(qkprobe.models, "load_model", counting_load)
    capsys.readouterr()
    assert main(args + ["--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert loaded == specs[2:]
    assert "5 models" not in printed and "4 models (2 done now, 2 already in the file), 1 failed" in printed
    assert "failed: timm:resnet18 (random init, seed 2): Found no attention module in ResNet" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    zoo = read_zoo(str(out), arrays=None)
    ok = [s for s in specs if s != "timm:resnet18"]
    assert [m["attrs"]["model_spec"] for m in zoo["models"].values()] == ok  # file order = order done
    assert list(zoo["failed"]) == [model_key("timm:resnet18", True, 2)]
    for spec in ok:
        entry = zoo["models"][model_key(spec, True, 2)]
        model, _ = load_model(spec, pretrained=False, seed=2)
        ref = qkprobe.compute_bases(model)
        assert entry["attrs"]["weights_hash"] == qkprobe.models.weights_hash(model)
        assert len(entry["layers"]) == len(ref) == entry["attrs"]["num_layers"]
        stored = json.loads(entry["attrs"]["weighted_cosine"])
        for got, lb, wc in zip(entry["layers"], ref, stored):
            assert got["name"] == lb.name
            np.testing.assert_allclose(got["S"], lb.S.numpy(), rtol=1e-12)
            np.testing.assert_allclose(got["cosine"], lb.cosine.numpy(), atol=1e-12)
            np.testing.assert_allclose(got["sym_eigvals"], lb.sym_eigvals.numpy(), rtol=1e-12, atol=1e-300)
            assert wc == pytest.approx(float(lb.weighted_cosine().mean()), rel=1e-12, abs=1e-15)
        assert entry["attrs"]["group"].endswith("(random init)")

    # Figure 2 from the file: one curve per model, x = relative depth, y = the stored S-weighted cosine
    fig = qkprobe.plot.layer_curves(str(out))
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == len(ok)
    for ln, spec in zip(lines, ok):
        stored = json.loads(zoo["models"][model_key(spec, True, 2)]["attrs"]["weighted_cosine"])
        np.testing.assert_allclose(ln.get_ydata(), stored, rtol=1e-12)
        assert ln.get_xdata()[0] == 0.0 and ln.get_xdata()[-1] == 1.0
    colours = {ln.get_label().split(" — ")[1]: ln.get_color() for ln in lines}
    assert len(set(colours.values())) == len(colours) == 4  # timm vit, timm deit, open_clip ViT, hf vit


def test_killed_writer_leaves_no_half_model(tmp_path):
    path = str(tmp_path / "zoo.h5")
    zoo_open(path, {"fold_ln": False}, {})
    with h5py.File(path, "a") as f:  # what a writer killed inside zoo_write_model leaves
        f["models"].create_group("timm:x.partial").create_dataset("layers/00/S", data=np.ones((1, 2)))
        f["models"].create_group("timm:y")  # never marked complete
    assert read_zoo(path)["models"] == {}
    assert zoo_open(path, {"fold_ln": False}, {}) == set()
    with h5py.File(path, "r") as f:
        assert list(f["models"]) == []
    with pytest.raises(qkprobe.errors.RunFileError, match="options"):
        zoo_open(path, {"fold_ln": True}, {})


def test_single_spec_keeps_the_single_model_file(tmp_path):
    out = tmp_path / "one.h5"
    assert main(["bases", "timm:vit_tiny_patch16_224", "--random-init", "--out", str(out)]) == 0
    assert len(read_bases(str(out))) == 12
    fig = qkprobe.plot.layer_curves(str(out))  # a single-model file gives one curve
    assert len([ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]) == 1


def test_wildcards_over_the_registries():
    import open_clip
    import timm
    assert expand_specs(["timm:vit_tiny*"], pretrained=False) == [f"timm:{n}" for n in timm.list_models("vit_tiny*")]
    assert expand_specs(["timm:deit_tiny*"]) == [f"timm:{n}" for n in timm.list_pretrained("deit_tiny*")]
    got = expand_specs(["open_clip:ViT-B-32/*", "open_clip:ViT-B-32/openai"])  # no repeats
    assert got == [f"open_clip:ViT-B-32/{t}" for t in open_clip.list_pretrained_tags_by_model("ViT-B-32")]
    assert "open_clip:ViT-S-32" in expand_specs(["open_clip:*"], pretrained=False)
    assert sorted(expand_specs(["torchvision:swin_v2_*"])) == ["torchvision:swin_v2_b", "torchvision:swin_v2_s",
                                                                "torchvision:swin_v2_t"]
    with pytest.raises(UnknownModelSpec, match="matches no model"):
        expand_specs(["timm:no_such_model_*"])
    with pytest.raises(UnknownModelSpec, match="Hugging Face"):
        expand_specs(["hf:google/vit-*"])


def test_family_and_objective_from_library_metadata():
    info = model_info("timm:vit_base_patch16_224.dino")
    assert info["objective"] == "self-supervised (DINO)" and info["family"] == "timm vit"
    assert model_info("timm:vit_base_patch16_clip_224.laion2b_ft_in12k_in1k")["objective"] == "language-image (CLIP)"
    assert model_info("timm:deit_small_patch16_224.fb_in1k")["objective"] == "supervised (ImageNet)"
    assert model_info("open_clip:ViT-B-32/openai")["objective"] == "language-image (CLIP)"
    assert model_info("open_clip:ViT-B-16-SigLIP/webli")["objective"] == "language-image (SigLIP)"
    assert model_info("timm:vit_base_patch16_224")["objective"] is None  # no tag, no model: unknown
    random = model_info("timm:vit_base_patch16_224.dino")
    assert group_of(random, random_init=True) == "timm vit (random init)"
    assert group_of({"family": "hf vit", "objective": None}, random_init=False) == "hf vit"
    assert model_key("hf:/a/b", False, 0) != model_key("hf:_a_b", False, 0)
    assert "/" not in model_key("hf:/a/b", False, 0)
