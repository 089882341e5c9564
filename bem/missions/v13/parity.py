"""Parity of the v1.3 mechanisms with the rank-8 anchor (BEM_SPEC.md section 11), counted from shapes.

Each mechanism's added parameters and per-token FLOPs (a multiply and an add per weight a token meets,
2 per weight; `bem.core.parity`'s convention), exactly as the modules in `mechanisms` hold and run
them (the tests count the modules' own parameters). A variant is a list of sites, each a mechanism
with its shapes; `require_parity` refuses one outside ±5% of the anchor on either count, naming the
numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from bem.core.parity import Cost, Parity, parity

TOLERANCE = 0.05


def low_rank(d_in: int, d_out: int, rank: int) -> Cost:
    """The anchor's branch at one site: U (d_out × r) and V (r × d_in)."""
    return Cost(rank * (d_in + d_out), 2 * rank * (d_in + d_out))


def mlp(widths: Sequence[int]) -> Cost:
    """Linear layers with biases, widths[0] → … → widths[-1]."""
    params = sum(a * b + b for a, b in itertools.pairwise(widths))
    flops = sum(2 * a * b for a, b in itertools.pairwise(widths))
    return Cost(params, flops)


def head_groups(
    heads: int, head_dim: int, d_out: int, groups: int, rank: int, gate_hidden: int, stats: int
) -> Cost:
    """PT1: per group A_g (r × heads/groups·head_dim) and B_g (d_out × r), and the gate's MLP over
    the heads' statistics (plus its temperature, one number)."""
    width = heads // groups * head_dim
    branch = Cost(groups * rank * (width + d_out), 2 * groups * rank * (width + d_out))
    gate = mlp([heads * stats, gate_hidden, groups])
    return Cost(branch.parameters + gate.parameters + 1, branch.flops_per_token + gate.flops_per_token)


def dynamic_rank(d_in: int, d_out: int, rank: int, keep: int) -> Cost:
    """PT2: A (r × d_in), B (d_out × r), s (r). FLOPs as `DynamicRank` runs them: both maps dense over
    all r ranks, the dropped ones multiplied by 0 (each example keeps its own k, so computing only the
    kept columns of B would need a gather per example). `keep` sets the mask, not the cost."""
    del keep
    return Cost(rank * (d_in + d_out) + rank, 2 * rank * (d_in + d_out))


def kronecker(u: int, v: int, d_out: int, ranks: tuple[int, int]) -> Cost:
    """PT3: U (r_u × u), V (r_v × v), P (d_out × r_u·r_v); FLOPs of U·X (r_u·u·v), ·Vᵀ (r_u·v·r_v)
    and P·z (d_out·r_u·r_v)."""
    r_u, r_v = ranks
    params = r_u * u + r_v * v + d_out * r_u * r_v
    return Cost(params, 2 * (r_u * u * v + r_u * v * r_v + d_out * r_u * r_v))


def film(d_model: int, hidden: int) -> Cost:
    """PT4: the LayerNorm's scale and shift, and the MLP d → hidden → 2d (run once per sequence on
    the mean state, so its per-token FLOPs are the modulation's: 3 per element)."""
    head = mlp([d_model, hidden, 2 * d_model])
    return Cost(2 * d_model + head.parameters, 3 * d_model)


def total(costs: Sequence[Cost]) -> Cost:
    return Cost(sum(c.parameters for c in costs), sum(c.flops_per_token for c in costs))


class ParityError(ValueError):
    """A variant off parity, with its ratios in the message."""

    def __init__(self, variant: str, result: Parity) -> None:
        band = f"{1 - result.tolerance:.2f}-{1 + result.tolerance:.2f}×"
        super().__init__(
            f"{variant} is off parity with the rank-8 anchor: parameters {result.parameter_ratio:.3f}×, "
            f"per-token FLOPs {result.flops_ratio:.3f}× (each must be within {band})"
        )
        self.variant, self.result = variant, result


def require_parity(name: str, variant: Cost, anchor: Cost, tolerance: float = TOLERANCE) -> Parity:
    result = parity(variant, anchor, tolerance)
    if not result.ok:
        raise ParityError(name, result)
    return result
