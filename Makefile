# The single entry point. `make demo` and `make test` set the host up themselves (as root), so they are
# the two commands a newcomer and CI run on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := shadowplane agentd controller shadowctl training
# The namespace lab: linted and typed like the rest, but run from the checkout, never packaged.
LAB := lab

.PHONY: setup demo test lint typecheck proto proto-check unit bench lock clean package vm-image vm-image-background

setup:
	@bash scripts/setup-host.sh

demo: setup
	$(PY) -m lab demo

# The VM suite's Debian 12 image (tests/vm/) is built in the background meanwhile (mostly downloads; its log
# in build/vm/image.log): the VM tests take the same lock and wait for it.
test: setup vm-image-background lint typecheck proto-check
	$(PY) -m pytest -q -ra --durations=12 tests

vm-image-background:
	@mkdir -p build/vm && (flock build/vm/.lock bash scripts/build-vm-image.sh build/vm >build/vm/image.log 2>&1 &)

vm-image:
	@mkdir -p build/vm && flock build/vm/.lock bash scripts/build-vm-image.sh build/vm

lint:
	$(VENV)/bin/ruff check $(PACKAGES) $(LAB) tests bench scripts
	$(VENV)/bin/ruff format --check $(PACKAGES) $(LAB) tests bench scripts

typecheck:
	$(VENV)/bin/mypy

proto:
	@bash scripts/gen-proto.sh

proto-check:
	@bash scripts/gen-proto.sh --check

bench: setup
	$(PY) bench/agent_overhead.py

# The .deb and .rpm, into dist/ (packaging/build.sh --help for a release number or another directory).
package: setup
	@bash packaging/build.sh

# Re-pins every Python dependency to what is installed now (run after changing pyproject.toml).
lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
