"""Mission A's macro-policy router (BEM_SPEC.md section 6): a policy over chunks that picks which skill
expert's adapter applies, how widely, for how long, at what rank and strength.

The pieces, each testable alone:
- `MacroAction` and `MacroPolicy`: a causal TransformerEncoder over per-chunk states with categorical
  heads (expert, scope, span, rank), a squashed-Gaussian bias head and a value head;
- `hysteresis`: a new proposal replaces the current action only when its logit advantage is large;
- `rollout`: decide only when a span ends, apply the action to every chunk of its span (chunk-sticky);
- `compose`: an expert's factored ΔW, SVD-truncated to the rank budget, scaled, σ-clamped and held to a
  Frobenius trust region, returned as factors (a low-rank branch; W0 is never written);
- `bc_loss` (AR0) and `ppo_update` with a KL early stop (AR1), `gae`, `reward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem.core import governance

SCOPES = ("local", "global")
SPANS = (1, 2, 3, 4)
RANKS = (8, 16, 32, 64)
HEADS = ("expert", "scope", "span", "rank")
BIAS_LOW, BIAS_HIGH = 0.1, 2.0
LOCAL_SCALE = 0.8  # a local-scope action applies ΔW x .8


@dataclass(frozen=True)
class MacroAction:
    expert: int
    scope: int  # index into SCOPES
    span: int  # index into SPANS
    rank: int  # index into RANKS
    bias: float  # in [BIAS_LOW, BIAS_HIGH]

    @property
    def chunks(self) -> int:
        return SPANS[self.span]

    @property
    def rank_budget(self) -> int:
        return RANKS[self.rank]

    @property
    def scale(self) -> float:
        return self.bias * (LOCAL_SCALE if SCOPES[self.scope] == "local" else 1.0)

    def heads(self) -> dict[str, int]:
        return {"expert": self.expert, "scope": self.scope, "span": self.span, "rank": self.rank}

    def features(self, n_experts: int) -> Tensor:
        """How the action enters the next state: one-hots of the discrete fields and the bias."""
        parts = [F.one_hot(torch.tensor(self.expert), n_experts).float()]
        for name, n in (("scope", len(SCOPES)), ("span", len(SPANS)), ("rank", len(RANKS))):
            parts.append(F.one_hot(torch.tensor(getattr(self, name)), n).float())
        return torch.cat([*parts, torch.tensor([self.bias])])


def action_dim(n_experts: int) -> int:
    return n_experts + len(SCOPES) + len(SPANS) + len(RANKS) + 1


def bias_from(mu: Tensor) -> Tensor:
    return BIAS_LOW + (BIAS_HIGH - BIAS_LOW) * torch.sigmoid(mu)


def bias_to_raw(bias: Tensor) -> Tensor:
    p = ((bias - BIAS_LOW) / (BIAS_HIGH - BIAS_LOW)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


@dataclass
class PolicyOutput:
    logits: dict[str, Tensor]  # [B, K, n] per head
    bias_mu: Tensor  # [B, K], pre-sigmoid
    value: Tensor  # [B, K]


class MacroPolicy(nn.Module):
    """State per chunk (task features + the previous action) -> heads; causal over chunks."""

    def __init__(
        self,
        feature_dim: int,
        n_experts: int,
        d_model: int = 256,
        n_layers: int = 3,
        n_heads: int = 8,
        max_chunks: int = 64,
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.state_dim = feature_dim + action_dim(n_experts) + 1  # + chunk index / max_chunks
        self.max_chunks = max_chunks
        self.embed = nn.Linear(self.state_dim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        sizes = {"expert": n_experts, "scope": len(SCOPES), "span": len(SPANS), "rank": len(RANKS)}
        self.heads = nn.ModuleDict({h: nn.Linear(d_model, n) for h, n in sizes.items()})
        self.bias_head = nn.Linear(d_model, 1)
        self.bias_log_std = nn.Parameter(torch.tensor(math.log(0.3)))
        self.value_head = nn.Linear(d_model, 1)

    def states(self, features: Tensor, previous: list[MacroAction]) -> Tensor:
        """[K, state_dim] for one episode: features [K, F], the action before each chunk, its index."""
        k = features.shape[0]
        acts = torch.stack([a.features(self.n_experts) for a in previous])
        index = torch.arange(k, dtype=features.dtype).unsqueeze(1) / self.max_chunks
        return torch.cat([features, acts.to(features.dtype), index], dim=1)

    def forward(self, states: Tensor) -> PolicyOutput:
        k = states.shape[1]
        causal = torch.triu(torch.full((k, k), float("-inf"), device=states.device), diagonal=1)
        h = self.encoder(self.embed(states), mask=causal)
        return PolicyOutput(
            logits={name: head(h) for name, head in self.heads.items()},
            bias_mu=self.bias_head(h).squeeze(-1),
            value=self.value_head(h).squeeze(-1),
        )

    def log_prob(self, out: PolicyOutput, actions: dict[str, Tensor], bias_raw: Tensor) -> Tensor:
        """log π(a|s) = Σ heads' log-probs + the Gaussian log-density of the raw bias sample; [B, K]."""
        total = torch.zeros_like(out.bias_mu)
        for h in HEADS:
            total = total + torch.distributions.Categorical(logits=out.logits[h]).log_prob(actions[h])
        return total + torch.distributions.Normal(out.bias_mu, self.bias_log_std.exp()).log_prob(bias_raw)

    def entropy(self, out: PolicyOutput) -> Tensor:
        total = sum(torch.distributions.Categorical(logits=out.logits[h]).entropy() for h in HEADS)
        normal = torch.distributions.Normal(out.bias_mu, self.bias_log_std.exp()).entropy()
        return total + normal  # type: ignore[return-value]


def hysteresis(
    current: MacroAction, proposed: MacroAction, logits: dict[str, Tensor], tau: float = 0.5
) -> MacroAction:
    """Keep the current discrete fields unless the proposal's logit advantage Δ exceeds τ.

    Δ = .4·Δℓ_expert + .2·(Δℓ_scope + Δℓ_span + Δℓ_rank), Δℓ = logit(proposed) − logit(current),
    from the logits of the chunk where the decision is made; the bias moves only by more than .2τ.
    """
    cur, new = current.heads(), proposed.heads()
    delta = sum(
        weight * float(logits[h][new[h]] - logits[h][cur[h]])
        for h, weight in (("expert", 0.4), ("scope", 0.2), ("span", 0.2), ("rank", 0.2))
    )
    fields = new if delta > tau else cur
    bias = proposed.bias if abs(proposed.bias - current.bias) > 0.2 * tau else current.bias
    return MacroAction(fields["expert"], fields["scope"], fields["span"], fields["rank"], bias)


@dataclass
class Episode:
    """One rollout: the action in force at every chunk and what PPO needs at the decision chunks."""

    actions: list[MacroAction]  # per chunk
    decided: list[bool]  # a decision was made at this chunk (a span ended)
    states: Tensor  # [K, state_dim], previous actions filled in
    sampled: dict[str, Tensor] = field(default_factory=dict)  # per head [K] (what the policy drew)
    bias_raw: Tensor = field(default_factory=lambda: torch.zeros(0))
    log_prob: Tensor = field(default_factory=lambda: torch.zeros(0))  # [K], of the drawn actions
    value: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def plan_length(self) -> int:
        """Macro-action segments: runs of identical actions."""
        return 1 + sum(a != b for a, b in zip(self.actions, self.actions[1:], strict=False))

    @property
    def flip_rate(self) -> float:
        k = len(self.actions)
        flips = sum(a.expert != b.expert for a, b in zip(self.actions, self.actions[1:], strict=False))
        return flips / (k - 1) if k > 1 else 0.0


def default_action(n_experts: int) -> MacroAction:
    return MacroAction(0, SCOPES.index("global"), 0, 0, 1.0)


@torch.no_grad()
def rollout(
    policy: MacroPolicy,
    features: Tensor,
    *,
    greedy: bool = True,
    use_hysteresis: bool = True,
    tau: float = 0.5,
    generator: torch.Generator | None = None,
) -> Episode:
    """Chunk by chunk: decide when the current span ends, then hold the action for its span."""
    k = features.shape[0]
    current = default_action(policy.n_experts)
    previous: list[MacroAction] = []
    actions: list[MacroAction] = []
    decided: list[bool] = []
    drawn: dict[str, list[int]] = {h: [] for h in HEADS}
    raw: list[float] = []
    remaining = 0
    for i in range(k):
        previous.append(current)
        if remaining > 0:
            actions.append(current)
            decided.append(False)
            for h in HEADS:
                drawn[h].append(current.heads()[h])
            raw.append(float(bias_to_raw(torch.tensor(current.bias))))
            remaining -= 1
            continue
        out = policy(policy.states(features[: i + 1], previous).unsqueeze(0))
        logits = {h: out.logits[h][0, i] for h in HEADS}
        if greedy:
            pick = {h: int(logits[h].argmax()) for h in HEADS}
            mu = float(out.bias_mu[0, i])
        else:
            pick = {h: int(torch.multinomial(logits[h].softmax(-1), 1, generator=generator)) for h in HEADS}
            noise = torch.randn((), generator=generator) * policy.bias_log_std.exp()
            mu = float(out.bias_mu[0, i] + noise)
        proposed = MacroAction(
            pick["expert"], pick["scope"], pick["span"], pick["rank"], float(bias_from(torch.tensor(mu)))
        )
        first = i == 0
        current = proposed if first or not use_hysteresis else hysteresis(current, proposed, logits, tau)
        for h in HEADS:
            drawn[h].append(pick[h])
        raw.append(mu)
        actions.append(current)
        decided.append(True)
        remaining = current.chunks - 1
    states = policy.states(features, previous)
    sampled = {h: torch.tensor(v) for h, v in drawn.items()}
    bias_raw = torch.tensor(raw)
    out = policy(states.unsqueeze(0))
    log_prob = policy.log_prob(
        out, {h: v.unsqueeze(0) for h, v in sampled.items()}, bias_raw.unsqueeze(0)
    ).squeeze(0)
    return Episode(actions, decided, states, sampled, bias_raw, log_prob, out.value.squeeze(0))


def token_experts(episode: Episode, chunk_size: int, seq_len: int) -> Tensor:
    """Chunk-sticky application: the expert in force for every token, constant inside each chunk."""
    per_chunk = torch.tensor([a.expert for a in episode.actions])
    return per_chunk.repeat_interleave(chunk_size)[:seq_len]


# ---- composition ---------------------------------------------------------------------------------


def factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ΔW = A·B (A: d_out×r, B: r×d_in) without forming ΔW: QR of both factors, SVD of the
    small core. Returns (U: d_out×k, σ: k, V: d_in×k), σ descending, in float64 for float64 input and
    float32 otherwise."""
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    qa, ra = torch.linalg.qr(A.to(work))
    qb, rb = torch.linalg.qr(B.to(work).T)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, qb @ vh.T


def action_singular_values(
    sigma: Tensor, action: MacroAction, *, sigma_max: float = 2.0, tau_f: float = 5.0
) -> Tensor:
    """An expert's singular values under a macro-action: directions past the rank budget dropped,
    ×bias (×.8 when local), each clamped at σ_max, then all shrunk so ‖ΔW'‖_F ≤ τ_F (`governance`'s
    σ-clamp and trust region, with the scale folded in: s = 1)."""
    s = sigma.clone()
    s[action.rank_budget :] = 0.0
    s = governance.sigma_clamp(s * action.scale, sigma_max, 1.0)
    return governance.trust_region(s, tau_f, 1.0)


def compose(
    A: Tensor,
    B: Tensor,
    action: MacroAction,
    *,
    sigma_max: float = 2.0,
    tau_f: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Expert ΔW = A·B -> factors (P, Q) with the branch ΔW' = P·Qᵀ: the top `rank_budget` directions
    of ΔW with `action_singular_values`. Without the clamps this is the best rank-k approximation
    (Eckart-Young)."""
    U, sigma, V = factored_svd(A, B)
    k = min(action.rank_budget, sigma.numel())
    s = action_singular_values(sigma, action, sigma_max=sigma_max, tau_f=tau_f)[:k]
    return (U[:, :k] * s).to(A.dtype), V[:, :k].to(A.dtype)


# ---- AR0: behaviour cloning ----------------------------------------------------------------------


def bc_loss(
    out: PolicyOutput,
    gold: dict[str, Tensor],
    gold_bias: Tensor,
    mask: Tensor,
    expert_weight: float = 2.0,
) -> Tensor:
    """Per-head cross-entropy (the expert head weighted ×2) plus MSE on the bias, at decision chunks.

    Never an MSE on a raw action vector: the discrete fields are classes, not numbers.
    """
    m = mask.bool()
    loss = torch.zeros((), device=out.bias_mu.device)
    for h in HEADS:
        ce = F.cross_entropy(out.logits[h][m], gold[h][m])
        loss = loss + (expert_weight if h == "expert" else 1.0) * ce
    return loss + F.mse_loss(bias_from(out.bias_mu[m]), gold_bias[m])


# ---- AR1: policy gradient ------------------------------------------------------------------------


def reward(task: float, flip_rate: float, cache_safe: float) -> float:
    return 0.6 * task + 0.2 * max(0.0, 1.0 - 2.0 * flip_rate) + 0.2 * cache_safe


def gae(rewards: Tensor, values: Tensor, gamma: float = 0.99, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns for one episode (terminal after the last step)."""
    t = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros(())
    for i in reversed(range(t)):
        next_value = values[i + 1] if i + 1 < t else torch.zeros(())
        delta = rewards[i] + gamma * next_value - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv, adv + values


@dataclass(frozen=True)
class PPOConfig:
    clip: float = 0.2
    epochs: int = 4
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    kl_target: float = 0.01
    kl_stop: float = 1.5  # stop the update once mean(log π_old − log π_new) > kl_stop × kl_target
    max_grad_norm: float = 1.0


@dataclass
class Batch:
    states: Tensor  # [B, K, state_dim]
    actions: dict[str, Tensor]  # [B, K] per head
    bias_raw: Tensor  # [B, K]
    old_log_prob: Tensor  # [B, K]
    advantages: Tensor  # [B, K]
    returns: Tensor  # [B, K]
    mask: Tensor  # [B, K], decision chunks


@dataclass
class PPOStats:
    epochs_run: int
    stopped_early: bool
    kl: float
    policy_loss: float
    value_loss: float


def ppo_update(
    policy: MacroPolicy, optimizer: torch.optim.Optimizer, batch: Batch, cfg: PPOConfig = PPOConfig()
) -> PPOStats:
    """PPO-clip epochs over one batch, stopped as soon as the policy moved too far (approximate KL)."""
    m = batch.mask.bool()
    adv = batch.advantages[m]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
    kl, stopped, epochs = 0.0, False, 0
    policy_loss = value_loss = torch.zeros(())
    for _ in range(cfg.epochs):
        out = policy(batch.states)
        log_prob = policy.log_prob(out, batch.actions, batch.bias_raw)[m]
        ratio = torch.exp(log_prob - batch.old_log_prob[m])
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        policy_loss = -surrogate.mean()
        value_loss = F.mse_loss(out.value[m], batch.returns[m])
        entropy = policy.entropy(out)[m].mean()
        loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        epochs += 1
        with torch.no_grad():
            new = policy.log_prob(policy(batch.states), batch.actions, batch.bias_raw)[m]
            kl = float((batch.old_log_prob[m] - new).mean())
        if kl > cfg.kl_stop * cfg.kl_target:
            stopped = True
            break
    return PPOStats(epochs, stopped, kl, policy_loss.item(), value_loss.item())
