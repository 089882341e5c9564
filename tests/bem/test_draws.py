"""`bem.core.draws.distinct`, the one loop every mission's data draws its examples with."""

from __future__ import annotations

import itertools

import pytest

from bem.core.draws import MAX_DRAWS_PER_ITEM, distinct


def test_it_keeps_the_first_n_distinct_keys_in_draw_order_and_skips_what_belongs_elsewhere() -> None:
    stream = iter([("a", 1), None, ("b", 2), ("a", 3), ("c", 4), ("d", 5)])
    assert distinct(3, lambda: next(stream), "letters") == [1, 2, 4]
    assert distinct(0, lambda: pytest.fail("nothing to draw"), "nothing") == []


def test_it_names_what_it_could_not_draw_and_stops_at_its_budget() -> None:
    calls = itertools.count()

    def same() -> tuple[str, int]:
        next(calls)
        return "x", 0

    with pytest.raises(RuntimeError, match="could not draw 2 distinct things"):
        distinct(2, same, "things")
    assert next(calls) == MAX_DRAWS_PER_ITEM * 3
    # The n-th item arriving on the last allowed draw still counts.
    last = iter([("k0", 0)] + [None] * (MAX_DRAWS_PER_ITEM * 3 - 2) + [("k1", 1)])
    assert distinct(2, lambda: next(last), "late") == [0, 1]
