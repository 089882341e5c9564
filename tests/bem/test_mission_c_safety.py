"""Mission C's safety phase on the tiny test base: skill subspaces from real LoRA factors, the
completion log-probabilities, and a short Lagrangian run that leaves the model untouched."""

from __future__ import annotations

import math

import pytest
import torch

from bem.core.models import build_tiny_llama, byte_tokenizer, tiny_llama_config
from bem.core.reporter import MemoryReporter
from bem.core.train import lora_factors, lora_model
from bem.missions.mission_c import basis, data
from bem.missions.mission_c.probe import fit_probe
from bem.missions.mission_c.safety import (
    SafetyConfig,
    completion_logprob,
    constitution_scores,
    skill_bases,
    train_safety,
)


def _skilled() -> torch.nn.Module:
    peft = lora_model(build_tiny_llama(tiny_llama_config(), seed=0), rank=4)
    with torch.no_grad():  # lora_B starts at 0: give the factors a span to find
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft.requires_grad_(False)
    return peft


def test_skill_bases_span_each_layers_lora_outputs_and_nothing_more() -> None:
    peft = _skilled()
    bases = skill_bases(peft)
    factors = lora_factors(peft)
    assert sorted(bases) == list(range(tiny_llama_config().num_hidden_layers))
    for layer, s in bases.items():
        bs = [b for site, (_, b) in factors.items() if f"layers.{layer}." in site]
        assert len(bs) == 2  # W_O and W_down
        assert s.shape == (tiny_llama_config().hidden_size, 8)  # two rank-4 factors, independent
        torch.testing.assert_close(s.T @ s, torch.eye(8, dtype=s.dtype), atol=1e-5, rtol=0)
        for b in bs:  # each factor lies in S: projecting onto S changes nothing
            b = b.to(s.dtype)
            torch.testing.assert_close(s @ (s.T @ b), b, atol=1e-4, rtol=1e-4)


def test_completion_logprob_is_the_mean_token_log_probability() -> None:
    model, tok = build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer()
    case = data.make_cases("secret", "train", 1, seed=0)[0]
    got = completion_logprob(model, tok, [case], unsafe=True)
    ids = tok(case.prompt, add_special_tokens=False)["input_ids"]
    target = tok(case.unsafe, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + target])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    want = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(target)) / len(target)
    assert got.item() == pytest.approx(want, abs=1e-4)


def test_a_short_lagrangian_run_trains_the_overlays_alone_and_keeps_them_orthogonal() -> None:
    peft, tok = _skilled(), byte_tokenizer()
    hf = peft.base_model.model
    attacks = [c for f in data.FAMILIES for c in data.make_cases(f, "train", 4, seed=0)]
    utility = data.make_cases("utility", "train", 12, seed=0)
    probe = fit_probe(hf, tok, [c.prompt for c in utility], [c.prompt for c in attacks], layer=1)
    scores = constitution_scores(hf, tok, probe, [*attacks, *utility])
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    overlays = {
        i: basis.SafetyOverlay(s, r_s=4, generator=torch.Generator().manual_seed(i))
        for i, s in skill_bases(peft).items()
    }
    q0 = {i: o.Q.detach().clone() for i, o in overlays.items()}
    cfg = SafetyConfig(rank=4, steps=6, batch_size=4, lr=0.05, lam0=1.0, lam_every=3)
    with basis.attach_overlays(hf, overlays) as handle:
        history = train_safety(
            hf, tok, handle, scores, attacks, utility, cfg, seed=0, reporter=MemoryReporter()
        )
    assert all(torch.equal(before[k], v) for k, v in peft.state_dict().items())  # the model is untouched
    assert any(not torch.equal(q0[i], o.Q) for i, o in overlays.items())  # the overlays did learn
    assert min(history.min_op) >= 0.95
    # λ moved in log space on the mean measured violation of each window of 3 steps.
    lam = cfg.lam0
    for w in range(2):
        v = sum(history.violation[3 * w : 3 * w + 3]) / 3
        lam = min(max(math.exp(math.log(lam) + cfg.lam_lr * lam * (v - cfg.target)), 1e-3), 100.0)
        assert history.lam[3 * w + 2] == pytest.approx(lam)
    with pytest.raises(ValueError, match="must be frozen"):
        hf.lm_head.weight.requires_grad_(True)
        train_safety(
            hf,
            tok,
            basis.attach_overlays(hf, overlays),
            scores,
            attacks,
            utility,
            cfg,
            seed=0,
            reporter=MemoryReporter(),
        )
