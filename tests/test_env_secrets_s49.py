"""A task's --env values are the admin token's (session 49).

docs/security.md said "Give secrets with --env", yet anyone who may read the
cluster without the admin token (everyone on the LAN with read_access
`open`; any process of the main node's user with `local`) read every task's
--env values: GET /api/v1/tasks/ID, the lists, a group's or map's view, the
schedules and services, the web terminal's `task ID`... Now such a reader
sees the names, each value `(withheld)` (rc.states.WITHHELD); the admin
token's holder, and `rc` on the main node, see the values. No log line and
no audit line holds one. One cluster (read_access open, one worker); each
test fails without its fix."""
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request

import pytest

from cluster_harness import Cluster, for_the_client, online, wait_for
from rc import client
from rc.states import WITHHELD

pytestmark = pytest.mark.e2e

SECRET = "hunter2-s49-" + os.urandom(6).hex()       # the task's API_KEY
SECOND = "pw-s49-" + os.urandom(6).hex()            # its DB_PASSWORD
TYPED = "typed-s49-" + os.urandom(6).hex()          # given in the web terminal
ENV = {"API_KEY": SECRET, "DB_PASSWORD": SECOND}
SHOWN = {"API_KEY": WITHHELD, "DB_PASSWORD": WITHHELD}
ALL_SECRETS = (SECRET, SECOND, TYPED)
HASH_KEY = 'printf %s "$API_KEY" | sha256sum'       # proves the task got the value
DEVICE = "s49-pi"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("env_s49"), read_access="open")
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(DEVICE, "--slots", "4")
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker")
        for_the_client(cluster)
        submitted(cluster)
        yield cluster
    finally:
        cluster.stop()


def submitted(cluster):
    """A task, a group, a map, a schedule and a service, each with ENV; the
    web terminal's submits with --env (a reader's refused first: a reader's
    audit lines are a few a minute, and the later tests run many commands)."""
    refused = call(cluster, "/api/v1/command", {"command": "submit shell true --env T=" + TYPED},
                   expect=(401,))
    assert "admin token" in refused["error"]
    typed = command(cluster, "submit shell true --env TYPED=%s --env=TYPED2=%s --en TYPED3=%s"
                    " --wait" % (TYPED, TYPED, TYPED), admin=True)
    assert typed == "", typed
    cluster.task = call(cluster, "/api/v1/tasks", {
        "task_type": "shell", "payload": {"command": HASH_KEY, "env": ENV}},
        admin=True)["task_id"]
    cluster.group = call(cluster, "/api/v1/groups", {
        "task_type": "shell", "payload": {"command": "true", "env": ENV}},
        admin=True)["group_id"]
    cluster.rc("map", "test -n \"$API_KEY\" && echo {}", "a", "b", "--no-progress",
               "--env", "API_KEY=" + SECRET, "--env", "DB_PASSWORD=" + SECOND)
    cluster.map = cluster.db.execute("SELECT max(group_id) FROM maps").fetchone()[0]
    call(cluster, "/api/v1/schedules", {"name": "nightly", "cron": "@daily",
                                        "task_type": "shell",
                                        "payload": {"command": "true", "env": ENV}}, admin=True)
    call(cluster, "/api/v1/services", {"name": "keeper", "task_type": "shell",
                                       "payload": {"command": "sleep 600", "env": ENV}},
         admin=True)
    wait_for(lambda: cluster.db.execute(
        "SELECT count(*) FROM tasks WHERE state = 'completed'").fetchone()[0] >= 4
        and cluster.db.execute("SELECT count(*) FROM tasks WHERE state = 'running'"
                               ).fetchone()[0] >= 1, 30, "the tasks to run")


def call(cluster, path, body=None, admin=False, expect=(200, 201)):
    """GET (POST with a body) as a reader, or with the admin token; the body as text
    for /text/*, else parsed."""
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = "Bearer " + cluster.token
    request = urllib.request.Request(cluster.url + path, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, data = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read().decode()
    assert status in expect, (path, status, data)
    return data if path.startswith("/text/") else json.loads(data)


def command(cluster, line, admin=False):
    """A web-terminal command: its output and error."""
    answer = call(cluster, "/api/v1/command", {"command": line, "width": 200}, admin=admin)
    return answer["output"] + answer["error"]


def first_events(cluster, path):
    """A stream's lines up to the end of its first event, as a reader reads them."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200, (path, response.status)
        lines = []
        while not (lines and lines[-1] == b"\n" and any(
                line.startswith(b"data:") for line in lines)):
            line = response.readline()
            assert line, "%s ended: %r" % (path, lines[-5:])
            lines.append(line)
        return b"".join(lines).decode("utf-8", "replace")
    finally:
        connection.close()


def assert_no_secret(where, text):
    text = text if isinstance(text, str) else json.dumps(text)
    for secret in ALL_SECRETS:
        assert secret not in text, "%s shows an --env value: %s" % (where, text[:2000])


def test_the_task_gets_its_values_and_the_admin_and_the_owner_see_them(node):
    task = call(node, "/api/v1/tasks/%d" % node.task, admin=True)
    assert task["state"] == "completed", task
    assert task["result"]["output"].split()[0] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert task["payload"]["env"] == ENV
    assert call(node, "/api/v1/groups/%d" % node.group, admin=True)["payload"]["env"] == ENV
    listed = call(node, "/api/v1/tasks?limit=1000", admin=True)["tasks"]
    assert ENV in [t["payload"].get("env") for t in listed]
    assert json.loads(command(node, "task %d --json" % node.task, admin=True))[
        "payload"]["env"] == ENV
    assert json.loads(command(node, "schedule list --json", admin=True))[0][
        "task"]["payload"]["env"] == ENV
    # rc on the main node, its owner's: it reads the database anyway.
    assert "payload.env.API_KEY:" in node.rc("task", str(node.task)).stdout
    assert SECRET in node.rc("task", str(node.task)).stdout


API_ROUTES = ["/api/v1/tasks/{task}", "/api/v1/tasks?limit=1000",
              "/api/v1/tasks?state=completed", "/api/v1/tasks?device=" + DEVICE,
              "/api/v1/groups/{group}", "/api/v1/groups/{group}?limit=1",
              "/api/v1/groups/{map}", "/api/v1/schedules", "/api/v1/schedules/nightly",
              "/api/v1/services", "/api/v1/services/keeper"]
OTHER_ROUTES = ["/text/tasks", "/text/tasks?format=csv", "/text/schedules", "/text/services",
                "/api/v1/overview", "/api/v1/tasks/{task}/output",
                "/api/v1/tasks/{task}/result", "/api/v1/tasks/{task}/why",
                "/api/v1/tasks/{task}/files", "/api/v1/groups/{group}/results",
                "/api/v1/results?ids={task}", "/text/logs?lines=1000",
                "/api/v1/devices/%s/logs" % DEVICE, "/text/devices/%s/logs" % DEVICE,
                "/api/v1/completion", "/text/status", "/api/v1/status"]


def routed(node, path):
    return path.format(task=node.task, group=node.group, map=node.map)


def payloads(answer):
    """The payloads an answer of API_ROUTES holds."""
    if "tasks" in answer and isinstance(answer["tasks"], list) and "payload" not in answer:
        return [t["payload"] for t in answer["tasks"]]
    if "schedules" in answer or "services" in answer:
        return [r["task"]["payload"] for r in answer.get("schedules", answer.get("services"))]
    return [(answer.get("task") or answer)["payload"]]


@pytest.mark.parametrize("path", API_ROUTES)
def test_a_reader_sees_the_names_and_not_the_values(node, path):
    answer = call(node, routed(node, path))
    assert_no_secret(path, answer)
    envs = [payload.get("env") for payload in payloads(answer)]
    assert SHOWN in envs, "%s: %s" % (path, envs)
    admin = call(node, routed(node, path), admin=True)
    assert ENV in [payload.get("env") for payload in payloads(admin)], path


def test_no_other_route_nor_stream_shows_a_reader_a_value(node):
    for path in OTHER_ROUTES:
        assert_no_secret(path, call(node, routed(node, path)))
    for path in ("/stream/overview", "/stream/tasks?since=0", "/stream/devices",
                 "/stream/logs"):
        assert_no_secret(path, first_events(node, path))


def test_the_web_terminal_shows_a_reader_names_only(node):
    for line in ("task %d" % node.task, "task %d --json" % node.task, "tasks --json",
                 "tasks", "group %d --json" % node.group, "group %d --json" % node.map,
                 "schedule list --json", "service list --json", "service logs keeper",
                 "why %d" % node.task, "monitor --once", "logs -n 1000"):
        assert_no_secret(line, command(node, line))
    assert re.search(r"payload\.env\.API_KEY: +%s\n" % re.escape(WITHHELD),
                     command(node, "task %d" % node.task))
    assert json.loads(command(node, "task %d --json" % node.task))["payload"]["env"] == SHOWN
    assert json.loads(command(node, "group %d --json" % node.map))["payload"]["env"] == SHOWN
    # The admin token, given with a command that needs none, shows the values.
    assert SECRET in command(node, "task %d" % node.task, admin=True)
    assert json.loads(command(node, "service list --json", admin=True))[0][
        "task"]["payload"]["env"] == ENV


def test_no_log_line_nor_audit_line_holds_a_value(node):
    """The web terminal's submits (the fixture's): the audit line kept each
    word whole, --env values too. And a value that is not text was quoted
    in the refusal."""
    bad = call(node, "/api/v1/tasks", {"task_type": "shell", "payload": {
        "command": "true", "env": {"BAD": [TYPED]}}}, admin=True, expect=(400,))
    assert bad["error"] == "env BAD must be text, not a list"
    logged = {}
    log_dir = os.path.join(node.home, "log")
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
            logged[name] = f.read()
        assert_no_secret(name, logged[name])
    audited = [json.loads(line) for line in logged["audit.log"].splitlines()]
    argvs = [line["argv"] for line in audited if line["event"].startswith("web_command")]
    refused, typed = argvs[:2]
    assert refused == ["submit", "shell", "true", "--env", "T=" + WITHHELD]
    assert typed[:8] == ["submit", "shell", "true", "--env", "TYPED=" + WITHHELD,
                         "--env=TYPED2=" + WITHHELD, "--en", "TYPED3=" + WITHHELD]


def test_the_marker_is_refused_as_a_value(node):
    """A reader's copy of a task sent again would run with the marker for its secret."""
    refused = call(node, "/api/v1/tasks", {"task_type": "shell", "payload": {
        "command": "true", "env": SHOWN}}, admin=True, expect=(400,))
    assert "API_KEY is %s" % WITHHELD in refused["error"]


def test_a_program_reads_its_own_task_back_without_the_token(node):
    """rc.client with no token (a reader: read_access lets it in) reads a
    task, its result and its output; the env is an object of names to
    text as before, each value withheld."""
    reader = client.Cluster(node.url, token="")
    task = reader.http.json("GET", "/api/v1/tasks/%d" % node.task)
    assert task["payload"]["env"] == SHOWN
    assert reader.get_result(node.task)["completed"]
    assert reader.output(node.task)["stdout"] == task["result"]["output"]
    admin = client.Cluster(node.url, node.token)
    assert admin.http.json("GET", "/api/v1/tasks/%d" % node.task)["payload"]["env"] == ENV


def test_the_dashboards_retry_of_a_task_seen_without_the_token_runs_it_with_its_values(node):
    """The task's view, drawn without the token, shows (withheld); Retry
    asks for the token and submitted that view's copy: each value the
    marker. It reads the task again with the token first."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium")
    newest = node.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(node.url + "/#/task/%d" % node.task)
            page.wait_for_selector("#view-object pre:has-text('%s')" % WITHHELD)
            assert_no_secret("the task's view", page.inner_text("#view-object"))
            page.click("#view-object button:has-text('Retry')")
            page.wait_for_selector("#modal:not([hidden])")
            page.fill("#modal input[name=token]", node.token)
            page.click("#modal-confirm")
            page.wait_for_selector("#modal", state="hidden", timeout=15000)
        finally:
            browser.close()
    copy = wait_for(lambda: node.db.execute(
        "SELECT task_id, payload FROM tasks WHERE task_id > ? AND payload LIKE ?",
        (newest, "%" + HASH_KEY.split()[0] + "%")).fetchone(), 15, "the copy")
    assert json.loads(copy["payload"])["env"] == ENV
