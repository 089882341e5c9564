"""fleetcli: the command-line entry points, `fleetd` (up, run, config show) and `fleetctl`.

The one place that may import every package: `fleetd up` wires the coordinator, the web page and
worker processes together.
"""
