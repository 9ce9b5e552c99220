"""A database a cluster leaves after a year of work, built with executemany
(no cluster needed): finished tasks of every state over the retention and
some past it, map groups, task files and their blobs' rows, devices ever
seen (most gone), their logs and heartbeats, a week of history minutes,
broadcasts. tests/test_long_lived_s32.py builds a small one per module;
by hand, a full-size one to start a cluster on (tests/cluster_harness.py):

    .venv/bin/python tests/long_lived_db.py RC_HOME [--tasks 500000]

Rows only: the blobs' files are not written (a few are, see `blobs`).
"""
import argparse
import hashlib
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))

from rc import config as config_module  # noqa: E402
from rc import db  # noqa: E402
from rc.states import TERMINAL_STATES  # noqa: E402

DAY = 86400.0
STATES = ["completed"] * 85 + ["failed"] * 8 + ["timed_out"] * 3 + ["cancelled"] * 4
GROUP_SIZE = 100          # tasks per map
IN_GROUPS = 0.2           # of the tasks
WITH_FILES = 0.1          # tasks with a file (an input or an output), or more for `files`
LOG_LINES = 200           # per device
HEARTBEATS = 100          # per device, from when it was last seen


def sha(n):
    return hashlib.sha256(b"blob %d" % n).hexdigest()


def build(path, tasks=500000, devices=2000, files=50000, past_retention=0.1,
          retention_days=30.0, now=None, seed=32):
    """Fill the database at `path` (made if need be); returns a summary.
    `past_retention` of the tasks finished before the retention, the rest
    within it; 1% of the tasks are unfinished (queued or running) among
    the newest."""
    now = time.time() if now is None else now
    generator = random.Random(seed)
    connection = db.open_database(path)
    connection.execute("PRAGMA synchronous=OFF")
    span = retention_days * DAY
    with db.write(connection):
        connection.executemany(
            "INSERT INTO devices(device_id, hostname, platform, architecture, cpu_cores,"
            " memory_gb, status, forgotten, registered_at, last_seen, disconnected_at)"
            " VALUES (?, ?, 'linux', 'x86_64', 4, 4.0, 'offline', ?, ?, ?, ?)",
            [("old-%04d" % n, "host%d" % n, int(n % 3 == 0), now - 365 * DAY + n * 3600,
              now - 300 * DAY + n * 3600 * 3, now - 300 * DAY + n * 3600 * 3)
             for n in range(devices)])
        device_ids = ["old-%04d" % n for n in range(devices)]
        groups = int(tasks * IN_GROUPS) // GROUP_SIZE
        old_groups = int(groups * past_retention)
        connection.executemany(
            "INSERT INTO task_groups(group_id, created_at, task_type, payload, options)"
            " VALUES (?, ?, 'shell', '{\"command\": \"sim {}\"}', '{}')",
            [(g + 1, group_time(g, groups, old_groups, now, span)) for g in range(groups)])
        connection.executemany("INSERT INTO maps(group_id, inputs) VALUES (?, ?)",
                               [(g + 1, GROUP_SIZE) for g in range(groups)])
        rows, jobs, events = [], [], []
        past = int(tasks * past_retention)
        for n in range(tasks):
            # Oldest first: task ids grow with time, as on a real cluster.
            if n < past:
                finished = now - span - DAY - (past - n) * (300 * DAY / max(past, 1))
            else:
                finished = now - span + DAY + (n - past) * ((span - 2 * DAY) / max(tasks - past, 1))
            state = generator.choice(STATES)
            if n >= tasks - tasks // 100:
                state = generator.choice(("queued", "running"))
            group = None
            if n % int(1 / IN_GROUPS) == 0 and n // int(1 / IN_GROUPS) < groups * GROUP_SIZE:
                group = n // int(1 / IN_GROUPS) // GROUP_SIZE + 1
                jobs.append((group, n // int(1 / IN_GROUPS) % GROUP_SIZE + 1,
                             "input-%d" % n, n + 1))
            device = device_ids[n % devices] if state != "queued" else None
            terminal = state not in ("queued", "running")
            result = ('{"output": "result of task %d\\n", "exit_code": %d, "execution_time":'
                      ' 1.5}' % (n, 0 if state == "completed" else 1)) if terminal else None
            if not terminal:       # submitted a moment ago, as the newest are
                finished = now - 30
            rows.append((n + 1, "shell", '{"command": "sim %d"}' % n, state, device,
                         finished - 60, finished - 50 if state != "queued" else None,
                         finished if terminal else None, result,
                         None if state == "completed" else state + " here",
                         "done" if terminal else None, group, 3))
            events.append((n + 1, finished - 50, 1, "running", device, "accepted"))
        connection.executemany(
            "INSERT INTO tasks(task_id, task_type, payload, state, device_id, created_at,"
            " started_at, finished_at, result, error, reason, group_id, max_retries, timeout)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 300)", rows)
        connection.executemany(
            "INSERT INTO task_events(task_id, time, attempt, state, device_id, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)", events)
        # What the triggers count as tasks finish (they were inserted finished).
        connection.execute(
            "INSERT OR REPLACE INTO counters(name, value) SELECT prefix || state, count(*)"
            " FROM tasks, (SELECT 'tasks_' AS prefix UNION ALL SELECT 'kept_')"
            " WHERE state IN (%s) GROUP BY prefix, state" % db.sql_list(TERMINAL_STATES))
        connection.executemany("INSERT INTO map_jobs(group_id, job, input, task_id)"
                               " VALUES (?, ?, ?, ?)", jobs)
        # Files: `files` blobs, each the input or output of a task with files.
        step = max(1, min(int(1 / WITH_FILES), tasks // max(files, 1)))
        with_files = [n for n in range(tasks) if n % step == step - 1][:files]
        connection.executemany(
            "INSERT INTO files(sha256, size, created_at, last_used_at) VALUES (?, ?, ?, ?)",
            [(sha(k), 1000 + k % 5000, rows[n][5], rows[n][5])
             for k, n in enumerate(with_files)])
        connection.executemany(
            "INSERT INTO task_files(task_id, attempt, kind, name, sha256, size, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(n + 1, 0 if k % 2 else 1, "input" if k % 2 else "output",
              "data-%d.csv" % k, sha(k), 1000 + k % 5000, rows[n][5])
             for k, n in enumerate(with_files)])
        connection.executemany(
            "INSERT INTO device_logs(device_id, time, received_at, level, event, message,"
            " task_id) VALUES (?, ?, ?, 'warning', 'task_failed', ?, NULL)",
            [(device_ids[d], now - 300 * DAY + d * 3600 + k, now - 300 * DAY + d * 3600 + k,
              "line %d of %s" % (k, device_ids[d]))
             for d in range(devices) for k in range(LOG_LINES)])
        connection.executemany(
            "INSERT INTO heartbeats(device_id, time, metrics) VALUES (?, ?, '{}')",
            [(device_ids[d], now - 300 * DAY + d * 3600 + k * 60, )
             for d in range(devices) for k in range(HEARTBEATS)])
        connection.executemany(
            "INSERT INTO stats_minutes(minute, submitted, completed, failed, cancelled,"
            " queue_length, running, devices_online, devices_total, slots, slots_busy)"
            " VALUES (?, 20, 18, 1, 1, 3, 4, 12, ?, 40, 30)",
            [(int(now // 60 * 60 - 60 * m), devices) for m in range(1, 10080)])
        connection.executemany("INSERT INTO controls(control_id, created_at, command)"
                               " VALUES (?, ?, 'report_profile')",
                               [(c + 1, now - 200 * DAY + c * DAY) for c in range(100)])
        connection.executemany(
            "INSERT INTO control_acks(control_id, device_id, time, ok) VALUES (?, ?, ?, 1)",
            [(c + 1, device_ids[d], now - 200 * DAY + c * DAY)
             for c in range(100) for d in range(0, devices, 10)])
    connection.execute("PRAGMA synchronous=NORMAL")
    summary = {table: connection.execute("SELECT count(*) FROM %s" % table).fetchone()[0]
               for table in ("heartbeats", "tasks", "task_events", "task_groups", "map_jobs", "files",
                             "task_files", "devices", "device_logs", "stats_minutes")}
    connection.close()
    return summary


def group_time(g, groups, old_groups, now, span):
    if g < old_groups:
        return now - span - 2 * DAY - (old_groups - g) * 3600.0
    return now - span + (g - old_groups) * ((span - DAY) / max(groups - old_groups, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--tasks", type=int, default=500000)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--files", type=int, default=50000)
    arguments = parser.parse_args()
    config = config_module.load(environ={"RC_HOME": arguments.home})
    started = time.time()
    print(build(config.db_path, arguments.tasks, arguments.devices, arguments.files))
    print("%.1f s, %d bytes" % (time.time() - started, os.path.getsize(config.db_path)))


if __name__ == "__main__":
    main()
