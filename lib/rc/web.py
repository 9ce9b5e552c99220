"""rc-web: the HTTP side of the main node, a Bottle app under waitress.

/api/v1/* speaks JSON, /text/* plain text for shell pipelines, / the
dashboard page. Reads need nothing; anything that changes the cluster needs
`Authorization: Bearer <web token>` (var/web_token, shown by `rc token --web`).
The rows and summaries come from rc.cli, so the web and the CLI agree."""
import hmac
import os
import sys
import threading
import time
import traceback

import bottle
import orjson
import waitress

from rc import cli, devices, explain, render, state_dir, tasks
from rc import config as rc_config
from rc.log import Logger

MAX_BODY_BYTES = 1024 * 1024      # largest request body accepted
# waitress refuses bodies past this itself; below it the app answers 413 in JSON.
SERVER_BODY_LIMIT = 4 * MAX_BODY_BYTES
MAX_LIST_LIMIT = 1000             # most rows one list request returns
DEFAULT_LIST_LIMIT = 100
SERVER_THREADS = 4
WEB_ROOT = os.path.join(rc_config.CHECKOUT, "share", "web")
SUBMIT_FIELDS = {"task_type", "payload", "priority", "timeout", "retries",
                 "requirements", "idempotency_key", "retry_on_failure", "depends_on"}
TEXT_FORMATS = {"pipe": "text/plain", "csv": "text/csv", "tsv": "text/tab-separated-values"}


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


def answers(handler):
    """Route wrapper: ApiError and TaskError become JSON errors."""
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except ApiError as e:
            return json_response({"error": str(e)}, e.status)
        except tasks.TaskError as e:
            return json_response({"error": str(e)}, 400)
    return wrapper


class Web:
    """The routes, with the config, the log and one connection per thread."""

    def __init__(self, config, logger):
        self.config, self.logger = config, logger
        self.local = threading.local()

    def connection(self):
        # sqlite3 connections are cheap to keep and not for sharing between threads.
        if getattr(self.local, "connection", None) is None:
            try:
                self.local.connection = cli.connect(self.config)
            except cli.CommandError as e:
                raise ApiError(503, str(e))
        return self.local.connection

    # -- request helpers ---------------------------------------------------------

    def require_token(self):
        scheme, _, given = bottle.request.get_header("Authorization", "").partition(" ")
        try:
            token = state_dir.read_secret(self.config.web_token_path)
        except (OSError, ValueError):
            raise ApiError(503, "no web token; run `make install`")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise ApiError(401, "missing or wrong web token"
                                " (send Authorization: Bearer TOKEN; see `rc token --web`)")

    def json_body(self):
        if bottle.request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, "request body is over %d bytes" % MAX_BODY_BYTES)
        data = bottle.request.body.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, "request body is over %d bytes" % MAX_BODY_BYTES)
        try:
            body = orjson.loads(data or b"{}")
        except orjson.JSONDecodeError as e:
            raise ApiError(400, "request body is not JSON: %s" % e)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def existing_task(self, task_id):
        try:
            return tasks.get(self.connection(), task_id)
        except tasks.TaskError as e:
            raise ApiError(404, str(e))

    def listed_tasks(self):
        query = bottle.request.query
        limit = query_int("limit", DEFAULT_LIST_LIMIT)
        return tasks.list_tasks(self.connection(), query.get("state") or None,
                                query.get("device") or None,
                                max(1, min(limit, MAX_LIST_LIMIT)), query_int("offset", 0))

    # -- JSON API ----------------------------------------------------------------

    def health(self):
        try:
            self.connection().execute("SELECT 1").fetchone()
        except ApiError as e:
            return json_response({"status": "error", "database": str(e)}, 503)
        return json_response({"status": "ok", "database": "ok"})

    def status(self):
        return json_response(cli.status_summary(self.connection()))

    def devices(self):
        return json_response({"devices": devices.list_devices(self.connection())})

    def device(self, device_id):
        device = devices.get(self.connection(), device_id)
        if device is None:
            raise ApiError(404, "no device %r" % device_id)
        return json_response(device)

    def tasks(self):
        query = bottle.request.query
        return json_response({"tasks": self.listed_tasks(),
                              "limit": query_int("limit", DEFAULT_LIST_LIMIT),
                              "offset": query_int("offset", 0)})

    def task(self, task_id):
        return json_response(self.existing_task(task_id))

    def submit(self):
        self.require_token()
        body = self.json_body()
        unknown = sorted(set(body) - SUBMIT_FIELDS)
        if unknown:
            raise ApiError(400, "unknown field %s (known: %s)"
                           % (", ".join(unknown), ", ".join(sorted(SUBMIT_FIELDS))))
        task_id = tasks.submit(self.connection(), self.config, body.get("task_type"),
                               submitted_payload(body), body.get("priority", "normal"),
                               body.get("timeout"), body.get("retries"),
                               submitted_requirements(body), body.get("idempotency_key"),
                               body.get("retry_on_failure", False), body.get("depends_on", []))
        state = self.existing_task(task_id)["state"]
        return json_response({"task_id": task_id, "state": state,
                              "url": "/api/v1/tasks/%d" % task_id}, 201)

    def why(self, task_id):
        self.existing_task(task_id)
        return json_response({"task_id": task_id,
                              "why": explain.why(self.connection(), task_id)})

    def cancel(self, task_id):
        self.require_token()
        self.existing_task(task_id)
        state = tasks.cancel(self.connection(), task_id)
        return json_response({"task_id": task_id, "state": state})

    # -- plain text ----------------------------------------------------------------

    def text_status(self):
        return text_response(render.key_values(cli.status_summary(self.connection()).items()))

    def text_devices(self):
        now = time.time()
        rows = [cli.device_row(device, now) for device in devices.list_devices(self.connection())]
        return separated(rows, cli.DEVICE_COLUMNS)

    def text_tasks(self):
        now = time.time()
        return separated([cli.task_row(task, now) for task in self.listed_tasks()],
                         cli.TASK_COLUMNS)

    # -- pages and errors ------------------------------------------------------------

    def index(self):
        return bottle.static_file("index.html", root=WEB_ROOT)

    def static(self, path):
        return bottle.static_file(path, root=WEB_ROOT)

    def worker_file(self):
        """The worker, for `curl -O http://NAS:5000/worker.py` on a device."""
        return bottle.static_file(os.path.basename(rc_config.WORKER_PATH),
                                  root=os.path.dirname(rc_config.WORKER_PATH),
                                  mimetype="text/x-python", download=True)

    def error(self, error):
        if error.status_code >= 500:
            self.logger.error("request_failed", method=bottle.request.method,
                              path=bottle.request.path, error=repr(error.exception),
                              traceback=error.traceback or traceback.format_exc())
        bottle.response.content_type = "application/json"
        return orjson.dumps({"error": error.body or error.status_line})

    def log_request(self):
        self.logger.debug("request", method=bottle.request.method, path=bottle.request.path,
                          status=bottle.response.status_code)


def query_int(name, default):
    text = bottle.request.query.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "%s must be a whole number, not %r" % (name, text))
    if value < 0:
        raise ApiError(400, "%s must not be negative" % name)
    return value


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
        return tasks.parse_requirements(requirements)
    return requirements


def separated(rows, columns):
    """?format=pipe|csv|tsv, ?header=0 to leave out the header line."""
    query = bottle.request.query
    kind = query.get("format") or "pipe"
    if kind not in TEXT_FORMATS:
        raise ApiError(400, "format must be one of %s" % ", ".join(TEXT_FORMATS))
    header = query.get("header", "1") not in ("0", "false", "no")
    if kind == "csv":
        text = render.csv_text(rows, columns, header)
    else:
        text = render.separated_text(rows, columns, "\t" if kind == "tsv" else "|", header)
    return text_response(text, TEXT_FORMATS[kind])


def make_app(config, logger=None):
    web = Web(config, logger or Logger("rc-web", config.log_level))
    app = bottle.Bottle()
    routes = [
        ("GET", "/health", web.health), ("GET", "/api/v1/health", web.health),
        ("GET", "/api/v1/status", web.status),
        ("GET", "/api/v1/devices", web.devices),
        ("GET", "/api/v1/devices/<device_id>", web.device),
        ("GET", "/api/v1/tasks", web.tasks),
        ("GET", "/api/v1/tasks/<task_id:int>", web.task),
        ("POST", "/api/v1/tasks", web.submit),
        ("POST", "/api/v1/tasks/<task_id:int>/cancel", web.cancel),
        ("GET", "/api/v1/tasks/<task_id:int>/why", web.why),
        ("GET", "/text/status", web.text_status),
        ("GET", "/text/devices", web.text_devices),
        ("GET", "/text/tasks", web.text_tasks),
        ("GET", "/", web.index), ("GET", "/static/<path:path>", web.static),
        ("GET", "/worker.py", web.worker_file),
    ]
    for method, path, handler in routes:
        app.route(path, method, answers(handler))
    app.default_error_handler = web.error
    app.add_hook("after_request", web.log_request)
    return app


def main():
    logger = Logger("rc-web")
    try:
        config = rc_config.load()
        logger = Logger("rc-web", config.log_level)
    except (rc_config.ConfigError, ValueError) as e:
        logger.error("config_error", error=str(e))
        return 1
    server = waitress.create_server(make_app(config, logger), host=config.web_host,
                                    port=config.web_port, threads=SERVER_THREADS,
                                    ident="rc-web", max_request_body_size=SERVER_BODY_LIMIT)
    logger.info("web_started", host=config.web_host, port=int(server.effective_port))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
