"""Mission B's online learner (BEM_SPEC.md section 7): the pieces a living model is built from.

- the trainable set is the controller only, chosen by module-name prefix, and the optimizer is held to it;
- the loss adds online EWC, (λ/2)·Σ F̃_i(θ_i − θ*_i)² with F̃ = F / mean F, a prox term λ‖θ − θ_prev‖²,
  and replay; the diagonal Fisher comes from per-sample gradients of log p(y|x) (vmap of grad);
- a reservoir replay buffer with optional prioritised sampling (p ∝ prio^α, importance weights);
- accepted states as safetensors with a content hash, so a rollback is checkably exact;
- the drift signal KL per token on probes (the monitor's and canary gate's rules are torch-free, in
  `stats.promotion`, so fleetd's services run them without importing torch).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

T = TypeVar("T")


# ---- the trainable set --------------------------------------------------------------------------


def trainable(model: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """The parameters under a module-name prefix (the controller); everything else is frozen."""
    chosen = {n: p for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")}
    if not chosen:
        names = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise ValueError(f"no parameters under {prefix!r}; top-level modules: {names}")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return chosen


def check_optimizer(optimizer: torch.optim.Optimizer, allowed: Mapping[str, Tensor]) -> None:
    """Every parameter the optimizer updates must be in the trainable set."""
    ids = {id(p) for p in allowed.values()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids:
                raise ValueError(
                    f"optimizer holds a parameter outside the trainable set (shape {tuple(p.shape)})"
                )


# ---- losses ---------------------------------------------------------------------------------------


@dataclass
class OnlineEWC:
    """Online EWC with a normalised diagonal Fisher; `consolidate` folds in a new Fisher and anchor."""

    lam: float = 1.0
    decay: float = 0.9
    fisher: dict[str, Tensor] = field(default_factory=dict)
    anchor: dict[str, Tensor] = field(default_factory=dict)  # θ*, the last promoted weights

    def consolidate(self, new_fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
        """F ← decay·F + F_new (F_new alone the first time); θ* ← the promoted weights."""
        for name, f in new_fisher.items():
            self.fisher[name] = self.decay * self.fisher[name] + f if name in self.fisher else f.clone()
        self.anchor = {n: t.detach().clone() for n, t in anchor.items()}

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        if not self.fisher:
            return torch.zeros(())
        mean = torch.cat([f.flatten() for f in self.fisher.values()]).mean()
        total = sum(((self.fisher[n] / mean) * (params[n] - self.anchor[n]) ** 2).sum() for n in self.fisher)
        return 0.5 * self.lam * total  # type: ignore[return-value]


def prox_penalty(params: Mapping[str, Tensor], previous: Mapping[str, Tensor], lam: float = 0.05) -> Tensor:
    """λ‖θ − θ_prev‖²: a pull toward the last accepted update."""
    return lam * sum(((params[n] - previous[n]) ** 2).sum() for n in previous)  # type: ignore[return-value]


def per_sample_fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    log_prob: Callable[[Tensor, Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    clamp: tuple[float, float] = (1e-6, 1e3),
) -> dict[str, Tensor]:
    """Diagonal Fisher: the mean over samples of each sample's squared gradient of log p(y|x).

    `log_prob(logits, x, y)` gives one sample's log-likelihood; the gradients come from vmap over the
    batch of a per-sample grad (not the square of the batch gradient, which is a different quantity).
    """
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**frozen, **p}, (x.unsqueeze(0),))
        return log_prob(logits, x, y.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, inputs, targets)
    return {n: (g**2).mean(dim=0).clamp(*clamp) for n, g in grads.items()}


# ---- replay ---------------------------------------------------------------------------------------


class Replay(Generic[T]):
    """A reservoir (every item seen so far is kept with equal probability), with optional
    prioritised sampling p_i ∝ prio_i^α and importance weights (N·p_i)^−β / max."""

    def __init__(self, capacity: int = 10_000, min_items: int = 1000, seed: int = 0) -> None:
        self.capacity, self.min_items = capacity, min_items
        self.items: list[T] = []
        self.priority: list[float] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ready(self) -> bool:
        return len(self.items) >= self.min_items

    def add(self, item: T, priority: float = 1.0) -> None:
        priority = max(float(priority), 1e-6)  # a loss of exactly 0 must not make an item undrawable
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            self.priority.append(priority)
            return
        j = self.rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j], self.priority[j] = item, priority

    def mix(self, n_new: int, fraction: float = 0.3) -> int:
        """Replay items to add to `n_new` new ones so that replay is `fraction` of the batch (30%),
        once the buffer is ready; none before."""
        return round(n_new * fraction / (1 - fraction)) if self.ready else 0

    def reprioritise(self, indices: Sequence[int], priorities: Sequence[float]) -> None:
        """New priorities for replayed items (their loss when last seen); ε keeps every item drawable."""
        for i, prio in zip(indices, priorities, strict=True):
            self.priority[i] = max(float(prio), 1e-6)

    def sample(
        self, n: int, *, prioritised: bool = False, alpha: float = 0.6, beta: float = 0.4
    ) -> tuple[list[T], list[float], list[int]]:
        """(items, importance weights, indices); uniform sampling has weights 1."""
        if not self.items:
            return [], [], []
        if not prioritised:
            idx = [self.rng.randrange(len(self.items)) for _ in range(n)]
            return [self.items[i] for i in idx], [1.0] * n, idx
        scaled = [p**alpha for p in self.priority]
        total = sum(scaled)
        probs = [s / total for s in scaled]
        idx = self.rng.choices(range(len(self.items)), weights=probs, k=n)
        size = len(self.items)
        max_w = (size * min(probs)) ** -beta
        weights = [(size * probs[i]) ** -beta / max_w for i in idx]
        return [self.items[i] for i in idx], weights, idx


def anneal_beta(step: int, total: int, start: float = 0.4, end: float = 1.0) -> float:
    return start + (end - start) * min(1.0, step / max(total, 1))


# ---- accepted states --------------------------------------------------------------------------------


def state_hash(state: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Checkpoints:
    """Accepted and promoted states of the trainable set as safetensors files, each with its hash."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, name: str, state: Mapping[str, Tensor]) -> str:
        tensors = {n: t.detach().cpu().contiguous().clone() for n, t in state.items()}
        save_file(tensors, str(self.dir / f"{name}.safetensors"), metadata={"sha256": state_hash(tensors)})
        return state_hash(tensors)

    def load(self, name: str) -> dict[str, Tensor]:
        return load_file(str(self.dir / f"{name}.safetensors"))


@torch.no_grad()
def restore(params: Mapping[str, nn.Parameter], state: Mapping[str, Tensor]) -> None:
    """Copy a saved state into the live parameters, in place (optimizers keep their references)."""
    missing = set(params) ^ set(state)
    if missing:
        raise ValueError(f"state and parameters differ in {sorted(missing)}")
    for name, p in params.items():
        p.copy_(state[name].to(device=p.device, dtype=p.dtype))


# ---- drift (the monitor's and the canary gate's rules: stats.promotion) ------------------------------


def kl_per_token(ref_logits: Tensor, cur_logits: Tensor, mask: Tensor | None = None) -> float:
    """KL(P_ref ‖ P_cur) summed over the vocabulary, averaged over the probe tokens (never a mean over
    the vocabulary): kl_div(log_softmax(cur), log_softmax(ref), log_target=True, "sum") / T."""
    v = ref_logits.shape[-1]
    ref = F.log_softmax(ref_logits.float().reshape(-1, v), dim=-1)
    cur = F.log_softmax(cur_logits.float().reshape(-1, v), dim=-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        ref, cur = ref[keep], cur[keep]
    tokens = ref.shape[0]
    if tokens == 0:
        raise ValueError("no probe tokens")
    return float(F.kl_div(cur, ref, log_target=True, reduction="sum") / tokens)


def as_state(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}
