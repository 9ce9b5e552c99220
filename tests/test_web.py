"""rc-web over real HTTP: the app under waitress on 127.0.0.1, port 0."""
import json
import threading
import urllib.error
import urllib.request

import pytest
import waitress

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


def serve(config):
    server = waitress.create_server(web.make_app(config), host="127.0.0.1", port=0,
                                    threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def client(cluster_home):
    config, _ = cluster_home
    server, thread = serve(config)
    yield Client(server.effective_port, state_dir.read_secret(config.web_token_path))
    server.close()
    thread.join(5)


def test_health(client):
    assert client.json("/health") == (200, {"status": "ok", "database": "ok"})
    assert client.json("/api/v1/health")[0] == 200


def test_health_without_a_database_is_503(tmp_path, monkeypatch):
    monkeypatch.setenv("RC_HOME", str(tmp_path / "nothing"))
    server, thread = serve(config_module.load())
    try:
        status, body = Client(server.effective_port, "").json("/health")
        assert status == 503 and body["status"] == "error"
        assert "make install" in body["database"]
    finally:
        server.close()
        thread.join(5)


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
    assert lines[0] == "|".join(cli.DEVICE_COLUMNS)
    assert [line.split("|")[:2] for line in lines[1:]] == [["laptop", "online"],
                                                           ["pi", "online"]]
    assert client.request("/text/devices?header=0")[2].splitlines() == lines[1:]
    csv_text = client.request("/text/devices?format=csv&header=0")[2]
    assert csv_text.startswith("laptop,online,compute,linux,")
    assert client.request("/text/devices?format=tsv")[2].split("\n")[0].split("\t")[0] \
        == "DEVICE"
    assert client.request("/text/devices?format=xml")[0] == 400
    task_line = client.request("/text/tasks?header=0")[2]
    assert task_line.split("|")[:3] == ["1", "shell", "queued"]
    assert task_line.strip().endswith("uptime   cut -d, -f1")   # its "|" became a space
    status_lines = client.request("/text/status")[2].splitlines()
    assert "devices_online: 2" in status_lines and "queue_length: 1" in status_lines


def test_the_page_and_unknown_paths(client):
    status, headers, text = client.request("/")
    assert status == 200 and "<html" in text and "/api/v1/status" in text
    assert "http" not in text.split("<script>")[1].split("fetch")[0]   # no CDN
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
