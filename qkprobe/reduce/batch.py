"""One forward's statistics, gathered per group of same-shaped layers into (L, B, H, R, S) buffers.

Each layer's reducer writes straight into its slot of the group's buffer where it can (one call
per forward, all heads): no copy at the end of the forward. A layer called several times, a head
subset or windowed attention is gathered and stacked at :meth:`ForwardStats.finish`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..core.stats import STAT_INDEX, STAT_NAMES
from ..errors import ShapeError

Tensor = torch.Tensor


class _GroupBuffer:
    """The (L, B, H, R, len(STAT_NAMES)) buffer of one group, reused across forwards; on CUDA a
    spare, and the copy event of each, so a forward never overwrites rows still being copied."""

    def __init__(self, layers: List[int], heads: int, modes: int):
        self.layers = layers
        self.shape = (heads, modes, len(STAT_NAMES))
        self.buffer: Optional[Tensor] = None
        self.spare: Optional[Tensor] = None
        self.copied: Dict[int, Any] = {}  # data_ptr of a device buffer → event of its last copy

    def slot(self, j: int, rows: int, device) -> Tensor:
        shape = (len(self.layers), rows, *self.shape)
        if self.buffer is None or tuple(self.buffer.shape) != shape or self.buffer.device != torch.device(device):
            self.buffer = torch.empty(shape, dtype=torch.float32, device=device)
        return self.buffer[j]


class ForwardStats:
    """Per-layer statistics of the forward in progress.

    Args:
        groups: per group, the recorded layers it holds (indices), as the run state groups them.
        shapes: per layer, (H recorded, R).
        head_subset: per layer, whether only some heads are recorded (no direct writes).
        names: per layer, its module name (for errors).
    """

    def __init__(self, groups: Sequence[List[int]], shapes: Sequence[tuple], head_subset: Sequence[bool],
                 names: Sequence[str]):
        self.names = list(names)
        self.groups = [_GroupBuffer(list(layers), *shapes[layers[0]]) for layers in groups]
        self.place = {i: (g, j) for g in self.groups for j, i in enumerate(g.layers)}
        self.head_subset = list(head_subset)
        self.pending: List[List[Tensor]] = [[] for _ in shapes]

    def clear(self) -> None:
        """Forget what an unfinished forward left (a forward that raised)."""
        self.pending = [[] for _ in self.pending]

    def out_for(self, layer: int, rows: int, device) -> Optional[Tensor]:
        """Where the reducer may write the layer's (rows, H, R, S) directly, or None."""
        if self.head_subset[layer] or self.pending[layer]:
            return None
        g, j = self.place[layer]
        return g.slot(j, rows, device)

    def add(self, layer: int, stats: Tensor) -> None:
        """One call's (B, H, R, S) of the recorded heads (the direct slot, or a tensor of its own)."""
        self.pending[layer].append(stats)

    def any(self) -> bool:
        return any(self.pending)

    def batch(self) -> int:
        """The rows of the first layer that saw a call (windowed attention: B · windows)."""
        return next(p[0].shape[0] for p in self.pending if p)

    def finish(self, B: int) -> List[Tensor]:
        """Per group, (L, B, H, R, S) of this forward; the pending calls are cleared."""
        out = []
        for g in self.groups:
            if self._filled(g, B):
                out.append(g.buffer)  # written by the reducers
                continue
            per_layer = []
            for i in g.layers:
                calls = self.pending[i]
                if not calls:
                    raise ShapeError(f"reduce: attention layer {self.names[i]} was not called in this forward "
                                     f"while the other layers of its shape were; record only layers that run in "
                                     f"every forward (attach(layers=...)).")
                st = torch.cat(calls) if len(calls) > 1 else calls[0]
                if st.shape[0] != B and st.shape[0] % B == 0:  # windowed attention: fold windows per sample
                    st = fold_windows(st, B)
                if tuple(st.shape) != (B, *g.shape):
                    raise ShapeError(f"reduce: attention layer {self.names[i]} gave statistics {tuple(st.shape)} in "
                                     f"a forward of {B} samples, expected {(B, *g.shape)}; its calls do not add "
                                     f"up to one row per sample.")
                per_layer.append(st)
            out.append(torch.stack(per_layer))
        self.clear()
        return out

    def _filled(self, g: _GroupBuffer, rows: int) -> bool:
        """Whether this forward wrote every layer of the group straight into its buffer."""
        b = g.buffer
        return b is not None and b.shape[1] == rows and all(
            len(self.pending[i]) == 1 and self.pending[i][0].data_ptr() == b[j].data_ptr()
            and self.pending[i][0].shape == b.shape[1:] for j, i in enumerate(g.layers))

    def copying(self, group: int, stats: Tensor, ready) -> None:
        """``stats`` (the group's buffer, or a stacked tensor) is being copied to the host until
        the CUDA event ``ready``: the next forward writes the spare buffer, after the device has
        waited for that buffer's own last copy (no host wait)."""
        g = self.groups[group]
        g.copied[stats.data_ptr()] = ready
        if g.buffer is not None and stats.data_ptr() == g.buffer.data_ptr():
            g.buffer, g.spare = g.spare, g.buffer
            if g.buffer is not None and g.buffer.data_ptr() in g.copied:
                torch.cuda.current_stream(stats.device).wait_event(g.copied[g.buffer.data_ptr()])


def fold_windows(st: Tensor, B: int) -> Tensor:
    """Windowed attention (Swin) gives (B·nW, H, R, S): reduce windows to one row per sample
    (means average, max/min/score statistics take the extreme; top-k means average)."""
    nW = st.shape[0] // B
    st = st.view(B, nW, *st.shape[1:])
    out = st.mean(1)
    for name in ("q_max", "k_max", "score_pos"):
        out[..., STAT_INDEX[name]] = st[..., STAT_INDEX[name]].amax(1)
    for name in ("q_min", "k_min"):
        out[..., STAT_INDEX[name]] = st[..., STAT_INDEX[name]].amin(1)
    out[..., STAT_INDEX["score_neg"]] = st[..., STAT_INDEX["score_neg"]].amax(1)
    return out
