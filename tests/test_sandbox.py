"""The task sandbox (issue 17, item 6): whatever a task starts dies with it,
however it detached; a task reads neither the worker's secrets, nor another
task's files, nor the main node's; RLIMIT_NPROC stops a fork bomb; the task
directories of a killed worker go at the next start.

Each worker test runs twice where it can: as the machine runs it (root here:
a uid per task, a cgroup per task, a mount namespace where asked) and as the
unprivileged user `nobody` (a subreaper spawner following /proc, a user
namespace where asked), the path of a phone or a laptop."""
import hashlib
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_worker import (DEVICE_ID, FakeMain, WorkerProcess, WORKER,  # noqa: E402
                         kill_worker_and_spawner, wait_until)
from cluster_harness import Cluster, wait_for  # noqa: E402
from hostile_harness import submit_to  # noqa: E402
from rc import tasks  # noqa: E402

IS_ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")
NOBODY = pwd.getpwnam("nobody").pw_uid if IS_ROOT else None
TASK_TIMEOUT = 1.5          # seconds a detaching task may run before it is timed out
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


@pytest.fixture
def drop_dir():
    """A directory every uid can reach (pytest's tmp_path is root's own)."""
    path = tempfile.mkdtemp(prefix="rc-test-sandbox-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody_python(directory, cgroup=None):
    """An "interpreter" that is python3 run as nobody (setpriv), for
    WorkerProcess; first moved into `cgroup` if given."""
    path = os.path.join(directory, "python-as-nobody")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
        if cgroup:
            f.write("echo $$ > %s/cgroup.procs\n" % cgroup)
        f.write("exec %s --reuid=%d --regid=%d --clear-groups env HOME=%s %s \"$@\"\n"
                % (SETPRIV, NOBODY, pwd.getpwnam("nobody").pw_gid, directory, SYSTEM_PYTHON))
    os.chmod(path, 0o755)
    return path


def delegated_cgroup():
    """A cgroup v2 handed to nobody, as systemd's Delegate=yes hands one to a
    service; None where this machine has no cgroup2 root can write."""
    for line in open("/proc/self/mountinfo"):
        fields = line.split(" - ")
        if fields[1].split()[0] == "cgroup2" and fields[0].split()[3] == "/":
            path = tempfile.mkdtemp(prefix="rc-test-delegated-", dir=fields[0].split()[4])
            os.chown(path, NOBODY, -1)
            for name in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
                os.chown(os.path.join(path, name), NOBODY, -1)
            return path
    return None


def cgroup_writable():
    try:
        path = delegated_cgroup()
    except OSError:
        return False
    if path:
        os.rmdir(path)
    return bool(path)


# Who runs the worker: "machine" (root here: a uid per task), "nobody" (an
# unprivileged user: a subreaper spawner), "delegated" (nobody in a cgroup
# of its own: a cgroup per task).
NOBODY_CAN_RUN = IS_ROOT and SETPRIV and SYSTEM_PYTHON
RUNNERS = (["machine"] + (["nobody"] if NOBODY_CAN_RUN else [])
           + (["delegated"] if NOBODY_CAN_RUN and cgroup_writable() else []))


@pytest.fixture(params=RUNNERS)
def start(request, drop_dir):
    """start(*arguments) -> (worker, link), the worker run as request.param,
    its state dir in drop_dir; stopped at teardown."""
    main = FakeMain()
    started = []
    cgroup = delegated_cgroup() if request.param == "delegated" else None
    python = sys.executable if request.param == "machine" else nobody_python(drop_dir, cgroup)
    state = os.path.join(drop_dir, "state")
    if request.param != "machine":
        os.mkdir(state, 0o700)
        os.chown(state, NOBODY, -1)
        os.chown(drop_dir, NOBODY, -1)

    def start_worker(*arguments):
        log_path = os.path.join(drop_dir, "worker%d.log" % len(started))
        worker = WorkerProcess(python, main.port, log_path, "--state-dir", state, *arguments)
        started.append(worker)
        link = main.accept()
        link.handshake()
        return worker, link
    start_worker.runner = request.param
    start_worker.state = state
    yield start_worker
    for worker in started:
        worker.stop()
    main.close()
    if cgroup:
        # A killed worker's are removed by its watchdog, when the killed tasks
        # are gone, or else by the next worker that starts there.
        killed = any(worker.proc.returncode == -signal.SIGKILL for worker in started)
        clean = wait_until(lambda: not [name for name in os.listdir(cgroup) if os.path.isdir(
            os.path.join(cgroup, name))], timeout=15 if killed else 2)
        wait_until(lambda: not open(os.path.join(cgroup, "cgroup.procs")).read(), timeout=15)
        for directory, _, _ in sorted(os.walk(cgroup), reverse=True):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        assert clean or killed, "the worker left cgroups behind"


def marked(marker):
    """Live processes whose command line holds `marker`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if (process.info["status"] != psutil.STATUS_ZOMBIE
                    and any(marker in part for part in process.info["cmdline"] or ())):
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def detaching_command(marker):
    """Every way out of a process group we know, each leaving a `sleep` behind
    whose argument is the marker (a number of seconds no one else sleeps)."""
    python = SYSTEM_PYTHON or "python3"
    double_fork = ("import os, time\n"
                   "if os.fork(): os._exit(0)\n"
                   "os.setsid()\n"
                   "if os.fork(): os._exit(0)\n"
                   "os.execvp('sleep', ['sleep', '%s'])\n" % marker)
    return ("setsid sleep {m} & setsid -f sleep {m}; nohup sleep {m} >/dev/null 2>&1 & "
            "{python} -c \"{double_fork}\"; (sleep {m} &); echo started; sleep {m}"
            .format(m=marker, python=python, double_fork=double_fork.replace('"', '\\"')))


def new_marker():
    return "%d.%06d" % (3000 + random.randrange(1000), random.randrange(10 ** 6))


def test_detached_processes_die_with_their_task_after_timeout_and_cancel(start):
    worker, link = start()
    tracking = worker.events("task_sandbox")[0]["tracking"]
    assert tracking.startswith({"machine": "a uid per task" if IS_ROOT else "subreaper",
                                "nobody": "subreaper", "delegated": "cgroup"}[start.runner])
    timed, cancelled = new_marker(), new_marker()
    link.assign(1, "shell", {"command": detaching_command(timed)}, timeout=TASK_TIMEOUT)
    link.assign(2, "shell", {"command": detaching_command(cancelled)}, timeout=60)
    assert wait_until(lambda: len(marked(cancelled)) >= 6, timeout=10), marked(cancelled)
    link.send("task_cancel", {"task_id": 2, "attempt": 1})
    results = link.results(2, timeout=20)
    assert results[1]["status"] == "timed_out", results[1]
    assert results[2]["status"] == "cancelled", results[2]
    assert wait_until(lambda: not marked(timed), timeout=3), \
        "survived the timeout: %s" % marked(timed)
    assert wait_until(lambda: not marked(cancelled), timeout=3), \
        "survived the cancel: %s" % marked(cancelled)
    # And one that detaches and then ends of itself leaves nothing either.
    done = new_marker()
    result = link.run("shell", {"command": "setsid -f sleep %s; nohup sleep %s >/dev/null 2>&1 &"
                                " echo ok" % (done, done)}, task_id=3)
    assert result["status"] == "completed", result
    assert wait_until(lambda: not marked(done), timeout=3), marked(done)


def test_detached_processes_die_with_a_killed_worker(start):
    worker, link = start()
    marker = new_marker()
    link.assign(1, "shell", {"command": detaching_command(marker)}, timeout=60)
    assert wait_until(lambda: len(marked(marker)) >= 6, timeout=10), marked(marker)
    worker.proc.kill()
    assert wait_until(lambda: not marked(marker), timeout=5), \
        "outlived the worker: %s" % marked(marker)


def test_detached_processes_die_when_their_spawner_is_killed(start):
    """The worker restarts itself then (see test_spawner); what the task
    left running must not outlive the spawner that knew it."""
    if start.runner != "machine":
        pytest.skip("the spawner of a worker run as nobody is killed the same way")
    worker, link = start()
    marker = new_marker()
    link.assign(1, "shell", {"command": detaching_command(marker)}, timeout=60)
    assert wait_until(lambda: len(marked(marker)) >= 6, timeout=10), marked(marker)
    spawner = [e["pid"] for e in worker.events("spawner_started")][0]
    os.kill(spawner, signal.SIGKILL)
    assert wait_until(lambda: not marked(marker), timeout=5), \
        "outlived the spawner: %s" % marked(marker)
    assert wait_until(lambda: len(worker.events("worker_started")) == 2), "it restarted"


def test_detached_processes_of_a_reused_uid_die_with_a_killed_worker_and_spawner(start,
                                                                                 drop_dir):
    """The watchdog hears of a task uid once, at its first task, not at every
    task (Sandbox.tell_watchdog): a later task of that uid that detached dies
    all the same when the worker and its spawner are killed at once (a
    spawner left alive would end the tasks itself)."""
    if start.runner != "machine" or not IS_ROOT:
        pytest.skip("a uid per task needs a root worker")
    worker, link = start("--slots", "1")
    first = link.run("shell", {"command": "id -u"}, task_id=1)
    assert first["status"] == "completed", first
    uid = int(first["result"]["output"])
    marker = new_marker()
    link.assign(2, "shell", {"command": detaching_command(marker)}, timeout=60)
    assert wait_until(lambda: len(marked(marker)) >= 6, timeout=10), marked(marker)
    assert {psutil.Process(pid).uids().real for pid in marked(marker)} == {uid}, \
        "not the first task's uid: no test"
    kill_worker_and_spawner(worker, worker.events("worker_started")[0]["watchdog"])
    assert wait_until(lambda: not marked(marker), timeout=10), \
        "outlived the worker and its spawner: %s" % marked(marker)


def test_two_workers_of_one_machine_never_share_a_task_uid(start):
    """The end of a task kills every process of its uid: a main node's local
    worker and a device's worker on the same box must not hit each other."""
    if start.runner != "machine" or not IS_ROOT:
        pytest.skip("task uids are for workers run as root")
    first, link1 = start()
    second, link2 = start()
    nap = "30.%06d" % random.randrange(10 ** 6)       # this test's own sleep
    link1.assign(1, "shell", {"command": "id -u; sleep %s" % nap}, timeout=60)
    link2.assign(1, "shell", {"command": "id -u; sleep 1; echo alive"}, timeout=60)
    link1.expect("task_accept")
    link2.expect("task_accept")
    # Cancelled once it sleeps, its uid written (a fixed 0.3 s was too
    # short on a loaded machine: no output to read the uid from).
    assert link1.wait_until(lambda: any(p.info["cmdline"] == ["sleep", nap] for p in
                                        psutil.process_iter(["cmdline"]))), "never slept"
    link1.send("task_cancel", {"task_id": 1, "attempt": 1})
    cancelled, survivor = link1.results(1)[1], link2.results(1)[1]
    assert cancelled["status"] == "cancelled", cancelled
    assert survivor["status"] == "completed", survivor
    uids = cancelled["result"]["output"].split()[0], survivor["result"]["output"].split()[0]
    assert uids[0] != uids[1] and "0" not in uids


def test_a_task_reads_no_secret_of_the_worker_nor_another_tasks_files(start, drop_dir):
    isolate = () if start.runner == "machine" else ("--isolate",)
    token_file = os.path.join(drop_dir, "token")
    with open(token_file, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
        f.write("a-join-token-nobody-may-read\n")
    secret = os.path.join(start.state, "cluster-1", "device.secret")
    os.makedirs(os.path.dirname(secret), 0o700)
    with open(secret, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
        f.write("ab" * 32 + "\n")
    if start.runner != "machine":
        for path in (token_file, secret, os.path.dirname(secret)):
            os.chown(path, NOBODY, -1)
    worker, link = start("--token-file", token_file, *isolate)
    # Task 1 keeps a file in its directory and says where; task 2 tries to read it.
    link.assign(1, "shell", {"command": "echo private-words > mine.txt; pwd; sleep 5"})
    link.expect("task_accept")
    directory = None
    for _ in range(50):
        found = [os.path.join(root, "mine.txt") for root, _, files in os.walk(
            "/tmp/rc-worker-%d" % (0 if start.runner == "machine" else NOBODY))
            if "mine.txt" in files]
        if found:
            directory = os.path.dirname(found[0])
            break
        time.sleep(0.1)
    assert directory, "task 1 did not write its file"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    # Isolation may show an empty file in place of a secret: what counts is its words.
    probes = "; ".join("grep -qs %s %s && echo READ:%s" % (words, path, name)
                       for name, words, path in (
                           ("secret", "abab", secret), ("token", "a-join-token", token_file),
                           ("other", "private-words", os.path.join(directory, "mine.txt"))))
    probes += "; ls %s 2>/dev/null | grep -q %s && echo LISTED; echo done" % (
        os.path.dirname(directory), os.path.basename(directory))
    result = link.run("shell", {"command": probes}, task_id=2)
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "done\n", result["result"]
    with open(secret) as f:
        assert f.read() == "ab" * 32 + "\n"
    # The worker's own state is kept owner-only.
    assert stat.S_IMODE(os.stat(start.state).st_mode) == 0o700


def test_rlimit_nproc_stops_a_fork_bomb_and_the_worker_carries_on(start):
    worker, link = start()
    bomb = ("import os, time\n"
            "pids = []\n"
            "try:\n"
            "    for _ in range(10000):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        pids.append(pid)\n"
            "except OSError as e:\n"
            "    print('stopped', len(pids), e.errno)\n"
            "print(' '.join(map(str, pids)))\n")
    # The bomb ends by itself once RLIMIT_NPROC stops it: the timeout is only
    # a bound for a bomb that is not stopped (5 s was not enough for ~256
    # forks on a loaded machine: timed_out in a group run).
    link.assign(1, "python_exec", {"code": bomb}, timeout=60.0)
    result = link.results(1, 60)[1]
    assert result["status"] == "completed", result
    first, children = result["result"]["output"].splitlines()
    words = first.split()
    assert words[0] == "stopped" and int(words[2]) == 11, first      # EAGAIN
    assert int(words[1]) <= 256 + 64, "RLIMIT_NPROC let %s processes through" % words[1]
    pids = [int(pid) for pid in children.split()]
    assert wait_until(lambda: not any(map(alive, pids)), timeout=30), \
        [pid for pid in pids if alive(pid)]
    assert worker.proc.poll() is None
    after = link.run("shell", {"command": "echo still-here"}, task_id=2)
    assert after["result"]["output"] == "still-here\n", after


def test_task_dirs_and_cgroups_of_a_killed_worker_are_removed_at_start(start):
    uid = 0 if start.runner == "machine" else NOBODY
    gone = subprocess.Popen(["true"])
    gone.wait()
    top = os.path.join(tempfile.gettempdir(), "rc-worker-%d" % uid)
    if not os.path.isdir(top):
        os.mkdir(top, 0o711)
        os.chown(top, uid, -1)
    stale = os.path.join(top, "%s.%d" % (DEVICE_ID, gone.pid))
    os.makedirs(os.path.join(stale, "rc-task-x"))
    with open(os.path.join(stale, "rc-task-x", "left.txt"), "w") as f:
        f.write("left by a killed worker")
    if uid:
        for root, directories, files in os.walk(stale):
            for name in directories + files + [""]:
                os.chown(os.path.join(root, name), uid, -1)
    worker, link = start()
    assert wait_until(lambda: not os.path.exists(stale), timeout=5), os.listdir(stale)
    assert link.run("echo", {"message": "hi"})["status"] == "completed"


def test_self_test_names_the_isolation():
    proc = subprocess.run([sys.executable, "-I", WORKER, "--self-test"], timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("task user:", "task isolation:", "task tracking:")))
    assert set(lines) == {"task user", "task isolation", "task tracking"}, proc.stdout
    if IS_ROOT:
        assert "a uid of its own per task" in lines["task user"]
    else:
        assert "can read files of the worker's user" in proc.stdout


# -- the main node's local worker ------------------------------------------------------

@pytest.mark.e2e
def test_local_worker_tasks_reach_nothing_of_the_main_node():
    # A home every user may enter, as /var/lib/... is: the sandbox, not the
    # test's private directory, must be what keeps tasks out.
    home = tempfile.mkdtemp(prefix="rc-test-sandbox-home-")
    os.chmod(home, 0o755)
    cluster = Cluster(home)
    cluster.start()
    try:
        device = wait_for(lambda: cluster.db.execute(
            "SELECT device_id FROM devices WHERE device_id LIKE '%-local'"
            " AND status = 'online'").fetchone(), 30, "the local worker")[0]
        worker_py = os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "bin", "worker.py")
        with open(worker_py, "rb") as f:
            before = hashlib.sha256(f.read()).hexdigest()
        secrets = [os.path.join(home, "admin_token"), os.path.join(home, "tls", "key.pem"),
                   os.path.join(home, "db", "rc.db"), os.path.join(home, "token")]
        probes = "; ".join("cat %s >/dev/null 2>&1 && echo READ:%s" % (p, p) for p in secrets)
        probes += "; echo '# tampered' >> %s 2>/dev/null && echo WROTE; echo done" % worker_py
        task_id = submit_to(cluster, device, probes)
        row = wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in (
            "completed", "failed") and tasks.get(cluster.db, task_id), 60, "the probe task")
        assert row["state"] == "completed", row
        assert row["result"]["output"] == "done\n", row["result"]
        with open(worker_py, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == before, "bin/worker.py was changed"
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


# -- what the options say, imported ------------------------------------------------

@pytest.fixture(scope="module")
def module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_sandbox", WORKER)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_protected_paths_that_cannot_be_hidden_leave_only_harmless_task_types(
        module, monkeypatch):
    """The local worker of a main node run by a normal user where user
    namespaces are off (a container, Termux): it must not run code."""
    monkeypatch.setattr(module, "isolation_works", lambda *a: "namespaces are off (test)")
    monkeypatch.setattr(module.os, "geteuid", lambda: 1000)
    options = module.parse_args(["--self-test", "--hide", "/srv/rc/var", "--read-only",
                                 "/srv/rc"])
    assert options.task_types == ("echo", "sleep", "system_info")
    assert not options.isolated
    assert "namespaces are off (test)" in options.sandbox_notes[0]
    assert "/srv/rc/var" in options.sandbox_notes[0]
    # --isolate itself is a demand: the worker does not start without it.
    with pytest.raises(SystemExit):
        module.parse_args(["--self-test", "--isolate"])


def test_a_token_file_the_task_uids_could_read_is_refused(module, monkeypatch, capsys):
    """As root, tasks run as uids of their own: a token file every user may
    read would be theirs to read (the compose file's worker: docs/operations.md)."""
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(module, "isolation_works", lambda *a: "namespaces are off (test)")
    open_dir = tempfile.mkdtemp(dir="/tmp")       # /tmp: every user may pass through
    try:
        os.chmod(open_dir, 0o755)
        token = os.path.join(open_dir, "rc-join-token")
        with open(token, "w") as f:
            f.write("a-join-token\n")
        os.chmod(token, 0o644)
        with pytest.raises(SystemExit):
            module.parse_args(["--join", "h", "--token-file", token])
        assert "chmod 600" in capsys.readouterr().err
        os.chmod(token, 0o600)
        assert module.parse_args(["--join", "h", "--token-file", token]).token == "a-join-token"
        os.chmod(token, 0o644)
        os.chmod(open_dir, 0o700)                 # readable, but not reachable by others
        assert module.parse_args(["--join", "h", "--token-file", token]).token == "a-join-token"
        monkeypatch.setattr(module.os, "geteuid", lambda: 1000)   # tasks as our own user
        os.chmod(open_dir, 0o755)
        assert module.parse_args(["--join", "h", "--token-file", token]).token == "a-join-token"
    finally:
        shutil.rmtree(open_dir)


def test_task_user_options(module, monkeypatch):
    monkeypatch.setattr(module.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit):        # only root can change uid
        module.parse_args(["--self-test", "--task-user", "nobody"])
    assert module.parse_args(["--self-test"]).task_users is None
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    uids, gid, name = module.resolve_task_user("40000:8", 4)
    assert uids == list(range(40000, 40008)) and name == "40000-40007"
    with pytest.raises(ValueError):
        module.resolve_task_user("40000:2", 4)          # fewer uids than slots
    with pytest.raises(ValueError):
        module.resolve_task_user("no-such-user-here", 4)
    default = module.resolve_task_user(None, 4)[0]
    assert default and all(59000 <= uid < 59256 for uid in default)


def test_the_state_dir_and_its_secrets_are_made_owner_only(module, tmp_path):
    state = tmp_path / "state"
    (state / "cluster-1").mkdir(parents=True)
    (state / "cluster-1" / "dev.secret").write_text("ab" * 32 + "\n")
    for path, mode in ((state, 0o755), (state / "cluster-1", 0o755),
                       (state / "cluster-1" / "dev.secret", 0o644)):
        os.chmod(str(path), mode)
    module.Identity(str(state), "dev").prepare()
    assert [stat.S_IMODE(os.stat(str(path)).st_mode) for path in (
        state, state / "cluster-1", state / "cluster-1" / "dev.secret")] == [0o700, 0o700, 0o600]
    # A --state-dir that holds other things (a home directory, say) keeps its mode.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    os.chmod(str(home), 0o755)
    os.chmod(str(home / "notes.txt"), 0o644)
    module.Identity(str(home), "dev").prepare()
    assert stat.S_IMODE(os.stat(str(home)).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(str(home / "notes.txt")).st_mode) == 0o644


def test_a_look_at_a_directory_settled_a_tenth_of_a_second_ago_is_remembered(module,
                                                                           monkeypatch):
    """Leftovers reads a shared temporary directory before a task of a uid
    only when it changed since that uid's last look. A /tmp that other
    programs change every second was read before every task: a look is
    remembered once the change is LEFTOVERS_SETTLED_FINE old on a filesystem
    whose timestamps have fractions of a second (1 s before), and a change
    after it is still seen."""
    directory = tempfile.mkdtemp(prefix="rc-test-leftovers-")
    try:
        open(os.path.join(directory, "theirs"), "w").close()
        if os.stat(directory).st_mtime_ns % 1000000000 == 0:
            pytest.skip("timestamps in whole seconds here")
        reads = []
        real = module.remove_entries_of
        monkeypatch.setattr(module, "remove_entries_of",
                            lambda path, uid, *owners: reads.append(path)
                            or real(path, uid, *owners))
        leftovers = module.Leftovers(directories=(directory,), watch=False)
        time.sleep(module.LEFTOVERS_SETTLED_FINE + 0.1)
        leftovers.remove(os.geteuid() + 12345)
        assert os.stat(directory).st_mtime_ns / 1e9 > time.time() - 0.9, "too slow: no test"
        leftovers.remove(os.geteuid() + 12345)
        assert reads == [directory], "read again though nothing changed"
        open(os.path.join(directory, "new"), "w").close()
        leftovers.remove(os.geteuid() + 12345)
        assert reads == [directory, directory], "a change not seen"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_uid_whose_last_task_ended_whole_is_not_looked_at_again_before_its_next(
        module, monkeypatch):
    """A task uid's leftovers go when its task ends; before its next task
    they are looked for again only when that removal may have missed some:
    the uid's first task in this worker's life, or a task whose processes
    may not all have ended (an abandoned one's). Else nothing of the uid
    has run since: the look cost two passes over /proc/sysvipc, the keys
    and every shared directory per task. What the next task leaves is still
    found at its end: a directory it changed is read."""
    if not IS_ROOT:
        pytest.skip("a file of another uid needs root")
    directory = tempfile.mkdtemp(prefix="rc-test-leftovers-")
    looks = []
    monkeypatch.setattr(module, "remove_ipc_of", lambda uid: looks.append(uid) or 0)
    monkeypatch.setattr(module, "remove_keys_of", lambda uid: 0)
    uid = 59000 + random.randrange(200)
    try:
        leftovers = module.Leftovers(directories=(directory,))
        leftovers.before_task(uid)
        assert looks == [uid], "the uid's first task in this worker: looked for"
        leftovers.after_task(uid, ended=True)
        assert looks == [uid, uid]
        time.sleep(module.LEFTOVERS_SETTLED + 0.1)     # settled, whatever the timestamps
        leftovers.before_task(uid)
        assert looks == [uid, uid], "looked for though nothing of the uid ran since"
        left = os.path.join(directory, "left-by-the-task")
        open(left, "w").close()
        os.chown(left, uid, uid)
        leftovers.after_task(uid, ended=False)
        assert not os.path.exists(left), "what the task left stayed"
        leftovers.before_task(uid)
        assert looks == [uid, uid, uid, uid], "not looked for after a task that may live on"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_one_look_at_a_directory_serves_every_uid_it_found_nothing_of(module, monkeypatch):
    """Where no inotify follows a directory: four slots' uids each read a
    busy /tmp again after every change (3.8 ms for 1,100 entries here): a
    look now serves every uid it found no entry of, and a uid that owns one
    has the directory read again and its entries removed."""
    directory = tempfile.mkdtemp(prefix="rc-test-leftovers-")
    try:
        open(os.path.join(directory, "mine"), "w").close()     # the test's own uid's
        if os.stat(directory).st_mtime_ns % 1000000000 == 0:
            pytest.skip("timestamps in whole seconds here")
        # The directory only: as root, the test's uid's SysV IPC and keyrings
        # are the machine's (root's keyrings were emptied by each run)
        monkeypatch.setattr(module, "remove_ipc_of", lambda uid: 0)
        monkeypatch.setattr(module, "remove_keys_of", lambda uid: 0)
        reads = []
        real = module.remove_entries_of
        monkeypatch.setattr(module, "remove_entries_of",
                            lambda path, uid, *owners: reads.append(uid)
                            or real(path, uid, *owners))
        leftovers = module.Leftovers(directories=(directory,), watch=False)
        time.sleep(module.LEFTOVERS_SETTLED_FINE + 0.1)
        others = [os.geteuid() + 12345 + n for n in range(3)]
        for uid in others:
            leftovers.remove(uid)
        assert os.stat(directory).st_mtime_ns / 1e9 > time.time() - 0.9, "too slow: no test"
        assert reads == others[:1], "read again for each uid though nothing changed"
        leftovers.remove(os.geteuid())
        assert reads == others[:1] + [os.geteuid()], "a uid with an entry there not looked for"
        assert os.listdir(directory) == []
        time.sleep(module.LEFTOVERS_SETTLED_FINE + 0.1)
        leftovers.remove(others[0])
        assert reads[-1] == others[0], "the removal's change not seen"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_followed_directory_is_read_whole_once_then_by_the_names_inotify_reports(
        module, monkeypatch):
    """Leftovers reads a shared temporary directory whole once (a stat per
    entry: 3.8 ms for a /tmp of 1,100 here, before each task of a uid while
    other programs changed it), then looks only at the names created,
    moved in or given away since, and at those it found the uid owning;
    lost events mean a whole read again."""
    if os.geteuid() != 0:
        pytest.skip("gives files away (chown): root only")
    directory = tempfile.mkdtemp(prefix="rc-test-leftovers-")
    try:
        def make(name, uid):
            path = os.path.join(directory, name)
            open(path, "w").close()
            os.chown(path, uid, uid)
        task_a, task_b, someone = 59990, 59991, 59992
        make("old-a", task_a)
        make("old-someone", someone)
        reads, looked = [], []
        real_read, real_lstat = module.remove_entries_of, os.lstat
        monkeypatch.setattr(module, "remove_entries_of",
                            lambda path, uid, *owners: reads.append(uid)
                            or real_read(path, uid, *owners))
        monkeypatch.setattr(module.os, "lstat", lambda path, *rest: looked.append(
            os.path.basename(path)) or real_lstat(path, *rest))
        leftovers = module.Leftovers(directories=(directory,))
        if not leftovers.watch():
            pytest.skip("no inotify here")
        leftovers.remove(task_b)
        assert reads == [task_b] and sorted(os.listdir(directory)) == ["old-a", "old-someone"]
        for _ in range(3):
            leftovers.remove(task_b)
        assert reads == [task_b] and looked == [], "read again though nothing changed"
        make("new-b", task_b)
        make("new-someone", someone)
        os.chown(os.path.join(directory, "old-someone"), task_b, task_b)   # given away
        leftovers.remove(task_b)
        assert reads == [task_b], "read whole again"
        assert sorted(os.listdir(directory)) == ["new-someone", "old-a"]
        assert sorted(looked) == ["new-b", "new-someone", "old-someone"]
        del looked[:]
        leftovers.remove(task_a)
        # old-a, and the two its last look removed (their events), found gone
        assert os.listdir(directory) == ["new-someone"]
        assert sorted(looked) == ["new-b", "old-a", "old-someone"]
        # A name removed is forgotten: what is kept stays the directory's size.
        os.unlink(os.path.join(directory, "new-someone"))
        make("new-someone-2", someone)
        leftovers.remove(task_b)
        assert leftovers.owner_of[directory] == {"new-someone-2": someone}
        assert leftovers.names_of[directory][someone] == {"new-someone-2"}
        os.rename(os.path.join(directory, "new-someone-2"), os.path.join(directory, "new-someone"))
        make("later-a", task_a)
        leftovers.watching.names[directory] = None      # as after the kernel's queue overflowed
        leftovers.remove(task_a)
        assert reads == [task_b, task_a] and os.listdir(directory) == ["new-someone"]
        # The same directory by a second name (a link to it): read as before.
        link = directory + "-link"
        os.symlink(directory, link)
        try:
            twice = module.Leftovers(directories=(directory, link))
            assert twice.watch().follows(directory) and not twice.watching.follows(link)
        finally:
            os.unlink(link)
        # A file system mounted over it since: not followed, read as before.
        leftovers.watching.identities[directory] = (0, 0)
        make("mounted-a", task_a)
        leftovers.remove(task_a)
        assert reads == [task_b, task_a, task_a] and os.listdir(directory) == ["new-someone"]
        assert not leftovers.watching.follows(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
