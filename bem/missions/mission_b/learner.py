"""Mission B's shadow learner (BEM_SPEC.md section 7): a BEM model that keeps learning while it serves.

One frozen LM carries BEM sites whose bases (U, V) are fixed after deployment; only the controller
learns online. Three controller states share that LM:
- live: serves traffic; changes only when a promotion copies the shadow into it;
- shadow: takes an update every `update_every` prompts (LM loss on the new prompts and replay, online
  EWC toward the last promoted weights, a prox pull toward the last accepted update), is scored on the
  mirrored traffic and on canaries, and is never served;
- frozen: the deployed controller, never updated: the baseline the aggregate gain is measured against.

Every `drift_every` updates the learner reports drift signals on a fixed probe set (shadow against live,
the anchor), and every `canary_every` prompts a canary pass rate with the live and shadow scores of the
traffic served since the previous run, as metric points the fleet's promotion service reads (the rules
and the protocol: `stats.promotion`). It obeys `promote` and `rollback` commands at the next update
boundary and acknowledges each with the state hashes, so a rollback is checkably exact. Without a
fleet, `LocalServices` applies the same rules in process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from bem.core.attach import Attachment
from bem.core.chunked import read_hidden
from bem.core.controllers import SimpleController, masked_mean
from bem.core.reporter import Command, Reporter, Value, sample
from bem.core.train import IGNORE, LMBatch, lm_loss, row_losses
from bem.missions.mission_b.data import Encoded, StreamItem, encode_items, rerender
from bem.missions.mission_b.metrics import SCORES, prompt_scores, token_hits
from bem.missions.mission_b.online import (
    Checkpoints,
    OnlineEWC,
    Replay,
    anneal_beta,
    as_state,
    check_optimizer,
    kl_per_token,
    prox_penalty,
    restore,
    state_hash,
    trainable,
)
from stats.promotion import PromotionRules, PromotionWatch

# ---- encoding and per-prompt scores ------------------------------------------------------------------


# ---- the model: a frozen LM with BEM sites and one controller ---------------------------------------


class OnlineModel(nn.Module):
    """The LM (frozen, BEM sites attached) and the controller, which maps the prompt's adapter-off mean
    hidden state to a code per prompt. `trainable(model, "controller")` is the whole learnable set."""

    def __init__(self, lm: nn.Module, attachment: Attachment, controller: SimpleController, read_layer: int):
        super().__init__()
        self.lm, self.controller, self.read_layer = lm, controller, read_layer
        self.attachment = attachment

    @torch.no_grad()
    def features(self, batch: LMBatch) -> Tensor:
        mask = batch.attention_mask * batch.prompt_mask
        hidden = read_hidden(self.lm, self.attachment, batch.input_ids, mask, self.read_layer)
        return masked_mean(hidden, batch.prompt_mask)

    def code(self, features: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        """The controller's code, under its own weights or under `state` (live, frozen)."""
        if state is None:
            return self.controller(features).code
        own = {name.removeprefix("controller."): t for name, t in state.items()}
        return functional_call(self.controller, own, (features,), strict=False).code

    def logits(self, batch: LMBatch, features: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        with self.attachment.codes(self.code(features, state)):
            return self.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def sigma_max(attachment: Attachment, code: Tensor, anchor: Tensor) -> float:
    """σ₁ of how far the update moved the weights, ΔW(code) − ΔW(anchor) = s·U·diag(c − c*)·Vᵀ, the
    largest over sites, for one code ([R] per-site layout) against the anchor's code."""
    worst = 0.0
    moved = code - anchor
    for name, site in attachment.sites.items():
        c = moved[attachment.offsets[name]] if moved.numel() == attachment.total_rank else moved
        worst = max(worst, float(torch.linalg.matrix_norm(site.delta_weight(c).float(), ord=2)))
    return worst


# ---- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerConfig:
    update_every: int = 5  # prompts per shadow update (ablation 1 / 5 / 20)
    drift_every: int = 10  # updates per drift check
    canary_every: int = 50  # prompts per canary run
    checkpoint_every: int = 100  # updates per accepted-state checkpoint
    lr: float = 1e-5
    clip: float = 1.0
    lambda_ewc: float = 1.0
    lambda_prox: float = 0.05
    replay_capacity: int = 10_000
    replay_min: int = 1000
    replay_fraction: float = 0.3
    fisher_samples: int = 1000
    n_probes: int = 256
    canary_tests: int = 4  # tests per suite
    canary_prompts: int = 8  # prompts per test
    max_rejects: int = 3  # rejected updates in a row pause learning
    max_rollbacks: int = 3  # rollbacks without a promotion stop learning
    promote_after: int = 1000  # prompts since the last promotion before the next (the canary gate's rule)
    prioritised_replay: bool = False  # replay p ∝ loss^.6 with importance weights, β .4 → 1 (optional)
    beta_updates: int = 1000  # updates over which the importance exponent β anneals to 1


@dataclass
class LearnerStats:
    updates: int = 0
    promotions: int = 0
    rollbacks: int = 0
    rejects_in_a_row: int = 0
    rollbacks_since_promotion: int = 0
    paused: bool = False  # 3 rejects in a row: learning paused, alert raised
    stopped: bool = False  # 3 rollbacks without a promotion: learning stopped
    prompts_since_promotion: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # promotions and rollbacks, as applied
    canary: list[tuple[int, float]] = field(default_factory=list)  # (prompt, pass rate)
    drift: list[tuple[int, str]] = field(default_factory=list)  # (prompt, level)


# ---- the learner ------------------------------------------------------------------------------------


class ShadowLearner:
    def __init__(
        self,
        model: OnlineModel,
        tokenizer: PreTrainedTokenizerBase,
        config: LearnerConfig,
        *,
        probes: Sequence[StreamItem],
        canary_pool: Sequence[StreamItem],
        warm: Sequence[StreamItem],
        checkpoints: Checkpoints,
        reporter: Reporter,
        rules: PromotionRules | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.tok, self.cfg, self.reporter = model, tokenizer, config, reporter
        self.rules = check_rules(rules or PromotionRules())
        self.params = trainable(model, "controller")
        self.device = next(iter(self.params.values())).device
        self.optimizer = self._optimizer()
        self.live = as_state(self.params)
        self.frozen = as_state(self.params)
        self.accepted = as_state(self.params)  # θ_prev: the last accepted update
        # The shadow as of its latest canary run at ≥ .95: what a promote command promotes, since the
        # shadow keeps learning while the command travels. Cleared by a rollback.
        self.candidate: dict[str, Tensor] | None = None
        self.checkpoints = checkpoints
        self.live_digest = self.checkpoints.save("live", self.live)
        self.replay: Replay[StreamItem] = Replay(config.replay_capacity, config.replay_min, seed=seed)
        self.ewc = OnlineEWC(lam=config.lambda_ewc)
        self.ewc.consolidate(self._fisher(warm), self.live)
        self.probes = self._encode(probes)
        self.probe_features = model.features(self.probes.batch)
        self.canary_pool = list(canary_pool)
        self.stats = LearnerStats()
        self.grad_norms: list[float] = []
        self.new_sample()

    def _encode(self, items: Sequence[StreamItem]) -> Encoded:
        return encode_items(self.tok, items, self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(self.params.values(), lr=self.cfg.lr, weight_decay=0.0)
        check_optimizer(opt, self.params)
        return opt

    # ---- serving and learning ---------------------------------------------------------------------

    def step(self, items: Sequence[StreamItem], prompt: int) -> dict[str, dict[str, Tensor]]:
        """Serve `items` (live and frozen), score the shadow on the same traffic, then update the
        shadow on them plus replay. Returns per-prompt scores per arm: live, frozen, shadow."""
        new = self._encode(items)
        feats = self.model.features(new.batch)
        with torch.no_grad():
            scores = {
                arm: prompt_scores(self.model.logits(new.batch, feats, state), new)
                for arm, state in (("live", self.live), ("frozen", self.frozen))
            }
        replayed, weights, picked = self._replayed(len(items))
        batch = self._encode([*items, *replayed]) if replayed else new
        logits = self.model.logits(batch.batch, self.model.features(batch.batch) if replayed else feats)
        with torch.no_grad():
            shadow = prompt_scores(logits[: len(items), : new.batch.input_ids.shape[1]], new)
        scores["shadow"] = shadow
        if self.learning:
            self._update(logits, batch, weights)
        priority = [1.0] * len(items)
        if self.cfg.prioritised_replay:  # a prompt's priority is the shadow's loss on it, when last seen
            losses = row_losses(logits.detach(), batch.batch.labels).tolist()
            priority = losses[: len(items)]
            self.replay.reprioritise(picked, losses[len(items) :])
        for it, prio in zip(items, priority, strict=True):
            self.replay.add(it, prio)
        for arm in self.mirrored:
            for metric in self.judged_metrics:
                self.mirrored[arm].setdefault(metric, []).extend(scores[arm][metric].tolist())
        self.stats.prompts_since_promotion += len(items)
        return scores

    def _replayed(self, n_new: int) -> tuple[list[StreamItem], Tensor | None, list[int]]:
        """Replay items for a batch with `n_new` new prompts, the importance weight of each of the
        batch's rows (None: all 1, uniform replay) and the items' indices in the buffer."""
        n = self.replay.mix(n_new, self.cfg.replay_fraction)
        if n == 0:
            return [], None, []
        if not self.cfg.prioritised_replay:
            items, _, picked = self.replay.sample(n)
            return items, None, picked
        beta = anneal_beta(self.stats.updates, self.cfg.beta_updates)
        items, weights, picked = self.replay.sample(n, prioritised=True, beta=beta)
        rows = torch.tensor([1.0] * n_new + weights, device=self.device)
        return items, rows, picked

    def new_sample(self) -> None:
        """Start the judge's next sample: live's and the shadow's per-prompt scores on the traffic
        served from now until the next canary run."""
        self.mirrored: dict[str, dict[str, list[float]]] = {"live": {}, "shadow": {}}

    @property
    def judged_metrics(self) -> list[str]:
        """The per-prompt scores the live-versus-shadow judge compares (the rules name them)."""
        return [m.name for m in self.rules.judge.metrics]

    @property
    def learning(self) -> bool:
        return not (self.stats.paused or self.stats.stopped)

    def _update(self, logits: Tensor, batch: Encoded, weights: Tensor | None = None) -> None:
        task = lm_loss(logits, batch.batch.labels, weights)
        ewc = self.ewc.penalty(self.params)
        prox = prox_penalty(self.params, self.accepted, self.cfg.lambda_prox)
        loss = task + ewc + prox
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.clip))
        self.optimizer.step()
        self.grad_norms.append(norm)
        self.stats.updates += 1
        step = self.stats.updates
        losses = {"loss": task, "ewc": ewc, "prox": prox}
        self.reporter.metrics({f"train/{k}": float(v.detach()) for k, v in losses.items()}, step)
        self.reporter.metric("train/grad_norm", norm, step)

    def _fisher(self, items: Sequence[StreamItem]) -> dict[str, Tensor]:
        """Diagonal Fisher from per-sample squared gradients of log p(y|x), clamped to [1e-6, 1e3].

        A loop of single-sample backward passes: the same quantity as `online.per_sample_fisher`'s vmap,
        which the HF model's forward does not support (its mask building is data-dependent)."""
        items = list(items)[: self.cfg.fisher_samples]
        total = {n: torch.zeros_like(p) for n, p in self.params.items()}
        for it in items:
            enc = self._encode([it])
            logits = self.model.logits(enc.batch, self.model.features(enc.batch))
            labels = enc.batch.labels[:, 1:]
            keep = labels != IGNORE
            log_p = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp_min(0)[..., None])[
                ..., 0
            ]
            grads = torch.autograd.grad((log_p * keep).sum(), list(self.params.values()))
            for (name, _), g in zip(self.params.items(), grads, strict=True):
                total[name] += g.detach() ** 2
        return {n: (t / max(len(items), 1)).clamp(1e-6, 1e3) for n, t in total.items()}

    # ---- checks -----------------------------------------------------------------------------------

    @torch.no_grad()
    def drift_signals(self) -> dict[str, float]:
        """Shadow against the anchor (live) on the fixed probes: KL per probe token, ‖θ − θ*‖₂, σ₁ of
        the change in ΔW at the probes' mean code, the relative probe-quality drop, the largest gradient
        norm since the last check."""
        probes, feats = self.probes, self.probe_features
        ref = self.model.logits(probes.batch, feats, self.live)
        cur = self.model.logits(probes.batch, feats)
        q_ref = float(prompt_scores(ref, probes)["quality"].mean())
        q_cur = float(prompt_scores(cur, probes)["quality"].mean())
        distance = math.sqrt(sum(float(((self.params[n] - self.live[n]) ** 2).sum()) for n in self.params))
        signals = {
            "kl_per_token": kl_per_token(ref, cur, probes.batch.attention_mask),
            "param_distance": distance,
            "sigma_max": sigma_max(
                self.model.attachment,
                self.model.code(feats).mean(0),
                self.model.code(feats, self.live).mean(0),
            ),
            "probe_drop": max(0.0, (q_ref - q_cur) / max(q_ref, 1e-9)),
            "grad_norm": max(self.grad_norms, default=0.0),
        }
        self.grad_norms.clear()
        return signals

    def check(self, prompt: int, *, drift: bool, canary: bool, active: tuple[str, ...] = ()) -> float | None:
        """Run the checks due at this prompt and report them as one batch, drift first: a canary
        gate must never promote on a pass rate whose same-step drift check it has not seen. Returns
        the canary pass rate when canaries ran."""
        points: dict[str, float | list[float]] = {}
        if drift:
            signals = self.drift_signals()
            points.update({f"drift/{name}": value for name, value in signals.items()})
            self.stats.drift.append((prompt, self.rules.drift.level(signals)[0]))
        rate = None
        if canary:
            rate, suites = self.run_canary(prompt, active)
            points.update({f"canary_suite/{suite}": share for suite, share in suites.items()})
            # The gate reads the rate with the prompts since the last promotion, this learner's
            # minimum, and the served traffic since the last run for the judge (stats.promotion).
            points["canary/min_prompts"] = float(self.cfg.promote_after)
            points["canary/prompts_since_promotion"] = float(self.stats.prompts_since_promotion)
            points["canary/pass_rate"] = rate
            for arm, scores in self.mirrored.items():
                points.update({f"judge/{arm}/{metric}": values for metric, values in scores.items()})
            self.new_sample()
        if points:
            self.reporter.metrics(points, prompt)
        return rate

    @torch.no_grad()
    def canary_results(self, active: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
        """Regression tests of the shadow against the serving model, per suite: each test's score is
        the share of live's token accuracy the shadow keeps (capped at 1; the baseline, live itself,
        is 1), over a group of canary prompts under the current contract (`active`: the scenarios in
        force). basic: all target tokens; format: the JSON structure and keys; performance: the tool
        call; safety: the value, i.e. the answer stays the table's fact. Token shares, not
        all-or-nothing scores: one flipped prompt in a small group must not read as a regression."""
        n, per = self.cfg.canary_tests, self.cfg.canary_prompts
        prompts = [_under(it, active) for it in self.canary_pool[: n * per]]
        enc = self._encode(prompts)
        feats = self.model.features(enc.batch)
        live = token_hits(self.model.logits(enc.batch, feats, self.live), enc)
        shadow = token_hits(self.model.logits(enc.batch, feats), enc)
        results: dict[str, list[tuple[float, float]]] = {}
        suites = (("basic", None), ("format", "structure"), ("performance", "call"), ("safety", "value"))
        for suite, kind in suites:
            tests = []
            for t in range(n):
                group = slice(t * per, (t + 1) * per)
                ref, cur = live.share(group, kind), shadow.share(group, kind)
                tests.append((1.0 if ref == 0 else min(1.0, cur / ref), 1.0))
            results[suite] = tests
        return results

    def run_canary(self, prompt: int, active: tuple[str, ...]) -> tuple[float, dict[str, float]]:
        """Run the canaries; accept (θ_prev ← shadow) at ≥ .90, else reject the updates since the last
        accepted state (3 rejects in a row pause learning). A rollback below .85 is the canary gate's
        call (the fleet's service, or `LocalServices`). Returns the pass rate and each suite's."""
        gate = self.rules.gate
        results = self.canary_results(active)
        rate = gate.pass_rate(results)
        suites = {suite: gate.pass_rate({suite: tests}) for suite, tests in results.items()}
        self.stats.canary.append((prompt, rate))
        self.candidate = as_state(self.params) if rate >= gate.promote_at else None
        if rate >= gate.accept_at:
            self.accepted = as_state(self.params)
            self.stats.rejects_in_a_row = 0
        elif rate >= gate.rollback_below:
            restore(self.params, self.accepted)
            self.stats.rejects_in_a_row += 1
            if self.stats.rejects_in_a_row >= self.cfg.max_rejects and not self.stats.paused:
                self.stats.paused = True
                self.reporter.metric("online/paused", 1.0, prompt)
        return rate, suites

    def checkpoint(self) -> None:
        self.checkpoints.save(f"accepted-{self.stats.updates:06d}", self.accepted)

    # ---- commands ---------------------------------------------------------------------------------

    def obey(self, prompt: int) -> None:
        """Apply the commands that arrived since the last update boundary and acknowledge each."""
        take = getattr(self.reporter, "commands", None)
        for command in take() if take else []:
            self.apply(command, prompt)

    def apply(self, command: Command, prompt: int) -> None:
        ack = getattr(self.reporter, "acknowledge", None)
        if command.action == "rollback":
            ok, detail = self.rollback(prompt)
        elif command.action == "promote":
            ok, detail = self.promote(prompt)
        else:
            ok, detail = False, f"{command.action!r} is not a command the online learner knows"
        if ack:
            ack(command, ok, detail)

    def rollback(self, prompt: int) -> tuple[bool, str]:
        """shadow ← live, exactly, from the live checkpoint on disk; the optimizer starts afresh (its
        moments belong to the abandoned path). A shadow that already equals live (two services
        rolling back the same bad update) is not rolled back or counted twice."""
        before = state_hash(self.params)
        self.candidate = None
        if before == self.live_digest:
            return True, f"rollback at prompt {prompt}: shadow already equals live {before[:12]}"
        restore(self.params, self.checkpoints.load("live"))
        self.accepted = as_state(self.params)
        self.optimizer = self._optimizer()
        after, live = state_hash(self.params), self.live_digest
        self.new_sample()  # the judge's sample was of the shadow just discarded
        s = self.stats
        s.rollbacks += 1
        s.rollbacks_since_promotion += 1
        s.rejects_in_a_row, s.paused = 0, False
        if s.rollbacks_since_promotion >= self.cfg.max_rollbacks and not s.stopped:
            s.stopped = True  # for good: learning that keeps failing needs a person (alert)
            self.reporter.metric("online/stopped", 1.0, prompt)
        s.events.append({"action": "rollback", "prompt": prompt, "from": before, "to": after, "live": live})
        self.reporter.metric("online/rollbacks", float(s.rollbacks), prompt)
        detail = f"rollback at prompt {prompt}: shadow {before[:12]} -> {after[:12]} (live {live[:12]})"
        return after == live, detail

    def promote(self, prompt: int) -> tuple[bool, str]:
        """live ← the shadow the canaries approved (its latest run at ≥ .95; the old live is kept);
        θ* ← the promoted weights, with a fresh Fisher. Refused when no approved state differs from
        live, or a rollback came after the approval."""
        if self.candidate is None or state_hash(self.candidate) == self.live_digest:
            return False, f"nothing to promote at prompt {prompt}: no approved shadow that differs from live"
        self.checkpoints.save("previous-live", self.live)
        self.live, self.candidate = self.candidate, None
        digest = self.live_digest = self.checkpoints.save("live", self.live)
        self.ewc.consolidate(self._fisher(self.replay.sample(self.cfg.fisher_samples)[0]), self.live)
        self.new_sample()  # live changed: the sample so far compares the old one
        s = self.stats
        s.promotions += 1
        s.prompts_since_promotion = 0
        s.rollbacks_since_promotion = 0
        s.events.append({"action": "promote", "prompt": prompt, "live": digest})
        self.reporter.metric("online/promotions", float(s.promotions), prompt)
        return True, f"promoted at prompt {prompt}: live {digest[:12]}"


def check_rules(rules: PromotionRules) -> PromotionRules:
    """Rules this learner can follow: the judge compares per-prompt scores it has (`SCORES`)."""
    if unknown := sorted({m.name for m in rules.judge.metrics} - set(SCORES)):
        raise ValueError(f"the judge's metrics {unknown} are not per-prompt scores; known: {SCORES}")
    return rules


def _under(item: StreamItem, active: tuple[str, ...]) -> StreamItem:
    """A canary prompt under the current contract: the same fact, re-rendered with `active` scenarios
    that change the contract (format, API); domain shift is traffic, not contract, so it is left out."""
    return rerender(item, tuple(s for s in active if s != "domain_shift"))


# ---- without a fleet ---------------------------------------------------------------------------------


@dataclass
class LocalServices:
    """The promotion service in process, for runs without fleetd: wraps a reporter, reads the same
    metric points the fleet's service reads, judges them through the same `PromotionWatch`
    (`stats.promotion`) and queues the commands for the learner."""

    inner: Reporter
    watch: PromotionWatch = field(default_factory=PromotionWatch)
    pending: list[Command] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self.inner.metric(name, value, step)
        self._observe({name: [(step or 0, value)]})

    def metrics(self, values: Mapping[str, Value], step: int) -> None:
        self.inner.metrics(values, step)
        self._observe({name: [(step, v) for v in sample(value)] for name, value in values.items()})

    def _observe(self, series: Mapping[str, list[tuple[int, float]]]) -> None:
        for action in self.watch.observe(series):
            self.decisions.append(
                {"service": action.service, "step": action.step, "decision": action.decision,
                 "reason": action.reason}
            )  # fmt: skip
            self.pending.append(Command(f"{action.service}-{action.step}", action.decision))

    def commands(self) -> list[Command]:
        out, self.pending = self.pending, []
        return out

    def acknowledge(self, command: Command, ok: bool, detail: str) -> None:
        for d in self.decisions:
            if f"{d['service']}-{d['step']}" == command.id:
                d["acked"], d["detail"] = ok, detail

    def progress(self, stage: str, done: int, total: int) -> None:
        self.inner.progress(stage, done, total)

    def scores(self, rows: Sequence[Any]) -> None:
        self.inner.scores(rows)

    def artifact(self, path: Path, kind: str) -> None:
        self.inner.artifact(path, kind)

    def cancelled(self) -> bool:
        return self.inner.cancelled()
