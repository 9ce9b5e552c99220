"""rc-web and the CLI against the worst numbers and stored reports: every
integer from a request is bounded before SQLite sees it (400 or 404, never
500), a device row full of junk still renders in every view, the audit log
and the streams need the admin token without it ever being in a URL."""
import io
import json
import os

import pytest

from rc import bounded, commands, db, devices, state_dir, throttle, web, web_server
from test_text_metrics import Stream
from test_web import Client, admin, call, client, serve, stop  # noqa: F401 (fixture)

HUGE = str(2 ** 64 * 10)           # past SQLite's INTEGER, past uint64 too
JUST_PAST = str(2 ** 63)           # one past SQLite's largest INTEGER


# -- the class: one parser for every whole number ------------------------------------

@pytest.mark.parametrize("text", [HUGE, JUST_PAST, "-1", "²", "١٢", "1e3", "0x10", "", " ",
                                  "1" * 40, None])
def test_bounded_whole_refuses_with_the_name(text):
    with pytest.raises(ValueError) as caught:
        bounded.whole(text, "limit")
    assert "limit" in str(caught.value) and len(str(caught.value)) < 200


def test_bounded_whole_takes_the_range():
    assert bounded.whole(str(bounded.LARGEST), "id") == 2 ** 63 - 1
    assert bounded.whole(" 7 ", "id") == 7


def test_json_integers_are_checked_where_they_are():
    bounded.check_json({"depends_on": [1, 2], "payload": {"n": -2 ** 63}})
    with pytest.raises(ValueError, match=r"depends_on\[1\]"):
        bounded.check_json({"depends_on": [1, 2 ** 64 - 1]})
    with pytest.raises(ValueError, match="nested deeper"):
        bounded.check_json(json.loads("[" * 200 + "]" * 200))


# -- every route -----------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/api/v1/tasks/" + HUGE, "/api/v1/tasks/%s/result" % JUST_PAST,
    "/api/v1/tasks/%s/why" % HUGE, "/api/v1/groups/" + HUGE, "/api/v1/controls/" + JUST_PAST,
    "/api/v1/tasks?limit=" + HUGE, "/api/v1/tasks?offset=" + HUGE,
    "/api/v1/tasks?offset=" + JUST_PAST, "/api/v1/tasks?limit=²",
    "/api/v1/stats?minutes=" + HUGE, "/text/tasks?limit=" + HUGE, "/text/logs?lines=" + HUGE,
    "/stream/tasks?since=" + HUGE, "/stream/tasks?since=-5",
])
def test_huge_numbers_in_paths_and_queries_are_400_or_404(cluster_home, path):
    config, connection = cluster_home
    status, _, text = call(web.make_app(config), path)
    assert status in (400, 404), (status, text)
    assert "error" in json.loads(text)


def test_huge_numbers_in_headers_and_bodies_are_400(cluster_home):
    config, connection = cluster_home
    app = web.make_app(config)
    status, _, text = call(app, "/stream/tasks", headers={"Last-Event-ID": HUGE})
    assert status == 400 and "event id" in text
    for field, value in (("depends_on", [2 ** 64 - 1]), ("timeout", 2 ** 63),
                         ("retries", 2 ** 63), ("priority", 2 ** 64 - 1)):
        body = json.dumps({"task_type": "echo", "payload": "x", field: value}).encode()
        status, _, text = call(app, "/api/v1/tasks", "POST", headers=admin(config), body=body)
        assert status == 400 and field in json.loads(text)["error"], (field, text)
    status, _, text = call(app, "/api/v1/tasks/%s/cancel" % HUGE, "POST",
                           headers=admin(config))
    assert status == 404
    status, _, text = call(app, "/api/v1/command", "POST", body=json.dumps(
        {"command": "tasks", "width": 2 ** 64 - 1}).encode())
    assert status == 400 and "width" in text


SHAPES = [2 ** 63 - 1, -2 ** 63, 1e308, 1.5, True, None, "x", [], {}, [1.5], [True], ["1"],
          {"a": 1}, -1, 0]


def test_any_shape_of_any_submit_field_is_never_a_500(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    app = web.make_app(config)

    def status(path, body):
        return call(app, path, "POST", headers=admin(config), body=json.dumps(body).encode())[0]
    failures = []
    for field in ("timeout", "retries", "depends_on", "priority", "payload", "requirements",
                  "idempotency_key", "retry_on_failure", "task_type"):
        for value in SHAPES:
            for path in ("/api/v1/tasks", "/api/v1/groups"):
                body = {"task_type": "echo", "payload": "x", field: value}
                if status(path, body) >= 500:
                    failures.append((path, field, value))
    huge = "cores=" + HUGE
    for path, body in (("/api/v1/broadcast", {"command": "reload", "targets": [huge]}),
                       ("/api/v1/tasks", {"task_type": "echo", "payload": "x",
                                          "requirements": [huge]}),
                       ("/api/v1/command", {"command": "submit echo x --require " + huge}),
                       ("/api/v1/command", {"command": "submit echo x --timeout nan"})):
        if status(path, body) >= 500:
            failures.append((path, body))
    assert not failures


HOSTILE_HEADERS = [{"Origin": "http://["}, {"Origin": "http://[::1"}, {"Host": "["},
                   {"Host": "a:b:c"}, {"Authorization": "Bearer \xe9"}, {"Authorization": "\xe9"},
                   {"Cookie": "rc_stream=" + "9" * 40 + ".x"}, {"Cookie": "rc_stream=1.\xe9"},
                   {"Cookie": "=;;;"}, {"Last-Event-ID": "\xe9"}, {"Sec-Fetch-Site": "\xe9"}]


@pytest.mark.parametrize("headers", HOSTILE_HEADERS)
def test_hostile_headers_are_refused_not_500s(cluster_home, headers):
    """Header bytes that are not UTF-8 (waitress hands them on as latin-1),
    Origins that are not URLs, cookies of any shape."""
    config, connection = cluster_home
    app = web.make_app(config)
    for path, method in (("/text/status", "GET"), ("/api/v1/tasks", "POST"),
                         ("/stream/tasks?since=x", "GET"), ("/api/v1/stream-session", "POST")):
        for remote in ("127.0.0.1", "10.0.0.5"):
            status, _, text = call(app, path, method, remote=remote, headers=headers,
                                   body=b"{}")
            assert status < 500, (path, remote, text)


@pytest.mark.parametrize("line", ["tasks --limit " + HUGE, "task " + JUST_PAST,
                                  "logs -n " + HUGE, "stats --minutes " + HUGE,
                                  "group " + HUGE, "logs --task " + HUGE, "tasks --limit ²"])
def test_cli_numbers_are_usage_errors(cluster_home, line):
    config, connection = cluster_home
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(line.split(), out, err, config) == 2, err.getvalue()
    assert "the value must be" in err.getvalue()


def test_a_failing_handler_is_one_500_and_one_log_line(cluster_home, monkeypatch):
    config, connection = cluster_home
    logged = io.BytesIO()
    app = web.make_app(config, web.Logger("rc-web", "info", logged))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(web.stats, "history", broken)
    server, thread = serve(config, app)
    try:
        client = Client(server.effective_port, "")
        for _ in range(5):
            status, body = client.json("/api/v1/stats")
            assert status == 500 and body == {"error": "Internal Server Error"}
        assert client.json("/api/v1/status")[0] == 200
    finally:
        stop(server, thread)
    lines = [json.loads(line) for line in logged.getvalue().splitlines()]
    failures = [line for line in lines if line["event"] == "request_failed"]
    assert len(failures) == 1 and "boom" in failures[0]["error"]


# -- junk in stored device reports -----------------------------------------------------

JUNK_METRICS = [
    '"a string"', "[1, 2, 3]", "42", "null", "not json at all", "NaN",
    '{"system_metrics": "x"}', '{"system_metrics": [1]}',
    '{"cpu_percent": "high", "memory_percent": 1e308, "battery_percent": -5,'
    ' "battery": {"percent": "full"}, "load_avg": "x", "temperature_c": [1],'
    ' "uptime_s": 18446744073709551615, "junk": %s}' % ("[" * 300 + "]" * 300),
    '{"cpu_percent": 1e999}', '{"cpu_percent": 50, "battery": "lots"}',
]


def junk_device(connection, device_id, metrics, **columns):
    """A row as an old database may hold it, written directly."""
    with db.write(connection):
        devices.register(connection, device_id, {"device_info": {"hostname": device_id}},
                         "127.0.0.1:1", 1.0)
        connection.execute("UPDATE devices SET metrics = ? WHERE device_id = ?",
                           (metrics, device_id))
        for name, value in columns.items():
            connection.execute("UPDATE devices SET %s = ? WHERE device_id = ?" % name,
                               (value, device_id))


@pytest.fixture
def junk_devices(cluster_home):
    config, connection = cluster_home
    for number, metrics in enumerate(JUNK_METRICS):
        junk_device(connection, "junk%02d" % number, metrics)
    junk_device(connection, "columns", '{"cpu_percent": 12.5}', cpu_cores="many",
                memory_gb="lots", slots="x", last_seen="yesterday", hostname=7,
                profile='{"device_info": ' + "[" * 300 + "]" * 300 + "}",
                tags='"not a list"', labels="[1]")
    return config, connection


def test_junk_reports_make_records_of_the_expected_shape(junk_devices):
    config, connection = junk_devices
    listed = {d["device_id"]: d for d in devices.list_devices(connection)}
    assert len(listed) == len(JUNK_METRICS) + 1
    for device in listed.values():
        assert isinstance(device["metrics"], dict)
        for name in devices.PERCENT_METRICS:
            value = device["metrics"].get(name)
            assert value is None or 0 <= value <= 100
        assert isinstance(device["slots"], int) and device["slots"] >= 1
        assert isinstance(device["last_seen"], float)
    assert listed["columns"]["metrics"] == {"cpu_percent": 12.5}
    assert listed["columns"]["cpu_cores"] is None and listed["columns"]["memory_gb"] is None
    assert listed["columns"]["tags"] == [] and listed["columns"]["labels"] == {}
    assert listed["junk08"]["metrics"].get("cpu_percent") is None    # "high": absent
    assert listed["junk08"]["metrics"]["battery"] == {}
    assert listed["junk10"]["metrics"] == {"cpu_percent": 50}


def test_every_view_shows_junk_devices(junk_devices, client):
    config, connection = junk_devices
    for path in ("/text/devices", "/text/devices?format=csv", "/text/metrics",
                 "/api/v1/devices", "/api/v1/devices/junk08", "/api/v1/status",
                 "/text/status"):
        status, _, text = client.request(path)
        assert status == 200, (path, text)
    status, _, text = client.request("/text/devices")
    row = next(line for line in text.splitlines() if line.startswith("junk08|"))
    assert row.split("|")[10] == ""          # cpu_percent "high" shows as absent
    status, _, text = client.request("/text/metrics")
    assert 'rc_device_cpu_usage_ratio{device="junk10"} 0.5' in text
    assert 'device="junk08"} 1.0' not in text.replace("rc_device_up", "")
    stream = Stream(int(client.base.rsplit(":", 1)[1]), "/stream/devices")
    try:
        seen = {stream.event()["data"]["device_id"] for _ in range(len(JUNK_METRICS) + 1)}
        assert "junk08" in seen and "columns" in seen
    finally:
        stream.connection.close()
    for line in ("devices", "devices --grid", "devices --csv", "devices --json",
                 "device junk08", "device columns", "monitor --once", "status"):
        out, err = io.StringIO(), io.StringIO()
        assert commands.run_command(line.split(), out, err, config, 120) == 0, (line, err.getvalue())
        assert out.getvalue()


# -- the audit log and the token ----------------------------------------------------

def test_the_audit_log_needs_the_token_even_from_this_machine(cluster_home):
    config, connection = cluster_home
    app = web.make_app(config)
    commands.run_command(["status"], io.StringIO(), io.StringIO(), config)     # makes the log dir
    with open(os.path.join(config.log_dir, "audit.log"), "ab") as f:
        f.write(b'{"time": 1.0, "event": "secret_event", "actor": "admin"}\n')
    for path in ("/text/logs?program=audit", "/stream/logs?program=audit"):
        status, _, text = call(app, path)
        assert status == 401 and "secret_event" not in text
    status, _, text = call(app, "/text/logs?program=audit", headers=admin(config))
    assert status == 200 and "secret_event" in text
    status, _, text = call(app, "/api/v1/command", "POST",
                           body=b'{"command": "logs --program audit"}')
    assert status == 401 and "secret_event" not in text


def test_streams_take_a_cookie_never_a_token_in_the_url(cluster_home):
    config, connection = cluster_home
    app = web.make_app(config)
    token = state_dir.read_secret(config.admin_token_path)
    remote = "192.168.1.20"
    assert call(app, "/stream/tasks?token=" + token, remote=remote)[0] == 401
    assert call(app, "/api/v1/stream-session", "POST", remote=remote)[0] == 401
    cookies = set_cookies(app, "POST", admin(config))
    assert [cookie.split("; Path=")[1].split(";")[0] for cookie in cookies] == \
        ["/stream", "/api/v1/tasks"]
    cookie = cookies[0]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/stream"):
        assert attribute in cookie
    assert token not in cookie and "Secure" not in cookie       # plain HTTP here
    value = cookie.split(";")[0]
    # Past the access check, a bad ?since= is the next refusal (and a good
    # one would be a stream that never ends).
    status, _, text = call(app, "/stream/tasks?since=x", remote=remote,
                           headers={"Cookie": value})
    assert status == 400 and "event id" in text
    forged = value[:-4] + "0000"
    assert call(app, "/stream/tasks?since=x", remote=remote,
                headers={"Cookie": forged})[0] == 401
    # The cookie is for streams only, and another site's page cannot get one.
    assert call(app, "/text/status", remote=remote, headers={"Cookie": value})[0] == 401
    status, _, _ = call(app, "/api/v1/stream-session", "POST", remote=remote,
                        headers=dict(admin(config), Origin="http://evil.example"))
    assert status == 403


def set_cookies(app, method, headers):
    """Every Set-Cookie of a call of /api/v1/stream-session (call() keeps one)."""
    answer = []
    environ = {"REQUEST_METHOD": method, "PATH_INFO": "/api/v1/stream-session",
               "QUERY_STRING": "", "REMOTE_ADDR": "192.168.1.20", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "5000", "HTTP_HOST": "127.0.0.1:5000", "wsgi.input": io.BytesIO(),
               "CONTENT_LENGTH": "0", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
    environ.update(("HTTP_" + k.upper().replace("-", "_"), v) for k, v in headers.items())
    b"".join(app(environ, lambda status, response_headers, exc_info=None: answer.extend(
        value for name, value in response_headers if name == "Set-Cookie")))
    return answer


def test_the_stream_cookie_lets_a_link_save_a_tasks_file_and_read_nothing_else(cluster_home):
    """A dashboard that keeps the token saved a task's file by fetching it
    whole into the page (a link cannot send a header): a file of gigabytes
    would not fit a phone's tab. The cookie now opens GET of a task's file
    too, so the link saves it as it comes; every other read still needs
    the header."""
    config, connection = cluster_home
    app = web.make_app(config)
    remote = "192.168.1.20"
    value = set_cookies(app, "POST", admin(config))[1].split(";")[0]
    file_path = "/api/v1/tasks/999999/files/out.txt"
    assert call(app, file_path, remote=remote)[0] == 401
    status, _, text = call(app, file_path, remote=remote, headers={"Cookie": value})
    assert status == 404, text                       # past the access check: no such task
    for path in ("/api/v1/tasks/999999/files", "/api/v1/tasks", "/api/v1/tasks/999999",
                 "/api/v1/files/" + "0" * 64, "/text/status"):
        assert call(app, path, remote=remote, headers={"Cookie": value})[0] == 401, path
    assert call(app, file_path, "DELETE", remote=remote, headers={"Cookie": value})[0] in (401, 405)
    cleared = set_cookies(app, "DELETE", {})
    assert len(cleared) == 2 and all("Max-Age=0" in cookie for cookie in cleared)


def test_the_dashboard_puts_no_token_in_a_url():
    """Every URL terminal.js requests is a fixed path: the token only ever
    goes into an Authorization header."""
    with open(os.path.join(web.WEB_ROOT, "terminal.js")) as f:
        script = f.read()
    assert "token=" not in script and "?token" not in script
    assert "new EventSource(path)" in script
    # test_hostile_web.py watches a real browser's requests for the same.


# -- connections: whose they are, and logging them ------------------------------------

def test_one_ipv6_client_is_its_whole_64():
    key = web_server.address_key
    assert key("2001:db8::1") == key("2001:db8::ffff:1234") == "2001:db8::/64"
    assert key("2001:db8:0:1::1") != key("2001:db8::1")
    assert key("::ffff:192.168.1.20") == key("192.168.1.20") == "192.168.1.20"
    assert key("not an address") == "not an address"


def test_the_rate_limited_log_counts_what_it_left_out():
    logged = io.BytesIO()
    clock = [0.0]
    log = throttle.LimitedLog(web.Logger("rc-web", "info", logged), per_minute=1)
    log.throttle.clock = lambda: clock[0]
    for _ in range(5):
        log("warning", "web_connection_refused", "10.0.0.9", address="10.0.0.9")
    log("warning", "web_connection_refused", "10.0.0.8", address="10.0.0.8")
    lines = [json.loads(line) for line in logged.getvalue().splitlines()]
    assert [line["address"] for line in lines] == ["10.0.0.9", "10.0.0.8"]
    clock[0] += 60                                   # a minute has passed
    log("warning", "web_connection_refused", "10.0.0.9", address="10.0.0.9")
    assert json.loads(logged.getvalue().splitlines()[-1])["suppressed"] == 4


def test_the_rate_limited_log_forgets_quiet_keys_at_its_cap(monkeypatch):
    monkeypatch.setattr(throttle, "MAX_KEYS", 100)
    log = throttle.LimitedLog(web.Logger("rc-web", "info", io.BytesIO()), per_minute=1)
    for n in range(1000):          # an attacker cycling through addresses
        log("warning", "web_connection_refused", "10.0.%d.%d" % (n // 256, n % 256))
    assert len(log.throttle.keys) <= 100
