"""Mission C's safety basis: the measures against hand-computed principal angles, the subspace helpers
against rank and orthogonality, the update against a numpy re-derivation, L = 0 against the bare model,
the dual step's direction, the knob's recurrences, and the re-orthogonalisation against its ablation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bem.core.models import build_tiny_llama, tiny_llama_config
from bem.missions.mission_c.basis import (
    DOMAIN_LEVELS,
    Knob,
    SafetyOverlay,
    attach_overlays,
    complement_basis,
    interference_ratio,
    lagrange_step,
    lagrangian_loss,
    largest_principal_cosine,
    orth_penalty,
    orthogonality_preservation,
    orthonormality_error,
    skill_subspace,
    violation_surrogate,
)

torch.set_num_threads(1)
F64 = torch.float64


def e(d: int, *idx: int) -> Tensor:
    """The standard basis vectors e_i (0-based) of R^d as columns."""
    return torch.eye(d, dtype=F64)[:, list(idx)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_rotation(d: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return q


# --- 1. OP and the largest principal cosine ---------------------------------------------------------


def test_op_is_zero_when_q_equals_s_and_one_when_orthogonal() -> None:
    s = e(4, 0, 1)
    assert orthogonality_preservation(s, s) == pytest.approx(0.0, abs=1e-12)
    assert largest_principal_cosine(s, s) == pytest.approx(1.0, abs=1e-12)
    q = e(4, 2, 3)
    assert orthogonality_preservation(q, s) == pytest.approx(1.0, abs=1e-12)
    assert largest_principal_cosine(q, s) == pytest.approx(0.0, abs=1e-12)


def test_op_at_45_degrees_in_2d_and_3d() -> None:
    # 2-D: the angle between e1 and (e1 + e2)/√2 is 45°, so cos² = 1/2.
    s = e(2, 0)
    q = (e(2, 0) + e(2, 1)) / math.sqrt(2)
    assert orthogonality_preservation(q, s) == pytest.approx(0.5, abs=1e-12)
    assert largest_principal_cosine(q, s) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # 3-D: (e1 + e3)/√2 against the plane span(e1, e2): its projection is e1/√2, so cos² = 1/2; the
    # denominator is min(1, 2) = 1.
    q3 = (e(3, 0) + e(3, 2)) / math.sqrt(2)
    assert orthogonality_preservation(q3, e(3, 0, 1)) == pytest.approx(0.5, abs=1e-12)


def test_op_at_30_degrees_with_a_second_orthogonal_column() -> None:
    # Columns: cos30·e1 + sin30·e2 (cos² = 3/4 against e1) and e4 (cos² = 0); S = span(e1, e3).
    # ‖QᵀS‖_F² = 3/4, min(r_s, r_k) = 2, so OP = 1 − 3/8.
    t = math.radians(30)
    q = torch.cat([math.cos(t) * e(4, 0) + math.sin(t) * e(4, 1), e(4, 3)], dim=1)
    s = e(4, 0, 2)
    assert orthogonality_preservation(q, s) == pytest.approx(1 - 0.75 / 2, abs=1e-12)
    assert largest_principal_cosine(q, s) == pytest.approx(math.cos(t), abs=1e-12)


def test_op_divides_by_the_smaller_rank() -> None:
    # Q = e1 inside a rank-3 S: one principal angle, cos² = 1, so OP = 0 (dividing by r_k = 3 would give 2/3).
    assert orthogonality_preservation(e(4, 0), e(4, 0, 1, 2)) == pytest.approx(0.0, abs=1e-12)
    # Q = span(e1, e2) around S = e1: ‖QᵀS‖² = 1 over min(2, 1) = 1 (dividing by r_s = 2 would give .5).
    assert orthogonality_preservation(e(4, 0, 1), e(4, 0)) == pytest.approx(0.0, abs=1e-12)
    # Q = span(e1, e4) against S = span(e1, e2, e3): 1 over min(2, 3) = 2.
    assert orthogonality_preservation(e(4, 0, 3), e(4, 0, 1, 2)) == pytest.approx(0.5, abs=1e-12)


def test_op_is_a_property_of_the_subspaces() -> None:
    """A change of basis inside Q or S, or one rotation of the whole space, leaves principal angles alone."""
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(8, 3, dtype=F64, generator=g)).Q
    s = torch.linalg.qr(torch.randn(8, 2, dtype=F64, generator=g)).Q
    op = orthogonality_preservation(q, s)
    assert 0.0 < op < 1.0
    rot = random_rotation(8, 4)
    assert orthogonality_preservation(q @ random_rotation(3, 5), s) == pytest.approx(op, abs=1e-12)
    assert orthogonality_preservation(rot @ q, rot @ s) == pytest.approx(op, abs=1e-12)
    # and it equals 1 − ‖QᵀS‖_F² / min(r_s, r_k) for orthonormal inputs
    assert op == pytest.approx(1 - float((q.T @ s).pow(2).sum()) / 2, abs=1e-12)


def test_op_with_an_empty_skill_subspace_is_one() -> None:
    assert orthogonality_preservation(e(4, 0), torch.zeros(4, 0, dtype=F64)) == 1.0
    assert largest_principal_cosine(e(4, 0), torch.zeros(4, 0, dtype=F64)) == 0.0


def test_orthonormality_error_by_hand() -> None:
    assert orthonormality_error(e(5, 0, 2)) == pytest.approx(0.0, abs=1e-15)
    # Columns 2·e1 and e2: QᵀQ − I = diag(3, 0), Frobenius norm 3.
    assert orthonormality_error(torch.cat([2 * e(3, 0), e(3, 1)], dim=1)) == pytest.approx(3.0)
    # Columns e1 and e1: QᵀQ − I = [[0, 1], [1, 0]], norm √2.
    assert orthonormality_error(e(3, 0, 0)) == pytest.approx(math.sqrt(2))


# --- 2. Interference ------------------------------------------------------------------------------------


def test_interference_of_updates_inside_and_outside_s() -> None:
    g = torch.Generator().manual_seed(0)
    s = e(4, 0, 1)
    x = torch.randn(50, 6, dtype=F64, generator=g)
    inside = s @ torch.randn(2, 6, dtype=F64, generator=g)  # every output in span(e1, e2)
    outside = e(4, 2, 3) @ torch.randn(2, 6, dtype=F64, generator=g)
    assert interference_ratio(s, inside, x) == pytest.approx(1.0, abs=1e-12)
    assert interference_ratio(s, outside, x) == pytest.approx(0.0, abs=1e-12)


def test_interference_of_a_known_mixture() -> None:
    s = e(4, 0, 1)
    # ΔW = e1·v1ᵀ + e3·v2ᵀ with v1 = (1, 0), v2 = (0, 2): x = (1, 0) gives e1, x = (0, 1) gives 2·e3.
    # E‖P_S ΔW x‖² = (1 + 0)/2, E‖ΔW x‖² = (1 + 4)/2, so I = 1/5.
    dw = e(4, 0) @ torch.tensor([[1.0, 0.0]], dtype=F64) + e(4, 2) @ torch.tensor([[0.0, 2.0]], dtype=F64)
    x = torch.eye(2, dtype=F64)
    assert interference_ratio(s, dw, x) == pytest.approx(0.2, abs=1e-12)
    # The same rows given as per-token updates, and a fixed direction u = e1 + 2·e3: ‖P_S u‖²/‖u‖² = 1/5.
    assert interference_ratio(s, x @ dw.T) == pytest.approx(0.2, abs=1e-12)
    u = (e(4, 0) + 2 * e(4, 2)).T
    assert interference_ratio(s, u.expand(7, 4) * torch.arange(1, 8, dtype=F64)[:, None]) == pytest.approx(
        0.2
    )


def test_interference_is_functional_not_weight_space() -> None:
    """ΔW's column space touches S, but real activations that miss the S-writing row give 0."""
    s = e(4, 0, 1)
    dw = e(4, 0) @ torch.tensor([[1.0, 0.0]], dtype=F64) + e(4, 2) @ torch.tensor([[0.0, 2.0]], dtype=F64)
    x = torch.tensor([[0.0, 1.0], [0.0, -3.0]], dtype=F64)
    assert interference_ratio(s, dw, x) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(interference_ratio(s, torch.zeros(3, 4, dtype=F64)))


# --- 3. complement_basis -----------------------------------------------------------------------------


def test_complement_basis_is_orthonormal_and_orthogonal_to_s() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(10, 4, dtype=F64, generator=g)
    for r in (1, 3, 6):  # 6 = d − rank(S), the whole complement
        q = complement_basis(s, 10, r, torch.Generator().manual_seed(r))
        assert q.shape == (10, r) and q.dtype == F64
        assert orthonormality_error(q) < 1e-10
        assert orthogonality_preservation(q, s) >= 1 - 1e-10
        assert float((q.T @ s).abs().max()) < 1e-12
    a = complement_basis(s, 10, 3, torch.Generator().manual_seed(9))
    b = complement_basis(s, 10, 3, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_complement_basis_raises_when_there_is_no_room() -> None:
    s = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"r=7.*d=10.*rank\(S\)=4.*6"):
        complement_basis(s, 10, 7)
    # Repeated columns are one direction: rank(S) = 1 leaves room for 9.
    u = s[:, :1]
    assert complement_basis(torch.cat([u, u, 2 * u], dim=1), 10, 9).shape == (10, 9)
    with pytest.raises(ValueError, match=r"rank\(S\)=1"):
        complement_basis(torch.cat([u, u, 2 * u], dim=1), 10, 10)


# --- 4. skill_subspace ---------------------------------------------------------------------------------


def test_skill_subspace_rank_ignores_dependent_columns() -> None:
    g = torch.Generator().manual_seed(4)
    u1 = torch.randn(8, 3, dtype=F64, generator=g)
    u2 = torch.randn(8, 2, dtype=F64, generator=g)
    mix = torch.randn(3, 4, dtype=F64, generator=g)
    assert skill_subspace([u1, u1]).shape == (8, 3)
    assert skill_subspace([u1, torch.zeros(8, 2, dtype=F64)]).shape == (8, 3)
    assert skill_subspace([u1, u1 @ mix]).shape == (8, 3)
    assert skill_subspace([u1, u2]).shape == (8, 5)
    assert skill_subspace([torch.zeros(8, 3, dtype=F64)]).shape == (8, 0)
    # A small but genuine direction is still a direction (the tolerance is relative, near eps).
    assert skill_subspace([u1, 1e-4 * u2[:, :1]]).shape == (8, 4)
    # float32 rounding of a duplicated column does not count as a new direction either.
    assert skill_subspace([u1.float(), u1.float(), (u1 @ mix).float()]).shape == (8, 3)


def test_float32_rounding_does_not_inflate_rank_in_the_measures_or_the_overlay() -> None:
    """S given in float32 with dependent columns has rank 2; measured in float64 with a float64 tolerance,
    the rounding would look like two more directions and change OP's denominator."""
    g = torch.Generator().manual_seed(6)
    u = torch.linalg.qr(torch.randn(6, 2, dtype=F64, generator=g)).Q
    s32 = torch.cat([u, u @ torch.randn(2, 2, dtype=F64, generator=g)], dim=1).float()
    s32 = torch.cat([s32, s32 @ torch.randn(4, 3, generator=g)], dim=1)
    q = torch.cat([u, complement_basis(u, 6, 1, g)], dim=1)  # rank 3, holding all of span(u)
    # ‖QᵀS‖_F² = 2 (both principal directions of S lie in Q), over min(3, 2) = 2
    assert orthogonality_preservation(q, s32) == pytest.approx(0.0, abs=1e-5)
    assert SafetyOverlay(s32, 4).S.shape == (6, 2)


def test_skill_subspace_is_an_orthonormal_basis_of_the_union() -> None:
    g = torch.Generator().manual_seed(5)
    u1 = torch.randn(8, 3, dtype=F64, generator=g)
    u2 = torch.randn(8, 2, dtype=F64, generator=g)
    s = skill_subspace([u1, u2, u1 + u2[:, :1]])
    assert orthonormality_error(s) < 1e-12
    for u in (u1, u2):  # each input column is reproduced by its projection onto S
        torch.testing.assert_close(s @ (s.T @ u), u, atol=1e-10, rtol=0)


# --- 5. L = 0 leaves a real model bit-identical ------------------------------------------------------------


def overlays_for(d: int, layers: int, r_s: int = 4, r_k: int = 4) -> dict[int, SafetyOverlay]:
    """One overlay per layer, each ⟂ the span of a random U_O and U_down of rank r_k."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for i in range(layers):
        u_o, u_down = torch.randn(d, r_k, generator=g), torch.randn(d, r_k, generator=g)
        ov = SafetyOverlay(skill_subspace([u_o, u_down]), r_s, generator=g)
        with torch.no_grad():
            ov.w.fill_(2.0)  # w = .1 leaves the tanh near its .1 floor; a larger w makes the update varied
        out[i] = ov
    return out


def test_level_zero_gives_the_base_model_logits_exactly() -> None:
    model = build_tiny_llama(tiny_llama_config(), seed=0)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        overlays = overlays_for(model.config.hidden_size, model.config.num_hidden_layers)
        with attach_overlays(model, overlays) as handle:
            with handle.overlay_inputs(c=0.0, level=0.0):
                assert torch.equal(model(ids).logits, base)
            with handle.overlay_inputs(c=torch.zeros(2, 1), level=torch.zeros(2, 12)):
                assert torch.equal(model(ids).logits, base)
            knob = Knob(kappa=0.0)
            level = knob.step(c_min=0.0, adj=0.2, domain="sensitive")
            with handle.overlay_inputs(c=0.0, level=level):
                assert torch.equal(model(ids).logits, base)
            # The overlay is really in the forward: a positive level does move the logits.
            with handle.overlay_inputs(c=0.0, level=Knob(kappa=1.0).step(c_min=0.0)):
                pushed = model(ids).logits
            assert not torch.allclose(pushed, base, atol=1e-4)
            # Level 0 on the first sequence only: that row stays bit-identical, the other moves.
            with handle.overlay_inputs(c=0.0, level=torch.tensor([[0.0], [1.0]])):
                mixed = model(ids).logits
            assert torch.equal(mixed[0], base[0]) and not torch.allclose(mixed[1], base[1], atol=1e-4)
        assert torch.equal(model(ids).logits, base)  # hooks gone


def test_attach_requires_inputs_and_keeps_the_models_parameters() -> None:
    model = build_tiny_llama(tiny_llama_config(), seed=0)
    names = [n for n, _ in model.named_parameters()]
    handle = attach_overlays(model, overlays_for(model.config.hidden_size, 1))
    assert [n for n, _ in model.named_parameters()] == names
    assert {id(p) for p in handle.parameters()} == {id(p) for p in handle.overlays[0].parameters()}
    with pytest.raises(RuntimeError, match="overlay_inputs"):
        model(torch.ones(1, 4, dtype=torch.long))
    handle.remove()
    with pytest.raises(ValueError, match="out of range"):
        attach_overlays(model, {5: handle.overlays[0]})


class TupleLayer(nn.Module):
    """A decoder layer in the older transformers style: (hidden_states, extras)."""

    def forward(self, h: Tensor) -> tuple[Tensor, str]:
        return h * 1.0, "attn"


class TupleStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = TupleLayer()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([self.layer])

    def forward(self, h: Tensor) -> tuple[Tensor, str]:
        return self.layer(h)


def test_tuple_outputs_get_the_update_on_their_first_element() -> None:
    stack = TupleStack()
    ov = overlays_for(6, 1, r_s=2, r_k=2)[0]
    h = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(0))
    with attach_overlays(stack, {0: ov}) as handle, handle.overlay_inputs(c=0.3, level=0.8), torch.no_grad():
        out, extra = stack(h)
        expected = ov(h, 0.3, 0.8)
    assert extra == "attn"
    assert torch.equal(out, expected) and not torch.equal(out, h)


# --- 6. The dual step --------------------------------------------------------------------------------------


def test_lambda_moves_with_the_violation() -> None:
    assert lagrange_step(1.0, 0.2, 0.05, 0.1) > 1.0
    assert lagrange_step(1.0, 0.0, 0.05, 0.1) < 1.0
    assert lagrange_step(0.7, 0.05, 0.05, 0.1) == 0.7
    # ln λ' = ln 2 + .1·2·(.3 − .05)
    assert lagrange_step(2.0, 0.3, 0.05, 0.1) == pytest.approx(2.0 * math.exp(0.05))


def test_lambda_is_clamped() -> None:
    assert lagrange_step(50.0, 1.0, 0.0, 10.0) == 100.0
    assert lagrange_step(2e-3, 0.0, 1.0, 1000.0) == pytest.approx(1e-3)
    for lam in (1e-3, 0.1, 1.0, 100.0):
        for v in (0.0, 0.05, 1.0):
            assert 1e-3 - 1e-15 <= lagrange_step(lam, v, 0.05, 1e3) <= 100.0
    with pytest.raises(ValueError):
        lagrange_step(0.0, 0.2, 0.05, 0.1)


def test_violation_surrogate_and_the_lagrangian_by_hand() -> None:
    assert float(violation_surrogate(torch.tensor([0.5]))) == pytest.approx(0.5)
    assert float(violation_surrogate(torch.tensor([0.0, 0.0]))) == pytest.approx(sigmoid(10.0))
    assert float(violation_surrogate(torch.tensor([0.2, 0.9]))) == pytest.approx(
        (sigmoid(6.0) + sigmoid(-8.0)) / 2
    )
    got = lagrangian_loss(torch.tensor(1.0), torch.tensor(0.3), 2.0, torch.tensor(0.4))
    assert float(got) == pytest.approx(1.0 + 2.0 * 0.25 + 0.2)


def test_orth_penalty_by_hand() -> None:
    s = e(3, 0)
    assert float(orth_penalty(e(3, 0, 1), e(3, 0, 1))) == pytest.approx(2.0)  # ‖SᵀS‖² = r, QᵀQ = I
    assert float(orth_penalty(2 * e(3, 2), s)) == pytest.approx(9.0)  # 0 + (4 − 1)²
    assert float(orth_penalty((e(3, 0) + e(3, 1)) / math.sqrt(2), s)) == pytest.approx(0.5)


# --- 7. Re-orthogonalisation keeps OP through training; its ablation does not ---------------------------


def train_toward_s(
    reorthonormalise: bool, steps: int = 50, orthogonal: bool = True
) -> tuple[float, SafetyOverlay]:
    """Fit targets that lie inside S: unconstrained, the gradient rotates Q into S."""
    g = torch.Generator().manual_seed(0)
    d, r_k = 16, 4
    s = skill_subspace([torch.randn(d, r_k, generator=g)])
    ov = SafetyOverlay(s, 4, generator=g, orthogonal=orthogonal)
    opt = torch.optim.Adam(ov.parameters(), lr=0.1)
    h = torch.randn(8, 5, d, generator=g)
    target = h + torch.randn(8, 5, r_k, generator=g) @ s.T
    worst = 1.0
    for _ in range(steps):
        loss = (ov(h, 0.0, 1.0) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if reorthonormalise:
            ov.reorthonormalise()
        worst = min(worst, orthogonality_preservation(ov.Q, ov.S))
    return worst, ov


def test_reorthonormalise_keeps_op_through_training() -> None:
    worst, ov = train_toward_s(reorthonormalise=True)
    assert worst >= 0.95
    assert orthonormality_error(ov.Q) < 1e-5
    worst_off, ov_off = train_toward_s(reorthonormalise=False)
    assert worst_off < 0.95  # the same loop without the projection drifts into S
    assert orthonormality_error(ov_off.Q) > 1e-2


def test_the_ablation_without_orthogonality_keeps_q_orthonormal_but_lets_it_into_s() -> None:
    worst, ov = train_toward_s(reorthonormalise=True, orthogonal=False)
    assert worst < 0.95  # nothing keeps Q out of S
    assert orthonormality_error(ov.Q) < 1e-5  # but its columns stay orthonormal
    assert float(ov.orth_penalty()) < 1e-8  # and the penalty no longer counts ‖QᵀS‖


def test_reorthonormalise_is_idempotent_and_repairs_a_column_inside_s() -> None:
    ov = overlays_for(12, 1, r_s=3)[0]
    before = ov.Q.detach().clone()
    ov.reorthonormalise()
    torch.testing.assert_close(ov.Q.detach(), before, atol=1e-6, rtol=0)  # the sign fix: no flipped columns
    with torch.no_grad():
        ov.Q[:, 0] = ov.S[:, 0]  # a column entirely inside S has no component left after projection
    ov.reorthonormalise()
    assert orthonormality_error(ov.Q) < 1e-5
    assert largest_principal_cosine(ov.Q, ov.S) < 1e-5
    torch.testing.assert_close(ov.Q.detach()[:, 1:], before[:, 1:], atol=1e-5, rtol=0)


def test_a_fresh_overlay_starts_as_specified() -> None:
    s = skill_subspace([torch.randn(10, 3, generator=torch.Generator().manual_seed(2))])
    ov = SafetyOverlay(s, 5)
    assert ov.Q.shape == (10, 5) and ov.S.shape == (10, 3)
    assert orthonormality_error(ov.Q) < 1e-5 and orthogonality_preservation(ov.Q, s) >= 1 - 1e-10
    assert torch.equal(ov.w.detach(), torch.full((5,), 0.1)) and torch.equal(ov.s.detach(), torch.ones(5))
    assert float(ov.temperature.detach()) == pytest.approx(1.0)
    assert {n for n, _ in ov.named_parameters()} == {"Q", "w", "s", "log_T", "log_gain"}
    assert float(ov.log_gain.detach()) == 0.0  # g = 1: section 8's update exactly
    with pytest.raises(ValueError, match="r=8"):
        SafetyOverlay(s, 8)


# --- 8. The update formula against numpy -------------------------------------------------------------------


def hand_update(
    h: np.ndarray, q: np.ndarray, w: np.ndarray, s: np.ndarray, t: float, c: np.ndarray, lvl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The update formula in numpy: a = clip(tanh((hQ ⊙ w ⊙ s)/T), .1, 1)·σ(5(1 − c))·L, h' = h + a·Qᵀ."""
    z = (h @ q) * w * s / t
    a = np.clip(np.tanh(z), 0.1, 1.0) * (1 / (1 + np.exp(-5 * (1 - c))) * lvl)[..., None]
    return a, h + a @ q.T


def hand_overlay() -> SafetyOverlay:
    # S = e1 in R^3; Q = a 30° rotation inside span(e2, e3); w, s, T off their defaults.
    ov = SafetyOverlay(e(3, 0), 2, dtype=F64)
    th = math.radians(30)
    with torch.no_grad():
        ov.Q.copy_(
            torch.tensor([[0, 0], [math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
        )
        ov.w.copy_(torch.tensor([0.5, 2.0], dtype=F64))
        ov.s.copy_(torch.tensor([1.0, 0.5], dtype=F64))
        ov.log_T.fill_(math.log(0.5))
    return ov


def test_update_matches_a_hand_computation() -> None:
    ov = hand_overlay()
    h = np.array([[[1.0, 0.2, -0.3], [0.0, -1.0, -3.0], [5.0, 30.0, 40.0], [0.3, 0.1, 0.05]]])
    c = np.array([[0.0, 0.4, 0.9, 1.0]])
    lvl = np.array([[1.0, 0.5, 0.25, 0.8]])
    q, w, s = ov.Q.detach().numpy(), np.array([0.5, 2.0]), np.array([1.0, 0.5])
    a, expected = hand_update(h, q, w, s, 0.5, c, lvl)
    with torch.no_grad():
        got = ov(torch.tensor(h), torch.tensor(c), torch.tensor(lvl))
        got_a = ov.coefficients(torch.tensor(h), torch.tensor(c), torch.tensor(lvl))
    np.testing.assert_allclose(got_a.numpy(), a, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    # the clamps: token 1 projects negatively on both columns (a = .1·gate·L), token 2 saturates (1·gate·L)
    gate = [sigmoid(5 * (1 - ci)) for ci in c[0]]
    np.testing.assert_allclose(got_a[0, 1].numpy(), [0.1 * gate[1] * 0.5] * 2, atol=1e-12)
    np.testing.assert_allclose(got_a[0, 2].numpy(), [1.0 * gate[2] * 0.25] * 2, atol=1e-12)


def test_a_safe_chunk_gets_a_smaller_push() -> None:
    ov = hand_overlay()
    h = torch.randn(2, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unsafe = (ov(h, 0.0, 1.0) - h).norm()
        safe = (ov(h, 1.0, 1.0) - h).norm()
        half = (ov(h, 0.0, 0.5) - h).norm()
    assert float(safe) < float(unsafe)
    assert float(safe / unsafe) == pytest.approx(0.5 / sigmoid(5.0))  # σ(0)/σ(5)
    assert float(half / unsafe) == pytest.approx(0.5)  # linear in L
    assert ov(h, 0.3, 0.0) is h
    with torch.no_grad():  # the learned gain scales the whole push
        ov.log_gain.fill_(math.log(3.0))
        tripled = (ov(h, 0.0, 1.0) - h).norm()
    assert float(tripled / unsafe) == pytest.approx(3.0)


def test_tokens_at_level_zero_keep_their_exact_bits() -> None:
    """Even −0.0 stays −0.0 (h + 0.0 would make it +0.0, which torch.equal cannot see)."""
    ov = hand_overlay()
    h = torch.tensor([[[-0.0, 1.0, -0.0], [-0.0, 1.0, -0.0]]], dtype=F64)
    with torch.no_grad():
        out = ov(h, 0.0, torch.tensor([[0.0, 1.0]], dtype=F64))
    assert torch.equal(torch.signbit(out[0, 0]), torch.signbit(h[0, 0]))
    assert not torch.equal(out[0, 1], h[0, 1])


# --- 9. The knob -------------------------------------------------------------------------------------------


def test_kappa_zero_is_off() -> None:
    knob = Knob(kappa=0.0)
    for c_min, adj, domain in [(0.0, 0.2, "sensitive"), (0.1, -0.2, None), (1.0, 0.0, "medical")] * 5:
        assert knob.step(c_min, adj, domain) == 0.0


def test_level_stays_in_the_unit_interval() -> None:
    rng = np.random.default_rng(0)
    domains: list[str | None] = [None, *DOMAIN_LEVELS]
    for kappa in (0.1, 0.5, 1.0):
        knob = Knob(kappa)
        levels = [
            knob.step(
                float(rng.uniform(0, 1) ** 3),  # cubed: many chunks under .2, so escalation piles up
                float(rng.uniform(-1, 1)),
                domains[int(rng.integers(len(domains)))],
            )
            for _ in range(200)
        ]
        assert all(0.0 <= lv <= 1.0 for lv in levels)
    high = Knob(1.0)
    assert [high.step(0.0, 0.2, "sensitive") for _ in range(30)][-1] == 1.0  # x > 1 is clamped


def test_escalation_grows_on_low_scores_and_decays_otherwise() -> None:
    knob = Knob(kappa=0.5)
    # c_min = 0: e = .1·min(.5·.2/.2, 1) = .05; first chunk, L = x = .5 + .05
    assert knob.step(0.0) == pytest.approx(0.55)
    assert knob.escalation == pytest.approx(0.05)
    # c_min = .1: e = .9·.05 + .1·(.5·.1/.2) = .07; x = .57, L = .9·.55 + .1·.57
    assert knob.step(0.1) == pytest.approx(0.552)
    assert knob.escalation == pytest.approx(0.07)
    # c_min = .5: e = .95·.07; x = .5665, L = .9·.552 + .1·.5665
    assert knob.step(0.5) == pytest.approx(0.55345)
    assert knob.escalation == pytest.approx(0.0665)
    for _ in range(100):
        knob.step(0.9)
    assert knob.escalation == pytest.approx(0.0665 * 0.95**100)
    # exactly at the threshold is not below it: decay (.95), not the .9 blend with a zero push
    k2 = Knob(0.5)
    k2.step(0.0)
    k2.step(0.2)
    assert k2.escalation == pytest.approx(0.95 * 0.05)


def test_ema_on_a_constant_input_converges_to_base() -> None:
    knob = Knob(kappa=0.6)
    assert [knob.step(0.9) for _ in range(5)] == pytest.approx([0.6] * 5)  # starts at x, stays there
    # adj = .2 moves the target to .6 + .04; the gap shrinks by .9 per chunk
    got = [knob.step(0.9, adj=0.2) for _ in range(30)]
    for n, lv in enumerate(got, start=1):
        assert lv == pytest.approx(0.64 - 0.04 * 0.9**n)
    assert Knob(0.6).step(0.9, adj=5.0) == pytest.approx(0.64)  # adj beyond ±.2 is clamped
    medical = Knob(0.6)
    assert [medical.step(0.9, domain="medical") for _ in range(3)] == pytest.approx(
        [0.7 * 0.6 + 0.3 * 0.8] * 3
    )
    knob.reset()
    assert knob.step(0.9) == pytest.approx(0.6)


def test_knob_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        Knob(1.5)
    with pytest.raises(ValueError, match="unknown domain"):
        Knob(0.5).step(0.9, domain="astrology")
    with pytest.raises(ValueError):
        Knob(0.5).step(-0.1)


def test_the_floor_is_the_clamp_on_a_from_below() -> None:
    s = skill_subspace([torch.randn(10, 3, generator=torch.Generator().manual_seed(2))])
    h = torch.zeros(1, 2, 10)  # hQ = 0: tanh is 0, so a is exactly the floor (times the gate and L)
    for floor in (0.0, 0.1, 0.5):
        ov = SafetyOverlay(s, 4, floor=floor)
        with torch.no_grad():
            a = ov.coefficients(h, 0.0, 1.0)
        torch.testing.assert_close(a, torch.full_like(a, floor * float(torch.sigmoid(torch.tensor(5.0)))))
    with pytest.raises(ValueError, match="floor must be in"):
        SafetyOverlay(s, 4, floor=-0.1)
