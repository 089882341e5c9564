"""KV eviction as transformers v5 cache layers, at chunk granularity (BEM_SPEC.md section 10; the
policies of missions_cde.md E.3, written here because kvpress pins transformers below 5.3).

`EvictingCache` holds one `EvictingLayer` per decoder layer. A driver feeds the context in chunks: after
each chunk's forward pass (eager attention, `output_attentions=True`) it calls `observe` with the
chunk's attention weights, then `evict`, which keeps `budget` tokens per KV head as the policy says.

Positions (StreamingLLM's method): transformers numbers a new token by the cache's length, so after an
eviction the next tokens continue from the kept count, never past the positions the model was trained
on. The kept keys are moved to their new in-cache positions by re-rotating them: a key that RoPE rotated
at position p is rotated by (p' − p) to stand at p' (rotations compose), which is the same as keeping
pre-RoPE keys and rotating them afresh. With nothing evicted this is exactly `DynamicCache` (tested).

Policies (`Policy.keep` gives each KV head's kept indices, ascending):
- `Window`: the most recent `budget` tokens;
- `StreamingLLM`: `sinks` first tokens and the most recent rest;
- `H2O`: the `recent` most recent and the heaviest hitters by accumulated attention among the others;
- `SnapKV`: the last `window` queries of the latest chunk vote (their attention summed, pooled over
  `kernel` neighbours); the window plus the top voted others;
- `Biased`: any scoring policy's scores plus λ times a per-token signal (BEM's write-worthiness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(keys: Tensor, shift: Tensor, inv_freq: Tensor) -> Tensor:
    """Keys [B, H, T, D] rotated by RoPE at some positions, moved by `shift` [B, H, T] positions (Llama's
    layout: the frequencies repeated over the two halves)."""
    angles = shift.to(torch.float32)[..., None] * inv_freq.to(keys.device, torch.float32)
    emb = torch.cat((angles, angles), dim=-1)
    out = keys.float() * emb.cos() + rotate_half(keys.float()) * emb.sin()
    return out.to(keys.dtype)


class EvictingLayer(DynamicLayer):
    """A `DynamicLayer` that knows each kept token's in-cache position and the scores policies read:
    `acc` (H2O's attention accumulated over every query so far) and `votes` (SnapKV's, from the last
    chunk with a full window of queries), both [B, H_kv, T]; `signal` [B, H_kv, T] a per-token bias
    (BEM's), if set."""

    def __init__(self, inv_freq: Tensor, window: int = 16) -> None:
        super().__init__()
        self.inv_freq = inv_freq
        self.window = window
        self.acc: Tensor | None = None
        self.votes: Tensor | None = None
        self.signal: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        b, h, q, _ = key_states.shape
        zeros = torch.zeros(b, h, q, device=key_states.device)
        self.acc = zeros if self.acc is None else torch.cat([self.acc, zeros], dim=-1)
        self.votes = zeros if self.votes is None else torch.cat([self.votes, zeros], dim=-1)
        if self.signal is not None:  # new tokens have no signal until `mark` gives them one
            self.signal = torch.cat([self.signal, zeros], dim=-1)
        return keys, values

    @property
    def pos(self) -> Tensor | None:
        """[B, H, T]: each kept token's in-cache position, which is its index."""
        if self.keys is None or not self.is_initialized:
            return None
        b, h, t, _ = self.keys.shape
        return torch.arange(t, device=self.keys.device).expand(b, h, t)

    def mark(self, signal: Tensor) -> None:
        """The per-token signal [B, q] of the tokens the last update added (BEM's bias), kept per KV
        head because each head keeps its own tokens."""
        assert self.acc is not None
        if self.signal is None:
            self.signal = torch.zeros_like(self.acc)
        self.signal[..., self.acc.shape[-1] - signal.shape[-1] :] = signal[:, None, :]

    def observe(self, attention: Tensor) -> None:
        """The chunk's attention weights [B, H_q, q, T] (T = this layer's length): each KV head's share
        (the mean over its query group) added to `acc`; the last `window` queries' sum is `votes`."""
        assert self.acc is not None
        b, hq, _, t = attention.shape
        hk = self.acc.shape[1]
        grouped = attention.float().reshape(b, hk, hq // hk, -1, t).mean(2)  # [B, H_kv, q, T]
        self.acc = self.acc + grouped.sum(2)
        # SnapKV votes with a full observation window: the end of the prefill's chunks, not a decoded
        # token's single query (until the next full window, the last votes stand, new tokens at 0).
        if grouped.shape[2] >= self.window:
            self.votes = grouped[:, :, -self.window :].sum(2)

    def keep(self, index: Tensor) -> None:
        """Keep the tokens at `index` [B, H, K] (ascending), moved to in-cache positions 0..K−1."""
        assert self.keys is not None and self.values is not None
        gather = index[..., None].expand(*index.shape, self.keys.shape[-1])
        keys = self.keys.gather(2, gather)
        # A token's in-cache position is its index (positions are always 0..T−1), so it moves by
        # (new index − old index).
        new = torch.arange(index.shape[-1], device=index.device).expand_as(index)
        self.keys = rerotate(keys, new - index, self.inv_freq)
        self.values = self.values.gather(2, gather)
        for name in ("acc", "votes"):
            t = getattr(self, name)
            setattr(self, name, t.gather(2, index))
        if self.signal is not None:
            self.signal = self.signal.gather(2, index)

    def state_bytes(self) -> int:
        """Bytes this layer holds: kept keys and values, and the policy's per-token scores."""
        held = [self.keys, self.values, self.acc, self.votes, self.signal]
        return sum(t.numel() * t.element_size() for t in held if t is not None)


@dataclass(frozen=True)
class Policy:
    """Which tokens a KV head keeps when its layer is over `budget`."""

    def scores(self, layer: EvictingLayer) -> Tensor | None:
        """[B, H, T] scores of a scoring policy (higher is kept), None for a positional one."""
        return None

    def protected(self, length: int, budget: int) -> tuple[int, int]:
        """(first, last): how many of the first and of the last tokens are always kept."""
        return 0, budget

    def keep(self, layer: EvictingLayer, budget: int) -> Tensor:
        assert layer.keys is not None
        b, h, t, _ = layer.keys.shape
        device = layer.keys.device
        if t <= budget:
            return torch.arange(t, device=device).expand(b, h, t)
        first, last = self.protected(t, budget)
        fixed = torch.cat([torch.arange(first, device=device), torch.arange(t - last, t, device=device)])
        chosen = fixed.expand(b, h, -1)
        free = budget - first - last
        scores = self.scores(layer)
        if free > 0:
            if scores is None:
                raise ValueError(f"{type(self).__name__} keeps {first} + {last} tokens of a {budget} budget")
            masked = scores.clone()
            masked[..., fixed] = float("-inf")
            top = masked.topk(free, dim=-1).indices
            chosen = torch.cat([chosen, top], dim=-1)
        return chosen.sort(dim=-1).values


@dataclass(frozen=True)
class Window(Policy):
    pass


@dataclass(frozen=True)
class StreamingLLM(Policy):
    sinks: int = 4

    def protected(self, length: int, budget: int) -> tuple[int, int]:
        first = min(self.sinks, budget)
        return first, budget - first


@dataclass(frozen=True)
class H2O(Policy):
    recent: float = 0.5  # the share of the budget kept for the most recent tokens

    def scores(self, layer: EvictingLayer) -> Tensor | None:
        return layer.acc

    def protected(self, length: int, budget: int) -> tuple[int, int]:
        return 0, round(self.recent * budget)


@dataclass(frozen=True)
class SnapKV(Policy):
    """BEM_SPEC's defaults: max-pooled votes, kernel 7 (kvpress and SnapKV's code also average-pool)."""

    window: int = 16
    kernel: int = 7
    pool: str = "max"

    def scores(self, layer: EvictingLayer) -> Tensor | None:
        assert layer.votes is not None
        b, h, t = layer.votes.shape
        flat = layer.votes.reshape(b * h, 1, t)
        if self.pool == "max":
            pooled = F.max_pool1d(flat, self.kernel, 1, self.kernel // 2)
        elif self.pool == "avg":
            pooled = F.avg_pool1d(flat, self.kernel, 1, self.kernel // 2, count_include_pad=False)
        else:
            raise ValueError(f"SnapKV pool {self.pool!r}: 'max' or 'avg'")
        return pooled.reshape(b, h, t)

    def protected(self, length: int, budget: int) -> tuple[int, int]:
        return 0, min(self.window, budget)


@dataclass(frozen=True)
class Biased(Policy):
    """`base`'s scores plus λ·signal (BEM's per-token write-worthiness, [B, T] on the layer)."""

    base: Policy = H2O()
    lam: float = 1.0

    def scores(self, layer: EvictingLayer) -> Tensor | None:
        scores = self.base.scores(layer)
        if scores is None or layer.signal is None:
            return scores
        return scores + self.lam * layer.signal

    def protected(self, length: int, budget: int) -> tuple[int, int]:
        return self.base.protected(length, budget)


class EvictingCache(Cache):
    """One `EvictingLayer` per decoder layer, evicted by `policy` to `budget` tokens per KV head."""

    def __init__(
        self, n_layers: int, inv_freq: Tensor, policy: Policy, budget: int, window: int = 16
    ) -> None:
        window = getattr(policy, "window", window)  # SnapKV's observation window is its own
        super().__init__(layers=[EvictingLayer(inv_freq, window) for _ in range(n_layers)])
        self.policy, self.budget = policy, budget

    @property
    def evicting_layers(self) -> list[EvictingLayer]:
        return [layer for layer in self.layers if isinstance(layer, EvictingLayer)]

    def observe(self, attentions: tuple[Tensor, ...]) -> None:
        for layer, attention in zip(self.evicting_layers, attentions, strict=True):
            layer.observe(attention)

    def evict(self) -> None:
        for layer in self.evicting_layers:
            if layer.get_seq_length() > self.budget:
                layer.keep(self.policy.keep(layer, self.budget))

    def state_bytes(self) -> int:
        return sum(layer.state_bytes() for layer in self.evicting_layers)
