"""Mission A's router parts, checked against their definitions (BEM_SPEC.md section 6)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bem.core import parity
from bem.core.cache import codes_constant_in_chunks
from bem.core.layers import BEMLinear
from bem.missions.mission_a.planner import (
    HEADS,
    RANKS,
    SPANS,
    Batch,
    MacroAction,
    MacroPolicy,
    PPOConfig,
    bc_loss,
    bias_to_raw,
    compose,
    gae,
    hysteresis,
    ppo_update,
    reward,
    rollout,
    token_experts,
)

N_EXPERTS = 3


def _policy(seed: int = 0, feature_dim: int = 6) -> MacroPolicy:
    torch.manual_seed(seed)
    return MacroPolicy(feature_dim, N_EXPERTS, d_model=32, n_layers=2, n_heads=4)


def _logits(**values: list[float]) -> dict[str, torch.Tensor]:
    sizes = {"expert": N_EXPERTS, "scope": 2, "span": 4, "rank": 4}
    return {h: torch.tensor(values.get(h, [0.0] * n)) for h, n in sizes.items()}


def test_hysteresis_never_flips_under_its_threshold() -> None:
    current = MacroAction(0, 0, 0, 0, 1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        logits = {
            h: torch.randn(n, generator=gen) * 2
            for h, n in (("expert", 3), ("scope", 2), ("span", 4), ("rank", 4))
        }
        proposed = MacroAction(
            *(int(torch.randint(n, (), generator=gen)) for n in (3, 2, 4, 4)),
            float(torch.rand((), generator=gen)) * 2,
        )
        delta = sum(
            w * float(logits[h][proposed.heads()[h]] - logits[h][current.heads()[h]])
            for h, w in (("expert", 0.4), ("scope", 0.2), ("span", 0.2), ("rank", 0.2))
        )
        out = hysteresis(current, proposed, logits, tau=0.5)
        if delta <= 0.5:
            assert out.heads() == current.heads()
        else:
            assert out.heads() == proposed.heads()
        moved = abs(proposed.bias - current.bias) > 0.1
        assert out.bias == (proposed.bias if moved else current.bias)
    # At the boundary: an advantage of exactly τ is not enough.
    exact = _logits(expert=[0.0, 1.25, 0.0])  # .4 × 1.25 = .5
    assert hysteresis(current, MacroAction(1, 0, 0, 0, 1.0), exact).expert == 0
    above = _logits(expert=[0.0, 1.26, 0.0])
    assert hysteresis(current, MacroAction(1, 0, 0, 0, 1.0), above).expert == 1


def test_actions_hold_for_their_span_and_codes_are_constant_in_chunks() -> None:
    policy = _policy()
    features = torch.randn(12, 6)
    for greedy, seed in itertools.product((True, False), range(3)):
        ep = rollout(policy, features, greedy=greedy, generator=torch.Generator().manual_seed(seed))
        i = 0
        while i < len(ep.actions):
            assert ep.decided[i]
            span = ep.actions[i].chunks
            assert all(a == ep.actions[i] for a in ep.actions[i : i + span])
            assert not any(ep.decided[i + 1 : i + span])
            i += span
        chunk = 8
        experts = token_experts(ep, chunk, 12 * chunk - 3)
        codes = nn.functional.one_hot(experts, N_EXPERTS).float().unsqueeze(0)
        assert codes_constant_in_chunks(codes, chunk)
        assert 1 <= ep.plan_length <= len(ep.actions) and 0 <= ep.flip_rate <= 1


def test_composition_respects_rank_budget_sigma_clamp_and_trust_region() -> None:
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, r = 80, 96, 64
    for scale in (0.05, 1.0, 20.0):
        A = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * scale
        B = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
        for rank, scope, bias in itertools.product(range(len(RANKS)), (0, 1), (0.1, 1.0, 2.0)):
            action = MacroAction(0, scope, 0, rank, bias)
            P, Q = compose(A, B, action, sigma_max=2.0, tau_f=5.0)
            dw = P @ Q.T
            sv = torch.linalg.svdvals(dw)
            assert int((sv > 1e-9 * sv[0]).sum()) <= RANKS[rank]
            assert float(sv[0]) <= 2.0 + 1e-9
            assert float(torch.linalg.matrix_norm(dw)) <= 5.0 + 1e-9
    # With the clamps out of reach it is the best rank-k approximation, scaled (Eckart-Young).
    A = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.01
    B = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    action = MacroAction(0, 0, 0, 1, 1.5)  # local (× .8), rank 16
    P, Q = compose(A, B, action, sigma_max=1e9, tau_f=1e9)
    u, s, vh = torch.linalg.svd(A @ B)
    best = (u[:, :16] * s[:16]) @ vh[:16] * 1.5 * 0.8
    assert torch.allclose(P @ Q.T, best, atol=1e-10)


def _gold_batch(
    n: int, k: int, feature_dim: int, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Gold plans a policy can learn: the expert is readable from the chunk's features."""
    expert = torch.randint(N_EXPERTS, (n, k), generator=gen)
    features = torch.randn(n, k, feature_dim, generator=gen) * 0.1
    features[..., :N_EXPERTS] += nn.functional.one_hot(expert, N_EXPERTS).float() * 2
    gold = {
        "expert": expert,
        "scope": (expert > 0).long(),
        "span": expert.clamp(max=len(SPANS) - 1),
        "rank": (expert + 1).clamp(max=len(RANKS) - 1),
    }
    bias = 0.5 + 0.5 * expert.float()
    return features, gold, bias


def test_behaviour_cloning_loss_falls_on_gold_plans() -> None:
    gen = torch.Generator().manual_seed(0)
    policy = _policy(feature_dim=6)
    features, gold, bias = _gold_batch(64, 8, 6, gen)
    states = torch.cat([features, torch.zeros(64, 8, policy.state_dim - 6)], dim=-1)
    mask = torch.ones(64, 8)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = bc_loss(policy(states), gold, bias, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    with torch.no_grad():
        accuracy = (policy(states).logits["expert"].argmax(-1) == gold["expert"]).float().mean()
    assert accuracy > 0.95


def test_bc_loss_weights_the_expert_head_and_uses_only_decision_chunks() -> None:
    gen = torch.Generator().manual_seed(1)
    policy = _policy()
    features, gold, bias = _gold_batch(4, 5, 6, gen)
    out = policy(torch.cat([features, torch.zeros(4, 5, policy.state_dim - 6)], dim=-1))
    mask = torch.zeros(4, 5)
    mask[:, 0] = 1
    ce = {h: nn.functional.cross_entropy(out.logits[h][:, 0], gold[h][:, 0]) for h in HEADS}
    mse = nn.functional.mse_loss(0.1 + 1.9 * torch.sigmoid(out.bias_mu[:, 0]), bias[:, 0])
    expected = 2 * ce["expert"] + ce["scope"] + ce["span"] + ce["rank"] + mse
    assert torch.allclose(bc_loss(out, gold, bias, mask), expected)


def _ppo_batch(policy: MacroPolicy, gen: torch.Generator) -> Batch:
    eps = [rollout(policy, torch.randn(6, 6, generator=gen), greedy=False, generator=gen) for _ in range(8)]
    rewards = torch.stack(
        [
            torch.tensor([reward(float(e.actions[i].expert == 1), e.flip_rate, 1.0) for i in range(6)])
            for e in eps
        ]
    )
    advs, rets = zip(*(gae(r, e.value) for r, e in zip(rewards, eps, strict=True)), strict=True)
    return Batch(
        states=torch.stack([e.states for e in eps]),
        actions={h: torch.stack([e.sampled[h] for e in eps]) for h in HEADS},
        bias_raw=torch.stack([e.bias_raw for e in eps]),
        old_log_prob=torch.stack([e.log_prob for e in eps]),
        advantages=torch.stack(advs),
        returns=torch.stack(rets),
        mask=torch.tensor([e.decided for e in eps]).float(),
    )


def test_policy_update_stops_when_kl_exceeds_its_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    policy = _policy()
    batch = _ppo_batch(policy, gen)
    cfg = PPOConfig(epochs=4, kl_target=0.01, kl_stop=1.5)
    big = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=5.0), batch, cfg)
    assert big.stopped_early and big.epochs_run < cfg.epochs and big.kl > 1.5 * 0.01
    policy = _policy()
    batch = _ppo_batch(policy, torch.Generator().manual_seed(0))
    small = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=1e-6), batch, cfg)
    assert not small.stopped_early and small.epochs_run == cfg.epochs and small.kl <= 1.5 * 0.01


def test_gae_matches_its_recursion_and_reward_its_formula() -> None:
    r = torch.tensor([1.0, 0.0, 2.0])
    v = torch.tensor([0.5, 0.2, 0.1])
    adv, ret = gae(r, v, gamma=0.9, lam=0.8)
    d2 = 2.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    expected = torch.tensor([d0 + 0.72 * (d1 + 0.72 * d2), d1 + 0.72 * d2, d2])
    assert torch.allclose(adv, expected) and torch.allclose(ret, expected + v)
    assert reward(1.0, 0.0, 1.0) == pytest.approx(1.0)
    assert reward(0.5, 0.3, 0.0) == pytest.approx(0.6 * 0.5 + 0.2 * 0.4)
    assert reward(0.0, 0.9, 1.0) == pytest.approx(0.2)


def test_bias_round_trips_through_its_squashing() -> None:
    b = torch.tensor([0.1001, 0.5, 1.0, 1.999])
    assert torch.allclose(0.1 + 1.9 * torch.sigmoid(bias_to_raw(b)), b, atol=1e-3)


def test_parity_counts_adapter_parameters_and_per_token_flops() -> None:
    torch.manual_seed(0)
    sites = [(64, 128, 8), (128, 64, 8)]
    layers = [BEMLinear(nn.Linear(d_in, d_out), r) for d_in, d_out, r in sites]
    controller = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    branch = [nn.ParameterList([layer.U, layer.V]) for layer in layers]
    expected_params = sum(r * (d_in + d_out) for d_in, d_out, r in sites) + (64 * 32 + 32 + 32 * 16 + 16)
    anchor = parity.cost([*branch, controller], sites, controller, tokens_per_call=32)
    assert anchor.parameters == expected_params  # the frozen base weights are not counted
    assert anchor.flops_per_token == 2 * (8 * 192 + 8 * 192) + 2 * (64 * 32 + 32 * 16) / 32
    same = parity.parity(anchor, anchor)
    assert same.ok and same.parameter_ratio == 1.0
    bigger = parity.Cost(int(anchor.parameters * 1.06), anchor.flops_per_token)
    assert not parity.parity(bigger, anchor).ok
    policy = _policy()
    attn = policy.encoder.layers[0].self_attn
    assert parity.linear_flops(attn) == 2 * 3 * 32 * 32 + 2 * 32 * 32
