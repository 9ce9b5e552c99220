"""kill -9, restarts and time against the paths that landed in session 46,
on one real cluster: the client's cancels sent again, its early results,
its batched chunks, `rc map --resume`, pruning that keeps the newest event,
and `rc token --admin --rotate`."""
import http.client
import json
import re
import socket
import time

import pytest

from cluster_harness import Cluster, for_the_client, online, wait_for

pytestmark = pytest.mark.e2e

DEVICE = "crash46"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # read_access "token": a loopback reader of the main node's user needs
    # no token otherwise, and the token test has one to lose.
    cluster = Cluster(tmp_path_factory.mktemp("crash46"), read_access="token")
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # one worker: this module's
        cluster.start_worker(DEVICE, "--slots", "4")
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker online")
        yield for_the_client(cluster)
    finally:
        cluster.stop()


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
