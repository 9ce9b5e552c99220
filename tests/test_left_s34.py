"""Four faults earlier sessions noticed and left alone (session 12, left34):
`rc tasks --device` read back through every task; the dashboard showed the
bidi controls and invisible characters of a device's hostname and labels;
a `?group=new` batch that never committed left its group behind; rc.client
waited for ever on an rc-web that trickled its answer. Each test fails
without its fix."""
import io
import json
import os
import re
import socket
import sqlite3
import threading
import time

import pytest

from rc import client, db, render, state_dir, tasks, web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- rc tasks --device: the device's tasks through an index --------------------------

def plans_of(connection, work):
    """The query plans (their detail lines) of the SELECTs on tasks `work` runs."""
    statements = []
    connection.set_trace_callback(statements.append)
    try:
        work()
    finally:
        connection.set_trace_callback(None)
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT") and " FROM tasks " in sql + " ":
            plans.append(" ".join(row[3] for row in connection.execute(
                "EXPLAIN QUERY PLAN " + sql)))
    return plans


@pytest.mark.parametrize("state", [None, "completed", "failed"])
def test_a_devices_tasks_are_read_through_an_index(cluster_home, state):
    """Without the index the page walked back from the newest task until it
    had found enough of the device's: 20-60 ms at 500,000 tasks, all of
    them for a device that had run none (SCAN tasks)."""
    config, connection = cluster_home
    with db.write(connection):
        connection.executemany("INSERT INTO devices(device_id, registered_at, last_seen)"
                               " VALUES (?, 0, 0)",
                               [("pi-%d" % n,) for n in range(50)])
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, state, device_id,"
            " created_at, finished_at) VALUES ('echo', '{}', 60, 0, ?, ?, ?, ?)",
            [("completed" if n % 3 else "failed", "pi-%d" % (n % 50), n, n + 1)
             for n in range(5000)])
    found = []
    plans = plans_of(connection, lambda: found.extend(
        tasks.list_tasks(connection, state, "pi-7", limit=20)))
    assert plans and all("tasks_by_device" in plan and "SCAN" not in plan for plan in plans), plans
    assert len(found) == 20 and {task["device_id"] for task in found} == {"pi-7"}
    assert [task["task_id"] for task in found] == sorted(
        (task["task_id"] for task in found), reverse=True)       # newest first still
    if state is not None:
        assert {task["state"] for task in found} == {state}
    assert tasks.list_tasks(connection, state, "no-such-device") == []
