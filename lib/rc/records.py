"""The public record of a device, a task and a log line: field names, units
and column order, defined once. `rc` (tables, --csv, --tsv, --json), rc-web
(/api/v1, /text, /stream) and the docs' tables (docs/records.md) all show
these, so a name means the same thing everywhere.

A record is what --json and /api/v1 give: the stored row (lib/rc/devices.py,
lib/rc/tasks.py) with the derived fields below added. A row is the same
record flattened for CSV, TSV and /text: the *_COLUMNS in order, flags as
0/1, labels as `k=v,k=v`, times as seconds. A table row is what a person
reads on a terminal: *_TABLE of those names, upper-cased, with ages ("14s
ago") for times and a device's STATUS saying why it takes nothing new.
Columns are only ever added at the end."""
import time

from rc import devices, render, services, tasks
from rc.states import PAYLOAD_FIELD, QUEUED, WITHHELD

SUMMARY_WIDTH = 40            # characters of payload in the summary column

# (name, meaning with its unit); docs/records.md has the same table.
DEVICE_FIELDS = (
    ("device_id", "device id"),
    ("status", "`online` or `offline`, one word"),
    ("connected", "1 with an open connection, else 0"),
    ("role", "`compute`, `storage`, `mobile`… (as set with `rc role`, else as reported)"),
    ("platform", "`linux`, `android`, `darwin`…"),
    ("architecture", "`x86_64`, `aarch64`…"),
    ("cpu_cores", "CPU cores"),
    ("memory_gb", "memory, GiB"),
    ("slots", "tasks it runs at once"),
    ("active_tasks", "tasks assigned to or running on it"),
    ("cpu_percent", "CPU in use at its last report, percent"),
    ("memory_percent", "memory in use at its last report, percent"),
    ("battery_percent", "battery charge, percent; empty when it has none"),
    ("heartbeat_age_seconds", "seconds since it was last heard"),
    ("hostname", "as the device reported it"),
    ("drained", "1 when drained (`rc drain`): it takes no new tasks"),
    ("available", "0 when the device says it is unavailable (paused by its own rule)"),
    ("labels", "labels set on the main node, `key=value,key=value`"),
    ("revoked", "1 when revoked (`rc revoke`, or forgotten): it can no longer connect"),
    ("suspect", "1 when connected but answering nothing: it gets no new tasks"),
    ("forgotten", "1 when forgotten (`rc forget`; listed with `--all`, `?all=1`)"),
    ("last_seen", "when it was last heard, seconds since the epoch"),
)
DEVICE_COLUMNS = [name for name, _ in DEVICE_FIELDS]
# The columns `rc devices` prints on a terminal (the others: --csv, --tsv, --json).
DEVICE_TABLE = ["device_id", "status", "role", "platform", "architecture", "cpu_cores",
                "memory_gb", "slots", "active_tasks", "cpu_percent", "memory_percent",
                "last_seen", "labels"]

TASK_FIELDS = (
    ("task_id", "task id"),
    ("task_type", "`echo`, `sleep`, `system_info`, `python_eval`, `python_exec`, `shell`"),
    ("state", "`queued`, `assigned`, `running`, `completed`, `failed`, `timed_out`,"
              " `cancelled`"),
    ("priority", "`urgent`, `high`, `normal` or `low`"),
    ("attempt", "which run this is, from 1; 0 before the first assignment"),
    ("device_id", "the device it is (or was last) on; empty while queued"),
    ("age_seconds", "seconds since it was submitted"),
    ("summary", "the start of its payload (message, command, code…)"),
    ("created_at", "when it was submitted, seconds since the epoch"),
)
TASK_COLUMNS = [name for name, _ in TASK_FIELDS]
TASK_TABLE = ["task_id", "task_type", "state", "priority", "attempt", "device_id",
              "created_at", "summary"]

LOG_FIELDS = (
    ("time", "seconds since the epoch"),
    ("program", "`rc-server`, `rc-scheduler`… (the log file's name)"),
    ("level", "`debug`, `info`, `warning`, `error`"),
    ("event", "what happened, snake_case"),
    ("fields", "the line's other fields, `key=value` …; a line that is not JSON has"
               " only this"),
)
LOG_COLUMNS = [name for name, _ in LOG_FIELDS]

# A line a device's worker forwarded (lib/rc/device_logs.py).
DEVICE_LOG_FIELDS = (
    ("time", "when the device logged it, seconds since the epoch by its clock"),
    ("level", "`debug`, `info`, `warning`, `error`"),
    ("event", "what happened, snake_case"),
    ("task_id", "the task it is about; empty when none"),
    ("message", "its words, at most 500 characters"),
)
DEVICE_LOG_COLUMNS = [name for name, _ in DEVICE_LOG_FIELDS]

# Flags: true/false in a record, 1/0 in a row.
DEVICE_FLAGS = ("connected", "drained", "available", "revoked", "suspect", "forgotten")
# Times a table shows as an age ("14s ago").
TIME_FIELDS = ("last_seen", "created_at")


# -- devices ----------------------------------------------------------------------

def device_metrics(device):
    # Servers may store the heartbeat's data or just its system_metrics.
    metrics = device.get("metrics") or {}
    return metrics.get("system_metrics", metrics)


def battery_percent(metrics):
    battery = metrics.get("battery")
    if isinstance(battery, dict):
        return battery.get("percent")
    return metrics.get("battery_percent", battery)


def number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def fraction(value):
    """A percentage from a device as a fraction, None when it sent none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return min(max(value / 100.0, 0.0), 1.0)


def device_record(device, now):
    """A stored device (devices.list_devices) with the derived fields added:
    its figures at the top level, and how long ago it was heard."""
    metrics = device_metrics(device)
    devices.with_age(device, now)
    device["cpu_percent"] = number(metrics.get("cpu_percent"))
    device["memory_percent"] = number(metrics.get("memory_percent"))
    device["battery_percent"] = number(battery_percent(metrics))
    device["heartbeat_age_seconds"] = round(max(0.0, now - (device["last_seen"] or 0)), 1)
    device.setdefault("suspect", False)
    device.setdefault("forgotten", False)
    return device


def device_row(record):
    """A device_record() as CSV, TSV and /text give it."""
    row = {name: record.get(name) for name in DEVICE_COLUMNS}
    for name in DEVICE_FLAGS:
        row[name] = int(bool(row[name]))
    row["labels"] = labels_text(record.get("labels"))
    return row


def device_table_row(record, now):
    """A device_record() as `rc devices` shows it on a terminal."""
    row = device_row(record)
    row["status"] = device_status(record)
    row["cpu_percent"] = figure(row["cpu_percent"], record, now)
    row["memory_percent"] = figure(row["memory_percent"], record, now)
    return table_row(row, DEVICE_TABLE, now)


def device_status(device):
    """online, offline, and why it takes nothing new: online,drained,paused,suspect,
    offline,revoked (the human table's STATUS; rows give the flags as columns of their own)."""
    words = [device["status"]]
    if device.get("forgotten"):
        words.append("forgotten")
    elif device.get("drained"):
        words.append("drained")
    if device.get("available") is False and not device.get("forgotten"):
        words.append("paused")
    if device.get("suspect"):
        words.append("suspect")       # connected, but answers nothing: gets no new work
    if device.get("revoked") and not device.get("forgotten"):   # forgetting revokes too
        words.append("revoked")       # as the dashboard's chip: it can no longer connect
    return ",".join(words)


def figure(value, device, now):
    """A device's figure as a table shows it: with its age when the device
    is not there to renew it (offline, disconnected, suspect)."""
    if value is None or not device.get("stale") or device.get("figures_at") is None:
        return value
    return "%s (%s old)" % (render.cell(value), render.age(now - device["figures_at"]))


def labels_text(labels):
    return ",".join("%s=%s" % item for item in sorted((labels or {}).items()))


# -- tasks ------------------------------------------------------------------------

def task_record(task, now):
    """A stored task (tasks.list_tasks) with its age and payload summary added."""
    task["age_seconds"] = round(max(0.0, now - task["created_at"]), 1)
    task["summary"] = render.shorten(payload_summary(task), SUMMARY_WIDTH)
    return task


def task_row(record):
    """A task_record() as CSV, TSV and /text give it."""
    return {name: record.get(name) for name in TASK_COLUMNS}


def task_table_row(record, now):
    return table_row(task_row(record), TASK_TABLE, now)


def payload_summary(task):
    """What the task runs, in brief; a script sent with `--file` by its name
    (`--file sim.py`: its code is a stored file, and the column was blank)."""
    name = PAYLOAD_FIELD.get(task["task_type"])
    payload = task["payload"] or {}
    if name and payload.get(name) is None and isinstance(payload.get("file"), str):
        return render.cell("--file " + payload["file"])
    return render.cell(payload.get(name)) if name else ""


def withheld_payload(payload):
    """A task's payload as one without the admin token sees it: its env's
    names, each value WITHHELD; the rest as it is (an env stays an object of
    names to text, so a program that reads its own task back still reads it)."""
    env = payload.get("env") if isinstance(payload, dict) else None
    if not isinstance(env, dict):
        return payload
    return dict(payload, env=dict.fromkeys(env, WITHHELD))


def withheld_task(record):
    """A task or a group (anything with a "payload"), or a schedule or a
    service (its "task" holds the payload), with withheld_payload()."""
    if isinstance(record, dict) and "payload" in record:
        return dict(record, payload=withheld_payload(record["payload"]))
    if isinstance(record, dict) and isinstance(record.get("task"), dict):
        return dict(record, task=withheld_task(record["task"]))
    return record


# -- log lines --------------------------------------------------------------------

def log_row(record):
    """A log line (a parsed record, or text that is not JSON) as /text/logs gives it."""
    if not isinstance(record, dict):
        return {"fields": record}
    fields = " ".join("%s=%s" % (key, render.log_value(value)) for key, value in record.items()
                      if key not in ("time", "program", "level", "event"))
    return {"time": "%.6f" % record["time"], "program": record.get("program"),
            "level": record.get("level"), "event": record.get("event"), "fields": fields}


def device_log_row(line):
    """A device's line (device_logs.recent) as /text/devices/ID/logs gives it."""
    return dict(line, time="%.6f" % line["time"])


def log_event(record, moment):
    """A log line as /stream/logs sends it: the record and its text."""
    if isinstance(record, dict):
        return dict(record, line=render.log_line(record))
    return {"time": moment, "line": render.printable(record)}


# -- tables -----------------------------------------------------------------------

def table_row(row, columns, now):
    """A row as a terminal table shows it: upper-cased names, times as ages."""
    return {name.upper(): ago(row[name], now) if name in TIME_FIELDS else row[name]
            for name in columns}


def table_columns(columns):
    return [name.upper() for name in columns]


def ago(timestamp, now):
    return "" if not timestamp else render.age(now - timestamp) + " ago"


# -- the cluster ------------------------------------------------------------------

def status_summary(connection, config=None):
    """The cluster in counts; with the config, its services' too."""
    device_counts = devices.counts(connection)
    task_counts = tasks.counts_by_state(connection)
    summary = {"devices_%s" % key: value for key, value in device_counts.items()}
    summary.update(("tasks_%s" % state, count) for state, count in task_counts.items())
    summary["queue_length"] = task_counts[QUEUED]
    if config is not None:
        summary.update(services.status_counts(connection, config))
    return summary


def when(timestamp, now):
    if timestamp is None:
        return None
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    if timestamp - now >= 1:        # a lease's end, a retry's not_before: ahead, not ago
        return "%s (in %s)" % (local, render.age(timestamp - now))
    return "%s (%s)" % (local, ago(timestamp, now))
