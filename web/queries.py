"""The page's reads from DuckDB. Curves are downsampled in the database, so a task with a million
points sends a few hundred per metric to the browser.

Each function takes the Store and runs on a worker thread (Store.query takes its own cursor).
"""

from __future__ import annotations

from typing import Any

from fleet.view import Query

# Buckets over each line's step range; per bucket the first step, the mean, and the min and max (the
# band a spike hides in). A line with fewer points than buckets comes back as is.
_CURVES = """
WITH pts AS (
    SELECT m.task_id, m.name, m.step, m.value
    FROM metrics m JOIN (SELECT unnest(?::VARCHAR[]) AS task_id, unnest(?::INTEGER[]) AS attempt) w
         USING (task_id, attempt)
    {where}
), span AS (
    SELECT task_id, name, min(step) AS lo, max(step) AS hi FROM pts GROUP BY ALL
)
SELECT task_id, name,
       floor((step - lo) * ? / (hi - lo + 1))::INTEGER AS bucket,
       min(step) AS step, avg(value) AS value, min(value) AS low, max(value) AS high
FROM pts JOIN span USING (task_id, name)
GROUP BY ALL
ORDER BY task_id, name, bucket
"""


def curves(
    query: Query, tasks: list[tuple[str, int]], points: int, metric: str | None = None
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{task_id: {metric: {step, value, low, high}}} for these (task_id, attempt) pairs."""
    if not tasks:
        return {}
    where, params = ("WHERE m.name = ?", [metric]) if metric else ("", [])
    rows = query(
        _CURVES.format(where=where),
        [[t for t, _ in tasks], [a for _, a in tasks], *params, max(1, points)],
    )
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        line = out.setdefault(r["task_id"], {}).setdefault(
            r["name"], {"step": [], "value": [], "low": [], "high": []}
        )
        for key in ("step", "value", "low", "high"):
            line[key].append(r[key])
    return out


def metric_names(query: Query, task_ids: list[str]) -> list[str]:
    """The tasks' metric names, the one a page should open on first: a training loss, the one with
    the most points, rather than a metric with a single point (`adapter_overhead`)."""
    if not task_ids:
        return []
    rows = query(
        "SELECT name, count(*) AS n FROM metrics "
        "WHERE task_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY name",
        [task_ids],
    )
    names = sorted(r["name"] for r in rows)
    first = max(rows, key=lambda r: ("loss" in r["name"], r["n"], [-ord(c) for c in r["name"]]), default=None)
    return [first["name"], *(n for n in names if n != first["name"])] if first else []


def decisions(query: Query, mission_id: str) -> list[dict[str, Any]]:
    return query(
        "SELECT gate, kind, metric, comparison, outcome, passed, estimate, ci_low, ci_high, level, p, p_adj, "
        "n, reason FROM decisions WHERE mission_id = ? ORDER BY kind = 'verdict', kind, gate",
        [mission_id],
    )


def mission_row(query: Query, mission_id: str) -> dict[str, Any] | None:
    rows = query(
        "SELECT mission_id, name, profile, state, verdict, reason, submitted_at, finished_at, sweep "
        "FROM missions WHERE mission_id = ?",
        [mission_id],
    )
    return rows[0] if rows else None


def missions(query: Query, limit: int = 200) -> list[dict[str, Any]]:
    return query(
        "SELECT mission_id, name, profile, state, verdict, reason, submitted_at, finished_at "
        "FROM missions ORDER BY submitted_at DESC LIMIT ?",
        [limit],
    )


def task_detail(query: Query, task_id: str, log_lines: int = 200) -> dict[str, Any]:
    attempts = query(
        "SELECT attempt, worker, state, reason, error, assigned_at, started_at, finished_at "
        "FROM task_attempts WHERE task_id = ? ORDER BY attempt",
        [task_id],
    )
    artifacts = query(
        "SELECT attempt, path, kind, sha256, bytes FROM artifacts WHERE task_id = ? ORDER BY attempt, path",
        [task_id],
    )
    logs = query(
        "SELECT attempt, line FROM (SELECT attempt, seq, line_no, line FROM logs WHERE task_id = ? "
        "ORDER BY attempt DESC, seq DESC, line_no DESC LIMIT ?) ORDER BY attempt, seq, line_no",
        [task_id, log_lines],
    )
    row = query("SELECT result, params FROM tasks WHERE task_id = ?", [task_id])
    return {"attempts": attempts, "artifacts": artifacts, "log_tail": logs, **(row[0] if row else {})}


def recent_tasks(query: Query, limit: int = 20) -> list[dict[str, Any]]:
    """The tasks that finished last, newest first."""
    return query(
        "SELECT task_id, mission_id, name, stage, kind, arm, seed, state, attempt, worker, error, "
        "finished_at FROM tasks WHERE state IN ('succeeded', 'failed', 'cancelled', 'stopped') "
        "ORDER BY finished_at DESC NULLS LAST LIMIT ?",
        [limit],
    )


def dead_letters(query: Query, limit: int = 50) -> list[dict[str, Any]]:
    return query(
        "SELECT subject, reason, left(body, 200) AS body, recorded_at FROM dead_letters "
        "ORDER BY recorded_at DESC LIMIT ?",
        [limit],
    )


# Scores named `<family>_<length>` (Mission E's `acc_2048`, `passkey_8192`): the mean per arm at each
# length, over examples and seeds, from each task's current attempt (the rows the gates judge).
_BY_LENGTH = r"""
WITH s AS (
    SELECT s.arm, regexp_extract(s.metric, '^(.+)_([0-9]+)$', 1) AS family,
           CAST(regexp_extract(s.metric, '^(.+)_([0-9]+)$', 2) AS BIGINT) AS length, s.value
    FROM example_scores s JOIN tasks t ON t.task_id = s.task_id AND s.attempt = t.attempt
    WHERE s.mission_id = ? AND regexp_matches(s.metric, '^.+_[0-9]+$')
)
SELECT family, arm, length, avg(value) AS value, count(*) AS n FROM s GROUP BY ALL
ORDER BY family, arm, length
"""


def by_length(query: Query, mission_id: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{family: {arm: {length, value, n}}}, for the families scored at two lengths or more."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in query(_BY_LENGTH, [mission_id]):
        line = out.setdefault(r["family"], {}).setdefault(r["arm"], {"length": [], "value": [], "n": []})
        for key in ("length", "value", "n"):
            line[key].append(r[key])
    return {
        family: arms
        for family, arms in out.items()
        if len({n for line in arms.values() for n in line["length"]}) >= 2
    }
