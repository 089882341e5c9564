"""Equal state bytes: the analytic count matches the tensors an evicting cache and a memory hold."""

from __future__ import annotations

import pytest
import torch

from bem.core.models import build_tiny_llama, tiny_llama_config
from bem.missions.mission_e import kv
from bem.missions.mission_e.budget import Shapes, budget_bytes, kept_tokens
from bem.missions.mission_e.infini import attach_memory


def model():  # type: ignore[no-untyped-def]
    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"
    return build_tiny_llama(cfg, seed=0).eval()


def test_an_evicting_cache_holds_what_the_count_says() -> None:
    m = model()
    shapes = Shapes.of(m.config)
    cache = kv.EvictingCache(shapes.layers, m.model.rotary_emb.inv_freq, kv.H2O(), budget=16)
    ids = torch.randint(0, m.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lo in range(0, 40, 8):
            out = m(input_ids=ids[:, lo : lo + 8], cache=cache, use_cache=True, output_attentions=True)
            cache.observe(out.attentions)
            cache.evict()
    assert cache.get_seq_length() == 16
    assert cache.state_bytes() == 16 * shapes.kv_per_token(scores=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_memory_holds_what_the_count_says(dtype: torch.dtype) -> None:
    m = model().to(dtype)
    wrappers = attach_memory(m)
    with torch.no_grad():
        m(input_ids=torch.zeros(1, 8, dtype=torch.long))
    held = sum(w.state.bytes() for w in wrappers if w.state is not None)
    # The memory is float32 under any model dtype, and counted so.
    assert held == Shapes.of(m.config, dtype_bytes=dtype.itemsize).memory() == Shapes.of(m.config).memory()


def test_kept_tokens_spend_the_budget_after_the_memory() -> None:
    shapes = Shapes(layers=2, kv_heads=4, head_dim=32)
    b = budget_bytes(shapes, 256)
    assert b == 256 * 2 * 4 * 2 * 32 * 4
    plain = kept_tokens(shapes, b, memory=False, scores=0)
    assert plain == 256
    with_memory = kept_tokens(shapes, b, memory=True, scores=0)
    # M and z per head and layer are (32·32 + 32) floats = 16.5 tokens' worth of one head's K and V.
    assert with_memory == 256 - 17
    assert kept_tokens(shapes, b, memory=False, scores=2) < plain  # scores cost bytes too
    with pytest.raises(ValueError, match="does not hold the memory"):
        kept_tokens(shapes, 1000, memory=True)
