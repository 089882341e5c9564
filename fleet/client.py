"""A control-API client over NATS request/reply, used by fleetctl, `fleetd up --demo` and tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client

from fleet import bus
from schemas import messages as m


class FleetError(RuntimeError):
    """The coordinator refused or could not answer; `code` says which (invalid_spec, refused, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def find_url(home: Path | None = None, url: str | None = None) -> str:
    """--nats, else the running fleet's file under --home / $FLEET_HOME / ./.fleet."""
    if url:
        return url
    home = home or Path(os.environ.get("FLEET_HOME", ".fleet"))
    info = home / "fleetd.json"
    if not info.is_file():
        raise FleetError(
            "no_fleet",
            f"no fleet found under {home} (no {info}); start one with `fleetd up` or pass --nats URL",
        )
    return str(json.loads(info.read_text())["nats_url"])


class FleetClient:
    def __init__(self, nc: Client, url: str) -> None:
        self.nc, self.url = nc, url

    @classmethod
    async def connect(cls, url: str) -> FleetClient:
        return cls(await cls._connect(url), url)

    @staticmethod
    async def _connect(url: str) -> Client:
        try:
            return await bus.connect(url, "fleetctl", max_reconnect_attempts=2, connect_timeout=3)
        except (nats.errors.Error, OSError) as e:
            raise FleetError("no_fleet", f"cannot reach NATS at {url}: {e!r}") from None

    async def close(self) -> None:
        await self.nc.drain()

    async def call(self, verb: str, request: msgspec.Struct | None = None, timeout: float = 30.0) -> Any:
        payload = m.encode(request) if request is not None else b""
        try:
            try:
                msg = await self.nc.request(bus.ctl_subject(verb), payload, timeout=timeout)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                # After a nats-server restart a long-lived connection's reply path can stay broken
                # (seen with `fleetd up --demo`): one retry on a fresh connection.
                await self.nc.close()
                self.nc = await self._connect(self.url)
                msg = await self.nc.request(bus.ctl_subject(verb), payload, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise FleetError("no_fleet", "NATS is up but no fleetd answers on fleet.ctl.*") from None
        except nats.errors.TimeoutError:
            raise FleetError("timeout", f"fleetd did not answer {verb} within {timeout:g} s") from None
        reply = msgspec.json.decode(msg.data, type=m.Reply)
        if not reply.ok:
            assert reply.error is not None
            raise FleetError(reply.error.code, reply.error.message)
        return reply.data

    async def submit(
        self, mission: str, profile: str | None = None, overrides: dict[str, Any] | None = None
    ) -> Any:
        return await self.call(
            "submit", m.SubmitRequest(mission=mission, profile=profile, overrides=overrides or {})
        )

    async def status(self, mission_id: str | None = None) -> Any:
        return await self.call("status", m.IdRequest(id=mission_id))
