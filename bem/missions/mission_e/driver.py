"""Feeding a long sequence through an arm's state at chunk granularity (Mission E's arms).

An `Arm` is a model, an evicting cache at the arm's budget, and optionally the compressive memory
(`infini` wrappers) and BEM's controller. `step(ids)` runs one chunk (or one decoded token): the
forward pass (eager attention, so the weights exist), then the cache observes the attention, the
controller marks the chunk's tokens, the memory commits the chunk's write (through BEM's gate when
there is one), and the cache evicts to its budget. With a budget at least the length and no memory
this is plain greedy decoding with full KV (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.missions.mission_e import kv
from bem.missions.mission_e.controller import MARK, MemoryController, surprise
from bem.missions.mission_e.infini import InfiniAttention


def eager(model: nn.Module) -> None:
    """Eager attention: the policies read attention weights, which SDPA does not return."""
    model.config._attn_implementation = "eager"  # type: ignore[union-attr]


def evicting_cache(model: nn.Module, policy: kv.Policy, budget: int, window: int = 16) -> kv.EvictingCache:
    config: Any = model.config
    rotary: Any = model.get_submodule("model.rotary_emb")
    return kv.EvictingCache(int(config.num_hidden_layers), rotary.inv_freq, policy, budget, window)


@dataclass
class Step:
    logits: Tensor  # [B, T, V]
    signal: Tensor | None = None  # [B, T] BEM's soft eviction signal
    gates: list[Tensor] = field(default_factory=list)  # per layer, ĝ [B, T] (soft)


@dataclass
class Arm:
    model: nn.Module
    policy: kv.Policy
    budget: int  # tokens kept per layer and KV head
    wrappers: list[InfiniAttention] = field(default_factory=list)
    controller: MemoryController | None = None
    cache: kv.EvictingCache | None = None
    peak_bytes: int = 0  # the most state held after any step since reset
    offered: int = 0  # tokens offered to the memory since reset (per layer, summed)
    written: int = 0  # of those, the ones BEM's gate wrote
    last: Tensor | None = None  # the previous step's last logits (the next token's surprise)

    def reset(self, batch: int = 1) -> None:
        device = next(self.model.parameters()).device
        self.cache = evicting_cache(self.model, self.policy, self.budget)
        for w in self.wrappers:
            w.reset(batch, device)
        self.peak_bytes = self.offered = self.written = 0
        self.last = None

    def state_bytes(self) -> int:
        assert self.cache is not None
        held = self.cache.state_bytes()
        return held + sum(w.state.bytes() for w in self.wrappers if w.state is not None)

    def step(self, ids: Tensor, write: bool = True) -> Step:
        """One chunk through the arm; `write` commits it to the memory (decoded tokens are not)."""
        if self.cache is None:
            self.reset(ids.shape[0])
        cache = self.cache
        assert cache is not None
        out = self.model(
            input_ids=ids,
            cache=cache,
            use_cache=True,
            output_attentions=not self.wrappers,
            output_hidden_states=self.controller is not None,
        )
        if self.wrappers:
            weights = [w.weights for w in self.wrappers]
            assert all(a is not None for a in weights)
            cache.observe(tuple(a for a in weights if a is not None))
        else:
            cache.observe(out.attentions)
        result = Step(out.logits)
        code = None
        if self.controller is not None:
            hidden = out.hidden_states[-1]
            code = self.controller.code(hidden)
            result.signal = self.controller.keep_signal(hidden, code)
            for layer in cache.evicting_layers:
                layer.mark((result.signal.detach() > MARK).float())
        if self.wrappers and write:
            if self.controller is not None:
                assert code is not None
                seen = surprise(out.logits, ids, self.last)
                hard, result.gates = self.controller.write_gates(self.wrappers, code, seen)
                for w, g in zip(self.wrappers, hard, strict=True):
                    w.commit(g)
                    self.offered += g.numel()
                    self.written += int(g.detach().sum())
            else:
                for w in self.wrappers:
                    w.commit()
        self.last = out.logits[:, -1].detach()
        cache.evict()
        self.peak_bytes = max(self.peak_bytes, self.state_bytes())
        return result


@dataclass(frozen=True)
class Answer:
    text: str
    prefill_s: float  # seconds to read the prompt
    tokens: int  # the prompt's length
    peak_bytes: int
    offered: int = 0  # tokens offered to the memory (per layer, summed); 0 without BEM's gate
    written: int = 0  # of those, the ones the gate wrote


@torch.no_grad()
def answer(
    arm: Arm, tokenizer: PreTrainedTokenizerBase, prompt: str, *, chunk: int = 64, max_new_tokens: int = 16
) -> Answer:
    """The greedy continuation of `prompt` (one row) through the arm, from a fresh state."""
    device = next(arm.model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    arm.reset(1)
    began = time.perf_counter()
    logits = torch.empty(0)
    for lo in range(0, ids.shape[1], chunk):
        logits = arm.step(ids[:, lo : lo + chunk]).logits[:, -1]
    if ids.device.type == "cuda":
        torch.cuda.synchronize()  # the clock must see the queued kernels, whichever arm synced last
    prefill = time.perf_counter() - began
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        logits = arm.step(torch.tensor([[token]], device=device), write=False).logits[:, -1]
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    return Answer(text, prefill, int(ids.shape[1]), arm.peak_bytes, arm.offered, arm.written)


def _target_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """−log p of each target under its row of logits [T, V] (float32)."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def stream_nll(arm: Arm, ids: Tensor, chunk: int = 64) -> Tensor:
    """[T − 1]: −log p(ids[t + 1] | the arm's state after ids[: t + 1]) over one row, chunk by chunk
    (each chunk's target log-probabilities gathered at once: a long stream's [T, V] is never held)."""
    arm.reset(1)
    out = []
    n = ids.shape[1]
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n - 1)  # the last position predicts nothing
        logits = arm.step(ids[:, lo : lo + chunk]).logits[0]
        if hi > lo:
            out.append(_target_nll(logits[: hi - lo], ids[0, lo + 1 : hi + 1]))
    return torch.cat(out)


@torch.no_grad()
def recompute_nll(model: nn.Module, ids: Tensor, window: int, chunk: int = 64) -> Tensor:
    """[T − 1]: the sliding-window-with-recompute reference (StreamingLLM's oracle): each chunk of
    targets scored by a fresh pass over it and the `window` tokens before it."""
    out = []
    n = ids.shape[1]
    for lo in range(0, n - 1, chunk):
        hi = min(lo + chunk, n - 1)
        start = max(0, lo - window)
        logits = model(input_ids=ids[:, start:hi], use_cache=False).logits[0]
        out.append(_target_nll(logits[lo - start :], ids[0, lo + 1 : hi + 1]))
    return torch.cat(out)
