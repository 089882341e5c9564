"""The page's DuckDB reads on a real DuckDB file: downsampled curves agree with numpy on the raw points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fleetd.store import Store
from web import queries


def _points(store: Store, task: str, attempt: int, name: str, steps: np.ndarray, values: np.ndarray) -> None:
    table = pa.table(
        {
            "task_id": [task] * len(steps),
            "attempt": pa.array([attempt] * len(steps), pa.int32()),
            "name": [name] * len(steps),
            "step": pa.array(steps, pa.int64()),
            "value": pa.array(values, pa.float64()),
            "time": pa.array(np.zeros(len(steps)), pa.float64()),
        }
    )
    store.con.register("_pts", table)
    store.con.execute("INSERT INTO metrics SELECT * FROM _pts")
    store.con.unregister("_pts")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "fleet.duckdb")


def test_curves_are_bucket_means_mins_and_maxes(store: Store) -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(100_000)
    values = np.cumsum(rng.normal(size=steps.size))
    _points(store, "m/t", 1, "loss", steps, values)
    _points(store, "m/t", 2, "loss", steps, -values)  # another attempt: must not leak in
    _points(store, "m/u", 1, "loss", steps, values + 5)  # another task
    got = queries.curves(store.query, [("m/t", 1)], points=250)["m/t"]["loss"]
    buckets = np.floor(steps * 250 / steps.size).astype(int)
    assert len(got["step"]) == 250
    for b in (0, 1, 137, 249):
        mine = values[buckets == b]
        i = got["step"].index(int(steps[buckets == b][0]))
        assert got["value"][i] == pytest.approx(mine.mean())
        assert got["low"][i] == pytest.approx(mine.min()) and got["high"][i] == pytest.approx(mine.max())


def test_short_lines_come_back_whole_and_a_metric_can_be_picked(store: Store) -> None:
    _points(store, "m/t", 1, "acc", np.array([0, 10, 20]), np.array([0.1, 0.5, 0.9]))
    _points(store, "m/t", 1, "loss", np.arange(1000), np.ones(1000))
    got = queries.curves(store.query, [("m/t", 1)], points=100, metric="acc")
    assert set(got["m/t"]) == {"acc"}
    assert got["m/t"]["acc"]["step"] == [0, 10, 20] and got["m/t"]["acc"]["value"] == [0.1, 0.5, 0.9]
    # The page opens on a training loss (then the rest by name), whatever the alphabet says.
    assert queries.metric_names(store.query, ["m/t"]) == ["loss", "acc"]
    _points(store, "m/t", 1, "adapter_overhead", np.array([0]), np.array([1.5]))
    _points(store, "m/t", 1, "zz_steps", np.arange(5000), np.ones(5000))
    assert queries.metric_names(store.query, ["m/t"]) == ["loss", "acc", "adapter_overhead", "zz_steps"]
    _points(store, "m/u", 1, "acc", np.arange(50), np.ones(50))  # no loss: the longest series first
    _points(store, "m/u", 1, "adapter_overhead", np.array([0]), np.array([1.5]))
    assert queries.metric_names(store.query, ["m/u"]) == ["acc", "adapter_overhead"]
    assert queries.metric_names(store.query, []) == []
    assert queries.curves(store.query, [], points=100) == {}


def test_scores_by_length_are_means_per_arm_from_each_tasks_current_attempt(store: Store) -> None:
    for task, attempt in (("m/s1", 2), ("m/s2", 1), ("other/s1", 1)):
        store.con.execute("INSERT INTO tasks (task_id, attempt) VALUES (?, ?)", [task, attempt])
    rows = [
        # (task, attempt, arm, seed, example, metric, value)
        ("m/s1", 1, "bem", 1, "e1", "acc_512", 0.0),  # a superseded attempt's row: not counted
        ("m/s1", 2, "bem", 1, "e1", "acc_512", 1.0),
        ("m/s1", 2, "bem", 1, "e2", "acc_512", 0.0),
        ("m/s1", 2, "bem", 1, "e1", "acc_2048", 1.0),
        ("m/s2", 1, "bem", 2, "e1", "acc_2048", 0.0),
        ("m/s1", 2, "h2o", 1, "e1", "acc_512", 1.0),
        ("m/s1", 2, "bem", 1, "e1", "passkey_512", 1.0),  # one length only: no curve
        ("m/s1", 2, "bem", 1, "e1", "chrf#0", 3.0),  # not a length
        ("other/s1", 1, "bem", 1, "e1", "acc_512", 0.5),  # another mission
    ]
    for task, attempt, arm, seed, example, metric, value in rows:
        store.con.execute(
            "INSERT INTO example_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [task.split("/")[0], task, attempt, arm, seed, example, metric, value],
        )
    got = queries.by_length(store.query, "m")
    assert set(got) == {"acc"}
    assert got["acc"]["bem"] == {"length": [512, 2048], "value": [0.5, 0.5], "n": [2, 2]}
    assert got["acc"]["h2o"] == {"length": [512], "value": [1.0], "n": [1]}
