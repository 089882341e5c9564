"""Cache safety: chunk-constant codes, the safety rate, and KV reuse through a prefix-keyed block cache."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bem.core.cache import (
    CACHE_SAFETY_GATE,
    BlockPrefixCache,
    RouterDecision,
    cache_safety_rate,
    chunk_violations,
    codes_constant_in_chunks,
    kv_hit_rate,
    kv_hit_ratio,
    violation_counts,
)
from bem.core.routing import ChunkStickyRouter, expand_to_tokens

N = 4


# -- codes piecewise constant per chunk --


def test_chunk_expanded_codes_are_constant_and_one_changed_token_is_caught() -> None:
    t = 4 * N + 3
    codes = expand_to_tokens(torch.randn(2, 5, 6), t, N)
    assert codes_constant_in_chunks(codes, N)
    assert not chunk_violations(codes, N).any()
    codes[1, 2 * N + 1, 3] += 1e-3
    assert not codes_constant_in_chunks(codes, N)
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(chunk_violations(codes, N), expected)
    assert codes_constant_in_chunks(codes, N, atol=1e-2)


def test_a_change_at_a_chunk_boundary_is_allowed() -> None:
    codes = torch.zeros(1, 3 * N, 2)
    codes[0, N:] = 1.0  # changes exactly where chunk 1 starts
    assert codes_constant_in_chunks(codes, N)
    assert not codes_constant_in_chunks(codes, N + 1)  # the same change falls inside a 5-token window


def test_padded_positions_are_ignored() -> None:
    codes = expand_to_tokens(torch.randn(1, 3, 4), 3 * N, N)
    mask = torch.ones(1, 3 * N, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[0, -1] = 0
    codes[0, 0] = 99.0
    codes[0, -1] = float("nan")
    assert codes_constant_in_chunks(codes, N, attention_mask=mask)
    assert not codes_constant_in_chunks(codes, N)


def test_router_token_gates_are_cache_safe() -> None:
    router = ChunkStickyRouter(8, 3, chunk_size=N, mode="soft").train()
    out = router(torch.randn(2, 5 * N + 1, 8))
    assert codes_constant_in_chunks(out.token_gates(5 * N + 1).detach(), N)


# -- cache_safety_rate --

SAFE = RouterDecision(code_changed_inside_chunk=False, span=4, bias_scale=2.0)  # both limits inclusive


@pytest.mark.parametrize(
    "bad, kind",
    [
        (RouterDecision(True, 1, 1.0), "code_changed_inside_chunk"),
        (RouterDecision(False, 5, 1.0), "span"),
        (RouterDecision(False, 2, 2.01), "bias_scale"),
    ],
)
def test_each_violation_kind_counts(bad: RouterDecision, kind: str) -> None:
    assert SAFE.violations() == ()
    decisions = [SAFE] * 3 + [bad]
    assert cache_safety_rate(decisions) == pytest.approx(0.75)
    assert violation_counts(decisions)[kind] == 1
    assert sum(violation_counts(decisions).values()) == 1


def test_a_decision_breaking_several_rules_counts_once_in_the_rate() -> None:
    decisions = [SAFE, RouterDecision(True, 9, 3.0)]
    assert cache_safety_rate(decisions) == pytest.approx(0.5)
    assert violation_counts(decisions) == {"code_changed_inside_chunk": 1, "span": 1, "bias_scale": 1}


def test_cache_safety_rate_gate_and_empty() -> None:
    assert cache_safety_rate(iter([SAFE] * 19 + [RouterDecision(True, 1, 1.0)])) >= CACHE_SAFETY_GATE
    assert cache_safety_rate([SAFE] * 18 + [RouterDecision(True, 1, 1.0)] * 2) < CACHE_SAFETY_GATE
    with pytest.raises(ValueError):
        cache_safety_rate([])


# -- KV-hit --


def request(n_tokens: int, seed: int = 0) -> tuple[list[int], list[list[float]]]:
    rng = random.Random(seed)
    tokens = [rng.randrange(259) for _ in range(n_tokens)]
    codes = [[rng.random() for _ in range(3)] for _ in range(-(-n_tokens // N))]
    return tokens, codes


def test_identical_requests_reuse_every_full_chunk() -> None:
    cache = BlockPrefixCache(N)
    tokens, codes = request(4 * N + 2)
    assert cache.lookup_and_insert(tokens, codes) == 0
    assert cache.lookup_and_insert(tokens, codes) == 4 * N  # the partial last chunk is never reused
    assert len(cache) == 4


@pytest.mark.parametrize("j", range(4))
def test_a_token_change_in_chunk_j_invalidates_chunks_from_j(j: int) -> None:
    cache = BlockPrefixCache(N)
    tokens, codes = request(4 * N)
    cache.lookup_and_insert(tokens, codes)
    edited = list(tokens)
    edited[j * N + N - 1] += 1
    assert cache.lookup_and_insert(edited, codes) == j * N


@pytest.mark.parametrize("j", range(4))
def test_a_code_change_in_chunk_j_invalidates_chunks_from_j(j: int) -> None:
    cache = BlockPrefixCache(N)
    tokens, codes = request(4 * N)
    cache.lookup_and_insert(tokens, codes)
    edited = [list(c) for c in codes]
    edited[j][0] += 1e-6  # tiny, but different K/V
    assert cache.lookup_and_insert(tokens, edited) == j * N


def test_a_later_block_alone_is_not_reusable() -> None:
    # Same chunk 1 tokens and code, different chunk 0: chunk 1's K/V attended to another prefix.
    cache = BlockPrefixCache(N)
    tokens, codes = request(2 * N)
    cache.lookup_and_insert(tokens, codes)
    edited = list(tokens)
    edited[0] += 1
    assert cache.lookup_and_insert(edited, codes) == 0
    assert cache.lookup_and_insert(tokens[:N] + [7] * N, codes) == N  # the shared prefix still hits


def test_a_block_seen_after_another_prefix_is_not_reusable() -> None:
    # A = [P, Q, S] and B = [P, R] are cached; C = [P, R, S] may reuse P and PR, but not S: the cached S
    # attended to Q, not R. Only a key that covers the whole prefix tells the two apart.
    p, q, r, s = ([t] * N for t in range(4))
    codes = [[0.0]] * 3
    cache = BlockPrefixCache(N)
    cache.lookup_and_insert(p + q + s, codes)
    cache.lookup_and_insert(p + r, codes[:2])
    assert cache.lookup_and_insert(p + r + s, codes) == 2 * N


def test_code_keys_do_not_depend_on_the_container() -> None:
    cache = BlockPrefixCache(N)
    tokens, codes = request(2 * N)
    cache.lookup_and_insert(tokens, [torch.tensor(c, dtype=torch.float64) for c in codes])
    assert cache.lookup_and_insert(tokens, codes) == 2 * N
    assert cache.lookup_and_insert(tokens, [torch.tensor(c).reshape(1, 3) for c in codes]) == 0  # other shape


def test_chunk_code_count_must_match_the_prompt() -> None:
    tokens, codes = request(2 * N + 1)
    with pytest.raises(ValueError, match="chunk codes"):
        BlockPrefixCache(N).lookup_and_insert(tokens, codes[:-1])


def test_kv_hit_rate_of_a_shared_prefix_stream() -> None:
    system, code = request(2 * N, seed=1)
    stream = []
    for i in range(5):
        question, q_codes = request(N + 1, seed=10 + i)
        stream.append((system + question, code + q_codes))
    # The first request reuses nothing, each later one the 2 system chunks.
    assert kv_hit_rate(stream, N) == pytest.approx(4 * 2 * N / (5 * (3 * N + 1)))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.integers(0, 1)),
        min_size=1,
        max_size=8,
    )
)
def test_kv_hit_rate_is_a_share(raw: list[tuple[list[int], int]]) -> None:
    stream = [(tokens, [[float(code)]] * -(-len(tokens) // N)) for tokens, code in raw]
    rate = kv_hit_rate(stream, N)
    assert 0.0 <= rate <= 1.0
    assert kv_hit_rate(stream + stream, N) >= rate  # repeating the stream can only add hits


def test_kv_hit_ratio_compares_arms_on_the_same_prompts() -> None:
    prompts = [request(3 * N, seed=1)[0]] * 4
    sticky = [(p, [[1.0]] * 3) for p in prompts]  # same code every time
    flicker = [(p, [[1.0], [float(i)], [1.0]]) for i, p in enumerate(prompts)]  # chunk 1 code varies
    assert kv_hit_ratio(sticky, flicker, N) == pytest.approx(kv_hit_rate(sticky, N) / kv_hit_rate(flicker, N))
    assert kv_hit_ratio(sticky, flicker, N) > 1.0
    never = [(p, [[float(i)]] * 3) for i, p in enumerate(prompts)]  # baseline with no hits at all
    with pytest.raises(ValueError, match="baseline"):
        kv_hit_ratio(sticky, never, N)
    with pytest.raises(ValueError):
        kv_hit_rate([], N)
