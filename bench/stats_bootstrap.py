"""Paired BCa from `stats` against `scipy.stats.bootstrap(method="BCa")`, in the same process.

Cases (STATS_SPEC §6, B = 10,000 throughout):
  (a) one comparison of continuous paired scores, n = 1,000
  (b) the same at n = 10,000
  (c) a family of 50 comparisons on the same 1,000 examples
  (d) 0/1 EM deltas (values in {-1, 0, 1}), n = 10,000

scipy gets its fastest correct form of each question: the one-sample mean of the paired deltas
(what paired=True reduces to, without its index indirection), with `batch` sized so a batch holds
about 2M resampled values (its fastest setting here, and bounded memory). For (c) scipy runs two
ways: one call per comparison, as a researcher judging a family would write it, and one call on
the 50×n array, which shares indices across rows the way our family path does. The target is
judged on the per-comparison form; both ratios are printed.

Timing is interleaved: after a warm-up, each round times ours and scipy's in a shuffled order, so
drift on a shared machine hits both. A ratio is scipy time / our time per round; the table shows
the median and IQR over rounds. "ours, 1 thread" reruns our side with one worker thread, to show
how much of the speed is the algorithm and how much the second core. Peak memory is measured in
a separate, untimed pass with tracemalloc (numpy reports its buffers to it).

    .venv/bin/python bench/stats_bootstrap.py [--rounds 7] [--out bench/results/stats_bootstrap-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy
import scipy.stats

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stats import resample  # noqa: E402
from stats.bootstrap import bca_family, paired_bca  # noqa: E402

B = 10_000
SCIPY_BATCH_VALUES = 2_000_000


@dataclass
class Case:
    name: str
    target: float  # minimum speed-up over scipy
    ours: Callable[[], object]
    scipy: Callable[[], object]
    scipy_vectorised: Callable[[], object] | None = None


@dataclass
class Row:
    case: str
    ours_s: float
    ours_1thread_s: float
    scipy_s: float
    ratio: float
    ratio_iqr: tuple[float, float]
    ratio_1thread: float
    scipy_vectorised_s: float | None
    ratio_vectorised: float | None
    ours_peak_mb: float
    scipy_peak_mb: float
    target: float
    met: bool


def scipy_bca(d: np.ndarray, seed: int):
    """scipy's BCa for mean(d) (d: n, or m×n with the mean taken per row)."""
    batch = max(1, SCIPY_BATCH_VALUES // d.size)
    return scipy.stats.bootstrap(
        (d,), np.mean, axis=-1, method="BCa", n_resamples=B, batch=batch, rng=seed, vectorized=True
    ).confidence_interval


def cases(rng: np.random.Generator) -> list[Case]:
    def scores(n: int) -> tuple[np.ndarray, np.ndarray]:
        base = rng.beta(2, 3, n)  # F1-like per-example scores
        return base, np.clip(base + rng.normal(0.02, 0.15, n), 0, 1)

    b1, v1 = scores(1_000)
    b2, v2 = scores(10_000)
    fam = rng.normal(0.01, 0.2, (1_000, 50))  # 50 metrics' deltas on the same examples
    em_b = (rng.random(10_000) < 0.55).astype(float)
    em_v = (rng.random(10_000) < 0.58).astype(float)
    return [
        Case("(a) n=1,000", 1.3, lambda: paired_bca(b1, v1, seed=1), lambda: scipy_bca(v1 - b1, 1)),
        Case("(b) n=10,000", 3.0, lambda: paired_bca(b2, v2, seed=1), lambda: scipy_bca(v2 - b2, 1)),
        Case(
            "(c) family of 50, n=1,000",
            15.0,
            lambda: bca_family(fam, seed=1),
            lambda: [scipy_bca(fam[:, j], 1) for j in range(fam.shape[1])],
            lambda: scipy_bca(fam.T, 1),
        ),
        Case(
            "(d) 0/1 EM, n=10,000",
            30.0,
            lambda: paired_bca(em_b, em_v, seed=1),
            lambda: scipy_bca(em_v - em_b, 1),
        ),
    ]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_mb(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def one_thread() -> None:
    """Our side with a single worker thread (the bench's own switch; the library uses every core)."""
    pool = ThreadPoolExecutor(max_workers=1)
    resample._pool = lambda: pool  # type: ignore[assignment]


def measure(case: Case, rounds: int, shuffle: random.Random) -> dict[str, list[float]]:
    arms = {"ours": case.ours, "scipy": case.scipy}
    if case.scipy_vectorised:
        arms["scipy_vectorised"] = case.scipy_vectorised
    for fn in arms.values():  # warm-up: imports, caches, the thread pool
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        order = list(arms)
        shuffle.shuffle(order)
        for name in order:
            times[name].append(timed(arms[name]))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case (default 7)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stats_bootstrap-cpu.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    threads = min(8, len(os.sched_getaffinity(0)))
    started = time.perf_counter()

    all_cases = cases(np.random.default_rng(args.seed))
    shuffle = random.Random(args.seed)
    timings = {c.name: measure(c, args.rounds, shuffle) for c in all_cases}
    peaks = {c.name: (peak_mb(c.ours), peak_mb(c.scipy)) for c in all_cases}
    one_thread()
    single = {c.name: [timed(c.ours) for _ in range(args.rounds)] for c in all_cases}

    rows = []
    for c in all_cases:
        t = timings[c.name]
        ratios = [s / o for s, o in zip(t["scipy"], t["ours"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        vec = t.get("scipy_vectorised")
        ours_s, ours1_s, scipy_s = (statistics.median(x) for x in (t["ours"], single[c.name], t["scipy"]))
        ratio = statistics.median(ratios)
        rows.append(
            Row(
                c.name,
                ours_s,
                ours1_s,
                scipy_s,
                ratio,
                (q1, q3),
                scipy_s / ours1_s,
                statistics.median(vec) if vec else None,
                statistics.median([s / o for s, o in zip(vec, t["ours"], strict=True)]) if vec else None,
                peaks[c.name][0],
                peaks[c.name][1],
                c.target,
                ratio >= c.target,
            )
        )

    table = Table(title=f"paired BCa, B = {B:,}: stats vs scipy {scipy.__version__} ({threads} threads)")
    for col in (
        "case",
        "ours ms",
        "ours 1-thr ms",
        "scipy ms",
        "x scipy",
        "IQR",
        "x (1 thr)",
        "target",
        "peak MB ours/scipy",
    ):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(
            r.case,
            f"{r.ours_s * 1e3:.1f}",
            f"{r.ours_1thread_s * 1e3:.1f}",
            f"{r.scipy_s * 1e3:.1f}",
            f"{r.ratio:.1f}",
            f"{r.ratio_iqr[0]:.1f}-{r.ratio_iqr[1]:.1f}",
            f"{r.ratio_1thread:.1f}",
            f">= {r.target:g} {'met' if r.met else 'MISSED'}",
            f"{r.ours_peak_mb:.0f} / {r.scipy_peak_mb:.0f}",
        )
    console.print(table)
    for r in rows:
        if r.scipy_vectorised_s is not None:
            console.print(
                f"{r.case}: scipy on the 50×n array in one call: {r.scipy_vectorised_s * 1e3:.1f} ms, "
                f"ours {r.ratio_vectorised:.1f}x faster than that"
            )
    b_peak = next(r.ours_peak_mb for r in rows if r.case.startswith("(b)"))
    console.print(
        f"(b) peak memory {b_peak:.0f} MB (target <= 300 MB): {'met' if b_peak <= 300 else 'MISSED'}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "stats_bootstrap",
        "n_resamples": B,
        "rounds": args.rounds,
        "threads": threads,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rows": [asdict(r) for r in rows],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
