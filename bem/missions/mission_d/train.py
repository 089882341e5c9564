"""One arm of Mission D: the model it trains, its loss, the Phase-0 clamp, the progressive thaw, and its
training FLOPs, counted (BEM_SPEC.md section 9; the arms are the issue's).

The model is the frozen smoke base with a BEM site at W_O and W_down of every layer and one controller,
which maps the prompt's adapter-off mean state at the top layer to a code per example (one chunk per
prompt). Training reads task examples (translation and role questions on training frames); a paired
arm also sees each example's view under the step's rung, with the same target:

| arm | loss (weights of `LOSS_WEIGHTS`) |
|---|---|
| `no_pairing` | .1 CE(x): no views at all |
| `augmentation` | .1 CE(x) + .1 CE(S x): views as independent samples, nothing ties them |
| `rdrop` | .1 CE(x) + 1.0 symmetric KL (through π⁻¹ for S1, on the target's positions otherwise) |
| `contrastive` | .1 CE(x) + .5 InfoNCE(pooled) + .01 variance guard |
| `sep` | all of the above but CE(S x): section 9's Phase-0 total |

Phase 0 runs under a clamp: `hard` trains only the BEM sites and the controller, `soft` the whole
decoder with an L2 anchor to its initial weights, `none` the whole decoder. A hard-clamped arm then
thaws the decoder from the top, `thaw_layers` per stage, each stage ending on a plateau of its own
loss on a fixed sample of training items with fixed views (less than `plateau` relative improvement
over `window` evaluations) or at
`max_steps`, and lasting at least `min_epochs` passes over the items. The embeddings and the output
layer (tied in the smoke base) never train: S1's shadow words must be learnt as the words they stand
for, not re-embedded. `sep_phase0`, `sep_soft` and `sep_unclamped` are SEP's Phase 0 alone under each
clamp, which the Phase-0 gate compares.

Rungs rotate per step (one rung per batch): S1, S2, S3 in Phase 0, and S4 joins after the first thaw.
S4 is each example's highest-loss view of S1-S3 under the current model (a no-gradient pass per
rung). Views are deterministic in (text, seed), the seed rotated per epoch (`scramble.epoch_seed`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core.attach import Attachment, attach_bems
from bem.core.chunked import read_hidden
from bem.core.controllers import SimpleController, masked_mean
from bem.core.reporter import Reporter, check_cancelled
from bem.core.train import IGNORE, LMBatch, Pair, encode, lm_loss, row_losses
from bem.missions.mission_d import data, losses, scramble

Clamp = Literal["hard", "soft", "none"]
SEP_TERMS = ("ce", "kl", "info_nce", "variance")


@dataclass(frozen=True)
class ArmConfig:
    terms: tuple[str, ...]  # loss terms: ce, ce_view, kl, info_nce, variance
    clamp: Clamp = "hard"
    thaw: bool = True  # after Phase 0, thaw the decoder from the top

    @property
    def paired(self) -> bool:
        return self.terms != ("ce",)


ARMS: dict[str, ArmConfig] = {
    "no_pairing": ArmConfig(("ce",)),
    "augmentation": ArmConfig(("ce", "ce_view")),
    "rdrop": ArmConfig(("ce", "kl")),
    "contrastive": ArmConfig(("ce", "info_nce", "variance")),
    "sep": ArmConfig(SEP_TERMS),
    "sep_phase0": ArmConfig(SEP_TERMS, "hard", thaw=False),
    "sep_soft": ArmConfig(SEP_TERMS, "soft", thaw=False),
    "sep_unclamped": ArmConfig(SEP_TERMS, "none", thaw=False),
}
# Section 9's Phase-0 weights; CE on the view (the augmentation arm's) weighs as CE on clean text.
LOSS_WEIGHTS = {**losses.PHASE0_WEIGHTS, "ce_view": losses.PHASE0_WEIGHTS["ce"]}


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    controller_hidden: int = 64
    batch_size: int = 32
    lr: float = 3e-3  # BEM bases and controller
    base_lr: float = 3e-4  # decoder weights, once thawed (or from the start without the hard clamp)
    anchor: float = 1e-2  # the soft clamp's λ·Σ‖θ − θ₀‖²
    eval_every: int = 25  # steps between development evaluations
    min_steps: int = 100  # per stage, and at least ...
    min_epochs: int = 5  # ... this many passes over the items (section 9: ≥ 5 epochs per stage)
    max_steps: int = 400  # per stage
    plateau: float = 0.005  # less than this relative improvement ...
    window: int = 3  # ... over this many evaluations ends a stage
    thaw_layers: int = 2
    n_dev: int = 48  # development examples (training frames, fixed views)


# ---- examples and views -------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A task example on a source sentence; `prompt(view)` asks the same question of a view of it."""

    source: str
    task: Literal["translate", "qa"]
    question: str
    target: str  # with its leading space, as the base's corpus writes it

    def prompt(self, source: str | None = None) -> str:
        s = self.source if source is None else source
        return data.translation_prompt(s) if self.task == "translate" else data.qa_prompt(s, self.question)


def items_of(examples: Sequence[data.Example]) -> list[Item]:
    """Each example as both tasks: its translation and its role question."""
    out = []
    for e in examples:
        out.append(Item(e.source, "translate", "", f" {e.target}"))
        out.append(Item(e.source, "qa", e.question, f" {e.answer}"))
    return out


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> LMBatch:
    """Prompts alone (each row's target is just EOS): what the controller and the probes read."""
    return encode(tokenizer, [Pair(p, "") for p in prompts])


def shadow_inverse(tokenizer: PreTrainedTokenizerBase, shadow: scramble.Shadow) -> Tensor | None:
    """[V]: for each token id, the id of its S1 image (a word's shadow word and back; every other token
    itself), so `logits_view[..., inverse]` reads the view's distribution in the original's ids. None
    when some word or shadow word is not one token (a byte-level or a real model's tokenizer): S1 then
    changes lengths, its KL compares the target's positions like S2's and S3's, and EqE is undefined."""
    n = len(tokenizer)
    inverse = torch.arange(n)
    for word, image in shadow.table.items():
        a = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
        b = tokenizer(f" {image}", add_special_tokens=False)["input_ids"]
        if len(a) != 1 or len(b) != 1:
            return None
        inverse[a[0]], inverse[b[0]] = b[0], a[0]
    return inverse


# ---- the model ------------------------------------------------------------------------------------


class ArmModel(nn.Module):
    """The LM with its BEM sites and the controller; `forward` gives logits and pooled top states."""

    def __init__(self, lm: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.lm = lm
        self.attachment: Attachment = attach_bems(lm, rank_schedule=[cfg.rank], max_overhead=10.0)
        config = getattr(lm, "config")  # noqa: B009  # a Hugging Face model's, untyped on nn.Module
        self.n_layers = int(config.num_hidden_layers)
        d_model = int(config.hidden_size)
        # Llama's layout (the smoke base and the full profile's local models).
        self.layers = cast(nn.ModuleList, lm.get_submodule("model.layers"))
        self.final_norm = lm.get_submodule("model.norm")
        self.controller = SimpleController(
            d_model, self.attachment.total_rank, hidden=cfg.controller_hidden, dropout=0.0
        )
        self.n_matmul = matmul_params(self)  # fixed once the sites are attached; FLOPs read it per step

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def features(self, batch: LMBatch) -> Tensor:
        """The prompt's adapter-off mean state at the top layer: what the controller reads."""
        with torch.no_grad():
            hidden = read_hidden(
                self.lm, self.attachment, batch.input_ids, batch.attention_mask, self.n_layers
            )
        return masked_mean(hidden, batch.prompt_mask)

    def codes(self, batch: LMBatch) -> Tensor:
        return self.controller(self.features(batch)).code

    def forward(
        self, batch: LMBatch, hidden_states: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """(logits, the prompt's pooled top state, every layer's states when asked)."""
        with self.attachment.codes(self.codes(batch)):
            out = self.lm(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
            )
        pooled = masked_mean(out.hidden_states[-1], batch.prompt_mask)
        return out.logits, pooled, tuple(out.hidden_states) if hidden_states else ()

    def base_parameters(self) -> list[nn.Parameter]:
        """The decoder's own weights (never the embeddings, never the adapters or the controller)."""
        adapters = {id(p) for p in self.attachment.parameters()}
        out = [p for p in self.layers.parameters() if id(p) not in adapters]
        return out + list(self.final_norm.parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.attachment.parameters(), *self.controller.parameters()]


# ---- FLOPs, counted --------------------------------------------------------------------------------


def matmul_params(model: ArmModel) -> int:
    """Weights a token's forward pass multiplies by: every linear map (the output layer included; the
    embedding lookup is free) and the BEM bases. Attention's own T² terms are left out: at the smoke's
    lengths (under 100 tokens, d 128) they are a few percent of the total."""
    linear = sum(m.weight.numel() for m in model.lm.modules() if isinstance(m, nn.Linear))
    return linear + model.attachment.num_parameters()


@dataclass
class FlopCount:
    """Training FLOPs of an arm: 2·N per token forward; backward 2·N per token for the activations'
    gradients (a BEM site in every layer sends them all the way down) plus 2·N_trainable for the
    weights'. The controller's adapter-off read is a full forward pass (it runs the model to the top),
    counted as one; the controller's own MLP, once per example, is left out (under 0.1% here).
    Evaluation is not training."""

    total: float = 0.0

    def forward(self, tokens: int, n_params: int) -> None:
        self.total += 2.0 * n_params * tokens

    def backward(self, tokens: int, n_params: int, n_trainable: int) -> None:
        self.total += 2.0 * n_params * tokens + 2.0 * n_trainable * tokens


# ---- the loss ---------------------------------------------------------------------------------------


@dataclass
class Batches:
    """A training batch of items and, for a paired arm, their views under one rung."""

    clean: LMBatch
    view: LMBatch | None
    rung: str


def target_positions(batch: LMBatch) -> Tensor:
    """[B, T]: 1 where the next token is a target token (what `losses.target_kl` compares)."""
    mask = torch.zeros_like(batch.labels)
    mask[:, :-1] = (batch.labels[:, 1:] != IGNORE).long()
    return mask


def predicting(batch: LMBatch) -> Tensor:
    """[B, T]: 1 where there is a next token to predict (not the last token, not padding)."""
    mask = torch.zeros_like(batch.attention_mask)
    mask[:, :-1] = batch.attention_mask[:, 1:]
    return mask


def arm_loss(
    model: ArmModel,
    cfg: ArmConfig,
    b: Batches,
    inverse: Tensor | None,
    flops: FlopCount | None = None,
    n_trainable: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """The arm's weighted loss on one batch, and each term's value."""
    n = model.n_matmul
    logits, z, _ = model(b.clean)
    terms: dict[str, Tensor] = {"ce": lm_loss(logits, b.clean.labels)}
    tokens = int(b.clean.attention_mask.sum())
    if b.view is not None:
        v_logits, z_view, _ = model(b.view)
        tokens += int(b.view.attention_mask.sum())
        if "ce_view" in cfg.terms:
            terms["ce_view"] = lm_loss(v_logits, b.view.labels)
        if "kl" in cfg.terms:
            # The clean side is the teacher (no gradient), as in UDA: a view is the harder input, and a
            # gradient through both sides pulls the clean predictions toward the view's mistakes.
            teacher = logits.detach()
            if b.rung == "S1" and inverse is not None:
                # Through π⁻¹ where the next token is a source word; the target is the same words in both.
                terms["kl"] = losses.shadow_kl(
                    teacher,
                    v_logits,
                    inverse.to(logits.device),
                    predicting(b.clean),
                    target_positions(b.clean),
                )
            else:
                terms["kl"] = losses.target_kl(
                    teacher, target_positions(b.clean), v_logits, target_positions(b.view)
                )
        if "info_nce" in cfg.terms:
            terms["info_nce"] = losses.info_nce(z, z_view)
        if "variance" in cfg.terms:
            # Per branch, as VICReg: two collapsed clusters would satisfy it on the pair together.
            terms["variance"] = 0.5 * (losses.variance_guard(z) + losses.variance_guard(z_view))
    if flops is not None:
        flops.forward(2 * tokens, n)  # the controller's adapter-off read, then the adapted pass
        flops.backward(tokens, n, n_trainable)
    loss = losses.weighted({k: v for k, v in terms.items() if k in cfg.terms}, LOSS_WEIGHTS)
    return loss, {k: float(v.detach()) for k, v in terms.items()}


# ---- training ----------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str  # phase0, thaw1, thaw2, ...
    steps: int
    dev_losses: list[float]
    trainable: int  # parameters trained in the stage
    plateaued: bool


@dataclass
class Trained:
    model: ArmModel
    stages: list[Stage] = field(default_factory=list)
    flops: float = 0.0


def plateaued(history: Sequence[float], window: int, threshold: float) -> bool:
    """True when the best of the last `window` evaluations improves on the best before them by less than
    `threshold`, relative (section 9's plateau: < .5% over 3 evaluations)."""
    if len(history) <= window:
        return False
    before, recent = min(history[:-window]), min(history[-window:])
    return (before - recent) < threshold * abs(before)


class Trainer:
    """Runs one arm's stages; every random choice comes from `seed`."""

    def __init__(
        self,
        model: ArmModel,
        tokenizer: PreTrainedTokenizerBase,
        arm: ArmConfig,
        cfg: TrainConfig,
        items: Sequence[Item],
        inverse: Tensor | None,
        seed: int,
        reporter: Reporter,
        name: str,
    ) -> None:
        self.model, self.tok, self.arm, self.cfg = model, tokenizer, arm, cfg
        self.items, self.inverse, self.seed = list(items), inverse, seed
        self.reporter, self.name = reporter, name
        # Keyed by the arm's loss terms alone: sep_phase0 draws the batches of sep's Phase 0, and SEP's
        # three clamps see the same batches (common random numbers for the Phase-0 comparison).
        self.rng = random.Random(f"mission_d/train/{'+'.join(arm.terms)}/{seed}")
        self.flops = FlopCount()
        self.step = 0
        dev_rng = random.Random(f"mission_d/dev/{seed}")
        self.dev = dev_rng.sample(self.items, min(cfg.n_dev, len(self.items)))
        self.anchor: dict[int, Tensor] = {}

    # -- batches

    def epoch_seed(self) -> int:
        per_epoch = max(len(self.items) // self.cfg.batch_size, 1)
        return scramble.epoch_seed(self.seed, self.step // per_epoch)

    def batches(self, chosen: Sequence[Item], rung: str, seed: int) -> Batches:
        clean = encode(self.tok, [Pair(i.prompt(), i.target) for i in chosen]).to(self.model.device)
        if not self.arm.paired:
            return Batches(clean, None, rung)
        if rung == "S4":
            sources = hardest_views(self.model, self.tok, chosen, seed, self.flops)
        else:
            sources = [scramble.view(i.source, rung, seed) for i in chosen]
        view = encode(self.tok, [Pair(i.prompt(s), i.target) for i, s in zip(chosen, sources, strict=True)])
        return Batches(clean, view.to(self.model.device), rung)

    def min_steps(self) -> int:
        per_epoch = math.ceil(len(self.items) / self.cfg.batch_size)
        return max(self.cfg.min_steps, self.cfg.min_epochs * per_epoch)

    def rungs(self, stage: int) -> tuple[str, ...]:
        return (*scramble.RUNGS, "S4") if stage > 0 else scramble.RUNGS

    # -- the loop

    def trainable(self, stage: int) -> list[nn.Parameter]:
        """Phase 0: the adapters (hard clamp) or everything but the embeddings; thaw stage k: the
        adapters and the top k·thaw_layers decoder layers (the final norm with the first)."""
        adapters = self.model.adapter_parameters()
        if self.arm.clamp != "hard":
            return adapters + self.model.base_parameters()
        if stage == 0:
            return adapters
        layers = self.model.layers
        lo = max(0, len(layers) - stage * self.cfg.thaw_layers)
        ids = {id(p) for p in adapters}
        thawed = [p for layer in list(layers)[lo:] for p in layer.parameters() if id(p) not in ids]
        return adapters + thawed + list(self.model.final_norm.parameters())

    def n_stages(self) -> int:
        if not self.arm.thaw:
            return 1
        return 1 + math.ceil(self.model.n_layers / self.cfg.thaw_layers)

    def run(self, after_stage: Callable[[Stage, float], None] | None = None) -> Trained:
        """Every stage; `after_stage(stage, flops so far)` sees the model after each (in eval mode)."""
        out = Trained(self.model)
        base = {id(p) for p in self.model.base_parameters()}
        if self.arm.clamp == "soft":
            self.anchor = {id(p): p.detach().clone() for p in self.model.base_parameters()}
        for stage in range(self.n_stages()):
            params = self.trainable(stage)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            groups = [
                {"params": [p for p in params if id(p) not in base], "lr": self.cfg.lr},
                {"params": [p for p in params if id(p) in base], "lr": self.cfg.base_lr},
            ]
            opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
            n_trainable = sum(p.numel() for p in params if p.dim() >= 2)
            name = "phase0" if stage == 0 else f"thaw{stage}"
            out.stages.append(self.run_stage(name, stage, opt, params, n_trainable))
            if after_stage is not None:
                self.model.eval()
                after_stage(out.stages[-1], self.flops.total)
        out.flops = self.flops.total
        self.model.eval()
        return out

    def run_stage(
        self, name: str, stage: int, opt: torch.optim.Optimizer, params: list[nn.Parameter], n_trainable: int
    ) -> Stage:
        cfg = self.cfg
        history: list[float] = []
        rungs = self.rungs(stage)
        done = False
        steps = 0
        while not done:
            self.model.train()
            chosen = self.rng.sample(self.items, cfg.batch_size)
            b = self.batches(chosen, rungs[self.step % len(rungs)], self.epoch_seed())
            loss, terms = arm_loss(self.model, self.arm, b, self.inverse, self.flops, n_trainable)
            if self.anchor:
                drift = sum(((p - self.anchor[id(p)]) ** 2).sum() for p in params if id(p) in self.anchor)
                loss = loss + cfg.anchor * drift
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.step += 1
            steps += 1
            if steps % cfg.eval_every == 0:
                history.append(self.dev_loss(rungs))
                values = {f"{self.name}/{k}": v for k, v in terms.items()}
                values |= {f"{self.name}/dev_loss": history[-1], f"{self.name}/loss": float(loss.detach())}
                self.reporter.metrics(values, self.step)
                check_cancelled(self.reporter)
                flat = steps >= self.min_steps() and plateaued(history, cfg.window, cfg.plateau)
                done = flat or steps >= cfg.max_steps
                if done:
                    return Stage(name, steps, history, n_trainable, flat)
        raise AssertionError("unreachable")

    @torch.no_grad()
    def dev_loss(self, rungs: Sequence[str]) -> float:
        """The arm's own loss on the fixed development items, each rung's fixed views (seed 0)."""
        self.model.eval()
        total = 0.0
        use = [r for r in rungs if r != "S4"] if self.arm.paired else ["clean"]
        for rung in use:
            b = self.batches(self.dev, rung, 0)
            loss, _ = arm_loss(self.model, self.arm, b, self.inverse)
            total += float(loss)
        return total / len(use)


@torch.no_grad()
def hardest_views(
    model: ArmModel,
    tokenizer: PreTrainedTokenizerBase,
    chosen: Sequence[Item],
    seed: int,
    flops: FlopCount | None = None,
) -> list[str]:
    """S4 (the adversarial rung): per item, its view of S1-S3 whose target loss is highest."""
    was = model.training
    model.eval()
    candidates = [[scramble.view(i.source, r, seed) for r in scramble.RUNGS] for i in chosen]
    per_rung = []
    n = model.n_matmul
    for k in range(len(scramble.RUNGS)):
        batch = encode(
            tokenizer, [Pair(i.prompt(c[k]), i.target) for i, c in zip(chosen, candidates, strict=True)]
        )
        batch = batch.to(model.device)
        logits, _, _ = model(batch)
        per_rung.append(row_losses(logits, batch.labels))
        if flops is not None:
            flops.forward(2 * int(batch.attention_mask.sum()), n)
    worst = torch.stack(per_rung, dim=1).argmax(dim=1).tolist()
    model.train(was)
    return [c[k] for c, k in zip(candidates, worst, strict=True)]


def build(
    base: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, items: Sequence[Item], seed: int
) -> ArmModel:
    """A fresh arm model on (a copy of) the base, its controller's feature scaling fitted on clean items
    and their views."""
    import copy

    torch.manual_seed(seed)
    model = ArmModel(copy.deepcopy(base), cfg).to(next(base.parameters()).device)
    sample = random.Random(f"mission_d/fit/{seed}").sample(list(items), min(128, len(items)))
    prompts = [i.prompt() for i in sample] + [i.prompt(scramble.view(i.source, "S1", 0)) for i in sample]
    batch = encode_prompts(tokenizer, prompts).to(model.device)
    model.controller.fit_features(model.features(batch))
    return model
