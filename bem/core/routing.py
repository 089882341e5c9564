"""The chunk-sticky router (BEM_SPEC §3): one expert per chunk of N tokens, decided from the chunk before.

Why chunks and a lag: the K/V of a chunk are computed with the adapter active, so the expert that shapes
them must be fixed before the chunk starts and never revised (cache safety). The router therefore reads
only chunk k−1 to decide chunk k, and prefill uses the same lag as decoding, so a shared prompt prefix
yields the same decisions and the same reusable KV blocks.

Chunk 0 has no previous chunk: its logits are zeros and it uses `initial_expert` (0 by default). That is
the same rule as every other chunk, applied to an imaginary chunk −1 whose expert is `initial_expert`:
zero logits have no margin, so nothing switches. A prompt-level choice for chunk 0 belongs to the
controller (BEM_SPEC §2, prefix features), not here.

Why hysteresis: a switch means a new code for every later chunk, so it must be worth a clear margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RouterMode = Literal["straight_through", "soft"]


@dataclass
class RouterOutput:
    """What one router pass decides, per chunk. B = batch, K = ⌈T/N⌉ chunks, E = experts.

    `gates` is what the caller multiplies into the expert mixture. Its forward values are the hard one-hot
    of `experts` except in soft training mode; `probs` carries the gradient (straight-through) and feeds
    the regularisers.
    """

    logits: Tensor  # [B, K, E] lagged chunk logits; chunk 0 is all zeros
    probs: Tensor  # [B, K, E] softmax(logits / temperature)
    experts: Tensor  # [B, K] long, the sticky hard decision
    gates: Tensor  # [B, K, E]
    chunk_size: int

    def token_gates(self, seq_len: int) -> Tensor:
        """[B, T, E]: each chunk's gate broadcast over the tokens of its window."""
        return expand_to_tokens(self.gates, seq_len, self.chunk_size)


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Chunks start at multiples of chunk_size; the last one may be partial."""
    return math.ceil(seq_len / chunk_size)


def expand_to_tokens(chunk_values: Tensor, seq_len: int, chunk_size: int) -> Tensor:
    """[B, K, F] per-chunk values -> [B, T, F], constant inside each chunk window."""
    k = chunk_values.shape[1]
    if k != num_chunks(seq_len, chunk_size):
        raise ValueError(f"{k} chunks do not tile {seq_len} tokens in chunks of {chunk_size}")
    return chunk_values.repeat_interleave(chunk_size, dim=1)[:, :seq_len]


def chunk_means(values: Tensor, chunk_size: int, attention_mask: Tensor | None = None) -> Tensor:
    """Mean of [B, T, F] over each chunk window -> [B, K, F], ignoring padded positions (mask 0).

    Padded values are selected away, not multiplied by 0, so even inf/NaN junk there cannot leak in.
    A chunk with no real token has mean 0.
    """
    b, t, f = values.shape
    k = num_chunks(t, chunk_size)
    pad = k * chunk_size - t
    if attention_mask is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=values.device)
    else:
        valid = attention_mask.to(device=values.device) != 0
    kept = torch.where(valid.unsqueeze(-1), values, torch.zeros((), dtype=values.dtype, device=values.device))
    sums = F.pad(kept, (0, 0, 0, pad)).view(b, k, chunk_size, f).sum(dim=2)
    counts = F.pad(valid, (0, pad)).view(b, k, chunk_size).sum(dim=2)
    return sums / counts.clamp_min(1).unsqueeze(-1).to(values.dtype)


def lag_chunks(chunk_values: Tensor) -> Tensor:
    """Shift [B, K, F] one chunk later, zeros in front: chunk k sees only what chunk k−1 produced."""
    return F.pad(chunk_values[:, :-1], (0, 0, 1, 0))


@torch.no_grad()
def sticky_decisions(logits: Tensor, hysteresis: float, initial_expert: int = 0) -> Tensor:
    """Hard expert per chunk from [B, K, E] logits, with hysteresis -> [B, K] long.

    Chunk k switches from e_{k−1} to e* = argmax l_k only if l_k[e*] − l_k[e_{k−1}] > hysteresis
    (strictly); e_{−1} = initial_expert. The loop runs over chunks (K is small), not tokens.
    """
    b, k, e = logits.shape
    if not 0 <= initial_expert < e:
        raise ValueError(f"initial_expert {initial_expert} is not one of {e} experts")
    current = torch.full((b,), initial_expert, dtype=torch.long, device=logits.device)
    experts = torch.empty(b, k, dtype=torch.long, device=logits.device)
    for j in range(k):
        step = logits[:, j]
        best = step.argmax(dim=-1)
        margin = step.gather(1, best[:, None]) - step.gather(1, current[:, None])
        current = torch.where(margin.squeeze(1) > hysteresis, best, current)
        experts[:, j] = current
    return experts


def anneal_temperature(step: int, total: int, start: float = 1.0, end: float = 0.1) -> float:
    """Geometric schedule start -> end over `total` steps, held at `end` afterwards.

    Geometric because softmax sharpness depends on the ratio of logits to T, so equal ratios per step give
    an even sharpening rather than a sudden collapse at the end of a linear ramp.
    """
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}")
    frac = min(max(step, 0), total) / total
    return start * (end / start) ** frac


class ChunkStickyRouter(nn.Module):
    """Chunk-level expert router: ℓ_k = mean over chunk k−1 of MLP(x_t), MLP d -> d/2 -> d/4 -> E.

    Training gates: straight-through onehot(e_k) + p_k − sg(p_k), or soft p_k. Eval gates: always hard.
    `temperature` is a plain attribute the trainer anneals (see `anneal_temperature`).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        chunk_size: int = 128,
        hysteresis: float = 0.7,
        mode: RouterMode = "straight_through",
        temperature: float = 1.0,
        initial_expert: int = 0,
    ) -> None:
        super().__init__()
        if n_experts < 2:
            raise ValueError(f"a router needs at least 2 experts, got {n_experts}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        if mode not in ("straight_through", "soft"):
            raise ValueError(f"mode must be 'straight_through' or 'soft', got {mode!r}")
        if not 0 <= initial_expert < n_experts:
            raise ValueError(f"initial_expert {initial_expert} is not one of {n_experts} experts")
        h1, h2 = max(1, d_model // 2), max(1, d_model // 4)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, h1), nn.GELU(), nn.Linear(h1, h2), nn.GELU(), nn.Linear(h2, n_experts)
        )
        self.n_experts = n_experts
        self.chunk_size = chunk_size
        self.hysteresis = hysteresis
        self.mode: RouterMode = mode
        self.initial_expert = initial_expert
        self.temperature = temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self._temperature = float(value)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        # Chunk means and the hysteresis comparison run in fp32: a bf16 mean over 128 tokens is too coarse
        # for a fixed margin of .7 to mean the same thing from run to run.
        token_logits = self.mlp(hidden).float()
        logits = lag_chunks(chunk_means(token_logits, self.chunk_size, attention_mask))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        experts = sticky_decisions(logits.detach(), self.hysteresis, self.initial_expert)
        hard = F.one_hot(experts, self.n_experts).to(probs.dtype)
        if not self.training:
            gates = hard
        elif self.mode == "soft":
            gates = probs
        else:
            # p − sg(p) is exactly 0 forward, so the gate is exactly one-hot; (hard + p) − p is not.
            gates = hard + (probs - probs.detach())
        return RouterOutput(logits, probs, experts, gates, self.chunk_size)


# ---------------------------------------------------------------------------------------------------------
# Regularisers. Each applies its own weight (BEM_SPEC §3 defaults where the spec names one), so a training
# loop adds them as they come; `RouterLossWeights` collects the weights in one place.

_EPS = 1e-12


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(_EPS).log()).sum(dim=-1)


def entropy_loss(probs: Tensor, weight: float = 0.01) -> Tensor:
    """weight · mean over chunks of H(p_k): pushes each chunk toward a confident choice."""
    return weight * _entropy(probs).mean()


def flip_loss(probs: Tensor, weight: float = 0.1, tolerance: float = 0.1) -> Tensor:
    """weight · max(0, f − tolerance)² with f = mean(1 − ⟨p_k, p_{k−1}⟩) over consecutive chunks.

    Free below the tolerance: some switching is the point of routing; only a flickering router pays.
    """
    if probs.shape[1] < 2:
        return probs.sum() * 0.0
    flips = 1.0 - (probs[:, 1:] * probs[:, :-1]).sum(dim=-1)
    return weight * F.relu(flips.mean() - tolerance) ** 2


def decorrelation_loss(gates: Tensor, weight: float) -> Tensor:
    """weight · Σ_{i≠j} corr(g_i, g_j)², columns g_i = expert i's gate over all chunks of the batch.

    Discourages experts that are always chosen together or in lockstep. A constant column (an expert never
    or always used) has no defined correlation and counts as 0.
    """
    g = gates.reshape(-1, gates.shape[-1]).float()
    centred = g - g.mean(dim=0)
    z = centred / (centred.pow(2).mean(dim=0).sqrt() + 1e-6)
    corr = z.T @ z / g.shape[0]
    off_diagonal = corr - torch.diag_embed(torch.diagonal(corr))
    return weight * off_diagonal.pow(2).sum()


def balance_loss(gates: Tensor, weight: float) -> Tensor:
    """weight · (log E − H(mean g)): zero when experts are used equally often, log E when one takes all."""
    usage = gates.reshape(-1, gates.shape[-1]).float().mean(dim=0)
    return weight * (math.log(gates.shape[-1]) - _entropy(usage))


@dataclass(frozen=True)
class RouterLossWeights:
    """Weights of the four regularisers. decorrelation and balance have no spec default; .01 is ours."""

    entropy: float = 0.01
    flip: float = 0.1
    decorrelation: float = 0.01
    balance: float = 0.01


def router_regularisers(output: RouterOutput, weights: RouterLossWeights | None = None) -> dict[str, Tensor]:
    """All four weighted regularisers, by name (sum them for the loss, log them as they are).

    Chunk 0 is left out: its logits are zeros by construction and its expert is fixed, so it carries no
    signal and would count as a flip (uniform -> anything) and as forced use of the initial expert.
    """
    w = weights or RouterLossWeights()
    probs, gates = output.probs[:, 1:], output.gates[:, 1:]
    if probs.shape[1] == 0:
        zero = output.probs.sum() * 0.0
        return {"entropy": zero, "flip": zero, "decorrelation": zero, "balance": zero}
    return {
        "entropy": entropy_loss(probs, w.entropy),
        "flip": flip_loss(probs, w.flip),
        "decorrelation": decorrelation_loss(gates, w.decorrelation),
        "balance": balance_loss(gates, w.balance),
    }
