"""The SQLite store: pragmas, migrations, events and the terminal-state guard."""
import sqlite3

import pytest

from rc import config as config_module
from rc import db, devices, tasks
from rc.states import CANCELLED, COMPLETED, QUEUED


@pytest.fixture
def store(tmp_path):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    yield config, connection
    connection.close()


def add_device(connection, device_id="pi", slots=2, **specs):
    data = {"device_info": {"platform": "linux", "architecture": "aarch64"},
            "hardware_specs": dict({"cpu_cores": 4, "memory_gb": 1.0}, **specs),
            "task_types": ["echo", "shell"], "tags": ["big"], "slots": slots,
            "role": "compute", "protocol": 1}
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", 1.0)


def test_every_connection_has_the_same_pragmas(store):
    config, connection = store
    other = db.connect(config.db_path)
    for c in (connection, other):
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
    assert connection.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    other.close()


def test_migrating_twice_changes_nothing(store):
    config, connection = store
    db.migrate(connection)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION


def test_a_newer_schema_is_refused(store):
    config, connection = store
    connection.execute("PRAGMA user_version=%d" % (db.SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer"):
        db.migrate(connection)


def test_every_state_change_is_an_event(store):
    config, connection = store
    add_device(connection)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='pi' WHERE task_id=?",
                           (task_id,))
        assert tasks.accept(connection, task_id, 1, "pi", 2.0)
        assert tasks.finish(connection, task_id, 1, "pi", COMPLETED, {"output": "hi"},
                            None, "completed", 3.0)
    task = tasks.get(connection, task_id)
    assert [event["state"] for event in task["events"]] == [
        "queued", "assigned", "running", "completed"]
    assert task["result"] == {"output": "hi"}


def test_a_terminal_state_never_changes(store):
    config, connection = store
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    assert tasks.cancel(connection, task_id) == CANCELLED
    with pytest.raises(sqlite3.IntegrityError, match="finished task"):
        with db.write(connection):
            connection.execute("UPDATE tasks SET state='queued' WHERE task_id=?", (task_id,))
    assert tasks.get(connection, task_id)["state"] == CANCELLED


def test_fencing_ignores_stale_attempts_and_other_devices(store):
    config, connection = store
    add_device(connection, "pi")
    add_device(connection, "laptop")
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='pi' WHERE task_id=?",
                           (task_id,))
        assert not tasks.accept(connection, task_id, 1, "laptop", 1.0)
        assert not tasks.accept(connection, task_id, 2, "pi", 1.0)
        row = connection.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        assert tasks.retry_or_fail(connection, row, "device pi offline", 1.0, config)
        # The old attempt's result arrives late: it changes nothing.
        assert not tasks.finish(connection, task_id, 1, "pi", COMPLETED, {}, None, "x", 2.0)
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["device_id"]) == (QUEUED, 2, None)


def test_retries_are_spent_then_the_task_fails(store):
    config, connection = store
    add_device(connection)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"}, retries=1)
    for attempt in (1, 2):
        with db.write(connection):
            connection.execute("UPDATE tasks SET state='assigned', device_id='pi'"
                               " WHERE task_id=?", (task_id,))
            row = connection.execute("SELECT * FROM tasks WHERE task_id=?",
                                     (task_id,)).fetchone()
            assert row["attempt"] == attempt
            assert tasks.retry_or_fail(connection, row, "device lost", 1.0, config)
    task = tasks.get(connection, task_id)
    assert task["state"] == "failed" and "retries spent" in task["reason"]


def test_idempotency_key_returns_the_first_task(store):
    config, connection = store
    first = tasks.submit(connection, config, "echo", {"message": "a"}, idempotency_key="k1")
    again = tasks.submit(connection, config, "echo", {"message": "b"}, idempotency_key="k1")
    assert first == again
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1


@pytest.mark.parametrize("texts, message", [
    (["cores"], "KEY=VALUE"),
    (["colour=blue"], "unknown requirement"),
    (["min_cpu_cores=two"], "must be a number"),
    (["min_cpu_cores=1.5"], "whole number"),
    (["min_memory_gb=-1"], "negative"),
])
def test_malformed_requirements_are_refused(texts, message):
    with pytest.raises(tasks.TaskError, match=message):
        tasks.parse_requirements(texts)


def test_requirements_match_devices(store):
    config, connection = store
    add_device(connection, "pi", cpu_cores=4)
    device = devices.get(connection, "pi")
    assert tasks.unmet_requirements(tasks.parse_requirements(
        ["cores=4", "tag=big", "architecture=aarch64", "role=compute"]), device) == []
    assert tasks.unmet_requirements(tasks.parse_requirements(
        ["cores=8", "tags=big,gpu"]), device) == ["needs 8 CPU cores", "needs tags gpu"]


@pytest.mark.parametrize("task_type, payload, message", [
    ("launch", {}, "unknown task type"),
    ("sleep", {"seconds": "x"}, "number"),
    ("sleep", {"seconds": float("nan")}, "number"),
    ("shell", {}, "needs 'command'"),
    ("shell", {"command": 5}, "must be text"),
    ("echo", {"message": "a\x00b"}, "NUL"),
])
def test_bad_tasks_are_refused_and_nothing_is_stored(store, task_type, payload, message):
    config, connection = store
    with pytest.raises(tasks.TaskError, match=message):
        tasks.submit(connection, config, task_type, payload)
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


def test_heartbeat_history_is_bounded(store):
    config, connection = store
    add_device(connection)
    with db.write(connection):
        for n in range(30):
            devices.heartbeat(connection, "pi", {"cpu_percent": n}, float(n))
        devices.prune_heartbeats(connection, 10)
    rows = connection.execute("SELECT metrics FROM heartbeats ORDER BY id").fetchall()
    assert len(rows) == 10 and db.loads(rows[-1][0]) == {"cpu_percent": 29}
