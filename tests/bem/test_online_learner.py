"""Mission B's shadow learner on the tiny base: scoring, the trainable set, and the safety net in process."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bem.core.models import load_model
from bem.core.reporter import MemoryReporter
from bem.core.train import IGNORE, row_losses
from bem.missions.mission_b.data import PIECE_KINDS, encode_items, prompt_stream
from bem.missions.mission_b.metrics import AGGREGATE_WEIGHTS, prompt_scores
from bem.missions.mission_b.recipe import (
    PROFILES,
    deploy_model,
    injection_breaks,
    make_learner,
    run_mission_b,
)
from stats.promotion import GateRule, PromotionRules


def test_success_is_greedy_exact_match_and_scores_follow_their_definitions(base_dir: Path) -> None:
    model, tok = load_model(base_dir)
    items = list(prompt_stream(6, seed=3, rows=1))
    enc = encode_items(tok, items)
    with torch.no_grad():
        logits = model(input_ids=enc.batch.input_ids, attention_mask=enc.batch.attention_mask).logits
    # Make some rows exactly right at every target position, others right except one kind of piece.
    labels = enc.batch.labels[:, 1:]
    forced = logits.clone()
    for row in range(len(items)):
        for t in range(labels.shape[1]):
            if labels[row, t] == IGNORE:
                continue
            kind = int(enc.kinds[row, t + 1])
            wrong = (row == 1 and kind == PIECE_KINDS["call"]) or (row == 2 and kind == PIECE_KINDS["value"])
            target = int(labels[row, t]) if not wrong else (int(labels[row, t]) + 1) % logits.shape[-1]
            forced[row, t] = -10.0
            forced[row, t, target] = 10.0
    scores = prompt_scores(forced, enc)
    assert scores["success"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert scores["tool"].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert scores["satisfaction"].tolist() == [1.0] * 6  # only the call or the value is wrong
    # quality: the share of target tokens right, counted independently here
    for row, it in enumerate(items):
        n = len(tok(it.target, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        wrong = {1: len(tok(it.pieces[1][1], add_special_tokens=False)["input_ids"]),
                 2: len(tok(it.pieces[3][1], add_special_tokens=False)["input_ids"])}.get(row, 0)  # fmt: skip
        assert scores["quality"][row].item() == pytest.approx((n - wrong) / n)
    expected = sum(w * scores[k] for k, w in AGGREGATE_WEIGHTS.items())
    assert torch.allclose(scores["aggregate"], expected)

    # On the model's own logits, teacher forcing and greedy decoding agree token by token up to and
    # including the first wrong token; so `success` (every argmax right) is greedy exact match.
    argmax = logits[:, :-1].argmax(-1)
    success = prompt_scores(logits, enc)["success"]
    for row, it in enumerate(items):
        prompt = tok(it.prompt, add_special_tokens=False)["input_ids"]
        target = tok(it.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        forced_out = argmax[row, len(prompt) - 1 : len(prompt) - 1 + len(target)].tolist()
        k = next((i for i, (a, b) in enumerate(zip(forced_out, target, strict=True)) if a != b), len(target))
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(min(k + 1, len(target))):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(prompt) :] == forced_out[: k + 1]
        assert success[row].item() == float(k == len(target))


def _run(base_dir: Path, tmp_path: Path, **kw):
    reporter = MemoryReporter()
    summary = run_mission_b(
        base_dir, profile="tiny", seed=1, out_dir=tmp_path, reporter=reporter, local_services=True, **kw
    )
    return summary, reporter


def test_a_bad_update_is_caught_and_rolled_back_exactly_within_one_check(
    base_dir: Path, tmp_path: Path
) -> None:
    cfg = PROFILES["tiny"].learner
    check = cfg.drift_every * cfg.update_every  # prompts between drift checks
    clean, _ = _run(base_dir, tmp_path / "clean")
    assert clean["rollbacks"] == 0, clean["decisions"]  # the same run without the bad update is quiet

    sabotage = 2 * check + 2
    summary, _ = _run(base_dir, tmp_path / "bad", sabotage_at=sabotage)
    first_check = (sabotage // check + 1) * check
    decisions = summary["decisions"]
    assert decisions and decisions[0]["decision"] == "rollback" and decisions[0]["step"] == first_check
    event = summary["events"][0]
    assert event["action"] == "rollback" and first_check <= event["prompt"] < first_check + check
    # restored from the live checkpoint (safetensors) to the very weights it holds
    assert event["to"] == event["live"] != event["from"]
    promoted = [
        e["live"] for e in summary["events"] if e["action"] == "promote" and e["prompt"] < event["prompt"]
    ]
    assert event["live"] == (promoted[-1] if promoted else summary["deployed_controller"])
    assert decisions[0]["acked"] is True


def test_promotions_follow_the_gate_and_only_the_controller_learns(base_dir: Path, tmp_path: Path) -> None:
    summary, reporter = _run(base_dir, tmp_path, learner_overrides={"lr": 3e-3})
    cfg = PROFILES["tiny"].learner
    promotions = [e["prompt"] for e in summary["events"] if e["action"] == "promote"]
    assert promotions, "the tiny run should promote at least once"
    canary = dict((p, r) for p, r in summary["canary"])
    judged = {j["step"]: j["decision"] for j in summary["judged"]}
    assert set(judged) == set(canary)  # every canary run came with the served traffic to judge
    rollbacks = [e["prompt"] for e in summary["events"] if e["action"] == "rollback"]
    last = 0
    for at in promotions:
        # commands land at the next update boundary after the canary run that decided them
        decided = max(p for p in canary if p <= at)
        runs = [p for p in sorted(canary) if p <= decided][-GateRule().passes_to_promote :]
        assert len(runs) == GateRule().passes_to_promote and all(
            canary[p] >= GateRule().promote_at for p in runs
        )
        assert not [r for r in rollbacks if runs[0] <= r <= decided], "a rollback restarts the streak"
        # ... and the live-versus-shadow judge passed each of those runs
        assert [judged[p] for p in runs] == ["Pass"] * len(runs)
        assert decided - last >= cfg.promote_after
        last = at
    lives = [e["live"] for e in summary["events"] if e["action"] == "promote"]
    assert len(set(lives)) == len(lives) and summary["deployed_controller"] not in lives
    # Only the controller moved: the LM and its BEM bases are the deployed ones throughout.
    assert summary["lm_state"]["deployed"] == summary["lm_state"]["end"]
    assert summary["events"][-1]["live"] != summary["deployed_controller"]
    names = {n for n, _, _ in reporter.points}
    assert {"drift/kl_per_token", "canary/pass_rate", "train/ewc", "train/prox"} <= names
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["updates"] == summary["updates"] > 0


def test_three_rollbacks_without_a_promotion_stop_learning_for_good(base_dir: Path, tmp_path: Path) -> None:
    summary, reporter = _run(base_dir, tmp_path, learner_overrides={"lr": 3e-2})
    assert summary["stopped"], summary["events"]
    rollbacks = [e["prompt"] for e in summary["events"] if e["action"] == "rollback"]
    stopped_at = rollbacks[2]  # the third, with no promotion between (asserted next)
    assert not [e for e in summary["events"] if e["action"] == "promote" and e["prompt"] <= stopped_at]
    # nothing is learnt, promoted or rolled back after the stop
    assert len(rollbacks) == 3
    assert not [e for e in summary["events"] if e["prompt"] > stopped_at]
    updates_after = [st for n, _, st in reporter.points if n == "train/loss"]
    cfg = PROFILES["tiny"].learner
    assert max(updates_after) <= stopped_at // cfg.update_every + 1


def test_prioritised_replay_keeps_each_prompts_loss_as_its_priority(base_dir: Path, tmp_path: Path) -> None:
    tiny = PROFILES["tiny"]
    prof = replace(tiny, learner=replace(tiny.learner, prioritised_replay=True, replay_min=5))
    reporter = MemoryReporter()
    online, tok, deployed = deploy_model(base_dir, prof, 1, "cpu", reporter)
    learner = make_learner(online, tok, prof, PromotionRules(), deployed, tmp_path, reporter, seed=1)
    stream = list(prompt_stream(10, 7, rows=prof.rows))
    enc = encode_items(tok, stream[:5])
    with torch.no_grad():  # the shadow's loss on each prompt as it is served, before it learns from it
        expected = row_losses(online.logits(enc.batch, online.features(enc.batch)), enc.batch.labels)
    learner.step(stream[:5], 0)
    assert learner.replay.priority == pytest.approx(expected.tolist(), rel=1e-5)
    assert len(set(learner.replay.priority)) == 5  # losses, not the uniform default of 1
    before = list(learner.replay.priority)
    learner.step(stream[5:], 5)  # the buffer is ready: 2 replayed rows, priorities refreshed
    assert learner.replay.priority[:5] != before


def test_what_an_injection_breaks_is_measured_on_the_deployed_model_whatever_the_learner_does(
    base_dir: Path, tmp_path: Path
) -> None:
    learns, _ = _run(base_dir, tmp_path / "learns", learner_overrides={"lr": 3e-3})
    idle, _ = _run(base_dir, tmp_path / "idle", learner_overrides={"lr": 0.0})
    drops = {k: v for k, v in learns["values"].items() if k.startswith("drop_")}
    assert drops and drops == {k: v for k, v in idle["values"].items() if k.startswith("drop_")}
    # ... and they are the deployed model's paired clean-minus-injected aggregates.
    torch.manual_seed(1)
    online, tok, _ = deploy_model(base_dir, PROFILES["tiny"], 1, "cpu", MemoryReporter())
    expected = injection_breaks(online, tok, PROFILES["tiny"], 1)
    assert drops == pytest.approx({f"drop_{s}": v for s, v in expected.items()}, abs=1e-6)
