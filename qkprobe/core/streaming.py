"""Streaming state for one layer: the top-k samples of every mode, and dataset aggregates.

Both states take batches on the device, stay vectorized over heads and modes, and merge exactly
(two ranks, two halves of a dataset, a resumed run), so a run split any way gives the same result
as one pass over the data.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import ShapeError, UsageError
from . import native

Tensor = torch.Tensor


_LOW = 1 << 32


def _select_topk(scores: Tensor, index: Tensor, k: int, packed: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """The k best candidates along the last axis: highest score first, ties to the lower index.

    scores (..., C) float32, index (..., C) int64, C ≥ k. The tie rule makes the result
    independent of the order in which batches and states arrive (``topk`` alone is not stable).
    Non-finite scores count as empty slots (-inf, index -1).

    Indices below 2³² − 1 (any real dataset) take one ``topk`` over a packed int64 key,

        key = ordered(score) · 2³² + (2³² − 2 − index),

    where ``ordered`` maps float32 to int32 preserving order (bits of negative floats flipped):
    a bijection, so keys of distinct samples are distinct and (score, index) decode exactly.
    Larger indices take two stable sorts.
    """
    bad = ~torch.isfinite(scores)
    scores = scores.masked_fill(bad, float("-inf"))
    index = index.masked_fill(bad, -1)
    if packed is None:  # on a GPU this reads the device: callers that know the indices say so (packed=)
        packed = index.numel() == 0 or int(index.max()) < _LOW - 2
    if packed:
        bits = (scores + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 ties with 0.0, as in the sorts
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
        key = torch.topk(ordered * _LOW + (_LOW - 2 - index), k, dim=-1, sorted=True).values
        high = torch.div(key, _LOW, rounding_mode="floor")
        index = (_LOW - 2) - (key - high * _LOW)
        high = high.to(torch.int32)
        scores = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
        return scores, index
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

    ``TopKSamples(H, R, k=16)``; more leading axes are allowed, e.g. ``TopKSamples(L, H, R)``
    for L layers of the same shape updated together (:meth:`select` gives one layer's state).

    Attributes:
        scores: (H, R, 2, K) float32, descending along the last axis.
        index: (H, R, 2, K) int64, the global sample index of each slot.

    Sample indices must be unique across all updates and merged states (a sample seen twice
    would take two slots).
    """

    FIELDS = ("scores", "index")  #: the arrays of state_dict()

    def __init__(self, *shape: int, k: int = 16, device="cpu"):
        if k < 1:
            raise UsageError(f"TopKSamples keeps k samples per mode and sign; k must be at least 1, got {k}.")
        if not shape:
            raise ShapeError("TopKSamples needs a shape, e.g. TopKSamples(num_heads, num_modes, k=16).")
        self.k = int(k)
        full = (*(int(n) for n in shape), 2, self.k)
        self.scores = torch.full(full, float("-inf"), dtype=torch.float32, device=device)
        self.index = torch.full(full, -1, dtype=torch.int64, device=device)
        self._small = True  # every index < 2³² − 2 (known on the host; see update_columns)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.scores.shape[:-2])

    def select(self, i: int) -> "TopKSamples":
        """A copy of the state of entry ``i`` of the first axis."""
        out = TopKSamples.__new__(TopKSamples)
        out.k, out.scores, out.index = self.k, self.scores[i].clone(), self.index[i].clone()
        return out

    def update(self, score_pos: Tensor, score_neg: Tensor, sample_index: Tensor) -> None:
        """Fold in one batch. score_pos, score_neg: (B, H, R); sample_index: (B,) int64."""
        if score_pos.shape != score_neg.shape:
            raise ShapeError(f"score_pos and score_neg must have the same shape, got {tuple(score_pos.shape)} "
                             f"and {tuple(score_neg.shape)}.")
        self.update_columns(torch.stack((score_pos, score_neg), dim=-1), 0, 1, sample_index)

    def update_columns(self, stats: Tensor, pos: int, neg: int, sample_index: Tensor) -> None:
        """Fold in one batch of statistics (B, H, R, S) whose columns ``pos`` and ``neg`` are the
        two scores (any strides: a probe passes its statistics buffer as it is)."""
        shape = self.shape
        if tuple(stats.shape[1:-1]) != shape:
            raise ShapeError(f"scores must be (B, {', '.join(map(str, shape))}), got {tuple(stats.shape[:-1])}.")
        B = stats.shape[0]
        # a range of sample numbers (a probe's batch) is known on the host: no device read to pick
        # the selection route (the state's indices are known small while getattr(self, "_small"))
        packed = None
        if isinstance(sample_index, range):
            packed = bool(getattr(self, "_small", False)) and (len(sample_index) == 0 or sample_index[-1] < _LOW - 2)
            sample_index = torch.arange(sample_index.start, sample_index.stop, dtype=torch.int64,
                                        device=self.scores.device)
        sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=self.scores.device)
        if tuple(sample_index.shape) != (B,):
            raise ShapeError(f"sample_index must be ({B},), got {tuple(sample_index.shape)}.")
        if native.topk_update(stats, pos, neg, sample_index, self.scores, self.index):
            return  # in place, on the CPU
        dev = self.scores.device
        # two slices, not stats[..., [pos, neg]]: a list index is copied to the device, and that waits on it
        batch = torch.stack((stats[..., pos], stats[..., neg]), dim=-1).to(dev, torch.float32)  # (B, H, R, 2)
        batch = batch.movedim(0, -1)  # (H, R, 2, B)
        idx = sample_index.expand(*shape, 2, B)
        self.scores, self.index = _select_topk(torch.cat((self.scores, batch), dim=-1),
                                               torch.cat((self.index, idx), dim=-1), self.k, packed=packed or None)
        self._small = packed

    def merge(self, other: "TopKSamples") -> None:
        """Fold in another state of the same shape and k (e.g. from another rank), exactly."""
        if other.scores.shape != self.scores.shape:
            raise ShapeError(f"cannot merge top-k states of shape {tuple(other.scores.shape)} "
                             f"into {tuple(self.scores.shape)}.")
        dev = self.scores.device
        self.scores, self.index = _select_topk(
            torch.cat((self.scores, other.scores.to(dev)), dim=-1),
            torch.cat((self.index, other.index.to(dev)), dim=-1), self.k)
        self._small = False  # not known on the host any more

    def state_dict(self, copy: bool = True) -> Dict[str, np.ndarray]:
        """scores and index as numpy arrays; ``copy=False`` may return views of the live state
        (on the CPU), for a caller that copies them at once."""
        out = {"scores": self.scores.cpu().numpy(), "index": self.index.cpu().numpy()}
        return {k: v.copy() for k, v in out.items()} if copy else out

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        scores = torch.as_tensor(np.asarray(state["scores"]), dtype=torch.float32)
        index = torch.as_tensor(np.asarray(state["index"]), dtype=torch.int64)
        if scores.shape != self.scores.shape or index.shape != self.index.shape:
            raise ShapeError(f"top-k state of shape {tuple(scores.shape)} / {tuple(index.shape)} "
                             f"does not fit {tuple(self.scores.shape)}.")
        dev = self.scores.device
        self._small = index.numel() == 0 or int(index.max()) < _LOW - 2  # on the host
        self.scores, self.index = scores.to(dev).clone(), index.to(dev).clone()  # updated in place later


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

    FIELDS = ("count", "mean", "m2", "min", "max", "nonfinite")  #: the arrays of state_dict()

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

    def select(self, i: int) -> "Aggregates":
        """A copy of the aggregates of entry ``i`` of the first axis."""
        out = Aggregates.__new__(Aggregates)
        for f in self.FIELDS:
            setattr(out, f, getattr(self, f)[i].clone())
        return out

    def _fold(self, count, mean, m2, lo, hi, nonfinite) -> None:
        _, self.mean, self.m2 = _chan(self.count.double(), self.mean, self.m2,
                                      count.double(), mean, m2)
        self.count = self.count + count
        self.min = torch.minimum(self.min, lo)
        self.max = torch.maximum(self.max, hi)
        self.nonfinite = self.nonfinite + nonfinite

    def update(self, x: Tensor, columns: Optional[Tensor] = None) -> None:
        """Fold in a batch x (B, H, R, S): its own mean and M2 (two-pass), then a Chan merge.

        ``columns``: take these entries of x's last axis (x then has any number of them); a
        probe passes its whole statistics buffer and the indices of the stored statistics."""
        shape = self.shape if columns is None else self.shape[:-1]
        if tuple(x.shape[1:len(shape) + 1]) != shape or x.dim() != len(self.shape) + 1 \
                or (columns is not None and len(columns) != self.shape[-1]):
            raise ShapeError(f"statistics must be (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            return
        if native.aggregate_update(x.detach(), columns, self.count, self.mean, self.m2, self.min, self.max,
                                   self.nonfinite):
            return  # in place, on the CPU
        if columns is not None:
            x = x.index_select(-1, columns.to(x.device))
        x = x.detach().to(self.mean.device, torch.float64)
        ok = torch.isfinite(x)
        if x.device.type == "cpu" and bool(ok.all()):  # the common case, without masks (GPU: no device read)
            n = torch.full(self.shape, x.shape[0], dtype=torch.int64, device=x.device)
            mean = x.mean(dim=0)
            m2 = (x - mean).square().sum(dim=0)
            self._fold(n, mean, m2, x.amin(dim=0), x.amax(dim=0), torch.zeros_like(n))
            return
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
        self._fold(*(getattr(other, f).to(dev) for f in self.FIELDS))

    @property
    def variance(self) -> Tensor:
        """Population variance M2 / count; NaN where count is 0."""
        n = self.count.double()
        return torch.where(n > 0, self.m2 / torch.where(n > 0, n, torch.ones_like(n)),
                           torch.full_like(n, float("nan")))

    def state_dict(self, copy: bool = True) -> Dict[str, np.ndarray]:
        """Every field as a numpy array; ``copy=False`` may return views of the live state (on
        the CPU), for a caller that copies them at once."""
        out = {f: getattr(self, f).cpu().numpy() for f in self.FIELDS}
        return {k: v.copy() for k, v in out.items()} if copy else out

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        dev = self.mean.device
        loaded = {}
        for f in self.FIELDS:  # check everything before changing anything
            t = torch.as_tensor(np.asarray(state[f]), dtype=getattr(self, f).dtype)
            if tuple(t.shape) != self.shape:
                raise ShapeError(f"aggregate '{f}' of shape {tuple(t.shape)} does not fit {self.shape}.")
            loaded[f] = t.to(dev).clone()  # updated in place later: never the caller's memory
        for f, t in loaded.items():
            setattr(self, f, t)
