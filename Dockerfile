# The Retire-Cluster main node: supervisord with rc-server, rc-scheduler,
# rc-reaper, rc-files and rc-web, as an unprivileged user, with the state
# directory (database, tokens, keys, logs) on a volume. It runs no local
# worker by default: tasks do not run next to the tokens and the TLS key
# (docs/operations.md, Docker, says how to add a worker container).
#   docker compose up -d --build      (see docs/operations.md)
# BASE: any Debian-like image with python3 (>= 3.8) and its venv module;
# tests/test_container.py builds on one made from Debian's packages.
ARG BASE=python:3.12-slim
FROM ${BASE}

# No secret is ever put in the image or its environment: the tokens and
# keys are made by `rc init` at the first start, on the volume.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RC_HOME=/var/lib/retire-cluster

RUN useradd --system --create-home --home-dir /home/rc --uid 1000 rc \
    && mkdir -p /opt/retire-cluster "$RC_HOME" \
    && chown rc:rc /opt/retire-cluster "$RC_HOME"
WORKDIR /opt/retire-cluster

# The main node's pins, without the test-only ones (pytest, a browser...).
# PIP_INDEX_URL and PIP_CERT: for a build behind a package mirror or a
# TLS-inspecting proxy (`--build-arg PIP_CERT=/path --volume /path:/path:ro`);
# build arguments, so nothing of them stays in the image's environment.
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY --chown=rc:rc requirements.txt setup.py ./
USER rc
RUN python3 -m venv .venv \
    && .venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

COPY --chown=rc:rc bin ./bin
COPY --chown=rc:rc lib ./lib
COPY --chown=rc:rc etc ./etc
COPY --chown=rc:rc share ./share
COPY --chown=rc:rc docs ./docs
COPY --chown=rc:rc README.md Makefile ./
# The local worker is not started in a container (autostart=false): the
# programs' health counts it as stopped on purpose, and
# `rc ctl start rc-worker` (or supervisorctl) still starts it by hand.
# Compiled here as `make install` compiles them: the image sets
# PYTHONDONTWRITEBYTECODE and its code is read-only, so nothing would ever
# be, and every `rc` and program start would compile lib/ again (the
# worker, started by hand, would run from source: 38 MiB instead of 16).
RUN .venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps -e . \
    && .venv/bin/python -m compileall -q lib \
    && .venv/bin/python -c 'import sys; sys.path.insert(0, "bin"); import worker; worker.compile_bytecode()' \
    && sed -i '/^\[program:rc-worker\]/a autostart=false' etc/supervisord.conf \
    && touch .venv/.installed
# The code is root's to change, not the rc user's (nor a task's).
USER root
RUN chown -R root:root bin lib etc share docs README.md Makefile setup.py \
    && chmod -R go-w /opt/retire-cluster
USER rc

VOLUME ["/var/lib/retire-cluster"]
EXPOSE 8080 5000 8081

# Healthy while `rc health` says OK or WARNING (exit 0 or 1), unhealthy at
# CRITICAL (2), as rc-web's /health answers 200 or 503 (docs/operations.md).
# It reads the settings the main node reads, so no port is written here.
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD .venv/bin/python -m rc.cli health >/dev/null; [ $? -lt 2 ]

# init makes the database, tokens and certificate on first start (and
# upgrades the schema on later ones); supervisord stays in the foreground,
# where it does not apply its own umask setting, so the shell sets it.
CMD umask 077 && .venv/bin/python -m rc.cli init \
    && exec .venv/bin/supervisord --nodaemon -c etc/supervisord.conf
