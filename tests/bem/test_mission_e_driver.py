"""The chunked driver: with a budget at least the length it is plain greedy decoding with full KV, and a
small budget really holds the cache to it while decoding."""

from __future__ import annotations

from bem.core.generate import greedy_generate
from bem.core.models import build_tiny_llama, byte_tokenizer, tiny_llama_config
from bem.missions.mission_e import driver, kv


def test_a_budget_at_least_the_length_decodes_as_full_kv_and_a_small_one_holds() -> None:
    model = build_tiny_llama(tiny_llama_config(), seed=0).eval()
    driver.eager(model)
    tok = byte_tokenizer()
    prompt = "The pass key is 4242. Remember it. " * 3 + "What is the pass key? The pass key is"
    (reference,) = greedy_generate(model, tok, [prompt], max_new_tokens=12)
    for policy in (kv.Window(), kv.StreamingLLM(), kv.H2O(), kv.SnapKV()):
        full = driver.Arm(model, policy, budget=10_000)
        assert driver.answer(full, tok, prompt, chunk=16, max_new_tokens=12).text == reference
        small = driver.Arm(model, policy, budget=24)
        driver.answer(small, tok, prompt, chunk=16, max_new_tokens=12)
        assert small.cache is not None and small.cache.get_seq_length() == 24
