"""attack35: the root worker's Template and spawner as a task and as its
submitter, then what comes from outside into each main-node program.
Each test failed before the fix its docstring names, or says what held."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import Cluster, online, wait_for  # noqa: E402
from hostile_harness import assert_completes, submit_to, unharmed  # noqa: E402
from rc import state_dir, tasks  # noqa: E402
from test_worker import WORKER, FakeMain, WorkerProcess, wait_until  # noqa: E402

own_uids = pytest.mark.skipif(os.geteuid() != 0, reason="task uids of their own need root")


@pytest.fixture(scope="module")
def worker_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_module_s35", WORKER)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def root_worker(tmp_path_factory):
    """A root worker (a uid per task, the Template) on one slot, against a
    fake main node: each task runs as 61770, the lowest of its two uids,
    and what one task does to the next is plain to see."""
    log = str(tmp_path_factory.mktemp("s35w") / "worker.log")
    main = FakeMain()
    worker = WorkerProcess(sys.executable, main.port, log, "--task-user", "61770:2",
                           "--slots", "1")
    link = main.accept()
    link.handshake()
    yield worker, link
    worker.stop()
    main.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster and a root worker, w35, of two slots."""
    cluster = Cluster(tmp_path_factory.mktemp("s35"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        # Task uids (61780-61783) no other test's worker uses.
        cluster.start_worker("w35", "--slots", "2", "--task-user", "61780:4")
        wait_for(lambda: "w35" in online(cluster), 30, "the worker w35")
        yield cluster
    finally:
        cluster.stop()


def api(cluster, method, path, body=None):
    """rc-web's /api/v1 with the admin token (code larger than a command line takes)."""
    request = urllib.request.Request(
        "http://127.0.0.1:%d%s" % (cluster.config.web_port, path), method=method,
        data=None if body is None else json.dumps(body).encode(), headers={
            "Content-Type": "application/json", "Authorization": "Bearer "
            + state_dir.read_secret(cluster.config.admin_token_path)})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def api_submit(cluster, spec):
    return api(cluster, "POST", "/api/v1/tasks", spec)["task_id"]


def run(link, task_id, task_type, payload, timeout=30.0):
    link.assign(task_id, task_type, payload, timeout)
    return link.results(1)[task_id]


def spawner_children(worker):
    pid = worker.events("spawner_started")[-1]["pid"]
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(child) for child in f.read().split()]


# -- a request larger than one of the spawner's messages ----------------------------------

@own_uids
def test_a_large_task_neither_breaks_the_spawner_nor_ends_its_neighbours(root_worker):
    """The worker sends the spawner each request as one SOCK_SEQPACKET
    message, which may be no larger than the socket's buffer (212992 bytes
    by default), while the main node takes code of up to 256 KiB: sendmsg
    failed (EMSGSIZE), the worker took the spawner for broken and, as it
    was running a task, restarted itself: its neighbour was killed, the
    large task never ran anywhere (each device it went to restarted), and
    every later task started without the spawner. Now that request alone
    starts as without a spawner. Before: task 3's parent was the worker
    (no spawner); with a task beside it, the worker restarted."""
    worker, link = root_worker
    code = ("#" + "x" * 1000 + "\n") * (tasks.MAX_PAYLOAD_TEXT // 1002) + "print('large ran')\n"
    assert 212992 < len(code) <= tasks.MAX_PAYLOAD_TEXT
    # The neighbour shares the slot's only uid: it runs first, its end awaited.
    link.assign(1, "python_exec", {"code": "import time; time.sleep(0.5); print('before')"})
    result = link.results(1)[1]
    assert result["status"] == "completed" and result["result"]["output"] == "before\n", result
    result = run(link, 2, "python_exec", {"code": code})
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "large ran\n", result
    result = run(link, 3, "python_eval", {"expression": "__import__('os').getppid()"})
    spawner = worker.events("spawner_started")[-1]["pid"]
    assert result["result"]["output"] == str(spawner), "later tasks still come from the spawner"
    assert not worker.events("spawner_failed") and not worker.events("worker_restarting")


@own_uids
def test_a_large_task_beside_another_on_a_cluster(cluster):
    """The same through a real main node: the worker restarted, its
    neighbour went back to the queue with its attempt lost, and the large
    task did the same to each device it was given. Before: the large
    task never completed, the worker's log said worker_restarting."""
    code = ("#" + "x" * 1000 + "\n") * (tasks.MAX_PAYLOAD_TEXT // 1002) + "print('large ran')\n"
    with unharmed(cluster, "w35"):
        neighbour = submit_to(cluster, "w35", "sleep 1; echo neighbour")
        large = api_submit(cluster, {"task_type": "python_exec", "payload": {"code": code},
                                     "requirements": {"device_id": "w35"}, "retries": 0})
        assert_completes(cluster, large, "large ran")
        assert_completes(cluster, neighbour, "neighbour")
    for task_id in (neighbour, large):
        assert tasks.get(cluster.db, task_id)["attempt"] == 1
    with open(cluster.worker_log("w35")) as log:
        assert "worker_restarting" not in log.read()


def test_a_groups_view_holds_a_few_kilobytes_of_each_output(cluster):
    """GET /api/v1/groups/ID (the dashboard reads it every 2 s while a map
    or group is open) and `rc group` read every task's whole result: a map
    of 300 tasks of 900 KB outputs cost rc-web 250 MB and 2 s a read, a
    larger one all of a NAS's memory. Now each output, error and input is
    cut at fleet.GROUP_TEXT_CHARS, by SQLite. Before: 300000 characters."""
    from rc import fleet
    spec = {"task_type": "python_eval", "payload": {"expression": "'y' * 300000"},
            "requirements": {"device_id": "w35"}}
    answer = api(cluster, "POST", "/api/v1/tasks?group=new", [spec, spec])
    for task in answer["tasks"]:
        assert_completes(cluster, task["task_id"], "yyy")
    group = api(cluster, "GET", "/api/v1/groups/%d" % answer["group_id"])
    assert group["summary"] == {"tasks": 2, "completed": 2}, group["summary"]
    for member in group["tasks"]:
        assert member["output"] == "'%s\n[cut at %d characters]" % (
            "y" * (fleet.GROUP_TEXT_CHARS - 1), fleet.GROUP_TEXT_CHARS), member["output"][-80:]
    shown = cluster.rc("group", str(answer["group_id"])).stdout
    assert len(shown) < 3 * fleet.GROUP_TEXT_CHARS and "2 tasks: 2 completed" in shown, shown


# -- a task ended before the spawner answered ---------------------------------------------

@own_uids
def test_a_task_ended_before_its_process_started_keeps_its_uid_until_that_ends(
        root_worker, drop_dir):
    """A task that timed out (or was cancelled) before the spawner had
    answered with its pid was reported at once and its uid lent to the
    next task, though the spawner went on to start it: the worker then
    killed its process group only, which a task forked from the Template
    has not made yet (it reads its request first), so it could run on,
    untimed, as the uid of the next task; and its end killed every
    process of that uid, the next task's. Now its result waits for its
    process, which the spawner kills by pid (the next test). Before: task
    12 reported while the Template was stopped, and its uid given to 13."""
    worker, link = root_worker
    assert run(link, 10, "python_eval", {"expression": "1"})["status"] == "completed"
    template = spawner_children(worker)
    assert len(template) == 1, template       # the task reaped: the Template alone
    code = ("import os, time\ntime.sleep(1)\nopen(%r, 'w').write(str(os.getuid()))\n"
            % str(drop_dir / "escaped"))
    os.kill(template[0], signal.SIGSTOP)       # the spawner waits on it for the pid
    try:
        link.assign(12, "python_exec", {"code": code}, timeout=0.2)
        frames = link.pump(1.2)
        # The next task, meant for the one slot and the uid 61770 once 12 has ended.
        link.assign(13, "python_exec", {"code": "import os, time\ntime.sleep(1.5)\n"
                                                "print(os.getuid())"})
        frames += link.pump(0.3)
    finally:
        os.kill(template[0], signal.SIGCONT)
    early = {f["data"]["task_id"]: f["data"] for f in frames
             if f["message_type"] == "task_result"}
    results = dict(early)
    results.update(link.results(2 - len(early)))
    assert results[12]["status"] == "timed_out", results[12]
    assert results[13]["status"] == "completed", results[13]
    # 61770 once task 12's killed process is gone; 61771 while it is still
    # going (on a loaded machine the slot comes free first): never a uid lent.
    assert results[13]["result"]["output"] in ("61770\n", "61771\n"), results[13]
    ended = [e["time"] for e in worker.events("task_finished") if e["task_id"] == 12]
    began = [e["time"] for e in worker.events("task_started") if e["task_id"] == 13]
    assert ended and began and ended[-1] <= began[-1], "13 started before 12 ended"
    assert not early, "task 12 reported while its process was yet to start"
    assert not os.path.exists(str(drop_dir / "escaped")), "task 12 ran after its end"


FENCE = 2.0       # seconds without a lease renewed before the worker drops its tasks


@pytest.fixture
def fenced_worker(tmp_path):
    """A root worker of one slot (uids 61775, 61776) that drops its tasks
    when the fake main node renews no lease for FENCE seconds."""
    main = FakeMain()
    worker = WorkerProcess(sys.executable, main.port, str(tmp_path / "worker.log"),
                           "--task-user", "61775:2", "--slots", "1")
    link = main.accept()
    link.handshake(fence_interval=FENCE)
    yield worker, link
    worker.stop()
    main.close()


def result_renewing(link, task_id, timeout=30):
    """The task's result, heartbeats acknowledged meanwhile (leases renewed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in link.pump(0.2):
            if frame["message_type"] == "task_result" and frame["data"]["task_id"] == task_id:
                return frame["data"]
    raise AssertionError("no result of task %d within %g s" % (task_id, timeout))


@own_uids
def test_a_task_dropped_before_its_process_started_keeps_its_uid_until_that_ends(
        fenced_worker):
    """The same for a task dropped (fenced: no lease renewed; given away;
    the device unavailable) before the spawner answered: its uid went
    back at once, the next task took it while the spawner was yet to
    start the first as that uid, and the first one's end killed the uid's
    processes. Now its uid waits for that end. Before: task 22 ran as
    61775, the uid of task 21, dropped and yet to start."""
    worker, link = fenced_worker
    link.assign(20, "python_eval", {"expression": "1"})
    assert result_renewing(link, 20)["status"] == "completed"
    template = spawner_children(worker)
    assert len(template) == 1, template
    os.kill(template[0], signal.SIGSTOP)
    try:
        link.assign(21, "python_exec", {"code": "import time; time.sleep(30)"})
        link.pump(FENCE + 3, keep_alive=False, until=lambda: worker.events("task_fenced"))
        assert worker.events("task_fenced"), "task 21 not dropped"
        link.pump(0.3)        # leases renewed: the worker takes tasks again
        link.assign(22, "python_eval", {"expression": "__import__('os').getuid()"})
        link.pump(0.5)
    finally:
        os.kill(template[0], signal.SIGCONT)
    result = result_renewing(link, 22)
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "61776", "the uid of task 21, yet to start"
    assert wait_until(lambda: not uid_processes(61775), 10), "task 21 runs on"
    link.assign(23, "python_eval", {"expression": "__import__('os').getuid()"})
    assert result_renewing(link, 23)["result"]["output"] == "61775", \
        "its uid back once it has ended"


def test_a_dropped_running_task_keeps_its_uid_until_the_spawner_reports_its_end(
        worker_module):
    """A running task dropped gave its uid and directory back at once,
    before the spawner had reaped it (the spawner then ends what the uid
    runs, where the task left orphans): a task started meanwhile with that
    uid could be killed. Now they go back when the spawner reports its
    end. Before: not released at the end (at the drop, by abandon)."""
    from types import SimpleNamespace
    released = []
    spawner = worker_module.Spawner()
    child = worker_module.SpawnedChild(None, None)
    task = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        child.pid = task.pid
        child.release = lambda: released.append(task.pid)
        spawner.children.add(task.pid)
        worker = SimpleNamespace(watchdog=SimpleNamespace(group_ended=lambda pid: None))
        spawner.forget(worker, child)
        assert task.wait(10) == -signal.SIGKILL
        assert released == [], "released before the spawner reported its end"
        spawner.ended(task.pid, 9, None)
        assert released == [task.pid]
    finally:
        task.kill()
        task.wait()


def test_an_idle_spawner_stays_while_a_dropped_task_holds_its_uid(worker_module):
    """The uid of a dropped task waits for the spawner to report that
    task's end: a spawner stopped as idle (no task of its own counted)
    would never report it, and the uid stayed out of use for good."""
    from types import SimpleNamespace
    spawner = worker_module.Spawner()
    spawner.sock = SimpleNamespace(close=lambda: None)
    spawner.releases[12345] = lambda: None
    worker = SimpleNamespace(selector=SimpleNamespace(unregister=lambda sock: None))
    spawner.stop_when_idle(worker, spawner.idle_since + worker_module.SPAWNER_IDLE + 1)
    assert spawner.sock is not None, "stopped"


@own_uids
def test_the_spawner_ends_a_task_that_has_no_session_nor_uid_yet(worker_module):
    """end_task killed a task's group and uid: neither names a process
    forked from the Template before it has made its session and taken its
    uid (it reads its request first). Now the first process is killed by
    its pid as well (the spawner's unreaped child: no stranger's).
    Before: the child lived on."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        worker_module.end_task(child.pid, {"own_uid": True, "uid": 61771}, None,
                               everything=True)
        assert wait_until(lambda: child.poll() is not None, 10), "the child lives on"
    finally:
        child.kill()
        child.wait()


# -- a task that uses up the processes a container allows ---------------------------------

PIDS_MAX = 40      # the worker, its watchdog, spawner and Template, and what a task takes
PIDS_CGROUPS = "/sys/fs/cgroup/pids"      # cgroup v1's pids controller

BOMB = """
import os, time
forked = 0
while True:
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    except OSError:
        break
print("forked", forked, flush=True)
while not os.path.exists(%r):
    time.sleep(0.05)
"""


@pytest.fixture
def pids_limited(tmp_path):
    """A root worker in a cgroup of PIDS_MAX processes (docker-compose.yml
    gives the worker container 256, as many as one task may have)."""
    if os.geteuid() != 0 or not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip("needs root and cgroup v1's pids controller")
    group = os.path.join(PIDS_CGROUPS, "rc-test-s35-%d" % os.getpid())
    os.mkdir(group)
    main = FakeMain()
    try:
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write(str(PIDS_MAX))
        worker = WorkerProcess(sys.executable, main.port, str(tmp_path / "worker.log"),
                               "--task-user", "61790:4", "--slots", "2")
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(worker.proc.pid))
        link = main.accept()
        link.handshake()
        yield worker, link, group
        worker.stop()
    finally:
        main.close()
        wait_until(lambda: not open(os.path.join(group, "cgroup.procs")).read(), 10)
        os.rmdir(group)


def uid_processes(uid):
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/status" % name) as f:
                if next(line for line in f if line.startswith("Uid:")).split()[1] == str(uid):
                    found.append(int(name))
        except (OSError, StopIteration):
            pass
    return found


@own_uids
def test_a_task_that_uses_up_the_pids_limit_ends_alone(pids_limited, drop_dir):
    """A task forked as many processes as the container allowed (fewer
    than its own RLIMIT_NPROC): the tasks that came meanwhile failed as
    their own fault ('cannot start: EAGAIN', their retries spent), and at
    its end the spawner could not fork the child that kills its uid
    (kill_uid): the exception ended the spawner, the worker restarted and
    every task it ran was lost. Now such a start is the device's fault
    (the main node queues it again) and the uid is killed through /proc
    when no child can be had. Before: no device_fault, then 'worker
    closed the connection'."""
    worker, link, group = pids_limited
    assert run(link, 1, "python_eval", {"expression": "1"})["status"] == "completed"
    stop = drop_dir / "stop"
    link.assign(2, "python_exec", {"code": BOMB % str(stop)})

    def pids():
        with open(os.path.join(group, "pids.current")) as f:
            return int(f.read())
    assert wait_until(lambda: pids() >= PIDS_MAX, 15), pids()
    for task_id, task_type, payload in ((3, "python_eval", {"expression": "2"}),
                                        (4, "shell", {"command": "echo 4"})):
        result = run(link, task_id, task_type, payload)
        assert result["status"] == "failed", result
        assert "Resource temporarily unavailable" in result["error"], result
        assert result["result"].get("device_fault") is True, result
    stop.write_text("")
    result = link.results(1)[2]
    assert result["status"] == "completed" and "forked" in result["result"]["output"], result
    assert wait_until(lambda: not uid_processes(61790), 10), uid_processes(61790)
    assert run(link, 5, "python_eval", {"expression": "5"})["result"]["output"] == "5"
    assert not worker.events("spawner_lost") and not worker.events("worker_restarting")
