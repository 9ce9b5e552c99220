"""The reaper's minute holds the write lock for little, however many tasks
the database keeps.

rc-server acknowledges a heartbeat after committing it, and every program
shares one SQLite write lock: while rc-reaper read the whole tasks table
inside its write transactions (the failure_rate alert, task_retention's
pruning), each of 10,000 devices' heartbeats waited behind it. After a busy
day (millions of finished tasks) that wait was 2 s, once a minute (issue 7's
scale figure). The work is counted in SQLite virtual-machine instructions,
not seconds: a read of every row costs several per row, whatever the
machine's speed.
"""
import io
import random
import time

import pytest

from rc import config as config_module
from rc import alerts, db, devices, files, health, housekeeping, reaper, stats
from rc.log import Logger
from rc.states import (ASSIGNED, CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, TERMINAL_STATES,
                       TIMED_OUT)

LOG = Logger("test", "error", io.BytesIO())
FINISHED = 30000       # finished tasks the database keeps, from days ago
RECENT = 20            # and from the last minutes, three in four failed
COUNT_EVERY = 10       # instructions between two calls of the progress handler


@pytest.fixture
def busy(tmp_path):
    """A database a busy cluster leaves behind: many tasks finished an hour
    or more ago, a few just now, one device online."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    now = time.time()
    data = {"device_info": {"platform": "linux", "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": 2, "memory_gb": 4.0},
            "task_types": ["echo"], "slots": 1}
    with db.write(connection):
        devices.register(connection, "pi", data, "127.0.0.1:1", now)
        finished = [(now - 86400 + n, COMPLETED) for n in range(FINISHED)]
        finished += [(now - 60 + n, FAILED if n % 4 else COMPLETED) for n in range(RECENT)]
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, created_at, state,"
            " device_id, started_at, finished_at) VALUES ('echo', '{}', 60, 0, ?, ?, 'pi', ?, ?)",
            [(at - 1, state, at - 0.5, at) for at, state in finished])
    yield config, connection, now
    connection.close()


def instructions(connection, work, only_in_transaction):
    """(work()'s value, SQLite instructions it ran, counted COUNT_EVERY at a
    time) in all, or only inside a transaction (BEGIN ... COMMIT: the write
    lock held)."""
    counted = [0]

    def count():
        if not only_in_transaction or connection.in_transaction:
            counted[0] += COUNT_EVERY
        return 0
    connection.set_progress_handler(count, COUNT_EVERY)
    try:
        value = work()
    finally:
        connection.set_progress_handler(None, COUNT_EVERY)
    return value, counted[0]


def reaper_minute(config, connection, now):
    reaper.sweep(connection, config, LOG, now)
    reaper.prune(connection, config, now)
    housekeeping.every_minute(connection, config, LOG, now)


def test_the_reapers_minute_reads_no_whole_table_with_the_write_lock_held(busy):
    config, connection, now = busy
    _, held = instructions(connection, lambda: reaper_minute(config, connection, now), True)
    # A read of every finished task would cost several instructions per row.
    assert held < FINISHED, "%d SQLite instructions with the write lock held" % held


def test_the_reapers_minute_reads_no_whole_table_at_all(busy):
    config, connection, now = busy
    _, spent = instructions(connection, lambda: reaper_minute(config, connection, now), False)
    assert spent < FINISHED, "%d SQLite instructions in the reaper's minute" % spent


def test_the_failure_rate_alert_reads_only_its_window(busy):
    config, connection, now = busy
    rule = dict(alerts.RULE_DEFAULTS["failure_rate"], rule="failure_rate", min_tasks=RECENT)
    found, spent = instructions(
        connection, lambda: list(alerts.failure_rate(connection, config, rule, now)), False)
    assert [alert.details for alert in found] == [{"failed": 15, "finished": 20, "rate": 0.75}]
    assert spent < FINISHED, "%d SQLite instructions for %d recent tasks" % (spent, RECENT)


def test_pruning_finds_old_tasks_without_reading_the_kept_ones(busy):
    config, connection, now = busy
    # Retention of two days: nothing is old enough, and nothing may be read.
    pruned, spent = instructions(
        connection, lambda: housekeeping.prune_tasks(connection, 2 * 86400, now), False)
    assert pruned == 0
    assert spent < FINISHED, "%d SQLite instructions to prune nothing" % spent
    # Retention of half a day: all the old ones go, oldest first, the recent stay.
    assert housekeeping.prune_tasks(connection, 43200, now) == FINISHED
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == RECENT


# -- the rest of the minute: each read costs what its answer needs ------------------
# rc-reaper's minute also reads outside the write lock, and that CPU is taken
# from the programs beside it on a small main node, once a minute: the
# gauges, the alert rules and `rc health`'s queue checks count instructions
# in all here, with the same bound.

def add_tasks(connection, count, state, at, **columns):
    """`count` tasks in `state`, created (and finished, if it is terminal)
    at `at`; their ids."""
    names = sorted(columns)
    first = connection.execute("SELECT coalesce(max(task_id), 0) + 1 FROM tasks").fetchone()[0]
    with db.write(connection):
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, created_at, state,"
            " started_at, finished_at%s) VALUES ('echo', '{}', 60, 0, ?, ?, ?, ?%s)"
            % ("".join(", " + n for n in names), ", ?" * len(names)),
            [(at, state, None if state == QUEUED else at, at if state in TERMINAL_STATES else None)
             + tuple(columns[n] for n in names) for _ in range(count)])
    return list(range(first, first + count))


def test_the_minutes_gauges_count_only_queued_and_running_tasks(busy):
    config, connection, now = busy
    add_tasks(connection, 3, QUEUED, now - 5)
    add_tasks(connection, 2, RUNNING, now - 5)
    add_tasks(connection, 1, ASSIGNED, now - 5)
    found, spent = instructions(connection, lambda: stats.gauges(connection), False)
    assert (found["queue_length"], found["running"]) == (3, 3)
    assert (found["devices_total"], found["slots"]) == (1, 1)
    assert spent < FINISHED, "%d SQLite instructions for 6 unfinished tasks" % spent


def test_the_failure_rate_alert_counts_a_busy_window_no_further_than_its_answer(busy):
    config, connection, now = busy
    # The day's 30,000 completed tasks all finished in the last ten minutes,
    # beside the 15 recent failures.
    with db.write(connection):
        connection.execute("UPDATE tasks SET finished_at = finished_at + 86400 - 600"
                           " WHERE finished_at < ?", (now - 3600,))
    rule = dict(alerts.RULE_DEFAULTS["failure_rate"], rule="failure_rate")
    found, spent = instructions(
        connection, lambda: list(alerts.failure_rate(connection, config, rule, now)), False)
    assert found == []
    assert spent < FINISHED, "%d SQLite instructions for %d finished tasks" % (spent, FINISHED)


def naive_failure_rate(connection, rule, now):
    """The rule as it was written first: every task in the window counted."""
    counts = dict(connection.execute(
        "SELECT state, count(*) FROM tasks WHERE finished_at >= ? AND state IN"
        " ('completed', ?, ?) GROUP BY state", (now - rule["window"], FAILED, TIMED_OUT)))
    finished = sum(counts.values())
    failed = counts.get(FAILED, 0) + counts.get(TIMED_OUT, 0)
    if finished >= max(1, rule["min_tasks"]) and failed / finished > rule["above"]:
        return [{"failed": failed, "finished": finished, "rate": round(failed / finished, 3)}]
    return []


def test_the_failure_rate_alert_fires_on_exactly_the_windows_it_did(tmp_path):
    """Counting the completed tasks only as far as the rate could still be
    over `above` changes nothing: the same alerts, with the same figures."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    now = time.time()
    generator = random.Random(7)
    outcomes = [COMPLETED] * 6 + [FAILED] * 3 + [TIMED_OUT, CANCELLED]
    for _ in range(300):
        state = generator.choice(outcomes)
        add_tasks(connection, 1, state, now - generator.uniform(0, 1200))
    add_tasks(connection, 5, QUEUED, now - 10)
    add_tasks(connection, 2, FAILED, now - 300)         # on a window's first instant
    add_tasks(connection, 2, COMPLETED, now - 900)
    checked = fired = 0
    for window in (0, 30, 60, 61.5, 300, 900, 1200, 5000):
        for above in (0, 0.1, 0.25, 1 / 3.0, 0.4, 0.5, 0.6, 0.99, 1, 2):
            for min_tasks in (0, 1, 10, 100, 250, 1000):
                rule = {"rule": "failure_rate", "window": window, "above": above,
                        "min_tasks": min_tasks}
                found = [a.details for a in alerts.failure_rate(connection, config, rule, now)]
                assert found == naive_failure_rate(connection, rule, now), rule
                checked, fired = checked + 1, fired + len(found)
    connection.close()
    assert 0 < fired < checked       # some fired, some did not


def test_the_queue_checks_read_only_queued_tasks(busy):
    config, connection, now = busy
    ready = add_tasks(connection, 3, QUEUED, now - 3600)
    add_tasks(connection, 2, QUEUED, now - 3600, not_before=now + 600)   # backing off
    add_tasks(connection, 2, QUEUED, now - 5)                             # just submitted
    unfit = add_tasks(connection, 2, QUEUED, now - 3600, requirements='{"platform": "plan9"}')
    found, spent = instructions(
        connection, lambda: [row["task_id"] for row in
                             health.ready_queued(connection, now, now - 600)], False)
    assert found == ready + unfit
    assert spent < FINISHED, "%d SQLite instructions for 9 queued tasks" % spent
    found, spent = instructions(
        connection, lambda: health.unfit_tasks(connection, config, now), False)
    assert found.values == {"unfit": 2} and "task %d " % unfit[0] in found.message
    assert spent < FINISHED, "%d SQLite instructions for 9 queued tasks" % spent


def test_pruning_groups_reads_no_group_that_is_still_young(busy):
    config, connection, now = busy
    retention = 86400
    with db.write(connection):
        connection.executemany(
            "INSERT INTO task_groups(created_at, task_type, payload, include_new)"
            " VALUES (?, 'echo', '{}', ?)",
            [(now - retention - 10, 0), (now - retention - 10, 0), (now - retention - 10, 1)]
            + [(now - n, 0) for n in range(FINISHED)])
        connection.execute("UPDATE tasks SET group_id = 2 WHERE task_id = ?",
                           (FINISHED + 1,))
    pruned, held = instructions(
        connection, lambda: housekeeping.prune_groups(connection, retention, now), True)
    assert pruned == 1
    assert held < FINISHED, "%d SQLite instructions with the write lock held" % held
    kept = [row[0] for row in connection.execute(
        "SELECT group_id FROM task_groups WHERE group_id <= 3")]
    assert kept == [2, 3]        # a task still in it; devices joining later get one


def test_the_file_sweep_reads_no_whole_table_of_task_files(busy, monkeypatch):
    config, connection, now = busy
    with db.write(connection):
        connection.executemany(
            "INSERT INTO task_files(task_id, attempt, kind, name, sha256, size, created_at)"
            " VALUES (?, 0, 'input', 'in.txt', ?, 1, ?)",
            [(task_id, "0" * 64, now) for task_id in range(1, FINISHED + 1)])
    removed, held = instructions(connection, lambda: files.sweep(connection, config, now), True)
    assert removed == 0
    assert held < FINISHED, "%d SQLite instructions with the write lock held" % held
    # Pruned tasks' rows go with them; rows an older version left without
    # their task go in a later sweep, a slice at a time.
    assert housekeeping.prune_tasks(connection, 43200, now) == FINISHED
    assert connection.execute("SELECT count(*) FROM task_files").fetchone()[0] == 0
    orphans = [(FINISHED + RECENT + n, "0" * 64, now) for n in range(1, 6)]
    with db.write(connection):
        connection.executemany(
            "INSERT INTO task_files(task_id, attempt, kind, name, sha256, size, created_at)"
            " VALUES (?, 0, 'input', 'in.txt', ?, 1, ?)", orphans)
    monkeypatch.setattr(files, "ORPHAN_CHECK_TASKS", 2)
    for _ in range(3):
        files.sweep(connection, config, now)
    assert connection.execute("SELECT count(*) FROM task_files").fetchone()[0] == 0
