"""rc-web: the HTTP side of the main node, a Bottle app under waitress.

/ is the dashboard (an xterm.js terminal that runs `rc` commands through
/api/v1/command), /api/v1/* speaks JSON, /text/* plain text for shell
pipelines and Prometheus, /stream/* Server-Sent Events. docs/http.md is the
reference.

Access: reading is open from 127.0.0.1 and needs the admin token from
elsewhere (setting `read_access`); anything that changes the cluster always
needs `Authorization: Bearer <admin token>` (var/admin_token, `rc token
--admin`), a same-origin request, and a Host header that names this machine
(against DNS rebinding). The join token the workers hold is never enough.
"""
import functools
import hashlib
import hmac
import io
import ipaddress
import math
import os
import re
import shlex
import socket
import sqlite3
import sys
import threading
import time
import traceback
from urllib.parse import quote, urlsplit

import bottle
import orjson

from rc import audit, bell, bounded, commands, db, devices, explain, fleet, files, health, render
from rc import device_routes, logs, records, state_dir, web_results, web_schedules, web_server
from rc import program, stats, tails, tasks, throttle
from rc import config as rc_config
from rc.log import LEVELS, Logger
from rc.states import (COMPLETED, FAILED, ONLINE, PRIORITIES, TASK_STATES, TERMINAL_STATES,
                       TIMED_OUT)

MAX_BODY_BYTES = 1024 * 1024      # largest request body accepted
# waitress refuses bodies past this itself; below it the app answers 413 in JSON.
SERVER_BODY_LIMIT = 4 * MAX_BODY_BYTES
UPLOAD_PATH = "/api/v1/files"     # the one route whose body may be large and slow
# bytes per second an upload's body must keep arriving at, past web_read_timeout
# (a phone on poor Wi-Fi moves more; a slow-loris drip moves far less)
MIN_UPLOAD_RATE = 32 * 1024
MAX_LIST_LIMIT = tasks.MAX_PAGE_TASKS   # most rows one list request returns
MAX_LIST_BYTES = tasks.MAX_PAGE_BYTES   # of tasks' payloads and results one list page
                                        # holds (the first task always); next_offset goes on
DEFAULT_LIST_LIMIT = 100
# Threads beyond max_streams: ordinary requests always find one free.
SPARE_THREADS = 8
# Bytes waitress's loop asks of a socket at once (its default, 8 KiB, made a
# 100 KiB upload 13 trips through the loop, its parser and its buffer).
RECV_BYTES = 256 * 1024
STREAM_POLL_INTERVAL = 0.2        # seconds between a stream's looks for changes
LOG_POLL_INTERVAL = 0.5           # seconds between looks at the log files
STREAM_PING_INTERVAL = 15.0       # seconds between comment pings on a quiet stream
STREAM_BATCH = 500                # task events one look sends at most
STREAM_RETRY_MS = 2000            # the browser reconnects after this
WEB_LOG_LINES_PER_MINUTE = 1      # lines a minute per event and address a stranger can cause
# Audit lines a minute per address (bursts of twice as many) of web-terminal
# commands that need no admin token (actor "reader", whoever sent them) and those
# refused for want of the token; the rest are counted in the next line
# (`suppressed`) or a `web_commands_held_back` line. Each was a line, with
# up to 50 words of 200 characters: a reader (anyone on the LAN with
# read_access=open) rotated the whole audit log away in about a minute.
READER_AUDIT_LINES_PER_MINUTE = 6
READER_AUDIT_WORDS = 10           # words of such a command its line shows ...
READER_AUDIT_WORD = 100           # ... each cut to as many characters
# Seconds a /health report is given again to clients that may not read the
# cluster (see Web.health).
HEALTH_REUSE_SECONDS = 5.0
DEFAULT_LOG_LINES = 20            # lines /text/logs and a fresh /stream/logs start with
MAX_TERMINAL_WIDTH = 500
# One line of the web terminal (POST /api/v1/command), read before any other
# check: shlex's cost grows with the square of a word's length (a 900 KB word
# held rc-web's GIL for 30 s) and argparse's with the square of the options
# (`tail 1 -f -f ...`, 50,000 of them: 90 s). A long script goes through
# POST /api/v1/tasks instead.
MAX_COMMAND_TEXT = 64 * 1024      # characters
MAX_COMMAND_WORDS = 1000
READ_ACCESS = rc_config.CHOICES["read_access"]
STREAM_COOKIE = "rc_stream"       # lets a browser's EventSource read /stream/* (no header)
# ...and a link save a task's file (GET .../files/NAME): a browser that kept
# the token otherwise had to fetch the whole file into memory to send it.
STREAM_COOKIE_PATHS = ("/stream", "/api/v1/tasks")
COOKIE_DOWNLOAD = re.compile(r"/api/v1/tasks/[0-9]+/files/.", re.DOTALL)
STREAM_SESSION_SECONDS = 12 * 3600    # how long one stream cookie lasts
THROUGHPUT_WINDOWS = (60, 300)    # seconds over which /text/status counts completions
WEB_ROOT = os.path.join(rc_config.CHECKOUT, "share", "web")
SUBMIT_FIELDS = {"task_type", "payload", "priority", "timeout", "retries",
                 "requirements", "idempotency_key", "retry_on_failure", "depends_on"}
# A group is a submit without the idempotency key (each device gets its own task).
GROUP_FIELDS = (SUBMIT_FIELDS - {"idempotency_key"}) | {"include_new"}
TEXT_FORMATS = {"pipe": "text/plain", "csv": "text/csv", "tsv": "text/tab-separated-values"}

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # xterm.js writes its colours into a <style> element, hence style 'unsafe-inline';
    # scripts only from here, so a string that slipped into HTML could not run.
    "Content-Security-Policy": "default-src 'self'; script-src 'self';"
                               " style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
                               " frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


class ApiError(Exception):
    """A request the app refuses; becomes {"error": message} with `status`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def json_response(value, status=200):
    return bottle.HTTPResponse(orjson.dumps(value, default=repr), status,
                               {"Content-Type": "application/json"})


def text_response(text, content_type="text/plain"):
    return bottle.HTTPResponse(text, 200, {"Content-Type": content_type + "; charset=utf-8"})


STATIC_LINK = re.compile(r'((?:src|href)="/static/)([^"?#]+)"')


def versioned_page(root):
    """index.html with each /static/ link naming its file's digest (?v=...).
    Served before without Cache-Control, the page and its scripts were kept
    by browsers for a tenth of the files' age: after an upgrade the new page
    ran the old dashboard.js, and a reload did not fetch it again. A link
    that changes with its file is fetched anew; what a browser kept from a
    release before this one is never asked for again."""
    def versioned(match):
        try:
            with open(os.path.join(root, match.group(2)), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
        except OSError:
            return match.group(0)     # the browser's 404 says which file
        return '%s%s?v=%s"' % (match.group(1), match.group(2), digest)
    with open(os.path.join(root, "index.html"), encoding="utf-8") as f:
        return STATIC_LINK.sub(versioned, f.read())


class Web:
    """The routes, with the config, the log and one connection per thread."""

    def __init__(self, config, logger):
        self.config, self.logger = config, logger
        self.local = threading.local()
        self.uploads = files.Reservations()     # room held for uploads in flight
        self.started = time.time()
        self.stream_slots = web_results.StreamSlots(config.max_streams)
        self.closing = threading.Event()
        self.host_names = own_host_names(config.allowed_hosts)
        # Lines a stranger can cause: one a minute per event and address.
        self.log = throttle.LimitedLog(logger, per_minute=WEB_LOG_LINES_PER_MINUTE)
        self.reader_lines = throttle.Throttle(READER_AUDIT_LINES_PER_MINUTE,
                                              2 * READER_AUDIT_LINES_PER_MINUTE)
        self.reader_lock = threading.Lock()
        self.next_held_back = 0.0    # monotonic time of the next look at reader_lines
        self.token_cache = None      # (the token file's stamp, the token) (see admin_token)
        self.health_lock = threading.Lock()     # one health check at a time
        self.health_report = None    # (monotonic time, wall time, report) of the last one
        self.page = None             # index.html with versioned links (see versioned_page)

    def connection(self):
        # sqlite3 connections are cheap to keep and not for sharing between threads.
        if getattr(self.local, "connection", None) is None:
            try:
                self.local.connection = commands.connect(self.config)
            except commands.CommandError as e:
                raise ApiError(503, str(e))
        return self.local.connection

    # -- access ----------------------------------------------------------------------

    def route(self, handler, access):
        """Wrap a handler: Host check, access check, errors as JSON."""
        def wrapper(*args, **kwargs):
            try:
                self.check_host()
                if access == "read":
                    self.check_read()
                elif access == "admin":
                    self.check_same_origin()
                    self.require_admin()
                elif access == "command":
                    self.check_same_origin()
                    self.check_read()
                return handler(*args, **kwargs)
            except ApiError as e:
                return json_response({"error": str(e)}, e.status)
            except tasks.RequestKeyReused as e:
                return json_response({"error": str(e)}, 422)
            except (tasks.TaskError, fleet.FleetError) as e:
                return json_response({"error": str(e)}, 400)
        return wrapper

    def check_host(self):
        """Only names of this machine: a page on another site that made its
        own name point here (DNS rebinding) is refused."""
        host = host_name(bottle.request.environ.get("HTTP_HOST", ""))
        if host and not (is_ip_address(host) or host in self.host_names):
            raise ApiError(403, "Host %r is not a name of this machine; add it to"
                                " allowed_hosts in etc/rc.json" % host)

    def check_same_origin(self):
        """Refuse a request a browser sent from another site."""
        environ = bottle.request.environ
        if environ.get("HTTP_SEC_FETCH_SITE") in ("cross-site", "same-site"):
            raise ApiError(403, "cross-site request refused")
        origin = environ.get("HTTP_ORIGIN")
        if origin and origin != "null" and \
                origin_host(origin) != environ.get("HTTP_HOST", "").lower():
            raise ApiError(403, "request from origin %s refused" % bounded.shown(origin))
        if origin == "null":
            raise ApiError(403, "request from an opaque origin refused")

    def given_token(self):
        """The admin token from the Authorization header, the one place it is
        taken from: a token in a URL (?token=) would be kept in browser
        history, proxy logs and Referer headers, so it is refused."""
        scheme, _, given = raw_header("Authorization").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            return given.strip()
        return None

    def admin_token(self):
        """The admin token, read again only when its file changes (`rc
        token --admin --rotate` replaces it): a stat per request, not an
        open, read and close."""
        path = self.config.admin_token_path
        try:
            info = os.stat(path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
            cached = self.token_cache
            if cached is None or cached[0] != stamp:
                cached = self.token_cache = (stamp, state_dir.read_secret(path).encode())
            return cached[1]
        except (OSError, ValueError):
            raise ApiError(503, "no admin token; run `make install`")

    def token_matches(self, given):
        token = self.admin_token()
        return given is not None and hmac.compare_digest(given.encode(), token)

    def require_admin(self):
        given = self.given_token()
        if not self.token_matches(given):
            if self.is_join_token(given):
                raise ApiError(401, "that is the join token, which devices join with (the"
                                    " --token= of `rc join`); this needs the admin token,"
                                    " which `rc token --admin` prints on the main node")
            raise ApiError(401, "missing or wrong admin token"
                                " (send Authorization: Bearer TOKEN; see `rc token --admin`)")

    def is_join_token(self, given):
        """Whether a refused token is the devices' join token: `make run`
        prints that one, and it looks like the admin token (rc1_...). Read
        only for a refusal, never for a request that passes."""
        try:
            join_token = state_dir.read_secret(self.config.token_path)
        except (OSError, ValueError):
            return False
        return given is not None and hmac.compare_digest(given.encode(), join_token.encode())

    def check_read(self):
        if self.reads_audit_log():
            return self.require_admin()
        mode = self.config.read_access
        if mode == "open" or self.has_read_token():
            return
        # After the token: is_local_peer reads /proc/net/tcp, ~1 ms and more
        # with many connections on the machine, on every request.
        if (mode == "local" and is_local_peer(bottle.request.environ)) \
                or self.has_stream_cookie():
            return
        raise ApiError(401, "reading needs the admin token from %s (read_access=%s);"
                            " send Authorization: Bearer TOKEN%s"
                       % (bottle.request.environ.get("REMOTE_ADDR"), mode,
                          " (a token in the URL is refused)"
                          if "token" in bottle.request.query else ""))

    def has_read_token(self):
        """Whether the request carries the admin token (503 when a token
        came and there is no token file to check it against)."""
        given = self.given_token()
        return given is not None and self.token_matches(given)

    def as_read(self, task):
        """A task, a group, a schedule or a service as this request may see
        it: whole with the admin token, else with its --env values withheld
        (rc.states.WITHHELD): read_access lets in everyone on the LAN (open)
        or every process of this machine's user (local), and a secret given
        with --env is not theirs."""
        return task if self.has_read_token() else records.withheld_task(task)

    def reads_audit_log(self):
        """The audit log says who did what from where: the admin token
        always, from this machine too."""
        path = bottle.request.path
        return path in ("/text/logs", "/stream/logs") and \
            bottle.request.query.get("program") == logs.AUDIT_PROGRAM

    # -- the stream cookie: EventSource cannot send a header -----------------------

    def stream_session(self):
        """POST /api/v1/stream-session with the admin token: a cookie that
        lets this browser open /stream/* and save a task's files for
        STREAM_SESSION_SECONDS, so the token never goes into a URL. HttpOnly
        (no script reads it), SameSite=Strict (no other site's page sends
        it), Secure under HTTPS."""
        expires = int(time.time() + STREAM_SESSION_SECONDS)
        value = "%d.%s" % (expires, self.stream_proof(expires))
        self.audit("stream_session_started", expires=expires)
        return self.with_stream_cookie(json_response({"expires": expires}), value,
                                       STREAM_SESSION_SECONDS)

    def end_stream_session(self):
        """DELETE /api/v1/stream-session (the terminal's `logout`)."""
        return self.with_stream_cookie(json_response({"expires": 0}), "", 0)

    def with_stream_cookie(self, response, value, seconds):
        """One Set-Cookie per path of STREAM_COOKIE_PATHS (a cookie has one)."""
        for path in STREAM_COOKIE_PATHS:
            response.add_header("Set-Cookie", "%s=%s; Path=%s; Max-Age=%d; HttpOnly;"
                                " SameSite=Strict%s" % (
                                    STREAM_COOKIE, value, path, seconds,
                                    "; Secure" if self.config.web_tls else ""))
        return response

    def stream_proof(self, expires):
        """An HMAC of the expiry under the admin token: nothing to store, and
        a new admin token (`rc token --admin --rotate`) ends every session."""
        return hmac.new(self.admin_token(), b"rc-stream:%d" % expires,
                        hashlib.sha256).hexdigest()

    def has_stream_cookie(self):
        """For /stream/* and a GET of a task's file (COOKIE_DOWNLOAD) only."""
        path = bottle.request.path
        if not (path.startswith("/stream/") or (bottle.request.method in ("GET", "HEAD")
                                                and COOKIE_DOWNLOAD.match(path))):
            return False
        return self.cookie_holds(bottle.request.get_cookie(STREAM_COOKIE) or "")

    def cookie_holds(self, cookie):
        expires, _, proof = cookie.partition(".")
        try:
            expires = bounded.whole(expires, "expiry")
        except ValueError:
            return False
        return expires > time.time() and hmac.compare_digest(
            proof.encode(), self.stream_proof(expires).encode())

    def still_allowed(self):
        """For a stream, as it opens (check_read let it in): a function that
        says, as it runs, whether what let it in still holds. Checked once,
        a stream (a group's results with follow=1, /stream/*) opened with an
        admin token or a stream cookie went on for hours after `rc token
        --admin --rotate`, and past the cookie's expiry."""
        given = self.given_token()
        if given is not None and self.token_matches(given):
            return lambda: self.holds(self.token_matches, given)
        cookie = bottle.request.get_cookie(STREAM_COOKIE) or ""
        if cookie and self.cookie_holds(cookie):
            return lambda: self.holds(self.cookie_holds, cookie)
        # Let in by read_access (open, or this machine's user): nothing to lose.
        # (With a token or cookie too, that ends it all the same: it is opened
        # again at once. Not is_local_peer's ~1 ms again for each long poll.)
        return lambda: True

    @staticmethod
    def holds(check, credential):
        """check(credential), False when the token file is gone (its 503):
        a stream's body cannot answer with an error any more."""
        try:
            return check(credential)
        except ApiError:
            return False

    # -- request helpers ---------------------------------------------------------

    def json_body(self, batch=False):
        if bottle.request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, "request body is over %d bytes" % MAX_BODY_BYTES)
        data = bottle.request.body.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, "request body is over %d bytes" % MAX_BODY_BYTES)
        try:
            body = orjson.loads(data or b"{}")
        except orjson.JSONDecodeError as e:
            raise ApiError(400, "request body is not JSON: %s" % e)
        try:
            bounded.check_json(body)
        except ValueError as e:
            raise ApiError(400, str(e))
        if not isinstance(body, dict) and not (batch and isinstance(body, list)):
            raise ApiError(400, "request body must be a JSON object"
                           + (" or a list of them" if batch else ""))
        return body

    def audit(self, event, actor="admin", **fields):
        """An audit line for a request: a change needs the admin token, so
        its actor is `admin`; the source is the socket's address."""
        try:
            audit.record(self.config, event, actor, bottle.request.environ.get("REMOTE_ADDR"),
                         **fields)
        except OSError as e:
            self.logger.error("audit_failed", audit_event=event, error=str(e))

    def audit_reader(self, event, actor, argv, **fields):
        """The audit line of a web-terminal command run (or refused) without
        the admin token, at most READER_AUDIT_LINES_PER_MINUTE per address
        and shorter than an admin's: whether it was written."""
        self.tell_held_back()
        key = throttle.address_key(bottle.request.environ.get("REMOTE_ADDR") or "")
        with self.reader_lock:
            held = self.reader_lines.allow(key)
        if held is None:
            return False
        if held:
            fields["suppressed"] = held
        self.audit(event, actor, argv=[render.shorten(a, READER_AUDIT_WORD) for a in
                                       commands.withheld_argv(argv[:READER_AUDIT_WORDS])],
                   **fields)
        return True

    def tell_held_back(self):
        """Now and then, a line per address with reader commands held back
        since its last line, so a flood that stops still leaves its size."""
        now = time.monotonic()
        with self.reader_lock:
            if now < self.next_held_back:
                return
            self.next_held_back = now + throttle.HELD_BACK_INTERVAL
            told = self.reader_lines.held_back()
        for key, count in told:
            try:
                audit.record(self.config, "web_commands_held_back", "reader", key, count=count)
            except OSError as e:
                self.logger.error("audit_failed", audit_event="web_commands_held_back",
                                  error=str(e))

    def existing_device(self, device_id):
        device = devices.get(self.connection(), device_id)
        if device is None or device["forgotten"]:
            raise ApiError(404, devices.unknown(self.connection(), device_id))
        return device

    def existing_task(self, task_id):
        if not 0 < task_id <= bounded.LARGEST:       # past what SQLite binds: none such
            raise ApiError(404, "no task %s" % str(task_id)[:40])
        try:
            return tasks.get(self.connection(), task_id)
        except tasks.TaskError as e:
            raise ApiError(404, str(e))

    def listed_tasks(self, results=True):
        """(a page of tasks, whether more follow)."""
        query = bottle.request.query
        limit = max(1, min(query_int("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT))
        return tasks.task_page(self.connection(), query.get("state") or None,
                               query.get("device") or None, limit, query_int("offset", 0),
                               MAX_LIST_BYTES, results)

    def listed_devices(self):
        """Devices, filtered by ?status= ?role= ?platform= ?arch= ?connected=0|1 ?tag=."""
        query = bottle.request.query
        found = devices.list_devices(self.connection(),
                                     include_forgotten=query.get("all") in ("1", "true"))
        for name, key in (("status", "status"), ("role", "role"), ("platform", "platform"),
                          ("arch", "architecture")):
            if query.get(name):
                found = [d for d in found if d[key] == query.get(name)]
        if query.get("connected") in ("0", "1"):
            found = [d for d in found if d["connected"] == (query.get("connected") == "1")]
        if query.get("tag"):
            found = [d for d in found if query.get("tag") in d["tags"]]
        return found

    # -- JSON API ----------------------------------------------------------------

    def health(self):
        """What `rc health` says, as JSON: 200 when OK or WARNING, 503 when
        CRITICAL, so an HTTP checker (Docker's HEALTHCHECK) needs only the code.

        Anyone may ask, and a check writes the database and reads all of it
        (PRAGMA quick_check: 0.4 s at 200 MB): 8 strangers asking back to
        back made /text/status take 4 to 7 s. A client that may not read the
        cluster gets the last report while it is under HEALTH_REUSE_SECONDS
        old; one that may gets a new one; one check runs at a time."""
        try:
            self.check_read()
            fresh = True
        except ApiError:
            fresh = False
        with self.health_lock:
            last = self.health_report
            if fresh or last is None or time.monotonic() - last[0] >= HEALTH_REUSE_SECONDS:
                last = self.health_report = (time.monotonic(), time.time(), health.check(
                    self.config, without_supervisor=health.WARNING))
        _, checked_at, report = last
        # Named devices and tasks only to a client that may read them.
        return json_response(dict(report.as_dict(public=not fresh),
                                  checked_at=round(checked_at, 3)),
                             503 if report.status == health.CRITICAL else 200)

    def stats(self):
        """?minutes=N (default 60): the history rows and their summary."""
        rows = stats.history(self.connection(), min(query_int("minutes", 60), 100000))
        return json_response({"summary": stats.summary(rows), "minutes": rows})

    def status(self):
        return json_response(self.status_summary())

    def status_summary(self, connection=None):
        connection = connection or self.connection()
        summary = records.status_summary(connection, self.config)
        now = time.time()
        for window, count in zip(THROUGHPUT_WINDOWS, completed_since(connection, now)):
            summary["throughput_%dm" % (window // 60)] = round(count * 60.0 / window, 3)
        online = [d for d in devices.list_devices(connection, "online")]
        summary["slots_total"] = devices.total_slots(online)
        summary["slots_busy"] = devices.busy_slots(online)
        summary["uptime_seconds"] = round(now - self.started, 3)
        return summary

    def devices(self):
        now = time.time()
        return json_response({"devices": [records.device_record(device, now)
                                          for device in self.listed_devices()]})

    def device(self, device_id):
        device = devices.get(self.connection(), device_id)
        if device is None:
            raise ApiError(404, devices.unknown(self.connection(), device_id))
        return json_response(records.device_record(device, time.time()))

    def tasks(self):
        query = bottle.request.query
        now = time.time()
        page, more = self.listed_tasks()
        found = [records.task_record(task, now) for task in page]
        if not self.has_read_token():
            found = [records.withheld_task(task) for task in found]
        limit = max(1, min(query_int("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT))
        offset = query_int("offset", 0)
        return json_response({"tasks": found, "limit": limit, "offset": offset,
                              "next_offset": offset + len(found) if more else None,
                              "state": query.get("state") or None})

    def task(self, task_id):
        return json_response(self.as_read(records.task_record(self.existing_task(task_id),
                                                              time.time())))

    def result(self, task_id):
        # One row, three columns: a client polls this (tasks.get also reads
        # the task's events and dependencies).
        row = self.connection().execute("SELECT state, result, error FROM tasks"
                                        " WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            raise ApiError(404, "no task %s" % task_id)
        state = row["state"]
        if state not in TERMINAL_STATES:
            return json_response({"error": "task %d is still %s" % (task_id, state),
                                  "task_id": task_id, "state": state}, 409)
        return json_response({"task_id": task_id, "state": state,
                              "completed": state == COMPLETED,
                              "result": db.loads(row["result"]), "error": row["error"]})

    def submit(self):
        """One task, or a list of them queued all or none in one transaction
        (web_results.submit_batch: one audit line, whatever its length)."""
        body = self.json_body(batch=True)
        key = web_results.request_key()
        batch = body if isinstance(body, list) else [body]
        specs = [numbered_spec(len(batch), number, item) for number, item in enumerate(batch, 1)]
        if isinstance(body, list) or bottle.request.query.get("group"):    # web_results
            return self.results.submit_batch(specs, isinstance(body, list), key)
        connection = self.connection()
        queued = self.results.queued_before(connection, key)
        if queued is None:
            try:
                queued = tasks.submit_many(connection, self.config, specs, request_key=key[0],
                                           request_sha256=key[1]), None
            except sqlite3.IntegrityError:      # the same request sent twice at once
                queued = self.results.queued_before(connection, key)
                if queued is None:
                    raise
            else:
                self.logged_submit(queued[0][0], specs[0])
        task_ids = queued[0]
        submitted = [{"task_id": task_id, "url": "/api/v1/tasks/%d" % task_id}
                     for task_id in task_ids]
        # Queued unless the idempotency key named an earlier task; null if that
        # one has been pruned since (a task_retention under the key's hour).
        row = connection.execute("SELECT state FROM tasks WHERE task_id = ?",
                                 (task_ids[0],)).fetchone()
        return json_response(dict(submitted[0], state=row and row["state"]), 201)

    def logged_submit(self, task_id, spec):
        self.logger.info("task_submitted", task_id=task_id, task_type=spec["task_type"],
                         priority=spec["priority"],
                         address=bottle.request.environ.get("REMOTE_ADDR"))
        self.audit("task_submitted", task_id=task_id, task_type=spec["task_type"])

    def why(self, task_id):
        self.existing_task(task_id)
        return json_response({"task_id": task_id,
                              "why": explain.why(self.connection(), task_id)})

    def cancel(self, task_id):
        self.existing_task(task_id)
        state = tasks.cancel(self.connection(), task_id)
        self.logger.info("task_cancel_requested", task_id=task_id, state=state,
                         address=bottle.request.environ.get("REMOTE_ADDR"))
        self.audit("task_cancel_requested", task_id=task_id, state=state)
        return json_response({"task_id": task_id, "state": state})

    def watch_task(self, task_id):
        """Someone wants the task's output as it comes, for ?seconds=S (60;
        at most 600): its device sends what each stream adds every second
        (lib/rc/tails.py). A task not running or assigned: watched_until null."""
        self.existing_task(task_id)
        seconds, now = query_int("seconds", int(tails.WATCH_SECONDS)), time.time()
        with db.write(self.connection()):
            until = tails.watch(self.connection(), task_id, seconds, now)
        # The main node's time: a report older than it, after a watch that had
        # lapsed, is not news (its device sent nothing since).
        return json_response({"task_id": task_id, "watched_until": until, "now": now})

    def task_output(self, task_id):
        """The task's output so far (docs/http.md): while it runs, what its
        device sent during a watch; once it has ended, its result's."""
        self.existing_task(task_id)
        return json_response(tails.output(self.connection(), task_id))

    # -- the fleet -------------------------------------------------------------------

    def drain(self, device_id):
        now = self.json_body().get("now", False)
        if not isinstance(now, bool):
            raise ApiError(400, "now must be true or false")
        self.existing_device(device_id)
        handed_back = fleet.drain(self.connection(), self.config, device_id, now)
        self.audit("device_drained", device_id=device_id, now=now, handed_back=handed_back)
        return json_response({"device_id": device_id, "drained": True,
                              "handed_back": handed_back})

    def resume(self, device_id):
        self.existing_device(device_id)
        fleet.resume(self.connection(), self.config, device_id)
        self.audit("device_resumed", device_id=device_id)
        return json_response({"device_id": device_id, "drained": False})

    def forget(self, device_id):
        self.existing_device(device_id)
        handed_back = fleet.forget(self.connection(), self.config, device_id)
        self.audit("device_forgotten", device_id=device_id, handed_back=handed_back)
        return json_response({"device_id": device_id, "forgotten": True,
                              "handed_back": handed_back})

    def revoke(self, device_id):
        self.existing_device(device_id)
        connection = self.connection()
        with db.write(connection):
            devices.revoke(connection, device_id)
        bell.ring(self.config.run_dir, bell.SERVER)     # rc-server hangs up on it now
        self.audit("device_revoked", device_id=device_id)
        return json_response({"device_id": device_id, "revoked": True})

    def labels(self, device_id):
        """{"labels": {"disk": "big", "gone": ""}}: "" removes a label."""
        labels = self.json_body().get("labels")
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and "=" not in k and isinstance(v, str)
                for k, v in labels.items()):
            raise ApiError(400, "labels must be an object of names (without =) to text")
        self.existing_device(device_id)
        current = fleet.label(self.connection(), device_id,
                              ["%s=%s" % item for item in labels.items()])
        self.audit("device_labelled", device_id=device_id, changes=labels)
        return json_response({"device_id": device_id, "labels": current})

    def role(self, device_id):
        """{"role": "storage"}; "" or null goes back to what the device reports."""
        role = self.json_body().get("role")
        if not isinstance(role, (str, type(None))):
            raise ApiError(400, "role must be text")
        self.existing_device(device_id)
        fleet.set_role(self.connection(), device_id, role or "")
        self.audit("device_role_set", device_id=device_id, role=role or "")
        device = devices.get(self.connection(), device_id)
        return json_response({"device_id": device_id, "role": device["role"],
                              "reported_role": device.get("reported_role", device["role"])})

    def submit_group(self):
        body = self.json_body()
        unknown = sorted(set(body) - GROUP_FIELDS)
        if unknown:
            raise ApiError(400, "unknown field %s (known: %s)"
                           % (", ".join(unknown), ", ".join(sorted(GROUP_FIELDS))))
        include_new = body.get("include_new", False)
        if not isinstance(include_new, bool):
            raise ApiError(400, "include_new must be true or false")
        check_shapes(body)
        options = {key: body[key] for key in ("priority", "timeout", "retries",
                                               "retry_on_failure", "depends_on") if key in body}
        connection = self.connection()
        group_id = fleet.submit_each(connection, self.config, body.get("task_type"),
                                     submitted_payload(body), submitted_requirements(body),
                                     include_new, **options)
        members = fleet.group(connection, group_id)["tasks"]
        self.audit("group_submitted", group_id=group_id, task_type=body.get("task_type"),
                   devices=[m["device_id"] for m in members], include_new=include_new)
        return json_response({"group_id": group_id, "tasks": len(members),
                              "url": "/api/v1/groups/%d" % group_id}, 201)

    def group(self, group_id):
        """At most MAX_LIST_LIMIT of its tasks, as ?limit= asks for fewer."""
        limit = query_int("limit", None)
        try:
            return json_response(self.as_read(fleet.group(
                self.connection(), group_id, None if limit is None else min(
                    limit, MAX_LIST_LIMIT), most=MAX_LIST_LIMIT)))
        except fleet.FleetError as e:
            raise ApiError(404, str(e))

    def cancel_group(self, group_id):
        """Every task of the group that has not ended, as `rc cancel --group`."""
        try:
            queued, stopping = tasks.cancel_group(self.connection(), group_id, active_too=True)
        except tasks.TaskError as e:
            raise ApiError(404, str(e))
        self.logger.info("group_cancel_requested", group_id=group_id, queued=queued,
                         running=stopping, address=bottle.request.environ.get("REMOTE_ADDR"))
        self.audit("group_cancel_requested", group_id=group_id, queued=queued, running=stopping)
        return json_response({"group_id": group_id, "queued_cancelled": queued,
                              "running_asked_to_stop": stopping})

    def broadcast(self):
        body = self.json_body()
        targets = body.get("targets") or {}
        if isinstance(targets, list):
            if not all(isinstance(text, str) for text in targets):
                raise ApiError(400, "targets must be an object or a list of KEY=VALUE")
            targets = tasks.parse_requirements(targets)
        control_id = fleet.broadcast(self.connection(), self.config, body.get("command"),
                                     targets)
        self.audit("control_broadcast", control_id=control_id, command=body.get("command"),
                   targets=targets)
        return json_response({"control_id": control_id,
                              "url": "/api/v1/controls/%d" % control_id}, 201)

    def control(self, control_id):
        try:
            return json_response(fleet.control_status(self.connection(), control_id))
        except fleet.FleetError as e:
            raise ApiError(404, str(e))

    # -- the web terminal ------------------------------------------------------------

    def command(self):
        """Run one `rc` command line, as the CLI would, for the web terminal:
        {"command": "tasks --state queued", "width": 120, "colour": true}."""
        body = self.json_body()
        argv = body.get("argv")
        if argv is None:
            line = body.get("command")
            if not isinstance(line, str):
                raise ApiError(400, "send {\"command\": \"a command line\"}")
            if len(line) > MAX_COMMAND_TEXT:
                raise ApiError(400, "a command line has at most %d characters, not %d; send a"
                                    " long script with POST /api/v1/tasks"
                               % (MAX_COMMAND_TEXT, len(line)))
            try:
                argv = shlex.split(line)
            except ValueError as e:
                raise ApiError(400, "cannot read the command line: %s" % e)
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ApiError(400, "argv must be a list of strings")
        if len(argv) > MAX_COMMAND_WORDS:
            raise ApiError(400, "a command line has at most %d words, not %d"
                           % (MAX_COMMAND_WORDS, len(argv)))
        if argv[:1] == ["rc"]:
            argv = argv[1:]
        if not argv:
            raise ApiError(400, "no command given; try `help`")
        try:
            access, waits = commands.web_rules(argv)
        except commands.CommandError as e:
            raise ApiError(403, str(e))
        actor = "admin" if access == "admin" else "reader"
        if access == "admin":
            try:
                self.require_admin()
            except ApiError:
                self.audit_reader("web_command_refused", "anonymous", argv)
                raise
        width = body.get("width")
        width = min(max(width, 20), MAX_TERMINAL_WIDTH) if isinstance(width, int) else None
        out, err = io.StringIO(), io.StringIO()
        address = bottle.request.environ.get("REMOTE_ADDR")
        # `submit --wait` holds a thread up to WEB_WAIT_LIMIT, `tail` 3 s: in a
        # long poll's slot, or 60 at once held every thread of rc-web, /health too.
        refused = waits and self.results.slots.take(address)
        if refused:
            return web_results.json_response(
                {"error": "`%s` not run: %s; %s" % (argv[0], refused.split(";")[0], waits)},
                503, {"Retry-After": "1"})
        try:
            status = commands.run_command(argv, out, err, self.config, width,
                                          bool(body.get("colour", False)), self.logger,
                                          (actor, address), self.has_read_token())
        finally:
            if waits:
                self.results.slots.give(address)
        if actor == "admin":
            self.logger.info("command", argv=argv[:1], status=status)
            self.audit("web_command", actor, status=status,     # a script is long
                       argv=[render.shorten(a, 200) for a in commands.withheld_argv(argv[:50])])
        elif self.audit_reader("web_command", actor, argv, status=status):
            self.logger.info("command", argv=argv[:1], status=status)
        return json_response({"status": status, "output": out.getvalue(),
                              "error": err.getvalue()})

    def completion(self):
        """What Tab completes in the web terminal: commands, options, option
        values, device ids and recent task ids."""
        words = commands.completion_words()
        connection = self.connection()
        words["devices"] = [row[0] for row in connection.execute(
            "SELECT device_id FROM devices ORDER BY device_id LIMIT 1000")]
        words["tasks"] = [row[0] for row in connection.execute(
            "SELECT task_id FROM tasks ORDER BY task_id DESC LIMIT 200")]
        return json_response(words)

    # -- plain text ----------------------------------------------------------------

    def text_status(self):
        return text_response(render.key_values(self.status_summary().items()))

    def text_devices(self):
        now = time.time()
        return separated([records.device_row(records.device_record(d, now))
                          for d in self.listed_devices()], records.DEVICE_COLUMNS)

    def text_tasks(self):
        now = time.time()
        return separated([records.task_row(records.task_record(task, now))
                          for task in self.listed_tasks(results=False)[0]],
                         records.TASK_COLUMNS)

    def text_logs(self):
        query = bottle.request.query
        lines = min(query_int("lines", DEFAULT_LOG_LINES), logs.MAX_WEB_LINES)
        try:
            found = logs.recent_log_records(self.config.log_dir, query.get("program") or None,
                                            lines)
        except logs.NoSuchLog as e:
            raise ApiError(404, str(e))
        return separated([records.log_row(record) for _, record in found], records.LOG_COLUMNS)

    def text_metrics(self):
        return text_response(metrics_text(self.connection(), time.time(), self.started),
                             "text/plain; version=0.0.4")

    # -- streams ---------------------------------------------------------------------

    def stream(self, kind):
        """Server-Sent Events of devices, tasks or log lines, from the event
        after Last-Event-ID."""
        def events():
            last_id = raw_header("Last-Event-ID") or \
                bottle.request.query.get("last_event_id") or None
            return {"devices": self.device_events, "tasks": self.task_events,
                    "logs": self.log_events}[kind](last_id)
        return self.event_stream(events)

    def event_stream(self, make_events):
        """A Server-Sent Events response. Each stream holds a waitress
        thread, so there are at most max_streams at once; past that, 503."""
        give_back, refused = self.stream_slots.take(bottle.request.environ.get("REMOTE_ADDR"))
        if refused:
            raise ApiError(503, refused)
        try:
            disconnected = bottle.request.environ.get("waitress.client_disconnected")
            body = StreamBody(self.paced(make_events(), disconnected, self.still_allowed()),
                              give_back)
        except BaseException:
            give_back()
            raise
        bottle.response.content_type = "text/event-stream; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return body

    def paced(self, events, disconnected, allowed):
        """The stream's text: its events as they come, a comment ping when it
        has been quiet, and an end when the client has gone or what let it
        in no longer does (`allowed`: the browser's reconnect gets the 401)."""
        yield ("retry: %d\n\n" % STREAM_RETRY_MS).encode()
        quiet_since = time.monotonic()
        try:
            for chunk in self.contained(events, bottle.request.path):
                if self.closing.is_set() or (disconnected and disconnected()):
                    return
                if not allowed():
                    yield b": the admin token or stream session that opened this stream" \
                          b" no longer holds\n\n"
                    return
                if chunk:
                    quiet_since = time.monotonic()
                    yield chunk.encode()
                elif time.monotonic() - quiet_since >= STREAM_PING_INTERVAL:
                    quiet_since = time.monotonic()
                    yield b": ping\n\n"
        finally:
            events.close()   # its database connection closes now, not at collection

    def contained(self, events, path):
        """A stream's events until one fails: the failure is logged (rate
        limited) and ends that stream alone; the browser reconnects."""
        try:
            yield from events
        except Exception as e:
            self.log("error", "stream_failed", type(e).__name__, path=path, error=render.shorten(repr(e), 500),
                     traceback=traceback.format_exc())

    def watch(self, connection):
        """Yields True when the database has changed, None otherwise, one
        look per STREAM_POLL_INTERVAL; reads only, never a transaction."""
        seen = None
        while True:
            version = db.data_version(connection)
            yield version != seen or None
            seen = version
            time.sleep(STREAM_POLL_INTERVAL)

    def device_events(self, last_id):
        """`device` events: a device's whole record when anything about it
        changed; every device first (the current state is the resume point).
        Rows are compared as read, and only a changed one made a record:
        making every device's record at each change of the database took
        15-40 ms for the 1,334 devices a year had left, up to five times a
        second on a busy cluster, for each open stream."""
        connection = commands.connect(self.config)
        try:
            shown = {}
            for changed in self.watch(connection):
                chunks = []
                if changed:
                    for row in devices.device_rows(connection):
                        values = tuple(row)
                        if shown.get(row["device_id"]) != values:
                            shown[row["device_id"]] = values
                            device = devices.device_dict(row)
                            chunks.append(sse("device", records.device_record(device, time.time()),
                                              device_event_id(device)))
                yield "".join(chunks)
        finally:
            connection.close()

    def task_events(self, last_id):
        """`task` events: each state change of every task, in order; the id
        is the event's, so Last-Event-ID resumes right after it. Where a new
        stream starts is read now, before the response begins: read as the
        stream's first event is, a change committed just after the client
        saw the headers would be missed."""
        connection = commands.connect(self.config)
        try:
            after = event_number(last_id)
            if after is None:
                after = event_number(bottle.request.query.get("since"))
            if after is None:
                after = connection.execute(
                    "SELECT coalesce(max(id), 0) FROM task_events").fetchone()[0]
        except BaseException:
            connection.close()
            raise
        return self.task_changes(connection, after)

    def task_changes(self, connection, after):
        """The events of task_events() after event number `after`, as they come."""
        try:
            for changed in self.watch(connection):
                chunks = []
                while changed:
                    rows = connection.execute(
                        "SELECT e.id, e.task_id, e.time, e.attempt, e.state, e.device_id,"
                        " e.reason, t.task_type, t.progress FROM task_events e"
                        " JOIN tasks t ON t.task_id = e.task_id WHERE e.id > ?"
                        " ORDER BY e.id LIMIT ?", (after, STREAM_BATCH)).fetchall()
                    for row in rows:
                        after = row["id"]
                        chunks.append(sse("task", dict(row), row["id"]))
                    changed = len(rows) == STREAM_BATCH
                yield "".join(chunks)
        finally:
            connection.close()

    def log_events(self, last_id):
        """`log` events: the programs' log lines as they are written; the id
        is the line's time, so Last-Event-ID resumes after it."""
        program = bottle.request.query.get("program") or None
        after = event_time(last_id)
        offsets = logs.Offsets()
        try:
            backlog = logs.recent_log_records(self.config.log_dir, program,
                                              DEFAULT_LOG_LINES if after is None else 10000,
                                              offsets)
        except logs.NoSuchLog:
            backlog = []
        first = [sse("log", records.log_event(record, moment), "%.6f" % moment)
                 for moment, record in backlog if after is None or moment > after]
        yield "".join(first)
        while True:
            time.sleep(LOG_POLL_INTERVAL)
            lines = logs.new_lines(self.config.log_dir, program, offsets)     # none yet: []
            lines.sort(key=lambda line: line[0])
            yield "".join(sse("log", records.log_event(record, moment), "%.6f" % moment)
                          for moment, record in lines)

    # -- pages and errors ------------------------------------------------------------

    def index(self):
        if self.page is None:
            self.page = versioned_page(WEB_ROOT)
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-cache")
        return self.page

    def static(self, path):
        response = bottle.static_file(path, root=WEB_ROOT)
        response.set_header("Cache-Control", "no-cache")   # asked again, 304 when unchanged
        return response

    def worker_file(self):
        """The worker, for `curl -O http://NAS:5000/worker.py` on a device."""
        return bottle.static_file(os.path.basename(rc_config.WORKER_PATH),
                                  root=os.path.dirname(rc_config.WORKER_PATH),
                                  mimetype="text/x-python", download=True)

    def error(self, error):
        """Every error as {"error": ...}; a failure of ours (500) is logged,
        once a minute per route and kind, and ends only its own request."""
        if error.status_code >= 500:
            route = bottle.request.environ.get("bottle.route")
            self.log("error", "request_failed", "%s %s" % (
                         getattr(route, "rule", "?"), type(error.exception).__name__),
                     method=bottle.request.method, path=render.shorten(bottle.request.path, 200),
                     error=render.shorten(repr(error.exception), 500),
                     traceback=error.traceback or traceback.format_exc())
        message = error.body or error.status_line
        full = isinstance(error.exception, sqlite3.Error) and db.on_full_disk(
            error.exception, self.config.db_path)
        if full:
            bottle.response.status, message = 507, full     # as POST /api/v1/files says it
        elif error.status_code == 404 and str(message).startswith("Not found: "):
            message += near_route(bottle.request.path, bottle.request.app.routes)
        elif error.status_code == 405 and error.get_header("Allow"):
            # `curl -T -` (PUT) for an upload got a bare "Method not allowed."
            message = "%s: %s takes %s, not %s" % (
                str(error.body or "Method not allowed").rstrip("."), bottle.request.path,
                " or ".join(error.get_header("Allow").split(",")), bottle.request.method)
        bottle.response.content_type = "application/json"
        return orjson.dumps({"error": message})

    def after_request(self):
        # Straight into bottle's header table (set_header checks each name and
        # value on every request): the names are in its form already, Title-Case.
        bottle.response.headers.dict.update(
            (name, [value]) for name, value in SECURITY_HEADERS.items())
        if self.logger.threshold <= LEVELS["debug"]:      # its fields cost more than the check
            self.logger.debug("request", method=bottle.request.method,
                              path=bottle.request.path, status=bottle.response.status_code)


def near_route(path, routes):
    """` (did you mean /api/v1/tasks/5? ...)` for a path that no route has
    but one nearly does (`/api/v1/task/5`, `/api/tasks`), its numbers kept;
    else "". A mistyped URL got bottle's bare `Not found: '/api/v1/task/5'`."""
    import difflib      # only on this error's path
    numbers = re.findall(r"(?<=/)\d+(?=/|$)", path)
    shape = re.sub(r"(?<=/)\d+(?=/|$)", "<>", path)
    rules = {}
    for route in routes:
        rules.setdefault(re.sub(r"<[^>]*>", "<>", route.rule), route.rule)
    close = difflib.get_close_matches(shape, sorted(rules), 1, 0.8) or [
        rule for rule in sorted(rules, key=len, reverse=True)    # a prefix before it:
        if len(rule) > 1 and shape.endswith(rule)][:1]           # RC_URL=http://nas:5000/rc
    if not close:
        return " (docs/http.md lists the endpoints)"
    meant = close[0]
    if meant.count("<>") == len(numbers):
        for number in numbers:
            meant = meant.replace("<>", number, 1)
    else:
        meant = rules[meant]
    return " (did you mean %s? docs/http.md lists the endpoints)" % meant


class StreamBody:
    """A stream's body for waitress: `release` runs once when it is closed,
    whether the client read it to the end or went away."""

    def __init__(self, chunks, release):
        self.chunks, self.release_slot = chunks, release
        self.released = False

    def __iter__(self):
        return self.chunks

    def close(self):
        self.chunks.close()
        if not self.released:
            self.released = True
            self.release_slot()


# -- helpers ----------------------------------------------------------------------

def sse(event, data, event_id=None):
    """One Server-Sent Event; JSON data is one line, so it needs no splitting."""
    head = "id: %s\n" % event_id if event_id is not None else ""
    return "%sevent: %s\ndata: %s\n\n" % (head, event, orjson.dumps(data, default=repr).decode())


def device_event_id(device):
    return "%.6f" % max(t or 0 for t in (device["last_seen"], device["connected_at"],
                                         device["disconnected_at"]))


def event_number(text):
    """A task event's id from Last-Event-ID or ?since=; None when there is none."""
    return None if text in (None, "") else request_int(text, "event id")


def event_time(text):
    try:
        return float(text) if text else None
    except ValueError:
        return None


def completed_since(connection, now):
    """Completed tasks in each THROUGHPUT_WINDOWS, read from the newest event
    back (event ids grow with time), so the cost is the recent events only."""
    counts = [0] * len(THROUGHPUT_WINDOWS)
    oldest = now - max(THROUGHPUT_WINDOWS)
    for row in connection.execute("SELECT time, state FROM task_events ORDER BY id DESC"):
        if row[0] < oldest:
            break
        if row[1] == COMPLETED:
            for i, window in enumerate(THROUGHPUT_WINDOWS):
                counts[i] += row[0] >= now - window
    return counts


# -- /text/metrics: Prometheus exposition format ------------------------------------

def metrics_text(connection, now, started):
    """Counters come from the database (tasks_* rows and the task id
    sequence), so they never go down when a program restarts."""
    out = []

    def family(name, kind, help_text, samples):
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))
        for labels, value in samples:
            if value is None:
                continue
            label_text = ",".join('%s="%s"' % (k, label_value(v)) for k, v in labels)
            out.append("%s%s %s\n" % (name, "{%s}" % label_text if labels else "",
                                      sample_value(value)))

    counts = devices.counts(connection)
    family("rc_devices", "gauge", "Devices known to the cluster, by status.",
           [((("status", status),), counts[status]) for status in ("online", "offline")])
    family("rc_devices_connected", "gauge", "Devices with an open connection.",
           [((), counts["connected"])])
    by_state = tasks.counts_by_state(connection)
    family("rc_tasks", "gauge", "Tasks in the database, by state.",
           [((("state", state),), by_state[state]) for state in TASK_STATES])
    finished = {row[0]: row[1] for row in connection.execute(
        "SELECT name, value FROM counters WHERE name LIKE 'tasks_%'")}
    family("rc_tasks_finished_total", "counter", "Tasks that reached a final state.",
           [((("state", state),), finished.get("tasks_" + state, 0))
            for state in TERMINAL_STATES])
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
    family("rc_tasks_submitted_total", "counter", "Tasks ever submitted.",
           [((), row[0] if row else 0)])
    listed = devices.list_devices(connection)
    online = [d for d in listed if d["status"] == "online"]
    family("rc_slots", "gauge", "Task slots of online devices.",
           [((), devices.total_slots(online))])
    family("rc_slots_busy", "gauge", "Task slots of online devices that hold a task.",
           [((), devices.busy_slots(online))])
    family("rc_web_uptime_seconds", "gauge", "Seconds since rc-web started.",
           [((), now - started)])
    history_families(family, connection, now)
    per_device = [
        ("rc_device_up", "1 if the device is online.",
         lambda d, m: int(d["status"] == "online")),
        ("rc_device_connected", "1 if the device has an open connection.",
         lambda d, m: int(d["connected"])),
        ("rc_device_heartbeat_age_seconds", "Seconds since the device was last heard.",
         lambda d, m: max(0.0, now - d["last_seen"])),
        ("rc_device_cpu_usage_ratio", "CPU in use, 0 to 1.",
         lambda d, m: records.fraction(m.get("cpu_percent"))),
        ("rc_device_memory_usage_ratio", "Memory in use, 0 to 1.",
         lambda d, m: records.fraction(m.get("memory_percent"))),
        ("rc_device_battery_ratio", "Battery charge, 0 to 1.",
         lambda d, m: records.fraction(records.battery_percent(m))),
        ("rc_device_cpu_cores", "CPU cores.", lambda d, m: d["cpu_cores"]),
        ("rc_device_memory_bytes", "Memory size in bytes.",
         lambda d, m: None if d["memory_gb"] is None else d["memory_gb"] * 1024 ** 3),
        ("rc_device_slots", "Tasks the device runs at once.", lambda d, m: d["slots"]),
        ("rc_device_active_tasks", "Tasks assigned to or running on the device.",
         lambda d, m: d["active_tasks"]),
        ("rc_device_disk_usage_ratio", "Disk in use on the worker's file system, 0 to 1.",
         lambda d, m: records.fraction(m.get("disk_percent"))),
        ("rc_device_temperature_celsius", "The device's temperature (CPU or battery).",
         lambda d, m: finite_number(m.get("temperature_c"))),
        ("rc_device_load1", "Load average over one minute.",
         lambda d, m: finite_number((m.get("load_avg") or [None])[0]
                                    if isinstance(m.get("load_avg"), list) else None)),
    ]
    for name, help_text, value in per_device:
        family(name, "gauge", help_text,
               [((("device", d["device_id"]),), value(d, records.device_metrics(d)))
                for d in listed])
    # Since the device booted: a reboot resets them, which Prometheus's
    # rate() takes as a counter reset.
    for name, key, help_text in (
            ("rc_device_network_receive_bytes_total", "net_bytes_recv",
             "Bytes received on every interface but loopback."),
            ("rc_device_network_transmit_bytes_total", "net_bytes_sent",
             "Bytes sent on every interface but loopback."),
            ("rc_device_disk_read_bytes_total", "disk_read_bytes", "Bytes read from the disks."),
            ("rc_device_disk_written_bytes_total", "disk_write_bytes",
             "Bytes written to the disks.")):
        family(name, "counter", help_text,
               [((("device", d["device_id"]),),
                 finite_number(records.device_metrics(d).get(key))) for d in listed])
    duration_histogram(out, connection)
    return "".join(out)


def finite_number(value):
    """A device's report is the device's word: only a real, finite number
    becomes a sample."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def duration_histogram(out, connection):
    buckets, count, total = stats.duration_histogram(connection)
    name = "rc_task_duration_seconds"
    out.append("# HELP %s Seconds from start to result of finished tasks (counted when"
               " their minute closes).\n# TYPE %s histogram\n" % (name, name))
    for bound, cumulative in buckets:
        out.append('%s_bucket{le="%s"} %d\n'
                   % (name, "+Inf" if bound == stats.INFINITY else "%g" % bound, cumulative))
    out.append("%s_sum %s\n%s_count %d\n" % (name, sample_value(float(total)), name, count))


# The history's windows: the last whole minute and the last quarter hour.
HISTORY_WINDOWS = ((1, "1m"), (15, "15m"))


def history_families(family, connection, now):
    """Gauges over the recorded history (stats_minutes), by window."""
    summaries = [(label, stats.summary(stats.history(connection, minutes + 1, now)[-minutes:]))
                 for minutes, label in HISTORY_WINDOWS]
    for name, key, help_text in (
            ("rc_history_throughput_per_minute", "throughput_per_minute",
             "Tasks completed per minute over the window."),
            ("rc_history_success_ratio", "success_rate",
             "Completed among the tasks that completed, failed or timed out in the window"
             " (cancelled is neither), 0 to 1."),
            ("rc_history_task_duration_seconds_mean", "duration_mean",
             "Mean seconds from start to result of the tasks that finished in the window."),
            ("rc_history_task_duration_seconds_max", "duration_max",
             "Longest run of the tasks that finished in the window."),
            ("rc_history_queue_length", "queue_length",
             "Queued tasks at the end of the window's last recorded minute."),
            ("rc_history_devices_online", "devices_online",
             "Devices online at the end of the window's last recorded minute.")):
        family(name, "gauge", help_text,
               [((("window", label),), summary[key]) for label, summary in summaries])


def label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample_value(value):
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(int(value))


# -- requests ------------------------------------------------------------------------

def query_int(name, default):
    """?name=N, a whole number from 0 that SQLite can hold, or 400."""
    text = bottle.request.query.get(name)
    if text in (None, ""):
        return default
    return request_int(text, name)


def request_int(text, name):
    try:
        return bounded.whole(text, name)
    except ValueError as e:
        raise ApiError(400, str(e))


def path_id(text):
    """The <…:id> of a path: an id past what SQLite holds names nothing."""
    try:
        return bounded.whole(text, "id")
    except ValueError:
        raise bottle.HTTPError(404, "no such id %s" % bounded.shown(text))


def submitted_spec(body):
    """submit()'s arguments from one task of a POST /api/v1/tasks body."""
    if not isinstance(body, dict):
        raise ApiError(400, "each task must be a JSON object")
    unknown = sorted(set(body) - SUBMIT_FIELDS)
    if unknown:
        raise ApiError(400, "unknown field %s (known: %s)"
                       % (", ".join(unknown), ", ".join(sorted(SUBMIT_FIELDS))))
    check_shapes(body)
    return {"task_type": body.get("task_type"), "payload": submitted_payload(body),
            "priority": body.get("priority", "normal"), "timeout": body.get("timeout"),
            "retries": body.get("retries"), "requirements": submitted_requirements(body),
            "idempotency_key": body.get("idempotency_key"),
            "retry_on_failure": body.get("retry_on_failure", False),
            "depends_on": body.get("depends_on", [])}


def numbered_spec(count, number, body):
    """submitted_spec(); in a batch its error names the task ("task 3 of 7:
    ..."), so a client can send the others again without it."""
    try:
        return submitted_spec(body)
    except (ApiError, tasks.TaskError) as e:
        if count == 1:
            raise
        raise ApiError(getattr(e, "status", 400), "task %d of %d: %s" % (number, count, e))


def check_shapes(body):
    """The fields of a submit whose wrong shape tasks.submit would not name
    (it would fail on them): 400 naming the field."""
    if not isinstance(body.get("priority", "normal"), str):
        raise ApiError(400, "priority must be one of %s" % ", ".join(PRIORITIES))
    depends_on = body.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(
            isinstance(task_id, int) and not isinstance(task_id, bool) and task_id > 0
            for task_id in depends_on):
        raise ApiError(400, "depends_on must be a list of task ids")


def submitted_payload(body):
    """An object as is; anything else is the one argument of the type, as in
    `rc submit TYPE ARG` ({"task_type": "shell", "payload": "uptime"})."""
    payload = body.get("payload")
    if isinstance(payload, dict):
        return payload
    return tasks.payload_from_argument(body.get("task_type"), payload)


def submitted_requirements(body):
    requirements = body.get("requirements") or {}
    if isinstance(requirements, list):
        if not all(isinstance(text, str) for text in requirements):
            raise tasks.TaskError("requirements must be an object or a list of KEY=VALUE")
        requirements = tasks.parse_requirements(requirements)
    try:
        return bounded.check_json(requirements, "requirements")
    except ValueError as e:
        raise ApiError(400, str(e))


def separated(rows, columns):
    """?format=pipe|csv|tsv, ?header=0 to leave out the header line."""
    query = bottle.request.query
    kind = query.get("format") or "pipe"
    if kind not in TEXT_FORMATS:
        raise ApiError(400, "format must be one of %s" % ", ".join(TEXT_FORMATS))
    header = query.get("header", "1") not in ("0", "false", "no")
    if kind == "csv":
        text = render.csv_text(rows, columns, header)
    elif kind == "tsv":
        text = render.tsv_text(rows, columns, header)
    else:
        text = render.separated_text(rows, columns, "|", header)
    return text_response(text, TEXT_FORMATS[kind])


def raw_header(name):
    """A request header as the server read it (latin-1): bottle's
    get_header() decodes it as UTF-8 and raises on bytes that are not."""
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"), "")


def origin_host(origin):
    """host:port of an Origin header; None when it is not a URL ("http://[")."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


def host_name(header):
    """The name in a Host header, without its port: "nas:5000" -> "nas"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@functools.lru_cache(maxsize=256)      # every request asks it of its Host header
def is_ip_address(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False



def is_local_peer(environ):
    """read_access=local: a client on this machine *and* of rc-web's own
    user. A task on the main node's local worker, or another local user,
    connects from loopback too, but as another uid: to them the main node
    is as remote as from the LAN. Where the kernel does not say who owns a
    socket (no /proc/net/tcp), loopback is enough, as before."""
    if not web_results.is_loopback(environ.get("REMOTE_ADDR")):
        return False
    owner = loopback_socket_owner(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"),
                                  environ.get("SERVER_PORT"), environ.get("rc.local_address"))
    return owner is None or owner == os.getuid()


PROC_NET = "/proc/net"      # where the kernel lists this machine's sockets (tests: a copy)


def loopback_socket_owner(client_address, client_port, server_port=None, server_address=None):
    """The uid that owns the client's end of a loopback connection (an
    established socket whose local end is `client_address`:`client_port`
    and whose remote end is `server_address`:`server_port`, the address the
    client reached), from /proc/net/tcp or tcp6; None where unknown. The
    whole addresses, not the ports alone: any local user may bind 127.0.0.2
    to a port a socket of ours has (rc-web's own, the local worker's), and
    the first socket of that port in the table was taken for the client's;
    and a connection to 127.0.0.2 (rc-web on 0.0.0.0 answers there) may
    have the very address and port of ours to 127.0.0.1 as its own end,
    which the kernel gives a connect() when the two go to different places:
    the owner's, if first in the table, was taken for it."""
    try:
        address = ipaddress.ip_address(client_address)
        local = proc_net_address(address, int(client_port))
    except (TypeError, ValueError):
        return None
    remote = ":%04X" % int(server_port) if str(server_port).isdigit() else None
    if remote is not None and server_address:
        try:
            server = ipaddress.ip_address(server_address)
        except ValueError:
            server = None
        # rc-web on "::": the client's own socket is IPv4, as its address is.
        server = getattr(server, "ipv4_mapped", None) or server
        if server is not None and server.version == address.version:
            remote = proc_net_address(server, int(server_port))
    try:
        with open(os.path.join(PROC_NET, "tcp6" if address.version == 6 else "tcp")) as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # sl local_address rem_address st(01: established) tx:rx tr:when retrnsmt uid
        if len(fields) > 7 and fields[1] == local and fields[3] == "01" \
                and (remote is None or fields[2].endswith(remote)):
            return int(fields[7])
    return -1       # a table but no such socket: not ours


def proc_net_address(address, port):
    """An address and port as /proc/net/tcp (tcp6) writes them: each 32-bit
    word of the address in hex, in this machine's byte order."""
    packed = address.packed
    words = [packed[i:i + 4] for i in range(0, len(packed), 4)]
    if sys.byteorder == "little":
        words = [word[::-1] for word in words]
    return "%s:%04X" % ("".join(word.hex().upper() for word in words), port)


def own_host_names(extra):
    """localhost, this machine's name with any domain (nas, nas.local,
    nas.lan...) and the names in allowed_hosts."""
    names = {"localhost", "localhost.localdomain"}
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.lower()
        names.add(name)
        short = name.split(".")[0]
        names.update({short, short + ".local", short + ".lan", short + ".home.arpa",
                      short + ".home", short + ".localdomain"})
    names.update(name.lower() for name in extra)
    return names


# -- task files (issue 18): uploads, downloads with Range, a task's list ----------------

FILE_STATUS = {"quota": 413, "disk_full": 507, "hash_mismatch": 400, "short": 400,
               "not_found": 404, "bad_request": 400, "busy": 503}
RANGE = re.compile(r"\Abytes=([0-9]*)-([0-9]*)\Z")
RANGE_DIGITS = 19     # digits of a Range number past which it is past any file


class FileRoutes:
    """POST /api/v1/files, GET /api/v1/files/SHA256, GET /api/v1/tasks/ID/files
    and .../files/NAME: the file store (lib/rc/files.py) over HTTP. Bodies
    are streamed in CHUNK_BYTES pieces both ways."""

    def __init__(self, web):
        self.web = web

    def upload(self):
        """The raw request body into the store; answers {"sha256", "size"}."""
        config, environ = self.web.config, bottle.request.environ
        length = bottle.request.content_length
        if length < 0 or "HTTP_TRANSFER_ENCODING" in environ:
            raise ApiError(411, "send the file with a Content-Length")
        if environ.get("CONTENT_TYPE", "").lower().startswith("multipart/"):
            # curl -F wraps the file in a form, which would be stored as it came.
            raise ApiError(415, "send the file's bytes as the body (curl --data-binary"
                                " @FILE), not a multipart form (curl -F)")
        try:
            files.check_quota(config, length)
        except files.FileStoreError as e:
            raise ApiError(FILE_STATUS[e.code], str(e))
        expected = raw_header("X-Content-SHA256") or None
        if expected is not None and not files.is_sha256(expected.strip().lower()):
            raise ApiError(400, "X-Content-SHA256 must be 64 hex digits, not %r"
                                % expected[:80])
        expected = expected and expected.strip().lower()
        try:
            held = environ.get("rc.held")
            if held is not None and held.partial is not None:   # body in its partial file
                digest, size = files.store_received(self.web.connection(), config,
                                                    held.partial, length, expected)
            else:
                digest, size = files.store_stream(self.web.connection(), config,
                                                  environ["wsgi.input"], length, expected)
        except files.FileStoreError as e:
            raise ApiError(FILE_STATUS.get(e.code, 400), str(e))
        # The audit log keeps each upload (who, from where, which blob); the
        # program's own line is debug: at hundreds of small uploads a second,
        # a second line of each through supervisord cost more than the write.
        self.web.logger.debug("file_uploaded", sha256=digest, size=size,
                              address=environ.get("REMOTE_ADDR"))
        self.web.audit("file_uploaded", sha256=digest, size=size)
        return json_response({"sha256": digest, "size": size}, 201)

    def limits(self):
        """What an upload may be, for a client to refuse a file over it
        before reading it (rc.client hashes a file before sending it)."""
        return json_response({"quota_bytes": self.web.config.files_quota_mb * files.MIB})

    def blob(self, sha256):
        return self.serve(sha256, sha256)

    def task_list(self, task_id):
        self.web.existing_task(task_id)
        return json_response({"task_id": task_id, "files": files.task_files(
            self.web.connection(), task_id)})

    def task_file(self, task_id, name):
        self.web.existing_task(task_id)
        entry = files.task_file(self.web.connection(), task_id, name)
        if entry is None:
            raise ApiError(404, "task %d has no file %r" % (task_id, name[:200]))
        return self.serve(entry["sha256"], name.rsplit("/", 1)[-1])

    def serve(self, sha256, filename):
        try:
            blob, size = files.open_blob(self.web.connection(), self.web.config, sha256)
        except files.FileStoreError as e:
            raise ApiError(FILE_STATUS.get(e.code, 400), str(e))
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "X-Content-SHA256": sha256, "Content-Disposition": disposition(filename)}
        try:
            start, end, status = byte_range(raw_header("Range"), size)
        except ApiError:
            blob.close()
            return bottle.HTTPResponse(orjson.dumps({"error": "range not satisfiable"}), 416,
                                       {"Content-Range": "bytes */%d" % size,
                                        "Content-Type": "application/json"})
        headers["Content-Length"] = str(end - start)
        if status == 206:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, end - 1, size)
        return bottle.HTTPResponse(read_range(blob, start, end), status, headers)


def byte_range(header, size):
    """(start, end exclusive, status) for a Range header: one range, or the
    whole file (200) without one; ApiError(416) when it cannot be met."""
    unit, _, ranges = (header or "").strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        # A unit other than bytes must be ignored (RFC 9110, 14.2), and
        # several ranges may be: the whole file, which any client takes.
        return 0, size, 200
    match = RANGE.match("bytes=" + ranges.strip())
    if not match or match.groups() == ("", ""):
        raise ApiError(416, "a range is bytes=START-END, START- or -LAST")
    first, last = (range_position(text) for text in match.groups())
    if first is None:
        start, end = max(0, size - last), size
    else:
        start = first
        end = size if last is None else min(size, last + 1)
    if start >= size or start >= end:
        raise ApiError(416, "range %s is outside %d bytes" % (header[:80], size))
    return start, end, 206


def range_position(digits):
    """A Range header's number, None when left out. However many digits it
    has (Python reads no int of more than 4,300): past RANGE_DIGITS it is
    past every file's end."""
    if digits == "":
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= RANGE_DIGITS else 10 ** RANGE_DIGITS


def read_range(blob, start, end):
    """The bytes of [start, end) in chunks; the file closes when done or dropped."""
    with blob:
        blob.seek(start)
        left = end - start
        while left > 0:
            chunk = blob.read(min(files.CHUNK_BYTES, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


# -- the dashboard's overview (issue 20): one compact picture of the cluster ----------

OVERVIEW_DEVICES = 500            # devices the overview's grid shows (the rest: /api/v1/devices)
OVERVIEW_TASKS = 50               # running tasks the overview lists
OVERVIEW_FAILURES = 8             # recent failures the overview lists
OVERVIEW_RECENT = 8               # newest tasks, any state, the overview lists
OVERVIEW_GROUPS = 4               # newest maps and groups (--each, clients') the overview lists
FAILURE_LOOKBACK_EVENTS = 5000    # task events, newest first, searched for failures
OVERVIEW_HISTORY_MINUTES = 60     # minutes of history the overview's charts draw
OVERVIEW_MIN_INTERVAL = 1.0       # seconds between two overviews on /stream/overview
OVERVIEW_TEXT = 160               # characters of an error or message the overview shows
# The figures of a device the overview's grid shows (the whole record is at /api/v1/devices/ID).
OVERVIEW_DEVICE_FIELDS = ("device_id", "hostname", "status", "connected", "available",
                          "unavailable_reason", "drained", "suspect_since", "slots",
                          "active_tasks", "platform", "architecture", "role", "labels",
                          "last_seen", "figures_at", "revoked")


class DashboardRoutes:
    """GET /api/v1/overview and /stream/overview: what the dashboard shows
    on arrival (summary, devices, running tasks, the newest tasks, recent
    failures, the minute history), as one object; GET /api/v1/terminal: what the web
    terminal must know of the commands it may not run."""

    def __init__(self, web):
        self.web = web

    def overview(self):
        return json_response(self.picture(self.web.connection()))

    def picture(self, connection):
        now = time.time()
        summary = self.web.status_summary(connection)
        history = stats.history(connection, OVERVIEW_HISTORY_MINUTES, now)
        return {"now": now, "summary": summary,
                "devices": [overview_device(d) for d in overview_devices(connection)],
                "running": running_tasks(connection), "failures": recent_failures(connection),
                "recent": recent_tasks(connection), "groups": recent_groups(connection),
                "history": history, "history_summary": stats.summary_to_now(
                    connection, history[-15:], now),
                # Where a failed upload's "does not fit" comes from, before it does.
                "files": {"used_bytes": files.used_bytes(connection),
                          "quota_bytes": self.web.config.files_quota_mb * files.MIB}}

    def stream(self):
        """The overview again whenever the database changed, at most once per
        OVERVIEW_MIN_INTERVAL: one stream serves the whole page."""
        return self.web.event_stream(self.pictures)

    def pictures(self):
        connection = commands.connect(self.web.config)
        try:
            last_sent = 0.0
            waiting = False
            for changed in self.web.watch(connection):
                waiting = waiting or bool(changed)
                if waiting and time.monotonic() - last_sent >= OVERVIEW_MIN_INTERVAL:
                    picture = self.picture(connection)
                    last_sent, waiting = time.monotonic(), False
                    yield sse("overview", picture, "%.3f" % picture["now"])
                else:
                    yield ""
        finally:
            connection.close()

    def terminal(self):
        return json_response({"refused": dict(commands.WEB_REFUSED),
                              "admin": sorted(commands.WEB_ADMIN_COMMANDS)})


def overview_devices(connection):
    """The grid's devices, by id: OVERVIEW_DEVICES of them, the online ones
    first, then those heard from last. By id alone, a cluster that had seen
    600 devices showed 500 long gone and not the one at work whose id
    sorted after theirs."""
    return devices.list_devices_where(
        connection, "d.device_id IN (SELECT device_id FROM devices WHERE forgotten = 0"
        " ORDER BY status = ? DESC, last_seen DESC LIMIT ?)", (ONLINE, OVERVIEW_DEVICES))


def overview_device(device):
    shown = {key: device.get(key) for key in OVERVIEW_DEVICE_FIELDS}
    metrics = records.device_metrics(device)
    shown.update(cpu_percent=records.number(metrics.get("cpu_percent")),
                 memory_percent=records.number(metrics.get("memory_percent")),
                 battery_percent=records.number(records.battery_percent(metrics)),
                 charging=metrics.get("charging") if isinstance(metrics.get("charging"), bool)
                 else None, temperature_c=records.number(metrics.get("temperature_c")),
                 suspect=bool(device.get("suspect_since")))
    return shown


def running_tasks(connection):
    """The first OVERVIEW_TASKS tasks on devices, found through tasks_active
    (ordered by task_id itself, SQLite walked every task the retention
    keeps to find the few that are running: the unary plus stops that)."""
    rows = connection.execute(
        "SELECT task_id, task_type, payload, state, attempt, device_id, created_at,"
        " started_at, progress, progress_message, group_id FROM tasks WHERE %s"
        " ORDER BY +task_id LIMIT ?" % db.ACTIVE_SQL, (OVERVIEW_TASKS,))
    return [overview_task(tasks.task_dict(row)) for row in rows]


def recent_tasks(connection):
    """The newest tasks whatever their state: the one just submitted, still
    queued, or just completed is on the overview without a command."""
    rows = connection.execute(
        "SELECT task_id, task_type, payload, state, attempt, device_id, created_at,"
        " finished_at, reason, group_id FROM tasks ORDER BY task_id DESC LIMIT ?",
        (OVERVIEW_RECENT,))
    return [overview_task(tasks.task_dict(row)) for row in rows]


def recent_failures(connection):
    """The newest failed or timed-out tasks among the last task events."""
    rows = connection.execute(
        "SELECT t.task_id, t.task_type, t.payload, t.state, t.attempt, t.device_id,"
        " t.finished_at, t.error, t.reason, t.group_id FROM task_events e"
        " JOIN tasks t ON t.task_id = e.task_id"
        " WHERE e.id > (SELECT coalesce(max(id), 0) FROM task_events) - ?"
        " AND e.state IN (?, ?) AND t.state = e.state ORDER BY e.id DESC LIMIT ?",
        (FAILURE_LOOKBACK_EVENTS, FAILED, TIMED_OUT, OVERVIEW_FAILURES))
    return [overview_task(tasks.task_dict(row)) for row in rows]


def recent_groups(connection):
    """The newest maps and groups with their tasks (a map's inputs) counted
    by state: a map of three dozen inputs was on the overview only as its
    newest 8 tasks, with no word of the map, how far it was, or what had
    failed in it."""
    rows = connection.execute(
        "SELECT g.group_id, g.created_at, g.task_type, g.payload, m.inputs FROM task_groups g"
        " LEFT JOIN maps m ON m.group_id = g.group_id ORDER BY g.group_id DESC LIMIT ?",
        (OVERVIEW_GROUPS,)).fetchall()
    shown = []
    for row in rows:
        states = group_states(connection, row["group_id"], row["inputs"] is not None)
        payload = db.loads(row["payload"], {})
        summary = records.payload_summary({"task_type": row["task_type"], "payload": payload})
        shown.append({"group_id": row["group_id"], "kind": "map" if row["inputs"] is not None
                      else "group", "task_type": row["task_type"], "created_at": row["created_at"],
                      "inputs": row["inputs"], "summary": render.shorten(summary, OVERVIEW_TEXT),
                      "tasks": sum(states.values()), "states": states})
    return shown


# {group id: (its newest task's id, its counts)} of groups whose tasks had all
# ended: a map of 100,000 tasks took 67 ms to count, once a second per page.
ENDED_GROUPS = {}


def group_states(connection, group_id, is_map):
    """The group's tasks counted by state, or a map's inputs by the state of
    the task that last ran each (`not queued` before it has one), as `rc map`
    counts them: after `--resume` the group holds 38 tasks for 36 inputs.
    Counted again only while one has not ended, or when a task was added."""
    newest = connection.execute("SELECT max(task_id) FROM tasks WHERE group_id = ?",
                                (group_id,)).fetchone()[0]
    known = ENDED_GROUPS.get(group_id)
    if known is not None and known[0] == newest:
        return known[1]
    states = dict(connection.execute("SELECT state, count(*) FROM tasks WHERE group_id = ?"
                                     " GROUP BY state", (group_id,)).fetchall())
    if is_map:
        states = fleet.map_input_states(connection, group_id, states)
    if all(state in TERMINAL_STATES for state in states):
        if len(ENDED_GROUPS) >= OVERVIEW_GROUPS * 4:
            ENDED_GROUPS.clear()
        ENDED_GROUPS[group_id] = (newest, states)
    return states


def overview_task(task):
    task["summary"] = render.shorten(records.payload_summary(task), records.SUMMARY_WIDTH)
    del task["payload"]
    for key in ("error", "progress_message", "reason"):
        if isinstance(task.get(key), str):
            task[key] = render.shorten(task[key], OVERVIEW_TEXT)
    return task


def dashboard_routes(routes):
    return [("GET", "/api/v1/overview", routes.overview, "read"),
            ("GET", "/stream/overview", routes.stream, "read"),
            ("GET", "/api/v1/terminal", routes.terminal, "read")]


# -- the app -------------------------------------------------------------------------

def make_app(config, logger=None):
    if config.read_access not in READ_ACCESS:
        raise rc_config.ConfigError("read_access must be one of %s, not %r"
                                    % (", ".join(READ_ACCESS), config.read_access))
    web = Web(config, logger or Logger("rc-web", config.log_level))
    web.results = web_results.ResultRoutes(web)   # long polls, bulk reads, /client.py
    app = bottle.Bottle()
    app.router.add_filter("id", lambda conf: (r"[0-9]+", path_id, str))
    routes = [
        ("GET", "/health", web.health, "open"), ("GET", "/api/v1/health", web.health, "open"),
        ("GET", "/api/v1/status", web.status, "read"),
        # The design document's names for the same (docs/http.md, Aliases).
        ("GET", "/api/v1/cluster/status", web.status, "read"),
        ("GET", "/metrics", web.text_metrics, "read"),
        ("GET", "/api/v1/stats", web.stats, "read"),
        ("GET", "/api/v1/devices", web.devices, "read"),
        ("GET", "/api/v1/devices/<device_id>", web.device, "read"),
        ("GET", "/api/v1/tasks", web.tasks, "read"),
        ("GET", "/api/v1/tasks/<task_id:id>", web.task, "read"),
        ("GET", "/api/v1/tasks/<task_id:id>/why", web.why, "read"),
        ("POST", "/api/v1/tasks", web.submit, "admin"),
        ("POST", "/api/v1/tasks/<task_id:id>/cancel", web.cancel, "admin"),
        ("GET", "/api/v1/tasks/<task_id:id>/output", web.task_output, "read"),
        # As a device's watch: read access from pages of this origin, bounded
        # (one write per task every tails.WATCH_REFRESH seconds).
        ("POST", "/api/v1/tasks/<task_id:id>/watch", web.watch_task, "command"),
        ("POST", "/api/v1/devices/<device_id>/drain", web.drain, "admin"),
        ("POST", "/api/v1/devices/<device_id>/resume", web.resume, "admin"),
        ("POST", "/api/v1/devices/<device_id>/forget", web.forget, "admin"),
        ("POST", "/api/v1/devices/<device_id>/revoke", web.revoke, "admin"),
        ("POST", "/api/v1/devices/<device_id>/labels", web.labels, "admin"),
        ("POST", "/api/v1/devices/<device_id>/role", web.role, "admin"),
        ("POST", "/api/v1/groups", web.submit_group, "admin"),
        ("GET", "/api/v1/groups/<group_id:id>", web.group, "read"),
        ("POST", "/api/v1/groups/<group_id:id>/cancel", web.cancel_group, "admin"),
        ("POST", "/api/v1/broadcast", web.broadcast, "admin"),
        ("GET", "/api/v1/controls/<control_id:id>", web.control, "read"),
        ("POST", "/api/v1/command", web.command, "command"),
        ("POST", "/api/v1/stream-session", web.stream_session, "admin"),
        ("DELETE", "/api/v1/stream-session", web.end_stream_session, "open"),
        ("GET", "/api/v1/completion", web.completion, "read"),
        ("GET", "/text/status", web.text_status, "read"),
        ("GET", "/text/devices", web.text_devices, "read"),
        ("GET", "/text/tasks", web.text_tasks, "read"),
        ("GET", "/text/logs", web.text_logs, "read"),
        ("GET", "/text/metrics", web.text_metrics, "read"),
        ("GET", "/stream/<kind:re:devices|tasks|logs>", web.stream, "read"),
        ("GET", "/", web.index, "open"), ("GET", "/static/<path:path>", web.static, "open"),
        ("GET", "/worker.py", web.worker_file, "open"),
    ] + file_routes(FileRoutes(web)) + dashboard_routes(DashboardRoutes(web)) \
        + device_routes.DeviceRoutes(web, query_int, separated).routes() \
        + web_schedules.routes(web, sys.modules[__name__]) \
        + web.results.routes()
    for method, path, handler, access in routes:
        app.route(path, method, web.route(handler, access))
    app.default_error_handler = web.error
    app.add_hook("after_request", web.after_request)
    app.config["rc.web"] = web
    return app


def disposition(filename):
    """Content-Disposition of a download: the name itself in filename*
    (RFC 6266, UTF-8 percent-encoded), which browsers prefer, and a plain
    ASCII one for the others; a browser saved `it's "q".txt` or `été.jpg`
    as `it_s__q_.txt` and `_t_.jpg`, whatever the dashboard's link said."""
    plain = re.sub(r'[^A-Za-z0-9._-]', "_", filename)
    if plain == filename:
        return 'attachment; filename="%s"' % plain
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (
        plain, quote(filename, safe=""))


def file_routes(routes):
    return [("POST", UPLOAD_PATH, routes.upload, "admin"),
            ("GET", UPLOAD_PATH, routes.limits, "read"),
            ("GET", "/api/v1/files/<sha256>", routes.blob, "read"),
            ("GET", "/api/v1/tasks/<task_id:id>/files", routes.task_list, "read"),
            # Bottle's :path is ".+?", which stops at a newline: a file of a task
            # may have one in its name (`rc map --files` of such a file).
            ("GET", "/api/v1/tasks/<task_id:id>/files/<name:re:[\\s\\S]+>", routes.task_file,
             "read")]


def upload_allowance(web, request, quota):
    """For web_server, on a request's headers: POST /api/v1/files with the
    admin token may send up to the store's quota and take its time
    (MIN_UPLOAD_RATE), once its length is reserved against the quota
    beside what is stored and the other uploads in flight (refused at
    once, 413 or 507, when it does not fit: web_server holds a body whole
    before rc-web reads it, so only a refusal on the headers bounds the
    disk); anything else is held to SERVER_BODY_LIMIT within
    web_read_timeout, so no stranger gets a slow or large body in."""
    if request.command != "POST" or request.path != UPLOAD_PATH:
        return None
    scheme, _, given = request.headers.get("AUTHORIZATION", "").partition(" ")
    if not (scheme.lower() == "bearer" and web.token_matches(given.strip())):
        return None
    if request.content_length > quota or request.chunked or request.content_length <= 0:
        return quota        # refused on its size or its missing length, in their words
    # A body waitress would spill to a temporary file goes straight to the
    # store's partial file instead: the disk holds it once. A smaller one
    # stays in memory, as before (100 KiB inputs: 0.4 ms of rc-web's CPU
    # less than written and read back).
    in_memory = request.content_length <= request.adj.inbuf_overflow
    try:
        request.held = web.uploads.reserve(web.connection(), web.config,
                                           request.content_length, in_memory)
    except files.FileStoreError as e:
        code = FILE_STATUS.get(e.code, 413)
        raise web_server.Refused(code, bottle.HTTP_CODES.get(code, "Refused"), str(e))
    if not in_memory:
        request.body_file = request.held.file
    return quota


def too_large_words(request, size, limit, config):
    """For web_server, what its 413 says of a body refused on its headers
    (the app never sees it): an upload with the admin token, in the words
    of rc-web's own quota refusal; one without the token, that it needs
    it; any other request, where files go instead."""
    if request.long:
        try:
            files.check_quota(config, size)
        except files.FileStoreError as e:
            return str(e)
    if request.command == "POST" and request.path == UPLOAD_PATH:
        return ("an upload of more than %d bytes needs the admin token"
                " (Authorization: Bearer ...)" % limit)
    return ("a body of %d bytes, over rc-web's %d; send files with POST %s"
            " (rc submit --input FILE)" % (size, limit, UPLOAD_PATH))


def create_server(app, host, port, config):
    """waitress with enough threads that max_streams streams leave
    SPARE_THREADS for ordinary requests; lookahead lets a stream notice that
    its client went away. The limits on connections and their timeouts, and
    HTTPS, are web_server's (docs/http.md)."""
    web = app.config["rc.web"]
    timeouts = (config.web_channel_timeout, config.web_read_timeout)
    quota = config.files_quota_mb * files.MIB
    return web_server.Server(
        app, {"connections_per_address": config.web_connections_per_address,
              "read_timeout": config.web_read_timeout, "body_limit": SERVER_BODY_LIMIT,
              "long_body": lambda request: upload_allowance(web, request, quota),
              "too_large": lambda request, size, limit: too_large_words(request, size, limit,
                                                                        config),
              "min_body_rate": MIN_UPLOAD_RATE},
        web.log, web_server.tls_context(config) if config.web_tls else None,
        host=host, port=port, ident="rc-web",
        threads=config.max_streams + SPARE_THREADS + web_results.MAX_WAITERS,
        # The most any request may send: an upload of the whole quota (see upload_allowance).
        max_request_body_size=max(SERVER_BODY_LIMIT, quota) + 1, channel_request_lookahead=1,
        recv_bytes=RECV_BYTES,
        connection_limit=config.web_connection_limit,
        channel_timeout=max(1, int(config.web_channel_timeout)),
        # waitress looks for idle and slow connections this often (whole seconds).
        cleanup_interval=max(1, int(min(timeouts) / 2)),
        url_scheme="https" if config.web_tls else "http",
        asyncore_use_poll=True)     # select() fails past descriptor 1024


def main():
    state_dir.keep_files_private()
    logger = Logger("rc-web")
    try:
        config = rc_config.load()
        program.end_with_supervisord(config.run_dir)
        logger = Logger("rc-web", config.log_level)
        app = make_app(config, logger)
    except (rc_config.ConfigError, ValueError) as e:
        logger.error("config_error", error=str(e))
        return 1
    web_server.route_waitress_log(app.config["rc.web"].log)
    files.drop_dead_reservations(config)      # a killed rc-web's uploads in flight
    try:
        server = create_server(app, config.web_host, config.web_port, config)
    except (OSError, ValueError) as e:      # a certificate that cannot be read
        logger.error("web_cannot_listen", error=str(e), tls=config.web_tls)
        return 1
    logger.info("web_started", host=config.web_host, port=int(server.effective_port),
                tls=config.web_tls)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
