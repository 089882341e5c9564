"""Bootstrap draws, as resampled totals (STATS_SPEC §3, §6, §7).

Every linear statistic (a mean, a family of means, a ratio of sums) is a function of the totals
T*_b = Σ_i C_bi·M_i, where C is the B×n matrix of resample counts and M holds one row per example
(deltas, or sufficient statistics). So one engine serves them all:

- few distinct rows (0/1 EM, {−1,0,1} deltas, small TP/FP/FN counts): C over the k distinct rows is
  Multinomial(n, f), exactly the bootstrap's distribution, drawn in O(B·k) instead of O(B·n);
- otherwise: index draws, turned into sums by a gather (one column) or into counts and a float64
  GEMM (a family: C @ D keeps the joint dependence of its columns).

Determinism. The B resamples are cut into streams of STREAM_ROWS rows, and stream j draws from the
j-th child of SeedSequence(seed). Streams are independent, so they run on a thread pool (numpy
releases the GIL in the generator, the gather and BLAS), and no result depends on the thread
count. Within a stream, indices come in cache-sized blocks from one generator in order. BLAS sums
in an order that depends on the matrix shape, so GEMMs run on fixed TILE-row tiles aligned to the
resample index. Results therefore depend only on (seed, B, n, data order), bitwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import lcm
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

DISCRETE_MAX_ROWS = 64
STREAM_ROWS = 1024  # resamples per child stream: the unit of parallel work
BLOCK_ELEMENTS = 1 << 19  # indices per block (4 MB): the gather's working set stays in cache
TILE = 64  # resample rows per GEMM; blocks hold whole tiles
_MAX_SCALE = 10**6
_EXACT = 2.0**53  # float64 holds every integer below this, so integer sums are exact in any order
T = TypeVar("T")
Seed = int | np.random.SeedSequence | None


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


def seed_sequence(seed: Seed) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


@dataclass(frozen=True)
class Stream:
    """Resample rows [lo, hi), drawn from their own child of the root SeedSequence."""

    lo: int
    hi: int
    seed: np.random.SeedSequence

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def streams(seed: Seed, n_resamples: int) -> list[Stream]:
    """The fixed partition of B resamples into streams. Children are derived, not `spawn`ed, so
    calling twice with the same SeedSequence object gives the same draws."""
    root = seed_sequence(seed)
    return [
        Stream(lo, min(lo + STREAM_ROWS, n_resamples), np.random.SeedSequence(
            root.entropy, spawn_key=(*root.spawn_key, j), pool_size=root.pool_size
        ))
        for j, lo in enumerate(range(0, n_resamples, STREAM_ROWS))
    ]  # fmt: skip


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, len(os.sched_getaffinity(0))), thread_name_prefix="stats")


# A forked child (a worker's task process) inherits the pool but not its threads: start afresh there.
os.register_at_fork(after_in_child=_pool.cache_clear)


def map_streams(fn: Callable[[Stream], T], seed: Seed, n_resamples: int) -> list[T]:
    """fn over every stream, in parallel, results in stream order."""
    parts = streams(seed, n_resamples)
    if len(parts) == 1:
        return [fn(parts[0])]
    # The streams are the parallelism: BLAS threads of their own would spin-wait against them.
    with threadpool_limits(1, user_api="blas"):
        return list(_pool().map(fn, parts))


def index_blocks(
    stream: Stream, n: int, rng: np.random.Generator | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first resample row, b×n indices) for the stream's resamples of n examples with replacement.

    `rng` continues the stream's generator when the caller drew something else from it first.
    """
    rng = rng or stream.rng()
    block = -(-max(1, BLOCK_ELEMENTS // n) // TILE) * TILE
    for lo in range(stream.lo, stream.hi, block):
        # intp, not int32: fancy indexing would cast int32 indices to intp on every gather.
        yield lo, rng.integers(0, n, (min(block, stream.hi - lo), n), dtype=np.intp)


def all_index_blocks(seed: Seed, n: int, n_resamples: int) -> Iterator[tuple[int, np.ndarray]]:
    """Every stream's index blocks in order, on this thread (for statistics that may not be thread-safe)."""
    for stream in streams(seed, n_resamples):
        yield from index_blocks(stream, n)


def tiles(lo: int, idx: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The block's fixed-size tiles, with their first resample row."""
    for t in range(0, len(idx), TILE):
        yield lo + t, idx[t : t + TILE]


class TileCounter:
    """Resample counts for up to TILE rows at a time, as float64 for the GEMM, in reused buffers.

    Fresh arrays of this size are mmap'd and page-fault on every tile; reusing the buffers is
    what makes the family path fast. The returned counts are a view, valid until the next call.
    """

    def __init__(self, n: int) -> None:
        self.counts = np.zeros((TILE, n))
        self.flat = np.empty((TILE, n), dtype=np.intp)
        self.offsets = (np.arange(TILE, dtype=np.intp) * n)[:, None]

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        k = len(tile)
        counts, flat = self.counts[:k], self.flat[:k]
        counts.fill(0.0)
        np.add(tile, self.offsets[:k], out=flat)  # row r's indices land in row r's slice
        np.add.at(counts.reshape(-1), flat.reshape(-1), 1.0)
        return counts


def totals(m: np.ndarray, n_resamples: int, seed: Seed) -> np.ndarray:
    """T* = C @ M for B bootstrap resamples of the n rows of M (n×p); returns B×p float64.

    Exact whenever M holds integers (see `lattice_scale`): every partial sum is an integer below 2^53.
    """
    m = np.asarray(m, dtype=np.float64)
    n, p = m.shape
    rows, freq = np.unique(m, axis=0, return_counts=True)
    if len(rows) <= min(DISCRETE_MAX_ROWS, n // 2):
        counts = np.random.default_rng(seed_sequence(seed)).multinomial(n, freq / n, size=n_resamples)
        return counts.astype(np.float64) @ rows
    column = np.ascontiguousarray(m[:, 0])

    def one(stream: Stream) -> np.ndarray:
        out = np.empty((stream.hi - stream.lo, p))
        counter = TileCounter(n)
        for lo, idx in index_blocks(stream, n):
            at = lo - stream.lo
            if p == 1:  # a gather and a row sum: cheaper than counts, and its order is the row's own
                out[at : at + len(idx), 0] = column[idx].sum(axis=1)
                continue
            for t, tile in tiles(at, idx):
                out[t : t + len(tile)] = counter(tile) @ m
        return out

    return np.concatenate(map_streams(one, seed, n_resamples))
