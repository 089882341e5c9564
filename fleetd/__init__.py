"""fleetd: the coordinator (docs/architecture.md).

`coordinator` (recorder, control API, bus effects), `scheduler` (task states, placement, leases),
`store` (DuckDB), `judge` (the stats engine at a mission's end), `services` (the reactive services
missions register) and `telemetry` (Prometheus). It imports `schemas`, `stats` and `fleet`, never
`bem`, `workers` or `web`: the command lines in `fleetcli` put them together.
"""
