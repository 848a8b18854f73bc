# harken: `make demo` and `make test` are all a new machine needs; both create the venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harken-installed
# bash with pipefail: a failing pip must fail the recipe even when its output is filtered.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LOCK := requirements.lock
# This machine's pip config names local index folders that may not exist; drop that noise only.
PIPFILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }
# The lock is generated from pyproject.toml by uv (pinned here), never edited by hand.
UV_VERSION := 0.13.9
LOCK_ARGS := pyproject.toml --extra train --extra test --generate-hashes --universal --python-version 3.11

.PHONY: setup system-deps demo test soak clean lock

setup: $(STAMP) system-deps

# Every dependency at the lock's exact version and hash; then harken itself, without deps, so
# nothing the lock did not name can slip in. Re-runs only when pyproject or the lock change.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK) 2>&1 | $(PIPFILTER)
	@$(PY) -c "import torch, torchaudio" || { echo "torch/torchaudio failed to import after install"; exit 1; }
	$(PY) -m pip install --quiet --no-deps -e '.[train]' 2>&1 | $(PIPFILTER)
	@touch $(STAMP)

# Refresh the lock after editing pyproject.toml's dependencies: `make lock`, then commit both.
lock:
	@test -x .lock-venv/bin/uv || { $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet uv==$(UV_VERSION); }
	.lock-venv/bin/uv pip compile $(LOCK_ARGS) -o $(LOCK)

# mosquitto: the tests start their own broker; libportaudio2: sounddevice's C library;
# chromium + chromium-driver: the operator's page is tested in a real headless browser.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2' || missing="$$missing libportaudio2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	$(PY) -m monitor demo --out demo-out

test: setup
	$(PY) -m pytest -q

# Not part of `make test`: 10 minutes of 8 sources while the broker is killed every minute.
soak: setup
	$(PY) -m bench.soak --sources 8 --minutes 10 --broker-restart-s 60 --kill-source-s 45

# Inference speed next to the reference pipelines, then the daemon's sustained source count.
bench: setup
	$(PY) -m monitor bench --encoder mel --encoder efficientat --batch 1,8,32 --seconds 5
	$(PY) -m monitor bench --daemon --encoder efficientat --time-scale 10 --budget-s 300

clean:
	rm -rf demo-out .pytest_cache
