"""Who may use the bus: one NKEY per credential, a role per credential, and nats-server's authorization.

`fleetd up` (and `fleetd creds ensure`, the systemd nats unit's first step) generates a coordinator, a
worker and a client credential into `<home>/creds` on its first start: `<name>.nk` holds the seed
(mode 0600, the NATS tooling's own format, so `nats --nkey` reads it too), `roster.json` the public
half (name, role, public key), and `nats-auth.conf` the authorization nats-server loads. The server
holds public keys only; a seed never leaves the file it was written to.

Each role gets the subjects it needs and no more (docs/security.md has the table):
- coordinator: everything, including the JetStream API that creates, purges and deletes streams
  and consumers;
- worker: its task consumer (read, fetch, ack), event and dead-letter publishes, the heartbeat
  bucket, and replies to the coordinator's commands. Never `fleet.ctl.*` or `fleet.cmd.*`;
- client: `fleet.ctl.<its public key>.*` only, so the coordinator knows from the subject, which the
  server enforces, who asked (the audit column).

Every credential's replies come back on `_INBOX_<its public key>.>`, so no one reads another's replies.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

import msgspec
import nkeys

from fleet import paths

ROLES = ("coordinator", "worker", "client")
Role = Literal["coordinator", "worker", "client"]
NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"  # a file name here, and a word in the audit column


class CredsError(ValueError):
    """A credential that is missing, malformed, or readable by others; the message says which file."""


class Entry(msgspec.Struct, frozen=True):
    name: str
    role: Role
    public_key: str


class Actor(msgspec.Struct, frozen=True):
    """Who asked, as the audit table records it."""

    role: str  # a ROLES entry, or "web" (the page's token), "service" (a reactive service), "anonymous"
    credential: str  # the credential's name; the service's or the token's name for the others
    key: str = ""  # the credential's public key, where there is one


def actor(roster: dict[str, Entry], key: str) -> Actor:
    entry = roster.get(key)
    if entry is None:
        return Actor(role="anonymous", credential="unknown", key=key)
    return Actor(role=entry.role, credential=entry.name, key=key)


def creds_dir(home: Path) -> Path:
    return Path(home) / "creds"


def seed_path(home: Path, name: str) -> Path:
    return paths.under(creds_dir(home), f"{name}.nk")


def auth_conf(home: Path) -> Path:
    return creds_dir(home) / "nats-auth.conf"


def inbox_prefix(public_key: str) -> str:
    return f"_INBOX_{public_key}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---- seeds ---------------------------------------------------------------------------------------


class Identity(msgspec.Struct, frozen=True):
    """A loaded seed: what `bus.connect` signs the server's nonce with."""

    seed: str
    public_key: str


def new_seed() -> str:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    return str(nkeys.from_seed(seed.encode()).public_key.decode())


def read_identity(path: Path) -> Identity:
    """The seed in `path`, refused if others may read it (as ssh refuses a private key)."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise CredsError(f"{path}: cannot read the credential: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredsError(
            f"{path}: others may read this credential (mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    if not text.startswith("SU"):
        raise CredsError(f"{path}: not an NKEY user seed (it should start with SU)")
    try:
        return Identity(seed=text, public_key=public_key(text))
    except (nkeys.NkeysError, ValueError) as e:
        raise CredsError(f"{path}: not a valid NKEY seed ({type(e).__name__})") from None


def find(home: Path, role: str, explicit: str | Path | None = None) -> Path | None:
    """The credential a process of `role` uses: the one it was given, else `<home>/creds/<role>.nk`."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CredsError(f"{path}: no such credential file")
        return path
    default = seed_path(home, role)
    return default if default.is_file() else None


# ---- the roster and the server's authorization ---------------------------------------------------


def load_roster(home: Path) -> dict[str, Entry]:
    """Public key -> entry; empty before the first `ensure`."""
    path = creds_dir(home) / "roster.json"
    if not path.is_file():
        return {}
    entries = msgspec.json.decode(path.read_bytes(), type=list[Entry])
    return {e.public_key: e for e in entries}


def ensure(home: Path) -> dict[str, Entry]:
    """Generate the missing role credentials, then (re)write the authorization; safe at every start."""
    roster = load_roster(home)
    names = {e.name for e in roster.values()}
    for role in ROLES:
        if role not in names or not seed_path(home, role).is_file():
            roster = _set(home, roster, role, role)  # type: ignore[arg-type]
    _write_public(home, roster)
    return roster


def add(home: Path, name: str, role: str) -> Path:
    if not re.fullmatch(NAME, name):
        raise CredsError(f"credential name {name!r}: letters, digits, '_' and '-', a letter or digit first")
    if role not in ROLES:
        raise CredsError(f"role {role!r}: one of {', '.join(ROLES)}")
    roster = load_roster(home)
    if any(e.name == name for e in roster.values()):
        raise CredsError(f"a credential named {name!r} exists; rotate or remove it")
    _write_public(home, _set(home, roster, name, role))  # type: ignore[arg-type]
    return seed_path(home, name)


def rotate(home: Path, name: str) -> Path:
    """A new seed for `name`, same role; the old key stops working once the server reloads."""
    roster = load_roster(home)
    found = [e for e in roster.values() if e.name == name]
    if not found:
        raise CredsError(f"no credential named {name!r} (have: {', '.join(sorted(_names(roster)))})")
    _write_public(home, _set(home, roster, name, found[0].role))
    return seed_path(home, name)


def remove(home: Path, name: str) -> None:
    roster = load_roster(home)
    if not any(e.name == name for e in roster.values()):
        raise CredsError(f"no credential named {name!r}")
    if name in ROLES:
        raise CredsError(f"{name!r} is a role's own credential; rotate it instead")
    _write_public(home, {k: e for k, e in roster.items() if e.name != name})
    seed_path(home, name).unlink(missing_ok=True)


def _names(roster: dict[str, Entry]) -> set[str]:
    return {e.name for e in roster.values()}


def _set(home: Path, roster: dict[str, Entry], name: str, role: Role) -> dict[str, Entry]:
    seed = new_seed()
    write_private(seed_path(home, name), seed + "\n")
    kept = {k: e for k, e in roster.items() if e.name != name}
    entry = Entry(name=name, role=role, public_key=public_key(seed))
    return {**kept, entry.public_key: entry}


def _write_public(home: Path, roster: dict[str, Entry]) -> None:
    entries = sorted(roster.values(), key=lambda e: (ROLES.index(e.role), e.name))
    write_private(creds_dir(home) / "roster.json", msgspec.json.format(msgspec.json.encode(entries)).decode())
    write_private(auth_conf(home), server_config(entries))


def write_private(path: Path, text: str) -> None:
    """Write atomically, created 0600 in a 0700 directory (never briefly world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- permissions -----------------------------------------------------------------------------------

# The stream names of fleet.bus and fleet.artifacts, spelled out for the server.
TASKS, KV, OBJ = "FLEET_TASKS", "KV_fleet_workers", "OBJ_fleet_artifacts"


def permissions(entry: Entry) -> dict[str, Any]:
    """nats-server permissions for one credential (allow lists: anything unlisted is denied)."""
    inbox = f"{inbox_prefix(entry.public_key)}.>"
    if entry.role == "coordinator":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if entry.role == "worker":
        return {
            "publish": {
                "allow": [
                    "fleet.evt.>",  # its tasks' events (JetStream-stored; the ack comes to its inbox)
                    "fleet.dlq.>",  # task messages it cannot decode
                    "$KV.fleet_workers.>",  # its heartbeat
                    f"$JS.ACK.{TASKS}.>",  # acks and in-progress for its tasks
                    f"$JS.API.CONSUMER.MSG.NEXT.{TASKS}.*",  # fetch
                    f"$JS.API.CONSUMER.INFO.{TASKS}.*",  # is my consumer there yet?
                    f"$JS.API.STREAM.INFO.{KV}",  # binding the heartbeat bucket
                    # The artifact bucket (fleet.artifacts): bind, read an entry, write chunks and
                    # entries, and the consumer a read streams its chunks through. No stream purge or
                    # delete; a worker could still overwrite an entry's metadata, which the fetching side
                    # catches: every part and the whole are checked against the coordinator's hash.
                    f"$JS.API.STREAM.INFO.{OBJ}",
                    f"$JS.API.STREAM.MSG.GET.{OBJ}",
                    f"$JS.API.DIRECT.GET.{OBJ}.>",
                    f"$JS.API.CONSUMER.CREATE.{OBJ}",
                    f"$JS.API.CONSUMER.CREATE.{OBJ}.>",
                    f"$JS.API.CONSUMER.DELETE.{OBJ}.>",
                    "$JS.API.STREAM.NAMES",  # how nats-py finds the bucket's stream for that consumer
                    "$O.fleet_artifacts.>",
                ]
            },
            "subscribe": {"allow": ["fleet.cmd.*", inbox]},
            "allow_responses": True,  # answering the coordinator's commands
        }
    return {"publish": {"allow": [f"fleet.ctl.{entry.public_key}.*"]}, "subscribe": {"allow": [inbox]}}


def server_config(entries: list[Entry]) -> str:
    """nats-server's configuration file for the roster (its format reads JSON)."""
    users = [{"nkey": e.public_key, "permissions": permissions(e)} for e in entries]
    return json.dumps({"authorization": {"users": users}}, indent=2) + "\n"
