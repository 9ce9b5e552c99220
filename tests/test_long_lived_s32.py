"""A cluster that has run for months: what a user asks costs what its answer
needs, however many finished tasks, files and devices the database keeps.

The database is built once for the module (tests/long_lived_db.py): finished
tasks of every state over the retention and some past it, maps, files,
devices long gone, their logs, a week of history minutes. The work is
counted in SQLite virtual-machine instructions on every connection the
code opens, as tests/test_write_lock_upkeep.py counts it: reading every
task costs several per task, whatever the machine's speed. Wall-clock
figures are in the session's report (tests/long_lived_measure.py).
"""
import contextlib
import io
import json
import os
import random
import sqlite3
import tracemalloc
import sys
import time

import pytest

from rc import config as config_module
from rc import alerts, commands, db, devices, health, housekeeping, logs, records, tasks, web
from rc.log import Logger
from rc import files as files_module
from rc.states import ACTIVE_STATES, QUEUED, TASK_STATES, TERMINAL_STATES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_lived_db  # noqa: E402

TASKS = 100000         # in the database: ~10% past the retention, 1% unfinished
DEVICES = 100
FILES = 3000
COUNT_EVERY = 10       # instructions between two calls of the progress handler


class Counted:
    """SQLite instructions run on every connection opened through
    db.connect while installed (rc-web's own, commands.connect's)."""

    def __init__(self, monkeypatch):
        self.spent = 0
        connect = db.connect

        def counted_connect(path):
            connection = connect(path)
            connection.set_progress_handler(self.count, COUNT_EVERY)
            return connection
        monkeypatch.setattr(db, "connect", counted_connect)

    def count(self):
        self.spent += COUNT_EVERY
        return 0

    def __call__(self, work):
        self.spent = 0
        value = work()
        return value, self.spent


@pytest.fixture(scope="module")
def year(tmp_path_factory):
    """(config, its RC_HOME) of a state directory holding the year's database."""
    home = tmp_path_factory.mktemp("year")
    settings = home / "settings.json"
    settings.write_text(json.dumps({"read_access": "open", "web_host": "127.0.0.1"}))
    config = config_module.load(environ={"RC_HOME": str(home), "RC_CONFIG": str(settings)})
    long_lived_db.build(config.db_path, TASKS, DEVICES, FILES)
    return config


@pytest.fixture
def copy_of_year(year, tmp_path):
    """A copy of the year's database this test may change: (config, connection)."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path),
                                         "RC_CONFIG": str(tmp_path / "none.json")})
    os.makedirs(os.path.dirname(config.db_path))
    source, target = sqlite3.connect(year.db_path), sqlite3.connect(config.db_path)
    source.backup(target)
    source.close()
    target.close()
    connection = db.open_database(config.db_path)
    yield config, connection
    connection.close()


def wsgi_get(app, path):
    """(status, body) of GET `path` through the app, as waitress would call it."""
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "HTTP_HOST": "127.0.0.1:5000",
               "REMOTE_ADDR": "127.0.0.1", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO()}
    statuses = []
    body = b"".join(app(environ, lambda status, headers, *_: statuses.append(status)))
    return int(statuses[0].split()[0]), body


# -- what a user reads: rc-web's routes, which rc's commands share --------------------

READS = ["/api/v1/status", "/text/status", "/api/v1/overview", "/text/metrics",
         "/api/v1/tasks", "/api/v1/tasks?state=queued", "/api/v1/tasks?state=running",
         "/api/v1/tasks?state=assigned", "/api/v1/tasks?state=failed", "/text/tasks",
         "/api/v1/stats", "/api/v1/devices", "/text/devices", "/api/v1/completion"]


@pytest.mark.parametrize("path", READS)
def test_a_read_costs_its_answer_not_the_history(year, monkeypatch, path):
    counted = Counted(monkeypatch)
    app = web.make_app(year)
    (status, body), spent = counted(lambda: wsgi_get(app, path))
    assert status == 200, body[:300]
    # Reading every kept task would cost several instructions per task.
    assert spent < TASKS, "%s: %d SQLite instructions" % (path, spent)


def test_the_status_counts_are_the_tasks_the_database_holds(year, monkeypatch):
    counted = Counted(monkeypatch)
    connection = db.connect(year.db_path)
    summary, spent = counted(lambda: records.status_summary(connection))
    truth = dict(connection.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
    connection.close()
    assert {state: summary["tasks_" + state] for state in TASK_STATES} == \
        {state: truth.get(state, 0) for state in TASK_STATES}
    assert summary["queue_length"] == truth[QUEUED] > 0
    assert spent < TASKS, "%d SQLite instructions for rc status" % spent


def test_the_counts_stay_true_as_tasks_come_finish_and_are_pruned(copy_of_year):
    """The kept_<state> counter rows follow every way a task enters, leaves
    or ends: submit, a finish (also by a failed dependency), the prune."""
    config, connection = copy_of_year
    generator = random.Random(32)
    now = time.time()

    def truth():
        found = dict.fromkeys(TASK_STATES, 0)
        found.update(connection.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
        return found
    assert tasks.counts_by_state(connection) == truth()
    submitted = [tasks.submit(connection, config, "echo", {"message": "m%d" % n})
                 for n in range(40)]
    dependent = tasks.submit(connection, config, "echo", {"message": "after"},
                             depends_on=[submitted[0]])
    with db.write(connection):
        for task_id in submitted:
            state = generator.choice(TERMINAL_STATES + ACTIVE_STATES)
            connection.execute("UPDATE tasks SET state = ?, device_id = 'old-0001',"
                               " finished_at = ? WHERE task_id = ?",
                               (state, now if state in TERMINAL_STATES else None, task_id))
    assert tasks.counts_by_state(connection) == truth()
    assert connection.execute("SELECT state FROM tasks WHERE task_id = ?",
                              (dependent,)).fetchone()[0] in (QUEUED, "failed")
    assert housekeeping.prune_tasks(connection, config.task_retention, now) > 0
    assert tasks.counts_by_state(connection) == truth()


# -- the upkeep on a backlog: the write-ahead log stays small --------------------------

def test_pruning_a_backlog_keeps_the_write_ahead_log_small(tmp_path, monkeypatch):
    """Half of 60,000 tasks, and of 20,000 files, past their retention at
    once (a retention just lowered, a reaper stopped for days): the prune and
    the file sweep copy the log into the database as they go, so it stays
    near db.BATCH_WAL_BYTES and the minute's TRUNCATE has nothing to do,
    rather than growing by every transaction's pages (~1 KB a task).
    No program waits for the write lock here: the pauses a prune leaves
    them between its transactions (db.give_way, checked by
    test_the_prunes_leave_the_write_lock_free_between_their_transactions)
    are left out; they were a fifth of its time and change nothing in the log."""
    monkeypatch.setattr(db, "give_way", lambda held: None)
    config = config_module.load(environ={"RC_HOME": str(tmp_path),
                                         "RC_CONFIG": str(tmp_path / "none.json")})
    long_lived_db.build(config.db_path, 60000, DEVICES, 20000, past_retention=0.5)
    connection = db.open_database(config.db_path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    now = time.time()
    assert housekeeping.prune_tasks(connection, config.task_retention, now) > 25000
    after_tasks = db.wal_bytes(connection)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert files_module.sweep(connection, config, now) > 9000
    after_files = db.wal_bytes(connection)
    done = housekeeping.checkpoint(connection, config.wal_checkpoint_bytes)
    connection.close()
    most = db.BATCH_WAL_BYTES + 4 * 1024 * 1024      # the limit, and a transaction past it
    assert after_tasks < most and after_files < most, (after_tasks, after_files)
    assert not done["wal_checkpointed"], done


# -- rc health and /health ----------------------------------------------------------

def test_health_reads_the_whole_database_at_most_every_ten_minutes(copy_of_year, monkeypatch):
    """PRAGMA quick_check reads every page (0.4-0.9 s on the year's 250 MB):
    Docker's HEALTHCHECK each minute and anyone's GET /health ran it at every
    look. A check that passed is trusted for health.INTEGRITY_EVERY."""
    config, connection = copy_of_year
    checks = []
    connect = db.connect

    def traced_connect(path):
        opened = connect(path)
        opened.set_trace_callback(lambda sql: checks.append(sql) if "quick_check" in sql
                                  else None)
        return opened
    monkeypatch.setattr(db, "connect", traced_connect)
    monkeypatch.setattr(config, "health_supervisor", False)
    now = time.time()
    for moment in (now, now + 60, now + 599):
        found = {f.name: f for f in health.check(config, now=moment).findings}
        assert (found["integrity"].status, found["integrity"].message) == \
            (health.OK, "integrity ok")
    assert len(checks) == 1
    health.check(config, now=now + 601)
    assert len(checks) == 2


def test_the_prunes_leave_the_write_lock_free_between_their_transactions(copy_of_year,
                                                                          monkeypatch):
    """rc-server, rc-scheduler and rc-files wait for the write lock in
    SQLite's busy handler, which looks again after sleeping up to 100 ms:
    a prune that took the lock again at once left it almost never free when
    they looked (rc-server's writes waited 0.9 s behind a backlog's 101
    transactions). Each transaction of a prune is followed by a pause at
    least as long as it held the lock (db.give_way)."""
    config, connection = copy_of_year
    held = []
    write = db.write

    @contextlib.contextmanager
    def timed_write(conn):
        started = time.monotonic()
        with write(conn):
            yield conn
        held.append((started, time.monotonic()))
    monkeypatch.setattr(db, "write", timed_write)
    now = time.time()

    def prune_heartbeats():
        before = connection.execute("SELECT count(*) FROM heartbeats").fetchone()[0]
        devices.prune_heartbeats(connection, now)
        return before - connection.execute("SELECT count(*) FROM heartbeats").fetchone()[0]
    for prune, least in ((lambda: housekeeping.prune_tasks(connection, config.task_retention,
                                                           now), 5000),
                         (lambda: files_module.sweep(connection, config, now), 500),
                         (prune_heartbeats, 8000)):
        del held[:]
        assert prune() > least
        pauses = [(b_start - a_end, a_end - a_start)
                  for (a_start, a_end), (b_start, _) in zip(held, held[1:])]
        assert len(pauses) >= 2
        short = [(pause, took) for pause, took in pauses
                 if pause < min(max(took, db.GIVE_WAY_MIN), db.GIVE_WAY_MAX)]
        assert not short, "%d of %d pauses shorter than the transaction before" \
            % (len(short), len(pauses))


# -- the dashboard's device grid ----------------------------------------------------

def test_the_dashboards_grid_shows_the_devices_at_work_among_many_long_gone(copy_of_year,
                                                                             monkeypatch):
    """A cluster that has seen more devices than the grid holds: it showed
    the first OVERVIEW_DEVICES by id, all long gone, and not the one online
    (the year's database: 1,334 devices not forgotten, 'vm-local' last)."""
    config, connection = copy_of_year
    now = time.time()
    with db.write(connection):
        connection.execute("INSERT INTO devices(device_id, status, connected, registered_at,"
                           " last_seen) VALUES ('zz-pi', 'online', 1, ?, ?)", (now, now))
    monkeypatch.setattr(web, "OVERVIEW_DEVICES", 10)
    routes = web.DashboardRoutes(web.make_app(config).config["rc.web"])
    shown = [device["device_id"] for device in routes.picture(connection)["devices"]]
    assert len(shown) == 10 and "zz-pi" in shown
    assert shown == sorted(shown)
    # After the online one, those heard from last.
    latest = [row[0] for row in connection.execute(
        "SELECT device_id FROM devices WHERE forgotten = 0 AND status != 'online'"
        " ORDER BY last_seen DESC LIMIT 9")]
    assert set(shown) == set(latest) | {"zz-pi"}


# -- rc logs over logs rotated to their limit ---------------------------------------

def write_logs(log_dir, now):
    """rc-server.log and its backup .1, 4 MB each (supervisord keeps six of
    10 MB per program): info lines, task 7's lines and three errors in both,
    the current file's last line not ended yet."""
    os.makedirs(log_dir, exist_ok=True)
    written = []
    for suffix, start in ((".1", now - 7200), ("", now - 3600)):
        lines, size, moment = [], 0, start
        while size < 4 * 1024 * 1024:
            moment += 0.01
            number = len(lines)
            record = {"time": round(moment, 6), "program": "rc-server", "level": "info",
                      "event": "task_finished", "task_id": 1000 + number % 5000,
                      "device_id": "old-%04d" % (number % 100), "status": "completed"}
            if number % 20000 == 3:
                record.update(level="error", event="frame_refused")
            if number % 9000 == 5:
                record.update(task_id=7)
            line = json.dumps(record, separators=(",", ":"))
            lines.append(line)
            size += len(line) + 1
        with open(os.path.join(log_dir, "rc-server.log" + suffix), "w") as f:
            f.write("\n".join(lines) + ("\n" if suffix else ""))
        written.extend(lines)
    return [json.loads(line) for line in written]


@pytest.mark.parametrize("arguments", [["--level", "error"], ["--task", "7"],
                                       ["--level", "info", "-n", "30"],
                                       ["--device", "old-0042", "-n", "20"]])
def test_rc_logs_with_a_filter_holds_its_answer_not_the_logs(copy_of_year, arguments):
    """A filter read every line of every file into memory (325 MB of Python
    for 360 MB of logs, 9.8 s, for `--level error`) before keeping the last
    -n; now the files are read from their end back, a block at a time, and
    only the lines kept are held. The answer is the same."""
    config, _ = copy_of_year
    written = write_logs(config.log_dir, time.time())
    out, err = io.StringIO(), io.StringIO()
    tracemalloc.start()
    try:
        status = commands.run_command(["logs"] + arguments, out, err, config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0, err.getvalue()
    count = int(arguments[3]) if len(arguments) > 2 else 50
    wanted = logs.LogFilter(**{arguments[0][2:].replace("task", "task_id").replace(
        "device", "device_id"): int(arguments[1]) if arguments[0] == "--task" else arguments[1]})
    expected = [record for record in written if wanted(record)][-count:]
    shown = out.getvalue().splitlines()
    assert shown == [commands.format_log_line(record) for record in expected]
    assert 0 < len(shown) <= count
    # The logs are 8 MB: a block of them at a time, and what is shown.
    assert peak < 6 * 1024 * 1024, "%d bytes held to show %d lines" % (peak, len(shown))


def test_the_device_stream_makes_records_of_the_devices_that_changed(copy_of_year,
                                                                     monkeypatch):
    """/stream/devices looks at every change of the database (up to five
    times a second on a busy cluster): it made every device's record each
    time, 15-40 ms for the year's 1,334 devices, for each open stream."""
    config, connection = copy_of_year
    monkeypatch.setattr(web, "STREAM_POLL_INTERVAL", 0.01)
    made = []
    device_dict = devices.device_dict
    monkeypatch.setattr(devices, "device_dict", lambda row: made.append(1) or device_dict(row))
    events = web.make_app(config).config["rc.web"].device_events(None)
    try:
        first = next(events)
        kept = connection.execute("SELECT count(*) FROM devices WHERE forgotten = 0").fetchone()[0]
        assert first.count("event: device\n") == kept == len(made) > 50
        del made[:]
        with db.write(connection):
            connection.execute("UPDATE devices SET hostname = 'renamed' WHERE device_id ="
                               " (SELECT min(device_id) FROM devices WHERE forgotten = 0)")
        changed = ""
        while not changed:
            changed = next(events)
        assert changed.count("event: device\n") == 1 and "renamed" in changed
        assert len(made) == 1
    finally:
        events.close()


# -- alerts --------------------------------------------------------------------------

def test_a_device_gone_for_good_alerts_once_not_every_hour(copy_of_year, tmp_path):
    """The year's database keeps devices that left months ago and were never
    forgotten: device_offline fired for each of them at every
    alert_cooldown, for ever (1,333 alerts, and as many alert commands at
    once, in the reaper's first minute and every hour after). Now each
    fires once, and the minute's alert commands are at most COMMANDS_AT_ONCE,
    the last one for the rest."""
    config, connection = copy_of_year
    log = Logger("rc-reaper", "error", io.BytesIO())
    config.alerts = [{"rule": "device_offline", "after": 900}]
    marker = tmp_path / "alerts.txt"
    config.alert_command = 'echo "$RC_ALERT_RULE $RC_ALERT_SUBJECT $RC_ALERT_COUNT" >> %s' % marker
    gone = connection.execute("SELECT count(*) FROM devices WHERE forgotten = 0"
                              " AND status = 'offline'").fetchone()[0]
    now = time.time()
    assert len(alerts.evaluate(connection, config, log, now)) == gone > 50
    deadline = time.time() + 60
    while alerts._children and time.time() < deadline:
        alerts.reap_children(time.time())
        time.sleep(0.05)
    ran = sorted(marker.read_text().splitlines())
    assert len(ran) == alerts.COMMANDS_AT_ONCE
    assert ran[0] == "alerts more %d" % (gone - alerts.COMMANDS_AT_ONCE + 1)
    assert all(line.startswith("device_offline old-") for line in ran[1:])
    config.alert_command = ""
    for hours in (2, 5, 24 * 7):
        assert alerts.evaluate(connection, config, log, now + hours * 3600) == []
    # One comes back for a while, then goes again: that is a new time away.
    with db.write(connection):
        connection.execute("UPDATE devices SET last_seen = ? WHERE device_id = 'old-0001'",
                           (now + 24 * 7 * 3600,))
    fired = alerts.evaluate(connection, config, log, now + 24 * 8 * 3600)
    assert [alert.subject for alert in fired] == ["old-0001"]
