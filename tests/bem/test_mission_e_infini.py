"""Infini-attention inside a tiny Llama: with the memory mixed out it is the plain model, a segment
reads only what earlier segments wrote, and a closed gate writes nothing through the whole model."""

from __future__ import annotations

import torch

from bem.core.models import build_tiny_llama, tiny_llama_config
from bem.missions.mission_e.infini import attach_memory


def models():  # type: ignore[no-untyped-def]
    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"
    plain = build_tiny_llama(cfg, seed=0).eval()
    infini = build_tiny_llama(cfg, seed=0).eval()
    return plain, infini, attach_memory(infini)


def test_with_the_memory_mixed_out_it_is_the_plain_model() -> None:
    plain, infini, wrappers = models()
    for w in wrappers:
        with torch.no_grad():
            w.memory.beta.fill_(-1e4)  # sigmoid(β) = 0: local attention only
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(infini(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_a_segment_reads_only_what_earlier_segments_wrote() -> None:
    _, infini, wrappers = models()
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, infini.config.vocab_size, (1, 12), generator=gen)
    second = torch.randint(0, infini.config.vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        for w in wrappers:
            w.reset(1)
        a = infini(input_ids=first).logits
        for w in wrappers:
            w.commit()
        written = [w.state for w in wrappers]
        assert all(s is not None and s.z.abs().sum() > 0 for s in written)
        b = infini(input_ids=second).logits
        # The first segment's output did not depend on its own write: the same with nothing written.
        for w in wrappers:
            w.reset(1)
        assert torch.allclose(infini(input_ids=first).logits, a, atol=1e-6)
        # With an empty memory the second segment reads nothing, so its output changes.
        assert not torch.allclose(infini(input_ids=second).logits, b, atol=1e-4)


def test_a_closed_gate_writes_nothing_through_the_model() -> None:
    _, infini, wrappers = models()
    ids = torch.randint(0, infini.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for w in wrappers:
            w.reset(1)
        infini(input_ids=ids)
        for w in wrappers:
            w.commit()
        before = [(w.state.M.clone(), w.state.z.clone()) for w in wrappers if w.state is not None]
        infini(input_ids=ids)
        for w in wrappers:
            w.commit(torch.zeros(1, 10))
        after = [(w.state.M, w.state.z) for w in wrappers if w.state is not None]
    assert all(
        torch.equal(m0, m1) and torch.equal(z0, z1) for (m0, z0), (m1, z1) in zip(before, after, strict=True)
    )
