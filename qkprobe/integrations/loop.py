"""Plain training loops: ``for step, batch in qkprobe.integrations.loop.steps(probe, loader)``."""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple, TypeVar

T = TypeVar("T")


def steps(probe, iterable: Iterable[T], start: int = 0) -> Iterator[Tuple[int, T]]:
    """Enumerate ``iterable`` and tell ``probe`` the step before each item is used."""
    for step, item in enumerate(iterable, start):
        probe.step(step)
        yield step, item
