"""fleet: the lower fleet package that the coordinator, the workers, the page and the command lines share.

`bus` (NATS and JetStream set-up), `config` (fleetd.toml), `logs` (structlog), `natsserver` (the
embedded nats-server), `sdnotify` (systemd), `client` (the control API over NATS), `render` (terminal
output), `registry` (task kinds and services by name) and `view` (what the web page may see of the
coordinator). It imports only `schemas`.
"""
