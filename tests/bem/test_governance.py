"""Governance identities, checked against the dense ΔW = s·U·diag(c)·Vᵀ in float64."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bem.core.governance import (
    Blocks,
    default_tau,
    delta_w_fro,
    delta_w_singular_values,
    max_cross_block,
    orthogonalize_blocks,
    sigma_clamp,
    trust_region,
    trust_region_general,
)

F64 = torch.float64
BLOCKS = Blocks.from_widths([8, 8, 4])
R = BLOCKS.rank


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # These matrices are tiny: a multi-threaded LAPACK call spends ~100× longer handing work to its thread
    # pool than computing, which on a busy CI box dominated the whole file's run time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense(U: torch.Tensor, V: torch.Tensor, c: torch.Tensor, s: float) -> torch.Tensor:
    return s * U @ torch.diag(c) @ V.T


def orthonormal(d: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, dtype=F64)).Q


def projector(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto span(M), independent of the basis chosen for the span."""
    return M @ torch.linalg.pinv(M)


# -- Blocks --


def test_blocks_from_widths_is_contiguous() -> None:
    assert BLOCKS.ranges == ((0, 8), (8, 16), (16, 20))
    assert BLOCKS.rank == 20 and BLOCKS.widths == (8, 8, 4) and len(BLOCKS) == 3


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([(0, 8), (8, 11)], "at least 4"),
        ([(0, 8), (6, 14)], "overlaps"),
        ([(0, 8), (10, 14)], r"\[8, 10\) belong to no block"),
        ([(2, 8)], r"\[0, 2\) belong to no block"),
        ([], "at least one"),
    ],
)
def test_blocks_reject_bad_layouts(ranges: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Blocks(tuple(ranges))


def test_basis_must_match_the_layout() -> None:
    with pytest.raises(ValueError, match="does not match"):
        orthogonalize_blocks(torch.randn(32, R + 1), BLOCKS)


# -- orthogonalisation --


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_orthogonalize_gives_orthonormal_orthogonal_blocks(dtype: torch.dtype) -> None:
    M = torch.randn(48, R, dtype=dtype)
    assert max_cross_block(M, BLOCKS) > 0.1
    Q = orthogonalize_blocks(M, BLOCKS)
    assert Q.dtype == dtype
    assert max_cross_block(Q, BLOCKS) <= 1e-6
    assert torch.allclose(Q.T @ Q, torch.eye(R, dtype=dtype), atol=1e-5)


def test_orthogonalize_handles_a_block_inside_the_span_of_earlier_ones() -> None:
    # Block 2 lies entirely in span(block 1): a plain projection leaves ~0 and QR of it is garbage.
    M = torch.randn(24, R, dtype=F64)
    M[:, 8:16] = M[:, :8] @ torch.randn(8, 8, dtype=F64)
    Q = orthogonalize_blocks(M, BLOCKS)
    assert max_cross_block(Q, BLOCKS) <= 1e-6
    assert torch.allclose(Q.T @ Q, torch.eye(R, dtype=F64), atol=1e-10)


def test_priority_order_first_block_is_only_normalised() -> None:
    M = torch.randn(32, R, dtype=F64)
    Q = orthogonalize_blocks(M, BLOCKS)
    assert torch.allclose(projector(Q[:, :8]), projector(M[:, :8]), atol=1e-10)
    # and each later block stays inside the span of itself and the blocks before it
    assert torch.allclose(projector(M[:, :16]) @ Q[:, 8:16], Q[:, 8:16], atol=1e-10)
    assert not torch.allclose(projector(Q[:, 8:16]), projector(M[:, 8:16]), atol=1e-3)


def test_priority_follows_listed_order_not_column_order() -> None:
    M = torch.randn(32, 16, dtype=F64)
    Q = orthogonalize_blocks(M, Blocks(((8, 16), (0, 8))))
    assert torch.allclose(projector(Q[:, 8:]), projector(M[:, 8:]), atol=1e-10)
    assert not torch.allclose(projector(Q[:, :8]), projector(M[:, :8]), atol=1e-3)


def test_orthogonalize_matches_the_spec_recipe() -> None:
    """Q = qr([M_1…M_{i−1}]); M_i ← M_i − QQᵀM_i; M_i ← qr(M_i) with diag(R) >= 0."""
    M = torch.randn(40, R, dtype=F64)
    expected = []
    for start, stop in BLOCKS:
        block = M[:, start:stop]
        if expected:
            q = torch.linalg.qr(torch.cat(expected, dim=1)).Q
            block = block - q @ (q.T @ block)
        q_i, r_i = torch.linalg.qr(block)
        expected.append(q_i * torch.sign(torch.diagonal(r_i)))
    assert torch.allclose(orthogonalize_blocks(M, BLOCKS), torch.cat(expected, dim=1), atol=1e-10)


def test_orthogonalize_is_deterministic_and_idempotent() -> None:
    Q = orthogonalize_blocks(torch.randn(32, R, dtype=F64), BLOCKS)
    assert torch.allclose(orthogonalize_blocks(Q, BLOCKS), Q, atol=1e-12)


def test_max_cross_block_ignores_within_block_products() -> None:
    M = torch.zeros(8, 8, dtype=F64)
    M[0, :4] = 1.0  # columns of block 0 overlap each other, not block 1
    M[1, 4:] = 1.0
    assert max_cross_block(M, Blocks.from_widths([4, 4])) == 0.0
    M[1, 0] = 0.5
    assert max_cross_block(M, Blocks.from_widths([4, 4])) == pytest.approx(0.5)


# -- orthonormal forms --


def test_orthonormal_basis_makes_codes_singular_values() -> None:
    U, V = orthonormal(24, 8), orthonormal(16, 8)
    c, s = torch.randn(8, dtype=F64), 2.0
    dw = dense(U, V, c, s)
    assert torch.linalg.matrix_norm(dw) == pytest.approx(float(s * c.norm()), rel=1e-12)
    expected = torch.sort(s * c.abs(), descending=True).values
    assert torch.allclose(torch.linalg.svdvals(dw)[:8], expected, atol=1e-12)


def test_sigma_clamp_bounds_the_largest_singular_value() -> None:
    U, V = orthonormal(24, 8), orthonormal(16, 8)
    c, s, sigma_max = torch.randn(8, dtype=F64) * 3, 2.0, 1.0
    assert torch.linalg.svdvals(dense(U, V, c, s))[0] > sigma_max
    clamped = sigma_clamp(c, sigma_max, s)
    assert torch.linalg.svdvals(dense(U, V, clamped, s))[0] <= sigma_max + 1e-6
    small = c.abs() * s <= sigma_max
    assert torch.equal(clamped[small], c[small])  # values already inside are untouched
    assert torch.equal(torch.sign(clamped), torch.sign(c))


def test_trust_region_bounds_frobenius_norm_per_row() -> None:
    U, V = orthonormal(24, 8), orthonormal(16, 8)
    s, tau = 2.0, 1.5
    c = torch.randn(3, 8, dtype=F64)
    c[0] *= 10  # outside
    c[1] *= 0.01  # inside
    out = trust_region(c, tau, s)
    for row in range(3):
        assert torch.linalg.matrix_norm(dense(U, V, out[row], s)) <= tau + 1e-6
    assert torch.equal(out[1], c[1])
    assert torch.linalg.matrix_norm(dense(U, V, out[0], s)) == pytest.approx(tau, rel=1e-9)
    assert torch.allclose(out[0] / out[0].norm(), c[0] / c[0].norm())  # direction kept
    assert torch.equal(trust_region(torch.zeros(8), tau, s), torch.zeros(8))


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(4, 24),
    d_in=st.integers(4, 24),
    rank=st.integers(1, 4),
    scale=st.floats(1e-3, 1e3),
    s=st.floats(0.1, 8.0),
    tau=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_trust_regions_hold_for_random_shapes_and_codes(
    d_out: int, d_in: int, rank: int, scale: float, s: float, tau: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(rank, dtype=F64, generator=g) * scale
    U, V = (torch.linalg.qr(torch.randn(d, rank, dtype=F64, generator=g)).Q for d in (d_out, d_in))
    fro = torch.linalg.matrix_norm(dense(U, V, trust_region(c, tau, s), s))
    assert fro <= tau * (1 + 1e-9)
    if s * c.norm() <= tau:
        assert torch.equal(trust_region(c, tau, s), c)
    # The general form must give the same guarantee for bases that are not orthonormal.
    Ug = torch.randn(d_out, rank, dtype=F64, generator=g)
    Vg = torch.randn(d_in, rank, dtype=F64, generator=g)
    fro_g = torch.linalg.matrix_norm(dense(Ug, Vg, trust_region_general(Ug, Vg, c, s, tau), s))
    assert fro_g <= tau * (1 + 1e-9)


# -- general forms --


@pytest.mark.parametrize("d_out, d_in, rank", [(24, 16, 8), (6, 20, 8), (20, 5, 6)])
def test_general_forms_match_the_dense_matrix(d_out: int, d_in: int, rank: int) -> None:
    U, V = torch.randn(d_out, rank, dtype=F64), torch.randn(d_in, rank, dtype=F64)
    c, s = torch.randn(3, rank, dtype=F64), 1.7
    for row in range(3):
        dw = dense(U, V, c[row], s)
        assert delta_w_fro(U, V, c[row], s) == pytest.approx(float(torch.linalg.matrix_norm(dw)), rel=1e-10)
        sv = delta_w_singular_values(U, V, c[row], s)
        full = torch.linalg.svdvals(dw)
        assert torch.allclose(sv, full[: sv.numel()], atol=1e-10)
        assert torch.allclose(
            full[sv.numel() :], torch.zeros(full.numel() - sv.numel(), dtype=F64), atol=1e-10
        )
    batched = delta_w_fro(U, V, c, s)
    assert batched.shape == (3,)
    assert torch.allclose(batched, torch.stack([delta_w_fro(U, V, row, s) for row in c]))
    assert delta_w_singular_values(U, V, c, s).shape[0] == 3


def test_general_forms_keep_the_input_dtype() -> None:
    U, V, c = torch.randn(12, 4), torch.randn(10, 4), torch.randn(4).to(torch.bfloat16)
    assert delta_w_fro(U, V, c, 1.0).dtype == torch.bfloat16
    assert trust_region_general(U, V, c, 1.0, 0.5).dtype == torch.bfloat16
    assert sigma_clamp(c, 1.0, 2.0).dtype == torch.bfloat16


def test_default_tau() -> None:
    assert default_tau(2) == 5.0
    assert default_tau(10) == 1.0
    assert default_tau(32) == 1.0
    with pytest.raises(ValueError):
        default_tau(0)
