"""The DuckDB store: numbered migrations, batched idempotent writes, and read-only SQL (DESIGN.md section 6).

fleetd is the only writer (NATS_NOTES section 6). Every method here is synchronous and runs on the
coordinator's single writer thread; readers take their own cursor. Idempotency: a bus message is
written at most once, keyed by `(task_id, attempt, seq)` in `events`, and its rows (metrics, scores,
logs, artifacts) are inserted in the same transaction, so a redelivered batch changes nothing.

Times are unix seconds (DOUBLE) everywhere: cheap to write, and `to_timestamp(col)` reads them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from fleet.creds import Actor
from schemas.messages import Artifact, Event, Log, Metrics, Scores
from schemas.missions import Task

# ---- the tasks table: its columns derive from schemas.missions.Task ---------------------------------


def sql_type(t: msgspec.inspect.Type, where: str) -> str:
    """The DuckDB column type of a field type: str, int, float, bool, dict (JSON), list[str], X | None."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1:
            return sql_type(rest[0], where)
    elif isinstance(t, mi.StrType):
        return "VARCHAR"
    elif isinstance(t, mi.BoolType):
        return "BOOLEAN"
    elif isinstance(t, mi.IntType):
        return "INTEGER"
    elif isinstance(t, mi.FloatType):
        return "DOUBLE"
    elif isinstance(t, mi.DictType):
        return "JSON"
    elif isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StrType):
        return "VARCHAR[]"
    raise TypeError(f"{where}: no DuckDB column type for {t}")


def struct_columns(cls: type[msgspec.Struct]) -> dict[str, str]:
    """Column name -> DuckDB type for each field of a Struct, in field order."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: sql_type(f.type, f"{cls.__name__}.{f.name}") for f in info.fields}


def create_table(table: str, columns: dict[str, str], primary_key: str) -> str:
    cols = ", ".join(f"{c} {t}{' PRIMARY KEY' if c == primary_key else ''}" for c, t in columns.items())
    return f"CREATE TABLE {table} ({cols});"


TASK_COLUMNS = struct_columns(Task)
_TASK_FIELDS = {f.name: f for f in msgspec.structs.fields(Task)}
_NULLABLE = {f.name for f in _TASK_FIELDS.values() if type(None) in typing.get_args(f.type)}
JSON_COLUMNS = frozenset(c for c, t in TASK_COLUMNS.items() if t == "JSON")


def task_row(task: Task) -> dict[str, Any]:
    """The task's `tasks` row: one cell per field (dicts become JSON text on the way in)."""
    return msgspec.structs.asdict(task)


def task_from_row(row: dict[str, Any]) -> Task:
    """A `tasks` row back into a Task: JSON columns come back as text; a NULL in a column added after
    the row was written (see `Store.check_tasks_table`) leaves the field at its default."""
    fields: dict[str, Any] = {}
    for name, info in _TASK_FIELDS.items():
        value = row.get(name)
        if value is None and name not in _NULLABLE and not info.required:
            continue
        if name in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        fields[name] = value
    return msgspec.convert(fields, Task)


class SchemaMismatch(RuntimeError):
    """The database's tasks table disagrees with `schemas.missions.Task` beyond a missing column."""


MIGRATIONS: list[str] = [
    # 1: the first schema. The tasks table is created from Task as it is now; an older database gets
    # the fields added since as columns (`Store.check_tasks_table`), and migrations below convert what
    # changed type. So a migration that touches tasks must also hold on a table created this way.
    """
    CREATE TABLE missions (
        mission_id VARCHAR PRIMARY KEY, name VARCHAR, profile VARCHAR, state VARCHAR, verdict VARCHAR,
        reason VARCHAR, spec JSON, overrides JSON, submitted_at DOUBLE, finished_at DOUBLE);
    """
    + create_table("tasks", TASK_COLUMNS, primary_key="task_id")
    + """
    CREATE TABLE task_attempts (
        task_id VARCHAR, attempt INTEGER, worker VARCHAR, state VARCHAR, reason VARCHAR, error VARCHAR,
        assigned_at DOUBLE, started_at DOUBLE, finished_at DOUBLE, PRIMARY KEY (task_id, attempt));
    CREATE TABLE events (
        task_id VARCHAR, attempt INTEGER, seq INTEGER, mission_id VARCHAR, kind VARCHAR, worker VARCHAR,
        ts DOUBLE, recorded_at DOUBLE, body JSON, PRIMARY KEY (task_id, attempt, seq));
    CREATE TABLE metrics (
        task_id VARCHAR, attempt INTEGER, name VARCHAR, step BIGINT, value DOUBLE, time DOUBLE);
    CREATE TABLE example_scores (
        mission_id VARCHAR, task_id VARCHAR, attempt INTEGER, arm VARCHAR, seed INTEGER,
        example_id VARCHAR, metric VARCHAR, value DOUBLE);
    CREATE TABLE logs (task_id VARCHAR, attempt INTEGER, seq INTEGER, line_no INTEGER, line VARCHAR);
    CREATE TABLE artifacts (
        task_id VARCHAR, attempt INTEGER, path VARCHAR, kind VARCHAR, sha256 VARCHAR, bytes BIGINT);
    CREATE TABLE decisions (
        mission_id VARCHAR, gate VARCHAR, kind VARCHAR, metric VARCHAR, comparison VARCHAR, outcome VARCHAR,
        passed BOOLEAN, estimate DOUBLE, ci_low DOUBLE, ci_high DOUBLE, level DOUBLE, p DOUBLE,
        p_adj DOUBLE, family VARCHAR, n INTEGER, seeds_positive VARCHAR, reason VARCHAR, decided_at DOUBLE);
    CREATE TABLE workers (
        worker VARCHAR PRIMARY KEY, host VARCHAR, gpu_uuid VARCHAR, gpu_name VARCHAR, total_bytes BIGINT,
        first_seen DOUBLE, last_seen DOUBLE);
    CREATE TABLE dead_letters (
        subject VARCHAR, reason VARCHAR, body VARCHAR, recorded_at DOUBLE);
    """,
    # 2: what Mission B's reactive services decided, with the worker's acknowledgement.
    """
    CREATE TABLE service_decisions (
        mission_id VARCHAR, task_id VARCHAR, attempt INTEGER, service VARCHAR, step BIGINT,
        decision VARCHAR, level VARCHAR, value DOUBLE, reason VARCHAR, acked BOOLEAN, detail VARCHAR,
        decided_at DOUBLE, PRIMARY KEY (task_id, attempt, service, step));
    """,
    # 3: excluded_workers was a JSON array; like deps it is a list[str] of Task, so VARCHAR[]
    # (a no-op on a table migration 1 created from Task).
    """
    ALTER TABLE tasks ALTER excluded_workers SET DATA TYPE VARCHAR[]
        USING CAST(excluded_workers AS VARCHAR[]);
    """,
    # 4: who asked for each submit, cancel and decision (the bus credential that the server checked).
    """
    CREATE TABLE audit (
        asked_at DOUBLE, mission_id VARCHAR, action VARCHAR, target VARCHAR, role VARCHAR, credential VARCHAR,
        key VARCHAR, detail VARCHAR);
    """,
    # 5: sweeps. A sweep mission's trials, ranked when it ends (`stats.sweep`); a sweep is never gated,
    # so it has these rows instead of decisions.
    """
    ALTER TABLE missions ADD COLUMN sweep BOOLEAN DEFAULT false;
    CREATE TABLE sweep_trials (
        mission_id VARCHAR, trial INTEGER, params JSON, rank INTEGER, metric VARCHAR, n INTEGER,
        estimate DOUBLE, ci_low DOUBLE, ci_high DOUBLE, level DOUBLE, stopped VARCHAR, note VARCHAR,
        ranked_at DOUBLE, PRIMARY KEY (mission_id, trial));
    """,
    # 6: when `fleetctl gc` removed a mission's files (its rows stay).
    """
    ALTER TABLE missions ADD COLUMN collected_at DOUBLE;
    """,
]

TABLES = (
    "missions",
    "tasks",
    "task_attempts",
    "events",
    "metrics",
    "example_scores",
    "logs",
    "artifacts",
    "decisions",
    "workers",
    "dead_letters",
    "service_decisions",
    "audit",
    "sweep_trials",
)
READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class SqlRefused(ValueError):
    """A query `fleetctl sql` will not run: a write, several statements, or a syntax error."""


@dataclass
class Written:
    """What one `record` call inserted: the events that were new (lifecycle ones drive the scheduler)."""

    new: list[Event] = field(default_factory=list)
    duplicates: int = 0
    points: int = 0


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.con = duckdb.connect(str(path))
        self.migrate()
        self.lock_down()

    def lock_down(self) -> None:
        """No file outside the database, no extension, and no way back, for any query on this
        connection and its cursors: `fleetctl sql` reaches DuckDB, and table functions such as
        read_text('/proc/self/environ') would otherwise read any file the fleetd user can."""
        for setting in (
            "enable_external_access = false",
            "autoinstall_known_extensions = false",
            "autoload_known_extensions = false",
            "lock_configuration = true",
        ):
            self.con.execute(f"SET {setting}")

    def close(self) -> None:
        self.con.close()

    def migrate(self) -> None:
        con = self.con
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        # fetchall, not fetchone: DuckDB refuses further work on a connection with an unfinished result
        current = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] or 0
        for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            con.execute("BEGIN")
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?)", [number])
            con.execute("COMMIT")
        self.check_tasks_table()

    def check_tasks_table(self) -> None:
        """The tasks table must hold exactly Task's fields with their derived types. A field missing
        from an older database is added (NULL in old rows: the field's default when loaded); a type
        that differs, or a column Task lacks, is refused: that needs a numbered migration."""
        con = self.con
        have = {name: kind for name, kind, *_ in con.execute("DESCRIBE tasks").fetchall()}
        for col, kind in have.items():
            if col not in TASK_COLUMNS:
                raise SchemaMismatch(
                    f"{self.path}: tasks column {col!r} ({kind}) is not a field of schemas.missions.Task; "
                    "a numbered migration in fleetd/store.py must drop or rename it"
                )
            if kind != TASK_COLUMNS[col]:
                raise SchemaMismatch(
                    f"{self.path}: tasks column {col!r} is {kind}, but Task.{col} makes it "
                    f"{TASK_COLUMNS[col]}; a numbered migration in fleetd/store.py must convert it"
                )
        missing = [col for col in TASK_COLUMNS if col not in have]
        if missing:
            con.execute("BEGIN")
            for col in missing:
                con.execute(f"ALTER TABLE tasks ADD COLUMN {col} {TASK_COLUMNS[col]}")
            con.execute("COMMIT")

    # ---- writes (writer thread only) ------------------------------------------------------------

    def apply(
        self,
        events: Sequence[Event] = (),
        task_updates: Iterable[tuple[str, dict[str, Any]]] = (),
        attempt_rows: Iterable[dict[str, Any]] = (),
        mission_updates: Iterable[tuple[str, dict[str, Any]]] = (),
        current_attempt: dict[str, int] | None = None,
        decisions: tuple[str, Sequence[dict[str, Any]]] | None = None,
        sweep_trials: tuple[str, Sequence[dict[str, Any]]] | None = None,
        new_mission: tuple[dict[str, Any], Sequence[dict[str, Any]]] | None = None,
        audit: Sequence[dict[str, Any]] = (),
    ) -> Written:
        """One transaction: a new mission and its tasks, new events and their rows, task and mission
        updates, decisions, and the audit rows of who asked for them.

        Scores of an attempt that is no longer the task's current one are not copied into
        example_scores (the event itself is kept), so each result row exists exactly once.
        """
        con = self.con
        con.execute("BEGIN")
        try:
            if new_mission is not None:
                mission, tasks = new_mission
                _insert(con, "missions", [mission])
                _insert(con, "tasks", tasks)
            written = self._record(events, current_attempt or {}) if events else Written()
            for task_id, fields in task_updates:
                _update(con, "tasks", "task_id", task_id, fields)
            for row in attempt_rows:
                _upsert_attempt(con, row)
            for mission_id, fields in mission_updates:
                _update(con, "missions", "mission_id", mission_id, fields)
            if decisions is not None:
                mission_id, rows = decisions
                con.execute("DELETE FROM decisions WHERE mission_id = ?", [mission_id])
                _insert(con, "decisions", rows)
            if sweep_trials is not None:
                mission_id, rows = sweep_trials
                con.execute("DELETE FROM sweep_trials WHERE mission_id = ?", [mission_id])
                _insert(con, "sweep_trials", rows)
            _insert(con, "audit", audit)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return written

    def _record(self, events: Sequence[Event], current_attempt: dict[str, int]) -> Written:
        con = self.con
        now = time.time()
        seen: set[tuple[str, int, int]] = set()
        unique: list[Event] = []
        for ev in events:
            key = (ev.task_id, ev.attempt, ev.seq)
            if key not in seen:
                seen.add(key)
                unique.append(ev)
        heavy = (Metrics, Scores)  # their rows live in their own tables; the event row keeps no body
        table = pa.table(
            {
                "task_id": [e.task_id for e in unique],
                "attempt": pa.array([e.attempt for e in unique], pa.int32()),
                "seq": pa.array([e.seq for e in unique], pa.int32()),
                "mission_id": [e.mission_id for e in unique],
                "kind": [type(e).__struct_config__.tag for e in unique],
                "worker": [e.worker for e in unique],
                "ts": [e.ts for e in unique],
                "recorded_at": [now] * len(unique),
                "body": [None if isinstance(e, heavy) else msgspec.json.encode(e).decode() for e in unique],
            }
        )
        con.register("_batch", table)
        try:
            inserted = con.execute(
                "INSERT INTO events SELECT * FROM _batch ON CONFLICT DO NOTHING "
                "RETURNING task_id, attempt, seq"
            ).fetchall()
        finally:
            con.unregister("_batch")
        fresh = {(t, a, s) for t, a, s in inserted}
        new = [e for e in unique if (e.task_id, e.attempt, e.seq) in fresh]
        written = Written(new=new, duplicates=len(events) - len(new))
        metrics = [e for e in new if isinstance(e, Metrics)]
        if metrics:
            written.points = self._insert_metrics(metrics)
        for ev in new:
            if isinstance(ev, Scores) and current_attempt.get(ev.task_id, ev.attempt) == ev.attempt:
                n = len(ev.value)
                cols = {
                    "mission_id": [ev.mission_id] * n,
                    "task_id": [ev.task_id] * n,
                    "attempt": pa.array([ev.attempt] * n, pa.int32()),
                    "arm": ev.arm,
                    "seed": pa.array(ev.seed, pa.int32()),
                    "example_id": ev.example_id,
                    "metric": ev.metric,
                    "value": pa.array(ev.value, pa.float64()),
                }
                _insert_arrow(con, "example_scores", pa.table(cols))
            elif isinstance(ev, Log) and ev.lines:
                con.executemany(
                    "INSERT INTO logs VALUES (?, ?, ?, ?, ?)",
                    [(ev.task_id, ev.attempt, ev.seq, i, line) for i, line in enumerate(ev.lines)],
                )
            elif isinstance(ev, Artifact):
                con.execute(
                    "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                    [ev.task_id, ev.attempt, ev.path, ev.artifact_kind, ev.sha256, ev.bytes],
                )
        return written

    def _insert_metrics(self, events: Sequence[Metrics]) -> int:
        task, attempt, name, steps, values, times = [], [], [], [], [], []
        for ev in events:
            for metric, s in ev.series.items():
                n = len(s.values)
                task += [ev.task_id] * n
                attempt += [ev.attempt] * n
                name += [metric] * n
                steps += s.steps
                values += s.values
                times += s.times
        table = pa.table(
            {
                "task_id": task,
                "attempt": pa.array(attempt, pa.int32()),
                "name": name,
                "step": pa.array(steps, pa.int64()),
                "value": pa.array(values, pa.float64()),
                "time": pa.array(times, pa.float64()),
            }
        )
        _insert_arrow(self.con, "metrics", table)
        return len(values)

    def upsert_workers(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self.con.execute(
                "INSERT INTO workers "
                "VALUES ($worker, $host, $gpu_uuid, $gpu_name, $total_bytes, $seen, $seen) "
                "ON CONFLICT (worker) DO UPDATE SET host = excluded.host, gpu_uuid = excluded.gpu_uuid, "
                "gpu_name = excluded.gpu_name, total_bytes = excluded.total_bytes, "
                "last_seen = excluded.last_seen",
                row,
            )

    def dead_letter(self, subject: str, reason: str, body: bytes) -> None:
        self.con.execute(
            "INSERT INTO dead_letters VALUES (?, ?, ?, ?)",
            [subject, reason, body[:65536].decode("utf-8", "replace"), time.time()],
        )

    def existing_events(self, keys: Sequence[tuple[str, int, int]]) -> set[tuple[str, int, int]]:
        """Which of these (task_id, attempt, seq) are already written: the recorder's dedup check."""
        table = pa.table(
            {
                "task_id": [k[0] for k in keys],
                "attempt": pa.array([k[1] for k in keys], pa.int32()),
                "seq": pa.array([k[2] for k in keys], pa.int32()),
            }
        )
        self.con.register("_keys", table)
        try:
            rows = self.con.execute(
                "SELECT e.task_id, e.attempt, e.seq FROM events e JOIN _keys k USING (task_id, attempt, seq)"
            ).fetchall()
        finally:
            self.con.unregister("_keys")
        return {(t, a, s) for t, a, s in rows}

    def record_service_decision(self, row: dict[str, Any]) -> bool:
        """One decision per (task, attempt, service, step): False if it was already there (a replay)."""
        cols = list(row)
        con = self.con
        con.execute("BEGIN")
        try:
            inserted = con.execute(
                f"INSERT INTO service_decisions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                "ON CONFLICT DO NOTHING RETURNING step",
                [row[c] for c in cols],
            ).fetchall()
            if inserted:
                target = f"{row['task_id']}#{row['attempt']}@{row['step']}"
                service = Actor(role="service", credential=row["service"])
                _insert(con, "audit", [audit_row(row["mission_id"], row["decision"], target, service)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return bool(inserted)

    def record_knob(self, row: dict[str, Any], actor: Actor) -> int:
        """A hand-set knob (`fleetctl knob`): its step counts the attempt's hand settings (0, 1, ...);
        the audit names the person, not a service. Returns the step."""
        con = self.con
        con.execute("BEGIN")
        try:
            (step,) = con.execute(
                "SELECT count(*) FROM service_decisions WHERE task_id = ? AND attempt = ? AND service = ?",
                [row["task_id"], row["attempt"], row["service"]],
            ).fetchone() or (0,)
            row = {**row, "step": step}
            cols = list(row)
            con.execute(
                f"INSERT INTO service_decisions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [row[c] for c in cols],
            )
            target = f"{row['task_id']}#{row['attempt']}@{step}"
            _insert(con, "audit", [audit_row(row["mission_id"], "knob", target, actor, str(row["value"]))])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return int(step)

    def ack_service_decision(self, key: tuple[str, int, str, int], acked: bool, detail: str) -> None:
        self.con.execute(
            "UPDATE service_decisions SET acked = ?, detail = ? "
            "WHERE task_id = ? AND attempt = ? AND service = ? AND step = ?",
            [acked, detail, *key],
        )

    # ---- reads (any thread: each call takes its own cursor) -------------------------------------

    def task_results(self, mission_id: str) -> list[dict[str, Any] | None]:
        """The result dicts of a mission's succeeded tasks."""
        rows = self.query(
            "SELECT result FROM tasks WHERE mission_id = ? AND state = 'succeeded'", [mission_id]
        )
        return [r["result"] if not isinstance(r["result"], str) else json.loads(r["result"]) for r in rows]

    def scores_frame(self, mission_id: str) -> Any:
        """The mission's per-example scores in stats.table's columns, for the gates: each task's
        current attempt only, so a task that scored, failed and ran again (a retry) counts once."""
        return self._frame(
            "SELECT s.example_id, s.arm, s.seed, s.metric, s.value FROM example_scores s "
            f"{_CURRENT_ATTEMPT} WHERE s.mission_id = ?",
            [mission_id],
        )

    def _frame(self, sql: str, params: list[Any]) -> Any:
        """A query's rows as a pandas DataFrame, on a cursor of its own (a reader thread's)."""
        cur = self.con.cursor()
        try:
            return cur.execute(sql, params).df()
        finally:
            cur.close()

    def current_points(self, mission_id: str, name: str) -> list[dict[str, Any]]:
        """One metric's points of the mission's tasks' current attempts, in time order."""
        return self.query(
            "SELECT p.task_id, p.step, p.value FROM metrics p JOIN tasks t ON t.task_id = p.task_id "
            "AND p.attempt = t.attempt WHERE t.mission_id = ? AND p.name = ? ORDER BY p.time, p.step",
            [mission_id, name],
        )

    def sweep_scores(self, mission_id: str) -> Any:
        """A sweep's per-example scores with each task's trial (`stats.sweep.rank_trials`' columns)."""
        return self._frame(
            "SELECT s.example_id, s.arm, s.seed, s.metric, s.value, t.trial FROM example_scores s "
            f"{_CURRENT_ATTEMPT} WHERE s.mission_id = ? AND t.trial IS NOT NULL",
            [mission_id],
        )

    def report(self, mission_id: str, max_series: int = 24, max_points: int = 200) -> dict[str, Any] | None:
        """What `fleetctl report` shows of one mission, read from the tables (None: no such mission).

        Training curves are the metrics named like '%loss%' (every metric where none is), each task's
        current attempt, at most `max_series` lines of at most `max_points` points (evenly thinned, the
        last point kept); `curves_total` says how many lines there were."""
        found = self.query("SELECT * FROM missions WHERE mission_id = ?", [mission_id])
        if not found:
            return None
        mission = found[0]
        for col in ("spec", "overrides"):
            if isinstance(mission[col], str):
                mission[col] = json.loads(mission[col])
        tasks = self.query(
            "SELECT t.name, t.stage, t.kind, t.arm, t.seed, t.state, t.attempt, t.task_failures, "
            "t.infra_failures, t.worker, w.host, w.gpu_name, t.error, t.started_at, t.finished_at, "
            "json_extract(t.result, '$.environment') AS environment "
            "FROM tasks t LEFT JOIN workers w ON w.worker = t.worker WHERE t.mission_id = ? "
            "ORDER BY t.created_at, t.task_id",
            [mission_id],
        )
        for row in tasks:
            if isinstance(row["environment"], str):
                row["environment"] = json.loads(row["environment"])
        means = self.query(
            "SELECT s.metric, s.arm, count(*) AS n, count(DISTINCT s.seed) AS seeds, avg(s.value) AS mean "
            f"FROM example_scores s {_CURRENT_ATTEMPT} WHERE s.mission_id = ? GROUP BY ALL ORDER BY ALL",
            [mission_id],
        )
        series = self.query(
            "SELECT m.task_id, t.name AS task, m.name AS metric, count(*) AS n, "
            "m.name ILIKE '%loss%' AS loss FROM metrics m "
            "JOIN tasks t ON t.task_id = m.task_id AND m.attempt = t.attempt "
            "WHERE t.mission_id = ? GROUP BY ALL ORDER BY metric, min(t.created_at), m.task_id",
            [mission_id],
        )
        if any(s["loss"] for s in series):
            series = [s for s in series if s["loss"]]
        curves = []
        for s in series[:max_series]:
            stride = max(1, -(-s["n"] // max_points))
            points = self.query(
                "SELECT step, value FROM (SELECT m.step, m.value, "
                "row_number() OVER (ORDER BY m.step, m.time) - 1 AS i FROM metrics m "
                "JOIN tasks t ON t.task_id = m.task_id AND m.attempt = t.attempt "
                "WHERE m.task_id = ? AND m.name = ?) WHERE i % ? = 0 OR i = ? ORDER BY i",
                [s["task_id"], s["metric"], stride, s["n"] - 1],
            )
            curves.append(
                {
                    "task": s["task"],
                    "metric": s["metric"],
                    "n": s["n"],
                    "steps": [p["step"] for p in points],
                    "values": [p["value"] for p in points],
                }
            )
        where = [mission_id]
        return {
            "mission": mission,
            "decisions": self.query(
                "SELECT * EXCLUDE (mission_id) FROM decisions WHERE mission_id = ? ORDER BY rowid", where
            ),
            "tasks": tasks,
            "arm_means": means,
            "curves": curves,
            "curves_total": len(series),
            "curve_points_max": max_points,
            "service_counts": self.query(
                "SELECT task_id, service, decision, count(*) AS n, count(*) FILTER (WHERE acked) AS acked "
                "FROM service_decisions WHERE mission_id = ? GROUP BY ALL ORDER BY ALL",
                where,
            ),
            "service_decisions": self.query(
                "SELECT task_id, attempt, service, step, decision, level, value, reason, acked, detail "
                "FROM service_decisions WHERE mission_id = ? ORDER BY task_id, attempt, step, service "
                "LIMIT 200",
                where,
            ),
            "audit": self.query(
                "SELECT asked_at, action, target, role, credential, key, detail FROM audit "
                "WHERE mission_id = ? AND role <> 'service' ORDER BY asked_at",
                where,
            ),
            "audit_service_rows": self.query(
                "SELECT count(*) AS n FROM audit WHERE mission_id = ? AND role = 'service'", where
            )[0]["n"],
        }

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.cursor()
        try:
            res = cur.execute(sql, params) if params is not None else cur.execute(sql)
            cols = [d[0] for d in res.description or []]
            return [dict(zip(cols, row, strict=True)) for row in res.fetchall()]
        finally:
            cur.close()

    def read_only_sql(
        self, sql: str, limit: int = 10_000, timeout_s: float = 30.0
    ) -> tuple[list[str], list[list[Any]], bool]:
        """Run one SELECT (or EXPLAIN) inside a read-only transaction; anything else is refused, and
        so is a query still running after `timeout_s` (interrupted) or one that touches a file."""
        cur = self.con.cursor()
        timer = threading.Timer(timeout_s, cur.interrupt)
        try:
            try:
                statements = cur.extract_statements(sql)
            except duckdb.Error as e:
                raise SqlRefused(f"cannot parse the query: {e}") from None
            if len(statements) != 1:
                raise SqlRefused(f"one statement per call, got {len(statements)}")
            kind = statements[0].type
            if kind not in READ_ONLY_STATEMENTS:
                raise SqlRefused(f"fleetctl sql is read-only: {kind.name} statements are refused")
            cur.execute("BEGIN TRANSACTION READ ONLY")
            timer.start()
            try:
                res = cur.execute(sql)
                cols = [d[0] for d in res.description or []]
                rows = res.fetchmany(limit + 1)
            except duckdb.InterruptException:
                raise SqlRefused(
                    f"the query ran past {timeout_s:g} s and was stopped (sql.timeout_s)"
                ) from None
            except duckdb.PermissionException as e:
                raise SqlRefused(f"fleetctl sql reads the fleet's tables only: {e}") from None
            except duckdb.Error as e:
                raise SqlRefused(str(e)) from None
            finally:
                timer.cancel()
                cur.execute("ROLLBACK")
            return cols, [list(r) for r in rows[:limit]], len(rows) > limit
        finally:
            cur.close()

    def table_sizes(self) -> dict[str, int]:
        """Rows per exported table."""
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}

    def export_chunk(self, table: str, after: int, budget: int = 512 * 1024) -> tuple[bytes, int, int]:
        """The rows of `table` past rowid `after` that fit in about `budget` bytes of Parquet:
        (parquet bytes, rows, the last rowid). Keyset paging on rowid, so a chunk costs the same
        wherever it starts; zero rows still carry the table's schema."""
        if table not in TABLES:
            raise SqlRefused(f"no exported table {table!r}; tables: {', '.join(TABLES)}")
        rows = 50_000
        cur = self.con.cursor()
        try:
            while True:
                data = cur.sql(
                    f"SELECT rowid AS _rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    params=[after, rows],
                ).to_arrow_table()
                last = int(data.column("_rowid")[-1].as_py()) if data.num_rows else after
                buf = io.BytesIO()
                pq.write_table(data.drop_columns(["_rowid"]), buf)
                if buf.tell() <= budget or data.num_rows <= 1:
                    return buf.getvalue(), data.num_rows, last
                rows = max(1, int(data.num_rows * 0.9 * budget / buf.tell()))  # rows that should fit
        finally:
            cur.close()


# Joins example_scores `s` to the task's current attempt: the rows the stats engine judges.
_CURRENT_ATTEMPT = "JOIN tasks t ON t.task_id = s.task_id AND s.attempt = t.attempt"


def audit_row(mission_id: str, action: str, target: str, actor: Actor, detail: str = "") -> dict[str, Any]:
    """One line of the audit table: `actor` asked for `action` on `target` (a mission or a task)."""
    return {
        "asked_at": time.time(), "mission_id": mission_id, "action": action, "target": target,
        "role": actor.role, "credential": actor.credential, "key": actor.key, "detail": detail,
    }  # fmt: skip


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    # Through Arrow, not executemany: a 1,000-task mission goes in one statement, not 1,000.
    _insert_arrow(con, table, pa.Table.from_pylist([{k: _cell(v) for k, v in r.items()} for r in rows]))


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    con.register("_rows", data)
    try:
        con.execute(f"INSERT INTO {table} ({', '.join(data.column_names)}) SELECT * FROM _rows")
    finally:
        con.unregister("_rows")


def _update(con: duckdb.DuckDBPyConnection, table: str, key: str, value: str, fields: dict[str, Any]) -> None:
    sets = ", ".join(f"{c} = ?" for c in fields)
    con.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?", [*(_cell(v) for v in fields.values()), value])


def _upsert_attempt(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    """Set the row's non-null fields, inserting the attempt if it is new.

    UPDATE, then INSERT when nothing matched (one writer, inside its transaction, so no race): a
    third of the cost of DuckDB's INSERT ... ON CONFLICT DO UPDATE, on the way from submit to start."""
    fields = {c: v for c, v in row.items() if c not in ("task_id", "attempt") and v is not None}
    updated = 0
    if fields:
        sets = ", ".join(f"{c} = ?" for c in fields)
        updated = con.execute(
            f"UPDATE task_attempts SET {sets} WHERE task_id = ? AND attempt = ?",
            [*(_cell(v) for v in fields.values()), row["task_id"], row["attempt"]],
        ).fetchall()[0][0]
    if not updated:
        cols = list(row)
        con.execute(
            f"INSERT INTO task_attempts ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [_cell(row[c]) for c in cols],
        )


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, dict) else v
