"""A running task's output so far: `rc tail [-f]`, POST .../watch and GET
.../output (lib/rc/tails.py), on a real cluster. Before, a task's stdout and
stderr reached the main node only with its result: a long-running task (a
service, a training run) showed nothing until it ended."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import db, tails, tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tail") / "home")
    cluster.start()
    wait_for(lambda: online(cluster), 60, "the local worker")
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
    yield cluster
    cluster.stop()


@pytest.fixture
def gate():
    """A file a task waits for: it runs (writing) until the test lets it end."""
    directory = tempfile.mkdtemp(prefix="rc-tail-")
    os.chmod(directory, 0o755)        # the task runs as a uid of its own
    yield os.path.join(directory, "open")
    shutil.rmtree(directory, ignore_errors=True)


def submit(cluster, command):
    return tasks.submit_many(cluster.db, cluster.config,
                             [{"task_type": "shell", "payload": {"command": command}}])[0]


def state(cluster, task_id):
    return tasks.get(cluster.db, task_id)["state"]


def http(cluster, method, path, headers=None):
    request = urllib.request.Request(cluster.url + path, method=method, data=b"" if method ==
                                     "POST" else None, headers=headers or {})
    request.add_header("Authorization", "Bearer " + cluster.token)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_rc_tail_shows_a_running_tasks_output_before_it_ends(cluster, gate):
    task_id = submit(cluster, "echo first line; echo a warning >&2; "
                              "while [ ! -e %s ]; do sleep 0.1; done; echo last line" % gate)
    wait_for(lambda: state(cluster, task_id) == "running", 60, "the task to run")
    # The worker sends a stream only once someone watches: the first look may be early.
    shown = {}

    def tailed():
        done = cluster.rc("tail", str(task_id))
        shown.update(out=done.stdout, err=done.stderr)
        return done.stdout == "first line\n"
    wait_for(tailed, 30, "rc tail to show the first line")
    assert shown["err"] == "a warning\n"
    assert state(cluster, task_id) == "running", "shown while it still runs"
    open(gate, "w").close()
    wait_for(lambda: state(cluster, task_id) == "completed", 60, "the task to end")
    done = cluster.rc("tail", str(task_id))
    assert (done.stdout, done.stderr) == ("first line\nlast line\n", "a warning\n")


def test_rc_tail_follow_prints_each_line_as_it_comes_and_ends_with_the_task(cluster, gate):
    task_id = submit(cluster, "i=0; while [ ! -e %s ]; do i=$((i+1)); echo tick $i;"
                              " sleep 0.3; done; echo bye; exit 3" % gate)
    follow = subprocess.Popen([RC, "tail", "-f", str(task_id)], env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
    try:
        assert follow.stdout.readline() == "tick 1\n"
        assert follow.stdout.readline() == "tick 2\n"
        assert follow.poll() is None and state(cluster, task_id) == "running"
        open(gate, "w").close()
        out, err = follow.stdout.read(), follow.stderr.read()   # the buffer's lines too
        follow.wait(60)
    finally:
        if follow.poll() is None:
            follow.kill()
    lines = out.splitlines()
    assert lines[-1] == "bye" and lines[:-1] == ["tick %d" % n for n in
                                                  range(3, len(lines) + 2)], \
        "every line once, in order, the last after the task ended"
    assert follow.returncode == 1 and "task %d failed" % task_id in err


def test_the_http_api_watches_a_task_and_reads_its_output(cluster, gate):
    task_id = submit(cluster, "head -c 200000 /dev/zero | tr '\\0' x; echo; echo done;"
                              " while [ ! -e %s ]; do sleep 0.1; done" % gate)
    wait_for(lambda: state(cluster, task_id) == "running", 60, "the task to run")
    # Read access, as a device's watch, but not from another site's page.
    with pytest.raises(urllib.error.HTTPError) as refused:
        http(cluster, "POST", "/api/v1/tasks/%d/watch" % task_id,
             headers={"Origin": "http://elsewhere.example"})
    assert refused.value.code == 403
    watched = http(cluster, "POST", "/api/v1/tasks/%d/watch?seconds=30" % task_id)
    assert watched["task_id"] == task_id and watched["watched_until"] > time.time() + 20
    record = {}

    def reported():
        record.update(http(cluster, "GET", "/api/v1/tasks/%d/output" % task_id))
        return record["stdout_end"] == 200006
    wait_for(reported, 30, "the device to report the whole stream")
    assert record["live"] is True and record["state"] == "running"
    # More than is kept came: the latest tails.TAIL_CHARS of it, ending where it ends.
    assert len(record["stdout"]) == tails.TAIL_CHARS
    assert record["stdout"].endswith("x\ndone\n") and set(record["stdout"][:-6]) == {"x"}
    assert record["stderr"] == "" and record["stderr_end"] == 0
    open(gate, "w").close()
    wait_for(lambda: state(cluster, task_id) == "completed", 60, "the task to end")
    ended = http(cluster, "GET", "/api/v1/tasks/%d/output" % task_id)
    assert ended["live"] is False and ended["stdout"].endswith("x\ndone\n")
    with pytest.raises(urllib.error.HTTPError) as missing:
        http(cluster, "GET", "/api/v1/tasks/999999/output")
    assert missing.value.code == 404


def test_output_nobody_watches_is_not_sent_and_another_devices_is_not_kept(cluster, gate):
    task_id = submit(cluster, "echo unwatched; while [ ! -e %s ]; do sleep 0.1; done" % gate)
    wait_for(lambda: state(cluster, task_id) == "running", 60, "the task to run")
    time.sleep(1.5)             # a sweep and a report interval: nothing is asked for
    assert cluster.db.execute("SELECT count(*) FROM task_tails WHERE task_id = ?",
                              (task_id,)).fetchone()[0] == 0
    task = tasks.get(cluster.db, task_id)
    with db.write(cluster.db):
        assert tails.watch(cluster.db, task_id, 30, time.time()) is not None
        assert not tails.store(cluster.db, task_id, task["attempt"], "not-its-device", "stdout",
                               0, 5, "fake\n", time.time())
        assert not tails.store(cluster.db, task_id, task["attempt"] + 1, task["device_id"],
                               "stdout", 0, 5, "fake\n", time.time())
    wait_for(lambda: tails.output(cluster.db, task_id)["stdout"] == "unwatched\n", 30,
             "the device's own report")
    open(gate, "w").close()
    wait_for(lambda: state(cluster, task_id) == "completed", 60, "the task to end")


def test_a_queued_or_unknown_task(cluster):
    done = cluster.rc("tail", "999999", check=False)
    assert done.returncode == 1 and "no task 999999" in done.stderr
    with db.write(cluster.db):
        cluster.db.execute("UPDATE devices SET drained = 1")
    try:
        task_id = submit(cluster, "echo never")
        done = cluster.rc("tail", str(task_id))
        assert done.stdout == "" and "task %d is queued; nothing from it yet" % task_id \
            in done.stderr
    finally:
        with db.write(cluster.db):
            cluster.db.execute("UPDATE devices SET drained = 0")
    wait_for(lambda: state(cluster, task_id) == "completed", 60, "the task to run")


def test_the_worker_sends_whole_utf8_characters_only():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bin"))
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "rc_worker_tail", os.path.join(os.path.dirname(os.path.dirname(__file__)), "bin",
                                       "worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    text = "aé€😀".encode()
    for cut in range(len(text) + 1):
        whole = worker.utf8_whole(text[:cut])
        assert text[:whole].decode() in ("", "a", "aé", "aé€", "aé€😀")
        assert cut - whole < 4
    assert worker.utf8_whole(b"\xff\xfe") == 2, "not UTF-8: sent as it is"


def test_the_python_client_reads_a_running_tasks_output(cluster, gate):
    from rc import client
    with client.Cluster(cluster.url, cluster.token) as connection:
        future = connection.submit("shell", "echo from python; echo oops >&2;"
                                            " while [ ! -e %s ]; do sleep 0.1; done" % gate)
        record = {}

        def reported():
            record.update(connection.output(future))
            # Two pipes, read as each has bytes: one may be reported first.
            return record["stdout"] == "from python\n" and record["stderr"] == "oops\n"
        wait_for(reported, 30, "the running task's output")
        assert record["live"]
        assert not future.done()
        open(gate, "w").close()
        assert future.result(60) == "from python\n"
        ended = connection.output(future.task_id)
        assert ended["live"] is False and ended["stdout"] == "from python\n"


def test_the_client_after_a_lapsed_watch_waits_for_news(cluster, gate):
    """Cluster.output() once the last watch had lapsed returned the report
    kept from then at once (up to a minute old, more as the watch lapsed
    longer ago), though the task had written on since: it waited only for
    a first report. Now it waits for one sent after the new watch (the
    main node's time, POST .../watch's "now"), as rc tail does."""
    from rc import client
    later = gate + "-later"
    with client.Cluster(cluster.url, cluster.token) as connection:
        future = connection.submit("shell", "echo first; while [ ! -e %s ]; do sleep 0.1; done;"
                                            " echo second; while [ ! -e %s ]; do sleep 0.1;"
                                            " done" % (gate, later))
        task_id = future.wait_submitted()
        wait_for(lambda: state(cluster, task_id) == "running", 30, "the task running")
        http(cluster, "POST", "/api/v1/tasks/%d/watch?seconds=1" % task_id)
        wait_for(lambda: http(cluster, "GET", "/api/v1/tasks/%d/output" % task_id)["stdout"]
                 == "first\n", 30, "the first report")
        time.sleep(1.5)                 # the watch lapses, on the device too
        open(gate, "w").close()         # "second" is written while nobody watches
        wait_for(lambda: os.path.exists(gate), 5, "the gate")
        time.sleep(0.5)
        record = connection.output(future, wait=30)
        assert record["live"] and record["stdout"] == "first\nsecond\n", record
        open(later, "w").close()
        assert future.result(60) == "first\nsecond\n"
    os.unlink(later)
