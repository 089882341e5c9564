"""Drawing a fixed number of distinct examples from a seeded generator, as every mission's data does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_DRAWS_PER_ITEM = 1000


def distinct(n: int, draw: Callable[[], tuple[str, T] | None], what: str) -> list[T]:
    """The first `n` drawn items with distinct keys, in draw order. `draw()` gives (key, item), or None
    for a candidate that belongs elsewhere (another split); the same sequence of draws gives the same
    list. Raises, naming `what`, when 1000·(n + 1) candidates did not give `n`."""
    out: list[T] = []
    seen: set[str] = set()
    for _ in range(MAX_DRAWS_PER_ITEM * (n + 1)):
        if len(out) == n:
            break
        got = draw()
        if got is None or got[0] in seen:
            continue
        seen.add(got[0])
        out.append(got[1])
    if len(out) < n:
        raise RuntimeError(f"could not draw {n} distinct {what}")
    return out
