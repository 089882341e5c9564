# The one entry point for humans and CI. `make test` and `make run` bootstrap .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed-stamp
LOCK    := requirements/cpu.txt
CPU_WORKERS ?= 2

.PHONY: test test-slow test-cluster run bench lint clean lock results

# Everything comes from the CPU lock, pinned and hash-checked (pip, torch's CPU build, the dev tools);
# then the project itself, editable, built with the locked setuptools and bringing nothing else.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Recompiles requirements/cpu.txt and cuda.txt (pip-tools, in its own venv) from pyproject.toml and
# requirements/*.in, keeping existing pins; `make lock LOCK_ARGS=--upgrade` (or --upgrade-package NAME)
# takes new releases. The CUDA lock is resolved against PyPI alone, without pip's configuration (so
# not the local CPU wheel); fast-deps reads wheel metadata by range requests instead of downloading.
# Hashes already in a lock are reused; a new pin is hashed from PyPI's JSON API, or where an index
# mirror's JSON does not give PyPI's file URLs (this machine's), by downloading each of its files.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" .venv/lock-tools/bin/pip-compile -q --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --pip-args=--use-feature=fast-deps
lock:
	test -x .venv/lock-tools/bin/pip-compile || python3 -m venv .venv/lock-tools
	.venv/lock-tools/bin/pip install -q --upgrade pip pip-tools==7.6.2
	$(PIP_COMPILE) $(LOCK_ARGS) --extra dev -o requirements/cpu.txt pyproject.toml requirements/cpu.in
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		$(PIP_COMPILE) $(LOCK_ARGS) -o requirements/cuda.txt pyproject.toml requirements/cuda.in

# Two pytest processes (pytest-xdist), a test file each at a time: the fleet tests mostly wait on
# processes, so two overlap on 2 cores; one torch thread each keeps them from oversubscribing.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not mission_smoke and not mission_fleet and not cluster and not outside_ci" -n 2 --dist loadfile

# Slower end-to-end checks: Missions D, E and v1.3 at their tiny profile through a real fleet, then the
# demo mission's smoke (minutes). Mission A's smoke under Mission C's overlay (about half an hour: its
# union base) runs with `.venv/bin/python -m pytest -m outside_ci`; the other missions' smokes through
# `make results` (docs/decisions.md, "CI's hour").
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "(mission_fleet or mission_smoke) and not outside_ci"

# The fleet on a three-node NATS cluster (TLS, routes, a home per worker) and its failure drills: a node
# killed, the coordinator's node killed, a node stopped for 30 s. The run ends with each one's time to heal.
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster

# The whole fleet on this machine: nats-server, fleetd and CPU workers; runs the demo mission at the
# smoke profile, prints the stats engine's decision per gate, and serves until Ctrl-C.
run: $(STAMP)
	$(PY) -m fleetd up --demo --cpu-workers $(CPU_WORKERS)

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The smoke missions (demo, mission_a, mission_b, mission_c) on a fresh temporary fleet with CPU workers, one after
# the other, and each one's report (Markdown and one HTML file) into docs/results/, stamped with the
# commit. RESULTS_ARGS="--missions selftest --profile quick" tries the plumbing in seconds.
results: $(STAMP)
	$(PY) -m fleetcli.results --cpu-workers $(CPU_WORKERS) $(RESULTS_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy bem stats schemas fleet fleetd fleetcli workers web

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
