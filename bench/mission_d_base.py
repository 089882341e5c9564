"""Has Mission D's smoke base learnt the tasks? Its precondition, without a fleet.

`python bench/mission_d_base.py [--cache DIR] [--n 100]` finds (or pretrains) the smoke base of
Mission D's mixture and decodes greedily, on `n` test-split frames and on the held-out templates:
translation (chrF and BLEU by sacrebleu, on the plain source and on its S2 and S3 views, whose target
is the same) and role extraction (EM). The mission's precondition wants clean chrF ≥ 50 and EM ≥ 0.8
from its baseline arm. Writes bench/results/mission_d_base.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sacrebleu
from rich.console import Console
from rich.table import Table

from bem.core.generate import greedy_generate
from bem.core.models import load_model
from bem.core.smoke_base import smoke_base
from bem.missions.mission_d import data, scramble


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    console = Console()
    path = smoke_base(
        args.cache, data.smoke_mixture(), log=lambda m: console.print(f"  {m}", highlight=False)
    )
    model, tok = load_model(path)

    def decode(prompts: list[str], max_new: int) -> list[str]:
        return [
            o.split("\n")[0].strip() for o in greedy_generate(model, tok, prompts, max_new_tokens=max_new)
        ]

    table = Table(title=f"{path.name}: greedy")
    for col in ("split", "view", "chrF", "BLEU", "exact", "role EM"):
        table.add_column(col)
    results: dict[str, dict[str, float]] = {}
    for split in ("test", "ood_template"):
        examples = data.make_examples(split, args.n, 0)
        refs = [e.target for e in examples]
        for view in ("clean", "S2", "S3"):
            sources = [e.source if view == "clean" else scramble.view(e.source, view, 1) for e in examples]
            hyps = decode([data.translation_prompt(s) for s in sources], 32)
            hyps = [h.split(".")[0] + "." if "." in h else h for h in hyps]  # one sentence
            answers = decode(
                [data.qa_prompt(s, e.question) for s, e in zip(sources, examples, strict=True)], 4
            )
            em = sum(a.split()[0] == e.answer if a else False for a, e in zip(answers, examples, strict=True))
            row = {
                "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
                "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
                "exact": sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs),
                "role_em": em / len(examples),
            }
            results[f"{split}/{view}"] = row
            table.add_row(split, view, *(f"{row[k]:.2f}" for k in ("chrf", "bleu", "exact", "role_em")))
    console.print(table)
    out = Path(__file__).parent / "results" / "mission_d_base.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"base": path.name, "n": args.n, **results}, indent=2))


if __name__ == "__main__":
    main()
