"""Composition and governance of several BEMs sharing one basis (BEM_SPEC §4).

BEMs share U = [U_1…U_k] and V = [V_1…V_k]; BEM i owns a block of >= 4 columns and the matching block of
the code. Keeping the blocks mutually orthogonal means one BEM's update can never leak into another's
subspace, and keeping U and V orthonormal turns ΔW = s·U·diag(c)·Vᵀ into an SVD: the singular values are
s|c_j| and ‖ΔW‖_F = s‖c‖₂. Governance (σ-clamp, trust region) then acts on the code in O(R) instead of on a
d_out×d_in matrix. The general forms below cover bases that are not (yet) orthonormal.

Everything here is a pure tensor function. The maths runs in fp32 (fp64 stays fp64, so tests can check
identities tightly) and results come back in the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BLOCK_WIDTH = 4


@dataclass(frozen=True)
class Blocks:
    """Column layout of a shared basis: BEM i owns columns [start_i, stop_i).

    The listed order is the priority order for `orthogonalize_blocks` (block 1 keeps its span, later
    blocks yield). The ranges must be disjoint, each >= 4 wide, and cover [0, R) without gaps.
    """

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        ranges = tuple((int(a), int(b)) for a, b in self.ranges)
        object.__setattr__(self, "ranges", ranges)
        if not ranges:
            raise ValueError("Blocks needs at least one block")
        for i, (start, stop) in enumerate(ranges):
            if stop - start < MIN_BLOCK_WIDTH:
                raise ValueError(
                    f"block {i} [{start}, {stop}) has width {stop - start}; "
                    f"each BEM needs at least {MIN_BLOCK_WIDTH} columns"
                )
        covered = 0
        for start, stop in sorted(ranges):
            if start < covered:
                raise ValueError(f"block [{start}, {stop}) overlaps columns before {covered}")
            if start > covered:
                raise ValueError(f"columns [{covered}, {start}) belong to no block; blocks must cover [0, R)")
            covered = stop

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> Blocks:
        """Contiguous blocks in column order, e.g. [8, 8, 4] -> [0, 8), [8, 16), [16, 20)."""
        ranges, start = [], 0
        for w in widths:
            ranges.append((start, start + w))
            start += w
        return cls(tuple(ranges))

    @property
    def rank(self) -> int:
        """R, the total number of columns."""
        return max(stop for _, stop in self.ranges)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.ranges)

    def column_owner(self) -> Tensor:
        """[R] long: which block owns each column."""
        owner = torch.empty(self.rank, dtype=torch.long)
        for i, (start, stop) in enumerate(self.ranges):
            owner[start:stop] = i
        return owner


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_basis(M: Tensor, blocks: Blocks) -> None:
    if M.ndim != 2 or M.shape[1] != blocks.rank:
        raise ValueError(f"basis of shape {tuple(M.shape)} does not match {blocks.rank} block columns")


def _sign_fixed_qr(M: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with diag(R) >= 0: Q is then unique for full column rank, so results are reproducible."""
    q, r = torch.linalg.qr(M)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(M.dtype)
    return q * sign, r * sign[:, None]


def orthogonalize_blocks(M: Tensor, blocks: Blocks) -> Tensor:
    """Orthonormal columns with mutually orthogonal blocks, enforced in priority order (U and V separately).

    For block i: Q = qr([M_1…M_{i−1}]), M_i ← M_i − Q·QᵀM_i, M_i ← qr(M_i).Q with diag(R) >= 0.
    Both steps are done by one Householder QR of [Q_prev, M_i]: its trailing columns are exactly the
    projected-then-normalised block, but stay orthonormal and orthogonal to Q_prev to machine precision
    even when M_i is nearly (or fully) inside span(Q_prev), where a single projection would not.
    """
    _check_basis(M, blocks)
    d, r = M.shape
    if d < r:
        raise ValueError(f"{r} orthonormal columns do not fit in dimension {d}")
    x = M.to(_work_dtype(M))
    done: list[Tensor] = []
    for start, stop in blocks:
        prev = torch.cat(done, dim=1) if done else x.new_zeros(d, 0)
        q, _ = _sign_fixed_qr(torch.cat([prev, x[:, start:stop]], dim=1))
        done.append(q[:, prev.shape[1] :])
    # `done` is in priority order; put each block back at its own columns.
    columns = torch.cat([torch.arange(start, stop) for start, stop in blocks])
    return torch.cat(done, dim=1)[:, torch.argsort(columns).to(M.device)].to(M.dtype)


def max_cross_block(M: Tensor, blocks: Blocks) -> float:
    """max over i ≠ j of |M_iᵀM_j| entries: the orthogonality check run after each step and at load."""
    _check_basis(M, blocks)
    if len(blocks) < 2:
        return 0.0
    x = M.detach().to(_work_dtype(M))
    gram = (x.T @ x).abs()
    owner = blocks.column_owner().to(M.device)
    cross = owner[:, None] != owner[None, :]
    return float(gram[cross].max())


def sigma_clamp(c: Tensor, sigma_max: float, s: float) -> Tensor:
    """c_j ← sign(c_j)·min(|c_j|, σ_max/s): caps every singular value s|c_j| of ΔW at σ_max.

    Valid for orthonormal U, V only. Spec defaults: σ_max 1, or 2 for a single BEM.
    """
    if sigma_max <= 0 or s <= 0:
        raise ValueError(f"sigma_max and s must be > 0, got {sigma_max}, {s}")
    bound = sigma_max / s
    return c.to(_work_dtype(c)).clamp(-bound, bound).to(c.dtype)


def trust_region(c: Tensor, tau: float, s: float) -> Tensor:
    """c ← c·min(1, τ/(s‖c‖₂)) per row of [..., R]: ‖ΔW‖_F <= τ, direction kept. Orthonormal U, V only."""
    if tau <= 0 or s <= 0:
        raise ValueError(f"tau and s must be > 0, got {tau}, {s}")
    x = c.to(_work_dtype(c))
    fro = s * torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return (x * _shrink(fro, tau)).to(c.dtype)


def _shrink(fro: Tensor, tau: float) -> Tensor:
    # A zero update needs no shrinking; the tiny floor only keeps τ/0 from producing inf·0 = NaN.
    return (tau / fro.clamp_min(torch.finfo(fro.dtype).tiny)).clamp(max=1.0)


def delta_w_fro(U: Tensor, V: Tensor, c: Tensor, s: float) -> Tensor:
    """‖ΔW‖_F = s·sqrt(cᵀ((UᵀU) ⊙ (VᵀV))c) for any bases, without forming ΔW.

    c [R] gives a scalar, c [B, R] one norm per row.
    """
    dt = _work_dtype(c)
    u, v, x = U.to(dt), V.to(dt), c.to(dt)
    gram = (u.T @ u) * (v.T @ v)
    quad = torch.einsum("...i,ij,...j->...", x, gram, x)
    return (s * quad.clamp_min(0.0).sqrt()).to(c.dtype)


def delta_w_singular_values(U: Tensor, V: Tensor, c: Tensor, s: float) -> Tensor:
    """Singular values of ΔW for any bases: σ(s·R_u·diag(c)·R_vᵀ) with U = Q_uR_u, V = Q_vR_v.

    Q_u and Q_v have orthonormal columns, so they do not change singular values; the core is at most R×R.
    Returns min(d_out, d_in, R) values (descending) per row of c; the dense ΔW's remaining ones are zero.
    """
    dt = _work_dtype(c)
    r_u = torch.linalg.qr(U.to(dt)).R
    r_v = torch.linalg.qr(V.to(dt)).R
    core = s * (r_u * c.to(dt).unsqueeze(-2)) @ r_v.T
    return torch.linalg.svdvals(core).to(c.dtype)


def trust_region_general(U: Tensor, V: Tensor, c: Tensor, s: float, tau: float) -> Tensor:
    """c ← c·min(1, τ/‖ΔW‖_F) per row, with the Frobenius norm of the general (non-orthonormal) form."""
    if tau <= 0 or s <= 0:
        raise ValueError(f"tau and s must be > 0, got {tau}, {s}")
    x = c.to(_work_dtype(c))
    fro = delta_w_fro(U, V, x, s).unsqueeze(-1)
    return (x * _shrink(fro, tau)).to(c.dtype)


def default_tau(n_layers: int) -> float:
    """τ = max(1, 10/L): the per-layer Frobenius budget shrinks with depth so the total stays bounded."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return max(1.0, 10.0 / n_layers)
