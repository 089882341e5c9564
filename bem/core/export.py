"""Export a frozen code as a plain peft LoRA folder, and save/load BEM checkpoints.

A fixed code makes the BEM branch an ordinary low-rank update, ΔW = (s·U·diag(c))·Vᵀ, so any
peft-aware stack can serve it: lora_B = s·U·diag(c), lora_A = Vᵀ (which is how BEMLinear stores V),
with lora_alpha = r per site so peft's own scaling is 1 (BEM_SPEC §4).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bem.core.attach import Attachment, attach_bems
from bem.core.layers import BEMLinear

CHECKPOINT_FORMAT = "bem-checkpoint/1"


def clean_base(attachment: Attachment) -> nn.Module:
    """A deep copy of the attached model with every BEM wrapper replaced by its frozen base layer."""
    model = copy.deepcopy(attachment.model)
    for name in attachment.sites:
        parent, _, child = name.rpartition(".")
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, BEMLinear)
        setattr(model.get_submodule(parent), child, wrapper.base)
    return model


def site_codes(attachment: Attachment, code: Tensor) -> dict[str, Tensor]:
    """Split one fixed code (flat R = Σ r_m, or shared width r) into per-site codes."""
    attachment.set_codes(code[None])
    try:
        return {name: site.code[0] for name, site in attachment.sites.items()}  # type: ignore[index]
    finally:
        attachment.set_codes(None)


def peft_lora_site(peft_model: PeftModel, site: str) -> tuple[LoraLayer, nn.Linear, nn.Linear]:
    """The peft LoRA layer at `site` with its "default" lora_A and lora_B linears, typed: peft's
    `base_model.model` and its ModuleDict entries are all plain Modules to a type checker."""
    lora = cast(LoraLayer, cast(nn.Module, peft_model.base_model.model).get_submodule(site))
    return lora, cast(nn.Linear, lora.lora_A["default"]), cast(nn.Linear, lora.lora_B["default"])


@torch.no_grad()
def export_peft(attachment: Attachment, code: Tensor, out_dir: str | Path) -> Path:
    """Write a peft LoRA folder equivalent to the BEM model under the fixed `code`."""
    out = Path(out_dir)
    codes = site_codes(attachment, code)
    ranks = attachment.ranks
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=list(attachment.sites),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        fan_in_fan_out=attachment.family == "gpt2",
        bias="none",
    )
    peft_model = get_peft_model(clean_base(attachment), config)
    for name, site in attachment.sites.items():
        _, lora_a, lora_b = peft_lora_site(peft_model, name)
        lora_a.weight.copy_(site.V)
        lora_b.weight.copy_(site.scaling * site.U * codes[name].to(site.U.dtype))
    peft_model.save_pretrained(str(out))
    return out


def save_bem(attachment: Attachment, path: str | Path, modules: dict[str, nn.Module] | None = None) -> Path:
    """Save the adapter bases and any controllers/routers to one safetensors file plus a JSON header.

    The base model is not saved: it is referenced by the caller (a local path or a config).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    sites = {}
    for name, site in attachment.sites.items():
        tensors[f"sites/{name}/U"] = site.U.detach().contiguous()
        tensors[f"sites/{name}/V"] = site.V.detach().contiguous()
        sites[name] = {"rank": site.rank, "scaling": site.scaling, "orthonormal": site.orthonormal}
    for key, module in (modules or {}).items():
        for pname, value in module.state_dict().items():
            tensors[f"modules/{key}/{pname}"] = value.detach().contiguous()
    save_file(tensors, path / "bem.safetensors")
    header = {
        "format": CHECKPOINT_FORMAT,
        "family": attachment.family,
        "roles": attachment.roles,
        "sites": sites,
    }
    (path / "bem.json").write_text(json.dumps(header, indent=2))
    return path


def load_bem(
    model: nn.Module, path: str | Path, modules: dict[str, nn.Module] | None = None, **attach_kwargs: object
) -> Attachment:
    """Attach BEMs to a fresh `model` exactly as saved and load their weights (and `modules`')."""
    path = Path(path)
    header = json.loads((path / "bem.json").read_text())
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}/bem.json is not a {CHECKPOINT_FORMAT} checkpoint: {header.get('format')!r}")
    sites = header["sites"]
    orthonormal = {spec["orthonormal"] for spec in sites.values()}
    attachment = attach_bems(
        model,
        header["roles"],
        ranks={name: spec["rank"] for name, spec in sites.items()},
        orthonormal=orthonormal.pop(),
        **attach_kwargs,  # type: ignore[arg-type]
    )
    if set(attachment.sites) != set(sites):
        raise ValueError(f"checkpoint sites {sorted(sites)} differ from attached {sorted(attachment.sites)}")
    tensors = load_file(path / "bem.safetensors", device=str(next(model.parameters()).device))
    with torch.no_grad():
        for name, site in attachment.sites.items():
            site.U.copy_(tensors[f"sites/{name}/U"])
            site.V.copy_(tensors[f"sites/{name}/V"])
            site.scaling = sites[name]["scaling"]
    for key, module in (modules or {}).items():
        prefix = f"modules/{key}/"
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    return attachment
