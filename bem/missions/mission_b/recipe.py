"""Mission B (BEM_SPEC.md section 7): a living model that learns online, watched by a drift monitor and
a canary gate, promoted and rolled back by them.

One task, two modes:
- stream: a seeded prompt stream with the three failures injected one after another (format change,
  domain shift, new API signature); measures time-to-fix per scenario from the served (live) metric;
- soak: the same learner on clean traffic (no injections): steady state must see no rollback, canaries
  at ≥ .95 and no critical drift.

Both first deploy the model: BEM bases and controller trained on clean traffic, then the bases are
frozen and only the controller learns online (`learner.py`). Every served prompt is scored for the
live model and for the frozen deployed one (score rows, arms "online" and "frozen"), so the
aggregate gain is a paired comparison on the same prompts.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from bem.core import dryrun
from bem.core.attach import attach_bems
from bem.core.controllers import SimpleController
from bem.core.models import load_model
from bem.core.overseer import Overseer
from bem.core.reporter import Laps, Reporter, ScoreRow, check_cancelled, write_scores
from bem.core.train import lm_loss
from bem.missions.mission_b.data import (
    INSTRUCTED_KEYS,
    SCENARIOS,
    StreamItem,
    encode_items,
    instructed,
    probe_set,
    prompt_stream,
)
from bem.missions.mission_b.learner import (
    LearnerConfig,
    LocalServices,
    OnlineModel,
    ShadowLearner,
    check_rules,
)
from bem.missions.mission_b.metrics import SCORES, prompt_scores, time_to_fix
from bem.missions.mission_b.online import Checkpoints, Replay, state_hash
from stats.promotion import PromotionRules, PromotionWatch

CENSORED = 1001.0  # a time-to-fix that did not happen within 1,000 prompts (or before the next injection)
CENSOR = 1000
READ_LAYER = 2


@dataclass(frozen=True)
class Profile:
    rows: int  # table rows per prompt
    rank: int  # BEM rank per site
    controller_hidden: int
    deploy_steps: int
    deploy_batch: int
    deploy_lr: float
    warmup: int  # clean prompts before the first injection (≥ 100: time-to-fix's reference window)
    spacing: int  # prompts between injections, and after the last one
    soak: int  # soak prompts
    window: int  # prompts per reported window metric
    instructed_share: float  # deployment examples that name their answer key in the prompt
    learner: LearnerConfig


PROFILES = {
    "tiny": Profile(
        1, 4, 16, 4, 8, 3e-3, 100, 60, 120, 20, 0.3,
        LearnerConfig(lr=1e-3, replay_capacity=200, replay_min=20, fisher_samples=8, n_probes=8,
                      canary_tests=2, canary_prompts=2, canary_every=20, drift_every=4, checkpoint_every=20,
                      promote_after=40),
    ),
    "smoke": Profile(
        1, 16, 32, 120, 16, 3e-3, 150, 350, 600, 50, 0.3,
        LearnerConfig(lr=1e-3, lambda_ewc=0.01, replay_capacity=2000, fisher_samples=64,
                      n_probes=64, canary_prompts=24, checkpoint_every=50, promote_after=150),
    ),
    "full": Profile(
        3, 16, 256, 2000, 16, 1e-3, 1000, 1500, 2000, 100, 0.3, LearnerConfig(),
    ),
}  # fmt: skip


def schedule(profile: Profile) -> list[tuple[int, str]]:
    return [(profile.warmup + i * profile.spacing, s) for i, s in enumerate(SCENARIOS)]


def run_mission_b(
    base_path: str | Path,
    *,
    mode: Literal["stream", "soak"] = "stream",
    profile: str | Profile = "smoke",
    seed: int = 1,
    out_dir: str | Path,
    reporter: Reporter,
    device: str = "cpu",
    local_services: bool = False,
    learner_overrides: dict[str, Any] | None = None,
    rules: PromotionRules | Mapping[str, Any] | None = None,
    sabotage_at: int | None = None,
    pace_s: float = 0.0,
    soak_s: float | None = None,
    overseer: Overseer | None = None,
) -> dict[str, Any]:
    """Deploy, then serve and learn over the stream (or the soak).

    `rules`: the promotion rules' thresholds (the mission TOML's `[services.promotion]` table; the
    spec's by default); `local_services` runs the drift monitor and canary gate in process (no
    fleet); `sabotage_at` makes the update at that prompt use a learning rate 1,000 times too large
    (the test of the safety net); `pace_s` is the least time a step of `update_every` prompts takes,
    as when traffic arrives at a given rate; `soak_s` makes a soak run for that long instead of the
    profile's prompt count (the full profile's 24-hour soak); an `overseer` (Mission C's overlay) is on
    for every served step (live, frozen and shadow alike), not for the checks; what it saw is in the
    summary's `overlay`."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if learner_overrides:
        prof = replace(prof, learner=replace(prof.learner, **learner_overrides))
    # Checked before the minutes of deployment, not after them.
    rules = check_rules(rules if isinstance(rules, PromotionRules) else PromotionRules.from_config(rules))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    torch.manual_seed(seed)
    services = LocalServices(reporter, PromotionWatch(rules)) if local_services else None
    rep: Reporter = services or reporter

    online, tok, deploy_items = deploy_model(base_path, prof, seed, device, rep)
    laps.lap("deploy")
    lm_deployed = lm_state(online)
    breaks = injection_breaks(online, tok, prof, seed) if mode == "stream" else {}
    flow = traffic(mode, prof, seed, soak_s)
    learner = make_learner(online, tok, prof, rules, deploy_items, out, rep, seed)
    laps.lap("learner")
    if overseer is not None:
        overseer.attach(online.lm, tok)
    served = serve(learner, flow, prof, rep, sabotage_at, pace_s, overseer)
    overlay = overseer.close() if overseer is not None else None
    laps.lap("stream")

    rows = score_rows(served, seed)
    reporter.scores(rows)
    write_scores(rows, out / "scores.parquet")
    summary = _summary(mode, prof, flow.plan, served, learner, laps, breaks)
    # What stayed fixed: the deployed controller (the frozen arm) and the LM with its BEM bases.
    summary["deployed_controller"] = state_hash(learner.frozen)
    summary["lm_state"] = {"deployed": lm_deployed, "end": lm_state(online)}
    if overlay is not None:
        summary["overlay"] = overlay
    if services is not None:
        summary["decisions"] = services.decisions
        summary["judged"] = [
            {"step": step, "decision": r.decision, "score": r.score, "reason": r.reason}
            for step, r in services.watch.judged
        ]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    reporter.artifact(out / "summary.json", "summary")
    return summary


def deploy_model(
    base_path: str | Path, prof: Profile, seed: int, device: str, reporter: Reporter
) -> tuple[OnlineModel, Any, list[StreamItem]]:
    """The model as shipped: BEM sites and a controller on the base, trained on clean traffic."""
    model, tok = load_model(base_path, device=device)
    attachment = attach_bems(model, rank_schedule=[prof.rank], max_overhead=50.0)
    d_model = int(model.config.hidden_size)
    controller = SimpleController(d_model, attachment.total_rank, hidden=prof.controller_hidden, dropout=0.0)
    online = OnlineModel(model, attachment, controller.to(device), READ_LAYER)
    items = deployment_data(max(prof.deploy_steps * prof.deploy_batch, 256), seed, prof)
    deploy(online, tok, items, prof, seed, reporter)
    return online, tok, items


@dataclass
class Traffic:
    """What the learner serves: prompts drawn lazily, the injection plan, and when a timed soak ends."""

    mode: str  # stream or soak
    source: Iterator[StreamItem]
    n: int  # prompts at most
    plan: list[tuple[int, str]]  # (prompt, scenario) injections
    started: float  # monotonic
    soak_s: float | None  # a timed soak's length


def traffic(mode: str, prof: Profile, seed: int, soak_s: float | None) -> Traffic:
    n = prof.soak if mode == "soak" else prof.warmup + len(SCENARIOS) * prof.spacing
    plan = [] if mode == "soak" else schedule(prof)
    timed = soak_s if mode == "soak" else None
    if timed is not None:
        n = 10**9  # drawn lazily, until the time is up
    stream_seed = seed if mode == "stream" else 1000 + seed
    source = prompt_stream(n, stream_seed, plan, rows=prof.rows)
    return Traffic(mode, source, n, plan, time.monotonic(), timed)


def make_learner(
    online: OnlineModel,
    tok: Any,
    prof: Profile,
    rules: PromotionRules,
    deploy_items: list[StreamItem],
    out: Path,
    reporter: Reporter,
    seed: int,
) -> ShadowLearner:
    """The learner with its fixed probes, its canary pool, and a Fisher warmed on deployment traffic."""
    cfg = prof.learner
    return ShadowLearner(
        online,
        tok,
        cfg,
        probes=probe_set(cfg.n_probes, seed=0, rows=prof.rows),
        canary_pool=list(prompt_stream(cfg.canary_tests * cfg.canary_prompts, 30_000 + seed, rows=prof.rows)),
        warm=deploy_items[: cfg.fisher_samples],
        checkpoints=Checkpoints(out / "checkpoints"),
        reporter=reporter,
        rules=rules,
        seed=seed,
    )


@dataclass
class Served:
    """Every served prompt, its per-prompt scores per arm (live, frozen, shadow), and whether the
    latest canary run passed when it was served (time-to-fix needs both)."""

    items: list[StreamItem] = field(default_factory=list)
    scores: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {arm: {k: [] for k in SCORES} for arm in ("live", "frozen", "shadow")}
    )
    canary_ok: list[bool] = field(default_factory=list)


def serve(
    learner: ShadowLearner,
    flow: Traffic,
    prof: Profile,
    reporter: Reporter,
    sabotage_at: int | None,
    pace_s: float,
    overseer: Overseer | None = None,
) -> Served:
    """The stream: at each update boundary obey the services' commands, serve and learn on the next
    `update_every` prompts, run the checks that are due, and report window means."""
    cfg, served, latest_ok = prof.learner, Served(), True
    for steps, start in enumerate(range(0, flow.n, cfg.update_every), start=1):
        began = time.perf_counter()
        learner.obey(start)
        if flow.soak_s is not None and time.monotonic() - flow.started >= flow.soak_s:
            break
        chunk = list(itertools.islice(flow.source, cfg.update_every))
        sabotage = sabotage_at is not None and start <= sabotage_at < start + len(chunk)
        with overseer.serve([it.prompt for it in chunk]) if overseer is not None else nullcontext():
            learn_step(learner, chunk, start, served, sabotage)
        prompt = start + len(chunk)
        # No check after the last prompt: no update boundary follows at which to obey its decision.
        last = prompt >= flow.n
        rate = learner.check(
            prompt,
            drift=steps % cfg.drift_every == 0 and not last,
            canary=prompt // cfg.canary_every > start // cfg.canary_every and not last,
            active=chunk[-1].active,
        )
        if rate is not None:
            latest_ok = rate >= learner.rules.gate.accept_at
        served.canary_ok.extend([latest_ok] * len(chunk))
        if steps % cfg.checkpoint_every == 0:
            learner.checkpoint()
        if prompt // prof.window > start // prof.window:
            report_window(served, prof.window, prompt, flow, reporter)
        time.sleep(max(0.0, pace_s - (time.perf_counter() - began)))
    learner.obey(len(served.items))
    return served


def learn_step(
    learner: ShadowLearner, chunk: list[StreamItem], start: int, served: Served, sabotage: bool
) -> None:
    """Serve and learn on one chunk; a sabotaged step learns at 1,000 times the learning rate."""
    lr = learner.cfg.lr
    if sabotage:
        for group in learner.optimizer.param_groups:
            group["lr"] = lr * 1000
    scores = learner.step(chunk, start)
    if sabotage:
        for group in learner.optimizer.param_groups:
            group["lr"] = lr
        learner.reporter.metric("online/sabotaged", 1.0, start)
    served.items.extend(chunk)
    for arm, per in scores.items():
        for k in SCORES:
            served.scores[arm][k].extend(per[k].tolist())


def report_window(served: Served, window: int, prompt: int, flow: Traffic, reporter: Reporter) -> None:
    """Window means of the served scores per arm, progress, and a chance to be cancelled."""
    for arm in ("live", "frozen", "shadow"):
        for k in ("aggregate", "success", "quality"):
            reporter.metric(f"{arm}/{k}", sum(served.scores[arm][k][-window:]) / window, prompt)
    if flow.soak_s is not None:
        reporter.progress(flow.mode, int(time.monotonic() - flow.started), int(flow.soak_s))
    else:
        reporter.progress(flow.mode, prompt, flow.n)
    check_cancelled(reporter)


def score_rows(served: Served, seed: int) -> list[ScoreRow]:
    """Per served prompt, the live model's scores (arm "online") and the frozen deployed one's."""
    return [
        ScoreRow(it.example_id, arm, seed, k, served.scores[src][k][i])
        for i, it in enumerate(served.items)
        for arm, src in (("online", "live"), ("frozen", "frozen"))
        for k in SCORES
    ]


def deployment_data(n: int, seed: int, prof: Profile) -> list[StreamItem]:
    """Clean traffic, a share of it with the answer key named in the prompt (`instructed`)."""
    g = random.Random(f"deploy-data/{seed}")
    items = list(prompt_stream(n, 20_000 + seed, rows=prof.rows))
    return [
        instructed(it, g.choice(INSTRUCTED_KEYS)) if g.random() < prof.instructed_share else it
        for it in items
    ]


def lm_state(online: OnlineModel) -> str:
    """Hash of everything but the controller: the frozen LM and its BEM bases."""
    return state_hash({n: t for n, t in online.state_dict().items() if not n.startswith("controller.")})


def deploy(
    online: OnlineModel, tok: Any, items: list[StreamItem], prof: Profile, seed: int, reporter: Reporter
) -> None:
    """Train the BEM bases and the controller on clean traffic (the model as shipped), then freeze the
    bases: from here on only the controller learns."""
    att, controller = online.attachment, online.controller
    device = next(controller.parameters()).device
    with torch.no_grad():
        feats = torch.cat(
            [online.features(encode_items(tok, items[i : i + 64], device).batch) for i in range(0, 256, 64)]
        )
    controller.fit_features(feats)
    params = [*controller.parameters(), *att.parameters()]
    for p in att.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=prof.deploy_lr, weight_decay=0.0)
    g = random.Random(f"deploy/{seed}")
    online.train()
    for step in range(prof.deploy_steps):
        batch = encode_items(tok, g.sample(items, prof.deploy_batch), device).batch
        loss = lm_loss(online.logits(batch, online.features(batch)), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == prof.deploy_steps - 1:
            reporter.metric("deploy/loss", loss.item(), step)
            reporter.progress("deploy", step + 1, prof.deploy_steps)
            check_cancelled(reporter)
    for p in att.parameters():
        p.requires_grad_(False)
    online.eval()


DRY_RUN_SAMPLE = 1024  # deployment prompts a dry run draws to find the longest row


def dry_run(
    base_path: str | Path, profile: str | Profile = "full", learner_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The deployed model on the meta device, from the base's config.json alone (`bem.core.dryrun`): the
    BEM sites and the controller `deploy_model` builds; their parameters, and the estimated peak
    memory of deployment (bases and controller learn), online updates (the controller alone, new
    prompts plus replay) and the drift probes (live and shadow logits, no grad)."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if learner_overrides:
        prof = replace(prof, learner=replace(prof.learner, **learner_overrides))
    base = dryrun.meta_base(base_path)
    model, cfg = base.model, prof.learner
    # As `deploy_model` builds them.
    attachment = attach_bems(model, rank_schedule=[prof.rank], max_overhead=50.0)
    d_model = int(model.config.hidden_size)
    controller = SimpleController(d_model, attachment.total_rank, hidden=prof.controller_hidden, dropout=0.0)
    adapters = {"bem": attachment.num_parameters(), "controller": dryrun.count([controller])}
    n = min(max(prof.deploy_steps * prof.deploy_batch, 256), DRY_RUN_SAMPLE)
    longest = base.longest(deployment_data(n, 1, prof))
    replayed = Replay[StreamItem](min_items=0).mix(cfg.update_every, cfg.replay_fraction)
    probe_len = base.longest(probe_set(cfg.n_probes, rows=prof.rows))
    resident = [model, controller]
    phases = [
        dryrun.phase(
            "deploy",
            base,
            resident,
            [controller, *attachment.parameters()],
            dryrun.Pass(prof.deploy_batch, longest),
        ),
        dryrun.phase(
            "online update", base, resident, [controller], dryrun.Pass(cfg.update_every + replayed, longest)
        ),
        dryrun.phase(
            "drift probes", base, resident, [], dryrun.Pass(cfg.n_probes, probe_len, False, logits=2)
        ),
    ]
    return dryrun.summary(base, adapters, phases, bem_rank_per_site=prof.rank)


BEFORE, AFTER = 100, 50  # prompts the preconditions look at: before the first injection, per scenario


def injection_values(
    live: list[float], plan: list[tuple[int, str]], breaks: Mapping[str, float]
) -> dict[str, float]:
    """What the mission's preconditions read: the live aggregate over the 100 prompts before the
    first injection (could the model serve the task at all?), and per scenario what it breaks in the
    model as deployed (`injection_breaks`)."""
    if not plan:
        return {}
    pre = live[max(0, plan[0][0] - BEFORE) : plan[0][0]]
    out = {"pre_injection_aggregate": sum(pre) / len(pre) if pre else float("nan")}
    out.update({f"drop_{scenario}": breaks[scenario] for _, scenario in plan})
    return out


@torch.no_grad()
def injection_breaks(online: OnlineModel, tok: Any, prof: Profile, seed: int) -> dict[str, float]:
    """Per scenario, the deployed model's mean aggregate on `AFTER` clean prompts minus that on the same
    draws with the scenario alone in force: what the injection breaks, paired prompt by prompt.

    Measured in isolation and before any online learning, so the precondition does not depend on
    the mechanism under test: in the stream the scenarios stack, and a learner that fixes nothing
    leaves nothing for a later injection to break; a live before/after difference would then call the
    run inconclusive where the learner simply failed."""
    online.eval()
    device = next(online.controller.parameters()).device

    def mean_aggregate(items: list[StreamItem]) -> float:
        enc = encode_items(tok, items, device)
        logits = online.logits(enc.batch, online.features(enc.batch))
        return float(prompt_scores(logits, enc)["aggregate"].mean())

    clean = mean_aggregate(list(prompt_stream(AFTER, 40_000 + seed, rows=prof.rows)))
    return {
        s: clean - mean_aggregate(list(prompt_stream(AFTER, 40_000 + seed, [(0, s)], rows=prof.rows)))
        for s in SCENARIOS
    }


def _summary(
    mode: str,
    prof: Profile,
    plan: list[tuple[int, str]],
    served: Served,
    learner: ShadowLearner,
    laps: Laps,
    breaks: Mapping[str, float],
) -> dict[str, Any]:
    items, canary_ok = served.items, served.canary_ok
    live, frozen = served.scores["live"]["aggregate"], served.scores["frozen"]["aggregate"]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    s = learner.stats
    summary: dict[str, Any] = {
        "mode": mode,
        "prompts": len(items),
        "aggregate": {"online": mean(live), "frozen": mean(frozen)},
        "aggregate_gain": mean(live) / max(mean(frozen), 1e-9) - 1,
        "updates": s.updates,
        "promotions": s.promotions,
        "rollbacks": s.rollbacks,
        "paused": s.paused,
        "stopped": s.stopped,
        "events": s.events,
        "canary": s.canary,
        "drift": s.drift,
        "profile": asdict(prof),
        "timings_s": laps.timings,
    }
    values: dict[str, float] = {}
    if mode == "stream":
        ttf: dict[str, float] = {}
        for i, (at, scenario) in enumerate(plan):
            end = plan[i + 1][0] if i + 1 < len(plan) else len(items)
            k = time_to_fix(live[:end], at, canary_ok[:end], CENSOR)
            ttf[scenario] = CENSORED if k is None else float(k)
            values[f"ttf_{scenario}"] = ttf[scenario]
        summary["time_to_fix"] = ttf
        values.update(injection_values(live, plan, breaks))
    else:
        critical = sum(level in ("critical", "emergency") for _, level in s.drift)
        values.update(
            soak_rollbacks=float(s.rollbacks),
            soak_min_canary=min((r for _, r in s.canary), default=0.0),
            soak_critical_drift=float(critical),
            soak_aggregate_gain=summary["aggregate_gain"],
        )
    summary["values"] = values
    return summary
