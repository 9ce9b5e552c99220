"""rc-scheduler: gives queued tasks to online devices with free slots.

Order: priority (urgent first), then age. A task that fits no device is
passed over, so it never holds up the tasks behind it. The scheduler wakes
when another program commits (PRAGMA data_version), not on a fixed beat.
"""
import signal
import time

from rc import config as config_module
from rc import bell, db, devices, tasks
from rc.log import Logger
from rc.states import ACTIVE_STATES, ASSIGNED, INSTANT_TASK_TYPES, ONLINE, QUEUED

BATCH = 2000          # queued tasks looked at per pass
IDLE_CHECK = 1.0      # seconds; look again even without a change (backoffs end)
# SQL: every task this one depends on has completed.
DEPENDENCIES_MET = ("NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks p"
                    " ON p.task_id = d.depends_on WHERE d.task_id = tasks.task_id"
                    " AND p.state != 'completed')")


class Slots:
    """The online, connected devices and how many tasks each can still take:
    `free` slots for tasks that run a while, `instant_free` for the instant
    types, which the worker answers at once without a slot."""

    def __init__(self, connection, instant_per_slot):
        self.devices = devices.list_devices_where(
            connection, "d.status = ? AND d.connected = 1 AND d.available = 1", (ONLINE,))
        instant_held = dict(connection.execute(
            "SELECT device_id, count(*) FROM tasks WHERE %s AND task_type IN (%s)"
            " GROUP BY device_id" % (db.ACTIVE_SQL, db.sql_list(INSTANT_TASK_TYPES))))
        for device in self.devices:
            instant = instant_held.get(device["device_id"], 0)
            device["free"] = device["slots"] - (device["active_tasks"] - instant)
            device["instant_free"] = device["slots"] * instant_per_slot - instant
        self.free = sum(max(0, d["free"]) + max(0, d["instant_free"]) for d in self.devices)

    def take(self, device, task_type):
        device["instant_free" if task_type in INSTANT_TASK_TYPES else "free"] -= 1
        self.free -= 1

    def best_for(self, task_type, requirements):
        """The fitting device that should take the task next: the most free
        slots, so a batch spreads out, then the least busy CPU, then the
        fastest (when the worker reported a speed)."""
        room = "instant_free" if task_type in INSTANT_TASK_TYPES else "free"
        best, best_rank = None, None
        for device in self.devices:
            if device[room] <= 0 or task_type not in device["task_types"]:
                continue
            if requirements and tasks.unmet_requirements(requirements, device):
                continue
            rank = preference(device, room)
            if best is None or rank > best_rank:
                best, best_rank = device, rank
        return best


def preference(device, room):
    metrics = device["metrics"].get("system_metrics", device["metrics"])
    specs = device["profile"].get("hardware_specs") or {}
    cpu_busy = metrics.get("cpu_percent")
    speed = specs.get("cpu_speed")
    return (device[room],
            -cpu_busy if isinstance(cpu_busy, (int, float)) else -50.0,
            speed if isinstance(speed, (int, float)) else 0.0)


def schedule(connection, now, log, accept_timeout, instant_per_slot=8):
    """One pass: assign what fits now. Returns how many tasks were assigned."""
    if not connection.execute("SELECT 1 FROM tasks WHERE %s AND not_before <= ? LIMIT 1"
                              % db.QUEUED_SQL, (now,)).fetchone():
        return 0      # the common case when idle: no transaction at all
    with db.write(connection):
        slots = Slots(connection, instant_per_slot)
        if slots.free <= 0:
            return 0
        # Read lazily: with thousands queued and a few free slots, a pass
        # should touch a few rows, not the whole queue.
        queued = connection.execute(
            "SELECT task_id, attempt, task_type, requirements FROM tasks"
            " WHERE %s AND not_before <= ? AND %s"
            " ORDER BY priority DESC, task_id LIMIT ?" % (db.QUEUED_SQL, DEPENDENCIES_MET),
            (now, BATCH))
        assigned = 0
        for task in queued:
            device = slots.best_for(task["task_type"], db.loads(task["requirements"]))
            if device is None:
                continue
            # The first lease is short: the device must accept it promptly.
            connection.execute(
                "UPDATE tasks SET state = ?, device_id = ?, assigned_at = ?,"
                " lease_expires = ?, reason = ? WHERE task_id = ? AND attempt = ? AND state = ?",
                (ASSIGNED, device["device_id"], now, now + accept_timeout, "scheduled",
                 task["task_id"], task["attempt"], QUEUED))
            slots.take(device, task["task_type"])
            assigned += 1
            if slots.free == 0:
                break
    if assigned:
        log.debug("tasks_assigned", count=assigned)
    return assigned


def next_backoff_end(connection, now):
    row = connection.execute("SELECT min(not_before) AS t FROM tasks WHERE %s"
                             " AND not_before > ?" % db.QUEUED_SQL, (now,)).fetchone()
    return row["t"]


def run(config, log, should_stop):
    connection = db.open_database(config.db_path)
    doorbell = bell.Bell(config.run_dir, bell.SCHEDULER)
    log.info("scheduler_started", active_states=list(ACTIVE_STATES))
    seen = None
    wake_at = 0.0
    while not should_stop():
        version = db.data_version(connection)
        now = time.time()
        if version != seen or now >= wake_at:
            seen = version
            if schedule(connection, now, log, config.accept_timeout, config.instant_per_slot):
                bell.ring(config.run_dir, bell.SERVER)
            # Our own commit does not change data_version for us; nothing to undo.
            later = next_backoff_end(connection, now)
            wake_at = min(later, now + IDLE_CHECK) if later else now + IDLE_CHECK
        doorbell.wait(min(config.poll_interval, max(0.0, wake_at - time.time())))
    doorbell.close()


def main():
    config = config_module.load()
    log = Logger("rc-scheduler", config.log_level)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    run(config, log, lambda: bool(stop))
    log.info("scheduler_stopped")


if __name__ == "__main__":
    main()
