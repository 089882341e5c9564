"""Forward-time overhead of BEM against peft LoRA and peft X-LoRA, at equal rank on equal sites, and of
the v1.3 variants (BEM_SPEC section 11: V1-V4 and their rank-8 anchor, each at its fitted parity)
against the same LoRA.

The claim under test: BEM adds at most 1.1x the time an unmerged LoRA adds, because its per-chunk
code is one extra elementwise product on the rank-r activations inside the same single pass, while
X-LoRA needs a second full forward to compute its scalings.

Every arm runs on its own deep copy of one seeded base model, on identical input_ids, in eval mode
under torch.inference_mode(). Timing is interleaved: after warm-up, each round times every arm once
in a freshly shuffled order, so drift on a shared, noisy machine hits all arms alike. Ratios over
base are per-round (paired) ratios, summarised by their median and IQR; "added" is the median of
the per-round differences arm - base. BEM added / LoRA added gets a bootstrap interval over rounds.

    .venv/bin/python bench/bem_overhead.py                 # small model on CPU, large on CUDA
    .venv/bin/python bench/bem_overhead.py --size large --rounds 30

Writes bench/results/bem_overhead-<device>.json (<device> is `cpu` or `cuda-<gpu name>`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from bem.core.attach import Attachment, attach_bems, role_sites  # noqa: E402
from bem.core.models import build_tiny_llama, pick_device, tiny_llama_config  # noqa: E402
from bem.core.routing import expand_to_tokens, num_chunks  # noqa: E402

TARGET = 1.1  # BEM added time / LoRA added time, per-chunk codes, equal rank
RANK, ALPHA, CHUNK = 8, 16.0, 128
ADAPTER_STD = 0.05  # nonzero U / lora_B, so no arm is short-circuited to the base


@dataclass(frozen=True)
class Size:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    batch: int
    seq_len: int
    dtype: str
    rounds: int
    warmup: int


# small: adapter cost visible, a run well under two minutes on 2 CPU cores.
# large: a ~0.6B Llama in bf16 at 4 x 2048 tokens, for a GPU.
SIZES: dict[str, Size] = {
    "small": Size(512, 1376, 4, 8, batch=4, seq_len=256, dtype="float32", rounds=24, warmup=2),
    "large": Size(2048, 5632, 12, 16, batch=4, seq_len=2048, dtype="bfloat16", rounds=40, warmup=5),
}


@dataclass
class Arm:
    name: str
    label: str
    run: Callable[[], Tensor] | None
    note: str = ""
    times: list[float] = field(default_factory=list)  # seconds, one per round


# ---------------------------------------------------------------------------------------------------------
# Building the arms


def _seeded_normal_(t: Tensor, generator: torch.Generator, std: float) -> None:
    t.copy_(torch.randn(t.shape, generator=generator).mul_(std).to(t.dtype))


def _weight(adapter: nn.ModuleDict) -> Tensor:
    weight = adapter["default"].weight
    assert isinstance(weight, Tensor)
    return weight


def build_lora(base: nn.Module, targets: list[str], seed: int) -> PeftModel:
    """Unmerged peft LoRA with random A and B. Adapters stay in the model's dtype (no fp32 upcast),
    as they would for bf16 inference, so LoRA and BEM do the same arithmetic."""
    config = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=targets, bias="none")
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                _seeded_normal_(_weight(module.lora_B), gen, ADAPTER_STD)
    return model.eval()


def lora_factors(lora_model: PeftModel) -> dict[str, tuple[Tensor, Tensor]]:
    """{site name: (A [r, d_in], B [d_out, r])} of the 'default' adapter, keyed like role_sites."""
    out = {}
    inner: nn.Module = lora_model.get_base_model()
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (_weight(module.lora_A), _weight(module.lora_B))
    return out


def build_bem(base: nn.Module, factors: dict[str, tuple[Tensor, Tensor]]) -> tuple[nn.Module, Attachment]:
    """BEM at rank 8 on every site with V = Aᵀ and U = B: with an all-ones code it *is* the LoRA,
    which the sanity check uses to prove both arms adapt the same sites with the same work."""
    model = copy.deepcopy(base)
    att = attach_bems(model, rank_schedule=[RANK], alpha=ALPHA, dropout=0.0, max_overhead=1.0)
    if set(att.sites) != set(factors):
        raise RuntimeError(f"BEM sites {sorted(att.sites)} differ from LoRA sites {sorted(factors)}")
    with torch.no_grad():
        for name, site in att.sites.items():
            a, b = factors[name]
            site.V.copy_(a)
            site.U.copy_(b)
    return model.eval(), att


def build_xlora(base: nn.Module, targets: list[str], hidden_size: int, seed: int, tmp: Path) -> PeftModel:
    """peft X-LoRA over two random LoRA experts of the same rank and sites, saved to disk first
    because XLoraConfig.adapters names adapter folders.

    The adapter keys must be "0", "1", ...: XLoraModel loads expert i under the name str(i) but then
    activates the dict's keys, so any other key makes disable_adapter_layers raise KeyError (and the
    X-LoRA layers would skip every expert). Seen with peft 0.21.2.
    """
    paths = {}
    for i in range(2):
        expert = build_lora(base, targets, seed + 100 + i)
        path = tmp / f"expert_{i}"
        expert.save_pretrained(str(path))
        paths[str(i)] = str(path)
        del expert
    model = copy.deepcopy(base)
    model.config.use_cache = False  # type: ignore[union-attr]  # XLoraModel refuses use_cache=True
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=hidden_size,
        adapters=paths,
        xlora_depth=1,
        layerwise_scalings=False,
    )
    device = next(base.parameters()).device
    xlora = get_peft_model(model, config, autocast_adapter_dtype=False)
    # The experts load onto peft's inferred device; put everything where the base lives.
    return xlora.to(device).eval()  # type: ignore[no-any-return]


V13_ARMS = ("anchor", "V1", "V2", "V3", "V4")
V13_LABELS = {
    "anchor": "v1.3 anchor (BEM r8 + controller)",
    "V1": "V1 PT1 groups + PT2 dynamic rank",
    "V2": "V2 PT1 + attention-statistics gate",
    "V3": "V3 PT3 Kronecker at W_down",
    "V4": "V4 PT4 residual FiLM",
}


def build_v13(
    base: nn.Module, arm: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Module:
    """A v1.3 arm on a copy of the base at its fitted parity, its added weights random (nothing
    short-circuited), its per-example state (code, FiLM's features) fixed from random draws: the timed
    pass is the adapted forward alone, as for the BEM arms with given codes. V2 reads attention
    weights, so it runs eager attention where the other arms may use a fused kernel: part of its cost."""
    from bem.missions.v13 import arms as v13_arms
    from bem.missions.v13.variants import ArmModel

    shape = v13_arms.Shape.of_config(base.config.to_dict())  # type: ignore[operator]
    model = ArmModel(copy.deepcopy(base), arm, shape, v13_arms.fit(arm, shape))
    model = model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.adapter_parameters():
            _seeded_normal_(p, gen, ADAPTER_STD)
        code = torch.randn(batch, model.code_dim, generator=gen).to(device=device, dtype=dtype)
        features = [
            torch.randn(batch, shape.d_model, generator=gen).to(device=device, dtype=dtype)
            for _ in range(shape.layers)
        ]
        model.set_state(code, features)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def added_ratio_ci(
    arm: list[float], ref: list[float], base: list[float], seed: int, n: int = 2000
) -> tuple[float, float]:
    """95% bootstrap interval over rounds of median(arm - base) / median(ref - base)."""
    rng = random.Random(seed)
    k = len(base)
    stats = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        den = statistics.median(ref[i] - base[i] for i in idx)
        if den > 0:
            stats.append(statistics.median(arm[i] - base[i] for i in idx) / den)
    if len(stats) < n // 2:
        return math.nan, math.nan
    return quantile(stats, 0.025), quantile(stats, 0.975)


def device_label(device: torch.device) -> tuple[str, str]:
    """(file-name slug, human name) of the device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "cpu", f"{name} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})"


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: large on CUDA, small on CPU")
    parser.add_argument("--rounds", type=int, help="timed rounds (each times every arm once)")
    parser.add_argument("--warmup", type=int, help="untimed calls per arm before the rounds")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: bench/results/bem_overhead-<device>.json)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads on CPU (default 1; 0 keeps torch's default). On a shared, "
        "oversubscribed box every parallel op waits for a second thread the scheduler may not run "
        "(~10 ms an op), which makes op count, not arithmetic, decide the ratios",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    device = pick_device(args.device)
    if device.type == "cpu" and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    size_name = args.size or ("large" if device.type == "cuda" else "small")
    size = SIZES[size_name]
    rounds = args.rounds or size.rounds
    warmup = size.warmup if args.warmup is None else args.warmup
    dtype = getattr(torch, size.dtype)
    slug, device_name = device_label(device)
    out_path = args.out or REPO / "bench" / "results" / f"bem_overhead-{slug}.json"

    config = tiny_llama_config(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.seq_len,
    )
    config.use_cache = False
    base = build_tiny_llama(config, seed=args.seed)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)  # type: ignore[call-arg]
    targets = [name for name, _ in role_sites(base)]
    n_params = sum(p.numel() for p in base.parameters())
    console.print(
        f"[bold]bem_overhead[/] size={size_name} ({n_params / 1e6:.1f}M params, {len(targets)} sites, "
        f"rank {RANK}) batch={size.batch} seq={size.seq_len} dtype={size.dtype} on {device_name}"
    )

    gen = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(3, config.vocab_size, (size.batch, size.seq_len), generator=gen).to(device)
    k = num_chunks(size.seq_len, CHUNK)
    chunk_codes = torch.randn(size.batch, k, RANK, generator=gen).to(device=device, dtype=dtype)
    token_codes = expand_to_tokens(chunk_codes, size.seq_len, CHUNK)
    row_codes = torch.randn(size.batch, RANK, generator=gen).to(device=device, dtype=dtype)

    lora = build_lora(base, targets, seed=args.seed + 2)
    bem_chunk, att_chunk = build_bem(base, lora_factors(lora))
    bem_row, att_row = build_bem(base, lora_factors(lora))

    def forward(model: nn.Module) -> Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    def with_codes(model: nn.Module, att: Attachment, code: Tensor) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with att.codes(code):
                return forward(model)

        return run

    variants = [(arm, build_v13(base, arm, size.batch, device, dtype, args.seed)) for arm in V13_ARMS]

    def v13_run(model: nn.Module) -> Callable[[], Tensor]:
        mask = torch.ones_like(input_ids)
        return lambda: model(input_ids, mask)

    arms = [
        Arm("base", "base", lambda: forward(base)),
        Arm("lora", "LoRA (peft, unmerged)", lambda: forward(lora)),
        Arm("bem_chunk", f"BEM, chunk codes ({CHUNK} tok)", with_codes(bem_chunk, att_chunk, token_codes)),
        Arm("bem_row", "BEM, one code per row", with_codes(bem_row, att_row, row_codes)),
    ]
    arms += [Arm(f"v13_{name}", V13_LABELS[name], v13_run(model)) for name, model in variants]
    with tempfile.TemporaryDirectory(prefix="bem-bench-xlora-") as tmp:
        try:
            xlora = build_xlora(base, targets, config.hidden_size, args.seed, Path(tmp))
            with torch.inference_mode():
                forward(xlora)
            arms.append(Arm("xlora", "X-LoRA (peft, 2 experts)", lambda: forward(xlora)))
        except Exception as exc:  # a failing X-LoRA is a result to report, not a reason to stop
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            arms.append(Arm("xlora", "X-LoRA (peft, 2 experts)", None, note=f"not run: {reason}"))

    # Sanity: every adapter changes the output, and BEM with an all-ones code equals the LoRA.
    checks: dict[str, float] = {}
    with torch.inference_mode():
        ref = forward(base).float()
        lora_out = forward(lora).float()
        with att_chunk.codes(torch.ones(size.batch, RANK, device=device, dtype=dtype)):
            bem_ones = forward(bem_chunk).float()
        checks["lora_vs_base_max_abs"] = (lora_out - ref).abs().max().item()
        checks["bem_ones_vs_lora_max_abs"] = (bem_ones - lora_out).abs().max().item()
        for arm in arms[2:]:
            if arm.run is not None:
                checks[f"{arm.name}_vs_base_max_abs"] = (arm.run().float() - ref).abs().max().item()
    if min(v for key, v in checks.items() if key.endswith("vs_base_max_abs")) == 0.0:
        raise RuntimeError(f"an adapter arm left the output unchanged: {checks}")
    tolerance = 1e-3 if dtype == torch.float32 else 0.25
    if checks["bem_ones_vs_lora_max_abs"] > tolerance * checks["lora_vs_base_max_abs"]:
        raise RuntimeError(f"BEM with an all-ones code does not reproduce the LoRA: {checks}")

    live = [arm for arm in arms if arm.run is not None]
    order_rng = random.Random(args.seed)
    with torch.inference_mode():
        for arm in live:
            for _ in range(warmup):
                arm.run()  # type: ignore[misc]
        sync(device)
        for r in range(rounds):
            order = live[:]
            order_rng.shuffle(order)
            for arm in order:
                arm.times.append(timed(arm.run, device))  # type: ignore[arg-type]
            if r == 0:
                per_round = sum(arm.times[0] for arm in live)
                console.print(f"round 1/{rounds}: {per_round:.2f}s a round", style="dim")

    base_t = arms[0].times
    rows: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm.run is None:
            rows[arm.name] = {"label": arm.label, "note": arm.note}
            continue
        ratios = [t / b for t, b in zip(arm.times, base_t, strict=True)]
        added = [t - b for t, b in zip(arm.times, base_t, strict=True)]
        rows[arm.name] = {
            "label": arm.label,
            "note": arm.note,
            "median_ms": statistics.median(arm.times) * 1e3,
            "ratio_median": statistics.median(ratios),
            "ratio_q25": quantile(ratios, 0.25),
            "ratio_q75": quantile(ratios, 0.75),
            "added_ms_median": statistics.median(added) * 1e3,
            "times_ms": [round(t * 1e3, 4) for t in arm.times],
        }
    lora_added = rows["lora"]["added_ms_median"]
    for arm in live[1:]:
        row = rows[arm.name]
        row["added_over_lora_added"] = row["added_ms_median"] / lora_added if lora_added > 0 else math.nan

    bem_over_lora = rows["bem_chunk"]["added_over_lora_added"]
    lo, hi = added_ratio_ci(arms[2].times, arms[1].times, base_t, seed=args.seed)
    if math.isnan(bem_over_lora):
        verdict = "unmeasurable: LoRA's added time is within noise (<= 0)"
    elif not math.isnan(hi) and hi <= TARGET:
        verdict = "meets (whole 95% interval <= 1.1)"
    elif not math.isnan(lo) and lo > TARGET:
        verdict = "misses (whole 95% interval > 1.1)"
    else:
        verdict = (
            "meets" if bem_over_lora <= TARGET else "misses"
        ) + " on the median; interval straddles 1.1"

    table = Table(
        title=f"Forward time over base: {size_name} Llama, {device_name}, {rounds} interleaved rounds"
    )
    table.add_column("arm")
    table.add_column("median ms", justify="right")
    table.add_column("x base", justify="right")
    table.add_column("x base IQR", justify="right")
    table.add_column("added ms", justify="right")
    table.add_column("added / LoRA added", justify="right")
    table.add_column("note", overflow="fold")
    for arm in arms:
        row = rows[arm.name]
        if arm.run is None:
            table.add_row(arm.label, "-", "-", "-", "-", "-", row["note"])
            continue
        rel = row.get("added_over_lora_added")
        table.add_row(
            arm.label,
            f"{row['median_ms']:.2f}",
            f"{row['ratio_median']:.4f}",
            f"{row['ratio_q25']:.4f}-{row['ratio_q75']:.4f}",
            "-" if arm.name == "base" else f"{row['added_ms_median']:+.2f}",
            "-" if rel is None else f"{rel:.2f}",
            row["note"],
        )
    console.print(table)
    console.print(
        f"BEM (per-chunk) added / LoRA added = [bold]{bem_over_lora:.2f}[/] "
        f"(95% bootstrap over rounds [{lo:.2f}, {hi:.2f}]); target <= {TARGET}: [bold]{verdict}[/]"
    )

    elapsed = time.perf_counter() - started
    result = {
        "bench": "bem_overhead",
        "target": {"bem_added_over_lora_added_max": TARGET},
        "config": {
            "size": size_name,
            **asdict(size),
            "rounds": rounds,
            "warmup": warmup,
            "rank": RANK,
            "alpha": ALPHA,
            "chunk": CHUNK,
            "n_chunks": k,
            "sites": targets,
            "params": n_params,
            "seed": args.seed,
        },
        "device": {
            "type": device.type,
            "name": device_name,
            "slug": slug,
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "checks": checks,
        "arms": rows,
        "bem_chunk_added_over_lora_added": {"median": bem_over_lora, "ci95": [lo, hi], "verdict": verdict},
        "wall_s": round(elapsed, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    console.print(f"wrote {out_path} in {elapsed:.0f}s", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
