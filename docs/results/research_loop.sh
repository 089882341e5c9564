#!/usr/bin/env bash
# The research loop on a fresh fleet (two CPU workers, a temporary home), as a user types it:
# two selftests compared (the second with a changed effect), the selftest's 2x2 sweep and its winner
# run gated, then gc. Prints each command's output; `docs/results/research_loop.txt` is this output.
#   bash docs/results/research_loop.sh > docs/results/research_loop.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export FLEET_HOME=$(mktemp -d) COLUMNS=120
trap 'kill "$FLEETD" 2>/dev/null; wait "$FLEETD" 2>/dev/null; rm -rf "$FLEET_HOME"' EXIT
"$PY" -m fleetcli.fleetd up --cpu-workers 2 --web-port 0 >"$FLEET_HOME/up.log" 2>&1 &
FLEETD=$!
until [ -s "$FLEET_HOME/fleetd.json" ]; do sleep 0.5; done
ctl() { echo "\$ fleetctl $*"; "$PY" -m fleetcli.fleetctl "$@"; echo; }
id() { "$PY" -m fleetcli.fleetctl "$@" --detach --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["mission_id"])'; }
wait_for() { "$PY" -m fleetcli.fleetctl status "$1" --json | "$PY" -c '
import json, sys; s = json.load(sys.stdin)["missions"][0]["state"]; sys.exit(s not in ("succeeded", "failed", "cancelled"))'; }
done_() { until wait_for "$1"; do sleep 1; done; }

echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (with local changes)'), $(date -u +%F)"
echo
A=$(id submit selftest --profile quick); done_ "$A"
B=$(id submit selftest --profile quick --set stages.score.params.effect=0.3); done_ "$B"
ctl compare "$A" "$B"
S=$(id submit selftest --profile quick --sweep); done_ "$S"
ctl sweep "$S" --write "$FLEET_HOME/best.toml"
echo "\$ cat best.toml"; cat "$FLEET_HOME/best.toml"; echo
W=$(id submit selftest --profile quick --overrides "$FLEET_HOME/best.toml"); done_ "$W"
ctl status "$W"
echo "\$ du -sb \$FLEET_HOME/runs: $(du -sb "$FLEET_HOME/runs" | cut -f1) bytes"
ctl gc --keep-last 1 --dry-run
ctl gc --keep-last 1
echo "\$ du -sb \$FLEET_HOME/runs: $(du -sb "$FLEET_HOME/runs" | cut -f1) bytes"
