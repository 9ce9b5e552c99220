"""Devices: what a worker tells about itself, whether it is connected, and
its heartbeat history. Writes here run inside a transaction the caller holds."""
from rc import db
from rc.states import ONLINE

DEVICE_COLUMNS = ("device_id, hostname, platform, architecture, role, cpu_cores, memory_gb,"
                  " slots, capabilities, tags, task_types, profile, metrics, status,"
                  " connected, available, unavailable_reason, drained, forgotten, labels,"
                  " role_override, address, protocol, registered_at, connected_at,"
                  " disconnected_at, last_seen, revoked, suspect_since")
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
    # Suspect describes a connection; the next one starts with a clean slate.
    connection.execute(
        "UPDATE devices SET connected = 0, disconnected_at = ?, suspect_since = NULL"
        " WHERE device_id = ?", (now, device_id))


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
        with db.write(connection):
            deleted = connection.execute(
                "DELETE FROM heartbeats WHERE id IN (SELECT id FROM heartbeats"
                " WHERE time < ? LIMIT ?)", (older_than, PRUNE_CHUNK)).rowcount
        if deleted < PRUNE_CHUNK:
            return


# -- reading -------------------------------------------------------------------

def device_dict(row):
    device = dict(row)
    for key in LIST_COLUMNS:
        if key in device:
            device[key] = db.loads(device[key], [])
    for key in OBJECT_COLUMNS:
        if key in device:
            device[key] = db.loads(device[key], {})
    for key in ("connected", "available", "drained", "forgotten", "revoked"):
        if key in device:
            device[key] = bool(device[key])
    if "suspect_since" in device:
        device["suspect"] = device["suspect_since"] is not None
    # The role set on the main node wins over the one the device reports.
    if device.get("role_override"):
        device["reported_role"], device["role"] = device["role"], device["role_override"]
    device.pop("role_override", None)
    return device


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

