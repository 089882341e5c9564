"""The BEM layer: a frozen linear map plus a code-modulated low-rank branch.

    y = W0·x + s·U·diag(c)·Vᵀ·x,  computed as  base(x) + s·((drop(x)·V) ⊙ c)·Uᵀ

V is stored transposed (r×d_in, nn.Linear's layout, like peft's lora_A) so that x·V is one
F.linear call: for a matrix only r columns wide that is markedly faster than x @ V on CPU
(bench/bem_overhead.py), and the scale folds into the code so the add fuses into one addmm.

The branch stays unmerged on the hot path: the code c changes per row (mixed batches) and per
chunk, so the only thing shared by the whole batch is U and V. That is also why a mixed batch
needs no gather and no per-adapter loop (BEM_SPEC §4).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from bem.core import governance


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D, whose weight is stored transposed (d_in×d_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"BEM wraps nn.Linear or transformers Conv1D, not {type(module).__name__}")


class BEMLinear(nn.Module):
    """Wraps a frozen linear map with a generated low-rank branch.

    `code` is set from outside (see `Attachment.codes`) right before a forward pass: shape [B, r]
    for one code per row, or [B, T, r] for per-token codes (chunk codes expanded over their chunk).
    With no code set the layer is exactly the base layer.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float = 16.0,
        dropout: float = 0.1,
        orthonormal: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        d_in, d_out = linear_dims(base)
        self.base = base.requires_grad_(False)
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.scaling = alpha / rank
        self.orthonormal = orthonormal
        weight = cast(Tensor, base.weight)  # nn.Linear or Conv1D, checked by linear_dims
        dev, dt = weight.device, weight.dtype
        if orthonormal:
            # Orthonormal bases: ΔW = 0 at start comes from the controller's zero-init last layer instead.
            self.V = nn.Parameter(torch.linalg.qr(torch.randn(d_in, rank, device=dev)).Q.T.to(dt))
            self.U = nn.Parameter(torch.linalg.qr(torch.randn(d_out, rank, device=dev)).Q.to(dt))
        else:
            self.V = nn.Parameter(torch.randn(rank, d_in, device=dev, dtype=dt) * 0.02)
            self.U = nn.Parameter(torch.zeros(d_out, rank, device=dev, dtype=dt))
        self.dropout = nn.Dropout(dropout)
        self.code: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        code = self.code
        if code is None:
            return y
        if code.dim() == x.dim() - 1:
            code = code.unsqueeze(-2)  # one code per row, broadcast over tokens
        elif code.dim() == 3 and code.shape[1] != x.shape[1]:
            raise ValueError(
                f"per-token code covers {code.shape[1]} tokens but the input has {x.shape[1]}; "
                "expand chunk codes to the tokens of this forward pass"
            )
        h = F.linear(self.dropout(x), self.V) * (code.to(x.dtype) * self.scaling)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.U.T).view_as(y)

    def delta_weight(self, code: Tensor) -> Tensor:
        """ΔW = s·U·diag(c)·Vᵀ for one fixed code, shaped d_out×d_in (nn.Linear's layout)."""
        return self.scaling * (self.U * code.to(self.U.dtype)) @ self.V

    @torch.no_grad()
    def reorthonormalize(self) -> None:
        """Orthonormal mode keeps U and V on the Stiefel manifold: re-QR after each optimizer step."""
        for p, columns in ((self.U, self.U), (self.V, self.V.T)):
            q, r = torch.linalg.qr(columns.float())
            # Fix column signs so repeated QR is idempotent rather than flipping columns.
            q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
            p.copy_((q if p is self.U else q.T).to(p.dtype))

    @torch.no_grad()
    def orthogonalize_blocks(self, blocks: governance.Blocks) -> None:
        """Several BEMs share this site in column blocks: keep U_i ⟂ U_j and V_i ⟂ V_j (i ≠ j), in
        priority order, so each BEM's ΔW lives in its own subspace (BEM_SPEC §4)."""
        self.U.copy_(governance.orthogonalize_blocks(self.U, blocks))
        self.V.copy_(governance.orthogonalize_blocks(self.V.T, blocks).T)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scaling={self.scaling:g}"
