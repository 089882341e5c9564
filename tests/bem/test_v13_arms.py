"""The suite's arms: fitted to parity at any base shape, counted exactly as the built models hold them,
the identity at the start, and knobs set off parity refused with their numbers."""

from __future__ import annotations

import pytest
import torch

from bem.core.token_shift import TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM
from bem.missions.v13 import arms as A
from bem.missions.v13 import mechanisms as M
from bem.missions.v13.parity import ParityError
from bem.missions.v13.recipe import build

TINY = A.Shape(d_model=32, heads=4, d_ff=64, layers=2)


def lm(shape: A.Shape) -> TokenShiftLlamaForCausalLM:
    torch.manual_seed(0)
    config = TokenShiftLlamaConfig(
        vocab_size=97, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        pad_token_id=0, max_position_embeddings=64,
    )  # fmt: skip
    model = TokenShiftLlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("shape", [A.SMOKE, TINY, A.Shape(256, 8, 1024, 4)], ids=["smoke", "tiny", "wider"])
def test_every_arm_fits_parity_at_the_base_shape(shape: A.Shape) -> None:
    for arm in A.ARMS:
        result = A.require(arm, shape, A.fit(arm, shape))
        assert abs(result.parameter_ratio - 1) <= 0.05, arm
        if arm != "MM_prefix":  # held on trainable parameters only (arms.py)
            assert abs(result.flops_ratio - 1) <= 0.05, arm


@pytest.mark.parametrize("arm", A.ARMS)
def test_the_built_model_adds_exactly_what_parity_counts(arm: str) -> None:
    knobs = A.fit(arm, TINY)
    model = build(arm, lm(TINY), TINY, knobs)
    added = sum(p.numel() for p in model.adapter_parameters())
    assert added == A.cost(arm, TINY, knobs).parameters
    # They are all that trains: every other weight of the LM (the sites sit inside it) is frozen.
    added_ids = {id(p) for p in model.adapter_parameters()}
    assert all(p.requires_grad for p in model.adapter_parameters())
    assert not any(p.requires_grad for p in model.lm.parameters() if id(p) not in added_ids)
    if arm in A.MM_ARMS:
        assert sum(p.numel() for p in model.encoder_parameters()) == A.encoder(knobs.encoder).parameters


@pytest.mark.parametrize("arm", A.TEXT_ARMS)
def test_an_arm_starts_as_the_base_and_then_changes_it(arm: str) -> None:
    model = build(arm, lm(TINY), TINY, A.fit(arm, TINY)).eval()  # eval: PT2's hard top-k, no noise
    ids = torch.randint(1, 97, (3, 12))
    mask, prompt = torch.ones_like(ids), torch.ones_like(ids)
    prompt[:, 6:] = 0
    with model.off():
        base = model(ids, mask)
    model.prepare(ids, mask, prompt)
    assert torch.allclose(model(ids, mask), base, atol=1e-5)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.prepare(ids, mask, prompt)
    changed = model(ids, mask)
    assert not torch.allclose(changed, base, atol=1e-3)
    with model.off():  # off is the base again, and leaves the states as they were
        assert torch.allclose(model(ids, mask), base, atol=1e-5)
    assert torch.allclose(model(ids, mask), changed)


def test_v1_keeps_exactly_k_ranks_per_example_at_inference() -> None:
    model = build("V1", lm(TINY), TINY, A.fit("V1", TINY)).eval()
    dyn = [s.mech for s in model.sites if isinstance(s.mech, M.DynamicRank)]
    assert dyn
    logits = torch.randn(5, A.DYN_RANK)
    assert (dyn[0].mask(logits).sum(-1) == A.DYN_KEEP).all()


def test_v4_film_gives_the_identity_on_a_row_whose_modulation_is_not_finite() -> None:
    film = M.ResidualFiLM(8, 4)
    h = torch.randn(2, 5, 8)
    gamma, beta = film.film(h)
    gamma = gamma.clone()
    gamma[1, 0] = float("nan")
    out = film.apply_film(h, gamma, beta)
    assert torch.equal(out[1], h[1])
    assert torch.isfinite(out).all()


def test_knobs_set_off_parity_are_refused_with_their_ratios() -> None:
    params = {"variants": {"V3": {"kron_ranks": [8, 8]}}}
    with pytest.raises(
        ParityError, match=r"V3 is off parity .* parameters \d\.\d{3}×, per-token FLOPs \d\.\d{3}×"
    ):
        A.check(params)
    assert set(A.check({})) == set(A.ARMS)  # fitted knobs pass
    assert set(A.check({"arm": "V1"})) == {"V1"}
    with pytest.raises(ValueError, match="unknown knobs"):
        A.check({"variants": {"V1": {"rank": 4}}})
    with pytest.raises(ValueError, match="unknown arms"):
        A.check({"variants": {"V9": {}}})


def test_a_six_percent_overshoot_is_refused() -> None:
    # Among V4's candidate knobs, one whose parameters land 6% over the anchor's, FLOPs within band.
    over = next(
        k for k in A._candidates("V4", A.SMOKE, A.Knobs())
        if abs((r := A.ratios("V4", A.SMOKE, k)).parameter_ratio - 1.06) < 0.004
        and abs(r.flops_ratio - 1) <= 0.05
    )  # fmt: skip
    with pytest.raises(ParityError, match=r"parameters 1\.06\d×"):
        A.require("V4", A.SMOKE, over)


@pytest.mark.parametrize("arm", A.TEXT_ARMS)
def test_an_arm_is_causal(arm: str) -> None:
    """Logits before position 8 do not move when the tokens from 8 on change (V2's own attention
    implementation once ran with no mask at all)."""
    model = build(arm, lm(TINY), TINY, A.fit(arm, TINY)).eval()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(0.1 * torch.randn_like(p))
    a = torch.randint(1, 97, (2, 14))
    b = a.clone()
    b[:, 8:] = torch.randint(1, 97, (2, 6))
    mask, prompt = torch.ones_like(a), torch.ones_like(a)
    prompt[:, 6:] = 0
    out = []
    for ids in (a, b):
        model.prepare(ids, mask, prompt)
        out.append(model(ids, mask)[:, :8])
    assert torch.allclose(out[0], out[1], atol=1e-5)
