"""kill -9 and time against the paths that landed in session 45, on one
real cluster: rc-web's batch submit that finds a used Idempotency-Key by
its insert failing (perf45), and the client's function stored once as an
input file all its tasks share (client45)."""
import http.client
import json
import threading
import time

import pytest

from cluster_harness import Cluster, online, wait_for
from rc import client, files

pytestmark = pytest.mark.e2e

DEVICE = "crash45"
DAY = 86400.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("crash45"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # one worker: this module's
        cluster.start_worker(DEVICE, "--slots", "4")
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker online")
        cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
        with open(cluster.config.admin_token_path) as f:
            cluster.token = f.read().strip()
        yield cluster
    finally:
        cluster.stop()


def post(cluster, path, body, key):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body).encode(), {
            "Authorization": "Bearer %s" % cluster.token, "Idempotency-Key": key,
            "Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        connection.close()


def shell(command):
    return {"task_type": "shell", "payload": {"command": command}}


def count_tasks(cluster, text):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE payload LIKE ?",
                              ("%" + text + "%",)).fetchone()[0]


# -- rc-web's batch submit: a used key found by its insert failing --------------------

def test_two_copies_of_a_batch_racing_into_a_known_group_queue_it_once(cluster):
    status, made = post(cluster, "/api/v1/tasks?group=new", [shell("echo race-0")], "race-0")
    assert status == 201
    path = "/api/v1/tasks?group=%d" % made["group_id"]
    for round_ in range(8):
        batch = [shell("echo race-%d-%d" % (round_, n)) for n in range(20)]
        answers, start = [], threading.Barrier(4)

        def send():
            start.wait()
            answers.append(post(cluster, path, batch, "race-%d" % (round_ + 1)))
        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in answers] == [201] * 4, answers
        assert len({json.dumps(answer) for _, answer in answers}) == 1, answers
        assert count_tasks(cluster, "race-%d-" % round_) == 20


def test_a_batch_into_a_known_group_sent_again_after_rc_web_s_kill_is_queued_once(cluster):
    status, made = post(cluster, "/api/v1/tasks?group=new", [shell("echo kill-0")], "kill-0")
    path = "/api/v1/tasks?group=%d" % made["group_id"]
    batch = [shell("echo kill-batch-%d" % n) for n in range(5)]
    status, first = post(cluster, path, batch, "kill-1")
    assert status == 201
    from test_chaos_files import kill_program
    kill_program(cluster, "rc-web")
    wait_for(lambda: ready(cluster), 30, "rc-web back")
    status, again = post(cluster, path, batch, "kill-1")
    assert (status, again) == (201, first)
    # rc-web knows the group again (read on the repeat): the third copy is
    # found by its insert failing.
    status, third = post(cluster, path, batch, "kill-1")
    assert (status, third) == (201, first)
    status, other = post(cluster, path, batch[:1], "kill-1")
    assert status == 422, other
    assert count_tasks(cluster, "kill-batch-") == 5


def ready(cluster):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                                timeout=5)
        connection.request("GET", "/api/v1/health")
        connection.getresponse().read()
        connection.close()
        return True
    except OSError:
        return False


def test_a_batch_with_group_new_sent_again_makes_one_group(cluster):
    before = cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0]
    batch = [shell("echo new-again-%d" % n) for n in range(3)]
    answers = [post(cluster, "/api/v1/tasks?group=new", batch, "new-again") for _ in range(3)]
    assert [status for status, _ in answers] == [201] * 3
    assert answers[0] == answers[1] == answers[2]
    assert cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0] == before + 1
    assert count_tasks(cluster, "new-again-") == 3


# -- the client's function stored once ------------------------------------------------

TABLE = list(range(100000))        # over PIECES_IN_CODE: the function goes as a file


def look_up(index):
    return TABLE[index]


def test_a_long_lived_executor_whose_function_s_file_was_swept_goes_on(cluster):
    with client.Executor(cluster.url, cluster.token) as executor:
        assert executor.submit(look_up, 5).result(60) == 5
        # Its file unused past files_retention_days: the upkeep's sweep
        # (run here with its clock a retention ahead) removes it.
        files.sweep(cluster.db, cluster.config, time.time() + cluster.config.files_retention_days
                    * DAY + 60)
        assert executor.submit(look_up, 6).result(60) == 6
        assert list(executor.map(look_up, range(30))) == list(range(30))
