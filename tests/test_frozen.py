"""Frozen devices (issues 17 and 23): a worker stopped with SIGSTOP keeps its
connection open. The main node must stop giving it work and send what it had
not accepted elsewhere, uncharged; the worker, on waking, must run nothing
that was given away meanwhile and must stop what was; and the join line `rc
join` prints must work for any token, one beginning with "-" too."""
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cluster_harness import WORKER, Cluster, online, wait_all_finished, wait_for
from rc import db, devices, explain, reaper, records, scheduler, tasks
from test_scheduler_reaper import LOG, add_device, store  # noqa: F401 (store is a fixture)
from test_server import Client, server, token_of  # noqa: F401 (server is a fixture)
from test_worker import WAIT, detailed, main, registered, spawn  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

# Everything a freeze sets off, in seconds rather than minutes; accept_timeout
# stays long, so a prompt hand-back can only be the suspect rule's doing.
SETTINGS = {"heartbeat_interval": 1.0, "lease_duration": 3.0, "ping_interval": 1.0,
            "suspect_after": 2.0, "accept_timeout": 20.0, "retry_backoff": 0.2,
            "retry_backoff_max": 1.0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("frozen"), **SETTINGS)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")     # only the workers of these tests
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def effects(drop_dir):
    """Where tasks leave their side effects. Every attempt runs as a uid of
    its own (the worker runs as root), so the directory is open to all and
    without the sticky bit: with it, fs.protected_regular would refuse a
    second uid's append, and a second execution would go unseen."""
    os.chmod(str(drop_dir), 0o777)
    return str(drop_dir)


def shared_file(effects, name):
    """A file any attempt of a task can append to, whatever its uid."""
    path = os.path.join(effects, name)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
    os.chmod(path, 0o666)
    return path


def start(cluster, device_id, *extra):
    cluster.start_worker(device_id, "--slots", "4", "--log-tasks", *extra)
    wait_for(lambda: device_id in online(cluster), 30, "%s to join" % device_id)


def stop(cluster, device_id):
    process = cluster.workers.pop(device_id)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def submit_shell(cluster, command, **options):
    return tasks.submit(cluster.db, cluster.config, "shell", {"command": command},
                        timeout=60, **options)


def appending(effects, name):
    """A task whose side effect is one line in its own file."""
    return "echo ran >> %s" % shlex.quote(shared_file(effects, name))


def device_row(cluster, device_id):
    return cluster.db.execute("SELECT suspect_since FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()


def task_row(cluster, task_id):
    return cluster.db.execute("SELECT state, attempt, device_id, retries_used, device_losses"
                              " FROM tasks WHERE task_id = ?", (task_id,)).fetchone()


def worker_events(cluster, device_id, event):
    import orjson
    found = []
    with open(cluster.worker_log(device_id), "rb") as f:
        for line in f:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


# -- the programs that read the suspect mark ------------------------------------------

def test_a_suspect_device_gets_nothing_and_says_why(store):
    config, connection = store
    add_device(connection, "ice", slots=4)
    add_device(connection, "pi", slots=4)
    with db.write(connection):
        devices.mark_suspect(connection, "ice", 1000.0)
    ids = [tasks.submit(connection, config, "shell", {"command": str(n)}) for n in range(3)]
    pinned = tasks.submit(connection, config, "shell", {"command": "x"},
                          requirements={"device_id": "ice"})
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 3
    assert {tasks.get(connection, i)["device_id"] for i in ids} == {"pi"}
    assert tasks.get(connection, pinned)["state"] == "queued"
    assert "ice (suspect for " in explain.why(connection, pinned, now=1010.0)
    assert records.device_status(devices.get(connection, "ice")) == "online,suspect"
    with db.write(connection):
        assert devices.clear_suspect(connection, "ice")
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 1


def test_the_reaper_hands_back_at_once_what_a_suspect_device_was_just_given(store):
    # The scheduler chose it before rc-server's mark committed.
    config, connection = store
    add_device(connection, "ice")
    task_id = tasks.submit(connection, config, "shell", {"command": "x"})
    assert scheduler.schedule(connection, 1001.0, LOG, config) == 1
    with db.write(connection):
        devices.mark_suspect(connection, "ice", 1001.5)
    reaper.sweep(connection, config, LOG, 1002.0)      # long before accept_timeout
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["not_before"]) == ("queued", 2, 1002.0)
    assert task["retries_used"] == 0 and task["device_losses"] == 0


# -- rc-server alone, a hand-driven client ------------------------------------------

def quick_liveness(instance):
    instance.config.ping_interval, instance.config.suspect_after = 0.3, 0.8


def suspect_since(connection):
    return connection.execute("SELECT suspect_since FROM devices WHERE device_id = 'dev1'"
                              ).fetchone()[0]


def assign_to_dev1(instance, connection, lease=60.0):
    task_id = tasks.submit(connection, instance.config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'assigned', device_id = 'dev1',"
                           " lease_expires = ? WHERE task_id = ?", (time.time() + lease, task_id))
    return task_id


def answer_pings(client, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        frame = client.receive()
        if frame["message_type"] == "ping":
            client.send("pong", {})


def test_a_device_that_stops_answering_pings_is_suspect_until_it_speaks(server):
    instance, port = server
    quick_liveness(instance)
    client = Client(port)
    client.register(token_of(instance))
    connection = db.connect(instance.config.db_path)
    answer_pings(client, 2.0)                  # quiet, but it answers: trusted
    assert suspect_since(connection) is None
    task_id = assign_to_dev1(instance, connection)       # it never answers this
    wait_for(lambda: suspect_since(connection), 5, "dev1 to be suspect")
    # Suspect: the assignment it has not accepted goes back at once, uncharged.
    wait_for(lambda: tasks.get(connection, task_id)["state"] == "queued", 5, "the hand-back")
    task = tasks.get(connection, task_id)
    assert (task["attempt"], task["retries_used"], task["device_losses"]) == (2, 0, 0)
    assert task["not_before"] <= time.time() and "answered nothing" in task["reason"]
    client.send("pong", {})                    # it speaks again
    wait_for(lambda: suspect_since(connection) is None, 5, "dev1 to be trusted again")
    connection.close()


def test_a_worker_older_than_ping_is_judged_by_its_assignments_alone(server):
    instance, port = server
    quick_liveness(instance)
    client = Client(port)
    client.register(token_of(instance))
    connection = db.connect(instance.config.db_path)
    assert client.receive()["message_type"] == "ping"
    time.sleep(1.5)                            # it ignores it, as old workers do
    assert suspect_since(connection) is None
    accepted = assign_to_dev1(instance, connection)
    assert client.receive()["data"]["task_id"] == accepted
    client.send("task_accept", {"task_id": accepted, "attempt": 1})
    time.sleep(1.5)
    assert suspect_since(connection) is None   # it took its assignment
    ignored = assign_to_dev1(instance, connection)
    wait_for(lambda: suspect_since(connection), 5, "dev1 to be suspect")
    assert tasks.get(connection, ignored)["state"] == "queued"
    assert tasks.get(connection, accepted)["state"] == "running"   # its lease holds
    connection.close()


def next_of(client, message_type):
    while True:
        frame = client.receive()
        if frame["message_type"] == message_type:
            return frame


def test_lease_check_answers_which_attempts_are_still_the_device_s(server):
    instance, port = server
    client = Client(port)
    client.register(token_of(instance))
    connection = db.connect(instance.config.db_path)
    kept, moved = (assign_to_dev1(instance, connection, lease=1.0),
                   assign_to_dev1(instance, connection))
    with db.write(connection):
        connection.execute("UPDATE tasks SET attempt = 2, device_id = NULL, state = 'queued',"
                           " lease_expires = NULL WHERE task_id = ?", (moved,))
    client.send("lease_check", {"tasks": [{"task_id": kept, "attempt": 1},
                                          {"task_id": moved, "attempt": 1}]})
    frame = next_of(client, "lease_check_ack")
    assert frame["data"]["active_tasks"] == [{"task_id": kept, "attempt": 1}]
    # What it confirms stays the device's long enough to be started.
    lease = connection.execute("SELECT lease_expires FROM tasks WHERE task_id = ?",
                               (kept,)).fetchone()[0]
    assert lease >= time.time() + instance.config.accept_timeout - 2
    client.send("lease_check", {"tasks": "all of them"})
    assert next_of(client, "error")["data"]["code"] == "bad_request"
    connection.close()


# -- the worker alone, against a hand-driven main node ------------------------------

def frozen_while_assigned(worker, link, *task_ids):
    """Freeze the worker past FREEZE_THRESHOLD while assignments wait in its socket."""
    link.pump(0.3)
    worker.proc.send_signal(signal.SIGSTOP)
    for task_id in task_ids:
        link.assign(task_id, "shell", {"command": "echo %d" % task_id})
    time.sleep(2.5)
    worker.proc.send_signal(signal.SIGCONT)
    # The question however late it comes, then a second in which nothing may start.
    frames = link.pump(WAIT, answer_checks=False, wanted=lambda frames: any(
        f["message_type"] == "lease_check" for f in frames))
    frames += link.pump(1.0, answer_checks=False)
    return [f for f in frames if f["message_type"] not in ("heartbeat", "pong")]


@detailed
def test_a_woken_worker_asks_before_it_starts_what_waited_out_the_freeze(main, spawn, python):
    worker, link = registered(main, spawn, python, assignment_lease=2.0)
    frames = frozen_while_assigned(worker, link, 1, 2)
    # It asked, and started nothing while the question was out.
    assert [f["message_type"] for f in frames] == ["lease_check"]
    link.assigned.discard((2, 1))          # given to another device meanwhile
    link.send("lease_check_ack", {"active_tasks": [{"task_id": 1, "attempt": 1}]})
    frames = link.pump(WAIT, wanted=lambda frames: worker.events("task_given_away") and any(
        f["message_type"] == "task_result" for f in frames))
    frames += link.pump(1.0)
    results = [f["data"] for f in frames if f["message_type"] == "task_result"]
    assert [(r["task_id"], r["status"]) for r in results] == [(1, "completed")]
    assert [e["task_id"] for e in worker.events("task_given_away")] == [2]
    assert worker.events("leases_in_doubt") and worker.events("leases_confirmed")
    # The doubt is over: the next assignment runs without a question.
    assert link.run("echo", {"message": "after"}, task_id=3)["status"] == "completed"


@detailed
def test_a_main_node_without_lease_check_gets_what_was_in_doubt_back(main, spawn, python):
    worker, link = registered(main, spawn, python, assignment_lease=2.0)
    frames = frozen_while_assigned(worker, link, 1, 2)
    assert [f["message_type"] for f in frames] == ["lease_check"]
    link.send("error", {"code": "unknown_message",
                        "message": "unknown message type 'lease_check'"})
    results = link.results(2)
    assert {results[i]["status"] for i in (1, 2)} == {"handed_back"}
    assert not link.accepted


# -- a whole cluster -------------------------------------------------------------------

def test_a_frozen_worker_gets_nothing_new_and_runs_nothing_given_away(cluster, effects):
    start(cluster, "ice")
    frozen = cluster.workers["ice"]
    os.kill(frozen.pid, signal.SIGSTOP)        # the worker only; its connection stays open
    stopped = time.time()
    try:
        # Assigned while "ice" still looks online: the frames wait in its socket.
        names = ["effect-%d" % n for n in range(6)]
        ids = [submit_shell(cluster, appending(effects, name)) for name in names]
        wait_for(lambda: device_row(cluster, "ice")["suspect_since"], 15, "ice to be suspect")
        suspect_at = time.time()
        assert "online,suspect" in cluster.rc("devices").stdout
        shown = cluster.rc("device", "ice").stdout
        assert "suspect" in shown and "suspect_since" in shown and " ago" in shown, shown
        # Handed back at once, uncharged: long before the 20 s accept_timeout.
        wait_for(lambda: all(task_row(cluster, i)["state"] == "queued" for i in ids), 5,
                 "the unaccepted tasks to be queued again")
        assert suspect_at - stopped < 10
        pinned = submit_shell(cluster, appending(effects, "pinned"),
                              requirements={"device_id": "ice"})
        time.sleep(1.0)
        assert task_row(cluster, pinned)["state"] == "queued"
        assert "suspect" in cluster.rc("why", str(pinned)).stdout
        start(cluster, "thaw")                  # they run there instead
        wait_all_finished(cluster, ids, 30)
        given_to_ice = {row[0] for row in cluster.db.execute(
            "SELECT task_id FROM task_events WHERE device_id = 'ice' AND state = 'assigned'")}
        assert len(given_to_ice) == 4           # its slots
        for task_id in ids:
            row = task_row(cluster, task_id)
            assert (row["state"], row["device_id"]) == ("completed", "thaw")
            assert row["retries_used"] == 0 and row["device_losses"] == 0
            assert row["attempt"] == (2 if task_id in given_to_ice else 1)
        assert not cluster.db.execute(
            "SELECT count(*) FROM task_events WHERE device_id = 'ice' AND state = 'assigned'"
            " AND time > ?", (suspect_at,)).fetchone()[0]
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Awake again: it asks before running what waited in its socket, and runs
    # none of it; it is no longer suspect and takes new work.
    wait_all_finished(cluster, [pinned], 30)
    assert task_row(cluster, pinned)["device_id"] == "ice"
    for name in names:
        with open(os.path.join(effects, name)) as f:
            assert f.read() == "ran\n", name
    started = {(e["task_id"], e["attempt"]) for e in worker_events(cluster, "ice", "task_started")}
    assert started == {(pinned, task_row(cluster, pinned)["attempt"])}
    assert worker_events(cluster, "ice", "leases_in_doubt")
    assert device_row(cluster, "ice")["suspect_since"] is None
    stop(cluster, "ice")
    stop(cluster, "thaw")


def stamping(effects, name, seconds):
    """A task that writes "pid time" ten times a second for `seconds`, or
    until a file NAME.enough appears."""
    path = shlex.quote(shared_file(effects, name))
    enough = shlex.quote(os.path.join(effects, name + ".enough"))
    return ("i=0; while [ $i -lt %d ] && [ ! -e %s ]; do echo \"$$ $(date +%%s.%%N)\" >> %s;"
            " sleep 0.1; i=$((i+1)); done" % (seconds * 10, enough, path))


def executions(path):
    """pid -> (first, last) time it wrote."""
    runs = {}
    with open(path) as f:
        for line in f:
            pid, stamp = line.split()
            first, last = runs.get(pid, (float(stamp), float(stamp)))
            runs[pid] = (min(first, float(stamp)), max(last, float(stamp)))
    return runs


@pytest.mark.parametrize("whole_device", [False, True], ids=["worker_only", "whole_device"])
def test_a_task_running_through_a_freeze_is_stopped_on_waking(cluster, effects, whole_device):
    """The lease of a running task ends during the freeze and its second
    attempt starts elsewhere. With the worker alone stopped its task runs on
    through the freeze (nothing on that device can stop it); with the whole
    device frozen (a closed lid) it does not. Either way, on waking the worker
    stops it before its second attempt could overlap it by more than a second."""
    start(cluster, "lid")
    path = os.path.join(effects, "stamps")
    task_id = submit_shell(cluster, stamping(effects, "stamps", 8))
    wait_for(lambda: os.path.getsize(path) > 0, 15, "the first attempt to start")
    worker = psutil.Process(cluster.workers["lid"].pid)
    family = [worker] + worker.children(recursive=True) if whole_device else [worker]
    for process in family:
        process.send_signal(signal.SIGSTOP)
    try:
        start(cluster, "spare")
        wait_for(lambda: len(executions(path)) == 2, 30, "the second attempt to start")
        time.sleep(1.0)
    finally:
        for process in family:
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    woke = time.time()
    # The second attempt need not run its 8 s out: once the first has had
    # twice the second it may write after waking, the file ends both (a
    # first attempt still running then has written past that second).
    time.sleep(2.0)
    open(path + ".enough", "w").close()
    wait_all_finished(cluster, [task_id], 30)
    first, second = sorted(executions(path).values())
    assert first[1] - woke < 1.0            # stopped on waking
    assert first[1] - max(second[0], woke) < 1.0
    assert worker_events(cluster, "lid", "task_fenced")
    # Then it goes on taking work.
    later = submit_shell(cluster, appending(effects, "later"), requirements={"device_id": "lid"})
    wait_all_finished(cluster, [later], 30)
    assert task_row(cluster, later)["state"] == "completed"
    stop(cluster, "lid")
    stop(cluster, "spare")


def test_the_worker_takes_a_token_beginning_with_a_dash_every_safe_way(tmp_path, monkeypatch):
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    token = "-Dgi7kQ_x"
    assert worker.parse_args(["--join", "h", "--token=" + token]).token == token
    path = tmp_path / "token"
    path.write_text(token + "\n")
    assert worker.parse_args(["--join", "h", "--token-file", str(path)]).token == token
    monkeypatch.setenv("RC_TOKEN", token)
    assert worker.parse_args(["--join", "h"]).token == token
    assert "RC_TOKEN" not in os.environ          # tasks must not inherit it


def test_the_join_line_works_for_a_token_beginning_with_a_dash(cluster, tmp_path):
    with open(cluster.config.token_path, "w") as f:     # as an older install made them
        f.write("-Dgi7kQ_x-token-from-before\n")
    line = cluster.rc("join").stdout.splitlines()[2]
    assert line.startswith("python3 worker.py --join ")
    # The printed line as it is, but for this interpreter and file and the
    # loopback address; the token part stays as printed.
    address = shlex.split(line)[3]
    command = line.replace("python3 worker.py", "%s -I %s" % (
        shlex.quote(sys.executable), shlex.quote(WORKER)), 1).replace(
        " --join %s " % address, " --join 127.0.0.1:%d " % cluster.config.tcp_port, 1)
    command += " --device-id dashed --state-dir %s" % shlex.quote(str(tmp_path))
    assert " --token=-Dgi7kQ_x-token-from-before" in command
    with open(cluster.worker_log("dashed"), "ab") as log:
        process = subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for(lambda: "dashed" in online(cluster), 30, "the pasted line to join")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
