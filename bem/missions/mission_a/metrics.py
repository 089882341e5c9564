"""Mission A's scores (BEM_SPEC.md section 6, metrics): EM and F1 of an answer, and the index-swap
checks (answers follow the table the way they should when the index is shuffled or corrupted)."""

from __future__ import annotations

from bem.core.metrics import exact_match, token_f1


def score(pred: str, golds: tuple[str, ...]) -> tuple[float, float]:
    """(EM, F1), SQuAD-normalised, the best over the golds."""
    return exact_match(pred, golds), token_f1(pred, golds)


def monotonicity(scores: dict[str, float]) -> dict[str, bool]:
    """The index-swap checks on mean scores per condition (BEM_SPEC.md section 6, metrics)."""
    clean = scores["clean"]

    def within(name: str, tol: float) -> bool:
        return abs(scores[name] - clean) <= tol * max(clean, 1e-9)

    def drop_at_most(name: str, tol: float) -> bool:
        return clean - scores[name] <= tol * max(clean, 1e-9)

    return {
        "shuffled": within("shuffled", 0.05),
        "reversed": within("reversed", 0.05),
        "partial": drop_at_most("partial", 0.10),
        "heavy": drop_at_most("heavy", 0.20),
        "duplicated": within("duplicated", 0.15),
        "ordered": clean >= scores["partial"] >= scores["heavy"],
    }


def pass_rate(checks: dict[str, bool]) -> float:
    return sum(checks.values()) / len(checks)
