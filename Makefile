# Two entry points, each doing all set-up on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test lint clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-tf.txt
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps --upgrade --target $(VENV)/tf-reference -r requirements-tf.txt
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

DEMO := results/digits_demo
SWEEP := --num_samples 1800 --num_steps 8 --guidance 0,0.1,0.2,0.3,0.5 --out $(DEMO)/eval

demo: install
	$(PY) -m gmflow_jax.demo --workdir $(DEMO)
	$(PY) -m gmflow_jax.evaluate --workdir $(DEMO) --solver gm-ode $(SWEEP)
	$(PY) -m gmflow_jax.evaluate --workdir $(DEMO) --solver gm-sde $(SWEEP)

lint: install-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck launch/*.sh launch/*.sbatch

# Whole files to 2 workers in collection order (pyproject.toml: the integration files first); xdist's default
# order (files with the most tests first) starts the few-test, several-minute files last.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
