"""Task kinds: the thin glue from an assignment's params to a library call (docs/architecture.md).

`fleet.registry.KINDS` maps each kind's name to "module:function" in this package, so fleetd checks a
spec's kinds without importing torch, and a task's child process imports only what its kind needs.
A kind is `fn(params, ctx) -> dict` (the result); it reports through `ctx.reporter` and raises to fail.
Beside it, its module may define `dry_run(params, fn) -> dict`: what a task of kind `fn` (the
registry string's attribute) would build, estimated without weights or a GPU (`fleetctl submit
--dry-run`, `bem.core.dryrun`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # The local copies of what earlier tasks left (their results' `outputs`), by name. A kind leaves
    # something for later tasks by returning {"outputs": {name: absolute path}} in its result.
    inputs: dict[str, Path] = field(default_factory=dict)


def resolve(kind: str) -> Callable[[dict[str, Any], TaskContext], dict[str, Any]]:
    if kind not in registry.KINDS:
        raise KeyError(f"unknown task kind {kind!r}; known: {sorted(registry.KINDS)}")
    fn: Callable[[dict[str, Any], TaskContext], dict[str, Any]] = registry.resolve(registry.KINDS[kind])
    return fn


def dry_run(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """A task's dry run: the `dry_run(params, fn)` in the module of its kind's function (found through
    the same registry string), or `{"nothing": why}` for a kind whose module has none."""
    if kind not in registry.KINDS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(registry.KINDS)}")
    module, _, fn = registry.KINDS[kind].partition(":")
    found: Callable[[dict[str, Any], str], dict[str, Any]] | None = getattr(
        importlib.import_module(module), "dry_run", None
    )
    if found is None:
        return {"nothing": f"{kind} builds no model: nothing to estimate"}
    return found(params, fn)
