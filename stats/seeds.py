"""Seeds × examples (STATS_SPEC §8): the secondary multi-bootstrap and per-seed sign consistency.

The primary analysis averages seeds per example and bootstraps examples: inference conditional on
the seeds run. These two views ask whether the effect survives other seeds: with 5 seeds there are
only 126 seed multisets, so seeds are resampled together with examples, never alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stats.bootstrap import BootstrapResult, NoData
from stats.quantile import percentile_result
from stats.resample import Seed, Stream, TileCounter, index_blocks, map_streams, tiles


@dataclass(frozen=True)
class SignConsistency:
    per_seed: tuple[float, ...]  # mean delta of each seed, in the order of the rows given
    positive: int

    def __str__(self) -> str:
        return f"{self.positive}/{len(self.per_seed)} > 0"


def sign_consistency(deltas: np.ndarray) -> SignConsistency:
    """Per-seed mean of the S×n paired deltas, and how many seeds are positive."""
    means = np.asarray(deltas, dtype=np.float64).mean(axis=1)
    return SignConsistency(tuple(float(m) for m in means), int((means > 0).sum()))


def multi_bootstrap(
    deltas: np.ndarray, *, n_resamples: int = 10_000, level: float = 0.95, seed: Seed = None
) -> BootstrapResult:
    """Percentile interval for mean(d) resampling seeds and examples together.

    `deltas` is S×n (seeds × examples, variant − baseline with the same seed in both arms). Each
    replicate draws S seeds and n examples with replacement, both shared by the two arms, and takes
    the mean of d over the drawn grid: θ*_b = (cs_b @ D @ ce_b) / (S·n).
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 2 or np.isnan(d).any():
        raise ValueError(
            f"deltas must be a complete S×n seeds × examples grid, got shape {d.shape} with NaNs"
        )
    s, n = d.shape
    if n < 2:
        raise NoData(f"NODATA: the multi-bootstrap needs at least 2 examples, got {n}")

    def one(stream: Stream) -> np.ndarray:
        # Per stream: its seed counts first, then its example blocks, all from the stream's generator.
        rows = stream.hi - stream.lo
        rng = stream.rng()
        seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=rows).astype(np.float64)
        out = np.empty(rows)
        counter = TileCounter(n)
        for lo, idx in index_blocks(stream, n, rng):
            for t, tile in tiles(lo - stream.lo, idx):
                grid = seed_counts[t : t + len(tile)] @ d
                out[t : t + len(tile)] = np.einsum("bn,bn->b", grid, counter(tile)) / (s * n)
        return out

    dist = np.concatenate(map_streams(one, seed, n_resamples))
    return percentile_result(
        float(d.mean()), dist, level=level, n=n, n_dropped=0, n_resamples=n_resamples, seed=seed
    )
