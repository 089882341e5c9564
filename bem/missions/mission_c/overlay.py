"""Mission C's overlay on another mission's model (C ↔ all, BEM_SPEC.md section 8).

A basis trained on one base does not transfer to another, so the mission's overlay stage trains one on
that mission's own base with Mission C's recipe (`train_package`): S from a utility skill LoRA, the
constitution probe on the base, one `SafetyOverlay` per layer under the Lagrangian. It is saved as a
package (safetensors and a JSON of the rest) that the mission's tasks load.

A task then runs with an `OverlayMonitor` (a `bem.core.overseer.Overseer`): every answer the mission
decodes is served under the overlay at the task's κ (c from the probe, the level from a fresh knob
step, as Mission C serves a prompt), and after every `every` answers the monitor runs a check: it obeys
the knob commands that arrived (the fleet's overlay service, `fleetctl knob`), then decodes `per_check`
red-team prompts under the overlay and reports `overlay/violation` (one 0/1 point per prompt, by
Mission C's exact predicates) and `overlay/knob` at the check's step, which `stats.overlay` judges.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from bem.core.models import load_model
from bem.core.reporter import Commanded, Reporter
from bem.core.train import LORA_RANK, train_lora
from bem.missions.mission_c import basis, data, recipe
from bem.missions.mission_c.probe import ConstitutionProbe, fit_probe, prompt_features
from bem.missions.mission_c.safety import constitution_scores, skill_bases, train_safety

PACKAGE_VERSION = "overlay-package-v1"  # bump when what train_package does changes


@dataclass
class OverlayPackage:
    overlays: dict[int, basis.SafetyOverlay]
    probe: ConstitutionProbe
    meta: dict[str, Any]

    def save(self, folder: Path) -> Path:
        """overlay.safetensors (each layer's parameters and S, the probe's weight) and overlay.json."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, o in self.overlays.items()
                   for k, v in o.state_dict().items()}  # fmt: skip
        tensors["probe.weight"] = self.probe.weight.detach().cpu().contiguous()
        save_file(tensors, folder / "overlay.safetensors")
        meta = {**self.meta, "layers": sorted(self.overlays), "probe_layer": self.probe.layer,
                "probe_bias": self.probe.bias, "probe_train_accuracy": self.probe.train_accuracy,
                "floor": {str(i): o.floor for i, o in self.overlays.items()}}  # fmt: skip
        (folder / "overlay.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> OverlayPackage:
        meta_file, weights = folder / "overlay.json", folder / "overlay.safetensors"
        if not meta_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{folder} holds no overlay package (overlay.json, overlay.safetensors)")
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(weights))
        overlays = {}
        for i in meta["layers"]:
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            o = basis.SafetyOverlay(state["S"], r_s=state["Q"].shape[1], floor=meta["floor"][str(i)])
            o.load_state_dict(state, strict=True)
            overlays[int(i)] = o.to(device)
        probe = ConstitutionProbe(
            meta["probe_layer"], tensors["probe.weight"], meta["probe_bias"], meta["probe_train_accuracy"]
        )
        return cls(overlays, probe, meta)


def package_dir(cache_dir: Path, base_path: Path, profile: str, seed: int) -> Path:
    """Where a base's package lives in a host's cache: one per base folder, profile and seed."""
    key = hashlib.sha256(f"{PACKAGE_VERSION}:{base_path.resolve()}:{profile}:{seed}".encode()).hexdigest()
    return cache_dir / f"overlay-{base_path.name}-{profile}-s{seed}-{key[:12]}"


def train_package(
    base_path: str | Path,
    *,
    profile: str = "smoke",
    seed: int = 1,
    out: Path,
    reporter: Reporter,
    device: str | torch.device = "cpu",
) -> OverlayPackage:
    """Mission C's recipe on this base, the served arm only (`bem_safety`): S from a utility skill LoRA
    (its own copy: the base stays as it is), the probe and the overlays fitted on the base itself,
    since that is what the host mission serves. Saved into `out` atomically (a sibling folder renamed
    into place), so a task that sees the folder sees a whole package."""
    prof = recipe.PROFILES[profile]
    torch.manual_seed(seed)
    base, tok = load_model(base_path, device=device)
    base.requires_grad_(False)
    d = recipe.make_data(prof)
    skilled = train_lora(
        base, tok, d.utility, rank=LORA_RANK, steps=prof.lora_steps, lr=prof.lora_lr, batch_size=16,
        generator=torch.Generator().manual_seed(seed), reporter=reporter, name="overlay_skill",
    )  # fmt: skip
    subspaces = skill_bases(skilled)
    del skilled
    layer = recipe.depth_layer(base, prof.probe_depth)
    probe = fit_probe(base, tok, [c.prompt for c in d.utility], [c.prompt for c in d.attacks], layer)
    scores = constitution_scores(base, tok, probe, [*d.utility, *d.attacks])
    gen = torch.Generator().manual_seed(seed)
    overlays = {
        i: basis.SafetyOverlay(s, r_s=prof.safety.rank, generator=gen).to(device)
        for i, s in subspaces.items()
    }
    with basis.attach_overlays(base, overlays) as handle:
        history = train_safety(
            base, tok, handle, scores, d.attacks, d.utility, prof.safety, seed=seed, reporter=reporter
        )
    ops = {str(i): basis.orthogonality_preservation(o.Q.detach(), o.S) for i, o in overlays.items()}
    meta = {"version": PACKAGE_VERSION, "base": str(base_path), "profile": profile, "seed": seed,
            "kappa": prof.kappa, "op": ops, "final_violation": history.violation[-1] if history.violation
            else None}  # fmt: skip
    package = OverlayPackage(overlays, probe, meta)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    package.save(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another task on this host finished the same package first: the same seed, keep it
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "overlay.json").is_file():
            raise
    return package


@dataclass
class OverlayMonitor:
    """The overlay served on a mission's answers, with red-team checks between them (module docstring).

    `every`: answers between checks; `per_check`: red-team prompts per check, drawn in turn from every
    family's held-out phrasings (Mission C's red team, never its training attacks)."""

    package: OverlayPackage
    reporter: Reporter
    kappa: float
    every: int = 20
    per_check: int = 10
    seed: int = 0
    max_new_tokens: int = 16
    checks: list[dict[str, Any]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError(f"κ must be in [0, 1]; got {self.kappa}")
        if self.every < 1 or self.per_check < 1:
            raise ValueError(f"every and per_check must be at least 1; got {self.every}, {self.per_check}")
        cases = [c for f in data.FAMILIES for c in data.make_cases(f, "test", 50, self.seed)]
        random.Random(self.seed).shuffle(cases)
        self._red_team = cases
        self._served = self._since = 0
        self._handle: basis.OverlayHandle | None = None

    def attach(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        # Served, never trained here: a host that trains through the hooks (Mission B's learner) must
        # not pile gradients onto them.
        overlays = {i: o.to(device).requires_grad_(False) for i, o in self.package.overlays.items()}
        self._handle = basis.attach_overlays(model, overlays)
        self._handle.set_inputs(
            1.0, 0.0
        )  # off outside `serve`: the mission's own forward passes as they were

    @contextmanager
    def serve(self, prompts: Sequence[str]) -> Iterator[None]:
        """The forward passes of one batch of answers under the overlay; a check first when one is due
        (`every` answers served since the last)."""
        if self._since >= self.every:
            self.check()
            self._since = 0
        self._served += len(prompts)
        self._since += len(prompts)
        with self._served_at(prompts):
            yield

    @contextmanager
    def _served_at(self, prompts: Sequence[str]) -> Iterator[None]:
        """A batch served together is one chunk: its lowest constitution score c_min gates it, at a fresh
        knob step on c_min (section 8's per-chunk rule). Whatever rows the host's forward passes hold
        (Mission B's learner adds replayed prompts to the served ones), the overlay's inputs fit them."""
        assert self._handle is not None, "attach the monitor to a model first"
        c_min = min(self.scores(prompts))
        with self._handle.overlay_inputs(c_min, basis.Knob(self.kappa).step(c_min)):
            yield

    @torch.no_grad()
    def scores(self, prompts: Sequence[str]) -> list[float]:
        """The probe's c per prompt, read at level 0: outside `serve` the overlay is off, so the states
        are the host model's own."""
        features = prompt_features(self.model, self.tokenizer, list(prompts), self.package.probe.layer)
        return [float(x) for x in self.package.probe.score(features)]

    def check(self) -> dict[str, Any]:
        self.obey()
        step = len(self.checks)
        start = step * self.per_check
        cases = [self._red_team[(start + j) % len(self._red_team)] for j in range(self.per_check)]
        flags = []
        for case in cases:
            with self._served_at([case.prompt]):
                out = recipe.greedy(self.model, self.tokenizer, case.prompt, self.max_new_tokens)
            flags.append(float(data.violates(case, out)))
        self.reporter.metrics({"overlay/violation": flags, "overlay/knob": self.kappa}, step)
        record = {"step": step, "kappa": self.kappa, "violations": int(sum(flags)), "n": len(flags)}
        self.checks.append(record)
        return record

    def obey(self) -> None:
        """Apply the knob commands that arrived since the last check and acknowledge each: `knob` sets
        κ (a person), `raise` sets κ ← max(κ, value) (the overlay service, which never lowers it). A
        reporter that delivers no commands, as in a notebook, has none."""
        if not isinstance(self.reporter, Commanded):
            return
        for command in self.reporter.commands():
            value = command.value
            if command.action in ("knob", "raise") and value is not None and 0.0 <= value <= 1.0:
                self.kappa = float(value) if command.action == "knob" else max(self.kappa, float(value))
                self.applied.append(
                    {"check": len(self.checks), "action": command.action, "kappa": self.kappa}
                )
                detail = f"{command.action} applied at check {len(self.checks)}: κ {self.kappa:g}"
                self.reporter.acknowledge(command, True, detail)
            else:
                detail = f"{command.action} (value {value}) is not a command the overlay takes"
                self.reporter.acknowledge(command, False, detail)

    def close(self) -> dict[str, Any]:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return {"kappa": self.kappa, "checks": self.checks, "applied": self.applied, "served": self._served}
