"""SEP's loss terms against their definitions: the KL is symmetric and zero only on equal
distributions, InfoNCE equals the textbook cross-entropy and prefers aligned pairs, the variance guard
is zero for spread states and positive for collapsed ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bem.missions.mission_d import losses


def test_symmetric_kl_is_symmetric_nonnegative_and_zero_on_equal_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g).log_softmax(-1), torch.randn(5, 7, generator=g).log_softmax(-1)
    assert torch.allclose(losses.symmetric_kl(a, b), losses.symmetric_kl(b, a))
    assert (losses.symmetric_kl(a, b) > 0).all()
    assert losses.symmetric_kl(a, a).abs().max() < 1e-7
    # Against torch's own KL: ½[KL(p||q) + KL(q||p)].
    want = 0.5 * (F.kl_div(b, a, log_target=True, reduction="none").sum(-1)
                  + F.kl_div(a, b, log_target=True, reduction="none").sum(-1))  # fmt: skip
    assert torch.allclose(losses.symmetric_kl(a, b), want, atol=1e-6)


def test_target_kl_compares_the_targets_positions_whatever_the_sources_lengths() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 11, generator=g)  # the predictions at 3 target positions per row
    logits, view = torch.randn(2, 8, 11, generator=g), torch.randn(2, 10, 11, generator=g)
    logits[:, 4:7], view[:, 6:9] = target, target  # the same target after a longer source in the view
    mask, view_mask = torch.zeros(2, 8), torch.zeros(2, 10)
    mask[:, 4:7], view_mask[:, 6:9] = 1, 1
    assert losses.target_kl(logits, mask, view, view_mask).item() < 1e-7
    view[:, 7] += 3 * torch.randn(2, 11, generator=g)
    assert losses.target_kl(logits, mask, view, view_mask).item() > 1e-3
    with pytest.raises(ValueError, match="as many target positions"):
        losses.target_kl(logits, mask, view, torch.ones(2, 10))


def test_info_nce_is_the_two_way_cross_entropy_and_prefers_aligned_pairs() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 8, generator=g)
    noisy = z + 0.05 * torch.randn(16, 8, generator=g)
    unrelated = torch.randn(16, 8, generator=g)
    sim = F.normalize(z, dim=-1) @ F.normalize(noisy, dim=-1).T / 0.1
    labels = torch.arange(16)
    want = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))
    assert torch.allclose(losses.info_nce(z, noisy), want)
    assert losses.info_nce(z, noisy) < losses.info_nce(z, unrelated)
    z.requires_grad_(True)
    losses.info_nce(z, noisy).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_the_variance_guard_is_zero_for_spread_states_and_positive_for_collapsed_ones() -> None:
    g = torch.Generator().manual_seed(3)
    spread = 3.0 * torch.randn(64, 8, generator=g)
    collapsed = torch.ones(64, 8) + 1e-3 * torch.randn(64, 8, generator=g)
    assert losses.variance_guard(spread).item() == 0.0
    assert losses.variance_guard(collapsed).item() > 0.9


def test_weighted_sums_the_arms_terms_and_refuses_an_unweighted_one() -> None:
    terms = {"kl": torch.tensor(2.0), "ce": torch.tensor(3.0)}
    assert losses.weighted(terms).item() == pytest.approx(1.0 * 2.0 + 0.1 * 3.0)
    with pytest.raises(ValueError, match="no weight for"):
        losses.weighted({"mystery": torch.tensor(1.0)})
