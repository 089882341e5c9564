"""Bootstrap draws, as resampled totals (STATS_SPEC §3, §6).

Every linear statistic (a mean, a family of means, a ratio of sums) is a function of the totals
T*_b = Σ_i C_bi·M_i, where C is the B×n matrix of resample counts and M holds one row per example
(deltas, or sufficient statistics). So one engine serves them all:

- few distinct rows (0/1 EM, {−1,0,1} deltas, small TP/FP/FN counts): C over the k distinct rows is
  Multinomial(n, f), exactly the bootstrap's distribution, drawn in O(B·k) instead of O(B·n);
- otherwise: int32 index draws in memory-bounded blocks, turned into sums by gather (one column)
  or into counts and one float64 GEMM (a family: C @ D keeps the joint dependence of its columns).

Index blocks come from one generator in order, and PCG64 keeps its spare 32-bit half in the
generator's state, so the stream does not depend on the block size. BLAS sums in an order that
depends on the matrix shape, so GEMMs run on fixed 64-row tiles aligned to the resample index:
each row's total comes from the same inputs whatever the block size, and every result is bitwise
the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from math import lcm

import numpy as np

DISCRETE_MAX_ROWS = 64
BLOCK_ELEMENTS = 1 << 22  # int32 indices per block (16 MB)
TILE = 64  # resample rows per GEMM; blocks hold whole tiles
_MAX_SCALE = 10**6
_EXACT = 2.0**53  # float64 holds every integer below this, so integer sums are exact in any order


def lattice_scale(values: np.ndarray, n: int | None = None) -> int | None:
    """The smallest L with every value·L an integer (and n·max|value·L| < 2^53), else None.

    On a lattice (EM in {0,1}, deltas in {−1,0,1}, seed-averaged EM in multiples of 1/5) the
    scaled totals are exact integers, so θ* and θ̂ compare exactly and z0's ties are counted right
    (STATS_SPEC §3, "Ties"). Continuous data fails on its first value.
    """
    scale = 1
    for v in np.unique(values):
        frac = Fraction(float(v)).limit_denominator(_MAX_SCALE)
        if abs(float(frac) - v) > 1e-12 * max(1.0, abs(v)):
            return None
        scale = lcm(scale, frac.denominator)
        if scale > _MAX_SCALE:
            return None
    if (n or len(values)) * float(np.max(np.abs(values), initial=0.0)) * scale >= _EXACT:
        return None
    return scale


def to_lattice(values: np.ndarray, scale: int) -> np.ndarray:
    """values·scale rounded to the integers they already are (as float64, which GEMM and sums keep exact)."""
    return np.rint(values * scale)


def index_blocks(
    rng: np.random.Generator, n: int, n_resamples: int, block_rows: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, b×n int32 indices) for B resamples of n examples with replacement."""
    block = -(-(block_rows or max(1, BLOCK_ELEMENTS // n)) // TILE) * TILE
    for lo in range(0, n_resamples, block):
        yield lo, rng.integers(0, n, (min(block, n_resamples - lo), n), dtype=np.int32)


def tiles(lo: int, idx: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The block's fixed-size tiles, with their first resample row."""
    for t in range(0, len(idx), TILE):
        yield lo + t, idx[t : t + TILE]


def counts_from_indices(idx: np.ndarray, n: int) -> np.ndarray:
    """b×n resample counts from b×n indices, as float64 for the GEMM."""
    b = len(idx)
    flat = idx + (np.arange(b, dtype=np.int64) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def totals(
    m: np.ndarray, n_resamples: int, rng: np.random.Generator, *, block_rows: int | None = None
) -> np.ndarray:
    """T* = C @ M for B bootstrap resamples of the n rows of M (n×p); returns B×p float64.

    Exact whenever M holds integers (see `lattice_scale`): every partial sum is an integer below 2^53.
    """
    m = np.asarray(m, dtype=np.float64)
    n, p = m.shape
    rows, freq = np.unique(m, axis=0, return_counts=True)
    if len(rows) <= min(DISCRETE_MAX_ROWS, n // 2):
        counts = rng.multinomial(n, freq / n, size=n_resamples).astype(np.float64)
        return counts @ rows
    out = np.empty((n_resamples, p))
    for lo, idx in index_blocks(rng, n, n_resamples, block_rows):
        if p == 1:  # a gather and a row sum: cheaper than counts, and its order is the row's own
            out[lo : lo + len(idx), 0] = m[:, 0][idx].sum(axis=1)
            continue
        for t, tile in tiles(lo, idx):
            out[t : t + len(tile)] = counts_from_indices(tile, n) @ m
    return out
