"""Where an event is made: one :class:`QKEvent` per attention call of a recorded layer.

The adapters' hooks (:mod:`qkprobe.adapters`) see q and k inside the module; :func:`capture_events`
turns each call into a typed event for the reducers (:mod:`qkprobe.reduce`): the layer, q and k
as the module computed them, and what the module applies beyond ``scale · q·k``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..adapters.base import AttentionTerms
from ..adapters.discover import AttentionSite
from ..adapters.base import TOKEN_MASK
from .attention import attention_terms
from .coordinates import capture_qk

Tensor = torch.Tensor


@dataclass
class QKEvent:
    """One call of one recorded attention layer in one forward (tensors detached).

    layer: the layer's index among the recorded layers. q (B, H, N, Dh), k (B, H, Nk, Dh): the
    module's own q and k, biases included, before qk-norm or rope, batch-first (windowed
    attention: B counts windows). attention: the module's actual attention beyond ``scale·q·k``:
    its probabilities where it materializes them, else the q, k it multiplies (after qk-norm /
    rope) with its rotary tables, masks and relative-position bias (made when first read: a
    reducer that needs no attention share costs nothing). info: the adapter's raw ``info``
    (``extras`` seen at run time, ...). token_mask: (B, N) bool, True = real token, False =
    padding, where the adapter saw a padding mask (self-attention only, N = Nk); None: every
    token is real. The reducers leave padded positions out of every statistic.
    """

    layer: int
    q: Tensor
    k: Tensor
    info: Dict[str, Any]
    token_mask: Optional[Tensor] = None

    @cached_property
    def attention(self) -> AttentionTerms:
        return attention_terms(self.info, self.q, self.k)

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])


@contextmanager
def capture_events(sites: Sequence[AttentionSite], on_event: Callable[[QKEvent], None]):
    """Hooks on every site calling ``on_event(QKEvent)`` during forwards inside the ``with``
    block; every hook is removed on exit, even after an error."""
    def on_qk(i: int, q: Tensor, k: Tensor, info: Dict[str, Any]) -> None:
        on_event(QKEvent(i, q, k, info, token_mask=info.get(TOKEN_MASK)))

    with capture_qk(sites, on_qk):
        yield
