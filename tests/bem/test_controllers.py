"""Controllers and the chunked forward: causality, the in-graph EMA, cache consistency."""

import pytest
import torch

from bem.core.attach import attach_bems
from bem.core.chunked import chunked_forward
from bem.core.controllers import CODE_MAX_NORM, HierarchicalController, SimpleController, TokenController
from bem.core.routing import expand_to_tokens
from tests.bem.conftest import randomize

CHUNK = 8


@pytest.fixture
def setup(llama):
    att = attach_bems(llama, max_overhead=10.0)
    randomize(att)
    ctrl = HierarchicalController(64, att.total_rank, prefix_len=CHUNK)
    llama.eval()
    ctrl.eval()
    return llama, att, ctrl


def test_chunk_codes_are_constant_inside_windows(setup, ids) -> None:
    model, att, ctrl = setup
    out = chunked_forward(model, att, ctrl, ids, chunk_size=CHUNK, read_layer=1)
    assert out.chunk_codes.shape == (ids.shape[0], 3, att.total_rank)
    tokens = out.token_codes(CHUNK)
    for k in range(3):
        window = tokens[:, k * CHUNK : (k + 1) * CHUNK]
        assert torch.equal(window, window[:, :1].expand_as(window))
    assert not torch.allclose(out.chunk_codes[:, 0], out.chunk_codes[:, 1])  # codes do move between chunks


def test_chunked_pass_equals_one_pass_with_the_same_token_codes(setup, ids) -> None:
    """The KV cache path and a single full forward agree: earlier K/V are valid under the lagged codes."""
    model, att, ctrl = setup
    with torch.no_grad():
        out = chunked_forward(model, att, ctrl, ids, chunk_size=CHUNK, read_layer=1)
        with att.codes(out.token_codes(CHUNK)):
            full = model(ids).logits
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=1e-5)


def test_codes_depend_only_on_earlier_chunks(setup, ids) -> None:
    model, att, ctrl = setup
    changed = ids.clone()
    changed[:, CHUNK + 3] = (changed[:, CHUNK + 3] + 7) % 259  # a token inside chunk 1
    with torch.no_grad():
        a = chunked_forward(model, att, ctrl, ids, chunk_size=CHUNK, read_layer=1).chunk_codes
        b = chunked_forward(model, att, ctrl, changed, chunk_size=CHUNK, read_layer=1).chunk_codes
    assert torch.equal(a[:, :2], b[:, :2])  # chunks 0 and 1 ran before the change was seen
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_gradients_reach_the_controller_through_the_chunk_ema(setup, ids) -> None:
    model, att, ctrl = setup
    ctrl.train()
    out = chunked_forward(model, att, ctrl, ids, chunk_size=CHUNK, read_layer=1)
    # Only the last chunk's code: it sees the prefix code solely through the EMA chain c̃_0 → c̃_1 → c̃_2.
    out.chunk_codes[:, -1].pow(2).sum().backward()
    for part in (ctrl.prefix_mlp, ctrl.chunk_mlp, ctrl.pool):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_ema_follows_its_recurrence() -> None:
    ctrl = HierarchicalController(64, 10, prefix_len=CHUNK, beta=0.5)
    state0 = ctrl.start(torch.randn(2, CHUNK, 64))
    chunk = torch.randn(2, CHUNK, 64)
    state1 = ctrl.step(state0, chunk)
    c1 = ctrl.chunk_mlp(ctrl.chunk_norm(torch.cat([chunk.mean(1), state0.prefix_summary], dim=-1)))
    torch.testing.assert_close(state1.ema, 0.5 * state0.ema + 0.5 * c1)
    assert len(state1.stats) == 2


def test_simple_controller_clamp_gate_and_interpolation() -> None:
    ctrl = SimpleController(16, 6)
    with torch.no_grad():
        ctrl.net[-1][-1].weight.normal_(0, 50)  # huge codes before the clamp
    out = ctrl(torch.randn(5, 16))
    assert (out.code.norm(dim=-1) <= CODE_MAX_NORM + 1e-5).all()
    assert out.gate is not None and ((out.gate > 0) & (out.gate < 1)).all()

    mix = SimpleController(16, 2, interpolation=True)
    w = mix(torch.randn(5, 16)).code
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    assert (w >= 0).all()


def test_orthonormal_mode_starts_at_the_base(llama, ids) -> None:
    with torch.no_grad():
        base = llama(ids).logits
    att = attach_bems(llama, orthonormal=True, max_overhead=10.0)
    ctrl = SimpleController(64, att.total_rank, orthonormal=True)
    feats = torch.randn(ids.shape[0], 64)
    code = ctrl(feats).code
    assert torch.equal(code, torch.zeros_like(code))
    with torch.no_grad(), att.codes(code):
        assert torch.equal(llama(ids).logits, base)


def test_token_controller_is_marked_cache_unsafe() -> None:
    ctrl = TokenController(16, 4)
    out = ctrl(torch.randn(2, 7, 16), torch.randn(2, 16))
    assert out.shape == (2, 7, 4)
    assert TokenController.cache_safe is False and HierarchicalController.cache_safe is True


def test_expand_chunk_codes_handles_partial_last_chunk() -> None:
    codes = torch.arange(6.0).reshape(1, 3, 2)
    tokens = expand_to_tokens(codes, 5, 2)
    assert tokens.shape == (1, 5, 2)
    assert torch.equal(tokens[0, 4], codes[0, 2])


def test_fitted_feature_standardisation_is_frozen_and_applied() -> None:
    ctrl = SimpleController(8, 3).eval()
    feats = torch.randn(50, 8) * 4 + 10
    before = ctrl(feats).code
    ctrl.fit_features(feats)
    torch.testing.assert_close(ctrl.feature_mean, feats.mean(0))
    after = ctrl(feats).code
    assert not torch.allclose(before, after)
    # Statistics are buffers: frozen (no grad) and carried by state_dict into checkpoints.
    assert {"feature_mean", "feature_std"} <= set(ctrl.state_dict())
    assert all(not n.startswith("feature_") for n, _ in ctrl.named_parameters())
    # Equivalent to standardising by hand and using an unfitted controller with the same weights.
    plain = SimpleController(8, 3).eval()
    plain.load_state_dict({**ctrl.state_dict(), "feature_mean": torch.zeros(8), "feature_std": torch.ones(8)})
    torch.testing.assert_close(plain((feats - feats.mean(0)) / feats.std(0)).code, after)


def test_gradients_reach_the_router_through_the_model(setup, ids) -> None:
    """Straight-through chunk gates pick a BEM block per chunk; an LM-style loss on the logits trains
    the router MLP even though the forward value of each gate is exactly one-hot."""
    from bem.core.routing import ChunkStickyRouter

    model, att, _ = setup
    experts, width = 2, att.total_rank // 2
    router = ChunkStickyRouter(64, experts, chunk_size=CHUNK, hysteresis=0.0).train()
    hidden = model.model.embed_tokens(ids)
    out = router(hidden)
    assert torch.equal(out.gates.detach().sum(-1), torch.ones(out.gates.shape[:2]))
    code = out.token_gates(ids.shape[1]).repeat_interleave(width, dim=-1)
    with att.codes(code):
        logits = model(ids).logits
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
