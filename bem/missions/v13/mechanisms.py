"""The four performance mechanisms of BEM_SPEC.md section 11, each a module that adds a delta to a
frozen layer's output (the variants V1-V4 combine them; `variants.py`).

- PT1 `HeadGroupLoRA` at W_O: the heads split into G groups, a rank-r LoRA on each group's slice of
  W_O's input; ΔW·x = Σ_g γ_g·B_g·A_g·x_{H_g}, with γ = softmax over groups (`HeadGate`) from per-head
  attention statistics.
- PT2 `DynamicRank`: a rank-R branch of which k ranks are on per input, ΔW·x = B(m ⊙ s ⊙ A·x). In
  training m is a Gumbel top-k (temperature τ) with the straight-through estimator
  m = hard + soft − sg(soft); at inference m is the hard top-k of the logits, exactly k ranks.
- PT3 `KroneckerDown` at W_down: x ∈ R^(u·v) read as a u×v matrix X, z = vec(U·X·Vᵀ) ∈ R^(r_u·r_v),
  out = P·z: ΔW = P·(U ⊗ V). `from_delta` initialises it from a target ΔW by SVD (exact when ΔW has
  that form).
- PT4 `ResidualFiLM`: (γ, β) from an MLP of the layer-normed mean state, γ ∈ [.8, 1.2], β ∈ [−.1, .1];
  h' = h + .1·(γ ⊙ h + β − h). A non-finite γ, β or output gives h back unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem.missions.v13.arms import kronecker_factors


class HeadGroupLoRA(nn.Module):
    """PT1: per-group low-rank maps on W_O's input (the heads' outputs side by side)."""

    def __init__(self, heads: int, head_dim: int, d_out: int, groups: int = 4, rank: int = 2) -> None:
        super().__init__()
        if heads % groups:
            raise ValueError(f"{heads} heads do not split into {groups} equal groups")
        self.groups, self.width = groups, heads // groups * head_dim
        self.down = nn.Parameter(torch.randn(groups, rank, self.width) / math.sqrt(self.width))  # A_g
        self.up = nn.Parameter(torch.zeros(groups, d_out, rank))  # B_g, zero: no change at the start

    def forward(self, x: Tensor, gamma: Tensor) -> Tensor:
        """x [..., heads·head_dim], γ [..., groups] (summing to 1) → the delta [..., d_out]."""
        xg = x.unflatten(-1, (self.groups, self.width))  # [..., G, w]
        low = torch.einsum("...gw,grw->...gr", xg, self.down)
        per_group = torch.einsum("...gr,gor->...go", low, self.up)
        return (gamma[..., None] * per_group).sum(-2)


class HeadGate(nn.Module):
    """γ = softmax(MLP(per-head statistics) / T) over groups; `temperature` is learnt (V2) or fixed."""

    def __init__(
        self, heads: int, stats: int, groups: int = 4, hidden: int = 16, learn_temperature: bool = False
    ):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(heads * stats, hidden), nn.GELU(), nn.Linear(hidden, groups))
        self.log_temperature = nn.Parameter(torch.zeros(()), requires_grad=learn_temperature)

    def forward(self, stats: Tensor, prior: Tensor | None = None) -> Tensor:
        """stats [..., heads, stats] → γ [..., groups]; `prior` (logits [..., groups], the controller's
        in V2) is what the statistics refine."""
        logits = self.mlp(stats.flatten(-2))
        if prior is not None:
            logits = logits + prior
        return torch.softmax(logits / self.log_temperature.exp(), dim=-1)


def attention_stats(weights: Tensor) -> Tensor:
    """Per head and query, from causal attention weights [B, H, q, T] (the q queries are the last of
    the T positions): the entropy, the largest weight and where it sits, as its distance back from the
    query over the keys the query sees, (i − argmax) / (i + 1) ∈ [0, 1) → [B, q, H, 3]. Relative to the
    query, not to T: T grows with later tokens (targets, padding, decoding), which a query must not read."""
    p = weights.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1)
    top, where = p.max(dim=-1)
    q, T = weights.shape[-2], weights.shape[-1]
    index = torch.arange(T - q, T, device=weights.device, dtype=torch.float32)[:, None]  # [q, 1]
    position = ((index.T - where.float()) / (index.T + 1)).clamp_min(0.0)
    return torch.stack([entropy, top, position], dim=-1).transpose(1, 2)


class DynamicRank(nn.Module):
    """PT2: a rank-`rank` branch keeping `keep` ranks per input, chosen by `logits` [..., rank]."""

    def __init__(self, d_in: int, d_out: int, rank: int = 16, keep: int = 8, tau: float = 0.1) -> None:
        super().__init__()
        if not 0 < keep <= rank:
            raise ValueError(f"keep {keep} must be in 1..{rank}")
        self.keep, self.tau = keep, tau
        self.down = nn.Linear(d_in, rank, bias=False)  # A
        self.up = nn.Linear(rank, d_out, bias=False)  # B
        self.scale = nn.Parameter(torch.ones(rank))  # s
        nn.init.zeros_(self.up.weight)

    def mask(self, logits: Tensor) -> Tensor:
        """Training: Gumbel top-k, hard forward and soft backward; inference: the hard top-k."""
        if not self.training:
            return _top_k(logits, self.keep)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))
        noisy = (logits + gumbel) / self.tau
        hard = _top_k(noisy, self.keep)
        # The soft relaxation: each rank's sigmoid distance from the midpoint between the k-th and
        # (k+1)-th noisy logits, so soft → hard as τ → 0.
        ranked = noisy.topk(min(self.keep + 1, noisy.shape[-1]), dim=-1).values
        cut = (
            ranked[..., -1:] if self.keep == noisy.shape[-1] else (ranked[..., -2:-1] + ranked[..., -1:]) / 2
        )
        soft = torch.sigmoid(noisy - cut)
        return hard + (soft - soft.detach())  # the bracket is exactly 0 forward: m is exactly 0 or 1

    def forward(self, x: Tensor, logits: Tensor) -> Tensor:
        return self.up(self.mask(logits) * self.scale * self.down(x))


def _top_k(logits: Tensor, k: int) -> Tensor:
    return torch.zeros_like(logits).scatter(-1, logits.topk(k, dim=-1).indices, 1.0)


class KroneckerDown(nn.Module):
    """PT3: ΔW·x = P·vec(U·X·Vᵀ), X = x as a u×v matrix (row-major), U r_u×u, V r_v×v, P d_out×(r_u·r_v)."""

    def __init__(self, d_in: int, d_out: int, ranks: tuple[int, int] = (8, 8)) -> None:
        super().__init__()
        self.u, self.v = kronecker_factors(d_in)
        if self.u * self.v != d_in:
            raise ValueError(f"u·v = {self.u}·{self.v} ≠ d_in {d_in}")
        self.U = nn.Parameter(torch.randn(ranks[0], self.u) / math.sqrt(self.u))
        self.V = nn.Parameter(torch.randn(ranks[1], self.v) / math.sqrt(self.v))
        self.P = nn.Parameter(torch.zeros(d_out, ranks[0] * ranks[1]))

    def forward(self, x: Tensor, code: Tensor | None = None) -> Tensor:
        """`code` [..., r_u·r_v] scales z (the BEM code of V3's site), broadcast like x's rows."""
        X = x.unflatten(-1, (self.u, self.v))
        z = (self.U @ X @ self.V.T).flatten(-2)
        return F.linear(z if code is None else z * code, self.P)

    def delta_weight(self) -> Tensor:
        """ΔW = P·(U ⊗ V), d_out × d_in."""
        return self.P @ torch.kron(self.U, self.V)

    @torch.no_grad()
    def from_delta(self, delta: Tensor) -> None:
        """SVD initialisation from a target ΔW (d_out × d_in): U spans the column spaces of its rows
        read as u×v matrices, V their row spaces (top singular vectors), and P = ΔW·(U ⊗ V)ᵀ, the
        projection onto U ⊗ V (orthonormal rows). Exact when ΔW = P₀·(U₀ ⊗ V₀) at these ranks."""
        mats = delta.float().reshape(-1, self.u, self.v)  # one u×v matrix per output row
        r_u, r_v = self.U.shape[0], self.V.shape[0]
        left = torch.linalg.svd(mats.permute(1, 0, 2).reshape(self.u, -1), full_matrices=False).U[:, :r_u]
        right = torch.linalg.svd(mats.reshape(-1, self.v), full_matrices=False).Vh[:r_v]
        self.U.copy_(left.T)
        self.V.copy_(right)
        self.P.copy_(delta.float() @ torch.kron(self.U, self.V).T)


class ResidualFiLM(nn.Module):
    """PT4: h' = h + .1·(γ ⊙ h + β − h), γ ∈ [.8, 1.2] and β ∈ [−.1, .1] from MLP(LN(mean h))."""

    def __init__(self, d_model: int, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        last = nn.Linear(hidden, 2 * d_model)
        nn.init.zeros_(last.weight)  # γ = 1, β = 0: the identity at the start
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), last)

    def film(self, h: Tensor) -> tuple[Tensor, Tensor]:
        g, b = self.mlp(self.norm(h.mean(dim=-2))).chunk(2, dim=-1)
        return 0.8 + 0.4 * torch.sigmoid(g), 0.1 * torch.tanh(b)

    def forward(self, h: Tensor) -> Tensor:
        """h [..., T, d] → h' (each row whose γ, β or output is not finite keeps its h: identity rather
        than a poisoned residual stream)."""
        return self.apply_film(h, *self.film(h))

    def apply_film(self, h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """h [..., T, d] modulated by γ, β [..., d] (computed once per sequence: `film`)."""
        out = h + 0.1 * (gamma[..., None, :] * h + beta[..., None, :] - h)
        finite = (
            torch.isfinite(gamma).all(-1) & torch.isfinite(beta).all(-1) & torch.isfinite(out).all(-1).all(-1)
        )
        return torch.where(finite[..., None, None], out, h)
