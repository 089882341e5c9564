"""Section 11's mechanisms against their definitions: PT1's groups, PT2's exactly-k ranks, PT3's
Kronecker factors and exact SVD initialisation, PT4's ranges and its identity on NaN."""

from __future__ import annotations

import pytest
import torch

from bem.missions.v13 import mechanisms as M


def test_pt1_one_group_is_its_own_low_rank_map_on_its_heads() -> None:
    torch.manual_seed(0)
    lora = M.HeadGroupLoRA(heads=8, head_dim=4, d_out=6, groups=4, rank=2)
    with torch.no_grad():
        lora.up.normal_()
    x = torch.randn(3, 32)
    for g in range(4):
        gamma = torch.zeros(3, 4)
        gamma[:, g] = 1.0
        by_hand = x[:, 8 * g : 8 * (g + 1)] @ lora.down[g].T @ lora.up[g].T
        assert torch.allclose(lora(x, gamma), by_hand, atol=1e-5)
    # γ mixes the groups linearly.
    half = torch.full((3, 4), 0.25)
    assert torch.allclose(
        lora(x, half), sum(lora(x, torch.eye(4)[g].expand(3, 4)) for g in range(4)) / 4, atol=1e-5
    )
    with pytest.raises(ValueError, match="equal groups"):
        M.HeadGroupLoRA(heads=6, head_dim=4, d_out=6, groups=4)


def test_pt1_gate_reads_attention_statistics() -> None:
    weights = torch.softmax(torch.randn(2, 8, 5, 7), dim=-1)
    stats = M.attention_stats(weights)
    assert stats.shape == (2, 5, 8, 3)
    one_hot = torch.zeros(1, 1, 1, 7)
    one_hot[..., 3] = 1.0
    entropy, top, position = M.attention_stats(one_hot)[0, 0, 0]
    assert (
        entropy.item() == pytest.approx(0.0, abs=1e-6)
        and top.item() == 1.0
        and position.item() == pytest.approx(3 / 7)  # the query is position 6: 3 keys back, of 7 seen
    )
    gamma = M.HeadGate(heads=8, stats=3, learn_temperature=True)(stats)
    assert gamma.shape == (2, 5, 4) and torch.allclose(gamma.sum(-1), torch.ones(2, 5))


def test_pt2_keeps_exactly_k_ranks_at_inference_and_in_training_forward() -> None:
    torch.manual_seed(0)
    dyn = M.DynamicRank(d_in=10, d_out=5, rank=16, keep=8).eval()
    logits = torch.randn(4, 3, 16)
    mask = dyn.mask(logits)
    assert torch.equal(mask.sum(-1), torch.full((4, 3), 8.0))
    assert torch.equal(mask.bool(), torch.zeros_like(mask).scatter(-1, logits.topk(8, -1).indices, 1).bool())
    # Only the kept ranks matter: changing a dropped rank's A row changes nothing.
    with torch.no_grad():
        dyn.up.weight.normal_()
    x = torch.randn(4, 3, 10)
    before = dyn(x, logits)
    dropped = int((mask[0, 0] == 0).nonzero()[0])
    with torch.no_grad():
        dyn.down.weight[dropped] += 5.0
    after = dyn(x, logits)
    assert torch.allclose(before[0, 0], after[0, 0]) and not torch.allclose(before, after)
    # Training: exactly k ones forward, a gradient to the logits backward.
    dyn.train()
    learnt = logits.clone().requires_grad_(True)
    train_mask = dyn.mask(learnt)
    assert torch.equal(train_mask.detach().sum(-1), torch.full((4, 3), 8.0))
    assert set(train_mask.detach().unique().tolist()) <= {0.0, 1.0}
    dyn(x, learnt).pow(2).sum().backward()
    assert learnt.grad is not None and learnt.grad.abs().sum() > 0


@pytest.mark.parametrize("d_ff", [3072, 11008, 128, 256, 4864])
def test_pt3_factors_multiply_to_d_ff(d_ff: int) -> None:
    u, v = M.kronecker_factors(d_ff)
    assert u * v == d_ff
    assert M.kronecker_factors(3072) == (64, 48) and M.kronecker_factors(11008) == (86, 128)


def test_pt3_svd_initialisation_recovers_a_delta_in_its_own_kronecker_form() -> None:
    torch.manual_seed(0)
    made = M.KroneckerDown(d_in=128, d_out=24, ranks=(8, 8))  # 128 = 16 × 8
    with torch.no_grad():
        made.P.normal_()
    delta = made.delta_weight()
    x = torch.randn(5, 128)
    assert torch.allclose(made(x), x @ delta.T, atol=1e-4)  # the forward is ΔW·x
    fresh = M.KroneckerDown(d_in=128, d_out=24, ranks=(8, 8))
    fresh.from_delta(delta)
    assert torch.allclose(fresh.delta_weight(), delta, atol=1e-4)
    # A generic ΔW is not of that form: the initialisation is then its projection, not equal to it.
    other = torch.randn(24, 128)
    fresh.from_delta(other)
    assert not torch.allclose(fresh.delta_weight(), other, atol=1e-2)


def test_pt4_keeps_gamma_and_beta_in_range_starts_at_identity_and_turns_nan_into_identity() -> None:
    torch.manual_seed(0)
    film = M.ResidualFiLM(d_model=16)
    h = torch.randn(3, 7, 16)
    assert torch.allclose(film(h), h)  # γ = 1, β = 0 at the start
    with torch.no_grad():
        for p in film.mlp.parameters():
            p.normal_(std=50.0)
    gamma, beta = film.film(h)
    assert (gamma >= 0.8).all() and (gamma <= 1.2).all() and (beta.abs() <= 0.1).all()
    assert not torch.allclose(film(h), h)
    poisoned = h.clone()
    poisoned[1, 2, 3] = float("nan")
    out = film(poisoned)
    assert torch.equal(out[1].isnan(), poisoned[1].isnan())  # row 1 kept as it was
    assert torch.allclose(out[1].nan_to_num(), poisoned[1].nan_to_num())
    assert torch.allclose(out[0], film(h)[0])  # the other rows still modulated
