"""Associative recall with and without a token shift: does a tiny Llama learn in-context lookup in minutes?

`python bench/token_shift.py [--steps 2000] [--seeds 0 1]` trains, in this process, a plain 2-layer
Llama (the baseline) and the same model with `bem.core.token_shift`'s shift, on fresh batches of
`k1 v1 ... k5 v5 Q k v` (60 keys, 100 values, loss on the query key and its value; tiny_models.md's
recipe: AdamW 3e-3, betas (0.9, 0.98), wd 0.1, 300 warm-up steps, clip 1.0), and prints held-out
accuracy of the value by step. Chance is 1/5. Writes bench/results/token_shift.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from bem.core.token_shift import TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM

KEYS, VALUES, PAIRS = 60, 100, 5
QUERY, PAD = KEYS + VALUES, KEYS + VALUES + 1


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([torch.randperm(KEYS, generator=generator)[:PAIRS] for _ in range(size)])
    values = torch.randint(KEYS, KEYS + VALUES, (size, PAIRS), generator=generator)
    asked = torch.randint(0, PAIRS, (size,), generator=generator)
    rows = torch.arange(size)
    ids = torch.cat(
        [
            torch.stack([keys, values], -1).reshape(size, 2 * PAIRS),
            torch.full((size, 1), QUERY),
            keys[rows, asked][:, None],
            values[rows, asked][:, None],
        ],
        dim=1,
    )
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return ids, labels


def train(shift: bool, steps: int, seed: int, every: int) -> tuple[list[tuple[int, float]], float]:
    kind, model_class = (
        (TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM) if shift else (LlamaConfig, LlamaForCausalLM)
    )
    config = kind(
        vocab_size=PAD + 1,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    held_out, _ = batch(500, torch.Generator().manual_seed(10_000 + seed))
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 300)
        ids, labels = batch(64, generator)
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0:
            model.eval()
            with torch.no_grad():
                guess = model(input_ids=held_out[:, :-1]).logits[:, -1].argmax(-1)
            curve.append((step + 1, (guess == held_out[:, -1]).float().mean().item()))
    return curve, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    runs = {
        (name, seed): train(name == "token shift", args.steps, seed, args.every)
        for seed in args.seeds
        for name in ("plain Llama", "token shift")
    }
    table = Table(title=f"held-out recall accuracy (chance {1 / PAIRS:.2f}), {args.steps} steps")
    table.add_column("step")
    for name, seed in runs:
        table.add_column(f"{name} (seed {seed})")
    steps = [s for s, _ in next(iter(runs.values()))[0]]
    for i, step in enumerate(steps):
        table.add_row(str(step), *(f"{curve[i][1]:.2f}" for curve, _ in runs.values()))
    table.add_row("seconds", *(f"{sec:.0f}" for _, sec in runs.values()))
    Console().print(table)
    out = Path(__file__).parent / "results" / "token_shift.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            [
                {"model": name, "seed": seed, "seconds": sec, "curve": curve}
                for (name, seed), (curve, sec) in runs.items()
            ],
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
