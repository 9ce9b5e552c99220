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
import time

import pytest

from rc import config as config_module
from rc import alerts, db, devices, housekeeping, reaper
from rc.log import Logger
from rc.states import COMPLETED, FAILED

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
