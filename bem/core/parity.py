"""Adapter parity (BEM_SPEC.md section 11): compare what two arms *add* to the frozen base, in
parameters and in per-token FLOPs, never whole-model parameters.

Per-token adapter FLOPs = 2·Σ_sites r·(d_in + d_out) (the low-rank branch: x·V then ·Uᵀ, a multiply
and an add per weight) + the controller's (or router's) FLOPs per call / the tokens it serves (a chunk
router runs once per chunk of N tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where modules are counted: fleetd checks parity at submit without it
    from torch import nn


def adapter_parameters(modules: Iterable[nn.Module]) -> int:
    """Every parameter of the added modules (bases, controllers, routers, gates), each counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def linear_flops(module: nn.Module) -> int:
    """FLOPs of one call that runs every linear map of `module` once per position: 2·in·out each.

    nn.MultiheadAttention keeps its q/k/v projection as a bare parameter (in_proj_weight), counted as
    three d×d maps; the attention scores themselves grow with the sequence and are left out, which
    suits chunk routers over a handful of chunks.
    """
    from torch import nn

    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            total += 2 * m.in_proj_weight.shape[0] * m.in_proj_weight.shape[1]
    return total


def branch_flops_per_token(sites: Sequence[tuple[int, int, int]]) -> int:
    """2·Σ r·(d_in + d_out) over (d_in, d_out, r) sites."""
    return 2 * sum(r * (d_in + d_out) for d_in, d_out, r in sites)


@dataclass(frozen=True)
class Cost:
    parameters: int
    flops_per_token: float


def cost(
    modules: Iterable[nn.Module],
    sites: Sequence[tuple[int, int, int]],
    controller: nn.Module | None = None,
    tokens_per_call: int = 1,
) -> Cost:
    ctrl = linear_flops(controller) / tokens_per_call if controller is not None else 0.0
    return Cost(adapter_parameters(modules), branch_flops_per_token(sites) + ctrl)


@dataclass(frozen=True)
class Parity:
    parameter_ratio: float
    flops_ratio: float
    tolerance: float

    @property
    def ok(self) -> bool:
        lo, hi = 1 - self.tolerance, 1 + self.tolerance
        return lo <= self.parameter_ratio <= hi and lo <= self.flops_ratio <= hi


def parity(variant: Cost, anchor: Cost, tolerance: float = 0.05) -> Parity:
    return Parity(
        variant.parameters / anchor.parameters, variant.flops_per_token / anchor.flops_per_token, tolerance
    )
