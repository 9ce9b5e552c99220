"""The cluster minute by minute: throughput, outcomes, durations, queue and
devices, in the bounded table stats_minutes.

record() closes the minutes that have ended since it last ran (the reaper
calls it every minute); the counts come from task_events, read from the
newest back so each call costs only the last minutes' events. The gauges
(queue length, devices, slots) are what they are when it runs, so they are
written to the newest closed minute only; minutes the reaper missed keep
their counts and leave the gauges empty.
"""
import time

from rc import db, devices
from rc.states import CANCELLED, COMPLETED, FAILED, ONLINE, QUEUED, TIMED_OUT

MINUTE = 60
CATCH_UP_MINUTES = 60        # minutes record() fills in after the reaper was away
SPARKS = "▁▂▃▄▅▆▇█"
COLUMNS = ["minute", "submitted", "completed", "failed", "cancelled", "duration_mean",
           "duration_max", "wait_mean", "queue_length", "running", "devices_online",
           "devices_total", "slots", "slots_busy"]
OUTCOME_COLUMN = {COMPLETED: "completed", FAILED: "failed", TIMED_OUT: "failed",
                  CANCELLED: "cancelled"}
# The task-duration histogram of /text/metrics: upper bounds in seconds, as
# Prometheus's own defaults stretched to the hour a task may run. Each
# closed minute adds its tasks to counters rows (not cumulative, one per
# bucket), so the histogram survives pruning and restarts and lags by a minute.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0)
DURATION_COUNTER = "task_duration_le_"       # + the bound ("%g"), or "inf"
INFINITY = float("inf")
DURATION_COUNT, DURATION_SUM_MS = "task_duration_count", "task_duration_sum_ms"


def minute_of(moment):
    return int(moment // MINUTE) * MINUTE


def record(connection, config, now):
    """Write the minutes that ended since the last one recorded; returns how
    many rows it wrote. Harmless to call more often than once a minute."""
    current = minute_of(now)
    last = connection.execute("SELECT max(minute) FROM stats_minutes").fetchone()[0]
    first = current - CATCH_UP_MINUTES * MINUTE if last is None else last + MINUTE
    first = max(first, current - CATCH_UP_MINUTES * MINUTE)
    if first >= current:
        return 0
    rows = {minute: dict.fromkeys(COLUMNS[1:5], 0) for minute in range(first, current, MINUTE)}
    durations = {minute: [] for minute in rows}
    waits = {minute: [] for minute in rows}
    for event in events_between(connection, first, current):
        row = rows[minute_of(event["time"])]
        if event["state"] == QUEUED and event["attempt"] == 1 and event["first"]:
            row["submitted"] += 1
        elif event["state"] in OUTCOME_COLUMN:
            row[OUTCOME_COLUMN[event["state"]]] += 1
            if event["started_at"] is not None and event["finished_at"] is not None:
                durations[minute_of(event["time"])].append(
                    max(0.0, event["finished_at"] - event["started_at"]))
                waits[minute_of(event["time"])].append(
                    max(0.0, event["started_at"] - event["created_at"]))
    for minute, row in rows.items():
        row["minute"] = minute
        if durations[minute]:
            row["duration_mean"] = sum(durations[minute]) / len(durations[minute])
            row["duration_max"] = max(durations[minute])
            row["wait_mean"] = sum(waits[minute]) / len(waits[minute])
    rows[current - MINUTE].update(gauges(connection))
    finished = [d for minute in sorted(durations) for d in durations[minute]]
    with db.write(connection):
        add_durations(connection, finished)
        for row in rows.values():
            names = sorted(row)
            connection.execute(
                "INSERT OR REPLACE INTO stats_minutes(%s) VALUES (%s)"
                % (", ".join(names), ", ".join("?" * len(names))), [row[n] for n in names])
        connection.execute("DELETE FROM stats_minutes WHERE minute < ?",
                           (current - config.stats_history * MINUTE,))
    return len(rows)


def bucket_name(bound):
    return DURATION_COUNTER + ("inf" if bound == INFINITY else "%g" % bound)


def duration_bucket(seconds):
    return bucket_name(next(b for b in DURATION_BUCKETS + (INFINITY,) if seconds <= b))


def add_durations(connection, seconds):
    """Count finished tasks' durations into the histogram's counters rows
    (inside record()'s transaction: each minute is counted once)."""
    increments = {}
    for value in seconds:
        bucket = duration_bucket(value)
        increments[bucket] = increments.get(bucket, 0) + 1
    if seconds:
        increments[DURATION_COUNT] = len(seconds)
        increments[DURATION_SUM_MS] = int(round(sum(seconds) * 1000))
    connection.executemany(
        "INSERT INTO counters(name, value) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        sorted(increments.items()))


def duration_histogram(connection):
    """[(upper bound or inf, cumulative count)], the count and the sum in
    seconds, as Prometheus's histogram wants them."""
    counts = {row[0]: row[1] for row in connection.execute(
        "SELECT name, value FROM counters WHERE name LIKE 'task_duration_%'")}
    buckets, running = [], 0
    for bound in DURATION_BUCKETS + (INFINITY,):
        running += counts.get(bucket_name(bound), 0)
        buckets.append((bound, running))
    return buckets, counts.get(DURATION_COUNT, 0), counts.get(DURATION_SUM_MS, 0) / 1000.0


def events_between(connection, start, end):
    """Task events in [start, end) with their task's times, newest first;
    ids grow with time, so the scan stops at the first older event.
    `first` says the event is the task's creation."""
    cursor = connection.execute(
        "SELECT e.id, e.time, e.state, e.attempt, t.created_at, t.started_at, t.finished_at,"
        " e.id = (SELECT min(id) FROM task_events f WHERE f.task_id = e.task_id) AS first"
        " FROM task_events e JOIN tasks t ON t.task_id = e.task_id ORDER BY e.id DESC")
    for event in cursor:
        if event["time"] < start:
            break
        if event["time"] < end:
            yield event


def gauges(connection):
    # Counted through the partial indexes of queued and of active tasks:
    # counting every state would read every finished task, millions of them.
    queued, active = connection.execute(
        "SELECT (SELECT count(*) FROM tasks WHERE %s), (SELECT count(*) FROM tasks WHERE %s)"
        % (db.QUEUED_SQL, db.ACTIVE_SQL)).fetchone()
    online = devices.list_devices(connection, ONLINE)
    return {"queue_length": queued, "running": active,
            "devices_online": len(online),
            "devices_total": devices.counts(connection)["total"],
            "slots": devices.total_slots(online),
            "slots_busy": devices.busy_slots(online)}


def history(connection, minutes, now=None):
    """The last `minutes` recorded minutes, oldest first, as dicts."""
    now = time.time() if now is None else now
    # No minute is before the epoch: `rc history --minutes 9223372036854775807`
    # asked SQLite for one it cannot hold (OverflowError).
    since = max(0, minute_of(now) - minutes * MINUTE)
    rows = connection.execute(
        "SELECT %s FROM stats_minutes WHERE minute >= ? ORDER BY minute"
        % ", ".join(COLUMNS), (since,)).fetchall()
    return [dict(row) for row in rows]


def summary(rows):
    """Totals over the rows: throughput per minute, success rate, mean duration.
    The success rate is completed among completed and failed (timed out
    counts as failed): a cancelled task is neither, so a user cancelling
    their own map does not see the cluster's success fall."""
    finished = sum(r["completed"] + r["failed"] + r["cancelled"] for r in rows)
    completed = sum(r["completed"] for r in rows)
    judged = completed + sum(r["failed"] for r in rows)
    timed = [(r["duration_mean"], r["completed"] + r["failed"] + r["cancelled"])
             for r in rows if r["duration_mean"] is not None]
    weight = sum(n for _, n in timed)
    return {"minutes": len(rows), "submitted": sum(r["submitted"] for r in rows),
            "finished": finished, "completed": completed,
            "failed": sum(r["failed"] for r in rows),
            "throughput_per_minute": round(completed / len(rows), 3) if rows else None,
            "success_rate": round(completed / judged, 4) if judged else None,
            "duration_mean": round(sum(d * n for d, n in timed) / weight, 3) if weight else None,
            "duration_max": max([r["duration_max"] for r in rows
                                 if r["duration_max"] is not None] or [None]),
            "queue_length": last_known(rows, "queue_length"),
            "devices_online": last_known(rows, "devices_online")}


def summary_to_now(connection, rows, now):
    """summary(rows) with its success rate counting the outcomes since the
    last minute recorded too: the overview's failed tile counts a failure
    of the present minute, and `100%` beside `1 failed` read as none failed."""
    total = summary(rows)
    start = rows[-1]["minute"] + MINUTE if rows else now - 15 * MINUTE
    present = dict.fromkeys(OUTCOME_COLUMN.values(), 0)
    for event in events_between(connection, start, now + MINUTE):
        if event["state"] in OUTCOME_COLUMN:
            present[OUTCOME_COLUMN[event["state"]]] += 1
    completed = total["completed"] + present["completed"]
    judged = completed + total["failed"] + present["failed"]
    return dict(total, success_rate=round(completed / judged, 4) if judged else None)


def last_known(rows, column):
    for row in reversed(rows):
        if row[column] is not None:
            return row[column]
    return None


# -- text -----------------------------------------------------------------------------

def sparkline(values, width):
    """One character per value (the last `width` of them), scaled from zero
    to the largest; a missing value is a space."""
    values = list(values)[-width:] if width else list(values)
    top = max([v for v in values if v is not None] or [0])
    line = ""
    for value in values:
        if value is None:
            line += " "
        elif top <= 0:
            line += SPARKS[0]
        else:
            line += SPARKS[min(len(SPARKS) - 1, int(value / top * (len(SPARKS) - 1) + 0.5))]
    return line


SERIES = [
    ("completed/min", lambda r: r["completed"], "%d"),
    ("failed/min", lambda r: r["failed"], "%d"),
    ("success %", lambda r: (100.0 * r["completed"] / (r["completed"] + r["failed"]))
     if r["completed"] + r["failed"] else None, "%.0f"),
    ("duration s", lambda r: r["duration_mean"], "%.2f"),
    ("queue", lambda r: r["queue_length"], "%d"),
    ("running", lambda r: r["running"], "%d"),
    ("devices online", lambda r: r["devices_online"], "%d"),
]


def text(rows, width=80):
    """A sparkline per series over the minutes, with its latest and largest."""
    if not rows:
        return "no history yet: rc-reaper records one row a minute\n"
    label_width = max(len(label) for label, _, _ in SERIES)
    room = max(10, width - label_width - 26)
    start = time.strftime("%H:%M", time.localtime(rows[-room:][0]["minute"]))
    end = time.strftime("%H:%M", time.localtime(rows[-1]["minute"]))
    lines = ["cluster, %d minutes %s-%s" % (len(rows[-room:]), start, end)]
    for label, value, form in SERIES:
        values = [value(r) for r in rows[-room:]]
        known = [v for v in values if v is not None]
        latest = form % known[-1] if known else "-"
        peak = form % max(known) if known else "-"
        lines.append("%s %s  now %s max %s" % (label.ljust(label_width),
                                               sparkline(values, room), latest, peak))
    total = summary(rows)
    lines.append("")
    lines.append("%d finished, %d completed, %d failed; success %s; mean duration %s"
                 % (total["finished"], total["completed"], total["failed"],
                    "-" if total["success_rate"] is None
                    else "%.1f%%" % (100 * total["success_rate"]),
                    "-" if total["duration_mean"] is None
                    else "%.2fs" % total["duration_mean"]))
    return "\n".join(lines) + "\n"
