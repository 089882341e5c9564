"""MM-mini's scenes render the facts their questions ask about: an independent reader recovers each
cell's shape and colour from the pixels alone and answers the question itself."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bem.missions.v13 import scenes as S


def read_cell(cell: np.ndarray) -> tuple[str, str] | None:
    """(shape, colour) from a cell's pixels: the colour is the nearest palette entry to the lit pixels,
    the shape follows from how much of the lit pixels' bounding box they fill (a square all of it, a
    disk π/4, a triangle about half)."""
    lit = cell.sum(-1) > 0
    if not lit.any():
        return None
    rgb = cell[lit].mean(0)
    colour = min(S.COLOURS, key=lambda c: float(np.abs(np.array(S.COLOURS[c]) - rgb).sum()))
    ys, xs = np.nonzero(lit)
    fill = lit.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.92 else "disk" if fill > 0.65 else "triangle"
    return shape, colour


def read_image(image: np.ndarray) -> dict[str, tuple[str, str]]:
    out = {}
    for i, position in enumerate(S.POSITIONS):
        row, col = divmod(i, 2)
        got = read_cell(image[row * S.CELL : (row + 1) * S.CELL, col * S.CELL : (col + 1) * S.CELL])
        if got:
            out[position] = got
    return out


def answer_from_pixels(question: str, seen: dict[str, tuple[str, str]]) -> str:
    if m := re.fullmatch(r"what colour is the (\w+) in the ([\w ]+)\?", question):
        shape, colour = seen[m[2]]
        assert shape == m[1]
        return colour
    if m := re.fullmatch(r"what shape is in the ([\w ]+)\?", question):
        return seen[m[1]][0]
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (where,) = [p for p, (shape, colour) in seen.items() if (colour, shape) == (m[1], m[2])]
        return where
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(colour == m[1] for _, colour in seen.values()))
    raise AssertionError(f"unparsed question {question!r}")


@pytest.mark.parametrize("conflict", [False, True])
def test_every_answer_is_what_the_pixels_show(conflict: bool) -> None:
    for sc in S.scenes(300, seed=1, conflict=conflict):
        seen = read_image(sc.image)
        assert seen == {t.position: (t.shape, t.colour) for t in sc.things}, sc.example_id
        assert answer_from_pixels(sc.question, seen) == sc.answer, sc.example_id


def test_the_conflict_split_captions_are_false_and_the_plain_ones_true() -> None:
    for conflict in (False, True):
        for sc in S.scenes(200, seed=2, conflict=conflict):
            m = re.fullmatch(r"the (\w+) in the ([\w ]+) is (\w+)\.", sc.caption)
            assert m is not None
            shape, colour = read_image(sc.image)[m[2]]
            assert shape == m[1]
            assert (colour != m[3]) == conflict, sc.example_id


def test_scenes_are_drawn_by_seed() -> None:
    a, b = S.scenes(20, seed=3), S.scenes(20, seed=3)
    assert all(
        np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b, strict=True)
    )
    assert any(x.things != y.things for x, y in zip(a, S.scenes(20, seed=4), strict=True))
