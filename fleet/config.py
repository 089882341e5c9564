"""fleetd's configuration (DESIGN.md section 7): TOML, then `FLEET_*` environment, then flags.

Every field has a laptop default; an unknown key in the TOML is an error naming it. Environment
names are `FLEET_<SECTION>_<FIELD>` (`FLEET_NATS_URL`, `FLEET_SCHEDULER_LEASE_S`) plus `FLEET_HOME`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct


class NatsConfig(Struct, forbid_unknown_fields=True):
    url: str = ""  # empty: fleetd up starts an embedded nats-server; fleetd run needs one
    host: str = "127.0.0.1"  # where the embedded server binds
    # The NKEY seed this process connects with; empty: <home>/creds/<role>.nk (coordinator, worker,
    # client), which `fleetd up` and `fleetd creds ensure` generate. Needed for any non-loopback URL.
    credentials_file: str = ""
    # The CA that tls:// URLs are checked against; empty: <home>/tls/ca.pem if there is one (`fleetd up
    # --cluster` writes it), else the system's trust store.
    tls_ca_file: str = ""


class SchedulerConfig(Struct, forbid_unknown_fields=True):
    lease_s: float = 10.0
    assign_grace_s: float = 10.0
    heartbeat_poll_s: float = 0.5
    tasks_per_worker: int = 1


class WorkerConfig(Struct, forbid_unknown_fields=True):
    heartbeat_s: float = 1.0
    cancel_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this
    # Imported once by the template process every task forks from, so tasks start without importing them.
    preload: list[str] = msgspec.field(default_factory=lambda: ["torch"])

    def env(self) -> dict[str, str]:
        """The environment `fleet-worker` reads these from."""
        return {
            "FLEET_WORKER_HEARTBEAT_S": str(self.heartbeat_s),
            "FLEET_WORKER_CANCEL_GRACE_S": str(self.cancel_grace_s),
            "FLEET_WORKER_PRELOAD": ",".join(self.preload),
        }


class WebConfig(Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: str = ""  # empty: FLEET_WEB_TOKEN, else a token generated into <home>/web-token
    names: list[str] = []  # host names the page also answers to (a reverse proxy's, say)
    open: list[str] = msgspec.field(default_factory=lambda: ["/healthz", "/metrics"])  # no token needed


class SqlConfig(Struct, forbid_unknown_fields=True):
    """`fleetctl sql` and the page's reads: stopped past `timeout_s`, at most `max_rows` rows back."""

    timeout_s: float = 30.0
    max_rows: int = 10_000


class ArtifactsConfig(Struct, forbid_unknown_fields=True):
    """What one task leaves another (`fleet.artifacts`): through the object store, or a shared path."""

    store: str = "object"  # "object": NATS's object store, no shared disk; "shared": paths on one mount
    # The bucket's limit (fleetd creates it). JetStream reserves it on every replica's disk at creation,
    # so it must fit beside FLEET_EVENTS' 8 GiB; raise both on a box with room.
    max_bytes: int = 8 * 1024**3
    max_artifact_bytes: int = 4 * 1024**3  # one output's limit; a larger one fails its task, named
    cache_dir: str = ""  # a host's fetched copies; empty: <home>/cache/artifacts


NOTIFY_EVENTS = ("mission_end", "rollback", "dead_letter")


class NotifyConfig(Struct, forbid_unknown_fields=True):
    """Who hears of a mission's end, a service's rollback, or a dead letter (fleetd.notify)."""

    webhook: str = ""  # a URL: each note as a JSON POST
    command: list[str] = []  # an argv: each note as JSON on its stdin
    on: list[str] = msgspec.field(default_factory=lambda: ["mission_end", "rollback", "dead_letter"])
    attempts: int = 5  # tries per note and channel, with the wait doubling from backoff_s
    backoff_s: float = 1.0
    timeout_s: float = 10.0  # one try's limit
    queue: int = 1000  # notes waiting to be sent; beyond it, a note is dropped (and counted)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.on) - set(NOTIFY_EVENTS))
        if unknown:
            raise ValueError(f"notify.on: {unknown} unknown; the events are {', '.join(NOTIFY_EVENTS)}")


class FleetConfig(Struct, forbid_unknown_fields=True):
    home: str = ".fleet"
    missions_dir: str = ""  # empty: the missions shipped in schemas/missions
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    web: WebConfig = msgspec.field(default_factory=WebConfig)
    sql: SqlConfig = msgspec.field(default_factory=SqlConfig)
    artifacts: ArtifactsConfig = msgspec.field(default_factory=ArtifactsConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)

    @property
    def home_path(self) -> Path:
        return Path(self.home)


class ConfigError(ValueError):
    pass


def load(path: Path | None = None, env: dict[str, str] | None = None, **flags: Any) -> FleetConfig:
    """TOML (if given or found at <home>/fleetd.toml), then the environment, then non-None flags."""
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    home = flags.get("home") or env.get("FLEET_HOME") or ".fleet"
    candidate = path or Path(home) / "fleetd.toml"
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if candidate.is_file():
        try:
            raw = tomllib.loads(candidate.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{candidate}: {e}") from None
    raw["home"] = home if (flags.get("home") or env.get("FLEET_HOME") or "home" not in raw) else raw["home"]
    if "FLEET_MISSIONS_DIR" in env:
        raw["missions_dir"] = env["FLEET_MISSIONS_DIR"]
    for section, cls in (
        ("nats", NatsConfig),
        ("scheduler", SchedulerConfig),
        ("worker", WorkerConfig),
        ("web", WebConfig),
        ("sql", SqlConfig),
        ("artifacts", ArtifactsConfig),
        ("notify", NotifyConfig),
    ):
        for name in cls.__struct_fields__:
            key = f"FLEET_{section}_{name}".upper()
            if key in env:
                value: Any = env[key]
                if isinstance(getattr(cls(), name), list):  # lists are comma-separated
                    value = [v.strip() for v in value.split(",") if v.strip()]
                raw.setdefault(section, {})[name] = value
    for dotted, value in flags.items():
        if value is None or dotted == "home":
            continue
        section, _, name = dotted.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    try:
        return msgspec.convert(raw, FleetConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{candidate}: {e}") from None


def show(cfg: FleetConfig) -> str:
    return msgspec.json.format(msgspec.json.encode(cfg), indent=2).decode()
