"""Connecting to NATS and the idempotent setup of streams, consumers and the KV bucket (NATS_NOTES 2-3).

Shared by fleetd, the workers, fleetctl and the benchmarks, so every process connects the same way:
async callbacks routed to structlog, a short ping interval, reconnect forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from fleet import creds, tls

log = structlog.get_logger("fleet.bus")

TASKS_STREAM = "FLEET_TASKS"
EVENTS_STREAM = "FLEET_EVENTS"
# What a pull `fetch` raises when nothing arrived in time: nats-py's own TimeoutError, or the builtin
# one from an internal wait. The builtin is an OSError, so it must be caught before OSError is.
FETCH_EMPTY = (nats.errors.TimeoutError, TimeoutError)
DLQ_STREAM = "FLEET_DLQ"
WORKERS_BUCKET = "fleet_workers"
RECORDER_DURABLE = "recorder"
DUP_WINDOW_S = 120.0


def task_subject(worker: str) -> str:
    return f"fleet.task.{worker}"


def cmd_subject(worker: str) -> str:
    return f"fleet.cmd.{worker}"


def ctl_subject(caller: str, verb: str) -> str:
    """A control call; `caller` is the credential's public key, which the server holds it to."""
    return f"fleet.ctl.{caller}.{verb}"


ANONYMOUS = "anonymous"  # the caller token of a connection without a credential (an open test server)


def identity(creds_file: Path | None) -> creds.Identity | None:
    return creds.read_identity(creds_file) if creds_file is not None else None


async def connect(
    url: str, name: str, creds_file: Path | None = None, ca_file: Path | None = None, **extra: Any
) -> Client:
    """Connect as the credential in `creds_file` (an NKEY seed); none only to a loopback server.

    `url` may list several servers of one cluster, comma-separated: the client starts on one and fails
    over to the others. `tls://` URLs are checked against `ca_file` (the fleet's CA, `fleet.tls`)."""
    me = identity(creds_file)
    if me is None:
        hosts = [urlparse(u.strip()).hostname or "" for u in url.split(",")]
        if not all(creds.is_loopback(h) for h in hosts):
            raise creds.CredsError(
                f"refusing to connect to {url} without a credential: pass --creds or set "
                "nats.credentials_file (see docs/security.md)"
            )

    async def error_cb(e: Exception) -> None:
        log.warning("nats_error", client=name, error=repr(e))

    async def disconnected_cb() -> None:
        log.info("nats_disconnected", client=name)

    async def reconnected_cb() -> None:
        log.info("nats_reconnected", client=name)

    async def closed_cb() -> None:
        log.info("nats_closed", client=name)

    options: dict[str, Any] = {
        "name": name,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "ping_interval": 5,
        "max_outstanding_pings": 2,
        "pending_size": 32 * 1024 * 1024,
    }
    if any(u.strip().startswith("tls://") for u in url.split(",")):
        options["tls"] = tls.client_context(ca_file)
    if me is not None:
        options["nkeys_seed_str"] = me.seed
        options["inbox_prefix"] = creds.inbox_prefix(me.public_key)
    options.update(extra)
    return await nats.connect([u.strip() for u in url.split(",")], **options)


def replicas(nc: Client) -> int:
    """Streams' and buckets' replicas: min(3, cluster size). The client's server pool holds the URLs it
    was given and those the cluster announced (INFO connect_urls), so one URL of a cluster is enough."""
    hosts = {u.netloc for u in nc.servers}
    return max(1, min(3, len(hosts)))


async def ensure_streams(
    js: JetStreamContext, *, replicas: int = 1, events_max_bytes: int = 8 * 1024**3
) -> None:
    """Create or update the streams; safe to run at every start (an update may raise their replicas)."""
    configs = [
        StreamConfig(
            name=TASKS_STREAM,
            num_replicas=replicas,
            subjects=["fleet.task.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUP_WINDOW_S,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            num_replicas=replicas,
            subjects=["fleet.evt.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_bytes=events_max_bytes,
            max_age=14 * 24 * 3600.0,
            discard=DiscardPolicy.OLD,
            duplicate_window=DUP_WINDOW_S,
            max_msg_size=4 * 1024 * 1024,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            num_replicas=replicas,
            subjects=["fleet.dlq.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUP_WINDOW_S,
        ),
    ]
    for cfg in configs:
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.update_stream(cfg)  # already exists with other settings: bring it to ours


async def workers_kv(js: JetStreamContext, ttl_s: float = 300.0, replicas: int = 1) -> KeyValue:
    """The heartbeat bucket. The bucket TTL only collects garbage; the coordinator judges leases by age."""
    cfg = KeyValueConfig(
        bucket=WORKERS_BUCKET, history=1, ttl=ttl_s, storage=StorageType.FILE, replicas=replicas
    )
    try:
        return await js.create_key_value(cfg)
    except BadRequestError:
        await rescale(js, f"KV_{WORKERS_BUCKET}", replicas)
        return await js.key_value(WORKERS_BUCKET)


async def rescale(js: JetStreamContext, stream: str, replicas: int, **limits: Any) -> None:
    """A bucket made with other settings (a fleet that was one node is now a cluster, or a limit was
    raised): the same stream, at the replicas and `limits` (StreamConfig fields) asked for."""
    config = (await js.stream_info(stream)).config
    wanted = {"num_replicas": replicas, **limits}
    if any(getattr(config, k) != v for k, v in wanted.items()):
        for k, v in wanted.items():
            setattr(config, k, v)
        await js.update_stream(config)


async def durable_pull(
    js: JetStreamContext, subject: str, stream: str, config: ConsumerConfig, patience_s: float = 120.0
) -> JetStreamContext.PullSubscription:
    """A durable pull subscription, retried while JetStream cannot place the consumer yet: on a cluster
    it may be electing a stream leader, or growing a stream's replicas, for a few seconds."""
    delay, waited = 0.2, 0.0
    while True:
        try:
            return await js.pull_subscribe(subject, durable=config.durable_name, stream=stream, config=config)
        except (nats.errors.Error, TimeoutError) as e:
            if waited >= patience_s:
                raise
            log.warning("consumer_not_ready", stream=stream, durable=config.durable_name, error=repr(e))
            await anyio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


def worker_consumer(worker: str, *, ack_wait: float = 30.0) -> ConsumerConfig:
    """The one durable pull consumer on fleet.task.<worker>: one task in flight; a redelivery = a restart."""
    return ConsumerConfig(
        durable_name=worker,
        filter_subject=task_subject(worker),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=1,
    )


def service_consumer(name: str) -> ConsumerConfig:
    """A reactive service's durable consumer: metric events only, its own position in the stream."""
    return ConsumerConfig(
        durable_name=name,
        filter_subject="fleet.evt.*.*.metrics",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_deliver=-1,
        max_ack_pending=1000,
    )


def recorder_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=RECORDER_DURABLE,
        filter_subject="fleet.evt.>",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=20_000,
    )
