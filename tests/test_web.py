"""rc-web over real HTTP: the app under waitress on 127.0.0.1, port 0."""
import io
import json
import threading
import urllib.error
import urllib.request

import pytest

from rc import audit, commands, db, devices, fleet, records, state_dir, tasks, web
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
                      "unfit": "ok", "disk": "ok", "wal": "ok"}
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


def test_a_list_of_tasks_is_queued_all_or_none(client, cluster_home):
    config, connection = cluster_home
    good = {"task_type": "echo", "payload": {"message": "a"}}
    status, answer = client.submit([good, {"task_type": "shell", "payload": "uptime",
                                           "priority": "urgent"}, good])
    assert status == 201 and len(answer["tasks"]) == 3
    ids = [task["task_id"] for task in answer["tasks"]]
    assert [tasks.get(connection, n)["task_type"] for n in ids] == ["echo", "shell", "echo"]
    assert tasks.get(connection, ids[1])["priority"] == "urgent"
    for bad, message in (([good, {"task_type": "echo", "payload": {}}], "task 2 of 2"),
                         ([good, "echo"], "each task must be a JSON object"),
                         ([], "1 to")):
        status, answer = client.submit(bad)
        assert status == 400 and message in answer["error"], answer
    assert len(tasks.list_tasks(connection)) == 3, "a refused batch leaves nothing behind"


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
    assert lines[0] == "|".join(records.DEVICE_COLUMNS)
    assert [line.split("|")[:2] for line in lines[1:]] == [["laptop", "online"],
                                                           ["pi", "online"]]
    # The same rows without the header (the heartbeat age moves on between requests).
    age = records.DEVICE_COLUMNS.index("heartbeat_age_seconds")

    def steady(rows):
        return [row.split("|")[:age] + row.split("|")[age + 1:] for row in rows]
    assert steady(client.request("/text/devices?header=0")[2].splitlines()) \
        == steady(lines[1:])
    csv_text = client.request("/text/devices?format=csv&header=0")[2]
    assert csv_text.startswith("laptop,online,1,compute,linux,")
    assert client.request("/text/devices?format=tsv")[2].split("\n")[0].split("\t")[0] \
        == "device_id"
    assert client.request("/text/devices?format=xml")[0] == 400
    task_line = client.request("/text/tasks?header=0")[2]
    assert task_line.split("|")[:3] == ["1", "shell", "queued"]
    # its "|" became a space
    assert task_line.split("|")[records.TASK_COLUMNS.index("summary")] == "uptime   cut -d, -f1"
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
    # Never in a URL: history, proxy logs and Referer headers would keep it.
    assert call(app, "/text/status?token=" + token)[0] == 401
    assert call(app, "/text/status", headers=admin(config))[0] == 200
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
    for answer in (client.request("/api/v1/tasks", body={"task_type": "echo"}),
                   client.request("/api/v1/tasks", body={"task_type": "echo", "payload": "x"},
                                  token=client.token), client.request("/nowhere")):
        assert {name: answer[1][name] for name in web.SECURITY_HEADERS} \
            == web.SECURITY_HEADERS, answer


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
    assert commands.web_access(argv) == "admin"
    assert argv[-2:] == ["--wait-timeout", str(commands.WEB_WAIT_LIMIT)]
    assert commands.web_access(["monitor", "--once"]) == "read"


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


# -- the fleet over /api/v1 ------------------------------------------------------------

def post(app, path, body, config, headers=None, remote="127.0.0.1"):
    status, _, text = call(app, path, "POST", remote=remote, body=json.dumps(body).encode(),
                           headers=dict(admin(config), **(headers or {})))
    return status, json.loads(text)


@pytest.fixture
def fleet_app(cluster_home, add_device):
    config, connection = cluster_home
    config.health_supervisor = False
    for name in ("a", "b"):
        add_device(name)
    return web.make_app(config)


@pytest.mark.parametrize("path, body", [
    ("/api/v1/devices/a/drain", {}), ("/api/v1/devices/a/resume", {}),
    ("/api/v1/devices/a/forget", {}), ("/api/v1/devices/a/revoke", {}),
    ("/api/v1/devices/a/labels", {"labels": {"k": "v"}}),
    ("/api/v1/devices/a/role", {"role": "x"}),
    ("/api/v1/groups", {"task_type": "echo", "payload": "x"}),
    ("/api/v1/broadcast", {"command": "reload"}),
])
def test_fleet_changes_need_the_token_and_the_same_site(cluster_home, fleet_app, path, body):
    config, connection = cluster_home
    data = json.dumps(body).encode()
    assert call(fleet_app, path, "POST", body=data)[0] == 401
    join = {"Authorization": "Bearer " + state_dir.read_secret(config.token_path)}
    assert call(fleet_app, path, "POST", body=data, headers=join)[0] == 401
    evil = dict(admin(config), Origin="http://evil.example")
    assert call(fleet_app, path, "POST", body=data, headers=evil)[0] == 403
    assert call(fleet_app, path, "POST", body=data,
                headers=dict(admin(config), Host="evil.example"))[0] == 403
    device = devices.get(connection, "a")
    assert not device["drained"] and not device["forgotten"] and device["labels"] == {}
    assert device["role"] == "compute" and tasks.list_tasks(connection) == []
    assert connection.execute("SELECT count(*) FROM controls").fetchone()[0] == 0
    assert connection.execute("SELECT revoked FROM devices WHERE device_id = 'a'"
                              ).fetchone()[0] == 0
    assert audit.read(config) == []


def test_drain_resume_forget_revoke_over_http(cluster_home, fleet_app):
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'assigned', device_id = 'a',"
                           " assigned_at = 1 WHERE task_id = ?", (task_id,))
    status, body = post(fleet_app, "/api/v1/devices/a/drain", {"now": True}, config,
                        remote="192.168.1.5")
    assert (status, body) == (200, {"device_id": "a", "drained": True, "handed_back": 1})
    assert devices.get(connection, "a")["drained"] and tasks.get(connection, task_id)[
        "state"] == "queued"
    assert post(fleet_app, "/api/v1/devices/a/resume", {}, config)[1]["drained"] is False
    assert post(fleet_app, "/api/v1/devices/b/revoke", {}, config)[0] == 200
    assert connection.execute("SELECT revoked FROM devices WHERE device_id = 'b'"
                              ).fetchone()[0] == 1
    listed = json.loads(call(fleet_app, "/api/v1/devices")[2])["devices"]
    assert [(d["device_id"], d["revoked"]) for d in listed] == [("a", False), ("b", True)]
    rows = call(fleet_app, "/text/devices?header=0")[2].splitlines()
    assert [row.split("|")[records.DEVICE_COLUMNS.index("revoked")] for row in rows] == [
        "0", "1"]
    assert post(fleet_app, "/api/v1/devices/a/forget", {}, config)[1]["forgotten"] is True
    assert call(fleet_app, "/api/v1/devices")[2].count('"device_id"') == 1
    assert call(fleet_app, "/api/v1/devices?all=1")[2].count('"device_id"') == 2
    assert post(fleet_app, "/api/v1/devices/a/drain", {}, config)[0] == 404
    lines = audit.read(config)
    assert [line["event"] for line in lines] == ["device_drained", "device_resumed",
                                                 "device_revoked", "device_forgotten"]
    assert lines[0]["actor"] == "admin" and lines[0]["source"] == "192.168.1.5"
    assert lines[0]["now"] is True


def test_labels_and_role_over_http(cluster_home, fleet_app):
    config, connection = cluster_home
    status, body = post(fleet_app, "/api/v1/devices/a/labels",
                        {"labels": {"kind": "pi", "disk": "big"}}, config)
    assert status == 200 and body["labels"] == {"kind": "pi", "disk": "big"}
    body = post(fleet_app, "/api/v1/devices/a/labels", {"labels": {"disk": ""}}, config)[1]
    assert body["labels"] == {"kind": "pi"}
    status, body = post(fleet_app, "/api/v1/devices/a/role", {"role": "storage"}, config)
    assert body == {"device_id": "a", "role": "storage", "reported_role": "compute"}
    assert post(fleet_app, "/api/v1/devices/a/role", {"role": ""}, config)[1]["role"] == "compute"
    text = call(fleet_app, "/text/devices?format=tsv")[2].splitlines()
    assert "\tdrained\tavailable\tlabels\trevoked\t" in text[0]
    assert "\t0\t1\tkind=pi\t0\t" in text[1]
    for path, body in (("labels", {"labels": ["kind=pi"]}), ("labels", {"labels": {"a=b": "c"}}),
                       ("labels", {"labels": {"k": 1}}), ("labels", {"labels": {"": "x"}}),
                       ("role", {"role": 7}), ("role", {"role": "x" * 65}),
                       ("drain", {"now": "yes"})):
        status, answer = post(fleet_app, "/api/v1/devices/a/" + path, body, config)
        assert status == 400 and answer["error"], (path, body)
    assert post(fleet_app, "/api/v1/devices/ghost/labels", {"labels": {"k": "v"}},
                config)[0] == 404
    assert post(fleet_app, "/api/v1/devices/ghost/role", {"role": "x"}, config)[0] == 404


def test_groups_over_http(cluster_home, fleet_app):
    config, connection = cluster_home
    fleet.label(connection, "b", ["kind=pi"])
    status, body = post(fleet_app, "/api/v1/groups",
                        {"task_type": "echo", "payload": "hi", "priority": "high"}, config)
    assert status == 201 and body["tasks"] == 2 and body["url"] == "/api/v1/groups/%d" % body[
        "group_id"]
    status, _, text = call(fleet_app, body["url"])
    group = json.loads(text)
    assert status == 200 and sorted(t["device_id"] for t in group["tasks"]) == ["a", "b"]
    assert group["summary"] == {"tasks": 2, "queued": 2}
    status, body = post(fleet_app, "/api/v1/groups", {"task_type": "echo", "payload": "hi",
                                                      "requirements": ["label.kind=pi"],
                                                      "include_new": True}, config)
    group = json.loads(call(fleet_app, body["url"])[2])
    assert [t["device_id"] for t in group["tasks"]] == ["b"] and group["include_new"] is True
    for bad in ({"task_type": "echo", "payload": "x", "idempotency_key": "k"},
                {"task_type": "nope"}, {"task_type": "echo", "payload": "x",
                                        "include_new": "yes"},
                {"task_type": "python_exec", "payload": "x"}):
        assert post(fleet_app, "/api/v1/groups", bad, config)[0] == 400, bad
    assert call(fleet_app, "/api/v1/groups/99")[0] == 404
    assert [line["event"] for line in audit.read(config)] == ["group_submitted"] * 2


def test_broadcast_and_controls_over_http(cluster_home, fleet_app):
    config, connection = cluster_home
    status, body = post(fleet_app, "/api/v1/broadcast",
                        {"command": "report_profile", "targets": {"role": "compute"}}, config)
    assert status == 201 and body["url"] == "/api/v1/controls/%d" % body["control_id"]
    status, _, text = call(fleet_app, body["url"])
    assert status == 200 and json.loads(text) == {
        "control_id": body["control_id"], "command": "report_profile",
        "targets": {"role": "compute"}, "acks": []}
    assert post(fleet_app, "/api/v1/broadcast", {"command": "explode"}, config)[0] == 400
    assert post(fleet_app, "/api/v1/broadcast", {"command": "reload",
                                                 "targets": ["colour=red"]}, config)[0] == 400
    assert call(fleet_app, "/api/v1/controls/99")[0] == 404
    assert audit.read(config)[0]["event"] == "control_broadcast"


def test_fleet_commands_in_the_web_terminal(cluster_home, fleet_app):
    config, connection = cluster_home
    for line in ("drain a", "label a k=v", "role a x", "forget a", "revoke a",
                 "broadcast reload", "submit --each echo x", "token --rotate"):
        status, _, text = call(fleet_app, "/api/v1/command", "POST",
                               body=json.dumps({"command": line}).encode())
        assert status == 401, line
    assert not devices.get(connection, "a")["drained"]
    assert {line["event"] for line in audit.read(config)} == {"web_command_refused"}
    status, body = post(fleet_app, "/api/v1/command", {"command": "drain a"}, config,
                        remote="10.0.0.9")
    assert status == 200 and body["status"] == 0 and devices.get(connection, "a")["drained"]
    status, body = post(fleet_app, "/api/v1/command", {"command": "drain ghost"}, config)
    assert body["status"] == 1 and body["error"] == "rc: error: no device 'ghost'\n"
    lines = audit.read(config)
    drained = [line for line in lines if line["event"] == "device_drained"]
    assert drained[0]["actor"] == "admin" and drained[0]["source"] == "10.0.0.9"
    commands = [line for line in lines if line["event"] == "web_command"]
    assert [c["argv"] for c in commands] == [["drain", "a"], ["drain", "ghost"]]
    assert [c["status"] for c in commands] == [0, 1]
    status, _, text = call(fleet_app, "/api/v1/completion")
    words = json.loads(text)
    assert {"drain", "resume", "forget", "revoke", "label", "role", "group", "broadcast",
            "control"} <= set(words["commands"])
    assert "--each" in words["commands"]["submit"] and "--rotate" in words["commands"]["token"]


def test_a_client_group_pruned_after_rc_web_saw_it_is_404_not_a_failure(cluster_home):
    """rc-web remembers the client groups it has checked (a session submits
    into its own again and again); one pruned since is still refused whole."""
    config, connection = cluster_home
    app = web.make_app(config)
    body = b'[{"task_type": "echo", "payload": "x"}]'
    status, _, text = call(app, "/api/v1/tasks?group=new", "POST", headers=admin(config), body=body)
    group_id = json.loads(text)["group_id"]
    assert status == 201
    status, _, _ = call(app, "/api/v1/tasks?group=%d" % group_id, "POST",
                        headers=admin(config), body=body)
    assert status == 201
    with db.write(connection):          # as housekeeping prunes an idle session's group
        ids = [row[0] for row in connection.execute(
            "SELECT task_id FROM tasks WHERE group_id = ?", (group_id,))]
        connection.execute("DELETE FROM task_events WHERE task_id IN (%s)"
                           % ",".join("?" * len(ids)), ids)
        connection.execute("DELETE FROM tasks WHERE group_id = ?", (group_id,))
        connection.execute("DELETE FROM task_groups WHERE group_id = ?", (group_id,))
    status, _, text = call(app, "/api/v1/tasks?group=%d" % group_id, "POST",
                           headers=admin(config), body=body)
    assert (status, json.loads(text)) == (404, {"error": "no group %d" % group_id})
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    status, _, _ = call(app, "/api/v1/tasks?group=new", "POST", headers=admin(config), body=body)
    assert status == 201
