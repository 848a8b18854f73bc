# harken: `make demo` and `make test` are all a new machine needs; both create the venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harken-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test soak clean

setup: $(STAMP) system-deps

# Re-install only when the dependency list changes; pip's resolver is slow to re-run.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# mosquitto: the tests start their own broker; libportaudio2: sounddevice's C library.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2' || missing="$$missing libportaudio2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	$(PY) -m train.cli demo --out demo-out

test: setup
	$(PY) -m pytest -q

# Not part of `make test`: 10 minutes of 8 sources while the broker is killed every minute.
soak: setup
	$(PY) -m train.soak --sources 8 --minutes 10 --broker-restart-s 60 --kill-source-s 45

# Inference speed next to the reference pipelines, then the daemon's sustained source count.
bench: setup
	$(PY) -m train.cli bench --encoder mel --encoder efficientat --batch 1,8,32 --seconds 5
	$(PY) -m train.cli bench --daemon --encoder efficientat --time-scale 10 --budget-s 300

clean:
	rm -rf demo-out .pytest_cache
