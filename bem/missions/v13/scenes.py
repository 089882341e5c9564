"""MM-mini's synthetic scenes (issue 20): images drawn by seed with numpy, questions with short answers,
and captions that agree with the image or, on the conflict split, contradict it.

A scene is a 2×2 grid of cells (`POSITIONS`), each empty or holding one shape (`SHAPES`) in one
colour (`COLOURS`), drawn filled on a black `SIZE`×`SIZE` RGB image. Questions ask a colour, a shape,
a position or a count; the answer is one word or a digit, scored by exact match. The caption states
one fact; on the conflict split that fact is false (another colour for the same object), and the
answer still follows the image: the image is the truth, the caption a distractor a gate must learn to
distrust.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 32
CELL = SIZE // 2
SHAPES = ("square", "disk", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    example_id: str
    image: np.ndarray  # [SIZE, SIZE, 3] uint8
    things: tuple[Thing, ...]
    caption: str
    question: str
    answer: str
    conflict: bool


def _mask(shape: str) -> np.ndarray:
    """The filled shape inside one cell, a 2-pixel margin around it."""
    y, x = np.mgrid[0:CELL, 0:CELL]
    lo, hi = 2, CELL - 3
    if shape == "square":
        return (y >= lo) & (y <= hi) & (x >= lo) & (x <= hi)
    if shape == "disk":
        c, r = (CELL - 1) / 2, (hi - lo) / 2
        return (y - c) ** 2 + (x - c) ** 2 <= r**2
    if shape == "triangle":  # apex at the top, base at the bottom
        half = (y - lo) / (hi - lo) * (hi - lo) / 2
        c = (CELL - 1) / 2
        return (y >= lo) & (y <= hi) & (np.abs(x - c) <= half)
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


def render(things: tuple[Thing, ...]) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for t in things:
        row, col = divmod(POSITIONS.index(t.position), 2)
        cell = image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        cell[_mask(t.shape)] = COLOURS[t.colour]
    return image


def _question(rng: random.Random, things: tuple[Thing, ...]) -> tuple[str, str]:
    kind = rng.choice(("colour", "shape", "where", "count"))
    t = rng.choice(things)
    if kind == "colour":
        return f"what colour is the {t.shape} in the {t.position}?", t.colour
    if kind == "shape":
        return f"what shape is in the {t.position}?", t.shape
    if kind == "where":
        # Only an object no other shares its colour and shape with has one answer.
        unique = [x for x in things if sum((y.colour, y.shape) == (x.colour, x.shape) for y in things) == 1]
        if unique:
            t = rng.choice(unique)
            return f"where is the {t.colour} {t.shape}?", t.position
        return f"what shape is in the {t.position}?", t.shape
    colour = rng.choice(list(COLOURS))
    return f"how many {colour} shapes are there?", str(sum(x.colour == colour for x in things))


def scene(rng: random.Random, index: int, conflict: bool = False) -> Scene:
    n = rng.randint(1, 4)
    cells = rng.sample(POSITIONS, n)
    things = tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), p) for p in cells)
    told = rng.choice(things)
    colour = told.colour
    if conflict:
        colour = rng.choice([c for c in COLOURS if c != told.colour])
    caption = f"the {told.shape} in the {told.position} is {colour}."
    question, answer = _question(rng, things)
    split = "conflict" if conflict else "plain"
    return Scene(f"scene-{split}-{index:04d}", render(things), things, caption, question, answer, conflict)


def scenes(n: int, seed: int, conflict: bool = False) -> list[Scene]:
    rng = random.Random(f"v13/scenes/{seed}/{conflict}")
    return [scene(rng, i, conflict) for i in range(n)]
