"""The DuckDB store on a real file: idempotent batches, attempt-aware score rows, read-only SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetd.store import SqlRefused, Store
from schemas import messages as m


def ev(cls: type, seq: int, attempt: int = 1, **fields: object) -> m.Event:
    return cls(mission_id="mi", task_id="mi/t", attempt=attempt, seq=seq, worker="w", ts=1.0, **fields)


def batch(attempt: int = 1) -> list[m.Event]:
    return [
        ev(m.Started, 0, attempt),
        ev(m.Metrics, 1, attempt, series={"loss": m.Series([0, 1, 2], [3.0, 2.0, 1.0], [1.0, 1.1, 1.2])}),
        ev(
            m.Scores,
            2,
            attempt,
            example_id=["e1", "e2"],
            arm=["a", "a"],
            seed=[1, 1],
            metric=["em", "em"],
            value=[1.0, 0.0],
        ),
        ev(m.Log, 3, attempt, lines=["hello", "world"]),
        ev(m.Finished, 4, attempt, result={"ok": True}),
    ]


def counts(store: Store) -> dict[str, int]:
    return {
        t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"]
        for t in ("events", "metrics", "example_scores", "logs")
    }


def test_a_redelivered_batch_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.duckdb")
    first = store.apply(batch(), current_attempt={"mi/t": 1})
    assert len(first.new) == 5 and first.points == 3
    before = counts(store)
    assert before == {"events": 5, "metrics": 3, "example_scores": 2, "logs": 2}
    again = store.apply(batch() + batch(), current_attempt={"mi/t": 1})
    assert again.new == [] and again.duplicates == 10
    assert counts(store) == before
    store.close()
    reopened = Store(tmp_path / "f.duckdb")  # migrations are not re-run on an existing file
    assert counts(reopened) == before
    assert reopened.existing_events([("mi/t", 1, 4), ("mi/t", 1, 9)]) == {("mi/t", 1, 4)}


def test_scores_of_a_stale_attempt_are_not_result_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.duckdb")
    store.apply(batch(attempt=1), current_attempt={"mi/t": 2})  # attempt 1 was given up on
    assert counts(store)["example_scores"] == 0 and counts(store)["events"] == 5
    store.apply(batch(attempt=2), current_attempt={"mi/t": 2})
    assert store.query("SELECT DISTINCT attempt FROM example_scores") == [{"attempt": 2}]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM tasks",
        "INSERT INTO tasks (task_id) VALUES ('x')",
        "DROP TABLE tasks",
        "UPDATE tasks SET state = 'x'",
        "SELECT 1; DELETE FROM tasks",
        "COPY tasks TO '/tmp/x.csv'",
        "ATTACH '/tmp/other.duckdb'",
        "CREATE TABLE t (a INT)",
        "SELEC 1",
    ],
)
def test_sql_is_read_only(tmp_path: Path, sql: str) -> None:
    store = Store(tmp_path / "f.duckdb")
    store.apply(batch(), current_attempt={})
    with pytest.raises(SqlRefused):
        store.read_only_sql(sql)
    assert counts(store)["events"] == 5
    cols, rows, truncated = store.read_only_sql("SELECT kind FROM events ORDER BY seq", limit=3)
    assert cols == ["kind"] and [r[0] for r in rows] == ["started", "metrics", "scores"] and truncated


def test_task_values_take_the_median_of_each_key_over_the_tasks_that_report_it(tmp_path: Path) -> None:
    from fleetd.judge import task_values
    from fleetd.scheduler import Task
    from schemas import missions as specs

    store = Store(tmp_path / "fleet.duckdb")
    spec = specs.load(specs.find("selftest", specs.MISSIONS_DIR), {})
    tasks = [Task.from_plan("mi", p, i) for i, p in enumerate(specs.expand(spec, "smoke", "mi"))][:5]
    mission = {
        "mission_id": "mi", "name": "selftest", "profile": "smoke", "state": "running", "verdict": None,
        "reason": None, "spec": "{}", "overrides": "{}", "submitted_at": 1.0, "finished_at": None,
    }  # fmt: skip
    store.apply(new_mission=(mission, [t.row() for t in tasks]))
    results = [
        {"values": {"ratio": 1.0, "other": 3.0}}, {"values": {"ratio": 0.5}}, {"values": {"ratio": 0.6}},
        {"x": 1}, None,
    ]  # fmt: skip
    for t, result in zip(tasks, results, strict=True):
        state = "failed" if result is None else "succeeded"
        store.apply(task_updates=[(t.task_id, {"state": state, "result": result})])
    got = store.task_results("mi")
    assert sorted(map(str, got)) == sorted(map(str, results[:4]))  # the failed task's result is left out
    assert task_values(got) == {"ratio": 0.6, "other": 3.0}  # the median: one outlying seed does not decide
