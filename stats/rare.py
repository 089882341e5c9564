"""Rare events on paired 0/1 flags (STATS_SPEC §5): exact tests where a bootstrap degenerates.

A claim takes this path when, after seed averaging, every per-example value of both arms is 0 or 1
and an arm has at most RARE_MAX events (of its rarer value: violations, or the few misses of a
near-perfect EM). The bootstrap distribution is then a few lattice points, and BCa degenerates or
undercovers. Instead:

- **Absolute claim: exact McNemar.** Of the d discordant pairs, f favour the variant; under H0 (no
  difference) f ~ Binomial(d, ½), so the one-sided p = P(Bin(d, ½) ≥ f), with no Monte-Carlo error
  (twice the smaller tail is statsmodels' two-sided `mcnemar(exact=True)`). Beside it: Tango's
  (1998) asymptotic score interval for the paired difference, which stays in [−1, 1] and is not
  degenerate with zero cells (one of the intervals Fagerland, Lydersen and Laake, Stat Med 2014,
  recommend for paired 2×2 tables). The decision is the exact p; the interval is reported beside
  it, not inverted from it.
- **Relative claim**, H1: p_s < ρ·p_l, where s is the arm claimed to have fewer events (the variant
  for "lower", ρ = 1 − relative; the baseline for "higher", ρ = 1/(1 + relative)). Among the N
  examples with an event in either arm, the X with one in arm s are Binomial(N, a); under H0,
  a ≥ ρ(1 + q11)/(1 + ρ) ≥ ρ/(1 + ρ) (q11: the share of those N with an event in both arms), so
  p = P(Bin(N, ρ/(1 + ρ)) ≤ X) is exact and conservative by the concordant pairs (few, when events
  are rare). Conditioning on the discordant pairs alone would not be valid here: with q11 > 0 it
  rejects too often (a test shows it). Since a/(1 − a) ≥ p_s/p_l ≥ a, the one-sided
  Clopper–Pearson bounds on a give p_s/p_l ≤ a_U/(1 − a_U), the exact inversion of that test, and
  p_s/p_l ≥ a_L (conservative too).
- No event in either arm, or (absolute) no discordant pair: no evidence; the claim stays in the
  family with p = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtri
from scipy.stats import beta, binomtest

RARE_MAX = 2


@dataclass(frozen=True)
class Pairs:
    """The paired 2×2 table of two 0/1 arms: v is the variant's flag, b the baseline's."""

    both: int  # v = 1, b = 1
    variant_only: int  # v = 1, b = 0
    baseline_only: int  # v = 0, b = 1
    n: int

    @classmethod
    def of(cls, variant: np.ndarray, baseline: np.ndarray) -> Pairs:
        v, b = np.asarray(variant) == 1, np.asarray(baseline) == 1
        return cls(int((v & b).sum()), int((v & ~b).sum()), int((~v & b).sum()), len(v))

    @property
    def variant_events(self) -> int:
        return self.both + self.variant_only

    @property
    def baseline_events(self) -> int:
        return self.both + self.baseline_only

    @property
    def any_event(self) -> int:
        return self.both + self.variant_only + self.baseline_only


def is_binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(np.asarray(a), (0.0, 1.0)).all() for a in arrays)


def is_rare(variant: np.ndarray, baseline: np.ndarray) -> bool:
    """Both arms 0/1 flags and one of them with at most RARE_MAX of its rarer value."""
    if not is_binary(variant, baseline):
        return False
    n = len(variant)
    ones = (int(np.sum(variant)), int(np.sum(baseline)))
    return min(min(k, n - k) for k in ones) <= RARE_MAX


def mcnemar_p(favourable: int, unfavourable: int) -> float:
    """One-sided exact McNemar: P(Bin(d, ½) ≥ favourable), d the discordant pairs (d > 0)."""
    return float(binomtest(favourable, favourable + unfavourable, 0.5, alternative="greater").pvalue)


def restricted_mle(b: int, c: int, n: int, delta: float) -> float:
    """Tango's closed-form ML estimate of the c-cell probability under H0: p_b − p_c = δ."""
    qa, qb, qc = 2 * n, -b - c + (2 * n - b + c) * delta, -c * delta * (1 - delta)
    return float((np.sqrt(qb * qb - 4 * qa * qc) - qb) / (2 * qa))


def tango_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: (p_b − p_c) = δ, b and c the discordant cells of n pairs."""
    if delta * n == b - c:
        return 0.0
    p_c = restricted_mle(b, c, n, delta)
    return float((b - c - n * delta) / np.sqrt(n * (2 * p_c + delta * (1 - delta))))


def tango_lower(b: int, c: int, n: int, level: float) -> float:
    """One-sided level-`level` Tango score lower bound on (b − c)/n, the paired difference whose
    discordant cells are b (for) and c (against): the δ ≤ estimate where Z(δ) = z_level."""
    est, z = (b - c) / n, float(ndtri(level))
    if est <= -1:
        return -1.0
    lo = -1 + 1e-12
    if tango_z(b, c, n, lo) <= z:
        return -1.0
    return float(brentq(lambda d: tango_z(b, c, n, d) - z, lo, est, xtol=1e-12))


def tango_interval(b: int, c: int, n: int, level: float) -> tuple[float, float]:
    """Tango's (1998) two-sided score interval for the paired difference (b − c)/n."""
    one_sided = (1 + level) / 2
    return tango_lower(b, c, n, one_sided), -tango_lower(c, b, n, one_sided)


def fewer_events_p(small: int, any_event: int, rho: float) -> float:
    """Exact conservative p for H1: p_small < ρ·p_large: P(Bin(N, ρ/(1 + ρ)) ≤ X) (module docstring)."""
    return float(binomtest(small, any_event, rho / (1 + rho), alternative="less").pvalue)


def share_upper(small: int, any_event: int, level: float) -> float:
    """Clopper–Pearson one-sided upper bound on a = P(event in the small arm | an event in either)."""
    return 1.0 if small >= any_event else float(beta.ppf(level, small + 1, any_event - small))


def share_lower(small: int, any_event: int, level: float) -> float:
    return 0.0 if small <= 0 else float(beta.ppf(1 - level, small, any_event - small + 1))


def ratio_upper(small: int, any_event: int, level: float) -> float:
    """Upper bound on p_small/p_large: a_U/(1 − a_U) (inf when a_U = 1); inverts `fewer_events_p`."""
    a = share_upper(small, any_event, level)
    return np.inf if a >= 1 else a / (1 - a)
