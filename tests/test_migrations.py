"""Upgrades: a database made by the first schema, with tasks in every state,
is upgraded in place by the current code and loses nothing."""
import os
import sqlite3
import sys

import pytest

from rc import db, health, stats, tasks
from rc import config as config_module
from rc.states import TASK_STATES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schema_fixture  # noqa: E402


def fill(connection):
    """Rows as the first release wrote them: a device, tasks in each state,
    a dependency, the counters the triggers keep."""
    connection.execute(
        "INSERT INTO devices(device_id, hostname, platform, architecture, role, cpu_cores,"
        " memory_gb, slots, status, connected, registered_at, last_seen)"
        " VALUES ('pi', 'pi', 'linux', 'aarch64', 'compute', 4, 3.8, 2, 'online', 1, 1, 1)")
    for number, state in enumerate(TASK_STATES * 20):
        connection.execute(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, state, created_at,"
            " device_id, result) VALUES ('echo', ?, 300, 3, 'queued', ?, ?, NULL)",
            ('{"message": "m%d"}' % number, 1000.0 + number, None))
        task_id = connection.execute("SELECT last_insert_rowid()").fetchone()[0]
        if state != "queued":
            connection.execute(
                "UPDATE tasks SET state = ?, device_id = 'pi', started_at = ?, finished_at = ?,"
                " result = ? WHERE task_id = ?",
                (state, 1001.0 + number, 1002.0 + number,
                 '{"output": "m%d"}' % number, task_id))
    connection.execute("INSERT INTO task_dependencies(task_id, depends_on) VALUES (2, 1)")


def snapshot(connection):
    connection.row_factory = sqlite3.Row
    rows = connection.execute("SELECT * FROM tasks ORDER BY task_id").fetchall()
    events = connection.execute("SELECT count(*) FROM task_events").fetchone()[0]
    return [dict(row) for row in rows], events


def test_the_first_schema_is_upgraded_in_place_with_no_task_lost(tmp_path):
    path = str(tmp_path / "rc.db")
    old = schema_fixture.load(path)
    fill(old)
    before, events = snapshot(old)
    counters = old.execute("SELECT * FROM counters ORDER BY name").fetchall()
    old.close()
    assert len(before) == 20 * len(TASK_STATES)

    connection = db.open_database(path)      # what every program does at start
    assert connection.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    after, events_after = snapshot(connection)
    for row_before, row_after in zip(before, after):
        assert {k: row_after[k] for k in row_before} == row_before
    assert len(after) == len(before) and events_after == events
    assert connection.execute("SELECT * FROM counters WHERE name NOT LIKE 'kept_%'"
                              " ORDER BY name").fetchall() == counters
    # Migration 17: how many tasks of each final state the table keeps.
    assert tasks.counts_by_state(connection) == {state: 20 for state in TASK_STATES}
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("PRAGMA foreign_key_check").fetchall() == []

    # The upgraded database works: submit, the history, health.
    connection.row_factory = sqlite3.Row
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    task_id = tasks.submit(connection, config, "echo", {"message": "after"})
    assert task_id == len(before) + 1 and tasks.get(connection, task_id)["state"] == "queued"
    assert stats.record(connection, config, 5000.0) > 0
    assert health.writable(connection, 5000.0).status == health.OK
    connection.close()


@pytest.mark.parametrize("version", range(1, db.SCHEMA_VERSION + 1))
def test_every_version_upgrades_to_the_current_one(tmp_path, version):
    """Made by the current code's first `version` migrations, then opened."""
    path = str(tmp_path / "rc.db")
    connection = db.connect(path)
    for number in range(version):
        for statement in db.split_statements(db.MIGRATIONS[number]):
            connection.execute(statement)
    connection.execute("PRAGMA user_version=%d" % version)
    connection.close()
    connection = db.open_database(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"tasks", "devices", "stats_minutes", "alert_state", "health_probe"} <= names
    connection.close()


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = str(tmp_path / "rc.db")
    db.open_database(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version=%d" % (db.SCHEMA_VERSION + 1))
    raw.close()
    with pytest.raises(RuntimeError, match="newer than this code"):
        db.open_database(path)


def shape(connection):
    """Tables with their columns, and the names of indexes and triggers (the
    text of a trigger may list states in any order)."""
    names = connection.execute("SELECT type, name FROM sqlite_master"
                               " WHERE name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    return {(kind, name): connection.execute("PRAGMA table_info(%s)" % name).fetchall()
            if kind == "table" else None for kind, name in names}


def test_the_frozen_first_schema_is_still_what_migration_1_makes(tmp_path):
    """Fails when migration 1 changes after release: then it needs a new
    migration at the end instead (or, before release, regenerate the fixture)."""
    frozen = schema_fixture.load(str(tmp_path / "frozen.db"))
    current = sqlite3.connect(":memory:")
    for statement in db.split_statements(db.MIGRATIONS[0]):
        current.execute(statement)
    assert shape(frozen) == shape(current), \
        "migration 1 changed: regenerate with .venv/bin/python tests/schema_fixture.py"
    frozen.close()
    current.close()


def test_a_queued_task_upgraded_into_migration_23_counts_what_it_still_waits_for(tmp_path):
    """Migration 23 counts, for each queued task of an older database, the
    tasks it depends on that have not completed: the scheduler's walk goes
    by that count alone."""
    path = str(tmp_path / "rc.db")
    connection = db.connect(path)
    for number in range(22):
        for statement in db.split_statements(db.MIGRATIONS[number]):
            connection.execute(statement)
    connection.execute("PRAGMA user_version=22")
    for task_id, state in ((1, "completed"), (2, "queued"), (3, "queued"), (4, "queued")):
        connection.execute(
            "INSERT INTO tasks(task_id, task_type, payload, timeout, max_retries, state,"
            " created_at) VALUES (?, 'echo', '{}', 300, 3, ?, 1000)", (task_id, state))
    connection.executemany("INSERT INTO task_dependencies(task_id, depends_on) VALUES (?, ?)",
                           [(3, 1), (3, 2), (4, 1)])
    connection.commit()
    connection.close()
    connection = db.open_database(path)
    assert dict(connection.execute("SELECT task_id, unmet_dependencies FROM tasks")) == \
        {1: 0, 2: 0, 3: 1, 4: 0}
    connection.close()
