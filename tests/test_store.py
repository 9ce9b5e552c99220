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


def test_data_version_and_answers_from_the_same_snapshot(store):
    config, connection = store
    other = db.connect(config.db_path)
    count = "(SELECT count(*) FROM tasks)"
    before, none = db.data_version_and(other, count)
    assert none == 0
    tasks.submit(connection, config, "echo", {"message": "hi"})
    after, one = db.data_version_and(other, count)
    assert after != before and one == 1
    assert db.data_version_and(other, count) == (after, 1)    # nothing new
    other.close()


def test_one_statement_commits_on_its_own_and_more_take_a_transaction(store):
    config, connection = store
    with db.write_statements(connection, 1):
        assert not connection.in_transaction
    with pytest.raises(ZeroDivisionError):
        with db.write_statements(connection, 2):
            assert connection.in_transaction
            tasks.submit(connection, config, "echo", {"message": "rolled back"})
            1 / 0
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


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
        assert tasks.accept(connection, task_id, 1, "pi", 2.0, 180.0)
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
        assert not tasks.accept(connection, task_id, 1, "laptop", 1.0, 180.0)
        assert not tasks.accept(connection, task_id, 2, "pi", 1.0, 180.0)
        row = connection.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        assert tasks.take_back(connection, row, "device pi offline", 1.0, config)
        # The old attempt's result arrives late: it changes nothing.
        assert not tasks.finish(connection, task_id, 1, "pi", COMPLETED, {}, None, "x", 2.0)
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["device_id"]) == (QUEUED, 2, None)


def run_and_lose(connection, config, task_id, accepted=True):
    """Assign the task to pi, maybe start it, then lose it."""
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='pi'"
                           " WHERE task_id=?", (task_id,))
        attempt = tasks.get(connection, task_id)["attempt"]
        if accepted:
            assert tasks.accept(connection, task_id, attempt, "pi", 1.0, 180.0)
        row = connection.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        assert tasks.take_back(connection, row, "device lost", 1.0, config)
    return tasks.get(connection, task_id)


def test_retries_are_spent_then_the_task_fails(store):
    config, connection = store
    config.poison_limit = 10
    add_device(connection)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"}, retries=1)
    assert run_and_lose(connection, config, task_id)["state"] == QUEUED
    task = run_and_lose(connection, config, task_id)
    assert task["state"] == "failed" and "retries spent" in task["reason"]


def test_a_task_that_keeps_losing_devices_is_failed_as_poison(store):
    config, connection = store
    add_device(connection)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"}, retries=10)
    for _ in range(config.poison_limit - 1):
        assert run_and_lose(connection, config, task_id)["state"] == QUEUED
    task = run_and_lose(connection, config, task_id)
    assert task["state"] == "failed" and "poison" in task["reason"]
    assert task["device_losses"] == config.poison_limit


def test_losing_a_task_that_never_started_costs_it_nothing(store):
    config, connection = store
    add_device(connection)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"}, retries=0)
    for attempt in range(2, 6):
        task = run_and_lose(connection, config, task_id, accepted=False)
        assert (task["state"], task["attempt"], task["retries_used"]) == (QUEUED, attempt, 0)


def test_task_failures_are_retried_only_when_asked(store):
    config, connection = store
    add_device(connection)
    for asked in (False, True):
        task_id = tasks.submit(connection, config, "shell", {"command": "false"}, retries=2,
                               retry_on_failure=asked)
        with db.write(connection):
            connection.execute("UPDATE tasks SET state='running', device_id='pi'"
                               " WHERE task_id=?", (task_id,))
            row = connection.execute("SELECT %s FROM tasks WHERE task_id=?"
                                     % tasks.LEASE_COLUMNS, (task_id,)).fetchone()
            assert tasks.retry_failed(connection, row, "failed", {}, "exit status 1", 1.0,
                                      config) == asked


def test_dependents_wait_and_fail_with_their_dependency(store):
    config, connection = store
    add_device(connection)
    first = tasks.submit(connection, config, "echo", {"message": "1"})
    second = tasks.submit(connection, config, "echo", {"message": "2"}, depends_on=[first])
    third = tasks.submit(connection, config, "echo", {"message": "3"}, depends_on=[second])
    assert tasks.get(connection, third)["depends_on"] == [second]
    tasks.cancel(connection, first)
    for task_id in (second, third):
        task = tasks.get(connection, task_id)
        assert task["state"] == "failed" and "dependency" in task["reason"]
    with pytest.raises(tasks.TaskError, match="already cancelled"):
        tasks.submit(connection, config, "echo", {"message": "4"}, depends_on=[first])
    with pytest.raises(tasks.TaskError, match="no task 999"):
        tasks.submit(connection, config, "echo", {"message": "4"}, depends_on=[999])


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


def test_busy_slots_count_a_device_holding_more_than_its_slots_as_full(store):
    """A prefetched device holds tasks beyond its slots; it is full, not over."""
    config, connection = store
    add_device(connection, "quick", slots=2)
    add_device(connection, "half", slots=2)
    for device_id, count in (("quick", 4), ("half", 1)):
        for n in range(count):
            task_id = tasks.submit(connection, config, "shell", {"command": str(n)})
            with db.write(connection):
                connection.execute("UPDATE tasks SET state = 'assigned', device_id = ?"
                                   " WHERE task_id = ?", (device_id, task_id))
    listed = devices.list_devices(connection)
    assert [d["active_tasks"] for d in listed] == [1, 4]
    assert devices.busy_slots(listed) == 3


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
        for n in range(5000):
            devices.heartbeat(connection, "pi", {"cpu_percent": n}, float(n))
    devices.prune_heartbeats(connection, 4990.0)
    rows = connection.execute("SELECT metrics FROM heartbeats ORDER BY id").fetchall()
    assert len(rows) == 10 and db.loads(rows[-1][0]) == {"cpu_percent": 4999}
