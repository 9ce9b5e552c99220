"""Workers' own logs on the main node: the warnings, errors and task events
each worker forwards in `device_log` messages (docs/protocol.md), kept as a
ring of the latest device_log_lines lines per device and read by `rc logs
--device ID` and GET /api/v1/devices/ID/logs.

A device's lines are limited twice: the worker limits what it sends, and
rc-server (Allowance) what it keeps from each device, whatever that device
sends; a message with a line of the wrong shape, or a field over its cap, is
refused whole (checked_lines), the connection stays. Fields it does not
know are left out, so a newer worker may send more."""
import re
import time

from rc.protocol import ProtocolError

LEVELS = ("debug", "info", "warning", "error")
MAX_LINES_PER_MESSAGE = 50   # lines one device_log may carry
MAX_EVENT_CHARS = 64         # an event name: snake_case
MAX_MESSAGE_CHARS = 500      # characters of a line's message (the worker cuts its own)
LATEST_TIME = 1e11           # seconds since the epoch past which a device's clock is junk
BURST_SECONDS = 60.0         # a device may send a minute of device_log_rate at once
TRIM_EVERY = 100             # lines kept from a device between two trims of its ring
DROPPED_EVENT = "log_lines_dropped"
EVENT_NAME = re.compile(r"\A[a-z0-9_]{1,%d}\Z" % MAX_EVENT_CHARS)
COLUMNS = "id, device_id, time, level, event, message, task_id"


def checked_lines(data):
    """The lines of a device_log's data as (time, level, event, message,
    task_id) tuples; ProtocolError naming the first thing wrong."""
    lines = data.get("lines")
    if not isinstance(lines, list):
        raise ProtocolError("lines must be a list")
    if len(lines) > MAX_LINES_PER_MESSAGE:
        raise ProtocolError("%d lines in one message, over %d"
                            % (len(lines), MAX_LINES_PER_MESSAGE))
    return [checked_line(line, n) for n, line in enumerate(lines)]


def checked_line(line, n):
    if not isinstance(line, dict):
        raise ProtocolError("lines[%d] must be an object" % n)
    logged_at = line.get("time")
    if isinstance(logged_at, bool) or not isinstance(logged_at, (int, float)) \
            or not 0 < logged_at < LATEST_TIME:
        raise ProtocolError("lines[%d].time must be seconds since the epoch" % n)
    level = line.get("level")
    if level not in LEVELS:
        raise ProtocolError("lines[%d].level must be one of %s" % (n, ", ".join(LEVELS)))
    event = line.get("event")
    if not isinstance(event, str) or not EVENT_NAME.match(event):
        raise ProtocolError("lines[%d].event must be 1-%d of [a-z0-9_]" % (n, MAX_EVENT_CHARS))
    message = line.get("message", "")
    if not isinstance(message, str) or len(message) > MAX_MESSAGE_CHARS:
        raise ProtocolError("lines[%d].message must be text of at most %d characters"
                            % (n, MAX_MESSAGE_CHARS))
    task_id = line.get("task_id")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)
                                or not 1 <= task_id <= 2 ** 62):
        raise ProtocolError("lines[%d].task_id must be a task id or null" % n)
    return (float(logged_at), level, event, message, task_id)


class Allowance:
    """What rc-server keeps of each device's lines: a token bucket per
    device id (not per connection, so reconnecting refills nothing) of
    `rate` lines a second and BURST_SECONDS of them at once. Lines over it
    are counted, and the count kept as one line once the device's lines fit
    again (or after BURST_SECONDS of a flood that does not stop)."""

    def __init__(self, rate):
        self.rate = rate
        self.burst = max(1.0, rate * BURST_SECONDS)
        self.buckets = {}      # device id -> Bucket

    def admit(self, device_id, lines, now=None):
        """(the lines to keep, whether the device's ring is due a trim)."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(device_id)
        if bucket is None:
            bucket = self.buckets[device_id] = Bucket(self.burst, now)
        bucket.fill(now, self.rate, self.burst)
        kept = []
        if bucket.dropped and bucket.tokens >= 1 and (
                bucket.tokens >= len(lines) + 1 or now - bucket.noted_at >= BURST_SECONDS):
            bucket.tokens -= 1
            bucket.noted_at = now
            kept.append((time.time(), "warning", DROPPED_EVENT, "%d lines from this device"
                         " over the main node's limit (device_log_rate %g a second) were"
                         " not kept" % (bucket.dropped, self.rate), None))
            bucket.dropped = 0
        allowed = min(len(lines), int(bucket.tokens))
        bucket.tokens -= allowed
        bucket.dropped += len(lines) - allowed
        kept.extend(lines[:allowed])
        bucket.since_trim += len(kept)
        trim = bucket.since_trim >= TRIM_EVERY
        if trim:
            bucket.since_trim = 0
        return kept, trim


class Bucket:
    """One device's allowance."""

    def __init__(self, tokens, now):
        self.tokens = tokens       # lines it may add now
        self.filled_at = now
        self.dropped = 0           # lines refused since the last count was kept
        self.noted_at = now        # when that count was last kept
        self.since_trim = 0        # lines kept since its ring was last trimmed

    def fill(self, now, rate, burst):
        self.tokens = min(burst, self.tokens + (now - self.filled_at) * rate)
        self.filled_at = now


# -- the database ------------------------------------------------------------------

def store(connection, device_id, lines, now, keep=None):
    """Add lines (inside the caller's transaction); with `keep`, delete all
    but the device's latest `keep`. A line's time is the device's word, but
    never later than its arrival: `rc logs --device` merges by time, and a
    line dated ahead would stay after the main node's later lines for ever."""
    connection.executemany(
        "INSERT INTO device_logs(device_id, time, received_at, level, event, message,"
        " task_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(device_id, min(line[0], now), now, line[1], line[2], line[3], line[4])
         for line in lines])
    if keep is not None:
        trim(connection, device_id, keep)


def trim(connection, device_id, keep):
    connection.execute(
        "DELETE FROM device_logs WHERE device_id = ? AND id <= (SELECT id FROM device_logs"
        " WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (device_id, device_id, keep))


def recent(connection, device_id, limit, after_id=0):
    """The device's latest `limit` lines after `after_id`, oldest first, as
    records (lib/rc/records.py): {"id", "time", "level", "event", "message",
    "task_id"}, and "ts", the name "time" had before."""
    rows = connection.execute(
        "SELECT %s FROM device_logs WHERE device_id = ? AND id > ? ORDER BY id DESC LIMIT ?"
        % COLUMNS, (device_id, after_id, limit)).fetchall()
    return [record(row) for row in reversed(rows)]


def record(row):
    return {"id": row["id"], "time": row["time"], "ts": row["time"], "level": row["level"],
            "event": row["event"], "message": row["message"], "task_id": row["task_id"]}


def as_log_line(device_id, line):
    """A device's line as `rc logs` merges it with the main node's programs'."""
    fields = {"time": line["time"], "program": "worker", "level": line["level"],
              "event": line["event"], "device_id": device_id}
    if line["task_id"] is not None:
        fields["task_id"] = line["task_id"]
    if line["message"]:
        fields["message"] = line["message"]
    return fields
