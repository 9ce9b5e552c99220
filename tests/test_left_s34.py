"""Four faults earlier sessions noticed and left alone (session 12, left34):
`rc tasks --device` read back through every task; the dashboard showed the
bidi controls and invisible characters of a device's hostname and labels;
a `?group=new` batch that never committed left its group behind; rc.client
waited for ever on an rc-web that trickled its answer. Each test fails
without its fix."""
import io
import json
import os
import re
import socket
import threading
import time

import pytest

from rc import client, db, render, state_dir, tasks, web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- rc tasks --device: the device's tasks through an index --------------------------

def plans_of(connection, work):
    """The query plans (their detail lines) of the SELECTs on tasks `work` runs."""
    statements = []
    connection.set_trace_callback(statements.append)
    try:
        work()
    finally:
        connection.set_trace_callback(None)
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT") and " FROM tasks " in sql + " ":
            plans.append(" ".join(row[3] for row in connection.execute(
                "EXPLAIN QUERY PLAN " + sql)))
    return plans


@pytest.mark.parametrize("state", [None, "completed", "failed"])
def test_a_devices_tasks_are_read_through_an_index(cluster_home, state):
    """Without the index the page walked back from the newest task until it
    had found enough of the device's: 20-60 ms at 500,000 tasks, all of
    them for a device that had run none (SCAN tasks)."""
    config, connection = cluster_home
    with db.write(connection):
        connection.executemany("INSERT INTO devices(device_id, registered_at, last_seen)"
                               " VALUES (?, 0, 0)",
                               [("pi-%d" % n,) for n in range(50)])
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, state, device_id,"
            " created_at, finished_at) VALUES ('echo', '{}', 60, 0, ?, ?, ?, ?)",
            [("completed" if n % 3 else "failed", "pi-%d" % (n % 50), n, n + 1)
             for n in range(5000)])
    found = []
    plans = plans_of(connection, lambda: found.extend(
        tasks.list_tasks(connection, state, "pi-7", limit=20)))
    assert plans and all("tasks_by_device" in plan and "SCAN" not in plan for plan in plans), plans
    assert len(found) == 20 and {task["device_id"] for task in found} == {"pi-7"}
    assert [task["task_id"] for task in found] == sorted(
        (task["task_id"] for task in found), reverse=True)       # newest first still
    if state is not None:
        assert {task["state"] for task in found} == {state}
    assert tasks.list_tasks(connection, state, "no-such-device") == []


# -- a ?group=new batch that never committed leaves no group ----------------------------

class Killed(BaseException):
    """rc-web stopped (kill -9, a restart) in the middle of a request."""


def call(app, path, body, headers):
    """POST `path` through the app, as waitress would call it: (status, answer)."""
    data = json.dumps(body).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path.split("?")[0],
               "QUERY_STRING": path.partition("?")[2], "REMOTE_ADDR": "127.0.0.1",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "HTTP_HOST": "127.0.0.1:5000",
               "CONTENT_TYPE": "application/json", "wsgi.input": io.BytesIO(data),
               "CONTENT_LENGTH": str(len(data)), "wsgi.url_scheme": "http",
               "wsgi.errors": io.StringIO(), "SERVER_PROTOCOL": "HTTP/1.1"}
    environ.update(("HTTP_" + k.upper().replace("-", "_"), v) for k, v in headers.items())
    statuses = []
    answer = b"".join(app(environ, lambda status, *_: statuses.append(status)))
    return int(statuses[0].split()[0]), json.loads(answer)


@pytest.fixture
def submitting(cluster_home):
    """(post(path, body, key), connection) through rc-web's app, in this process."""
    config, connection = cluster_home
    app = web.make_app(config)
    token = state_dir.read_secret(config.admin_token_path)

    def post(path, body, key=None):
        headers = {"Authorization": "Bearer " + token}
        if key is not None:
            headers["Idempotency-Key"] = key
        return call(app, path, body, headers)
    yield post, connection
    app.config["rc.web"].closing.set()


def groups(connection):
    return connection.execute("SELECT count(*) FROM task_groups").fetchone()[0]


def shell(command):
    return {"task_type": "shell", "payload": {"command": command}}


def test_a_batch_rc_web_never_committed_leaves_no_group_and_is_sent_again(submitting,
                                                                          monkeypatch):
    """rc-web stopped after it made the batch's group and before the tasks
    were committed: the group stayed, empty, in `rc groups` and the
    dashboard until the upkeep pruned it, and the client's second sending
    (the same Idempotency-Key) made another."""
    post, connection = submitting
    insert_once = tasks.insert_once

    def dies_on_the_second(connection, task, key, group_id):
        if task["payload"]["command"] == "echo two":
            raise Killed()
        return insert_once(connection, task, key, group_id)
    monkeypatch.setattr(tasks, "insert_once", dies_on_the_second)
    batch = [shell("echo one"), shell("echo two")]
    with pytest.raises(Killed):
        post("/api/v1/tasks?group=new", batch, key="k-lost")
    assert groups(connection) == 0
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    monkeypatch.setattr(tasks, "insert_once", insert_once)
    status, answer = post("/api/v1/tasks?group=new", batch, key="k-lost")
    assert status == 201 and groups(connection) == 1
    assert [row[0] for row in connection.execute(
        "SELECT task_id FROM tasks WHERE group_id = ? ORDER BY task_id",
        (answer["group_id"],))] == [task["task_id"] for task in answer["tasks"]]
    assert post("/api/v1/tasks?group=new", batch, key="k-lost") == (201, answer)
    assert groups(connection) == 1


@pytest.mark.parametrize("batch, error", [
    ([shell("echo fine"), {"task_type": "shell", "payload": {"command": "x"},
                           "depends_on": [999999]}], "task 2 of 2"),
    ([shell("echo fine"), {"task_type": "shell", "payload": {"command": "x"},
                           "timeout": -5}], "task 2 of 2")])
def test_a_refused_batch_leaves_no_group(submitting, batch, error):
    post, connection = submitting
    status, answer = post("/api/v1/tasks?group=new", batch, key="k-refused")
    assert status in (400, 404, 422) and error in answer["error"], answer
    assert groups(connection) == 0
    status, answer = post("/api/v1/tasks?group=new", batch[:1], key="k-fine")
    assert status == 201 and groups(connection) == 1


# -- the dashboard shows a device's bidi controls and invisible characters as "?" ------

def hidden_in_the_dashboard():
    with open(os.path.join(ROOT, "share", "web", "dashboard.js"), encoding="utf-8") as f:
        source = re.search(r"^const HIDDEN_CHARACTERS = /(\[.*\])/g;$", f.read(), re.M).group(1)
    return re.compile(source)       # \xNN and \uNNNN mean the same in both


def test_the_dashboard_hides_the_characters_rcs_tables_hide():
    every = "".join(map(chr, range(0x110000)))
    assert set(hidden_in_the_dashboard().findall(every)) == set(render.CONTROL.findall(every))


HOSTNAME = "\u202egood\u200b-host"
LABELS = {"room": "\u2067attic\u2069", "owner": "\u0627\u0644\u0639\u0631\u0628\u064a\u0629"}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A main node (no worker) that knows a device whose hostname and labels
    hold bidi controls and zero-width characters, and a Chromium."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, MainNode
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium (.ci/run installs it with apt-get)")
    node = MainNode(tmp_path_factory.mktemp("left34"))
    try:
        node.start()
        with db.write(node.db):
            node.db.execute(
                "INSERT INTO devices(device_id, hostname, platform, labels, tags, registered_at,"
                " last_seen) VALUES ('odd-pi', ?, 'linux', ?, ?, 0, 0)",
                (HOSTNAME, json.dumps(LABELS), json.dumps(["fast\u200ftag"])))
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield node, browser
            browser.close()
    finally:
        node.stop()


def test_a_devices_hostname_and_labels_show_their_hidden_characters_as_marks(dashboard):
    """A device named "\\u202egood" read "doog" in its view, as it had in
    `rc devices` before render.cell; the Arabic letters stay as they are."""
    node, browser = dashboard
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    try:
        page = context.new_page()
        page.goto(node.base + "/#/device/odd-pi")
        page.wait_for_selector(".key-values dt", timeout=30000)
        details = dict(zip(page.locator(".key-values dt").all_text_contents(),
                           page.locator(".key-values dd").all_text_contents()))
        assert details["hostname"] == "?good?-host"
        assert details["labels"] == "room=?attic?, owner=\u0627\u0644\u0639\u0631\u0628\u064a\u0629"
        assert details["tags"] == "fast?tag"
        view = page.locator("#view-object").inner_text()
        assert not render.CONTROL.search(view.replace("\n", ""))
    finally:
        context.close()


# -- rc.client: a whole-request deadline, a minimum rate for what moves ----------------

class Trickler:
    """An HTTP server on 127.0.0.1 that answers a request with `answer`:
    its first `at_once` bytes at once, then `piece` bytes every `every` s."""

    def __init__(self, answer, at_once, piece, every):
        self.answer, self.at_once, self.piece, self.every = answer, at_once, piece, every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        connection, _ = self.listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            try:
                connection.sendall(self.answer[:self.at_once])
                for start in range(self.at_once, len(self.answer), self.piece):
                    if self.stopped.wait(self.every):
                        return
                    connection.sendall(self.answer[start:start + self.piece])
            except OSError:
                return          # the client gave up

    def close(self):
        self.stopped.set()
        self.listener.close()


def timed_request(url, timeout, hold=20):
    """(seconds, the answer or the error) of a GET with `timeout`, from
    another thread: one held past `hold` fails the test, not hangs it."""
    outcome = []

    def run():
        began = time.monotonic()
        try:
            answer = client.Http(url, None).request("GET", "/api/v1/tasks/1/result",
                                                    timeout=timeout)
        except Exception as e:
            answer = e
        outcome.append((time.monotonic() - began, answer))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(hold)
    assert outcome, "the request was still held after %d s (its timeout: %g s)" % (hold, timeout)
    return outcome[0]


def answer_of(body):
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" \
        % (len(body), body)


@pytest.mark.parametrize("trickled", ["head", "body"])
def test_an_answer_trickled_a_byte_at_a_time_ends_at_its_deadline(trickled):
    """One byte each 0.3 s, inside the socket's timeout of 1 s each time:
    the request waited for as long as rc-web (or a proxy) went on."""
    answer = answer_of(b'{"state": "completed"}' + b" " * 100000)
    server = Trickler(answer, 0 if trickled == "head" else answer.index(b"{") + 1, 1, 0.3)
    try:
        seconds, error = timed_request(server.url, 1.0)
    finally:
        server.close()
    assert isinstance(error, client.TooSlow) and "MIN_TRANSFER_RATE" in str(error), error
    assert "GET /api/v1/tasks/1/result: http://127.0.0.1:" in str(error)
    assert 1.0 <= seconds < 6, seconds


def test_an_answer_that_moves_goes_on_past_its_timeout():
    """A download (or a long answer on a slow link) that keeps moving at
    more than MIN_TRANSFER_RATE is not cut at the request's timeout."""
    body = b'{"state": "completed", "pad": "' + b"x" * 200000 + b'"}'
    server = Trickler(answer_of(body), 0, 16384, 0.15)     # ~110 KB/s, for ~2 s
    try:
        seconds, answer = timed_request(server.url, 1.0)
    finally:
        server.close()
    assert answer == (200, body) and seconds > 1.0, (seconds, answer)


def test_a_result_streams_head_trickled_ends_at_its_deadline():
    """The receiver thread opening a result stream was held the same way."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: %s\r\n\r\n" % (b"p" * 200)
    server = Trickler(answer, 0, 1, 0.3)
    try:
        began = time.monotonic()
        with pytest.raises(client.ClusterError):
            client.Http(server.url, None).stream("/api/v1/groups/1/results?stream=1", 1.0)
        assert time.monotonic() - began < 6
    finally:
        server.close()
