"""rc-web over real HTTP: the app under waitress on 127.0.0.1, port 0."""
import io
import json
import threading
import urllib.error
import urllib.request

import pytest

from rc import cli, state_dir, tasks, web
from rc import config as config_module
from rc.states import CANCELLED


class Client:
    def __init__(self, port, token):
        self.base, self.token = "http://127.0.0.1:%d" % int(port), token

    def request(self, path, body=None, token=None, data=None, method=None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        if body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    def json(self, path, **kwargs):
        status, headers, text = self.request(path, **kwargs)
        assert headers["Content-Type"].startswith("application/json"), text
        return status, json.loads(text)

    def submit(self, body, token=True):
        return self.json("/api/v1/tasks", body=body, token=self.token if token is True else token)


def serve(config, app=None):
    app = app or web.make_app(config)
    server = web.create_server(app, "127.0.0.1", 0, config)
    server.rc_web = app.config["rc.web"]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    """End the loop before closing its sockets (closing them under a running
    select() is EBADF), then let open streams end."""
    server.rc_web.closing.set()
    channels = dict(server._map)
    server._map.clear()
    server.trigger.pull_trigger()
    thread.join(5)
    for channel in channels.values():
        channel.close()
    server.task_dispatcher.shutdown(timeout=5)


@pytest.fixture
def client(cluster_home):
    config, _ = cluster_home
    config.health_supervisor = False     # no supervisord here; tests/test_health.py has one
    server, thread = serve(config)
    yield Client(server.effective_port, state_dir.read_secret(config.admin_token_path))
    stop(server, thread)


def test_health_says_what_rc_health_says(client, add_device):
    status, body = client.json("/health")
    assert (status, body["status"], body["code"]) == (200, "warning", 1)
    assert body["line"].startswith("RC WARNING - devices 0/0 online")
    checks = {check["check"]: check["status"] for check in body["checks"]}
    assert checks == {"database": "ok", "integrity": "ok", "queue": "ok", "devices": "warning",
                      "disk": "ok", "wal": "ok"}
    add_device("pi", metrics={"cpu_percent": 5}, now=__import__("time").time())
    status, body = client.json("/api/v1/health")
    assert (status, body["status"]) == (200, "ok") and "devices 1/1 online" in body["line"]


def test_health_without_a_database_is_503(tmp_path, monkeypatch):
    monkeypatch.setenv("RC_HOME", str(tmp_path / "nothing"))
    server, thread = serve(config_module.load())
    try:
        status, body = Client(server.effective_port, "").json("/health")
        assert status == 503 and body["status"] == "critical"
        assert "make install" in body["line"]
    finally:
        stop(server, thread)


def test_submit_needs_the_web_token(client, cluster_home):
    config, connection = cluster_home
    body = {"task_type": "echo", "payload": {"message": "hi"}}
    for token in (None, "wrong", client.token + "x"):
        status, answer = client.submit(body, token=token)
        assert status == 401 and "token" in answer["error"]
    assert tasks.list_tasks(connection) == []
    status, answer = client.submit(dict(body, priority="urgent", requirements=["cores=2"]))
    assert status == 201 and answer["state"] == "queued"
    task = tasks.get(connection, answer["task_id"])
    assert task["payload"] == {"message": "hi"} and task["priority"] == "urgent"
    assert task["requirements"] == {"min_cpu_cores": 2}
    status, shown = client.json(answer["url"])
    assert status == 200 and shown["task_id"] == answer["task_id"]


def test_submit_takes_the_argument_as_payload(client, cluster_home):
    config, connection = cluster_home
    status, answer = client.submit({"task_type": "sleep", "payload": "2"})
    assert status == 201
    assert tasks.get(connection, answer["task_id"])["payload"] == {"seconds": 2.0}


@pytest.mark.parametrize("body, message", [
    ({"task_type": "echo", "payload": {"message": "x"}, "requirements": {"colour": "red"}},
     "unknown requirement"),
    ({"task_type": "echo", "payload": "x", "requirements": ["cores"]}, "KEY=VALUE"),
    ({"task_type": "launch", "payload": {}}, "unknown task type"),
    ({"task_type": "echo", "payload": {"message": "x"}, "colour": 1}, "unknown field"),
    ({"task_type": "echo", "payload": {"message": "x"}, "timeout": 0}, "timeout"),
])
def test_bad_submits_are_400_with_the_reason(client, cluster_home, body, message):
    config, connection = cluster_home
    status, answer = client.submit(body)
    assert status == 400 and message in answer["error"]
    assert tasks.list_tasks(connection) == []


def test_a_body_that_is_not_json_or_too_large(client):
    status, headers, text = client.request("/api/v1/tasks", data=b"{nope", token=client.token)
    assert status == 400 and "not JSON" in json.loads(text)["error"]
    big = {"task_type": "echo", "payload": {"message": "x" * (web.MAX_BODY_BYTES + 1)}}
    status, answer = client.submit(big)
    assert status == 413


def test_cancel(client, cluster_home):
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "sleep", {"seconds": 5})
    path = "/api/v1/tasks/%d/cancel" % task_id
    assert client.json(path, data=b"", method="POST")[0] == 401
    assert client.json(path, data=b"", token=client.token) == (
        200, {"task_id": task_id, "state": CANCELLED})
    assert client.json("/api/v1/tasks/999/cancel", data=b"", token=client.token)[0] == 404


def test_reading_devices_and_tasks(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 7.0})
    for n in range(3):
        tasks.submit(connection, config, "echo", {"message": str(n)})
    status, body = client.json("/api/v1/devices")
    assert [d["device_id"] for d in body["devices"]] == ["pi"]
    assert client.json("/api/v1/devices/pi")[1]["metrics"] == {"cpu_percent": 7.0}
    assert client.json("/api/v1/devices/ghost") == (404, {"error": "no device 'ghost'"})
    status, body = client.json("/api/v1/tasks?limit=2&offset=1&state=queued")
    assert [t["task_id"] for t in body["tasks"]] == [2, 1]
    assert client.json("/api/v1/tasks?limit=lots")[0] == 400
    assert client.json("/api/v1/tasks?state=lost")[0] == 400
    assert client.json("/api/v1/tasks/42")[0] == 404
    assert client.json("/api/v1/status")[1]["queue_length"] == 3


def test_text_endpoints(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    add_device("laptop")
    tasks.submit(connection, config, "shell", {"command": "uptime | cut -d, -f1"})
    status, headers, text = client.request("/text/devices")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    lines = text.splitlines()
    assert lines[0] == "|".join(web.TEXT_DEVICE_COLUMNS)
    assert [line.split("|")[:2] for line in lines[1:]] == [["laptop", "online"],
                                                           ["pi", "online"]]
    assert client.request("/text/devices?header=0")[2].splitlines() == lines[1:]
    csv_text = client.request("/text/devices?format=csv&header=0")[2]
    assert csv_text.startswith("laptop,online,1,compute,linux,")
    assert client.request("/text/devices?format=tsv")[2].split("\n")[0].split("\t")[0] \
        == "device"
    assert client.request("/text/devices?format=xml")[0] == 400
    task_line = client.request("/text/tasks?header=0")[2]
    assert task_line.split("|")[:3] == ["1", "shell", "queued"]
    assert task_line.strip().endswith("uptime   cut -d, -f1")   # its "|" became a space
    status_lines = client.request("/text/status")[2].splitlines()
    assert "devices_online: 2" in status_lines and "queue_length: 1" in status_lines


def test_the_page_and_unknown_paths(client):
    status, headers, text = client.request("/")
    assert status == 200 and "<html" in text and "/static/vendor/xterm.js" in text
    assert "//" not in text.split("<script")[1]                        # no CDN
    for path in ("/static/vendor/xterm.js", "/static/vendor/addon-fit.js",
                 "/static/vendor/xterm.css", "/static/terminal.js"):
        assert client.request(path)[0] == 200
    status, body = client.json("/api/v1/nothing")
    assert status == 404 and "error" in body
    assert client.json("/api/v1/status", data=b"{}", method="POST")[0] == 405


def test_the_worker_can_be_downloaded_from_the_dashboard(client):
    status, headers, text = client.request("/worker.py")
    with open(config_module.WORKER_PATH) as f:
        assert status == 200 and text == f.read()


def test_why_and_dependencies_over_the_api(client):
    status, first = client.submit({"task_type": "echo", "payload": "a"})
    status, second = client.submit({"task_type": "echo", "payload": "b",
                                    "depends_on": [first["task_id"]]})
    assert status == 201
    status, body = client.json("/api/v1/tasks/%d/why" % second["task_id"])
    assert status == 200 and "waits for task %d" % first["task_id"] in body["why"]
    status, body = client.submit({"task_type": "echo", "payload": "c", "depends_on": [999]})
    assert status == 400 and "no task 999" in body["error"]


# -- access: admin token, read access, Host, cross-site ------------------------------

def call(app, path, method="GET", remote="127.0.0.1", headers=None, body=b""):
    """The app called as waitress would, from any address."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path.split("?")[0],
               "QUERY_STRING": path.partition("?")[2], "REMOTE_ADDR": remote,
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "HTTP_HOST": "127.0.0.1:5000",
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
    environ.update(("HTTP_" + k.upper().replace("-", "_"), v) for k, v in (headers or {}).items())
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"] = int(status.split()[0])
        answer["headers"] = dict(response_headers)
    chunks = app(environ, start_response)
    data = b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    return answer["status"], answer["headers"], data.decode()


def admin(config):
    return {"Authorization": "Bearer " + state_dir.read_secret(config.admin_token_path)}


def test_reading_is_open_from_this_machine_and_needs_the_token_from_elsewhere(cluster_home):
    config, connection = cluster_home
    config.health_supervisor = False
    app = web.make_app(config)
    assert call(app, "/text/status")[0] == 200
    assert call(app, "/api/v1/devices", remote="::1")[0] == 200
    status, headers, text = call(app, "/text/status", remote="192.168.1.20")
    assert status == 401 and "admin token" in json.loads(text)["error"]
    assert call(app, "/text/status", remote="192.168.1.20", headers=admin(config))[0] == 200
    token = admin(config)["Authorization"].split()[1]
    assert call(app, "/stream/tasks?token=wrong", remote="10.0.0.2")[0] == 401
    # Not X-Forwarded-For: anyone can send that.
    assert call(app, "/text/status", remote="192.168.1.20",
                headers={"X-Forwarded-For": "127.0.0.1"})[0] == 401
    assert call(app, "/health", remote="192.168.1.20")[0] == 200
    assert call(app, "/", remote="192.168.1.20")[0] == 200
    config.read_access = "open"
    assert call(web.make_app(config), "/text/status", remote="192.168.1.20")[0] == 200
    config.read_access = "token"
    app = web.make_app(config)
    assert call(app, "/text/status")[0] == 401
    assert call(app, "/text/status?token=" + token)[0] == 200
    config.read_access = "sometimes"
    with pytest.raises(config_module.ConfigError):
        web.make_app(config)


def test_the_join_token_is_not_the_admin_token(cluster_home):
    config, connection = cluster_home
    join = state_dir.read_secret(config.token_path)
    status, _, _ = call(web.make_app(config), "/api/v1/tasks", "POST",
                        headers={"Authorization": "Bearer " + join},
                        body=b'{"task_type": "echo", "payload": "x"}')
    assert status == 401 and tasks.list_tasks(connection) == []


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:5000", 200), ("[::1]:5000", 200), ("localhost:5000", 200),
    ("192.168.1.4", 200), ("evil.example:5000", 403), ("nas.example.org", 200),
])
def test_the_host_header_must_name_this_machine(cluster_home, host, status):
    config, _ = cluster_home
    config.allowed_hosts = ["nas.example.org"]
    answer = call(web.make_app(config), "/api/v1/status", headers={"Host": host})
    assert answer[0] == status
    if status == 403:
        assert "allowed_hosts" in json.loads(answer[2])["error"]


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
])
def test_changes_from_another_site_are_refused_even_with_the_token(cluster_home, headers):
    config, connection = cluster_home
    app = web.make_app(config)
    body = b'{"task_type": "echo", "payload": "x"}'
    status, _, text = call(app, "/api/v1/tasks", "POST", headers=dict(admin(config), **headers),
                           body=body)
    assert status == 403 and tasks.list_tasks(connection) == []
    status, _, _ = call(app, "/api/v1/command", "POST", headers=dict(admin(config), **headers),
                        body=b'{"command": "submit echo x"}')
    assert status == 403 and tasks.list_tasks(connection) == []
    same = dict(admin(config), Origin="http://127.0.0.1:5000", **{"Sec-Fetch-Site": "same-origin"})
    assert call(app, "/api/v1/tasks", "POST", headers=same, body=body)[0] == 201


def test_every_answer_carries_the_security_headers(client):
    status, headers, text = client.request("/")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert client.request("/text/devices")[1]["X-Content-Type-Options"] == "nosniff"


# -- /api/v1/command: the CLI's commands for the web terminal ------------------------

def test_commands_run_the_cli_grammar(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    status, body = client.json("/api/v1/command", body={"command": "devices --csv"})
    assert status == 200 and body["status"] == 0
    assert body["output"].splitlines()[1].startswith("pi,online,")
    status, body = client.json("/api/v1/command", body={"command": "task 99"})
    assert status == 200 and body["status"] == 1 and body["error"] == "rc: error: no task 99\n"
    status, body = client.json("/api/v1/command", body={"command": "--help"})
    assert body["status"] == 0 and "submit" in body["output"]
    status, body = client.json("/api/v1/command",
                               body={"command": "devices", "width": 120, "colour": True})
    assert "\x1b[32monline" in body["output"]
    assert client.json("/api/v1/command", body={"command": "echo 'open"})[0] == 400
    assert client.json("/api/v1/command", body={"command": ""})[0] == 400


def test_commands_that_change_the_cluster_need_the_admin_token(client, cluster_home):
    config, connection = cluster_home
    for line in ("submit echo 'hi there'", "cancel 1", "token", "token --admin", "join"):
        status, body = client.json("/api/v1/command", body={"command": line})
        assert status == 401, line
    assert tasks.list_tasks(connection) == []
    status, body = client.json("/api/v1/command", body={"command": "submit echo 'hi there'"},
                               token=client.token)
    assert status == 200 and body["status"] == 0
    assert tasks.get(connection, int(body["output"]))["payload"] == {"message": "hi there"}


@pytest.mark.parametrize("line, word", [
    ("local-worker", "local-worker"), ("init", "init"), ("wait-ready", "wait-ready"),
    ("logs -f", "logs -f"), ("logs --follow", "logs -f"), ("monitor", "monitor"),
])
def test_commands_that_make_no_sense_on_the_web_are_refused(client, line, word):
    status, body = client.json("/api/v1/command", body={"command": line}, token=client.token)
    assert status == 403 and word in body["error"] and "web terminal" in body["error"]


def test_submit_wait_on_the_web_is_bounded():
    argv = ["submit", "echo", "x", "--wait"]
    assert cli.web_access(argv) == "admin"
    assert argv[-2:] == ["--wait-timeout", str(cli.WEB_WAIT_LIMIT)]
    assert cli.web_access(["monitor", "--once"]) == "read"


def test_completion_lists_commands_options_and_ids(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    tasks.submit(connection, config, "echo", {"message": "x"})
    status, words = client.json("/api/v1/completion")
    assert "--state" in words["commands"]["tasks"] and "local-worker" not in words["commands"]
    assert words["devices"] == ["pi"] and words["tasks"] == [1]
    assert words["values"]["--state"][0] == "queued" and words["positional"]["why"] == "task"


def test_result_of_a_task(client, cluster_home):
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    status, body = client.json("/api/v1/tasks/%d/result" % task_id)
    assert status == 409 and body["state"] == "queued"
    tasks.cancel(connection, task_id)
    status, body = client.json("/api/v1/tasks/%d/result" % task_id)
    assert status == 200 and body["state"] == "cancelled" and body["completed"] is False


def test_device_filters(client, add_device):
    add_device("pi")
    add_device("laptop", metrics={"cpu_percent": 1.0})
    status, body = client.json("/api/v1/devices?status=online&tag=kitchen&arch=aarch64")
    assert [d["device_id"] for d in body["devices"]] == ["laptop", "pi"]
    assert client.json("/api/v1/devices?role=storage")[1]["devices"] == []
    assert client.json("/api/v1/tasks?limit=1")[1]["next_offset"] is None
