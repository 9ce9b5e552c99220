"""kill -9, restarts and time against the paths that landed in session 46,
on one real cluster: the client's cancels sent again, its early results,
its batched chunks, `rc map --resume`, pruning that keeps the newest event,
and `rc token --admin --rotate`."""
import concurrent.futures
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import types

import pytest

from cluster_harness import RC, map_queued, task_state, wait_for, with_one_worker
from rc import client
from test_chaos_files import halt

pytestmark = pytest.mark.e2e

DEVICE = "crash46"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # read_access "token": a loopback reader of the main node's user needs
    # no token otherwise, and the token test has one to lose.
    yield from with_one_worker(tmp_path_factory.mktemp("crash46"), DEVICE, 4, read_access="token")


def opened(cluster, path, token=None, cookie=None):
    """A streaming GET, its response unread."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=5)
    headers = {}
    if token:
        headers["Authorization"] = "Bearer %s" % token
    if cookie:
        headers["Cookie"] = cookie
    connection.request("GET", path, headers=headers)
    answer = connection.getresponse()
    assert answer.status == 200, (answer.status, answer.read())
    return connection, answer


def submit(cluster, token, specs, group="new"):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=30)
    try:
        connection.request("POST", "/api/v1/tasks?group=%s" % group, json.dumps(specs).encode(),
                           {"Authorization": "Bearer %s" % token,
                            "Content-Type": "application/json"})
        answer = connection.getresponse()
        body = json.loads(answer.read() or b"null")
        if answer.status == 201:
            body["task_ids"] = [task["task_id"] for task in body["tasks"]]
        return answer.status, body
    finally:
        connection.close()


def lines_until(answer, task_id, within=120):
    """The stream's line naming task `task_id`, or None at its end (a
    stream that does neither within `within` s fails the test: no hang)."""
    wanted = re.compile(rb'"task_id": ?%d\b' % task_id)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            line = answer.fp.readline()
        except socket.timeout:
            continue
        except OSError:
            return None
        if not line:
            return None
        if wanted.search(line):
            return line
    raise AssertionError("the stream neither ended nor sent task %d" % task_id)


# -- 6. rc token --admin --rotate ------------------------------------------------------

def test_streams_opened_with_the_old_admin_token_end_when_it_is_rotated(cluster):
    old = cluster.token
    status, made = submit(cluster, old, [{"task_type": "echo", "payload": {"message": "a"}}])
    assert status == 201, made
    group_id = made["group_id"]
    wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                        (made["task_ids"][0],)).fetchone()[0] == "completed",
             30, "the first task done")
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=30)
    connection.request("POST", "/api/v1/stream-session", b"",
                       {"Authorization": "Bearer %s" % old})
    session = connection.getresponse()
    assert session.status == 200, session.read()
    cookie = session.getheader("Set-Cookie").split(";")[0]
    connection.close()
    streams = {"tasks": opened(cluster, "/stream/tasks", old),
               "cookie": opened(cluster, "/stream/tasks", cookie=cookie),
               "group": opened(cluster, "/api/v1/groups/%d/results?stream=1&follow=1"
                               % group_id, old)}
    assert lines_until(streams["group"][1], made["task_ids"][0])
    rotated = cluster.rc("token", "--admin", "--rotate").stdout.split()[0]
    cluster.token = rotated
    status, answer = submit(cluster, rotated,
                            [{"task_type": "echo", "payload": {"message": "after"}}],
                            group=group_id)
    assert status == 201, answer
    task_id = answer["task_ids"][0]
    # Before: both streams went on with the old token, the new task's event
    # and its result sent to whoever held it.
    assert lines_until(streams["tasks"][1], task_id) is None
    assert lines_until(streams["cookie"][1], task_id) is None
    assert lines_until(streams["group"][1], task_id) is None
    for connection, _ in streams.values():
        connection.close()
    for path, cookie_or_token in (("/stream/tasks", {"cookie": cookie}),
                                  ("/stream/tasks", {"token": old})):
        with pytest.raises(AssertionError, match="401"):
            opened(cluster, path, **cookie_or_token)


# -- 1. a map's cancels while rc-web is halted -------------------------------------------

def never_run(number):      # required of a device that is not there
    return number


def test_a_map_s_timeout_with_rc_web_halted_raises_without_waiting_for_it(cluster, caplog):
    caplog.set_level(logging.WARNING, "rc.client")
    pid = None
    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            with client.Executor(cluster.url, cluster.token,
                                 requirements={"device_id": "nobody"}) as executor:
                calls, task_ids = map_queued(executor, never_run)
                pid = cluster.program_pid("rc-web")
                assert halt(pid)        # hung, not gone: its port takes connections
                began = time.monotonic()
                list(calls)
        # Before: each call's cancel waited REQUEST_TIMEOUT (60 s) for an
        # answer, one after the other: map(timeout=3) raised after 4 minutes.
        assert time.monotonic() - began < client.REQUEST_TIMEOUT
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: all(task_state(cluster, task_id) == "cancelled" for task_id in task_ids),
             120, "the cancels sent again")


def test_a_map_s_timeout_while_its_chunk_is_being_submitted_to_a_stopped_rc_web(cluster):
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "nobody"}) as executor:
        first = executor.submit(never_run, 0)          # rc-web has answered this client
        wait_for(lambda: first.task_id, 30, "the first call queued")
        try:
            cluster.supervisorctl("stop", "rc-web")
            calls = executor.map(never_run, range(4), timeout=2, chunksize=2)
            began = time.monotonic()
            with pytest.raises(concurrent.futures.TimeoutError):
                list(calls)
            # Before: the cancel of a chunk the sender was submitting waited
            # REQUEST_TIMEOUT for its task id, then gave up in silence.
            assert time.monotonic() - began < client.REQUEST_TIMEOUT
        finally:
            cluster.supervisorctl("start", "rc-web")
        first.cancel()
        # Its chunks, submitted once rc-web is back, are cancelled then (or never queued).
        wait_for(lambda: count_live(cluster, "never_run") == 0, 120, "no chunk left to run")


def count_live(cluster, text):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE payload LIKE ? AND state NOT IN"
                              " ('completed', 'failed', 'timed_out', 'cancelled')",
                              ("%" + text + "%",)).fetchone()[0]


# -- 4. rc map --resume storing a swept --files file again ------------------------------

def test_a_resumed_map_s_file_changed_as_it_is_stored_again_is_refused(cluster_home,
                                                                       tmp_path, monkeypatch):
    from rc import files, map_cli
    config, connection = cluster_home
    path = tmp_path / "f1.txt"
    path.write_text("one\n")
    job = types.SimpleNamespace(number=1, value=str(path),
                                blob={"sha256": files.hash_file(str(path))[0]})
    plan = types.SimpleNamespace(group_id=7, shared={}, to_run=[job])
    real_hash = files.hash_file

    def hash_then_change(name):         # the user saves the file just after it was read
        digest = real_hash(name)
        path.write_text("one, edited\n")
        return digest
    monkeypatch.setattr(files, "hash_file", hash_then_change)
    # Before: the edited bytes were stored, and the task queued named the old ones.
    with pytest.raises(map_cli.MapUsageError, match="has changed here since: run it in a new map"):
        map_cli.restore_swept_files(connection, config, plan)
    assert not files.exists(connection, job.blob["sha256"])


def test_two_resumes_of_one_map_at_once_run_each_input_once(cluster, tmp_path):
    import argparse
    import io
    from rc import commands, map_cli
    failed = subprocess.run([RC, "map", "exit 3 {}", ":::", "a", "b"], env=cluster.env,
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    assert failed.returncode == 2, failed.stderr
    group_id = int(failed.stderr.split("map ", 1)[1].split(":", 1)[0])
    arguments = argparse.Namespace(resume=group_id, into=None, keep_order=False, results=None,
                                   progress=False, halt=None)
    runners = []
    for _ in range(2):          # both read the failed tasks before either queues again
        context = commands.Context(io.StringIO(), io.StringIO(), config=cluster.config)
        plan = map_cli.resumed_map(context, arguments)
        assert len(plan.to_run) == 2
        runners.append(map_cli.Runner(plan, arguments, context, None))
    try:
        for runner in runners:
            runner.submit_batch()
    finally:
        for runner in runners:
            runner.context.close()
    # Before: each queued both inputs again, and each ran twice.
    assert cluster.db.execute("SELECT count(*) FROM tasks WHERE group_id = ?",
                              (group_id,)).fetchone()[0] == 4
    assert sorted(runners[0].pending) == sorted(runners[1].pending)


def test_a_long_poll_waiting_when_the_admin_token_is_rotated_is_refused(cluster):
    for _ in range(5):      # until the rotation came while it waited (`rc` takes ~0.3 s)
        status, made = submit(cluster, cluster.token, [
            {"task_type": "echo", "payload": {"message": "w"},
             "requirements": {"device_id": "nobody"}}])
        assert status == 201, made
        task_id = made["task_ids"][0]
        connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=90)
        connection.request("GET", "/api/v1/tasks/%d/result?wait=60" % task_id,
                           headers={"Authorization": "Bearer %s" % cluster.token})
        cluster.token = cluster.rc("token", "--admin", "--rotate").stdout.split()[0]
        cluster.rc("cancel", str(task_id))
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        if b"missing or wrong admin token" not in body:     # it waited: the case here
            break
    # Before: 200 and the task's result, to the old token's holder.
    assert answer.status == 401 and b"replaced while it waited" in body, (answer.status, body)
