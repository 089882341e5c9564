"""Attach BEM layers to a Hugging Face model by role, never by type-name matching.

Only W_O and W_down get adapters (BEM_SPEC §1): editing q/k/v would change keys and values
already in the KV cache, so those sites are refused outright rather than silently allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from bem.core.layers import BEMLinear

DEFAULT_RANK_SCHEDULE: tuple[int, ...] = (2, 4, 8, 8, 8, 4, 2)
DEFAULT_MAX_OVERHEAD = 0.05
ROLES = ("W_O", "W_down")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder layers and which module plays each role."""

    layers: str  # dotted path of the ModuleList of decoder layers
    roles: dict[str, tuple[str, type[nn.Module]]]  # role -> (path inside a layer, expected type)
    refused: tuple[str, ...]  # paths inside a layer that must never carry a BEM (q/k/v)


_LLAMA = Family(
    layers="model.layers",
    roles={"W_O": ("self_attn.o_proj", nn.Linear), "W_down": ("mlp.down_proj", nn.Linear)},
    refused=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Family(
        layers="transformer.h",
        roles={"W_O": ("attn.c_proj", Conv1D), "W_down": ("mlp.c_proj", Conv1D)},
        refused=("attn.c_attn", "attn.q_attn"),
    ),
}
_QKV_NAMES = {"q_proj", "k_proj", "v_proj", "c_attn", "q_attn", "qkv_proj", "W_Q", "W_K", "W_V"}


def rank_for_layer(layer: int, n_layers: int, schedule: Sequence[int]) -> int:
    """Layer ℓ of L gets schedule[⌊ℓK/L⌋]: the schedule is stretched over relative depth."""
    return schedule[layer * len(schedule) // n_layers]


class Attachment:
    """The BEM sites attached to one model, and the routing of a flat code vector to them.

    A flat code has R = Σ r_m entries, site m owning the slice `offsets[name]`; when every site has
    the same rank r, a code of width r is shared by all sites instead.
    """

    def __init__(
        self, model: nn.Module, family: str, roles: Sequence[str], sites: dict[str, BEMLinear]
    ) -> None:
        self.model = model
        self.family = family
        self.roles = tuple(roles)
        self.sites = sites
        self.offsets: dict[str, slice] = {}
        start = 0
        for name, site in sites.items():
            self.offsets[name] = slice(start, start + site.rank)
            start += site.rank
        self.total_rank = start

    @property
    def ranks(self) -> dict[str, int]:
        return {name: site.rank for name, site in self.sites.items()}

    def set_codes(self, code: Tensor | dict[str, Tensor] | None) -> None:
        if code is None:
            for site in self.sites.values():
                site.code = None
            return
        if isinstance(code, dict):
            for name, site in self.sites.items():
                site.code = code[name]
            return
        width = code.shape[-1]
        ranks = set(self.ranks.values())
        if width == self.total_rank:
            for name, site in self.sites.items():
                site.code = code[..., self.offsets[name]]
        elif len(ranks) == 1 and width == next(iter(ranks)):
            for site in self.sites.values():
                site.code = code
        else:
            raise ValueError(
                f"code width {width} fits neither the per-site layout (R={self.total_rank}) "
                f"nor a shared code (ranks {sorted(ranks)})"
            )

    @contextmanager
    def codes(self, code: Tensor | dict[str, Tensor] | None) -> Iterator[None]:
        """Run forward passes with these codes; always cleared after, so no code leaks into later calls."""
        self.set_codes(code)
        try:
            yield
        finally:
            self.set_codes(None)

    def parameters(self) -> Iterator[nn.Parameter]:
        for site in self.sites.values():
            yield site.U
            yield site.V

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def base_parameters(self) -> int:
        adapter = {id(p) for p in self.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in adapter)

    def check_budget(self, *extra: nn.Module, max_overhead: float | None = None) -> float:
        """Adapter parameters (bases plus controllers, routers, gates) over base parameters.

        Raises over 5% unless `max_overhead` says otherwise: tiny test models need a looser bound,
        and the caller should have to say so.
        """
        added = self.num_parameters() + sum(p.numel() for m in extra for p in m.parameters())
        ratio = added / self.base_parameters()
        limit = DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead
        if ratio > limit:
            raise ValueError(
                f"adapter parameters ({added:,}) are {ratio:.1%} of the base ({self.base_parameters():,}), "
                f"over the {limit:.1%} budget; pass max_overhead to allow it"
            )
        return ratio

    @torch.no_grad()
    def zero_(self) -> None:
        """U = 0: the adapted model is the base again whatever the code."""
        for site in self.sites.values():
            site.U.zero_()

    def detach(self) -> nn.Module:
        """Put the original modules back and return the base model."""
        for name, site in self.sites.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, site.base)
        self.sites = {}
        return self.model


def family_of(model: nn.Module) -> tuple[str, Family]:
    """The model's family by its config's `model_type`, or the nearest config class it derives from
    (the smoke base's token-shift Llama is a Llama: bem.core.token_shift)."""
    config = getattr(model, "config", None)
    for cls in type(config).__mro__:
        family = getattr(cls, "model_type", None)
        if family in FAMILIES:
            return family, FAMILIES[family]
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    raise ValueError(
        f"unknown model family {getattr(config, 'model_type', None)!r}; known: {sorted(FAMILIES)}. "
        f"Linear candidates: {candidates[:12]}{' ...' if len(candidates) > 12 else ''}"
    )


def _resolve_roles(family: Family, requested: Sequence[str]) -> list[str]:
    """Map requested names (roles, in-layer paths, or leaf names) to roles, refusing q/k/v by name."""
    by_path = {path: role for role, (path, _) in family.roles.items()}
    by_leaf = {path.rsplit(".", 1)[-1]: role for role, (path, _) in family.roles.items()}
    roles = []
    for name in requested:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _QKV_NAMES or any(name.endswith(r) for r in family.refused):
            raise ValueError(
                f"refusing BEM site {name!r}: q/k/v projections are never adapted (they would change "
                f"keys and values already in the KV cache); allowed roles are {list(family.roles)}"
            )
        role = name if name in family.roles else by_path.get(name)
        if role is None and "." not in name:
            role = by_leaf.get(name)
        if role is None:
            allowed = list(family.roles) + [p for p, _ in family.roles.values()]
            raise ValueError(f"unknown BEM site {name!r}; choose from {allowed}")
        roles.append(role)
    return roles


def _layer_list(model: nn.Module, family: Family) -> nn.ModuleList:
    """The model's decoder layers (get_submodule is typed as returning a plain Module)."""
    return cast(nn.ModuleList, model.get_submodule(family.layers))


def role_sites(model: nn.Module, roles: Sequence[str] = ROLES) -> list[tuple[str, int]]:
    """(full module name, layer index) of every site playing one of `roles`, type-checked.

    Also what a plain peft LoRA should target to be comparable with the BEMs.
    """
    family_name, family = family_of(model)
    wanted = _resolve_roles(family, roles)
    found = []
    for i, layer in enumerate(_layer_list(model, family)):
        for role in wanted:
            path, expected = family.roles[role]
            module = layer.get_submodule(path)
            name = f"{family.layers}.{i}.{path}"
            if not isinstance(module, expected):
                raise TypeError(
                    f"{name} plays {role} in {family_name} models and should be {expected.__name__}, "
                    f"found {type(module).__name__}"
                )
            found.append((name, i))
    return found


def attach_bems(
    model: nn.Module,
    roles: Sequence[str] = ROLES,
    *,
    rank_schedule: Sequence[int] = DEFAULT_RANK_SCHEDULE,
    ranks: dict[str, int] | None = None,
    alpha: float = 16.0,
    dropout: float = 0.1,
    orthonormal: bool = False,
    max_overhead: float | None = None,
) -> Attachment:
    """Freeze `model` and wrap its W_O / W_down sites with BEM layers.

    `ranks` ({full module name: r}) overrides the schedule for the sites it names.
    """
    family_name, family = family_of(model)
    wanted = _resolve_roles(family, roles)
    n_layers = len(_layer_list(model, family))
    ranks = dict(ranks or {})
    model.requires_grad_(False)

    sites: dict[str, BEMLinear] = {}
    for name, layer_index in role_sites(model, wanted):
        rank = ranks.pop(name, rank_for_layer(layer_index, n_layers, rank_schedule))
        site = BEMLinear(model.get_submodule(name), rank, alpha, dropout, orthonormal)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, site)
        sites[name] = site
    if ranks:
        unknown = sorted(ranks)
        _resolve_roles(family, unknown)  # a q/k/v name gets the refusal message
        raise ValueError(f"rank overrides name modules that are not attached sites: {unknown}")
    if not sites:
        raise ValueError(f"no BEM sites attached to the {family_name} model (roles {list(roles)})")
    attachment = Attachment(model, family_name, list(dict.fromkeys(wanted)), sites)
    attachment.check_budget(max_overhead=max_overhead)
    return attachment
