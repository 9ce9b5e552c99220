"""kill -9 and time against the paths that landed in session 45, on one
real cluster: rc-web's batch submit that finds a used Idempotency-Key by
its insert failing (perf45), and the client's function stored once as an
input file all its tasks share (client45)."""
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from cluster_harness import (RC, assert_one_terminal_state_each, log_records,
                             wait_all_finished, wait_for, with_one_worker)
from rc import client, files, housekeeping
from test_chaos_files import halt, kill_program

pytestmark = pytest.mark.e2e

DEVICE = "crash45"
DAY = 86400.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_one_worker(tmp_path_factory.mktemp("crash45"), DEVICE, 4)


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


def test_rc_web_killed_after_a_client_s_batch_commits_before_its_answer(cluster):
    with client.Cluster(cluster.url, cluster.token) as session:
        assert session.submit("echo", "warm").result(60) == "warm"   # rc-web answered it
        # Rounds until an answer was lost (the kill lands after the answer at
        # times), into the group rc-web made or one it never knew.
        for round_ in range(20):
            if repeats(cluster):
                break
            pid = cluster.program_pid("rc-web")
            assert halt(pid)
            inputs = ["commit-%d-%d" % (round_, n) for n in range(50)]
            outputs = []
            mapping = threading.Thread(target=lambda: outputs.extend(
                session.map("echo", inputs)))
            mapping.start()
            try:
                assert stepped_until(pid, lambda: count_tasks(
                    cluster, "commit-%d-" % round_) == 50), "the batch never committed"
            finally:
                kill_program(cluster, "rc-web")
            mapping.join(120)
            assert outputs == inputs
            assert count_tasks(cluster, "commit-%d-" % round_) == 50
        if not repeats(cluster):
            pytest.skip("rc-web answered before each kill this time (the moment lasts"
                        " microseconds); every batch was queued once all the same")


def repeats(cluster):
    """Batches rc-web answered from their key: sent again, their answer lost."""
    return len(log_records(cluster, "rc-web", event="submit_repeated"))


def stepped_until(pid, predicate, timeout=30):
    """halted_when's, in the shortest steps there are (SIGCONT, then halt at
    once): rc-web's answer follows its commit within a step of 0.5 ms."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        os.kill(pid, signal.SIGCONT)
        if not halt(pid):
            return False
    return True


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


def test_a_batch_with_group_new_sent_again_and_racing_makes_one_group(cluster):
    before = cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0]
    batch = [shell("echo new-again-%d" % n) for n in range(3)]
    answers = [post(cluster, "/api/v1/tasks?group=new", batch, "new-again") for _ in range(3)]
    assert [status for status, _ in answers] == [201] * 3
    assert answers[0] == answers[1] == answers[2]
    # Four copies at once on four connections: each makes its group in its
    # own transaction, which the key's insert failing rolls back.
    batch, start, raced = [shell("echo new-race-%d" % n) for n in range(3)], \
        threading.Barrier(4), []

    def send():
        start.wait()
        raced.append(post(cluster, "/api/v1/tasks?group=new", batch, "new-race"))
    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in raced] == [201] * 4, raced
    assert len({json.dumps(answer) for _, answer in raced}) == 1, raced
    assert cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0] == before + 2
    assert count_tasks(cluster, "new-again-") == 3
    assert count_tasks(cluster, "new-race-") == 3


def test_a_batch_sent_again_into_its_known_group_pruned_since_answers_from_its_key(cluster):
    status, made = post(cluster, "/api/v1/tasks?group=new", [shell("echo pruned-0")],
                        "pruned-0")
    group_id = made["group_id"]
    path = "/api/v1/tasks?group=%d" % group_id
    status, first = post(cluster, path, [shell("echo pruned-1")], "pruned-1")
    assert status == 201
    ids = [task["task_id"] for task in made["tasks"] + first["tasks"]]
    wait_for(lambda: cluster.db.execute(
        "SELECT count(*) FROM tasks WHERE group_id = ? AND finished_at IS NOT NULL",
        (group_id,)).fetchone()[0] == 2, 30, "the group's tasks ended")
    # Pruned (the tasks past task_retention, then their group) while rc-web
    # still knows the group, within the keys' hour.
    later = time.time()     # theirs alone are a retention old: the others stay
    cluster.db.execute("UPDATE tasks SET finished_at = 1 WHERE task_id IN (%s)"
                       % ",".join(map(str, ids)))
    cluster.db.execute("UPDATE task_groups SET created_at = 1 WHERE group_id = ?", (group_id,))
    housekeeping.prune_tasks(cluster.db, cluster.config.task_retention, later)
    housekeeping.prune_groups(cluster.db, cluster.config.task_retention, later)
    assert cluster.db.execute("SELECT count(*) FROM task_groups WHERE group_id = ?",
                              (group_id,)).fetchone()[0] == 0
    assert post(cluster, path, [shell("echo pruned-1")], "pruned-1") == (201, first)
    status, answer = post(cluster, path, [shell("echo pruned-2")], "pruned-2")
    assert status == 404, answer
    assert count_tasks(cluster, "pruned-2") == 0


# -- the client's function stored once ------------------------------------------------

TABLE = list(range(100000))        # over PIECES_IN_CODE: the function goes as a file


def look_up(index):
    return TABLE[index]


def test_a_long_lived_executor_whose_function_s_file_was_swept_goes_on(cluster, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("kept\n")
    with client.Executor(cluster.url, cluster.token, inputs=[str(data)]) as executor:
        first = executor.submit(look_up, 5)
        assert first.result(60) == 5
        assert executor.submit(len, BIG_ARGUMENT).result(60) == len(BIG_ARGUMENT)
        # A month idle (task_retention and files_retention_days are both 30
        # days): its tasks and group pruned, then its files swept, by the
        # upkeep run here with their clock made a retention old.
        group_id = cluster.db.execute("SELECT group_id FROM tasks WHERE task_id = ?",
                                      (first.task_id,)).fetchone()[0]
        cluster.db.execute("UPDATE tasks SET finished_at = 1 WHERE group_id = ?", (group_id,))
        cluster.db.execute("UPDATE task_groups SET created_at = 1 WHERE group_id = ?",
                           (group_id,))
        assert housekeeping.prune_tasks(cluster.db, cluster.config.task_retention,
                                        time.time()) == 2
        assert housekeeping.prune_groups(cluster.db, cluster.config.task_retention,
                                         time.time()) == 1
        assert files.sweep(cluster.db, cluster.config, time.time()
                           + cluster.config.files_retention_days * DAY + 60) >= 3
        assert executor.submit(look_up, 6).result(60) == 6
        assert list(executor.map(look_up, range(30))) == list(range(30))
        # A call's arguments, held until its task is queued, are put again
        # too (session 46: the first call after the sweep was refused).
        assert executor.submit(len, BIG_ARGUMENT).result(60) == len(BIG_ARGUMENT)


BIG_ARGUMENT = b"x" * (client.MAX_ARGUMENT_BYTES + 1)    # goes as a file of its own


WIDE = list(range(100000, 200000))      # another file than TABLE's


def look_up_wide(index):
    return WIDE[index]


def test_two_executors_in_two_threads_put_the_same_function_at_once(cluster):
    start, outcomes = threading.Barrier(2), []

    def run():
        with client.Executor(cluster.url, cluster.token) as executor:
            start.wait()
            outcomes.append(list(executor.map(look_up_wide, range(50))))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes == [list(range(100000, 100050))] * 2


DEEP = list(range(200000, 300000))


def look_up_deep(index):
    return DEEP[index]


def test_rc_web_killed_while_the_function_s_file_is_put_the_calls_run_once(cluster):
    with client.Executor(cluster.url, cluster.token) as executor:
        assert executor.submit(look_up, 1).result(60) == 1      # rc-web answered it
        pid = cluster.program_pid("rc-web")
        assert halt(pid)
        before = len(links(cluster))
        calls = []
        submitting = threading.Thread(target=lambda: calls.extend(
            executor.submit(look_up_deep, n) for n in range(20)))
        submitting.start()
        try:
            # The submitting thread's own connection, its put on the way.
            wait_for(lambda: len(links(cluster)) > before, 30, "the put sent")
        finally:
            kill_program(cluster, "rc-web")
        submitting.join(120)
        assert [call.result(120) for call in calls] == list(range(200000, 200020))
        ids = {call.task_id for call in calls}
        assert cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE task_id IN (%s) AND state = 'completed'"
            % ",".join(map(str, ids))).fetchone()[0] == len(ids)


def links(cluster):
    """This process's connections to rc-web."""
    import psutil
    return [link for link in psutil.Process().net_connections("tcp") if link.raddr
            and link.raddr[1] == cluster.config.web_port and link.status == "ESTABLISHED"]


def test_rc_web_killed_as_it_works_on_a_cancel_the_future_is_cancelled(cluster):
    with client.Cluster(cluster.url, cluster.token) as session:
        future = session.submit("sleep", 30, requirements={"device_id": "nobody"})
        future.wait_submitted(30)
        pid = cluster.program_pid("rc-web")
        assert halt(pid)
        before, outcome = len(links(cluster)), []
        cancelling = threading.Thread(target=lambda: outcome.append(cancelled(future)))
        cancelling.start()
        try:
            wait_for(lambda: len(links(cluster)) > before, 30, "the cancel sent")
        finally:
            kill_program(cluster, "rc-web")
        cancelling.join(120)
        # Before: ClusterError: no answer from http://...: Connection reset by
        # peer, from Future.cancel(), and the task left queued.
        assert outcome == [True]
        assert future.cancelled()
        assert cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                  (future.task_id,)).fetchone()[0] == "cancelled"


def test_a_map_s_timeout_with_rc_web_stopped_raises_without_waiting_for_it(cluster):
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "nobody"}) as executor:
        calls = executor.map(never_run, range(4), timeout=3, chunksize=4)
        wait_for(lambda: count_tasks(cluster, "never_run") == 1, 30, "its task queued")
        cluster.supervisorctl("stop", "rc-web")
        try:
            began = time.monotonic()
            with pytest.raises(concurrent.futures.TimeoutError):
                list(calls)
            # Before: its cancels waited for rc-web up to UNREACHABLE_WAIT
            # (600 s), and map(timeout=3) raised ten minutes later.
            assert time.monotonic() - began < client.UNREACHABLE_WAIT / 5
        finally:
            cluster.supervisorctl("start", "rc-web")
            wait_for(lambda: ready(cluster), 30, "rc-web back")
            executor.shutdown(wait=False, cancel_futures=True)


def never_run(number):      # required of a device that is not there
    return number


def cancelled(future):
    try:
        return future.cancel()
    except Exception as e:
        return e


# -- each main-node program killed during a client's map and an rc map ------------------

PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-files")


SQUARES = [n * n for n in range(100000)]     # a file, which devices fetch from rc-files


def square(number):
    return SQUARES[number]


def test_each_program_killed_during_a_map_of_thousands_and_an_rc_map_with_outputs(
        cluster, tmp_path):
    count, inputs = 3000, 100
    into = tmp_path / "into"
    into.mkdir()
    first = cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]
    mapping = subprocess.Popen(
        [RC, "map", "--require", "device_id=%s" % DEVICE, "--output", "{}.out", "--into",
         str(into), "echo out-{} > {}.out"] + ["in%d" % n for n in range(inputs)],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    outcome = {}

    def run():
        with client.Executor(cluster.url, cluster.token) as executor:
            try:
                outcome["values"] = list(executor.map(square, range(count), chunksize=10))
            except Exception as e:      # a clear error is an outcome too
                outcome["error"] = e
    mapper = threading.Thread(target=run)
    mapper.start()
    try:
        for name in PROGRAMS * 2:
            done = ended(cluster, first)
            # Some work done since the last kill: each kill lands mid-way.
            wait_for(lambda: ended(cluster, first) > done or not mapper.is_alive(), 60,
                     "tasks ending before %s's kill" % name)
            kill_program(cluster, name)
        mapper.join(180)
        out, err = mapping.communicate(timeout=180)
    finally:
        mapping.kill()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["values"] == [n * n for n in range(count)]
    assert mapping.returncode == 0, err
    for n in range(inputs):
        assert (into / ("in%d.out" % n)).read_text() == "out-in%d\n" % n
    ids = [row[0] for row in cluster.db.execute(
        "SELECT task_id FROM tasks WHERE task_id > ?", (first,))]
    wait_all_finished(cluster, ids, 30)
    assert_one_terminal_state_each(cluster, ids)
    assert cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ? AND state !="
                              " 'completed'", (first,)).fetchone()[0] == 0


def ended(cluster, first):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ? AND"
                              " finished_at IS NOT NULL", (first,)).fetchone()[0]


def test_rc_web_killed_between_the_batches_of_a_map_s_submits(cluster):
    count = 3000
    first = cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]
    with client.Executor(cluster.url, cluster.token) as executor:
        assert executor.submit(square, 2).result(60) == 4     # rc-web answered it
        first = cluster.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
        pid = cluster.program_pid("rc-web")
        assert halt(pid)
        outcome = []
        mapper = threading.Thread(target=lambda: outcome.append(
            list(executor.map(square, range(count), chunksize=10))))
        mapper.start()
        try:
            # Some batches queued, the rest still to send.
            assert stepped_until(pid, lambda: 0 < queued_since(cluster, first)), \
                "no batch was queued"
            caught = queued_since(cluster, first) < count // 10
        finally:
            kill_program(cluster, "rc-web")
        mapper.join(120)
    assert outcome == [[n * n for n in range(count)]]
    assert queued_since(cluster, first) == count // 10
    assert caught, "rc-web queued every batch before its kill"


def queued_since(cluster, first):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ?",
                              (first,)).fetchone()[0]
