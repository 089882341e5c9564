"""Mission A (BEM_SPEC.md section 6): does a macro-policy that sequences skill experts per chunk beat one
fused adapter of the same budget on compositional tasks?

Recipe, one seed:
1. One static LoRA per skill (retrieve, reason, formalise; r 8) trained on that skill's single-skill
   data, and one fused LoRA trained on all of it plus the composite training set, its rank chosen so
   its adapter parameters match the experts' plus the router's (parity, ±5%).
2. All four load into one BEM per site as column blocks in SVD form (orthonormal U and V, singular
   values in the code), so a macro-action's composition (rank budget, bias, σ-clamp, trust region:
   `planner.compose`) is just a per-site code, constant over its chunks, and every arm is a code.
3. AR0: the policy learns a rule-based teacher's per-chunk actions by behaviour cloning; AR1: PPO from
   AR0 on the task reward with a KL early stop.
4. Every arm decodes the composite test set greedily (per-token codes, chunk-sticky) and is scored per
   example: EM, F1, plan length, flips, latency; per run: KV-hit against the fused arm, index-swap pass
   rate, cache-safety rate, adapter parity.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bem.core import dryrun
from bem.core.attach import Attachment, attach_bems
from bem.core.cache import (
    RouterDecision,
    cache_safety_rate,
    codes_constant_in_chunks,
    kv_hit_rate,
    kv_hit_ratio,
)
from bem.core.chunked import read_hidden
from bem.core.models import load_model
from bem.core.overseer import Overseer
from bem.core.parity import Cost, Parity, adapter_parameters, linear_flops, parity
from bem.core.reporter import Laps, Reporter, ScoreRow, check_cancelled, write_scores
from bem.core.routing import chunk_means, lag_chunks, num_chunks
from bem.core.train import LORA_RANK, lora_factors, lora_model, train_lora
from bem.missions.mission_a import data as skills
from bem.missions.mission_a import metrics, planner
from bem.missions.mission_a.planner import SCOPES, SPANS, MacroAction, MacroPolicy

ARMS = ("fused", "AR0", "AR1")
EXPERTS = skills.SKILLS
CHUNK = 32
DATA_SEED = 0  # test example_ids pair across training seeds

# Teacher profiles per expert (the spec's code / formal / safety, mapped to our skills):
# (scope, spans, ranks, bias range).
TEACHER = {
    "retrieve": ("local", (1, 2), (16, 32), (0.5, 1.0)),
    "reason": ("global", (2, 3, 4), (32, 64), (0.8, 1.5)),
    "formalise": ("global", (1, 2), (8, 16), (1.2, 2.0)),
}


@dataclass(frozen=True)
class Profile:
    n_single: int  # training examples per single-skill kind
    n_composite: int  # per composite kind, train (router and fused)
    n_test: int  # per composite kind
    n_swap: int  # test examples per composite kind under the index swaps
    lora_steps: int
    batch_size: int
    lora_lr: float
    policy_width: int
    policy_layers: int
    bc_epochs: int
    bc_batch: int
    bc_lr: float
    ppo_iterations: int
    ppo_episodes: int
    policy_lr: float
    value_max: int = skills.VALUE_MAX  # table values and sum operands run 1..value_max


PROFILES = {
    # The spec's BC recipe (batch 64, lr 3e-4, 20 epochs) in full; smoke has a few dozen steps in
    # all, so it takes a larger step. PPO's lr is the spec's policy lr (1e-5) in full.
    # Smoke's LoRA recipe (300 examples per skill, 200 steps at 3e-3) was tuned on development seeds
    # 101-103 until every expert reached the 0.8 precondition; 120 examples memorised instead.
    "tiny": Profile(8, 4, 3, 1, 4, 8, 1e-2, 16, 1, 2, 8, 3e-3, 1, 4, 3e-4),
    "smoke": Profile(300, 40, 20, 2, 200, 16, 3e-3, 32, 2, 20, 32, 3e-3, 2, 16, 3e-4),
    "full": Profile(2000, 400, 100, 20, 1500, 16, 2e-3, 64, 3, 20, 64, 3e-4, 20, 64, 1e-5, value_max=99),
}


# ---- the composed attachment: blocks in SVD form ---------------------------------------------------


@dataclass
class Blocks:
    """Column blocks per site: each block's offset and width, and its singular values (descending);
    U and V hold the singular vectors."""

    widths: dict[str, int]
    sigma: dict[str, dict[str, Tensor]]  # site -> block -> [width]

    @property
    def total(self) -> int:
        return sum(self.widths.values())

    def cols(self, block: str) -> slice:
        start = 0
        for name, width in self.widths.items():
            if name == block:
                return slice(start, start + width)
            start += width
        raise KeyError(block)


def load_blocks(
    model: nn.Module, factors: dict[str, dict[str, tuple[Tensor, Tensor]]], max_overhead: float = 10.0
) -> tuple[Attachment, Blocks]:
    """One BEM per site with a column block per LoRA, rotated into SVD form (ΔW_b = U_b·diag(σ_b)·V_bᵀ).

    The overhead bound is loose because tiny bases need it; Mission A's own budget rule is parity with
    the fused arm (`bem.core.parity`), checked in the run.
    """
    first = next(iter(factors.values()))
    widths = {name: next(iter(f.values()))[0].shape[0] for name, f in factors.items()}
    blocks = Blocks(widths, {})
    att = attach_bems(model, rank_schedule=[blocks.total], max_overhead=max_overhead)
    assert set(att.sites) == set(first), (sorted(att.sites), sorted(first))
    with torch.no_grad():
        for site_name, site in att.sites.items():
            blocks.sigma[site_name] = {}
            for block in widths:
                a, b = factors[block][site_name]  # ΔW = b·a (b: d_out×r, a: r×d_in)
                u, s, v = planner.factored_svd(b.double(), a.double())
                # A rank above min(d_in, d_out) has only that many directions; the rest stay 0.
                cols = blocks.cols(block)
                live = slice(cols.start, cols.start + s.numel())
                site.U[:, live] = u.to(site.U.dtype)
                site.V[live] = v.T.to(site.V.dtype)
                blocks.sigma[site_name][block] = torch.cat([s, s.new_zeros(widths[block] - s.numel())])
            site.scaling = 1.0
            site.U.requires_grad_(False)
            site.V.requires_grad_(False)
    model.eval()  # the new sites are frozen: no branch dropout from here on
    return att, blocks


def action_code(
    blocks: Blocks, action: MacroAction, expert: str, sigma_max: float = 2.0, tau_f: float = 5.0
) -> dict[str, Tensor]:
    """Per-site codes for one macro-action: `planner.compose` done on singular values."""
    out = {}
    for site, per_block in blocks.sigma.items():
        code = torch.zeros(blocks.total, dtype=torch.float64)
        code[blocks.cols(expert)] = planner.action_singular_values(
            per_block[expert], action, sigma_max=sigma_max, tau_f=tau_f
        )
        out[site] = code
    return out


def fixed_code(blocks: Blocks, block: str) -> dict[str, Tensor]:
    """The block exactly as trained (its own singular values), the others off."""
    out = {}
    for site, per_block in blocks.sigma.items():
        code = torch.zeros(blocks.total, dtype=torch.float64)
        code[blocks.cols(block)] = per_block[block]
        out[site] = code
    return out


def token_codes(chunk_codes: list[dict[str, Tensor]], length: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-site [1, length, R] codes: chunk k's code over its CHUNK tokens (chunk-sticky)."""
    return {
        site: torch.stack([chunk_codes[min(t // CHUNK, len(chunk_codes) - 1)][site] for t in range(length)])
        .unsqueeze(0)
        .to(dtype)
        for site in chunk_codes[0]
    }


# ---- the teacher and the router's states --------------------------------------------------------


def region_skills(ex: skills.SkillExample, tokenizer: PreTrainedTokenizerBase, n_chunks: int) -> list[str]:
    """The rule-based content classifier: the skill each chunk's text calls for."""
    ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    question_at = len(tokenizer(ex.prompt.split("question:")[0], add_special_tokens=False)["input_ids"])
    answer_at = len(ids)
    plan = ex.plan
    middle = "reason" if "reason" in plan else plan[0]
    out = []
    for k in range(n_chunks):
        centre = k * CHUNK + CHUNK // 2
        if centre >= answer_at or (k + 1) * CHUNK > answer_at:  # the chunk the answer is written in
            out.append(plan[-1])
        elif centre >= question_at:
            out.append(middle)
        else:
            out.append(plan[0])
    return out


def teacher_actions(wanted: list[str], rng: random.Random) -> list[MacroAction]:
    """Per chunk: the wanted skill's profile, bias noise N(0, .1), and 30% of steps copying the last."""
    actions: list[MacroAction] = []
    for k, skill in enumerate(wanted):
        if k and rng.random() < 0.3 and EXPERTS[actions[-1].expert] == skill:
            actions.append(actions[-1])
            continue
        scope, spans, ranks, (lo, hi) = TEACHER[skill]
        bias = min(max(rng.uniform(lo, hi) + rng.gauss(0, 0.1), planner.BIAS_LOW), planner.BIAS_HIGH)
        actions.append(
            MacroAction(
                EXPERTS.index(skill),
                SCOPES.index(scope),
                SPANS.index(rng.choice(spans)),
                planner.RANKS.index(rng.choice(ranks)),
                bias,
            )
        )
    return actions


@torch.no_grad()
def chunk_features(
    model: nn.Module,
    att: Attachment,
    tokenizer: PreTrainedTokenizerBase,
    ex: skills.SkillExample,
    n_chunks: int,
    layer: int,
) -> Tensor:
    """[K, d]: the adapter-off mean hidden state of chunk k−1 (prompt tokens only; zeros for chunk 0).

    Chunks past the prompt see the last prompt chunk's summary: c_k never depends on chunk k itself.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]], device=device)
    chunks = chunk_means(read_hidden(model, att, ids, None, layer).float(), CHUNK)
    means = lag_chunks(chunks)[0]
    if means.shape[0] < n_chunks:
        means = torch.cat([means, chunks[0, -1:].expand(n_chunks - means.shape[0], -1)])
    return means[:n_chunks].cpu()


# ---- decoding under a plan ------------------------------------------------------------------------


@torch.no_grad()
def decode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    att: Attachment,
    prompt: str,
    chunk_codes: list[dict[str, Tensor]],
    max_new: int,
) -> str:
    """Greedy decoding, each position under the code of its chunk, with the KV cache.

    The cache stays valid because a position's code never changes once its chunk is decided (cache
    safety): the cached keys and values are what a full re-read would compute (tested).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)
    codes = {k: v.to(device) for k, v in token_codes(chunk_codes, n_prompt + max_new, dtype).items()}
    past = None
    step = torch.tensor([ids], device=device)
    for _ in range(max_new):
        lo, hi = len(ids) - step.shape[1], len(ids)
        with att.codes({k: v[:, lo:hi] for k, v in codes.items()}):
            out = model(input_ids=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
        step = torch.tensor([[nxt]], device=device)
    text = tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)
    return str(text).split("\n")[0].strip()


def plan_codes(blocks: Blocks, actions: list[MacroAction]) -> list[dict[str, Tensor]]:
    return [action_code(blocks, a, EXPERTS[a.expert]) for a in actions]


# ---- the run's shared state -----------------------------------------------------------------------

Factors = dict[str, dict[str, tuple[Tensor, Tensor]]]  # adapter -> site -> LoRA (A: r×d_in, B: d_out×r)
Trace = tuple[skills.SkillExample, Tensor, int]  # a training example, its router features [K, d], K
Stream = tuple[list[int], list[np.ndarray]]  # a request's token ids and the code bytes of its chunks


@dataclass(frozen=True)
class Data:
    """One seed's examples; DATA_SEED fixes them, so test example_ids pair across training seeds."""

    single: dict[str, list[skills.SkillExample]]  # per expert, its skill's training examples
    composite: list[skills.SkillExample]  # composite training set (the router and the fused LoRA)
    test: list[skills.SkillExample]  # composite test set
    single_test: dict[str, list[skills.SkillExample]]  # per expert, its skill's held-out examples


def make_data(prof: Profile) -> Data:
    """The single-skill training sets, the composite training set and the composite test set."""
    single = {
        s: skills.make_mixture(kinds, "train", prof.n_single, DATA_SEED, prof.value_max)
        for s, kinds in skills.SINGLE_SKILL.items()
    }
    composite = skills.make_mixture(skills.COMPOSITE, "train", prof.n_composite, DATA_SEED, prof.value_max)
    test = skills.make_mixture(skills.COMPOSITE, "test", prof.n_test, DATA_SEED, prof.value_max)
    single_test = {
        s: skills.make_mixture(kinds, "test", prof.n_test, DATA_SEED, prof.value_max)
        for s, kinds in skills.SINGLE_SKILL.items()
    }
    return Data(single, composite, test, single_test)


@dataclass(frozen=True)
class Composed:
    """What the router's phases share: the frozen base with every adapter loaded as an SVD block, the
    layer the router reads, and how many tokens an answer may take (`cap`, set from the composite
    training targets, never test ones)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    att: Attachment
    blocks: Blocks
    layer: int
    cap: int
    # What each answer is decoded under: nothing, or an overseer's `serve` (Mission C's overlay, in
    # evaluation only: the router trains on the model as it is).
    serve: Callable[[Sequence[str]], AbstractContextManager[object]] = lambda _: nullcontext()

    @cached_property
    def fused_code(self) -> dict[str, Tensor]:
        """The fused arm's code, the same at every chunk: its block exactly as trained (built once, so
        the fused arm's latency does not include building it)."""
        return fixed_code(self.blocks, "fused")

    def n_tokens(self, ex: skills.SkillExample) -> int:
        """An episode's length in tokens: the prompt, then the longest answer it may write."""
        return len(self.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) + self.cap

    def episode_inputs(self, ex: skills.SkillExample) -> tuple[Tensor, int]:
        """The router's per-chunk features for the whole episode, and its number of chunks."""
        k = num_chunks(self.n_tokens(ex), CHUNK)
        return chunk_features(self.model, self.att, self.tokenizer, ex, k, self.layer), k

    def answer(self, prompt: str, chunk_codes: list[dict[str, Tensor]]) -> str:
        """Greedy decoding of up to `cap` new tokens, each chunk under its code."""
        with self.serve([prompt]):
            return decode(self.model, self.tokenizer, self.att, prompt, chunk_codes, self.cap)


# ---- step 1: the adapters, at parity --------------------------------------------------------------


def train_experts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Data,
    prof: Profile,
    gen: torch.Generator,
    reporter: Reporter,
) -> Factors:
    """One static LoRA (r 8) per skill, trained on that skill's single-skill data."""
    factors: Factors = {}
    for skill in EXPERTS:
        peft_model = train_lora(
            model, tokenizer, data.single[skill], rank=LORA_RANK, steps=prof.lora_steps, lr=prof.lora_lr,
            batch_size=prof.batch_size, generator=gen, reporter=reporter, name=f"expert_{skill}",
        )  # fmt: skip
        factors[skill] = lora_factors(peft_model)
        del peft_model
    return factors


def new_policy(model: PreTrainedModel, prof: Profile) -> MacroPolicy:
    """The router, untrained; built before the fused LoRA because its size is part of the budget."""
    d_model = model.config.hidden_size
    return MacroPolicy(
        d_model, len(EXPERTS), d_model=prof.policy_width, n_layers=prof.policy_layers, n_heads=4
    ).to(torch.float32)


def _expert_parameters(factors: Factors) -> int:
    return sum(a.numel() + b.numel() for name in EXPERTS for a, b in factors[name].values())


def fused_rank_for(factors: Factors, policy: MacroPolicy) -> int:
    """The fused rank whose parameters match the experts' plus the router's (to the nearest rank)."""
    per_rank = sum(a.shape[1] + b.shape[0] for a, b in factors[EXPERTS[0]].values())  # per unit of rank
    return max(1, round((_expert_parameters(factors) + adapter_parameters([policy])) / per_rank))


def train_fused(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Data,
    rank: int,
    prof: Profile,
    gen: torch.Generator,
    reporter: Reporter,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The baseline: one LoRA of the parity rank on every single-skill example plus the composite set."""
    peft_model = train_lora(
        model, tokenizer, [e for s in data.single.values() for e in s] + data.composite, rank=rank,
        steps=2 * prof.lora_steps, lr=prof.lora_lr, batch_size=prof.batch_size, generator=gen,
        reporter=reporter, name="fused",
    )  # fmt: skip
    return lora_factors(peft_model)


def train_adapters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Data,
    prof: Profile,
    gen: torch.Generator,
    reporter: Reporter,
) -> tuple[Factors, MacroPolicy, int]:
    """The experts, then the router (untrained; its size sets the fused rank), then the fused LoRA.

    Returns every adapter's factors (the experts, then "fused"), the router and the fused rank.
    """
    factors = train_experts(model, tokenizer, data, prof, gen, reporter)
    policy = new_policy(model, prof)
    fused_rank = fused_rank_for(factors, policy)
    factors["fused"] = train_fused(model, tokenizer, data, fused_rank, prof, gen, reporter)
    return factors, policy, fused_rank


def adapter_parity(factors: Factors, policy: MacroPolicy, fused_rank: int) -> Parity:
    """Experts plus router against the fused LoRA: parameters, and FLOPs per token (the router runs
    once per chunk)."""
    sites = [(a.shape[1], b.shape[0]) for a, b in factors[EXPERTS[0]].values()]
    ar_cost = Cost(
        _expert_parameters(factors) + adapter_parameters([policy]),
        2 * sum(LORA_RANK * (i + o) for i, o in sites) + linear_flops(policy) / CHUNK,
    )
    fused_cost = Cost(
        sum(a.numel() + b.numel() for a, b in factors["fused"].values()),
        2 * sum(fused_rank * (i + o) for i, o in sites),
    )
    return parity(ar_cost, fused_cost)


# ---- step 2: every adapter a block ----------------------------------------------------------------


def answer_cap(tokenizer: PreTrainedTokenizerBase, composite: list[skills.SkillExample]) -> int:
    """Tokens an answer may take: the longest composite training target's, and 4 to spare."""
    return max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in composite) + 4


def compose(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, factors: Factors, data: Data
) -> Composed:
    """Step 2: every adapter as a block in SVD form; the router reads the middle layer."""
    att, blocks = load_blocks(model, factors)
    cap = answer_cap(tokenizer, data.composite)
    return Composed(model, tokenizer, att, blocks, model.config.num_hidden_layers // 2, cap)


# ---- step 3: AR0 (behaviour cloning), AR1 (PPO) ---------------------------------------------------


def teacher_labels(
    c: Composed, policy: MacroPolicy, train_set: list[Trace], rng: random.Random
) -> list[tuple[Tensor, list[MacroAction]]]:
    """The teacher labels each training trace once (its noise and copies are part of the data): the
    policy's states under the teacher's own previous actions, and the teacher's action per chunk."""
    labelled = []
    for ex, feats, k in train_set:
        gold = teacher_actions(region_skills(ex, c.tokenizer, k), rng)
        states = policy.states(feats, [planner.default_action(len(EXPERTS)), *gold[:-1]])
        labelled.append((states, gold))
    return labelled


def bc_batch(
    part: list[tuple[Tensor, list[MacroAction]]],
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """Traces padded to the longest: states, per-head targets, biases, and the mask of real chunks."""
    k_max = max(st.shape[0] for st, _ in part)
    states = torch.stack([_pad(st, k_max) for st, _ in part])
    targets = {
        h: torch.stack([_pad(torch.tensor([a.heads()[h] for a in g]), k_max) for _, g in part])
        for h in planner.HEADS
    }
    bias = torch.stack([_pad(torch.tensor([a.bias for a in g]), k_max) for _, g in part])
    mask = torch.stack([_pad(torch.ones(len(g)), k_max) for _, g in part])
    return states, targets, bias, mask


def behaviour_clone(
    policy: MacroPolicy,
    labelled: list[tuple[Tensor, list[MacroAction]]],
    prof: Profile,
    rng: random.Random,
    reporter: Reporter,
) -> list[float]:
    """AR0: the policy learns the teacher's per-chunk actions; returns each epoch's mean BC loss."""
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=prof.bc_lr)
    bc_losses = []
    for epoch in range(prof.bc_epochs):
        order = list(range(len(labelled)))
        rng.shuffle(order)
        total, batches = 0.0, 0
        for lo in range(0, len(order), prof.bc_batch):
            states, targets, bias, mask = bc_batch([labelled[i] for i in order[lo : lo + prof.bc_batch]])
            loss = planner.bc_loss(policy(states), targets, bias, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        bc_losses.append(total / batches)
        reporter.metric("ar0/bc_loss", bc_losses[-1], epoch)
        reporter.progress("train AR0", epoch + 1, prof.bc_epochs)
        check_cancelled(reporter)
    policy.eval()
    return bc_losses


def ppo_episode(
    c: Composed, policy: MacroPolicy, trace: Trace, gen: torch.Generator
) -> tuple[planner.Episode, Tensor]:
    """One sampled plan, decoded and scored; the task reward (less flips) lands on the last chunk."""
    ex, feats, k = trace
    ep = planner.rollout(policy, feats, greedy=False, generator=gen)
    pred = c.answer(ex.prompt, plan_codes(c.blocks, ep.actions))
    em, f1 = metrics.score(pred, ex.golds)
    reward = torch.zeros(k)
    reward[-1] = planner.reward((em + f1) / 2, ep.flip_rate, 1.0)
    return ep, reward


def train_ppo(
    c: Composed,
    policy: MacroPolicy,
    train_set: list[Trace],
    prof: Profile,
    rng: random.Random,
    gen: torch.Generator,
    reporter: Reporter,
) -> list[dict[str, Any]]:
    """AR1: PPO on the task reward, starting from AR0, with the KL early stop; returns each update's stats."""
    ppo_opt = torch.optim.Adam(policy.parameters(), lr=prof.policy_lr)
    ppo_stats = []
    for it in range(prof.ppo_iterations):
        picks = [train_set[rng.randrange(len(train_set))] for _ in range(prof.ppo_episodes)]
        played = [ppo_episode(c, policy, trace, gen) for trace in picks]
        eps, rewards = [ep for ep, _ in played], [r for _, r in played]
        k_max = max(ep.states.shape[0] for ep in eps)
        batch = _ppo_batch(eps, rewards, k_max)
        policy.train()
        stats = planner.ppo_update(policy, ppo_opt, batch)
        policy.eval()
        ppo_stats.append(asdict(stats))
        reporter.metric("ar1/mean_reward", float(torch.stack([r.sum() for r in rewards]).mean()), it)
        reporter.metric("ar1/kl", stats.kl, it)
        reporter.progress("train AR1", it + 1, prof.ppo_iterations)
        check_cancelled(reporter)
    return ppo_stats


# ---- step 4: evaluate every arm -------------------------------------------------------------------


@dataclass
class Evaluation:
    """What evaluating the arms collects: per-example score rows, and per arm what the per-run scores
    are made of."""

    rows: list[ScoreRow] = field(default_factory=list)
    per_arm: dict[str, dict[str, float]] = field(default_factory=dict)
    streams: dict[str, list[Stream]] = field(default_factory=lambda: {arm: [] for arm in ARMS})
    decisions: dict[str, list[RouterDecision]] = field(default_factory=lambda: {arm: [] for arm in ARMS})
    swap_rate: dict[str, float] = field(default_factory=dict)


def answer_as(
    c: Composed, policy: MacroPolicy, arm: str, ex: skills.SkillExample
) -> tuple[str, planner.Episode | None, float]:
    """`ex` answered by `arm` (the fused code throughout, or the router's greedy plan), with the plan
    and the seconds it took."""
    fused = c.fused_code if arm == "fused" else None  # built (once) before the clock starts
    t0 = time.perf_counter()
    if fused is not None:
        pred = c.answer(ex.prompt, [fused] * num_chunks(c.n_tokens(ex), CHUNK))
        return pred, None, time.perf_counter() - t0
    feats, _ = c.episode_inputs(ex)
    plan = planner.rollout(policy, feats, greedy=True)
    pred = c.answer(ex.prompt, plan_codes(c.blocks, plan.actions))
    return pred, plan, time.perf_counter() - t0


def router_decisions(c: Composed, ex: skills.SkillExample, episode: planner.Episode) -> list[RouterDecision]:
    """The plan's decisions, each marked with whether the code changed inside a chunk: measured on the
    codes decoding used, not assumed from how they were built."""
    used = token_codes(plan_codes(c.blocks, episode.actions), c.n_tokens(ex), torch.float64)
    changed = not all(codes_constant_in_chunks(code, CHUNK) for code in used.values())
    return [
        RouterDecision(code_changed_inside_chunk=changed, span=a.chunks, bias_scale=a.bias)
        for i, a in enumerate(episode.actions)
        if episode.decided[i]
    ]


def score_test_set(
    c: Composed, policy: MacroPolicy, arm: str, test: list[skills.SkillExample], seed: int, ev: Evaluation
) -> None:
    """Every test example under `arm`: EM, F1, plan length, flips and latency rows, and its decisions."""
    ems = []
    for ex in test:
        pred, episode, seconds = answer_as(c, policy, arm, ex)
        em, f1 = metrics.score(pred, ex.golds)
        ems.append(em)
        plan_len = episode.plan_length if episode else 1
        flips = episode.flip_rate if episode else 0.0
        for metric, value in (
            ("em", em),
            ("f1", f1),
            ("plan_length", plan_len),
            ("flip_rate", flips),
            ("latency_ms", 1e3 * seconds),
        ):
            ev.rows.append(ScoreRow(ex.example_id, arm, seed, metric, float(value)))
        if episode:
            ev.decisions[arm] += router_decisions(c, ex, episode)
    ev.per_arm[arm] = {"em": float(np.mean(ems))}


def kv_streams(
    c: Composed,
    policy: MacroPolicy,
    arm: str,
    test: list[skills.SkillExample],
    kv_features: dict[str, Tensor],
) -> list[Stream]:
    """KV-hit traffic: each test prompt, then a sibling asking about the same context (a shared prefix).

    `kv_features` caches the router's features per prompt across arms: they do not depend on the arm.
    """
    streams = []
    for i, ex in enumerate(test):
        sibling = replace(test[(i + 1) % len(test)], table=ex.table)
        for req in (ex, sibling):
            ids = c.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
            k = num_chunks(len(ids), CHUNK)
            if arm == "fused":
                codes = [c.fused_code] * k
            else:
                if req.prompt not in kv_features:
                    kv_features[req.prompt] = c.episode_inputs(req)[0]
                plan = planner.rollout(policy, kv_features[req.prompt], greedy=True)
                codes = plan_codes(c.blocks, plan.actions)
            streams.append((ids, [_code_bytes(code) for code in codes[:k]]))
    return streams


def index_swap_rate(
    c: Composed, policy: MacroPolicy, arm: str, swap_set: list[skills.SkillExample], seed: int
) -> float:
    """The share of the index-swap monotonicity checks `arm` passes (mean of EM and F1 per condition)."""
    by_swap: dict[str, list[float]] = {s: [] for s in skills.SWAPS}
    for ex in swap_set:
        for cond, variant in skills.index_swaps(ex, seed).items():
            pred, _, _ = answer_as(c, policy, arm, variant)
            by_swap[cond].append(sum(metrics.score(pred, variant.golds)) / 2)
    checks = metrics.monotonicity({cond: float(np.mean(v)) for cond, v in by_swap.items()})
    return metrics.pass_rate(checks)


def evaluate_arms(
    c: Composed,
    policy: MacroPolicy,
    weights: dict[str, dict[str, Tensor]],
    data: Data,
    prof: Profile,
    seed: int,
    reporter: Reporter,
) -> Evaluation:
    """Every arm on the composite test set, then its KV-hit traffic and the index swaps; the router
    arms load their policy `weights` (AR0, AR1) first."""
    ev = Evaluation()
    kv_features: dict[str, Tensor] = {}
    by_kind = {kind: [e for e in data.test if e.kind == kind] for kind in skills.COMPOSITE}
    swap_set = [ex for kind in skills.COMPOSITE for ex in by_kind[kind][: prof.n_swap]]
    for arm in ARMS:
        if arm != "fused":
            policy.load_state_dict(weights[arm])
        score_test_set(c, policy, arm, data.test, seed, ev)
        ev.streams[arm] = kv_streams(c, policy, arm, data.test, kv_features)
        ev.swap_rate[arm] = index_swap_rate(c, policy, arm, swap_set, seed)
        reporter.progress("evaluate", ARMS.index(arm) + 1, len(ARMS))
        check_cancelled(reporter)
    return ev


def score_experts(c: Composed, data: Data, seed: int, ev: Evaluation) -> None:
    """Each expert alone on its own skill's held-out examples (arm `expert_<skill>`, EM): the
    precondition that says whether the experts learnt their skills at all, before any router is
    judged on sequencing them."""
    for skill in EXPERTS:
        code = fixed_code(c.blocks, skill)
        ems = []
        for ex in data.single_test[skill]:
            pred = c.answer(ex.prompt, [code] * num_chunks(c.n_tokens(ex), CHUNK))
            em, _ = metrics.score(pred, ex.golds)
            ems.append(em)
            ev.rows.append(ScoreRow(ex.example_id, f"expert_{skill}", seed, "em", em))
        ev.per_arm[f"expert_{skill}"] = {"em": float(np.mean(ems))}


def run_rows(ev: Evaluation, seed: int) -> tuple[list[ScoreRow], dict[str, float | None]]:
    """The per-run scores, example_id run-seed{seed}: KV-hit against the fused arm, index-swap pass rate,
    cache-safety rate; and the KV-hit ratios for the summary.

    When the fused arm reuses nothing (a tokenizer that packs the shared context into less than one
    chunk: the base of a mission run with Mission C's overlay), the ratio is undefined: no row, None in
    the summary, and the KV-hit guard finds no evidence rather than a made-up number."""
    run_id = f"run-seed{seed}"
    fused_hits = kv_hit_rate(ev.streams["fused"], CHUNK)
    kv = {
        arm: kv_hit_ratio(ev.streams[arm], ev.streams["fused"], CHUNK) if fused_hits > 0 else None
        for arm in ARMS
    }
    rows = []
    for arm in ARMS:
        safety = cache_safety_rate(ev.decisions[arm]) if ev.decisions[arm] else 1.0
        for metric, value in (
            ("kv_hit_ratio", kv[arm]),
            ("index_swap_pass", ev.swap_rate[arm]),
            ("cache_safety_rate", safety),
        ):
            if value is not None:
                rows.append(ScoreRow(run_id, arm, seed, metric, float(value)))
    return rows, kv


# ---- the run --------------------------------------------------------------------------------------


def save_results(out: Path, reporter: Reporter, summary: dict[str, Any], rows: list[ScoreRow]) -> None:
    """The score rows to the reporter, then summary.json and scores.parquet as artifacts."""
    reporter.scores(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    reporter.artifact(out / "summary.json", "summary")
    write_scores(rows, out / "scores.parquet")
    reporter.artifact(out / "scores.parquet", "scores")


def _snapshot(policy: MacroPolicy) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def run_mission_a(
    base_path: str | Path,
    *,
    profile: str | Profile,
    seed: int,
    out_dir: str | Path,
    reporter: Reporter,
    device: torch.device | str = "cpu",
    overseer: Overseer | None = None,
) -> dict[str, Any]:
    """One seed end to end; per-example score rows go to the reporter; returns the run summary. An
    `overseer` (Mission C's overlay) serves every answer of the evaluation; what it saw is in the
    summary's `overlay`.

    Each random stream is drawn in a fixed order: torch's global one (dropout, the policy's initial
    weights), `gen` (LoRA minibatches, PPO's plans), `rng` (the teacher, BC's shuffles, PPO's picks).
    """
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    laps = Laps()
    model, tokenizer = load_model(base_path, device=device)
    model.requires_grad_(False)
    data = make_data(prof)

    # 1. The experts, then the router (its size sets the fused rank), then the fused LoRA.
    factors, policy, fused_rank = train_adapters(model, tokenizer, data, prof, gen, reporter)
    laps.lap("train_adapters")
    # 2. All four as blocks in SVD form.
    c = compose(model, tokenizer, factors, data)
    par = adapter_parity(factors, policy, fused_rank)

    # 3. AR0: behaviour cloning on the teacher's plans; AR1: PPO from AR0.
    train_set = [(ex, *c.episode_inputs(ex)) for ex in data.composite]
    bc_losses = behaviour_clone(policy, teacher_labels(c, policy, train_set, rng), prof, rng, reporter)
    ar0 = _snapshot(policy)
    laps.lap("train_ar0")
    ppo_stats = train_ppo(c, policy, train_set, prof, rng, gen, reporter)
    ar1 = _snapshot(policy)
    laps.lap("train_ar1")

    # 4. Every arm on the composite test set, then the per-run scores.
    if overseer is not None:
        overseer.attach(model, tokenizer)
        c = replace(c, serve=overseer.serve)
    ev = evaluate_arms(c, policy, {"AR0": ar0, "AR1": ar1}, data, prof, seed, reporter)
    score_experts(c, data, seed, ev)
    overlay = overseer.close() if overseer is not None else None
    laps.lap("evaluate")
    per_run, kv = run_rows(ev, seed)
    summary = {
        "profile": profile if isinstance(profile, str) else "custom",
        "seed": seed,
        "arms": ev.per_arm,
        "index_swap_pass": ev.swap_rate,
        "kv_hit_ratio": kv,
        "fused_rank": fused_rank,
        "parity": {"parameter_ratio": par.parameter_ratio, "flops_ratio": par.flops_ratio},
        "bc_loss": bc_losses,
        "ppo": ppo_stats,
        "timings_s": laps.timings,
        "values": {"adapter_param_ratio": par.parameter_ratio},
    }
    if overlay is not None:
        summary["overlay"] = overlay
    save_results(out, reporter, summary, ev.rows + per_run)
    return summary


DRY_RUN_SAMPLE = 256  # examples per kind a dry run draws to find the longest row


def dry_run(base_path: str | Path, profile: str | Profile = "full") -> dict[str, Any]:
    """One seed's models on the meta device, from the base's config.json alone (`bem.core.dryrun`): the
    experts and the fused LoRA (through `lora_model`, as `train_lora` builds them; the fused rank from
    `fused_rank_for`), the router (`new_policy`) and the SVD blocks (`load_blocks`); their parameters,
    parity, and each phase's estimated peak memory. Row lengths come from the first DRY_RUN_SAMPLE
    examples of each kind, the same draws `make_data` starts with."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    base = dryrun.meta_base(base_path)
    model = base.model.requires_grad_(False)  # as `run_mission_a`
    n = DRY_RUN_SAMPLE
    data = make_data(replace(prof, n_single=min(prof.n_single, n), n_composite=min(prof.n_composite, n)))
    adapters: dict[str, int] = {}
    phases: list[dryrun.Phase] = []
    factors: Factors = {}

    def lora(name: str, rank: int, examples: list[skills.SkillExample], *beside: nn.Module) -> None:
        peft_model = lora_model(model, rank)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        adapters[name] = dryrun.count(params)
        run = dryrun.Pass(prof.batch_size, base.longest(examples))
        phases.append(dryrun.phase(f"{name} (r {rank})", base, [model, peft_model, *beside], params, run))
        factors[name.removeprefix("expert_")] = lora_factors(peft_model)

    for skill in EXPERTS:
        lora(f"expert_{skill}", LORA_RANK, data.single[skill])
    policy = new_policy(model, prof)
    fused_rank = fused_rank_for(factors, policy)
    lora("fused", fused_rank, [e for s in data.single.values() for e in s] + data.composite, policy)
    att, _ = load_blocks(model, factors)
    adapters |= {"router": dryrun.count([policy]), "blocks": att.num_parameters()}
    par = adapter_parity(factors, policy, fused_rank)
    # AR0 and AR1 train the router alone; the LM reads features and decodes one prompt at a time, no grad.
    cap = max(base.tokens(e.target) for e in data.composite) + 4  # `answer_cap`
    run = dryrun.Pass(1, max(base.tokens(e.prompt) for e in data.composite) + cap, backward=False)
    phases.append(dryrun.phase("router (AR0, AR1)", base, [model, policy], [policy], run))
    return dryrun.summary(
        base,
        adapters,
        phases,
        fused_rank=fused_rank,
        parity={"parameter_ratio": par.parameter_ratio, "flops_ratio": par.flops_ratio},
    )


def _code_bytes(code: dict[str, Tensor]) -> np.ndarray:
    return np.concatenate([code[site].numpy() for site in sorted(code)])


def _pad(t: Tensor, k_max: int) -> Tensor:
    """Pad the chunk axis (0) to k_max with zeros; masks keep the padding out of every loss."""
    extra = k_max - t.shape[0]
    return torch.cat([t, torch.zeros((extra, *t.shape[1:]), dtype=t.dtype)]) if extra else t


def _ppo_batch(eps: list[planner.Episode], rewards: list[Tensor], k_max: int) -> planner.Batch:
    def pad(t: Tensor) -> Tensor:
        return _pad(t, k_max)

    advs, rets = zip(*(planner.gae(r, ep.value) for r, ep in zip(rewards, eps, strict=True)), strict=True)
    return planner.Batch(
        states=torch.stack([pad(ep.states) for ep in eps]),
        actions={h: torch.stack([pad(ep.sampled[h]) for ep in eps]).long() for h in planner.HEADS},
        bias_raw=torch.stack([pad(ep.bias_raw) for ep in eps]),
        old_log_prob=torch.stack([pad(ep.log_prob) for ep in eps]),
        advantages=torch.stack([pad(a) for a in advs]),
        returns=torch.stack([pad(r) for r in rets]),
        mask=torch.stack([pad(torch.tensor(ep.decided, dtype=torch.float32)) for ep in eps]),
    )
