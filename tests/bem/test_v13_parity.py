"""Parity counts: exact on hand-computed cases, equal to the modules' own parameters, and a variant 6%
over the anchor is refused with its numbers."""

from __future__ import annotations

import pytest
import torch

from bem.missions.v13 import mechanisms as M
from bem.missions.v13 import parity as P


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_counts_by_hand() -> None:
    # The anchor at a 64 → 128 site, rank 8: 8·(64 + 128) = 1536 weights, 2 FLOPs each.
    assert P.low_rank(64, 128, 8) == P.Cost(1536, 3072)
    # PT2, rank 16 keeping 8, 64 → 128: A 16·64 + B 128·16 + s 16 = 3088; FLOPs 2·16·(64 + 128), dense.
    assert P.dynamic_rank(64, 128, 16, 8) == P.Cost(3088, 2 * 16 * (64 + 128))
    # PT3 at 128 = 16 × 8 → 64, ranks 8 × 8: U 8·16 + V 8·8 + P 64·64 = 4288.
    assert P.kronecker(16, 8, 64, (8, 8)) == P.Cost(4288, 2 * (8 * 16 * 8 + 8 * 8 * 8 + 64 * 64))
    # PT4 at d 16, hidden 32: LN 32, MLP 16·32 + 32 + 32·32 + 32 = 1600.
    assert P.film(16, 32) == P.Cost(32 + 1600, 48)


def test_counts_are_the_modules_own() -> None:
    assert P.dynamic_rank(64, 128, 16, 8).parameters == params(M.DynamicRank(64, 128, 16, 8))
    assert P.kronecker(16, 8, 64, (8, 8)).parameters == params(M.KroneckerDown(128, 64, (8, 8)))
    assert P.film(16, 32).parameters == params(M.ResidualFiLM(16, 32))
    pt1 = P.head_groups(heads=8, head_dim=4, d_out=32, groups=4, rank=2, gate_hidden=16, stats=3)
    lora = M.HeadGroupLoRA(heads=8, head_dim=4, d_out=32, groups=4, rank=2)
    gate = M.HeadGate(heads=8, stats=3, groups=4, hidden=16)
    assert pt1.parameters == params(lora) + params(gate)


def test_a_variant_six_percent_over_is_refused_with_its_numbers() -> None:
    anchor = P.Cost(10_000, 20_000.0)
    assert P.require_parity("close", P.Cost(10_400, 19_200.0), anchor).ok
    with pytest.raises(P.ParityError, match=r"parameters 1\.060×"):
        P.require_parity("V9", P.Cost(10_600, 20_000.0), anchor)
    with pytest.raises(P.ParityError, match=r"FLOPs 0\.940×"):
        P.require_parity("V9", P.Cost(10_000, 18_800.0), anchor)
