"""Reading the programs' logs (var/log/*.log, JSON lines, rotated by
supervisord as path.1 … path.N) and a device's own lines from the database:
which files, their last lines, the lines appended since a look, a line as a
record, and which records a filter keeps. `rc logs` and rc-web (/text/logs,
/stream/logs) both read them through here; how a line is shown is
lib/rc/records.py (log_row, log_event) and lib/rc/render.py (log_line)."""
import collections
import glob
import os
import re
import time

import orjson

from rc import audit, device_logs
from rc.log import LEVELS

TAIL_BLOCK = 64 * 1024        # bytes read at a time from the end of a log file
SCAN_BLOCK = 1024 * 1024      # bytes a filtered read looks through at a time
LOG_CONTEXT_LINES = 50        # lines read before those, so a non-JSON line has a time
# The most lines rc-web reads for one request (/text/logs, the web terminal's
# `logs -n`): a filtered read holds every line it keeps, and the programs'
# logs and their rotated copies are up to 60 MiB each.
MAX_WEB_LINES = 10000
# The main node's own worker both logs into the files and forwards its lines:
# those read from the files are remembered (this many at most) so that their
# forwarded copies are not shown too.
LINES_IN_FILES_KEPT = 10000
# `logs --program audit`: who did what from where, for the admin only on the web.
AUDIT_PROGRAM = os.path.splitext(audit.FILE_NAME)[0]
LOG_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:[,.](\d+))?")


class NoSuchLog(Exception):
    """A program named that has no log file; the message says which there are."""


class LogFilter:
    """--task, --device, --level: which records `rc logs` shows. The task is
    the correlation id: every program logs it as `task_id`."""

    def __init__(self, task_id=None, device_id=None, level=None):
        self.task_id, self.device_id = task_id, device_id
        self.threshold = LEVELS[level] if level else None
        self.active = task_id is not None or device_id is not None or level is not None
        # Lines are orjson (or json with the same separators): a byte search
        # skips most of them before any parsing.
        self.needles = []
        if task_id is not None:
            # A line names its task as task_id, and a line for several tasks
            # (rc-files' file_sent) all of them as task_ids too.
            self.needles.append(re.compile(rb'"task_id":%d[,}]|"task_ids":\[(?:\d+,)*%d[,\]]'
                                           % (task_id, task_id)))
        if device_id is not None:
            self.needles.append(re.compile(re.escape(b'"device_id":' + orjson.dumps(device_id))))
        if level:
            self.needles.append(re.compile(b'"level":"(?:%s)"' % b"|".join(
                name.encode() for name, value in LEVELS.items() if value >= self.threshold)))

    def __call__(self, record):
        if not self.active:
            return True
        if not isinstance(record, dict):
            return False
        if self.task_id is not None and record.get("task_id") != self.task_id \
                and self.task_id not in listed(record.get("task_ids")):
            return False
        if self.device_id is not None and record.get("device_id") != self.device_id:
            return False
        return self.threshold is None or LEVELS.get(record.get("level"), 0) >= self.threshold

    def last_records(self, paths, count):
        """(time, record) of the last `count` lines this filter keeps in
        these files (`paths`: [(path, bytes of it to read, or None)], newest
        first), in order: each file is read from its end back, a block at a
        time, until `count` are found; never more than those are held."""
        found, held = [], 0        # lists of a block's records, newest block first
        for path, end in paths:
            for block in blocks_backward(path, end):
                records = []         # the block's, from its last line back
                for text in reversed(list(self.lines_found(block))):
                    if held + len(records) >= count:
                        break
                    records.extend(line for line in parse_log_lines([text], program_of(path))
                                   if self(line[1]))
                records.reverse()
                found.append(records)
                held += len(records)
                if held >= count:
                    return [line for records in reversed(found) for line in records][-count:] \
                        if count else []
        return [line for records in reversed(found) for line in records]

    def lines_found(self, text):
        """The lines of `text` (whole lines) that every needle finds: those
        the first one finds are cut out, no other line is looked at."""
        if not self.needles:
            yield from (line.decode("utf-8", "replace") for line in text.splitlines())
            return
        first, others = self.needles[0], self.needles[1:]
        done = 0         # where the last line found ended
        for match in first.finditer(text):
            if match.start() < done:
                continue            # found again on a line already taken
            start = text.rfind(b"\n", 0, match.start()) + 1
            done = text.find(b"\n", match.end())
            done = len(text) if done < 0 else done
            line = text[start:done]
            if all(needle.search(line) for needle in others):
                yield line.decode("utf-8", "replace")


def blocks_backward(path, end=None):
    """The whole lines of a file (its first `end` bytes), about SCAN_BLOCK
    bytes of them at a time, from its end back."""
    with open(path, "rb") as f:
        position = f.seek(0, os.SEEK_END) if end is None else end
        rest = b""        # the start of a line whose end was in the block after
        while position > 0:
            start = max(0, position - SCAN_BLOCK)
            f.seek(start)
            block = f.read(position - start) + rest
            position = start
            cut = block.find(b"\n") + 1 if start else 0
            if start and not cut:
                rest = block          # a line longer than a block
                continue
            rest = block[:cut]
            yield block[cut:]


def listed(value):
    return value if isinstance(value, list) else ()


def rotated_paths(path):
    """supervisord's backups of a log: path.1 (newest) … path.N."""
    found = []
    number = 1
    while os.path.exists("%s.%d" % (path, number)):
        found.append("%s.%d" % (path, number))
        number += 1
    return found


def log_paths(log_dir, program=None):
    """The programs' logs; the audit log only when asked for by name
    (`--program audit`): it says who did what, not what a program did."""
    paths = sorted(glob.glob(os.path.join(log_dir, "*.log")))
    if program is None:
        return [path for path in paths if os.path.basename(path) != audit.FILE_NAME]
    chosen = [path for path in paths if program_of(path) == program]
    if not chosen:
        have = ", ".join(program_of(path) for path in paths) or "none yet"
        raise NoSuchLog("no log for program %r in %s (have: %s)" % (program, log_dir, have))
    return chosen


def program_of(path):
    return os.path.splitext(os.path.basename(path))[0]


def tail_lines(path, count):
    """The last `count` lines of a file, and its size, reading from the end."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start, data = size, b""
        while start > 0 and data.count(b"\n") <= count:
            start = max(0, start - TAIL_BLOCK)
            f.seek(start)
            data = f.read(min(TAIL_BLOCK, size - start)) + data
    lines = data.decode("utf-8", "replace").splitlines()
    return (lines[-count:] if count else []), size


def parse_log_lines(lines, program):
    """(time, record or text) pairs; a line that is not JSON keeps the time of
    the line before it, so it stays next to it when files are merged."""
    parsed, last_time = [], 0.0
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("time"), (int, float)):
            last_time = record["time"]
            record.setdefault("program", program)
            parsed.append((last_time, record))
        elif line.strip():
            last_time = stamped_time(line) or last_time
            parsed.append((last_time, line))
    return parsed


def stamped_time(line):
    """The time at the start of a plain log line (supervisord's own log)."""
    match = LOG_TIMESTAMP.match(line)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) \
        + float("0." + (match.group(2) or "0"))


def read_complete_lines(path, offset):
    """Whole lines after `offset`, and the offset after the last of them
    (a line still being written is left for the next look)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end


class DeviceLines:
    """`rc logs --device ID`: the device's own lines (warnings, errors and
    task events its worker forwarded, kept in the database), merged with
    what the main node's programs logged about it."""

    def __init__(self, connection, config, device_id, wanted, logs_here=False):
        self.connection, self.config = connection, config
        self.device_id, self.wanted = device_id, wanted
        self.after = 0        # the id of the last line read
        # The main node's own worker (rc-worker) logs into the files too, its
        # lines without a device_id as well: the ones read there, by
        # (event, level, task_id, whole second), oldest first.
        self.logs_here = logs_here
        self.in_files = collections.OrderedDict()

    def read_in_files(self, lines):
        """Remember which of these lines, read from the log files, are its
        worker's: their forwarded copies are the same lines."""
        for _, record in lines:
            if isinstance(record, dict) and record.get("program") == "worker" \
                    and record.get("device_id", self.device_id if self.logs_here else None) \
                    == self.device_id and isinstance(record.get("time"), (int, float)):
                self.in_files[same_line(record, int(record["time"]))] = True
                while len(self.in_files) > LINES_IN_FILES_KEPT:
                    self.in_files.popitem(last=False)

    def in_the_files(self, record):
        # A worker stamps the line it forwards microseconds before the one it
        # logs: the same second, or the next one.
        second = int(record["time"])
        return any(same_line(record, near) in self.in_files for near in (second, second + 1))

    def new(self):
        """(time, record) of the lines kept since the last look, but those
        already read from the log files."""
        found = device_logs.recent(self.connection, self.device_id,
                                   self.config.device_log_lines
                                   + device_logs.TRIM_EVERY, self.after)
        if found:
            self.after = found[-1]["id"]
        records = (device_logs.as_log_line(self.device_id, line) for line in found)
        return [(record["time"], record) for record in records
                if self.wanted(record) and not self.in_the_files(record)]


def same_line(record, second):
    return (record.get("event"), record.get("level"), record.get("task_id"), int(second))


class Offsets(dict):
    """What a follower of the logs has read: path -> the offset it read to,
    and in `files` path -> the file that was (device, inode), so that a log
    rotated between two looks is read to its end under its new name (path.1)
    before the new file is read from its start."""

    def __init__(self):
        super().__init__()
        self.files = {}


def new_lines(log_dir, program, offsets, wanted=None):
    """(time, record) of the whole lines appended to the programs' logs since
    `offsets` (an Offsets, updated). A log rotated since the last look is
    read to its end where it went, then the new one from its start; a file
    that shrank (copied and truncated) from its start too."""
    lines = []
    try:
        paths = log_paths(log_dir, program)
    except NoSuchLog:       # moved away as it rotated (the audit log until its next line)
        paths = []
    for path in paths:
        offset = offsets.get(path, 0)
        try:
            info = os.stat(path)
            known = offsets.files.setdefault(path, (info.st_dev, info.st_ino))
            if known != (info.st_dev, info.st_ino):
                lines.extend(rest_of_rotated(path, known, offset, wanted))
                offsets.files[path], offset = (info.st_dev, info.st_ino), 0
            elif info.st_size < offset:
                offset = 0
            text, offsets[path] = read_complete_lines(path, offset)
        except FileNotFoundError:       # the same, between the listing and now
            continue
        lines.extend(wanted_lines(text, path, wanted))
    return lines


def wanted_lines(text, path, wanted):
    """(time, record) of the lines read from `path` that `wanted` keeps."""
    return [line for line in parse_log_lines(text, program_of(path))
            if wanted is None or wanted(line[1])]


def rest_of_rotated(path, known, offset, wanted):
    """The lines after `offset` of the file that was `path` (`known`: its
    device and inode), found among its backups; none if it is gone."""
    for older in rotated_paths(path)[:2]:
        try:
            info = os.stat(older)
            if (info.st_dev, info.st_ino) == known:
                return wanted_lines(read_complete_lines(older, offset)[0], path, wanted)
        except FileNotFoundError:
            continue
    return []


def recent_log_records(log_dir, program, count, offsets=None):
    """The last `count` log lines of the programs, merged by time, as
    (time, record or text); `offsets` (an Offsets) gets each file's size."""
    offsets = Offsets() if offsets is None else offsets
    found = []
    for path in log_paths(log_dir, program):
        tail, offsets[path] = tail_lines(path, count + LOG_CONTEXT_LINES)
        found.extend(parse_log_lines(tail, program_of(path))[-count:] if count else [])
    found.sort(key=lambda line: line[0])
    return found[-count:] if count else []
