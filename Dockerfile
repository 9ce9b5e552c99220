# The Retire-Cluster main node: supervisord with rc-server, rc-scheduler,
# rc-reaper, rc-web and a local worker, as an unprivileged user, with the
# state directory (database, tokens, logs) on a volume.
#   docker compose up -d --build      (see docs/operations.md)
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RC_HOME=/var/lib/retire-cluster

RUN useradd --system --create-home --home-dir /home/rc --uid 1000 rc \
    && mkdir -p /opt/retire-cluster "$RC_HOME" \
    && chown rc:rc /opt/retire-cluster "$RC_HOME"
WORKDIR /opt/retire-cluster

# The main node's pins, without the test-only ones (pytest, a browser...).
COPY --chown=rc:rc requirements.txt setup.py ./
USER rc
RUN python -m venv .venv \
    && grep -vE '^(pytest|pytest-timeout|playwright|prometheus_client)==' requirements.txt \
       > /tmp/requirements-main.txt \
    && .venv/bin/pip install --no-cache-dir --disable-pip-version-check \
       -r /tmp/requirements-main.txt

COPY --chown=rc:rc bin ./bin
COPY --chown=rc:rc lib ./lib
COPY --chown=rc:rc etc ./etc
COPY --chown=rc:rc share ./share
COPY --chown=rc:rc docs ./docs
COPY --chown=rc:rc README.md Makefile ./
RUN .venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps -e . \
    && touch .venv/.installed

VOLUME ["/var/lib/retire-cluster"]
EXPOSE 8080 5000 8081

# 200 for OK and WARNING, 503 for CRITICAL: exactly `rc health` (docs/operations.md).
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=8)"

# init makes the database, tokens and certificate on first start (and
# upgrades the schema on later ones); supervisord stays in the foreground,
# where it does not apply its own umask setting, so the shell sets it.
CMD umask 077 && .venv/bin/python -m rc.cli init \
    && exec .venv/bin/supervisord --nodaemon -c etc/supervisord.conf
