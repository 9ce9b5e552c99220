"""Devices: what a worker tells about itself, whether it is connected, and
its heartbeat history. Writes here run inside a transaction the caller holds."""
from rc import db
from rc.states import ONLINE

DEVICE_COLUMNS = ("device_id, hostname, platform, architecture, role, cpu_cores, memory_gb,"
                  " slots, capabilities, tags, task_types, profile, metrics, status,"
                  " connected, available, unavailable_reason, drained, forgotten, labels,"
                  " role_override, address, protocol, registered_at, connected_at,"
                  " disconnected_at, last_seen, revoked")
LIST_COLUMNS = ("capabilities", "tags", "task_types")
MAX_SLOTS = 1024
OBJECT_COLUMNS = ("profile", "metrics", "labels")


def register(connection, device_id, data, address, now):
    """Create or refresh a device from its `register` message."""
    info = data.get("device_info") or {}
    specs = data.get("hardware_specs") or {}
    profile = {"device_info": info, "hardware_specs": specs}
    connection.execute(
        "INSERT INTO devices(device_id, hostname, platform, architecture, role, cpu_cores,"
        " memory_gb, slots, capabilities, tags, task_types, profile, status, connected,"
        " available, unavailable_reason, address, protocol, registered_at, connected_at,"
        " disconnected_at, last_seen)"
        " VALUES (:device_id, :hostname, :platform, :architecture, :role, :cpu_cores,"
        " :memory_gb, :slots, :capabilities, :tags, :task_types, :profile, :status, 1,"
        " :available, :unavailable_reason, :address, :protocol, :now, :now, NULL, :now)"
        " ON CONFLICT(device_id) DO UPDATE SET hostname = excluded.hostname,"
        " platform = excluded.platform, architecture = excluded.architecture,"
        " role = excluded.role, cpu_cores = excluded.cpu_cores,"
        " memory_gb = excluded.memory_gb, slots = excluded.slots,"
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
         "slots": max(1, number(data.get("slots"), int, MAX_SLOTS) or 1),
         "capabilities": db.dumps(names(data.get("capabilities"))),
         "tags": db.dumps(names(data.get("tags"))),
         "task_types": db.dumps(names(data.get("task_types"))),
         "profile": db.dumps(profile), "status": ONLINE, "address": address,
         "available": availability_of(data.get("availability"))[0],
         "unavailable_reason": availability_of(data.get("availability"))[1],
         "protocol": data.get("protocol"), "now": now})


def set_secret(connection, device_id, secret):
    connection.execute("UPDATE devices SET secret = ? WHERE device_id = ?", (secret, device_id))


def revoke(connection, device_id):
    """The device's secret stops working; it must never connect again."""
    cursor = connection.execute("UPDATE devices SET revoked = 1, secret = NULL"
                                " WHERE device_id = ?", (device_id,))
    return cursor.rowcount == 1


def heartbeat(connection, device_id, metrics, now, availability=None):
    available, reason = availability_of(availability)
    connection.execute(
        "UPDATE devices SET metrics = ?, last_seen = ?, status = ?, available = ?,"
        " unavailable_reason = ? WHERE device_id = ?",
        (db.dumps(metrics), now, ONLINE, available, reason, device_id))
    connection.execute("INSERT INTO heartbeats(device_id, time, metrics) VALUES (?, ?, ?)",
                       (device_id, now, db.dumps(metrics)))


def disconnected(connection, device_id, now):
    connection.execute(
        "UPDATE devices SET connected = 0, disconnected_at = ? WHERE device_id = ?",
        (now, device_id))


def disconnect_all(connection, now):
    """At server start: no connection survives a restart of rc-server."""
    connection.execute(
        "UPDATE devices SET connected = 0, disconnected_at = ? WHERE connected = 1",
        (now,))


PRUNE_CHUNK = 2000    # heartbeats deleted per transaction, so writers never wait long


def prune_heartbeats(connection, older_than):
    """Delete heartbeats from before `older_than`, a chunk per short
    transaction: with 10,000 devices one big delete would hold up every
    heartbeat acknowledgement behind it."""
    while True:
        with db.write(connection):
            deleted = connection.execute(
                "DELETE FROM heartbeats WHERE id IN (SELECT id FROM heartbeats"
                " WHERE time < ? LIMIT ?)", (older_than, PRUNE_CHUNK)).rowcount
        if deleted < PRUNE_CHUNK:
            return


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
    # The role set on the main node wins over the one the device reports.
    if device.get("role_override"):
        device["reported_role"], device["role"] = device["role"], device["role_override"]
    device.pop("role_override", None)
    return device


# Columns read back as numbers: (name, type, largest sane value).
NUMBER_COLUMNS = (("cpu_cores", int, 100000), ("memory_gb", float, 1e7),
                  ("slots", int, MAX_SLOTS), ("registered_at", float, 1e11),
                  ("connected_at", float, 1e11), ("disconnected_at", float, 1e11),
                  ("last_seen", float, 1e11), ("protocol", int, 1e6))
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


def list_devices_where(connection, clause, parameters):
    rows = connection.execute(
        "SELECT %s, (SELECT count(*) FROM tasks t WHERE t.device_id = d.device_id"
        " AND t.%s) AS active_tasks FROM devices d WHERE %s ORDER BY d.device_id"
        % (prefixed(DEVICE_COLUMNS, "d."), db.ACTIVE_SQL, clause), tuple(parameters))
    return [device_dict(row) for row in rows]


def total_slots(devices):
    return sum(device["slots"] for device in devices)


def busy_slots(devices):
    """Slots that hold a task, over these devices: a device may hold more tasks
    than slots (instant ones, and a prefetch waiting on it), never more busy."""
    return sum(min(device["active_tasks"], device["slots"]) for device in devices)


def counts(connection):
    row = connection.execute(
        "SELECT count(*) AS total, coalesce(sum(status = ?), 0) AS online,"
        " coalesce(sum(connected), 0) AS connected FROM devices", (ONLINE,)).fetchone()
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


def names(values, limit=100):
    if not isinstance(values, list):
        return []
    return sorted({v[:100] for v in values if isinstance(v, str) and v})[:limit]

