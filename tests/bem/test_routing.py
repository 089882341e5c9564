"""Chunk-sticky router: hysteresis, chunk-constant gates, lag causality, gradients, regularisers."""

from __future__ import annotations

import math

import pytest
import torch

from bem.core.routing import (
    ChunkStickyRouter,
    RouterLossWeights,
    anneal_temperature,
    balance_loss,
    chunk_means,
    decorrelation_loss,
    entropy_loss,
    expand_to_tokens,
    flip_loss,
    router_regularisers,
    sticky_decisions,
)

D, E, N = 16, 3, 4


def make_router(**kwargs) -> ChunkStickyRouter:
    return ChunkStickyRouter(D, E, chunk_size=N, **kwargs)


# -- hysteresis --


@pytest.mark.parametrize("margin, switches", [(0.6, False), (0.8, True)])
def test_switch_only_above_hysteresis(margin: float, switches: bool) -> None:
    # Chunk 0 stays on expert 0 (zero logits); chunk 1 prefers expert 2 by `margin` over the current one.
    logits = torch.zeros(1, 2, E)
    logits[0, 1] = torch.tensor([1.0, 0.5, 1.0 + margin])
    experts = sticky_decisions(logits, hysteresis=0.7)
    assert experts[0, 0] == 0
    assert experts[0, 1] == (2 if switches else 0)


def test_margin_equal_to_hysteresis_does_not_switch() -> None:
    logits = torch.zeros(1, 2, E)
    logits[0, 1] = torch.tensor([1.0, 0.0, 1.5])  # margin .5, exact in binary
    assert sticky_decisions(logits, hysteresis=0.5)[0, 1] == 0
    assert sticky_decisions(logits, hysteresis=0.25)[0, 1] == 2


def test_margin_is_measured_against_the_current_expert_not_the_runner_up() -> None:
    # Chunk 2: expert 1 leads the runner-up (0) by only .1 but the current expert (2) by 1.0, so it switches.
    # Chunk 3: expert 2 leads the current expert (1) by .5 only, so it stays, however far behind expert 0 is.
    logits = torch.zeros(1, 4, E)
    logits[0, 1] = torch.tensor([0.0, 0.0, 1.0])
    logits[0, 2] = torch.tensor([0.9, 1.0, 0.0])
    logits[0, 3] = torch.tensor([-5.0, 0.5, 1.0])
    assert sticky_decisions(logits, hysteresis=0.7).tolist() == [[0, 2, 1, 1]]


def test_sticky_decisions_are_per_row() -> None:
    logits = torch.zeros(2, 2, E)
    logits[0, 1, 1] = 2.0
    logits[1, 1, 1] = 0.5
    assert sticky_decisions(logits, hysteresis=0.7)[:, 1].tolist() == [1, 0]


def test_forward_uses_sticky_decisions_on_its_logits() -> None:
    router = make_router(hysteresis=0.0).eval()
    out = router(torch.randn(3, 5 * N, D) * 3)
    assert torch.equal(out.experts, sticky_decisions(out.logits, 0.0))
    assert out.logits.shape == out.probs.shape == out.gates.shape == (3, 5, E)


# -- chunk windows, lag and padding --


def test_token_gates_constant_within_each_chunk_window() -> None:
    router = make_router().train()
    t = 3 * N + 2  # partial last chunk
    out = router(torch.randn(2, t, D))
    tok = out.token_gates(t)
    assert tok.shape == (2, t, E)
    for pos in range(t):
        assert torch.equal(tok[:, pos], out.gates[:, pos // N])


def test_expand_to_tokens_rejects_wrong_chunk_count() -> None:
    with pytest.raises(ValueError, match="chunks"):
        expand_to_tokens(torch.zeros(1, 2, E), 3 * N, N)


def test_chunk_zero_has_zero_logits_and_the_initial_expert() -> None:
    out = make_router(initial_expert=2).eval()(torch.randn(2, 3 * N, D))
    assert torch.equal(out.logits[:, 0], torch.zeros(2, E))
    assert out.experts[:, 0].tolist() == [2, 2]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_lag_changing_chunk_k_affects_only_later_chunks(k: int) -> None:
    router = make_router(hysteresis=0.0).eval()
    hidden = torch.randn(2, 5 * N, D)
    edited = hidden.clone()
    edited[:, k * N : (k + 1) * N] = torch.randn(2, N, D) * 5
    a, b = router(hidden), router(edited)
    assert torch.equal(a.logits[:, : k + 1], b.logits[:, : k + 1])
    assert torch.equal(a.experts[:, : k + 1], b.experts[:, : k + 1])
    assert not torch.allclose(a.logits[:, k + 1], b.logits[:, k + 1])  # chunk k is read by chunk k+1
    assert torch.equal(a.logits[:, k + 2 :], b.logits[:, k + 2 :])  # and by nothing else directly


def test_padded_tokens_do_not_change_chunk_means() -> None:
    router = make_router().eval()
    t = 3 * N
    hidden = torch.randn(2, t, D)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[0, N + 1 : 2 * N] = 0  # part of chunk 1
    mask[1, :2] = 0  # left padding in chunk 0
    junk = hidden.clone()
    junk[mask == 0] = torch.randn(int((mask == 0).sum()), D) * 100
    junk[0, N + 1] = float("inf")
    a, b = router(hidden, mask), router(junk, mask)
    assert torch.equal(a.logits, b.logits)
    # The masked mean equals the plain mean over the real tokens only.
    tokens = router.mlp(hidden).float()
    assert torch.allclose(a.logits[0, 2], tokens[0, N : N + 1].mean(0))
    assert torch.allclose(a.logits[1, 1], tokens[1, 2:N].mean(0))


def test_right_padding_matches_the_unpadded_sequence() -> None:
    router = make_router().eval()
    hidden = torch.randn(1, 3 * N, D)
    mask = torch.ones(1, 3 * N)
    mask[0, 2 * N + 1 :] = 0
    padded = router(hidden, mask)
    short = router(hidden[:, : 2 * N + 1])
    assert torch.allclose(padded.logits, short.logits)
    assert torch.equal(padded.experts, short.experts)


def test_chunk_means_of_an_all_padding_chunk_is_zero() -> None:
    means = chunk_means(torch.randn(1, 2 * N, 5), N, torch.tensor([[1] * N + [0] * N]))
    assert torch.equal(means[0, 1], torch.zeros(5))


# -- gates in each mode --


def test_straight_through_is_exactly_one_hot_and_trains_the_mlp() -> None:
    router = make_router(mode="straight_through").train()
    out = router(torch.randn(2, 4 * N, D))
    assert torch.equal(out.gates, torch.nn.functional.one_hot(out.experts, E).float())
    (out.gates * torch.randn_like(out.gates)).sum().backward()
    for p in router.mlp.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_soft_mode_gates_are_the_probs() -> None:
    router = make_router(mode="soft", temperature=0.5).train()
    out = router(torch.randn(2, 4 * N, D))
    assert torch.equal(out.gates, out.probs)
    assert torch.allclose(out.probs, torch.softmax(out.logits / 0.5, dim=-1))
    assert torch.allclose(out.probs.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("mode", ["straight_through", "soft"])
def test_eval_is_hard_one_hot_without_gradient(mode: str) -> None:
    router = make_router(mode=mode).eval()
    out = router(torch.randn(2, 4 * N, D))
    assert torch.equal(out.gates, torch.nn.functional.one_hot(out.experts, E).float())
    assert not out.gates.requires_grad


def test_temperature_sharpens_probs_and_anneals_geometrically() -> None:
    router = make_router().eval()
    hidden = torch.randn(2, 4 * N, D) * 3
    hot = router(hidden).probs
    router.temperature = 0.1
    cold = router(hidden).probs
    assert (cold.amax(-1)[:, 1:] >= hot.amax(-1)[:, 1:] - 1e-6).all()
    assert anneal_temperature(0, 100) == pytest.approx(1.0)
    assert anneal_temperature(100, 100) == pytest.approx(0.1)
    assert anneal_temperature(500, 100) == pytest.approx(0.1)
    mid = anneal_temperature(50, 100)
    assert mid == pytest.approx(math.sqrt(0.1))  # geometric: equal ratios per step
    with pytest.raises(ValueError):
        router.temperature = 0.0


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        ChunkStickyRouter(D, E, mode="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="initial_expert"):
        ChunkStickyRouter(D, E, initial_expert=E)


# -- regularisers --


def one_hots(seq: list[int], e: int = E) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([seq]), e).float()


def test_entropy_loss_zero_for_one_hot_and_log_e_for_uniform() -> None:
    assert entropy_loss(one_hots([0, 1, 2])) == pytest.approx(0.0, abs=1e-9)
    uniform = torch.full((2, 3, E), 1.0 / E)
    assert entropy_loss(uniform) == pytest.approx(0.01 * math.log(E), rel=1e-5)
    assert entropy_loss(uniform, weight=1.0) == pytest.approx(math.log(E), rel=1e-5)


def test_flip_loss_is_free_up_to_the_tolerance() -> None:
    assert flip_loss(one_hots([1] * 11)) == 0.0
    assert flip_loss(one_hots([0] + [1] * 10)) < 1e-12  # one flip in 10 pairs: f = .1
    two_flips = flip_loss(one_hots([0, 1] + [0] * 9))  # f = .2
    assert two_flips == pytest.approx(0.1 * 0.1**2, rel=1e-4)
    assert flip_loss(one_hots([0, 1, 0, 1])) == pytest.approx(0.1 * 0.9**2, rel=1e-5)


def test_decorrelation_zero_for_uncorrelated_columns_and_positive_for_lockstep() -> None:
    gates = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # centred columns orthogonal
    assert decorrelation_loss(gates, 1.0) == pytest.approx(0.0, abs=1e-9)
    anti = one_hots([0, 1, 1, 0], e=2)  # column 1 = 1 − column 0: corr −1 both ways
    assert decorrelation_loss(anti, 0.5) == pytest.approx(0.5 * 2.0, rel=1e-4)
    never_used = one_hots([0, 1, 0, 1], e=3)  # expert 2 never used: constant column, counts 0
    assert decorrelation_loss(never_used, 1.0) == pytest.approx(2.0, rel=1e-4)


def test_balance_zero_for_uniform_usage_and_log_e_for_collapse() -> None:
    assert balance_loss(one_hots([0, 1, 2, 2, 1, 0]), 1.0) == pytest.approx(0.0, abs=1e-6)
    assert balance_loss(one_hots([1, 1, 1]), 0.5) == pytest.approx(0.5 * math.log(E), rel=1e-5)


def test_regularisers_are_differentiable_through_the_router() -> None:
    router = make_router(mode="soft").train()
    out = router(torch.randn(4, 6 * N, D) * 3)
    losses = router_regularisers(out, RouterLossWeights(decorrelation=1.0, balance=1.0))
    assert set(losses) == {"entropy", "flip", "decorrelation", "balance"}
    total = sum(losses.values())
    total.backward()
    assert router.mlp[-1].weight.grad is not None and router.mlp[-1].weight.grad.abs().sum() > 0


def test_regularisers_skip_chunk_zero() -> None:
    # Chunk 0's uniform probs would count as a flip; without it, a steady router pays nothing.
    router = make_router().train()
    with torch.no_grad():
        router.mlp[-1].weight.zero_()
        router.mlp[-1].bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    out = router(torch.randn(2, 5 * N, D))
    assert router_regularisers(out)["flip"] == 0.0
    assert flip_loss(out.probs) > 0.0
