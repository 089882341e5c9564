"""Mission B's prompt stream (BEM_SPEC.md section 7): the traffic an online learner serves, with
failures injected on a schedule.

The stream draws Mission A's table questions (`bem.skills`), answered in JSON. From its prompt index
on, an injected scenario changes what a right answer is, as production traffic does:
- format_change: the JSON key is renamed (`{"answer": ...}` becomes `{"result": ...}`);
- domain_shift: a new topic and vocabulary (other names, other attributes);
- new_api_signature: the tool call's name and argument order change (`fetch(attr, name)`).
Scenarios stack in schedule order; every item says which are active, so time-to-fix is measured from
each injection. Everything is seeded: the same arguments give the same stream.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SCENARIOS = ("format_change", "domain_shift", "new_api_signature")
NAMES = ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo")
SHIFTED_NAMES = ("kai", "lu", "mo", "ned", "oz", "pia", "quin", "rex", "sol", "tess")
ATTRIBUTES = ("age", "score")
SHIFTED_ATTRIBUTES = ("height", "weight")


@dataclass(frozen=True)
class StreamItem:
    index: int
    example_id: str
    prompt: str
    target: str
    active: tuple[str, ...]  # the injected scenarios in force at this prompt


def _render(item: dict[str, object], active: set[str]) -> tuple[str, str]:
    table: list[tuple[str, dict[str, int]]] = item["table"]  # type: ignore[assignment]
    name, attr, value = item["name"], item["attr"], item["value"]
    context = "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in a.items()) for n, a in table)
    call = f"fetch({attr}, {name})" if "new_api_signature" in active else f"lookup({name}, {attr})"
    key = "result" if "format_change" in active else "answer"
    prompt = f"context: {context}\ncall: {call}\njson: "
    return prompt, json.dumps({key: value}, separators=(", ", ": "))


def _draw(rng: random.Random, shifted: bool) -> dict[str, object]:
    names = SHIFTED_NAMES if shifted else NAMES
    attrs = SHIFTED_ATTRIBUTES if shifted else ATTRIBUTES
    rows = [(n, {a: rng.randint(1, 60) for a in attrs}) for n in rng.sample(names, 3)]
    name, values = rng.choice(rows)
    attr = rng.choice(attrs)
    return {"table": rows, "name": name, "attr": attr, "value": values[attr]}


def prompt_stream(n: int, seed: int, schedule: Sequence[tuple[int, str]] = ()) -> Iterator[StreamItem]:
    """`n` prompts; `schedule` is [(prompt index, scenario)], each scenario injected once."""
    for at, scenario in schedule:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; scenarios: {SCENARIOS}")
        if not 0 <= at < n:
            raise ValueError(f"injection {scenario!r} at prompt {at} is outside the stream (0..{n - 1})")
    rng = random.Random(f"online/{seed}")
    active: set[str] = set()
    starts = dict((at, s) for at, s in schedule)
    for i in range(n):
        if i in starts:
            active.add(starts[i])
        prompt, target = _render(_draw(rng, "domain_shift" in active), active)
        digest = hashlib.sha1(f"{prompt}\0{target}".encode()).hexdigest()[:8]
        yield StreamItem(i, f"stream-{seed}-{i:06d}-{digest}", prompt, target, tuple(sorted(active)))


def probe_set(n: int = 256, seed: int = 0) -> list[StreamItem]:
    """The fixed probes drift is measured on: clean traffic, never trained on (its own seed space)."""
    return list(prompt_stream(n, seed=10_000 + seed))


def time_to_fix(
    metric: Sequence[float], injected_at: int, canary_ok: Sequence[bool], censor: int = 1000
) -> int:
    """Prompts after an injection until the metric is back: the least k ≥ 20 with
    |mean(last min(k, 100) post-injection prompts) − mean(100 prompts before)| ≤ .02 and the latest
    canary passing; `censor` (a failure) if that never happens within it."""
    pre = metric[max(0, injected_at - 100) : injected_at]
    if not pre:
        raise ValueError("time-to-fix needs prompts before the injection")
    m_pre = sum(pre) / len(pre)
    for k in range(20, min(censor, len(metric) - injected_at) + 1):
        window = metric[injected_at + k - min(k, 100) : injected_at + k]
        if abs(sum(window) / len(window) - m_pre) <= 0.02 and canary_ok[injected_at + k - 1]:
            return k
    return censor
