"""Running tasks survive a planned restart of the main node (restart32).

A graceful stop of rc-server (SIGTERM: `make stop`, `supervisorctl stop`)
tells each worker that declared `restart_hold` at register that it holds
their tasks for `restart_hold` seconds, after writing the promise
(devices.held_until) for rc-reaper. Before, every worker stopped its tasks
after `disconnect_fence` and each ran again from the start as attempt 2.
Each piece alone (rc-reaper's sweep, rc-server's stop, the worker against
a fake main node), then all of them on a real supervisord cluster
(tests/cluster_harness.py)."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from cluster_harness import Cluster, log_records, online, wait_for
from rc import config as config_module
from rc import db, devices, explain, reaper, scheduler, state_dir, tasks
from rc.log import Logger
from rc.server import Server
from rc.states import COMPLETED, QUEUED, RUNNING
from test_server import Client, token_of
from test_worker import DETAILED, main, registered, short_name, spawn  # noqa: F401 (fixtures)

PYTHON36 = os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")
# The release before the restart hold: its worker must keep today's rule.
OLD_RELEASE = "2299563"


# -- rc-reaper and a held device, one sweep at a time ---------------------------------

def test_the_reaper_leaves_a_held_device_alone_until_its_hold_and_the_grace(tmp_path):
    """Held at 1100 for 300 s: neither its lease running out, nor its
    connection gone, nor a silence past offline_timeout takes its task back
    before 1100 + 300 + disconnect_grace; then it goes, as an unheld
    device's does after the grace. Before: taken back at 1100 + grace."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    log = Logger("test", "error", io.BytesIO())
    for device_id in ("held", "plain"):
        with db.write(connection):
            devices.register(connection, device_id, {"task_types": ["shell"], "slots": 1,
                                                     "hardware_specs": {"cpu_cores": 1}},
                             "127.0.0.1:1", 1000.0)
    ids = {}
    for device_id in ("held", "plain"):
        ids[device_id] = tasks.submit(connection, config, "shell", {"command": "sleep 1000"},
                                      timeout=3000, requirements={"device_id": device_id})
    scheduler.schedule(connection, 1000.0, log, config)
    with db.write(connection):
        for device_id, task_id in ids.items():
            tasks.accept(connection, task_id, 1, device_id, 1000.0, 30.0)   # lease to 1030
        devices.hold(connection, ["held"], 1100.0 + 300.0, 1100.0)
        devices.disconnected(connection, "plain", 1100.0)
    assert devices.held_until(connection, "held") == 1400.0
    grace = config.disconnect_grace
    assert "goes back to the queue if it does not call back" in explain.why(
        connection, ids["plain"], now=1105.0)
    reaper.sweep(connection, config, log, 1100.0 + grace + 1)
    assert tasks.get(connection, ids["plain"])["state"] == QUEUED
    # rc why says what the hold means for the task.
    why = explain.why(connection, ids["held"], now=1110.0)
    assert "held has been disconnected for 10s" in why, why
    assert "holds its tasks for it until %s (restart_hold)" % explain.clock(1400.0) in why
    for now in (1100.0 + grace + 1, 1000.0 + config.offline_timeout + 1, 1400.0 + grace - 1):
        reaper.sweep(connection, config, log, now)
        task = tasks.get(connection, ids["held"])
        assert (task["state"], task["attempt"]) == (RUNNING, 1), now
        assert devices.get(connection, "held")["status"] == "online"
    reaper.sweep(connection, config, log, 1400.0 + grace + 1)
    task = tasks.get(connection, ids["held"])
    assert (task["state"], task["attempt"]) == (QUEUED, 2)
    assert devices.get(connection, "held")["status"] == "offline"
    connection.close()


# -- rc-server's graceful stop, in a thread --------------------------------------------

def frames_until_closed(client):
    frames = []
    try:
        while True:
            frames.append(client.receive())
    except (EOFError, ConnectionResetError):
        return frames


def test_a_graceful_stop_holds_the_connected_workers_that_can_hold_and_tells_them(tmp_path):
    """run() ending (SIGTERM): the device whose worker said restart_hold is
    held in the database, then sent main_stopping as its last frame; one
    whose worker did not say so, and one already disconnected, are neither;
    the port refuses connections from then on."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.tls = "127.0.0.1", 0, False
    config.device_secrets, config.restart_hold = False, 120.0
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io.BytesIO()))
    thread = threading.Thread(target=instance.run)
    thread.start()
    try:
        port = wait_for(lambda: getattr(instance, "listener", None)
                        and instance.listener.getsockname()[1], 10, "rc-server listening")
        token = token_of(instance)
        holder, old, gone = Client(port), Client(port), Client(port)
        assert holder.register(token, "holder", restart_hold=True)["message_type"] \
            == "register_ack"
        assert old.register(token, "old")["message_type"] == "register_ack"
        assert gone.register(token, "gone", restart_hold=True)["message_type"] \
            == "register_ack"
        gone.sock.close()
        reader = db.connect(config.db_path)
        wait_for(lambda: reader.execute("SELECT connected FROM devices WHERE device_id"
                                        " = 'gone'").fetchone()[0] == 0, 10, "gone gone")
        before = time.time()
    finally:
        instance.stop()
        thread.join(30)
    after = time.time()
    told = frames_until_closed(holder)
    assert [f["message_type"] for f in told][-1:] == ["main_stopping"], told
    assert told[-1]["data"] == {"hold": 120.0}
    assert "main_stopping" not in [f["message_type"] for f in frames_until_closed(old)]
    held = dict(reader.execute("SELECT device_id, held_until FROM devices").fetchall())
    assert before + 120.0 <= held["holder"] <= after + 120.0
    assert held["old"] is None and held["gone"] is None
    assert reader.execute("SELECT connected FROM devices WHERE device_id = 'holder'"
                          ).fetchone()[0] == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    reader.close()
    instance.database.close()


# -- the worker against a fake main node (tests/test_worker.py) ------------------------

def worker_event(worker, name, timeout=15.0):
    return wait_for(lambda: worker.events(name), timeout, "the worker's %s" % name)[0]


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_told_of_a_hold_the_worker_keeps_its_task_and_calls_back_each_second(
        main, spawn, python):
    """After main_stopping {hold: 10}: the task runs on past disconnect_fence
    (0.5 s), six reconnects come within 9 s (the doubling backoff needs over
    15 s for six), and the task is killed once the hold has run out, then
    reported fenced. Before: killed after 0.5 s."""
    worker, link = registered(main, spawn, python, disconnect_fence=0.5, fence_interval=60.0)
    link.assign(1, "shell", {"command": "sleep 60"})
    assert link.expect("task_accept")["task_id"] == 1
    told = time.monotonic()
    link.send("main_stopping", {"hold": 10.0})
    link.pump(5, keep_alive=False)           # until the worker hangs up
    for _ in range(6):
        main.accept().close()                # rc-server not back yet
    assert time.monotonic() - told < 9.0
    assert not worker.events("task_fenced")
    fenced = worker_event(worker, "task_fenced")
    assert time.monotonic() - told >= 9.5
    assert "restart hold of 10 s" in fenced["reason"], fenced
    register = live_handshake(main, disconnect_fence=0.5)
    assert register["restart_hold"] is True
    assert register["fenced_tasks"] == [{"task_id": 1, "attempt": 1}]


def live_handshake(main, tries=20, **fencing):
    """The register of the first call-back still waiting for its hello: those
    the worker made while the test waited for the fence sat in the listen
    queue, and by now it has given up on some of them (closed, or asked
    whether the port speaks HTTP instead: `HEAD / HTTP/1.0`, not JSON)."""
    for _ in range(tries):
        link = main.accept()
        try:
            return link.handshake(**fencing)
        except ValueError:
            continue
        except AssertionError as e:
            if "closed the connection" not in str(e):
                raise
    raise AssertionError("no call-back of the worker's lived through a handshake")


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_a_notice_read_after_a_freeze_is_not_believed(main, spawn, python):
    """A worker frozen (SIGSTOP) past FREEZE_THRESHOLD when main_stopping
    came may read it long after the hold began: it keeps the usual rule."""
    worker, link = registered(main, spawn, python, disconnect_fence=1.0, fence_interval=60.0)
    link.assign(1, "shell", {"command": "sleep 60"})
    assert link.expect("task_accept")["task_id"] == 1
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        link.send("main_stopping", {"hold": 60.0})
        link.close()
        time.sleep(3.0)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    fenced = worker_event(worker, "task_fenced")
    assert "disconnected" in fenced["reason"], fenced
    notice = worker.events("main_node_stopping")[0]
    assert notice["hold"] == 0 and notice["reason"] == "leases in doubt", notice


# -- a real cluster --------------------------------------------------------------------

def submit(cluster, device_id, command, timeout=300):
    return tasks.submit(cluster.db, cluster.config, "shell", {"command": command},
                        requirements={"device_id": device_id}, timeout=timeout)


def state_of(cluster, task_id):
    return tasks.get(cluster.db, task_id)


def running(cluster, *task_ids):
    return all(state_of(cluster, t)["state"] == RUNNING for t in task_ids)


def events(cluster, task_id):
    return [tuple(row) for row in cluster.db.execute(
        "SELECT time, attempt, state, device_id, reason FROM task_events"
        " WHERE task_id = ? ORDER BY id", (task_id,))]


def start_worker(cluster, device_id, python=None, worker=None, *extra):
    """A worker on this cluster, with the interpreter and worker.py given."""
    argv = [python or sys.executable, worker or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "worker.py")]
    with open(cluster.worker_log(device_id), "ab") as log:
        process = subprocess.Popen(argv + ["--slots", "2"] + list(extra)
                                   + cluster.worker_arguments(device_id),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.workers[device_id] = process
    wait_for(lambda: device_id in online(cluster), 60, "%s online" % device_id)
    return process


def worker_records(cluster, device_id, **fields):
    return log_records(cluster, "worker-" + device_id, **fields)


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """One cluster for the tests below that need the test timings: a start
    and stop is ~3 s of supervisord and five programs, paid once; each test
    has a device of its own, and `cluster` stops its workers after it."""
    cluster = Cluster(tmp_path_factory.mktemp("restart-hold") / "rc")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster, with the main node running after the test (a
    test stops rc-server or the whole main node) and the test's workers
    stopped."""
    yield module_cluster
    module_cluster.put_back()


@pytest.mark.e2e
def test_running_tasks_survive_make_stop_and_make_run(cluster):
    """One task ends while the main node is away (its result is kept and
    delivered once it is back), one runs on past the restart: both complete
    as attempt 1, each recorded once. Before: both fenced after
    disconnect_fence (1 s here) and run again as attempt 2."""
    device_id = "holder"
    worker = start_worker(cluster, device_id)
    # A task runs as a user of its own: the flag is where any user may look.
    flags = tempfile.mkdtemp(prefix="rc-hold-")
    os.chmod(flags, 0o755)
    flag, back = os.path.join(flags, "go"), os.path.join(flags, "back")
    try:
        short = submit(cluster, device_id, "while [ ! -e %s ]; do sleep 0.1; done; echo short"
                       % flag)
        long = submit(cluster, device_id, "while [ ! -e %s ]; do sleep 0.1; done; echo long"
                      % back)
        wait_for(lambda: running(cluster, short, long), 60, "both tasks running")

        stopped = cluster.make("stop")
        assert stopped.returncode == 0, stopped.stdout
        notice = wait_for(lambda: worker_records(cluster, device_id,
                                                 event="main_node_stopping"),
                          30, "the worker told of the stop")
        assert notice[0]["running"] == 2, notice
        open(flag, "w").close()      # the short task ends while the main node is down
        wait_for(lambda: worker_records(cluster, device_id, event="task_finished",
                                        task_id=short), 30, "the short task ended")
        time.sleep(5)       # away five times disconnect_fence
        started = cluster.make("run")
        assert started.returncode == 0, started.stdout
        # The long task ends once its worker is back on the new rc-server.
        wait_for(lambda: len(worker_records(cluster, device_id, event="registered")) >= 2, 60,
                 "the worker back")
        open(back, "w").close()
        for task_id in (short, long):
            wait_for(lambda: state_of(cluster, task_id)["state"] == COMPLETED, 90,
                     "task %d completed" % task_id)
    finally:
        shutil.rmtree(flags)

    for task_id, output in ((short, "short\n"), (long, "long\n")):
        task = state_of(cluster, task_id)
        assert (task["attempt"], task["result"]["output"]) == (1, output), events(cluster, task_id)
        assert {e[1] for e in events(cluster, task_id)} == {1}, events(cluster, task_id)
        assert len(log_records(cluster, "rc-server", event="task_finished",
                               task_id=task_id)) == 1
    assert not worker_records(cluster, device_id, event="task_fenced")
    assert worker.poll() is None
    # Back and heard on its new connection: the hold is over.
    wait_for(lambda: devices.held_until(cluster.db, device_id) is None, 30, "the hold ended")
    # Back within a second or two of rc-server: a retry every second, not the
    # backoff (which would be at 16 s or more by then), with the kept result.
    registered = worker_records(cluster, device_id, event="registered")
    assert len(registered) == 2 and registered[-1]["resending"] == 1, registered
    assert registered[-1]["active_tasks"] == 1, registered
    server_up = log_records(cluster, "rc-server", event="server_started")[-1]["time"]
    assert registered[-1]["time"] - server_up < 5.0, (registered[-1], server_up)


@pytest.mark.e2e
def test_a_short_hold_runs_out_the_worker_stops_first_and_the_task_goes_back(tmp_path):
    """restart_hold 3 s and rc-server kept down: the worker kills its task
    once the hold runs out, and only then (hold + disconnect_grace after the
    stop) does rc-reaper, still running, queue it again; it runs once
    rc-server is back, as attempt 2. Before: no notice, fenced after
    disconnect_fence (2.5 s), requeued only when its lease ran out. A
    worker of this Python and one of Python 3.6, side by side on one
    cluster through one stop (each was a cluster and a stop of its own)."""
    pythons = {"current": None}
    if os.path.exists(PYTHON36):
        pythons["3.6"] = PYTHON36
    else:
        print("no Python 3.6 here: this Python's worker only")
    # A grace longer than the tests' 2 s: the margin between the worker's
    # deadline and the reaper's, on a busy machine.
    cluster = Cluster(tmp_path / "rc", restart_hold=3.0, disconnect_grace=5.0)
    cluster.start()
    try:
        task_ids = {}
        for python, interpreter in pythons.items():
            device_id = "short-hold-%s" % python
            start_worker(cluster, device_id, interpreter)
            task_ids[device_id] = submit(cluster, device_id, "sleep 60")
        wait_for(lambda: running(cluster, *task_ids.values()), 60, "the tasks running")

        before_stop = time.time()
        cluster.supervisorctl("stop", "rc-server")
        helds = {}
        for device_id, task_id in task_ids.items():
            notice = wait_for(lambda: worker_records(cluster, device_id,
                                                     event="main_node_stopping"),
                              30, "%s told of the stop" % device_id)[0]
            assert notice["hold"] == 3.0
            held = cluster.db.execute("SELECT held_until FROM devices WHERE device_id = ?",
                                      (device_id,)).fetchone()[0]
            assert held is not None and before_stop + 3.0 <= held <= notice["time"] + 3.0
            helds[device_id] = notice, held

        for device_id, task_id in task_ids.items():
            notice, held = helds[device_id]
            fenced = wait_for(lambda: worker_records(cluster, device_id, event="task_fenced"),
                              30, "%s stopping its task" % device_id)[0]
            assert fenced["time"] >= notice["time"] + 2.9, (fenced, notice)
            assert "restart hold" in fenced["reason"]
            wait_for(lambda: state_of(cluster, task_id)["attempt"] == 2, 30,
                     "the task of %s requeued" % device_id)
            taken_back = [e for e in events(cluster, task_id) if e[1] == 2][0]
            # Never twice at once: the worker gave it up before anyone could have it,
            # and the reaper waited for the hold and the grace.
            assert fenced["time"] < taken_back[0], (fenced, taken_back)
            assert taken_back[0] >= held + cluster.config.disconnect_grace, (taken_back, held)

        cluster.supervisorctl("start", "rc-server")
        for device_id, task_id in task_ids.items():
            wait_for(lambda: state_of(cluster, task_id)["state"] == RUNNING, 60,
                     "attempt 2 running on %s" % device_id)
            assert state_of(cluster, task_id)["device_id"] == device_id
            cluster.rc("cancel", str(task_id))
    finally:
        cluster.stop()


def old_worker(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = subprocess.run(["git", "-C", repo, "show", "%s:bin/worker.py" % OLD_RELEASE],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if found.returncode != 0:
        pytest.skip("no git history of %s here" % OLD_RELEASE)
    path = str(tmp_path / "old_worker.py")
    with open(path, "wb") as f:
        f.write(found.stdout)
    return path


@pytest.mark.e2e
def test_a_worker_from_before_keeps_todays_rule(cluster, tmp_path):
    """A worker that does not declare restart_hold is neither told nor held:
    it stops its task after disconnect_fence, and the task runs again."""
    device_id = "old-worker"
    start_worker(cluster, device_id, None, old_worker(tmp_path))
    task_id = submit(cluster, device_id, "sleep 60")
    wait_for(lambda: running(cluster, task_id), 60, "the task running")
    cluster.supervisorctl("stop", "rc-server")
    wait_for(lambda: worker_records(cluster, device_id, event="task_fenced"), 30,
             "the old worker stopping its task")
    assert cluster.db.execute("SELECT held_until FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()[0] is None
    cluster.supervisorctl("start", "rc-server")
    wait_for(lambda: state_of(cluster, task_id)["attempt"] == 2, 60, "the task run again")
    cluster.rc("cancel", str(task_id))


@pytest.mark.e2e
def test_a_killed_rc_server_gives_no_hold(cluster):
    """kill -9 of rc-server says nothing and writes nothing: no hold, the
    usual backoff and disconnect_fence (supervisord restarts it at once)."""
    device_id = "killed"
    start_worker(cluster, device_id)
    task_id = submit(cluster, device_id, "sleep 60")
    wait_for(lambda: running(cluster, task_id), 60, "the task running")
    os.kill(cluster.program_pid("rc-server"), 9)
    wait_for(lambda: len(worker_records(cluster, device_id, event="registered")) == 2, 60,
             "the worker back")
    assert not worker_records(cluster, device_id, event="main_node_stopping")
    assert cluster.db.execute("SELECT held_until FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()[0] is None
    lost = worker_records(cluster, device_id, event="disconnected")[0]
    assert lost["level"] == "warning" and "holds" not in lost["reason"], lost
    cluster.rc("cancel", str(task_id))
