"""rc-reaper: notices what did not happen.

A device that stopped heartbeating, or dropped its connection and did not
come back, goes offline and its tasks go back to the queue (or fail when
their retries are spent); one whose worker a graceful stop of rc-server
told to hold its tasks (restart_hold) is left alone until that hold and
disconnect_grace have passed, whichever program runs meanwhile. An assignment not accepted in time is given back
by its device (a bounce: expire_leases); one on a device rc-server found
suspect, at once and uncharged.
A task running far past its timeout is failed even if its device never says
so. Heartbeat history is kept bounded. After each sweep it checkpoints
the write-ahead log (db.checkpoint), so that the programs on a task's way
do not wait for the disk themselves.

A row it cannot handle (a value no program would write) costs that row
only: its changes are rolled back to a savepoint, it is logged (rate-
limited), and the rest of the sweep goes on; a sweep that fails as a whole
is logged and the next one comes as usual.
"""
import contextlib
import time

from rc import db, devices, housekeeping, program, tasks, throttle
from rc.states import ASSIGNED, CANCELLED, OFFLINE, ONLINE, RUNNING, TIMED_OUT

PRUNE_INTERVAL = 60.0   # seconds between trims of the heartbeat history
# Seconds the wall clock may move forward past the monotonic clock between two
# sweeps before it is a jump (an NTP step, a clock set by hand), whose times
# written before it are moved with it (see ClockWatch).
CLOCK_JUMP_SECONDS = 10.0
TASK_ROW = "SELECT %s FROM tasks" % tasks.LEASE_COLUMNS


def sweep(connection, config, log, now, log_limited=None):
    """One look at everything overdue, in one short transaction."""
    contained = RowGuard(connection, log_limited or throttle.LimitedLog(log))
    with db.write(connection):
        for row in overdue_devices(connection, config, now):
            with contained("device", row["device_id"]):
                why = offline_reason(row, config, now)
                connection.execute("UPDATE devices SET status = ? WHERE device_id = ?",
                                   (OFFLINE, row["device_id"]))
                log.warning("device_offline", device_id=row["device_id"], reason=why)
        take_back(connection, config, log, now, TASK_ROW +
                  " WHERE %s AND device_id IN (SELECT device_id FROM devices"
                  " WHERE status = ?)" % db.ACTIVE_SQL, (OFFLINE,), "device {device_id} offline",
                  contained)
        expire_leases(connection, config, log, now, contained)
        take_back(connection, config, log, now, TASK_ROW +
                  " WHERE %s AND cancel_requested = 1 AND device_id IN"
                  " (SELECT device_id FROM devices WHERE connected = 0)" % db.ACTIVE_SQL,
                  (), "device {device_id} not connected", contained)
        hand_back_from_suspects(connection, log, now, contained)
        fail_overdue(connection, log, now, config.timeout_grace, contained)
        release_held_too_long(connection, config, now)


class RowGuard:
    """`with guard(kind, key):` around the work on one row, inside the
    sweep's transaction: an error rolls back that row's changes alone (a
    savepoint) and is logged, rate-limited; the sweep goes on."""

    def __init__(self, connection, log_limited):
        self.connection = connection
        self.log_limited = log_limited

    @contextlib.contextmanager
    def __call__(self, kind, key):
        self.connection.execute("SAVEPOINT reaper_row")
        try:
            yield
        except Exception as e:
            self.connection.execute("ROLLBACK TO reaper_row")
            self.log_limited("error", "row_failed", (kind, key), row_kind=kind, row_key=key,
                             error=repr(e)[:300])
        self.connection.execute("RELEASE reaper_row")


def hand_back_from_suspects(connection, log, now, contained):
    """rc-server hands back what a device had not accepted when it marks it
    suspect; this catches an assignment the scheduler made just before that
    mark committed, so it waits for no accept_timeout either."""
    for row in connection.execute(
            TASK_ROW + " WHERE %s AND state = ? AND device_id IN (SELECT device_id FROM"
            " devices WHERE suspect_since IS NOT NULL)" % db.ACTIVE_SQL, (ASSIGNED,)).fetchall():
        why = "%s stopped answering before accepting it" % row["device_id"]
        with contained("task", row["task_id"]):
            if tasks.hand_back_unaccepted(connection, row, why, now):
                log.warning("task_taken_back", task_id=row["task_id"], attempt=row["attempt"],
                            device_id=row["device_id"], state=row["state"], reason=why)


def overdue_devices(connection, config, now):
    """Online devices that have gone quiet or dropped off for too long; a
    device held through a restart of rc-server (devices.hold) is neither
    until its hold and disconnect_grace have passed."""
    return connection.execute(
        "SELECT device_id, connected, last_seen, disconnected_at, held_until FROM devices"
        " WHERE status = ? AND (last_seen < ? OR (connected = 0 AND disconnected_at < ?))"
        " AND %s" % devices.NOT_HELD_SQL,
        (ONLINE, now - config.offline_timeout, now - config.disconnect_grace,
         now - config.disconnect_grace)).fetchall()


def offline_reason(row, config, now):
    if row["held_until"] is not None and not row["connected"]:
        return "not back %gs after its restart hold ended" % config.disconnect_grace
    if row["last_seen"] < now - config.offline_timeout:
        return "no heartbeat for %gs" % config.offline_timeout
    return "disconnected for %gs" % config.disconnect_grace


def take_back(connection, config, log, now, query, parameters, reason, contained):
    for row in connection.execute(query, parameters).fetchall():
        with contained("task", row["task_id"]):
            why = reason.format(device_id=row["device_id"])
            if tasks.take_back(connection, row, why, now, config):
                log.warning("task_taken_back", task_id=row["task_id"], attempt=row["attempt"],
                            device_id=row["device_id"], state=row["state"], reason=why)


def expire_leases(connection, config, log, now, contained):
    """Attempts whose lease ran out on a device not held through a restart:
    a running one is taken back; one never accepted is given back by its
    device (tasks.bounce), as if it had answered handed_back. A device that
    heartbeats and answers pings (never suspect) but lets every assignment
    run out, claiming the most idle slots, was given each task again after
    its backoff, for ever, and no task of the queue ran: now another fitting
    device with room is given it first, and a task only it takes fails after
    bounce_limit of them in a row, naming it."""
    for row in connection.execute(
            TASK_ROW + " WHERE %s AND lease_expires < ? AND device_id NOT IN (SELECT device_id"
            " FROM devices WHERE %s)" % (db.ACTIVE_SQL, devices.HELD_SQL),
            (now, now - config.disconnect_grace)).fetchall():
        with contained("task", row["task_id"]):
            if row["state"] == ASSIGNED:
                why = "%s never accepted it within accept_timeout" % row["device_id"]
                done = tasks.bounce(connection, row, row["device_id"], why, now, config)
            else:
                why = "lease on %s expired" % row["device_id"]
                done = tasks.take_back(connection, row, why, now, config)
            if done:
                log.warning("task_taken_back", task_id=row["task_id"], attempt=row["attempt"],
                            device_id=row["device_id"], state=row["state"], reason=why)


def release_held_too_long(connection, config, now):
    """Queued tasks held back (a retry's backoff, a wait for a checkpoint)
    past the longest hold there is: set before the wall clock was set back
    (an NTP step), they waited the whole step, a day. They may start now."""
    longest = max(config.retry_backoff_max, tasks.HAND_BACK_CHECKPOINT_WAIT)
    connection.execute("UPDATE tasks SET not_before = ? WHERE %s AND not_before > ?"
                       % db.QUEUED_SQL, (now, now + longest))


def fail_overdue(connection, log, now, grace, contained):
    """The main node's backstop for the worker's own timeout."""
    rows = connection.execute(
        "SELECT task_id, attempt, device_id, timeout, cancel_requested FROM tasks"
        " WHERE %s AND state = ? AND started_at + timeout + ? < ?" % db.ACTIVE_SQL,
        (RUNNING, grace, now)).fetchall()
    for row in rows:
        with contained("task", row["task_id"]):
            fail_one_overdue(connection, log, now, grace, row)


def fail_one_overdue(connection, log, now, grace, row):
    state = CANCELLED if row["cancel_requested"] else TIMED_OUT
    error = "no result %gs after its %gs timeout" % (grace, row["timeout"])
    if tasks.finish(connection, row["task_id"], row["attempt"], row["device_id"],
                    state, None, error, "timeout backstop", now):
        log.warning("task_timed_out", task_id=row["task_id"], attempt=row["attempt"],
                    device_id=row["device_id"])


class ClockWatch:
    """Notices the wall clock jumping forward: every time in the database
    is the wall clock's, and after a jump of an hour the tasks running and
    the devices heard from before it looked an hour older. Every running
    task past its timeout by then was failed (timed_out, for good, though
    its device ran it on), every lease expired, every device went offline.
    A jump is what the wall clock moved past the monotonic one; the times
    written before it (no later than the wall clock then) are moved with
    it, so that durations stay what they were. (Backward, nothing moves:
    what is overdue is only found later.)"""

    def __init__(self):
        self.last = None

    def jump(self, wall, monotonic):
        """Seconds the wall clock jumped forward since the last look, or 0."""
        last, self.last = self.last, (wall, monotonic)
        if last is None:
            return 0.0
        moved = (wall - last[0]) - (monotonic - last[1])
        return moved if moved > CLOCK_JUMP_SECONDS else 0.0


def move_past_jump(connection, log, now, jump):
    """Move the times written before a forward jump of `jump` seconds (the
    wall clock read `now - jump` or less then) by as much."""
    before = now - jump
    with db.write(connection):
        for column in ("assigned_at", "started_at"):
            connection.execute(
                "UPDATE tasks SET %s = %s + :jump WHERE %s AND %s <= :before"
                % (column, column, db.ACTIVE_SQL, column), {"jump": jump, "before": before})
        # A lease (a time to come) runs out with the jump only if it ends before now.
        connection.execute("UPDATE tasks SET lease_expires = lease_expires + :jump WHERE %s"
                           " AND lease_expires < :now" % db.ACTIVE_SQL,
                           {"jump": jump, "now": now})
        for column in ("last_seen", "disconnected_at"):
            connection.execute("UPDATE devices SET %s = %s + :jump WHERE %s <= :before"
                               % (column, column, column), {"jump": jump, "before": before})
        connection.execute("UPDATE devices SET held_until = held_until + :jump"
                           " WHERE held_until > :before AND held_until < :now",
                           {"jump": jump, "before": before, "now": now})
    log.warning("clock_jumped", seconds=round(jump, 3))


def prune(connection, config, now):
    """Keep about `heartbeat_history` heartbeats per device."""
    devices.prune_heartbeats(connection,
                             now - config.heartbeat_history * config.heartbeat_interval)


class WalKeeper:
    """Checkpoints the write-ahead log when another program has committed
    since the last look: the programs on a task's way leave that to us
    (db.WAL_BACKSTOP_PAGES). Once a sweep, not more often: the write that
    starts the log over holds the write lock while the disk syncs (~1-3 ms),
    and a program that wants to commit meanwhile sleeps a millisecond or
    more, so each look costs some task that much with some likelihood."""

    def __init__(self, connection):
        self.connection = connection
        self.seen = None

    def look(self):
        """(frames in the log, frames copied), or None when nothing changed."""
        version = db.data_version(self.connection)
        if version == self.seen:
            return None
        self.seen = version
        return db.checkpoint(self.connection)


def run(config, log, should_stop):
    connection = db.open_database(config.db_path)
    log.info("reaper_started", offline_timeout=config.offline_timeout,
             disconnect_grace=config.disconnect_grace)
    log_limited = throttle.LimitedLog(log)
    keeper = WalKeeper(connection)
    clock = ClockWatch()
    started = time.time()
    next_prune = 0.0
    while not should_stop():
        now = time.time()
        try:
            jump = clock.jump(now, time.monotonic())
            if jump:
                move_past_jump(connection, log, now, jump)
            sweep(connection, config, log, now, log_limited)
            # By the monotonic clock: after the wall clock stepped back a
            # day, the minute's upkeep (history, alerts, retention) waited a day.
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_INTERVAL
                prune(connection, config, now)
                housekeeping.every_minute(connection, config, log, now, started)
        except Exception as e:     # the next sweep comes as usual
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            log_limited("error", "sweep_failed", "sweep", error=repr(e)[:500])
        try:
            keeper.look()
        except Exception as e:     # a full or failing disk: the next look tries again
            log_limited("error", "checkpoint_failed", "checkpoint", error=repr(e)[:500])
        should_stop.pause(config.reaper_interval)


def main():
    program.serve("rc-reaper", run)


if __name__ == "__main__":
    main()
