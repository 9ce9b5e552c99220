"""What session 49's helpers found and left, each test one fault and its
fix: a schedule allowed to overlap that piled up queued tasks, upgrades
killed mid-write that left their new file, and a shared temporary tree
removed in the worker's loop."""
import io
import json
import os
import shutil
import signal
import subprocess

import pytest

from rc import commands, db, schedules
from test_worker import DEVICE_ID, TOKEN, WORKER, main  # noqa: F401 (fixture)
from test_worker_identity import edges

MIDNIGHT = 1893456000.0         # 2030-01-01 00:00 UTC


# -- 1. --allow-overlap is side by side, not piling up -------------------------------------

class Log:
    def __getattr__(self, level):
        return lambda *_, **__: None


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """The schedules' clock, set by the test (RC_TEST_CLOCK)."""
    path = tmp_path / "clock"

    def set_clock(moment):
        path.write_text(repr(float(moment)))
    set_clock(MIDNIGHT + 0.5)
    monkeypatch.setenv(schedules.TEST_CLOCK_VARIABLE, str(path))
    return set_clock


def rc(config, *argv):
    err = io.StringIO()
    assert commands.run_command(list(argv), io.StringIO(), err, config) == 0, err.getvalue()


def fire_at(connection, config, clock, moment):
    clock(moment)
    schedules.fire_due(connection, config, Log())
    return schedules.get(connection, "s49")["last_outcome"]


def task_ids(connection):
    return [row[0] for row in connection.execute("SELECT task_id FROM tasks ORDER BY task_id")]


def start(connection, task_id):
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running' WHERE task_id = ?", (task_id,))


def test_an_overlapping_schedule_skips_a_firing_while_its_last_task_is_queued(cluster_home,
                                                                              clock):
    """`--allow-overlap` for a task no device takes (`--require tags=gpu`)
    queued one more task at every firing, without limit: `@every 1s` made
    86,400 a day. A firing while the last one's task has not started is
    now skipped and says so; one while it runs still fires."""
    config, connection = cluster_home
    rc(config, "schedule", "add", "s49", "@every 1s", "shell", "train.sh",
       "--require", "tags=gpu", "--allow-overlap")
    assert fire_at(connection, config, clock, MIDNIGHT + 1.5).startswith("task ")
    [first] = task_ids(connection)
    for second in range(2, 6):
        outcome = fire_at(connection, config, clock, MIDNIGHT + second + 0.5)
        assert outcome == "skipped: task %d still queued (`rc why %d`)" % (first, first)
    assert task_ids(connection) == [first]
    start(connection, first)                 # running: the next firing runs beside it
    assert fire_at(connection, config, clock, MIDNIGHT + 6.5).startswith("task ")
    [_, second] = task_ids(connection)
    assert fire_at(connection, config, clock, MIDNIGHT + 7.5) == (
        "skipped: task %d still queued (`rc why %d`)" % (second, second))
    assert len(task_ids(connection)) == 2


def test_an_overlapping_fleet_chore_skips_a_firing_while_a_task_of_it_waits(cluster_home,
                                                                            clock, add_device):
    config, connection = cluster_home
    add_device("pi", now=MIDNIGHT)
    rc(config, "schedule", "add", "s49", "@every 1s", "echo", "hi", "--each",
       "--allow-overlap")
    assert fire_at(connection, config, clock, MIDNIGHT + 1.5).startswith("group ")
    [first] = task_ids(connection)
    group_id = schedules.get(connection, "s49")["last_group_id"]
    assert fire_at(connection, config, clock, MIDNIGHT + 2.5) == (
        "skipped: group %d still queued (`rc group %d`)" % (group_id, group_id))
    assert task_ids(connection) == [first]
    start(connection, first)
    assert fire_at(connection, config, clock, MIDNIGHT + 3.5).startswith("group ")
    assert len(task_ids(connection)) == 2


# -- 2. an upgrade killed while it was written -------------------------------------------

@edges
def test_a_worker_removes_the_upgrades_of_dead_workers_at_its_start(main, python, tmp_path):
    """A worker killed (-9) while it wrote an upgrade (`rc broadcast
    upgrade`) left worker.py.PID.new, ~0.5 MB, beside worker.py: one per
    kill, for ever. A worker now removes those of pids that no longer run
    as it starts; a running worker's (one writing now) and other names stay."""
    folder = tmp_path / "bin"
    folder.mkdir()
    worker = folder / "worker.py"
    shutil.copy(WORKER, str(worker))
    ended = subprocess.Popen(["true"])
    ended.wait()                             # its pid no longer runs
    dead = folder / ("worker.py.%d.new" % ended.pid)
    dead.write_bytes(b"#" * 500000)
    kept = [folder / ("worker.py.%d.new" % os.getpid()),      # alive: maybe writing now
            folder / ("worker.py.0%d.new" % ended.pid), folder / "worker.py.new",
            folder / ("other.py.%d.new" % ended.pid), folder / ("worker.py.%d" % ended.pid)]
    for path in kept:
        path.write_bytes(b"x")
    log_path = tmp_path / "worker.log"
    with open(str(log_path), "wb") as log_file:
        process = subprocess.Popen(
            [python, "-I", "-S", str(worker), "--join", "127.0.0.1:%d" % main.port,
             "--token", TOKEN, "--device-id", DEVICE_ID, "--state-dir", str(tmp_path / "state")],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        main.accept()                        # it connects once it has started
        assert not dead.exists()
        assert all(path.exists() for path in kept), kept
        with open(str(log_path)) as f:
            removed = [json.loads(line)["path"] for line in f
                       if '"upgrade_leftover_removed"' in line]
        assert removed == [str(dead)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- 3. a tree left on another file system than the task root -----------------------------

TAKE_IN_PLACE = r"""
import importlib.util, json, os, sys, threading
spec = importlib.util.spec_from_file_location("rc_worker_s49", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
shared, root, uid = sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
worker.remove_ipc_of = worker.remove_keys_of = lambda uid: 0
worker.log = lambda *_, **__: None
worker.REMOVER.root = root
go, done, in_loop = threading.Event(), threading.Event(), []
original = worker.remove_tree

def removing(path):
    in_loop.append(threading.current_thread() is threading.main_thread())
    if not in_loop[-1]:
        go.wait(60)             # held, to look at the tree handed over meanwhile
    original(path)
    done.set()
worker.remove_tree = removing

def make_tree(files):
    tree = os.path.join(shared, "build")
    os.makedirs(os.path.join(tree, "deep"))
    for name in files:
        open(os.path.join(tree, "deep", name), "w").close()
    for folder, names, leaves in os.walk(tree):
        for name in [folder] + [os.path.join(folder, leaf) for leaf in leaves]:
            os.chown(name, uid, uid)

make_tree(["f%d" % n for n in range(100)])
worker.Leftovers(directories=(shared,), watch=False).remove(uid)
held = [(info.st_uid, oct(info.st_mode & 0o777)) for info in
        (os.lstat(os.path.join(shared, name)) for name in os.listdir(shared))]
make_tree(["the next task's"])      # the uid's next task: the same name at once
go.set()
done.wait(60)
print(json.dumps({"in_loop": in_loop, "held": held, "left": sorted(os.listdir(shared)),
                  "next": os.listdir(os.path.join(shared, "build", "deep"))}))
"""


@pytest.fixture
def elsewhere(tmp_path):
    """A shared temporary directory (1777, root's) on another file system
    than the task root: in /dev/shm, a tmpfs, where there is one; else
    beside it, the task root left unset (as if elsewhere)."""
    root = tmp_path / "tasks"
    root.mkdir()
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(str(root)).st_dev:
        import tempfile
        shared = tempfile.mkdtemp(prefix="rc-s49-", dir="/dev/shm")
        task_root = str(root)
    else:
        shared, task_root = str(tmp_path / "shared"), ""
        os.mkdir(shared)
    os.chmod(shared, 0o1777)
    yield shared, task_root
    shutil.rmtree(shared, ignore_errors=True)


@edges
def test_a_tree_left_on_another_file_system_is_emptied_off_the_loop_and_spares_the_next(
        python, elsewhere):
    """A tree a task's uid left in a shared directory on another file
    system than the task root (/var/tmp, /dev/shm often are) could not be
    moved into it, and went in the worker's loop: 300,000 files in
    /dev/shm held the task's result 4.2 s. It is now made the worker's
    (0700) where it is, renamed there so its name is free for the uid's
    next task at once, and emptied by the remover's thread; what that next
    task makes under the same name stays."""
    if os.geteuid() != 0:
        pytest.skip("gives a tree away (chown): root only")
    shared, task_root = elsewhere
    done = subprocess.run([python, "-I", "-c", TAKE_IN_PLACE, WORKER, shared, task_root,
                           "59995"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["in_loop"] == [False], "removed in the worker's loop"
    assert seen["held"] == [[0, "0o700"]], "not the worker's, 0700, while it waited"
    assert seen["left"] == ["build"] and seen["next"] == ["the next task's"], seen


def test_a_tree_a_worker_that_ended_was_removing_goes_at_the_next_start(elsewhere):
    """A tree handed over in place is the worker's, under a name of its
    pid: one a worker killed meanwhile left is no task uid's, and no
    removal of leftovers took it. The next worker hands those of pids that
    no longer run (or its own, after an exec) to its thread; a running
    worker's, and what a task's uid named so, stay."""
    if os.geteuid() != 0:
        pytest.skip("makes a directory a task uid's (chown): root only")
    from test_worker_identity import load_worker_module
    module = load_worker_module()
    shared, _ = elsewhere
    ended = subprocess.Popen(["true"])
    ended.wait()
    names = {"dead": ".rc-left-%d-0a1b" % ended.pid, "own": ".rc-left-%d-2c3d" % os.getpid(),
             "running": ".rc-left-1-4e5f", "task's": ".rc-left-%d-6a7b" % ended.pid + "x",
             "not a pid": ".rc-left-x1-8c9d"}
    for who, name in names.items():
        os.makedirs(os.path.join(shared, name, "deep"))
        if who == "task's":
            os.chown(os.path.join(shared, name), 59994, 59994)
    assert module.REMOVER.remove_left_behind([shared]) == 2
    module.REMOVER.hand_over(os.path.join(shared, "build"))      # after them, in order
    os.mkdir(os.path.join(shared, "build"))
    from test_worker import wait_until
    assert wait_until(lambda: not os.path.exists(os.path.join(shared, "build")))
    assert sorted(os.listdir(shared)) == sorted(
        names[who] for who in ("running", "task's", "not a pid"))
