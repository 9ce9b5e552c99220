"""A new user's first hour, session 41, from the README and docs/ alone on a
fresh clone: a Dask user moving a notebook-style script onto the fleet with
/client.py (3.8 and 3.13: Cluster's submit, map, wait, as_completed, put,
get, cancel; an Executor with chunksize, a custom exception, a chatty call,
Ctrl-C, a wrong token, the main node stopped and started), then a user of
the dashboard alone at 1280x800 and 390x844. Each test fails without its
fix; those that need a main node share one cluster."""
import os
import time

import pytest

from cluster_harness import wait_for, with_the_local_worker
from rc import client, db, state_dir, tasks
from rc.states import COMPLETED
from test_dashboard_api import failed_task, running_task
from test_dashboard_browser import ARTIFACTS, current_line, screen, type_line
from test_dashboard_browser import browser  # noqa: F401 (its fixture: one Chromium a module)
import test_web
from test_polish_s40 import static_answer

TIMEOUT = 60        # seconds any one task may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_local_worker(tmp_path_factory.mktemp("first-hour-s41"))


class BadInput(Exception):
    pass


def refuse(n):
    raise BadInput("bad value %r" % n)


def double(n):
    return 2 * n


def test_a_call_that_raised_says_so_on_its_tasks_stderr(cluster):
    """An Executor call that raised BadInput left a task that every view of
    the cluster showed as a success: `completed`, exit status 0, no stderr,
    its output a line of base64 (`rc task`, `rc logs`, the dashboard's task
    view); whoever looked there, not at the script, could not tell it failed
    or why. Now the task's stderr carries each raising call's traceback,
    after what the calls printed; its outcome still reaches the script."""
    with client.Executor(cluster.url, cluster.token, pack=1) as executor:
        failing, fine = executor.submit(refuse, 7), executor.submit(double, 4)
        with pytest.raises(BadInput, match="bad value 7"):
            failing.result(TIMEOUT)
        assert fine.result(TIMEOUT) == 8
        record = executor.cluster.get_result(failing.task_id)
        stderr = record["result"]["stderr"]
        assert record["state"] == "completed"
        assert "call 1 of 1 raised" in stderr, stderr
        assert "in refuse" in stderr and "BadInput: bad value 7" in stderr, stderr
        assert executor.cluster.get_result(fine.task_id)["result"]["stderr"] == ""


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_ctrl_c_in_an_executors_block_does_not_wait_for_its_tasks(cluster, caplog):
    """Ctrl-C in `for f in as_completed(futures)` inside `with Executor()`
    printed nothing and went on waiting for every task to end (a call of
    minutes held the script for minutes), then showed the KeyboardInterrupt:
    the block's end waited as a ProcessPoolExecutor's does, though the tasks
    run on the fleet whether the script waits or not and nobody reads their
    results. Cluster's block already left at once. Now the Executor's does
    too when an exception leaves it, and says which tasks go on and how to
    stop them."""
    with client.Cluster(cluster.url, cluster.token) as remote:
        with pytest.raises(KeyboardInterrupt):
            with client.Executor(cluster=remote, pack=1) as executor:
                future = executor.submit(nap, 300)
                task_id = future.wait_submitted(TIMEOUT)
                raise KeyboardInterrupt
        try:
            assert not future.done()
            told = [r.getMessage() for r in caplog.records if r.name == "rc.client"]
            assert any("goes on with task %d " % task_id in line
                       and "rc cancel %d" % task_id in line for line in told), told
        finally:
            remote.cancel(task_id)


def test_ctrl_c_names_the_group_that_stops_every_task_left_running(cluster, caplog):
    """The message above named `rc cancel ID`, which stops one task of
    hundreds. An Executor that made its own client has a group of its own:
    the message names `rc cancel --group G`, which stops them all."""
    with pytest.raises(KeyboardInterrupt):
        with client.Executor(cluster.url, cluster.token, pack=1) as executor:
            futures = [executor.submit(nap, 300) for _ in range(2)]
            task_ids = [future.wait_submitted(TIMEOUT) for future in futures]
            raise KeyboardInterrupt
    connection = db.connect(cluster.config.db_path)
    group_id = tasks.get(connection, task_ids[0])["group_id"]
    told = [r.getMessage() for r in caplog.records if r.name == "rc.client"]
    assert any("`rc cancel --group %d` stops them" % group_id in line for line in told), told
    assert "group %d: " % group_id in cluster.rc("cancel", "--group", str(group_id)).stdout
    wait_for(lambda: all(tasks.get(connection, task_id)["state"] == "cancelled"
                         for task_id in task_ids), TIMEOUT, "both tasks cancelled")


def test_the_join_token_given_for_the_admin_token_is_named(cluster):
    """`make run` prints one token, in the join line (`--token=rc1_...`), and
    a new user gave it as RC_TOKEN: the answer was the one for any wrong
    token (`missing or wrong admin token`), though both look alike (rc1_...)
    and the user held a real token of the cluster, only not this one. Now
    the answer says it is the join token and how to get the admin token."""
    with open(cluster.config.token_path) as f:
        join_token = f.read().strip()
    with client.Cluster(cluster.url, join_token) as remote:
        with pytest.raises(client.ClusterError) as refused:
            remote.submit("echo", "hi").result(TIMEOUT)
    message = str(refused.value)
    assert "join token" in message and "rc token --admin" in message, message
    with client.Cluster(cluster.url, "rc1_" + "0" * 48) as remote:
        with pytest.raises(client.ClusterError) as refused:
            remote.submit("echo", "hi").result(TIMEOUT)
    assert "join token" not in str(refused.value), refused.value


# -- the dashboard ----------------------------------------------------------------------

@pytest.fixture
def web_client(cluster_home):
    """rc-web's app alone on a fresh database (no reaper: no minute recorded)."""
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = test_web.serve(config)
    yield test_web.Client(server.effective_port, state_dir.read_secret(config.admin_token_path))
    test_web.stop(server, thread)


def test_the_success_tile_counts_the_present_minute_as_the_failed_tile_does(
        web_client, cluster_home, add_device):
    """The overview's first screen said `100%` success (15 min) beside `1
    failed (15 min)` for up to a minute after a failure: the failed tile
    counts the present minute's failures, the success rate only the minutes
    the reaper had recorded. Now the success rate counts the present too."""
    config, connection = cluster_home
    add_device("pi", now=time.time())
    done = running_task(connection, config, "pi")
    with db.write(connection):
        tasks.finish(connection, done, 1, "pi", COMPLETED, {"output": "ok"}, None, "completed",
                     time.time())
    failed_task(connection, config, "pi", "exit status 3")
    status, body = web_client.json("/api/v1/overview")
    assert status == 200 and body["history"] == [], body["history"]     # no minute recorded yet
    assert body["history_summary"]["success_rate"] == 0.5, body["history_summary"]




def test_the_dashboard_says_when_the_join_token_is_given_to_it(cluster, browser):
    """Cancel on a running task's page asks for the admin token; given the
    join token (the one `make run` prints), the dialog said `the admin token
    was not accepted; give it again`, and the user gave the same again; the
    terminal, after `login` with it, `the admin token was not accepted`.
    Now both say that is the join token and where the admin token is."""
    with open(cluster.config.token_path) as f:
        join_token = f.read().strip()
    with client.Cluster(cluster.url, cluster.token) as remote:
        task = remote.submit("sleep", "300")
        task_id = task.wait_submitted(TIMEOUT)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto("%s/#/task/%d" % (cluster.url, task_id))
            page.click("#view-object button.danger:text-is('Cancel')")
            page.fill("#modal-fields input[name=token]", join_token)
            page.click("#modal-confirm")
            page.wait_for_selector("#modal-error:not([hidden])")
            said = page.inner_text("#modal-error")
            page.screenshot(path=os.path.join(ARTIFACTS, "s41_join_token_refused.png"))
            assert "join token" in said and "rc token --admin" in said, said
            assert remote.get_result(task_id)["state"] in ("queued", "assigned", "running")
            # The terminal's `login` keeps whatever it is given; the command it refuses says.
            page.goto("%s/#/terminal" % cluster.url)
            wait_for(lambda: current_line(page) == "rc>", TIMEOUT, "the prompt")
            for line in ("login", join_token, "cancel %d" % task_id):
                type_line(page, line)
            wait_for(lambda: "(forgotten)" in screen(page), TIMEOUT, "the refusal")
            assert "that is the join token" in screen(page), screen(page)
            assert remote.get_result(task_id)["state"] in ("queued", "assigned", "running")
        finally:
            remote.cancel(task_id)


NOWHERE = "http://127.0.0.1:9"      # never opened: page.route answers every request


def overview_answer(route):
    """share/web as rc-web serves it, and an overview of two devices, two
    running tasks, eight newest and one failure."""
    path = static_answer(route)
    if path is None:
        return None
    if path != "/api/v1/overview":
        return route.fulfill(status=404, json={"error": "not here"})
    now = time.time()
    devices = [{"device_id": name, "hostname": name, "status": "online", "connected": True,
                "available": True, "drained": False, "slots": 2, "active_tasks": 1,
                "platform": "linux", "architecture": "x86_64", "role": "compute", "labels": {},
                "last_seen": now, "figures_at": now, "revoked": False, "cpu_percent": 50.0,
                "memory_percent": 5.0, "suspect": False} for name in ("pi-kitchen", "vm-local")]
    task = {"task_type": "shell", "attempt": 1, "device_id": "vm-local", "created_at": now - 60,
            "group_id": None, "summary": "make -j2 frames"}
    running = [dict(task, task_id=n, state="running", started_at=now - 30, progress=20,
                    progress_message="frame 7") for n in (41, 42)]
    recent = [dict(task, task_id=n, state="completed", finished_at=now - 5) for n in range(33, 41)]
    failures = [dict(task, task_id=40, state="failed", finished_at=now - 5,
                     error="exit status 3", reason="failed")]
    summary = {"devices_online": 2, "devices_total": 2, "slots_busy": 2, "slots_total": 4,
               "tasks_running": 2, "tasks_assigned": 0, "queue_length": 0, "throughput_5m": 7.4,
               "throughput_1m": 2.0}
    minute = int(now // 60) * 60
    history = [{"minute": minute - 60 * n, "submitted": 1, "completed": 1, "failed": 0,
                "cancelled": 0, "queue_length": 0, "running": 1, "devices_online": 2,
                "devices_total": 2, "slots": 4, "slots_busy": 1} for n in range(60, 0, -1)]
    return route.fulfill(json={"now": now, "summary": summary, "devices": devices,
                               "running": running, "recent": recent, "failures": failures,
                               "history": history, "history_summary": {"success_rate": 0.9}})


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}])
def test_recent_failures_are_on_a_laptops_first_screen(browser, viewport):
    """At 1280x800 the overview's first screen showed what runs and the
    newest tasks, then the charts, and Recent failures below them, out of
    sight, while the left column had room under Running tasks. The failures
    now follow Running tasks there (on a phone, before the newest tasks and
    the charts): what failed is on the first screen with no scrolling."""
    page = browser.new_page(viewport=viewport)
    try:
        page.route(NOWHERE + "/**", overview_answer)
        page.goto(NOWHERE + "/")
        failures = page.locator(".panel", has=page.locator("h2", has_text="Recent failures"))
        failures.locator("text=exit status 3").wait_for()
        page.screenshot(path=os.path.join(ARTIFACTS, "s41_overview_laptop.png"))
        row = failures.locator("text=exit status 3").bounding_box()
        assert row["y"] + row["height"] <= viewport["height"], row
    finally:
        page.close()


def test_a_call_timed_out_by_the_default_timeout_says_how_to_give_one():
    """A Dask or ProcessPoolExecutor user gives no timeout (neither has
    one), and a call of ten minutes failed with `task 49 timed_out: timed
    out after 300 s`: a limit they never set, and nothing said it was the
    cluster's default or how to give another. Now the message says so; a
    task given its own timeout is told as before."""
    with client.Cluster("http://127.0.0.1:9", "unused") as remote:
        record = {"task_id": 49, "state": "timed_out", "error": "timed out after 300 s",
                  "result": {"stderr": ""}}
        told = {}
        for given in ({}, {"timeout": 600}):
            future = client.TaskFuture(remote, client.task_spec("sleep", "900", given), None)
            remote.finish(future, record)
            told[bool(given)] = str(future.exception(0))
    assert told[True] == "task 49 timed_out: timed out after 300 s", told
    assert told[False].startswith("task 49 timed_out: timed out after 300 s"), told
    assert "default" in told[False] and "timeout=SECONDS" in told[False], told


def test_cluster_submit_of_a_function_points_to_the_executor():
    """Dask's Client.submit(func, *args) and Client.map(func, items) take a
    function; a Dask user wrote cluster.submit(inc, 1) and got `TypeError:
    task cannot be sent: Object of type function is not JSON serializable`,
    after the task had gone to the sender. Now submit and map refuse a
    function at once and name the Executor, whose submit and map take one."""
    with client.Cluster("http://127.0.0.1:9", "unused") as remote:
        for call in (lambda: remote.submit(double, 1), lambda: remote.map(double, [1, 2])):
            with pytest.raises(TypeError) as refused:
                call()
            message = str(refused.value)
            assert "double" in message and "Executor" in message, message
            assert "JSON" not in message, message


def test_https_to_a_plain_rc_web_says_to_use_http(cluster):
    """docs/client.md says `https://` with "web_tls": true; a user who
    gave https:// to a main node without it (the default) waited about
    half a minute a request (rc-web waited for an HTTP request that never
    came, the client for its handshake) for `cannot reach https://...:
    [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of
    protocol`. Now rc-web hangs up at once on a TLS handshake, and the
    client says that rc-web may be serving plain http and which url."""
    plain = cluster.url.replace("http://", "https://")
    with client.Cluster(plain, cluster.token) as remote:
        with pytest.raises(client.ClusterError) as refused:
            remote.get_result(1)
    message = str(refused.value)
    assert "web_tls" in message and cluster.url in message, message


def test_why_of_a_running_task_reads_as_a_sentence(cluster_home, add_device):
    """A long task's page said `Task 51 is running on pi-kitchen since 11s
    ago (attempt 1, 23.3333% done).`: `since ... ago`, and a share to the
    ten-thousandth, from `PROGRESS 35/150`. Now it says how long it has run
    and a whole percentage, as its progress bar does."""
    from rc import explain
    config, connection = cluster_home
    add_device("pi-kitchen", now=time.time())
    task_id = running_task(connection, config, "pi-kitchen", 100 * 35 / 150, "frame 35")
    said = explain.why(connection, task_id, time.time() + 11)
    assert said.startswith("Task %d has been running on pi-kitchen for 11s (attempt 1,"
                           " 23%% done)." % task_id), said


def unreachable_answer(route):
    """share/web, and no answer at all from the API (rc-web stopping)."""
    if static_answer(route) is not None:
        route.abort("connectionrefused")


def test_a_view_opened_while_the_main_node_is_stopped_says_so(browser):
    """With the main node stopped (`make stop`), a task's page opened from a
    link said `Loading…` and nothing more, however long it stayed so (the
    dot at the top said `no link to the main node`, far from it). Now the
    view says the main node does not answer and that it tries again."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.route(NOWHERE + "/**", unreachable_answer)
        page.goto(NOWHERE + "/#/task/41")
        said = page.locator("#view-object p.empty", has_text="does not answer")
        said.wait_for()
        assert "trying again" in said.inner_text()
    finally:
        page.close()


def token_wall_answer(route):
    """share/web, and rc-web's 401 to a reader on another machine."""
    if static_answer(route) is not None:
        route.fulfill(status=401, json={"error": "reading needs the admin token from"
                                        " 192.0.2.2 (read_access=local); send"
                                        " Authorization: Bearer TOKEN"})


def test_the_first_screen_from_another_machine_says_where_the_token_is(browser):
    """The address `make run` prints, opened on a laptop, showed only `reading
    needs the admin token from 192.0.2.2 (read_access=local); send
    Authorization: Bearer TOKEN`: words for a program, no word of where the
    token is. The panel now says `bin/rc token --admin` prints it and how
    to open reading to the network; the API's words stay below, dimmed."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.route(NOWHERE + "/**", token_wall_answer)
        page.goto(NOWHERE + "/")
        page.wait_for_selector("#view-overview button:text-is('Give the admin token')")
        shown = page.inner_text("#view-overview")
        page.screenshot(path=os.path.join(ARTIFACTS, "s41_token_wall.png"))
        assert "rc token --admin" in shown and "read_access" in shown, shown
    finally:
        page.close()
