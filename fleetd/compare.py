"""What differs between two missions' inputs (`fleetctl compare`): the frozen specs, the overrides,
the code commits and the package versions their workers recorded, so that a change in the numbers
can be traced to a change in the inputs. Pure: rows and task results in, differences out."""

from __future__ import annotations

import json
from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (lists of tables by their `name` where they have one)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for v in value:
            out.update(flatten({k: x for k, x in v.items() if k != "name"}, f"{prefix}.{v['name']}"))
        return out
    return {prefix: value}


def _loaded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def environments(results: list[dict[str, Any] | None]) -> dict[str, set[str]]:
    """Across a mission's task results: the git commits (marked dirty where they were) and each
    package's versions."""
    found: dict[str, set[str]] = {"code": set()}
    for result in results:
        env = (result or {}).get("environment")
        if not isinstance(env, dict):
            continue
        if env.get("git_commit"):
            found["code"].add(f"{env['git_commit']}{' (dirty)' if env.get('git_dirty') else ''}")
        for name, version in (env.get("packages") or {}).items():
            found.setdefault(f"packages.{name}", set()).add(str(version))
        if env.get("python"):
            found.setdefault("python", set()).add(str(env["python"]))
    return found


def input_diff(
    a: dict[str, Any], b: dict[str, Any], env_a: dict[str, set[str]], env_b: dict[str, set[str]]
) -> list[dict[str, Any]]:
    """Rows {what, key, a, b} for each input that differs: spec, overrides, code, packages."""
    rows = []
    for what in ("spec", "overrides"):
        fa, fb = flatten(_loaded(a.get(what)) or {}), flatten(_loaded(b.get(what)) or {})
        for key in sorted(set(fa) | set(fb)):
            if fa.get(key) != fb.get(key):
                rows.append({"what": what, "key": key, "a": fa.get(key), "b": fb.get(key)})
    for key in sorted(set(env_a) | set(env_b)):
        va, vb = sorted(env_a.get(key, set())), sorted(env_b.get(key, set()))
        if va != vb:
            what = "code" if key == "code" else "environment"
            rows.append({"what": what, "key": key, "a": ", ".join(va) or None, "b": ", ".join(vb) or None})
    return rows
