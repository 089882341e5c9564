"""Mission C's safety basis (BEM_SPEC.md section 8; research/missions_cde.md C.3 and C.4).

Per decoder layer, a safety basis Q (d×r_s, orthonormal columns) lives in the orthogonal complement
of that layer's skill subspace S, the span of the skill adapters' output factors U_O and U_down. An
overlay pushes the residual stream along Q after the layer, gated by the chunk's constitution score c
and scaled by a runtime level L, which a knob κ sets per chunk. This module holds:

- the subspace helpers: `skill_subspace` (rank-revealing, so repeated or empty columns don't count)
  and `complement_basis` (a random orthonormal basis of the complement of S);
- `SafetyOverlay`, the per-layer update h' = h + a·Qᵀ, with `reorthonormalise()` to keep Q orthonormal
  and orthogonal to S after every optimiser step;
- `attach_overlays`, which hooks the overlays into a Llama-family model's decoder layers and can be
  removed to give back the model unchanged;
- `Knob`, the per-chunk level L from κ, context, domain and escalation;
- the Lagrangian parts: `violation_surrogate`, `orth_penalty`, `lagrangian_loss`, `lagrange_step`;
- the measures: `orthogonality_preservation` (OP), `largest_principal_cosine`, `interference_ratio`
  and `orthonormality_error`.

Two choices differ from a literal reading of section 8 and follow the brief that asked for this module
(missions_cde.md C.4): the OP gate is 1 − ‖QᵀS‖_F² / min(r_s, r_k), with the largest principal cosine
‖QᵀS‖₂ reported beside it (section 8's "ortho" is 1 − that cosine); and λ moves in log space
(the Safe RLHF form) instead of the plain projected step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

DOMAIN_LEVELS: dict[str, float] = {
    "general": 0.6,
    "medical": 0.8,
    "legal": 0.7,
    "financial": 0.7,
    "sensitive": 0.9,
}
VIOLATION_TARGET = 0.05  # section 8: the Lagrangian's constraint is v ≤ .05
LAMBDA_MIN, LAMBDA_MAX = 1e-3, 100.0
ESCALATION_THRESHOLD = 0.2  # c_min below this escalates the level
A_MIN, A_MAX = 0.1, 1.0  # the clamp on tanh(...) in the update
GATE_SLOPE = 5.0  # σ(5(1 − c))
SURROGATE_SLOPE = 20.0  # σ(20(.5 − c))
EMA_DECAY = 0.9


# ---------------------------------------------------------------------------------------------------
# Subspaces


def _default_tol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    # numpy.linalg.matrix_rank's default: max(shape)·eps, relative to the largest singular value. The
    # singular values that rounding leaves on a duplicated or dependent column are a few eps, under this.
    return max(shape) * torch.finfo(dtype).eps


def skill_subspace(us: Sequence[Tensor], tol: float | None = None) -> Tensor:
    """An orthonormal basis (d×k) of the union of the column spaces of `us` (each d×r_i).

    Rank-revealing: singular values at or below tol·σ_max are dropped, so duplicated, zero or linearly
    dependent columns do not inflate k. tol defaults to max(shape)·eps of the dtype. With no columns
    (or only zero ones) the result is d×0, the empty subspace.
    """
    if not us:
        raise ValueError("skill_subspace needs at least one d×r matrix (to know d)")
    ds = {u.shape[0] for u in us}
    if any(u.dim() != 2 for u in us) or len(ds) != 1:
        raise ValueError(
            f"skill_subspace needs 2-D d×r matrices with one d; got {[tuple(u.shape) for u in us]}"
        )
    dtype = us[0].dtype if us[0].is_floating_point() else torch.get_default_dtype()
    m = torch.cat([u.to(dtype) for u in us], dim=1)
    d = m.shape[0]
    if m.shape[1] == 0:
        return m.new_zeros(d, 0)
    u_, sv, _ = torch.linalg.svd(m, full_matrices=False)
    rel = _default_tol(tuple(m.shape), m.dtype) if tol is None else tol
    if sv[0] <= 0:
        return m.new_zeros(d, 0)
    rank = int((sv > rel * sv[0]).sum())
    return u_[:, :rank].contiguous()


def _orth64(a: Tensor) -> Tensor:
    """`skill_subspace` of one matrix, in float64 but with the rank tolerance of a's own dtype: float32
    columns that are dependent only up to float32 rounding must not count as extra directions."""
    dtype = a.dtype if a.is_floating_point() else torch.float64
    return skill_subspace([a.detach().to(torch.float64)], tol=_default_tol(tuple(a.shape), dtype))


def _qr_signfix(a: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with R's diagonal made non-negative, so QR of an orthonormal matrix is the matrix itself
    (repeated re-orthonormalisation is idempotent instead of flipping columns)."""
    q, r = torch.linalg.qr(a)
    diag = torch.diagonal(r)
    signs = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return q * signs, r * signs[:, None]


def _project_out(a: Tensor, s: Tensor) -> Tensor:
    """(I − SSᵀ)A for orthonormal S, applied twice: one pass leaves ~eps·‖A‖ of S behind when A is mostly
    inside S, and the second removes it ("twice is enough", Kahan/Parlett)."""
    if s.shape[1] == 0:
        return a
    for _ in range(2):
        a = a - s @ (s.T @ a)
    return a


def _orthonormal_in_complement(a: Tensor, s: Tensor, generator: torch.Generator | None) -> Tensor:
    """Orthonormal columns spanning (I − SSᵀ)A, topping up with random complement directions any column
    that the projection made (numerically) dependent, so the result always has A's column count."""
    r = a.shape[1]
    q, rr = _qr_signfix(_project_out(a, s))
    scale = float(torch.linalg.matrix_norm(a, ord=2)) if a.numel() else 0.0
    # A column keeping under ~sqrt(eps) of the matrix's scale after the projection is rounding noise.
    good = torch.diagonal(rr).abs() > torch.finfo(a.dtype).eps ** 0.5 * max(scale, 1e-30)
    if bool(good.all()):
        return _project_out(q, s)  # QR rounding can reintroduce ~eps of S; strip it again
    # A column that lost (almost) everything to S (or depends on earlier ones) carries no direction of its
    # own: its unit-normalised rounding noise points anywhere, S included, and QR would orthogonalise the
    # later columns against it. So redo QR on the surviving columns alone, then give each lost column a
    # fresh random direction orthogonal to S and to the survivors.
    keep, _ = _qr_signfix(_project_out(a[:, good], s))
    keep = _project_out(keep, s)
    fill = complement_basis(torch.cat([s, keep], dim=1), a.shape[0], r - keep.shape[1], generator)
    out = torch.empty_like(q)
    out[:, good] = keep
    out[:, ~good] = fill
    return out


def complement_basis(S: Tensor, d: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """r orthonormal columns (d×r, S's dtype) drawn at random from the orthogonal complement of span(S).

    S may be any d×k basis; its rank is measured with `skill_subspace`, so repeated columns leave more
    room. Raises ValueError when r > d − rank(S): there is no room for r orthonormal directions ⟂ S.
    """
    if S.dim() != 2 or S.shape[0] != d:
        raise ValueError(f"S must be d×k with d={d}; got shape {tuple(S.shape)}")
    if r < 0:
        raise ValueError(f"r must be ≥ 0; got {r}")
    dtype = S.dtype if S.is_floating_point() else torch.get_default_dtype()
    basis = skill_subspace([S.to(dtype)])
    k = basis.shape[1]
    if r > d - k:
        raise ValueError(
            f"no room for r={r} directions orthogonal to the skill subspace: d={d}, rank(S)={k}, "
            f"so at most d - rank(S) = {d - k}"
        )
    if r == 0:
        return S.new_zeros(d, 0, dtype=dtype)
    g = torch.randn(d, r, generator=generator, dtype=dtype, device=S.device)
    q, rr = _qr_signfix(_project_out(g, basis))
    # A Gaussian projected onto a complement of dimension ≥ r has full column rank with probability 1;
    # check anyway, since a degenerate draw would silently break orthonormality.
    if bool((torch.diagonal(rr).abs() <= d * torch.finfo(dtype).eps * float(rr.abs().max())).any()):
        return complement_basis(S, d, r, generator)
    return _project_out(q, basis)


# ---------------------------------------------------------------------------------------------------
# Measures (missions_cde.md C.4)


def principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between span(A) and span(B), largest first (min(rank) of them).

    Both are orthonormalised first (rank-revealing), so the measures below describe the subspaces even
    when training has let Q drift off orthonormality; that drift is reported by `orthonormality_error`.
    """
    a, b = _orth64(A), _orth64(B)
    if a.shape[1] == 0 or b.shape[1] == 0:
        return a.new_zeros(0)
    return torch.linalg.svdvals(a.T @ b).clamp(max=1.0)


def orthogonality_preservation(Q: Tensor, S: Tensor) -> float:
    """OP = 1 − ‖QᵀS‖_F² / min(r_s, r_k): one minus the mean squared cosine of the principal angles.

    1 means Q ⟂ S, 0 means the smaller subspace lies inside the larger one. With an empty S (no skill
    adapters) there is nothing to overlap, and OP is 1.
    """
    cos = principal_cosines(Q, S)
    if cos.numel() == 0:
        return 1.0
    return float(1.0 - (cos**2).sum() / cos.numel())


def largest_principal_cosine(Q: Tensor, S: Tensor) -> float:
    """‖QᵀS‖₂ for orthonormal bases: the cosine of the smallest principal angle (0 when Q ⟂ S)."""
    cos = principal_cosines(Q, S)
    return float(cos[0]) if cos.numel() else 0.0


def orthonormality_error(Q: Tensor) -> float:
    """‖QᵀQ − I‖_F, computed in float64 so float32 rounding of the product is not mistaken for drift."""
    q = Q.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=torch.float64)))


def interference_ratio(S: Tensor, delta: Tensor, x: Tensor | None = None) -> float:
    """I = E_x ‖P_S ΔW x‖² / E_x ‖ΔW x‖², the share of an update's output energy inside the skill subspace.

    With x (…×d_in, real activations), delta is ΔW (d_out×d_in, nn.Linear's layout). Without x, delta
    holds the per-token updates themselves (…×d), e.g. the overlay's a·Qᵀ. Returns nan when the update is
    zero on every x (the ratio is undefined, e.g. at L = 0).
    """
    s = _orth64(S)
    delta = delta.detach().to(torch.float64)
    y = delta if x is None else x.detach().to(torch.float64) @ delta.T
    y = y.reshape(-1, y.shape[-1])
    if y.shape[-1] != s.shape[0]:
        raise ValueError(f"updates live in dimension {y.shape[-1]} but S in {s.shape[0]}")
    total = float((y**2).sum())
    if total == 0.0:
        return math.nan
    # ‖P_S y‖ = ‖Sᵀy‖ for orthonormal S; the mean over x cancels between numerator and denominator.
    return float(((y @ s) ** 2).sum()) / total


# ---------------------------------------------------------------------------------------------------
# Lagrangian (section 8)


def violation_surrogate(c: Tensor) -> Tensor:
    """v = mean σ(20(.5 − c)): a differentiable count of the chunks whose constitution score is under .5."""
    return torch.sigmoid(SURROGATE_SLOPE * (0.5 - c)).mean()


def orth_penalty(Q: Tensor, S: Tensor) -> Tensor:
    """L_orth = ‖QᵀS‖_F² + ‖QᵀQ − I‖_F² (the O-LoRA penalty plus a pull toward orthonormal columns)."""
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    return (Q.T @ S.to(Q.dtype)).pow(2).sum() + (Q.T @ Q - eye).pow(2).sum()


def lagrangian_loss(
    util: Tensor, violation: Tensor, lam: float, orth: Tensor, target: float = VIOLATION_TARGET
) -> Tensor:
    """L = L_util + λ(v − target) + .5·L_orth; λ is a constant here (it moves by `lagrange_step`)."""
    return util + lam * (violation - target) + 0.5 * orth


def lagrange_step(lam: float, violation: float, target: float, lr: float) -> float:
    """One dual step in log space (Safe RLHF): ln λ ← ln λ + lr·λ·(v̂ − target), then λ ∈ [1e-3, 100].

    Moving ln λ keeps λ > 0 without a projection onto [0, ∞); the step is multiplicative,
    λ' = λ·exp(lr·λ·(v̂ − target)), so its sign is the sign of v̂ − target.
    """
    if not lam > 0:
        raise ValueError(f"λ must be > 0 for a log-space step; got {lam}")
    log_lam = math.log(lam) + lr * lam * (violation - target)
    # Clamping in log space first also keeps exp() from overflowing on a huge step.
    lam = math.exp(min(max(log_lam, math.log(LAMBDA_MIN)), math.log(LAMBDA_MAX)))
    return min(max(lam, LAMBDA_MIN), LAMBDA_MAX)  # exp(log(100)) rounds to 100.00000000000004


# ---------------------------------------------------------------------------------------------------
# The overlay


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _is_zero(level: float | Tensor) -> bool:
    if isinstance(level, Tensor):
        return not bool(level.detach().ne(0).any())
    return level == 0


class SafetyOverlay(nn.Module):
    """One layer's safety basis and update: a = clamp(tanh((hQ ⊙ w ⊙ s)/T), .1, 1)·σ(5(1 − c))·L and
    h' = h + g·a·Qᵀ, per token.

    g = exp(log_gain) is one learned scalar per layer, 1 at the start (section 8's update exactly).
    Section 8 bounds the push by ‖a‖ ≤ √r_s in residual units whatever the model's scale; on the smoke
    base that barely moved a decision (bench/mission_c_safety.py), so the Lagrangian sets the scale.

    Q is a plain parameter kept on the constraint set by `reorthonormalise()`, called after every
    optimiser step (projected gradient descent), rather than by `torch.nn.utils.parametrizations.
    orthogonal`: the parametrisation keeps QᵀQ = I but knows nothing of S, so Q could still rotate into the
    skill subspace; projecting onto S's complement and re-running QR enforces both constraints exactly,
    costs one d×r_s QR per step, and leaves a state dict with a plain `Q` that exports as is. The
    L_orth penalty in the Lagrangian remains as the gradient-side pressure between projections.
    """

    S: Tensor

    def __init__(
        self,
        S: Tensor,
        r_s: int = 32,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        orthogonal: bool = True,
        floor: float = A_MIN,
    ) -> None:
        super().__init__()
        if not 0 <= floor <= A_MAX:
            raise ValueError(f"floor must be in [0, {A_MAX}]; got {floor}")
        # Section 8 clamps a at .1 from below: every token of every prompt is pushed at least that much
        # (times the gain, the gate and L). floor=0 lets the overlay leave a prompt alone; a study arm.
        self.floor = floor
        # orthogonal=False is the mission's ablation: Q starts anywhere and is kept orthonormal only, so
        # it may turn into S; S stays as a buffer so OP can still be measured.
        self.orthogonal = orthogonal
        if S.dim() != 2:
            raise ValueError(f"S must be d×k; got shape {tuple(S.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        d = S.shape[0]
        # Built in float64 so the starting basis is orthogonal to S to ~1e-16 before it is rounded.
        basis = _orth64(S)
        q = complement_basis(basis if orthogonal else basis[:, :0], d, r_s, generator)
        self.register_buffer("S", basis.to(dtype))
        self.Q = nn.Parameter(q.to(dtype))
        self.w = nn.Parameter(torch.full((r_s,), 0.1, dtype=dtype))
        self.s = nn.Parameter(torch.ones(r_s, dtype=dtype))
        self.log_T = nn.Parameter(torch.tensor(math.log(temperature), dtype=dtype))
        self.log_gain = nn.Parameter(torch.zeros((), dtype=dtype))
        self.generator = generator

    @property
    def d(self) -> int:
        return int(self.Q.shape[0])

    @property
    def r_s(self) -> int:
        return int(self.Q.shape[1])

    @property
    def temperature(self) -> Tensor:
        return self.log_T.exp()

    def coefficients(self, h: Tensor, c: float | Tensor, level: float | Tensor) -> Tensor:
        """a (…×r_s) for hidden states h (…×d); c and level broadcast to h's leading dimensions."""
        q = self.Q
        x = h.to(q.dtype)
        c_t = _as_tensor(c, q)
        level_t = _as_tensor(level, q)
        raw = torch.tanh((x @ q) * self.w * self.s / self.temperature).clamp(self.floor, A_MAX)
        gate = torch.sigmoid(GATE_SLOPE * (1.0 - c_t))
        return raw * (gate * level_t).unsqueeze(-1)

    def forward(self, h: Tensor, c: float | Tensor, level: float | Tensor) -> Tensor:
        """h' = h + a·Qᵀ for h of shape [B, T, d]; c and level broadcast to [B, T].

        L = 0 everywhere returns h itself; tokens whose level is 0 keep their exact values otherwise.
        """
        if h.shape[-1] != self.d:
            raise ValueError(f"hidden size {h.shape[-1]} does not match the overlay's d={self.d}")
        if _is_zero(level):
            return h
        a = self.coefficients(h, c, level)
        out = h + (self.log_gain.exp() * (a @ self.Q.T)).to(h.dtype)
        if isinstance(level, Tensor):
            # a is exactly 0 where L = 0, but h + 0 can still turn −0.0 into +0.0; keep h's bits there.
            on = torch.broadcast_to(level.to(h.device).ne(0), h.shape[:-1]).unsqueeze(-1)
            out = torch.where(on, out, h)
        return out

    @torch.no_grad()
    def reorthonormalise(self) -> None:
        """Put Q back on its constraint set: project its columns onto the complement of S, then QR with a
        sign fix (so an already-valid Q is returned unchanged up to rounding, not with flipped columns)."""
        q64 = self.Q.detach().to(torch.float64)
        s64 = self.S.to(torch.float64)
        self.Q.copy_(_orthonormal_in_complement(q64, self._kept_out(s64), self.generator).to(self.Q.dtype))

    def orth_penalty(self) -> Tensor:
        return orth_penalty(self.Q, self._kept_out(self.S))

    def _kept_out(self, s: Tensor) -> Tensor:
        """The subspace Q is kept out of: S, or nothing for the ablation."""
        return s if self.orthogonal else s[:, :0]

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, r_s={self.r_s}, rank(S)={self.S.shape[1]}, orthogonal={self.orthogonal}, "
            f"floor={self.floor}"
        )


# ---------------------------------------------------------------------------------------------------
# Hooking overlays into a model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers (a Llama-family decoder stack)")
    return layers


def edit_layer_output(output: Any, edit: Callable[[Tensor], Tensor]) -> Any:
    """A forward hook's return for a decoder layer: its hidden states (a tensor, or a tuple's first item)
    replaced by edit(hidden), or None when edit hands them back unchanged, which keeps the layer's own
    output object."""
    hidden = output[0] if isinstance(output, tuple) else output
    new = edit(hidden)
    if new is hidden:
        return None
    return (new, *output[1:]) if isinstance(output, tuple) else new


class OverlayHandle:
    """The installed hooks plus the (c, level) that the next forward passes use.

    Set them with `set_inputs` (persistent) or `overlay_inputs` (restored on exit). A forward with no
    inputs set raises rather than silently running the overlay at some default. Use the handle as a
    context manager, or call `remove()`, to take the hooks off; the model is then exactly as before.
    """

    def __init__(self, model: nn.Module, overlays: Mapping[int, SafetyOverlay]) -> None:
        layers = decoder_layers(model)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        for i, overlay in overlays.items():
            if not 0 <= i < len(layers):
                raise ValueError(f"layer {i} out of range: the model has {len(layers)} decoder layers")
            if hidden is not None and overlay.d != hidden:
                raise ValueError(f"overlay for layer {i} has d={overlay.d}, the model hidden_size={hidden}")
        self.overlays = dict(overlays)
        self.c: float | Tensor | None = None
        self.level: float | Tensor | None = None
        self._hooks = [layers[i].register_forward_hook(self._hook(o)) for i, o in self.overlays.items()]

    def _hook(self, overlay: SafetyOverlay) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.c is None or self.level is None:
                raise RuntimeError(
                    "safety overlays attached but no inputs set: use handle.overlay_inputs(c, level)"
                )
            c, level = self.c, self.level
            return edit_layer_output(output, lambda h: overlay(h, c, level))

        return hook

    def set_inputs(self, c: float | Tensor, level: float | Tensor) -> None:
        self.c, self.level = c, level

    @contextmanager
    def overlay_inputs(self, c: float | Tensor, level: float | Tensor) -> Iterator[OverlayHandle]:
        previous = (self.c, self.level)
        self.set_inputs(c, level)
        try:
            yield self
        finally:
            self.c, self.level = previous

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable overlay parameters (Q, w, s, log_T, log_gain of every layer); the base stays
        frozen."""
        for overlay in self.overlays.values():
            yield from overlay.parameters()

    @torch.no_grad()
    def reorthonormalise(self) -> None:
        for overlay in self.overlays.values():
            overlay.reorthonormalise()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> OverlayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_overlays(model: nn.Module, overlays: Mapping[int, SafetyOverlay]) -> OverlayHandle:
    """Hook each overlay onto the output of `model.model.layers[i]` (tensor or tuple outputs alike).

    The overlays are not registered as submodules, so the model's parameters and state dict do not
    change; `handle.remove()` takes the hooks off.
    """
    return OverlayHandle(model, overlays)


# ---------------------------------------------------------------------------------------------------
# The knob (section 8, missions_cde.md C.3)


class Knob:
    """The runtime level L per chunk, from κ ∈ [0, 1], the context adjustment, the domain and escalation.

    κ = 0 turns the overlay off: `step` returns exactly 0.0 and touches no state. Otherwise, per chunk,
    with c_min the chunk's lowest constitution score:

        e ← .9e + .1·min(.5(.2 − c_min)/.2, 1)   if c_min < .2,   else e ← .95e
        x = base + .2·adj + e,   base = κ, or .7κ + .3·DOMAIN_LEVELS[domain]
        m ← .9·m + .1·x          (EMA_.9; the first chunk sets m = x)
        L = clamp(m, 0, 1)

    The escalation is updated before x, so the chunk that shows a low score already raises L. The EMA's
    state is unclamped (the clamp is on the output, as in the formula).
    """

    def __init__(self, kappa: float = 0.6) -> None:
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"κ must be in [0, 1]; got {kappa}")
        self.kappa = kappa
        self.escalation = 0.0
        self.ema: float | None = None

    def reset(self) -> None:
        """Forget escalation and EMA (a new conversation)."""
        self.escalation = 0.0
        self.ema = None

    def base(self, domain: str | None = None) -> float:
        if domain is None:
            return self.kappa
        if domain not in DOMAIN_LEVELS:
            raise ValueError(f"unknown domain {domain!r}; known: {sorted(DOMAIN_LEVELS)}")
        return 0.7 * self.kappa + 0.3 * DOMAIN_LEVELS[domain]

    def step(self, c_min: float, adj: float = 0.0, domain: str | None = None) -> float:
        """L for the next chunk. adj is clamped to [−.2, .2], the range the context may move it."""
        if not 0.0 <= c_min <= 1.0:
            raise ValueError(f"c_min is a constitution score in [0, 1]; got {c_min}")
        if self.kappa == 0.0:
            return 0.0
        base = self.base(domain)
        if c_min < ESCALATION_THRESHOLD:
            push = min(0.5 * (ESCALATION_THRESHOLD - c_min) / ESCALATION_THRESHOLD, 1.0)
            self.escalation = 0.9 * self.escalation + 0.1 * push
        else:
            self.escalation = 0.95 * self.escalation
        x = base + 0.2 * min(max(adj, -0.2), 0.2) + self.escalation
        # The EMA starts at the first value, not at 0: from 0 the first chunk would run at a tenth of the
        # chosen level and need ~22 chunks to reach 90% of it, leaving the opening of every conversation,
        # where short attack prompts live, nearly unguarded, and flattening the κ dose-response there.
        self.ema = x if self.ema is None else EMA_DECAY * self.ema + (1.0 - EMA_DECAY) * x
        return min(max(self.ema, 0.0), 1.0)
