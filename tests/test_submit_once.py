"""A submit whose answer is lost is sent again and queued once: POST
/api/v1/tasks with an Idempotency-Key header answers a key it has seen with
the tasks it queued then (lib/rc/tasks.py request_keys), and rc.client sends
each batch with a key of its own, again when rc-web stopped before
answering. On a real cluster; the lost answer is cut by a proxy between
the client and rc-web."""
import http.client
import json
import socket
import sqlite3
import threading
import time

import pytest

from cluster_harness import Cluster, log_records, online, wait_for
from rc import client, db, housekeeping, tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("submit-once") / "home")
    cluster.start()
    wait_for(lambda: online(cluster), 60, "the local worker")
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
    yield cluster
    cluster.stop()


def post(cluster, path, body, key=None):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=60)
    headers = {"Authorization": "Bearer " + cluster.token, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    try:
        connection.request("POST", path, json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def count(cluster, sql, *parameters):
    return cluster.db.execute(sql, parameters).fetchone()[0]


def with_command(cluster, command):
    return count(cluster, "SELECT count(*) FROM tasks WHERE json_extract(payload, '$.command')"
                 " = ?", command)


def shell(command):
    return {"task_type": "shell", "payload": {"command": command}}


def test_a_batch_sent_again_with_its_key_is_answered_with_the_first_tasks(cluster):
    groups = count(cluster, "SELECT count(*) FROM task_groups")
    batch = [shell("echo batch-once-a"), shell("echo batch-once-b")]
    status, first = post(cluster, "/api/v1/tasks?group=new", batch, key="k-batch-1")
    assert status == 201 and len(first["tasks"]) == 2 and first["group_id"]
    status, again = post(cluster, "/api/v1/tasks?group=new", batch, key="k-batch-1")
    assert (status, again) == (201, first)
    assert with_command(cluster, "echo batch-once-a") == 1
    # The repeat made no group of its own either.
    assert count(cluster, "SELECT count(*) FROM task_groups") == groups + 1
    # Another key is another request.
    status, other = post(cluster, "/api/v1/tasks?group=new", batch, key="k-batch-2")
    assert status == 201 and other["tasks"] != first["tasks"]
    assert with_command(cluster, "echo batch-once-a") == 2
    wait_for(lambda: log_records(cluster, "rc-web", event="submit_repeated",
                                 group_id=first["group_id"]), 30, "rc-web's line of the repeat")


def test_a_batch_sent_again_into_its_group_is_answered_with_the_first_tasks(cluster):
    """A client's session submits into its group (?group=ID), which rc-web
    knows from the session's first batch: there a key used before is found
    by its insert failing, not asked for first, and the repeat answers as
    before, queueing nothing; a pruned group still answers from the key."""
    status, made = post(cluster, "/api/v1/tasks?group=new", [shell("echo into-group-0")],
                        key="k-into-0")
    assert status == 201
    path = "/api/v1/tasks?group=%d" % made["group_id"]
    batch = [shell("echo into-group-a"), shell("echo into-group-b")]
    status, first = post(cluster, path, batch, key="k-into-1")
    assert status == 201 and len(first["tasks"]) == 2
    repeats = len(log_records(cluster, "rc-web", event="submit_repeated"))
    assert post(cluster, path, batch, key="k-into-1") == (201, first)
    assert with_command(cluster, "echo into-group-a") == 1
    wait_for(lambda: len(log_records(cluster, "rc-web", event="submit_repeated")) > repeats,
             30, "rc-web's line of the repeat")
    status, answer = post(cluster, path, [shell("echo into-group-c")], key="k-into-1")
    assert status == 422 and "Idempotency-Key" in answer["error"], answer
    assert with_command(cluster, "echo into-group-c") == 0


def test_one_task_sent_again_with_its_key_is_the_same_task(cluster):
    status, first = post(cluster, "/api/v1/tasks", shell("echo single-once"), key="k-single")
    assert status == 201 and first["state"] in ("queued", "assigned", "running", "completed")
    status, again = post(cluster, "/api/v1/tasks", shell("echo single-once"), key="k-single")
    assert status == 201 and again["task_id"] == first["task_id"]
    assert with_command(cluster, "echo single-once") == 1
    # Pruned since (a task_retention under the key's hour): its state is null.
    connection = db.connect(cluster.config.db_path)
    try:
        tasks.cancel(connection, first["task_id"])
        with db.write(connection):
            for table in ("task_events", "task_files", "tasks"):
                connection.execute("DELETE FROM %s WHERE task_id = ?" % table,
                                   (first["task_id"],))
    finally:
        connection.close()
    status, pruned = post(cluster, "/api/v1/tasks", shell("echo single-once"), key="k-single")
    assert (status, pruned["task_id"], pruned["state"]) == (201, first["task_id"], None)


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "caf\u00e9"])
def test_a_bad_key_is_refused(cluster, key):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=60)
    try:
        connection.putrequest("POST", "/api/v1/tasks")
        connection.putheader("Authorization", "Bearer " + cluster.token)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Idempotency-Key", key.encode("utf-8"))
        body = json.dumps(shell("echo bad-key")).encode()
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400 and "Idempotency-Key" in answer["error"]
    assert with_command(cluster, "echo bad-key") == 0


def test_the_same_request_twice_at_once_is_queued_once(cluster):
    """Two copies of one request racing (a client that sent it again while
    the first was still being worked on): one queues, the other answers with
    what it queued, and the group the loser made is not left behind."""
    groups = count(cluster, "SELECT count(*) FROM task_groups")
    batch = [shell("echo race-once %d" % n) for n in range(2000)]
    answers = []

    def send():
        answers.append(post(cluster, "/api/v1/tasks?group=new", batch, key="k-race"))
    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 2 and answers[0] == answers[1] and answers[0][0] == 201
    assert count(cluster, "SELECT count(*) FROM tasks WHERE json_extract(payload,"
                 " '$.command') LIKE 'echo race-once %'") == 2000
    assert count(cluster, "SELECT count(*) FROM task_groups") == groups + 1
    # The 2,000 ids are kept as their range, not as a list.
    assert len(cluster.db.execute("SELECT task_ids FROM request_keys WHERE key = 'k-race'")
               .fetchone()[0]) < 40
    # Out of the queue: run, the 2,000 echo tasks kept the local worker busy
    # for the next test's submit (~30 s here; over 120 s, a failure, on a
    # loaded machine).
    tasks.cancel_group(cluster.db, answers[0][1]["group_id"])


def test_a_used_key_queues_nothing_in_the_library(cluster):
    """What the race above relies on: submit_many with a key already used
    raises, all or none, and leaves the first tasks alone."""
    connection = db.connect(cluster.config.db_path)
    try:
        first = tasks.submit_many(connection, cluster.config, [shell("echo lib-once")],
                                  request_key="k-library")
        with pytest.raises(sqlite3.IntegrityError):
            tasks.submit_many(connection, cluster.config,
                              [shell("echo lib-once"), shell("echo lib-once")],
                              request_key="k-library")
        assert tasks.queued_for_key(connection, "k-library") == (first, None)
        assert with_command(cluster, "echo lib-once") == 1
    finally:
        connection.close()


def test_keys_are_forgotten_after_an_hour(cluster):
    connection = db.connect(cluster.config.db_path)
    try:
        now = time.time()
        with db.write(connection):
            for key, age in (("k-old", tasks.REQUEST_KEY_RETENTION + 60), ("k-young", 60)):
                connection.execute("INSERT INTO request_keys(key, task_ids, created_at)"
                                   " VALUES (?, '1', ?)", (key, now - age))
        done = housekeeping.sweep(connection, cluster.config, Quiet(), now)
        assert done["request_keys_forgotten"] >= 1
        assert tasks.queued_for_key(connection, "k-old") is None
        assert tasks.queued_for_key(connection, "k-young") == ([1], None)
        assert tasks.ids_in_ranges(tasks.id_ranges([3, 4, 5, 9, 11, 12])) == [3, 4, 5, 9, 11, 12]
    finally:
        connection.close()


class Quiet:
    def info(self, *args, **kwargs):
        pass


# -- the client, its answer lost ---------------------------------------------------------

class AnswerCutter:
    """A TCP proxy to rc-web that, while `armed`, forwards the next request
    that starts so (a submit: POST /api/v1/tasks) and closes the client's
    connection when rc-web's answer to it begins: rc-web did it, the client
    never hears."""

    def __init__(self, port, request=b"POST /api/v1/tasks"):
        self.port = port
        self.request = request
        self.armed = False
        self.cut = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            marked = []
            threading.Thread(target=self.pump, args=(downstream, upstream, marked, True),
                             daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, downstream, marked, False),
                             daemon=True).start()

    def pump(self, source, sink, marked, request):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if request and self.armed and data.startswith(self.request):
                    self.armed = False
                    marked.append(True)
                elif not request and marked:
                    self.cut += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("warm", [False, True], ids=["new connection", "kept-alive"])
def test_a_submit_whose_answer_was_lost_is_queued_once_and_its_result_comes(cluster, warm):
    """Before, the future failed (`no answer from ...`) on a new connection;
    on a kept-alive one the batch was sent again as a new request and queued
    twice."""
    proxy = AnswerCutter(cluster.config.web_port)
    command = "echo answer-lost-%s" % ("warm" if warm else "cold")
    try:
        with client.Cluster(proxy.url, cluster.token) as connection:
            if warm:        # the first goes from the sender thread, the second from ours
                for _ in range(2):
                    assert connection.submit("shell", "echo warm-up").result(timeout=120)
            proxy.armed = True
            assert connection.submit("shell", command).result(timeout=120) == command[5:] + "\n"
    finally:
        proxy.close()
    assert proxy.cut == 1
    assert with_command(cluster, command) == 1


def test_a_put_whose_answer_was_lost_is_sent_again(cluster, tmp_path):
    """The same bytes stored under the same hash: safe to send again, and
    sent from the file again (not held)."""
    proxy = AnswerCutter(cluster.config.web_port, request=b"POST /api/v1/files")
    path = tmp_path / "data.bin"
    path.write_bytes(b"put through a cut answer\n" * 50000)
    try:
        with client.Cluster(proxy.url, cluster.token) as connection:
            proxy.armed = True
            stored = connection.put(str(path))
            assert proxy.cut == 1
            assert connection.get(stored) == path.read_bytes()
    finally:
        proxy.close()
