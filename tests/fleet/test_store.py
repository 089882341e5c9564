"""The DuckDB store on a real file: idempotent batches, attempt-aware score rows, read-only SQL, and the
tasks table derived from `schemas.missions.Task` (migrations from the first schema, refusals)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import duckdb
import msgspec
import pyarrow.parquet as pq
import pytest

from fleetd.store import (
    MIGRATIONS,
    TASK_COLUMNS,
    SchemaMismatch,
    SqlRefused,
    Store,
    create_table,
    task_from_row,
    task_row,
)
from schemas import messages as m
from schemas import missions as specs
from schemas.missions import Task


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


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_text('{secret}')",
        "SELECT * FROM read_blob('{secret}')",
        "SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM glob('{home}/*')",
        "SELECT * FROM read_parquet('{home}/*.parquet')",
        "SELECT * FROM '{secret}'",
    ],
)
def test_sql_reads_no_file_outside_the_tables(tmp_path: Path, sql: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("FLEET_WEB_TOKEN=hunter2\n")
    store = Store(tmp_path / "f.duckdb")
    with pytest.raises(SqlRefused) as refused:
        store.read_only_sql(sql.format(secret=secret, home=tmp_path))
    # A file function is refused by the lock; a bare path is no table at all (no replacement scan).
    assert "tables only" in str(refused.value) or "does not exist" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(duckdb.Error, match="configuration"):  # and the lock cannot be undone
        store.con.execute("SET enable_external_access = true")
    store.apply(batch(), current_attempt={})  # the fleet's own writes are unaffected
    assert counts(store)["events"] == 5


def test_a_slow_query_is_stopped_at_the_time_limit(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.duckdb")
    started = time.perf_counter()
    with pytest.raises(SqlRefused, match=r"ran past 0\.3 s"):
        store.read_only_sql("SELECT count(*) FROM range(1000000000000)", timeout_s=0.3)
    assert time.perf_counter() - started < 10
    assert store.read_only_sql("SELECT 1 AS one", timeout_s=0.3)[1] == [[1]]  # the next query runs


def test_export_chunks_carry_every_row_once_within_the_budget(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.duckdb")
    store.con.execute("INSERT INTO metrics SELECT 't', 1, 'loss', i, i / 7, 0 FROM range(30000) t(i)")
    store.con.execute("DELETE FROM metrics WHERE step % 10 = 3")  # holes in rowid
    after, steps, sizes = -1, [], []
    while True:
        data, rows, after = store.export_chunk("metrics", after, budget=64 * 1024)
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == rows and "_rowid" not in table.column_names
        if rows == 0:
            assert table.column_names == ["task_id", "attempt", "name", "step", "value", "time"]
            break
        steps += table.column("step").to_pylist()
        sizes.append(len(data))
    assert steps == [i for i in range(30000) if i % 10 != 3]
    assert len(sizes) > 1 and max(sizes) <= 64 * 1024
    with pytest.raises(SqlRefused, match="no exported table"):
        store.export_chunk("schema_version; DROP TABLE tasks", -1)


def test_task_values_take_the_median_of_each_key_over_the_tasks_that_report_it(tmp_path: Path) -> None:
    from fleetd.judge import task_values

    store = Store(tmp_path / "fleet.duckdb")
    spec = specs.load(specs.find("selftest", specs.MISSIONS_DIR), {})
    tasks = specs.expand(spec, "smoke", "mi")[:5]
    mission = {
        "mission_id": "mi", "name": "selftest", "profile": "smoke", "state": "running", "verdict": None,
        "reason": None, "spec": "{}", "overrides": "{}", "submitted_at": 1.0, "finished_at": None,
    }  # fmt: skip
    store.apply(new_mission=(mission, [task_row(t) for t in tasks]))
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


# ---- the tasks table derives from schemas.missions.Task -----------------------------------------

# The tasks table as migration 1 wrote it by hand before the table derived from Task: the historical
# schema an existing database has. Kept literally; do not derive it. The other tables of migration 1
# did not change, so they come from the migration itself.
HISTORICAL_TASKS = """
    CREATE TABLE tasks (
        task_id VARCHAR PRIMARY KEY, mission_id VARCHAR, name VARCHAR, stage VARCHAR, kind VARCHAR,
        arm VARCHAR, seed INTEGER, params JSON, deps VARCHAR[], vram_gb DOUBLE, gpu_class VARCHAR,
        timeout_s DOUBLE, max_attempts INTEGER, max_infra_attempts INTEGER,
        state VARCHAR, pending_reason VARCHAR, attempt INTEGER, task_failures INTEGER,
        infra_failures INTEGER, worker VARCHAR, error VARCHAR, result JSON, excluded_workers JSON,
        created_at DOUBLE, assigned_at DOUBLE, started_at DOUBLE, finished_at DOUBLE);
"""
HISTORICAL_V1 = MIGRATIONS[0].replace(create_table("tasks", TASK_COLUMNS, "task_id"), HISTORICAL_TASKS)
assert MIGRATIONS[0] != HISTORICAL_V1, "the derived tasks table is no longer in migration 1 as expected"
HISTORICAL_V2 = """
    CREATE TABLE service_decisions (
        mission_id VARCHAR, task_id VARCHAR, attempt INTEGER, service VARCHAR, step BIGINT,
        decision VARCHAR, level VARCHAR, value DOUBLE, reason VARCHAR, acked BOOLEAN, detail VARCHAR,
        decided_at DOUBLE, PRIMARY KEY (task_id, attempt, service, step));
"""


def task_columns(store: Store) -> list[tuple[str, str]]:
    return [(r["column_name"], r["column_type"]) for r in store.query("DESCRIBE tasks")]


def test_the_tasks_table_is_the_task_struct(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.duckdb")
    assert TASK_COLUMNS["excluded_workers"] == TASK_COLUMNS["deps"] == "VARCHAR[]"
    assert TASK_COLUMNS["params"] == TASK_COLUMNS["result"] == "JSON"
    assert task_columns(store) == list(TASK_COLUMNS.items())
    assert [c for c, _ in task_columns(store)] == [f.name for f in msgspec.structs.fields(Task)]
    # A row round-trips: lists stay lists (no JSON special case), dicts go through JSON.
    spec = specs.load(specs.find("selftest", specs.MISSIONS_DIR), {})
    tasks = specs.expand(spec, "smoke", "mi")
    store.apply(new_mission=({"mission_id": "mi", "name": "selftest"}, [task_row(t) for t in tasks]))
    t = tasks[-1]
    fields = {"excluded_workers": ["g1", "g2"], "result": {"values": {"x": 1.5}}, "attempt": 3}
    store.apply(task_updates=[(t.task_id, fields)])
    for k, v in fields.items():
        setattr(t, k, v)
    loaded = {r["task_id"]: task_from_row(r) for r in store.query("SELECT * FROM tasks")}
    assert loaded == {x.task_id: x for x in tasks}
    store.close()
    assert task_columns(Store(tmp_path / "f.duckdb")) == list(
        TASK_COLUMNS.items()
    )  # reopening changes nothing


def test_a_database_with_the_first_schema_migrates_to_the_struct_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER)")
    con.execute(HISTORICAL_V1)
    con.execute(HISTORICAL_V2)
    con.execute("INSERT INTO schema_version VALUES (1), (2)")
    cols = "task_id, mission_id, name, stage, kind, arm, seed, params, deps, vram_gb, gpu_class, timeout_s, "
    cols += (
        "max_attempts, max_infra_attempts, state, pending_reason, attempt, task_failures, infra_failures, "
    )
    cols += "worker, error, result, excluded_workers, created_at, assigned_at, started_at, finished_at"
    rows = [
        ("mi/a", "mi", "a", "a", "x.a", "bem", 1, '{"lr": 0.1}', [], 8.0, None, 60.0, 2, 5, "succeeded", None,
         2, 1, 0, "g2", None, '{"values": {"r": 1.0}}', '["g1"]', 1.0, 2.0, 3.0, 4.0),
        ("mi/b", "mi", "b", "b", "x.b", None, None, "{}", ["mi/a"], 0.0, "H100", 60.0, 2, 5, "pending",
         "retry_after_oom", 3, 2, 0, None, "oom", None, '["g1", "g2"]', 1.1, None, None, None),
        ("mi/c", "mi", "c", "c", "x.c", None, None, "{}", ["mi/a"], 0.0, None, 60.0, 2, 5, "pending",
         "waiting_for_deps", 1, 0, 0, None, None, None, "[]", 1.2, None, None, None),
    ]  # fmt: skip
    con.executemany(f"INSERT INTO tasks ({cols}) VALUES ({', '.join('?' * 27)})", rows)
    # An even older database, from before two fields existed: their columns are added.
    con.execute("ALTER TABLE tasks DROP COLUMN infra_failures")
    con.execute("ALTER TABLE tasks DROP COLUMN started_at")
    con.close()

    store = Store(path)
    assert store.query("SELECT max(version) AS v FROM schema_version")[0]["v"] == len(MIGRATIONS) == 6
    sweep = store.query("SELECT column_default FROM duckdb_columns() WHERE table_name = 'missions' "
                        "AND column_name = 'sweep'")  # fmt: skip
    assert [r["column_default"] for r in sweep] == ["false"]  # old missions are no sweeps
    assert sorted(task_columns(store)) == sorted(TASK_COLUMNS.items())
    got = {r["task_id"]: r for r in store.query("SELECT * FROM tasks")}
    assert {k: v["excluded_workers"] for k, v in got.items()} == {
        "mi/a": ["g1"], "mi/b": ["g1", "g2"], "mi/c": []
    }  # fmt: skip
    tasks = {k: task_from_row(r) for k, r in got.items()}
    a, b = tasks["mi/a"], tasks["mi/b"]
    assert (a.params, a.result, a.arm, a.seed, a.worker, a.finished_at) == (
        {"lr": 0.1}, {"values": {"r": 1.0}}, "bem", 1, "g2", 4.0
    )  # fmt: skip
    assert a.infra_failures == 0 and a.started_at is None  # added columns: the fields' defaults
    assert (b.deps, b.gpu_class, b.pending_reason, b.attempt, b.task_failures, b.excluded_workers) == (
        ["mi/a"], "H100", "retry_after_oom", 3, 2, ["g1", "g2"]
    )  # fmt: skip
    # And it is written to like a new one.
    store.apply(task_updates=[("mi/c", {"excluded_workers": ["g3"], "state": "assigned"})])
    assert task_from_row(store.query("SELECT * FROM tasks WHERE task_id = 'mi/c'")[0]).excluded_workers == [
        "g3"
    ]


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ("ALTER TABLE tasks ALTER attempt SET DATA TYPE VARCHAR", "'attempt' is VARCHAR"),
        ("ALTER TABLE tasks ALTER params SET DATA TYPE VARCHAR", "'params' is VARCHAR"),
        ("ALTER TABLE tasks ADD COLUMN priority INTEGER", "'priority' (INTEGER) is not a field"),
    ],
)
def test_a_column_that_disagrees_with_the_struct_is_refused(tmp_path: Path, change: str, column: str) -> None:
    Store(tmp_path / "f.duckdb").close()
    con = duckdb.connect(str(tmp_path / "f.duckdb"))
    con.execute(change)
    con.close()
    with pytest.raises(SchemaMismatch, match="migration") as err:
        Store(tmp_path / "f.duckdb")
    assert f"tasks column {column}" in str(err.value)
