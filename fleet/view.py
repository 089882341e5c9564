"""What the web page may see of a running coordinator: `FleetView`, and the `Commit` notes it listens to.

`fleetd up` and `fleetd run` hand the coordinator to `web.app.serve` as a `FleetView`, so the page
depends on this interface, never on fleetd's modules (docs/architecture.md, the arrows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fleet.creds import Actor
from schemas import messages as m

T = TypeVar("T")
Query = Callable[..., list[dict[str, Any]]]
"""`query(sql, params=None)`: a read-only SQL call against the fleet's DuckDB file, rows as dicts."""


@dataclass(frozen=True)
class Commit:
    """What one committed transaction changed: for live views."""

    events: list[m.Event]
    tasks: set[str]  # task ids whose row changed
    missions: set[str]  # missions whose row or tasks changed
    decided: str | None  # a mission whose decisions were written


class FleetView(Protocol):
    listeners: list[Callable[[Commit], None]]  # called after each commit, on the event loop

    def task_views(self, mission_id: str | None = None) -> list[dict[str, Any]]:
        """Tasks as status readers show them (`schemas.missions.task_view`), in submission order."""
        ...

    def task_view(self, task_id: str) -> dict[str, Any] | None: ...

    def counts(self, mission_id: str) -> dict[str, int]:
        """A mission's tasks by state."""
        ...

    def workers_view(self) -> list[dict[str, Any]]: ...

    async def read_sql(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(query, *args)` on a reader thread, with `query` running read-only SQL."""
        ...

    async def call(self, verb: str, data: bytes, actor: Actor) -> m.Reply:
        """One control API call, as fleetctl makes it (submit, cancel, ...), recorded as `actor`'s."""
        ...

    def metrics_exposition(self) -> bytes:
        """Prometheus' text format of the fleet's metrics."""
        ...

    async def health(self) -> dict[str, bool]:
        """Each dependency (nats, jetstream, duckdb, workers) and whether it answers."""
        ...
