"""Mission B's online-learning parts against their formulas (BEM_SPEC.md section 7)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from bem.core.train import IGNORE, lm_loss, row_losses
from bem.missions.mission_b import online


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.controller = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.controller(self.body(x))


def _log_prob(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).sum()


def test_trainable_set_is_the_controller_and_the_optimizer_is_held_to_it() -> None:
    model = Toy()
    params = online.trainable(model, "controller")
    assert set(params) == {
        "controller.0.weight",
        "controller.0.bias",
        "controller.2.weight",
        "controller.2.bias",
    }
    assert not model.body.weight.requires_grad
    online.check_optimizer(torch.optim.AdamW(params.values(), lr=1e-5), params)
    with pytest.raises(ValueError, match="outside the trainable set"):
        online.check_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), params)
    with pytest.raises(ValueError, match="no parameters under 'ctrl'"):
        online.trainable(model, "ctrl")


def test_ewc_penalty_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = Toy()
    params = online.trainable(model, "controller")
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    anchor = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in params.items()}
    ewc = online.OnlineEWC(lam=2.5)
    ewc.consolidate(fisher, anchor)
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
    expected = 0.0
    for n in params:
        f, p, a = fisher[n].flatten(), params[n].detach().flatten(), anchor[n].flatten()
        for i in range(p.numel()):
            expected += float(f[i] / mean) * float(p[i] - a[i]) ** 2
    assert ewc.penalty(params).item() == pytest.approx(2.5 / 2 * expected, rel=1e-5)
    # Online consolidation: F <- .9 F + F_new, theta* <- the new anchor.
    new = {n: torch.full_like(f, 2.0) for n, f in fisher.items()}
    ewc.consolidate(new, {n: p.detach() for n, p in params.items()})
    assert all(torch.allclose(ewc.fisher[n], 0.9 * fisher[n] + 2.0) for n in fisher)
    assert ewc.penalty(params).item() == 0.0
    prev = {n: p.detach() + 0.1 for n, p in params.items()}
    n_el = sum(p.numel() for p in params.values())
    assert online.prox_penalty(params, prev, lam=0.05).item() == pytest.approx(0.05 * n_el * 0.01, rel=1e-5)


def test_fisher_comes_from_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = Toy()
    params = online.trainable(model, "controller")
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    got = online.per_sample_fisher(model, params, _log_prob, x, y)
    loop = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(16):
        model.zero_grad()
        _log_prob(model(x[i : i + 1]), x[i], y[i : i + 1]).backward()
        for n, p in params.items():
            loop[n] += p.grad**2 / 16
    for n in params:
        assert torch.allclose(got[n], loop[n].clamp(1e-6, 1e3), atol=1e-6)
    model.zero_grad()
    (_log_prob(model(x), x, y) / 16).backward()  # the batch gradient, squared: a different thing
    batch_sq = {n: p.grad**2 for n, p in params.items()}
    assert not all(torch.allclose(got[n], batch_sq[n].clamp(1e-6, 1e3), atol=1e-6) for n in params)


def test_reservoir_keeps_every_item_with_equal_probability() -> None:
    kept = Counter()
    for seed in range(400):
        r = online.Replay[int](capacity=10, min_items=5, seed=seed)
        for i in range(50):
            r.add(i)
        kept.update(r.items)
    counts = [kept[i] for i in range(50)]
    assert sum(counts) == 4000
    assert scipy.stats.chisquare(counts).pvalue > 0.001  # each item kept with probability 10/50


def test_replay_mix_and_prioritised_sampling() -> None:
    r = online.Replay[int](capacity=100, min_items=20, seed=1)
    for i in range(19):
        r.add(i)
    assert r.mix(7) == 0
    r.add(19)
    assert r.ready and r.mix(7) == 3  # 30% of the batch is replay once it holds min_items
    r = online.Replay[int](capacity=10, min_items=1, seed=2)
    prios = [1.0, 2.0, 4.0, 8.0]
    for i, p in enumerate(prios):
        r.add(i, p)
    _, weights, idx = r.sample(20_000, prioritised=True, alpha=0.6, beta=0.4)
    expected = np.array(prios) ** 0.6 / sum(np.array(prios) ** 0.6)
    observed = np.bincount(idx, minlength=4)
    assert scipy.stats.chisquare(observed, expected * 20_000).pvalue > 0.001
    w = (4 * expected) ** -0.4
    for i, wt in zip(idx[:50], weights[:50], strict=True):
        assert wt == pytest.approx(w[i] / w.max())
    assert online.anneal_beta(0, 100) == 0.4 and online.anneal_beta(100, 100) == 1.0


def test_rollback_restores_the_accepted_weights_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = Toy()
    params = online.trainable(model, "controller")
    store = online.Checkpoints(tmp_path)
    accepted = store.save("accepted-0001", params)
    opt = torch.optim.SGD(params.values(), lr=1000.0)  # a deliberately bad update
    loss = model(torch.randn(8, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    assert online.state_hash(params) != accepted
    online.restore(params, store.load("accepted-0001"))
    assert online.state_hash(params) == accepted
    with pytest.raises(ValueError, match="differ"):
        online.restore(params, {"controller.0.weight": params["controller.0.weight"]})


def test_kl_per_token_sums_the_vocabulary_and_averages_tokens() -> None:
    torch.manual_seed(0)
    ref, cur = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    p, q = ref.softmax(-1), cur.softmax(-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    expected = float(per_token[mask.bool()].mean())
    assert online.kl_per_token(ref, cur, mask) == pytest.approx(expected, rel=1e-5)
    assert online.kl_per_token(ref, ref) == pytest.approx(0.0, abs=1e-6)
    vocab_mean = float((p * (p.log() - q.log())).mean())
    assert online.kl_per_token(ref, cur) != pytest.approx(vocab_mean)


def test_weighted_lm_loss_and_row_losses_follow_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, 6], [IGNORE, 1, 2, IGNORE, IGNORE, IGNORE]])
    ce = -F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    keep = labels[:, 1:] != IGNORE
    assert lm_loss(logits, labels, torch.ones(2)) == pytest.approx(float(lm_loss(logits, labels)), rel=1e-6)
    assert float(lm_loss(logits, labels)) == pytest.approx(float(ce[keep].mean()), rel=1e-6)
    # a row's weight scales its tokens; the mean stays over all labelled tokens
    weighted = float(lm_loss(logits, labels, torch.tensor([2.0, 0.0])))
    assert weighted == pytest.approx(float(2 * ce[0][keep[0]].sum() / keep.sum()), rel=1e-6)
    rows = row_losses(logits, labels)
    assert rows.tolist() == pytest.approx([float(ce[i][keep[i]].mean()) for i in range(2)], rel=1e-6)
