"""The audit log: who did what from where, one JSON object per line,
appended to var/log/audit.log and never rewritten.

Every join, refusal, revocation, submit, cancel and web command is a line.
O_APPEND makes each line one write that no other program's line can split;
the file is readable by its owner only.
"""
import os
import time

import orjson

FILE_NAME = "audit.log"


def path(config):
    return os.path.join(config.log_dir, FILE_NAME)


def record(config, event, actor, source, **fields):
    """Append one line: event (snake_case), actor (a device id, `admin`,
    `cli`…) and source (an address, `local`)."""
    line = {"time": round(time.time(), 6), "event": event, "actor": actor, "source": source}
    line.update(fields)
    data = orjson.dumps(line, default=repr, option=orjson.OPT_APPEND_NEWLINE)
    os.makedirs(config.log_dir, exist_ok=True)
    descriptor = os.open(path(config), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def read(config):
    """Every line so far, as dicts (for `rc audit` and tests)."""
    try:
        with open(path(config), "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
