"""rc-reaper: notices what did not happen.

A device that stopped heartbeating, or dropped its connection and did not
come back, goes offline and its tasks go back to the queue (or fail when
their retries are spent). An assignment not accepted in time is taken back;
one on a device rc-server found suspect, at once and uncharged.
A task running far past its timeout is failed even if its device never says
so. Heartbeat history is kept bounded.
"""
import time

from rc import db, devices, housekeeping, program, tasks
from rc.states import ASSIGNED, CANCELLED, OFFLINE, ONLINE, RUNNING, TIMED_OUT

PRUNE_INTERVAL = 60.0   # seconds between trims of the heartbeat history
TASK_ROW = "SELECT %s FROM tasks" % tasks.LEASE_COLUMNS


def sweep(connection, config, log, now):
    """One look at everything overdue, in one short transaction."""
    with db.write(connection):
        for device_id, why in overdue_devices(connection, config, now):
            connection.execute("UPDATE devices SET status = ? WHERE device_id = ?",
                               (OFFLINE, device_id))
            log.warning("device_offline", device_id=device_id, reason=why)
        take_back(connection, config, log, now, TASK_ROW +
                  " WHERE %s AND device_id IN (SELECT device_id FROM devices"
                  " WHERE status = ?)" % db.ACTIVE_SQL, (OFFLINE,), "device {device_id} offline")
        take_back(connection, config, log, now, TASK_ROW +
                  " WHERE %s AND lease_expires < ?" % db.ACTIVE_SQL,
                  (now,), "lease on {device_id} expired")
        take_back(connection, config, log, now, TASK_ROW +
                  " WHERE %s AND cancel_requested = 1 AND device_id IN"
                  " (SELECT device_id FROM devices WHERE connected = 0)" % db.ACTIVE_SQL,
                  (), "device {device_id} not connected")
        hand_back_from_suspects(connection, log, now)
        fail_overdue(connection, log, now, config.timeout_grace)


def hand_back_from_suspects(connection, log, now):
    """rc-server hands back what a device had not accepted when it marks it
    suspect; this catches an assignment the scheduler made just before that
    mark committed, so it waits for no accept_timeout either."""
    for row in connection.execute(
            TASK_ROW + " WHERE %s AND state = ? AND device_id IN (SELECT device_id FROM"
            " devices WHERE suspect_since IS NOT NULL)" % db.ACTIVE_SQL, (ASSIGNED,)).fetchall():
        why = "%s stopped answering before accepting it" % row["device_id"]
        if tasks.hand_back_unaccepted(connection, row, why, now):
            log.warning("task_taken_back", task_id=row["task_id"], attempt=row["attempt"],
                        device_id=row["device_id"], state=row["state"], reason=why)


def overdue_devices(connection, config, now):
    """Online devices that have gone quiet or dropped off for too long."""
    rows = connection.execute(
        "SELECT device_id, connected, last_seen, disconnected_at FROM devices"
        " WHERE status = ? AND (last_seen < ? OR (connected = 0 AND disconnected_at < ?))",
        (ONLINE, now - config.offline_timeout, now - config.disconnect_grace)).fetchall()
    for row in rows:
        if row["last_seen"] < now - config.offline_timeout:
            yield row["device_id"], "no heartbeat for %gs" % config.offline_timeout
        else:
            yield row["device_id"], "disconnected for %gs" % config.disconnect_grace


def take_back(connection, config, log, now, query, parameters, reason):
    for row in connection.execute(query, parameters).fetchall():
        why = reason.format(device_id=row["device_id"])
        if tasks.take_back(connection, row, why, now, config):
            log.warning("task_taken_back", task_id=row["task_id"], attempt=row["attempt"],
                        device_id=row["device_id"], state=row["state"], reason=why)


def fail_overdue(connection, log, now, grace):
    """The main node's backstop for the worker's own timeout."""
    rows = connection.execute(
        "SELECT task_id, attempt, device_id, timeout, cancel_requested FROM tasks"
        " WHERE %s AND state = ? AND started_at + timeout + ? < ?" % db.ACTIVE_SQL,
        (RUNNING, grace, now)).fetchall()
    for row in rows:
        state = CANCELLED if row["cancel_requested"] else TIMED_OUT
        error = "no result %gs after its %gs timeout" % (grace, row["timeout"])
        if tasks.finish(connection, row["task_id"], row["attempt"], row["device_id"],
                        state, None, error, "timeout backstop", now):
            log.warning("task_timed_out", task_id=row["task_id"], attempt=row["attempt"],
                        device_id=row["device_id"])


def prune(connection, config, now):
    """Keep about `heartbeat_history` heartbeats per device."""
    devices.prune_heartbeats(connection,
                             now - config.heartbeat_history * config.heartbeat_interval)


def run(config, log, should_stop):
    connection = db.open_database(config.db_path)
    log.info("reaper_started", offline_timeout=config.offline_timeout,
             disconnect_grace=config.disconnect_grace)
    next_prune = 0.0
    while not should_stop():
        now = time.time()
        sweep(connection, config, log, now)
        if now >= next_prune:
            prune(connection, config, now)
            housekeeping.every_minute(connection, config, log, now)
            next_prune = now + PRUNE_INTERVAL
        time.sleep(config.reaper_interval)


def main():
    program.serve("rc-reaper", run)


if __name__ == "__main__":
    main()
