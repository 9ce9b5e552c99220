"""One JSON object per line on stdout: time, program, level, event, fields.

supervisord files each program's stdout under var/log/, rotating it by its own
settings, so programs never open log files themselves. The one exception is
the `rc` command, which no supervisor runs: it appends its few lines (the
tasks it submits and cancels) to var/log/rc-cli.log, which the reaper rotates
(housekeeping.rotate_cli_log).
"""
import os
import sys
import time

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# orjson escapes only what JSON must (below U+0020): the C1 controls (U+0080-
# U+009F: U+009B is CSI, U+009D OSC to a terminal that reads them, as
# xterm.js does) and the bidi and invisible characters render.CONTROL shows
# as "?" in a name a device chose went as they came to whoever reads the
# JSON on a terminal (`rc ctl tail`, tail -f, `rc ... --json`). Written as
# \u escapes (they occur only inside JSON strings), the text reads back the same.
# Those characters beyond ASCII, defined once: render.CONTROL shows them as
# "?", and bin/worker.py keeps a copy (tests/test_shared_definitions.py).
TERMINAL_UNSAFE = (*range(0x80, 0xa0), 0x061c, 0x200b, 0x200e, 0x200f, *range(0x202a, 0x202f),
                   *range(0x2066, 0x206a), 0xfeff)
JSON_ESCAPES = {c: "\\u%04x" % c for c in TERMINAL_UNSAFE}


def json_line(record):
    """`record` as one line of JSON, safe to show on a terminal as it is."""
    data = orjson.dumps(record, default=repr, option=orjson.OPT_APPEND_NEWLINE)
    return data if data.isascii() else data.decode().translate(JSON_ESCAPES).encode()


class Logger:
    def __init__(self, program, level="info", stream=None):
        if level not in LEVELS:
            raise ValueError("log level must be one of %s" % ", ".join(LEVELS))
        self.program = program
        self.threshold = LEVELS[level]
        self.stream = sys.stdout.buffer if stream is None else stream
        self.owns_stream = False
        self.on_write_error = None      # called with the OSError of a failed write; None: raise it

    @classmethod
    def appending(cls, program, path, level="info"):
        """A logger that appends to a file: each line is one write() on an
        O_APPEND descriptor, so processes logging at once never mix lines."""
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        logger = cls(program, level, os.fdopen(descriptor, "ab", buffering=0))
        logger.owns_stream = True
        return logger

    def close(self):
        if self.owns_stream:
            self.stream.close()

    def log(self, level, event, **fields):
        self.log_many([(level, event, fields)])

    def log_many(self, lines, now=None):
        """(level, event, fields) lines in one write: what one step of a
        program did (a scheduler pass, a turn of rc-server) reaches the log
        with one wake-up of supervisord, not one a line. `now`: the time
        they say (a line written after what it tells: when that was)."""
        now = round(time.time() if now is None else now, 6)
        written = b"".join(self.line(now, level, event, fields) for level, event, fields in lines
                           if LEVELS[level] >= self.threshold)
        if written:
            try:
                self.stream.write(written)
                self.stream.flush()
            except OSError as e:
                if self.on_write_error is None:
                    raise
                self.on_write_error(e)

    def line(self, now, level, event, fields):
        record = {"time": now, "program": self.program, "level": level, "event": event}
        record.update(fields)
        return json_line(record)

    def debug(self, event, **fields):
        self.log("debug", event, **fields)

    def info(self, event, **fields):
        self.log("info", event, **fields)

    def warning(self, event, **fields):
        self.log("warning", event, **fields)

    def error(self, event, **fields):
        self.log("error", event, **fields)


def shift_backups(path, backups):
    """Rotate `path` as supervisord rotates its logs: path.1 ... path.N,
    the oldest dropped, and path itself becomes path.1."""
    for number in range(backups - 1, 0, -1):
        older = "%s.%d" % (path, number)
        if os.path.exists(older):
            os.replace(older, "%s.%d" % (path, number + 1))
    os.replace(path, path + ".1")
