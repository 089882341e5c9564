"""Task kinds: the thin glue from an assignment's params to a library call (docs/architecture.md).

`fleet.registry.KINDS` maps each kind's name to "module:function" in this package, so fleetd checks a
spec's kinds without importing torch, and a task's child process imports only what its kind needs.
A kind is `fn(params, ctx) -> dict` (the result); it reports through `ctx.reporter` and raises to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bem.core.reporter import Reporter
from fleet import registry


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    mission_id: str
    attempt: int
    out_dir: Path  # <home>/runs/<task_id>/attempt-N, created
    cache_dir: Path  # shared by tasks on this machine (the demo base lives here)
    device: str  # "cuda" (the worker's one GPU is cuda:0) or "cpu"
    reporter: Reporter


def resolve(kind: str) -> Callable[[dict[str, Any], TaskContext], dict[str, Any]]:
    if kind not in registry.KINDS:
        raise KeyError(f"unknown task kind {kind!r}; known: {sorted(registry.KINDS)}")
    fn: Callable[[dict[str, Any], TaskContext], dict[str, Any]] = registry.resolve(registry.KINDS[kind])
    return fn
