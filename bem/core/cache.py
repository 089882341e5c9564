"""Cache safety and KV reuse (BEM_SPEC §3).

An adapted layer's K/V depend on the code, so a KV block is only reusable when everything that shaped it
is the same: the tokens of its chunk and of every chunk before it (attention is causal), and the codes of
those chunks (the adapter was active). Hence a block of chunk j is keyed by (token ids, codes) of chunks
1..j, and a router that changes codes inside a chunk, or re-decides earlier chunks, breaks reuse.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CACHE_SAFETY_GATE = 0.95  # mission gate: cache_safety_rate >= .95
MAX_SPAN = 4  # chunks a macro-action may hold its code (BEM_SPEC §6)
MAX_BIAS_SCALE = 2.0


# -- codes piecewise constant per chunk --


def chunk_violations(
    token_codes: Tensor, chunk_size: int, attention_mask: Tensor | None = None, atol: float = 0.0
) -> Tensor:
    """[B, K] bool: chunk windows inside which the per-token code [B, T, R] changes (by more than atol).

    Measured as the max − min range of each code coordinate over the chunk's real tokens, so padded
    positions (mask 0) never count and no reference token has to be chosen.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, r = token_codes.shape
    k = math.ceil(t / chunk_size)
    pad = k * chunk_size - t
    codes = token_codes.detach().to(torch.float64)
    if attention_mask is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=codes.device)
    else:
        valid = attention_mask.to(codes.device) != 0
    valid = F.pad(valid, (0, pad)).view(b, k, chunk_size, 1)
    codes = F.pad(codes, (0, 0, 0, pad)).view(b, k, chunk_size, r)
    high = torch.where(valid, codes, -torch.inf).amax(dim=2)
    low = torch.where(valid, codes, torch.inf).amin(dim=2)
    return ((high - low) > atol).any(dim=-1)  # an all-padding chunk gives -inf > atol: no violation


def codes_constant_in_chunks(
    token_codes: Tensor, chunk_size: int, attention_mask: Tensor | None = None, atol: float = 0.0
) -> bool:
    """Cache-safety condition (2): the code is piecewise constant over chunk windows."""
    return not bool(chunk_violations(token_codes, chunk_size, attention_mask, atol).any())


# -- cache_safety_rate over router decisions --


@dataclass(frozen=True)
class RouterDecision:
    """One routing decision as logged by a router or policy, with the fields the safety rate looks at."""

    code_changed_inside_chunk: bool
    span: int
    bias_scale: float

    def violations(self) -> tuple[str, ...]:
        """Names of the rules this decision breaks (empty when it is cache-safe)."""
        broken = []
        if self.code_changed_inside_chunk:
            broken.append("code_changed_inside_chunk")
        if self.span > MAX_SPAN:
            broken.append("span")
        if self.bias_scale > MAX_BIAS_SCALE:
            broken.append("bias_scale")
        return tuple(broken)


def violation_counts(decisions: Iterable[RouterDecision]) -> dict[str, int]:
    """How often each rule was broken (a decision may break several), for reports next to the rate."""
    counts = {"code_changed_inside_chunk": 0, "span": 0, "bias_scale": 0}
    for d in decisions:
        for name in d.violations():
            counts[name] += 1
    return counts


def cache_safety_rate(decisions: Iterable[RouterDecision]) -> float:
    """Share of decisions that break none of the rules. No decisions is an error, not a perfect score."""
    total = safe = 0
    for d in decisions:
        total += 1
        safe += not d.violations()
    if total == 0:
        raise ValueError("cache_safety_rate of no decisions is undefined")
    return safe / total


# -- KV-hit through a block prefix cache --


def code_bytes(code: Any) -> bytes:
    """A deterministic key for one chunk's code: shape and float32 bytes.

    Exact, not rounded: two codes that round alike still give different K/V, so merging them would reuse
    stale blocks. −0.0 and 0.0 are made equal (same K/V). Tensors, arrays, sequences and scalars with the
    same float32 values give the same key.
    """
    if isinstance(code, Tensor):
        code = code.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(code, dtype=np.float32) + np.float32(0.0))
    return repr(arr.shape).encode() + arr.tobytes()


class BlockPrefixCache:
    """A block cache keyed by the whole prefix, like paged-attention prefix caching.

    The key of block j chains a hash of the key of block j−1 with chunk j's token ids and code, so a block
    hits only if chunks 1..j all match in tokens and codes. Only full chunks are cached: a partial last
    chunk will still grow, so its block is never final. Unbounded: this measures reuse, not memory.
    """

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self._blocks: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def block_keys(self, token_ids: Sequence[int], chunk_codes: Sequence[Any]) -> list[bytes]:
        """Chained keys of the request's full chunks (one per chunk, in order)."""
        n = self.chunk_size
        expected = math.ceil(len(token_ids) / n)
        if len(chunk_codes) != expected:
            raise ValueError(
                f"{len(token_ids)} tokens in chunks of {n} need {expected} chunk codes, "
                f"got {len(chunk_codes)}"
            )
        tokens = np.asarray(token_ids, dtype=np.int64)
        keys, key = [], b""
        for j in range(len(token_ids) // n):
            h = hashlib.sha256(key)
            h.update(tokens[j * n : (j + 1) * n].tobytes())
            h.update(code_bytes(chunk_codes[j]))
            key = h.digest()
            keys.append(key)
        return keys

    def lookup_and_insert(self, token_ids: Sequence[int], chunk_codes: Sequence[Any]) -> int:
        """Prompt tokens reused from earlier requests (whole leading chunks), then caches its blocks."""
        keys = self.block_keys(token_ids, chunk_codes)
        reused = 0
        for key in keys:
            if key not in self._blocks:
                break
            reused += self.chunk_size
        self._blocks.update(keys)
        return reused


def kv_hit_rate(stream: Iterable[tuple[Sequence[int], Sequence[Any]]], chunk_size: int) -> float:
    """Reused / all prompt tokens when the (token_ids, chunk_codes) requests run through one cache."""
    cache = BlockPrefixCache(chunk_size)
    reused = total = 0
    for token_ids, chunk_codes in stream:
        reused += cache.lookup_and_insert(token_ids, chunk_codes)
        total += len(token_ids)
    if total == 0:
        raise ValueError("kv_hit_rate of a stream without prompt tokens is undefined")
    return reused / total


def kv_hit_ratio(
    stream_variant: Iterable[tuple[Sequence[int], Sequence[Any]]],
    stream_baseline: Iterable[tuple[Sequence[int], Sequence[Any]]],
    chunk_size: int,
) -> float:
    """KV-hit of the variant as a multiple of the baseline arm's on the same prompts (gate: >= 1.0).

    A baseline with no hits at all raises ValueError rather than returning inf: the ratio is undefined, and
    inf would silently pass a ">= 1.0×" gate. Report the two rates instead in that case.
    """
    variant = kv_hit_rate(stream_variant, chunk_size)
    baseline = kv_hit_rate(stream_baseline, chunk_size)
    if baseline == 0.0:
        raise ValueError(f"baseline KV-hit rate is 0 (variant {variant:.4f}); the ratio is undefined")
    return variant / baseline
