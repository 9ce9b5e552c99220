"""The one SQLite file every program shares: connections, schema, migrations.

Programs never talk to each other; they coordinate through committed rows.
Every connection comes from connect() so all of them use the same pragmas,
and every write goes through write(), a short `BEGIN IMMEDIATE` transaction,
or is one statement, which SQLite commits on its own (see write_statements).
"""
import contextlib
import os
import shutil
import sqlite3
import time

import orjson

from rc.states import ACTIVE_STATES, COMPLETED, FAILED, QUEUED, TERMINAL_STATES, TIMED_OUT

BUSY_TIMEOUT_MS = 10000   # how long a writer waits for another to finish
# Pages of write-ahead log past which a committing program copies it into
# the database itself (SQLite's own default is 1000). rc-reaper does that
# after each sweep instead (checkpoint() below): a checkpoint waits for the
# disk twice (1-7 ms, more on a busy disk), and in rc-web, rc-scheduler or
# rc-server that wait fell on the way of about one echo round trip in
# thirty. This is the backstop for when rc-reaper is not running (64 MiB).
WAL_BACKSTOP_PAGES = 16384
# Bytes of write-ahead log past which a run of short transactions copies it
# into the database before going on (checkpoint_past); half the upkeep's
# wal_checkpoint_bytes default, so a prune leaves nothing for it to truncate.
BATCH_WAL_BYTES = 8 * 1024 * 1024
# Seconds a long run of write transactions sleeps between two (give_way).
GIVE_WAY_MIN = 0.005
GIVE_WAY_MAX = 0.1
# The write that starts the log over after a checkpoint (see checkpoint()):
# one statement, so it commits on its own; it counts the checkpoints.
COUNT_CHECKPOINT = ("INSERT INTO counters(name, value) VALUES ('wal_checkpoints', 1)"
                    " ON CONFLICT(name) DO UPDATE SET value = value + 1")

# Seconds since the epoch with a fraction; SQLite 3.40 has no unixepoch('subsec').
NOW = "((julianday('now') - 2440587.5) * 86400.0)"


def sql_list(names):
    return ", ".join("'%s'" % name for name in names)


def sql_one_of(expression, names):
    """`expression IN (names)` as (expression = 'a' OR expression = 'b' ...):
    for an IN list of more than two constants SQLite builds a temporary
    index each time the statement runs, and in a trigger each time the
    trigger fires: ~18 us here (a trigger's WHEN on every state change of
    a task, two or three of them a change, cost a finish 93 us against 56)."""
    return "(%s)" % " OR ".join("%s = '%s'" % (expression, name) for name in names)


# Each entry upgrades the schema by one version; user_version counts them.
MIGRATIONS = [
    """
    CREATE TABLE devices (
        device_id      TEXT PRIMARY KEY,
        hostname       TEXT,
        platform       TEXT,
        architecture   TEXT,
        role           TEXT,
        cpu_cores      INTEGER,
        memory_gb      REAL,
        slots          INTEGER NOT NULL DEFAULT 1,
        capabilities   TEXT NOT NULL DEFAULT '[]',
        tags           TEXT NOT NULL DEFAULT '[]',
        task_types     TEXT NOT NULL DEFAULT '[]',
        profile        TEXT NOT NULL DEFAULT '{}',
        metrics        TEXT NOT NULL DEFAULT '{}',
        status         TEXT NOT NULL DEFAULT 'offline',
        connected      INTEGER NOT NULL DEFAULT 0,
        -- The worker's own policy (battery, heat, owner, quiet hours) may
        -- make it unavailable for new tasks while it stays online.
        available      INTEGER NOT NULL DEFAULT 1,
        unavailable_reason TEXT,
        -- Given at the first join; later connections prove it instead of
        -- the join token, so one device can be revoked alone.
        secret         TEXT,
        revoked        INTEGER NOT NULL DEFAULT 0,
        -- Set from the main node, kept across reconnections.
        drained        INTEGER NOT NULL DEFAULT 0,   -- no new tasks until resumed
        forgotten      INTEGER NOT NULL DEFAULT 0,   -- retired for good; history kept
        labels         TEXT NOT NULL DEFAULT '{}',
        role_override  TEXT,
        address        TEXT,
        protocol       INTEGER,
        registered_at  REAL NOT NULL,
        connected_at   REAL,
        disconnected_at REAL,
        last_seen      REAL NOT NULL
    );

    CREATE TABLE heartbeats (
        id         INTEGER PRIMARY KEY,
        device_id  TEXT NOT NULL REFERENCES devices(device_id),
        time       REAL NOT NULL,
        metrics    TEXT NOT NULL
    );
    CREATE INDEX heartbeats_by_device ON heartbeats(device_id, id);
    CREATE INDEX heartbeats_by_time ON heartbeats(time);

    CREATE TABLE tasks (
        task_id          INTEGER PRIMARY KEY AUTOINCREMENT,
        task_type        TEXT NOT NULL,
        payload          TEXT NOT NULL DEFAULT '{}',
        priority         INTEGER NOT NULL DEFAULT 1,
        requirements     TEXT NOT NULL DEFAULT '{}',
        timeout          REAL NOT NULL,
        max_retries      INTEGER NOT NULL,
        idempotency_key  TEXT UNIQUE,
        state            TEXT NOT NULL DEFAULT 'queued',
        attempt          INTEGER NOT NULL DEFAULT 1,
        device_id        TEXT REFERENCES devices(device_id),
        created_at       REAL NOT NULL,
        not_before       REAL NOT NULL DEFAULT 0,
        assigned_at      REAL,
        started_at       REAL,
        finished_at      REAL,
        result           TEXT,
        error            TEXT,
        reason           TEXT,
        progress         REAL,
        progress_message TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        -- The current attempt's lease: past it, the attempt is taken back.
        lease_expires    REAL,
        -- Attempts charged to the retry budget (a run that was lost or, when
        -- retry_on_failure is set, that failed), and of those, how many
        -- ended with the device lost: the poison-pill count.
        retries_used     INTEGER NOT NULL DEFAULT 0,
        device_losses    INTEGER NOT NULL DEFAULT 0,
        retry_on_failure INTEGER NOT NULL DEFAULT 0,
        group_id         INTEGER REFERENCES task_groups(group_id)
    );
    CREATE INDEX tasks_by_group ON tasks(group_id) WHERE group_id IS NOT NULL;

    -- `rc submit --each`: one task per matching device, read as one.
    CREATE TABLE task_groups (
        group_id      INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at    REAL NOT NULL,
        task_type     TEXT NOT NULL,
        payload       TEXT NOT NULL,
        requirements  TEXT NOT NULL DEFAULT '{}',
        options       TEXT NOT NULL DEFAULT '{}',
        include_new   INTEGER NOT NULL DEFAULT 0   -- devices joining later get one too
    );

    -- Control messages broadcast to workers, and each worker's answer.
    CREATE TABLE controls (
        control_id    INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at    REAL NOT NULL,
        command       TEXT NOT NULL,
        targets       TEXT NOT NULL DEFAULT '{}'   -- requirements the devices must meet
    );
    CREATE TABLE control_acks (
        control_id    INTEGER NOT NULL REFERENCES controls(control_id),
        device_id     TEXT NOT NULL,
        time          REAL NOT NULL,
        ok            INTEGER NOT NULL,
        detail        TEXT,
        PRIMARY KEY (control_id, device_id)
    ) WITHOUT ROWID;
    -- The scheduler's queue, in the order it serves it.
    CREATE INDEX tasks_queue ON tasks(priority DESC, task_id)
        WHERE state = 'queued';
    -- When the next retry's backoff ends, for the scheduler's wake-up.
    CREATE INDEX tasks_backoff ON tasks(not_before) WHERE state = 'queued';
    -- What each device holds, for slots and for reassignment.
    CREATE INDEX tasks_active ON tasks(device_id, state)
        WHERE state IN (%(active)s);

    CREATE TABLE task_events (
        id         INTEGER PRIMARY KEY,
        task_id    INTEGER NOT NULL REFERENCES tasks(task_id),
        time       REAL NOT NULL,
        attempt    INTEGER NOT NULL,
        state      TEXT NOT NULL,
        device_id  TEXT,
        reason     TEXT
    );
    CREATE INDEX task_events_by_task ON task_events(task_id, id);

    -- Every state change is an event, whoever makes it.
    CREATE TRIGGER task_created AFTER INSERT ON tasks BEGIN
        INSERT INTO task_events(task_id, time, attempt, state, device_id, reason)
        VALUES (NEW.task_id, NEW.created_at, NEW.attempt, NEW.state,
                NEW.device_id, NEW.reason);
    END;
    CREATE TRIGGER task_state_changed AFTER UPDATE OF state, attempt ON tasks
    WHEN NEW.state != OLD.state OR NEW.attempt != OLD.attempt BEGIN
        INSERT INTO task_events(task_id, time, attempt, state, device_id, reason)
        VALUES (NEW.task_id, %(now)s, NEW.attempt, NEW.state,
                NEW.device_id, NEW.reason);
    END;
    -- A terminal state never changes again, whatever code tries.
    CREATE TRIGGER task_terminal_is_final BEFORE UPDATE OF state, attempt ON tasks
    WHEN OLD.state IN (%(terminal)s)
         AND (NEW.state != OLD.state OR NEW.attempt != OLD.attempt) BEGIN
        SELECT RAISE(ABORT, 'a finished task cannot change state');
    END;

    -- A task waits for the tasks it depends on; their failure is its own
    -- (the trigger as migration 22 has it, for chains of any depth).
    CREATE TABLE task_dependencies (
        task_id     INTEGER NOT NULL REFERENCES tasks(task_id),
        depends_on  INTEGER NOT NULL REFERENCES tasks(task_id),
        PRIMARY KEY (task_id, depends_on)
    ) WITHOUT ROWID;
    CREATE INDEX task_dependents ON task_dependencies(depends_on);
    CREATE TRIGGER dependency_did_not_complete AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN (%(unsuccessful)s) AND OLD.state NOT IN (%(terminal)s) BEGIN
        UPDATE tasks SET state = 'failed', finished_at = %(now)s,
               error = 'task ' || NEW.task_id || ' it depends on ended ' || NEW.state,
               reason = 'dependency ' || NEW.task_id || ' ' || NEW.state
        WHERE state = 'queued' AND task_id IN
              (SELECT task_id FROM task_dependencies WHERE depends_on = NEW.task_id);
    END;

    -- Monotonic counters for /text/metrics, kept across restarts.
    CREATE TABLE counters (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL DEFAULT 0
    );
    CREATE TRIGGER task_finished_count AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN (%(terminal)s) AND OLD.state NOT IN (%(terminal)s) BEGIN
        INSERT INTO counters(name, value) VALUES ('tasks_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
    END;
    """ % {"active": sql_list(ACTIVE_STATES), "terminal": sql_list(TERMINAL_STATES),
           "unsuccessful": sql_list([s for s in TERMINAL_STATES if s != COMPLETED]), "now": NOW},
    # 2: operations (lib/rc/stats.py, alerts.py, health.py).
    """
    -- The cluster minute by minute, kept for stats_history minutes.
    CREATE TABLE stats_minutes (
        minute          INTEGER PRIMARY KEY,   -- its start, seconds since the epoch
        submitted       INTEGER NOT NULL DEFAULT 0,
        completed       INTEGER NOT NULL DEFAULT 0,
        failed          INTEGER NOT NULL DEFAULT 0,   -- failed or timed out
        cancelled       INTEGER NOT NULL DEFAULT 0,
        duration_mean   REAL,       -- seconds from start to result of those finished
        duration_max    REAL,
        wait_mean       REAL,       -- seconds from submit to start of those finished
        queue_length    INTEGER,    -- at the end of the minute
        running         INTEGER,
        devices_online  INTEGER,
        devices_total   INTEGER,
        slots           INTEGER,
        slots_busy      INTEGER
    );
    -- When each alert last fired, for its cooldown across restarts.
    CREATE TABLE alert_state (
        key       TEXT PRIMARY KEY,
        fired_at  REAL NOT NULL,
        message   TEXT
    ) WITHOUT ROWID;
    -- `rc health` proves the database takes writes by writing this row.
    CREATE TABLE health_probe (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        time  REAL NOT NULL
    );
    """,
    # 3: whether any task of some types is queued, without walking the queue
    # (lib/rc/scheduler.py).
    """
    CREATE INDEX tasks_queued_types ON tasks(task_type) WHERE state = 'queued';
    """,
    # 4: revoked devices still connected, which rc-server looks for each time
    # it wakes (lib/rc/server.py), found without reading every device.
    """
    CREATE INDEX devices_revoked ON devices(connected) WHERE revoked = 1;
    """,
    # 5: device secrets sealed with var/device_key, never in clear
    # (lib/rc/device_secrets.py). devices.secret, which held them in clear,
    # stays NULL from now on: sealing needs the key file, so state_dir.init and
    # rc-server's start seal what an older version left there, not this entry.
    """
    ALTER TABLE devices ADD COLUMN sealed_secret TEXT;
    -- However a device is shut out (rc revoke, rc forget), its secret goes.
    CREATE TRIGGER device_revoked_loses_its_secret AFTER UPDATE OF revoked ON devices
    WHEN NEW.revoked = 1 BEGIN
        UPDATE devices SET secret = NULL, sealed_secret = NULL
        WHERE device_id = NEW.device_id;
    END;
    """,
    # 6: a device's slots are what it claims cut to what the operator allows
    # (max_device_slots, or `rc slots DEVICE N` for that device; lib/rc/devices.py).
    """
    ALTER TABLE devices ADD COLUMN slots_claimed INTEGER;
    ALTER TABLE devices ADD COLUMN slots_limit INTEGER;
    """,
    # 7: when rc-server last found a connected device unresponsive (it answered
    # no ping and took no assignment in time); NULL while it answers. The
    # scheduler gives a suspect device nothing (lib/rc/server.py, Liveness).
    """
    ALTER TABLE devices ADD COLUMN suspect_since REAL;
    """,
    # 8: the file store (lib/rc/files.py): blobs by SHA-256 under var/files,
    # what each task reads and leaves, and what each device holds in its
    # cache, so the scheduler can send a task where its inputs already are.
    # (IF NOT EXISTS: a test that takes a database back to an older schema
    # drops columns and triggers, not tables.)
    """
    CREATE TABLE IF NOT EXISTS files (
        sha256        TEXT PRIMARY KEY,    -- 64 lower-case hex digits; the blob's name
        size          INTEGER NOT NULL,    -- bytes
        created_at    REAL NOT NULL,
        last_used_at  REAL NOT NULL        -- stored, or named by a submit
    ) WITHOUT ROWID;
    -- No foreign key to tasks: pruning a task leaves its rows to the file
    -- store's own sweep, which drops rows whose task is gone.
    CREATE TABLE IF NOT EXISTS task_files (
        task_id     INTEGER NOT NULL,
        attempt     INTEGER NOT NULL,      -- 0 for inputs: every attempt reads them
        kind        TEXT NOT NULL,         -- input, output, stream or checkpoint
        name        TEXT NOT NULL,         -- path in the task directory, or .rc/...
        sha256      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (task_id, kind, name, attempt)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS task_files_by_sha256 ON task_files(sha256);
    -- The retention sweep looks only at files unused for a while.
    CREATE INDEX IF NOT EXISTS files_by_last_use ON files(last_used_at);
    ALTER TABLE devices ADD COLUMN cached_files TEXT NOT NULL DEFAULT '[]';
    """,
    # 9: workers' own logs kept on the main node, a ring of the latest lines
    # per device (lib/rc/device_logs.py); when a device's figures were taken,
    # and until when someone watches it (it then reports every
    # watch_report_interval; lib/rc/server.py).
    """
    CREATE TABLE IF NOT EXISTS device_logs (
        id           INTEGER PRIMARY KEY,
        device_id    TEXT NOT NULL,
        time         REAL NOT NULL,     -- when the device logged it, by its clock
        received_at  REAL NOT NULL,     -- when rc-server stored it
        level        TEXT NOT NULL,     -- debug, info, warning or error
        event        TEXT NOT NULL,     -- snake_case, as in every log line
        message      TEXT NOT NULL DEFAULT '',
        task_id      INTEGER
    );
    CREATE INDEX IF NOT EXISTS device_logs_by_device ON device_logs(device_id, id);
    ALTER TABLE devices ADD COLUMN figures_at REAL;
    ALTER TABLE devices ADD COLUMN watched_until REAL;
    CREATE INDEX IF NOT EXISTS devices_watched ON devices(watched_until)
        WHERE watched_until IS NOT NULL;
    """,
    # 10: recurring tasks and services (lib/rc/schedules.py, lib/rc/services.py),
    # fired and kept alive by rc-scheduler.
    """
    CREATE TABLE IF NOT EXISTS schedules (
        name           TEXT PRIMARY KEY,
        cron           TEXT NOT NULL,      -- five fields, @daily and the like, or @every 10m
        time_zone      TEXT,               -- an IANA name; NULL: the main node's local time
        task           TEXT NOT NULL,      -- JSON: task_type, payload, requirements, options
        each           INTEGER NOT NULL DEFAULT 0,   -- one task on every matching device
        allow_overlap  INTEGER NOT NULL DEFAULT 0,
        paused         INTEGER NOT NULL DEFAULT 0,
        created_at     REAL NOT NULL,
        next_fire      REAL NOT NULL,      -- seconds since the epoch
        last_fired     REAL,               -- the firing time last handled (not when)
        last_run_at    REAL,               -- when it last submitted or skipped
        last_task_id   INTEGER,
        last_group_id  INTEGER,
        last_outcome   TEXT                -- task N, group N, skipped: why, not submitted: why
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS services (
        name        TEXT PRIMARY KEY,
        task        TEXT NOT NULL,         -- JSON, as schedules.task
        each        INTEGER NOT NULL DEFAULT 0,
        stopped     INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL
    ) WITHOUT ROWID;
    -- Where a service runs: place '' for a plain service, a device id for --each.
    CREATE TABLE IF NOT EXISTS service_runs (
        name           TEXT NOT NULL,
        place          TEXT NOT NULL,
        task_id        INTEGER,            -- the current (or last) run's task
        ended_task_id  INTEGER,            -- the last run whose end was taken into account
        runs           INTEGER NOT NULL DEFAULT 0,
        quick_exits    INTEGER NOT NULL DEFAULT 0,   -- runs in a row shorter than
                                                     -- service_quick_exit
        restart_at     REAL NOT NULL DEFAULT 0,      -- the next run starts no sooner
        last_error     TEXT,
        last_exit_at   REAL,
        note           TEXT,               -- paused: why (the device became unavailable)
        PRIMARY KEY (name, place)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS schedules_due ON schedules(next_fire) WHERE paused = 0;
    """,
    # 11: `rc map` (lib/rc/map_cli.py): a map is a task group with a row in
    # maps, and one job per input with the task that last ran it, so
    # `rc map --resume` re-runs only the jobs whose task did not complete.
    # No foreign key to tasks: pruning old tasks must not trip over a job.
    """
    CREATE TABLE IF NOT EXISTS maps (
        group_id    INTEGER PRIMARY KEY REFERENCES task_groups(group_id),
        inputs      INTEGER NOT NULL,      -- how many jobs
        into_dir    TEXT                   -- where --output files go (absolute), if any
    );
    CREATE TABLE IF NOT EXISTS map_jobs (
        group_id    INTEGER NOT NULL,
        job         INTEGER NOT NULL,      -- 1-based, in input order: {#}
        input       TEXT NOT NULL,         -- the value, or the local path with --files
        blob        TEXT,                  -- --files: the input as the task gets it (JSON)
        task_id     INTEGER,               -- the task that last ran it; NULL before submit
        PRIMARY KEY (group_id, job)
    ) WITHOUT ROWID;
    """,
    # 12: the file store's bytes in one row, kept by triggers, so that every
    # upload checks the quota without summing every blob (lib/rc/files.py).
    """
    CREATE TABLE IF NOT EXISTS files_usage (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        bytes  INTEGER NOT NULL            -- sum(files.size)
    );
    INSERT OR REPLACE INTO files_usage(id, bytes) SELECT 1, coalesce(sum(size), 0) FROM files;
    CREATE TRIGGER IF NOT EXISTS files_usage_added AFTER INSERT ON files BEGIN
        UPDATE files_usage SET bytes = bytes + new.size WHERE id = 1;
    END;
    CREATE TRIGGER IF NOT EXISTS files_usage_removed AFTER DELETE ON files BEGIN
        UPDATE files_usage SET bytes = bytes - old.size WHERE id = 1;
    END;
    CREATE TRIGGER IF NOT EXISTS files_usage_resized AFTER UPDATE OF size ON files BEGIN
        UPDATE files_usage SET bytes = bytes + new.size - old.size WHERE id = 1;
    END;
    """,
    # 13: finished tasks by when they finished, for the reaper's minute (the
    # failure_rate alert's window, task_retention's pruning): without it each
    # read the whole tasks table, millions of rows on a busy cluster, and
    # every heartbeat waited behind them.
    """
    CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at)
        WHERE finished_at IS NOT NULL;
    """,
    # 14: the rest of the reaper's minute at the cost of its answer, however
    # many tasks a busy day leaves (issue 7). Failed tasks by when they
    # ended, with their state so that counting reads only the index: the
    # failure_rate alert counts the failures in its window, then the
    # completed tasks only as far as the rate could still be over its
    # threshold (lib/rc/alerts.py); only failures are indexed, so a healthy
    # cluster's writes pay next to nothing for it. Groups that may go by
    # age, so that prune_groups reads no group that is still young
    # (lib/rc/housekeeping.py).
    """
    CREATE INDEX IF NOT EXISTS tasks_failures ON tasks(finished_at, state)
        WHERE state IN ('failed', 'timed_out');
    CREATE INDEX IF NOT EXISTS task_groups_by_age ON task_groups(created_at)
        WHERE include_new = 0;
    """,
    # 15: a graceful stop of rc-server promised a device's worker to hold its
    # tasks until this time (restart_hold); rc-reaper leaves the device, its
    # leases and its tasks alone until held_until + disconnect_grace
    # (lib/rc/server.py, Server.hold_devices; lib/rc/reaper.py). NULL: no hold.
    """
    ALTER TABLE devices ADD COLUMN held_until REAL;
    CREATE INDEX IF NOT EXISTS devices_held ON devices(held_until)
        WHERE held_until IS NOT NULL;
    """,
    # 16: what a submit with an Idempotency-Key header queued (POST
    # /api/v1/tasks), so that the same request sent again (its answer lost
    # to a restart of rc-web or a dropped connection) is answered with the
    # same tasks instead of queueing them twice; kept REQUEST_KEY_RETENTION
    # (lib/rc/tasks.py).
    """
    CREATE TABLE IF NOT EXISTS request_keys (
        key         TEXT PRIMARY KEY,
        task_ids    TEXT NOT NULL,
        group_id    INTEGER,
        created_at  REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS request_keys_by_age ON request_keys(created_at);
    """,
    # 17: finished tasks by state without reading them (rc status, /api/v1/status,
    # /text/status, /text/metrics and each look of the dashboard's overview):
    # counting every task the retention keeps, 500,000 after a month at
    # 17,000 a day, took 140-340 ms each time. Counter rows kept_<state> hold
    # how many tasks in that final state the table keeps, moved by the
    # trigger that already counts finishes (one row more on the same page:
    # a finish costs no page written more) and by the prune's deletes.
    # Unfinished tasks are counted through their partial indexes
    # (lib/rc/tasks.py, counts_by_state).
    """
    INSERT OR REPLACE INTO counters(name, value)
        SELECT 'kept_' || state, count(*) FROM tasks WHERE state IN (%(terminal)s)
        GROUP BY state;
    DROP TRIGGER IF EXISTS task_finished_count;
    CREATE TRIGGER task_finished_count AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN (%(terminal)s) AND OLD.state NOT IN (%(terminal)s) BEGIN
        INSERT INTO counters(name, value) VALUES ('tasks_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
        INSERT INTO counters(name, value) VALUES ('kept_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
    END;
    CREATE TRIGGER IF NOT EXISTS task_pruned_count AFTER DELETE ON tasks
    WHEN OLD.state IN (%(terminal)s) BEGIN
        UPDATE counters SET value = value - 1 WHERE name = 'kept_' || OLD.state;
    END;
    """ % {"terminal": sql_list(TERMINAL_STATES)},
    # 18: when `PRAGMA quick_check` last passed (lib/rc/health.py): it reads
    # the whole database, 0.4-0.9 s for a year's 250 MB, and `rc health`
    # (Docker's HEALTHCHECK each minute, cron) and the open /health ran it
    # at every look.
    """
    ALTER TABLE health_probe ADD COLUMN integrity_ok_at REAL;
    """,
    # 19: the SHA-256 of the request an Idempotency-Key came with (its body
    # and ?group=), so that the key sent again with another request is
    # refused (422) rather than answered with the first one's tasks while
    # the new ones are never queued (a client reusing a key by mistake, two
    # clients choosing the same one). NULL (keys from before): not checked.
    """
    ALTER TABLE request_keys ADD COLUMN request_sha256 TEXT;
    """,
    # 20: a device's tasks, newest first (`rc tasks --device`, /api/v1/tasks?device=,
    # the dashboard's device view): without it the page walked the tasks back
    # from the newest until it had found enough of the device's, 20-60 ms at
    # 500,000 tasks (all of them for a device that ran none). Only tasks that
    # have been given to a device: a queued task costs its insert nothing more.
    """
    CREATE INDEX IF NOT EXISTS tasks_by_device ON tasks(device_id, task_id)
        WHERE device_id IS NOT NULL;
    """,
    # 21: a running task's output so far, for those someone watches (`rc tail`,
    # lib/rc/tails.py): until when it is watched, and the last characters of
    # each stream its device sent, with the byte each ends at. A row per
    # watched task, deleted once the task has ended (rc-reaper's upkeep).
    """
    CREATE TABLE IF NOT EXISTS task_tails (
        task_id        INTEGER PRIMARY KEY,
        watched_until  REAL,
        attempt        INTEGER,
        stdout         TEXT NOT NULL DEFAULT '',
        stdout_end     INTEGER NOT NULL DEFAULT 0,
        stderr         TEXT NOT NULL DEFAULT '',
        stderr_end     INTEGER NOT NULL DEFAULT 0,
        updated_at     REAL
    );
    CREATE INDEX IF NOT EXISTS task_tails_watched ON task_tails(watched_until);
    """,
    # 22: a failed task fails all the queued tasks behind it in one UPDATE,
    # found by a recursive query, rather than by the trigger firing again
    # for each layer: SQLite stops a trigger nested past 1,000 levels, and
    # the failure of the first of a chain of 1,001 tasks (a submit per
    # link, with the admin token) could not be written at all: that task
    # could be neither cancelled, failed nor timed out. The tasks it fails
    # do not fire it again (their reason says so); they name the task that
    # ended, which they depend on directly or through others.
    """
    DROP TRIGGER IF EXISTS dependency_did_not_complete;
    CREATE TRIGGER dependency_did_not_complete AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN (%(unsuccessful)s) AND OLD.state NOT IN (%(terminal)s)
         AND substr(coalesce(NEW.reason, ''), 1, 11) IS NOT 'dependency ' BEGIN
        UPDATE tasks SET state = 'failed', finished_at = %(now)s,
               error = 'task ' || NEW.task_id || ' it depends on ended ' || NEW.state,
               reason = 'dependency ' || NEW.task_id || ' ' || NEW.state
        WHERE state = 'queued' AND task_id IN (
            WITH RECURSIVE behind(task_id) AS (
                SELECT task_id FROM task_dependencies WHERE depends_on = NEW.task_id
                UNION
                SELECT d.task_id FROM task_dependencies d JOIN behind
                    ON d.depends_on = behind.task_id)
            SELECT task_id FROM behind);
    END;
    """ % {"terminal": sql_list(TERMINAL_STATES),
           "unsuccessful": sql_list([s for s in TERMINAL_STATES if s != COMPLETED]),
           "now": NOW},
    # 23: how many of the tasks a task depends on have not completed yet,
    # counted down by a trigger as each completes, and the scheduler's walk
    # through an index of the queued tasks that wait for none. It checked
    # each queued task's dependencies as it walked: with 100,000 tasks behind
    # one gate task (a map after its setup task) every pass read all of them,
    # 0.33-0.58 s of rc-scheduler's CPU, and a pass follows every submit and
    # result, so the rest of the queue crawled until the gate completed.
    """
    ALTER TABLE tasks ADD COLUMN unmet_dependencies INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET unmet_dependencies = (
        SELECT count(*) FROM task_dependencies d JOIN tasks p ON p.task_id = d.depends_on
        WHERE d.task_id = tasks.task_id AND p.state != '%(completed)s')
    WHERE state = 'queued' AND task_id IN (SELECT task_id FROM task_dependencies);
    CREATE TRIGGER IF NOT EXISTS dependency_completed AFTER UPDATE OF state ON tasks
    WHEN NEW.state = '%(completed)s' AND OLD.state != '%(completed)s' BEGIN
        UPDATE tasks SET unmet_dependencies = unmet_dependencies - 1
        WHERE state = 'queued' AND unmet_dependencies > 0 AND task_id IN
              (SELECT task_id FROM task_dependencies WHERE depends_on = NEW.task_id);
    END;
    CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(priority DESC, task_id)
        WHERE state = 'queued' AND unmet_dependencies = 0;
    """ % {"completed": COMPLETED},
    # 24: the devices that gave a task back without starting it (not_allowed,
    # handed_back while assigned), in a row: a JSON list, one entry a bounce,
    # cleared when an attempt starts. bounce_limit of them fail the task.
    """
    ALTER TABLE tasks ADD COLUMN bounced_by TEXT;
    """,
    # 25: the triggers that fire on each state change of a task, as they
    # were, but naming the states with sql_one_of() rather than IN lists:
    # SQLite built a temporary index for each IN list of three or four
    # states at each firing, three of them for an assignment and four for
    # a finish (one echo task's assignment and finish: 73 + 93 us of SQLite
    # CPU here, 62 + 53 without).
    """
    DROP TRIGGER IF EXISTS task_terminal_is_final;
    CREATE TRIGGER task_terminal_is_final BEFORE UPDATE OF state, attempt ON tasks
    WHEN %(old_terminal)s
         AND (NEW.state != OLD.state OR NEW.attempt != OLD.attempt) BEGIN
        SELECT RAISE(ABORT, 'a finished task cannot change state');
    END;
    DROP TRIGGER IF EXISTS dependency_did_not_complete;
    CREATE TRIGGER dependency_did_not_complete AFTER UPDATE OF state ON tasks
    WHEN %(new_unsuccessful)s AND NOT %(old_terminal)s
         AND substr(coalesce(NEW.reason, ''), 1, 11) IS NOT 'dependency ' BEGIN
        UPDATE tasks SET state = 'failed', finished_at = %(now)s,
               error = 'task ' || NEW.task_id || ' it depends on ended ' || NEW.state,
               reason = 'dependency ' || NEW.task_id || ' ' || NEW.state
        WHERE state = 'queued' AND task_id IN (
            WITH RECURSIVE behind(task_id) AS (
                SELECT task_id FROM task_dependencies WHERE depends_on = NEW.task_id
                UNION
                SELECT d.task_id FROM task_dependencies d JOIN behind
                    ON d.depends_on = behind.task_id)
            SELECT task_id FROM behind);
    END;
    DROP TRIGGER IF EXISTS task_finished_count;
    CREATE TRIGGER task_finished_count AFTER UPDATE OF state ON tasks
    WHEN %(new_terminal)s AND NOT %(old_terminal)s BEGIN
        INSERT INTO counters(name, value) VALUES ('tasks_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
        INSERT INTO counters(name, value) VALUES ('kept_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
    END;
    DROP TRIGGER IF EXISTS task_pruned_count;
    CREATE TRIGGER task_pruned_count AFTER DELETE ON tasks
    WHEN %(old_terminal)s BEGIN
        UPDATE counters SET value = value - 1 WHERE name = 'kept_' || OLD.state;
    END;
    """ % {"old_terminal": sql_one_of("OLD.state", TERMINAL_STATES),
           "new_terminal": sql_one_of("NEW.state", TERMINAL_STATES),
           "new_unsuccessful": sql_one_of("NEW.state",
                                          [s for s in TERMINAL_STATES if s != COMPLETED]),
           "now": NOW},

    # 26: task_events' ids never come again. Without AUTOINCREMENT an id is
    # the largest one plus 1, so pruning the newest events (a cluster idle
    # past task_retention) handed their ids to the next ones, and a result
    # stream or `rc map`, reading past the id it saw last, never saw them.
    # The table is made anew (SQLite cannot add AUTOINCREMENT); the triggers
    # that write it name it, so the rename leaves them be (legacy mode).
    """
    PRAGMA legacy_alter_table=ON;
    CREATE TABLE task_events_rising (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id    INTEGER NOT NULL REFERENCES tasks(task_id),
        time       REAL NOT NULL,
        attempt    INTEGER NOT NULL,
        state      TEXT NOT NULL,
        device_id  TEXT,
        reason     TEXT
    );
    INSERT INTO task_events_rising(id, task_id, time, attempt, state, device_id, reason)
        SELECT id, task_id, time, attempt, state, device_id, reason FROM task_events;
    DROP TABLE task_events;
    ALTER TABLE task_events_rising RENAME TO task_events;
    PRAGMA legacy_alter_table=OFF;
    CREATE INDEX task_events_by_task ON task_events(task_id, id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# SQLite uses a partial index only when the query names its condition
# literally, never through bound parameters: queries that look for queued or
# active tasks among many use these fragments.
QUEUED_SQL = "state = '%s'" % QUEUED
# Queued and waiting for no other task (the tasks_ready index's condition).
READY_SQL = QUEUED_SQL + " AND unmet_dependencies = 0"
ACTIVE_SQL = "state IN (%s)" % sql_list(ACTIVE_STATES)
FAILURES_SQL = "state IN (%s)" % sql_list((FAILED, TIMED_OUT))     # tasks_failures' tasks


def connect(path):
    """A connection with the pragmas every program uses.

    Autocommit mode (isolation_level=None): reads see the latest commit, and
    writes open their own transaction through write()."""
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000.0,
                                 isolation_level=None, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across a program crash in WAL mode; only a power cut
    # can lose the last commits, and those tasks are then re-run, not lost.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=%d" % BUSY_TIMEOUT_MS)
    connection.execute("PRAGMA foreign_keys=ON")
    # Triggers fire for the rows other triggers change (a failed task's
    # dependents, failed by dependency_did_not_complete, get their events
    # and counts); that trigger itself does not fire again for them.
    connection.execute("PRAGMA recursive_triggers=ON")
    connection.execute("PRAGMA wal_autocheckpoint=%d" % WAL_BACKSTOP_PAGES)
    return connection


def checkpoint(connection):
    """Copy the write-ahead log into the database, waiting for nobody
    (PASSIVE); when all of it was copied, start the log over with a write
    of our own. The first commit into a log started over waits for the disk
    (SQLite syncs the log's header before reusing it), and that wait is
    better ours than a task's. Returns (frames in the log, frames copied)."""
    _, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if 0 < frames == copied:
        connection.execute(COUNT_CHECKPOINT)
    return frames, copied


def wal_bytes(connection):
    """The size of the connection's write-ahead log (0 when there is none)."""
    try:
        return os.path.getsize(connection.execute("PRAGMA database_list").fetchone()[2] + "-wal")
    except OSError:
        return 0


def checkpoint_past(connection, limit=BATCH_WAL_BYTES):
    """checkpoint() once the log is past `limit` bytes, for a program that
    writes many short transactions in a row (the upkeep's prunes): without
    it, pruning a backlog (a month of tasks past a retention just lowered,
    or a reaper stopped for days) grew the log by every transaction's pages
    (72 MB for 50,000 tasks), and the minute's TRUNCATE that followed held
    every writer for 0.6 s while it copied them. The log starts over only
    when no other program commits meanwhile; the copying is done anyway, so
    the TRUNCATE has little left to copy (40-60 ms on a busy cluster)."""
    if wal_bytes(connection) > limit:
        checkpoint(connection)


def give_way(held):
    """Between two write transactions of a long run (the upkeep's prunes):
    sleep as long as the last one held the write lock (`held` seconds),
    GIVE_WAY_MIN at least, GIVE_WAY_MAX at most. A program that found the
    lock taken sleeps in SQLite's busy handler (up to 100 ms at a time) and
    looks again: a run that takes the lock again at once leaves it almost
    never free when it looks, and rc-server's writes waited 0.9 s behind
    the prune of a backlog, 101 transactions of a few milliseconds each."""
    time.sleep(min(max(held, GIVE_WAY_MIN), GIVE_WAY_MAX))


@contextlib.contextmanager
def write(connection):
    """One short write transaction: taken at once, committed or rolled back."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def write_statements(connection, count):
    """write() for `count` statements. A single statement is atomic on its
    own (autocommit, triggers included): leaving out BEGIN and COMMIT spares
    two trips through SQLite each time a task changes hands."""
    return write(connection) if count > 1 else contextlib.nullcontext(connection)


def open_database(path):
    """connect(), after creating the directory and upgrading the schema."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    connection = connect(path)
    migrate(connection)
    return connection


def migrate(connection):
    with write(connection):
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError("database schema %d is newer than this code (%d)"
                               % (version, SCHEMA_VERSION))
        for number in range(version, SCHEMA_VERSION):
            for statement in split_statements(MIGRATIONS[number]):
                connection.execute(statement)
            connection.execute("PRAGMA user_version=%d" % (number + 1))


def split_statements(script):
    """The statements of a migration, triggers kept whole (executescript
    would commit our transaction, so each runs on its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    return statements


def data_version(connection):
    """Changes when any other connection commits: the cheap way to wake up."""
    return connection.execute("PRAGMA data_version").fetchone()[0]


DISK_FULL_BYTES = 1048576       # free bytes under which a database error is put down to a full disk


def on_full_disk(error, db_path):
    """A database error said again, when the disk that holds the database
    is full, to say so; None otherwise. SQLite's word for a shared-memory
    file it could not make (the main node stopped) is "disk I/O error", and
    `make run` on a full disk said only that; rc-web said "Internal Server
    Error"."""
    directory = os.path.dirname(db_path)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if free >= DISK_FULL_BYTES:
        return None
    return ("%s: the disk that holds %s is full (%d bytes free); make room there and try"
            " again" % (error, directory, free))


def data_version_and(connection, columns, parameters=()):
    """(data_version, *columns) from one snapshot in one statement: a program
    that wakes to look saves a trip through SQLite on its first question."""
    return tuple(connection.execute("SELECT data_version, %s FROM pragma_data_version()"
                                    % columns, parameters).fetchone())


def dumps(value):
    return orjson.dumps(value).decode()


def loads(text, default=None):
    return default if text is None else orjson.loads(text)

