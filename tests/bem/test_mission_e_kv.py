"""Mission E's cache layers: equal to DynamicCache when nothing is evicted, each policy keeps exactly the
tokens its definition names on hand-made attention, and kept keys are re-rotated to their new positions
exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from bem.core.models import build_tiny_llama, tiny_llama_config
from bem.missions.mission_e import kv

POLICIES = [kv.Window(), kv.StreamingLLM(), kv.H2O(), kv.SnapKV(), kv.Biased()]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"  # the policies read attention weights
    return build_tiny_llama(cfg, seed=0).eval()


def run_chunks(model, ids: torch.Tensor, cache, chunk: int = 8) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = []
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            o = model(input_ids=ids[:, lo : lo + chunk], cache=cache, use_cache=True, output_attentions=True)
            if isinstance(cache, kv.EvictingCache):
                cache.observe(o.attentions)
                cache.evict()
            out.append(o.logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_with_the_budget_at_least_the_length_each_layer_is_dynamic_cache(model, policy) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = run_chunks(model, ids, DynamicCache(config=model.config))
    cache = kv.EvictingCache(
        model.config.num_hidden_layers, model.model.rotary_emb.inv_freq, policy, budget=40
    )
    assert torch.allclose(run_chunks(model, ids, cache), reference, atol=1e-6)
    assert cache.get_seq_length() == 40


def test_rerotation_moves_a_key_exactly_to_its_new_position() -> None:
    cfg = tiny_llama_config()
    rope = LlamaRotaryEmbedding(cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    raw = torch.randn(1, 2, 6, head_dim)
    old = torch.tensor([[3, 7, 8, 20, 21, 22]])
    new = torch.arange(6)[None]
    cos_o, sin_o = rope(raw, old)
    cos_n, sin_n = rope(raw, new)
    at_old, _ = apply_rotary_pos_emb(raw, raw, cos_o, sin_o)
    at_new, _ = apply_rotary_pos_emb(raw, raw, cos_n, sin_n)
    moved = kv.rerotate(at_old, (new - old).expand(1, 2, 6), rope.inv_freq)
    assert torch.allclose(moved, at_new, atol=1e-5)


def layer_with(t: int, acc: list[float] | None = None, votes: list[float] | None = None) -> kv.EvictingLayer:
    """One batch row, one KV head, `t` tokens whose scores are given."""
    layer = kv.EvictingLayer(torch.ones(2))
    values = torch.arange(t, dtype=torch.float).reshape(1, 1, t, 1).expand(1, 1, t, 4)
    layer.update(torch.zeros(1, 1, t, 4), values)
    if acc is not None:
        layer.acc = torch.tensor(acc, dtype=torch.float)[None, None]
    if votes is not None:
        layer.votes = torch.tensor(votes, dtype=torch.float)[None, None]
    return layer


def kept(policy: kv.Policy, layer: kv.EvictingLayer, budget: int) -> list[int]:
    return policy.keep(layer, budget)[0, 0].tolist()


def test_each_policy_keeps_the_tokens_its_definition_names() -> None:
    layer = layer_with(
        12, acc=[5, 0, 0, 9, 0, 0, 7, 0, 0, 0, 0, 0], votes=[0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]
    )
    assert kept(kv.Window(), layer, 4) == [8, 9, 10, 11]
    assert kept(kv.StreamingLLM(sinks=2), layer, 5) == [0, 1, 9, 10, 11]
    # H2O: half the budget to the recent tokens, the rest to the largest accumulated attention.
    assert kept(kv.H2O(recent=0.5), layer, 6) == [0, 3, 6, 9, 10, 11]
    # SnapKV: the window, then the pooled votes: a vote spreads to its neighbours (kernel 3).
    votes = [0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]
    snap = layer_with(12, votes=votes)
    assert kept(kv.SnapKV(window=2, kernel=3, pool="avg"), snap, 5) == [3, 4, 5, 10, 11]
    # Max-pooling: the neighbours take the vote whole, so a weaker lone vote loses to them.
    two = layer_with(12, votes=[0, 0, 0, 0, 6, 0, 0, 0, 3, 0, 0, 0])
    assert kept(kv.SnapKV(window=2, kernel=3, pool="max"), two, 5) == [3, 4, 5, 10, 11]
    assert {4, 8, 10, 11} <= set(kept(kv.SnapKV(window=2, kernel=1, pool="max"), two, 5))  # no pooling
    # A bias moves a token in: λ·signal puts token 1 (no attention) above token 0's accumulated 5.
    layer.signal = torch.tensor([[[0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]], dtype=torch.float)
    assert kept(kv.Biased(kv.H2O(recent=0.5), lam=1.0), layer, 6) == [1, 3, 6, 9, 10, 11]
    assert kept(kv.Biased(kv.H2O(recent=0.5), lam=0.0), layer, 6) == [0, 3, 6, 9, 10, 11]


def test_eviction_keeps_the_chosen_values_and_counts_the_bytes_it_holds() -> None:
    layer = layer_with(10, acc=[0.0] * 10)
    layer.keep(torch.tensor([[[0, 4, 9]]]))
    assert layer.values is not None and layer.values[0, 0, :, 0].tolist() == [0.0, 4.0, 9.0]
    assert layer.pos is not None and layer.pos.tolist() == [[[0, 1, 2]]]
    # keys and values (3 × 4 floats each) and the two score rows (3 floats each).
    assert layer.state_bytes() == 4 * (3 * 4 * 2 + 3 * 2)


def test_a_signal_follows_its_tokens_through_updates_and_evictions() -> None:
    layer = layer_with(4, acc=[0.0] * 4)
    layer.mark(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    layer.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    assert layer.signal is not None and layer.signal.tolist() == [[[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]]]
    layer.mark(torch.tensor([[5.0, 6.0]]))
    layer.keep(torch.tensor([[[1, 3, 5]]]))
    assert layer.signal.tolist() == [[[2.0, 4.0, 6.0]]]


def test_each_kv_head_keeps_its_own_tokens_signals() -> None:
    layer = kv.EvictingLayer(torch.ones(2))
    layer.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    layer.mark(torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0]]))
    layer.keep(torch.tensor([[[0, 2, 4], [1, 3, 4]]]))  # the two heads keep different tokens
    assert layer.signal is not None and layer.signal.tolist() == [[[10.0, 12.0, 14.0], [11.0, 13.0, 14.0]]]


def test_snapkv_votes_come_from_a_full_window_and_stand_through_decoding() -> None:
    layer = kv.EvictingLayer(torch.ones(2), window=4)
    layer.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4))
    prefill = torch.zeros(1, 1, 8, 8)
    prefill[..., 2] = 1.0  # every query looks at token 2
    layer.observe(prefill)
    assert layer.votes is not None and layer.votes[0, 0, 2] == 4.0  # the last 4 queries voted
    layer.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    decode = torch.zeros(1, 1, 1, 9)
    decode[..., 5] = 1.0  # one decoded query: not a window, the prefill's votes stand
    layer.observe(decode)
    assert layer.votes[0, 0].tolist() == [0, 0, 4.0, 0, 0, 0, 0, 0, 0]
    cache = kv.EvictingCache(1, torch.ones(2), kv.SnapKV(window=32), budget=64)
    assert cache.evicting_layers[0].window == 32  # the policy's window is the one that votes
