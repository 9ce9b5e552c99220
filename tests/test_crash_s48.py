"""kill -9, restarts, full disks and time where no test looked before
session 48: supervisord itself killed, on a real cluster started as `make
run` starts it (the local worker included); a full disk under the state
directory and rc-cli.log; the main node's clock set back a day under
rc-scheduler, rc-reaper, schedules, services and alerts."""
import io
import os
import signal
import subprocess
import time
import types

import pytest

from cluster_harness import (RC, alive, assert_one_terminal_state_each, online,
                             wait_all_finished, wait_for, with_the_local_worker)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_local_worker(tmp_path_factory.mktemp("crash48"))


def supervisord_pid(cluster):
    with open(os.path.join(cluster.config.run_dir, "supervisord.pid")) as f:
        return int(f.read())


def running(pid):
    """Alive and not a zombie that nobody reaped yet (init, or a subreaper
    pytest runs under, reaps the orphans of a killed supervisord)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return alive(pid)


def test_supervisord_killed_takes_its_programs_and_make_run_brings_the_cluster_back(cluster):
    # A task running on the local worker when supervisord dies.
    task_id = int(cluster.rc("submit", "sleep", "2", "--retries", "3").stdout.split()[0])
    wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                        (task_id,)).fetchone()[0] == "running",
             30, "the task running")
    pids = {name: pid for name, (_, pid) in cluster.programs().items()}
    assert all(pids.values()), pids
    os.kill(supervisord_pid(cluster), signal.SIGKILL)
    # Orphaned, they went on: rc-web, rc-files, rc-reaper and the local
    # worker for good (the others at their next log line, a broken pipe),
    # and `make run` refused, saying another cluster held the ports.
    wait_for(lambda: not any(running(pid) for pid in pids.values()), 30,
             "every program of the killed supervisord to end: %s still run" % pids)
    cluster.db.close()
    cluster.start()
    wait_for(lambda: online(cluster), 30, "the local worker back online")
    wait_all_finished(cluster, [task_id], 60)
    assert_one_terminal_state_each(cluster, [task_id])
    assert cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                              (task_id,)).fetchone()[0] == "completed"


def test_submit_on_a_full_disk_that_takes_its_task_but_not_its_log_line_says_its_id(cluster):
    # The database had room (its write-ahead log reuses its pages), rc-cli.log
    # none: /dev/full fails each write as a full disk does (ENOSPC). Seen on a
    # full tmpfs as RC_HOME: a traceback, exit 1 and no id, the task queued.
    log_path = os.path.join(cluster.config.log_dir, "rc-cli.log")
    os.symlink("/dev/full", log_path + ".full")
    os.replace(log_path + ".full", log_path)
    try:
        done = cluster.rc("submit", "echo", "full disk", check=False)
    finally:
        os.unlink(log_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot write %s: [Errno 28] No space left on device" % log_path in done.stderr
    task_id = int(done.stdout)
    assert cluster.db.execute("SELECT count(*) FROM tasks WHERE payload LIKE '%full disk%'"
                              ).fetchone()[0] == 1
    wait_all_finished(cluster, [task_id], 30)


class ClockSetBack:
    """time.time and time.monotonic for rc-scheduler: each look() sets the
    wall clock back a day while a second passes."""

    def __init__(self):
        self.wall, self.mono = time.time(), 100.0

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono

    def step_back(self):
        self.wall -= 86400.0
        self.mono += 1.0


def test_a_clock_set_back_a_day_holds_up_no_schedule_nor_service(tmp_path, monkeypatch):
    """rc-scheduler looked at schedules and services again when the wall
    clock passed its last look's plus half a second: set back a day, it
    fired no schedule and started no service again for a day."""
    from rc import config as config_module
    from rc import scheduler
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    looks = []
    monkeypatch.setattr(scheduler.schedules, "fire_due", lambda *_: looks.append("s") or 0)
    monkeypatch.setattr(scheduler.services, "tend", lambda *_: looks.append("t") or 0)
    clock = ClockSetBack()
    monkeypatch.setattr(scheduler, "time", clock)
    state = {}
    scheduler.look_after_recurring(None, config, None, None, state)
    clock.step_back()
    scheduler.look_after_recurring(None, config, None, None, state)
    assert looks == ["s", "t", "s", "t"]


def test_a_schedule_fires_on_after_the_clock_is_set_back_and_a_firing_come_again_runs_once(
        tmp_path, monkeypatch):
    """A schedule's next firing was counted from its last: set back a day,
    a schedule of every minute fired nothing for a day."""
    from rc import config as config_module
    from rc import db, schedules
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    clock_file = tmp_path / "clock"
    monkeypatch.setenv(schedules.TEST_CLOCK_VARIABLE, str(clock_file))
    midnight = 1893456000.0         # 2030-01-01 00:00 UTC

    def fire_at(moment):
        with db.write(connection):     # overlap allowed, but not a pile of queued tasks
            connection.execute("UPDATE tasks SET state = 'running'")
        clock_file.write_text(repr(moment))
        schedules.fire_due(connection, config, types.SimpleNamespace(info=lambda *_, **__: None))
        return [row[0] for row in connection.execute(
            "SELECT idempotency_key FROM tasks ORDER BY task_id")]

    clock_file.write_text(repr(midnight + 30))
    spec = schedules.task_spec(config, "echo", {"message": "tick"})
    schedules.add(connection, config, "tick", "* * * * *", spec, "UTC", allow_overlap=True)
    assert fire_at(midnight + 60.5) == ["schedule:tick:%d" % (midnight + 60)]
    # Set back 30 s: the minute that fired comes again, and fires no second task.
    assert fire_at(midnight + 40) == ["schedule:tick:%d" % (midnight + 60)]
    assert fire_at(midnight + 61) == ["schedule:tick:%d" % (midnight + 60)]
    # Set back a day: the next minute fires.
    fired = fire_at(midnight + 61 - 86400)
    assert fire_at(midnight + 120.5 - 86400) == fired + ["schedule:tick:%d"
                                                       % (midnight + 120 - 86400)]
    connection.close()


def test_alerts_fired_before_the_clock_was_set_back_silence_no_rule(cluster_home, add_device):
    """An alert's cooldown and its once-an-outage were judged against when
    it last fired: set back a day, every rule that had fired stayed silent
    for a day (a failure rate of 4 in 4, a device gone since)."""
    from rc import alerts, db, tasks
    from rc.log import Logger
    config, connection = cluster_home
    config.alerts = [{"rule": "failure_rate", "above": 0.5, "min_tasks": 1, "window": 600},
                     {"rule": "device_offline", "after": 60}]
    log = Logger("rc-reaper", "error", io.BytesIO())
    ahead = time.time() + 86400          # the clock a day ahead, before it is put right
    add_device("pi", now=ahead - 120)

    def gone_and_failing(now):
        task_id = tasks.submit(connection, config, "echo", {"message": "x"})
        with db.write(connection):
            connection.execute("UPDATE devices SET status = 'offline', connected = 0,"
                               " last_seen = ?", (now - 120,))
            connection.execute("UPDATE tasks SET state = 'failed', finished_at = ?"
                               " WHERE task_id = ?", (now - 1, task_id))
        return sorted(alert.rule for alert in alerts.evaluate(connection, config, log, now))

    assert gone_and_failing(ahead) == ["device_offline", "failure_rate"]
    assert gone_and_failing(ahead - 86400 + 300) == ["device_offline", "failure_rate"]


def test_a_service_waiting_to_restart_when_the_clock_is_set_back_restarts(cluster_home,
                                                                          add_device):
    """Its run's restart time, set before the step, waited the whole step
    (a day) though no backoff is longer than service_restart_backoff_max."""
    from rc import schedules, services
    from test_schedules import Log, end_run
    config, connection = cluster_home
    add_device("pi")
    services.add(connection, config, "svc", schedules.task_spec(config, "shell",
                                                                {"command": "false"}))
    now = time.time() + 86400           # the clock a day ahead, before it is put right
    assert services.tend(connection, config, Log(), now) == 1
    task_id = services.get(connection, config, "svc", now)["runs"][0]["task_id"]
    end_run(connection, task_id, "failed", now, now + 1, {"exit_code": 1}, "exit status 1")
    services.tend(connection, config, Log(), now + 1)            # takes the end in
    assert services.tend(connection, config, Log(), now + 1.01) == 0     # its backoff
    assert services.tend(connection, config, Log(), now - 86400 + 10) == 1


def test_a_task_in_its_retry_backoff_when_the_clock_is_set_back_runs_at_once(tmp_path,
                                                                             monkeypatch):
    """Its not_before, set before the step, held it a day; and rc-scheduler,
    which looks again without a ring when a backoff ends, judged that by
    the wall clock too: set back a day, it looked at nothing not rung for a
    day."""
    from rc import config as config_module
    from rc import db, devices, reaper, scheduler, tasks
    from rc.log import Logger
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    reaper_connection = db.open_database(config.db_path)
    log = Logger("test", "error", io.BytesIO())
    clock = ClockSetBack()
    clock.wall += 86400                  # the clock a day ahead, before it is put right
    data = {"device_info": {"platform": "linux", "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": 2, "memory_gb": 4.0}, "task_types": ["echo"],
            "slots": 1, "role": "compute"}
    with db.write(connection):
        devices.register(connection, "pi", data, "127.0.0.1:1", clock.wall)
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    with db.write(connection):           # in its retry's backoff, as tasks.take_back leaves it
        connection.execute("UPDATE tasks SET not_before = ? WHERE task_id = ?",
                           (clock.wall + 30, task_id))
    monkeypatch.setattr(scheduler, "time", clock)
    state = {"seen": None, "wake_at": 0.0, "turnover": scheduler.Turnover(), "rung": True,
             "passed_at": 0.0, "cursor": scheduler.QueueCursor(), "waiting": False}
    scheduler.one_look(connection, config, log, log, state)
    clock.step_back()
    clock.mono += config.poll_interval
    reaper.sweep(reaper_connection, config, log, clock.wall)
    state["rung"] = False                # nothing rang: the reaper's sweep rings nobody
    scheduler.one_look(connection, config, log, log, state)
    assert tasks.get(connection, task_id)["state"] == "assigned"
    connection.close()
    reaper_connection.close()


def test_an_output_the_full_disk_refused_is_not_said_to_match_no_file():
    """On a main node whose disk was full, `rc submit --wait --output` said
    rc-server's line (not stored: does not fit), then that the glob
    "matched no file it left"; `rc get` said so alone."""
    from rc import commands
    task = {"task_id": 7, "state": "completed", "payload": {"outputs": ["out.bin", "*.log"]},
            "result": {"stderr": "rc-server: output 'out.bin' not stored: a file of 100000"
                                 " bytes does not fit: 41029632 bytes free on the main node's"
                                 " disk (67108864 kept in reserve)\n"}}
    err = io.StringIO()
    commands.note_unmatched_outputs(types.SimpleNamespace(err=err), task, [])
    assert err.getvalue() == ("rc: task 7: --output out.bin, *.log brought back no file: its"
                              " stderr says why\n")
    assert "out.bin, *.log brought back no file: its stderr says why" in commands.no_outputs(task)
    task["result"]["stderr"] = ""
    err = io.StringIO()
    commands.note_unmatched_outputs(types.SimpleNamespace(err=err), task, [])
    assert err.getvalue() == "rc: task 7: --output out.bin, *.log matched no file it left\n"


@pytest.fixture
def full_disk(tmp_path):
    """A state directory made by `rc init` on a tmpfs of 8 MiB, then filled."""
    path = str(tmp_path / "small")
    os.mkdir(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                            path], stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = dict(os.environ, RC_HOME=os.path.join(path, "var"),
                   RC_CONFIG=os.path.join(path, "no-such-rc.json"))
        assert subprocess.run([RC, "init"], env=env, stdout=subprocess.DEVNULL).returncode == 0
        with open(os.path.join(path, "filler"), "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        yield env
    finally:
        subprocess.run(["umount", "-l", path])


def test_a_command_on_a_full_disk_says_the_disk_is_full(full_disk):
    """With the main node stopped, SQLite cannot make the database's
    shared-memory file and says "disk I/O error": `make run` (its `rc
    init`) and every command said only that."""
    done = subprocess.run([RC, "status"], env=full_disk, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 1
    assert "the disk that holds %s/var/db is full (" % os.path.dirname(full_disk["RC_CONFIG"]) \
        in done.stderr, done.stderr


def test_rc_web_on_a_full_disk_answers_507_saying_so(full_disk):
    """It answered 500 "Internal Server Error" to a submit."""
    from rc import config as config_module
    from rc import state_dir
    from test_web import Client, serve, stop
    config = config_module.load(environ=full_disk)
    config.health_supervisor = False
    server, thread = serve(config)
    try:
        client = Client(server.effective_port, state_dir.read_secret(config.admin_token_path))
        status, body = client.submit({"task_type": "echo", "payload": {"message": "x"}})
    finally:
        stop(server, thread)
    assert status == 507, body
    assert "the disk that holds %s is full (" % os.path.dirname(config.db_path) in body["error"]
