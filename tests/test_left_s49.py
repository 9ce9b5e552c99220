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
