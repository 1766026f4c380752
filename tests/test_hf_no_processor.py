"""A local Hugging Face vision folder without a preprocessor config: the transform comes from the
model config (image size, ImageNet statistics), said once; --image-size/--mean/--std override."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import qkprobe
from qkprobe.cli.main import main
from qkprobe.data import skimage_images
from qkprobe.errors import TransformError
from qkprobe.models import IMAGENET_MEAN, IMAGENET_STD, load_model, override_transform


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """What a user converting weights gets: save_pretrained of the model alone (config + weights)."""
    import transformers
    d = str(tmp_path_factory.mktemp("hf_vit_noproc"))
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(5)
    transformers.ViTModel(cfg).save_pretrained(d)
    assert not os.path.exists(os.path.join(d, "preprocessor_config.json"))
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = skimage_images(str(d / "all"))[:3]
    sub = d / "three"
    sub.mkdir()
    for p in paths:
        os.link(p, sub / os.path.basename(p))
    return sub


def test_transform_from_the_model_config_said_once(hf_dir, photos):
    with pytest.warns(UserWarning, match="no preprocessor config") as record:
        model, transform = load_model("hf:" + hf_dir)
    assert sum("preprocessor config" in str(w.message) for w in record) == 1
    img = Image.open(sorted(photos.iterdir())[0]).convert("RGB")
    x = transform(img)
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img.resize((32, 32), Image.BICUBIC)))
    assert x.shape == (3, 32, 32)
    assert (x - ref).abs().max() < 0.05  # PIL vs torchvision bicubic differ by a few grey levels
    with torch.no_grad():
        assert model(pixel_values=x[None]).last_hidden_state.shape == (1, 17, 32)


def test_override_transform_keeps_the_crop_ratio_and_replaces_statistics():
    t = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    o = override_transform(t, image_size=112, mean=[0.5] * 3)
    assert [type(s).__name__ for s in o.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert o.transforms[0].size == 128 and list(o.transforms[1].size) == [112, 112]
    assert list(o.transforms[3].mean) == [0.5] * 3 and list(o.transforms[3].std) == list(IMAGENET_STD)
    assert override_transform(t) is t
    made = override_transform(None, image_size=40, std=[0.25] * 3)
    assert made(Image.new("RGB", (90, 70))).shape == (3, 40, 40) and list(made.transforms[-1].std) == [0.25] * 3
    with pytest.raises(TransformError, match="--image-size"):
        override_transform(None, mean=[0.5] * 3)


def test_run_uses_the_config_transform_and_the_overrides(hf_dir, photos, tmp_path, capsys):
    out = tmp_path / "run.h5"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert main(["run", "hf:" + hf_dir, "--images", str(photos), "--out", str(out), "--no-progress",
                     "--mean", "0.5,0.5,0.5", "--std", "0.25"]) == 0
    model, transform = load_model("hf:" + hf_dir)
    transform = override_transform(transform, mean=[0.5] * 3, std=[0.25] * 3)
    with qkprobe.open_run(str(out)) as run:
        assert run.metadata["transform_overrides"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
        q_mean = run.stats(0, "q_mean")  # (rows, H, R)
        root = run.metadata["image_root"]  # ids are relative to the image root
        for row, sample in enumerate(run.ids):
            x = transform(Image.open(os.path.join(root, sample)).convert("RGB"))[None]
            c = qkprobe.mode_coordinates(model, pixel_values=x)[0]
            n = c.prefix_tokens
            np.testing.assert_allclose(q_mean[row], c.a[0, :, n:].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    with warnings.catch_warnings(record=True):  # resuming with other overrides would mix two preprocessings
        warnings.simplefilter("always")
        assert main(["run", "hf:" + hf_dir, "--images", str(photos), "--out", str(out), "--no-progress",
                     "--resume", "--mean", "0.5,0.5,0.5"]) == 2
    err = capsys.readouterr().err
    ours = [ln for ln in err.splitlines() if ln.startswith("qkprobe")]  # besides transformers' loading bar
    assert len(ours) == 1 and "preprocessing overrides" in ours[0]
    with qkprobe.open_run(str(out)) as run:
        assert len(run) == len(q_mean)


def test_bad_override_is_an_argument_error(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "hf:" + hf_dir, "--out", str(tmp_path / "r.h5"), "--mean", "0.5,0.5"])
    assert e.value.code == 2 and "three comma-separated numbers" in capsys.readouterr().err
