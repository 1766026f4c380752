"""Safe on any GPU (issue 17), checked on the CPU with fakes: Triton launches run under the
tensors' own CUDA device; ``backend="auto"`` takes the torch path, with one warning per probe,
where its fast backend cannot run or fails, while a forced backend raises a BackendError.
(The sink's host waits and pinned rows: tests/test_stages.py.)"""

import dataclasses
import types
import warnings

import numpy as np
import pytest
import timm
import torch

import qkprobe
from qkprobe.adapters.discover import find_attention
from qkprobe.bases import layer_bases
from qkprobe.capture.events import capture_events
from qkprobe.core import native
from qkprobe.errors import BackendError, ShapeError
from qkprobe.reduce import backend, triton_stats
from qkprobe.reduce.reducer import (Fallback, FallbackReducer, LayerMaps, ReduceOptions, TorchReducer,
                                    TritonReducer, make_reducer, reducer_for)
from peaked import peak_timm

SHARED_MEMORY = "out of resource: shared memory, Required: 262144, Hardware limit: 232448"


def small_vit(img_size=32, depth=2, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, img_size=img_size).eval()
    peak_timm(model, seed=seed)
    return model


def one_event(model, x):
    """The first attention layer's event of one forward, and its maps."""
    site = find_attention(model)[0]
    events = []
    with capture_events([site], events.append), torch.no_grad():
        model(x)
    return events[0], LayerMaps(layer_bases(site, model, n_prefix=1, spectra=False))


def ours(caught):
    return [str(w.message) for w in caught if "backend 'auto'" in str(w.message)]


@pytest.fixture
def kernel(monkeypatch):
    """The Triton entry point replaced: records its calls, raises ``kernel.error`` where set."""
    calls = []

    def fake(q, k, *args, **kwargs):
        calls.append(q.device)
        if fake.error is not None:
            raise fake.error
        return "kernel statistics"

    fake.error, fake.calls = None, calls
    monkeypatch.setattr(triton_stats, "mode_statistics_qk", fake)
    return fake


@pytest.fixture
def auto_takes_triton(monkeypatch):
    """``auto`` chooses the Triton kernels (as for CUDA tensors where triton imports), on the CPU."""
    monkeypatch.setattr(backend, "_auto", lambda device: backend.Choice("triton"))
    monkeypatch.setattr(backend, "_triton_supports", lambda device: True)


def test_triton_launches_run_under_the_cuda_device_of_the_tensors(monkeypatch):
    entered = []

    class Device:  # torch.cuda.device, recording the current device instead of setting it
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    seen, stats = [], object()
    monkeypatch.setattr(triton_stats, "mode_statistics_qk",
                        lambda q, *a, **kw: seen.append(entered[-1] if entered else None) or stats)
    bases = types.SimpleNamespace(scale=0.125, prefix_tokens=1)
    maps = types.SimpleNamespace(bases=bases, float_maps=lambda device: (None,) * 4)
    reducer = TritonReducer(ReduceOptions(topk=3))
    for device in (torch.device("cuda", 1), torch.device("cpu")):  # a model on cuda:1; CPU (interpreter)
        q = types.SimpleNamespace(device=device, dtype=torch.float16, shape=(2, 3, 5, 8))
        assert reducer(types.SimpleNamespace(q=q, k=q, attention=None, token_mask=None), maps) is stats
    assert seen == [1, None] and entered == []


def test_auto_falls_back_to_torch_once_per_probe_when_the_kernel_fails_at_launch(tmp_path, auto_takes_triton,
                                                                                   kernel):
    kernel.error = RuntimeError(SHARED_MEMORY)
    model = small_vit()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(3)]
    paths = {b: str(tmp_path / f"{b}.h5") for b in ("auto", "torch")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, path in paths.items():
            with qkprobe.attach(model, path, backend=name, stats="all", top_samples=3) as probe, torch.no_grad():
                for x in xs:
                    model(x)
            if name == "auto":
                assert {r.name for r in probe._reducers.values()} == {"torch"}
    said = ours(caught)
    assert len(said) == 1, said  # one probe, two layers, three batches: one warning
    assert "'triton' failed" in said[0] and "shared memory" in said[0] and "RuntimeError" in said[0]
    assert len(kernel.calls) == 1  # later calls take the torch path directly
    with qkprobe.open_run(paths["auto"]) as fast, qkprobe.open_run(paths["torch"]) as ref:
        assert len(fast) == len(ref) == 6
        for i in range(2):
            np.testing.assert_array_equal(fast.stats(i), ref.stats(i))
            np.testing.assert_array_equal(fast.snapshot(i, "topk_index"), ref.snapshot(i, "topk_index"))


def _float64():
    model = small_vit().double()
    return model, ReduceOptions(topk=3), torch.randn(2, 3, 32, 32, dtype=torch.float64), "float64"


def _long_topk():
    model = small_vit(img_size=144, depth=1)  # 82 tokens: a top-k mean of 65 of them
    return model, ReduceOptions(topk=65), torch.randn(1, 3, 144, 144), "topk=65"


@pytest.mark.parametrize("case", [_float64, _long_topk], ids=["float64", "topk>64"])
def test_what_the_kernels_do_not_take_goes_to_torch_under_auto_and_raises_when_forced(monkeypatch, kernel,
                                                                                     case):
    monkeypatch.setattr(backend, "_triton_supports", lambda device: True)
    model, options, x, words = case()
    event, maps = one_event(model, x)
    reference = TorchReducer(options, native=False)(event, maps)
    fallback = Fallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reducer = reducer_for("auto", "cuda", options, fallback)  # triton, as for a model on the GPU
        assert isinstance(reducer, FallbackReducer) and reducer.name == "triton"
        for _ in range(2):
            torch.testing.assert_close(reducer(event, maps), reference, rtol=0, atol=0, equal_nan=True)
    said = ours(caught)
    assert len(said) == 1 and words in said[0] and reducer.name == "torch"
    assert kernel.calls == []  # checked before any launch
    with pytest.raises(BackendError, match=words):
        make_reducer("triton", options)(event, maps)


def test_a_forced_triton_backend_that_fails_raises_a_backend_error_naming_the_layer(monkeypatch, kernel):
    monkeypatch.setattr(backend, "_triton_supports", lambda device: True)
    kernel.error = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    model = small_vit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with qkprobe.attach(model, backend="triton"):
            with pytest.raises(BackendError) as info, torch.no_grad():
                model(torch.randn(2, 3, 32, 32))
    text = str(info.value)
    assert "blocks.0.attn" in text and "RuntimeError: Failed to find C compiler" in text and "'torch'" in text
    assert ours(caught) == []


def test_a_users_error_under_auto_is_raised_as_the_torch_path_raises_it(auto_takes_triton, kernel):
    kernel.error = ShapeError("reduce/triton: prefix_tokens leaves no map tokens")
    model = small_vit()
    bases = [dataclasses.replace(b, prefix_tokens=99) for b in qkprobe.compute_bases(model)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with qkprobe.attach(model, bases=bases):
            with pytest.raises(ShapeError, match="prefix_tokens=99") as info, torch.no_grad():
                model(torch.randn(2, 3, 32, 32))
    assert "blocks.0.attn" in str(info.value) and ours(caught) == []  # no fallback for the user's own error


def test_auto_without_triton_or_the_c_kernels_warns_once_and_takes_torch(monkeypatch):
    options = ReduceOptions()
    monkeypatch.setattr(backend, "_triton_supports", lambda device: False)
    monkeypatch.setattr(native, "enabled", lambda: True)
    monkeypatch.setattr(native, "library", lambda: None)
    fallback = Fallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for device in ("cuda", "cuda:1", "cpu"):  # one probe, three devices: one warning
            assert reducer_for("auto", device, options, fallback).name == "torch"
    said = ours(caught)
    assert len(said) == 1 and "triton does not import" in said[0]

    def broken():
        raise OSError("cc1: error: bad value 'native' for -march= switch")

    monkeypatch.setattr(native, "library", broken)
    with pytest.warns(RuntimeWarning, match="C kernels failed to load.*march"):
        assert reducer_for("auto", "cpu", options).name == "torch"
    with pytest.raises(BackendError), warnings.catch_warnings():
        warnings.simplefilter("error")  # a forced backend raises, it does not warn
        reducer_for("triton", "cuda", options)
    monkeypatch.setattr(native, "library", lambda: None)
    with pytest.raises(BackendError, match="did not build"):
        reducer_for("native", "cpu", options)
    monkeypatch.setattr(native, "enabled", lambda: False)  # QKPROBE_NATIVE=0: the torch path as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reducer_for("auto", "cpu", options).name == "torch"


def test_auto_falls_back_when_the_c_kernels_fail_at_call(monkeypatch):
    if native.library() is None:
        pytest.skip("no C compiler: auto takes the torch path from the start (tested above)")
    event, maps = one_event(small_vit(), torch.randn(2, 3, 32, 32))
    options = ReduceOptions(topk=3)
    reference = TorchReducer(options, native=False)(event, maps)
    real = native.map_stats

    def map_stats(*args, **kwargs):
        if native.enabled():
            raise RuntimeError("qkprobe_map_stats rejected its arguments")
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "map_stats", map_stats)
    reducer = reducer_for("auto", "cpu", options)
    assert reducer.name == "native"
    with pytest.warns(RuntimeWarning, match="'native' failed.*rejected its arguments"):
        torch.testing.assert_close(reducer(event, maps), reference, equal_nan=True)
    assert reducer.name == "torch"


def test_the_reducer_and_the_kernels_share_one_rule_for_what_they_take():
    """65 tokens, 1 prefix token, topk=65: the kernels keep 64-token lists, so they take it; with the
    prefix in the maps they do not. The reducer's check before launch is the launcher's own rule."""
    from qkprobe.reduce import triton_stats
    q = torch.empty(2, 3, 65, 16, device="meta")
    maps = torch.empty(3, 16, 8, device="meta")
    assert triton_stats.unsupported(q, q, 65, prefix_tokens=1) is None
    triton_stats.plan(q, q, maps, maps, torch.empty(3, 8, device="meta"), 0.25, prefix_tokens=1, topk=65,
                      attention=False, capability=90)
    assert "topk=65" in triton_stats.unsupported(q, q, 65, prefix_tokens=0)
    with pytest.raises(ShapeError, match="topk=65"):
        triton_stats.plan(q, q, maps, maps, torch.empty(3, 8, device="meta"), 0.25, prefix_tokens=1, topk=65,
                          include_prefix=True, attention=False, capability=90)
    assert "float64" in triton_stats.unsupported(q.double(), q, 5)
