"""Primary claims (STATS_SPEC §5): the mission's one family, judged into decisions.

A claim says "`variant` beats `baseline` on `metric`". What beating means:

- `direction = "higher"` (default): the improvement is variant − baseline; `"lower"` (violation
  rates, spike ratios): baseline − variant. Either way estimate > 0 means the variant is better,
  and `min_effect` applies to that improvement. A negative `min_effect` is a non-inferiority margin:
  the test's null moves to it (H0: improvement ≤ min_effect), so "at most 1 point worse" passes when
  the interval's bound clears −1, not only when the variant is better.
- `relative = r`: the ratio of means R = Σv/Σb over the paired examples against 1 + r ("higher",
  H1: R > 1 + r) or 1 − r ("lower", H1: R < 1 − r). A negative r is a non-inferiority margin
  ("higher", r = −.05: H1: R > .95, at least 95% of the baseline). BCa on R (the "ratio" statistic), with the
  one-sided p against that null from the same draws. For "lower" the bootstrap runs on −R: BCa
  respects monotone transformations, so its interval is exactly the negated one and p inverts the
  upper bound. Estimate, interval and bound are reported on the ratio scale. The relative threshold
  is the tested effect, so it takes no `min_effect`.
- `corpus = f` (chrf, bleu, micro_f1, ratio_of_sums; `stats.corpus`): θ = f(Σ variant statistics) −
  f(Σ baseline statistics), over the per-example statistics `metric#0` … (`stats.table`), BCa over
  paired examples with the O(n·k) jackknife; with `relative`, θ = f(Σv)/f(Σb) as above.
- Paired 0/1 flags (after seed averaging) with at most 2 events in an arm: exact tests instead
  (`stats.rare`): McNemar for absolute claims, a conservative binomial test for relative ones.

The family: every claim's one-sided p enters BH (or BY) at q; a claim without evidence (degenerate
draws, no events) stays in with p = 1. Plain mean claims on the same examples share one count matrix
(one GEMM, STATS_SPEC §6); ratio and corpus claims bootstrap on their own. Seeds: claim i draws from
child i of the family seed, and a shared count matrix from the child of its first claim, so results
depend only on the spec, the data and the seed. Exact p-values have no Monte-Carlo error: only
bootstrap p-values can trigger the 3-SE re-run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import msgspec
import numpy as np
import pandas as pd
from scipy.special import ndtr

from stats import corpus, rare
from stats.bootstrap import BootstrapResult, NoData, bca, bca_family, lower_bound
from stats.decision import Decision, Outcome
from stats.multitest import FamilyResult, Method, fdr
from stats.seeds import SignConsistency, multi_bootstrap, sign_consistency
from stats.table import Paired, pair, pair_stats

Direction = Literal["higher", "lower"]
RERUN_FACTOR = 10
MC_SES = 3.0


class Claim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Primary claim: `variant` beats `baseline` on `metric` by at least `min_effect` (module docstring)."""

    name: str
    metric: str
    variant: str
    baseline: str
    min_effect: float = 0.0
    min_positive_seeds: int | None = None  # e.g. 4 for "at least 4 of 5 seeds improve"
    direction: Direction = "higher"
    # .3: at least 30% more ("higher") or fewer ("lower") than baseline; −.05: at least 95% of it
    relative: float | None = None
    corpus: str = ""  # a stats.corpus metric over the statistics metric#0 … metric#{k-1}

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"claim {self.name!r}: {field} {why}")

        if self.direction not in ("higher", "lower"):
            fail("direction", f"must be 'higher' or 'lower', got {self.direction!r}")
        if self.variant == self.baseline:
            fail("variant", f"and baseline are the same arm {self.variant!r}")
        if self.corpus and self.corpus not in corpus.METRICS:
            fail(
                "corpus", f"{self.corpus!r} is not a stats.corpus metric; use one of {sorted(corpus.METRICS)}"
            )
        if self.relative is not None:
            # A negative `relative` is a non-inferiority margin: "higher" with −.05 tests R > .95.
            if self.direction == "lower" and not (-np.inf < self.relative < 1 and self.relative != 0):
                fail("relative", f"must be below 1 and not 0 for direction 'lower', got {self.relative}")
            if self.direction == "higher" and not (-1 < self.relative < np.inf and self.relative != 0):
                fail("relative", f"must be above -1 and not 0, got {self.relative}")
            if self.min_effect:
                fail(
                    "min_effect",
                    "does not combine with relative: the relative threshold is the tested effect",
                )
        if self.min_positive_seeds is not None and (self.relative is not None or self.corpus):
            fail("min_positive_seeds", "needs a per-example mean claim (no relative, no corpus)")

    @property
    def lower(self) -> bool:
        return self.direction == "lower"

    @property
    def threshold(self) -> float | None:
        """The null ratio R0 of a relative claim: 1 − relative ("lower") or 1 + relative ("higher")."""
        if self.relative is None:
            return None
        return 1 - self.relative if self.lower else 1 + self.relative

    @property
    def margin(self) -> float:
        """The null of an absolute claim: a negative `min_effect` (non-inferiority), else 0."""
        return min(self.min_effect, 0.0)

    @property
    def comparison(self) -> str:
        return f"{self.variant} vs {self.baseline}" + (", lower is better" if self.lower else "")


@dataclass(frozen=True)
class Tested:
    """A claim's statistic on its reported scale (the improvement, or the ratio v/b), its two-sided
    interval, the one-sided p for its H0 and the favourable one-sided bound at any level."""

    estimate: float
    low: float
    high: float
    method: str  # names the interval: "BCa", "Tango score", ...
    p_value: float  # 1 when there is no evidence
    p_value_se: float  # Monte-Carlo SE; 0 for exact tests
    n: int
    bound: Callable[[float], float]
    upper: bool = False  # the favourable bound is an upper bound (a ratio that should be small)
    no_evidence: str = ""  # why not, when there is no evidence
    detail: str = ""  # the test, when it is not the bootstrap
    low_n: bool = False


@dataclass(frozen=True)
class _Data:
    """One claim's paired data and how it is tested: exactly one of improvement, stats or exact."""

    claim: Claim
    ids: np.ndarray
    n_unpaired: int
    n_nan: int
    paired: Paired | None = None  # per-example means: the seeds, for the sign rule and multi-bootstrap
    improvement: np.ndarray | None = None  # a plain mean claim: per-example improvement
    stats: np.ndarray | None = None  # ratio or corpus: n×2k, the variant's k columns then the baseline's
    statistic: corpus.Metric | None = None  # θ = statistic(Σ stats); reported as −θ when negate
    null: float = 0.0
    negate: bool = False
    exact: Tested | None = None


# -- preparing each claim's data ----------------------------------------------------------------


def _total(t: np.ndarray) -> np.ndarray:
    """The arm's sum: of a plain metric's one column, so that f(Σv)/f(Σb) is the ratio of means."""
    return t[..., 0]


def _statistic(claim: Claim, f: corpus.Metric, k: int) -> tuple[corpus.Metric, float, bool]:
    """(θ as a function of the stacked totals, its null, whether θ is the negated ratio)."""

    def variant(t: np.ndarray) -> np.ndarray:
        return f(t[..., :k])

    def baseline(t: np.ndarray) -> np.ndarray:
        return f(t[..., k:])

    if claim.threshold is None:
        if claim.lower:
            return (lambda t: baseline(t) - variant(t)), claim.margin, False
        return (lambda t: variant(t) - baseline(t)), claim.margin, False

    def ratio(t: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return variant(t) / baseline(t)

    if claim.lower:
        return (lambda t: -ratio(t)), -claim.threshold, True
    return ratio, claim.threshold, False


def _prepare(claim: Claim, scores: pd.DataFrame, level: float) -> _Data:
    if claim.corpus:
        ps = pair_stats(scores, claim.metric, claim.baseline, claim.variant)
        data = _Data(claim, ps.example_ids, ps.n_unpaired, ps.n_nan)
        v, b, f = ps.variant_stats, ps.baseline_stats, corpus.METRICS[claim.corpus]
    else:
        p = pair(scores, claim.metric, claim.baseline, claim.variant)
        data = _Data(claim, p.example_ids, p.n_unpaired, p.n_nan, paired=p)
        v, b, f = p.variant_scores[:, None], p.baseline_scores[:, None], _total
    if len(data.ids) < 2:
        raise NoData(f"NODATA: {len(data.ids)} paired example(s) on {claim.metric!r}; the tests need 2")
    if not claim.corpus and rare.is_rare(v[:, 0], b[:, 0]):
        return replace(data, exact=_exact(claim, rare.Pairs.of(v[:, 0], b[:, 0]), level))
    if not claim.corpus and claim.relative is None:
        return replace(data, improvement=b[:, 0] - v[:, 0] if claim.lower else v[:, 0] - b[:, 0])
    statistic, null, negate = _statistic(claim, f, v.shape[1])
    return replace(data, stats=np.hstack([v, b]), statistic=statistic, null=null, negate=negate)


# -- testing -----------------------------------------------------------------------------------


def _no_evidence(why: str, n: int, estimate: float = np.nan, detail: str = "") -> Tested:
    return Tested(estimate, estimate, estimate, "none", 1.0, 0.0, n, lambda _: estimate, False, why, detail)


def _from_bootstrap(res: BootstrapResult, negate: bool = False) -> Tested:
    s = -1.0 if negate else 1.0
    low, high = sorted((s * res.low, s * res.high))
    return Tested(
        s * res.estimate,
        low,
        high,
        "BCa",
        1.0 if res.degenerate or res.p_value is None else res.p_value,
        0.0 if res.degenerate else float(res.p_value_se or 0.0),
        res.n,
        lambda level: s * lower_bound(res, level),
        upper=negate,
        no_evidence=f"{res.reason}: no evidence" if res.degenerate else "",
        low_n=res.low_n,
    )


def _ratio_test(data: _Data, n_resamples: int, level: float, seed: np.random.SeedSequence) -> Tested:
    assert data.stats is not None and data.statistic is not None
    try:
        res = bca(
            (data.stats,),
            "ratio",
            n_resamples=n_resamples,
            level=level,
            seed=seed,
            null=data.null,
            metric=data.statistic,
        )
    except ValueError as exc:  # a resample where the statistic is undefined (say Σ baseline = 0)
        return _no_evidence(f"{exc}: no evidence", len(data.ids))
    return _from_bootstrap(res, data.negate)


def _inverse(x: float) -> float:
    return np.inf if x == 0 else 1 / x


def _exact(claim: Claim, pairs: rare.Pairs, level: float) -> Tested:
    """The rare-event path (`stats.rare`): exact McNemar, or the exact conservative ratio test."""
    return _mcnemar(claim, pairs, level) if claim.threshold is None else _fewer_events(claim, pairs, level)


def _mcnemar(claim: Claim, pairs: rare.Pairs, level: float) -> Tested:
    """Exact one-sided McNemar p on the discordant pairs; Tango's score interval for the improvement."""
    n, fav, unf = pairs.n, pairs.variant_only, pairs.baseline_only
    if claim.lower:  # an event is bad: the pairs where only the baseline has one favour the variant
        fav, unf = unf, fav
    detail = f"exact McNemar, {fav} discordant pairs favour the variant, {unf} the baseline"
    low, high = rare.tango_interval(fav, unf, n, level)
    margin = claim.margin
    if fav + unf == 0 and margin == 0:
        return replace(_no_evidence("no discordant pairs: no evidence", n, 0.0, detail), low=low, high=high)
    if margin < 0:  # non-inferiority: Tango's score test against the margin, by inverting its bound
        detail = f"exact Tango score test against {margin:+g}, {fav} discordant pairs favour the variant, "
        detail += f"{unf} the baseline"
    return Tested(
        (fav - unf) / n,
        low,
        high,
        "Tango score",
        rare.mcnemar_p(fav, unf) if margin == 0 else _tango_p(fav, unf, n, margin),
        0.0,
        n,
        lambda lev: rare.tango_lower(fav, unf, n, lev),
        detail=detail,
    )


def _tango_p(fav: int, unf: int, n: int, margin: float) -> float:
    """Tango's (1998) one-sided score test of H0: (fav − unf)/n ≤ margin: 1 − Φ(Z(margin))."""
    return float(ndtr(-rare.tango_z(fav, unf, n, margin)))


def _fewer_events(claim: Claim, pairs: rare.Pairs, level: float) -> Tested:
    """Relative claim on rare events: the exact conservative binomial test of p_small < ρ·p_large,
    with Clopper–Pearson bounds on the ratio v/b (`stats.rare`)."""
    assert claim.threshold is not None
    n, total = pairs.n, pairs.any_event
    small, arm = (pairs.variant_events, "variant") if claim.lower else (pairs.baseline_events, "baseline")
    detail = (
        f"exact conservative binomial, {small} of the {total} examples with an event have it in the {arm}"
    )
    if total == 0:
        return _no_evidence("no event in either arm: no evidence", n, detail=detail)
    ratio = pairs.variant_events / pairs.baseline_events if pairs.baseline_events else np.inf
    rho = claim.threshold if claim.lower else 1 / claim.threshold
    p = rare.fewer_events_p(small, total, rho)
    two_sided = (1 + level) / 2
    share_low, ratio_high = (
        rare.share_lower(small, total, two_sided),
        rare.ratio_upper(small, total, two_sided),
    )
    method = "exact Clopper–Pearson (conservative)"
    if claim.lower:  # small/large is v/b
        bound = lambda lev: rare.ratio_upper(small, total, lev)  # noqa: E731
        return Tested(ratio, share_low, ratio_high, method, p, 0.0, n, bound, upper=True, detail=detail)
    inverse_bound = lambda lev: _inverse(rare.ratio_upper(small, total, lev))  # noqa: E731
    low, high = _inverse(ratio_high), _inverse(share_low)  # small/large is b/v
    return Tested(ratio, low, high, method, p, 0.0, n, inverse_bound, detail=detail)


def _improvement(d: _Data) -> np.ndarray:
    assert d.improvement is not None
    return d.improvement


def _test_all(
    data: dict[int, _Data], m: int, n_resamples: int, level: float, seed: np.random.SeedSequence
) -> dict[int, Tested]:
    """Every live claim tested. Claim i draws from child i of `seed`; plain mean claims on the same
    examples share one count matrix, drawn from the child of the first of them."""
    children = seed.spawn(m)
    out: dict[int, Tested] = {}
    groups: dict[tuple[bytes, float], list[int]] = {}
    for i, d in data.items():
        if d.exact is not None:
            out[i] = d.exact
        elif d.improvement is not None:
            key = (d.ids.tobytes() + str(d.ids.dtype).encode(), d.claim.margin)
            groups.setdefault(key, []).append(i)
        else:
            out[i] = _ratio_test(d, n_resamples, level, children[i])
    for (_, margin), members in groups.items():
        deltas = np.column_stack([_improvement(data[i]) for i in members])
        family = bca_family(
            deltas, n_resamples=n_resamples, level=level, seed=children[members[0]], null=margin
        )
        for i, res in zip(members, family, strict=True):
            out[i] = _from_bootstrap(res)
    return out


# -- the family --------------------------------------------------------------------------------


def _adjusted_se(family: FamilyResult, ses: list[float]) -> list[float]:
    """MC standard error of each BH-adjusted p: (m/j)·SE(p_(j)) at the j that attains the step-up minimum."""
    p, se = np.array(family.p_values), np.array(ses)
    m = len(p)
    order = np.argsort(p, kind="stable")
    factor = m / np.arange(1, m + 1) * (np.sum(1 / np.arange(1, m + 1)) if family.method == "by" else 1.0)
    scaled = factor * p[order]
    out = np.empty(m)
    for rank in range(m):
        j = rank + int(np.argmin(scaled[rank:]))
        out[order[rank]] = factor[j] * se[order[j]]
    return out.tolist()


def _close(tested: list[Tested], family: FamilyResult) -> list[bool]:
    """Which adjusted p-values sit within 3 MC standard errors of q (exact and no-evidence p's have none)."""
    ses = _adjusted_se(family, [0.0 if t.no_evidence else t.p_value_se for t in tested])
    return [abs(pa - family.q) < MC_SES * se for pa, se in zip(family.p_adjusted, ses, strict=True)]


def judge_claims(
    claims: tuple[Claim, ...],
    scores: pd.DataFrame,
    *,
    q: float,
    method: Method,
    n_resamples: int,
    level: float,
    seed: np.random.SeedSequence,
) -> list[Decision]:
    """The claims' decisions, in order: one BH (or BY) family at q, the 3-SE re-run, FCR bounds."""
    first, rerun, seeds_seq = seed.spawn(3)
    decisions: dict[int, Decision] = {}
    data: dict[int, _Data] = {}
    for i, claim in enumerate(claims):
        try:
            data[i] = _prepare(claim, scores, level)
        except NoData as exc:
            decisions[i] = _decision(claim, "nodata", str(exc))
    live = sorted(data)
    if not live:
        return [decisions[i] for i in range(len(claims))]

    def run(b: int, child: np.random.SeedSequence) -> tuple[list[Tested], FamilyResult]:
        tested = _test_all(data, len(claims), b, level, child)
        return [tested[i] for i in live], fdr([tested[i].p_value for i in live], q, method)

    tested, family = run(n_resamples, first)
    close = _close(tested, family)
    rerun_note = ""
    if any(close):
        tested, family = run(RERUN_FACTOR * n_resamples, rerun)
        close = _close(tested, family)
        rerun_note = f" (re-run with B = {RERUN_FACTOR * n_resamples})"
    fcr = family.fcr_level
    for k, (i, t, seq) in enumerate(zip(live, tested, seeds_seq.spawn(len(live)), strict=True)):
        d, p_adj, rejected = data[i], family.p_adjusted[k], family.rejected[k]
        signs = _signs(d)
        outcome, why = _claim_outcome(d.claim, t, p_adj, rejected, close[k], signs, q)
        if rejected and fcr is not None:  # selected: the FCR-adjusted one-sided bound (BY 2005)
            bound = t.bound(fcr)
            low, high = (None, bound) if t.upper else (bound, None)
            interval = f"FCR-adjusted one-sided {fcr:.4f} {t.method}"
        else:
            low, high, interval = t.low, t.high, f"{t.method} {level:.0%} two-sided, unadjusted"
        decisions[i] = _decision(
            d.claim,
            outcome,
            why + (rerun_note if close[k] else "") + _data_notes(d, t, seq, n_resamples, level),
            estimate=_number(t.estimate),
            low=_number(low),
            high=_number(high),
            interval=interval,
            p_value=None if t.no_evidence else t.p_value,
            p_adjusted=p_adj,
            p_value_se=None if t.no_evidence else t.p_value_se,
            n=t.n,
            seeds_positive=str(signs) if signs else "",
        )
    return [decisions[i] for i in range(len(claims))]


def _number(x: float | None) -> float | None:
    """NaN (no estimate, say a ratio of two empty arms) is reported as none."""
    return None if x is None or np.isnan(x) else float(x)


def _signs(d: _Data) -> SignConsistency | None:
    """Per-seed improvement of a per-example mean claim (the sign rule), None where it has no meaning."""
    if d.paired is None or d.claim.relative is not None or not d.paired.seed_deltas.size:
        return None
    return sign_consistency(-d.paired.seed_deltas if d.claim.lower else d.paired.seed_deltas)


def _decision(claim: Claim, outcome: Outcome, reason: str, **fields) -> Decision:
    return Decision(
        claim.name, "primary", claim.metric, claim.comparison, outcome, reason, family="primary", **fields
    )


def _measured(claim: Claim, t: Tested) -> str:
    """What the claim measured, in words: "baseline − variant = +0.05 (lower is better)"."""
    first, second = ("baseline", "variant") if claim.lower else ("variant", "baseline")
    if claim.threshold is not None:
        needs = f"needs {'≤' if claim.lower else '≥'} {claim.threshold:g}"
        text = f"ratio v/b = {t.estimate:.4g} [{t.low:.4g}, {t.high:.4g}], {needs}"
    elif claim.corpus:
        text = f"{claim.corpus}(Σ {first}) − {claim.corpus}(Σ {second}) = {t.estimate:+.4g}"
    else:
        text = f"{first} − {second} = {t.estimate:+.4g}"
    if claim.lower and claim.threshold is None:
        text += " (lower is better)"
    if claim.margin < 0:
        text += f", needs > {claim.margin:+g} (non-inferiority)"
    return f"{t.detail}: {text}" if t.detail else text


def _claim_outcome(
    claim: Claim,
    t: Tested,
    p_adj: float,
    rejected: bool,
    close: bool,
    signs: SignConsistency | None,
    q: float,
) -> tuple[Outcome, str]:
    """A primary claim passes iff BH-rejected, at least the minimum effect, and seed-consistent if asked."""
    what = _measured(claim, t)
    if t.no_evidence:
        return "no_evidence", f"{t.no_evidence}; {what}"
    if close:
        return "inconclusive", f"p_adj {p_adj:.4g} within {MC_SES:g} MC SE of q = {q}; {what}"
    if not rejected:
        return "fail", f"not significant: p_adj {p_adj:.4g} > q = {q}; {what}"
    if claim.threshold is None and t.estimate < claim.min_effect:
        return "fail", f"significant but {what} < minimum effect {claim.min_effect:+g}"
    if claim.min_positive_seeds is not None and (signs is None or signs.positive < claim.min_positive_seeds):
        return "fail", f"seeds {signs or 'none complete'} short of {claim.min_positive_seeds} positive"
    return "pass", f"p_adj {p_adj:.4g} ≤ q = {q}; {what}"


def _data_notes(d: _Data, t: Tested, seed: np.random.SeedSequence, n_resamples: int, level: float) -> str:
    """Dropped rows, small n, and (mean claims) the seed-sensitivity check against the multi-bootstrap."""
    notes = []
    if d.n_unpaired or d.n_nan:
        notes.append(f"dropped {d.n_unpaired} unpaired and {d.n_nan} NaN rows")
    if t.low_n:
        notes.append(f"small n = {t.n}: BCa undercovers")
    p = d.paired
    if d.improvement is not None and p is not None and len(p.seeds) > 1 and p.seed_deltas.shape[1] >= 2:
        grid = -p.seed_deltas if d.claim.lower else p.seed_deltas
        multi = multi_bootstrap(grid, n_resamples=n_resamples, level=level, seed=seed)
        notes.append(f"seeds × examples {multi.low:+.4g}..{multi.high:+.4g}")
        null = d.claim.margin
        if (t.low > null or t.high < null) and multi.low <= null <= multi.high:
            notes.append("seed-sensitive")
    return "; " + "; ".join(notes) if notes else ""
