# The one entry point for humans and CI. `make test` and `make run` bootstrap .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed-stamp
CPU_WORKERS ?= 2

.PHONY: test run bench lint clean

# torch goes in first and pinned: an unpinned resolve pulls a newer CUDA build (several GB).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The whole fleet on this machine: nats-server, fleetd and CPU workers; runs the demo mission at the
# smoke profile, prints the stats engine's decision per gate, and serves until Ctrl-C.
run: $(STAMP)
	$(PY) -m fleetd up --demo --cpu-workers $(CPU_WORKERS)

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy bem stats schemas fleet fleetd fleetcli workers web

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
