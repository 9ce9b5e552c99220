"""One JSON object per line on stdout: time, program, level, event, fields.

supervisord files each program's stdout under var/log/, rotating it by its own
settings, so programs never open log files themselves.
"""
import sys
import time

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, program, level="info", stream=None):
        if level not in LEVELS:
            raise ValueError("log level must be one of %s" % ", ".join(LEVELS))
        self.program = program
        self.threshold = LEVELS[level]
        self.stream = stream or sys.stdout.buffer

    def log(self, level, event, **fields):
        if LEVELS[level] < self.threshold:
            return
        record = {"time": round(time.time(), 6), "program": self.program,
                  "level": level, "event": event}
        record.update(fields)
        line = orjson.dumps(record, default=repr, option=orjson.OPT_APPEND_NEWLINE)
        self.stream.write(line)
        self.stream.flush()

    def debug(self, event, **fields):
        self.log("debug", event, **fields)

    def info(self, event, **fields):
        self.log("info", event, **fields)

    def warning(self, event, **fields):
        self.log("warning", event, **fields)

    def error(self, event, **fields):
        self.log("error", event, **fields)
