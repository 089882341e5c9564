"""The suite's arms as shapes: what each adds to the frozen base, counted without torch, and the knobs
that put each variant at parity with the rank-8 anchor (BEM_SPEC.md section 11, issue 20).

Every text arm is the frozen base plus sites at W_O and W_down of each layer and one controller
(`SimpleController`, reading the prompt's adapter-off mean state once per example):

| arm | W_O | W_down | also | the controller's code |
|---|---|---|---|---|
| anchor | BEM rank 8 | BEM rank 8 | | 8 + 8 per layer |
| V1 | PT1, γ from the code | PT2 (16 keep 8), top `dyn_layers` only | | 4 + 16 |
| V2 | PT1, γ from the code refined by attention statistics (T learnt) | BEM rank 8 | | 4 + 8 |
| V3 | BEM rank 8 | PT3, z modulated by the code | | 8 + r_u·r_v |
| V4 | BEM rank 8 | BEM rank 8 | PT4 FiLM after each layer | 8 + 8 |

Each variant has free knobs (its ranks, widths and the controller's hidden width); `fit` picks the
knobs whose worse ratio to the anchor is smallest, and `check` refuses knobs set by hand (params
`variants.V3 = {kron_ranks = [8, 8]}`) that leave ±5%, at submit, with the numbers.

MM (the multimodal mini) is judged against its own baseline, not the anchor: MM is the anchor's sites
with a controller reading the text and the image features and a conflict gate between them;
MM_prefix feeds the same image features to the frozen base as `prefix` projected embeddings. Their
parity is in trainable parameters (the issue's "equal trainable parameters"; a prefix's cost is the
base's own work on extra positions, not an adapter's FLOPs). The shared encoder is on both sides and
reported apart.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bem.core.parity import Cost, Parity, parity
from bem.missions.v13 import parity as P

TEXT_ARMS = ("anchor", "V1", "V2", "V3", "V4")
MM_ARMS = ("MM", "MM_prefix")
ARMS = TEXT_ARMS + MM_ARMS
RANK = 8  # the anchor's
GROUPS = 4  # PT1's head groups
STATS = 3  # per head: entropy, largest weight, its position
DYN_RANK, DYN_KEEP = 16, 8  # PT2
# The controller runs once per example on its prompt; its FLOPs are shared by the tokens it serves,
# counted as one BEM chunk (BEM_SPEC section 3).
TOKENS_PER_CALL = 32
ANCHOR_HIDDEN = 64  # the anchor's controller


@dataclass(frozen=True)
class Shape:
    """What parity needs of the base: Llama's widths."""

    d_model: int
    heads: int
    d_ff: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @classmethod
    def of_config(cls, config: Mapping[str, Any]) -> Shape:
        return cls(
            int(config["hidden_size"]),
            int(config["num_attention_heads"]),
            int(config["intermediate_size"]),
            int(config["num_hidden_layers"]),
        )


# The v13 smoke base (`data.smoke_mixture` builds its recipe from this).
SMOKE = Shape(d_model=128, heads=4, d_ff=256, layers=2)


@dataclass(frozen=True)
class Knobs:
    """Every arm's free sizes; an arm reads the ones it uses."""

    hidden: int = ANCHOR_HIDDEN  # the controller's
    group_rank: int = 2  # PT1: rank per head group
    gate_hidden: int = 16  # V2's statistics MLP
    dyn_layers: int = 1  # V1: PT2 in the top this-many layers
    kron_ranks: tuple[int, int] = (4, 4)  # PT3: (r_u, r_v)
    film_hidden: int = 8  # PT4
    encoder: int = 32  # MM: channels of the encoder's last convolution
    prefix: int = 4  # MM_prefix: prefix embeddings, one per cell of the scene's grid
    prefix_hidden: int = 32  # MM_prefix: the projection's hidden width


def controller(d_in: int, code: int, hidden: int) -> Cost:
    """`bem.core.controllers.SimpleController(d_in, code, hidden)`: LayerNorm, d → h → h/2 → code, and
    the uncertainty gate d → max(8, d/4) → 1 with its temperature; once per `TOKENS_PER_CALL` tokens."""
    net = P.mlp([d_in, hidden, hidden // 2, code])
    gate = P.mlp([d_in, max(8, d_in // 4), 1])
    params = 2 * d_in + net.parameters + gate.parameters + 1
    return Cost(params, (net.flops_per_token + gate.flops_per_token) / TOKENS_PER_CALL)


def encoder(channels: int) -> Cost:
    """MM's CNN (`mm.Encoder`): three 3×3 convolutions, 3 → c/2 → c → c, pooled to the 2×2 grid."""
    c = channels
    params = sum(9 * a * b + b for a, b in ((3, c // 2), (c // 2, c), (c, c)))
    return Cost(params, 0.0)


def encoder_features(k: Knobs) -> int:
    return 4 * k.encoder  # the 2×2 grid's cells side by side


def cost(arm: str, s: Shape, k: Knobs) -> Cost:
    """What `arm` adds to the frozen base (the MM encoder excluded: `encoder`)."""
    d, f, L = s.d_model, s.d_ff, s.layers
    anchor_o, anchor_down = P.low_rank(d, d, RANK), P.low_rank(f, d, RANK)
    pt1 = P.head_groups(s.heads, s.head_dim, d, GROUPS, k.group_rank, k.gate_hidden, STATS)
    branch = GROUPS * k.group_rank * (d // GROUPS + d)  # PT1 without V2's statistics gate
    pt1_plain = Cost(branch, 2 * branch)
    if arm in ("anchor", "MM"):
        sites = [anchor_o, anchor_down] * L
        code = 2 * RANK * L
        d_in = d + encoder_features(k) if arm == "MM" else d
        parts = [*sites, controller(d_in, code, k.hidden)]
        if arm == "MM":  # the conflict gate and the text-only code head (`mm.MMController`)
            parts += [P.mlp([d_in, 1]), P.mlp([d, code])]
        return P.total(parts)
    if arm == "V1":
        dyn = P.dynamic_rank(f, d, DYN_RANK, DYN_KEEP)
        parts = [pt1_plain] * L + [dyn] * k.dyn_layers
        return P.total([*parts, controller(d, GROUPS * L + DYN_RANK * k.dyn_layers, k.hidden)])
    if arm == "V2":
        return P.total([pt1, anchor_down] * L + [controller(d, (GROUPS + RANK) * L, k.hidden)])
    if arm == "V3":
        u, v = kronecker_factors(f)
        kron = P.kronecker(u, v, d, k.kron_ranks)
        code = (RANK + k.kron_ranks[0] * k.kron_ranks[1]) * L
        return P.total([anchor_o, kron] * L + [controller(d, code, k.hidden)])
    if arm == "V4":
        film = P.film(d, k.film_hidden)
        per_call = P.mlp([d, k.film_hidden, 2 * d]).flops_per_token / TOKENS_PER_CALL
        film = Cost(film.parameters, film.flops_per_token + per_call)
        return P.total([anchor_o, anchor_down, film] * L + [controller(d, 2 * RANK * L, k.hidden)])
    if arm == "MM_prefix":
        e = encoder_features(k)
        return P.mlp([e, k.prefix_hidden, k.prefix * d])
    raise ValueError(f"unknown arm {arm!r}; arms: {list(ARMS)}")


# u × v = d_ff for the sizes section 11 names; other sizes take the most balanced factor pair.
KRONECKER_FACTORS = {3072: (64, 48), 11008: (86, 128), 128: (16, 8)}


def kronecker_factors(d: int) -> tuple[int, int]:
    """PT3's (u, v) with u·v = d: section 11's pairs where it names them, else the most balanced pair
    (here, torch-free, so parity counts and `mechanisms.KroneckerDown` read the same)."""
    u = max(x for x in range(1, int(d**0.5) + 1) if d % x == 0)
    return KRONECKER_FACTORS.get(d, (d // u, u))


def baseline_of(arm: str) -> str:
    """What `arm` is held to: MM's baseline to MM, MM to itself (it is the reference), the rest to the
    anchor."""
    return "MM" if arm in MM_ARMS else "anchor"


def ratios(arm: str, s: Shape, k: Knobs) -> Parity:
    """`arm` against its baseline: MM_prefix against MM on parameters (FLOPs are reported, not held)."""
    base = baseline_of(arm)
    got, want = cost(arm, s, k), cost(base, s, Knobs() if base == "anchor" else k)
    return parity(got, want, P.TOLERANCE)


def within(arm: str, result: Parity) -> bool:
    if arm == "MM_prefix":
        return abs(result.parameter_ratio - 1) <= result.tolerance
    return result.ok


# ---- fitting ---------------------------------------------------------------------------------------

# What `fit` may vary per arm, and over which values (the rest stay at `Knobs()`).
SEARCH: dict[str, dict[str, tuple[Any, ...]]] = {
    "anchor": {},
    "MM": {},
    "V1": {"group_rank": tuple(range(1, 9)), "dyn_layers": tuple(range(1, 9))},
    "V2": {"group_rank": tuple(range(1, 9)), "gate_hidden": (8, 16, 32)},
    "V3": {"kron_ranks": tuple(itertools.product(range(1, 9), repeat=2))},
    "V4": {"film_hidden": tuple(range(2, 65, 2))},
    "MM_prefix": {"prefix_hidden": tuple(range(4, 513, 2))},
}
HIDDEN_CHOICES = tuple(range(8, 257, 2))


def _candidates(arm: str, s: Shape, base: Knobs) -> Iterator[Knobs]:
    axes = dict(SEARCH[arm])
    if arm == "V1":
        axes["dyn_layers"] = tuple(n for n in axes["dyn_layers"] if n <= s.layers)
    if arm not in ("anchor", "MM", "MM_prefix"):
        axes["hidden"] = HIDDEN_CHOICES
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        yield replace(base, **dict(zip(names, values, strict=True)))


def _badness(arm: str, result: Parity) -> float:
    if arm == "MM_prefix":
        return abs(result.parameter_ratio - 1)
    return max(abs(result.parameter_ratio - 1), abs(result.flops_ratio - 1))


@functools.lru_cache(maxsize=256)
def fit(arm: str, s: Shape, base: Knobs = Knobs()) -> Knobs:
    """The knobs nearest parity for `arm` at shape `s` (the anchor's and MM's are fixed). A search of
    a few thousand candidates, cached: submit checks every task's arm."""
    best = min(_candidates(arm, s, base), key=lambda k: (_badness(arm, ratios(arm, s, k)), k.hidden))
    return best


def knobs_for(arm: str, s: Shape, overrides: Mapping[str, Any] | None = None) -> Knobs:
    """Fitted knobs, or the ones `overrides` sets (params `variants.<arm>`); not checked here."""
    if not overrides:
        return fit(arm, s)
    unknown = sorted(set(overrides) - set(Knobs.__dataclass_fields__))
    if unknown:
        raise ValueError(f"params.variants.{arm}: unknown knobs {unknown}; knobs: {list(asdict(Knobs()))}")
    values: dict[str, Any] = {key: tuple(v) if isinstance(v, list) else v for key, v in overrides.items()}
    return replace(fit(arm, s), **values)


def require(arm: str, s: Shape, k: Knobs) -> Parity:
    """The arm's ratios to its baseline, or ParityError naming them."""
    result = ratios(arm, s, k)
    if not within(arm, result):
        raise P.ParityError(arm, result)
    return result


def shape_of(params: Mapping[str, Any]) -> Shape:
    """The base's shape: params.base's config.json, else the smoke base's."""
    if params.get("base"):
        path = Path(str(params["base"])) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"params.base: no config.json at {path}")
        return Shape.of_config(json.loads(path.read_text()))
    return SMOKE


def check(params: Mapping[str, Any]) -> dict[str, Parity]:
    """Submit's check: each arm the task runs at parity with its baseline, or ParityError. A base
    folder this host cannot read (a worker's, on another host) leaves it to the task, which checks
    the same at its start."""
    try:
        s = shape_of(params)
    except FileNotFoundError:
        return {}
    arms = [str(params["arm"])] if params.get("arm") else list(ARMS)
    variants: Mapping[str, Any] = params.get("variants") or {}
    unknown = sorted(set(variants) - set(ARMS))
    if unknown:
        raise ValueError(f"params.variants: unknown arms {unknown}; arms: {list(ARMS)}")
    out = {}
    for arm in arms:
        if arm == "anchor" and variants.get("anchor"):
            raise ValueError("params.variants.anchor: the anchor defines parity and has no knobs")
        out[arm] = require(arm, s, knobs_for(arm, s, variants.get(arm)))
    return out
