"""Can Mission A's skill experts learn their skills on the smoke base? The precondition, without a fleet.

`python bench/mission_a_experts.py [--cache DIR] [--steps N] [--lr X] [--n 40]` finds (or pretrains)
the smoke base of Mission A's mixture, trains each skill expert's LoRA exactly as the smoke profile
does (`bem.core.train.train_lora` on its single-skill training set; `--steps`/`--lr` override the
profile), and prints greedy exact match on the first `n` held-out single-skill examples, for the base
alone and with the expert, plus a few predictions. The mission's gate wants 0.8 per expert. Writes
bench/results/mission_a_experts.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bem.core.models import load_model
from bem.core.reporter import MemoryReporter
from bem.core.smoke_base import smoke_base
from bem.core.train import LORA_RANK, train_lora
from bem.missions.mission_a import metrics, recipe
from bem.missions.mission_a.data import SkillExample, smoke_mixture


def greedy(model: torch.nn.Module, tokenizer, ex: SkillExample) -> str:  # type: ignore[no-untyped-def]
    ids = tokenizer(ex.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).split("\n")[0].strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--steps", type=int, help="LoRA steps (default: the smoke profile's)")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default: the smoke profile's)")
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    console = Console()
    prof = recipe.PROFILES["smoke"]
    prof = replace(prof, lora_steps=args.steps or prof.lora_steps, lora_lr=args.lr or prof.lora_lr)
    path = smoke_base(args.cache, smoke_mixture(), log=lambda m: console.print(f"  {m}", highlight=False))
    model, tokenizer = load_model(path)
    model.requires_grad_(False)
    data = recipe.make_data(prof)
    table = Table(title=f"{path.name}: experts at {prof.lora_steps} steps, lr {prof.lora_lr:g}")
    for col in ("skill", "base EM", "expert EM", "examples (prediction / gold)"):
        table.add_column(col)
    results = {}
    for skill in recipe.EXPERTS:
        test = data.single_test[skill][: args.n]
        expert = train_lora(
            model,
            tokenizer,
            data.single[skill],
            rank=LORA_RANK,
            steps=prof.lora_steps,
            lr=prof.lora_lr,
            batch_size=prof.batch_size,
            generator=torch.Generator().manual_seed(0),
            reporter=MemoryReporter(),
            name=skill,
        )
        base_preds = [greedy(model, tokenizer, ex) for ex in test]
        preds = [greedy(expert, tokenizer, ex) for ex in test]
        base_em = sum(metrics.score(x, ex.golds)[0] for x, ex in zip(base_preds, test, strict=True))
        em = sum(metrics.score(x, ex.golds)[0] for x, ex in zip(preds, test, strict=True))
        base_em, em = base_em / len(test), em / len(test)
        shown = "; ".join(f"{x!r} / {ex.golds[0]!r}" for x, ex in zip(preds[:3], test[:3], strict=True))
        table.add_row(skill, f"{base_em:.2f}", f"{em:.2f}", shown)
        results[skill] = {"base_em": base_em, "expert_em": em, "n": len(test)}
    console.print(table)
    out = Path(__file__).parent / "results" / "mission_a_experts.json"
    out.parent.mkdir(exist_ok=True)
    summary = {"base": path.name, "steps": prof.lora_steps, "lr": prof.lora_lr, **results}
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
