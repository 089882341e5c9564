"""A NATS cluster on one machine: `fleetd up --cluster N` and the cluster tests (docs/operations.md).

N nats-server processes with JetStream, each with its own store, joined by routes on loopback ports.
Both doors are locked as on real boxes: clients need TLS (the home's CA, `fleet.tls`) and an NKEY
credential (`fleet.creds`); routes need mutual TLS and the cluster's route password. Ports are picked
once and kept, so a node that is killed and restarted comes back where its peers and clients look.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from fleet import creds, tls
from fleet.natsserver import NatsServer

CLUSTER_NAME = "bem-fleet"
ROUTE_USER = "route"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (bound together, then released: routes must know them in advance)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int
    server: NatsServer

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.client_port}"


def _route_password(home: Path) -> str:
    path = creds.creds_dir(home) / "route-password"
    if not path.is_file():
        creds.write_private(path, secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def node_conf(
    name: str, route_port: int, peers: list[int], files: tls.TlsFiles, password: str, auth: Path
) -> str:
    """One node's configuration: its name, TLS for clients, the cluster block, and the credentials'
    authorization (included, so a rotation's reload reaches every node)."""
    tls_block = {
        "cert_file": str(files.cert),
        "key_file": str(files.key),
        "ca_file": str(files.ca),
        "timeout": 5,
    }
    conf = {
        "server_name": name,
        "tls": tls_block,
        "cluster": {
            "name": CLUSTER_NAME,
            "listen": f"127.0.0.1:{route_port}",
            "tls": {**tls_block, "verify": True},  # each route presents the fleet's certificate
            "authorization": {"user": ROUTE_USER, "password": password, "timeout": 5},
            "routes": [f"nats-route://{ROUTE_USER}:{password}@127.0.0.1:{p}" for p in peers],
        },
    }
    # nats-server's format reads JSON; `include` (a path relative to this file) is the one addition.
    return json.dumps(conf, indent=2)[:-1] + f'  include "{auth}"\n}}\n'


class Cluster:
    """`size` nodes under `<home>/cluster/<name>/`; `start()` brings them all up and waits for health."""

    def __init__(self, home: Path, size: int = 3):
        if size < 1:
            raise ValueError(f"a cluster needs at least 1 node, not {size}")
        self.home = Path(home)
        creds.ensure(self.home)
        self.files = tls.ensure(self.home)
        password = _route_password(self.home)
        ports = free_ports(2 * size)
        client_ports, route_ports = ports[:size], ports[size:]
        self.nodes: list[Node] = []
        for i in range(size):
            name = f"n{i + 1}"
            root = self.home / "cluster" / name
            root.mkdir(parents=True, exist_ok=True)
            conf = root / "nats.conf"
            peers = [p for j, p in enumerate(route_ports) if j != i]
            auth = Path(os.path.relpath(creds.auth_conf(self.home), root))
            text = node_conf(name, route_ports[i], peers, self.files, password, auth)
            creds.write_private(conf, text)
            server = NatsServer(root, port=client_ports[i], auth=conf, scheme="tls")
            self.nodes.append(Node(name, client_ports[i], route_ports[i], server))

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what fleetd, workers and fleetctl are given."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 30.0) -> Cluster:
        for n in self.nodes:
            n.server.start_process()
        for n in self.nodes:
            n.server.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.server.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
