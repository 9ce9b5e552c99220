"""A running task's output so far (`rc tail`, GET /api/v1/tasks/ID/output).

A task's stdout and stderr reach the main node with its result; while it
runs they stay on the device. Someone who wants them sooner watches the
task: rc-web writes `watched_until` in its task_tails row (POST
/api/v1/tasks/ID/watch); rc-server reads the watches about once a second and
sends `task_watch` to the device running the attempt; the worker then sends
`task_output` every TAIL_INTERVAL while the watch lasts, with the bytes
each stream added (at most TAIL_BYTES of them, the latest); rc-server keeps
the last TAIL_CHARS characters of each stream here. Nothing is sent for a
task nobody watches. docs/protocol.md, "Output so far"."""
from rc import db
from rc.states import ACTIVE_STATES, TAIL_BYTES, TERMINAL_STATES

WATCH_SECONDS = 60.0        # a watch's length when none is asked
WATCH_MAX_SECONDS = 600.0   # ... and the longest one
WATCH_REFRESH = 15.0        # a watch asked again with more than its length less this left: unwritten
TAIL_CHARS = TAIL_BYTES     # characters kept of each stream (the worker sends at most TAIL_BYTES bytes)
WRITE_GAP = 0.5             # seconds between two writes of a stream (a worker: one a second)
STREAMS = ("stdout", "stderr")


def watch(connection, task_id, seconds, now):
    """Someone wants the task's output as it comes, for `seconds` from now
    (written only when that moves the watch's end by WATCH_REFRESH or more:
    a watcher asking every few seconds costs a write every WATCH_REFRESH).
    The watch's end; None when the task is not running or assigned."""
    if connection.execute("SELECT 1 FROM tasks WHERE task_id = ? AND state IN (%s)"
                          % db.sql_list(ACTIVE_STATES), (task_id,)).fetchone() is None:
        return None
    until = now + max(1.0, min(float(seconds), WATCH_MAX_SECONDS))
    connection.execute(
        "INSERT INTO task_tails(task_id, watched_until) VALUES (?, ?)"
        " ON CONFLICT(task_id) DO UPDATE SET watched_until = excluded.watched_until"
        " WHERE coalesce(watched_until, 0) < excluded.watched_until - ?",
        (task_id, until, min(WATCH_REFRESH, until - now - 1.0)))
    return connection.execute("SELECT watched_until FROM task_tails WHERE task_id = ?",
                              (task_id,)).fetchone()[0]


def watched(connection, now):
    """(task id, attempt, device id, watched until, state) of every active
    task watched now."""
    return connection.execute(
        "SELECT w.task_id, t.attempt, t.device_id, w.watched_until, t.state"
        " FROM task_tails w JOIN tasks t ON t.task_id = w.task_id"
        " WHERE w.watched_until > ? AND t.state IN (%s) AND t.device_id IS NOT NULL"
        % db.sql_list(ACTIVE_STATES), (now,)).fetchall()


def store(connection, task_id, attempt, device_id, stream, start, end, data, now):
    """What the device running the attempt says `stream` held from byte
    `start` to byte `end`: added to what was kept when it follows on from
    it, else in its place; the last TAIL_CHARS characters kept. False when
    the device does not hold that attempt (any more)."""
    if stream not in STREAMS:
        raise ValueError("stream must be one of %s" % ", ".join(STREAMS))
    row = connection.execute(
        "SELECT w.attempt, w.%s, w.%s_end FROM task_tails w JOIN tasks t"
        " ON t.task_id = w.task_id WHERE w.task_id = ? AND t.attempt = ? AND t.device_id = ?"
        " AND t.state IN (%s)" % (stream, stream, db.sql_list(ACTIVE_STATES)),
        (task_id, attempt, device_id)).fetchone()
    if row is None:
        return False
    same = row[0] == attempt
    kept, kept_end = (row[1], row[2]) if same else ("", 0)
    text = (kept + data if start == kept_end else data)[-TAIL_CHARS:]
    # A new attempt: the last one's other stream is not its own either.
    other = "" if same else ", {0} = '', {0}_end = 0".format(
        STREAMS[1 - STREAMS.index(stream)])
    connection.execute("UPDATE task_tails SET attempt = ?, %s = ?, %s_end = ?, updated_at = ?%s"
                       " WHERE task_id = ?" % (stream, stream, other),
                       (attempt, text, end, now, task_id))
    return True


def merged(held, new):
    """Two task_output frames of one stream as one (throttle.Spaced's merge:
    rc-server writes a stream at most every WRITE_GAP): (sender, start, end,
    text), the second added to the first when it follows on from it and
    comes from the same connection, else in its place, as store() keeps them."""
    if new[0] is held[0] and new[1] == held[2]:
        return held[0], held[1], new[2], (held[3] + new[3])[-TAIL_CHARS:]
    return new


def forget_ended(connection):
    """Delete the rows of tasks that have ended (rc-reaper's upkeep, once a
    minute): output() reads their result now, and a row holds up to
    TAIL_CHARS characters of each stream, which would stay until the task
    is pruned (task_retention, 30 days). How many."""
    with db.write(connection):
        return connection.execute(
            "DELETE FROM task_tails WHERE task_id IN (SELECT w.task_id FROM task_tails w"
            " JOIN tasks t ON t.task_id = w.task_id WHERE t.state IN (%s))"
            % db.sql_list(TERMINAL_STATES)).rowcount


def output(connection, task_id):
    """The record GET /api/v1/tasks/ID/output answers: what the device sent
    so far while the task runs, the result's own output and stderr once it
    has ended; None for no such task."""
    task = connection.execute("SELECT task_id, state, attempt, result, finished_at FROM tasks"
                              " WHERE task_id = ?", (task_id,)).fetchone()
    if task is None:
        return None
    record = {"task_id": task_id, "state": task["state"], "attempt": task["attempt"],
              "live": task["state"] in ACTIVE_STATES}
    if record["live"]:
        row = connection.execute("SELECT * FROM task_tails WHERE task_id = ?",
                                 (task_id,)).fetchone()
        own = row is not None and row["attempt"] == task["attempt"]
        for stream in STREAMS:
            record[stream] = row[stream] if own else ""
            record[stream + "_end"] = row[stream + "_end"] if own else 0
        record["watched_until"] = row["watched_until"] if row else None
        record["updated_at"] = row["updated_at"] if own else None
        return record
    result = db.loads(task["result"], {})
    for stream, name in (("stdout", "output"), ("stderr", "stderr")):
        text = result.get(name) if isinstance(result, dict) else None
        record[stream] = text if isinstance(text, str) else ""
        record[stream + "_end"] = len(record[stream].encode("utf-8", "replace"))
    record["watched_until"], record["updated_at"] = None, task["finished_at"]
    return record
