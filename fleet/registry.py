"""The mission registry: which code runs each task kind and each reactive service, by name.

Values are "module:attribute" strings, never imports, so fleetd checks a mission spec's kinds and
services without importing torch or `bem`, and a task's process imports only what its kind needs.
A new task kind or service is one line here (docs/architecture.md says where its code goes).
"""

from __future__ import annotations

import importlib
from typing import Any

# A kind is `fn(params, ctx) -> dict` (the task's result), run in the task's own process.
KINDS: dict[str, str] = {
    "noop": "workers.kinds.selftest:noop",
    "selftest.sleep": "workers.kinds.selftest:sleep",
    "selftest.flaky": "workers.kinds.selftest:flaky",
    "selftest.crash": "workers.kinds.selftest:crash",
    "selftest.score": "workers.kinds.selftest:score",
    "selftest.obey": "workers.kinds.selftest:obey",
    "selftest.make": "workers.kinds.selftest:make",
    "selftest.use": "workers.kinds.selftest:use",
    "demo.base": "workers.kinds.demo:base",
    "demo.validate": "workers.kinds.demo:validate",
    "mission_a.run": "workers.kinds.mission_a:run",
    "mission_c.run": "workers.kinds.mission_c:run",
    "mission_c.overlay": "workers.kinds.mission_c:overlay",
    "mission_d.run": "workers.kinds.mission_d:run",
    "mission_e.run": "workers.kinds.mission_e:run",
    "online.stream": "workers.kinds.mission_b:stream",
    "v13.run": "workers.kinds.v13:run",
}

# A kind may name a check of its tasks' params that fleetd runs at submit: `check(params)`, pure
# Python (no torch), raising ValueError naming what is wrong; the spec is then refused with it.
CHECKS: dict[str, str] = {
    "v13.run": "bem.missions.v13.arms:check",  # each arm at parity with its baseline
}

# A service is a class with `from_config(table) -> watch`, the watch's `observe(points) -> actions`
# (fleetd/services.py says the rest); a stage names the services that watch its tasks.
SERVICES: dict[str, str] = {
    "promotion": "stats.promotion:PromotionWatch",  # Mission B's drift monitor and canary gate
    "overlay": "stats.overlay:OverlayWatch",  # Mission C's safety overlay: raises κ on a violation spike
}


def resolve(ref: str) -> Any:
    """The object a "module:attribute" reference names, imported now."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
