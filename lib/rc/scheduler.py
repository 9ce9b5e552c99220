"""rc-scheduler: gives queued tasks to online devices with free slots.

Order: priority (urgent first), then age. A task that fits no device is
passed over, so it never holds up the tasks behind it. The scheduler wakes
when another program commits (PRAGMA data_version), not on a fixed beat.
"""
import signal
import time

from rc import config as config_module
from rc import db, devices, tasks
from rc.log import Logger
from rc.states import ACTIVE_STATES, ASSIGNED, ONLINE, QUEUED

BATCH = 2000          # queued tasks looked at per pass
IDLE_CHECK = 1.0      # seconds; look again even without a change (backoffs end)
# SQL: every task this one depends on has completed.
DEPENDENCIES_MET = ("NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks p"
                    " ON p.task_id = d.depends_on WHERE d.task_id = tasks.task_id"
                    " AND p.state != 'completed')")


class Slots:
    """The online, connected devices and how many tasks each can still take."""

    def __init__(self, connection):
        self.devices = devices.list_devices_where(
            connection, "d.status = ? AND d.connected = 1", (ONLINE,))
        for device in self.devices:
            device["free"] = device["slots"] - device["active_tasks"]
        self.devices = [device for device in self.devices if device["free"] > 0]
        self.free = sum(device["free"] for device in self.devices)

    def take(self, device):
        device["free"] -= 1
        self.free -= 1

    def best_for(self, task_type, requirements):
        """The fitting device that should take the task next: the most free
        slots, so a batch spreads out, then the least busy CPU, then the
        fastest (when the worker reported a speed)."""
        best, best_rank = None, None
        for device in self.devices:
            if device["free"] <= 0 or task_type not in device["task_types"]:
                continue
            if requirements and tasks.unmet_requirements(requirements, device):
                continue
            rank = preference(device)
            if best is None or rank > best_rank:
                best, best_rank = device, rank
        return best


def preference(device):
    metrics = device["metrics"].get("system_metrics", device["metrics"])
    specs = device["profile"].get("hardware_specs") or {}
    cpu_busy = metrics.get("cpu_percent")
    speed = specs.get("cpu_speed")
    return (device["free"],
            -cpu_busy if isinstance(cpu_busy, (int, float)) else -50.0,
            speed if isinstance(speed, (int, float)) else 0.0)


def schedule(connection, now, log, accept_timeout):
    """One pass: assign what fits now. Returns how many tasks were assigned."""
    with db.write(connection):
        slots = Slots(connection)
        if not slots.devices:
            return 0
        queued = connection.execute(
            "SELECT task_id, attempt, task_type, requirements FROM tasks"
            " WHERE state = ? AND not_before <= ? AND %s"
            " ORDER BY priority DESC, task_id LIMIT ?" % DEPENDENCIES_MET,
            (QUEUED, now, BATCH)).fetchall()
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
            slots.take(device)
            assigned += 1
            if slots.free == 0:
                break
    if assigned:
        log.debug("tasks_assigned", count=assigned)
    return assigned


def next_backoff_end(connection, now):
    row = connection.execute("SELECT min(not_before) AS t FROM tasks WHERE state = ?"
                             " AND not_before > ?", (QUEUED, now)).fetchone()
    return row["t"]


def run(config, log, should_stop):
    connection = db.open_database(config.db_path)
    log.info("scheduler_started", active_states=list(ACTIVE_STATES))
    seen = None
    wake_at = 0.0
    while not should_stop():
        version = db.data_version(connection)
        now = time.time()
        if version != seen or now >= wake_at:
            seen = version
            schedule(connection, now, log, config.accept_timeout)
            # Our own commit does not change data_version for us; nothing to undo.
            later = next_backoff_end(connection, now)
            wake_at = min(later, now + IDLE_CHECK) if later else now + IDLE_CHECK
        time.sleep(config.poll_interval)


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
