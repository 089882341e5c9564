"""A control-API client over NATS request/reply, used by fleetctl, `fleetd up --demo` and tests."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from fleet import bus, creds, tls
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


def find_creds(home: Path | None = None, explicit: str | Path | None = None) -> Path | None:
    """--creds, else $FLEET_NATS_CREDENTIALS_FILE, else the home's client credential (if any)."""
    home = home or Path(os.environ.get("FLEET_HOME", ".fleet"))
    try:
        return creds.find(home, "client", explicit or os.environ.get("FLEET_NATS_CREDENTIALS_FILE"))
    except creds.CredsError as e:
        raise FleetError("no_credential", str(e)) from None


def find_ca(home: Path | None = None, explicit: str | Path | None = None) -> Path | None:
    """--tls-ca, else $FLEET_NATS_TLS_CA_FILE, else the home's CA (if any): what tls:// URLs are checked
    against."""
    home = home or Path(os.environ.get("FLEET_HOME", ".fleet"))
    try:
        return tls.find_ca(home, explicit or os.environ.get("FLEET_NATS_TLS_CA_FILE"))
    except FileNotFoundError as e:
        raise FleetError("no_credential", str(e)) from None


class FleetClient:
    """Control calls as one credential; `caller` (its public key) is the subject token the server checks."""

    nc: Client

    def __init__(self, url: str, creds_file: Path | None, ca_file: Path | None = None) -> None:
        self.url, self.creds_file, self.ca_file = url, creds_file, ca_file
        try:
            me = bus.identity(creds_file)
        except creds.CredsError as e:
            raise FleetError("no_credential", str(e)) from None
        self.caller = me.public_key if me is not None else bus.ANONYMOUS
        self.refusal = ""  # the server's last permissions violation: why a call went unanswered
        self.refused = asyncio.Event()  # set with it, so a refused call ends now, not at its timeout

    @classmethod
    async def connect(
        cls, url: str, creds_file: Path | None = None, ca_file: Path | None = None
    ) -> FleetClient:
        client = cls(url, creds_file, ca_file)
        client.nc = await client._connect()
        return client

    async def _connect(self) -> Client:
        url, creds_file = self.url, self.creds_file

        async def error_cb(e: Exception) -> None:
            if any(word in str(e).lower() for word in ("permissions violation", "authorization")):
                self.refusal = str(e)
                self.refused.set()

        try:
            return await bus.connect(
                url,
                "fleetctl",
                creds_file,
                self.ca_file,
                max_reconnect_attempts=2,
                connect_timeout=3,
                error_cb=error_cb,
            )
        except creds.CredsError as e:
            raise FleetError("no_credential", str(e)) from None
        except (nats.errors.Error, OSError) as e:
            # A refused credential surfaces as the error callback's, then "no servers" once retries end.
            if "authorization" in f"{e} {self.refusal}".lower():
                raise FleetError(
                    "unauthorized",
                    f"NATS at {url} refused the credential {creds_file or '(none)'}: {self.refusal or e}",
                ) from None
            raise FleetError("no_fleet", f"cannot reach NATS at {url}: {e!r}") from None

    async def close(self) -> None:
        await self.nc.drain()

    async def _request(self, verb: str, payload: bytes, timeout: float) -> Msg:
        """The request, or FleetError("refused") as soon as the server says this credential may not."""
        self.refused.clear()
        ask = asyncio.ensure_future(self.nc.request(bus.ctl_subject(self.caller, verb), payload, timeout))
        refused = asyncio.ensure_future(self.refused.wait())
        await asyncio.wait({ask, refused}, return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if not ask.done():
            ask.cancel()
            raise FleetError("refused", f"the bus refused {verb}: {self.refusal}")
        return ask.result()

    async def call(self, verb: str, request: msgspec.Struct | None = None, timeout: float = 30.0) -> Any:
        payload = m.encode(request) if request is not None else b""
        try:
            try:
                msg = await self._request(verb, payload, timeout)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                # After a nats-server restart a long-lived connection's reply path can stay broken
                # (seen with `fleetd up --demo`): one retry on a fresh connection.
                await self.nc.close()
                self.nc = await self._connect()
                msg = await self._request(verb, payload, timeout)
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
        self,
        mission: str,
        profile: str | None = None,
        overrides: dict[str, Any] | None = None,
        sweep: bool = False,
    ) -> Any:
        req = m.SubmitRequest(mission=mission, profile=profile, overrides=overrides or {}, sweep=sweep)
        return await self.call("submit", req)

    async def sweep(self, mission_id: str) -> Any:
        return await self.call("sweep", m.IdRequest(id=mission_id))

    async def status(self, mission_id: str | None = None) -> Any:
        return await self.call("status", m.IdRequest(id=mission_id))
