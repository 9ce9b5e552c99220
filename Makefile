# Retire-Cluster main node. `make run` to start, `make test` to check.
# State lives in $(RC_HOME) (var/ here); set RC_HOME, RC_TCP_PORT, RC_WEB_PORT
# and RC_FILES_PORT to run a second cluster beside the first.

# The virtualenv's interpreter: the system's own python3 when it can make one
# (distributions build it optimized; a default pyenv or source build is not,
# and runs the main node markedly slower: docs/benchmarks.md), else the first
# python3 on PATH. `make clean install PYTHON=python3.12` picks another.
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import sys, ensurepip, venv; \
	sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1 && echo $(SYSTEM_PYTHON) || echo python3)
RC_HOME ?= $(CURDIR)/var
export RC_HOME

VENV := .venv
PY := $(VENV)/bin/python
CTL := $(VENV)/bin/supervisorctl -c etc/supervisord.conf
SUPERVISORD := $(VENV)/bin/supervisord -c etc/supervisord.conf
# Prints the pid of this cluster's supervisord and succeeds when it answers
# on its socket: a fifth of the CPU of `supervisorctl pid` (lib/rc/bell.py).
SUPERVISORD_PID := $(PY) -c 'import sys; from rc import bell; \
	pid = bell.supervisord_pid(sys.argv[1]); print(pid or ""); sys.exit(not pid)' "$(RC_HOME)/run"

.PHONY: install run stop status test bench clean docker

# lib/ is installed in place (pip -e), so pip compiles none of it as it
# compiles what it installs: compileall does, for each file that changed
# since (a git pull). Without it every `rc` compiled ~60 modules from
# source again where PYTHONDONTWRITEBYTECODE is set (or lib/ is read-only):
# 170 ms of CPU a command instead of 115 on this VM. The local worker's two
# bytecode copies likewise: without them it runs from source, 38 MiB
# instead of 16 (docs/worker.md, memory).
install: $(VENV)/.installed
	@$(PY) -m compileall -q lib
	@$(PY) -c 'import sys; sys.path.insert(0, "bin"); import worker; worker.compile_bytecode()'
	@$(PY) -m rc.cli init

# Reinstall when the pins change; the stamp keeps `make run` quick otherwise.
$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

# What the tests need besides (pytest, Chromium's driver, Dask's client).
$(VENV)/.installed-tests: requirements-test.txt $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
	@touch $@

# umask 077: supervisord opens its own log before it applies the umask in
# etc/supervisord.conf, and everything under $(RC_HOME) is the owner's alone.
# `make run` returns once `rc health` is OK (every program RUNNING, the local
# worker online) and says so, or fails saying what is not. It first checks
# that every socket of the run directory fits a Unix socket's 107 bytes: in
# a clone under a deep directory, supervisord or a program's bell could not
# bind, so it stops at once and says to choose a shorter RC_HOME. Starting
# supervisord, it stops as soon if another cluster or program holds one of
# the three ports, naming it and its variable (rc-files would only restart).
run: install
	@$(PY) -c 'import sys; from rc import bell, config; \
		problem = bell.run_dir_problem(config.load().run_dir); \
		sys.exit(problem and "make run: " + problem)'
	@if $(SUPERVISORD_PID) >/dev/null; then \
		$(CTL) start all >/dev/null; \
	else \
		$(PY) -c 'import sys; from rc import config; \
			problem = config.ports_taken(config.load()); \
			sys.exit(problem and "make run: " + problem)' || exit 1; \
		umask 077; $(SUPERVISORD); \
	fi
	@$(PY) -m rc.cli wait-ready
	@$(PY) -m rc.cli ctl status
	@$(PY) -m rc.cli join

# SIGTERM is supervisord's shutdown, as `supervisorctl shutdown` asks it.
# supervisord removes its pid file last as it exits; the loop ends then, not
# when its parent reaps it (a container's first process may take seconds).
stop:
	@if pid=$$($(SUPERVISORD_PID)); then \
		kill -TERM $$pid; \
		while kill -0 $$pid 2>/dev/null && [ -e "$(RC_HOME)/run/supervisord.pid" ]; do \
			sleep 0.05; done; \
		echo "stopped"; \
	else \
		echo "not running"; \
	fi

# The programs' states, or "not running"; exits 0 either way (it answered).
# Scripts use `bin/rc ctl status`: exit 3 when something is not running.
status:
	@$(PY) -m rc.cli ctl status || [ $$? -eq 3 ]

# Test files run three at a time (--dist loadfile keeps a file's tests, and
# the cluster they share, in one process): three keep 2 cores busy (a run
# used ~66 % of them, the VM's host took ~19 %; four flaked). The slowest
# files start first (tests/slowest_files.txt; --no-loadscope-reorder keeps
# the order tests/conftest.py gives them). -rs ends the
# run with each skipped test and why (no Chromium, no root, a race not caught);
# --durations the 15 slowest, for a suite that must stay under 15 minutes.
TEST_JOBS ?= 3
test: install $(VENV)/.installed-tests
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -rs --durations=15

bench: install $(VENV)/.installed-tests
	$(PY) -m pytest -m bench -s -p no:cacheprovider tests

# The main node as a container image (Dockerfile; docs/operations.md).
docker:
	docker build -t retire-cluster:latest .

clean: stop
	rm -rf $(VENV) var lib/*.egg-info .pytest_cache
