"""The suite's arm models on a frozen Llama (`arms` has their table and their parity).

An `ArmModel` replaces W_O and W_down of each layer with a `Site`: the frozen map plus its arm's
mechanism, whose per-example state (a BEM code, PT1's group logits, PT2's rank logits, PT3's code)
comes from one controller that reads the prompt's adapter-off mean state at the top, once per example
(`prepare`), as every BEM controller here does. V4's FiLM reads the same adapter-off pass, at its own
layer, so each example's (γ, β) are fixed before decoding like the codes (a FiLM on the adapted
states would need them again at every decoding step). V2's gate reads each query's attention
statistics in the pass itself (`StatsAttention`).

MM's models live in `mm`; they reuse `Site` and the controller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from bem.core.controllers import SimpleController, masked_mean
from bem.core.layers import BEMLinear
from bem.missions.v13 import mechanisms as M
from bem.missions.v13.arms import DYN_KEEP, DYN_RANK, GROUPS, RANK, STATS, Knobs, Shape

STATS_ATTENTION = "v13_stats"


def _stats_attention(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Eager attention that keeps its weights on the module for a PT1 gate to read (W_O runs next)."""
    out, weights = eager_attention_forward(module, *args, **kwargs)
    module.v13_weights = weights  # type: ignore[assignment]
    return out, weights


AttentionInterface.register(STATS_ATTENTION, _stats_attention)
# Its mask too: transformers builds no mask at all (neither causal nor padding) for an attention name
# it has no mask function for.
ALL_MASK_ATTENTION_FUNCTIONS.register(STATS_ATTENTION, eager_mask)


class Site(nn.Module):
    """A frozen linear map plus its arm's delta; with no state set it is exactly the frozen map."""

    def __init__(self, base: nn.Module, kind: str, mech: nn.Module, gate: M.HeadGate | None = None):
        super().__init__()
        self.base, self.kind, self.mech, self.gate = base.requires_grad_(False), kind, mech, gate
        self.state: Tensor | None = None
        # V2: the attention module whose weights the gate reads. Kept out of the module tree (it is
        # this site's parent: registering it would make a cycle).
        self.__dict__["attention"] = None

    @property
    def code_dim(self) -> int:
        if self.kind == "bem":
            return RANK
        if self.kind == "pt1":
            return GROUPS
        if self.kind == "pt2":
            return DYN_RANK
        mech = cast(M.KroneckerDown, self.mech)
        return mech.U.shape[0] * mech.V.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "bem":  # BEMLinear holds the frozen map and reads its own code
            return cast(Tensor, self.mech(x))
        y = self.base(x)
        state = self.state
        if state is None:
            return y
        row = state[:, None, :]  # one state per example, broadcast over tokens
        if self.kind == "pt1":
            if self.gate is not None:
                weights = getattr(self.__dict__["attention"], "v13_weights", None)
                if weights is None:
                    raise RuntimeError(
                        f"V2's gate needs attention weights: set {STATS_ATTENTION!r} attention"
                    )
                stats = M.attention_stats(weights)
                gamma = self.gate(stats.to(x.dtype), row)
            else:
                gamma = torch.softmax(row, dim=-1)
            return y + cast(M.HeadGroupLoRA, self.mech)(x, gamma)
        if self.kind == "pt2":
            return y + cast(M.DynamicRank, self.mech)(x, row)
        return y + cast(M.KroneckerDown, self.mech)(x, row)

    def set(self, state: Tensor | None) -> None:
        if self.kind == "bem":
            cast(BEMLinear, self.mech).code = state
        else:
            self.state = state

    def added(self) -> list[nn.Parameter]:
        """The parameters this site adds (never the frozen map's)."""
        own = {id(p) for p in self.base.parameters()}
        mods = [self.mech] + ([self.gate] if self.gate is not None else [])
        return [p for m in mods for p in m.parameters() if id(p) not in own]


def _site(arm: str, role: str, layer: int, base: nn.Module, s: Shape, k: Knobs) -> Site | None:
    """The mechanism `arm` puts at `role` (W_O or W_down) of `layer`, or None."""
    d, f = s.d_model, s.d_ff
    bem = Site(base, "bem", BEMLinear(base, RANK, dropout=0.0))
    if role == "W_O":
        if arm in ("V1", "V2"):
            lora = M.HeadGroupLoRA(s.heads, s.head_dim, d, GROUPS, k.group_rank)
            gate = (
                M.HeadGate(s.heads, STATS, GROUPS, k.gate_hidden, learn_temperature=True)
                if arm == "V2"
                else None
            )
            return Site(base, "pt1", lora, gate)
        return bem
    if arm == "V1":
        if layer < s.layers - k.dyn_layers:
            return None  # PT2's sites trimmed for parity: the top `dyn_layers` only
        return Site(base, "pt2", M.DynamicRank(f, d, DYN_RANK, DYN_KEEP))
    if arm == "V3":
        weight = cast(Tensor, base.weight)
        kron = M.KroneckerDown(f, d, k.kron_ranks).to(weight.device)
        # SVD initialisation from the frozen W_down itself: U and V span the input subspace the layer
        # already reads most; P starts at zero, so the branch adds nothing until it learns.
        kron.from_delta(weight.detach())
        with torch.no_grad():
            kron.P.zero_()
        return Site(base, "pt3", kron)
    return bem


@dataclass
class Prepared:
    """What `prepare` fixed for a batch: the adapter-off top state each example's controller read."""

    features: Tensor  # [B, d]


class ArmModel(nn.Module):
    """The frozen LM with one arm's sites, its controller and (V4) its FiLMs."""

    def __init__(self, lm: nn.Module, arm: str, shape: Shape, knobs: Knobs, controller_in: int | None = None):
        super().__init__()
        self.lm, self.arm, self.shape, self.knobs = lm.requires_grad_(False), arm, shape, knobs
        layers = cast(nn.ModuleList, lm.get_submodule("model.layers"))
        self.sites = nn.ModuleList()
        for i, layer in enumerate(layers):
            attn, mlp = layer.get_submodule("self_attn"), layer.get_submodule("mlp")
            for role, parent, name in (("W_O", attn, "o_proj"), ("W_down", mlp, "down_proj")):
                site = _site(arm, role, i, getattr(parent, name), shape, knobs)
                if site is None:
                    continue
                if site.gate is not None:
                    site.__dict__["attention"] = attn
                setattr(parent, name, site)
                self.sites.append(site)
        if arm == "V2":
            lm.config._attn_implementation = STATS_ATTENTION  # type: ignore[union-attr]
        self.code_dim = sum(cast(Site, s).code_dim for s in self.sites)
        self.controller = SimpleController(
            controller_in or shape.d_model, self.code_dim, knobs.hidden, dropout=0.0
        )
        self.films = nn.ModuleList(
            [M.ResidualFiLM(shape.d_model, knobs.film_hidden) for _ in layers] if arm == "V4" else []
        )
        self._film_state: list[tuple[Tensor, Tensor]] | None = None
        self._hooks = [
            layer.register_forward_hook(self._film_hook(i)) for i, layer in enumerate(layers) if arm == "V4"
        ]

    def _film_hook(self, i: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if self._film_state is None:
                return output
            gamma, beta = self._film_state[i]
            h = output[0] if isinstance(output, tuple) else output
            h = cast(M.ResidualFiLM, self.films[i]).apply_film(h, gamma, beta)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Everything the arm adds: what parity counts and what trains."""
        out = [p for s in self.sites for p in cast(Site, s).added()]
        return out + list(self.controller.parameters()) + list(self.films.parameters())

    @torch.no_grad()
    def read(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """The adapter-off pass: the prompt's mean top state, and each layer's (V4's FiLM input)."""
        with self.off():
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states = [masked_mean(h, prompt_mask) for h in out.hidden_states[1:]]
        return states[-1], states

    def codes(self, features: Tensor) -> Tensor:
        return self.controller(features).code

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor) -> Tensor:
        """Fix each example's state from its prompt; returns the code (for logging)."""
        top, per_layer = self.read(input_ids, attention_mask, prompt_mask)
        code = self.codes(top)
        self.set_state(code, per_layer)
        return code

    def set_state(self, code: Tensor | None, per_layer: Sequence[Tensor] = ()) -> None:
        """Each site's slice of `code`, and (V4) each layer's (γ, β) from its features [B, d]."""
        self.set_code(code)
        if self.arm == "V4" and per_layer:
            films = zip(self.films, per_layer, strict=True)
            self._film_state = [cast(M.ResidualFiLM, f).film(h[:, None, :]) for f, h in films]

    def set_code(self, code: Tensor | None) -> None:
        at = 0
        for s in self.sites:
            site = cast(Site, s)
            site.set(None if code is None else code[:, at : at + site.code_dim])
            at += site.code_dim

    @contextmanager
    def off(self) -> Iterator[None]:
        """Every site and FiLM off (the frozen base), restored after."""
        saved = [(cast(Site, s).state, _bem_code(cast(Site, s))) for s in self.sites]
        films, self._film_state = self._film_state, None
        for s in self.sites:
            cast(Site, s).set(None)
        try:
            yield
        finally:
            for s, (state, code) in zip(self.sites, saved, strict=True):
                site = cast(Site, s)
                site.set(code if site.kind == "bem" else state)
            self._film_state = films

    def clear(self) -> None:
        self.set_code(None)
        self._film_state = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits under the states `prepare` set."""
        return cast(Tensor, self.lm(input_ids=input_ids, attention_mask=attention_mask).logits)


def _bem_code(site: Site) -> Tensor | None:
    return cast(BEMLinear, site.mech).code if site.kind == "bem" else None
