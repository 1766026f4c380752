"""The probe during training: identical losses and gradients, autocast, checkpointing, refresh."""


import numpy as np
import pytest
import timm
import torch

import qkprobe


def make():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=5)


def train(model, steps=3, probe_kwargs=None, autocast=False, tmp=None):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(steps)]
    probe = qkprobe.attach(model, tmp, **probe_kwargs) if probe_kwargs is not None else None
    losses, grads, bases = [], [], []
    model.train()
    for step, (x, y) in enumerate(data):
        if probe is not None:
            probe.step(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        bases.append(qkprobe.compute_bases(model))  # the weights the forward of this step used
        opt.step()
    if probe is not None:
        probe.close()
    return losses, grads, bases, probe


@pytest.mark.parametrize("autocast", [False, True])
def test_losses_and_gradients_bit_identical(tmp_path, autocast):
    ref_losses, ref_grads, _, _ = train(make(), autocast=autocast)
    losses, grads, _, probe = train(make(), probe_kwargs=dict(every=1, refresh_every=1), autocast=autocast,
                                    tmp=str(tmp_path / "t.h5"))
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    for g, r in zip(grads, ref_grads):
        assert all(torch.equal(a, b) for a, b in zip(g, r))
    run = qkprobe.open_run(str(tmp_path / "t.h5"))
    assert len(run) == 12 and list(run.steps) == [0] * 4 + [1] * 4 + [2] * 4
    assert np.isfinite(run.stats(0)).all()
    run.close()


def test_refreshed_bases_equal_compute_bases_of_that_step():
    _, _, bases, probe = train(make(), probe_kwargs=dict(refresh_every=1))
    points = [p for p in probe.series if p["step"] >= 0]
    assert [p["step"] for p in points] == [0, 1, 2]
    for point, ref in zip(points, bases):
        for layer, lb in zip(point["layers"], ref):
            np.testing.assert_allclose(layer["S"], lb.S.numpy(), rtol=1e-6)
            np.testing.assert_allclose(layer["cosine"], lb.cosine.numpy(), atol=1e-6)
    # weights moved (lr 0.5): drift grows from 0 at the start
    assert np.allclose(points[0]["layers"][0]["drift_q"], 0, atol=1e-5)
    assert points[-1]["layers"][0]["drift_q"].max() > 1e-3


def test_gradient_checkpointing_logs_each_step_once(tmp_path):
    model = make()
    model.set_grad_checkpointing(True)
    calls = []
    model.blocks[0].attn.q_norm.register_forward_pre_hook(lambda m, a: calls.append(1))
    _, _, _, probe = train(model, probe_kwargs=dict(), tmp=str(tmp_path / "c.h5"))
    assert len(calls) == 6  # forward + recomputation in backward: the checkpoint is active
    run = qkprobe.open_run(str(tmp_path / "c.h5"))
    assert len(run) == 12 and list(run.steps) == [0] * 4 + [1] * 4 + [2] * 4
    run.close()


def test_every_n_steps(tmp_path):
    _, _, _, probe = train(make(), steps=5, probe_kwargs=dict(every=2), tmp=str(tmp_path / "e.h5"))
    run = qkprobe.open_run(str(tmp_path / "e.h5"))
    assert sorted(set(run.steps.tolist())) == [0, 2, 4]
    run.close()


def test_refresh_with_nan_weights_is_flagged_not_fatal():
    model = make()
    probe = qkprobe.attach(model, refresh_every=1)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
        model(torch.randn(1, 3, 32, 32))
    probe.close()
    last = probe.series[-1]["layers"]
    assert last[1]["nonfinite_weights"] and not last[0]["nonfinite_weights"]
    assert np.isfinite(last[1]["S"]).all()  # previous bases kept


def test_series_is_stored_in_the_run_file(tmp_path):
    path = str(tmp_path / "s.h5")
    _, _, bases, probe = train(make(), probe_kwargs=dict(refresh_every=1), tmp=path)
    run = qkprobe.open_run(path)
    assert run.series_steps.tolist() == [-1, 0, 1, 2]
    assert set(run.series_names(0)) == {"S", "cosine", "drift_q", "drift_k", "nonfinite_weights"}
    for point, ref in zip(run.series(1, "S")[1:], bases):
        np.testing.assert_allclose(point, ref[1].S.numpy(), rtol=1e-6)
    np.testing.assert_allclose(run.series(0, "drift_q"), np.stack([p["layers"][0]["drift_q"] for p in probe.series]))
    run.close()
