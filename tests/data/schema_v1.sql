-- Schema version 1 (db.MIGRATIONS[0]), frozen; see tests/schema_fixture.py.

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

CREATE TABLE task_groups (
        group_id      INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at    REAL NOT NULL,
        task_type     TEXT NOT NULL,
        payload       TEXT NOT NULL,
        requirements  TEXT NOT NULL DEFAULT '{}',
        options       TEXT NOT NULL DEFAULT '{}',
        include_new   INTEGER NOT NULL DEFAULT 0   -- devices joining later get one too
    );

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

CREATE INDEX tasks_queue ON tasks(priority DESC, task_id)
        WHERE state = 'queued';

CREATE INDEX tasks_backoff ON tasks(not_before) WHERE state = 'queued';

CREATE INDEX tasks_active ON tasks(device_id, state)
        WHERE state IN ('assigned', 'running');

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

CREATE TRIGGER task_created AFTER INSERT ON tasks BEGIN
        INSERT INTO task_events(task_id, time, attempt, state, device_id, reason)
        VALUES (NEW.task_id, NEW.created_at, NEW.attempt, NEW.state,
                NEW.device_id, NEW.reason);
    END;

CREATE TRIGGER task_state_changed AFTER UPDATE OF state, attempt ON tasks
    WHEN NEW.state != OLD.state OR NEW.attempt != OLD.attempt BEGIN
        INSERT INTO task_events(task_id, time, attempt, state, device_id, reason)
        VALUES (NEW.task_id, ((julianday('now') - 2440587.5) * 86400.0), NEW.attempt, NEW.state,
                NEW.device_id, NEW.reason);
    END;

CREATE TRIGGER task_terminal_is_final BEFORE UPDATE OF state, attempt ON tasks
    WHEN OLD.state IN ('completed', 'failed', 'timed_out', 'cancelled')
         AND (NEW.state != OLD.state OR NEW.attempt != OLD.attempt) BEGIN
        SELECT RAISE(ABORT, 'a finished task cannot change state');
    END;

CREATE TABLE task_dependencies (
        task_id     INTEGER NOT NULL REFERENCES tasks(task_id),
        depends_on  INTEGER NOT NULL REFERENCES tasks(task_id),
        PRIMARY KEY (task_id, depends_on)
    ) WITHOUT ROWID;

CREATE INDEX task_dependents ON task_dependencies(depends_on);

CREATE TRIGGER dependency_did_not_complete AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN ('failed', 'timed_out', 'cancelled') AND OLD.state NOT IN ('completed', 'failed', 'timed_out', 'cancelled') BEGIN
        UPDATE tasks SET state = 'failed', finished_at = ((julianday('now') - 2440587.5) * 86400.0),
               error = 'task ' || NEW.task_id || ' it depends on ended ' || NEW.state,
               reason = 'dependency ' || NEW.task_id || ' ' || NEW.state
        WHERE state = 'queued' AND task_id IN
              (SELECT task_id FROM task_dependencies WHERE depends_on = NEW.task_id);
    END;

CREATE TABLE counters (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL DEFAULT 0
    );

CREATE TRIGGER task_finished_count AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN ('completed', 'failed', 'timed_out', 'cancelled') AND OLD.state NOT IN ('completed', 'failed', 'timed_out', 'cancelled') BEGIN
        INSERT INTO counters(name, value) VALUES ('tasks_' || NEW.state, 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
    END;

