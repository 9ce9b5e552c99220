"""Housekeeping the reaper does once a minute: finished tasks past
`task_retention` are deleted with their events, then the groups and maps
left without a task and the request keys of submits past an hour
(lib/rc/tasks.py), what was kept of ended tasks' output so far
(lib/rc/tails.py), leftover temporary files are
removed, stored files past `files_retention_days` are deleted
(lib/rc/files.py), rc-cli.log is rotated, and the write-ahead log is truncated when it
has grown past `wal_checkpoint_bytes` (the dashboard's readers keep SQLite
from recycling it on its own under steady load).
"""
import glob
import os
import time

from rc import alerts, db, files, stats, tails, tasks
from rc.log import shift_backups
from rc.states import TERMINAL_STATES

PRUNE_CHUNK = 500            # tasks deleted per transaction, so writers never wait long
CLI_LOG_MAX_BYTES = 10 * 1024 * 1024   # rc-cli.log is rotated past this, like the others
CLI_LOG_BACKUPS = 5
CLI_LOG = "rc-cli.log"
TEMPORARY_PATTERNS = ("tmp/*", "*.partial", "*.new", "db/*.partial")


def sweep(connection, config, log, now):
    """Everything below, once; returns what it did (for the log and tests)."""
    done = {"tasks_pruned": prune_tasks(connection, config.task_retention, now),
            "groups_pruned": prune_groups(connection, config.task_retention, now),
            "request_keys_forgotten": tasks.forget_request_keys(connection, now),
            "task_tails_forgotten": tails.forget_ended(connection),
            "temp_files_removed": clean_temp(config.home, config.temp_file_age, now),
            "cli_log_rotated": rotate_cli_log(config.log_dir),
            "files_removed": files.sweep(connection, config, now)}
    done.update(checkpoint(connection, config.wal_checkpoint_bytes))
    if done["tasks_pruned"] or done["groups_pruned"] or done["temp_files_removed"] \
            or done["wal_checkpointed"] or done["files_removed"]:
        log.info("housekeeping", **done)
    return done


def prune_tasks(connection, retention, now):
    """Delete tasks that finished more than `retention` seconds ago, with
    their events and dependency links; 0 keeps them for ever."""
    if not retention:
        return 0

    def delete(ids, marks):
        connection.execute("DELETE FROM task_dependencies WHERE task_id IN (%s)"
                           " OR depends_on IN (%s)" % (marks, marks), ids + ids)
        # Their files' rows too, by their key: the file store's sweep no
        # longer reads every row to find those of pruned tasks.
        connection.execute("DELETE FROM task_files WHERE task_id IN (%s)" % marks, ids)
        connection.execute("DELETE FROM task_events WHERE task_id IN (%s)" % marks, ids)
        connection.execute("DELETE FROM task_tails WHERE task_id IN (%s)" % marks, ids)
        connection.execute("DELETE FROM tasks WHERE task_id IN (%s)" % marks, ids)
    # Oldest first, in the order of the tasks_finished index: ordered by
    # task_id, SQLite walks the whole table (inside the write transaction).
    return delete_in_chunks(
        connection, "SELECT task_id FROM tasks WHERE finished_at < ? AND state IN (%s)"
        " ORDER BY finished_at" % db.sql_list(TERMINAL_STATES), now - retention, delete)


def prune_groups(connection, retention, now):
    """Delete task groups made more than `retention` seconds ago that no
    task is left in (pruned above, or a map stopped before it queued any),
    with a map's rows. A group devices that join later still get a task
    from (include_new) stays, tasks or not; 0 keeps them for ever."""
    if not retention:
        return 0

    def delete(ids, marks):
        for table in ("map_jobs", "maps", "task_groups"):
            connection.execute("DELETE FROM %s WHERE group_id IN (%s)" % (table, marks), ids)
    # Oldest first, in the order of the task_groups_by_age index: ordered by
    # group_id, SQLite read every group (inside the write transaction).
    return delete_in_chunks(
        connection, "SELECT group_id FROM task_groups g WHERE created_at < ? AND include_new = 0"
        " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.group_id = g.group_id)"
        " ORDER BY created_at", now - retention, delete)


def delete_in_chunks(connection, select, before, delete):
    """delete(ids, marks) the ids `select` finds (made or ended `before`),
    PRUNE_CHUNK per transaction; how many in all."""
    total = 0
    while True:
        started = time.monotonic()
        with db.write(connection):
            ids = [row[0] for row in connection.execute(select + " LIMIT ?",
                                                        (before, PRUNE_CHUNK))]
            if ids:
                delete(ids, ",".join("?" * len(ids)))
        total += len(ids)
        if len(ids) < PRUNE_CHUNK:
            return total
        db.give_way(time.monotonic() - started)
        db.checkpoint_past(connection)


def checkpoint(connection, limit):
    """Copy the WAL into the database and truncate it, when it is over `limit`."""
    size = db.wal_bytes(connection)
    if size <= limit:
        return {"wal_checkpointed": False, "wal_bytes": size}
    busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    after = db.wal_bytes(connection)
    return {"wal_checkpointed": not busy, "wal_bytes": after, "wal_bytes_before": size}


def clean_temp(home, age, now):
    """Files a crash may leave: var/tmp/*, half-written backups and tokens."""
    removed = 0
    for pattern in TEMPORARY_PATTERNS:
        for path in glob.glob(os.path.join(home, pattern)):
            try:
                if os.path.isfile(path) and os.path.getmtime(path) < now - age:
                    os.remove(path)
                    removed += 1
            except OSError:
                pass       # gone already, or not ours to remove
    return removed


def rotate_cli_log(log_dir, max_bytes=CLI_LOG_MAX_BYTES, backups=CLI_LOG_BACKUPS):
    """rc-cli.log has no supervisord to rotate it: rc-cli.log.1 … .5, as
    supervisord names its own backups."""
    path = os.path.join(log_dir, CLI_LOG)
    try:
        if os.path.getsize(path) <= max_bytes:
            return False
    except OSError:
        return False
    shift_backups(path, backups)
    return True



def every_minute(connection, config, log, now, started=None):
    """What rc-reaper runs once a minute, beside its sweeps: the minute's
    history row, the alert rules, then the housekeeping above. A failure
    here is logged, never allowed to stop the reaper's own work. `started`:
    when the reaper started (alerts count a device's absence from then)."""
    steps = (("stats", lambda: stats.record(connection, config, now)),
             ("alerts", lambda: alerts.evaluate(connection, config, log, now, started)),
             ("housekeeping", lambda: sweep(connection, config, log, now)))
    for name, step in steps:
        try:
            step()
        except Exception as e:     # the reaper's own sweeps matter more
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            log.error("upkeep_failed", step=name, error=repr(e))
