"""bem: controller-generated low-rank adapters (BEMs) on frozen Hugging Face transformers.

A library first: nothing here imports the fleet, NATS or DuckDB (BEM_SPEC.md has the maths). The
core is `bem.core`; the research missions, each in its own folder, are `bem.missions`. The names
below are the public surface, loaded on first use, so `import bem` (and `bem.core.reporter`, which a
fleet worker imports before any task) stays free of torch until a model part is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "core.layers": ("BEMLinear",),
    "core.attach": ("Attachment", "attach_bems", "role_sites"),
    "core.controllers": ("SimpleController", "HierarchicalController", "TokenController"),
    "core.routing": ("ChunkStickyRouter", "router_regularisers"),
    "core.chunked": ("chunked_forward", "read_hidden"),
    "core.cache": ("BlockPrefixCache", "cache_safety_rate", "kv_hit_ratio"),
    "core.governance": ("orthogonalize_blocks", "sigma_clamp", "trust_region"),
    "core.export": ("export_peft", "save_bem", "load_bem"),
    "core.parity": ("Cost", "parity"),
    "core.models": (
        "build_tiny_llama", "byte_tokenizer", "demo_base", "load_model", "save_model", "tiny_llama_config",
    ),
    "core.generate": ("greedy_generate",),
    "core.train": ("lm_loss", "train_lora"),
    "core.reporter": ("MemoryReporter", "Reporter", "ScoreRow"),
}  # fmt: skip
_WHERE = {name: f"bem.{module}" for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bem' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
