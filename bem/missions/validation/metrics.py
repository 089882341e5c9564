"""Per-example scores of the validation experiment (BEM_SPEC.md section 5): JSON field accuracy and
summary F1, each a float in [0, 1] per example, because the success test pairs per-example scores."""

from __future__ import annotations

import json
from typing import Any

from bem.core.metrics import chrf, chrf_stats, exact_match, token_f1
from bem.missions.validation.data import Example


def _same_value(a: Any, b: Any) -> bool:
    # Plain == would accept JSON true for 1 and 1965.0 for 1965; the target asks for the exact value.
    return type(a) is type(b) and a == b


def json_scores(pred: str, gold: dict[str, Any]) -> tuple[float, float]:
    """(valid, field_accuracy) for a generated JSON object.

    Decoding starts at the first "{" and stops at the matching "}", because a small model often keeps
    generating past the object; that run-on text is a decoding matter, not a wrong answer.
    """
    if not gold:
        raise ValueError("gold has no fields; field accuracy would be undefined")
    text = pred.strip()
    start = text.find("{")
    if start < 0:
        return 0.0, 0.0
    try:
        parsed, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return 0.0, 0.0
    if not isinstance(parsed, dict):
        return 0.0, 0.0
    hits = sum(key in parsed and _same_value(parsed[key], value) for key, value in gold.items())
    return 1.0, hits / len(gold)


def score_example(example: Example, prediction: str) -> dict[str, float]:
    """All scores for one prediction; "score" is the task's primary score, the one the success test uses."""
    if example.task == "json":
        if example.fields is None:
            raise ValueError(f"json example {example.example_id} has no gold fields")
        valid, accuracy = json_scores(prediction, example.fields)
        return {"score": accuracy, "json_valid": valid}
    if example.task == "summary":
        stats = chrf_stats(prediction, example.target)  # corpus chrF's per-example contributions
        return {
            "score": token_f1(prediction, example.target),
            "em": exact_match(prediction, example.target),
            "chrf": chrf(prediction, example.target),
            **{f"chrf#{i}": v for i, v in enumerate(stats)},
        }
    raise ValueError(f"unknown task {example.task!r}; expected json or summary")
