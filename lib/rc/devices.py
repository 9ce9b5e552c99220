"""Devices: what a worker tells about itself, whether it is connected, and
its heartbeat history. Writes here run inside a transaction the caller holds.

What a device reports is cleaned before it is stored: every reader (the
scheduler, `rc devices`, /text, the dashboard) then finds numbers where
numbers belong, whatever a hostile device sent."""
import math
import time

from rc import db
from rc.states import ONLINE

DEVICE_COLUMNS = ("device_id, hostname, platform, architecture, role, cpu_cores, memory_gb,"
                  " slots, capabilities, tags, task_types, profile, metrics, status,"
                  " connected, available, unavailable_reason, drained, forgotten, labels,"
                  " role_override, address, protocol, registered_at, connected_at,"
                  " disconnected_at, last_seen, revoked, suspect_since, figures_at, watched_until")
LIST_COLUMNS = ("capabilities", "tags", "task_types")
MAX_SLOTS = 1024
# A watch (POST /api/v1/devices/ID/watch) lasts this long, in seconds; asked
# again while more than WATCH_SECONDS - WATCH_REFRESH is left, it is not
# written again, so watchers cost one write per device every WATCH_REFRESH.
WATCH_SECONDS = 60.0
WATCH_REFRESH = 15.0
OBJECT_COLUMNS = ("profile", "metrics", "labels")
# Heartbeat metrics a worker sends (bin/worker.py Metrics.sample), by what they must be.
NUMERIC_METRICS = ("cpu_percent", "memory_percent", "disk_percent", "battery_percent",
                   "temperature_c", "disk_read_bytes", "disk_write_bytes", "net_bytes_recv",
                   "net_bytes_sent", "uptime_s")
MAX_METRICS = 64             # keys kept from one heartbeat's metrics
MAX_METRIC_NAME = 64         # characters of a metric's name
# Hardware figures a worker reports at register (bin/worker.py hardware_specs).
NUMERIC_SPECS = ("cpu_cores", "memory_gb", "disk_gb", "cpu_speed")


def register(connection, device_id, data, address, now, max_slots=MAX_SLOTS):
    """Create or refresh a device from its `register` message; the slots it
    claims are cut to the most the operator allows: its own `rc slots`
    limit, else `max_slots` (max_device_slots)."""
    info = dict_or_empty(data.get("device_info"))
    specs = clean_specs(dict_or_empty(data.get("hardware_specs")))
    profile = {"device_info": info, "hardware_specs": specs}
    connection.execute(
        "INSERT INTO devices(device_id, hostname, platform, architecture, role, cpu_cores,"
        " memory_gb, slots, slots_claimed, capabilities, tags, task_types, profile, status,"
        " connected,"
        " available, unavailable_reason, address, protocol, registered_at, connected_at,"
        " disconnected_at, last_seen)"
        " VALUES (:device_id, :hostname, :platform, :architecture, :role, :cpu_cores,"
        " :memory_gb, min(:claimed, :max_slots), :claimed, :capabilities, :tags, :task_types,"
        " :profile, :status, 1,"
        " :available, :unavailable_reason, :address, :protocol, :now, :now, NULL, :now)"
        " ON CONFLICT(device_id) DO UPDATE SET hostname = excluded.hostname,"
        " platform = excluded.platform, architecture = excluded.architecture,"
        " role = excluded.role, cpu_cores = excluded.cpu_cores,"
        " memory_gb = excluded.memory_gb,"
        " slots = min(excluded.slots_claimed, coalesce(devices.slots_limit, :max_slots)),"
        " slots_claimed = excluded.slots_claimed,"
        " capabilities = excluded.capabilities, tags = excluded.tags,"
        " task_types = excluded.task_types, profile = excluded.profile,"
        " status = excluded.status, connected = 1, available = excluded.available,"
        " unavailable_reason = excluded.unavailable_reason, address = excluded.address,"
        " protocol = excluded.protocol, connected_at = excluded.connected_at,"
        " disconnected_at = NULL, last_seen = excluded.last_seen",
        {"device_id": device_id, "hostname": text(info.get("hostname")),
         "platform": text(info.get("platform")),
         "architecture": text(info.get("architecture")), "role": text(data.get("role")),
         "cpu_cores": number(specs.get("cpu_cores"), int, 100000),
         "memory_gb": number(specs.get("memory_gb"), float, 1e7),
         "claimed": claimed_slots(data.get("slots"), MAX_SLOTS), "max_slots": max_slots,
         "capabilities": db.dumps(names(data.get("capabilities"))),
         "tags": db.dumps(names(data.get("tags"))),
         "task_types": db.dumps(names(data.get("task_types"))),
         "profile": db.dumps(profile), "status": ONLINE, "address": address,
         "available": availability_of(data.get("availability"))[0],
         "unavailable_reason": availability_of(data.get("availability"))[1],
         "protocol": number(data.get("protocol"), int, 2 ** 31), "now": now})


def set_secret(connection, device_id, sealed):
    """The device's secret, sealed (device_secrets.seal): never in clear."""
    connection.execute("UPDATE devices SET sealed_secret = ?, secret = NULL WHERE device_id = ?",
                       (sealed, device_id))


def set_slots_limit(connection, device_id, limit, max_slots):
    """The most slots the operator allows this device (None: max_slots, the
    default for all); its slots become that or its claim, the smaller.
    False when there is no such device."""
    cursor = connection.execute(
        "UPDATE devices SET slots_limit = :limit, slots = max(1, min(coalesce(slots_claimed,"
        " slots), coalesce(:limit, :max_slots))) WHERE device_id = :device_id",
        {"limit": limit, "max_slots": max_slots, "device_id": device_id})
    return cursor.rowcount == 1


def revoke(connection, device_id):
    """The device's secret stops working; it must never connect again."""
    cursor = connection.execute("UPDATE devices SET revoked = 1, secret = NULL"
                                " WHERE device_id = ?", (device_id,))
    return cursor.rowcount == 1


def heartbeat(connection, device_id, metrics, now, availability=None, history=True):
    """The device's latest figures; with `history`, a row of its heartbeat
    history too."""
    available, reason = availability_of(availability)
    metrics = clean_metrics(metrics)
    connection.execute(
        "UPDATE devices SET metrics = ?, last_seen = ?, figures_at = ?, status = ?,"
        " available = ?, unavailable_reason = ? WHERE device_id = ?",
        (db.dumps(metrics), now, now, ONLINE, available, reason, device_id))
    if history:
        connection.execute("INSERT INTO heartbeats(device_id, time, metrics) VALUES (?, ?, ?)",
                           (device_id, now, db.dumps(metrics)))


def set_availability(connection, device_id, availability):
    """The availability a heartbeat reports, written only when it changed."""
    available, reason = availability_of(availability)
    connection.execute("UPDATE devices SET available = ?, unavailable_reason = ?"
                       " WHERE device_id = ? AND (available IS NOT ? OR"
                       " unavailable_reason IS NOT ?)",
                       (available, reason, device_id, available, reason))


MAX_CACHED_FILES = 1000       # hashes of a device's file cache kept (most recent first)


def cached_files_text(value):
    """A heartbeat's "cached_files" as stored: a JSON list of valid SHA-256
    hex digests, at most MAX_CACHED_FILES; anything else is an empty list."""
    if not isinstance(value, list):
        return "[]"
    return db.dumps([sha for sha in value[:MAX_CACHED_FILES]
                     if isinstance(sha, str) and len(sha) == 64
                     and not sha.strip("0123456789abcdef")])


def set_cached_files(connection, device_id, text):
    """What the device's file cache holds, written only when it changed."""
    connection.execute("UPDATE devices SET cached_files = ? WHERE device_id = ?"
                       " AND cached_files IS NOT ?", (text, device_id, text))


def watch(connection, device_id, now):
    """Someone watches the device: until WATCH_SECONDS from now it reports
    every watch_report_interval (rc-server reads this column). Written only
    when less than WATCH_SECONDS - WATCH_REFRESH was left. The watch's end,
    or None when there is no such device (or it was forgotten)."""
    until = now + WATCH_SECONDS
    connection.execute("UPDATE devices SET watched_until = ? WHERE device_id = ?"
                       " AND forgotten = 0 AND coalesce(watched_until, 0) < ?",
                       (until, device_id, until - WATCH_REFRESH))
    row = connection.execute("SELECT watched_until FROM devices WHERE device_id = ?"
                             " AND forgotten = 0", (device_id,)).fetchone()
    return None if row is None else row[0]


def watched(connection, now):
    """(device id, watched until) of every device watched now (an index
    holds only devices ever watched; the range finds the current ones)."""
    return connection.execute("SELECT device_id, watched_until FROM devices"
                              " WHERE watched_until > ?", (now,)).fetchall()


def disconnected(connection, device_id, now):
    # Suspect describes a connection; the next one starts with a clean slate.
    connection.execute(
        "UPDATE devices SET connected = 0, disconnected_at = ?, suspect_since = NULL"
        " WHERE device_id = ?", (now, device_id))


def hold(connection, device_ids, until, now):
    """A graceful stop of rc-server is to tell these devices' workers to keep
    their tasks running until `until` (restart_hold): their connections end
    now, and rc-reaper leaves them and their tasks alone until `until` plus
    disconnect_grace (NOT_HELD_SQL). Not one revoked or forgotten (its tasks
    went elsewhere) or suspect since rc-server last looked: those it must
    not tell. The ids held, in order."""
    held = []
    for device_id in device_ids:
        if connection.execute(
                "UPDATE devices SET connected = 0, disconnected_at = ?, held_until = ?"
                " WHERE device_id = ? AND revoked = 0 AND suspect_since IS NULL",
                (now, until, device_id)).rowcount:
            held.append(device_id)
    return held


# Devices a graceful stop holds (see hold), and those it does not, given
# now - disconnect_grace (the first finds them through devices_held).
HELD_SQL = "held_until >= ?"
NOT_HELD_SQL = "(held_until IS NULL OR held_until < ?)"


def held_until(connection, device_id):
    row = connection.execute("SELECT held_until FROM devices WHERE device_id = ?",
                             (device_id,)).fetchone()
    return row and row[0]


def end_hold(connection, device_id):
    """Its worker is back and has answered on its new connection (so it has
    its register_ack, and holds nothing any more): the usual rules again."""
    connection.execute("UPDATE devices SET held_until = NULL WHERE device_id = ?",
                       (device_id,))


def disconnect_all(connection, now):
    """At server start: no connection survives a restart of rc-server."""
    connection.execute(
        "UPDATE devices SET connected = 0, disconnected_at = ?, suspect_since = NULL"
        " WHERE connected = 1", (now,))


def mark_suspect(connection, device_id, now):
    """The device's connection stays open but it answers nothing: the
    scheduler gives it no new work until it speaks again."""
    connection.execute("UPDATE devices SET suspect_since = ? WHERE device_id = ?"
                       " AND suspect_since IS NULL", (now, device_id))


def clear_suspect(connection, device_id):
    """It spoke again. True when it had been suspect."""
    return connection.execute("UPDATE devices SET suspect_since = NULL WHERE device_id = ?"
                              " AND suspect_since IS NOT NULL", (device_id,)).rowcount == 1


PRUNE_CHUNK = 2000    # heartbeats deleted per transaction, so writers never wait long


def prune_heartbeats(connection, older_than):
    """Delete heartbeats from before `older_than`, a chunk per short
    transaction: with 10,000 devices one big delete would hold up every
    heartbeat acknowledgement behind it."""
    while True:
        started = time.monotonic()
        with db.write(connection):
            deleted = connection.execute(
                "DELETE FROM heartbeats WHERE id IN (SELECT id FROM heartbeats"
                " WHERE time < ? LIMIT ?)", (older_than, PRUNE_CHUNK)).rowcount
        if deleted < PRUNE_CHUNK:
            return
        db.give_way(time.monotonic() - started)


# -- reading -------------------------------------------------------------------

def device_dict(row):
    """A stored row as the one device record every view shows (the CLI,
    /text, /api/v1, /stream). Whatever a device once sent, or an old
    database holds, the record has the expected shape: a figure that is
    not a sane number is absent, never an error in a view."""
    device = dict(row)
    for key in LIST_COLUMNS:
        if key in device:
            names = loaded(device[key], [])
            device[key] = [text(v) for v in names if isinstance(v, str)] \
                if isinstance(names, list) else []
    for key in OBJECT_COLUMNS:
        if key in device:
            value = reported(loaded(device[key], {}))
            device[key] = value if isinstance(value, dict) else {}
    if "metrics" in device:
        device["metrics"] = shaped_metrics(device["metrics"])
    for key, kind, largest in NUMBER_COLUMNS:
        if key in device:
            device[key] = number(device[key], kind, largest)
    if "slots" in device:
        device["slots"] = max(1, device["slots"] or 1)
    if "last_seen" in device and device["last_seen"] is None:
        device["last_seen"] = 0.0        # never heard: every reader subtracts it from now
    for key in TEXT_COLUMNS:
        if key in device and device[key] is not None:
            device[key] = text(device[key]) if isinstance(device[key], str) \
                else text(str(device[key]))
    for key in ("connected", "available", "drained", "forgotten", "revoked"):
        if key in device:
            device[key] = bool(device[key])
    if "suspect_since" in device:
        device["suspect"] = device["suspect_since"] is not None
    if "figures_at" in device:
        # Figures go on being shown after the device goes away: as its last, not as live.
        device["stale"] = not (device.get("status") == ONLINE and device.get("connected")
                               and not device.get("suspect"))
    # The role set on the main node wins over the one the device reports.
    if device.get("role_override"):
        device["reported_role"], device["role"] = device["role"], device["role_override"]
    device.pop("role_override", None)
    return device


# Columns read back as numbers: (name, type, largest sane value).
NUMBER_COLUMNS = (("cpu_cores", int, 100000), ("memory_gb", float, 1e7),
                  ("slots", int, MAX_SLOTS), ("registered_at", float, 1e11),
                  ("connected_at", float, 1e11), ("disconnected_at", float, 1e11),
                  ("last_seen", float, 1e11), ("protocol", int, 1e6),
                  ("figures_at", float, 1e11), ("watched_until", float, 1e11))
TEXT_COLUMNS = ("hostname", "platform", "architecture", "role", "role_override",
                "unavailable_reason", "address")
PERCENT_METRICS = ("cpu_percent", "memory_percent", "battery_percent", "disk_percent")
NUMBER_METRICS = ("temperature_c", "uptime_s", "disk_read_bytes", "disk_write_bytes",
                  "net_bytes_recv", "net_bytes_sent")
LARGEST_FIGURE = 1e18       # past this a reported figure is junk, not a measurement
REPORT_DEPTH = 4            # levels of nesting a device's report is shown with
REPORT_ITEMS = 200          # keys or items shown per object or list


def loaded(stored, default):
    """A JSON column, or `default` when it does not hold JSON (an old or
    damaged database)."""
    try:
        return db.loads(stored, default)
    except (ValueError, TypeError):
        return default


def reported(value, depth=0):
    """A value from a device's report as every view can show it: numbers
    finite and sane, text short, objects and lists shallow; anything else
    (NaN, 1e308, 2**64, nesting 1,000 deep) is None, which views show as absent."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value if -LARGEST_FIGURE <= value <= LARGEST_FIGURE else None
    if isinstance(value, str):
        return text(value, 1000)
    if depth >= REPORT_DEPTH:
        return None
    if isinstance(value, dict):
        items = ((text(str(k), 100), reported(v, depth + 1))
                 for k, v in list(value.items())[:REPORT_ITEMS])
        return {k: v for k, v in items if v is not None}
    if isinstance(value, list):
        items = (reported(v, depth + 1) for v in value[:REPORT_ITEMS])
        return [v for v in items if v is not None]
    return None


def shaped_metrics(metrics):
    """A device's last system_metrics: an object whose known figures are
    numbers in their range or absent. Old servers stored the whole
    heartbeat, with the metrics under system_metrics."""
    if isinstance(metrics, dict) and "system_metrics" in metrics:
        metrics = metrics["system_metrics"]
    if not isinstance(metrics, dict):
        return {}
    metrics = dict(metrics)
    for name in PERCENT_METRICS + NUMBER_METRICS:
        largest = 100 if name in PERCENT_METRICS else LARGEST_FIGURE
        if name in metrics and number(metrics[name], float, largest) is None:
            del metrics[name]
    battery = metrics.get("battery")
    if isinstance(battery, dict) and number(battery.get("percent"), float, 100) is None:
        metrics["battery"] = {k: v for k, v in battery.items() if k != "percent"}
    elif battery is not None and not isinstance(battery, dict) and \
            number(battery, float, 100) is None:
        del metrics["battery"]
    if "load_avg" in metrics and not (isinstance(metrics["load_avg"], list) and all(
            number(v, float, LARGEST_FIGURE) is not None for v in metrics["load_avg"])):
        del metrics["load_avg"]
    return metrics


def availability_of(availability):
    """(available, reason) from a worker's {"available", "reason"}; a worker
    that says nothing is available."""
    if not isinstance(availability, dict) or availability.get("available") is not False:
        return 1, None
    return 0, text(availability.get("reason")) or "unavailable"


def list_devices(connection, status=None, include_forgotten=False):
    """Devices by id; forgotten ones only when asked (their history stays)."""
    clause = "1" if include_forgotten else "d.forgotten = 0"
    if status is None:
        return list_devices_where(connection, clause, ())
    return list_devices_where(connection, clause + " AND d.status = ?", (status,))


def get(connection, device_id):
    for device in list_devices_where(connection, "d.device_id = ?", (device_id,)):
        return device
    return None


def unknown(connection, device_id):
    """`no device 'PI'`, and the id meant when one differs only by case:
    ids are unique whatever their case, but matched as written."""
    row = connection.execute("SELECT device_id FROM devices WHERE device_id = ? COLLATE NOCASE"
                             " AND forgotten = 0", (str(device_id),)).fetchone()
    return "no device %r%s" % (device_id, " (did you mean %s?)" % row[0] if row else "")


def list_devices_where(connection, clause, parameters):
    return [device_dict(row) for row in device_rows(connection, clause, parameters)]


def device_rows(connection, clause="d.forgotten = 0", parameters=()):
    """The rows list_devices_where makes records of, for a reader that
    looks often and makes records only of the rows that changed."""
    return connection.execute(
        "SELECT %s, (SELECT count(*) FROM tasks t WHERE t.device_id = d.device_id"
        " AND t.%s) AS active_tasks FROM devices d WHERE %s ORDER BY d.device_id"
        % (prefixed(DEVICE_COLUMNS, "d."), db.ACTIVE_SQL, clause), tuple(parameters))


def with_age(device, now):
    """The record with `figures_age`: seconds since its figures were taken
    (None when it never sent any), for a viewer to show how old they are."""
    taken = device.get("figures_at")
    device["figures_age"] = None if taken is None else round(max(0.0, now - taken), 3)
    return device


def total_slots(devices):
    return sum(device["slots"] for device in devices)


def busy_slots(devices):
    """Slots that hold a task, over these devices: a device may hold more tasks
    than slots (instant ones, and a prefetch waiting on it), never more busy."""
    return sum(min(device["active_tasks"], device["slots"]) for device in devices)


def counts(connection):
    """Devices online, offline, connected and in all; a forgotten one is
    retired, in none of them (its history stays: `rc devices --all`)."""
    row = connection.execute(
        "SELECT count(*) AS total, coalesce(sum(status = ?), 0) AS online,"
        " coalesce(sum(connected), 0) AS connected FROM devices WHERE forgotten = 0",
        (ONLINE,)).fetchone()
    return {"online": row["online"], "offline": row["total"] - row["online"],
            "connected": row["connected"], "total": row["total"]}


def prefixed(columns, prefix):
    return ", ".join(prefix + name.strip() for name in columns.split(","))


# -- cleaning what a worker sends -------------------------------------------------

def text(value, limit=200):
    return value[:limit] if isinstance(value, str) else None


def number(value, kind, largest):
    """A number a worker reported, or None when it is not a sane one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not 0 <= value <= largest:      # also false for NaN
        return None
    return kind(value)


def claimed_slots(value, max_slots):
    """The slots a worker claims, at least 1 and at most `max_slots`."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 1
    return max(1, min(value, max_slots, MAX_SLOTS))


def dict_or_empty(value):
    return value if isinstance(value, dict) else {}


def finite(value):
    """A real number that is neither a bool nor NaN nor infinite."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def is_bool(value):
    return isinstance(value, bool)


def clean_metrics(metrics):
    """A heartbeat's system_metrics as they are stored: an object of at most
    MAX_METRICS short names; the known figures only when they are numbers
    (charging a bool, load_avg up to three numbers); anything else only
    when it is a plain value (a finite number, a bool, a short text), never
    a nested object a reader would trip on."""
    cleaned = {}
    for name, value in dict_or_empty(metrics).items():
        if len(cleaned) >= MAX_METRICS:
            break
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            continue
        value = clean_metric(name, value)
        if value is not None:
            cleaned[name] = value
    return cleaned


def clean_metric(name, value):
    """One metric as it is stored, or None to leave it out."""
    if name == "system_metrics":     # readers look inside a key of that name (older servers)
        return None
    if name in NUMERIC_METRICS:
        return value if finite(value) else None
    if name == "charging":
        return value if is_bool(value) else None
    if name == "load_avg":
        return value[:3] if isinstance(value, list) and all(map(finite, value[:3])) else None
    if name == "battery" and isinstance(value, dict):     # an older worker's shape
        return {key: value[key] for key, kind in (("percent", finite), ("charging", is_bool))
                if kind(value.get(key))} or None
    if isinstance(value, bool) or finite(value):
        return value
    return text(value)


def clean_specs(specs):
    """hardware_specs with the figures the scheduler ranks by (cpu_speed)
    and shows (cores, memory, disk) left out unless they are numbers."""
    return {name: value for name, value in specs.items()
            if name not in NUMERIC_SPECS or finite(value)}


def names(values, limit=100):
    if not isinstance(values, list):
        return []
    return sorted({v[:100] for v in values if isinstance(v, str) and v})[:limit]

