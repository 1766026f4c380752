"""Top-k updates with a range of sample numbers pick their route on the host (no device read)."""

import torch

from qkprobe.core import native, streaming
from qkprobe.core.streaming import Aggregates, TopKSamples


def test_range_of_sample_numbers_gives_the_same_state_without_reading_the_device(monkeypatch):
    routes = []
    real = streaming._select_topk

    def spy(scores, index, k, packed=None):
        routes.append(packed)
        return real(scores, index, k, packed=packed)

    monkeypatch.setattr(streaming, "_select_topk", spy)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 14, generator=g).round(decimals=1) for _ in range(5)]  # ties too
    with native.disabled():  # the torch route (GPUs)
        a, b = TopKSamples(3, 5, k=6), TopKSamples(3, 5, k=6)
        for n, x in enumerate(batches):
            a.update_columns(x, 10, 11, range(4 * n, 4 * n + 4))
            b.update_columns(x, 10, 11, torch.arange(4 * n, 4 * n + 4))
    assert routes[0::2] == [True] * 5 and routes[1::2] == [None] * 5
    assert torch.equal(a.scores, b.scores) and torch.equal(a.index, b.index)
    big = TopKSamples(3, 5, k=6)  # indices past 2³² − 2: the host does not know them small
    state = b.state_dict()
    state["index"] = state["index"] + (1 << 33)
    big.load_state_dict(state)
    with native.disabled():
        big.update_columns(batches[0], 10, 11, range(4))
    assert routes[-1] is None and (big.index >= (1 << 33)).any()


def test_aggregates_with_non_finite_values_on_the_masked_route_equal_the_plain_route():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 3, 4, generator=g, dtype=torch.float64).float()
    with native.disabled():
        plain, masked = Aggregates((2, 3, 4)), Aggregates((2, 3, 4))
        plain.update(x)
        y = x.clone()
        y[0, 0, 0, 0] = float("nan")
        masked.update(y)
    assert int(masked.nonfinite.sum()) == 1 and int(masked.count[0, 0, 0]) == 5
    torch.testing.assert_close(masked.mean[1:], plain.mean[1:], rtol=1e-12, atol=1e-12)
