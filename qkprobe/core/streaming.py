"""Streaming state for one layer: the top-k samples of every mode, and dataset aggregates.

Both states take batches on the device, stay vectorized over heads and modes, and merge exactly
(two ranks, two halves of a dataset, a resumed run), so a run split any way gives the same result
as one pass over the data.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import ShapeError

Tensor = torch.Tensor


def _select_topk(scores: Tensor, index: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best candidates along the last axis: highest score first, ties to the lower index.

    scores (..., C) float32, index (..., C) int64, C ≥ k. The tie rule makes the result
    independent of the order in which batches and states arrive (``topk`` alone is not stable).
    Non-finite scores count as empty slots (-inf, index -1).
    """
    bad = ~torch.isfinite(scores)
    scores = scores.masked_fill(bad, float("-inf"))
    index = index.masked_fill(bad, -1)
    # Two stable sorts = lexicographic (score descending, index ascending); empty slots (-1)
    # only tie with other empty slots.
    order = torch.sort(index, dim=-1, stable=True).indices
    scores = torch.gather(scores, -1, order)
    index = torch.gather(index, -1, order)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(scores, -1, order), torch.gather(index, -1, order)


class TopKSamples:
    """Per layer: the k samples with the highest score for every (head, mode, sign).

    Sign 0 ranks samples by ``score_pos`` = max(a)·max(b), sign 1 by ``score_neg`` =
    min(a)·min(b). Slots not yet filled hold score -inf and index -1.

    Attributes:
        scores: (H, R, 2, K) float32, descending along the last axis.
        index: (H, R, 2, K) int64, the global sample index of each slot.

    Sample indices must be unique across all updates and merged states (a sample seen twice
    would take two slots).
    """

    def __init__(self, num_heads: int, num_modes: int, k: int = 16, device="cpu"):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        self.k = int(k)
        shape = (num_heads, num_modes, 2, self.k)
        self.scores = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
        self.index = torch.full(shape, -1, dtype=torch.int64, device=device)

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.scores.shape[:2])

    def update(self, score_pos: Tensor, score_neg: Tensor, sample_index: Tensor) -> None:
        """Fold in one batch. score_pos, score_neg: (B, H, R); sample_index: (B,) int64."""
        H, R = self.shape
        if score_pos.shape != score_neg.shape or tuple(score_pos.shape[1:]) != (H, R):
            raise ShapeError(f"score_pos and score_neg must be (B, {H}, {R}), got "
                             f"{tuple(score_pos.shape)} and {tuple(score_neg.shape)}.")
        B = score_pos.shape[0]
        sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=self.scores.device)
        if tuple(sample_index.shape) != (B,):
            raise ShapeError(f"sample_index must be ({B},), got {tuple(sample_index.shape)}.")
        dev = self.scores.device
        batch = torch.stack((score_pos, score_neg), dim=-1).to(dev, torch.float32)  # (B, H, R, 2)
        batch = batch.permute(1, 2, 3, 0)  # (H, R, 2, B)
        idx = sample_index.expand(H, R, 2, B)
        self.scores, self.index = _select_topk(torch.cat((self.scores, batch), dim=-1),
                                               torch.cat((self.index, idx), dim=-1), self.k)

    def merge(self, other: "TopKSamples") -> None:
        """Fold in another state of the same shape and k (e.g. from another rank), exactly."""
        if other.scores.shape != self.scores.shape:
            raise ShapeError(f"cannot merge top-k states of shape {tuple(other.scores.shape)} "
                             f"into {tuple(self.scores.shape)}.")
        dev = self.scores.device
        self.scores, self.index = _select_topk(
            torch.cat((self.scores, other.scores.to(dev)), dim=-1),
            torch.cat((self.index, other.index.to(dev)), dim=-1), self.k)

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"scores": self.scores.cpu().numpy().copy(), "index": self.index.cpu().numpy().copy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        scores = torch.as_tensor(np.asarray(state["scores"]), dtype=torch.float32)
        index = torch.as_tensor(np.asarray(state["index"]), dtype=torch.int64)
        if scores.shape != self.scores.shape or index.shape != self.index.shape:
            raise ShapeError(f"top-k state of shape {tuple(scores.shape)} / {tuple(index.shape)} "
                             f"does not fit {tuple(self.scores.shape)}.")
        dev = self.scores.device
        self.scores, self.index = scores.to(dev), index.to(dev)


def _chan(n_a: Tensor, mean_a: Tensor, m2_a: Tensor,
          n_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Chan et al. parallel merge of (count, mean, M2); counts are float64, 0 allowed.

        n = n_a + n_b,  δ = mean_b − mean_a,
        mean = mean_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n.
    """
    n = n_a + n_b
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = torch.where(n > 0, mean_a + delta * (n_b / safe), torch.zeros_like(mean_a))
    m2 = torch.where(n > 0, m2_a + m2_b + delta * delta * (n_a * n_b / safe), torch.zeros_like(m2_a))
    return n, mean, m2


class Aggregates:
    """Per layer: count, mean, M2, min, max of every statistic, per element of (H, R, S).

    Non-finite values are skipped element by element (``count`` is per element) and counted in
    ``nonfinite``. Elements with count 0 hold mean 0, M2 0, min +inf, max -inf.

    Attributes (all (H, R, S), float64 unless stated):
        count (int64), mean, m2 (Σ (x − mean)²), min, max, nonfinite (int64).
    """

    _FIELDS = ("count", "mean", "m2", "min", "max", "nonfinite")

    def __init__(self, shape, device="cpu"):
        shape = tuple(int(s) for s in shape)
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros(shape, dtype=torch.int64, device=device)
        self.mean = torch.zeros(shape, **f64)
        self.m2 = torch.zeros(shape, **f64)
        self.min = torch.full(shape, float("inf"), **f64)
        self.max = torch.full(shape, float("-inf"), **f64)
        self.nonfinite = torch.zeros(shape, dtype=torch.int64, device=device)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.count.shape)

    def _fold(self, count, mean, m2, lo, hi, nonfinite) -> None:
        _, self.mean, self.m2 = _chan(self.count.double(), self.mean, self.m2,
                                      count.double(), mean, m2)
        self.count = self.count + count
        self.min = torch.minimum(self.min, lo)
        self.max = torch.maximum(self.max, hi)
        self.nonfinite = self.nonfinite + nonfinite

    def update(self, x: Tensor) -> None:
        """Fold in a batch x (B, H, R, S): its own mean and M2 (two-pass), then a Chan merge."""
        if tuple(x.shape[1:]) != self.shape:
            raise ShapeError(f"statistics must be (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}.")
        x = x.detach().to(self.mean.device, torch.float64)
        ok = torch.isfinite(x)
        n = ok.sum(dim=0)  # (H, R, S) int64
        nf = n.double()
        safe = torch.where(n > 0, nf, torch.ones_like(nf))
        zero = torch.zeros_like(x)
        mean = torch.where(ok, x, zero).sum(dim=0) / safe
        m2 = torch.where(ok, x - mean, zero).square().sum(dim=0)
        lo = torch.where(ok, x, torch.full_like(x, float("inf"))).amin(dim=0)
        hi = torch.where(ok, x, torch.full_like(x, float("-inf"))).amax(dim=0)
        self._fold(n, mean, m2, lo, hi, (~ok).sum(dim=0))

    def merge(self, other: "Aggregates") -> None:
        """Fold in another state of the same shape (exact up to rounding, associative)."""
        if other.shape != self.shape:
            raise ShapeError(f"cannot merge aggregates of shape {other.shape} into {self.shape}.")
        dev = self.mean.device
        self._fold(*(getattr(other, f).to(dev) for f in self._FIELDS))

    @property
    def variance(self) -> Tensor:
        """Population variance M2 / count; NaN where count is 0."""
        n = self.count.double()
        return torch.where(n > 0, self.m2 / torch.where(n > 0, n, torch.ones_like(n)),
                           torch.full_like(n, float("nan")))

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {f: getattr(self, f).cpu().numpy().copy() for f in self._FIELDS}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        dev = self.mean.device
        loaded = {}
        for f in self._FIELDS:  # check everything before changing anything
            t = torch.as_tensor(np.asarray(state[f]), dtype=getattr(self, f).dtype)
            if tuple(t.shape) != self.shape:
                raise ShapeError(f"aggregate '{f}' of shape {tuple(t.shape)} does not fit {self.shape}.")
            loaded[f] = t.to(dev)
        for f, t in loaded.items():
            setattr(self, f, t)
