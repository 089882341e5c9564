"""`fleetctl submit MISSION --profile full --dry-run`: no fleet, no GPU, no weights.

For each mission the parameters it reports for a tiny Llama's config.json must be those of a real model
built from the same config on the CPU with the adapters attached by the recipe's own training code
(a step or two of it); a bigger base against a small `vram_gb` must be flagged; a base folder that is
missing or not local must be an error naming the task and the path.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bem.core.dryrun import count
from bem.core.models import build_tiny_llama, byte_tokenizer, save_model, tiny_llama_config
from bem.core.reporter import MemoryReporter
from bem.missions.mission_a import recipe as ma
from bem.missions.mission_b import recipe as mb
from bem.missions.validation import recipe as val
from bem.missions.validation.data import make_dataset
from fleetcli import fleetctl
from schemas import missions as specs


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama's config.json and nothing else."""
    path = tmp_path_factory.mktemp("config-only")
    tiny_llama_config().save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def dry_run(capsys: pytest.CaptureFixture[str], mission: str, *args: str) -> tuple[int, Any]:
    """Exit status and the --json output (a dict), or the text printed when `--json` is not asked."""
    capsys.readouterr()
    rc = fleetctl.main(["submit", mission, "--profile", "full", "--dry-run", *args])
    out = capsys.readouterr()
    if "--json" not in args:
        return rc, out.out + out.err
    return rc, json.loads(out.out)


def full(capsys: pytest.CaptureFixture[str], mission: str, base: Path, *args: str) -> dict[str, Any]:
    rc, out = dry_run(capsys, mission, "--json", "--set", f"profiles.full.params.base={base}", *args)
    assert rc == 0 and out["ok"] and out["profile"] == "full", out
    return out


def built(out: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    tasks = [t for t in out["tasks"] if t["kind"] == kind]
    assert tasks and all(t["result"] == tasks[0]["result"] for t in tasks)  # the seed changes nothing
    return tasks


def check_base_stage(out: dict[str, Any], base: Path) -> None:
    (stage,) = [t for t in out["tasks"] if t["kind"] == "demo.base"]
    assert stage["fits"] is None and "nothing to build" in stage["result"]["nothing"]
    assert str(base) in stage["result"]["nothing"]


def test_demo_counts_are_the_recipes(
    capsys: pytest.CaptureFixture[str], config_dir: Path, tmp_path: Path
) -> None:
    out = full(capsys, "demo", config_dir)
    check_base_stage(out, config_dir)
    tasks = built(out, "demo.validate")
    assert [t["task"] for t in tasks] == [f"validate-s{s}" for s in (1, 2, 3, 4, 5)]
    assert all(t["fits"] is True and t["vram_gb"] == 8 for t in tasks)
    got = tasks[0]["result"]

    # The real thing: the recipe's LoRAs, composition and controller, a step each, on the CPU.
    prof = replace(val.PROFILES["full"], lora_steps=1, controller_steps=1, batch_size=2)  # counts only
    model = build_tiny_llama(tiny_llama_config()).requires_grad_(False)
    base_params = count([model])
    tok, gen, rep = byte_tokenizer(), torch.Generator().manual_seed(0), MemoryReporter()
    train = make_dataset(val.DATA_SEED, {"train": 16})["train"]
    loras = val.train_loras(model, tok, train, profile=prof, generator=gen, reporter=rep, out=tmp_path)
    att, ctrl = val.compose_and_train_controller(
        model, tok, loras, train, 1, profile=prof, generator=gen, reporter=rep, out=tmp_path
    )
    assert got["base"]["parameters"] == base_params == att.base_parameters()
    assert got["adapters"] == {
        **{f"lora_{n}": sum(a.numel() + b.numel() for a, b in f.values()) for n, f in loras.items()},
        "bem": att.num_parameters(),
        "controller": count([ctrl]),
    }
    assert [p["trainable"] for p in got["phases"]] == [
        *(got["adapters"][f"lora_{n}"] for n in ("json", "summary", "multitask")),
        0,
        count([ctrl]),
    ]


def test_mission_a_counts_are_the_recipes(capsys: pytest.CaptureFixture[str], config_dir: Path) -> None:
    out = full(capsys, "mission_a", config_dir)
    check_base_stage(out, config_dir)
    got = built(out, "mission_a.run")[0]["result"]

    prof = replace(ma.PROFILES["full"], n_single=4, n_composite=2, n_test=2, lora_steps=1, batch_size=2)
    model = build_tiny_llama(tiny_llama_config()).requires_grad_(False)
    tok, data = byte_tokenizer(), ma.make_data(prof)
    gen, rep = torch.Generator().manual_seed(0), MemoryReporter()
    factors, policy, fused_rank = ma.train_adapters(model, tok, data, prof, gen, rep)
    composed = ma.compose(model, tok, factors, data)
    par = ma.adapter_parity(factors, policy, fused_rank)
    assert got["base"]["parameters"] == composed.att.base_parameters()
    assert got["fused_rank"] == fused_rank
    assert got["adapters"] == {
        **{f"expert_{s}": sum(a.numel() + b.numel() for a, b in factors[s].values()) for s in ma.EXPERTS},
        "fused": sum(a.numel() + b.numel() for a, b in factors["fused"].values()),
        "router": count([policy]),
        "blocks": composed.att.num_parameters(),
    }
    assert got["parity"] == {"parameter_ratio": par.parameter_ratio, "flops_ratio": par.flops_ratio}


def test_mission_b_counts_are_the_recipes(
    capsys: pytest.CaptureFixture[str], config_dir: Path, tmp_path: Path
) -> None:
    out = full(capsys, "mission_b", config_dir)
    check_base_stage(out, config_dir)
    tasks = built(out, "online.stream")
    assert [t["task"] for t in tasks] == ["stream-s1", "stream-s2", "stream-s3", "soak"]
    got = tasks[0]["result"]

    # deploy_model loads weights: the same config, saved with them.
    save_model(build_tiny_llama(tiny_llama_config()), byte_tokenizer(), tmp_path)
    prof = replace(mb.PROFILES["full"], deploy_steps=1, deploy_batch=2)
    online, _, _ = mb.deploy_model(tmp_path, prof, 1, "cpu", MemoryReporter())
    assert got["base"]["parameters"] == online.attachment.base_parameters()
    controller = count([online.controller])
    assert got["adapters"] == {"bem": online.attachment.num_parameters(), "controller": controller}
    trainable = {p["name"]: p["trainable"] for p in got["phases"]}
    assert trainable == {
        "deploy": controller + online.attachment.num_parameters(),
        "online update": controller,
        "drift probes": 0,
    }


def bigger_base(path: Path) -> Path:
    tiny_llama_config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
    ).save_pretrained(path)
    return path


def test_a_base_that_does_not_fit_is_flagged(
    capsys: pytest.CaptureFixture[str], config_dir: Path, tmp_path: Path
) -> None:
    big = bigger_base(tmp_path / "big")
    small = full(capsys, "demo", config_dir)
    rc, out = dry_run(capsys, "demo", "--json", "--set", f"profiles.full.params.base={big}")
    assert rc == 0, out  # 8 GiB holds it
    tasks = built(out, "demo.validate")
    peak = tasks[0]["result"]["peak"]["bytes"]
    assert peak > built(small, "demo.validate")[0]["result"]["peak"]["bytes"]
    assert 0.5 * 2**30 < peak < 8 * 2**30

    over = ["--set", f"profiles.full.params.base={big}", "--set", "profiles.full.vram_gb=0.5"]
    rc, out = dry_run(capsys, "demo", "--json", *over)
    assert rc == 1 and [t["fits"] for t in built(out, "demo.validate")] == [False] * 5
    assert built(out, "demo.validate")[0]["result"]["peak"]["bytes"] == peak
    rc, text = dry_run(capsys, "demo", *over)
    assert rc == 1 and "DOES NOT FIT" in text and "nothing submitted" in text


def test_a_missing_or_unset_base_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    rc, out = dry_run(capsys, "mission_b", "--json", "--set", f"profiles.full.params.base={missing}")
    assert rc == 2 and not out["ok"]
    message = out["error"]["message"]
    assert message.startswith("mission_b/base (demo.base): params.base") and str(missing) in message
    assert "nothing is downloaded" in message
    rc, text = dry_run(capsys, "mission_a", "--set", "profiles.full.params.base=org/hub-model")
    assert rc == 2 and "mission_a/base" in text and "org/hub-model is not a local model folder" in text
    rc, out = dry_run(capsys, "demo", "--json")
    assert rc == 2 and "demo/base (demo.base): params.base is not set" in out["error"]["message"]


def test_the_mission_is_read_locally(
    capsys: pytest.CaptureFixture[str], config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--missions-dir, else $FLEET_MISSIONS_DIR; only with --dry-run."""
    text = (specs.MISSIONS_DIR / "demo.toml").read_text().replace("vram_gb = 8\n", "vram_gb = 0.001\n")
    (tmp_path / "demo.toml").write_text(text)
    rc, out = dry_run(capsys, "demo", "--json", "--set", f"profiles.full.params.base={config_dir}")
    assert rc == 0
    monkeypatch.setenv("FLEET_MISSIONS_DIR", str(tmp_path))
    rc, out = dry_run(capsys, "demo", "--json", "--set", f"profiles.full.params.base={config_dir}")
    assert rc == 1 and built(out, "demo.validate")[0]["vram_gb"] == 0.001
    monkeypatch.delenv("FLEET_MISSIONS_DIR")
    rc, out = dry_run(
        capsys,
        "demo",
        "--json",
        "--missions-dir",
        str(tmp_path),
        "--set",
        f"profiles.full.params.base={config_dir}",
    )
    assert rc == 1
    with pytest.raises(SystemExit) as refused:
        fleetctl.main(["submit", "demo", "--missions-dir", str(tmp_path)])
    assert refused.value.code == 2


def test_mission_c_counts_are_the_recipes(capsys: pytest.CaptureFixture[str], config_dir: Path) -> None:
    from bem.core.train import LORA_RANK, train_lora
    from bem.missions.mission_c import basis
    from bem.missions.mission_c import recipe as mc
    from bem.missions.mission_c.safety import skill_bases

    out = full(capsys, "mission_c", config_dir)
    check_base_stage(out, config_dir)
    got = built(out, "mission_c.run")[0]["result"]

    # The real thing: the skill LoRA a step, its subspaces, one overlay per layer at the full r_s.
    model = build_tiny_llama(tiny_llama_config()).requires_grad_(False)
    data = mc.make_data(replace(mc.PROFILES["full"], n_utility=4, n_attack=1, n_test=1, n_dev=1))
    skilled = train_lora(
        model, byte_tokenizer(), data.utility, rank=LORA_RANK, steps=1, lr=1e-3, batch_size=2,
        generator=torch.Generator().manual_seed(0), reporter=MemoryReporter(), name="skill",
    )  # fmt: skip
    lora = count([p for p in skilled.parameters() if p.requires_grad])
    rank = mc.PROFILES["full"].safety.rank
    overlays = [basis.SafetyOverlay(s, r_s=rank) for s in skill_bases(skilled).values()]
    assert got["adapters"] == {"skill_lora": lora, "overlays": count(overlays), "safety_lora": lora}
    assert got["layers"] == len(overlays) and got["overlay_rank"] == rank
    assert [p["trainable"] for p in got["phases"]] == [lora, 0, count(overlays), lora, 0]


def test_mission_d_counts_are_the_recipes(capsys: pytest.CaptureFixture[str], config_dir: Path) -> None:
    from bem.missions.mission_d.recipe import PROFILES as MD
    from bem.missions.mission_d.train import ArmModel

    out = full(capsys, "mission_d", config_dir)
    check_base_stage(out, config_dir)
    got = built(out, "mission_d.run")[0]["result"]
    # The real thing: the arm model the recipe trains, on the same shapes.
    arm = ArmModel(build_tiny_llama(tiny_llama_config()), MD["full"].train)
    adapters = count(arm.adapter_parameters())
    assert got["adapters"] == {
        "bem_sites": arm.attachment.num_parameters(),
        "controller": count([arm.controller]),
    }
    assert [p["trainable"] for p in got["phases"]] == [adapters, adapters + count(arm.base_parameters()), 0]
    assert got["rank"] == MD["full"].train.rank
