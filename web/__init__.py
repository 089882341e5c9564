"""web: fleetd's status page, JSON API, live feed, /metrics and /healthz (aiohttp).

It reads the running coordinator only through `fleet.view.FleetView`, which `fleetd up` and
`fleetd run` hand to `web.app.serve`.
"""
