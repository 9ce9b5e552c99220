"""A user at work, session 31, and the main node restarting under them: a
Python program's submits while rc-web restarts, `rc map` and `rc wait`
through `make stop` ... `make run`. Each test restarts programs of a real
cluster (supervisorctl, make) the way the README says."""
import logging
import os
import subprocess
import threading
import time

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from test_server import running_on_dev1, server  # noqa: F401 (a fixture)
from rc import client, tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """One cluster for the module: a start and stop is ~3 s of supervisord
    and five programs (more on a loaded machine), paid once instead of by
    each test; `cluster` puts it back as each test found it."""
    cluster = Cluster(tmp_path_factory.mktemp("real-work") / "home")
    cluster.start()
    wait_for(lambda: online(cluster), 60, "the local worker")
    cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    cluster.local = online(cluster)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster, and after the test as before it: the main node
    running with every program (a test stops rc-web, rc-scheduler, the local
    worker or the whole main node), the test's own workers stopped, the
    local worker the one device online."""
    cluster = module_cluster
    yield cluster
    cluster.put_back()
    wait_for(lambda: online(cluster) == cluster.local, 60, "only the local worker online")


def tasks_with_command(cluster, command):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE json_extract(payload,"
                              " '$.command') = ?", (command,)).fetchone()[0]


def test_a_submit_while_rc_web_restarts_waits_for_it_and_goes_on(cluster, caplog):
    """A program submitting as it reads its data (one submit every few ms)
    while rc-web restarted: the futures sent in that second failed with
    `cannot reach http://...: Connection refused`, and a program over 1,500
    of them lost 17. Now a request that could not connect to an rc-web
    that answered before (nothing was sent) waits for it, saying so once on
    stderr, and goes on: the task is queued once and its result comes."""
    caplog.set_level(logging.WARNING, logger="rc.client")
    with client.Cluster(cluster.url, cluster.token) as connection:
        assert connection.submit("shell", "echo before").result(timeout=120) == "before\n"
        cluster.supervisorctl("stop", "rc-web")
        outcome = {}

        def submit():
            try:
                outcome["value"] = connection.submit("shell", "echo through").result(
                    timeout=180)
            except Exception as e:       # what the user's program saw
                outcome["error"] = e
        thread = threading.Thread(target=submit)
        thread.start()
        wait_for(lambda: "error" in outcome or "waiting for it to answer again" in caplog.text,
                 30, "the client to say it waits")
        time.sleep(1.5)                  # it tries again while rc-web is down
        assert outcome == {}
        assert "start" in cluster.supervisorctl("start", "rc-web")
        thread.join(180)
        assert outcome == {"value": "through\n"}
    assert "answers again" in caplog.text
    assert tasks_with_command(cluster, "echo through") == 1


def test_a_call_that_says_how_long_it_waits_gives_up_on_a_stopped_rc_web_in_that_time(
        cluster):
    """get_result(wait=S) and results(wait=S) while rc-web was stopped
    waited for it UNREACHABLE_WAIT (10 minutes), however short S. Now a
    call tries again no longer than its caller said it waits, then says
    why, as a call that never reached rc-web does."""
    with client.Cluster(cluster.url, cluster.token) as connection:
        task_id = connection.submit("shell", "true").wait_submitted(60)
        assert connection.get_result(task_id, wait=30)["state"] == "completed"
        cluster.supervisorctl("stop", "rc-web")
        for name, call in (("get_result", lambda: connection.get_result(task_id, wait=2)),
                           ("results", lambda: connection.results([task_id], wait=2))):
            outcome = {}

            def waiting():
                started = time.monotonic()
                try:
                    outcome["value"] = call()
                except client.ClusterError as e:
                    outcome["error"] = e
                outcome["seconds"] = time.monotonic() - started
            thread = threading.Thread(target=waiting, daemon=True)
            thread.start()
            thread.join(30)
            assert "seconds" in outcome, "%s still waiting after 30 s" % name
            assert "cannot reach" in str(outcome.get("error")), (name, outcome)
            assert 1.5 <= outcome["seconds"] < 10, (name, outcome)


def test_a_client_that_never_reached_rc_web_fails_at_once(tmp_path):
    """The wait is for an rc-web that went away, not a wrong RC_URL: one
    that never answered is an error at once, as before."""
    with client.Cluster("http://127.0.0.1:%d" % free_listening_port(), "t") as connection:
        started = time.monotonic()
        with pytest.raises(client.ClusterError, match="cannot reach"):
            connection.submit("shell", "true").result(timeout=60)
        assert time.monotonic() - started < 10


def free_listening_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_rc_map_and_rc_wait_say_when_the_main_node_stops_under_them(cluster, tmp_path):
    """`make stop` while `rc map` and `rc wait` waited: both sat silent for
    as long as the main node was down (a user could not tell a stopped
    cluster from slow tasks). Now each says once that the main node is not
    running and that it waits, once that it runs again, and ends as it
    would have: every input's output once. `rc submit` says the task waits
    for the main node too. (The tasks need a device that
    joins only after `make run`, so that none can end while it is down.)"""
    env = cluster.env
    lone = cluster.rc("submit", "shell", "echo lone", "--require", "tag=later").stdout.strip()
    map_err, wait_err = tmp_path / "map.err", tmp_path / "wait.err"
    with open(str(map_err), "w") as m_err, open(str(wait_err), "w") as w_err:
        mapping = subprocess.Popen([RC, "map", "echo {}", "-k", "--require", "tag=later",
                                    "a", "b", "c"], env=env, stdout=subprocess.PIPE,
                                   stderr=m_err, universal_newlines=True)
        waiting = subprocess.Popen([RC, "wait", lone], env=env, stdout=subprocess.PIPE,
                                   stderr=w_err, universal_newlines=True)
        wait_for(lambda: "inputs" in map_err.read_text(), 60, "the map to start")
        stopped = cluster.make("stop")
        assert stopped.returncode == 0, stopped.stdout
        for err in (map_err, wait_err):
            wait_for(lambda: "the main node is not running" in err.read_text(), 60,
                     "%s to say the main node stopped" % err.name)
        assert mapping.poll() is None and waiting.poll() is None
        queued = cluster.rc("submit", "echo", "queued while stopped")   # said so, too
        assert queued.stdout.strip().isdigit()
        assert "is queued; the main node is not running" in queued.stderr, queued.stderr
        started = cluster.make("run")
        assert started.returncode == 0, started.stdout
        cluster.start_worker("later", "--tag", "later")
        map_out, _ = mapping.communicate(timeout=180)
        wait_out, _ = waiting.communicate(timeout=180)
    assert mapping.returncode == 0 and map_out == "a\nb\nc\n", map_err.read_text()
    assert waiting.returncode == 0 and wait_out == "lone\n", wait_err.read_text()
    for err in (map_err, wait_err):
        text = err.read_text()
        assert text.count("the main node is not running") == 1, text
        assert text.count("the main node is running again") == 1, text
        assert "Traceback" not in text
    assert "(`make run`)" in map_err.read_text()


def test_an_input_larger_than_a_phones_cache_goes_once_its_task_ends(cluster, tmp_path):
    """A phone joined with `--cache-mb 50` ran a task on a 200 MB file and
    kept it: 191 MB in its cache until the next task fetched something,
    four times what its owner allowed. The cap is now kept once the task
    that needed the input has ended (here: 1 MiB, an input of 3 MiB)."""
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("phone", "--cache-mb", "1")
    wait_for(lambda: "phone" in online(cluster), 60, "the phone")
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(3 * 1024 * 1024))
    task_id = cluster.rc("submit", "shell", "wc -c < big.bin", "--input", str(data)).stdout
    done = cluster.rc("wait", task_id.strip())
    assert done.stdout.strip() == str(3 * 1024 * 1024)
    cache = os.path.join(cluster.home, "worker-state", "cache")

    def cached_bytes():
        return sum(os.path.getsize(os.path.join(cache, name)) for name in os.listdir(cache)
                   if len(name) == 64)
    wait_for(lambda: cached_bytes() <= 1024 * 1024, 30, "the cache back under its cap")


def test_a_big_file_got_while_rc_web_restarts_is_taken_up_where_it_was_cut(
        cluster, tmp_path, monkeypatch, caplog):
    """`Cluster.get(sha, path)` of a big file while rc-web restarted ended
    in `bad answer ...: the answer was cut short` and the download was lost.
    Now the client asks for the rest (Range: bytes=N-), once rc-web answers
    again, and the file written is whole and checked."""
    caplog.set_level(logging.WARNING, logger="rc.client")
    data = os.urandom(48 * 1024 * 1024)
    with client.Cluster(cluster.url, cluster.token) as connection:
        stored = connection.put(data)
        first_piece, restarted = threading.Event(), threading.Event()
        real_sha256 = client.hashlib.sha256

        class HeldDigest:
            """The download's hash: it holds the first piece until rc-web restarted."""
            def __init__(self, *data):
                self.inner = real_sha256(*data)

            def update(self, piece):
                first_piece.set()
                restarted.wait(120)
                self.inner.update(piece)

            def hexdigest(self):
                return self.inner.hexdigest()
        monkeypatch.setattr(client.hashlib, "sha256", HeldDigest)
        outcome = {}

        def get():
            try:
                outcome["path"] = connection.get(stored, str(tmp_path / "got.bin"))
            except Exception as e:
                outcome["error"] = e
        thread = threading.Thread(target=get)
        thread.start()
        assert first_piece.wait(60)
        cluster.supervisorctl("restart", "rc-web")
        restarted.set()
        thread.join(180)
        monkeypatch.undo()
    assert outcome == {"path": str(tmp_path / "got.bin")}
    assert (tmp_path / "got.bin").read_bytes() == data
    assert "taking it up there" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_a_result_sent_again_after_its_ack_was_lost_is_acked_quietly(server):
    """rc-server restarted while results came in: each worker sent again
    the results whose ack it had not had, as it should, and rc-server
    logged each as a WARNING `stale_result` and answered an error, `task N
    attempt 1 is not assigned to phone31; result ignored` (the worker logs
    that too): a user reading the warnings thought results were lost. A
    result the task already holds, from the same device and attempt, is
    now acked alone, and logged at info as `result_again`."""
    instance, port = server
    client, task_id, connection = running_on_dev1(instance, port)
    result = {"task_id": task_id, "attempt": 1, "status": "completed",
              "result": {"output": "hi", "exit_code": 0}}
    client.send("task_result", result)
    assert client.receive()["message_type"] == "task_result_ack"
    wait_for(lambda: tasks.get(connection, task_id)["state"] == "completed", 5, "completed")
    client.send("task_result", result)          # its ack lost: sent again
    assert client.receive()["message_type"] == "task_result_ack"
    client.send("task_result", dict(result, task_id=task_id + 1000))   # a stale one still is
    replies = [client.receive(), client.receive()]
    assert [r["message_type"] for r in replies] == ["task_result_ack", "error"]
    assert replies[1]["data"]["task_id"] == task_id + 1000
    logged = wait_for(lambda: instance.log.stream.getvalue().decode().count('"stale_result"'),
                      5, "the stale one logged") and instance.log.stream.getvalue().decode()
    assert logged.count('"stale_result"') == 1 and '"result_again"' in logged
    connection.close()


def test_rc_why_and_a_waiting_map_name_a_stopped_scheduler(cluster, tmp_path):
    """With rc-scheduler stopped (`rc ctl stop rc-scheduler`, or one that
    keeps crashing), `rc why` of a queued task said "it should be assigned
    in a moment", and so did `rc map` after 5 s without an end: a moment
    that never came. Both now name the program and how to start it."""
    cluster.supervisorctl("stop", "rc-scheduler")
    task_id = cluster.rc("submit", "echo", "hi").stdout.strip()
    why = cluster.rc("why", task_id).stdout
    assert "queued" in why and "But rc-scheduler is STOPPED: `rc ctl start rc-scheduler`." \
        in why, why
    map_err = tmp_path / "map.err"
    with open(str(map_err), "w") as err:
        mapping = subprocess.Popen([RC, "map", "echo {}", "a"], env=cluster.env,
                                   stdout=subprocess.PIPE, stderr=err, universal_newlines=True)
        wait_for(lambda: "no input has ended" in map_err.read_text(), 60, "the map to say why")
        assert "But rc-scheduler is STOPPED" in map_err.read_text()
        cluster.supervisorctl("start", "rc-scheduler")
        assert mapping.communicate(timeout=120)[0] == "a\n"
    wait_for(lambda: "Task %s completed" % task_id in cluster.rc("why", task_id).stdout, 60,
             "the echo task to complete")
    assert "STOPPED" not in cluster.rc("why", task_id).stdout


def test_results_that_ended_while_rc_web_was_down_come_soon_after_it_is_back(cluster):
    """A task ended while rc-web was stopped for a while: its result()
    came up to 30 s after rc-web was back, the stream's reopening having
    doubled its wait to 16 s, then 30 s, while each try was refused. A
    refused connection costs nothing: it is tried every 2 s at most."""
    with client.Cluster(cluster.url, cluster.token) as connection:
        future = connection.submit("shell", "sleep 3; echo late")
        wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                            (future.wait_submitted(60),)).fetchone()[0]
                 == "running", 60, "the task to run")
        cluster.supervisorctl("stop", "rc-web")
        time.sleep(17)      # refused at 0.5, 1.5, 3.5, 7.5, 15.5 s: the next try was at 31.5
        assert "start" in cluster.supervisorctl("start", "rc-web")
        back = time.monotonic()
        assert future.result(timeout=120) == "late\n"
        assert time.monotonic() - back < 9
