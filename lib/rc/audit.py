"""The audit log: who did what from where, one JSON object per line,
appended to var/log/audit.log and never rewritten.

Every join, refusal, revocation, submit, cancel and web command is a line
(refusals rate-limited by rc-server, see rc.throttle). O_APPEND makes each
line one write that no other program's line can split; the file is readable
by its owner only. Past `audit_log_max_bytes` the writer of the line that
crossed it rotates the file, as supervisord rotates the programs' logs:
audit.log.1 ... audit.log.5.
"""
import fcntl
import os
import time

import orjson

from rc.log import json_line, shift_backups

FILE_NAME = "audit.log"
BACKUPS = 5          # rotated files kept: audit.log.1 (newest) ... audit.log.5


def path(config):
    return os.path.join(config.log_dir, FILE_NAME)


def record(config, event, actor, source, **fields):
    """Append one line: event (snake_case), actor (a device id, `admin`,
    `cli`…) and source (an address, `local`)."""
    line = {"time": round(time.time(), 6), "event": event, "actor": actor, "source": source}
    line.update(fields)
    data = json_line(line)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        descriptor = os.open(path(config), flags, 0o600)
    except FileNotFoundError:       # no log directory yet (three system calls a line, else)
        os.makedirs(config.log_dir, exist_ok=True)
        descriptor = os.open(path(config), flags, 0o600)
    try:
        os.write(descriptor, data)
        if os.fstat(descriptor).st_size > config.audit_log_max_bytes:
            rotate(path(config), descriptor)
    finally:
        os.close(descriptor)


def rotate(current, descriptor, backups=BACKUPS):
    """Move the full file (open as `descriptor`) to .1, older ones up one.
    Programs write the audit log at once: the lock makes one of them rotate,
    and a program that finds the file already moved leaves it alone (a
    line it wrote meanwhile is in audit.log.1, which is where it belongs)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False        # another program is rotating it now
    try:
        if os.stat(current).st_ino != os.fstat(descriptor).st_ino:
            return False
        shift_backups(current, backups)
        return True
    except FileNotFoundError:
        return False
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def read(config):
    """Every line so far, as dicts (for `rc audit` and tests)."""
    try:
        with open(path(config), "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
