"""qkprobe.models: every spec family offline, seeds, weight files, offline errors, bad specs."""

import os
import time

import pytest
import torch
from PIL import Image

from qkprobe.errors import UnknownModelSpec, WeightsError
from qkprobe.models import (describe, load_model, minilm_path, parse_spec, processor_transform,
                            weights_hash)
from qkprobe import models as M

TIMM = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from qkprobe.data import skimage_images
    path = skimage_images(str(tmp_path_factory.mktemp("photos")))[0]  # astronaut, 512x512
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def timm_model():
    return load_model(TIMM, pretrained=False, seed=1)


def _one_sentence(msg):
    assert "\n" not in msg and msg.endswith(".")
    return msg


# --------------------------------------------------------------------------- spec families

def test_timm_random_forward(photo, timm_model):
    model, transform = timm_model
    assert not model.training
    x = transform(photo).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


def test_open_clip_returns_vision_tower(photo):
    import open_clip
    model, transform = load_model("open_clip:ViT-S-32", pretrained=False)
    assert not model.training and not hasattr(model, "encode_text")
    x = transform(photo).unsqueeze(0)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, open_clip.get_model_config("ViT-S-32")["embed_dim"])


def test_torchvision_random_forward_uses_weights_transform(photo):
    model, transform = load_model("torchvision:vit_b_16", pretrained=False)
    assert not model.training
    x = transform(photo).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
    # IMAGENET1K_V1's preset normalises with the ImageNet mean: a mid-grey image is not zero.
    assert abs(float(transform(Image.new("RGB", (300, 300), (124, 116, 104))).mean())) < 0.05
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


def test_hf_minilm_pretrained_embeds_like_a_sentence_model():
    from safetensors import safe_open
    model, tokenizer = load_model("hf:" + minilm_path())
    assert not model.training and tokenizer is not None
    with safe_open(os.path.join(minilm_path(), "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("encoder.layer.0.attention.self.query.weight"))
        ref = f.get_tensor(key)
    assert torch.equal(model.state_dict()["encoder.layer.0.attention.self.query.weight"], ref)

    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The stock market fell sharply on Monday."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.6 and unrelated < 0.3 and similar > unrelated + 0.3


@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    """A local Hugging Face ViT directory with an image processor (what save_pretrained writes)."""
    import transformers
    d = str(tmp_path_factory.mktemp("hf_vit"))
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(5)
    model = transformers.ViTModel(cfg)
    model.save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(d)
    return d, weights_hash(model)


def test_hf_local_vision_directory(photo, tiny_hf_vit):
    d, saved_hash = tiny_hf_vit
    model, transform = load_model("hf:" + d)
    assert weights_hash(model) == saved_hash
    x = transform(photo).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    with torch.no_grad():
        assert model(pixel_values=x).last_hidden_state.shape == (1, 17, 32)
    random_model, _ = load_model("hf:" + d, pretrained=False)
    assert weights_hash(random_model) != saved_hash


def test_processor_transform_shortest_edge_then_crop():
    import transformers
    t = processor_transform(transformers.CLIPImageProcessor())
    assert t(Image.new("RGB", (400, 300))).shape == (3, 224, 224)


# --------------------------------------------------------------------------- seeds and hashes

@pytest.mark.parametrize("spec", [TIMM, "open_clip:ViT-S-32", "torchvision:vit_b_16", "hf:MINILM"])
def test_seed_determinism(spec):
    spec = spec.replace("MINILM", minilm_path())
    a = weights_hash(load_model(spec, pretrained=False, seed=3)[0])
    b = weights_hash(load_model(spec, pretrained=False, seed=3)[0])
    c = weights_hash(load_model(spec, pretrained=False, seed=4)[0])
    assert a == b != c


def test_load_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(TIMM, pretrained=False, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_weights_hash_sees_values_dtype_and_names(timm_model):
    model = timm_model[0]
    h = weights_hash(model)
    assert len(h) == 16 and int(h, 16) >= 0
    twin = load_model(TIMM, pretrained=False, seed=1)[0]
    assert weights_hash(twin) == h
    with torch.no_grad():
        twin.head.bias[0] += 1e-3
    assert weights_hash(twin) != h
    assert weights_hash(load_model(TIMM, pretrained=False, seed=1)[0].double()) != h


# --------------------------------------------------------------------------- weights files

def test_weights_file_round_trips(tmp_path, timm_model):
    from safetensors.torch import save_file
    sd = timm_model[0].state_dict()
    want = weights_hash(timm_model[0])
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    plain, wrapped = tmp_path / "w.pt", tmp_path / "ckpt.pth"
    torch.save(sd, plain)
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    for path in (st, plain, wrapped):
        model, _ = load_model(TIMM, weights=str(path), seed=0)
        assert weights_hash(model) == want and not model.training


def test_open_clip_weights_full_or_tower(tmp_path):
    import open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        clip = open_clip.create_model("ViT-S-32")
    torch.save(clip.state_dict(), tmp_path / "full.pt")
    torch.save({"model": clip.visual.state_dict()}, tmp_path / "tower.pt")
    want = weights_hash(clip.visual)
    for name in ("full.pt", "tower.pt"):
        assert weights_hash(load_model("open_clip:ViT-S-32", weights=str(tmp_path / name))[0]) == want


def test_mismatched_weights_file(tmp_path, timm_model):
    sd = dict(timm_model[0].state_dict())
    sd.pop("head.weight")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as err:
        load_model(TIMM, weights=str(tmp_path / "bad.pt"))
    msg = _one_sentence(str(err.value))
    assert "1 missing keys" in msg and "head.weight" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg

    sd = dict(timm_model[0].state_dict())
    sd["head.bias"] = torch.zeros(10)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match="1 shape mismatches"):
        load_model(TIMM, weights=str(tmp_path / "shape.pt"))

    with pytest.raises(WeightsError, match="does not exist"):
        load_model(TIMM, weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        load_model(TIMM, weights=str(tmp_path / "junk.pt"))


# --------------------------------------------------------------------------- offline

@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No cached weights anywhere, so a pretrained load must try to download."""
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    yield
    torch.hub.set_dir(old)


@pytest.mark.parametrize("spec", [TIMM, "open_clip:ViT-B-32/openai",
                                  "torchvision:vit_b_16", "hf:sentence-transformers/all-MiniLM-L6-v2"])
def test_pretrained_offline_is_a_quick_weights_error(spec, monkeypatch, empty_caches):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        load_model(spec)
    assert time.monotonic() - start < 15
    msg = _one_sentence(str(err.value))
    assert "could not be fetched" in msg and "--weights PATH" in msg and "--random-init" in msg


def test_unreachable_host_is_not_retried(monkeypatch, empty_caches):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(WeightsError, match="--random-init"):
        load_model(TIMM)
    assert time.monotonic() - start < 15


def test_reachability_probe_is_bounded():
    # loopback only: tests never send traffic off this machine
    start = time.monotonic()
    assert M._reachable("127.0.0.1", port=9, timeout=1.0) is False
    assert time.monotonic() - start < 3


def test_hf_repo_id_random_init_needs_config(monkeypatch, empty_caches):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="config"):
        load_model("hf:sentence-transformers/all-MiniLM-L6-v2", pretrained=False)


# --------------------------------------------------------------------------- bad specs

@pytest.mark.parametrize("spec, needle", [
    ("timm:vit_tiny_patch16_22", "vit_tiny_patch16_224"),
    ("timm:vit_tiny_patch16_224.bogus", "augreg_in21k"),
    ("open_clip:ViT-B32", "ViT-B-32"),
    ("open_clip:ViT-B-32/nope", "openai"),
    ("torchvision:vit_b16", "vit_b_16"),
    ("torchvision:vit_b_16/IMAGENET", "IMAGENET1K_V1"),
    ("keras:resnet50", "timm:, open_clip:, hf: or torchvision:"),
    ("vit_b_16", "torchvision:vit_b_16"),
    ("hf:/no/such/dir", "does not exist"),
    ("timm:", "names no model"),
    ("", "empty"),
])
def test_unknown_specs(spec, needle):
    with pytest.raises(UnknownModelSpec) as err:
        load_model(spec, pretrained=False)
    assert needle in _one_sentence(str(err.value))


def test_hf_weights_file_with_legacy_buffer_and_config_only_dir(tmp_path):
    """The shipped MiniLM file still holds embeddings.position_ids, now a non-persistent buffer."""
    import shutil
    path = minilm_path()
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    want = weights_hash(load_model("hf:" + path)[0])
    model, transform = load_model("hf:" + str(tmp_path), weights=os.path.join(path, "model.safetensors"))
    assert weights_hash(model) == want and transform is None  # no tokenizer files in tmp_path
    with pytest.raises(WeightsError, match="holds no weights"):
        load_model("hf:" + str(tmp_path))


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(UnknownModelSpec, match="config.json"):
        load_model("hf:" + str(tmp_path), pretrained=False)


def test_parse_spec_and_describe():
    assert parse_spec("timm:vit_base_patch16_224.augreg_in21k") == (
        "timm", "vit_base_patch16_224", "augreg_in21k")
    assert parse_spec("open_clip:ViT-B-32/openai") == ("open_clip", "ViT-B-32", "openai")
    assert parse_spec("open_clip:hf-hub:org/repo") == ("open_clip", "hf-hub:org/repo", None)
    assert parse_spec("torchvision:vit_b_16/IMAGENET1K_V1").tag == "IMAGENET1K_V1"
    assert parse_spec("hf:google/vit-base-patch16-224@main") == ("hf", "google/vit-base-patch16-224", "main")
    assert parse_spec("hf:/abs/dir@x").name == "/abs/dir@x"
    assert describe("openclip:ViT-B-32") == {"library": "open_clip", "name": "ViT-B-32", "tag": None}
    assert str(parse_spec("timm:a.b")) == "timm:a.b"
