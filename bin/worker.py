#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Retire-Cluster worker: makes this device part of the cluster.

Copy this one file onto a device and run it:

    python3 worker.py --join nas.local:8080 --token-file ~/.rc-token

It connects to the main node, proves that it knows the join token (and makes
the main node prove it too), describes the device, sends heartbeats and runs
the tasks it is given. Standard library only, CPython 3.6 to 3.13; psutil is
used when it happens to be installed. docs/protocol.md is the contract this
file implements.
"""
# Checked before anything else, in syntax Python 2.7 parses, so an old
# interpreter says what it needs instead of a SyntaxError: this whole file
# must stay parseable by 2.7 (tests/test_first_hour.py runs it so).
import sys
if sys.version_info < (3, 6):
    sys.stderr.write("worker.py needs Python 3.6 or newer; this is Python %d.%d (%s).\n"
                     "On Termux: pkg install python; elsewhere install python3 and run"
                     " python3 worker.py ...\n" % (sys.version_info[0], sys.version_info[1],
                                                   sys.executable))
    sys.exit(1)

import errno
import os
import sys
import time

# The C modules under socket.py and signal.py, which add little the worker
# uses but enums, and with the enum module over 1 MiB an idle worker would
# hold for good. Their functions and constants are the same; numbers stay ints.
# Neither selectors nor collections: see PollSelector; dicts keep their order.
import _signal as signal
import _socket as socket

__version__ = "0.1.0"

###############################################################################
# The loop's selector #########################################################
###############################################################################

class SelectorKey(object):
    __slots__ = ("fileobj", "fd", "events", "data")

    def __init__(self, fileobj, fd, events, data):
        self.fileobj, self.fd, self.events, self.data = fileobj, fd, events, data


class PollSelector(object):
    """What the worker uses of the standard library's selectors (register,
    modify, unregister, get_key, select), on select.poll: the selectors
    module imports collections and math, ~0.6 MiB an idle worker would hold
    for good, for the few descriptors a worker watches."""

    def __init__(self, select):
        self.select_module = select
        self.poller = select.poll()
        self.keys = {}          # fd -> SelectorKey

    def mask(self, events):
        return ((self.select_module.POLLIN if events & selectors.EVENT_READ else 0)
                | (self.select_module.POLLOUT if events & selectors.EVENT_WRITE else 0))

    def lookup(self, fileobj):
        """The descriptor of a registered file object; one closed since is
        found by identity, as selectors finds it."""
        try:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
            if fd >= 0:
                return fd
        except (AttributeError, TypeError, ValueError, OSError):
            pass
        for fd, key in self.keys.items():
            if key.fileobj is fileobj:
                return fd
        raise KeyError("%r is not registered" % (fileobj,))

    def register(self, fileobj, events, data=None):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd < 0 or fd in self.keys:
            raise KeyError("%r is closed or already registered" % (fileobj,))
        self.poller.register(fd, self.mask(events))
        self.keys[fd] = key = SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj):
        key = self.keys.pop(self.lookup(fileobj))
        try:
            self.poller.unregister(key.fd)
        except (KeyError, OSError, ValueError):    # closed already
            pass
        return key

    def modify(self, fileobj, events, data=None):
        key = self.keys[self.lookup(fileobj)]
        if events != key.events:
            self.poller.modify(key.fd, self.mask(events))
        key.events, key.data = events, data
        return key

    def get_key(self, fileobj):
        return self.keys[self.lookup(fileobj)]

    def select(self, timeout=None):
        """[(key, events ready)], as selectors answers: an error or hang-up
        counts as both readable and writable."""
        if timeout is not None:
            timeout = 0 if timeout <= 0 else -(-timeout * 1000 // 1)    # ms, rounded up
        ready = []
        read, write = self.select_module.POLLIN, self.select_module.POLLOUT
        for fd, event in self.poller.poll(timeout):
            key = self.keys.get(fd)
            if key is None:
                continue
            if event & self.select_module.POLLNVAL:
                # Closed but not unregistered: epoll (selectors' choice on
                # Linux) forgets such a descriptor; poll would report it forever.
                self.poller.unregister(fd)
                continue
            events = ((selectors.EVENT_WRITE if event & ~read else 0)
                      | (selectors.EVENT_READ if event & ~write else 0)) & key.events
            if events:
                ready.append((key, events))
        return ready

    def close(self):
        self.keys.clear()


class selectors(object):     # noqa: N801 -- it stands in for the module's names
    """The names the worker used from selectors, kept."""
    EVENT_READ, EVENT_WRITE = 1, 2

    @staticmethod
    def DefaultSelector():      # noqa: N802
        import select
        if hasattr(select, "poll"):
            return PollSelector(select)
        import selectors as module      # no poll() here: what the standard library has
        return module.DefaultSelector()


###############################################################################
# Wire names: a copy of lib/rc/states.py ######################################
###############################################################################
# This file must stay one file, so it cannot import rc.states;
# tests/test_shared_definitions.py checks that the two copies agree.

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024

HELLO = "hello"
REGISTER = "register"
REGISTER_ACK = "register_ack"
HEARTBEAT = "heartbeat"
HEARTBEAT_ACK = "heartbeat_ack"
TASK_ASSIGN = "task_assign"
TASK_ACCEPT = "task_accept"
TASK_PROGRESS = "task_progress"
TASK_RESULT = "task_result"
TASK_RESULT_ACK = "task_result_ack"
TASK_CANCEL = "task_cancel"
ERROR = "error"
CONTROL = "control"
CONTROL_ACK = "control_ack"
PING = "ping"
PONG = "pong"
LEASE_CHECK = "lease_check"
LEASE_CHECK_ACK = "lease_check_ack"
DEVICE_LOG = "device_log"
WATCH = "watch"
MAIN_STOPPING = "main_stopping"
TASK_WATCH = "task_watch"
TASK_OUTPUT = "task_output"
MESSAGE_TYPES = (HELLO, REGISTER, REGISTER_ACK, HEARTBEAT, HEARTBEAT_ACK,
                 TASK_ASSIGN, TASK_ACCEPT, TASK_PROGRESS, TASK_RESULT,
                 TASK_RESULT_ACK, TASK_CANCEL, ERROR, CONTROL, CONTROL_ACK,
                 PING, PONG, LEASE_CHECK, LEASE_CHECK_ACK, DEVICE_LOG, WATCH,
                 MAIN_STOPPING, TASK_WATCH, TASK_OUTPUT)

TASK_TYPES = ("echo", "sleep", "system_info", "python_eval", "python_exec", "shell")
INSTANT_TASK_TYPES = ("echo", "system_info")   # answered at once, without a slot
PAYLOAD_FIELD = {"echo": "message", "sleep": "seconds", "system_info": None,
                 "python_eval": "expression", "python_exec": "code",
                 "shell": "command"}

OUTCOME_COMPLETED = "completed"
OUTCOME_FAILED = "failed"
OUTCOME_TIMED_OUT = "timed_out"
OUTCOME_CANCELLED = "cancelled"
OUTCOME_NOT_ALLOWED = "not_allowed"
OUTCOME_HANDED_BACK = "handed_back"
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_TIMED_OUT,
            OUTCOME_CANCELLED, OUTCOME_NOT_ALLOWED, OUTCOME_HANDED_BACK)

INLINE_FILE_BYTES = 256 * 1024      # a file this small may ride in task_assign / task_result
INLINE_TOTAL_BYTES = 512 * 1024     # ... and one message carries at most this much of them
INLINE_MAX_FILES = 1000             # ... and at most this many of them (the rest: rc-files)
TAIL_BYTES = 64 * 1024              # bytes of a stream one task_output carries at most

###############################################################################
# Tunables ####################################################################
###############################################################################

DEFAULT_PORT = 8080             # the main node's port for workers
DEFAULT_WEB_PORT = 5000         # the main node's dashboard port; it serves worker.py (upgrade)
DEFAULT_STATE_DIR = "~/.rc-worker"  # where device secrets are kept (one per cluster and id)
# Host names that name no one machine: every Android phone is localhost.
PLACEHOLDER_HOSTNAMES = ("localhost", "localhost.localdomain", "")
HELLO_TIMEOUT = 5.0             # seconds from connected to hello (a TLS main node sends none)
HELLO_LOOK_AFTER = 1.0          # seconds without a hello before looking at what answers (a
                                # TLS main node, the dashboard's port); rc-server says hello
                                # within milliseconds, and only a positive look ends a worker
FLUSH_TIMEOUT = 5.0             # seconds the last frames may take before a reconnect or re-exec
UPGRADE_TIMEOUT = 30.0          # seconds the download of a new worker.py may take
UPGRADE_MAX_BYTES = 4 * 1024 * 1024   # a served worker.py larger than this is refused
EXIT_REFUSED = 3                # exit status when the main node refuses this device for good
                                # (a supervisor should not restart it: RestartPreventExitStatus)
HEARTBEAT_INTERVAL = 60.0       # seconds between heartbeats, until register_ack says otherwise
BACKOFF_START = 0.5             # seconds before the first reconnect; doubles per failure
BACKOFF_MAX = 30.0              # seconds, the longest wait between reconnects
HOLD_RETRY = 1.0                # seconds between reconnects while a stopping main node
                                # holds our tasks (main_stopping): back soon after it is
CONNECT_TIMEOUT = 10.0          # seconds a TCP connect may take
AUTH_TIMEOUT = 15.0             # seconds from connected to register_ack (the server allows 10)
SILENT_HEARTBEATS = 3           # heartbeat intervals without a frame: the link is presumed dead
FREEZE_THRESHOLD = 2.0          # seconds the loop may lose (SIGSTOP, a suspend) before it counts
                                # as a freeze: then no task it holds starts unconfirmed. Less
                                # with a short assignment_lease (see freeze_threshold)
OUTPUT_CAP = MAX_FRAME_BYTES - 64 * 1024  # bytes kept of a task's stdout, and of its stderr
DRAIN_GRACE = 2.0               # seconds to read what an exited task left in its pipes
# Seconds an outbox that holds only task_accept frames waits for company (a
# result, a heartbeat) before it is sent: a short task's accept and result
# then go in one send, and rc-server takes them in one turn and transaction;
# an accept-only send was a fifth of a worker's sends under `rc map true`.
# Nothing waits for an accept but the accept_timeout, seconds long.
ACCEPT_HOLD = 0.01
CPU_LIMIT_MARGIN = 5            # CPU seconds past its timeout before the kernel stops a task
# The longest timeout a task gets (the main node allows a week, tasks.MAX_TIMEOUT):
# 1e308 made a CPU rlimit of 309 digits, which no task could start with.
LONGEST_TIMEOUT = 365 * 24 * 3600.0
# Bytes per read from the socket or a pipe: a pipe holds 64 KiB, and a larger
# buffer would be mmap-ed and unmapped again by malloc on every read.
READ_SIZE = 64 * 1024
MAX_ERROR_CHARS = 2000          # a result's error message is cut to this length
PROGRESS_INTERVAL = 0.5         # seconds between two task_progress frames of one task
TAIL_INTERVAL = 1.0             # seconds between two task_output frames of one watched stream
TAIL_WATCH_MAX = 600.0          # seconds one task_watch lasts at most
PROGRESS_LINE_MAX = 4096        # bytes; a longer stdout line is output, never progress
PROGRESS_MESSAGE_MAX = 200      # characters of a progress message that are sent
SHEBANG_MAX = 256               # bytes of a script's #! line read, as Linux reads them
WATCHDOG_EXIT_WAIT = 2.0        # seconds a clean exit waits for the watchdog to end
SPAWNER_IDLE = 120.0            # seconds the spawner stays with no task before it exits
SPAWNER_CONTINUE_EVERY = 1.0    # seconds between SIGCONTs to a spawner with tasks (keep_going)
# Signals whose default action ends or stops a process that the spawner
# ignores (its children get them back): for the moment of a posix_spawn it
# has the task's uid as its real one (borrow_task_identity), and the task
# it starts may then signal it; killed by a SIGUSR1, it took every task of
# the device down with it. SIGSTOP cannot be ignored: see keep_going.
SPAWNER_IGNORES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                   "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT",
                   "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGTRAP", "SIGSYS", "SIGXCPU",
                   "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL", "SIGSEGV")
# Modules the spawner imports once so that the Python tasks it forks find them
# loaded (as multiprocessing's forkserver preloads): what a function shipped by
# rc.client, or a script, imports for its arguments and results. `import base64`
# alone costs a fresh process ~9 ms (it imports re).
SPAWNER_PRELOAD = ("_pickle", "binascii", "pickle", "base64", "json", "traceback")
CAPABILITY_TOOLS = ("python3", "gcc", "g++", "make", "git", "curl", "docker", "podman",
                    "ffmpeg", "nvidia-smi", "node", "go", "rustc", "java")
SPEED_TEST_SECONDS = 0.1        # seconds the start-up CPU benchmark runs (cpu_speed)
STORAGE_DISK_GB = 1000          # a device with at least this much disk is guessed "storage"
TERMUX_BATTERY_AGE = 60.0       # seconds an answer of termux-battery-status is kept
TERMUX_BATTERY_TIMEOUT = 5.0    # seconds termux-battery-status may take (it hangs without Termux:API)
# The availability policy (see Availability).
POLICY_INTERVAL = 5.0           # seconds between two looks at battery, heat, owner and clock
BATTERY_RESUME_MARGIN = 10      # percent above --min-battery at which tasks resume
TEMPERATURE_RESUME_MARGIN = 5.0  # degrees C below --max-temperature at which tasks resume
OWNER_CPU_BUSY = 25.0           # percent of the CPU used by other programs: the owner is busy
# Sandbox limits for each task (rlimits, where the OS has them).
TASK_OPEN_FILES = 1024          # open descriptors (RLIMIT_NOFILE)
MAX_FILE_MB = 1024              # MiB, the largest file a task may write (--max-file-size)
MIN_MEMORY_MB = 1024            # MiB; --max-memory defaults to this or half the RAM, if more
TASK_PROCESSES = 256            # processes (threads count) a task may have: RLIMIT_NPROC, above
                                # what a uid it shares with others (the worker's) already has
TASK_UID_BASE = 59000           # as root, tasks run as uids from here (none with an account),
TASK_UID_COUNT = 256            # ... this many: one per running task (--task-user changes them)
# Where root workers lock the task uids they use: one place for all of a
# machine's, whatever each one's $TMPDIR (systemd's PrivateTmp gives each
# service a /tmp of its own, and two workers of one uid kill each other's tasks).
UID_LOCK_DIR = "/run/rc-worker"
# Where any uid may leave files, and the kinds of SysV IPC object (the
# /proc/sysvipc file, the call that removes one): a task's uid's are removed
# before its next task (see Leftovers).
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
# A tree a task's uid left there, made the worker's and renamed in place to
# LEFT_BEHIND + "PID-RANDOM" while a thread removes it (Remover.take_in_place).
LEFT_BEHIND = ".rc-left-"
SYSV_IPC = (("shm", "shmctl"), ("sem", "semctl"), ("msg", "msgctl"))
IPC_RMID = 0                    # the command that removes a SysV IPC object
# Names Leftovers keeps of one owner's entries in a shared directory between
# its looks: past them, that owner's are found by reading the directory whole
# at its own task's end. A task running on with 300,000 files in /tmp grew
# the worker from 21 to 117 MB (their names, and a list of every entry) at
# the next task's end; now to 22.
LEFTOVERS_NAMES_KEPT = 10000
# Seconds since a directory last changed, after which a look at it is
# remembered (a change more recent may share its timestamp with the next one,
# which would then not show): 1 s where timestamps are whole seconds (HFS+,
# FAT), a tenth where they have fractions (ext4, tmpfs, f2fs, APFS: the
# kernel's clock tick, 10 ms at most). A /tmp that other programs change every
# second was otherwise read again before every task (~0.2 ms of a `true` task).
LEFTOVERS_SETTLED = 1.0
LEFTOVERS_SETTLED_FINE = 0.1
KILL_ROUNDS = 50                # passes over a task's processes to kill them all (a fork bomb)
TRACK_INTERVAL = 0.2            # seconds between the spawner's /proc looks at its task trees
# What the main node sees of this worker beyond heartbeats (see LogForwarder, on_watch).
LOG_FORWARD_RATE = 0.5          # lines a second forwarded (device_log), on average, of each
                                # kind: task events, and warnings or errors; the main node
                                # keeps 1 a second (device_log_rate), so both kinds fit
LOG_FORWARD_BURST = 30          # lines of each kind that may go at once after a quiet spell
LOG_FORWARD_QUEUE = 100         # lines held while not connected; the oldest make way
LOG_FORWARD_BATCH = 50          # lines per device_log message (the main node takes 50)
LOG_DROPPED_EVERY = 60.0        # seconds between two counts of the lines not forwarded: one a
                                # drop had taken the warnings' burst (13 notices in a second)
LOG_MESSAGE_MAX = 500           # characters of a forwarded line's message (the main node's cap)
FORWARDED_EVENTS = ("task_started", "task_finished", "task_fenced", "task_not_allowed",
                    "registered", "availability_changed")   # info lines also forwarded
WATCH_MIN_INTERVAL = 1.0        # seconds; the most frequent heartbeats a watch may ask for
WATCH_MAX_SECONDS = 300.0       # seconds a watch may last before the main node renews it

# States of the connection to the main node, in the order they happen.
DISCONNECTED = "disconnected"
CONNECTING = "connecting"
TLS_HANDSHAKE = "tls_handshake"   # only with --fingerprint
AWAIT_HELLO = "await_hello"
AWAIT_ACK = "await_ack"
READY = "ready"

###############################################################################
# Helpers: JSON, logging, proofs ##############################################
###############################################################################

# The standard library's JSON, even where orjson is installed (loading orjson
# costs an idle worker 2 MiB, more than the time it would save here), and of it
# only _json, the C encoder and scanner that json.dumps and json.loads run on:
# json's own modules load re and enum, over 1 MiB an idle worker would hold.

JSON_SPACE = " \t\n\r"
# What comes from outside (the main node's frames, rc-files' lines, Termux's
# battery) is read as numbers every reader can use: a timeout of Infinity
# (or 1e999), or an integer past a double's range, made float() or a timer
# raise in the worker's loop and ended the worker with every task it ran.
# No message holds a number past a uint64 (an rlimit), nor NaN.
JSON_INT_DIGITS = 20


def json_int(text):
    if len(text.lstrip("-")) > JSON_INT_DIGITS:
        raise ValueError("an integer of more than %d digits" % JSON_INT_DIGITS)
    return int(text)


def json_float(text):
    value = float(text)
    if value - value != 0:           # inf - inf is nan, and nan is never 0
        raise ValueError("a number past a double's range")
    return value


def json_constant(name):
    raise ValueError("%s is not a number JSON holds" % name)


JSON_HOOKS = {"parse_int": json_int, "parse_float": json_float,
              "parse_constant": json_constant}
# types.SimpleNamespace, without the types module: its only .py module from
# the standard library's directory an idle worker would load (with struct:
# see ipv4_address), and the import system's listing of that directory.
SimpleNamespace = type(sys.implementation)

try:
    import _json
    json_scanner = _json.make_scanner(SimpleNamespace(
        strict=True, object_hook=None, object_pairs_hook=None, **JSON_HOOKS))
except (ImportError, AttributeError):
    _json = None


def json_text(obj, ensure_ascii, default, encoders={}):
    if _json is None:
        return json_module().dumps(obj, default=default, ensure_ascii=ensure_ascii,
                                   separators=(",", ":"))
    # The arguments json.JSONEncoder gives it (no indent, compact separators,
    # NaN allowed) but no markers: what the worker encodes is never circular,
    # so one encoder per kind serves every frame and log line (making one
    # took half the time of a frame).
    key = (ensure_ascii, default)
    encode = encoders.get(key)
    if encode is None:
        encode = encoders[key] = _json.make_encoder(
            None, default or not_serializable,
            _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring,
            None, ":", ",", False, False, True)
    return "".join(encode(obj, 0))


def not_serializable(obj):
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def dumps(obj, default=None):
    """Compact UTF-8 JSON, as json.dumps(obj, ensure_ascii=False, separators=(",", ":"))."""
    try:
        return json_text(obj, False, default).encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: escape everything instead
        return json_text(obj, True, default).encode("ascii")


def loads(data):
    """json.loads(data) for UTF-8 bytes or text; bad JSON raises ValueError,
    and so does JSON nested past the recursion limit: a frame of 1,000 ['s
    (RecursionError) from whoever answers at the main node's address, even
    before the handshake, ended the worker's loop."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    start = len(text) - len(text.lstrip(JSON_SPACE))
    try:
        if _json is None:
            return json_module().loads(text, **JSON_HOOKS)
        value, end = json_scanner(text, start)
    except StopIteration:
        raise ValueError("no JSON value at character %d" % start)
    except RecursionError:
        raise ValueError("JSON nested too deeply")
    if text[end:].strip(JSON_SPACE):
        raise ValueError("extra data at character %d" % end)
    return value


def json_module():
    import json
    return json


LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
log_threshold = LOG_LEVELS["info"]
# JSON escapes only what it must (below U+0020): the C1 controls (CSI, OSC
# to a terminal that reads them) and the bidi overrides and isolates in
# what the main node, a stranger answering for it, or a task chose went into
# the log as they came, for whoever tails it. As \u escapes (or "?" in a
# readable line) instead. lib/rc/log.py's, copied (tests/test_shared_definitions.py).
TERMINAL_UNSAFE = (tuple(range(0x80, 0xa0)) + (0x061c, 0x200b, 0x200e, 0x200f)
                   + tuple(range(0x202a, 0x202f)) + tuple(range(0x2066, 0x206a)) + (0xfeff,))
LOG_ESCAPES = dict((c, "\\u%04x" % c) for c in TERMINAL_UNSAFE)
# Their first bytes in UTF-8: a line that holds none of these holds none of them.
LOG_ESCAPE_LEADS = tuple(set(chr(c).encode("utf-8")[:1] for c in TERMINAL_UNSAFE))
log_forwarder = None          # a LogForwarder, once defined below


def log(level, event, **fields):
    """One JSON object per line on stdout, like every program of the cluster;
    on a terminal, one readable line instead (a person is watching).
    Warnings, errors and task events also go to the main node (LogForwarder),
    whatever the local log level."""
    if log_forwarder is not None:
        try:
            log_forwarder.offer(level, event, fields)
        except Exception:
            pass     # a line the main node cannot have is still logged here
    if LOG_LEVELS[level] < log_threshold:
        return
    record = {"time": round(time.time(), 6), "program": "worker", "level": level,
              "event": event}
    record.update(fields)
    try:
        if console_is_terminal():
            line = readable_line(record).encode("utf-8", "replace")
        else:
            line = dumps(record, default=repr)
            if any(lead in line for lead in LOG_ESCAPE_LEADS):
                line = line.decode("utf-8").translate(LOG_ESCAPES).encode("utf-8")
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.buffer.flush()
    except (AttributeError, OSError, ValueError):
        pass     # nowhere to log is no reason to stop working


class LogForwarder(object):
    """Lines of this worker's log worth reading on the main node, held
    until a registered connection takes them (device_log). Few and slow:
    each kind (task events; warnings and errors) at LOG_FORWARD_RATE lines a
    second with bursts of LOG_FORWARD_BURST, so a worker in trouble cannot
    flood the main node; lines over it are counted, and the count sent."""

    def __init__(self):
        self.pending = []        # at most LOG_FORWARD_QUEUE (no deque: collections stays out)
        self.allowance = {}      # kind -> (lines it may send now, when that was reckoned)
        self.dropped = 0
        self.dropped_told = None # when the last count of them was sent (time.monotonic)

    def offer(self, level, event, fields):
        problem = LOG_LEVELS[level] >= LOG_LEVELS["warning"]
        if not (problem or (level == "info" and event in FORWARDED_EVENTS)):
            return
        if not self.allowed(problem):
            self.dropped += 1
            return
        if len(self.pending) >= LOG_FORWARD_QUEUE:
            del self.pending[0]
            self.dropped += 1      # the oldest makes way
        self.pending.append(forwarded_line(level, event, fields))

    def allowed(self, kind):
        now = time.monotonic()
        lines, reckoned = self.allowance.get(kind, (LOG_FORWARD_BURST, now))
        lines = min(LOG_FORWARD_BURST, lines + (now - reckoned) * LOG_FORWARD_RATE)
        self.allowance[kind] = (lines - 1 if lines >= 1 else lines, now)
        return lines >= 1

    def take(self):
        """The lines for one device_log, oldest first ([] when none)."""
        count = min(len(self.pending), LOG_FORWARD_BATCH - 1)
        lines = self.pending[:count]
        del self.pending[:count]
        now = time.monotonic()
        if self.dropped and (self.dropped_told is None
                             or now - self.dropped_told >= LOG_DROPPED_EVERY):
            lines.append(forwarded_line("warning", "log_lines_dropped", {
                "message": "%d %s of this worker's log not sent: over its limit of %g a second"
                % (self.dropped, "line" if self.dropped == 1 else "lines", LOG_FORWARD_RATE)}))
            self.dropped, self.dropped_told = 0, now
        return lines


def forwarded_line(level, event, fields):
    """A log line as device_log carries it: the fields but the task id in
    one message of "name=value" pairs, cut to LOG_MESSAGE_MAX characters."""
    task_id = fields.get("task_id")
    parts = []
    for name, value in fields.items():
        if name in ("task_id", "device_id"):
            continue
        text = value if isinstance(value, str) else dumps(value, default=repr).decode("utf-8")
        text = text[:LOG_MESSAGE_MAX]
        parts.append(text if name == "message" else "%s=%s" % (name, text))
    message = " ".join(parts)[:LOG_MESSAGE_MAX]
    return {"time": round(time.time(), 6), "level": level, "event": event[:64],
            # A lone surrogate (a file name's undecodable bytes) would make the frame invalid.
            "message": message.encode("utf-8", "replace").decode("utf-8"),
            "task_id": task_id if is_int(task_id) and 0 < task_id <= 2 ** 62 else None}


log_forwarder = LogForwarder()


console_terminal = None     # whether stdout is a terminal, looked at on the first line


def console_is_terminal():
    global console_terminal
    if console_terminal is None:
        try:
            console_terminal = sys.stdout.isatty()
        except (AttributeError, ValueError):
            console_terminal = False
    return console_terminal


# What a person reads on the terminal for the events worth a sentence; any
# other event is shown as its name, its message or its fields.
READABLE_EVENTS = {
    "worker_started": "worker %(device_id)s starting: %(slots)s slots, joining %(main_node)s",
    "connected": "reached %(main_node)s, proving the join token to each other",
    "registered": "connected to %(main_node)s, %(slots)s slots, waiting for tasks",
    "disconnected": "disconnected: %(reason)s; trying again in %(retry_in)gs",
    "disconnected_for_good": "disconnected: %(reason)s; not trying again",
    "task_started": "task %(task_id)s (%(task_type)s) started",
    "task_finished": "task %(task_id)s (%(task_type)s) %(status)s after %(execution_time).1fs",
    "worker_stopped": "worker stopped",
}


def readable_line(record):
    """HH:MM:SS, WARNING/ERROR when it is one, then the event in words."""
    fields = dict((k, v) for k, v in record.items()
                  if k not in ("time", "program", "level", "event"))
    event = record["event"]
    if event == "disconnected" and fields.get("retry_in") is None:
        event = "disconnected_for_good"        # a refusal the worker exits on
    try:
        text = READABLE_EVENTS[event] % fields
    except (KeyError, TypeError, ValueError):
        text = record["event"].replace("_", " ")
        if fields.get("message"):
            text += ": %s" % fields["message"]
        elif fields:
            text += ": " + ", ".join("%s=%s" % item for item in sorted(fields.items()))
    if record["event"] == "task_finished" and fields.get("error"):
        text += ": %s" % str(fields["error"]).strip().splitlines()[-1]
    level = record["level"]
    # A task's error or a device name could hold escape sequences: shown as "?".
    text = "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 or ord(c) in LOG_ESCAPES else c
                   for c in text)
    return "%s %s%s" % (time.strftime("%H:%M:%S", time.localtime(record["time"])),
                        level.upper() + " " if level in ("warning", "error") else "", text)


def new_nonce():
    return os.urandom(16).hex()


def sha256_function():
    """The built-in SHA-256. hashlib would load OpenSSL, which alone costs
    more resident memory (about 4 MB) than the worker's own code."""
    for name in ("_sha2", "_sha256"):     # 3.12+, then 3.6-3.11
        try:
            return __import__(name).sha256
        except (ImportError, AttributeError):
            pass
    import hashlib
    return hashlib.sha256


HMAC_INNER = bytes(x ^ 0x36 for x in range(256))
HMAC_OUTER = bytes(x ^ 0x5C for x in range(256))


def hmac_sha256(key, message):
    """HMAC as RFC 2104 defines it, on the built-in SHA-256."""
    sha256 = sha256_function()
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(key.translate(HMAC_INNER) + message).digest()
    return sha256(key.translate(HMAC_OUTER) + inner).hexdigest()


def sign(token, role, server_nonce, worker_nonce, device_id):
    """HMAC-SHA256 of "ROLE|S|W|DEVICE_ID" under the join token, as hex."""
    message = "|".join((role, server_nonce, worker_nonce, device_id)).encode("utf-8")
    return hmac_sha256(token.encode("utf-8"), message)


def proofs_match(expected, given):
    if not isinstance(given, str):
        return False
    try:
        from _operator import _compare_digest as compare_digest   # what hmac uses
    except ImportError:
        from hmac import compare_digest
    return compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def encode_frame(message_type, data, sender_id, with_bytes=True):
    envelope = {"message_type": message_type, "sender_id": sender_id,
                "timestamp": time.time(), "message_id": os.urandom(8).hex(), "data": data}
    inline = data.get("files_inline")
    if not inline:
        return dumps(envelope) + b"\n"
    # Small files: each entry's "data" (bytes) goes raw right behind the
    # frame, which says how many bytes follow (docs/protocol.md, "Small files").
    blobs = [entry["data"] for entry in inline]
    envelope["data"] = dict(data, inline_bytes=sum(len(blob) for blob in blobs),
                            files_inline=[{name: value for name, value in entry.items()
                                           if name != "data"} for entry in inline])
    return b"".join([dumps(envelope), b"\n"] + (blobs if with_bytes else []))


def announced_bytes(line):
    """How many raw bytes follow this frame (a task_assign's small files:
    its data's "inline_bytes"), 0 for none. Read only from a line that
    holds the name, the rare one."""
    if b'"inline_bytes":' not in line:
        return 0
    try:
        data = loads(line).get("data")
    except (ValueError, AttributeError):
        return 0
    size = data.get("inline_bytes") if isinstance(data, dict) else None
    return size if is_int(size) and 0 < size <= MAX_FRAME_BYTES else 0


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_or_none(value):
    return float(value) if is_number(value) and value > 0 else None


def task_key(data):
    """(task_id, attempt) of a frame's data, or None unless both are
    integers: a list there cannot even be looked up (TypeError, which ended
    the worker in the middle of its loop)."""
    key = (data.get("task_id"), data.get("attempt"))
    return key if is_int(key[0]) and is_int(key[1]) else None


def task_keys(items):
    """A list of {"task_id", "attempt"} from the main node as a set of pairs;
    anything else in it is left out."""
    return {(item["task_id"], item["attempt"]) for item in
            (items if isinstance(items, list) else ()) if isinstance(item, dict)
            and is_int(item.get("task_id")) and is_int(item.get("attempt"))}


def jitter():
    """A random factor in [0.5, 1], so that many workers do not reconnect in step."""
    return 0.5 + int.from_bytes(os.urandom(2), "big") / 131070.0


def kill_group(pgid):
    """SIGKILL a process group; True if it had a process to signal."""
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except OSError:      # already gone, or only zombies left (macOS says EPERM)
        return False


def reap_if_ended(pid):
    """os.wait4 of the task process `pid` once it has exited, else None. Its
    group is killed first: the unreaped leader keeps the group id reserved, so
    this cannot hit a stranger, and whatever the task left running ends with it."""
    try:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None
    except ChildProcessError:
        pass
    kill_group(pid)
    return os.wait4(pid, 0)


def sleep_aware_clock():
    """A monotonic clock that keeps counting while the machine is suspended,
    which time.monotonic() does not on Linux and macOS: a laptop that slept
    through its lease must notice, or it would go on with tasks that the main
    node has given to another device."""
    clock_id = {"linux": 7, "android": 7,            # CLOCK_BOOTTIME (named in 3.7+)
                "darwin": getattr(time, "CLOCK_MONOTONIC", None)}.get(sys.platform)
    try:
        time.clock_gettime(clock_id)
    except (AttributeError, TypeError, OSError):
        return time.monotonic
    return lambda: time.clock_gettime(clock_id)


contact_clock = sleep_aware_clock()


PROGRESS_MARK = b"PROGRESS "     # how a task's stdout line reporting progress begins


def parse_progress(line):
    """(percent, message) from a stdout line such as b"PROGRESS 42", b"PROGRESS 42.5%"
    or b"PROGRESS 3/10 copying" (30.0), or None when it is not one."""
    fields = line.decode("utf-8", "replace").split(None, 2)
    if len(fields) < 2 or fields[0] != "PROGRESS":
        return None
    amount = fields[1]
    try:
        if "/" in amount:
            done, total = amount.split("/")
            percent = 100.0 * float(done) / float(total)
        else:
            percent = float(amount[:-1] if amount.endswith("%") else amount)
    except (ValueError, ZeroDivisionError):
        return None
    if percent != percent:      # NaN
        return None
    message = fields[2].strip() if len(fields) > 2 else ""
    return min(max(percent, 0.0), 100.0), message[:PROGRESS_MESSAGE_MAX]


###############################################################################
# Identity, TLS and upgrades: what the worker keeps and checks ################
###############################################################################
# After its first join with the token, a device proves a secret of its own,
# kept in the state directory, one file per cluster and device id, so that a
# stranger holding the token cannot take its id over. The main node sends it
# sealed: XORed with a pad that only holders of the token can compute.

def unseal(token, server_nonce, worker_nonce, device_id, sealed):
    pad = bytes.fromhex(sign(token, "rc-seal", server_nonce, worker_nonce, device_id))
    return bytes(a ^ b for a, b in zip(bytes.fromhex(sealed), pad)).hex()


HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def is_hex(text, length):
    # A set test, not a generator over the characters: every input and
    # output of a task with files passes here (is_sha256), ~15 us a time that way.
    return isinstance(text, str) and len(text) == length and HEX_DIGITS.issuperset(text)


NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def safe_name(text):
    """A name the main node sent that may become part of a path (no "..", no "/")."""
    return (isinstance(text, str) and 0 < len(text) <= 64 and set(text) <= NAME_CHARACTERS
            and text.strip(".") != "")


def owner_only(path, mode):
    """chmod `path` to `mode` if it allows more and is ours (never follows a link)."""
    import stat
    info = os.lstat(path)
    if (not stat.S_ISLNK(info.st_mode) and info.st_uid == os.geteuid()
            and stat.S_IMODE(info.st_mode) & 0o077):
        os.chmod(path, mode)


STATE_DIR_UNUSABLE = ("this device's secret and its cache of task files live there; start"
                      " the worker with --state-dir a directory this user can write")


class Identity(object):
    """The device secrets in --state-dir: STATE_DIR/CLUSTER_ID/DEVICE_ID.secret."""

    def __init__(self, state_dir, device_id):
        self.state_dir = os.path.expanduser(state_dir)
        self.device_id = device_id
        self.unfiled = {}       # cluster id: a secret that could not be written

    def prepare(self):
        """Make the state directory, and make the secrets in it (and it, if it
        holds nothing else: --state-dir may name any directory) the owner's
        only, whatever made them. None, or why the directory cannot be used:
        a worker without it would join once, lose the secret it was given,
        and be refused as an impostor at its next connection."""
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            return str(e)
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            return "not writable by uid %d" % os.getuid()
        try:
            ours = True
            for cluster in list_dir(self.state_dir):
                directory = os.path.join(self.state_dir, cluster)
                names = list_dir(directory) if os.path.isdir(directory) else [""]
                secrets = [name for name in names if name.endswith((".secret", ".tmp"))]
                ours = ours and len(secrets) == len(names)
                if secrets:
                    owner_only(directory, 0o700)
                for name in secrets:
                    owner_only(os.path.join(directory, name), 0o600)
            if ours:
                owner_only(self.state_dir, 0o700)
        except OSError as e:
            log("warning", "state_dir_not_private", path=self.state_dir, error=str(e),
                message="the device secrets in it may be readable by others")
        return None

    def path(self, cluster_id):
        if not safe_name(cluster_id):      # an old main node, or a name unfit for a path
            return None
        return os.path.join(self.state_dir, cluster_id, self.device_id + ".secret")

    def secret(self, cluster_id):
        path = self.path(cluster_id)
        try:
            with open(path) as f:
                secret = f.read().strip()
        except (TypeError, OSError):      # no path, or no secret yet
            return self.unfiled.get(cluster_id)
        if not is_hex(secret, 64):
            log("warning", "device_secret_unreadable", path=path)
            return None
        return secret

    def keep(self, cluster_id, secret):
        """Write the secret atomically (a temporary file renamed over the old),
        readable by the owner only. The path, or None."""
        path = self.path(cluster_id)
        if path is None:
            return None
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        owner_only(os.path.dirname(path), 0o700)
        temporary = "%s.%d.tmp" % (path, os.getpid())
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "w") as f:
                f.write(secret + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        return path

    def forget(self, cluster_id):
        try:
            os.unlink(self.path(cluster_id))
        except (TypeError, OSError):
            pass

    def joined_before(self):
        """Whether this device holds a secret from any main node."""
        return bool(self.unfiled) or any(
            os.path.exists(os.path.join(self.state_dir, cluster, self.device_id + ".secret"))
            for cluster in list_dir(self.state_dir))


# -- TLS: the main node's certificate pinned by its SHA-256 fingerprint -----------

WOULD_BLOCK = (BlockingIOError, InterruptedError)   # and, once TLS is used, its two


# _ssl's tables of OpenSSL's error names, 1,700 entries each on Python 3.8 to
# 3.11 (3.12 keeps none): they only put a reason's name in an SSLError's
# message, which keeps OpenSSL's own words without it ("[SSL] wrong version
# number"). Emptied, they leave ~0.2 MiB to what the worker allocates next.
SSL_ERROR_NAME_TABLES = ("err_codes_to_names", "err_names_to_codes")


def load_ssl():
    """_ssl, the C half of ssl, only when TLS is used: it loads OpenSSL,
    megabytes an idle worker without TLS need not hold. Its exceptions are
    the ones ssl raises."""
    global WOULD_BLOCK
    import _ssl
    if _ssl.SSLWantReadError not in WOULD_BLOCK:
        WOULD_BLOCK = WOULD_BLOCK + (_ssl.SSLWantReadError, _ssl.SSLWantWriteError)
        forget_ssl_error_names(_ssl)
    return _ssl


def forget_ssl_error_names(_ssl):
    for name in SSL_ERROR_NAME_TABLES:
        table = getattr(_ssl, name, None)
        if isinstance(table, dict):
            table.clear()


def tls_socket(sock):
    """`sock` wrapped in TLS, not yet shaken hands. Straight on _ssl where it
    has what ssl.py builds on (CPython 3.6 to 3.13): ssl.py itself, with its
    enums, would cost an idle worker ~1.9 MiB for good."""
    _ssl = load_ssl()
    if hasattr(getattr(_ssl, "_SSLContext", None), "_wrap_socket"):
        return TlsSocket(sock, client_context(_ssl._SSLContext))
    import ssl
    return client_context(ssl.SSLContext).wrap_socket(sock, do_handshake_on_connect=False)


# -- why a main node says nothing: a wrong port or a missing fingerprint ----------------

SILENCE_PROBE_TIMEOUT = 3.0     # seconds each look at a silent main node's port may take
DASHBOARD_PORT = ("wrong_port", "%s:%d answers HTTP: this looks like the dashboard port"
                  " (HTTP); the worker port is " + str(DEFAULT_PORT) + " by default (`rc join`"
                  " on the main node prints the command with its ports)")
FINGERPRINT_MISSING = ("fingerprint_missing", "%s:%d speaks TLS and this worker was started"
                       " without --fingerprint, so it cannot know the main node is the real"
                       " one: add the --fingerprint=... that `rc join` prints on the main node"
                       " (or --fingerprint-file FILE)")


def diagnose_silence(address, pinned):
    """(event, message) saying why the main node at `address` sent no hello,
    when a look tells: an HTTP server there (the dashboard port), or TLS
    spoken to a worker that has no fingerprint to pin. None otherwise (a
    main node too busy to answer: trying again may mend that)."""
    if answers_http(address):
        return DASHBOARD_PORT[0], DASHBOARD_PORT[1] % address
    if not pinned and speaks_tls(address):
        return FINGERPRINT_MISSING[0], FINGERPRINT_MISSING[1] % address
    return None


def probe_connection(address):
    import socket as socket_module     # only here: create_connection, on a path that exits
    return socket_module.create_connection(address, timeout=SILENCE_PROBE_TIMEOUT)


def answers_http(address):
    """Does an HTTP server answer at `address`? (rc-server never says HTTP/.)"""
    try:
        with probe_connection(address) as sock:
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: rc\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def speaks_tls(address):
    """Does a TLS handshake succeed at `address` (any certificate)? Only
    asked of a main node that sent no hello, so nothing is sent after it."""
    try:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(probe_connection(address)):
            return True
    except (OSError, ImportError):
        return False


def client_context(new_context):
    """No certificate authority and no host name: the one certificate whose
    fingerprint was pinned is trusted, nothing else (see Worker.handshake)."""
    _ssl = load_ssl()
    context = new_context(_ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = _ssl.CERT_NONE
    if hasattr(_ssl, "PROTO_TLSv1_2"):      # 3.7+; the OP_NO_* flags warn from 3.10 on
        context.minimum_version = _ssl.PROTO_TLSv1_2
    else:
        context.options |= _ssl.OP_NO_TLSv1 | _ssl.OP_NO_TLSv1_1
    return context


class TcpSocket(socket.socket):
    """_socket's socket, which _ssl can use: it keeps a weak reference to it."""
    __slots__ = ("__weakref__",)


class TlsSocket(object):
    """The part of ssl.SSLSocket the worker uses, on _ssl's own TLS object.
    The timeout of `sock` rules, as in ssl: non-blocking calls raise
    SSLWantReadError or SSLWantWriteError."""

    def __init__(self, sock, context):
        self.sock = sock
        self.tls = context._wrap_socket(sock, False)

    def fileno(self):
        return self.sock.fileno()

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def close(self):
        self.sock.close()

    def do_handshake(self):
        self.tls.do_handshake()

    def getpeercert(self, binary_form=False):
        # Called peer_certificate until 3.7.
        read = getattr(self.tls, "getpeercert", None) or self.tls.peer_certificate
        return read(binary_form)

    def version(self):
        return self.tls.version()

    def pending(self):
        return self.tls.pending()

    def recv(self, size):
        try:
            return self.tls.read(size)
        except load_ssl().SSLEOFError:     # closed without a TLS goodbye: an end, as ssl's
            return b""

    def recv_into(self, view):
        try:
            return self.tls.read(len(view), view)
        except load_ssl().SSLEOFError:
            return 0

    def send(self, data):
        return self.tls.write(data)

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self.tls.write(view):]


def tls_cut_short(_ssl, error):
    """Whether a TLS error is the other end closing: SSLEOFError, or on 3.6
    and 3.7 built with OpenSSL 3 (newer than they are) a plain SSLError
    "unexpected eof while reading", which a first join took for a main node
    without TLS, and exited (status 3)."""
    return isinstance(error, (_ssl.SSLEOFError, _ssl.SSLZeroReturnError)) \
        or "unexpected eof" in str(error).lower()


def certificate_fingerprint(der):
    return sha256_function()(der).hexdigest()


def normal_fingerprint(text):
    """64 lower-case hex digits from "AB:CD:..." or "abcd...", or None."""
    text = text.strip().rsplit("=", 1)[-1].replace(":", "").strip().lower()
    return text if is_hex(text, 64) else None


# -- upgrades: the served worker.py replaces this file, which then runs again --------

# Refusals after which trying again is pointless: the worker says what to do and exits.
REFUSED_FOR_GOOD = {
    "device_id_taken": "the main node already knows a device %(id)s that proves its own"
                       " secret, and this worker holds none for it (%(path)s): give this"
                       " device another --device-id, or, if it is that device, put its secret"
                       " file back",
    "device_id_clash": "the main node knows a device whose id differs from %(id)s only by"
                       " case; ids are compared without case: start this worker with"
                       " another --device-id",
    "revoked": "the main node revoked %(id)s (`rc revoke`) and will not let it in again;"
               " to join as a new device, start this worker with another --device-id",
    "forgotten": "%(id)s was retired on the main node (`rc forget`) and cannot connect"
                 " again; to join as a new device, start this worker with another --device-id",
}

WORKER_FILE = os.path.abspath(__file__)


def file_stamp(path):
    """What changes when a file is replaced: its inode, size and mtime (None
    when it cannot be read)."""
    try:
        info = os.stat(os.path.realpath(path))
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


# The file this process runs: one put in its place since (by hand, a git pull)
# is not what it runs, whatever its SHA-256.
STARTED_FROM = file_stamp(WORKER_FILE)


class UpgradeError(Exception):
    """The upgrade cannot be done; the message says why."""


def upgrade_temporary(path, pid):
    """Where the worker of `pid` writes an upgrade of `path` before it
    replaces the file (replace_worker_file)."""
    return "%s.%d.new" % (path, pid)


def remove_dead_upgrades():
    """Remove the upgrades that workers killed while writing them left
    beside this file, ~0.5 MB each, one per kill, for ever: those of pids
    that no longer run, and this process's own (an exec keeps the pid, and
    it writes none before it runs). Another worker's, running from the same
    file, may be under way and stays. Returns the paths removed."""
    path = os.path.realpath(WORKER_FILE)
    folder, name = os.path.split(path)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        pid = entry[len(name) + 1:-len(".new")]
        if not (entry.startswith(name + ".") and entry.endswith(".new") and pid
                and pid.strip("0123456789") == ""
                and entry == upgrade_temporary(name, int(pid))):
            continue
        if int(pid) != os.getpid() and pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except OSError:
            pass        # not ours to remove (another user's directory): it harms nothing
    return removed


# >>> Region "upgrade": the worker process loads it on first use (load_region).

def fetch_worker(host, port, expected_sha256=None):
    url = "http://%s:%d/worker.py" % ("[%s]" % host if ":" in host else host, port)
    try:
        source = download_within(host, port, "/worker.py", UPGRADE_TIMEOUT,
                                 UPGRADE_MAX_BYTES + 1)
    except Exception as e:      # OSError, HTTPException, timeouts, bad responses
        raise UpgradeError("cannot download %s: %s" % (url, e))
    if len(source) > UPGRADE_MAX_BYTES:
        raise UpgradeError("%s is over %d bytes" % (url, UPGRADE_MAX_BYTES))
    if expected_sha256 and not proofs_match(certificate_fingerprint(source),
                                            expected_sha256.lower()):
        raise UpgradeError("%s is not the file the main node announced (SHA-256 differs)" % url)
    try:
        compile(source, WORKER_FILE, "exec")
    except (SyntaxError, ValueError) as e:
        raise UpgradeError("%s does not compile on Python %s: %s"
                           % (url, sys.version.split()[0], e))
    return source


def download_within(host, port, path, seconds, limit):
    """GET http://host:port/path, at most `limit` bytes, all within `seconds`.
    A socket's timeout bounds each wait, not the whole: whoever answers at
    the main node's address (rc-web on loopback only, a box that took the
    address) dripping a byte a second held the worker's loop, and with it
    every heartbeat and result, for as long as it liked. At the deadline the
    socket is shut, which ends the read waiting on it."""
    import http.client
    import threading
    deadline = time.monotonic() + seconds
    connection = http.client.HTTPConnection(host, port, timeout=seconds)
    try:
        connection.connect()
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), shut_socket,
                                (connection.sock,))
        timer.start()
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            if response.status != 200:
                raise UpgradeError("HTTP %d %s" % (response.status, response.reason[:100]))
            body = response.read(limit)
        except Exception:
            if time.monotonic() < deadline:
                raise
            body = None         # cut by the shut socket (an end of file, or a reset)
        finally:
            timer.cancel()
        if time.monotonic() >= deadline:
            raise UpgradeError("not done within %g seconds" % seconds)
        return body
    finally:
        connection.close()


def shut_socket(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def is_own_file(expected_sha256):
    """True when this worker.py is the file of that SHA-256 (hex)."""
    try:
        with open(os.path.realpath(WORKER_FILE), "rb") as f:
            return proofs_match(certificate_fingerprint(f.read()), expected_sha256.lower())
    except OSError:
        return False


def replace_worker_file(source):
    """Atomically put `source` in place of this file; False when it is the same."""
    path = os.path.realpath(WORKER_FILE)
    try:
        with open(path, "rb") as f:
            if f.read() == source:
                return False
        mode = os.stat(path).st_mode & 0o777
        temporary = upgrade_temporary(path, os.getpid())
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "wb") as f:
            f.write(source)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        raise UpgradeError("cannot replace %s: %s" % (path, e))
    return True


# <<< The end of region "upgrade".


def interpreter_argv():
    """This interpreter with the flags it was started with (-S only if it was
    the user's, not start()'s)."""
    flags = sys.flags
    argv = [sys.executable]
    if getattr(flags, "isolated", 0):
        argv.append("-I")
    else:
        argv += ["-E"] * bool(flags.ignore_environment) + ["-s"] * bool(flags.no_user_site)
    return argv + ["-S"] * bool(flags.no_site and not site_dropped) + ["-O"] * flags.optimize


def restart_argv():
    """This interpreter with its flags, this file and its arguments."""
    return interpreter_argv() + [WORKER_FILE] + sys.argv[1:]


def bytecode_argv(call, interpreter=None, tls=False, whole=True):
    """A command that imports this file from its compiled bytecode and runs
    `call` (such as "main()") of it; None where that cannot be done.

    Run as a script, the file's 3,000 lines are compiled in memory, which
    leaves ~5 MiB in the process for good: too much for an idle worker on a
    phone. Imported, it is compiled once into __pycache__ and loaded from there.
    Not `whole`, it is loaded without the spawner's own code (see
    compile_without_spawner): the long-lived worker process never runs it;
    nor the regions, which it runs once a task needs them (load_region).
    With `tls`, _ssl is loaded first and its error names dropped (see
    load_ssl): the memory they held then holds this file's code, where it
    would otherwise lie unused beside it (~0.15 MiB more of an idle worker)."""
    directory, name = os.path.split(WORKER_FILE)
    module, extension = os.path.splitext(name)
    if os.name != "posix" or extension != ".py" or not module.isidentifier() \
            or not sys.executable:
        return None
    try:
        # Both, here: the spawner the worker starts loads the whole file, and
        # compiling costs a process 12 MiB for good. With PYTHONDONTWRITEBYTECODE
        # (or -B) nothing is written, but copies made before (`make install`,
        # or compile_bytecode by hand) are used while they are up to date.
        if not sys.dont_write_bytecode:
            compile_bytecode()
        without_spawner = path_without_spawner(WORKER_FILE)
        if not (compiled_fresh(WORKER_FILE) and compiled_fresh(WORKER_FILE, without_spawner)):
            return None
    except Exception:       # a directory we cannot write to, among others
        return None
    if whole:
        code = ("import sys; sys.path.insert(0, %r); import %s as worker; del sys.path[0];"
                % (directory, module))
    else:
        code = LOAD_WITHOUT_SPAWNER % (module, module, WORKER_FILE, without_spawner,
                                       bytecode_header_size())
    code += " sys.argv[0] = worker.WORKER_FILE; sys.exit(worker.%s)" % call
    if tls:
        code = TLS_FIRST % (SSL_ERROR_NAME_TABLES,) + code
    return (interpreter or interpreter_argv()) + ["-c", code]


def compile_bytecode():
    """This file's two bytecode copies (whole, and without the spawner's
    code), each compiled when it is not up to date. `make install` calls it
    for the local worker, where PYTHONDONTWRITEBYTECODE may be set."""
    if not compiled_fresh(WORKER_FILE):
        import py_compile
        py_compile.compile(WORKER_FILE, doraise=True)
    without_spawner = path_without_spawner(WORKER_FILE)
    if not compiled_fresh(WORKER_FILE, without_spawner):
        compile_without_spawner(WORKER_FILE, without_spawner)


# The start of a bytecode_argv command without the spawner's code: its
# bytecode, from compile_without_spawner's file, run as the module.
# The file stays open (unbuffered: no 8 KiB buffer kept) for load_region: the
# regions come from the bytecode the worker was started from, whatever
# becomes of worker.py and its copies since. marshal.loads reads the module's
# code and leaves the regions behind it.
LOAD_WITHOUT_SPAWNER = (
    "import sys, marshal; worker = sys.modules[%r] = type(sys)(%r); worker.__file__ = %r;"
    " f = open(%r, 'rb', 0); f.seek(%d); exec(marshal.loads(f.read()), vars(worker));"
    " worker.lean_bytecode = f;")

# The lines between these two hold what only the spawner runs (serve_spawner
# and what it calls): ~600 lines, ~0.6 MiB of an idle worker's bytecode.
SPAWNER_CODE_BEGINS = "# >>> The spawner's own code: the worker process loads this file without it."
SPAWNER_CODE_ENDS = "# <<< The end of the spawner's own code."


def path_without_spawner(source):
    """Where the bytecode of `source` without the spawner's code is kept:
    beside the whole file's in __pycache__, as an "optimization" of its own."""
    return sys.modules["_frozen_importlib_external"].cache_from_source(
        source, optimization="nospawner%s" % (sys.flags.optimize or ""))


def compile_without_spawner(source, cached):
    """`source` compiled into `cached` without the spawner's own code nor the
    regions (blank lines in their place, so that every other line keeps its
    number in a traceback); each region's code follows the module's, and
    after them an index of where each is (see load_region)."""
    import marshal
    info = os.stat(source)
    with open(source, "rb") as f:
        lines = f.read().split(b"\n")
    begin = lines.index(SPAWNER_CODE_BEGINS.encode())
    end = lines.index(SPAWNER_CODE_ENDS.encode(), begin)
    lines[begin:end] = [b""] * (end - begin)
    regions = region_lines(lines)
    whole = list(lines)
    for numbers in regions.values():
        for number in numbers:
            lines[number] = b""
    magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
    header = magic + b"\0\0\0\0" * (sys.version_info >= (3, 7)) + b"".join(
        (value & 0xFFFFFFFF).to_bytes(4, "little") for value in (int(info.st_mtime), info.st_size))
    parts = [header, marshal.dumps(compile_lines(lines, source))]
    index, offset = {}, len(parts[0]) + len(parts[1])
    for name, numbers in sorted(regions.items()):
        kept = set(numbers)
        parts.append(marshal.dumps(compile_lines(
            [line if number in kept else b"" for number, line in enumerate(whole)], source)))
        index[name] = (offset, len(parts[-1]))
        offset += len(parts[-1])
    parts.append(marshal.dumps(index))
    parts.append(len(parts[-1]).to_bytes(4, "little"))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    temporary = "%s.%d.tmp" % (cached, os.getpid())
    with open(temporary, "wb") as f:
        f.write(b"".join(parts))
    os.replace(temporary, cached)


def compile_lines(lines, source):
    # Without its docstrings (optimize=2, as `python -OO`; nothing here reads
    # __doc__, and there is no assert to lose): ~0.1 MiB of an idle worker.
    return compile(b"\n".join(lines), source, "exec", dont_inherit=True, optimize=2)


def region_lines(lines):
    """{region name: the numbers (from 0) of its lines}, markers included;
    a region may be made of several runs of lines, each between a begin and
    an end marker of its name."""
    regions, name = {}, None
    for number, line in enumerate(lines):
        if line.startswith(REGION_BEGINS):
            if name is not None:
                raise ValueError("region %s begins inside %s" % (line, name))
            name = line.split(b'"')[1].decode()
        if name is not None:
            regions.setdefault(name, []).append(number)
        if line.startswith(REGION_ENDS):
            if name != line.split(b'"')[1].decode():
                raise ValueError("region %s ends at %s" % (name, line))
            name = None
    if name is not None:
        raise ValueError("region %s does not end" % name)
    return regions


# Code the long-lived worker process loads only once a task needs it: the
# lines of each region are left out of its bytecode (compile_without_spawner),
# compiled beside it, and run into the module by load_region. A region is
# one or more runs of whole top-level statements, each between
#   # >>> Region "NAME": the worker process loads it on first use (load_region).
#   # <<< The end of region "NAME".
# tests/test_worker_regions.py checks that every function outside a region
# that names something it defines calls load_region("NAME") first.
REGION_BEGINS = b'# >>> Region "'
REGION_ENDS = b'# <<< The end of region "'
lean_bytecode = None    # the file LOAD_WITHOUT_SPAWNER ran; None: this file was loaded whole
regions_loaded = set()


def load_region(name):
    """Define the region's names in this module, from the bytecode the
    worker was started from (a no-op when the whole file was loaded, and
    the second time). Called from the loop's thread, before the names are."""
    f = lean_bytecode
    if f is None or name in regions_loaded:
        return
    import marshal
    f.seek(-4, 2)
    size = int.from_bytes(f.read(4), "little")
    f.seek(-4 - size, 2)
    offset, length = marshal.loads(f.read(size))[name]
    f.seek(offset)
    exec(marshal.loads(f.read(length)), globals())
    regions_loaded.add(name)
    log("debug", "region_loaded", region=name)


def bytecode_header_size():
    """Bytes before the code in a .pyc: magic, flags (from 3.7), mtime, size."""
    return 16 if sys.version_info >= (3, 7) else 12


# The start of a bytecode_argv command with tls: forget_ssl_error_names, before
# this file is there to call. Without _ssl, the worker says so once it needs it.
TLS_FIRST = ("try:\n import _ssl\n for name in %r: (getattr(_ssl, name, None) or {}).clear()\n"
             "except ImportError:\n pass\n")


def compiled_fresh(source, cached=None):
    """Whether `cached` (by default, where the import system keeps this
    interpreter's bytecode of `source`) is up to date, as the import system
    judges it: the header records the source's mtime and size (after 4
    bytes of flags from 3.7)."""
    bootstrap = sys.modules.get("_frozen_importlib_external")
    try:
        cached = cached or bootstrap.cache_from_source(source)
        info = os.stat(source)
        with open(cached, "rb") as f:
            header = f.read(bytecode_header_size())
    except (AttributeError, NotImplementedError, OSError, ValueError):
        return False
    if sys.version_info >= (3, 7):
        if header[4:8] != b"\0\0\0\0":      # hash-based: leave it to py_compile
            return False
        header = header[:4] + header[8:]
    stamp = [int.from_bytes(header[at:at + 4], "little") for at in (4, 8)]
    return (header[:4] == bootstrap.MAGIC_NUMBER
            and stamp == [int(info.st_mtime) & 0xFFFFFFFF, info.st_size & 0xFFFFFFFF])


###############################################################################
# The device: profile and metrics #############################################
###############################################################################
# Read from /proc and /sys where Linux and Android have them. A value that
# cannot be read is left out, never guessed and never a crash: Android denies
# apps /proc/stat and /proc/loadavg. RC_PROC_ROOT and RC_SYSFS_ROOT move the two
# trees (the tests use them to play an Android phone with a fake battery).

PROC_ROOT = os.environ.get("RC_PROC_ROOT", "/proc")
SYSFS_ROOT = os.environ.get("RC_SYSFS_ROOT", "/sys")

_psutil = []
site_dropped = []       # [True] when start() ran this interpreter with -S for us


def optional_psutil():
    """psutil if installed. Asked only where /proc cannot answer (macOS, Android),
    because importing it costs more memory than the rest of the worker."""
    if not _psutil:
        try:
            if site_dropped and "site" not in sys.modules:
                import site         # start() dropped it: add site-packages now
                site.main()
            import psutil
        except Exception:
            psutil = None
        _psutil.append(psutil)
    return _psutil[0]


def proc_path(*names):
    return os.path.join(PROC_ROOT, *names)


def sysfs_path(*names):
    return os.path.join(SYSFS_ROOT, *names)


def read_text(path):
    """A small file's text, or None when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def read_number(path):
    try:
        return float(read_text(path).strip())
    except (AttributeError, ValueError):
        return None


def too_deep(top, directory, dirs):
    """In a top-down os.walk or os.fwalk of a task's tree: go no further
    down than TREE_DEPTH levels below `top` (both recurse, and a task's
    directories nested past the recursion limit raised RecursionError out
    of the worker's loop); what lies deeper is left out, as a link is."""
    if directory.count(os.sep) - top.count(os.sep) >= TREE_DEPTH:
        dirs[:] = []
        return True
    return False


def list_dir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def device_platform():
    # Termux on Pythons before 3.13 reports "linux"; the scheduler wants to know.
    if os.environ.get("ANDROID_ROOT") or os.environ.get("TERMUX_VERSION"):
        return "android"
    return sys.platform


def device_info():
    uname = os.uname()
    info = {"hostname": socket.gethostname(), "platform": device_platform(),
            "architecture": uname.machine,
            "os_version": "%s %s" % (uname.sysname, uname.release),
            "python_version": "%d.%d.%d" % sys.version_info[:3]}
    name = os_name()
    if name:
        info["os_name"] = name
    return info


def os_name():
    """"Debian GNU/Linux 12 (bookworm)", "Android 14"..., or None."""
    if device_platform() == "android":
        release = run_quietly(["getprop", "ro.build.version.release"])
        return "Android %s" % release.strip() if release else "Android"
    for line in (read_text("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip("\"'") or None
    return None


def run_quietly(argv, timeout=5.0):
    """A helper program's stdout, or None if it is missing, fails or hangs."""
    if not which(argv[0]):
        return None
    import subprocess
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def hardware_specs(power=None, speed=None):
    specs = {"cpu_cores": os.cpu_count() or 1, "memory_gb": memory_gb(),
             "disk_gb": disk_gb(), "network_interfaces": network_interfaces(),
             "cpu_model": cpu_model(), "cpu_speed": speed,
             "battery": bool(power and power.read())}
    return {name: value for name, value in specs.items() if value is not None}


def cpu_model():
    """The CPU's name from /proc/cpuinfo (x86: "model name"; ARM: "Hardware"...)."""
    fields = {}
    for line in (read_text(proc_path("cpuinfo")) or "").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    for name in ("model name", "hardware", "cpu model", "processor", "model"):
        if fields.get(name) and not fields[name].isdigit():
            return fields[name]
    return None


def cpu_speed(seconds=SPEED_TEST_SECONDS):
    """Million turns of an empty Python loop per second, on one core: a Pi 3
    scores several times less than a laptop. Measured once, at start."""
    turns, start = 0, time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(20000):
            pass
        turns += 20000
        now = time.perf_counter()
    return round(turns / (now - start) / 1e6, 1)


def read_meminfo():
    """/proc/meminfo as {name: kB}; empty where there is none."""
    meminfo = {}
    for line in (read_text(proc_path("meminfo")) or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            meminfo[fields[0].rstrip(":")] = int(fields[1])
    return meminfo


def memory_gb():
    total_kb = read_meminfo().get("MemTotal")
    if total_kb:
        return round(total_kb / 1048576.0, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1073741824.0, 2)
    except (ValueError, OSError, AttributeError):
        return None


def disk_usage():
    """(total, used) bytes of the file system holding the home directory."""
    try:
        st = os.statvfs(os.path.expanduser("~"))
    except (OSError, AttributeError):
        return None
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def disk_gb():
    usage = disk_usage()
    return round(usage[0] / 1073741824.0, 1) if usage else None


def network_interfaces():
    """Interface name -> addresses, as far as this platform lets us see."""
    interfaces = {}
    try:
        for _, name in socket.if_nameindex():
            interfaces[name] = []
    except OSError:
        pass
    if sys.platform in ("linux", "android"):
        for name, addresses in interfaces.items():
            addresses.extend(ipv4_address(name))
        for name, address in ipv6_addresses():
            interfaces.setdefault(name, []).append(address)
    elif optional_psutil():
        for name, addresses in optional_psutil().net_if_addrs().items():
            interfaces[name] = [a.address for a in addresses
                                if a.family in (socket.AF_INET, socket.AF_INET6)]
    return interfaces


def ipv4_address(name):
    import fcntl
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = name.encode()[:15].ljust(256, b"\0")     # struct ifreq, the name first
        reply = fcntl.ioctl(probe.fileno(), 0x8915, request)    # SIOCGIFADDR
        return [socket.inet_ntoa(reply[20:24])]
    except OSError:       # no IPv4 address on it
        return []
    finally:
        probe.close()


def ipv6_addresses():
    try:
        rows = [line.split() for line in (read_text(proc_path("net", "if_inet6")) or "")
                .splitlines()]
        return [(row[5], socket.inet_ntop(socket.AF_INET6, bytes.fromhex(row[0])))
                for row in rows if len(row) >= 6]
    except (OSError, ValueError):
        return []


def which(program):
    """shutil.which without importing shutil (and the compressors it pulls in)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def capabilities():
    found = [tool for tool in CAPABILITY_TOOLS if which(tool)]
    return found + [VENV_CAPABILITY] * venv_capable()     # tasks with pip packages


def guess_role(platform, disk):
    """mobile on a phone, storage with a big disk, compute otherwise."""
    if platform == "android":
        return "mobile"
    return "storage" if disk and disk >= STORAGE_DISK_GB else "compute"


# -- battery and temperature ------------------------------------------------------

class Power(object):
    """The battery: {"percent", "charging", "temperature_c"} (each where known),
    or None without one. "charging" means on external power. Read from
    /sys/class/power_supply, else from termux-battery-status, which asks an
    Android app and is slow, so its answer is kept for a while."""

    def __init__(self):
        self.termux = which("termux-battery-status")
        self.kept, self.kept_until = None, 0.0

    def read(self):
        battery = sysfs_battery()
        if battery is None and self.termux:
            if time.monotonic() >= self.kept_until:
                self.kept = self.from_termux()
                self.kept_until = time.monotonic() + TERMUX_BATTERY_AGE
            battery = self.kept
        return battery

    def from_termux(self):
        text = run_quietly([self.termux], timeout=TERMUX_BATTERY_TIMEOUT)
        try:
            status = loads(text) if text else None
        except ValueError:
            status = None
        if not isinstance(status, dict):
            # Without the Termux:API app it hangs or fails: stop asking.
            log("warning", "termux_battery_unavailable", program=self.termux)
            self.termux = None
            return None
        battery = {"percent": status.get("percentage"),
                   "temperature_c": status.get("temperature")}
        if isinstance(status.get("plugged"), str):
            battery["charging"] = status["plugged"].upper() != "UNPLUGGED"
        return {k: v for k, v in battery.items() if v is not None}


def sysfs_battery():
    root = sysfs_path("class", "power_supply")
    supplies = [(name, (read_text(os.path.join(root, name, "type")) or "").strip().lower())
                for name in list_dir(root)]
    batteries = [os.path.join(root, name) for name, kind in supplies if kind == "battery"
                 and read_number(os.path.join(root, name, "present")) != 0]
    if not batteries:
        return None
    directory = batteries[0]
    battery = {"percent": read_number(os.path.join(directory, "capacity"))}
    status = (read_text(os.path.join(directory, "status")) or "").strip().lower()
    powered = any(read_number(os.path.join(root, name, "online")) == 1
                  for name, kind in supplies if kind != "battery")
    if status in ("charging", "full") or powered:
        battery["charging"] = True
    elif status:
        battery["charging"] = False
    tenths = read_number(os.path.join(directory, "temp"))
    if tenths is not None:
        battery["temperature_c"] = round(tenths / 10.0, 1)
    return {k: v for k, v in battery.items() if v is not None}


def temperature_c(battery=None):
    """The hottest thermal zone (or the battery), in °C, or None."""
    root = sysfs_path("class", "thermal")
    readings = [read_number(os.path.join(root, name, "temp"))
                for name in list_dir(root) if name.startswith("thermal_zone")]
    readings = [t / 1000.0 if abs(t) >= 1000 else t for t in readings if t is not None]
    if battery and "temperature_c" in battery:
        readings.append(battery["temperature_c"])
    readings = [t for t in readings if -40 < t < 150]     # a sensor that is not there
    return round(max(readings), 1) if readings else None


# -- load -------------------------------------------------------------------------

def read_cpu_times():
    """(busy, total) jiffies since boot from /proc/stat, or None."""
    try:
        fields = [int(x) for x in read_text(proc_path("stat")).split("\n", 1)[0].split()[1:9]]
        idle = fields[3] + fields[4]      # idle + iowait
    except (AttributeError, ValueError, IndexError):
        return None
    return sum(fields) - idle, sum(fields)


class CpuMeter(object):
    """CPU use of the whole device between two calls, in percent."""

    def __init__(self):
        self.sample = read_cpu_times()

    def percent(self):
        previous, self.sample = self.sample, read_cpu_times()
        if self.sample is None:
            psutil = optional_psutil()
            return psutil.cpu_percent(None) if psutil else None
        if previous is None or self.sample[1] <= previous[1]:
            return None
        return round(100.0 * (self.sample[0] - previous[0]) / (self.sample[1] - previous[1]), 1)


class Metrics(object):
    """What the heartbeat reports. A metric that cannot be read is left out."""

    def __init__(self, power):
        self.cpu = CpuMeter()
        self.power = power

    def sample(self):
        metrics = {}
        for reader in (self.cpu_and_battery, memory_percent, disk_percent, load_avg,
                       disk_io, network_io, uptime):
            try:
                metrics.update(reader() or {})
            except Exception:     # a metric is never worth a crash
                pass
        return {name: value for name, value in metrics.items() if value is not None}

    def cpu_and_battery(self):
        battery = self.power.read() or {}
        return {"cpu_percent": self.cpu.percent(), "battery_percent": battery.get("percent"),
                "charging": battery.get("charging"), "temperature_c": temperature_c(battery)}


def memory_percent():
    meminfo = read_meminfo()
    if meminfo.get("MemTotal") and "MemAvailable" in meminfo:
        return {"memory_percent":
                round(100.0 * (1 - meminfo["MemAvailable"] / float(meminfo["MemTotal"])), 1)}
    psutil = optional_psutil()
    return {"memory_percent": psutil.virtual_memory().percent if psutil else None}


def disk_percent():
    usage = disk_usage()
    return {"disk_percent": round(100.0 * usage[1] / usage[0], 1) if usage and usage[0]
            else None}


def load_avg():
    text = read_text(proc_path("loadavg"))
    if text is not None:
        return {"load_avg": [float(x) for x in text.split()[:3]]}
    if os.path.isdir(PROC_ROOT):      # Android: there, but not for us
        return None
    return {"load_avg": [round(x, 2) for x in os.getloadavg()]}      # macOS


# Block devices whose I/O is already counted on the disks beneath them.
VIRTUAL_DISKS = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")


def disk_io():
    """Bytes read and written since boot on the whole disks."""
    disks = [name for name in list_dir(sysfs_path("block")) if not name.startswith(VIRTUAL_DISKS)]
    text = read_text(proc_path("diskstats"))
    if not disks or text is None:
        return None
    read = written = 0
    for fields in (line.split() for line in text.splitlines()):
        if len(fields) >= 10 and fields[2] in disks:
            read += int(fields[5]) * 512          # sectors are always 512 bytes here
            written += int(fields[9]) * 512
    return {"disk_read_bytes": read, "disk_write_bytes": written}


def network_io():
    """Bytes received and sent since boot on every interface but loopback."""
    text = read_text(proc_path("net", "dev"))
    if text is None:
        return None
    received = sent = 0
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() != "lo" and len(fields) >= 9:
            received += int(fields[0])
            sent += int(fields[8])
    return {"net_bytes_recv": received, "net_bytes_sent": sent}


def uptime():
    text = read_text(proc_path("uptime"))
    if text is not None:
        return {"uptime_s": round(float(text.split()[0]), 1)}
    if contact_clock is not time.monotonic:        # CLOCK_BOOTTIME: time since boot
        return {"uptime_s": round(contact_clock(), 1)}
    return None


###############################################################################
# A good guest: when this device takes new tasks ###############################
###############################################################################
# The owner's rules, from the command line or --config: only while charging,
# only above a battery level, not above a temperature, only when the owner is
# idle, never in quiet hours. Each rule that stops tasks resumes them only past
# a second threshold, so that a device hovering at the limit does not flap.

class Availability(object):
    def __init__(self, options, power):
        self.options = options
        self.power = power
        self.low_battery = False
        self.hot = False
        self.owner = OwnerWatch() if options.idle_minutes else None
        self.hold = ""              # why the main node asked for no new tasks (drain, upgrade)
        self.owner_stopped = False  # the owner's rules, not a hold, stop tasks
        self.available, self.reason = True, ""
        self.rules = ()             # which rules keep it from tasks: their names, in order

    def report(self):
        return {"available": self.available, "reason": self.reason}

    def check(self, own_cpu_seconds=0.0):
        """Look again; True when availability changed, or the rules that keep
        the device from tasks did (a battery charged past its rule on a phone
        now too hot: the main node's reason must not stay "battery" for a
        heartbeat's while). Not when a reason's figure alone moved (the
        owner's seconds of idleness): that waits for the next heartbeat."""
        found = [(name, reason) for name, reason in (
            ("battery", self.battery_rule()), ("temperature", self.temperature_rule()),
            ("owner", self.owner_rule(own_cpu_seconds)),
            ("quiet_hours", self.quiet_hours_rule())) if reason]
        owner_stopped = bool(found)
        if self.hold:
            found.append(("hold", self.hold))
        rules = tuple(name for name, _ in found)
        available, reason = not found, "; ".join(reason for _, reason in found)
        changed = available != self.available or owner_stopped != self.owner_stopped \
            or rules != self.rules
        self.available, self.reason, self.owner_stopped = available, reason, owner_stopped
        self.rules = rules
        return changed

    def options_changed(self):
        """After a reload: watch the owner only if a rule needs it."""
        if not self.options.idle_minutes:
            self.owner = None
        elif self.owner is None:
            self.owner = OwnerWatch()

    def battery_rule(self):
        options = self.options
        if not (options.only_when_charging or options.min_battery is not None):
            return None
        battery = self.power.read() or {}
        reasons = []
        if options.only_when_charging and battery.get("charging") is False:
            reasons.append("not charging")
        percent = battery.get("percent")
        if options.min_battery is not None and percent is not None:
            if self.low_battery:
                self.low_battery = percent < options.resume_battery
            else:
                self.low_battery = percent < options.min_battery
            if self.low_battery:
                reasons.append("battery %g%% (stops below %g%%, resumes at %g%%)"
                               % (percent, options.min_battery, options.resume_battery))
        return "; ".join(reasons)

    def temperature_rule(self):
        limit = self.options.max_temperature
        if limit is None:
            return None
        now = temperature_c(self.power.read())
        if now is None:
            return None
        resume = limit - TEMPERATURE_RESUME_MARGIN
        self.hot = now > resume if self.hot else now > limit
        if self.hot:
            return "temperature %g C (stops above %g C, resumes at %g C)" % (now, limit, resume)
        return None

    def owner_rule(self, own_cpu_seconds):
        if self.owner is None:
            return None
        idle = self.owner.idle_for(own_cpu_seconds)
        wanted = self.options.idle_minutes * 60.0
        if idle >= wanted:
            return None
        return "owner active %d s ago (needs %g min idle)" % (idle, self.options.idle_minutes)

    def quiet_hours_rule(self):
        if not self.options.quiet_hours:
            return None
        start, end = self.options.quiet_hours
        now = time.localtime()
        minute = now.tm_hour * 60 + now.tm_min
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return "quiet hours %02d:%02d-%02d:%02d" % (start // 60, start % 60,
                                                        end // 60, end % 60)
        return None


class OwnerWatch(object):
    """When the owner was last seen: input on the keyboard, the mouse or a
    terminal, or other programs keeping the CPU busy. Best effort: without
    /proc/stat (Android) only input counts, and without either the owner is
    never seen, so the device counts as idle. Until then, the owner is presumed
    present since the worker started."""

    def __init__(self):
        self.seen = time.monotonic()
        self.input = input_activity()
        self.cpu = read_cpu_times()
        self.own = None

    def idle_for(self, own_cpu_seconds):
        now = time.monotonic()
        mark = input_activity()
        if mark != self.input:
            self.input = mark
            self.seen = now
        if self.others_busy(own_cpu_seconds):
            self.seen = now
        return now - self.seen

    def others_busy(self, own_cpu_seconds):
        """Did programs other than the worker and its tasks use the CPU?"""
        previous, self.cpu = self.cpu, read_cpu_times()
        own_before, self.own = self.own, own_cpu_seconds
        if previous is None or self.cpu is None or own_before is None \
                or self.cpu[1] <= previous[1]:
            return False
        try:
            ticks = os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError, AttributeError):
            ticks = 100
        busy = self.cpu[0] - previous[0] - (own_cpu_seconds - own_before) * ticks
        return 100.0 * busy / (self.cpu[1] - previous[1]) > OWNER_CPU_BUSY


INPUT_INTERRUPTS = ("i8042", "keyboard", "mouse", "touchpad", "hid", "kbd")


def input_activity():
    """Something that changes when someone types or moves the mouse: the
    interrupt counts of input devices, and when a terminal last had input
    (what `w` shows as IDLE)."""
    counts = []
    for line in (read_text(proc_path("interrupts")) or "").splitlines():
        if any(word in line.lower() for word in INPUT_INTERRUPTS):
            counts.append(sum(int(x) for x in line.split()[1:] if x.isdigit()))
    last_input = 0.0
    for directory in ("/dev/pts", "/dev"):
        for name in list_dir(directory):
            if directory == "/dev/pts" or name.startswith("tty"):
                try:
                    last_input = max(last_input, os.stat(os.path.join(directory, name)).st_atime)
                except OSError:
                    pass
    return tuple(counts), last_input


def own_cpu_seconds(task_sessions):
    """CPU seconds used by the worker, its finished tasks and the processes of
    the tasks still running (each in a session whose id is its leader's pid)."""
    times = os.times()
    total = times[0] + times[1] + times[2] + times[3]
    if not task_sessions:
        return total
    try:
        ticks = float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return total
    for pid in list_dir(PROC_ROOT):
        if pid.isdigit():
            fields = (read_text(proc_path(pid, "stat")) or ")").rsplit(")", 1)[1].split()
            if len(fields) > 12 and fields[3].isdigit() and int(fields[3]) in task_sessions:
                total += (int(fields[11]) + int(fields[12])) / ticks
    return total


###############################################################################
# Tasks #######################################################################
###############################################################################

class BadPayload(Exception):
    """The payload lacks the field this task type needs (or, `device_fault`,
    its inputs found no room on this device)."""

    def __init__(self, message, device_fault=False):
        Exception.__init__(self, message)
        self.device_fault = device_fault


# fork's errors at a task's start: the device has no process (a task used up
# a container's pids limit) or no memory to give it. Another device may run it.
NO_PROCESS_ERRORS = (errno.EAGAIN, errno.ENOMEM)


# A file this device cannot hold: its disk or quota full, or a file larger
# than its file system takes (FAT32 on a Pi's or a phone's SD card: 4 GiB)
# or than the worker's own `ulimit -f` (EFBIG: Python ignores SIGXFSZ).
DISK_FULL_ERRORS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def disk_full(error):
    """Whether an error is the device's storage failing it (DISK_FULL_ERRORS):
    not the task's fault, so that another device may run it."""
    if isinstance(error, FilesError):
        return error.code == "disk_full"
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRORS


def disk_full_words(error):
    """What disk_full's error means, for a task's error and its owner."""
    if error.errno == errno.EFBIG:
        return "a file too large for this device (its file system, or the worker's" \
               " ulimit -f): %s" % error
    return "the device's disk is full: %s" % error


def cannot_start_here(error):
    """Whether a task failed to start for want of the device's disk,
    processes or memory (see disk_full, NO_PROCESS_ERRORS)."""
    return disk_full(error) or isinstance(error, OSError) and error.errno in NO_PROCESS_ERRORS


def result_data(key, status, error=None, output="", stderr="", exit_code=None,
                execution_time=0.0, cpu_time=0.0, peak_memory_kb=None, truncated=False,
                environment_failed=False, device_fault=False):
    """The data of a task_result. `environment_failed`: its pip packages
    would not install here; `device_fault`: it could not start for want of
    disk here. Either way the main node sends the next attempt elsewhere."""
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS]
    result = {"output": output, "stderr": stderr, "exit_code": exit_code,
              "execution_time": execution_time, "cpu_time": cpu_time,
              "peak_memory_kb": peak_memory_kb, "truncated": truncated}
    if environment_failed:
        result["environment_failed"] = True
    if device_fault:
        result["device_fault"] = True
    return {"task_id": key[0], "attempt": key[1], "status": status, "error": error,
            "result": result}


def fit_result(data, sender_id):
    """Cut output and stderr until the task_result frame fits in MAX_FRAME_BYTES."""
    result = data["result"]
    if len(result["output"]) + len(result["stderr"]) < MAX_FRAME_BYTES // 8:
        return data     # cannot be too long even if every character were escaped
    while True:
        excess = len(encode_frame(TASK_RESULT, data, sender_id, False)) - MAX_FRAME_BYTES
        if excess <= 0:
            return data
        result["truncated"] = True
        # Each character encodes to at least one byte, so cutting `excess`
        # characters (stderr first, it matters less) saves at least as many bytes.
        cut = excess + 64
        for name in ("stderr", "output"):
            take = min(cut, len(result[name]))
            result[name] = result[name][:len(result[name]) - take]
            cut -= take


class Task(object):
    """One attempt of a task on this device, from task_assign to task_result."""
    task_type = None
    quiet = False           # log its start and end at debug level only
    argument_types = (str,)

    def __init__(self, key, payload, timeout):
        self.key = key
        self.payload = payload if isinstance(payload, dict) else {}
        self.timeout = timeout
        self.started = None
        self.deadline = None
        self.received = time.monotonic()

    def argument(self):
        name = PAYLOAD_FIELD[self.task_type]
        value = self.payload.get(name)
        if not isinstance(value, self.argument_types) or isinstance(value, bool):
            kind = "a string" if self.argument_types == (str,) else "a number"
            raise BadPayload("payload field %r must be %s" % (name, kind))
        return value

    def elapsed(self):
        return round(time.monotonic() - self.started, 6) if self.started else 0.0

    def start(self, worker):
        raise NotImplementedError

    def wake_at(self):
        """When on_time must run next (monotonic seconds), or None."""
        return None

    def on_time(self, worker, now):
        pass

    def poll(self, worker):
        """Look for an exited child process."""

    def stop(self, worker, outcome):
        worker.finish(self, outcome, error=outcome.replace("_", " "))

    def abandon(self, worker):
        """Stop at once, leave nothing behind, and report nothing."""


class EchoTask(Task):
    task_type = "echo"
    # The unit of the throughput benchmark: a log line per echo would cost
    # more than the echo itself.
    quiet = True

    def start(self, worker):
        worker.finish(self, OUTCOME_COMPLETED, output=self.argument())


class SystemInfoTask(Task):
    task_type = "system_info"

    def start(self, worker):
        info = worker.profile()
        info["system_metrics"] = worker.metrics.sample()
        worker.finish(self, OUTCOME_COMPLETED, output=dumps(info).decode("utf-8"))


class SleepTask(Task):
    """Waits in the loop's timers, so it holds a slot but no thread or process."""
    task_type = "sleep"
    argument_types = (int, float)

    def start(self, worker):
        seconds = self.argument()
        if seconds < 0:
            raise BadPayload("payload field 'seconds' must not be negative")
        self.until = self.started + seconds

    def wake_at(self):
        return min(self.until, self.deadline) if self.deadline else self.until

    def on_time(self, worker, now):
        if self.deadline is not None and self.deadline < self.until:
            worker.finish(self, OUTCOME_TIMED_OUT, error="timed out after %g s" % self.timeout)
        else:
            worker.finish(self, OUTCOME_COMPLETED)


class WorkDirs(object):
    """Empty directories for process tasks to run in, 0700 and owned by the
    task's uid, under this worker's task root (see task_root). One that a task
    leaves as it found it (empty, a directory of ours, mode 0700) goes to the
    next task of the same uid instead of being removed and made anew: rmdir
    and mkdtemp took ~0.3 ms of the worker's ~1.7 ms per `shell true` task on
    ext4 under load."""

    def __init__(self, keep, root):
        self.keep = keep         # spare directories kept at most: one per slot
        self.root = root
        self.spare = []          # (path, uid)

    def take(self, uid=None, gid=None):
        for number, (path, owner) in enumerate(self.spare):
            if owner == uid:
                return self.spare.pop(number)[0]
        import tempfile
        path = tempfile.mkdtemp(prefix="rc-task-", dir=self.root)
        if uid is not None:
            os.chown(path, uid, uid if gid is None else gid)
        return path

    @staticmethod
    def adopt(path, uid=None, gid=None):
        """A directory the worker made and filled before the task started
        (files: inputs, stdin, a restored checkpoint), handed to the task's
        uid: it and what the worker made in it become the task's, except
        hard links to the cache's blobs, which stay read-only and the
        worker's. No process of that uid reaches it before this is done:
        it was 0700 and the worker's until now."""
        import stat
        if uid is None:
            return path
        gid = uid if gid is None else gid
        for directory, dirs, files in os.walk(path):      # links are not followed
            too_deep(path, directory, dirs)
            for name in dirs + files:
                entry = os.path.join(directory, name)
                info = os.lstat(entry)
                if stat.S_ISDIR(info.st_mode) or (stat.S_ISREG(info.st_mode)
                                                  and info.st_nlink == 1):
                    os.chown(entry, uid, gid, follow_symlinks=False)
        os.chown(path, uid, gid)
        return path

    def give_back(self, path, uid=None):
        if len(self.spare) < self.keep and self.as_made(path, uid):
            self.spare.append((path, uid))
        else:
            remove_dir(path, REMOVER.remove)

    @classmethod
    def as_made(cls, path, uid=None):
        """Empty but for an empty checkpoint directory (files: Files.launch
        makes one for each task), each a directory of the uid, 0700. Read
        entry by entry: a task may leave a million names."""
        try:
            if not cls.plain_dir(path, uid):
                return False
            with os.scandir(path) as listing:
                return all(entry.name == CHECKPOINT_DIR and cls.plain_dir(entry.path, uid)
                           and cls.empty(entry.path) for entry in listing)
        except (OSError, AttributeError):       # gone, or no getuid (not Unix)
            return False

    @staticmethod
    def empty(path):
        with os.scandir(path) as listing:
            return next(listing, None) is None

    @staticmethod
    def plain_dir(path, uid):
        import stat
        info = os.lstat(path)
        return (stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
                and info.st_uid == (os.getuid() if uid is None else uid))

    def clear(self):
        for path, _ in self.spare:
            remove_dir(path)
        self.spare = []


def remove_dir(path, remove=None):
    """A task directory gone: at once when empty, as most are, else by
    `remove` (remove_tree, or REMOVER.remove: off the loop)."""
    try:
        try:
            os.rmdir(os.path.join(path, CHECKPOINT_DIR))     # empty, as most are
        except OSError:
            pass
        os.rmdir(path)      # most tasks leave nothing: half the time of rmtree
    except OSError:
        (remove or remove_tree)(path)


def utf8_whole(data):
    """How many bytes of `data` end on a whole UTF-8 character: those of a
    character cut short at its end are left for the next read."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if 0xC0 <= byte < 0xF8:        # a lead byte: is its character whole?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
        if byte >= 0xF8:
            break
    return len(data)        # continuation bytes only, or no UTF-8: sent as it is


class ProcessTask(Task):
    """Runs a child process in its own process group and an empty directory
    of its own (see WorkDirs)."""
    proc = None
    workdir = None
    ending = None            # timed_out or cancelled, once decided from outside
    exit_code = None
    reaped = False
    environment_failed = False   # its pip packages would not install here
    environment_building = False  # its own uid builds them: the worker adopts them
    drain_until = None
    truncated = False
    cpu_time = 0.0
    peak_memory_kb = None
    limits = ()              # task_rlimits(), once started
    jail = None              # Sandbox.open(), from start until closed
    env = {}                 # files: what its process gets besides the sandbox's (launch)
    memory_limit = None      # MiB (--max-memory), for the error of a task that ran out
    file_limit = None        # MiB (--max-file-size)
    # Stdout is read line by line for PROGRESS lines (see parse_progress).
    unfinished = b""         # the start of a line that may yet be a PROGRESS line
    line_start = True        # the next byte of stdout begins a line
    progress = None          # the latest task_progress data, not sent yet
    progress_sent = float("-inf")   # when the previous one was sent (monotonic seconds)
    watched_until = None     # monotonic seconds someone wants its output until (task_watch)
    tail_at = 0.0            # when the next task_output may go (monotonic seconds)

    def command(self, value):
        """The argv; may write files into self.workdir."""
        raise NotImplementedError

    spawned = True           # started by the spawner where there is one (see Spawner)

    def spawn_request(self, value):
        """What the spawner runs for this task: by default the argv of
        command(); Python tasks ask it to run their code itself."""
        return {"argv": self.command(value)}

    def popen_env(self, worker, preexec):
        """subprocess's env: None where preexec sets the task's own, else
        the tasks' environment (Sandbox.environment) with the task's added."""
        return None if preexec else dict(worker.sandbox.environment(), **self.env)

    def preexec(self, worker):
        """What runs in the child between fork and exec: the tasks'
        environment instead of the worker's, entering the sandbox, setting
        the limits."""
        jail, limits, env, base = self.jail, self.limits, self.env, worker.sandbox.environment()
        # The payload's env last: what the task asks for wins over the sandbox's PATH.
        return lambda: (replace_environ(base), enter_sandbox(jail), os.environ.update(env),
                        apply_rlimits(limits))

    def start(self, worker):
        import subprocess
        value = None if runs_file(self) else self.argument()   # files: a script from a file
        self.limits = task_rlimits(self.timeout, worker.options)
        try:
            self.jail = worker.sandbox.open(worker, self)   # adopts a staged directory
            self.workdir = self.jail["cwd"]
            if self.jail["nproc"]:
                self.limits.append(["RLIMIT_NPROC", self.jail["nproc"]])
            extra = worker.files.launch(self, worker)       # files: env, stdin, script file
            request = extra.pop("request", None)
            self.env = extra["env"]
            if self.payload.get(PIP_FIELD) is not None:     # its environment first
                request = worker.python_environments().request(
                    self, request, value, worker.sandbox.environment())
            if self.spawned and worker.spawner.usable():
                self.proc = worker.spawner.spawn(worker, dict(
                    request or self.spawn_request(value), cwd=self.workdir, limits=self.limits,
                    jail=self.jail, **extra))
            if self.proc is None:      # a process of our own
                preexec = self.preexec(worker)
                with TaskStdin(extra["stdin"]) as stdin:
                    self.proc = subprocess.Popen(
                        request["argv"] if request else self.command(value), cwd=self.workdir,
                        stdin=stdin, env=self.popen_env(worker, preexec),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                        preexec_fn=preexec)
        except (OSError, ValueError, BadPayload, subprocess.SubprocessError) as e:
            self.remove_workdir(worker)
            worker.finish(self, OUTCOME_FAILED, error="cannot start: %s" % e,
                          device_fault=cannot_start_here(e))
            return
        # A spawned one's pid comes with the spawner's answer (Spawner.started).
        if self.proc.pid is not None and self.watched_group():
            worker.watchdog.group_started(self.proc.pid)
        self.memory_limit = worker.options.max_memory
        self.file_limit = worker.options.max_file_size
        self.cap = worker.options.output_cap
        self.pipes = {}         # fd -> file object, while open
        self.buffers = {}       # fd -> what was read, up to the cap
        self.seen = {}          # fd -> bytes of it so far (kept, spilled or not)
        self.recent = {}        # fd -> its last TAIL_BYTES, once past the cap
        self.tail_sent = {}     # fd -> (byte, text byte) the last task_output of it ended at
        self.stream_fds = (self.proc.stdout.fileno(), self.proc.stderr.fileno())
        for pipe in (self.proc.stdout, self.proc.stderr):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.pipes[fd] = pipe
            self.buffers[fd] = bytearray()
            worker.selector.register(fd, selectors.EVENT_READ,
                                     lambda mask, fd=fd: self.on_output(worker, fd))

    def on_output(self, worker, fd):
        if fd not in self.pipes:     # closed earlier in this turn of the loop
            return
        try:
            chunk = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close_pipe(worker, fd)
            self.maybe_done(worker)
            return
        if fd == self.stream_fds[0]:
            chunk = self.without_progress(worker, chunk)
        self.keep(fd, chunk)

    def keep(self, fd, chunk):
        buffer = self.buffers[fd]
        self.seen[fd] = self.seen.get(fd, 0) + len(chunk)
        room = self.cap - len(buffer)
        if len(chunk) > room:
            spill_stream(self, fd, buffer, chunk)    # files: the whole stream, to a file
            # Keep reading and discarding, or a chatty child would block on a full pipe.
            self.truncated = True
            recent = self.recent.setdefault(fd, bytearray(buffer[-TAIL_BYTES:]))
            recent += chunk
            del recent[:-TAIL_BYTES]
            chunk = chunk[:max(room, 0)]
        buffer += chunk

    def watch(self, seconds):
        """Someone wants its output as it comes: task_output every
        TAIL_INTERVAL for `seconds`, starting with what it wrote so far."""
        now = time.monotonic()
        self.watched_until = now + min(max(0.0, seconds), TAIL_WATCH_MAX)
        self.tail_at = min(self.tail_at, now)

    def tail_due(self):
        """When the next task_output may go (monotonic seconds), or None."""
        if self.watched_until is None or self.reaped or self.ending \
                or time.monotonic() >= self.watched_until:
            return None
        seen = getattr(self, "seen", {})
        if all(seen[fd] <= self.tail_sent.get(fd, (0,))[0] for fd in seen):
            return max(self.tail_at, time.monotonic() + TAIL_INTERVAL)   # look again then
        return self.tail_at

    def send_tail(self, worker, now):
        """A task_output for each stream that grew since the last one: the
        bytes since, at most the latest TAIL_BYTES, as text (a character cut
        at the end waits for the next). Its offsets count the text's UTF-8
        bytes, as the result's output will (an undecodable byte is U+FFFD's
        three): rc tail takes the new part of the text by them."""
        due = self.tail_due()
        if due is None or now < due:
            return
        self.tail_at = now + TAIL_INTERVAL
        for index, fd in enumerate(getattr(self, "stream_fds", ())):
            sent, end = self.tail_sent.get(fd, (0, 0)), self.seen.get(fd, 0)
            if end <= sent[0]:
                continue
            source = self.recent.get(fd, self.buffers[fd])     # holds bytes up to `end`
            start = max(sent[0], end - len(source), end - TAIL_BYTES)
            data = bytes(source[len(source) - (end - start):])
            whole = utf8_whole(data)
            if not whole:
                continue
            text = data[:whole].decode("utf-8", "replace")
            at = sent[1] + start - sent[0]        # bytes skipped count as they came
            self.tail_sent[fd] = (start + whole, at + len(text.encode("utf-8")))
            worker.tell(TASK_OUTPUT, {"task_id": self.key[0], "attempt": self.key[1],
                                      "stream": ("stdout", "stderr")[index], "start": at,
                                      "end": self.tail_sent[fd][1], "data": text})

    def without_progress(self, worker, chunk):
        """Stdout less its PROGRESS lines, which become task_progress frames."""
        data = self.unfinished + chunk
        end = data.rfind(b"\n") + 1
        lines, tail = data[:end], data[end:]
        if PROGRESS_MARK in lines:
            lines = self.take_progress(worker, lines)
        # Hold back an unfinished line only while it may still be a PROGRESS
        # line, so that memory stays bounded and the output in order.
        if ((self.line_start or end) and len(tail) < PROGRESS_LINE_MAX
                and (tail.startswith(PROGRESS_MARK) or PROGRESS_MARK.startswith(tail))):
            self.unfinished, self.line_start = tail, True
            return lines
        self.unfinished, self.line_start = b"", False
        return lines + tail

    def take_progress(self, worker, lines):
        kept = []
        for number, line in enumerate(lines[:-1].split(b"\n")):
            parsed = None
            if ((number or self.line_start) and line.startswith(PROGRESS_MARK)
                    and len(line) < PROGRESS_LINE_MAX):
                parsed = parse_progress(line)
            if parsed is None:
                kept.append(line + b"\n")
            else:
                self.progress = {"task_id": self.key[0], "attempt": self.key[1],
                                 "progress": parsed[0], "message": parsed[1]}
                self.send_progress(worker, time.monotonic())
        return b"".join(kept)

    def progress_due(self):
        """When the latest progress may be sent (monotonic seconds), or None."""
        if self.progress is None or self.reaped or self.ending:
            return None     # nothing new, or the result (which implies 100) comes next
        return self.progress_sent + PROGRESS_INTERVAL

    def send_progress(self, worker, now):
        due = self.progress_due()
        if due is not None and now >= due:
            worker.tell(TASK_PROGRESS, self.progress)
            self.progress, self.progress_sent = None, now

    def close_pipe(self, worker, fd):
        worker.selector.unregister(fd)
        self.pipes.pop(fd).close()
        if fd == self.stream_fds[0]:        # a last line without a newline is output
            self.keep(fd, self.unfinished)
            self.unfinished = b""

    def poll(self, worker):
        if self.proc is None or self.reaped:
            return
        if self.environment_building and self.proc.pid is not None:
            worker.environments.adopt_built(self)    # its pip packages: see Environments
        pid = self.proc.pid
        if isinstance(self.proc, SpawnedChild):
            if self.proc.error is not None:
                self.not_started(worker, self.proc.error)
                return
            ended = worker.spawner.exits.pop(pid, None)
            if ended is None:
                return
            self.record_exit(worker, (pid,) + ended)
        elif hasattr(os, "waitid"):
            ended = reap_if_ended(pid)
            if ended is not None:
                self.record_exit(worker, ended)
        else:
            status = os.wait4(pid, os.WNOHANG)
            if status[0] == 0:
                return
            kill_group(pid)
            self.record_exit(worker, status)
        self.drain_until = time.monotonic() + DRAIN_GRACE
        self.maybe_done(worker)

    def record_exit(self, worker, wait_status):
        """Take what os.wait4() says (the spawner sends the same, in numbers)."""
        _, status, usage = wait_status
        self.reaped = True
        if self.watched_group():
            worker.watchdog.group_ended(self.proc.pid)
        worker.sandbox.end(worker, self)       # whatever it left running, however detached
        self.exit_code = exit_code(status)
        self.proc.returncode = self.exit_code    # so subprocess never waits for it again
        self.cpu_time, self.peak_memory_kb = usage_figures(usage)

    def wake_at(self):
        if self.reaped:
            return self.drain_until
        times = [t for t in (self.deadline, self.progress_due(), self.tail_due())
                 if t is not None]
        return None if self.ending or not times else min(times)

    def on_time(self, worker, now):
        self.send_progress(worker, now)
        self.send_tail(worker, now)
        if self.reaped:
            if now >= self.drain_until:   # something it started still holds its pipes open
                self.conclude(worker)
        elif self.deadline is not None and now >= self.deadline:
            self.stop(worker, OUTCOME_TIMED_OUT)

    def stop(self, worker, outcome):
        if self.ending or self.proc is None:
            return
        self.ending = outcome
        if self.proc.pid is None:
            # The spawner starts it all the same: ended when it answers, it
            # concludes once reaped, and its uid is not lent again before.
            self.proc.doomed = True
        elif self.reaped:
            self.conclude(worker)
        else:
            worker.sandbox.end(worker, self)     # poll() reaps it and concludes

    def not_started(self, worker, error):
        self.reaped = True
        if self.ending:         # cancelled or timed out as it started: as it was
            self.conclude(worker)
            return
        for fd in list(self.pipes):
            self.close_pipe(worker, fd)
        self.remove_workdir(worker)
        worker.finish(self, OUTCOME_FAILED, error="cannot start: %s" % error,
                      device_fault=self.proc.error_number in NO_PROCESS_ERRORS)

    def maybe_done(self, worker):
        if self.reaped and not self.pipes:
            self.conclude(worker)

    def conclude(self, worker):
        for fd in list(self.pipes):
            self.close_pipe(worker, fd)
        stdout, stderr = [bytes(self.buffers[fd]).decode("utf-8", "replace")
                          for fd in self.stream_fds]
        status, error = self.outcome(stderr)
        if status == OUTCOME_TIMED_OUT and getattr(self, "environment", None) \
                and not worker.environments.whole(self.environment):
            # pip's words are kept for a failed build only: nothing else says it.
            error += (" while building its Python environment (pip); a longer --timeout"
                      " lets the first build finish (docs/environments.md)")
        extra = {"environment_failed": True} if self.environment_failed else {}
        worker.finish(self, status, error=error, output=self.output_text(stdout),
                      stderr=stderr, exit_code=self.exit_code, cpu_time=self.cpu_time,
                      peak_memory_kb=self.peak_memory_kb, truncated=self.truncated, **extra)
        if worker.environments is not None:     # while the task's uid is still known
            worker.environments.after(self)
        self.remove_workdir(worker)     # after finish: files may take it for the upload

    def outcome(self, stderr):
        if self.ending == OUTCOME_TIMED_OUT:
            return OUTCOME_TIMED_OUT, "timed out after %g s" % self.timeout
        if self.ending == OUTCOME_CANCELLED:
            return OUTCOME_CANCELLED, "cancelled"
        if self.exit_code == 0:
            return OUTCOME_COMPLETED, None
        if self.exit_code == VENV_FAILED_EXIT and VENV_FAILED_MARK in stderr \
                and self.payload.get(PIP_FIELD) is not None:
            self.environment_failed = True      # the device's fault: another may try
            load_region("environments")     # loaded by its start: see python_environments
            return OUTCOME_FAILED, environment_error(stderr)
        return OUTCOME_FAILED, self.failure(stderr)

    def failure(self, stderr):
        if self.exit_code == -getattr(signal, "SIGXFSZ", 0) and self.file_limit:
            return "file size limit exceeded (limit %d MiB)" % self.file_limit
        if self.exit_code == -getattr(signal, "SIGXCPU", 0):
            return "CPU time limit exceeded"
        if self.exit_code < 0:
            error = "killed by signal %d" % -self.exit_code
        else:
            error = "exit status %d" % self.exit_code
        return self.memory_hint(error, stderr)

    def memory_hint(self, error, stderr):
        """Say so when the task probably ran out of its memory limit: an
        allocation failed, or it died of a signal that a failed one causes."""
        if not self.memory_limit:
            return error
        tail = stderr[-4000:].lower()
        if any(sign in tail for sign in OUT_OF_MEMORY_SIGNS):
            return "out of memory (limit %d MiB): %s" % (self.memory_limit, error)
        if self.exit_code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGKILL):
            return "%s; the task may have hit its memory limit (%d MiB)" % (error,
                                                                         self.memory_limit)
        return error

    def output_text(self, stdout):
        return stdout

    def abandon(self, worker):
        spawned = isinstance(self.proc, SpawnedChild) and not self.reaped
        if spawned:
            if self.jail is not None:
                worker.sandbox.end(worker, self)
            # Its uid and directory are lent again once the spawner has
            # reaped it (Spawner.forget): its end kills what the uid runs.
            self.proc.release = lambda: self.remove_workdir(worker)
            worker.spawner.forget(worker, self.proc)
        elif self.proc is not None and not self.reaped:
            worker.sandbox.end(worker, self)
            try:
                self.record_exit(worker, os.wait4(self.proc.pid, 0))
            except ChildProcessError:
                if self.watched_group():
                    worker.watchdog.group_ended(self.proc.pid)
        for fd in list(getattr(self, "pipes", ())):
            self.close_pipe(worker, fd)
        if not spawned:
            self.remove_workdir(worker)

    def watched_group(self):
        return group_watched(self.jail)

    def remove_workdir(self, worker):
        """Give back its directory, uid and cgroup (see Sandbox.close)."""
        if self.jail is not None:
            worker.sandbox.close(worker, self)
            self.jail = self.workdir = None

    def write(self, name, text):
        """A file of the worker's for the task's command (its code, its
        requirements): the task's own, as its directory is, so that a task of
        another uid reads it whatever the worker's umask."""
        path = os.path.join(self.workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        jail = self.jail or {}
        if jail.get("uid") is not None:
            os.chown(path, jail["uid"], jail["gid"])
        return name


# What a task's stderr says when an allocation failed (Python, C, C++, shells).
OUT_OF_MEMORY_SIGNS = ("memoryerror", "cannot allocate memory", "out of memory",
                       "bad_alloc", "memory exhausted")


def task_rlimits(timeout, options):
    """The task's rlimits as [name, value] pairs: no core dumps, a CPU-time
    limit a little past the timeout (the worker's own timer normally acts
    first; this covers a worker that died), address space, open files and
    file size."""
    cpu_seconds = int(timeout) + 1 + CPU_LIMIT_MARGIN if timeout else None
    limits = [("RLIMIT_CORE", 0), ("RLIMIT_CPU", cpu_seconds),
              ("RLIMIT_AS", options.max_memory * 1048576 if options.max_memory else None),
              ("RLIMIT_NOFILE", TASK_OPEN_FILES),
              ("RLIMIT_FSIZE", options.max_file_size * 1048576 if options.max_file_size
               else None)]
    return [[name, value] for name, value in limits if value is not None]


def apply_rlimits(limits):
    """Set task_rlimits() in the task's process, before it runs anything."""
    try:
        import resource
    except ImportError:
        return
    for _, which, soft, hard in rlimit_values(resource, limits):
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass      # not on this OS (macOS refuses RLIMIT_AS): run without it


def rlimit_values(resource, limits):
    """task_rlimits as (name, resource, soft, hard), however they are set
    (apply_rlimits, ulimit_commands, spawn_simple): none higher than the
    hard limit now; CPU time's hard a second past its soft (SIGXCPU at the
    soft limit, SIGKILL a second later)."""
    found = []
    for name, value in limits:
        which = getattr(resource, name, None)
        if which is None:
            continue
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        extra = 1 if name == "RLIMIT_CPU" else 0
        if hard == resource.RLIM_INFINITY or hard > value + extra:
            hard = value + extra
        found.append((name, which, value, hard))
    return found


ULIMIT_OPTIONS = {"RLIMIT_CORE": ("c", 512), "RLIMIT_CPU": ("t", 1), "RLIMIT_AS": ("v", 1024),
                  "RLIMIT_NOFILE": ("n", 1), "RLIMIT_FSIZE": ("f", 512),
                  "RLIMIT_NPROC": ("u", 1)}


def shell_limits(limits, made={}):
    """task_rlimits as the `ulimit` commands a POSIX shell runs on itself
    first, on the command's first line (so its line numbers stay); each as
    apply_rlimits would set it, and as there, one that fails is skipped.
    Made once for each set of limits (tasks of one worker share theirs)."""
    key = tuple(tuple(limit) for limit in limits)
    if key not in made:
        if len(made) > 64:
            made.clear()
        made[key] = ulimit_commands(limits)
    return made[key]


def ulimit_commands(limits):
    try:
        import resource
    except ImportError:
        return ""
    commands = []
    for name, _, value, hard in rlimit_values(resource, limits):
        option, unit = ULIMIT_OPTIONS[name]
        if name == "RLIMIT_CPU" and hard > value:
            # Soft first, as the hard limit may not go below it.
            commands.append("ulimit -S -t %d 2>/dev/null; ulimit -H -t %d 2>/dev/null; "
                            % (value, hard))
        elif name == "RLIMIT_NPROC":      # bash says -u, dash -p
            commands.append("ulimit -u %d 2>/dev/null || ulimit -p %d 2>/dev/null; "
                            % (value, value))
        else:
            commands.append("ulimit -%s %d 2>/dev/null; " % (option, value // unit))
    return "".join(commands)


def exit_code(wait_status):
    """The exit status, or minus the signal that killed the process."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def usage_figures(usage):
    """CPU seconds and peak memory (KiB) from a resource usage (os.wait4)."""
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    divisor = 1024 if sys.platform == "darwin" else 1
    return round(usage.ru_utime + usage.ru_stime, 6), int(usage.ru_maxrss // divisor)


def python_executable():
    """The interpreter of Python tasks (and of the spawner that forks them):
    this one, unless the sandbox found that tasks cannot read its library."""
    return task_python[0] if task_python else sys.executable or which("python3") or "python3"


task_python = []     # [path] once Sandbox.prepare chose another interpreter for tasks


# Evaluates expression.txt in the child and prints repr() of the value.
EVAL_DRIVER = (
    "import sys\n"
    "with open(sys.argv[1], encoding='utf-8') as f:\n"
    "    source = f.read()\n"
    "value = eval(compile(source, '<expression>', 'eval'), {'__name__': '__main__'})\n"
    "sys.stdout.write(repr(value) + '\\n')\n")


# What Python prints of a task's code it could not compile has no traceback.
SYNTAX_ERRORS = ("SyntaxError:", "IndentationError:", "TabError:")


class PythonTask(ProcessTask):
    def failure(self, stderr):
        # An uncaught exception: its last line ("ZeroDivisionError: ...") says it best.
        lines = [line for line in stderr.splitlines() if line.strip()]
        if lines and ("Traceback (most recent call last)" in stderr
                      or lines[-1].startswith(SYNTAX_ERRORS)):
            last = lines[-1]
            if last.startswith("MemoryError") and self.memory_limit:
                return "MemoryError: out of memory (limit %d MiB)" % self.memory_limit
            return last
        return ProcessTask.failure(self, stderr)


class PythonEvalTask(PythonTask):
    task_type = "python_eval"

    def command(self, expression):
        return [python_executable(), "-I", "-c", EVAL_DRIVER,
                self.write("expression.txt", expression)]

    def spawn_request(self, expression):
        return {"eval": expression}

    def output_text(self, stdout):
        return stdout[:-1] if stdout.endswith("\n") else stdout


class PythonExecTask(PythonTask):
    task_type = "python_exec"

    def command(self, code):
        return [python_executable(), "-I", self.write("script.py", code)]

    def spawn_request(self, code):
        return {"exec": code, "filename": self.write("script.py", code)}


SIMPLE_COMMAND_MAX = 4096     # characters: a longer command goes to the shell (simple_command)
COMMAND_ARGUMENT_MAX = 64 * 1024   # bytes of a shell command given as `sh -c`'s argument
COMMAND_FILE = "command.sh"   # ... and where a longer one goes, in the task's directory


class ShellTask(ProcessTask):
    """The shell sets the limits on itself (`ulimit`) before it runs the
    command, so no Python need run between fork and exec: the spawner (or
    subprocess) can then use posix_spawn/vfork, which makes a shell task about
    twice as cheap to start."""
    task_type = "shell"
    shell = None            # found on PATH once: the search costs a stat per entry

    def command(self, command):
        if ShellTask.shell is None:
            ShellTask.shell = which("sh") or "/bin/sh"
        if len(command.encode("utf-8", "surrogateescape")) > COMMAND_ARGUMENT_MAX:
            # Too long for one argument (Linux takes 128 KiB): the same shell
            # reads it from a file instead, once it has set its limits.
            return [ShellTask.shell, "-c", shell_limits(self.limits) + ". ./" +
                    self.write(COMMAND_FILE, command)]
        return [ShellTask.shell, "-c", shell_limits(self.limits) + command]

    def spawn_request(self, command):
        # The spawner may exec it straight away (posix_spawn): it limits itself;
        # a simple command it may start without the shell (simple_command).
        request = {"argv": self.command(command), "self_limiting": True}
        if len(command) <= SIMPLE_COMMAND_MAX:
            request["command"] = command
        return request

    def preexec(self, worker):
        if needs_child_setup(self.jail):
            env, base = self.env, worker.sandbox.environment()
            return lambda jail=self.jail: (replace_environ(base), enter_sandbox(jail),
                                           os.environ.update(env))
        return None


TASK_CLASSES = {cls.task_type: cls for cls in (
    EchoTask, SleepTask, SystemInfoTask, PythonEvalTask, PythonExecTask, ShellTask)}

###############################################################################
# The sandbox: whom a task runs as, what it sees, and the end of all it starts
###############################################################################
# Each answered as well as the platform allows; `worker.py --self-test` says
# which answer is in force here.
# - Whom: as root (or with --task-user) each running task gets a uid of its
#   own, so it reads neither the worker's 0600/0700 files (state dir, token
#   file) nor another task's directory. Otherwise it runs as the worker's user.
# - What it sees: with --isolate (or --hide/--read-only), a mount namespace (in
#   a user namespace when not root) with the state dir, the home directory and
#   each --hide path covered by an empty tmpfs, each --read-only path read-only,
#   and with --isolate-network no network but a loopback that is down; and a
#   PID namespace with a /proc of its own, where the kernel allows one, so that
#   the task sees and signals none but its own processes.
# - The end of all it starts: with a uid of its own, every process of that
#   uid; else a cgroup v2 per task where the worker may make one (cgroup.kill);
#   else the spawner is a child subreaper that follows each task's tree in
#   /proc, so that setsid, double forks and nohup do not escape. The process
#   group is killed in every case, and RLIMIT_NPROC bounds a fork bomb. The
#   spawner is a subreaper in every case: what a task leaves running comes
#   back to it, so it knows when there is anything to kill.

TASK_MARK = "RC_TASK_MARK"      # environment variable naming a task's first process
# A task's environment starts from these of the worker's, no more, as sudo's
# env_reset and a systemd service's do: the worker's own may hold its owner's
# secrets (cloud keys, tokens, SSH_AUTH_SOCK: the owner's ssh agent). Then
# the sandbox's HOME, USER, LOGNAME, the RC_ variables, the task's --env.
# docs/security.md says why each is kept; --pass-env NAME adds one.
TASK_ENV_KEPT = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
                 # certificates to trust (paths): pip and curl behind a TLS proxy
                 "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
TASK_ENV_KEPT_PREFIXES = ("LC_",)
# Kept unless a URL in them holds a user (user:password@): pip's settings, proxies.
TASK_ENV_NETWORK = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")
TASK_ENV_NETWORK_PREFIXES = ("PIP_",)
# On Android, what Termux's shell has for programs to run at all (its app's
# TermuxShellEnvironment, its login): its prefix, termux-exec's LD_PRELOAD
# (#! lines of /usr/bin/...), LD_LIBRARY_PATH (Termux on Android 5 and 6),
# Android's runtime paths (`am` needs them).
TASK_ENV_ANDROID = ("PREFIX", "LD_LIBRARY_PATH", "BOOTCLASSPATH", "DEX2OATBOOTCLASSPATH",
                    "SYSTEMSERVERCLASSPATH", "EXTERNAL_STORAGE", "ASEC_MOUNTPOINT",
                    "LOOP_MOUNTPOINT")
TASK_ENV_ANDROID_PREFIXES = ("ANDROID_", "TERMUX_")
# Task types that run no code of the task's sender: what a worker that must
# protect files (--hide, --read-only) but cannot isolate its tasks still runs.
HARMLESS_TASK_TYPES = ("echo", "sleep", "system_info")
# ctypes numbers of Linux's unshare, mount and prctl.
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 3, 4, 36
PTRACE_DETACH = 17
# Signals the init of a task's PID namespace passes on to the task (see serve_as_init).
INIT_FORWARDS = ("SIGTERM", "SIGINT")
CLONE_PARENT = 0x00008000
CLONE_SYSCALLS = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "armv7l": 120,
                  "armv6l": 120, "i686": 120}      # clone's number, by machine
KEYCTL_SYSCALLS = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "armv7l": 311,
                   "armv6l": 311, "i686": 288}     # keyctl's number, by machine
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_CLEAR, KEYCTL_LINK = 0, 1, 7, 8
KEYCTL_INVALIDATE, KEYCTL_GET_PERSISTENT = 21, 22
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
LINUX_CAPABILITY_VERSION_3 = 0x20080522      # capset's header: two 32-bit words of each set
# statvfs flags a bind remount must keep (the kernel locks them in a user namespace).
KEPT_MOUNT_FLAGS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
                    (1024, 1024), (2048, 2048), (4096, 1 << 21))


def linux_kernel():
    """Linux and Android (whose Python says "android" from 3.13 on)."""
    return sys.platform.startswith("linux") or sys.platform == "android"


libc = []      # the C library, once a process (the spawner, a probe) has loaded it


def libc_call(name, *arguments):
    """Call a libc function through ctypes; OSError on failure. ctypes is
    imported only by the processes that need it; the spawner loads it once,
    and the tasks it forks inherit it."""
    import ctypes
    if not libc:     # this program's own symbols, libc's among them (no ldconfig run)
        libc.append(ctypes.CDLL(None, use_errno=True))
    if getattr(libc[0], name)(*arguments) != 0:
        number = ctypes.get_errno()
        raise OSError(number, "%s: %s" % (name, os.strerror(number)))


def encoded(path):
    return path.encode() if isinstance(path, str) else path


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def task_environment(pass_env=(), tmpdir_usable=lambda path: True):
    """(the worker's variables a task starts from, names withheld because
    they hold a password): TASK_ENV_KEPT and the rest above, --pass-env's
    names, and HOME, USER and LOGNAME of the worker's user (a task of
    another uid gets its own: enter_sandbox); TMPDIR only where the task
    can write (else programs use /tmp)."""
    android = "ANDROID_ROOT" in os.environ or sys.platform == "android"
    environment, withheld = {}, []
    for name, value in os.environ.items():
        network = (name.lower() in TASK_ENV_NETWORK
                   or name.startswith(TASK_ENV_NETWORK_PREFIXES))
        if name in pass_env:
            environment[name] = value
        elif network and holds_password(value):
            withheld.append(name)
        elif network or name in TASK_ENV_KEPT or name.startswith(TASK_ENV_KEPT_PREFIXES):
            environment[name] = value
        elif android and (name in TASK_ENV_ANDROID or name.startswith(
                TASK_ENV_ANDROID_PREFIXES) or (name == "LD_PRELOAD" and "termux-exec" in value)):
            environment[name] = value
    if "TMPDIR" in environment and "TMPDIR" not in pass_env \
            and not tmpdir_usable(environment["TMPDIR"]):
        del environment["TMPDIR"]
    user = account_name(os.geteuid())
    environment.update(HOME=os.environ.get("HOME") or os.path.expanduser("~"),
                       USER=user, LOGNAME=user)
    environment.update((name, os.environ[name]) for name in pass_env if name in os.environ)
    return environment, sorted(withheld)


def holds_password(value):
    """Whether a URL in `value` names a user (user:password@host): a
    proxy's or a package index's credentials."""
    return any("@" in part.split("/", 1)[0] for part in value.split("://")[1:])


def account_name(uid):
    """USER and LOGNAME of `uid`: its account's name, else its number."""
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, OSError):
        return str(uid)


def replace_environ(environment):
    """In a task's child process that subprocess started (no spawner): the
    tasks' environment instead of the worker's, which it inherited."""
    os.environ.clear()
    os.environ.update(environment)


def enter_sandbox(jail):
    """In a task's child process, before it runs anything: join the task's
    cgroup, isolate it, bound its processes and become the task's uid."""
    if jail.get("cgroup"):
        write_file(os.path.join(jail["cgroup"], "cgroup.procs"), str(os.getpid()))
    if jail.get("uid") is not None or jail.get("isolate"):
        join_new_session_keyring()
    report = isolate(jail) if jail.get("isolate") else None
    if jail.get("uid") is not None:
        os.setgroups([])
        os.setgid(jail["gid"])
        os.setuid(jail["uid"])
        os.environ["USER"] = os.environ["LOGNAME"] = jail["user"]
    if jail.get("uid") is not None or jail.get("isolate"):
        os.environ["HOME"] = os.getcwd()      # its own: the real one is hidden or not its
        os.environ["PATH"] = jail["path"]
    if jail.get("mark"):
        os.environ[TASK_MARK] = jail["mark"]
    if report is not None:      # we are the init of its PID namespace: the task is our child
        serve_as_init(report)


def join_new_session_keyring():
    """Give this process (a task about to start, or the spawner about to
    start one) a new, empty session keyring. A process keeps its parent's,
    and whoever has a keyring as its session's possesses it, whatever its
    uid: every task of a root worker could read and write the worker's
    (a login's, holding root's own keys, or systemd's per service), a key
    one task left there was any other task's to read, for the worker's
    life; an --isolate task, its user's login keyring. Nothing where the
    kernel has no keyrings or a container's seccomp refuses keyctl (no task
    can use them then), nor on Android (whose seccomp kills a process for
    it)."""
    number = KEYCTL_SYSCALLS.get(os.uname().machine)
    if number is None or not sys.platform.startswith("linux") or "ANDROID_ROOT" in os.environ:
        return
    import ctypes
    if not libc:
        libc.append(ctypes.CDLL(None, use_errno=True))
    if libc[0].syscall(ctypes.c_long(number), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
                       None) < 0:
        number = ctypes.get_errno()
        if number not in (errno.ENOSYS, errno.EPERM):
            raise OSError(number, "keyctl: %s" % os.strerror(number))


def needs_child_setup(jail):
    """Whether the task's process must do something between fork and exec
    (posix_spawn cannot join a cgroup, unshare or change uid)."""
    return bool(jail and (jail.get("cgroup") or jail.get("isolate")
                          or jail.get("uid") is not None))


def isolate(jail):
    """A mount namespace of its own (and a user namespace when not root):
    tmpfs over the hidden directories, /dev/null over hidden files, the
    read-only paths bound read-only; a network namespace if asked; a PID
    namespace if the jail says so, in whose init it returns then (see
    enter_pid_namespace) with the descriptor it reports the task's end on;
    None without one."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | (CLONE_NEWNET if jail.get("network") is False else 0)
    if uid != 0:
        flags |= CLONE_NEWUSER
    libc_call("unshare", flags)
    if uid != 0:        # the same ids inside, with every capability until exec
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", "%d %d 1" % (uid, uid))
        write_file("/proc/self/gid_map", "%d %d 1" % (gid, gid))
    libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    for path in jail.get("read_only", ()):
        if os.path.exists(path):
            libc_call("mount", encoded(path), encoded(path), None, MS_BIND | MS_REC, None)
            kept = sum(ms for st, ms in KEPT_MOUNT_FLAGS if os.statvfs(path).f_flag & st)
            libc_call("mount", None, encoded(path), None,
                      MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None)
    for path in jail.get("hide", ()):
        if os.path.isdir(path):
            libc_call("mount", b"tmpfs", encoded(path), b"tmpfs", MS_NOSUID | MS_NODEV,
                      b"size=4k,mode=0555")
        elif os.path.exists(path):
            libc_call("mount", b"/dev/null", encoded(path), None, MS_BIND, None)
    if jail.get("own_dir"):
        # Other tasks' directories (of the same uid, or of other workers):
        # gone under a tmpfs, where only this task's own is bound back. The
        # process stands in it (chdir), which /proc/self/cwd names.
        top, own = jail["own_dir"]
        libc_call("mount", b"tmpfs", encoded(top), b"tmpfs", MS_NOSUID | MS_NODEV,
                  b"size=64k,mode=0711")
        path = os.path.join(top, own)
        os.makedirs(path, 0o711)
        # makedirs makes the directories between with the worker's umask
        # (0700): a task of another uid could not pass through them to its
        # own directory by its absolute path ($PWD, $RC_CHECKPOINT_DIR).
        between = os.path.dirname(path)
        while len(between) > len(top):
            os.chmod(between, 0o711)
            between = os.path.dirname(between)
        libc_call("mount", b"/proc/self/cwd", encoded(path), None, MS_BIND, None)
        os.chdir(path)
    report = enter_pid_namespace() if jail.get("pid_namespace") else None
    if uid != 0:
        drop_capabilities()
    return report


# A PID namespace per task: the first process the unshare makes in it is its
# init, which the kernel shields from every signal it has no handler for (but
# SIGKILL from outside) and whose end kills every other process in it. That
# init is not the task: a shell as pid 1 would shrug off a SIGTERM it has no
# trap for (`kill $$`, `kill -TERM 1`), a Python task's os.wait() would reap
# orphans it never started, and its exit status would be all there was. It is
# a copy of the spawner's child (no exec: a fork costs less than any program
# would), doing only an init's work: the task is its one child (pid 2, a
# process group of its own, so that `kill 0` in it reaches its own processes,
# as before, and no init), SIGTERM and SIGINT sent to pid 1 go on to the task,
# orphans are reaped, and its own end when the task ends kills whatever the
# task left. The process the spawner forked (the task's first process, whose
# pid, group and exit the worker knows) stays outside: it waits for the init
# and then ends as the task did, exit status or signal. The worker's SIGKILL
# of that group (timeout, cancel, its watchdog) reaches the init, the one
# signal that does from outside, and so the whole namespace at once.

def enter_pid_namespace():
    """Make a PID namespace and fork its init, which mounts a /proc of it
    and returns the descriptor it reports the task's end on. The caller,
    outside, never returns: it ends as the task does (follow_init)."""
    libc_call("unshare", CLONE_NEWPID)
    reader, writer = os.pipe()
    # Listed now: the /proc the init mounts has no /proc/self for us.
    inherited = open_descriptors()
    init = os.fork()
    if init:
        os.close(writer)
        follow_init(init, reader, inherited)
    os.close(reader)
    libc_call("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    return writer


def plain_signals():
    """A process that stays to wait (no exec) drops what it inherited of
    its parent's signal handling: a subprocess's child has the worker's."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def follow_init(init, reader, inherited):
    """Outside the task's PID namespace: wait for its init, and end as the
    task ended, with its exit status or killed by its signal. An init that
    said nothing was killed (SIGKILL, from outside): ended as it did."""
    try:
        close_all_but(reader, inherited)   # a subprocess's error pipe too: the task's exec closes it
        plain_signals()
        status = os.waitpid(init, 0)[1]
        said = os.read(reader, 32)
        if said:
            status = int(said)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            libc_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)   # no core of ours in its place
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
            os.kill(os.getpid(), signum)
            status = (128 + signum) << 8
        os._exit(os.WEXITSTATUS(status))
    finally:
        os._exit(125)


def serve_as_init(report):
    """In the init of a task's PID namespace: fork the task, which returns
    from here; be its init until it ends, then report its wait status on
    `report` and exit, which ends whatever it left in the namespace."""
    # A copy of the spawner, which held other tasks' payloads: not the
    # task's to read (/proc/1/mem) nor to trace, even where it runs as its
    # uid; from before the fork, the task taking back what it had.
    dumpable = libc[0].prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    libc_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    blank_command_line()
    task = os.fork()
    if task == 0:
        os.close(report)
        os.setpgid(0, 0)
        if dumpable == 1:     # (2, suid_dumpable's "suidsafe", cannot be set: 0 is as safe)
            libc_call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
        return
    try:
        try:
            os.setpgid(task, task)      # whichever of us comes first
        except OSError:
            pass
        close_all_but(report)
        plain_signals()

        def forward(signum, frame):
            try:
                os.kill(task, signum)
            except OSError:
                pass
        for name in INIT_FORWARDS:
            signal.signal(getattr(signal, name), forward)
        while True:
            pid, status = os.waitpid(-1, 0)
            if os.WIFSTOPPED(status):       # only a child that made us its tracer stops here
                untrace(pid, os.WSTOPSIG(status))
                continue
            if pid == task:
                write_all(report, str(status).encode())
                break
    finally:
        os._exit(0)


def blank_command_line():
    """Zero this process's copy of its command line, which /proc/PID/cmdline
    shows whoever sees the process, no ptrace check between (environ and
    mem have one): a PID namespace's init is pid 1 to its task, and for a
    task too large for the spawner it is a copy of the worker, whose
    command line may hold a --token. Python holds argv copied: nothing of
    it reads these bytes again."""
    import ctypes
    try:
        fields = read_small_file("/proc/self/stat").rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])       # arg_start, arg_end (48, 49)
    except (OSError, IndexError, ValueError):      # a kernel before 3.5 says neither
        return
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def untrace(pid, signum):
    """A child of a PID namespace's init stopped in a trace: it asked to be
    traced by its parent (PTRACE_TRACEME), which the init never wants.
    Detach it, with the signal that stopped it (but a traced exec's
    SIGTRAP, which an untraced process never gets), as if it were not
    traced: not taken for the task's end (a wait status read as its exit
    status 10, for a SIGUSR1), nor left stopped."""
    import ctypes
    signum = 0 if signum == signal.SIGTRAP else signum
    libc[0].ptrace(ctypes.c_long(PTRACE_DETACH), ctypes.c_long(pid), None,
                   ctypes.c_void_p(signum))


def drop_capabilities():
    """Give up every capability the new user namespace gave. An exec of
    another uid than 0 drops them, but a Python task runs without one: with
    CAP_SYS_ADMIN there it could unmount the tmpfs over the state directory
    and remount a --read-only path writable. Without them it cannot, nor
    from a namespace of its own: the mounts it takes along are locked."""
    import ctypes
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)   # this process
    libc_call("capset", header, (ctypes.c_uint32 * 6)())    # effective, permitted, inheritable


def isolation_works(hide_network=False):
    """None if --isolate works here, else why not."""
    if not linux_kernel() or not hasattr(os, "fork"):
        return "no Linux namespaces on %s" % sys.platform
    error = isolation_refused(hide_network, pid_namespace=False)
    return error and "user and mount namespaces are not available (%s)" % error


def pid_namespace_works(hide_network=False):
    """None if an isolated task can have a PID namespace with a /proc of
    its own here, else why not (a container's seccomp or masked /proc, an
    old kernel). Asked once --isolate works."""
    error = isolation_refused(hide_network, pid_namespace=True)
    return error and "no PID namespace (%s)" % error


def isolation_refused(hide_network, pid_namespace):
    """Isolate a forked child as a task would be; None if it could, else
    the error. In a child, so that the worker itself loads no ctypes."""
    import tempfile
    probe = tempfile.mkdtemp(prefix="rc-isolation-probe-")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            isolate({"hide": [probe], "read_only": [probe], "network": not hide_network,
                     "pid_namespace": pid_namespace})
            if pid_namespace and [n for n in os.listdir("/proc") if n.isdigit()] != ["1"]:
                raise OSError(errno.EPERM, "its /proc shows other processes")
            os._exit(0)
        except BaseException as e:
            os.write(writer, str(e).encode()[:500])
        finally:
            os._exit(1)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        error = pipe.read().decode("utf-8", "replace")
    status = os.waitpid(pid, 0)[1]
    os.rmdir(probe)
    if status == 0:
        return None
    return error or "status %d" % status


# -- whom tasks run as --------------------------------------------------------------

def resolve_task_user(spec, slots):
    """--task-user USER|UID[:COUNT] as (uids, gid or None, name), or None for
    the worker's own user. As root without it: TASK_UID_COUNT uids from
    TASK_UID_BASE that no account uses. ValueError names what is wrong."""
    import pwd
    if spec is None:
        if os.geteuid() != 0:
            return None
        uids = [uid for uid in range(TASK_UID_BASE, TASK_UID_BASE + TASK_UID_COUNT)
                if not has_account(uid)]
        return uids, None, "%d-%d" % (TASK_UID_BASE, TASK_UID_BASE + TASK_UID_COUNT - 1)
    if os.geteuid() != 0:
        raise ValueError("--task-user needs the worker to run as root")
    name, _, count = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not name.isdigit():
            raise ValueError("--task-user: no user %r" % name)
        uid, gid = int(name), None
    if not count:
        return [uid], gid, name
    if not count.isdigit() or not 1 <= int(count) <= 65536 or uid + int(count) > 2 ** 31:
        raise ValueError("--task-user %s: COUNT must be a number from 1 to 65536" % spec)
    if int(count) < slots:
        raise ValueError("--task-user %s: fewer uids than --slots (%d)" % (spec, slots))
    if uid == 0:      # every process of these uids is killed when their task ends
        raise ValueError("--task-user %s: a range of task uids must not include root" % spec)
    return list(range(uid, uid + int(count))), None, "%d-%d" % (uid, uid + int(count) - 1)


def has_account(uid):
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def kill_uid(uid):
    """SIGKILL every process of `uid`, from a child that takes that uid (a
    task's own: nothing else runs as it): kill(-1) until none is left.
    Where no child can be had (the task used up the processes a container
    allows: its pids limit), through /proc, as kill_uid_except does."""
    try:
        pid = os.fork()
    except OSError:
        kill_uid_through_proc(uid)
        return
    if pid == 0:
        try:
            os.setgroups([])
            os.setuid(uid)
            for _ in range(KILL_ROUNDS):
                os.kill(-1, signal.SIGKILL)    # ProcessLookupError once none is left
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def kill_uid_through_proc(uid):
    """kill_uid without a child: each of processes_of(uid), round after
    round until none is left."""
    for _ in range(KILL_ROUNDS):
        found = False
        for pid, _ in processes_of(uid):
            try:
                os.kill(pid, signal.SIGKILL)
                found = True
            except OSError:
                pass
        if not found:
            return


def uid_alive(uid):
    """Whether a process of `uid` runs (not a zombie), as kill_uid would find it."""
    return any(state != b"Z" for _, state in processes_of(uid))


def processes_of(uid):
    """(pid, state letter) of each process whose real or saved uid is `uid`
    (as kill(-1) from that uid finds them), read from its status in /proc (a
    task's process that changed uids and never ran exec is root's there)."""
    for name in filter(str.isdigit, list_dir(PROC_ROOT)):
        try:
            with open(os.path.join(PROC_ROOT, name, "status"), "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if b":" in line)
            uids = fields[b"Uid"].split()
            if uid in (int(uids[0]), int(uids[2])):
                yield int(name), fields[b"State"].split()[0]
        except (OSError, KeyError, IndexError, ValueError):
            pass


def group_watched(jail):
    """Whether the watchdog hears of a task's process group: not for a task
    of a uid of its own, every process of which it kills by the uid
    (Sandbox.tell_watchdog; two writes and wakes of the watchdog less per task)."""
    return not (jail or {}).get("own_uid")


def kill_uid_except(uid, keep):
    """SIGKILL every process of `uid` but those of `keep` (pids), round
    after round until none is left (one may fork while we look)."""
    for _ in range(KILL_ROUNDS):
        found = False
        for name in os.listdir(PROC_ROOT):
            if name.isdigit() and int(name) not in keep:
                try:
                    if os.stat(os.path.join(PROC_ROOT, name)).st_uid == uid:
                        os.kill(int(name), signal.SIGKILL)
                        found = True
                except OSError:
                    pass
        if not found:
            return


def user_processes(uid, cache={}):
    """How many processes (threads included, as RLIMIT_NPROC counts) `uid`
    has, read from /proc at most once a second; None where there is no /proc."""
    now = time.monotonic()
    if cache.get("until", 0) > now and cache.get("uid") == uid:
        return cache["count"]
    try:
        count = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat("/proc/" + name).st_uid == uid:
                        # /proc/PID/task holds a directory per thread.
                        count += max(1, os.stat("/proc/%s/task" % name).st_nlink - 2)
                except OSError:
                    pass
    except OSError:
        return None
    cache.update(until=now + 1.0, uid=uid, count=count)
    return count


# -- cgroups ------------------------------------------------------------------------

def own_cgroup_dir():
    """The directory of this process's cgroup v2, or None."""
    own = [line[3:] for line in (read_text("/proc/self/cgroup") or "").splitlines()
           if line.startswith("0::")]
    if not own:
        return None
    for line in (read_text("/proc/self/mountinfo") or "").splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].split()[:1] == ["cgroup2"]:
            root, mount_point = fields[0].split()[3:5]
            if own[0] == root or own[0].startswith(root.rstrip("/") + "/"):
                return mount_point + own[0][len(root.rstrip("/")):]
    return None


class TaskCgroups(object):
    """A cgroup v2 per task, under one of this worker's (rc-worker.PID) in
    its own cgroup, where the kernel lets it make them."""
    base = None

    def prepare(self):
        parent = own_cgroup_dir()
        if not parent or not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
            return
        for name in list_dir(parent):
            if name.startswith("rc-worker.") and not pid_alive(name[10:]):
                self.sweep(os.path.join(parent, name))    # a killed worker's
        base = os.path.join(parent, "rc-worker.%d" % os.getpid())
        try:
            os.mkdir(base, 0o755)
            self.make_and_remove(base)
        except OSError as e:
            log("info", "cgroups_unusable", path=base, error=str(e))
            return
        self.base, self.home = base, parent
        self.pending = []       # emptied cgroups that were still busy when removed

    @staticmethod
    def make_and_remove(base):
        probe = os.path.join(base, "probe")
        os.mkdir(probe)
        os.rmdir(probe)

    def make(self, name):
        if self.base is None:
            return None
        path = os.path.join(self.base, name)
        try:
            os.mkdir(path, 0o755)
            return path
        except OSError as e:
            log("warning", "cgroup_not_made", path=path, error=str(e))
            return None

    @staticmethod
    def kill(path):
        try:
            write_file(os.path.join(path, "cgroup.kill"), "1")
            return
        except OSError:      # before Linux 5.14: kill what is listed until nothing is
            pass
        for _ in range(KILL_ROUNDS):
            pids = (read_text(os.path.join(path, "cgroup.procs")) or "").split()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass

    def remove(self, path):
        """rmdir once its processes are gone; retried at the next removal."""
        self.pending.append(path)
        for path in list(self.pending):
            try:
                os.rmdir(path)
                self.pending.remove(path)
            except FileNotFoundError:
                self.pending.remove(path)
            except OSError:      # EBUSY: a dying process is still in it
                pass

    def sweep(self, base):
        """Kill and remove the task cgroups under `base`, then `base`."""
        for name in list_dir(base):
            path = os.path.join(base, name)
            if not os.path.isdir(path):      # the cgroup's own files
                continue
            self.kill(path)
            for _ in range(20):       # a second at most for the killed to go
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        try:
            os.rmdir(base)
        except OSError:
            pass

    def stop(self):
        if self.base is not None:
            self.sweep(self.base)
            self.base = None


def pid_alive(text):
    try:
        os.kill(int(text), 0)
        return True
    except ProcessLookupError:
        return False
    except (OSError, ValueError):       # EPERM: alive, someone else's
        return not isinstance(text, str) or text.isdigit()


# -- the task directories -------------------------------------------------------

def uid_lock_dir(fallback):
    """UID_LOCK_DIR, made root's own, where it can be (Linux); else
    `fallback`, this worker's task root's parent under $TMPDIR."""
    import stat
    try:
        os.mkdir(UID_LOCK_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:           # no /run (macOS), or not root
        return fallback
    info = os.lstat(UID_LOCK_DIR)
    return UID_LOCK_DIR if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() == 0 \
        else fallback


def task_root(device_id):
    """$TMPDIR/rc-worker-EUID/DEVICE_ID.PID: this worker's directory of task
    directories. The first part is made once and must be ours; at start each
    NAME.PID of a worker that is gone is removed, with what its tasks left."""
    import stat
    # $TMPDIR (Termux sets it) or /tmp, as tempfile would find it: importing
    # tempfile (and shutil with it) would cost an idle worker half a megabyte.
    top = os.path.join(os.environ.get("TMPDIR") or "/tmp", "rc-worker-%d" % os.geteuid())
    try:
        os.mkdir(top, 0o711)
    except FileExistsError:
        pass
    info = os.lstat(top)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        # Someone else made it (in a shared /tmp): a directory of our own instead.
        log("warning", "task_root_taken", path=top, owner=info.st_uid)
        import tempfile
        top = tempfile.mkdtemp(prefix="rc-worker-%d-" % os.geteuid())
    os.chmod(top, 0o711)
    for name in list_dir(top):
        pid = name.rpartition(".")[2]
        if pid.isdigit() and not pid_alive(pid):
            log("info", "stale_task_dirs_removed", path=os.path.join(top, name))
            remove_tree(os.path.join(top, name))
    root = os.path.join(top, "%s.%d" % (device_id, os.getpid()))
    os.mkdir(root, 0o711)
    os.chmod(root, 0o711)     # whatever the umask
    return root


def reachable(path, other_uid, hidden):
    """Whether a task can read `path`: not under a hidden path, and, for a
    task of another uid, readable by others through directories they may search."""
    import stat
    path = os.path.realpath(path)
    if any((path + "/").startswith(h.rstrip("/") + "/") for h in hidden):
        return False
    if not other_uid:
        return True
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while path != os.path.dirname(path):
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def remove_tree(path):
    """rm -rf PATH, errors ignored, never through a link: on directory
    descriptors, as shutil.rmtree where it avoids symlink attacks. shutil
    itself imports re, enum, zlib, bz2 and lzma, 1.3 MiB that a worker
    removing one stale task directory would hold for good. Not os.fwalk:
    it recurses, and a task's directories nested past the recursion limit
    raised RecursionError out of the worker's loop."""
    if not path:
        return
    if not hasattr(os, "fwalk"):
        import shutil
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        if os.path.islink(path):
            remove_entry(path, None, os.unlink)
        return
    try:
        empty_tree(top)
    finally:
        os.close(top)
    remove_entry(path, None, os.rmdir)


def empty_tree(top):
    """Remove what the directory open as `top` holds, in a loop: at most
    TREE_DEPTH descriptors open, a directory deeper than that moved up
    into `top` (a rename, on the same file system) to be emptied from
    there; each directory entered once, so it ends whatever fails."""
    import stat
    stack, entered, lifted = [top], set(), 0
    while stack:
        fd, child = stack[-1], None
        for name in list_dir(fd):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                remove_entry(name, fd, os.unlink)
            elif remove_entry(name, fd, os.rmdir) or (info.st_dev, info.st_ino) in entered:
                continue
            elif len(stack) >= TREE_DEPTH:
                lifted += 1
                try:
                    os.rename(name, ".rc-lifted-%d-%d" % (info.st_ino, lifted),
                              src_dir_fd=fd, dst_dir_fd=top)
                except OSError:
                    entered.add((info.st_dev, info.st_ino))
            else:
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY
                                    | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
                except OSError:
                    entered.add((info.st_dev, info.st_ino))
                    continue
                entered.add((info.st_dev, info.st_ino))
                break
        if child is not None:
            stack.append(child)
        else:
            stack.pop()
            if fd != top:
                os.close(fd)     # its parent looks again: now it is empty, rmdir takes it


def remove_task_dir(path):
    """remove_tree for a task directory whose task has ended and which is
    the worker's again (Sandbox.keep_for_upload): most hold a few files and
    an empty checkpoint directory, removed here by name for about a
    third less CPU than os.fwalk takes; anything more (a directory with entries) goes to
    remove_tree. Never through a link: a link is unlinked, and rmdir
    removes no link."""
    try:
        for entry in list(os.scandir(path)):
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        os.rmdir(path)
    except OSError:
        remove_tree(path)


class Remover(object):
    """Removes the task directories tasks left full (WorkDirs.give_back),
    and the trees their uids left in shared directories (Leftovers: /tmp,
    /var/tmp, /dev/shm...), off the worker's loop, one at a time in a
    thread of its own, started at the first. A task that left 300,000
    files in its directory held the loop ~5 s at its end while they went (a
    million, ~17 s): no heartbeat, no ping answered (the main node held the
    device suspect), no other task's output read, and the worker took
    itself for frozen (leases_in_doubt). A tree handed over is the
    worker's (0700) first, so the next task of its uid cannot reach into
    it meanwhile; one left when the worker ends goes at its next start
    (task_root, remove_left_behind)."""

    def __init__(self):
        self.queue = None
        self.root = None         # the task root, where take() moves a tree first
        self.taken = 0

    def take(self, path, uid):
        """A tree `uid` left in a shared directory, emptied off the loop:
        moved into the task root, the worker's, on the same file system;
        else made the worker's where it is (take_in_place). False where
        neither can be done: it is removed in the loop, as before."""
        if not hasattr(os, "fwalk"):
            return False
        if self.root is not None:
            self.taken += 1
            held = os.path.join(self.root, ".rc-left-%d" % self.taken)
            try:
                os.rename(path, held)
                return self.remove(held)
            except OSError:
                pass            # another file system (/var/tmp, /dev/shm often are)
        held = self.take_in_place(path, uid)
        if held is None:
            return False
        self.hand_over(held)
        return True

    @staticmethod
    def take_in_place(path, uid):
        """Make the tree at `path`, the uid's, the worker's (0700) where it
        is, and rename it there to LEFT_BEHIND + PID-RANDOM, freeing its
        name for the uid's next task at once; the new path, or None. Only
        in a sticky directory that is root's or ours (/tmp, /var/tmp and
        /dev/shm are): once the tree is ours no other uid can move it or
        put anything in its place, so the delayed removal takes this tree
        and nothing the uid makes later. On a descriptor, for the uid's
        processes may still run and swap a link in under the name."""
        import stat
        directory = os.path.dirname(path)
        try:
            parent = os.stat(directory)
            if not parent.st_mode & stat.S_ISVTX or parent.st_uid not in (0, os.geteuid()):
                return None
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (OSError, AttributeError):
            return None
        try:
            info = os.fstat(fd)
            if info.st_uid != uid or uid == os.geteuid():
                return None
            os.fchown(fd, os.geteuid(), os.getegid())
            os.fchmod(fd, 0o700)
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                # Moved away before it was ours: the uid's again, and whatever
                # is at `path` now goes in the loop, as before.
                os.fchown(fd, info.st_uid, info.st_gid)
                os.fchmod(fd, stat.S_IMODE(info.st_mode))
                return None
            held = os.path.join(directory, "%s%d-%s" % (LEFT_BEHIND, os.getpid(),
                                                        os.urandom(8).hex()))
            os.rename(path, held)
            return held
        except OSError:
            return None        # ours or not, what is at `path` goes in the loop
        finally:
            os.close(fd)

    def remove(self, path):
        """Whether `path` is gone, or handed over to go."""
        import stat
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(path)
                return True
            if info.st_uid != os.geteuid():
                os.chown(path, os.geteuid(), os.getegid(), follow_symlinks=False)
            os.chmod(path, 0o700)
        except OSError:
            remove_tree(path)       # not ours to hand over: here, as before
            return not os.path.lexists(path)
        self.hand_over(path)
        return True

    def hand_over(self, path):
        """`path`, the worker's, to the thread."""
        if self.queue is None:
            import queue
            import threading
            self.queue = getattr(queue, "SimpleQueue", queue.Queue)()
            thread = threading.Thread(target=self.run, name="rc-remover")
            thread.daemon = True
            thread.start()
        self.queue.put(path)

    def run(self):
        while True:
            remove_tree(self.queue.get())

    def remove_left_behind(self, directories):
        """The trees take_in_place renamed that a worker which ended before
        they went left behind (ours: its pid no longer runs, or is ours
        after an exec); another running worker's stay. How many."""
        import stat
        found = []
        for directory in directories:
            try:
                with os.scandir(directory) as listing:     # a /tmp may hold a million
                    found.extend(entry.path for entry in listing
                                 if entry.name.startswith(LEFT_BEHIND))
            except OSError:
                continue
        count = 0
        for path in found:
            pid = os.path.basename(path)[len(LEFT_BEHIND):].partition("-")[0]
            if not pid or pid.strip("0123456789") or (int(pid) != os.getpid()
                                                      and pid_alive(pid)):
                continue
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                self.hand_over(path)
                count += 1
        return count


REMOVER = Remover()


def remove_entry(name, dir_fd, remove):
    """remove(name) relative to dir_fd; whether it went."""
    try:
        remove(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False


def write_all(descriptor, data):
    """os.write until all of `data` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def read_small_file(path):
    """A file of /proc, whole, in a few system calls (no text layer)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(descriptor, READ_SIZE)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(descriptor)


# >>> Region "leftovers": the worker process loads it on first use (load_region).
class Leftovers(object):
    """What a task's uid left where every user may write (SHARED_TEMP_DIRS,
    SysV IPC, kernel keyrings), removed when its task ends and again before
    the next task of that uid starts: task uids are reused, and a task must
    not read another's files (nor the disk or memory keep them). Before,
    only when the last removal may have missed some: the uid's first task
    in this run of the worker, or one whose processes may have outlived its
    end (an abandoned task's). After a removal made once all of them had
    gone, nothing of the uid has run since.

    Reading a directory costs a stat per entry (a /tmp of 1,100 entries:
    3.8 ms here), so it is read whole once and then followed: where Linux
    has inotify, the names it reported since the last look (created, moved
    in or out, removed, given away) are the only ones looked at again, with
    those a look found the uid owning (DirectoryWatch; lost events, an
    overflow, mean a whole read again). Elsewhere a directory is read again
    only when its mtime changed since the last look, or that look found
    entries of the uid (a look serves every uid: only root gives a file
    away)."""

    def __init__(self, directories=SHARED_TEMP_DIRS, watch=True):
        self.directories = directories
        # directory -> (its mtime (ns) at the last look, the uids owning entries in it then)
        self.seen = {}
        # A followed directory -> {name: its owner} of its entries at their
        # last look, and {owner: its names}: the directory's size, whatever
        # its churn (a name gone is forgotten at the look after its event)
        self.owner_of, self.names_of = {}, {}
        self.watching = None if watch else False    # the DirectoryWatch once made
        self.clean = set()   # uids with none left: removed since their processes all ended

    def before_task(self, uid):
        """Before a task of the uid: its leftovers go, unless its last task's
        end removed them after all of its processes had gone. (A directory's
        next look, at the task's end, reads it again if it changed since the
        last look or that look found the uid's: DirectoryWatch's names, or
        its mtime.)"""
        if uid not in self.clean:
            self.remove(uid)
        self.clean.discard(uid)

    def after_task(self, uid, ended):
        """`ended`: every process of the uid has gone (its task was reaped)."""
        self.remove(uid)
        if ended:
            self.clean.add(uid)

    def remove(self, uid):
        removed = remove_ipc_of(uid)
        if removed:
            log("info", "task_leftovers_removed", path="/proc/sysvipc", uid=uid, entries=removed)
        removed = remove_keys_of(uid)
        if removed:
            log("info", "task_leftovers_removed", path="/proc/key-users", uid=uid, entries=removed)
        watch = self.watch()
        for directory in self.directories:
            if watch and watch.follows(directory):
                removed = self.remove_followed(watch, directory, uid)
            else:
                removed = self.remove_looked(directory, uid)
            if removed:
                log("info", "task_leftovers_removed", path=directory, uid=uid, entries=removed)

    def watch(self):
        """The DirectoryWatch, its events read; False where there is none."""
        if self.watching is None:
            try:
                self.watching = DirectoryWatch(self.directories)
            except (OSError, AttributeError, ImportError):   # no inotify (or ctypes) here
                self.watching = False
        if self.watching:
            self.watching.read()
        return self.watching

    def remove_followed(self, watch, directory, uid):
        """The uid's entries of a directory inotify follows: of the names it
        reported since the last look, and those that look found the uid's."""
        import stat
        owner_of = self.owner_of.pop(directory, None)
        names_of = self.names_of.pop(directory, None)
        names = watch.take(directory)
        # Never read, events lost, or the uid's names too many to keep: whole.
        if owner_of is None or names is None or (uid in names_of and names_of[uid] is None):
            names_of = {}
            removed = remove_entries_of(directory, uid, names_of, LEFTOVERS_NAMES_KEPT)
            if None not in names_of:       # read (else read whole at the next look)
                self.names_of[directory] = names_of
                self.owner_of[directory] = dict(
                    (name, owner) for owner, owned in names_of.items() if owned is not None
                    for name in owned)
            return removed
        self.owner_of[directory], self.names_of[directory] = owner_of, names_of
        names.update(names_of.get(uid, ()))
        removed = 0
        for name in names:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                info = None         # gone
            owner = owner_of.pop(name, None)
            if owner is not None:
                names_of[owner].discard(name)
            if info is None:
                continue
            if info.st_uid == uid and remove_leftover(path, stat.S_ISDIR(info.st_mode), uid):
                removed += 1
            elif names_of.get(info.st_uid, ()) is not None:      # else too many to keep
                owned = names_of.setdefault(info.st_uid, set())
                if len(owned) < LEFTOVERS_NAMES_KEPT:
                    owner_of[name] = info.st_uid
                    owned.add(name)
                else:
                    for kept in owned:
                        owner_of.pop(kept, None)
                    names_of[info.st_uid] = None
        return removed

    def remove_looked(self, directory, uid):
        """The uid's entries of a directory no watch follows, read again
        only if it changed since the last look or that look found the uid's."""
        try:
            changed = os.stat(directory).st_mtime_ns
        except OSError:
            return 0
        seen = self.seen.get(directory)
        if seen is not None and seen[0] == changed and uid not in seen[1]:
            return 0
        owners = {}
        removed = remove_entries_of(directory, uid, owners)
        # Timestamps move in coarse ticks: a change in the same tick as
        # this look would not show, so a recent mtime is not remembered.
        # (A removal here changed it: the next look reads it again.)
        if None not in owners and time.time() - changed / 1e9 > settled_after(changed):
            self.seen[directory] = (changed, set(owners))
        return removed


# inotify(7): what DirectoryWatch asks to hear of, and what it may be told.
IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x4, 0x40, 0x80, 0x100, 0x200
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
INOTIFY_HEADER = 16         # bytes of a struct inotify_event before its name


class DirectoryWatch(object):
    """The names created, moved in or changed (chown, chmod), and those
    removed or moved out, in some directories since they were last taken,
    from Linux's inotify: an exact
    account where a directory's mtime (coarse ticks, other programs' changes)
    only says that something changed. A directory whose events were lost
    (the kernel's queue overflowed while no task ended) is taken as None:
    read it whole again. OSError or AttributeError where there is no inotify."""

    def __init__(self, directories):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, "inotify_init1: %s" % os.strerror(number))
        self.directories = {}      # watch descriptor -> directory
        self.names = {}            # directory -> the names reported, or None: events lost
        self.identities = {}       # directory -> (st_dev, st_ino) of the one watched
        for directory in directories:
            before = identity(directory)
            descriptor = libc.inotify_add_watch(
                self.fd, encoded(directory),
                IN_CREATE | IN_MOVED_TO | IN_ATTRIB | IN_DELETE | IN_MOVED_FROM | IN_ONLYDIR)
            # (A second name of one directory, a link, gets the first one's
            # descriptor: that name is looked at as before, by its mtime.)
            if descriptor >= 0 and descriptor not in self.directories \
                    and before is not None and identity(directory) == before:
                self.directories[descriptor] = directory
                self.names[directory] = None       # not read yet
                self.identities[directory] = before

    def follows(self, directory):
        """Whether `directory` is followed: watched, and still the one the
        watch was set on (a file system mounted over it since is not: its
        entries would tell the watch nothing)."""
        if directory not in self.names:
            return False
        if identity(directory) != self.identities[directory]:
            del self.names[directory]
            # Nor are the old one's events heard of (a process still in it)
            for descriptor, watched in list(self.directories.items()):
                if watched == directory:
                    del self.directories[descriptor]
            return False
        return True

    def take(self, directory):
        """The names reported in `directory` since the last take (None: read
        it whole), and from now on a fresh account."""
        names, self.names[directory] = self.names[directory], set()
        return names

    def read(self):
        """Take in the events waiting."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            offset = 0
            while offset + INOTIFY_HEADER <= len(data):
                descriptor = int.from_bytes(data[offset:offset + 4], sys.byteorder, signed=True)
                mask = int.from_bytes(data[offset + 4:offset + 8], sys.byteorder)
                length = int.from_bytes(data[offset + 12:offset + 16], sys.byteorder)
                name = data[offset + INOTIFY_HEADER:offset + INOTIFY_HEADER + length]
                offset += INOTIFY_HEADER + length
                directory = self.directories.get(descriptor)
                if mask & IN_Q_OVERFLOW:
                    for lost in self.names:
                        self.names[lost] = None
                elif mask & IN_IGNORED and directory is not None:
                    # Gone (removed, unmounted): looked at as before.
                    self.names.pop(directory, None)
                    del self.directories[descriptor]
                elif directory is not None and self.names[directory] is not None:
                    name = name.rstrip(b"\0")
                    if name:
                        self.names[directory].add(os.fsdecode(name))


def settled_after(mtime_ns):
    """LEFTOVERS_SETTLED, or LEFTOVERS_SETTLED_FINE for a timestamp with a
    fraction of a second (its filesystem keeps them)."""
    return LEFTOVERS_SETTLED if mtime_ns % 1000000000 == 0 else LEFTOVERS_SETTLED_FINE


def remove_ipc_of(uid):
    """Remove the SysV shared memory, semaphores and message queues `uid`
    made or owns: they outlive their task (holding memory) and the next
    task of that uid could attach them. How many."""
    removed = 0
    for kind, remover in SYSV_IPC:
        try:
            lines = read_small_file("/proc/sysvipc/" + kind).decode("ascii", "replace")
        except OSError:       # no SysV IPC here (not Linux, or not built in)
            continue
        header, _, rest = lines.partition("\n")
        if not rest.strip():
            continue          # none at all, as nearly always: no parsing per task
        try:
            header = header.split()
            rows = [line.split() for line in rest.splitlines()]
            owners = (header.index("uid"), header.index("cuid"))
        except ValueError:
            continue
        for row in rows:
            if len(row) > max(owners) and str(uid) in (row[owners[0]], row[owners[1]]):
                try:
                    if kind == "sem":
                        libc_call(remover, int(row[1]), 0, IPC_RMID)
                    else:
                        libc_call(remover, int(row[1]), IPC_RMID, None)
                    removed += 1
                except (OSError, ValueError):
                    pass
    return removed


def remove_keys_of(uid):
    """Empty the kernel keyrings `uid` keeps beyond its processes (its user
    keyring, user session keyring and persistent keyring, which lives three
    days): the next task of that uid could link them into its session and
    read what they hold. From a child that takes the uid, and only when
    /proc/key-users charges it keys (nearly never: no fork per task). How
    many keys it was charged."""
    charged = keys_charged_to(uid)
    if not charged or os.uname().machine not in KEYCTL_SYSCALLS:
        return 0
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes
            syscall = ctypes.CDLL(None, use_errno=True).syscall
            number = KEYCTL_SYSCALLS[os.uname().machine]

            def keyctl(*arguments):
                return syscall(*[ctypes.c_long(a) for a in (number,) + arguments])
            # Only a possessor may empty the persistent keyring: a session
            # keyring of this child's own, made as root, with the uid's
            # user keyring (which holds the persistent one) linked into it.
            keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
            os.setgroups([])
            os.setuid(uid)
            keyctl(KEYCTL_LINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING)
            persistent = keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_USER_KEYRING)
            if persistent > 0:
                keyctl(KEYCTL_CLEAR, persistent)
            # The user keyrings go, and what only they held with them. By
            # their ids: naming one by its special number makes both again.
            rings = [keyctl(KEYCTL_GET_KEYRING_ID, ring, 0) for ring in
                     (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING)]
            for ring in rings:
                if ring > 0:
                    keyctl(KEYCTL_INVALIDATE, ring)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return charged


def keys_charged_to(uid):
    """How many keys /proc/key-users says `uid` is charged (its quota's
    count), 0 where there is no such file."""
    try:
        text = read_small_file("/proc/key-users").decode("ascii", "replace")
    except OSError:
        return 0
    for line in text.splitlines():
        words = line.replace(":", " ").split()
        if len(words) >= 4 and words[0] == str(uid):
            try:
                return int(words[3].split("/")[0])
            except ValueError:
                return 0
    return 0


def remove_entries_of(directory, uid, owners=None, most=None):
    """Remove the entries of `directory` that `uid` owns (none of its
    processes is left: the end of its task killed them); how many.
    `owners`, a dict, is given {owner: the names of its entries} of every
    entry left, {None: ...} if the directory could not be read, and
    {owner: None} for an owner of more than `most` of them."""
    def note(owner, name):
        if owners is not None and owners.get(owner, ()) is not None:
            owned = owners.setdefault(owner, set())
            if most is not None and len(owned) >= most:
                owners[owner] = None
            else:
                owned.add(name)
    # Entry by entry, the uid's alone held (removed once the directory is
    # read, not while it is): a list of every entry of a /tmp that a task
    # filled was tens of MB of the worker's at each whole read.
    mine = []
    try:
        with os.scandir(directory) as listing:
            for entry in listing:
                try:
                    owner = entry.stat(follow_symlinks=False).st_uid
                except OSError:
                    continue        # gone
                if owner == uid:
                    mine.append((entry.name, entry.is_dir(follow_symlinks=False)))
                else:
                    note(owner, entry.name)
    except OSError:
        if owners is not None:
            owners[None] = set()     # not read: not known to hold nothing of any uid
        return 0
    removed = 0
    for name, is_dir in mine:
        if remove_leftover(os.path.join(directory, name), is_dir, uid):
            removed += 1
        else:
            note(uid, name)
    return removed


def identity(path):
    """(st_dev, st_ino) of what `path` names now, or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def remove_leftover(path, is_dir, uid):
    """Remove an entry `uid` left (a directory with all it holds, never
    through a link); whether it went."""
    try:
        if not is_dir:
            os.unlink(path)
        elif REMOVER.take(path, uid):     # the worker's, emptied off the loop
            return True
        elif hasattr(os, "fwalk"):        # remove_tree never follows a link there
            remove_tree(path)
            return not os.path.lexists(path)
        else:
            return False
        return True
    except OSError:
        return False


# <<< The end of region "leftovers".


class Sandbox(object):
    """The worker's side of the sandbox: a uid, a cgroup and a directory for
    each process task, and the end of everything the task started."""

    def __init__(self, options):
        self.options = options
        users = getattr(options, "task_users", None)
        self.free_uids = sorted(users[0]) if users else []
        self.gid = users[1] if users else None
        self.user_name = users[2] if users else None
        self.shared_uid = bool(users) and len(users[0]) == 1
        self.other_uid = bool(users) and users[0] != [os.geteuid()]   # tasks are not us
        self.claimed = {}         # uid -> the descriptors of its locks (see claim_uid)
        self.idle_uids = []       # claimed uids no task runs as
        self.watched_uids = set()     # claimed uids the watchdog knows (tell_watchdog)
        self.cgroups = TaskCgroups()
        self.leftovers = None     # Leftovers, made at the first task's need (shared_leftovers)
        self.workdirs = None
        self.tracking = None
        self.environ = None       # what every task starts from (environment())
        self.user_names = {}      # uid -> its USER and LOGNAME (account_name)

    def prepare(self, worker):
        """Called once, before the first task."""
        if not self.own_uids():
            # A uid per task names every process of it already, whatever it
            # does, for nothing; a cgroup cost ~1 ms of CPU per task here.
            self.cgroups.prepare()
        try:
            root = task_root(self.options.device_id)
        except OSError as e:      # a temporary directory we cannot use as we would
            import tempfile
            root = tempfile.mkdtemp(prefix="rc-worker-")
            log("warning", "task_root_unusable", error=str(e), path=root)
        self.workdirs = WorkDirs(self.options.slots, root)
        REMOVER.root = root
        if self.own_uids():
            left = REMOVER.remove_left_behind(SHARED_TEMP_DIRS if self.leftovers is None
                                              else self.leftovers.directories)
            if left:
                log("info", "task_leftovers_removed", path=LEFT_BEHIND + "*", entries=left)
        self.tracking = self.tracking_mechanism(worker)
        self.python_note = self.choose_python()
        self.path = self.task_path()
        self.environ = None     # made again: tmpdir_usable needs the task root chosen above
        withheld = self.environment(withheld=True)[1]
        if withheld:
            log("warning", "task_env_withheld", names=withheld,
                message="not given to tasks: a URL in them holds a user or password;"
                " --pass-env NAME gives one to every task")
        for note in getattr(self.options, "sandbox_notes", ()):
            log("warning", "task_sandbox_limited", message=note)
        if self.python_note:
            log("warning", "task_python", message=self.python_note)
        if "--token" in self.options.argv or any(
                a.startswith("--token=") for a in self.options.argv):
            log("warning", "token_on_command_line", message="the join token is on the"
                " command line, where every local user and task can read it (ps);"
                " use --token-file or RC_TOKEN")
        log("info", "task_sandbox", user=self.describe_user(), tracking=self.tracking,
            isolation=self.describe_isolation(), task_dirs=self.workdirs.root)

    def choose_python(self):
        """Python tasks run in the spawner's interpreter and import from its
        library: a task of another uid, or one whose home is hidden, must be
        able to read it. Where it cannot (a python under /root or ~), tasks
        get a python3 from PATH that they can read; a note says which."""
        other_uid = self.other_uid
        hidden = self.hidden_paths() if getattr(self.options, "isolated", False) else []
        if not (other_uid or hidden):
            return None
        here = (sys.executable, os.path.dirname(os.__file__))
        if all(reachable(path, other_uid, hidden) for path in here):
            return None
        for candidate in dict.fromkeys(filter(None, [which("python3"), "/usr/bin/python3",
                                                     "/usr/local/bin/python3"])):
            library = run_quietly([candidate, "-I", "-c",
                                   "import os; print(os.path.dirname(os.__file__))"])
            if library and all(reachable(path, other_uid, hidden)
                               for path in (candidate, library.strip())):
                task_python[:] = [os.path.realpath(candidate)]
                return ("python tasks run with %s: tasks cannot read the library of %s"
                        % (task_python[0], sys.executable))
        return ("tasks cannot read the library of %s and no python3 on PATH they can:"
                " python tasks may fail to import modules" % sys.executable)

    def task_path(self):
        """PATH less the directories a task cannot search (another uid's, or
        hidden): a shell would say "Permission denied" for every command it
        does not find. Found once: it costs a task 0.2 ms in its own process."""
        other_uid = self.other_uid
        hidden = self.hidden_paths() if getattr(self.options, "isolated", False) else []
        return os.pathsep.join(
            d for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if d and os.path.isdir(d) and reachable(d, other_uid, hidden))

    def environment(self, withheld=False):
        """The worker's variables every task starts from (task_environment);
        with `withheld`, (that, the names left out for a password in them)."""
        if self.environ is None:
            self.environ = task_environment(getattr(self.options, "pass_env", None) or (),
                                            self.tmpdir_usable)
        return self.environ if withheld else self.environ[0]

    def tmpdir_usable(self, path):
        """Whether tasks can write in the worker's $TMPDIR: one of another
        uid, a directory every user may write (/tmp); an isolated one, one
        not hidden."""
        hidden = self.hidden_paths() if getattr(self.options, "isolated", False) else []
        try:
            writable = not self.other_uid or bool(os.stat(path).st_mode & 0o002)
        except OSError:
            return False
        return writable and reachable(path, self.other_uid, hidden)

    def own_uids(self):
        """Whether each task runs as a uid of its own."""
        return bool(self.user_name) and not self.shared_uid

    def tracking_mechanism(self, worker):
        if self.own_uids():
            return "a uid per task: all of its processes are killed"
        if self.cgroups.base is not None:
            return "cgroup v2 per task (%s)" % self.cgroups.base
        if linux_kernel() and worker.spawner.usable():
            return "subreaper spawner following /proc (an environment mark for the quick)"
        return "process group only: a task that calls setsid escapes it"

    def describe_user(self):
        if not self.user_name:
            return ("the worker's own (uid %d): tasks can read files of the worker's user"
                    % os.geteuid())
        if self.shared_uid:
            return "%s, shared: tasks can read each other's files" % self.user_name
        return "a uid of its own per task (%s)" % self.user_name

    def describe_isolation(self):
        if not getattr(self.options, "isolated", False):
            return "none"
        hidden = ", ".join(self.hidden_paths())
        kind = "mount namespace" if os.geteuid() == 0 else "user and mount namespace"
        text = "%s hiding %s" % (kind, hidden)
        if self.options.read_only:
            text += "; read-only: %s" % ", ".join(self.options.read_only)
        text += "; no network" if self.options.isolate_network else ""
        if getattr(self.options, "pid_namespace", False):
            return text + "; a PID namespace of its own: it sees and signals only its processes"
        return text + "; %s: it sees every process%s" % (
            getattr(self.options, "pid_namespace_problem", None) or "no PID namespace",
            "" if os.geteuid() == 0 else " and can signal the worker's")

    def hidden_paths(self):
        """What isolation covers: the state dir, the home directory, each --hide,
        less what holds the task directories (a task must reach its own)."""
        paths = [os.path.expanduser(self.options.state_dir), os.path.expanduser("~")]
        paths += [os.path.abspath(path) for path in self.options.hide]
        if self.options.token_file:
            paths.append(os.path.abspath(os.path.expanduser(self.options.token_file)))
        root = self.workdirs.root if self.workdirs else "/nonexistent"
        return [p for p in dict.fromkeys(paths)
                if p not in ("/", "") and not (root + "/").startswith(p.rstrip("/") + "/")]

    # -- one task -------------------------------------------------------------

    def open(self, worker, task):
        """The jail of a task about to start: the request's "jail" field."""
        uid = self.task_uid()
        if self.own_uids():
            self.shared_leftovers().before_task(uid)
        gid = self.gid if self.gid is not None else uid
        staged = task.workdir      # files: made and filled by the worker (Files.stage)
        try:
            cwd = self.workdirs.adopt(staged, uid, gid) if staged else self.workdirs.take(uid, gid)
        except OSError:
            if uid is not None and not self.shared_uid:   # no task runs as it after all
                self.idle_uids.append(uid)
            if staged:
                remove_tree(staged)
                task.workdir = None
            raise
        jail = {"uid": uid, "gid": gid, "user": self.task_user_name(uid),
                "cwd": cwd,
                "cgroup": self.cgroups.make("task-%s-%s" % task.key),
                "cgroup_home": self.cgroups.home if self.cgroups.base else None,
                "own_uid": uid is not None and not self.shared_uid, "path": self.path,
                "nproc": self.process_limit(uid),
                "track": self.tracking.startswith("subreaper")}
        self.tell_watchdog(worker, b"+", jail)
        if getattr(self.options, "isolated", False):
            top = os.path.dirname(self.workdirs.root)
            jail.update(isolate=True, hide=self.hidden_paths(),
                        own_dir=(top, os.path.relpath(jail["cwd"], top)),
                        read_only=[os.path.abspath(p) for p in self.options.read_only],
                        network=not self.options.isolate_network,
                        pid_namespace=getattr(self.options, "pid_namespace", False))
        return jail

    def task_user_name(self, uid):
        """USER and LOGNAME of a task of `uid` (None: the worker's own uid)."""
        if uid is None:
            return ""
        if uid not in self.user_names:
            self.user_names[uid] = account_name(uid)
        return self.user_names[uid]

    def may_link_inputs(self):
        """Whether a task's inputs may be hard links to the cache's blobs
        (0400, the worker's). A task of another uid gets copies: it could
        not read the blob, and the state dir stays owner-only. A task of the
        worker's own uid could chmod and write a linked blob, so it gets
        copies too when isolated; unisolated, it reaches the cache in the
        state dir anyway."""
        return not self.other_uid and not getattr(self.options, "isolated", False)

    @staticmethod
    def keep_for_upload(path):
        """A task's directory that stays for its files' upload after the task
        has ended (Files.upload_first): the worker's again, 0700, so that the
        next task of the same uid cannot reach into it while the worker reads
        it. All of this task's processes are gone (end() ran)."""
        if os.lstat(path).st_uid != os.geteuid():
            os.chown(path, os.geteuid(), os.getegid(), follow_symlinks=False)
            os.chmod(path, 0o700)     # ours, in the task root no task can write

    def task_uid(self):
        """The uid the next task runs as: a free one of the range, the shared
        one, or None (the worker's own)."""
        if self.shared_uid:
            return self.free_uids[0]
        if not self.user_name:
            return None
        if not self.idle_uids:
            self.claim_uid()
        return self.idle_uids.pop(0)

    def shared_leftovers(self):
        """The Leftovers of this worker's task uids, made (and its code
        loaded: an idle worker, or one whose tasks run as itself, holds
        none of it) when a task first needs it."""
        if self.leftovers is None:
            load_region("leftovers")
            self.leftovers = Leftovers()
        return self.leftovers

    def claim_uid(self):
        """Take one more uid of the range for this worker, for as long as it
        lives: a lock (flock) on TOP/uid-UID.lock, which no other worker of
        this machine then gets. Two workers run as root (a main node's local
        worker and a device's) must never share one: the end of a task kills
        every process of its uid."""
        import fcntl
        fallback = os.path.dirname(self.workdirs.root)
        # Also where workers before UID_LOCK_DIR took it ($TMPDIR's): one may
        # still run beside this one (an upgrade under way).
        tops = sorted({uid_lock_dir(fallback), fallback})
        while self.free_uids:
            uid = self.free_uids.pop(0)
            fds = [os.open(os.path.join(top, "uid-%d.lock" % uid), os.O_RDWR | os.O_CREAT,
                           0o600) for top in tops]
            try:
                for fd in fds:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:        # another worker's
                for fd in fds:
                    os.close(fd)
                continue
            self.claimed[uid] = fds
            self.idle_uids.append(uid)
            return
        raise OSError(errno.EAGAIN, "every task uid (%s) is in use" % self.user_name)

    def process_limit(self, uid):
        """RLIMIT_NPROC: it counts every process of the real uid, so a uid
        shared with others (the worker's) gets room above what it has now."""
        if uid is not None and not self.shared_uid:
            return TASK_PROCESSES
        count = user_processes(os.geteuid() if uid is None else uid)
        return None if count is None else count + TASK_PROCESSES

    def end(self, worker, task):
        """Kill every process the task started, however it detached."""
        jail = task.jail
        pid = task.proc.pid if task.proc is not None else None
        if pid is not None and not task.reaped:
            kill_group(pid)
        if isinstance(task.proc, SpawnedChild):
            if task.reaped:      # the spawner ended the rest before it reaped it
                return
            if worker.spawner.sock is not None:     # its parent does the rest, now
                if pid is not None:
                    worker.spawner.end_tree(pid)
                return
        # A process of our own, or of a spawner that is gone.
        if jail.get("cgroup"):
            self.cgroups.kill(jail["cgroup"])
        elif jail.get("own_uid"):
            kill_uid(jail["uid"])

    def close(self, worker, task):
        """After end(): give back the task's uid, cgroup and directory."""
        jail = task.jail
        self.tell_watchdog(worker, b"-", jail)
        if jail.get("cgroup"):
            self.cgroups.remove(jail["cgroup"])
        if jail.get("uid") is not None and not self.shared_uid:
            # Now too, not only before its next task: uids are taken lowest
            # first, and a second slot's may not run again for days, while
            # its files in /dev/shm hold the device's memory.
            if self.own_uids():
                self.shared_leftovers().after_task(jail["uid"], ended=task.reaped)
            self.idle_uids.append(jail["uid"])
            self.idle_uids.sort()     # the lowest first: its spare directory waits for it
        if task.workdir is not None:      # else files took it for an upload (upload_first)
            self.workdirs.give_back(jail["cwd"], jail.get("uid"))

    def tell_watchdog(self, worker, sign, jail):
        """What the watchdog kills if the worker dies: the task's cgroup, its
        uid. A uid of its own is told once, at its first task, and stays: it
        is this worker's until it exits (claim_uid), and once idle it has no
        process to kill in vain. A write (and a wake of the watchdog) less
        for each task."""
        if jail.get("cgroup"):
            worker.watchdog.tell(sign + b"C" + jail["cgroup"].encode() + b"\n")
        uid = jail.get("uid")
        if uid is not None and not self.shared_uid and uid not in self.watched_uids:
            self.watched_uids.add(uid)
            worker.watchdog.tell(b"+U%d\n" % uid)

    def stop(self):
        if self.workdirs is not None:
            self.workdirs.clear()
            remove_tree(self.workdirs.root)
        self.cgroups.stop()



###############################################################################
# The spawner: a warm interpreter that forks the tasks ########################
###############################################################################
# Starting a process from the worker costs a fork of the worker and, for a
# Python task, a whole interpreter start (~20 ms; far more on a Pi). Instead
# the worker starts, when the first such task comes, a second interpreter of
# this file (`worker.py --spawner FD`) that holds no connection and no token.
# For each task it forks a child: the child starts a session of its own, sets
# the rlimits and either execs the command or, for python_eval/python_exec,
# runs the code itself, in a process of its own, never in the worker. The
# spawner reaps its children and sends their exit status and resource usage
# back. It needs fork and Unix SOCK_SEQPACKET sockets (Linux, Android); where
# either is missing, tasks start through subprocess as before. It exits when
# the worker closes the socket, or dies, killing what it still runs.

class SpawnedChild(object):
    """What ProcessTask needs of a task process the spawner starts: the
    reading ends of its stdout and stderr at once, its pid when the spawner
    answers (or the error that kept it from starting)."""
    pid = None
    error = None
    error_number = None  # the error's errno, when it has one
    returncode = None
    doomed = False       # killed before it started: kill it as soon as it has a pid
    abandoned = False    # and its end is of no interest (ProcessTask.abandon)
    release = None       # an abandoned one's: gives its task's uid back, once it has ended
    watched = True       # the watchdog hears of its group (ProcessTask.watched_group)

    def __init__(self, stdout, stderr):
        self.stdout, self.stderr = stdout, stderr


class Usage(object):
    """The parts of a resource usage the spawner reports."""
    def __init__(self, ru_utime, ru_stime, ru_maxrss):
        self.ru_utime, self.ru_stime, self.ru_maxrss = ru_utime, ru_stime, ru_maxrss


class Spawner(object):
    """The worker's end of the spawner."""
    process = None       # the spawner (a subprocess.Popen), while it runs
    sock = None
    broken = False       # it failed once: tasks start through subprocess from now on

    def __init__(self):
        self.starting = []        # SpawnedChild sent and not yet answered, in order
        self.children = set()     # pids of task processes not yet reported ended
        self.exits = {}           # pid -> (wait status, Usage), until its task takes it
        self.releases = {}        # pid of an abandoned child -> its release, at its end
        self.idle_since = time.monotonic()
        self.continue_at = 0.0

    def usable(self):
        return (not self.broken and hasattr(os, "fork")
                and hasattr(socket, "SOCK_SEQPACKET") and hasattr(socket, "AF_UNIX"))

    def start(self, worker):
        import subprocess
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = theirs.fileno()
        # -I: the Python tasks it forks run as `python -I` would.
        isolated = [python_executable(), "-I"]
        argv = bytecode_argv("serve_spawner(%d)" % fd, isolated) or isolated + [
            WORKER_FILE, "--spawner", str(fd)]
        try:
            # Its environment is the tasks' (Sandbox.environment), not ours.
            self.process = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            env=worker.sandbox.environment())
        finally:
            theirs.close()
        self.sock = ours
        worker.selector.register(ours, selectors.EVENT_READ, lambda mask: self.receive(worker))
        log("debug", "spawner_started", pid=self.process.pid)

    def spawn(self, worker, request):
        """Ask for a task process; a SpawnedChild whose pid comes with the
        spawner's answer, or None when there is no spawner (the caller starts
        the process itself). The worker never waits for the answer."""
        import array
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            if self.sock is None:
                self.start(worker)
            self.sock.sendmsg([dumps(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", (out_w, err_w)))])
        except (OSError, ValueError) as e:
            os.close(out_r)
            os.close(err_r)
            if getattr(e, "errno", None) == errno.EMSGSIZE:
                # Larger than one message may be (the socket's buffer, ~208 KiB
                # by default; a payload may hold 768): this task alone starts
                # as without a spawner, and the spawner serves the others.
                log("debug", "spawner_request_too_large", bytes=len(dumps(request)))
                return None
            log("warning", "spawner_failed", error=str(e))
            self.broken = True
            self.lost(worker)
            return None
        finally:
            os.close(out_w)
            os.close(err_w)
        child = SpawnedChild(os.fdopen(out_r, "rb", 0), os.fdopen(err_r, "rb", 0))
        child.watched = group_watched(request.get("jail"))
        self.starting.append(child)
        return child

    def receive(self, worker):
        while self.sock is not None and self.read_message(worker):
            pass

    def read_message(self, worker):
        """Take one message from the spawner: a child started (or not), or
        one that ended. False when there is none; at the spawner's end too."""
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.lost(worker)
            return False
        message = loads(data)
        if "exit" in message:
            self.ended(message["exit"], message["status"], Usage(*message["usage"]))
        elif "pid" in message:
            self.started(worker, self.starting.pop(0), message["pid"])
        else:
            child = self.starting.pop(0)
            child.error, child.error_number = message["error"], message.get("errno")
            if child.release is not None:
                child.release()
        return True

    def started(self, worker, child, pid):
        child.pid = pid
        if child.doomed:            # its task ended (timed out, cancelled, dropped) meanwhile
            kill_group(pid)
            self.end_tree(pid)      # it may have no session (nor uid) of its own yet
            if child.abandoned:     # nothing waits for its end but its uid
                if child.release is not None:
                    self.releases[pid] = child.release
                return
        self.children.add(pid)
        if child.watched:
            worker.watchdog.group_started(pid)

    def ended(self, pid, status, usage):
        release = self.releases.pop(pid, None)
        if release is not None:
            release()
        if pid in self.children:
            self.children.discard(pid)
            self.exits[pid] = (status, usage)
        if not self.children:
            self.idle_since = time.monotonic()

    def lost(self, worker):
        """The spawner is gone. Its children are orphans we cannot wait for:
        end them, and if there were any, restart the worker (same pid) so that
        the main node takes their tasks back as from a crashed worker. A task
        that kills the spawner is thus charged like one that kills the
        worker, and ends as a poison pill rather than failing its neighbours."""
        if self.process is not None:
            log("warning", "spawner_lost", pid=self.process.pid, tasks=len(self.children))
        for pid in self.children:
            kill_group(pid)
        serving = bool(self.children or self.starting)
        for release in list(self.releases.values()) + [
                child.release for child in self.starting if child.release is not None]:
            release()
        self.releases.clear()
        self.children.clear()
        self.starting.clear()
        self.stop(worker)
        if serving:
            worker.restart("the task spawner exited with tasks running", "error")

    def forget(self, worker, child):
        """An abandoned task: kill it; its end is of no more interest but
        for its release, called once the spawner has reaped it (started,
        ended), at once if it has."""
        if child.pid is None:
            if child.error is not None:       # it could not start: nothing to wait for
                if child.release is not None:
                    child.release()
                return
            child.doomed = child.abandoned = True
            return
        kill_group(child.pid)
        if child.pid in self.children:
            self.children.discard(child.pid)
            if child.watched:
                worker.watchdog.group_ended(child.pid)
            if child.release is not None:
                self.releases[child.pid] = child.release
        elif child.release is not None:
            child.release()
        self.exits.pop(child.pid, None)

    def end_tree(self, pid):
        """Ask the spawner to kill what the task `pid` started (see TaskTrees)."""
        try:
            self.sock.send(dumps({"end": pid}))
        except (OSError, AttributeError):     # gone: lost() ends its children
            pass

    def keep_going(self, now):
        """A SIGCONT now and then to a spawner with tasks: one of them may
        have stopped it (SIGSTOP, which it cannot ignore; see
        SPAWNER_IGNORES), and a stopped spawner started no task again."""
        if self.process is None or not (self.children or self.starting) \
                or now < self.continue_at:
            return
        self.continue_at = now + SPAWNER_CONTINUE_EVERY
        try:
            os.kill(self.process.pid, signal.SIGCONT)
        except OSError:
            pass

    def stop_when_idle(self, worker, now):
        if self.sock is not None and not self.children and not self.starting and \
                not self.releases and now - self.idle_since >= SPAWNER_IDLE:
            self.stop(worker)

    def stop(self, worker):
        if self.sock is not None:
            worker.selector.unregister(self.sock)
            self.sock.close()       # the spawner exits at end of file
            self.sock = None
        if self.process is not None:
            try:
                self.process.wait(WATCHDOG_EXIT_WAIT)
            except Exception:
                self.process.kill()
            self.process = None
        self.idle_since = time.monotonic()


# >>> The spawner's own code: the worker process loads this file without it.
# (compile_without_spawner; tests/test_worker_identity.py checks that nothing
# outside these lines that the worker runs names anything defined in them.)

def serve_spawner(fd):
    """The spawner's life: fork a child per request, report each child's end."""
    import select
    import atexit, gc, resource, types     # noqa: F401 -- once here, not in every child
    for name in SPAWNER_PRELOAD:
        try:
            __import__(name)
        except ImportError:        # a trimmed Python: its tasks import what they need
            pass
    for signum in spawner_ignores():
        signal.signal(signum, signal.SIG_IGN)     # the worker ends us, by closing the socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd)
    # Handed over inheritable; a task that kept it (posix_spawn keeps what is
    # inheritable) could ask the spawner for processes outside its sandbox.
    os.set_inheritable(fd, False)
    if hasattr(gc, "freeze"):
        gc.freeze()      # the collector in a child would write to (and copy) every page
    wakeup, wakeup_writer = os.pipe()
    for end in (wakeup, wakeup_writer):
        os.set_blocking(end, False)
    signal.set_wakeup_fd(wakeup_writer)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children = {}     # pid of a task's first process -> the task's jail
    trees = TaskTrees.started()
    # Only root gives tasks uids of their own; their tasks come back to us (subreaper).
    if trees is not None and os.geteuid() == 0:
        trees.template = Template.start(sock)
    while True:
        busy = trees is not None and trees.owner
        readable = select.select([sock, wakeup], [], [], TRACK_INTERVAL if busy else None)[0]
        if wakeup in readable:
            while True:
                try:
                    if not os.read(wakeup, 4096):
                        break
                except OSError:
                    break
        if sock in readable and not serve_request(sock, children, trees):
            break
        report_exits(sock, children, trees)
        if busy:
            trees.scan()
    for pid, jail in children.items():
        end_task(pid, jail, None, everything=True)
    if trees is not None:
        trees.end_all()
    return 0


def serve_request(sock, children, trees):
    """Start one task process, or end one's tree; False when the worker has gone."""
    import array
    fds = array.array("i")
    try:
        data, ancillary, _, _ = sock.recvmsg(MAX_FRAME_BYTES * 2, socket.CMSG_SPACE(
            2 * fds.itemsize))
    except OSError:
        return False
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data:
        return False
    if not fds:
        request = loads(data)
        pid = request.get("end")
        if pid in children:
            end_task(pid, children[pid], trees, everything=True)
        return True
    try:
        if len(fds) != 2:
            raise ValueError("a request carries two descriptors")
        for fd in fds:
            os.set_inheritable(fd, False)     # only as the child's stdout and stderr
        request = loads(data)
        jail = request.setdefault("jail", {})
        tracked = trees is not None and jail.get("track")
        if tracked:
            jail["mark"] = trees.new_mark()
        template = trees.template if trees is not None else None
        if (request.get("self_limiting") and hasattr(os, "posix_spawn")
                and not jail.get("isolate")):
            pid = spawn_command(request, fds[0], fds[1])
        elif ("argv" not in request and jail.get("own_uid") and template is not None
              and template.alive()):      # tasks of one uid could read each other anyway
            pid = template.fork(request, fds[0], fds[1])
        else:
            pid = fork_child(request, fds[0], fds[1])
        children[pid] = jail
        if tracked:
            trees.add(pid, jail["mark"])
        reply = {"pid": pid}
    except (OSError, ValueError) as e:
        reply = {"error": str(e), "errno": getattr(e, "errno", None)}
    for fd in fds:
        os.close(fd)
    sock.send(dumps(reply))
    return True


class Template(object):
    """The spawner's image as it started, before any task's payload came:
    Python tasks of a uid of their own (a root worker's), which run without
    an exec, are forked from it, never from the spawner, whose memory holds
    what earlier tasks were sent (their code, commands and env: freed, not
    wiped), which a task reading its own memory would find, another uid's
    too. The template forks each task as the spawner's child (fork_sibling,
    or answer_through_child), which reaps it as any other. The task reads
    its request from a pipe the spawner writes: the template never sees one."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock

    @classmethod
    def start(cls, spawner_sock):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                spawner_sock.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)    # its children reap themselves
                serve_template(theirs)
            finally:
                os._exit(0)
        theirs.close()
        return cls(pid, ours)

    def alive(self):
        return self.pid is not None

    def fork(self, request, stdout_fd, stderr_fd):
        import array, marshal
        reader, writer = os.pipe()
        try:
            try:
                self.sock.sendmsg([b"fork"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", (stdout_fd, stderr_fd, reader)))])
                reply = loads(self.sock.recv(4096))
            except (OSError, ValueError):
                self.pid = None       # gone: Python tasks are forked as before
                raise OSError(errno.ECHILD, "the spawner's template is gone")
            finally:
                os.close(reader)
            if "pid" not in reply:
                raise OSError(reply.get("errno") or errno.EAGAIN,
                              reply.get("error", "the template forked nothing"))
            pid = reply["pid"]
            try:
                write_all(writer, marshal.dumps((dumps(request), python_code(request))))
            except OSError:
                pass              # it died before it read: its end is reported
            return pid
        finally:
            os.close(writer)


def serve_template(sock):
    """The template's life: a task process for each pair of output
    descriptors and request pipe, until the spawner goes."""
    import array
    fork_sibling = sibling_forker()
    while True:
        fds = array.array("i")
        try:
            data, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(3 * fds.itemsize))
        except OSError:
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data or len(fds) != 3:
            return
        try:
            if fork_sibling is None:
                answer_through_child(sock, fds)
            else:
                pid = fork_sibling()
                if pid == 0:
                    run_template_child(fds)
                sock.send(dumps({"pid": pid}))
        except OSError as e:        # no process to be had (nproc, pids): this task fails
            sock.send(fork_failed(e))
        for fd in fds:
            os.close(fd)


def answer_through_child(sock, fds):
    """fork_sibling's work where it cannot be done: a child of the template
    forks the task, answers its pid and exits at once, and the task (even
    one ended already: a zombie, never reaped here, as SIG_IGN would) is the
    spawner's child then."""
    if os.fork() == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                pid = os.fork()
            except OSError as e:
                sock.send(fork_failed(e))
            else:
                if pid == 0:
                    run_template_child(fds)
                sock.send(dumps({"pid": pid}))
        finally:
            os._exit(0)


def fork_failed(error):
    """The template's answer when it could fork no task (Template.fork reads it)."""
    return dumps({"error": error.strerror or str(error), "errno": error.errno})


def sibling_forker():
    """os.fork, but the child is our parent's (clone's CLONE_PARENT): the
    template's task is the spawner's child from its first instruction, with
    no process between them to fork it and exit (a fork and an exit a task:
    ~1 ms on a small VM). What os.fork does around fork(), PyOS_BeforeFork
    and PyOS_AfterFork_*, is done here too; the template runs no thread, so
    no lock is held by another. Only on glibc 2.25 and later (glibc caches
    no pid, and a raw clone leaves a cached one stale: bionic's, musl's
    thread tid); None elsewhere, where a go-between forks the task."""
    number = CLONE_SYSCALLS.get(os.uname().machine)
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION").split()[1]
        if number is None or tuple(int(part) for part in version.split(".")[:2]) < (2, 25):
            return None
        import ctypes
        api = ctypes.pythonapi
        before, parent, child = (api.PyOS_BeforeFork, api.PyOS_AfterFork_Parent,
                                 api.PyOS_AfterFork_Child)       # Python 3.7 on
        clone = ctypes.PyDLL(None, use_errno=True).syscall      # the GIL held, as os.fork
    except (AttributeError, ImportError, IndexError, OSError, TypeError, ValueError):
        return None
    for function in (before, parent, child):
        function.argtypes, function.restype = (), None
    clone.argtypes, clone.restype = (ctypes.c_long,) * 6, ctypes.c_long
    flags = CLONE_PARENT | signal.SIGCHLD

    def fork_sibling():
        before()
        pid = clone(number, flags, 0, 0, 0, 0)
        if pid == 0:
            child()
            return 0
        parent()
        if pid < 0:
            code = ctypes.get_errno()
            raise OSError(code, "clone: %s" % os.strerror(code))
        return pid
    return fork_sibling


def run_template_child(fds):
    """In a task forked from the template: read the request, become the task."""
    try:
        import marshal
        with os.fdopen(fds[2], "rb") as pipe:
            request, code = marshal.loads(pipe.read())
        run_spawned(loads(request), code, fds[0], fds[1])
    finally:
        os._exit(127)


def spawner_ignores():
    """SPAWNER_IGNORES here, and the real-time signals (they end a process
    too) but those the C library keeps for itself."""
    found = [getattr(signal, name) for name in SPAWNER_IGNORES if hasattr(signal, name)]
    if hasattr(signal, "SIGRTMIN") and hasattr(signal, "valid_signals"):
        valid = signal.valid_signals()
        found.extend(signum for signum in range(signal.SIGRTMIN, signal.SIGRTMAX + 1)
                     if signum in valid)
    return found


def fork_child(request, stdout_fd, stderr_fd):
    code = python_code(request)
    pid = os.fork()
    if pid == 0:
        try:
            run_spawned(request, code, stdout_fd, stderr_fd)
        finally:
            os._exit(127)
    return pid


def spawn_command(request, stdout_fd, stderr_fd):
    """Start a command that sets its own limits (a shell task) with
    posix_spawn: vfork's speed, and no Python in the child at all. A simple
    command (simple_command) starts as its program alone, without a shell."""
    argv = request["argv"]
    default, environment = spawn_defaults()
    jail = request["jail"]
    os.chdir(request["cwd"])      # inherited: posix_spawn has no chdir of its own
    if jail.get("mark"):
        environment[TASK_MARK] = jail["mark"]
    saved = own_identity(jail)
    if jail.get("uid") is not None:
        join_new_session_keyring()      # the child's: it is born with the spawner's
    try:
        borrow_task_identity(jail, environment)
        environment.update(request.get("env") or {})     # files: the task's env, last
        # The child opens its stdin as the task's uid (resetids): a file it may read.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, request.get("stdin") or os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout_fd, 1), (os.POSIX_SPAWN_DUP2, stderr_fd, 2)]
        options = dict(setsid=True, setsigdef=default, resetids=jail.get("uid") is not None)
        pid = spawn_simple(request, environment, actions, options)
        if pid is not None:
            return pid
        return os.posix_spawnp(argv[0], argv, environment, file_actions=actions, **options)
    finally:
        give_back_identity(jail, saved)
        os.chdir("/")


def spawn_defaults(made=[]):
    """(the signals a command gets back to their default: what Python
    ignores for itself and what we ignore; a copy of the spawner's
    environment). Found once: nothing changes either in the spawner, and
    copying os.environ (decoding every variable) and listing the signals
    cost ~25 us of each task's start."""
    if not made:
        made.append([getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ")
                     if hasattr(signal, name)] + spawner_ignores())
        made.append(dict(os.environ))
    return made[0], dict(made[1])


# A simple command's words: what no POSIX shell expands, splits or treats as
# an operator. Anything else (quotes, $, globs, ~, ;, |, &, 2>, a newline...)
# goes to the shell as ever.
PLAIN_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789_./,:+@%=-")
# First words a shell runs itself (builtins, reserved words, in dash or bash):
# such a command goes to the shell, whatever PATH holds.
SHELL_WORDS = frozenset((
    ".", ":", "[", "alias", "bg", "break", "builtin", "caller", "case", "cd", "chdir",
    "command", "compgen", "complete", "continue", "declare", "dirs", "disown", "do", "done",
    "echo", "elif", "else", "enable", "esac", "eval", "exec", "exit", "export", "false",
    "fc", "fg", "fi", "for", "function", "getopts", "hash", "help", "history", "if", "in",
    "jobs", "kill", "let", "local", "logout", "mapfile", "popd", "printf", "pushd", "pwd",
    "read", "readarray", "readonly", "return", "select", "set", "shift", "shopt",
    "source", "suspend", "test", "then", "time", "times", "trap", "true", "type",
    "typeset", "ulimit", "umask", "unalias", "unset", "until", "wait", "while"))
REDIRECTIONS = (">>", ">", "<")      # longest first


def plain_word(word):
    return bool(word) and set(word) <= PLAIN_CHARACTERS


def simple_command(command):
    """(argv, stdin path or None, stdout path or None, append) when the
    command is one program with plain words and at most one `<` and one
    `>` or `>>`: what the shell would run as that program alone, in a
    child it forks (dash does not exec the last command). None otherwise.
    As GNU make's fast path: one process a task where the shell made two
    (on 2026-12-06's VM, starting a process cost ~0.9 ms)."""
    if not command or len(command) > SIMPLE_COMMAND_MAX:
        return None
    argv, into = [], {}
    words = iter(command.replace("\t", " ").split(" "))
    for word in words:
        if not word:
            continue
        operator = next((op for op in REDIRECTIONS if word.startswith(op)), None)
        if operator is None:
            if not plain_word(word):
                return None
            argv.append(word)
            continue
        target = word[len(operator):] or next(words, "")
        key = "<" if operator == "<" else ">"
        if key in into or not plain_word(target):
            return None
        into[key] = (target, operator == ">>")
    if not argv or "=" in argv[0] or argv[0] in SHELL_WORDS:
        return None
    stdout = into.get(">", (None, False))
    return argv, into.get("<", (None,))[0], stdout[0], stdout[1]


def spawn_simple(request, environment, actions, options):
    """A shell task's simple command started as its program alone, with
    the limits the shell would have set, or None: not a simple command,
    its program not found, set-user-ID, or not started (the shell then
    runs it and says why, as it always did, with its exit status). It is
    born with its limits, which the spawner takes on for that moment (a
    process it forks at once has them too: set after its start, as they
    were, they missed it, which could then raise them all); as
    posix_spawn returns, prlimit sets its CPU time."""
    simple = simple_command(request.get("command"))
    program = simple and program_path(simple[0][0], environment.get("PATH"))
    if not program:
        return None
    argv, stdin, stdout, append = simple
    if not all(opens_at_once(path) for path in (stdin, stdout) if path is not None):
        return None
    # The child opens them while the spawner, and every task start after
    # this one, waits: never for a FIFO made there since opens_at_once.
    actions = list(actions)
    if stdin is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 0, stdin, os.O_RDONLY | os.O_NONBLOCK, 0))
    if stdout is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 1, stdout, os.O_WRONLY | os.O_CREAT | (
            os.O_APPEND if append else os.O_TRUNC) | os.O_NONBLOCK, 0o666))
    environment = dict(environment, PWD=request["cwd"])     # as the shell exports it
    try:
        import resource
    except ImportError:
        return None
    if not hasattr(resource, "prlimit"):      # a libc without it (an old Android's)
        return None
    limits = [value[1:] for value in rlimit_values(resource, request.get("limits") or ())]
    inherited = [limit for limit in limits if limit[0] != resource.RLIMIT_CPU]
    if not room_for(resource, inherited):
        return None
    saved = [(which, resource.getrlimit(which)) for which, _, _ in inherited]
    try:
        for which, soft, hard in inherited:
            resource.setrlimit(which, (soft, hard))
        try:
            pid = os.posix_spawn(program, argv, environment, file_actions=actions, **options)
        except (OSError, MemoryError):
            # A redirection, ENOEXEC (a script without #!), too many processes
            # of its uid already: the shell's to run and explain.
            return None
    finally:
        for which, limit in saved:
            give_back_limit(resource, which, limit)
    try:
        set_limits_of(resource, pid, limits)
    except ProcessLookupError:
        pass                # over already
    except OSError:
        kill_group(pid)     # never run without its limits
        raise
    return pid


def give_back_limit(resource, which, limit):
    """The spawner's own limit again after a spawn. Without CAP_SYS_RESOURCE
    it may not raise a hard one: it keeps the task's (every task of the
    worker has the same), its soft one as high as that lets it."""
    try:
        resource.setrlimit(which, limit)
    except (ValueError, OSError):
        hard = resource.getrlimit(which)[1]
        resource.setrlimit(which, (hard, hard))


def opens_at_once(path):
    """Whether opening `path` for a redirection cannot wait (for a FIFO's
    other end, a modem's carrier...): a regular file, /dev/null, or nothing
    there yet. Anything else is the shell's, which opens it in the task's
    own process."""
    import stat
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True           # the open fails, or makes a file: at once
    return stat.S_ISREG(mode) or path == os.devnull


def set_limits_of(resource, pid, limits):
    """prlimit, still as the task's uid (borrow_task_identity): a root
    spawner without CAP_SYS_RESOURCE (a container's) may set no other
    uid's. Until the child's exec has taken on its new ids (the kernel
    lets posix_spawn return a moment before), they are not the task's
    alone: EPERM, asked again."""
    deadline = time.monotonic() + PRLIMIT_WAIT
    for which, soft, hard in limits:
        while True:
            try:
                resource.prlimit(pid, which, (soft, hard))
                break
            except PermissionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.0001)


PRLIMIT_WAIT = 1.0        # seconds a child's exec may take to take on its ids


def room_for(resource, inherited):
    """Whether the spawner can take the task's address space limit on itself
    for the moment of posix_spawn (so that the child is born with it, and
    with every other soft limit but CPU time, which the spawner has used
    up its own of): its own size now, and some to spare for the spawn."""
    limit = [soft for which, soft, _ in inherited if which == resource.RLIMIT_AS]
    if not limit:
        return True
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return False
    return size + SPAWN_ROOM_BYTES < limit[0]


SPAWN_ROOM_BYTES = 32 * 1048576    # address space posix_spawn may take in the spawner


def program_path(name, path):
    """Where the shell would find `name` on `path`: an executable regular
    file, not set-user-ID or set-group-ID (its limits could not be set
    after its start); None when there is none."""
    import stat
    candidates = [name] if "/" in name else [
        os.path.join(directory or ".", name) for directory in (path or "").split(":")]
    for candidate in candidates:
        try:
            status = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(status.st_mode) and os.access(candidate, os.X_OK):
            return None if status.st_mode & (stat.S_ISUID | stat.S_ISGID) else candidate
    return None


def borrow_task_identity(jail, environment):
    """For one posix_spawn, which can neither join a cgroup nor change ids:
    the spawner steps into the task's cgroup (the child is born there) and,
    as root, takes the task's uid and gid as its *real* ids, which `resetids`
    makes the child's effective ones (exec then makes them its saved ones
    too, and drops every capability). give_back_identity undoes it."""
    if jail.get("cgroup"):
        write_file(os.path.join(jail["cgroup"], "cgroup.procs"), str(os.getpid()))
    if jail.get("uid") is not None:
        os.setgroups([])
        os.setresgid(jail["gid"], -1, -1)
        os.setresuid(jail["uid"], -1, -1)
        environment.update(HOME=jail["cwd"], USER=jail["user"], LOGNAME=jail["user"],
                           PATH=jail["path"])


def own_identity(jail):
    """The spawner's ids, when borrow_task_identity is about to change them."""
    if jail.get("uid") is None:
        return None
    return os.getresuid(), os.getresgid(), os.getgroups()


def give_back_identity(jail, saved):
    if saved is not None:
        os.setresuid(*saved[0])
        os.setresgid(*saved[1])
        os.setgroups(saved[2])
    if jail.get("cgroup"):
        write_file(os.path.join(jail["cgroup_home"], "cgroup.procs"), str(os.getpid()))


def end_task(pid, jail, trees, everything):
    """In the spawner: kill what the task `pid` started. Its group and
    cgroup always (one signal, one write); its uid's processes and its
    tree in /proc (a fork, a scan) when `everything`. `pid` itself by its
    pid too (our child, not yet reaped: no stranger's): until it has made
    its session and taken its uid (a task forked from the Template reads its
    request first), neither the group nor the uid names it."""
    kill_pid(pid)
    kill_group(pid)
    if jail.get("cgroup"):
        TaskCgroups.kill(jail["cgroup"])
    if everything and jail.get("own_uid"):
        kill_uid(jail["uid"])
    if everything and trees is not None and jail.get("track"):
        trees.end(pid)


def strays(children, template=None):
    """Whether the spawner has a child that is not a task's first process
    (nor its Template): an orphan of some task (a subreaper gets every
    process a task left behind, the topmost of each one it left). True
    where /proc does not say."""
    kept = template.pid if template is not None else None
    try:
        return any(int(pid) not in children and int(pid) != kept for pid in read_small_file(
            "/proc/self/task/%d/children" % os.getpid()).split())
    except (OSError, ValueError):
        return True


def report_exits(sock, children, trees):
    ended = trees.reap(children) if trees is not None else reap_tasks(children)
    for pid, wait_status in ended:
        _, status, usage = wait_status
        del children[pid]
        sock.send(dumps({"exit": pid, "status": status,
                         "usage": [usage.ru_utime, usage.ru_stime, usage.ru_maxrss]}))


def reap_tasks(children):
    """Without a subreaper: reap each task's first process that ended, as
    reap_if_ended does, having killed what it left (its group, cgroup, uid)."""
    ended = []
    for pid, jail in list(children.items()):
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                continue
        except ChildProcessError:
            pass
        end_task(pid, jail, None, everything=True)
        ended.append((pid, os.wait4(pid, 0)))
    return ended


def python_source(request):
    """compile()'s arguments for a Python task's code."""
    if "eval" in request:
        return request["eval"], "<expression>", "eval"
    return request["exec"], request["filename"], "exec"


# CPython 3.7-3.9's compiler recurses on C's stack for each level of an
# expression without a limit: a chain of 30,000 `1+` (60 KB) ends it with
# SIGSEGV under a 1 MiB stack (3.6 and 3.10 on raise RecursionError). Past
# this size such code is compiled in the task's own process, where a crash
# ends that task alone, not the spawner and every task it started.
UNSAFE_COMPILE = (3, 7) <= sys.version_info[:2] <= (3, 9)
PRE_COMPILE_MAX = 32 * 1024


def python_code(request):
    """A Python task's code, compiled before the fork: compiling in the child
    costs it a millisecond of copied pages. None for a shell task, and for
    code that does not compile, which the child compiles again to report."""
    if "argv" in request:
        return None
    source = python_source(request)
    if UNSAFE_COMPILE and len(source[0]) > PRE_COMPILE_MAX:
        return None
    try:
        return compile(*source)
    except Exception:      # SyntaxError, ValueError (a NUL), RecursionError, MemoryError
        return None


def run_spawned(request, code, stdout_fd, stderr_fd):
    """In the forked child: become the task. Never returns."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for signum in [signal.SIGCHLD] + spawner_ignores():
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request["cwd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    close_all_but(-1)          # the spawner's socket above all
    try:
        enter_sandbox(request["jail"])
        # files: its stdin opened as the task itself, never through a link.
        if request.get("stdin"):
            os.dup2(os.open(request["stdin"], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), 0)
    except OSError as e:      # never run a task outside its sandbox
        os.write(2, ("cannot enter the task sandbox: %s\n" % e).encode())
        os._exit(126)
    os.environ.update(request.get("env") or {})       # files: the task's env, last
    apply_rlimits(request["limits"])
    if "argv" in request:
        # What Python ignores for itself, a command gets back (as subprocess does).
        for name in ("SIGPIPE", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        try:
            os.execvp(request["argv"][0], request["argv"])
        except OSError as e:
            os.write(2, ("cannot start %s: %s\n" % (request["argv"][0], e)).encode())
            os._exit(127)
    os._exit(run_python(request, code))


def run_python(request, code):
    """python_eval and python_exec, in the forked child: as `python -I` would
    run them, in a fresh __main__. Returns the exit status."""
    import types
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = [request.get("filename", "-c")]
    status = 0
    try:
        if code is None:    # it did not compile: compiling again raises what to report
            code = compile(*python_source(request))
        if "eval" in request:
            value = eval(code, main.__dict__)
            sys.stdout.write(repr(value) + "\n")
        else:
            exec(code, main.__dict__)
    except SystemExit as e:
        status = system_exit_status(e.code)
    except BaseException as e:
        import traceback
        # From the task's own code on, as `python -I` shows it: not this frame.
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    return finish_python(status)


def system_exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write("%s\n" % (code,))
    return 1


def finish_python(status):
    """What an interpreter does on its way out: wait for threads, run atexit
    functions, flush the output."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        status = status or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = status or 120
    return status


class TaskTrees(object):
    """In the spawner, made a child subreaper (Linux): orphans of its tasks
    come back to it instead of init, and each process is tied to the task
    that started it, by its parent found in /proc every TRACK_INTERVAL, or,
    for one orphaned before that (`setsid -f`), by the TASK_MARK in its
    environment. An orphan of no known task is killed at once; the processes
    of an ended task are killed on sight until none is left."""

    def __init__(self):
        self.me = os.getpid()
        self.owner = {}       # pid -> the first pid of its task
        self.marks = {}       # TASK_MARK value -> the first pid of its task
        self.ended = set()    # first pids of tasks that ended: their processes die
        self.count = 0
        self.template = None  # a Template, whose processes are no task's

    @classmethod
    def started(cls):
        """A TaskTrees if this process could become a subreaper, else None."""
        if not linux_kernel() or not os.path.isdir("/proc/self"):
            return None
        try:
            libc_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError, ImportError):
            return None
        return cls()

    def new_mark(self):
        self.count += 1
        return "%d.%d" % (self.me, self.count)

    def add(self, pid, mark):
        self.owner[pid] = pid
        self.marks[mark] = pid

    def scan(self):
        parents = process_parents()
        for pid in [pid for pid in self.owner if pid not in parents]:
            del self.owner[pid]
        tasks = set(self.owner.values())      # those with a process left
        self.ended &= tasks
        self.marks = {mark: pid for mark, pid in self.marks.items() if pid in tasks}
        outside = set()
        for pid in parents:
            self.claim(pid, parents, outside)
        for pid, leader in list(self.owner.items()):
            if leader in self.ended:
                kill_pid(pid)

    def claim(self, pid, parents, outside):
        """Find the task of `pid` through its ancestors."""
        chain = []
        while pid not in self.owner and pid not in outside and pid in parents:
            if parents[pid] == self.me and self.template is not None \
                    and pid == self.template.pid:
                break
            if parents[pid] == self.me:       # an orphan that came back to us
                leader = self.marks.get(process_mark(pid))
                if leader is None:
                    kill_pid(pid)             # of no task we know: it must not stay
                else:
                    self.owner[pid] = leader
                break
            chain.append(pid)
            pid = parents[pid]
        leader = self.owner.get(pid)
        for member in chain:
            if leader is None:
                outside.add(member)
            else:
                self.owner[member] = leader

    def end(self, leader):
        """Kill the task's processes now, and any found later."""
        if leader in self.owner:
            self.ended.add(leader)
            kill_group(leader)
            self.scan()

    def end_all(self):
        self.ended.update(self.marks.values())
        for _ in range(3):
            self.scan()

    def reap(self, children):
        """Reap every ended child, the tasks' first processes as
        reap_if_ended does (their group killed first) and orphans; the
        (pid, wait status) of the first ones."""
        ended = []
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                return ended
            pid = info.si_pid
            if pid in children:
                # Before it is reaped, while its pid (and group id) stays ours.
                end_task(pid, children[pid], self, everything=strays(children, self.template))
                ended.append((pid, os.wait4(pid, 0)))
            else:
                os.waitpid(pid, 0)
                if self.template is not None and pid == self.template.pid:
                    self.template.pid = None


def process_parents():
    """{pid: parent pid} of every process, from /proc."""
    parents = {}
    for name in list_dir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    parents[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def process_mark(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(TASK_MARK.encode() + b"="):
                    return entry.split(b"=", 1)[1].decode("ascii", "replace")
    except OSError:
        pass
    return None


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# <<< The end of the spawner's own code.


###############################################################################
# The watchdog: no orphaned tasks when the worker is killed ###################
###############################################################################
# Each task runs in a session of its own, so nothing ends it when the worker is
# killed with SIGKILL. A forked process reads "+PGID" and "-PGID" lines from a
# pipe (and "+C" cgroup, "+U" uid lines from the sandbox); end of file means
# the worker is gone, however it died.

class Watchdog(object):
    """What it must kill from now on ("+" lines) is told at once; what has
    ended ("-" lines) waits for the next "+" line or the end of the turn
    (release), so a short task costs two writes and wakes of the watchdog,
    not four (they were a fifth of the worker loop's CPU per `shell true`).
    Told late, an ended group or idle uid is only killed in vain."""
    pid = None
    fd = None       # the pipe's write end, while the watchdog is there
    ended = b""     # "-" lines not written yet

    def start(self):
        """Fork it; call before any socket is opened, so it holds none."""
        if not hasattr(os, "fork"):
            return
        read_fd, write_fd = os.pipe()        # not inherited by the tasks
        try:
            pid = os.fork()
        except OSError as e:
            os.close(read_fd)
            os.close(write_fd)
            log("warning", "watchdog_not_started", error=str(e))
            return
        if pid == 0:
            try:
                os.close(write_fd)
                watch(read_fd)
            finally:
                os._exit(0)
        os.close(read_fd)
        self.pid, self.fd = pid, write_fd

    def group_started(self, pgid):
        self.tell(b"+%d\n" % pgid)

    def group_ended(self, pgid):
        self.tell(b"-%d\n" % pgid)

    def tell(self, line):
        if line[:1] == b"-":
            self.ended += line
        else:
            self.write(self.ended + line)

    def release(self):
        if self.ended:
            self.write(self.ended)

    def write(self, lines):
        self.ended = b""
        if self.fd is None:
            return
        try:
            os.write(self.fd, lines)
        except OSError as e:     # it was killed: carry on without it
            log("warning", "watchdog_lost", error=str(e))
            self.stop()

    def stop(self):
        """Close the pipe (the watchdog exits on EOF) and reap it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:        # the ended, not to be killed nor named as orphans; then "." (see watch)
            os.write(fd, self.ended + b".\n")
        except OSError:
            pass
        self.ended = b""
        os.close(fd)
        give_up = time.monotonic() + WATCHDOG_EXIT_WAIT
        while time.monotonic() < give_up:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


def watch(read_fd):
    """The watchdog's life. It imports nothing, and in a session of its own and
    deaf to SIGINT, SIGTERM and SIGHUP it outlives the worker until EOF."""
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    close_all_but(read_fd)
    groups, pending, stopping = set(), b"", False
    while True:
        try:
            chunk = os.read(read_fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line[:1] == b"+":
                groups.add(line[1:])
            elif line[:1] == b"-":
                groups.discard(line[1:])
            stopping = stopping or line == b"."     # it ended its tasks itself
    killed = [int(pgid) for pgid in sorted(groups) if pgid.isdigit() and kill_group(int(pgid))]
    # What the sandbox knows of the tasks (see Sandbox.tell_watchdog): all they started.
    cgroups = [entry[1:].decode() for entry in groups if entry[:1] == b"C"]
    for path in cgroups:
        TaskCgroups.kill(path)
    uids = [int(entry[1:]) for entry in sorted(groups)
            if entry[:1] == b"U" and entry[1:].isdigit()]
    # A task of a uid of its own is told by its uid alone (ProcessTask.watched_group).
    running = [] if stopping else [uid for uid in uids if uid_alive(uid)]
    for uid in uids:
        kill_uid(uid)
    if killed or running:
        log("warning", "orphans_killed", pgids=killed, uids=running)
    for path in cgroups:      # and the worker's own, once the last is gone
        TaskCgroups().sweep(os.path.dirname(path))


def close_all_but(keep, fds=None):
    """Close every descriptor (of `fds`, if given: open_descriptors())
    except stdin, stdout, stderr and `keep`."""
    for fd in open_descriptors() if fds is None else fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def open_descriptors():
    """The descriptors this process has open (or every one it may have)."""
    for directory in ("/proc/self/fd", "/dev/fd"):     # the open ones only
        try:
            return [int(name) for name in os.listdir(directory)]
        except (OSError, ValueError):
            pass
    return range(3, 65536)   # the limit may be "unlimited": trying each could take minutes


###############################################################################
# -- Python environments: the packages a task asks for (payload "pip") --------
###############################################################################
# A task may name pip requirement specifiers (rc submit --requirements FILE,
# --pip PKG==VER). Its process first runs VENV_DRIVER, which takes the
# environment for that set from the cache (a virtual environment per set of
# specifiers, Python version and architecture), building it the first time
# with `python -m venv` and pip, then execs the task's own command with it.
# The build runs as the task, in its sandbox and within its timeout: pip runs
# the packages' own build code, which is task code. Neither the worker nor
# its loop waits for it. docs/environments.md.

VENV_CAPABILITY = "python_venv"       # lib/rc/environments.py: the profile's word
PIP_FIELD = "pip"                     # the payload's list of specifiers
VENV_MB = 2048                        # default --venv-mb: MiB of environments kept
VENV_TRIM_INTERVAL = 60.0             # seconds between two looks at the cache's size
VENV_FAILED_EXIT = 97                 # the driver's exit status when the build failed
VENV_FAILED_MARK = "rc: could not build the Python environment"
VENV_READY = ".rc-ready"              # written last: the environment is whole
VENV_ADOPT_WAIT = 30.0                # seconds a build waits for the worker to adopt it
VENV_BUILD_ENV = "RC_VENV_BUILD_ENV"  # the driver's variable: the environment pip runs in

# >>> Region "environments": the worker process loads it on first use (load_region).

VENV_DRIVER = (
    "import fcntl, json, os, shutil, stat, subprocess, sys, time\n"
    "cache, key, wanted, worker_uid, word = sys.argv[1:6]\n"
    "argv = sys.argv[7:]\n"
    # pip runs with the worker's variables, not the task's: the environment
    # serves every task that names the set, so no task's PIP_* or HOME (a
    # pip.conf among its inputs) may choose where its packages come from.
    "build_env = json.loads(os.environ.pop('" + VENV_BUILD_ENV + "'))\n"
    # Every task uid opens the lock and runs what the build makes: under the
    # worker's umask (077 under supervisord) they would be the builder's alone.
    "task_umask = os.umask(0o022)\n"
    "target = os.path.join(cache, key)\n"
    "ready = os.path.join(target, '" + VENV_READY + "')\n"
    "trusted = int(worker_uid)\n"
    "lock = os.open(target + '.lock', os.O_RDONLY | os.O_CREAT, 0o644)\n"
    # Every task user may write in the cache, and task uids are reused: only an
    # environment the worker owns is used. A service holds one for days, so it
    # is held shared; exclusive only to build one, which then waits for the
    # worker to make it its own (it kills what the build left running first).
    "def owner():\n"
    "    try:\n"
    "        info = os.lstat(target)\n"
    "    except FileNotFoundError:\n"
    "        return None\n"
    "    return info.st_uid if stat.S_ISDIR(info.st_mode) else -1\n"
    "def fail(why, said=''):\n"
    "    sys.stderr.write('" + VENV_FAILED_MARK + " (%s):\\n%s\\n' % (why, said))\n"
    "    sys.exit(" + str(VENV_FAILED_EXIT) + ")\n"
    "def whole():\n"
    "    return os.path.exists(ready) and owner() == trusted\n"
    "def foreign():\n"
    "    return owner() not in (None, trusted, os.geteuid())\n"
    "fcntl.flock(lock, fcntl.LOCK_SH)\n"
    "if not whole():\n"
    "    fcntl.flock(lock, fcntl.LOCK_EX)\n"
    # Another uid's build cut short (its task cancelled, timed out) is
    # the worker's to remove, which it does once nobody holds the lock:
    # let go of it a while rather than fail this task for it.
    "    deadline = time.monotonic() + " + repr(VENV_ADOPT_WAIT) + "\n"
    "    while not whole() and foreign() and time.monotonic() < deadline:\n"
    "        fcntl.flock(lock, fcntl.LOCK_UN)\n"
    "        time.sleep(0.2)\n"
    "        fcntl.flock(lock, fcntl.LOCK_EX)\n"
    "    if not whole():\n"
    "        if foreign():\n"
    "            fail('%s belongs to uid %d' % (target, owner()),\n"
    "                 'not used: another task may have made it')\n"
    "        shutil.rmtree(target, ignore_errors=True)\n"
    "        python = os.path.join(target, 'bin', 'python')\n"
    # -I: `-m` would put the task's directory, its input files, first on
    # sys.path (a pip/ among them ran instead of pip, as the task).
    "        for step in ([sys.executable, '-I', '-m', 'venv', target],\n"
    "                     [python, '-I', '-m', 'pip', 'install', '--disable-pip-version-check',\n"
    "                      '--no-input', '--quiet', '-r', wanted]):\n"
    "            done = subprocess.run(step, stdout=subprocess.PIPE,\n"
    "                                  stderr=subprocess.STDOUT, env=build_env)\n"
    "            if done.returncode != 0:\n"
    "                shutil.rmtree(target, ignore_errors=True)\n"
    "                said = done.stdout.decode('utf-8', 'replace').strip().splitlines()\n"
    "                fail('%s exited %d' % (' '.join(step[2:5]), done.returncode),\n"
    "                     '\\n'.join(said[-30:]))\n"
    "        os.chmod(target, 0o755)\n"
    "        with open(ready, 'w') as f:\n"
    "            f.write(word)\n"        # the worker adopts what this one built
    "        deadline = time.monotonic() + " + repr(VENV_ADOPT_WAIT) + "\n"
    "        while owner() != trusted and time.monotonic() < deadline:\n"
    "            time.sleep(0.05)\n"
    "        if owner() != trusted:\n"
    "            fail('the worker did not take the environment over', target)\n"
    "    fcntl.flock(lock, fcntl.LOCK_SH)\n"
    "try:\n"
    "    os.utime(ready)\n"          # the worker does it where this task user may not
    "except OSError:\n"
    "    pass\n"
    "os.set_inheritable(lock, True)\n"       # held shared while the task runs
    "bin_dir = os.path.join(target, 'bin')\n"
    "os.environ['VIRTUAL_ENV'] = target\n"
    "os.environ['PATH'] = bin_dir + os.pathsep + os.environ.get('PATH', '')\n"
    "if argv[0] == sys.executable:\n"
    "    argv[0] = os.path.join(bin_dir, 'python')\n"
    "os.umask(task_umask)\n"
    "os.execv(argv[0], argv)\n")


# <<< The end of region "environments".


def venv_capable():
    """Whether this Python can build a virtual environment with pip in it
    (some Debian and Termux installs leave venv or ensurepip out). Asked of
    the import system's own path finder: importlib.util, with the modules it
    loads, would cost an idle worker 0.6 MiB for good."""
    try:
        find_spec = sys.modules["_frozen_importlib_external"].PathFinder.find_spec
        return all(find_spec(name) is not None for name in ("venv", "ensurepip"))
    except (KeyError, AttributeError, ImportError, ValueError):
        return False


ROOT_VENV_DIR = "/var/cache/rc-worker/venvs"    # default --venv-dir as root


def default_venv_dir():
    """As root, where task users (--task-user) can build and read them;
    otherwise the user's cache."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ROOT_VENV_DIR
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "rc-worker", "venvs")


# >>> Region "environments": the worker process loads it on first use (load_region).

def environment_key(packages):
    """One environment per set of specifiers, Python version and machine."""
    import hashlib
    import platform
    text = "\n".join(sorted(packages)) + "\n%s\n%s\n%s" % (
        sys.version.split()[0], platform.machine(), sys.implementation.cache_tag)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def environment_error(stderr):
    """The task's error for a failed build: what pip said last."""
    said = stderr[stderr.find(VENV_FAILED_MARK):].strip().splitlines()
    detail = [line.strip() for line in said[1:] if line.strip()]
    return "%s: %s" % (said[0].rstrip(":"), detail[-1] if detail else "no output")[:2000]


def task_leaders(pid):
    """What stands for the task whose first process is `pid`: itself and,
    where it waits outside the task's PID namespace (follow_init), that
    namespace's init and the task's process in it (pids 1 and 2 there, one
    namespace below ours: not of one the task made itself)."""
    depth = len(namespace_pids(pid))
    leaders, parents = {pid}, [pid]
    while parents and depth:
        parent = parents.pop()
        try:
            children = read_small_file("/proc/%d/task/%d/children" % (parent, parent)).split()
        except OSError:
            continue
        for child in map(int, children):
            if namespace_pids(child)[depth:] in ([1], [2]):
                leaders.add(child)
                parents.append(child)
    return leaders


def namespace_pids(pid):
    """The pids of process `pid` from our PID namespace inward (NSpid, Linux
    4.1 on); [] where /proc does not say."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            return [int(n) for n in next(
                line for line in f if line.startswith(b"NSpid:")).split()[1:]]
    except (OSError, StopIteration, ValueError):
        return []


class Environments(object):
    """The cache of virtual environments, and the requests that use it."""

    def __init__(self, options):
        self.directory = os.path.abspath(os.path.expanduser(
            getattr(options, "venv_dir", None) or default_venv_dir()))
        self.cap = getattr(options, "venv_mb", VENV_MB) * 1024 * 1024
        self.next_trim = 0.0

    def request(self, task, request, value, build_env):
        """The spawner's request that builds or finds the task's environment
        and then runs what `request` (or the task's command) would; pip runs
        in `build_env`, the worker's variables every task starts from."""
        packages = task.payload.get(PIP_FIELD)
        # One line each, not an option: the list becomes a requirements file.
        if not isinstance(packages, list) or not packages or not all(
                isinstance(p, str) and p.splitlines() == [p] and not p.startswith("-")
                for p in packages):
            raise BadPayload("payload field %r must be a list of requirement specifiers"
                             % PIP_FIELD)
        self.make_directory(task.jail or {})
        wanted = task.write("requirements.txt", "\n".join(packages) + "\n")
        jail = task.jail or {}
        argv = request["argv"] if request else task.command(value)
        task.environment = environment_key(packages)
        self.clear_cut_build(os.path.join(self.directory, task.environment))
        # As root the task's own uid may build it: the worker adopts it then.
        task.environment_building = jail.get("uid") not in (None, os.geteuid())
        task.environment_since = time.time()
        # What its driver writes in the ready mark: no earlier task of a
        # reused uid can have planted it (its pid could be guessed, and is
        # 2 for every task in a PID namespace of its own).
        task.environment_word = os.urandom(16).hex()
        task.env[VENV_BUILD_ENV] = json_text(build_env, True, None)
        return {"argv": [python_executable(), "-I", "-c", VENV_DRIVER, self.directory,
                         task.environment, wanted, str(os.geteuid()), task.environment_word,
                         "--"] + list(argv)}

    @staticmethod
    def clear_cut_build(path):
        """Remove a directory of the set that the worker never adopted and no
        task holds: a build cut short (the worker killed mid-build) or a
        plant. The task's driver, as another uid, would refuse it: a failed
        attempt that then avoids this device. Only one a driver made (with
        its lock file): the worker's umask would keep task users out of one
        it made itself; trim judges the others."""
        import fcntl
        try:
            if os.lstat(path).st_uid == os.geteuid():
                return
            lock = os.open(path + ".lock", os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_tree(path)
            log("info", "venv_cut_build_removed", path=path)
        except OSError:         # held: a task builds it, or runs in it
            pass
        finally:
            os.close(lock)

    def whole(self, key):
        """Whether the environment `key` is built and the worker's."""
        path = os.path.join(self.directory, key)
        try:
            return os.lstat(path).st_uid == os.geteuid() \
                and os.path.exists(os.path.join(path, VENV_READY))
        except OSError:
            return False

    def make_directory(self, jail):
        """Task users build there too, so as root it is sticky and open to
        all, like /tmp; the worker then makes each environment its own."""
        shared = jail.get("uid") is not None
        between = []
        path = os.path.dirname(self.directory)
        while shared and not os.path.isdir(path) and path != os.path.dirname(path):
            between.append(path)
            path = os.path.dirname(path)
        # exist_ok: workers sharing one --venv-dir start their first tasks at once.
        os.makedirs(self.directory, 0o700, exist_ok=True)
        if not shared:
            return
        # makedirs makes the directories between with the worker's umask (0700
        # under supervisord's umask=077), or with 0700 itself on Python 3.6:
        # task users could not pass through them, and every build failed with
        # a PermissionError. The default's parent is the worker's own, so one
        # an older worker made so is opened too.
        if self.directory == ROOT_VENV_DIR:
            between.append(os.path.dirname(ROOT_VENV_DIR))
        for path in between:
            if os.stat(path).st_mode & 0o7777 != 0o755:
                os.chmod(path, 0o755)
        if os.stat(self.directory).st_mode & 0o7777 != 0o1777:
            os.chmod(self.directory, 0o1777)

    def after(self, task):
        """Once a task that used one has ended: environments a task user
        built become the worker's (no later task can change them), and the
        least recently used go while the cache is over --venv-mb."""
        if getattr(task, "environment", None) is None or not os.path.isdir(self.directory):
            return
        try:
            path = os.path.join(self.directory, task.environment)
            ready = os.path.join(path, VENV_READY)
            if os.path.exists(ready):
                os.utime(ready)         # just used: the last to be evicted
            self.adopt(path, (task.jail or {}).get("uid"))
            if time.monotonic() >= self.next_trim:
                self.next_trim = time.monotonic() + VENV_TRIM_INTERVAL
                self.trim()
        except OSError as e:
            log("warning", "venv_cache_failed", directory=self.directory, error=str(e))

    def adopt_built(self, task):
        """While the task's first process (this driver) waits, once its
        build is whole: kill whatever else its uid runs (what a package's
        build code left behind), then make the environment the worker's, so
        neither the task's own code nor anything of that build can change it."""
        uid = task.jail["uid"]
        path = os.path.join(self.directory, task.environment)
        try:
            info = os.lstat(path)
        except OSError:
            return
        if info.st_uid == os.geteuid():
            task.environment_building = False     # it was there already
            return
        if info.st_uid != uid or not self.built_by(task, os.path.join(path, VENV_READY)):
            return
        kill_uid_except(uid, task_leaders(task.proc.pid))
        self.adopt(path, uid, held_by_builder=True)
        task.environment_building = False

    @staticmethod
    def built_by(task, ready):
        """Whether this task's driver wrote the ready mark, since it started:
        not one left by another task of the same (reused) uid, a plant."""
        try:
            info = os.lstat(ready)
            if info.st_uid != task.jail["uid"] or info.st_mtime < task.environment_since - 1:
                return False
            with open(ready) as f:
                return f.read(64).strip() == task.environment_word
        except (OSError, ValueError):
            return False

    def entries(self):
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if not name.endswith(".lock") and os.path.isdir(path) \
                    and not os.path.islink(path):
                yield name, path

    def adopt(self, path, builder, held_by_builder=False):
        """Only the environment of the task that just ended, and only while
        that task's uid owns it: any other could be a task's plant, or be
        changed by a live task while it is walked (a file swapped for a link
        between the look and the chmod)."""
        import stat
        me = os.geteuid()
        try:
            info = os.lstat(path)
        except OSError:
            return
        if builder is None or builder == me or info.st_uid != builder \
                or not stat.S_ISDIR(info.st_mode):
            return
        with VenvLock(path, fcntl_flags("LOCK_SH")) as held:
            held = held or held_by_builder       # its builder waits, holding it
            if held and not os.path.exists(os.path.join(path, VENV_READY)):
                remove_tree(path)     # a build cut short: no later task could use it
            elif held:
                for top, dirs, files in os.walk(path):
                    for entry in [top] + [os.path.join(top, n) for n in dirs + files]:
                        os.lchown(entry, me, os.getegid())
                        if not os.path.islink(entry):
                            os.chmod(entry, os.lstat(entry).st_mode & ~0o022)

    def trim(self):
        me = os.geteuid()
        found = []
        for name, path in self.entries():
            if os.lstat(path).st_uid != me:      # never adopted: a plant or a cut build
                with VenvLock(path, fcntl_flags("LOCK_EX")) as held:
                    if held:                     # nobody builds or uses it
                        remove_tree(path)
                continue
            ready = os.path.join(path, VENV_READY)
            used = os.path.getmtime(ready) if os.path.exists(ready) else 0.0
            found.append((used, tree_size(path), path))
        total = sum(size for _, size, _ in found)
        for used, size, path in sorted(found):
            if total <= self.cap:
                break
            with VenvLock(path, fcntl_flags("LOCK_EX")) as held:
                if held:             # no task is using it, none building it
                    remove_tree(path)
                    total -= size
                    log("info", "venv_evicted", path=path, bytes=size)


def fcntl_flags(name):
    import fcntl
    return getattr(fcntl, name) | fcntl.LOCK_NB


class VenvLock(object):
    """An environment's lock file, taken without waiting: True when held."""

    def __init__(self, path, flags):
        self.path, self.flags, self.fd = path + ".lock", flags, None

    def __enter__(self):
        import fcntl
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, self.flags)
            return True
        except OSError:
            return False

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def tree_size(path):
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


# <<< The end of region "environments".


###############################################################################
# -- files: cache, transfer, inputs and outputs --------------------------------
###############################################################################
# A task may name input files, a stdin, a script file, environment variables,
# output globs and a checkpoint (docs/protocol.md, "Files"). Their bytes move
# through rc-files, a program of the main node on a port of its own
# (register_ack's files_port), not through the worker connection: a 4 GB
# transfer must not hold up heartbeats and results. Files of at most
# INLINE_FILE_BYTES are the exception where the main node offers it: they
# come right behind task_assign and go back right behind task_result (take_inline,
# send_or_inline), which costs no round trip at all. Each transfer runs in a
# thread of its own with blocking sockets; the loop only sees it end (the
# thread writes to the signal wakeup socket). A task whose inputs are not
# here yet waits as a Staging in the running slots; a task whose outputs are
# going up waits as an Uploading, and its result is sent once they are stored.

FILES_CHUNK = 1024 * 1024       # bytes per read and write of a transfer (bounded memory)
FILES_BUFFER = 256 * 1024       # bytes of one buffer of a fetch (received, then written, then hashed)
FILES_BUFFERS = 8               # FILES_BUFFER buffers one fetch holds: 2 MiB, slack for 3 stages
FILES_DIRECT_MIN = 16 * 1048576  # bytes: a smaller file never bypasses the page cache (goes_direct)
FILES_DIRECT_SHARE = 0.5        # of the memory available: a larger file bypasses it (goes_direct)
FILES_DIRECT_ALIGN = 4096       # bytes: O_DIRECT's offsets and lengths are multiples of this
FILES_LINE_MAX = 64 * 1024      # bytes, the longest control line of rc-files
FILES_TIMEOUT = float(os.environ.get("RC_TEST_FILES_TIMEOUT", 30.0))   # seconds a transfer
#                                 may wait for a byte before it is cut (the variable: tests only)
FILES_TRIES = 4                 # connections one transfer may use (a cut resumes from the last byte)
FILES_RETRY_WAIT = 0.5          # seconds before the next try; doubles per try
FILES_RETRY_MAX_WAIT = 4.0      # seconds between tries at most
# Seconds a transfer waits for an rc-files that refuses connections, its
# tries not spent meanwhile: it is restarting. supervisord starts it again at
# once, but waits 1 s, 2 s, 3 s... after deaths in a row, and a small main
# node takes seconds to start it; the 3.5 s of FILES_TRIES failed tasks.
FILES_UNREACHABLE_WAIT = 60.0
FILES_CONNECTIONS = 8           # transfers at once (a new connection opens only when none is kept)
FILES_IDLE_MAX = FILES_CONNECTIONS   # connections to rc-files kept open between transfers
FILES_PREFETCH = 4              # fetches at once of the inputs of tasks waiting for a slot
FILES_PREFETCH_MAX = 64 * 1048576   # bytes of inputs a waiting task may have fetched ahead
FILES_COPY_IN_LOOP = 1048576    # bytes of inputs the loop may copy when it places cached ones
FILES_IDLE_THREADS = FILES_CONNECTIONS + FILES_PREFETCH   # transfer threads kept for the next job
FILES_PROTECTED_SECONDS = 10.0  # seconds the list of the worker's own state files is reused
FILES_GATE_POLL = 0.5           # seconds between looks at a cancel while waiting for one
FILES_IDLE_SECONDS = 60.0       # seconds one is kept (rc-files closes them after 300)
FILES_SHUTDOWN_WAIT = 10.0      # seconds a stopping worker waits for checkpoints to go up
CACHE_MB = 1024                 # MiB the input cache keeps (--cache-mb), least recently used out first
CHECKPOINT_EVERY = 300.0        # seconds between checkpoints of a running task (--checkpoint-every)
CHECKPOINT_BACKOFF_MAX = 3600.0 # seconds at most between tries of a checkpoint that keeps
                                # failing (a full disk, EFBIG, the store's quota): the wait
                                # doubles from --checkpoint-every, as each try writes the tar
# Files and directories one checkpoint holds at most; one with more is not
# sent (nor unpacked): each costs the worker a list entry and a tar member
# held in memory, and the tar 512 bytes, however empty the file.
CHECKPOINT_MAX_ENTRIES = 10000
# Bytes of holes past which a sparse file is left out of a checkpoint: a
# task's truncate makes a terabyte of them for nothing, which the tar, the
# main node's quota and the link would pay for in zeros; a memory-mapped
# array half written (a few MiB of holes) still goes up whole.
CHECKPOINT_HOLES_MAX = 64 * 1024 * 1024
# Bytes of a checkpoint member's headers (its tar header, a pax header, a
# GNU long name, a sparse map) read before its data, at most: tarfile holds
# them whole, decoded, several times over (a 300 MB pax header from a lying
# device took 1.2 GB of the next device's memory). The worker's own are a
# few KiB: a name of TREE_DEPTH parts of 255 bytes, its times.
CHECKPOINT_HEADER_MAX = 1024 * 1024
FILES_SPAWN_ENV = 256 * 1024    # bytes of task env past which the task starts without the spawner
CACHED_FILES_MAX = 1000         # sha256 of cached blobs a heartbeat lists, most recent first
# Seconds within which a cached blob's last use is not written to its atime
# again: a blob that task after task takes costs no inode write each time.
CACHE_TOUCH_SLACK = 60.0
TREE_DEPTH = 64                 # directory levels of a task's tree the worker looks into
FILES_MAX_OUTPUTS = 1000        # outputs one attempt uploads at most (its result must fit a frame)
FILES_MAX_NAMES = 256 * 1024    # bytes of output names one result lists at most
FILES_MAX_NOTES = 50            # refusal lines one result's stderr carries at most
# Glob matches one attempt's outputs are chosen from, at most: a task that
# leaves a million files costs the worker a walk, not a million entries.
FILES_MAX_MATCHES = 4 * FILES_MAX_OUTPUTS
PARTIAL_MAX_AGE = 7 * 86400     # seconds a cut fetch is kept for a resume that never came
CHECKPOINT_DIR = ".rc-checkpoint"   # $RC_CHECKPOINT_DIR, inside the task directory
STDIN_FILE = ".rc-stdin"        # the task's stdin, linked from the cache
STREAM_FILES = {0: ".rc-stdout", 1: ".rc-stderr"}   # a stream past the inline cap, in full
STREAM_NAMES = {0: ".rc/stdout", 1: ".rc/stderr"}   # ... as rc-files stores it
CHECKPOINT_NAME = ".rc/checkpoint"
ENV_NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class FilesError(Exception):
    """A transfer or a file of a task failed; the message says which and why."""

    def __init__(self, message, code=None, retry=False):
        Exception.__init__(self, message)
        self.code, self.retry = code, retry


def remove_idle_partial(path):
    """Unlink a partial file unless a fetch holds it (its flock; workers may
    share a state directory); whether it went."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(
            os, "O_NONBLOCK", 0))
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def is_sha256(text):
    return is_hex(text, 64) and text == text.lower()


def relative_path(text):
    """A payload's relative path as its components, or None if it could
    leave the task directory (absolute, "..", NUL, empty parts) or is no
    name the file system takes (a part over 255 bytes, a lone surrogate:
    "\\ud800" in a task_assign raised UnicodeEncodeError out of the loop,
    and ended the worker with every task it ran)."""
    if not isinstance(text, str) or not text or "\0" in text or text.startswith("/"):
        return None
    parts = text.split("/")
    try:
        if any(part in ("", ".", "..") or len(os.fsencode(part)) > 255 for part in parts):
            return None
    except UnicodeError:
        return None
    if parts[0].startswith(".rc-") or parts[0] == ".rc":
        return None      # the worker's own names in the task directory
    return parts


def blob_ref(value):
    """{"sha256", "size"} checked, as (sha256, size), or None."""
    if not isinstance(value, dict):
        return None
    sha, size = value.get("sha256"), value.get("size")
    if not is_sha256(sha) or not is_int(size) or size < 0:
        return None
    return sha, size


def task_env(payload):
    """The payload's "env", checked: names of [A-Za-z_][A-Za-z0-9_]*, not RC_,
    values strings without NUL."""
    env = payload.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict) or len(env) > 256:
        raise BadPayload("payload field 'env' must be an object of at most 256 names")
    for name, value in env.items():
        if (not name or len(name) > 128 or not set(name) <= ENV_NAME_CHARACTERS
                or name[0].isdigit() or name.upper().startswith("RC_")):
            raise BadPayload("payload env name %r is not allowed (letters, digits and _,"
                             " not starting with a digit or RC_)" % name[:130])
        if not isinstance(value, str) or "\0" in value or len(value) > 32768:
            raise BadPayload("payload env %s must be a string without NUL, at most 32 KiB"
                             % name)
    return env


def task_inputs(payload):
    """The payload's inputs, stdin and checkpoint: (inputs, stdin, checkpoint)
    with inputs as [(parts, sha256, size, mode)]; BadPayload names a bad one."""
    inputs = payload.get("inputs") or []
    if not isinstance(inputs, list) or len(inputs) > 10000:
        raise BadPayload("payload field 'inputs' must be a list of at most 10000 files")
    checked = []
    for entry in inputs:
        ref = blob_ref(entry)
        parts = relative_path(entry.get("path")) if isinstance(entry, dict) else None
        if ref is None or parts is None:
            raise BadPayload("payload input %r must have a relative path inside the task"
                             " directory, a sha256 and a size" % (str(entry)[:200],))
        mode = entry.get("mode", 0o644)
        checked.append((parts, ref[0], ref[1], 0o755 if is_int(mode) and mode & 0o111
                        else 0o644))
    stdin = checkpoint = None
    if payload.get("stdin") is not None:
        stdin = blob_ref(payload["stdin"])
        if stdin is None:
            raise BadPayload("payload field 'stdin' must be {\"sha256\", \"size\"}")
    if payload.get("checkpoint") is not None:
        checkpoint = blob_ref(payload["checkpoint"])
        if checkpoint is None:
            raise BadPayload("payload field 'checkpoint' must be {\"sha256\", \"size\"}")
    return checked, stdin, checkpoint


def runs_file(task):
    return task.task_type in ("python_exec", "shell") and task.payload.get("file") is not None


def shebang(path):
    """A script's #! line as the kernel reads it: the interpreter, and the
    rest of the line as one argument; [] without one. An interpreter that is
    not there is looked for on PATH by its name (Termux has bash, but no
    /bin/bash), and [] if it is not there either."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            head = os.read(fd, SHEBANG_MAX)
        finally:
            os.close(fd)
        words = head[2:].split(b"\n", 1)[0].decode().split(None, 1) \
            if head.startswith(b"#!") else []
    except (OSError, UnicodeDecodeError):
        return []
    if not words:
        return []
    if not (os.path.isfile(words[0]) and os.access(words[0], os.X_OK)):
        words[0] = which(os.path.basename(words[0]))
    return words if words[0] else []


class TaskStdin(object):
    """The stdin of a task process of the worker's own: its file, or /dev/null."""

    def __init__(self, path):
        import subprocess
        # Never through a link: a root worker opens it.
        self.file = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)),
                              "rb") if path else None
        self.handle = self.file or subprocess.DEVNULL

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def needs_staging(task):
    payload = task.payload
    return isinstance(task, ProcessTask) and not getattr(task, "staged", False) and any(
        payload.get(name) for name in ("inputs", "stdin", "checkpoint", "file"))


def file_sha256():
    """A new SHA-256 for file contents: OpenSSL's (hashlib's own), six times
    the built-in one's speed where the CPU has SHA instructions, and it lets
    go of the GIL, so a transfer hashes while it receives. Loaded only once
    files move (2 MiB more when TLS has loaded OpenSSL already); the
    built-in one where this Python has no OpenSSL."""
    try:
        import _hashlib
        return _hashlib.openssl_sha256()
    except (ImportError, AttributeError, ValueError):
        return sha256_function()()


def mebibytes(size):
    return "%.1f MiB" % (size / 1048576.0)


# -- the cache: blobs by sha256 in the state directory ------------------------

class FileCache(object):
    """STATE_DIR/cache/<sha256>, read-only, with partial fetches under
    partial/. The last use of a blob is its atime (set by us, whatever the
    file system's own atime policy); its mtime stamps the content, so a blob
    changed behind our back (a task writing through a hard link) is dropped.
    Used from transfer threads and the loop alike: one lock guards the index."""

    def __init__(self, state_dir, cap_mb):
        import _thread
        self.dir = os.path.join(os.path.expanduser(state_dir), "cache")
        self.cap = cap_mb * 1048576
        self.lock = _thread.allocate_lock()
        self.index = None          # sha256 -> [size, last used, mtime_ns, (dev, inode)], once read
        self.total = 0             # bytes of the index's blobs
        self.inodes = set()        # (dev, inode) of the index's blobs (see find_outputs)
        self.pinned = {}           # sha256 -> tasks staging or running with it
        self.fetching = {}         # sha256 -> threading.Event of the fetch under way
        self.prepared = False
        # A temporary named after this pid but older is a run's before an
        # execv restart (the spawner died), which keeps the pid: not ours.
        self.opened_at = time.time()

    def path(self, sha):
        return os.path.join(self.dir, sha)

    def load(self):
        with self.lock:
            if self.index is None:
                self.index = {}
                for name in list_dir(self.dir):
                    if not is_sha256(name):
                        continue
                    try:
                        info = os.lstat(self.path(name))
                    except OSError:
                        continue
                    self.enter(name, [info.st_size, info.st_atime, info.st_mtime_ns,
                                      (info.st_dev, info.st_ino)])
        return self.index

    def enter(self, sha, entry):
        """Index a blob, with the lock held; totals follow, so that no fetch
        sums a cache of thousands of blobs."""
        self.leave(sha)
        self.index[sha] = entry
        self.total += entry[0]
        self.inodes.add(entry[3])

    def leave(self, sha):
        entry = self.index.pop(sha, None)
        if entry is not None:
            self.total -= entry[0]
            self.inodes.discard(entry[3])

    def used(self):
        self.load()
        return self.total

    def recent(self, limit=CACHED_FILES_MAX):
        index = self.load()
        with self.lock:
            order = sorted(index, key=lambda sha: index[sha][1], reverse=True)
        return order[:limit]

    def has(self, sha, size):
        """True if the blob is here as it was stored, of `size` bytes; a
        changed one is dropped. One asked for with another size is kept: its
        sha256 was checked, so the size is the asker's mistake (a payload's)."""
        self.load()
        with self.lock:
            entry = self.index.get(sha)
        if entry is None:
            return False
        try:
            info = os.lstat(self.path(sha))
        except OSError:
            info = None
        if info is None or info.st_size != entry[0] or info.st_mtime_ns != entry[2]:
            log("warning", "cache_blob_changed", sha256=sha, message="a cached file changed"
                " or went missing; it is fetched again")
            self.drop(sha)
            return False
        return size == entry[0]

    def indexed(self, blobs):
        """Whether the index holds every one of `blobs` ({sha256: size}) at
        its size, none of them being fetched: no look at the disk (has()
        looks as the task starts)."""
        with self.lock:
            return self.index is not None and all(
                self.index.get(sha, (None,))[0] == size and sha not in self.fetching
                for sha, size in blobs.items())

    def touch(self, sha):
        """Its last use is now, in the index and as its atime (which outlives
        the worker), unless that was set less than CACHE_TOUCH_SLACK ago: the
        order of blobs used within a minute matters to no eviction."""
        now = time.time()
        with self.lock:
            entry = self.index.get(sha)
            if entry is None or now - CACHE_TOUCH_SLACK < entry[1] <= now:
                return
            entry[1] = now
        try:
            os.utime(self.path(sha), ns=(int(now * 1e9), entry[2]))
        except OSError:
            pass

    def add(self, sha, temporary, made_here=False):
        """Move a verified file into the cache, read-only and owner-only (a
        task of another uid gets a copy: see Sandbox.may_link_inputs); one
        `made_here` is 0400 already, and last used (its atime) as it was made."""
        if not made_here:
            os.chmod(temporary, 0o400)
        os.replace(temporary, self.path(sha))
        info = os.lstat(self.path(sha))
        self.load()
        with self.lock:     # a fetched file's last use is its atime until touched
            self.enter(sha, [info.st_size, time.time() if made_here else info.st_atime,
                             info.st_mtime_ns, (info.st_dev, info.st_ino)])
        if not made_here:
            self.touch(sha)

    def drop(self, sha):
        with self.lock:
            if self.index is not None:
                self.leave(sha)
        try:
            os.unlink(self.path(sha))
        except OSError:
            pass

    def discard(self, sha):
        """Drop a blob no task holds (a superseded checkpoint)."""
        with self.lock:
            if sha in self.pinned:
                return
        self.drop(sha)

    def pin(self, shas, by):
        with self.lock:
            for sha in shas:
                self.pinned.setdefault(sha, set()).add(by)

    def unpin(self, by):
        with self.lock:
            for sha in list(self.pinned):
                self.pinned[sha].discard(by)
                if not self.pinned[sha]:
                    del self.pinned[sha]
            over = self.index is not None and self.total > self.cap
        if over:
            # A blob larger than the cap, or more pinned at once than it holds,
            # was kept for its task; once free, the cap holds again.
            self.make_room(0)

    def make_room(self, needed):
        """Evict least recently used blobs no task holds until the cache fits
        its cap with `needed` more bytes, and the disk has them free. A
        FilesError when the disk cannot hold them even so."""
        index = self.load()
        with self.lock:
            total = self.total
            # Sorted only when something must go: most fetches fit as it is.
            order = [] if total + needed <= self.cap else sorted(
                (entry[1], sha) for sha, entry in index.items() if sha not in self.pinned)
        for _, sha in order:
            if total + needed <= self.cap and self.free() >= needed:
                break
            total -= index.get(sha, [0])[0]
            self.drop(sha)
            log("info", "cache_evicted", sha256=sha)
        if self.free() < needed:
            raise FilesError("not enough disk space on this device: %s needed, %s free under"
                             " %s" % (mebibytes(needed), mebibytes(self.free()), self.dir),
                             code="disk_full")

    def free(self):
        try:
            info = os.statvfs(self.dir)
        except (OSError, AttributeError):
            return float("inf")
        return info.f_bavail * info.f_frsize

    def prepare(self):
        if self.prepared:
            return
        for path in (self.dir, os.path.join(self.dir, "partial"), os.path.join(self.dir, "tmp")):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self.prepared = True
        # A fetch cut long ago whose task never came back, and temporaries of
        # a killed worker: at once when its process is gone (their name says
        # which, see temporary(); workers may share a state directory) or is
        # this one restarted (opened_at), else after a day.
        for folder, oldest in (("partial", time.time() - PARTIAL_MAX_AGE),
                               ("tmp", time.time() - 86400)):
            for name in list_dir(os.path.join(self.dir, folder)):
                path = os.path.join(self.dir, folder, name)
                owner = name[1:].partition("-")[0] if folder == "tmp" and name[:1] == "p" else ""
                try:
                    made = os.lstat(path).st_mtime
                    if made < oldest or (owner.isdigit() and (not pid_alive(owner) or (
                            int(owner) == os.getpid() and made < self.opened_at))):
                        os.unlink(path)
                except OSError:
                    pass
        self.trim_partials()

    def trim_partials(self, needed=0, keep=None):
        """Remove partial fetches no fetch holds, oldest first, until they,
        the blobs and `needed` more bytes fit the cap: a phone killed mid-fetch
        (the OOM killer) whose task then ran elsewhere kept a partial file for
        PARTIAL_MAX_AGE past --cache-mb. `keep` is the caller's own (held)."""
        folder = os.path.join(self.dir, "partial")
        found = []
        for name in list_dir(folder):
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if name != keep:
                found.append((info.st_mtime, name, info.st_size))
        over = self.used() + needed + sum(size for _, _, size in found) - self.cap
        for _, name, size in sorted(found):
            if over <= 0:
                break
            if remove_idle_partial(os.path.join(folder, name)):
                over -= size
                log("info", "partial_removed", sha256=name, bytes=size,
                    message="a cut fetch no task waits for, past --cache-mb")

    def temporary(self, name):
        """A path under tmp/ named after this process, so that a worker
        started after this one was killed removes it (prepare())."""
        return os.path.join(self.dir, "tmp", "p%d-%s" % (os.getpid(), name))


# -- the rc-files client -------------------------------------------------------

# >>> Region "files": the worker process loads it on first use (load_region).

class FilesConnection(object):
    """One authenticated connection to rc-files, used by one thread, blocking."""

    def __init__(self, service, job):
        self.service, self.job = service, job
        self.sock = self.raw = None     # raw: the TCP socket under the TLS one
        self.inbox = bytearray()
        self.reused = False             # taken from the pool (see FilesPool)
        self.cut = None                 # the FilesError that cut a fill()
        self.whole_put = 0              # bytes of a put sent with its request (see put_whole)
        self.busy = False               # a get or put under way: the stream is out of step

    def open(self):
        host, port = self.service.host, self.service.port
        name = host.encode("ascii") if all(ord(c) < 128 for c in host) else host
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                name, port, 0, socket.SOCK_STREAM)[0]
            sock = TcpSocket(family, kind, proto)
            sock.settimeout(CONNECT_TIMEOUT)
            self.job.sockets.append(sock)
            sock.connect(address)
            sock.settimeout(FILES_TIMEOUT)
            self.raw = sock
            if self.service.fingerprint:
                sock = self.secure(sock)
        except (OSError, ValueError) as e:
            raise FilesError("cannot reach rc-files at %s:%d: %s" % (host, port, e),
                             code="unreachable", retry=True)
        self.sock = sock
        self.authenticate()
        return self

    def secure(self, sock):
        tls = tls_socket(sock)
        tls.do_handshake()
        found = certificate_fingerprint(tls.getpeercert(binary_form=True) or b"")
        if not proofs_match(found, self.service.fingerprint):
            raise FilesError("rc-files at %s:%d showed a certificate with fingerprint %s, not"
                             " the pinned %s: nothing was sent" % (
                                 self.service.host, self.service.port, found,
                                 self.service.fingerprint), code="fingerprint_mismatch")
        return tls

    def authenticate(self):
        hello = self.reply().get("hello")
        if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), str):
            raise FilesError("rc-files sent no hello", retry=True)
        nonce = new_nonce()
        device_id = self.service.device_id
        self.send({"auth": {"device_id": device_id, "nonce": nonce,
                            "proof": sign(self.service.secret, "rc-files",
                                          hello["nonce"][:64], nonce, device_id)}})
        self.answer()
        whole = hello.get("whole_put")      # an rc-files that takes a small put in one go
        self.whole_put = min(whole, FILES_CHUNK) if is_int(whole) and whole > 0 else 0

    def close(self):
        """Closed, with a bye only between requests: cut in a put's bytes (a
        network that stalled, then came back), rc-files took the bye as
        eleven bytes of the file, and the put resumed after them failed its
        hash: the output was lost."""
        if self.sock is not None:
            try:
                if not self.busy:
                    self.send({"bye": {}})
            except (OSError, FilesError):
                pass
            self.sock.close()
            self.sock = None

    def send(self, message):
        self.sock.sendall(dumps(message) + b"\n")

    def reply(self):
        """The next control line as a dict."""
        while b"\n" not in self.inbox:
            if len(self.inbox) > FILES_LINE_MAX:
                raise FilesError("rc-files sent a control line over %d bytes" % FILES_LINE_MAX)
            self.inbox += self.recv_socket(FILES_LINE_MAX)
        line, _, rest = bytes(self.inbox).partition(b"\n")
        self.inbox = bytearray(rest)
        try:
            message = loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise FilesError("rc-files sent something that is not a JSON object: %r"
                             % line[:100])
        return message

    def answer(self):
        """The next reply, which must be ok; an error reply raises FilesError."""
        message = self.reply()
        error = message.get("error")
        if isinstance(error, dict):
            code = str(error.get("code"))[:50]
            # busy: its end of a connection cut a moment ago still holds the upload.
            raise FilesError("rc-files: %s: %s" % (code, str(error.get("message"))[:300]),
                             code=code, retry=code == "busy")
        if message.get("ok") is not True:
            raise FilesError("rc-files answered neither ok nor an error: %r"
                             % (str(message)[:200],))
        return message

    def recv(self, size):
        """Body bytes: what came with the last control line first."""
        if self.inbox:
            chunk = bytes(self.inbox[:size])
            del self.inbox[:size]
            return chunk
        return self.recv_socket(size)

    def recv_into(self, view):
        """Body bytes into `view` (what came with the last control line
        first); how many, at least one."""
        if self.inbox:
            count = min(len(view), len(self.inbox))
            view[:count] = self.inbox[:count]
            del self.inbox[:count]
            return count
        if self.job.cancelled:
            raise FilesError("cancelled", code="cancelled")
        try:
            count = self.sock.recv_into(view)
        except OSError as e:
            raise FilesError("rc-files connection cut: %s" % e, retry=True)
        if not count:
            raise FilesError("rc-files closed the connection", retry=True)
        return count

    def recv_socket(self, size):
        if self.job.cancelled:
            raise FilesError("cancelled", code="cancelled")
        try:
            chunk = self.sock.recv(size)
        except OSError as e:
            raise FilesError("rc-files connection cut: %s" % e, retry=True)
        if not chunk:
            raise FilesError("rc-files closed the connection", retry=True)
        return chunk

    def get(self, sha, offset, size, sink, digest):
        """Append blob `sha` from `offset` to `sink` (a FetchSink), hashing into `digest`."""
        self.busy = True
        self.get_body(sha, offset, size, sink, digest)
        self.busy = False

    def get_body(self, sha, offset, size, sink, digest):
        self.send({"get": {"sha256": sha, "offset": offset}})
        answer = self.answer()
        total, length = answer.get("size"), answer.get("length")
        if total != size or length != size - offset:
            raise FilesError("rc-files offers %r bytes of %s from byte %d, not the %d"
                             " expected" % (total, sha, offset, size))
        if length <= FILES_CHUNK:        # one buffer: no thread to hand it to
            buffer = bytearray(length)
            count = self.fill(memoryview(buffer))
            sink.write(memoryview(buffer)[:count])
            digest.update(memoryview(buffer)[:count])
            self.raise_cut()
            return
        writer = BlobWriter(sink, digest)
        # O_DIRECT writes whole blocks from a block's start: the first buffer of
        # a resume from elsewhere (a cut leaves any length) ends at one.
        head = (-offset) % FILES_DIRECT_ALIGN if writer.aligned else 0
        try:
            while length:
                buffer = writer.free_buffer()
                count = self.fill(memoryview(buffer)[:min(len(buffer), length, head or length)])
                head = 0
                writer.write(buffer, count)
                self.raise_cut()
                length -= count
        finally:
            writer.close()

    def fill(self, view):
        """`view` filled with body bytes; how many came. Whole buffers are
        written and hashed: a TLS record holds 16 KiB, and a write and an
        update per record would cost more than the TLS itself. When the
        connection is cut, what came before is counted all the same (and
        the cut kept for raise_cut), so that a resume starts after it."""
        filled = 0
        try:
            while filled < len(view):
                filled += self.recv_into(view[filled:])
        except FilesError as e:
            self.cut = e
        return filled

    def raise_cut(self):
        if self.cut is not None:
            cut, self.cut = self.cut, None
            raise cut

    def put(self, request, source):
        """Send file object `source` under `request` (name, size, sha256...);
        True once rc-files said it is stored."""
        self.busy = True
        stored = self.put_whole(request, source) if request["size"] <= self.whole_put \
            else self.put_body(request, source)
        self.busy = False
        return stored

    def put_body(self, request, source):
        self.send({"put": request})
        have = self.answer().get("have", 0)
        if not is_int(have) or not 0 <= have <= request["size"]:
            raise FilesError("rc-files claims to hold %r bytes of %s" % (have, request["name"]))
        source.seek(have)
        left = request["size"] - have
        while left:
            if self.job.cancelled:
                raise FilesError("cancelled", code="cancelled")
            chunk = source.read(min(FILES_CHUNK, left))
            if not chunk:
                raise FilesError("%s shrank while it was sent" % request["name"])
            try:
                self.sock.sendall(chunk)
            except OSError as e:
                raise FilesError("rc-files connection cut: %s" % e, retry=True)
            left -= len(chunk)
        return self.answer().get("stored") is True

    def put_whole(self, request, source):
        """A small file sent with its request, one answer back: no
        round trip to learn what rc-files holds of it (a cut resends it all)."""
        source.seek(0)
        body = source.read(request["size"] + 1)
        if len(body) != request["size"]:
            raise FilesError("%s changed size while it was sent" % request["name"])
        try:
            self.sock.sendall(dumps({"put": dict(request, whole=True)}) + b"\n" + body)
        except OSError as e:
            raise FilesError("rc-files connection cut: %s" % e, retry=True)
        return self.answer().get("stored") is True


class BlobWriter(object):
    """Writes and hashes what a fetch receives, each in a thread of its own:
    receiving (TLS), writing and SHA-256 all let go of the GIL, and hashing
    alone costs more than the TLS, so on a device with two cores or more the
    three go on at once, each on a buffer of its own. FILES_BUFFERS buffers
    go round: received, written, hashed, free again. close() waits for the
    last and raises what went wrong in a thread (a full disk). For a sink
    that writes with O_DIRECT they are `aligned`: mmap's pages, whose start
    O_DIRECT can write from (mmap is imported here only: the idle worker
    has no room for its 0.3 MiB)."""

    def __init__(self, sink, digest):
        import queue
        import threading
        simple = getattr(queue, "SimpleQueue", queue.Queue)     # 3.7+: in C
        self.sink, self.digest = sink, digest
        self.free, self.to_write, self.to_hash = simple(), simple(), simple()
        self.aligned = sink.direct
        if self.aligned:
            import mmap
        for _ in range(FILES_BUFFERS):
            self.free.put(mmap.mmap(-1, FILES_BUFFER) if self.aligned
                          else bytearray(FILES_BUFFER))
        self.error = None
        self.threads = []
        for name, run in (("rc-files-writer", self.write_all), ("rc-files-hasher", self.hash_all)):
            thread = threading.Thread(target=run, name=name)
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def write_all(self):
        while True:
            item = self.to_write.get()
            if item is None:
                self.to_hash.put(None)
                return
            buffer, count = item
            try:
                if self.error is None:
                    self.sink.write(memoryview(buffer)[:count], self.aligned)
                else:
                    count = 0
            except BaseException as e:
                self.error, count = e, 0
            self.to_hash.put((buffer, count))   # in order: the hash covers what was written

    def hash_all(self):
        while True:
            item = self.to_hash.get()
            if item is None:
                return
            buffer, count = item
            try:
                if count:
                    self.digest.update(memoryview(buffer)[:count])
            except BaseException as e:      # the buffer still goes round: nothing waits for ever
                self.error = e
            self.free.put(buffer)

    def free_buffer(self):
        buffer = self.free.get()
        if self.error is not None:
            raise self.error
        return buffer

    def write(self, buffer, count):
        self.to_write.put((buffer, count))

    def close(self):
        self.to_write.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error


# <<< The end of region "files".


class FileService(object):
    """Where rc-files is and how to prove ourselves to it."""

    def __init__(self, host, port, fingerprint, device_id, secret):
        self.host, self.port, self.fingerprint = host, port, fingerprint
        self.device_id, self.secret = device_id, secret


# >>> Region "files": the worker process loads it on first use (load_region).

class Job(object):
    """A transfer thread's handle: cancelled from the loop, done when it ends."""

    def __init__(self, worker, work, wake=True):
        self.worker, self.work = worker, work
        self.wakes = wake         # the loop acts on its end (a fetch ahead needs no turn)
        self.cancelled = False
        self.done = False
        self.error = None
        self.error_code = None    # FilesError's code: "disk_full" is the device's fault
        self.sockets = []
        self.ended = None         # a lock held until run() ends
        self.blobs = []           # staging: the sha256 of what it fetches
        self.restored = ()        # staging: checkpoint_signature of the checkpoint unpacked
        self.remove_after = None  # staging: the task dir to remove if it is cancelled
        self.notes, self.stored = [], []   # uploading: refusal lines, what rc-files stored
        self.inline = []          # uploading: small outputs that ride in the task_result
        self.then = None          # what the thread does once the loop knows it is done

    def start(self):
        import _thread
        import threading
        files = self.worker.files
        if files.gate is None:
            files.gate = threading.BoundedSemaphore(FILES_CONNECTIONS)
        self.ended = _thread.allocate_lock()
        self.ended.acquire()
        if files.threads is None:
            files.threads = TransferThreads()
        files.threads.run(self.run)
        return self

    def run(self):
        try:
            self.work(self)
        except FilesError as e:
            self.error, self.error_code = str(e), e.code
        except Exception as e:      # a bug or an OS error: contained to this task
            self.error = "%s: %s" % (type(e).__name__, e)
            self.error_code = "disk_full" if disk_full(e) else None
        finally:
            self.done = True
            if self.wakes:
                self.wake()
            try:
                if self.then is not None:
                    self.then()     # off the loop's path: its result need not wait for it
            finally:
                self.ended.release()

    def wake(self):
        writer = getattr(self.worker, "wakeup_writer", None)
        try:
            if writer is not None:
                writer.send(b"\0")
        except OSError:
            pass

    def cancel(self):
        self.cancelled = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, seconds):
        if self.ended is not None and self.ended.acquire(True, seconds):
            self.ended.release()
        return self.done

    def connection(self, files):
        if files.service is None:
            raise FilesError("the main node offers no file service (no files_port in its"
                             " register_ack)", code="no_service")
        connection = files.pool.take(files.service, self)
        if connection is None:
            connection = FilesConnection(files.service, self).open()
            files.answered = True
        return connection

    def tries(self, action):
        """action(connection), once one of the FILES_CONNECTIONS transfers
        at once is free: rc-files refuses a device more than 16 connections,
        and uploads do not hold task slots."""
        files = self.worker.files
        while not files.gate.acquire(timeout=FILES_GATE_POLL):
            if self.cancelled:
                raise FilesError("cancelled", code="cancelled")
        try:
            return self.try_on_connections(files, action)
        finally:
            files.gate.release()

    def try_on_connections(self, files, action):
        """Run action(connection) again on a new connection after a cut, up
        to FILES_TRIES; a connection that rc-files closed while it was in the
        pool is replaced at once, uncounted, and an rc-files that refuses
        connections is waited for up to FILES_UNREACHABLE_WAIT, uncounted. A
        connection that served the action goes back to the pool."""
        wait, attempt, refused_since = FILES_RETRY_WAIT, 0, None
        while True:
            connection, stale, restarting = None, False, False
            try:
                connection = self.connection(files)
                result = action(connection)
                files.pool.give_back(connection)
                connection = None
                return result
            except FilesError as e:
                stale = connection is not None and connection.reused
                told = refused_since is not None        # of the refusals so far
                if e.code == "unreachable" and files.answered:
                    refused_since = refused_since or time.monotonic()
                    restarting = time.monotonic() - refused_since < FILES_UNREACHABLE_WAIT
                else:
                    refused_since = None    # it answered: a later restart is waited for anew
                if not e.retry or self.cancelled or (
                        not stale and not restarting and attempt >= FILES_TRIES - 1):
                    raise
                if not stale and not (restarting and told):
                    log("warning", "transfer_cut", error=str(e), retry_in=wait)
            finally:
                if connection is not None:
                    connection.close()
            if not stale:
                time.sleep(wait)
                wait = min(wait * 2, FILES_RETRY_MAX_WAIT)
                attempt += not restarting
                if self.cancelled:
                    raise FilesError("cancelled", code="cancelled")


class TransferThreads(object):
    """The threads that run Jobs, kept between them: starting one cost the
    loop 0.1-0.4 ms, twice a task with files. A job is handed to a thread
    that waits for one, else to a new thread (never queued: a job may wait
    for another, as a fetch waits for the same blob's), so there are as many
    threads as jobs at once, of which FILES_IDLE_THREADS stay for a minute.
    Not threading.Thread: its start() waits until the thread runs, a switch
    between threads that the loop would wait out."""

    def __init__(self):
        import _thread
        self.lock = _thread.allocate_lock()
        self.idle = []          # [wake-up lock, work] of each thread waiting for work

    def run(self, work):
        import _thread
        with self.lock:
            if self.idle:
                waiting = self.idle.pop()
                waiting[1] = work
                waiting[0].release()
                return
        _thread.start_new_thread(self.serve, (work,))

    def serve(self, work):
        import _thread
        waiting = [_thread.allocate_lock(), None]
        waiting[0].acquire()
        while work is not None:
            work()
            work = self.next_work(waiting)

    def next_work(self, waiting):
        """The next work handed to this thread, or None when it should end."""
        with self.lock:
            if len(self.idle) >= FILES_IDLE_THREADS:
                return None
            self.idle.append(waiting)
        if not waiting[0].acquire(True, FILES_IDLE_SECONDS):
            with self.lock:
                if waiting in self.idle:        # nothing came: end
                    self.idle.remove(waiting)
                    return None
            waiting[0].acquire()        # work came just as the wait ran out
        work, waiting[1] = waiting[1], None
        return work


# <<< The end of region "files".


class FilesPool(object):
    """Authenticated rc-files connections kept open between transfers: a
    TLS handshake and a proof cost rc-files and the worker more than moving
    a 100 KiB file, and a task with small files would pay two. At most
    FILES_IDLE_MAX wait, each at most FILES_IDLE_SECONDS; one job at a time
    uses one."""

    def __init__(self):
        import _thread
        self.lock = _thread.allocate_lock()
        self.idle = []          # (connection, monotonic time it came back)

    def take(self, service, job):
        """A kept connection to `service`, now `job`'s, or None."""
        while True:
            with self.lock:
                if not self.idle:
                    return None
                connection, since = self.idle.pop()
            if connection.service is service and time.monotonic() - since < FILES_IDLE_SECONDS:
                connection.job, connection.reused = job, True
                job.sockets.append(connection.raw)
                return connection
            connection.close()

    def give_back(self, connection):
        job = connection.job
        if connection.raw in job.sockets:      # its job's cancel() must not cut it now
            job.sockets.remove(connection.raw)
        with self.lock:
            if len(self.idle) < FILES_IDLE_MAX and not job.cancelled and not connection.inbox:
                self.idle.append((connection, time.monotonic()))
                return
        connection.close()

    def prune(self, everything=False):
        """Close the connections kept too long (all of them with `everything`)."""
        now = time.monotonic()
        with self.lock:
            old = [c for c, since in self.idle if everything or now - since >= FILES_IDLE_SECONDS]
            self.idle = [(c, since) for c, since in self.idle if c not in old]
        for connection in old:
            connection.close()


# >>> Region "files": the worker process loads it on first use (load_region).

def fetch_blob(job, cache, sha, size):
    """The blob in the cache, fetched if need be: resumed from a partial
    file, hash-checked, fetched once more on a mismatch."""
    import threading
    while True:
        with cache.lock:
            busy = cache.fetching.get(sha)
            if busy is None:
                cache.fetching[sha] = threading.Event()
                break
        busy.wait(FILES_TIMEOUT)     # another task fetches it: use its copy
        if job.cancelled:
            raise FilesError("cancelled", code="cancelled")
    try:
        if cache.has(sha, size):
            cache.touch(sha)
            return False
        got = download(job, cache, sha, size)
        if got != sha:
            log("warning", "hash_mismatch", sha256=sha, got=got, message="fetching it again")
            got = download(job, cache, sha, size)
            if got != sha:
                raise FilesError("input %s failed its hash check twice: expected sha256 %s,"
                                 " got %s" % (sha[:12], sha, got), code="hash_mismatch")
        return True
    finally:
        with cache.lock:
            cache.fetching.pop(sha).set()


def fetch_named_blob(job, cache, sha, size, inputs, stdin, checkpoint):
    """fetch_blob, whose error names what the task calls the blob: a main
    node may name one that rc-files does not hold (or send bytes for it
    that fail their sha256, and are refused)."""
    try:
        return fetch_blob(job, cache, sha, size)
    except FilesError as e:
        if e.code == "cancelled":
            raise
        names = ["/".join(parts) for parts, blob, _, _ in inputs if blob == sha] + [
            name for name, ref in (("stdin", stdin), ("checkpoint", checkpoint))
            if ref and ref[0] == sha]
        raise FilesError("%s (sha256 %s, %d bytes): %s" % (", ".join(names)[:500], sha, size, e)
                         if sha not in str(e) else "%s: %s" % (", ".join(names)[:500], e),
                         code=e.code, retry=e.retry)


def download(job, cache, sha, size):
    """Fetch into partial/<sha>, resuming from its length; on a good hash it
    enters the cache. The sha256 found (the partial is deleted if wrong)."""
    partial = os.path.join(cache.dir, "partial", sha)
    fd = hold_partial(job, cache, sha, size, partial)
    if fd is None:
        return sha          # another worker sharing the state directory fetched it
    try:
        return download_into(job, cache, sha, size, partial, fd)
    except BaseException:
        cache.trim_partials()       # its partial, let go, counts against the cap
        raise


def download_into(job, cache, sha, size, partial, fd):
    with os.fdopen(fd, "r+b") as partial_file:
        if os.fstat(fd).st_size > size:
            partial_file.truncate(0)
        cache.trim_partials(size, keep=sha)
        cache.make_room(size - os.fstat(fd).st_size)
        digest = file_sha256()
        while True:
            chunk = partial_file.read(FILES_CHUNK)       # hash what an earlier cut left
            if not chunk:
                break
            digest.update(chunk)
        have = partial_file.tell()
        sink = FetchSink(partial_file.fileno(), size)

        def resume(connection):
            offset = partial_file.seek(0, 2)
            if offset != have + sink.written:
                raise FilesError("partial file of %s changed under us" % sha)
            try:
                connection.get(sha, offset, size, sink, digest)
            finally:
                log("debug", "file_fetched", sha256=sha, offset=offset, bytes=sink.written)
        try:
            job.tries(resume)
        except OSError as e:
            if e.errno == errno.EFBIG:
                # Never whole on this device (its file system, its ulimit -f):
                # its partial was kept, up to the limit, for a resume that
                # could only fail the same way. Held: no one else has it.
                try:
                    os.unlink(partial)
                except OSError:
                    pass
            if disk_full(e):
                raise FilesError("fetching %s (%s): %s" % (sha[:12], mebibytes(size),
                                                         disk_full_words(e)), code="disk_full")
            raise
        # Into the cache (or gone) while it is held: a worker waiting for it
        # finds it there, never a partial file it could take for its own.
        got = digest.hexdigest()
        if got == sha:
            cache.add(sha, partial)
        else:
            os.unlink(partial)
    return got


def hold_partial(job, cache, sha, size, partial):
    """partial/<sha> opened (open_partial) and locked, for this fetch alone;
    None once the blob is in the cache. Workers may share a state directory
    (one user's two workers, ~/.rc-worker): two fetching one blob at once
    into one partial file failed the second's task: "No such file" once the
    first had moved it into the cache, or "changed under us". The second
    waits until the first is done, then takes the blob from the cache."""
    try:
        import fcntl
    except ImportError:         # Windows: no locks, as it was
        return open_partial(partial)
    told = False
    while True:
        if cached_by_another(cache, sha, size):
            return None
        fd = open_partial(partial)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return fd           # a file system without locks: as it was
            busy = True
        else:
            busy = False
            try:        # not moved into the cache (or removed) since it was opened
                if os.path.samestat(os.fstat(fd), os.lstat(partial)):
                    return fd
            except OSError:
                pass
        os.close(fd)
        if busy and not told:
            told = True
            log("info", "fetch_waits", sha256=sha, message="another worker sharing this"
                " state directory is fetching it; its copy is taken once it is done")
        if job.cancelled:
            raise FilesError("cancelled", code="cancelled")
        time.sleep(FILES_GATE_POLL / 5)


def cached_by_another(cache, sha, size):
    """Whether the cache holds the blob, at `size`, though its index did
    not: another worker sharing the state directory put it there since the
    index was read. Indexed now, as Cache.load would have it."""
    import stat
    try:
        info = os.lstat(cache.path(sha))
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    cache.load()
    with cache.lock:
        cache.enter(sha, [info.st_size, info.st_atime, info.st_mtime_ns,
                          (info.st_dev, info.st_ino)])
    return True


def open_partial(path):
    """A descriptor of the partial file at `path` (made if need be) for a
    fetch to resume in: a regular file. Anything else of its name (a link,
    a FIFO, a directory, left there by hand or another program) is removed
    first: each failed every fetch of the blob (a link's O_NOFOLLOW, a
    FIFO not seekable, a directory); O_NONBLOCK: a FIFO does not block."""
    import stat
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o600)
    except OSError:
        if not other_than_a_file(path):
            raise
    else:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            return fd
        os.close(fd)
    log("warning", "partial_file_replaced", path=path,
        message="not a regular file: removed, and the blob fetched from its start")
    if os.path.isdir(path) and not os.path.islink(path):
        remove_tree(path)
    else:
        os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o600)


def other_than_a_file(path):
    import stat
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def goes_direct(size):
    """Whether a file of `size` bytes bypasses the page cache (O_DIRECT) as
    a fetch writes it and a copy reads it: one that the cache would not keep
    anyway, over FILES_DIRECT_SHARE of the memory available now (a 1 GB
    Pi's 400 MB input). A smaller one stays cached for the task that reads
    it next: read back from the disk, it would cost the task the pages the
    fetch saved, and a wait (an SD card reads 40 MB/s). RC_TEST_DIRECT_IO=1
    (tests only) sends every file of FILES_DIRECT_MIN bytes or more."""
    if size < FILES_DIRECT_MIN or not hasattr(os, "O_DIRECT"):
        return False
    if os.environ.get("RC_TEST_DIRECT_IO") == "1":
        return True
    available = read_meminfo().get("MemAvailable")
    return available is not None and size > available * 1024 * FILES_DIRECT_SHARE


def direct_io(fd, on, quiet=True):
    """O_DIRECT turned on or off on descriptor `fd`; whether it is on now.
    A file system that refuses it raises OSError, or returns False when `quiet`."""
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        if not quiet:
            raise
        return False
    return on


class FetchSink(object):
    """The partial file a fetch appends to, written by its descriptor, and
    how many bytes were written to it. A file too big for the page cache to
    keep (goes_direct) goes to the disk with O_DIRECT where the file system
    allows it: through the cache, it would push everything else out of a
    small device's memory, and each new page costs CPU (a VM hands freed
    pages back to its host, a Pi's memcpy is slow). O_DIRECT writes whole
    blocks, from a block's start, out of aligned memory (BlobWriter's
    buffers); what is not whole blocks there (the start of a resume, the
    end, the last bytes before a cut) goes through the cache. A file system
    that refuses it (ramfs, tmpfs before Linux 6.6, some FUSE; no O_DIRECT
    on macOS) has the rest of the file through the cache: decided once a file."""

    def __init__(self, fd, size):
        self.fd, self.written = fd, 0
        self.direct = goes_direct(size)
        self.on = False         # O_DIRECT is on the descriptor now

    def write(self, view, aligned=False):
        """All of `view`; `aligned`: it starts on a page (O_DIRECT may write it)."""
        done, whole = 0, len(view) - len(view) % FILES_DIRECT_ALIGN
        if aligned and self.direct and whole and self.direct_on():
            done = self.write_direct(view[:whole])
        if done < len(view):
            self.direct_off()
            while done < len(view):
                count = os.write(self.fd, view[done:])
                done += count
                self.written += count

    def write_direct(self, view):
        """How much of `view` O_DIRECT wrote: all of it, unless the file
        system refused it (EINVAL) or a short write left a partial block."""
        done = 0
        try:
            while done < len(view) and done % FILES_DIRECT_ALIGN == 0:
                count = os.write(self.fd, view[done:])
                done += count
                self.written += count
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.refused(e)
        return done

    def direct_on(self):
        """O_DIRECT on the descriptor if it is not yet, from a block's start;
        False (and the cache from now on) where that cannot be."""
        if not self.on and not os.lseek(self.fd, 0, os.SEEK_CUR) % FILES_DIRECT_ALIGN:
            try:
                self.on = direct_io(self.fd, True, quiet=False)
            except OSError as e:
                self.refused(e)
        return self.on

    def direct_off(self):
        if self.on:
            direct_io(self.fd, False)
            self.on = False

    def refused(self, error):
        self.direct = False
        log("debug", "direct_write_refused", error=str(error), message="the file system"
            " refuses O_DIRECT here; this file is written through the page cache")


def place(cache, sha, target, mode, link=True):
    """The cached blob at `target`: a hard link where the mode allows and
    `link` (see Sandbox.may_link_inputs), else a copy. A link shares the
    cached file itself, read-only (0400): a task that writes its input
    replaces the link, never the blob."""
    source = cache.path(sha)
    if link and not mode & 0o111:
        try:
            os.link(source, target)
            return
        except OSError:
            pass        # another file system, or no hard links here: copy
    # Descriptors, not file objects: each of those costs three more system
    # calls (a tty check, two seeks), a third of a small input's copy.
    reader = os.open(source, os.O_RDONLY)
    try:
        writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), mode)
        try:
            copy_file(reader, writer, cache.index.get(sha, (None,))[0])
        finally:
            os.close(writer)
    finally:
        os.close(reader)
    os.chmod(target, mode)


def copy_file(reader, writer, size=None):
    """All of descriptor `reader` into descriptor `writer`: in the kernel
    (sendfile) where it can, which copies a 1 GiB input about twice as fast
    as reads and writes. With its `size` known, no call is made to find the end."""
    # A blob its fetch wrote past the page cache is read past it too: through
    # the cache, its pages would cost as much as the copy's own.
    direct = size is not None and goes_direct(size) and direct_io(reader, True)
    offset = 0
    if hasattr(os, "sendfile"):
        try:
            while size is None or offset < size:
                sent = os.sendfile(writer, reader, offset, 16 * FILES_CHUNK)
                if not sent:
                    return
                offset += sent
            return
        except OSError:         # not between two files here (macOS): by hand
            if direct:
                direct_io(reader, False)
            os.lseek(reader, offset, os.SEEK_SET)
            os.lseek(writer, offset, os.SEEK_SET)
    while True:
        chunk = os.read(reader, FILES_CHUNK)
        if not chunk:
            break
        write_all(writer, chunk)


def make_parents(workdir, parts):
    """The directories of a relative path, inside `workdir`; none may be a link."""
    import stat
    path = workdir
    for part in parts[:-1]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise FilesError("input path %s: %s is not a directory"
                                 % ("/".join(parts), part))
    return os.path.join(path, parts[-1])


def unique_blobs(inputs, stdin, checkpoint):
    """sha256 -> size of every blob a task reads, each once."""
    unique = {}
    for _, sha, size, _ in inputs:
        unique[sha] = size
    for ref in (stdin, checkpoint):
        if ref:
            unique[ref[0]] = ref[1]
    return unique


def place_inputs(cache, workdir, inputs, stdin, link):
    """The task's inputs and stdin, from the cache, in its directory."""
    for parts, sha, _, mode in inputs:
        target = make_parents(workdir, parts)
        if os.path.lexists(target):
            raise FilesError("input path %s is given twice" % "/".join(parts))
        place(cache, sha, target, mode, link)
    if stdin:
        place(cache, stdin[0], os.path.join(workdir, STDIN_FILE), 0o444, link)


def make_checkpoint_dir(directory):
    """The task directory's checkpoint directory, to unpack one into: a kept
    task directory has it already, empty (WorkDirs.as_made); never a link."""
    import stat
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise


def input_error(error):
    """What went wrong placing inputs, for the task's error."""
    if disk_full(error) and isinstance(error, OSError):
        return disk_full_words(error)
    if isinstance(error, OSError):
        return "cannot place inputs: %s" % error
    return str(error)


# -- checkpoints: tar files in and out -----------------------------------------

def checkpoint_signature(directory):
    """What a changed checkpoint changes: every regular file's path, size
    and mtime; None past CHECKPOINT_MAX_ENTRIES entries."""
    import stat
    found, entries, pending = [], 0, [(directory, 0)]
    # Entry by entry (os.scandir), not os.walk's list of a whole directory:
    # a task's million files cost a count, not a million names per look.
    while pending:
        root, depth = pending.pop()
        try:
            listing = os.scandir(root)
        except OSError:
            continue
        with listing:
            for entry in listing:
                entries += 1
                if entries > CHECKPOINT_MAX_ENTRIES:
                    return None
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode) and depth < TREE_DEPTH:
                    pending.append((entry.path, depth + 1))
                elif stat.S_ISREG(info.st_mode):
                    found.append((os.path.relpath(entry.path, directory), info.st_size,
                                  info.st_mtime_ns))
    return tuple(sorted(found))


def write_checkpoint(directory, target):
    """Tar the regular files and directories of `directory` (no links,
    nothing else) into `target`; (size, sha256). The task may be running
    and changing it while a worker run as root reads it: each entry is
    opened from its parent directory's descriptor, never through a link
    (os.fwalk), and a file with other hard links is left out, so nothing
    outside the directory ends up in the checkpoint."""
    import tarfile
    left_out = []
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        for number, (relative, descriptor) in enumerate(checkpoint_entries(directory), 1):
            try:
                if number > CHECKPOINT_MAX_ENTRIES:      # made since it was counted
                    raise too_many_entries()
                if not add_checkpoint_entry(archive, relative, descriptor):
                    left_out.append(relative)
            finally:
                os.close(descriptor)
    if left_out:
        # One line a checkpoint: a line for each file was 10,000 lines (2.5 MB)
        # of the device's log at each checkpoint of a task that keeps touching
        # as many sparse files, every CHECKPOINT_EVERY while it runs.
        log("warning", "checkpoint_files_left_out", count=len(left_out),
            names=[name[:200] for name in left_out[:5]], reason="sparse")
    return file_digest(target)


def too_many_entries():
    return FilesError("the checkpoint holds more than %d files and directories"
                      " (CHECKPOINT_MAX_ENTRIES)" % CHECKPOINT_MAX_ENTRIES)


def checkpoint_entries(directory):
    """(relative name, open descriptor) of each entry of `directory`, in order."""
    nofollow = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    if not hasattr(os, "fwalk"):       # no descriptor walk here: names, never through a link
        for root, dirs, files in os.walk(directory):
            too_deep(directory, root, dirs)
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                try:
                    yield (os.path.relpath(os.path.join(root, name), directory),
                           os.open(os.path.join(root, name), nofollow))
                except OSError:
                    continue
        return
    for root, dirs, files, root_fd in os.fwalk(directory):
        too_deep(directory, root, dirs)
        dirs.sort()
        base = os.path.relpath(root, directory)
        for name in sorted(dirs) + sorted(files):
            try:
                yield os.path.normpath(os.path.join(base, name)), os.open(name, nofollow,
                                                                          dir_fd=root_fd)
            except OSError:      # gone, or a link: left out
                continue


def add_checkpoint_entry(archive, relative, descriptor):
    """False for a sparse file, left out (write_checkpoint says so, once)."""
    import stat
    import tarfile
    info = os.fstat(descriptor)
    if stat.S_ISDIR(info.st_mode):
        member = tarfile.TarInfo(relative)
        member.type, member.mode = tarfile.DIRTYPE, stat.S_IMODE(info.st_mode)
        member.mtime = int(info.st_mtime)
        archive.addfile(member)
    elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        with os.fdopen(os.dup(descriptor), "rb") as f:
            member = archive.gettarinfo(arcname=relative, fileobj=f)
            if hole_bytes(descriptor, member.size, info) > CHECKPOINT_HOLES_MAX:
                return False
            archive.addfile(member, f)     # member.size bytes, however it grows
    return True


def hole_bytes(descriptor, size, info):
    """About how many of the file's first `size` bytes are holes: its size
    less what the disk holds of it, once SEEK_HOLE finds a hole before
    `size` (a compressing file system holds less of a file without any);
    without SEEK_HOLE, the difference alone. The descriptor is left at
    its start."""
    seek_hole = getattr(os, "SEEK_HOLE", None)
    try:
        if seek_hole is not None and size and os.lseek(descriptor, 0, seek_hole) >= size:
            return 0
    except OSError:         # a file system that cannot say
        pass
    finally:
        os.lseek(descriptor, 0, os.SEEK_SET)
    blocks = getattr(info, "st_blocks", None)
    return 0 if blocks is None else max(0, size - blocks * 512)


def file_digest(path):
    digest = file_sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(FILES_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def restore_checkpoint(archive_path, directory, sha):
    """read_checkpoint; a checkpoint that cannot be unpacked (not a tar, a
    name twice, a file where a directory goes, a path too long, a name this
    device cannot encode: what a hostile device may hand back) is set aside
    and the attempt starts afresh, as a first one does, rather than failing
    on every device the task goes to next. (CPython 3.6 in the C locale, a
    service without LANG, encodes file names as ASCII: any other name is a
    UnicodeEncodeError, a ValueError.)"""
    import tarfile
    try:
        read_checkpoint(archive_path, directory)
    except (tarfile.TarError, FilesError, EOFError, OSError, ValueError) as e:
        if disk_full(e):
            raise       # the device's disk is full: the attempt fails and runs elsewhere
        log("warning", "checkpoint_set_aside", sha256=sha,
            error=("%s: %s" % (type(e).__name__, e))[:300])
        remove_tree(directory)
        make_checkpoint_dir(directory)


def read_checkpoint(archive_path, directory):
    """Unpack a checkpoint tar into `directory`: regular files and
    directories with relative names only; anything else is skipped. So are
    sparse files (never in a worker's checkpoint): a few KiB of one would
    have us write terabytes of zeros, on each device the task moved to."""
    import tarfile
    skipped = []
    with open(archive_path, "rb") as raw:
        reads = HeaderReads(raw)
        with tarfile.open(fileobj=reads, mode="r:") as archive:
            for number, member in enumerate(archive, 1):
                reads.headers = 0           # the next member's count from here
                unpack_member(archive, member, number, directory, skipped, reads)
                # tarfile keeps each member it read (for getmembers()), with
                # its headers: up to CHECKPOINT_HEADER_MAX each, for every
                # member. Its iteration reads on once the list is emptied.
                del archive.members[:]
    if skipped:
        log("warning", "checkpoint_members_skipped", members=skipped[:20])


class HeaderReads:
    """A checkpoint tar's file, for tarfile: the bytes read of one member's
    headers are FilesError past CHECKPOINT_HEADER_MAX, before tarfile holds
    them (the member's data, read by unpack_member, is not counted)."""

    def __init__(self, raw):
        self.raw, self.headers, self.data = raw, 0, False
        self.seek, self.tell = raw.seek, raw.tell

    def read(self, size=-1):
        if not self.data:
            if size is None or size < 0:
                size = os.fstat(self.raw.fileno()).st_size
            self.headers += size
            if self.headers > CHECKPOINT_HEADER_MAX:
                raise FilesError("a member's headers are over %d bytes"
                                 " (CHECKPOINT_HEADER_MAX)" % CHECKPOINT_HEADER_MAX)
        return self.raw.read(size)


def unpack_member(archive, member, number, directory, skipped, reads):
    """One member of read_checkpoint's tar into `directory`, or its name
    into `skipped`."""
    if number > CHECKPOINT_MAX_ENTRIES:
        raise too_many_entries()
    # A name this device cannot encode (an honest UTF-8 device's, on a
    # C-locale 3.6) sets the checkpoint aside (UnicodeEncodeError): the
    # task restored without that file would go on from a state it
    # never had. relative_path() would skip it, as a hostile name.
    os.fsencode(member.name)
    parts = relative_path(member.name.rstrip("/")) if member.name else None
    if parts is None or not (member.isfile() or member.isdir()) or member.issparse():
        skipped.append(member.name[:100])
        return
    if member.isdir():
        make_parents(directory, parts + ["-"])
        return
    target = make_parents(directory, parts)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), member.mode & 0o755 | 0o600)
    with os.fdopen(descriptor, "wb") as writer:
        source = archive.extractfile(member)
        reads.data = True           # its bytes, in FILES_CHUNK pieces
        try:
            while True:
                chunk = source.read(FILES_CHUNK)
                if not chunk:
                    break
                writer.write(chunk)
        finally:
            reads.data = False


# -- outputs: globs matched in the task directory, nothing outside it ---------

def glob_match(pattern_parts, parts):
    """fnmatch per path component; "**" matches any number of directories.
    As in a shell, a leading "." is matched only by a part that starts
    with one (rc-files' glob_match, which takes the same outputs). One
    pass over the name per part of the pattern: trying every split among
    the "**"s took minutes for a deep path and two "**"."""
    from fnmatch import fnmatchcase
    reached = [True] + [False] * len(parts)    # reached[j]: parts[:j] are matched so far
    for head in pattern_parts:
        if head == "**":
            for j, part in enumerate(parts):
                reached[j + 1] = reached[j + 1] or (reached[j] and not part.startswith("."))
            continue
        dot_too = head.startswith(".")
        reached = [False] + [reached[j] and (dot_too or not part.startswith("."))
                             and fnmatchcase(part, head)
                             for j, part in enumerate(parts)]
    return reached[-1]


# <<< The end of region "files".


def output_globs(payload):
    globs = payload.get("outputs") or []
    if not isinstance(globs, list) or len(globs) > 1000:
        return []
    return [glob.strip("/").split("/") for glob in globs
            if isinstance(glob, str) and glob and "\0" not in glob]


# >>> Region "files": the worker process loads it on first use (load_region).

def find_outputs(workdir, globs, protected, cached=frozenset(), entries=None):
    """(matches, notes): the files to upload as (name, path) and a note for
    each match refused. A name or link leading outside the task directory,
    or a file with links elsewhere (a hard link to a file of the worker's
    state), is refused; `protected` are files never sent whatever the link;
    `cached` are the cache's blobs, which an input links to. `entries`, the
    directory's listing by few_entries, spare it a second read (and the
    DirEntry keeps each lstat for empty_for_reuse)."""
    import stat
    root = os.path.realpath(workdir)
    matches, notes, seen, ignored = [], [], {}, 0
    folders = {}        # a glob (not ending in **) that matched a directory: its first
    listing = walk_listing(root) if entries is None else flat_listing(root, entries)
    for base, names in listing:
        for name, path, info, is_dir in names:
            parts = base + [name]
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:   # a lone link needs no count
                seen[(info.st_dev, info.st_ino)] = seen.get((info.st_dev, info.st_ino), 0) + 1
            if is_dir and not stat.S_ISLNK(info.st_mode):
                for number, glob in enumerate(globs):
                    if number not in folders and glob[-1] != "**" and glob_match(glob, parts):
                        folders[number] = "/".join(parts)
                continue
            if any(glob_match(glob, parts) for glob in globs):
                if len(matches) + len(notes) >= FILES_MAX_MATCHES:
                    ignored += 1
                    continue
                if not utf8(parts):     # a frame cannot carry it (a lone surrogate)
                    notes.append("rc-worker: output %r refused: its name is not UTF-8;"
                                 " not uploaded" % "/".join(parts))
                    continue
                # A walk from the resolved root never enters a linked directory:
                # only a link itself needs resolving (each step an lstat).
                real = os.path.realpath(path) if stat.S_ISLNK(info.st_mode) else path
                matches.append(("/".join(parts), real))
    kept, names = [], 0
    for name, real in matches:
        reason, inode = refusal(root, real, seen, protected, cached)
        if reason is None and (len(kept) >= FILES_MAX_OUTPUTS or names > FILES_MAX_NAMES):
            reason = "over %d outputs or %d bytes of names in one task" % (
                FILES_MAX_OUTPUTS, FILES_MAX_NAMES)
        if reason:
            notes.append("rc-worker: output %r refused: %s; not uploaded" % (name, reason))
        else:
            kept.append((name, real, inode))
            names += len(name)
    if len(notes) > FILES_MAX_NOTES:
        notes[FILES_MAX_NOTES:] = ["rc-worker: and %d more outputs refused"
                                   % (len(notes) - FILES_MAX_NOTES)]
    if ignored:
        notes.append("rc-worker: %d more files matched the outputs' globs past the first %d;"
                     " not uploaded" % (ignored, FILES_MAX_MATCHES))
    for number, folder in sorted(folders.items()):   # `--output results`: a directory
        if not any(glob_match(globs[number], name.split("/")) for name, _ in matches):
            notes.append("rc-worker: output %r is a directory; outputs are files: %r brings"
                         " back the files under it" % (folder, folder + "/**"))
    return kept, notes


def walk_listing(root):
    """For find_outputs: each directory of the task's tree, top down, as
    (its path parts, (name, path, lstat, listed as a directory) of each of
    its names in order, one at a time: a million of them are no list), the
    worker's own .rc-* names at the top left out."""
    for directory, dirs, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        base = [] if relative == "." else relative.split(os.sep)
        if not base:
            dirs[:] = [d for d in dirs if not d.startswith(".rc-")]
            files = [f for f in files if not f.startswith(".rc-")]
        yield base, looked_at(directory, sorted(dirs + files), set(dirs))
        too_deep(root, directory, dirs)      # after the names: a deep directory is no file


def looked_at(directory, names, dirs):
    for name in names:
        path = os.path.join(directory, name)
        try:
            yield name, path, os.lstat(path), name in dirs
        except OSError:
            continue


def flat_listing(root, entries):
    """walk_listing of a directory few_entries listed (no folder in it but an
    empty checkpoint directory): its entries, not read again."""
    names = []
    for entry in sorted(entries, key=lambda entry: entry.name):
        if entry.name.startswith(".rc-"):
            continue
        try:
            # As os.walk lists it: a link to a directory is one.
            info, is_dir = entry.stat(follow_symlinks=False), entry.is_dir()
        except OSError:
            continue
        names.append((entry.name, os.path.join(root, entry.name), info, is_dir))
    yield [], names


def utf8(parts):
    """Whether every part of a name found on disk is UTF-8 (os.walk gives
    other bytes as lone surrogates, which no JSON frame may hold)."""
    try:
        for part in parts:
            part.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refusal(root, real, seen, protected, cached):
    """(why the output at `real` is not sent, None) or (None, its (device,
    inode)): open_output sends that file only, whatever is at `real` then."""
    import stat
    if real != root and not real.startswith(root + os.sep):
        return "it resolves outside the task directory (%s)" % real, None
    try:
        info = os.stat(real)
    except OSError as e:
        return "cannot read it: %s" % e, None
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file", None
    if (info.st_dev, info.st_ino) in protected:
        return "it is a file of the worker's own state", None
    inode = (info.st_dev, info.st_ino)
    if inode not in cached and info.st_nlink > max(1, seen.get(inode, 0)):   # an input's link is fine
        return "it has hard links outside the task directory", None
    return None, inode


def read_inline(source, name, limit):
    """An output's entry for a task_result's files_inline ("data": its
    bytes), or None when it is over `limit` bytes."""
    size = os.fstat(source.fileno()).st_size
    if size > limit:
        return None
    source.seek(0)
    # One byte past its size shows a file that grew meanwhile; no more (a
    # read of `limit` bytes allocates them all first).
    data = source.read(size + 1)
    if len(data) > size:
        return None
    digest = file_sha256()
    digest.update(data)
    return {"name": name, "size": len(data), "sha256": digest.hexdigest(), "data": data}


FEW_ENTRIES = 64        # entries of a task directory that the loop may look through for outputs


def few_entries(workdir):
    """The task directory's entries when it holds at most FEW_ENTRIES and no
    folder but an empty checkpoint directory, else None: looking for its
    outputs, and emptying or removing it, then cost the loop a directory
    read and a few unlinks, never a walk of a tree (a task may leave
    millions of files)."""
    try:
        with os.scandir(workdir) as listing:
            entries = [entry for _, entry in zip(range(FEW_ENTRIES + 1), listing)]
        if len(entries) <= FEW_ENTRIES and all(
                not entry.is_dir(follow_symlinks=False)
                or (entry.name == CHECKPOINT_DIR and is_empty_dir(entry.path))
                for entry in entries):
            return entries
    except OSError:
        pass
    return None


def is_empty_dir(path):
    with os.scandir(path) as listing:
        return next(listing, None) is None


def empty_for_reuse(workdir, entries):
    """Empty a task directory the worker took back (Sandbox.keep_for_upload),
    all its task's processes gone, of its `entries` (few_entries) but its
    checkpoint directory, made the worker's again: whether it is then as
    WorkDirs hands a directory out (the worker's, 0700, and so is that
    one, empty), for the next task with files (no mkdir of either). False
    on anything else: it is removed whole."""
    import stat
    try:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(entry.path)
                continue
            if entry.name != CHECKPOINT_DIR or stat.S_IMODE(info.st_mode) != 0o700:
                return False
            if info.st_uid != os.geteuid():
                os.chown(entry.path, os.geteuid(), os.getegid(), follow_symlinks=False)
        return WorkDirs.plain_dir(workdir, None)
    except OSError:
        return False


def open_output(path, inode):
    """An output opened without following a link at its last step, if it
    is still the file find_outputs looked at (`inode`): a folder of its
    path swapped for a link since then (by another task of a shared
    --task-user uid, whose processes outlive this task) led the worker,
    as root, to its own state. Unbuffered: it is read in a few large
    pieces, and a buffered reader costs a tty check and two seeks more."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    info = os.fstat(descriptor)
    if (info.st_dev, info.st_ino) != inode:
        os.close(descriptor)
        raise OSError(errno.ESTALE, "it was replaced after it was looked at")
    return os.fdopen(descriptor, "rb", 0)


def put_file(job, source, request):
    """Upload file object `source` (hashed first); the stored entry, or a
    FilesError. A hash rc-files does not find in what came is hashed and
    sent once more, from the start (rc-files drops what it received): a
    file that changed between its hash and its sending, or bytes spoilt
    on the way, would otherwise lose the task's output."""
    try:
        return put_file_once(job, source, request)
    except FilesError as e:
        if e.code != "hash_mismatch":
            raise
        log("warning", "output_hash_mismatch", name=request["name"], error=str(e),
            message="sending it again")
        return put_file_once(job, source, request)


def put_file_once(job, source, request):
    digest = file_sha256()
    source.seek(0)
    size = 0
    while True:
        chunk = source.read(FILES_CHUNK)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    request = dict(request, size=size, sha256=digest.hexdigest())
    if not job.tries(lambda connection: connection.put(request, source)):
        raise FilesError("rc-files did not confirm %s as stored" % request["name"])
    return {"name": request["name"], "size": size, "sha256": request["sha256"]}


# <<< The end of region "files".


# -- the worker's side: staging, launching, uploading, checkpoints ---------------

class Staging(Task):
    """A task whose inputs are on their way; it holds its slot meanwhile."""

    def __init__(self, task, job):
        Task.__init__(self, task.key, task.payload, task.timeout)
        self.task, self.job = task, job
        self.task_type, self.quiet = task.task_type, task.quiet
        self.started = task.started

    def poll(self, worker):
        if not self.job.done or self.job.cancelled:
            return
        task = self.task
        if self.job.error is not None:
            worker.files.cache.unpin(self.key)
            remove_tree(task.workdir)
            task.workdir = None
            worker.finish(self, OUTCOME_FAILED, error="inputs: %s" % self.job.error,
                          device_fault=self.job.error_code == "disk_full")
            return
        task.staged = True        # its inputs stay pinned in the cache until it ends
        task.restored = self.job.restored
        worker.running[task.key] = task
        task.started = time.monotonic()
        task.deadline = task.started + task.timeout if task.timeout else None
        try:
            task.start(worker)
        except BadPayload as e:
            worker.finish(task, OUTCOME_FAILED, error=str(e))

    def stop(self, worker, outcome):
        self.abandon(worker)
        worker.finish(self, outcome, error=outcome.replace("_", " "))

    def abandon(self, worker):
        workdir, self.task.workdir = self.task.workdir, None
        self.job.remove_after = workdir       # the thread removes it as it ends
        self.job.cancel()
        worker.files.cache.unpin(self.key)
        if self.job.done:
            remove_tree(workdir)


class Uploading(Task):
    """A task that has ended and whose files are going up; its result is
    sent when they are stored."""

    def __init__(self, task, job, result):
        Task.__init__(self, task.key, task.payload, task.timeout)
        self.task, self.job, self.result = task, job, result
        self.task_type, self.quiet = task.task_type, task.quiet

    def poll(self, worker):
        if not self.job.done or self.job.cancelled:
            return
        status, error, result = self.result
        notes = list(self.job.notes)
        if self.job.error is not None:
            notes.append("rc-worker: files not all uploaded: %s" % self.job.error)
        if notes:
            result["stderr"] = "\n".join(notes) + "\n" + result.get("stderr", "")
        self.task.files_stored = self.job.stored
        self.task.files_inline = self.job.inline
        worker.running[self.key] = self.task
        worker.finish(self.task, status, error=error, **result)

    def stop(self, worker, outcome):
        pass       # it has ended; its result follows

    def abandon(self, worker):
        self.job.cancel()


class Files(object):
    """The worker's files: the cache, the service, the transfers under way."""

    def __init__(self, options):
        self.options = options
        self.cache = FileCache(options.state_dir, getattr(options, "cache_mb", CACHE_MB))
        self.service = None
        self.secret = None          # the device's own secret, for rc-files proofs
        # Whether rc-files has taken our proof before: only then is a refused
        # connection a restart to wait for (FILES_UNREACHABLE_WAIT), not a
        # port nothing listens on (a firewall, no rc-files), which fails fast.
        self.answered = False
        self.pool = FilesPool()
        self.gate = None            # FILES_CONNECTIONS transfers at once (made by Job.start)
        self.threads = None         # TransferThreads (made by Job.start)
        self.protected_files = None     # (when, inodes) of the state's files (see protected)
        # task key -> [next due, signature sent, job or None, stored entry or None]
        self.checkpoints = {}
        self.prefetching = {}       # task key -> the Job fetching a waiting task's inputs, or None
        # (file bytes, total bytes) of small files the main node takes in a
        # task_result (its register_ack's inline_files), or None: all to rc-files.
        self.inline = None
        # Task directories emptied after their outputs were read (upload_here),
        # each the worker's and 0700 with an empty checkpoint directory, for
        # the next tasks with files: WorkDirs keeps those of plain tasks by uid.
        self.spare_dirs = []

    def every(self):
        return getattr(self.options, "checkpoint_every", CHECKPOINT_EVERY)

    # -- from the worker connection

    def on_register(self, worker, data):
        port = data.get("files_port")
        offer = data.get("inline_files")
        self.inline = None
        if isinstance(offer, dict) and is_int(offer.get("file_bytes")) \
                and is_int(offer.get("total_bytes")):
            self.inline = (max(0, min(offer["file_bytes"], INLINE_FILE_BYTES)),
                           max(0, min(offer["total_bytes"], INLINE_TOTAL_BYTES)))
        self.pool.prune(everything=True)     # of the connection before
        if worker.auth == "device":
            self.secret = worker.key
        if not (is_int(port) and 0 < port < 65536) or self.secret is None:
            self.service = None
            return
        self.service = FileService(worker.options.join[0], port, worker.options.fingerprint,
                                   worker.device_id, self.secret)

    def heartbeat(self):
        """What a heartbeat says of the cache, once rc-files is there to fill it."""
        self.pool.prune()
        if self.service is None:
            return {}
        if self.cache.index is None and not os.path.isdir(self.cache.dir):
            return {"cached_files": []}
        return {"cached_files": self.cache.recent()}

    def report(self):
        """For --self-test: where the cache is, its cap and what it holds."""
        return {"dir": self.cache.dir, "cap_mb": self.cache.cap // 1048576,
                "used_mb": round(self.cache.used() / 1048576.0, 1),
                "files": len(self.cache.load())}

    def take_inline(self, entries, raw):
        """Small inputs that came right behind a task_assign, into the cache
        as if fetched, so the task starts from the cache (place_cached) and a
        later task with the same input finds it there. Each is checked against
        its sha256; one that fails is left out, and the task fetches it from
        rc-files, which is checked again."""
        refs = [blob_ref(entry) for entry in entries] if isinstance(entries, list) else [None]
        if None in refs or sum(ref[1] for ref in refs) != len(raw):
            log("warning", "inline_file_refused", message="the small files of a task_assign"
                " do not match its files_inline; they are fetched from rc-files instead")
            return
        offset = 0
        for sha, size in refs:
            blob, offset = raw[offset:offset + size], offset + size
            digest = file_sha256()
            digest.update(blob)
            if digest.hexdigest() != sha:
                log("warning", "inline_file_refused", sha256=sha, message="an inline input"
                    " does not match its sha256; it is fetched from rc-files instead")
                continue
            self.cache_bytes(sha, blob)

    @staticmethod
    def drop_inline(result):
        """A result's small files, kept for a main node that took them, left
        out for one that does not (an older one, after a reconnect): its
        stderr says which were lost."""
        names = [entry.get("name") for entry in result.pop("files_inline")]
        note = "rc-worker: outputs not stored (the main node takes no inline files): %s\n" \
            % ", ".join(map(str, names))[:2000]
        result["result"]["stderr"] = note + (result["result"].get("stderr") or "")
        log("warning", "inline_files_dropped", task_id=result.get("task_id"), files=len(names))

    def cache_bytes(self, sha, blob):
        """Verified bytes into the cache (unless it holds them already)."""
        if self.cache.has(sha, len(blob)):
            self.cache.touch(sha)
            return
        temporary = None
        try:
            self.cache.prepare()
            self.cache.make_room(len(blob))
            temporary = self.cache.temporary("inline-%s-%s" % (sha[:16], new_nonce()[:8]))
            # Read-only from the start (the descriptor writes all the same):
            # add() need not chmod it, nor touch what was just made.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | getattr(os, "O_NOFOLLOW", 0), 0o400)
            try:
                write_all(descriptor, blob)     # no file object: the bytes are all here
            finally:
                os.close(descriptor)
            self.cache.add(sha, temporary, made_here=True)
            temporary = None
        except (OSError, FilesError) as e:
            log("warning", "inline_file_not_cached", sha256=sha, error=str(e),
                message="it is fetched from rc-files instead")
        finally:
            if temporary is not None and os.path.lexists(temporary):
                os.unlink(temporary)

    # -- before a task starts

    def stage(self, worker, task):
        """True if the task waits for its inputs (a Staging takes its place);
        False if it needs none, or all were in the cache and are in place."""
        if not needs_staging(task):
            return False
        load_region("files")
        inputs, stdin, checkpoint = task_inputs(task.payload)
        # The worker's own until the task starts: Sandbox.open hands it to the task's uid.
        try:
            task.workdir = workdir = self.spare_dirs.pop() if self.spare_dirs \
                else worker.sandbox.workdirs.take()
        except OSError as e:        # a disk another task filled: not the worker's end
            raise BadPayload("cannot start: %s" % e, device_fault=disk_full(e))
        unique = unique_blobs(inputs, stdin, checkpoint)
        link = worker.sandbox.may_link_inputs()
        self.cache.pin(unique, task.key)
        if self.place_cached(task, inputs, stdin, checkpoint, unique, link):
            return False
        job = Job(worker, lambda job: self.fetch_inputs(job, workdir, inputs, stdin, checkpoint,
                                                        link))
        job.blobs = list(unique)
        worker.running[task.key] = Staging(task, job)
        job.start()
        return True

    def place_cached(self, task, inputs, stdin, checkpoint, unique, link):
        """Place the task's inputs here, in the loop, when the cache holds
        them all (fetched for an earlier task, or ahead: see prefetch) and
        placing is links, or copies of at most FILES_COPY_IN_LOOP bytes: a
        thread and a wake-up would cost more. False when a thread must
        fetch or copy; BadPayload when placing failed."""
        if checkpoint or not self.cache.prepared:
            return False
        load_region("files")
        copied = sum(size for _, _, size, mode in inputs if not link or mode & 0o111)
        if stdin and not link:
            copied += stdin[1]
        if copied > FILES_COPY_IN_LOOP:
            return False
        with self.cache.lock:
            if any(sha in self.cache.fetching for sha in unique):
                return False
        if not all(self.cache.has(sha, size) for sha, size in unique.items()):
            return False
        try:
            for sha in unique:
                self.cache.touch(sha)
            place_inputs(self.cache, task.workdir, inputs, stdin, link)
        except (OSError, FilesError) as e:
            self.cache.unpin(task.key)
            remove_tree(task.workdir)
            task.workdir = None
            raise BadPayload("inputs: %s" % (input_error(e),), device_fault=disk_full(e))
        log("debug", "inputs_ready", files=len(inputs), fetched=0, cached=len(unique))
        task.staged, task.restored = True, ()
        return True

    def prefetch(self, worker):
        """Fetch into the cache the inputs of tasks waiting for a slot (the
        main node gives a quick device a few more than its slots), so that a
        slot that frees starts its next task at once (place_cached). At most
        FILES_PREFETCH at once, each of at most FILES_PREFETCH_MAX bytes;
        what fails here is fetched again, and reported, as the task starts."""
        for key in [key for key in self.prefetching if key not in worker.queued]:
            del self.prefetching[key]
            if key not in worker.running:
                self.cache.unpin(key)       # it left the queue some other way than a start
        if self.service is None or not worker.queued:
            return
        busy = sum(job is not None and not job.done for job in self.prefetching.values())
        starting = worker.options.slots - worker.slots_taken()   # these start this turn
        for key, task in list(worker.queued.items()):
            if busy >= FILES_PREFETCH:
                break
            if task.task_type in INSTANT_TASK_TYPES:
                continue
            starting -= 1
            if starting >= 0 or key in self.prefetching or not needs_staging(task):
                continue
            try:
                inputs, stdin, checkpoint = task_inputs(task.payload)
            except BadPayload:
                continue            # said when it starts
            load_region("files")
            unique = unique_blobs(inputs, stdin, checkpoint)
            if sum(unique.values()) > FILES_PREFETCH_MAX:
                self.prefetching[key] = None       # fetched as it starts
                continue
            self.cache.pin(unique, key)
            if self.cache.indexed(unique):
                # Here already (its small inputs came with its task_assign): a
                # thread would only find them, at the cost of two switches.
                self.prefetching[key] = None
                continue
            self.prefetching[key] = Job(worker, lambda job, unique=unique: self.fetch_ahead(
                job, unique), wake=False).start()
            busy += 1

    def fetch_ahead(self, job, unique):
        load_region("files")
        self.cache.prepare()
        for sha, size in unique.items():
            fetch_blob(job, self.cache, sha, size)

    def fetch_inputs(self, job, workdir, inputs, stdin, checkpoint, link=True):
        load_region("files")
        try:
            self.cache.prepare()
            unique = unique_blobs(inputs, stdin, checkpoint)
            fetched = sum(fetch_named_blob(job, self.cache, sha, size, inputs, stdin, checkpoint)
                          for sha, size in unique.items())
            place_inputs(self.cache, workdir, inputs, stdin, link)
            if checkpoint:
                directory = os.path.join(workdir, CHECKPOINT_DIR)
                make_checkpoint_dir(directory)
                restore_checkpoint(self.cache.path(checkpoint[0]), directory, checkpoint[0])
                job.restored = checkpoint_signature(directory)
            log("info" if fetched else "debug", "inputs_ready", files=len(inputs),
                fetched=fetched, cached=len(unique) - fetched)
        except OSError as e:
            raise FilesError(input_error(e), code="disk_full" if disk_full(e) else None)
        finally:
            if job.cancelled and job.remove_after:
                remove_tree(job.remove_after)

    # -- as a process task starts

    def launch(self, task, worker):
        """What the task's process gets besides its command: "env" (RC_TASK_ID,
        RC_ATTEMPT, RC_CHECKPOINT_DIR and the payload's), "stdin" (a path or
        None) and, for a script from a file, "request" (its argv)."""
        env = dict(task_env(task.payload))
        directory = os.path.join(task.workdir, CHECKPOINT_DIR)
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
            jail = task.jail or {}
            if jail.get("uid") is not None:      # the task writes it as its own uid
                os.chown(directory, jail["uid"], jail["gid"])
        env.update(RC_TASK_ID=str(task.key[0]), RC_ATTEMPT=str(task.key[1]),
                   RC_DEVICE_ID=worker.device_id,
                   RC_CHECKPOINT_DIR=directory)
        stdin = os.path.join(task.workdir, STDIN_FILE) if task.payload.get("stdin") else None
        extra = {"env": env, "stdin": stdin}
        if runs_file(task):
            extra["request"] = self.script_request(task, task.payload["file"])
        if sum(len(name) + len(value) for name, value in env.items()) > FILES_SPAWN_ENV:
            task.spawned = False        # more than a spawner message holds
        if self.service is None:
            return extra
        task.spill = {}          # streams past the cap are kept in full (see spill_stream)
        if task.key not in self.checkpoints:
            # A restored checkpoint is not sent again until it changes.
            # [next try, signature sent, its Job, stored entry, failures in
            # a row, what the last failure was (checkpoint_failed)]
            self.checkpoints[task.key] = [time.monotonic() + self.every(),
                                          getattr(task, "restored", ()), None, None, 0, None]
        return extra

    @staticmethod
    def has_checkpoint(directory):
        """Whether the task wrote anything there (its walk is left to a thread)."""
        try:
            return bool(os.listdir(directory))
        except OSError:
            return False

    @staticmethod
    def script_request(task, script):
        """`python -I FILE` or `sh FILE` for a script that came as an input."""
        parts = relative_path(script)
        path = os.path.join(task.workdir, *parts) if parts else None
        if path is None or not os.path.isfile(path):
            raise BadPayload("payload file %r is not one of the task's inputs" % (script,))
        if task.task_type == "python_exec":
            return {"argv": [python_executable(), "-I", path]}
        if ShellTask.shell is None:
            ShellTask.shell = which("sh") or "/bin/sh"
        # The shell limits itself first, as for a command (see ShellTask), then
        # runs the script with the interpreter its #! line names (a bash
        # script's arrays are a syntax error to sh), or itself.
        return {"argv": [ShellTask.shell, "-c", shell_limits(task.limits) + 'exec "$@"',
                         ShellTask.shell] + (shebang(path) or [ShellTask.shell]) + [path],
                "self_limiting": True}

    # -- after a task ends

    def upload_first(self, worker, task, status, error, result):
        """True if the task's files go up before its result (an Uploading
        takes its place and sends it later)."""
        if isinstance(task, (Staging, Uploading)) or getattr(task, "files_stored", None) \
                is not None or not isinstance(task, ProcessTask):
            return False
        state = self.checkpoints.pop(task.key, None)
        workdir = task.workdir or getattr(task, "kept_workdir", None)
        if workdir is None:
            return False
        handed_back = status == OUTCOME_HANDED_BACK      # only its checkpoint matters
        spilled = {} if handed_back else getattr(task, "spill", None) or {}
        globs = [] if handed_back else output_globs(task.payload)
        directory = os.path.join(workdir, CHECKPOINT_DIR)
        checkpoint = None
        # Cancelled too: after a take-back (drain --now, a lost lease) the main node
        # cancels the attempt yet takes its last checkpoint for the next one.
        if status in (OUTCOME_FAILED, OUTCOME_TIMED_OUT, OUTCOME_HANDED_BACK,
                      OUTCOME_CANCELLED) and state:
            # What the next attempt starts from; sent only if it changed (send_checkpoint).
            if self.has_checkpoint(directory):
                checkpoint = state
        if getattr(task, "spill_error", None) and not handed_back:
            result["stderr"] = task.spill_error + "\n" + result.get("stderr", "")
        if self.service is None and globs:
            result["stderr"] = ("rc-worker: outputs not uploaded: the main node offers no"
                                " file service\n" + result.get("stderr", ""))
        if self.service is None or not (globs or spilled or checkpoint):
            # An empty checkpoint directory stays: the next task of the uid
            # takes the task directory as it is (WorkDirs.as_made).
            if state and state[3]:      # one went up while it ran
                task.files_stored, task.files_elapsed = [state[3]], task.elapsed()
            return False
        load_region("files")
        worker.sandbox.keep_for_upload(workdir)
        task.workdir = None           # ours now: removed when the upload ends
        task.files_elapsed = task.elapsed()
        if not (spilled or checkpoint) and self.upload_here(worker, task, workdir, globs,
                                                            result):
            return False
        job = Job(worker, lambda job: self.upload(job, task, workdir, globs, spilled,
                                                  checkpoint))
        worker.running[task.key] = Uploading(task, job, (status, error, result))
        job.start()
        return True

    def upload_here(self, worker, task, workdir, globs, result):
        """The outputs read here, in the loop, and the task directory kept
        for the next task with files (WorkDirs), when the directory holds a
        few entries and no folder, and every output rides in the task_result:
        a transfer thread, its wake-up and a new directory cost the worker
        more than reading 100 KiB. False (nothing done) when one does not
        fit: a thread uploads them all (upload), never the loop."""
        load_region("files")
        entries = few_entries(workdir) if self.inline else None
        if entries is None:
            return False
        found, notes = find_outputs(workdir, globs, self.protected(), self.cached_inodes(),
                                    entries)
        if len(found) > INLINE_MAX_FILES:
            return False
        inline, room = [], self.inline[1]
        for name, path, inode in found:
            try:
                with open_output(path, inode) as source:
                    entry = read_inline(source, name, min(room, self.inline[0]))
            except OSError as e:
                notes.append("rc-worker: output %r not uploaded: %s" % (name, e))
                continue
            if entry is None:
                return False
            room -= entry["size"]
            inline.append(entry)
        if notes:
            result["stderr"] = "\n".join(notes) + "\n" + result.get("stderr", "")
        task.files_stored, task.files_inline = [], inline
        if len(self.spare_dirs) < worker.options.slots and empty_for_reuse(workdir, entries):
            self.spare_dirs.append(workdir)
        else:
            remove_task_dir(workdir)
        return True

    def send_or_inline(self, job, source, request, room):
        """An output into job.inline when it is small and room (a list of one,
        the bytes left) allows, else put to rc-files; the choice is the size's."""
        load_region("files")
        limit = min(room[0], self.inline[0]) \
            if self.inline and len(job.inline) < INLINE_MAX_FILES else 0
        entry = read_inline(source, request["name"], limit)
        if entry is not None:
            room[0] -= entry["size"]
            job.inline.append(entry)
            return
        job.stored.append(put_file(job, source, request))

    def upload(self, job, task, workdir, globs, spilled, checkpoint):
        load_region("files")
        try:
            request = {"task_id": task.key[0], "attempt": task.key[1]}
            found, notes = find_outputs(workdir, globs, self.protected(),
                                        self.cached_inodes()) if globs else ([], [])
            job.notes.extend(notes)
            room = [self.inline[1] if self.inline else 0]    # bytes the result may carry
            if globs:
                for name, path, inode in found:
                    try:
                        with open_output(path, inode) as source:
                            self.send_or_inline(job, source, dict(request, name=name), room)
                    except OSError as e:
                        job.notes.append("rc-worker: output %r not uploaded: %s" % (name, e))
                    except FilesError as e:
                        if e.code == "cancelled":
                            raise
                        job.notes.append("rc-worker: output %r not uploaded: %s" % (name, e))
            for fd, stream in sorted(spilled.items()):
                self.send_or_inline(job, stream, dict(request, name=STREAM_NAMES[fd]), room)
                stream.close()
            if checkpoint:
                if checkpoint[2] is not None:
                    checkpoint[2].wait(FILES_TIMEOUT)     # the periodic one, first
                self.send_checkpoint(job, task.key, os.path.join(workdir, CHECKPOINT_DIR),
                                     checkpoint)
                if checkpoint[3]:
                    job.stored.append(checkpoint[3])
        finally:
            for stream in spilled.values():
                stream.close()
            job.then = lambda: remove_task_dir(workdir)     # after the result is on its way

    def protected(self):
        """Files of the worker's state that no output may be, link or not;
        looked for again after FILES_PROTECTED_SECONDS, not for every upload
        (a state file made meanwhile still has its link outside the task
        directory, which find_outputs refuses, and a link to it resolves
        outside)."""
        now = time.monotonic()
        if self.protected_files is None or now - self.protected_files[0] > \
                FILES_PROTECTED_SECONDS:
            self.protected_files = (now, self.state_files())
        return self.protected_files[1]

    def state_files(self):
        found = set()
        for root, dirs, files in os.walk(os.path.expanduser(self.options.state_dir)):
            # Not into the cache: its blobs are what inputs link to (cached_inodes).
            dirs[:] = [d for d in dirs if os.path.join(root, d) != self.cache.dir]
            for name in files:
                try:
                    info = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                found.add((info.st_dev, info.st_ino))
        return found

    def cached_inodes(self):
        """The cache's blobs as (device, inode), from its index: a stat of
        each, for each task, would cost more than the task's files. The
        index's own set, which only `in` reads (atomic), not a copy."""
        self.cache.load()
        return self.cache.inodes

    def annotate(self, task, data):
        """The result's "files": what rc-files confirmed as stored."""
        stored = getattr(task, "files_stored", None)
        if stored is not None:
            data["files"] = stored
        if getattr(task, "files_inline", None):
            data["files_inline"] = task.files_inline     # sent raw behind it (encode_frame)
        # The process's time, not the upload's after it (a slow or stalled link).
        elapsed = getattr(task, "files_elapsed", None)
        if elapsed is not None and isinstance(data.get("result"), dict):
            data["result"]["execution_time"] = round(elapsed, 6)
        self.cache.unpin(task.key)

    # -- checkpoints while a task runs, and when it is handed back

    def wake_at(self):
        times = [state[0] for state in self.checkpoints.values()]
        return min(times) if times and self.service is not None else None

    def on_time(self, worker, now):
        if self.prefetching or worker.queued:
            self.prefetch(worker)
        if self.service is None:
            return
        for key, state in list(self.checkpoints.items()):
            task = worker.running.get(key)
            if not isinstance(task, ProcessTask) or task.workdir is None:
                self.checkpoints.pop(key, None)
                continue
            if now < state[0] or (state[2] is not None and not state[2].done):
                continue
            state[0] = now + self.every()
            directory = os.path.join(task.workdir, CHECKPOINT_DIR)
            load_region("files")
            state[2] = Job(worker, lambda job, key=key, directory=directory, state=state:
                           self.send_checkpoint(job, key, directory, state)).start()

    def send_checkpoint(self, job, key, directory, state):
        """Tar the checkpoint directory and put it, if it changed since the last."""
        load_region("files")
        signature = checkpoint_signature(directory)
        if signature is None:
            self.checkpoint_failed(key, state, too_many_entries())
            return
        if not signature or signature == state[1]:
            return
        self.cache.prepare()
        temporary = self.cache.temporary("checkpoint-%d-%d-%s.tar"
                                         % (key[0], key[1], new_nonce()[:8]))
        try:
            size, sha = write_checkpoint(directory, temporary)
            previous = state[3]
            with open(temporary, "rb") as source:
                state[3] = put_file(job, source, {"task_id": key[0], "attempt": key[1],
                                                  "name": CHECKPOINT_NAME})
            state[1] = signature
            log("info", "checkpoint_sent", task_id=key[0], attempt=key[1], size=size,
                sha256=sha, **({"after_failures": state[4]} if state[4] else {}))
            state[4], state[5] = 0, None
            self.cache_checkpoint(sha, size, temporary, previous)
        except FilesError as e:       # stale_attempt: a user's cancel, say; nothing lost
            if e.code == "stale_attempt":
                log("info", "checkpoint_not_sent", task_id=key[0], attempt=key[1], error=str(e))
            else:
                self.checkpoint_failed(key, state, e)
        except OSError as e:    # a file changed while it was read, the disk full: the next one
            self.checkpoint_failed(key, state, e)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def checkpoint_failed(self, key, state, error):
        """A warning for a checkpoint that could not go up, then none while
        it fails the same way, and the next tries further apart (up to
        CHECKPOINT_BACKOFF_MAX): a full disk, EFBIG or the store's quota
        logged the same warning at every --checkpoint-every for as long as
        the task ran, each try writing the whole tar again. The task runs
        on either way."""
        kind = getattr(error, "code", None) or getattr(error, "errno", None) or str(error)
        state[4] += 1
        wait = min(self.every() * 2 ** min(state[4], 30), max(self.every(),
                                                                CHECKPOINT_BACKOFF_MAX))
        state[0] = time.monotonic() + wait
        if kind == state[5]:
            return
        state[5] = kind
        log("warning", "checkpoint_not_sent", task_id=key[0], attempt=key[1], error=str(error),
            next_try_in=round(wait, 3), message="said once while it fails so; tried again"
            " further apart")

    def cache_checkpoint(self, sha, size, temporary, previous):
        """The next attempt here fetches nothing: the checkpoint goes into
        the cache in place of this attempt's previous one, within
        --cache-mb. (Each was added as it stood, none evicted while the task
        ran: a large checkpoint changing every few minutes filled the disk.)"""
        if previous and previous["sha256"] != sha:
            self.cache.discard(previous["sha256"])
        if size > self.cache.cap:
            return
        try:
            self.cache.make_room(size)
        except FilesError:        # no disk for it: the next attempt fetches it
            return
        self.cache.add(sha, temporary)

    def keep_for_hand_back(self, task):
        """The task dir outlives abandon() when its checkpoint must go up first."""
        state = self.checkpoints.get(task.key)
        if self.service is None or state is None or task.workdir is None:
            return
        if self.has_checkpoint(os.path.join(task.workdir, CHECKPOINT_DIR)):
            task.kept_workdir, task.workdir = task.workdir, None

    def on_shutdown(self, worker):
        """Running tasks' checkpoints go up, within FILES_SHUTDOWN_WAIT."""
        if self.service is None:
            return
        jobs = []
        for key, state in list(self.checkpoints.items()):
            task = worker.running.get(key)
            if isinstance(task, ProcessTask) and task.workdir is not None:
                directory = os.path.join(task.workdir, CHECKPOINT_DIR)
                load_region("files")
                jobs.append(Job(worker, lambda job, key=key, directory=directory, state=state:
                                self.send_checkpoint(job, key, directory, state)).start())
        give_up = time.monotonic() + FILES_SHUTDOWN_WAIT
        for job in jobs:
            job.wait(max(0.0, give_up - time.monotonic()))


def spill_stream(task, fd, buffer, chunk):
    """A stream past the inline cap goes on, in full up to --max-file-size,
    to a file of the task dir, opened once (never by name again: the upload
    reads this handle). The worker writes it, so the task's RLIMIT_FSIZE
    would not stop it: `yes` would fill the device's disk."""
    spill = getattr(task, "spill", None)
    if spill is None or task.workdir is None:
        return
    index = task.stream_fds.index(fd)
    stream = spill.get(index)
    try:
        if stream is None:
            path = os.path.join(task.workdir, STREAM_FILES[index])
            stream = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | getattr(os, "O_NOFOLLOW", 0), 0o600), "w+b", 0)
            spill[index] = stream
            stream.write(bytes(buffer))
        if task.file_limit:
            left = task.file_limit * 1048576 - stream.tell()
            if len(chunk) > left:
                if left > 0:
                    log("warning", "stream_cut", task_id=task.key[0], stream=STREAM_NAMES[index],
                        limit_mb=task.file_limit)
                chunk = chunk[:max(left, 0)]
        stream.write(chunk)
    except OSError as e:
        log("warning", "stream_not_kept", task_id=task.key[0], error=str(e))
        task.spill = None
        # Said in the result too: its user sees `truncated`, not the worker's log.
        task.spill_error = "rc-worker: %s past its first %d bytes not kept: %s" % (
            ("stdout", "stderr")[index], OUTPUT_CAP, e)




###############################################################################
# The worker: one selectors loop for the connection, the tasks and signals ####
###############################################################################


class Worker(object):
    def __init__(self, options):
        self.options = options
        self.device_id = options.device_id
        self.selector = selectors.DefaultSelector()
        self.power = Power()
        self.metrics = Metrics(self.power)
        self.speed = cpu_speed()
        self.availability = Availability(options, self.power)
        self.next_policy_check = time.monotonic()
        self.queued = {}               # (task_id, attempt) -> Task waiting for a slot, in order
        self.running = {}              # (task_id, attempt) -> Task
        self.unacked = {}              # (task_id, attempt) -> task_result data, until acked
        self.fenced = set()            # (task_id, attempt) we gave up, until the main node knows
        self.fenced_told = set()       # ... of those, the ones in the message awaiting its ack
        self.heartbeat_interval = options.heartbeat
        self.stop_signal = None
        self.watchdog = Watchdog()     # started by run(), not by the self-test
        self.spawner = Spawner()       # started with the first task that needs a process
        self.sandbox = Sandbox(options)   # task users, cgroups, directories: run() prepares it
        self.files = Files(options)    # files: the cache, rc-files, transfers under way
        self.environments = None       # tasks' pip packages (python_environments)
        # Self-fencing (see check_fence). Times are on contact_clock().
        self.silence_looked_at = False  # look_at_silence has looked at what answers there
        self.hello_early = False        # this connection's look comes after HELLO_LOOK_AFTER
        self.registered_once = False   # this process has been registered (see misdialled)
        self.join_with_token = False   # the next register proves the token, not our secret
        self.fence_interval = None     # from register_ack; None: never
        self.disconnect_fence = None   # from register_ack; None: never
        # A graceful stop of the main node holds our tasks (on_main_stopping):
        # for how long, and until when (contact_clock), until registered again.
        self.hold_seconds = None
        self.hold_until = None
        self.queue_wait = None         # from register_ack: longest wait in self.queued
        self.last_contact = None       # the last frame on a registered connection
        # The last answer that renewed our running leases (register_ack,
        # heartbeat_ack, lease_check_ack): other frames (a ping, an
        # assignment) say the main node is there, not that our leases are.
        self.last_renewal = None
        self.lost_at = None            # when the connection was lost, until registered again
        # Leases in doubt (see enter_doubt). Times are on contact_clock().
        self.assignment_lease = None   # from register_ack: how long a task not started stays ours
        self.awake_at = contact_clock()    # when the loop last looked at the clock
        self.doubt = None              # why our tasks may have been given away, until answered
        self.unconfirmed = set()       # (task_id, attempt) that may not start until then
        self.checking = False          # a lease_check awaits its answer on this connection
        self.check_again = False       # ... and doubt arose again since it was sent
        # The connection to the main node.
        self.sock = None
        self.state = DISCONNECTED
        self.inbox = bytearray()
        self.raw_wanted = None         # (line, bytes) of a frame whose raw bytes are due
        self.inline_raw = None         # those bytes, while its handler runs
        self.outbox = bytearray()
        self.outbox_held = None        # when an outbox of accepts only goes (ACCEPT_HOLD)
        self.backoff = BACKOFF_START
        self.connect_at = time.monotonic() if options.join else None
        self.auth_deadline = None
        self.hello_deadline = None
        self.next_heartbeat = None
        self.last_heard = None
        self.nonces = None
        # Who we are to the main node (see on_hello).
        self.identity = Identity(options.state_dir, self.device_id)
        self.cluster_id = None
        self.auth, self.key = "token", None    # what the last register proved
        self.restart_pending = False   # an upgrade is in place: run it once idle
        # What the main node sees beyond heartbeats (see forward_logs, on_watch).
        self.logs_accepted = False     # register_ack said it takes device_log
        self.watch_interval = None     # seconds between heartbeats while watched
        self.watched_until = None      # time.monotonic() when the watch ends
        self.exit_status = None        # set when the main node refused us for good

    def python_environments(self):
        """The cache of tasks' environments, made as the first task asks for
        one: its code is a region (see load_region)."""
        if self.environments is None:
            load_region("environments")
            self.environments = Environments(self.options)
        return self.environments

    # -- the loop ---------------------------------------------------------------

    def run(self):
        problem = self.identity.prepare()
        if problem is not None:
            log("error", "state_dir_unusable", path=self.identity.state_dir, error=problem,
                message="cannot use %s (%s): %s" % (self.identity.state_dir, problem,
                                                     STATE_DIR_UNUSABLE))
            return EXIT_REFUSED
        self.sandbox.prepare(self)
        # A cache over its cap: --cache-mb made smaller since the last run.
        self.files.cache.make_room(0)
        for path in remove_dead_upgrades():
            log("info", "upgrade_leftover_removed", path=path)
        self.watchdog.start()
        self.install_signals()
        log("info", "worker_started", device_id=self.device_id, version=__version__,
            main_node="%s:%d" % self.options.join, task_types=list(self.options.task_types),
            slots=self.options.slots, python=sys.version.split()[0], watchdog=self.watchdog.pid,
            tls=bool(self.options.fingerprint))
        while self.stop_signal is None and self.exit_status is None:
            self.turn()
        self.shutdown()
        return self.exit_status or 0

    def turn(self):
        timeout = self.select_timeout()
        events = self.selector.select(timeout)
        # Before any frame is read or result sent: after a freeze (SIGSTOP, a
        # suspended laptop) the main node may have given our tasks to another device.
        self.notice_freeze(timeout)
        self.check_fence()
        for key, mask in events:
            key.data(mask)
        for task in list(self.running.values()):
            task.poll(self)
        self.check_timers(time.monotonic())
        self.start_queued()
        self.forward_logs()
        self.flush()
        self.watchdog.release()
        if self.restart_pending and not (self.running or self.queued or self.unacked):
            self.restart()

    def select_timeout(self):
        now = time.monotonic()
        times = [self.connect_at, self.auth_deadline, self.next_heartbeat, self.silence_limit(),
                 self.next_policy_check, self.hello_deadline, self.outbox_held]
        times.extend(task.wake_at() for task in self.running.values())
        times.append(self.queue_deadline())
        times.append(self.files.wake_at())      # files: checkpoints
        fence_in = self.fence_in()
        if fence_in is not None:
            times.append(now + fence_in)
        times = [t for t in times if t is not None]
        # A child's exit normally wakes us through SIGCHLD; polling each second
        # covers a platform where that signal does not arrive. On a connection
        # the loop wakes often enough to measure a freeze (see notice_freeze).
        longest = 60.0 if self.sock is None else self.freeze_threshold() / 2
        longest = min(longest, 1.0) if self.running else longest
        if self.startable() and self.slots_taken() < self.options.slots:
            longest = 0.0
        return max(0.0, min([longest] + [t - now for t in times]))

    def check_timers(self, now):
        if now >= self.next_policy_check:
            self.check_availability()
        self.spawner.keep_going(now)
        self.spawner.stop_when_idle(self, now)
        if self.connect_at is not None and now >= self.connect_at:
            self.connect()
        if self.auth_deadline is not None and now >= self.auth_deadline:
            self.disconnect("no register_ack within %g s" % (CONNECT_TIMEOUT + AUTH_TIMEOUT))
        if self.hello_deadline is not None and now >= self.hello_deadline:
            self.no_hello()
        if self.state == READY and now >= self.silence_limit():
            self.disconnect("nothing heard from the main node for %g s" % (now - self.last_heard))
        if self.state == READY and now >= self.next_heartbeat:
            self.send_heartbeat()
        for task in list(self.running.values()):
            wake_at = task.wake_at()
            if wake_at is not None and now >= wake_at:
                task.on_time(self, now)
        deadline = self.queue_deadline()
        if deadline is not None and now >= deadline:
            self.hand_back_waiting(now)
        self.files.on_time(self, now)           # files: checkpoints

    # -- tasks waiting for a slot ------------------------------------------------
    # The main node gives a device that finishes tasks quickly a few more than
    # its slots; they wait here. Should the running ones turn out long, the
    # waiting ones go back for another device before the main node's
    # accept_timeout would take them.

    def queue_deadline(self):
        if not (self.queue_wait and self.queued):
            return None
        return min(task.received for task in self.queued.values()) + self.queue_wait

    def hand_back_waiting(self, now):
        for task in list(self.queued.values()):
            if now - task.received >= self.queue_wait:
                self.hand_back(task, "waited %.1f s for a free slot" % (now - task.received))

    # -- self-fencing: give tasks up before the main node gives them away -------

    def fence_in(self):
        """Seconds until our tasks must be killed unheard, or None."""
        if not (self.running or self.queued):
            return None
        if self.hold_until is not None:
            # A stopping main node holds them, in place of both rules below:
            # rc-reaper leaves them alone for the hold and disconnect_grace more.
            return self.hold_until - contact_clock()
        limits = []
        if self.fence_interval and self.last_renewal is not None:
            limits.append(self.last_renewal + self.fence_interval)
        if self.disconnect_fence and self.lost_at is not None:
            limits.append(self.lost_at + self.disconnect_fence)
        return min(limits) - contact_clock() if limits else None

    def check_fence(self):
        fence_in = self.fence_in()
        hold_over = self.hold_until is not None and contact_clock() >= self.hold_until
        if hold_over:                 # the main node is not back: the usual rules again
            self.hold_until = None
        if fence_in is None or fence_in > 0:
            return
        now = contact_clock()
        if hold_over:
            reason = "the main node was not back within its restart hold of %g s" \
                % self.hold_seconds
        elif self.disconnect_fence and self.lost_at is not None \
                and now - self.lost_at >= self.disconnect_fence:
            reason = "disconnected for %.1f s" % (now - self.lost_at)
        else:
            reason = "no lease renewed by the main node for %.1f s" % (now - self.last_renewal)
        # No task_result: the main node requeues these attempts on its own.
        for task in list(self.running.values()) + list(self.queued.values()):
            self.drop(task, "task_fenced", reason)
            self.fenced.add(task.key)
        self.running.clear()
        self.queued.clear()

    # -- leases in doubt: ask before starting what may have been given away -------
    # A worker frozen with its connection open (SIGSTOP, a closed lid, Android's
    # freezer) may wake to task_assign frames that waited out the freeze in its
    # socket, for attempts the main node has since given to another device.
    # After a freeze, or a silence longer than an unstarted task's lease, none
    # of the tasks it holds or receives starts until a lease_check_ack says
    # which are still its own; running ones the answer disowns are killed.
    # (Running ones whose lease ran out are fenced already: check_fence.)

    def notice_freeze(self, slept):
        """Time lost beyond what the loop meant to sleep is a freeze. A freeze
        that began as the loop went to sleep shows shorter by that sleep, at
        most half the threshold: one of 1.5 thresholds is always seen."""
        now = contact_clock()
        lost = now - self.awake_at - slept
        self.awake_at = now
        if lost > self.freeze_threshold():
            self.enter_doubt("frozen for %.1f s" % lost)

    def freeze_threshold(self):
        """Well inside the time after which the main node hands back a task
        we have not started (assignment_lease), which may be short."""
        if self.assignment_lease:
            return min(FREEZE_THRESHOLD, self.assignment_lease / 4)
        return FREEZE_THRESHOLD

    def check_silence(self):
        """A task waiting for a slot may go elsewhere once the main node has
        heard nothing from us for assignment_lease; we hear it as silence."""
        if self.assignment_lease is None or self.last_contact is None:
            return
        silence = contact_clock() - self.last_contact
        if self.doubt is None and self.queued and silence > self.assignment_lease:
            self.enter_doubt("nothing from the main node for %.1f s" % silence)

    def enter_doubt(self, reason):
        self.unconfirmed.update(self.queued)
        if self.doubt is None:
            log("warning", "leases_in_doubt", device_id=self.device_id, reason=reason,
                queued=len(self.queued), running=len(self.running))
        self.doubt = reason
        self.send_lease_check()

    def send_lease_check(self):
        """Ask which attempts are still ours; a registered connection only
        (on_register_ack asks again for a new one)."""
        if self.state != READY:
            return
        if self.checking:             # the answer on its way may be stale by now
            self.check_again = True
            return
        self.checking, self.check_again = True, False
        held = sorted(set(self.queued) | set(self.running))
        self.send(LEASE_CHECK, {"tasks": [{"task_id": key[0], "attempt": key[1]}
                                          for key in held]})

    def on_lease_check_ack(self, data):
        if not self.checking:
            return
        self.checking = False
        self.last_renewal = self.last_contact      # it renewed the running ones it confirms
        ours = task_keys(data.get("active_tasks"))
        given_away = [task for key, task in self.queued.items()
                      if key in self.unconfirmed and key not in ours]
        given_away += [task for key, task in self.running.items() if key not in ours]
        for task in given_away:
            self.queued.pop(task.key, None)
            self.running.pop(task.key, None)
            self.drop(task, "task_given_away", "the main node gave it to another device"
                      " while %s" % self.doubt)
        if self.check_again:          # frozen again since asking: ask again
            self.send_lease_check()
            return
        log("info", "leases_confirmed", device_id=self.device_id, given_away=len(given_away),
            kept=len(self.unconfirmed & set(self.queued)) + len(self.running))
        self.unconfirmed.clear()
        self.doubt = None

    def no_lease_check(self):
        """A main node older than lease_check: hand back what is in doubt
        (it requeues those still ours, uncharged) rather than guess."""
        self.checking = self.check_again = False
        for key in [key for key in self.queued if key in self.unconfirmed]:
            self.hand_back(self.queued[key], "in doubt after being %s" % self.doubt)
        self.unconfirmed.clear()
        self.doubt = None

    def startable(self):
        if self.hold_until is not None:     # held through a restart: only what runs goes on
            return []
        return [key for key in self.queued if key not in self.unconfirmed]

    def on_main_stopping(self, data):
        """A graceful stop of the main node: it holds our tasks for `hold`
        seconds (restart_hold), so they run on through its restart instead of
        stopping after disconnect_fence, and we try to reconnect each second.
        The hold counts from now, later than the main node's (which adds
        disconnect_grace). Not while our leases are in doubt: after a freeze
        or a silence this notice may have waited in the socket for longer
        than the hold."""
        hold = data.get("hold")
        if not is_number(hold) or hold <= 0 or self.doubt is not None:
            log("warning", "main_node_stopping", device_id=self.device_id, hold=0,
                reason="leases in doubt" if self.doubt is not None else "no hold")
            return
        self.hold_seconds = float(hold)
        self.hold_until = contact_clock() + self.hold_seconds
        log("info", "main_node_stopping", device_id=self.device_id, hold=self.hold_seconds,
            running=len(self.running), queued=len(self.queued))
        self.disconnect("the main node is stopping; it holds our tasks for %g s" % hold,
                        level="info")

    def on_ping(self, data):
        self.send(PONG, {})

    def drop(self, task, event, reason):
        """End a task without a result: kill what it runs, and log it."""
        task.abandon(self)
        log("warning", event, task_id=task.key[0], attempt=task.key[1],
            device_id=self.device_id, task_type=task.task_type, reason=reason)

    def silence_limit(self):
        if self.state != READY:
            return None
        return self.last_heard + SILENT_HEARTBEATS * self.heartbeat_interval + 5.0

    # -- signals: handlers only record; the loop acts --------------------------

    def install_signals(self):
        self.wakeup, wakeup_writer = socket.socketpair()
        self.wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        self.wakeup_writer = wakeup_writer          # keep it open
        signal.set_wakeup_fd(wakeup_writer.fileno())
        self.selector.register(self.wakeup, selectors.EVENT_READ, self.drain_wakeup)
        signal.signal(signal.SIGTERM, self.on_stop_signal)
        signal.signal(signal.SIGINT, self.on_stop_signal)
        # A Python handler, even one doing nothing, makes SIGCHLD write to the
        # wakeup socket, so a child's exit ends select() at once.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def on_stop_signal(self, signum, frame):
        self.stop_signal = signum

    def drain_wakeup(self, mask):
        try:
            while self.wakeup.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def shutdown(self):
        log("info", "worker_stopping", signal=self.stop_signal, running=len(self.running),
            unacknowledged=len(self.unacked))
        self.files.on_shutdown(self)        # files: checkpoints go up first
        for task in list(self.running.values()):
            self.drop(task, "task_abandoned", "the worker is stopping")
        self.running.clear()
        self.spawner.stop(self)
        self.sandbox.stop()
        if self.sock is not None:
            self.flush()
            self.sock.close()
        self.watchdog.stop()
        log("info", "worker_stopped")

    # -- the connection ----------------------------------------------------------

    def connect(self):
        host, port = self.options.join
        self.connect_at = None
        try:
            # An ASCII name as bytes spares loading the IDNA codec and its tables.
            name = host.encode("ascii") if all(ord(c) < 128 for c in host) else host
            family, kind, proto, _, address = socket.getaddrinfo(
                name, port, 0, socket.SOCK_STREAM)[0]
            sock = TcpSocket(family, kind, proto)
        except OSError as e:
            self.disconnect("cannot resolve %s: %s" % (host, e))
            return
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            sock.close()
            self.disconnect("cannot connect: %s" % os.strerror(code))
            return
        self.sock = sock
        self.state = CONNECTING
        self.auth_deadline = time.monotonic() + CONNECT_TIMEOUT + AUTH_TIMEOUT
        self.selector.register(sock, selectors.EVENT_WRITE,
                               lambda mask, sock=sock: self.on_socket(sock, mask))

    def on_socket(self, sock, mask):
        if sock is not self.sock:       # closed earlier in this turn of the loop
            return
        if self.state == CONNECTING:
            self.on_connected()
            return
        if self.state == TLS_HANDSHAKE:
            self.handshake()
            return
        if mask & selectors.EVENT_READ:
            self.receive()
        if mask & selectors.EVENT_WRITE and sock is self.sock:
            self.flush()

    def on_connected(self):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.disconnect("cannot connect: %s" % os.strerror(code))
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        log("info", "connected", main_node="%s:%d" % self.options.join,
            tls=bool(self.options.fingerprint))
        if self.options.fingerprint:
            self.start_tls()
        else:
            self.await_hello()

    def await_hello(self):
        self.state = AWAIT_HELLO
        # On a first join the look comes early: a worker started without
        # --fingerprint against a TLS main node (the default) is told so in
        # a second, not after HELLO_TIMEOUT of saying nothing. Not on a
        # reconnect: a main node slow to answer its devices after a restart
        # would get two probes from each of them on top.
        self.hello_early = not (self.silence_looked_at or self.joined())
        self.hello_deadline = time.monotonic() + (HELLO_LOOK_AFTER if self.hello_early
                                                  else HELLO_TIMEOUT)
        self.watch_socket(writing=False)

    def look_at_silence(self):
        """diagnose_silence, once until the next registration: the look
        blocks this loop for up to a few seconds, and a busy main node stays
        busy. True if it told what answers there (and the worker stops)."""
        if self.silence_looked_at:
            return False
        self.silence_looked_at = True
        diagnosis = diagnose_silence(self.options.join, bool(self.options.fingerprint))
        if diagnosis is not None:
            self.misdialled(*diagnosis)
        return diagnosis is not None

    def no_hello(self):
        early = self.state == AWAIT_HELLO and self.hello_early
        self.hello_early = False
        if self.look_at_silence():
            return
        if early:       # it told nothing: a slow main node, given the rest of HELLO_TIMEOUT
            self.hello_deadline = time.monotonic() + HELLO_TIMEOUT - HELLO_LOOK_AFTER
            return
        hint = ("; if the main node uses TLS, start this worker with --fingerprint"
                " (`rc join` on the main node prints it)") if not self.options.fingerprint else ""
        log("error", "no_hello", main_node="%s:%d" % self.options.join,
            message="the main node sent no hello within %g s of connecting%s"
            % (HELLO_TIMEOUT, hint))
        self.disconnect("no hello within %g s" % HELLO_TIMEOUT, level="error")

    # -- TLS ---------------------------------------------------------------------

    def start_tls(self):
        # A handshake that stalls (an HTTP server waiting for a request line)
        # is a silence like no hello: no_hello looks at what answers there.
        self.hello_deadline = time.monotonic() + HELLO_TIMEOUT
        self.selector.unregister(self.sock)
        self.sock = tls_socket(self.sock)
        self.selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                               lambda mask, sock=self.sock: self.on_socket(sock, mask))
        self.state = TLS_HANDSHAKE
        self.handshake()

    def handshake(self):
        """One step of the TLS handshake; once done, the pin is checked before
        a single byte of the protocol is read or written."""
        _ssl = load_ssl()
        try:
            self.sock.do_handshake()
        except _ssl.SSLWantReadError:
            self.watch_socket(writing=False)
            return
        except _ssl.SSLWantWriteError:
            self.watch_socket(writing=True)
            return
        except _ssl.SSLError as e:
            if tls_cut_short(_ssl, e):
                # rc-web hangs up on a handshake at once (its port is plain
                # HTTP), rc-server past new_connections_per_address, a link
                # that dropped: looked at as a silence is (no_hello).
                if self.look_at_silence():
                    return
                self.disconnect("TLS handshake cut short: %s" % e)
                return
            if answers_http(self.options.join):
                self.misdialled(DASHBOARD_PORT[0], DASHBOARD_PORT[1] % self.options.join)
                return
            self.misdialled("tls_failed", "TLS handshake with %s:%d failed (%s): if the main node"
                         " does not use TLS (tls is false in its etc/rc.json), start this worker"
                         " without --fingerprint" % (self.options.join + (e,)))
            return
        except OSError as e:
            self.disconnect("TLS handshake failed: %s" % e)
            return
        found = certificate_fingerprint(self.sock.getpeercert(binary_form=True) or b"")
        if not proofs_match(found, self.options.fingerprint):
            self.misdialled("fingerprint_mismatch", "the main node at %s:%d showed a certificate"
                         " with SHA-256 fingerprint %s, not the pinned %s: nothing was sent to it."
                         " If its certificate was made again, start this worker with the"
                         " --fingerprint `rc join` prints now; otherwise something else answers"
                         " at that address" % (self.options.join + (found, self.options.fingerprint)))
            return
        log("debug", "tls_established", version=self.sock.version(), fingerprint=found)
        self.await_hello()
        if self.sock.pending():       # the hello may already be decrypted and waiting
            self.receive()

    def watch_socket(self, writing):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        key = self.selector.get_key(self.sock)
        if key.events != events:
            self.selector.modify(self.sock, events, key.data)

    def disconnect(self, reason, level="warning", retry=True):
        """Close the connection (if any) and plan the next attempt (none
        when `retry` is False: the worker exits)."""
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.state = DISCONNECTED
        self.inbox = bytearray()
        self.raw_wanted = None
        self.outbox = bytearray()
        self.outbox_held = None
        self.auth_deadline = self.next_heartbeat = self.hello_deadline = None
        self.checking = self.check_again = False   # a doubt is asked again once registered
        if self.lost_at is None:
            self.lost_at = contact_clock()
        if not retry:
            self.connect_at = None
            log(level, "disconnected", reason=reason, retry_in=None)
            return
        if self.hold_until is not None:
            # Back within a second of the main node; a refusal a second is no news.
            delay, self.backoff = HOLD_RETRY * jitter(), BACKOFF_START
            level = "debug" if level == "warning" else level
        else:
            delay = self.backoff * jitter()
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.connect_at = time.monotonic() + delay
        log(level, "disconnected", reason=reason, retry_in=round(delay, 3))

    def receive(self):
        chunk = b""
        while True:
            try:
                chunk = self.sock.recv(READ_SIZE)
            except WOULD_BLOCK:
                if not chunk:
                    return
                break
            except OSError as e:
                self.disconnect("read failed: %s" % e)
                return
            if not chunk:
                self.disconnect("closed by the main node")
                return
            self.inbox += chunk
            # TLS may hold decrypted bytes that select() cannot see: take them
            # now; and read on while a frame is not ended (a task_assign with
            # small files comes in 16 KiB TLS records), not a record a turn.
            pending = getattr(self.sock, "pending", None)
            if not (pending and pending()) and (chunk.endswith(b"\n")
                                                or len(self.inbox) > MAX_FRAME_BYTES):
                break
        # Frames that waited out a freeze that began after turn() looked at
        # the clock must not count as contact before the fence is checked.
        self.notice_freeze(0.0)
        self.check_fence()
        self.last_heard = time.monotonic()
        contact = contact_clock()
        sock = self.sock
        for line, raw in self.take_frames():
            if self.state == READY:     # only a main node that proved the token counts
                self.last_contact = contact
            self.on_frame(line, raw)
            if self.sock is not sock:     # that frame ended the connection
                return

    def take_frames(self):
        """Complete frames off the front of the inbox as (line, raw bytes or
        None): a task_assign with small files is followed by their bytes
        (its "inline_bytes"), and waits for them. An over-long line ends the link."""
        frames = []
        while True:
            if self.raw_wanted is not None:
                line, size = self.raw_wanted
                if len(self.inbox) < size:
                    break
                with memoryview(self.inbox) as inbox:   # one copy, not a slice's and its bytes'
                    frames.append((line, inbox[:size].tobytes()))
                del self.inbox[:size]
                self.raw_wanted = None
                continue
            end = self.inbox.find(b"\n")
            if end < 0 or end > MAX_FRAME_BYTES:
                if end > MAX_FRAME_BYTES or len(self.inbox) > MAX_FRAME_BYTES:
                    self.send(ERROR, {"code": "frame_too_large", "message":
                                      "frame over the %d byte limit" % MAX_FRAME_BYTES})
                    self.flush()
                    self.disconnect("the main node sent a frame over %d bytes"
                                    % MAX_FRAME_BYTES)
                    return []
                break
            line = bytes(self.inbox[:end])
            del self.inbox[:end + 1]
            size = announced_bytes(line)
            if size:
                self.raw_wanted = (line, size)
            else:
                frames.append((line, None))
        return frames

    def send(self, message_type, data):
        if self.sock is not None:
            if message_type != TASK_ACCEPT:
                self.outbox_held = None
            elif not self.outbox:
                self.outbox_held = time.monotonic() + ACCEPT_HOLD
            self.outbox += encode_frame(message_type, data, self.device_id)

    def tell(self, message_type, data):
        """Send only on a registered connection; task news waits for the next one."""
        if self.state == READY:
            self.send(message_type, data)

    def flush(self):
        if self.sock is None or self.state in (CONNECTING, TLS_HANDSHAKE):
            return
        if self.outbox_held is not None:
            if time.monotonic() < self.outbox_held:
                return        # accepts only: they wait a moment for company
            self.outbox_held = None
        try:
            sent = self.sock.send(self.outbox) if self.outbox else 0
        except WOULD_BLOCK:
            sent = 0
        except OSError as e:
            self.disconnect("write failed: %s" % e)
            return
        del self.outbox[:sent]
        self.watch_socket(writing=bool(self.outbox))

    # -- frames --------------------------------------------------------------------

    def on_frame(self, line, raw=None):
        self.inline_raw = raw        # the small files behind a task_assign (on_task_assign)
        try:
            envelope = loads(line)
        except ValueError:
            envelope = None
        if (not isinstance(envelope, dict) or not isinstance(envelope.get("message_type"), str)
                or not isinstance(envelope.get("data", {}), dict)):
            log("warning", "bad_frame", frame=line[:200].decode("utf-8", "replace"))
            self.send(ERROR, {"code": "bad_frame", "message": "not a JSON envelope"})
            return
        kind, data = envelope["message_type"], envelope.get("data", {})
        if kind == ERROR:
            self.on_error(data)
        elif self.state == AWAIT_HELLO and kind == HELLO:
            self.on_hello(data)
        elif self.state == AWAIT_ACK and kind == REGISTER_ACK:
            self.on_register_ack(data)
        elif self.state != READY:
            # Above all, no task_assign before the main node has proved the token.
            self.disconnect("%s before registration" % kind[:50], level="error")
        elif kind in self.HANDLERS:
            self.HANDLERS[kind](self, data)
        else:
            log("debug", "frame_ignored", message_type=kind[:50])

    def on_error(self, data):
        # Read before anything is proved (from whatever answers at the main
        # node's address): a code that is not text is none, never a lookup.
        code, message = data.get("code"), data.get("message")
        code = code if isinstance(code, str) else None
        if code == "auth_failed":
            self.refused_proof(message)
        elif code == "unknown_device" and self.auth == "device":
            # The main node lost our secret (a new database?): join again as new.
            # The secret stays until that join gives a new one: whoever answers
            # at the main node's address can say this, with TLS off.
            self.join_with_token = True
            self.backoff = BACKOFF_START
            log("warning", "device_secret_unknown", detail=message, message="the main node"
                " holds no secret for %s: joining again with the join token" % self.device_id)
        elif code in REFUSED_FOR_GOOD:
            self.refused_for_good(code, REFUSED_FOR_GOOD[code] % {
                "id": self.device_id, "path": self.identity.path(self.cluster_id)
                or os.path.join(self.identity.state_dir, "CLUSTER", self.device_id + ".secret")})
        elif code == "unknown_message" and self.checking and LEASE_CHECK in str(message):
            self.no_lease_check()
        elif code == "stale_result":
            log("info", "stale_result", task_id=data.get("task_id"),
                attempt=data.get("attempt"), message=message)
        else:
            log("error" if self.state != READY else "warning", "error_from_main_node",
                code=code, message=message)

    def refused_proof(self, detail):
        """auth_failed: say which proof was refused and what to check, then
        hang up ourselves (the main node's close after it read as a TLS or
        socket fault: `read failed: [SSL] unexpected eof`) and try again."""
        if self.auth == "device":
            log("error", "auth_failed", detail=detail, message="the main node refused this"
                " device's secret (%s); if the device was reset there, delete that file to"
                " join again with the join token" % self.identity.path(self.cluster_id))
        else:
            log("error", "auth_failed", message="wrong join token: the main node refused"
                " this worker's proof; check %s against `rc token` there (after `rc token"
                " --rotate` only devices that joined before come in with the old one)"
                % getattr(self.options, "token_from", "--token"), detail=detail)
        self.disconnect("auth_failed", level="info")

    def on_hello(self, data):
        server_nonce = data.get("nonce")
        if not isinstance(server_nonce, str) or not server_nonce:
            self.disconnect("hello without a nonce", level="error")
            return
        if data.get("protocol") != PROTOCOL_VERSION:
            log("warning", "protocol_mismatch", ours=PROTOCOL_VERSION,
                theirs=data.get("protocol"))
        self.hello_deadline = None
        self.nonces = (server_nonce, new_nonce())
        # Our own secret for this cluster once we have one; the join token until then.
        # Not proved yet: a cluster_id that is not text is none (it names a file).
        cluster_id = data.get("cluster_id")
        self.cluster_id = cluster_id if isinstance(cluster_id, str) else None
        secret = None if self.join_with_token else self.identity.secret(self.cluster_id)
        self.join_with_token = False
        self.auth, self.key = ("device", secret) if secret else ("token", self.options.token)
        register = self.profile()
        register.update(device_id=self.device_id, protocol=PROTOCOL_VERSION,
                        nonce=self.nonces[1], active_tasks=self.active_tasks(),
                        fenced_tasks=self.tell_fenced(), auth=self.auth, inline_files=True,
                        restart_hold=True,
                        proof=sign(self.key, "rc-worker", self.nonces[0], self.nonces[1],
                                   self.device_id))
        self.send(REGISTER, register)
        self.state = AWAIT_ACK

    def on_register_ack(self, data):
        expected = sign(self.key, "rc-server", self.nonces[0], self.nonces[1], self.device_id)
        what = "the join token" if self.auth == "token" else "this device's secret"
        if not proofs_match(expected, data.get("proof")):
            log("error", "server_proof_wrong", message="the main node did not prove it"
                " knows %s; none of its tasks will run" % what)
            self.disconnect("main node failed to prove %s" % what, level="error")
            return
        if self.auth == "token" and data.get("device_secret") is not None:
            self.keep_secret(data["device_secret"])
        self.files.on_register(self, data)      # files: where rc-files is
        interval = data.get("heartbeat_interval")
        if is_number(interval) and interval > 0:
            self.heartbeat_interval = float(interval)
        # Kept through later disconnections; a main node that sends none wants no fencing.
        self.fence_interval = positive_or_none(data.get("fence_interval"))
        self.disconnect_fence = positive_or_none(data.get("disconnect_fence"))
        self.queue_wait = positive_or_none(data.get("queue_wait"))
        self.assignment_lease = positive_or_none(data.get("assignment_lease"))
        self.logs_accepted = data.get("device_logs") is True    # older main nodes: False
        self.last_contact = self.last_renewal = contact_clock()
        self.lost_at = self.hold_until = None
        self.fenced_known()
        self.state = READY
        self.auth_deadline = None
        self.silence_looked_at = False
        self.registered_once = True
        self.backoff = BACKOFF_START
        log("info", "registered", device_id=self.device_id, main_node="%s:%d" % self.options.join,
            slots=self.options.slots, resending=len(self.unacked),
            active_tasks=len(self.running) + len(self.queued),
            heartbeat_interval=self.heartbeat_interval, fence_interval=self.fence_interval,
            disconnect_fence=self.disconnect_fence)
        for result in self.unacked.values():
            if self.files.inline is None and result.get("files_inline"):
                self.files.drop_inline(result)    # this main node would read them as frames
            self.send(TASK_RESULT, result)
        self.send_heartbeat()     # metrics for the dashboard now, not in a minute
        if self.doubt is not None:
            self.send_lease_check()

    def keep_secret(self, sealed):
        """The secret the main node made for us on a join with the token."""
        if not is_hex(sealed, 64):
            log("warning", "device_secret_malformed", message="register_ack carried a"
                " device_secret that is not 64 hex digits; it is not kept")
            return
        secret = unseal(self.options.token, self.nonces[0], self.nonces[1], self.device_id,
                        sealed)
        self.files.secret = secret      # files: rc-files takes this device's own proof
        try:
            path = self.identity.keep(self.cluster_id, secret)
        except OSError as e:
            self.identity.unfiled[self.cluster_id] = secret    # reconnecting still works
            log("error", "device_secret_not_kept", error=str(e), message="cannot store this"
                " device's secret under %s: it is kept in memory, and once this worker stops"
                " the main node refuses %s (device_id_taken); make room there, or restart"
                " with --state-dir a directory this user can write"
                % (self.identity.state_dir, self.device_id))
            return
        if path is None:
            log("warning", "device_secret_not_kept", message="the main node named no usable"
                " cluster_id in its hello; the secret cannot be filed")
        else:
            log("info", "device_secret_stored", path=path)

    def refused_for_good(self, event, message):
        """Believed (exit 3) over pinned TLS, or on a first join; without TLS
        nothing proves who said it, so a device that has joined keeps trying:
        else anyone answering at the main node's address could stop them all."""
        if self.options.fingerprint or not self.joined():
            self.give_up(event, message)
            return
        log("error", event, device_id=self.device_id, message=message + "; unproven without"
            " TLS (no --fingerprint), so this device keeps trying")
        self.disconnect(event, level="info")

    def joined(self):
        """Whether this device's settings have worked: registered now or before."""
        return self.registered_once or self.identity.joined_before()

    def misdialled(self, event, message):
        """What answers at the main node's address is not the main node
        (HTTP, TLS without a pin, another certificate). On a first join that
        is this worker's settings: exit, saying which. A device that has
        joined before had them right, so the address changed hands (a
        stranger on the LAN, a rebooting box): it keeps trying, or whoever
        answers there once would stop every worker for good."""
        if not self.joined():
            self.give_up(event, message)
            return
        log("error", event, device_id=self.device_id, message=message + "; this device has"
            " joined this cluster before, so it keeps trying")
        self.disconnect(event, level="info")

    def give_up(self, event, message):
        """A refusal that trying again cannot mend: say what to do, and exit."""
        log("error", event, device_id=self.device_id, message=message)
        self.disconnect(event, level="info", retry=False)
        self.exit_status = EXIT_REFUSED

    def on_task_assign(self, data):
        key = task_key(data)
        if key is None:
            self.send(ERROR, {"code": "bad_request",
                              "message": "task_assign needs integer task_id and attempt"})
            return
        if key in self.running or key in self.queued:
            log("debug", "duplicate_assign", task_id=key[0], attempt=key[1])
            return
        if key in self.unacked:       # our result was lost on the way
            self.send(TASK_RESULT, self.unacked[key])
            return
        task_type = data.get("task_type")
        if task_type not in self.options.task_types:
            self.report(result_data(key, OUTCOME_NOT_ALLOWED,
                                    error="this worker does not accept %r tasks" % task_type))
            return
        if self.inline_raw is not None:      # files: small inputs, into the cache
            self.files.take_inline(data.get("files_inline"), self.inline_raw)
        timeout = data.get("timeout")
        timeout = min(float(timeout), LONGEST_TIMEOUT) if is_number(timeout) and timeout > 0 \
            else None
        task = TASK_CLASSES[task_type](key, data.get("payload"), timeout)
        if not self.availability.available and task_type not in INSTANT_TASK_TYPES:
            self.hand_back(task)      # assigned before our last heartbeat arrived
            return
        self.queued[key] = task
        if self.doubt is not None:    # it may have waited out the freeze in our socket
            self.unconfirmed.add(key)

    def on_task_cancel(self, data):
        key = task_key(data)
        if key in self.queued:
            self.finish(self.queued.pop(key), OUTCOME_CANCELLED, error="cancelled")
        elif key in self.running:
            self.running[key].stop(self, OUTCOME_CANCELLED)
        else:
            log("info", "cancel_ignored", task_id=key and key[0], attempt=key and key[1],
                reason="not running here" if key else "no integer task_id and attempt")

    def on_task_watch(self, data):
        """Someone on the main node wants a running task's output as it
        comes (`rc tail`): its task_output frames, for `seconds`."""
        task = self.running.get(task_key(data))
        seconds = data.get("seconds")
        if task is not None and is_number(seconds) and hasattr(task, "watch"):
            task.watch(float(seconds))

    def on_task_result_ack(self, data):
        key = task_key(data)
        if self.unacked.pop(key, None) is not None:
            log("debug", "result_acknowledged", task_id=key[0], attempt=key[1])

    def on_heartbeat_ack(self, data):
        # Hearing it is the point (see silence_limit); it also means the
        # heartbeat, and the fenced tasks it listed, are on record, and the
        # leases of the tasks it listed renewed.
        self.last_renewal = self.last_contact
        self.fenced_known()

    def tell_fenced(self):
        """Fenced tasks for the next register or heartbeat: the main node
        requeues them without blaming the task."""
        self.fenced_told = set(self.fenced)
        return [{"task_id": key[0], "attempt": key[1]} for key in sorted(self.fenced_told)]

    def fenced_known(self):
        self.fenced -= self.fenced_told
        self.fenced_told = set()

    # -- control messages from `rc broadcast` -------------------------------------

    def on_control(self, data):
        control_id, command = data.get("control_id"), data.get("command")
        if not is_int(control_id):
            self.send(ERROR, {"code": "bad_request", "message": "control needs an integer"
                              " control_id"})
            return
        action = self.CONTROLS.get(command) if isinstance(command, str) else None
        if action is None:
            ok, detail, then = False, ("unknown command %r" % (command,))[:200], None
        else:
            ok, detail, then = action(self, data)
        self.send(CONTROL_ACK, {"control_id": control_id, "ok": ok, "detail": detail})
        log("info" if ok else "warning", "control", control_id=control_id,
            command=str(command)[:50], ok=ok, detail=detail)
        if then is not None:       # after the answer: it may end this connection
            then()

    def control_reload(self, data):
        """Read --config again and apply what can change while running."""
        if not self.options.config:
            return True, "nothing to reload (started without --config)", None
        load_region("options")
        try:
            fresh = parse_args(self.options.argv, reloading=True)
        except ReloadError as e:
            return False, "cannot reload %s: %s" % (self.options.config, e), None
        changed = [name for name in RELOADABLE
                   if getattr(fresh, name) != getattr(self.options, name)]
        stuck = [name for name in NEEDS_RESTART
                 if getattr(fresh, name) != getattr(self.options, name)]
        for name in changed:
            setattr(self.options, name, getattr(fresh, name))
        global log_threshold
        log_threshold = LOG_LEVELS[self.options.log_level]
        self.availability.options_changed()
        self.next_policy_check = time.monotonic()      # the new rules apply now
        detail = "changed: %s" % ", ".join(changed) if changed else "nothing changed"
        then = None
        if set(changed) & set(PROFILE_OPTIONS):
            detail += "; registering again with the new profile"
            then = lambda: self.reconnect("profile changed by reload")
        if stuck:
            detail += "; needs a restart: %s" % ", ".join(stuck)
        return True, detail, then

    def control_report_profile(self, data):
        """The main node takes a profile with register only: measure again
        and register again on a new connection (running tasks carry on)."""
        self.speed = cpu_speed()
        return True, "profile measured again; registering again", lambda: self.reconnect(
            "report_profile")

    def control_drain(self, data):
        self.hold("drained by the main node (rc broadcast drain); restart the worker to undo")
        return True, "draining: no new tasks; %d running will finish" % len(self.running), None

    def control_upgrade(self, data):
        load_region("upgrade")
        announced = data.get("sha256") if isinstance(data.get("sha256"), str) else None
        # Up to date, allowed or not: the main node's own worker (no --allow-upgrade)
        # and a device given the new file by hand are not failures in `rc control`.
        # A file put in place after this worker started is not what it runs, though.
        fresh = file_stamp(WORKER_FILE) == STARTED_FROM
        late = "%s is the served worker.py, put there after this worker started" % WORKER_FILE
        if announced and is_own_file(announced):
            if fresh:
                return True, "already the served worker.py; nothing to do", None
            if not self.options.allow_upgrade:
                return False, late + ": restart the worker to run it", None
            return True, self.restart_for_upgrade(late), None
        if not self.options.allow_upgrade:
            return False, "upgrade not allowed on this device (start with --allow-upgrade)", None
        try:
            source = fetch_worker(self.options.join[0], self.options.web_port, announced)
            replaced = replace_worker_file(source)
        except UpgradeError as e:
            return False, str(e), None
        if not replaced and fresh:
            return True, "already the served worker.py; nothing to do", None
        return True, self.restart_for_upgrade(
            "%s replaced (%d bytes)" % (WORKER_FILE, len(source)) if replaced else late), None

    def restart_for_upgrade(self, what):
        """Run the new file once the running tasks end; what to acknowledge."""
        self.hold("restarting for an upgrade")
        self.restart_pending = True
        busy = len(self.running) + len(self.queued)
        return "%s; restarting %s" % (what, "once %d tasks finish" % busy if busy else "now")

    CONTROLS = {"reload": control_reload, "report_profile": control_report_profile,
                "drain": control_drain, "upgrade": control_upgrade}

    def hold(self, reason):
        """No new tasks, at the main node's request; running ones finish."""
        self.availability.hold = reason
        self.next_policy_check = time.monotonic()      # tell the scheduler now

    def send_now(self):
        """Write what is queued for the main node, waiting a little if need be
        (before a reconnect or a re-exec)."""
        if self.sock is None or not self.outbox or self.state in (CONNECTING, TLS_HANDSHAKE):
            return
        try:
            self.sock.settimeout(FLUSH_TIMEOUT)
            self.sock.sendall(self.outbox)
        except OSError as e:
            log("warning", "flush_failed", error=str(e))
        self.outbox = bytearray()

    def reconnect(self, reason):
        """Register again at once: the main node reads a profile only then."""
        self.send_now()
        self.disconnect(reason, level="info")
        self.backoff = BACKOFF_START
        self.connect_at = time.monotonic()

    def restart(self, reason="upgrade", level="info"):
        """Run worker.py anew in this process (same pid, same arguments)."""
        argv = restart_argv()
        log(level, "worker_restarting", reason=reason, argv=argv)
        self.send_now()
        self.shutdown()
        if self.stop_signal is not None:    # told to stop meanwhile: the new one would not know
            sys.exit(0)
        try:
            os.execv(sys.executable, argv)
        except OSError as e:      # the new file is in place: a supervisor starts it
            log("error", "restart_failed", error=str(e))
            sys.exit(1)

    # -- what the main node sees beyond heartbeats ------------------------------------

    def forward_logs(self):
        """Our warnings, errors and task events, to a main node that takes them."""
        if self.state == READY and self.logs_accepted and (log_forwarder.pending
                                                            or log_forwarder.dropped):
            lines = log_forwarder.take()
            if lines:
                self.send(DEVICE_LOG, {"lines": lines})

    def on_watch(self, data):
        """Someone watches this device: heartbeats (with the figures) every
        `interval` seconds for `seconds`, then every heartbeat_interval again,
        whether or not the main node says more."""
        interval, seconds = data.get("interval"), data.get("seconds")
        if not (is_number(interval) and is_number(seconds)):
            self.send(ERROR, {"code": "bad_request",
                              "message": "watch needs numbers interval and seconds"})
            return
        now = time.monotonic()
        self.watch_interval = max(WATCH_MIN_INTERVAL, float(interval))
        self.watched_until = now + min(max(0.0, float(seconds)), WATCH_MAX_SECONDS)
        self.next_heartbeat = min(self.next_heartbeat, now + self.report_interval())
        log("debug", "watched", interval=self.watch_interval, seconds=seconds)

    def report_interval(self):
        """Seconds to the next heartbeat: sooner while someone watches."""
        if self.watched_until is not None and time.monotonic() < self.watched_until:
            return min(self.watch_interval, self.heartbeat_interval)
        return self.heartbeat_interval

    HANDLERS = {TASK_ASSIGN: on_task_assign, TASK_CANCEL: on_task_cancel,
                TASK_RESULT_ACK: on_task_result_ack, HEARTBEAT_ACK: on_heartbeat_ack,
                CONTROL: on_control, PING: on_ping, LEASE_CHECK_ACK: on_lease_check_ack,
                WATCH: on_watch, MAIN_STOPPING: on_main_stopping, TASK_WATCH: on_task_watch}

    # -- tasks ---------------------------------------------------------------------

    def start_queued(self):
        # Instant tasks take no slot: they are done before the next line runs.
        self.start_ready(instant=True)
        if not self.availability.available:
            for task in list(self.queued.values()):
                self.hand_back(task)
        self.start_ready(instant=False)

    def start_ready(self, instant):
        for key in self.startable():
            if (self.queued[key].task_type in INSTANT_TASK_TYPES) != instant:
                continue
            if not instant and self.slots_taken() >= self.options.slots:
                break
            # Before every start, not only once a turn: a freeze or a silence
            # may have put what we hold in doubt (see enter_doubt).
            self.notice_freeze(0.0)
            self.check_silence()
            if key not in self.unconfirmed:
                self.start_task(key, self.queued.pop(key))

    def slots_taken(self):
        """Running tasks that hold a slot. An Uploading does not: its process
        has ended, and the next task runs while rc-files stores its files
        (the main node still counts it: slots and prefetch bound them)."""
        return sum(not isinstance(task, Uploading) for task in self.running.values())

    def start_task(self, key, task):
        self.running[key] = task
        task.started = time.monotonic()
        if task.timeout:
            task.deadline = task.started + task.timeout
        if task.task_type not in INSTANT_TASK_TYPES:    # their result says it all
            self.tell(TASK_ACCEPT, {"task_id": key[0], "attempt": key[1]})
        log(self.task_log_level(task), "task_started", task_id=key[0], attempt=key[1],
            device_id=self.device_id, task_type=task.task_type)
        try:
            if not self.files.stage(self, task):   # files: inputs first (see Staging)
                task.start(self)
        except BadPayload as e:
            self.finish(task, OUTCOME_FAILED, error=str(e), device_fault=e.device_fault)

    def finish(self, task, status, error=None, **result):
        if self.files.upload_first(self, task, status, error, result):   # files: see Uploading
            return
        self.running.pop(task.key, None)
        data = result_data(task.key, status, error, execution_time=task.elapsed(), **result)
        self.files.annotate(task, data)     # files: what rc-files stored
        self.report(fit_result(data, self.device_id))
        log(self.task_log_level(task, status), "task_finished", task_id=task.key[0],
            attempt=task.key[1], device_id=self.device_id, task_type=task.task_type,
            status=status, error=error, execution_time=data["result"]["execution_time"])

    def task_log_level(self, task, status=OUTCOME_COMPLETED):
        if status in (OUTCOME_FAILED, OUTCOME_TIMED_OUT):
            return "warning"      # also what the main node shows of this device (device_log)
        quiet = task.quiet and status == OUTCOME_COMPLETED and not self.options.log_tasks
        return "debug" if quiet else "info"

    def report(self, data):
        """Send a task_result, and keep it until the main node acknowledges it."""
        key = (data["task_id"], data["attempt"])
        self.unacked[key] = data
        self.tell(TASK_RESULT, data)
        if data["status"] == OUTCOME_NOT_ALLOWED:
            log("info", "task_not_allowed", task_id=key[0], attempt=key[1], error=data["error"])

    def active_tasks(self):
        keys = list(self.running) + list(self.queued)
        return [{"task_id": key[0], "attempt": key[1]} for key in keys]

    def send_heartbeat(self):
        self.next_heartbeat = time.monotonic() + self.report_interval()
        busy = self.running or self.queued
        # dict(..., **files) rather than {**files}: this file parses under 2.7 (see the top).
        self.send(HEARTBEAT, dict({"system_metrics": self.metrics.sample(),
                                   "status": "busy" if busy else "idle",
                                   "active_tasks": self.active_tasks(),
                                   "fenced_tasks": self.tell_fenced(),
                                   "availability": self.availability.report()},
                                  **self.files.heartbeat()))     # files: cached_files

    def profile(self):
        """What register says about this device (and system_info reports)."""
        info, specs = device_info(), hardware_specs(self.power, self.speed)
        return {"device_info": info, "hardware_specs": specs,
                "capabilities": capabilities(), "task_types": list(self.options.task_types),
                "tags": list(self.options.tags),
                "role": self.options.role or guess_role(info["platform"], specs.get("disk_gb")),
                "slots": self.options.slots, "availability": self.availability.report()}

    # -- a good guest: the availability policy --------------------------------------

    def check_availability(self):
        self.next_policy_check = time.monotonic() + self.options.policy_interval
        sessions = {task.proc.pid for task in self.running.values()
                    if getattr(task, "proc", None) is not None}
        if not self.availability.check(own_cpu_seconds(sessions)
                                       if self.availability.owner else 0.0):
            return
        available, reason = self.availability.available, self.availability.reason
        log("info" if available else "warning", "availability_changed",
            device_id=self.device_id, available=available, reason=reason)
        if self.state == READY:
            self.send_heartbeat()    # the scheduler must know now, not in a minute
        if available:
            return
        for task in list(self.queued.values()):
            self.hand_back(task)
        # A hold from the main node (drain, upgrade) lets running tasks finish.
        if self.options.on_unavailable == "hand-back" and self.availability.owner_stopped:
            for task in list(self.running.values()):
                self.hand_back(task)

    def hand_back(self, task, why=None):
        """Give a task back without running it to the end: the main node
        queues it again, uncharged, for another device."""
        self.queued.pop(task.key, None)
        if task.key in self.running:
            self.files.keep_for_hand_back(task)     # files: its checkpoint goes up first
            task.abandon(self)
        self.finish(task, OUTCOME_HANDED_BACK,
                    error=why or self.availability.reason or "unavailable")


###############################################################################
# Self-test: every task type, locally, without a main node ####################
###############################################################################

SELF_TEST = (("echo", {"message": "hello"}, "hello"),
             ("sleep", {"seconds": 0.1}, ""),
             ("system_info", {}, None),
             ("python_eval", {"expression": "6 * 7"}, "42"),
             ("python_exec", {"code": "print('ok')"}, "ok\n"),
             ("shell", {"command": "echo ok"}, "ok\n"))


# >>> Region "self_test": the worker process loads it on first use (load_region).

def self_test(worker):
    import json as pretty
    worker.connect_at = None    # a --join given (or in --config) is not dialled: no main node
    worker.install_signals()
    worker.check_availability()
    found = worker.profile()
    found["system_metrics"] = worker.metrics.sample()
    found["limits"] = {"max_memory_mb": worker.options.max_memory or None,
                       "max_file_size_mb": worker.options.max_file_size or None,
                       "open_files": TASK_OPEN_FILES}
    found["cache"] = worker.files.report()      # files
    print(pretty.dumps(found, indent=2, sort_keys=True))
    worker.sandbox.prepare(worker)
    print_sandbox(worker.sandbox)
    problem = worker.identity.prepare()
    print("state dir:      %s" % worker.identity.state_dir
          + (" UNUSABLE (%s): %s" % (problem, STATE_DIR_UNUSABLE) if problem else ""))
    print("device id:      %s" % worker.device_id)      # the one it joins as (--device-id)
    # Whatever the owner's rules say now, the point is whether tasks can run here.
    worker.availability.available, worker.next_policy_check = True, float("inf")
    for number, (task_type, payload, _) in enumerate(SELF_TEST, 1):
        worker.on_task_assign({"task_id": number, "attempt": 1, "task_type": task_type,
                               "payload": payload, "timeout": 30})
    give_up = time.monotonic() + 60
    while (worker.queued or worker.running) and time.monotonic() < give_up:
        worker.turn()
    failures = 0
    for number, (task_type, _, expected) in enumerate(SELF_TEST, 1):
        data = worker.unacked.get((number, 1), {"status": "no result", "result": {}})
        wanted = OUTCOME_COMPLETED if task_type in worker.options.task_types \
            else OUTCOME_NOT_ALLOWED
        ok = data["status"] == wanted and (wanted != OUTCOME_COMPLETED or expected is None
                                           or data["result"]["output"] == expected)
        failures += not ok
        print("%-12s %-12s %s" % (task_type, data["status"], "ok" if ok else
                                  "FAILED: %r" % (data.get("error") or data["result"],)))
    worker.shutdown()
    return 1 if failures or problem else 0


def print_sandbox(sandbox):
    """What keeps a task from the worker's secrets and from other tasks, here."""
    print("task user:      %s" % sandbox.describe_user())
    isolation = sandbox.describe_isolation()
    if isolation == "none":
        why_not = isolation_works()
        pid_why_not = pid_namespace_works() if why_not is None else None
        isolation = "none" + (" (user namespaces work here: --isolate would hide the state"
                              " dir and the home directory%s)" % (
                                  ", and give each task a PID namespace" if pid_why_not is None
                                  else "; %s" % pid_why_not) if why_not is None
                              else ": %s" % why_not)
        if not sandbox.user_name:
            isolation += "; tasks can read files of the worker's user"
    print("task isolation: %s" % isolation)
    print("task tracking:  %s" % sandbox.tracking)
    environment, withheld = sandbox.environment(withheld=True)
    print("task env:       %s%s" % (" ".join(sorted(environment)), "; withheld (a password in"
                                    " a URL): %s" % " ".join(withheld) if withheld else ""))
    for note in sandbox.options.sandbox_notes + [sandbox.python_note]:
        if note:
            print("note:           %s" % note)


# <<< The end of region "self_test".


###############################################################################
# Command line ################################################################
###############################################################################

# What `reload` (a control message) may change in a running worker; the
# profile ones are sent by registering again.
RELOADABLE = ("task_types", "tags", "role", "slots", "max_memory", "max_file_size",
              "checkpoint_every",
              "output_cap", "only_when_charging", "min_battery", "resume_battery",
              "max_temperature", "idle_minutes", "quiet_hours", "on_unavailable",
              "policy_interval", "log_level", "log_tasks")
PROFILE_OPTIONS = ("task_types", "tags", "role", "slots")
NEEDS_RESTART = ("join", "device_id", "token_file", "fingerprint", "state_dir", "web_port",
                 "task_user", "isolate", "isolate_network", "hide", "read_only",
                 "allow_upgrade", "pass_env")


class ReloadError(Exception):
    """--config, read again, does not parse; the message says why."""


# >>> Region "options": the worker process loads it on first use (load_region).

def join_address(text):
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    import argparse
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, DEFAULT_PORT
    try:
        port = int(port)
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536:
        raise argparse.ArgumentTypeError("expected HOST or HOST:PORT, got %r" % text)
    return host, port


def number_type(kind, fits, wanted):
    """An argparse type: `kind(text)` when fits() it, else a clear error."""
    import argparse

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not fits(value):     # NaN fits nothing
            raise argparse.ArgumentTypeError("must be %s, got %r" % (wanted, text))
        return value
    return check


def positive(kind):
    return number_type(kind, lambda value: value > 0, "a number above 0")


def default_device_id(state_dir):
    """The host name; where that names no machine (Android calls every phone
    localhost: the second phone of a drawer was refused, device_id_taken), an
    id made once and kept in the state directory, `android-3fa2c1`. A device
    that joined as localhost before (its secret is there) stays localhost."""
    import glob
    import re
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    state_dir = os.path.expanduser(state_dir)
    if name.lower() not in PLACEHOLDER_HOSTNAMES or glob.glob(
            os.path.join(glob.escape(state_dir), "*", glob.escape(name) + ".secret")):
        return name or "worker"
    path = os.path.join(state_dir, "device_id")
    try:
        with open(path, "rb") as f:
            # bytes: a damaged file, not text, raised UnicodeDecodeError
            # and the worker never started (a phone's boot loop, for good)
            kept = f.read(256).decode("ascii", "replace").strip()
        if re.match(r"[A-Za-z0-9._-]{1,64}\Z", kept):
            return kept
    except OSError:
        pass
    made = "%s-%s" % (re.sub(r"[^a-z0-9]", "", device_platform().lower())[:16] or "device",
                      os.urandom(3).hex())
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        with open(path + ".new", "w") as f:
            f.write(made + "\n")
        os.replace(path + ".new", path)
    except OSError:
        pass        # the worker says why it cannot use the state directory
    return made


def not_negative(kind):
    return number_type(kind, lambda value: value >= 0, "a number, at least 0")


def percent(text):
    value = not_negative(float)(text)
    if value > 100:
        import argparse
        raise argparse.ArgumentTypeError("must be a percentage from 0 to 100, got %r" % text)
    return value


def passed_variable(name):
    """--pass-env NAME: a variable's name, not one of the worker's RC_ ones."""
    import argparse
    if not name or not set(name) <= ENV_NAME_CHARACTERS or name[0].isdigit():
        raise argparse.ArgumentTypeError("expected a variable's name ([A-Za-z_][A-Za-z0-9_]*),"
                                         " got %r" % name)
    if name.upper().startswith("RC_"):
        raise argparse.ArgumentTypeError("%s: RC_ variables are the worker's own" % name)
    return name


def hours_window(text):
    """HH:MM-HH:MM as (start, end) minutes after midnight; it may span midnight."""
    import argparse
    import re
    match = re.match(r"(\d{1,2}):(\d\d)-(\d{1,2}):(\d\d)\Z", text.strip())
    numbers = [int(x) for x in match.groups()] if match else [99, 0, 0, 0]
    if numbers[0] > 23 or numbers[2] > 23 or numbers[1] > 59 or numbers[3] > 59:
        raise argparse.ArgumentTypeError("expected HH:MM-HH:MM, got %r" % text)
    return numbers[0] * 60 + numbers[1], numbers[2] * 60 + numbers[3]


def default_max_memory():
    """MiB of address space per task: half the RAM, and at least MIN_MEMORY_MB."""
    gb = memory_gb() or 0
    return max(MIN_MEMORY_MB, int(gb * 1024 / 2))


def config_arguments(parser, argv):
    """--config FILE: a JSON object whose keys are the long options ("min_battery":
    20, "only_when_charging": true, "tag": ["a", "b"]), turned into arguments
    that go before the command line's, so that the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    for number, argument in enumerate(argv):
        if argument == "--config" and number + 1 < len(argv):
            path = argv[number + 1]
        elif argument.startswith("--config="):
            path = argument.split("=", 1)[1]
    if path is None:
        return argv
    import json as config_json
    try:
        with open(os.path.expanduser(path)) as f:
            settings = config_json.load(f)
    except (OSError, ValueError) as e:
        parser.error("cannot read --config %s: %s" % (path, e))
    if not isinstance(settings, dict):
        parser.error("--config %s must hold one JSON object" % path)
    arguments = []
    for key, value in settings.items():
        option = "--" + key.replace("_", "-")
        if option not in parser._option_string_actions or option == "--config":
            meant = near_option(parser, [option])
            parser.error("--config %s: unknown setting %r%s" % (
                path, key, meant and " (did you mean %r?)" % meant[2:].replace("-", "_")))
        for value in (value if isinstance(value, list) else [value]):
            if value is True:
                arguments.append(option)
            elif value not in (False, None):
                arguments.extend([option, str(value)])
    return arguments + argv


def near_option(parser, words):
    """The long option the first of `words` that is one nearly names
    (`--min-batery`: `--min-battery`), else "": argparse says only that
    it does not know the word."""
    import difflib      # only on this error's path
    known = sorted(option for option in parser._option_string_actions
                   if option.startswith("--") and option != "--config")
    for word in words:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, 1, 0.8)
            return close[0] if close else ""
    return ""


def help_formatter(prog):
    """argparse's formatter, told the width: left to find it out, it loads
    shutil and the compressors shutil imports, half a megabyte an idle worker
    would carry for good."""
    import argparse
    try:
        width = int(os.environ.get("COLUMNS") or os.get_terminal_size(2).columns)
    except (ValueError, OSError):
        width = 80
    return argparse.HelpFormatter(prog, width=width - 2)


def parse_args(argv=None, reloading=False, read_token=True):
    """The options; with reloading (see Worker.control_reload), errors raise
    ReloadError instead of exiting, and the token is not read again; without
    read_token it is left to received_options (see start)."""
    import argparse
    import re
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Join this device to a Retire-Cluster main node.",
        formatter_class=help_formatter)
    if reloading:
        def fail(message):
            raise ReloadError(message)
        parser.error = fail
    parser.add_argument("--config", metavar="FILE", help="a JSON file of these options"
                        " (e.g. {\"min_battery\": 30}); the command line wins")
    parser.add_argument("--join", metavar="HOST[:PORT]", type=join_address,
                        help="the main node (port %d by default)" % DEFAULT_PORT)
    parser.add_argument("--token", help="the join token (`rc token` on the main node);"
                        " write --token=TOKEN for one that begins with -")
    parser.add_argument("--token-file", metavar="FILE", help="read the join token from FILE")
    parser.add_argument("--device-id", metavar="ID",
                        help="1-64 characters of [A-Za-z0-9._-] (default: the host name;"
                        " where it is localhost, as on a phone, an id such as"
                        " android-3fa2c1 made once and kept in --state-dir)")
    parser.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                        help="where this device's secret (one per cluster and device"
                        " id) and its cache of task files are kept; this user must be"
                        " able to write it (default: %(default)s)")
    parser.add_argument("--fingerprint", metavar="HEX", help="the main node uses TLS: the"
                        " SHA-256 fingerprint of its certificate (64 hex digits, colons"
                        " allowed; `rc join` prints it)")
    parser.add_argument("--fingerprint-file", metavar="FILE",
                        help="read --fingerprint from FILE")
    parser.add_argument("--web-port", type=positive(int), default=DEFAULT_WEB_PORT,
                        metavar="PORT", help="the main node's dashboard port, which serves"
                        " worker.py for upgrades (default: %(default)d)")
    parser.add_argument("--allow-upgrade", action="store_true",
                        help="let `rc broadcast upgrade` replace this file with the main"
                        " node's worker.py and restart it")
    parser.add_argument("--role", help="compute, storage, mobile... (default: guessed:"
                        " mobile on Android, storage with a disk of %d GB or more,"
                        " compute)" % STORAGE_DISK_GB)
    parser.add_argument("--slots", type=positive(int), default=os.cpu_count() or 1,
                        help="tasks run at once (default: CPU count, %(default)s)")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help="a free label; may be repeated")
    parser.add_argument("--allow", action="append", default=[], metavar="TYPE,...",
                        help="accept only these task types")
    parser.add_argument("--deny", action="append", default=[], metavar="TYPE,...",
                        help="never accept these task types")
    parser.add_argument("--heartbeat", type=positive(float), default=HEARTBEAT_INTERVAL,
                        metavar="SECONDS", help="until the main node says otherwise"
                        " (default: %(default)g)")
    parser.add_argument("--output-cap", type=positive(int), default=OUTPUT_CAP,
                        metavar="BYTES", help="bytes kept of a task's stdout and of its"
                        " stderr (default: %(default)d)")
    files = parser.add_argument_group("files (input cache and checkpoints)")
    files.add_argument("--cache-mb", type=not_negative(int), default=CACHE_MB, metavar="MB",
                       help="MiB of task input files kept in the state dir, least recently"
                       " used out first (default: %(default)d)")
    files.add_argument("--venv-dir", metavar="DIR",
                       help="where the Python environments of tasks with pip packages are"
                       " kept (default: /var/cache/rc-worker/venvs as root, else"
                       " ~/.cache/rc-worker/venvs)")
    files.add_argument("--venv-mb", type=not_negative(int), default=VENV_MB, metavar="MB",
                       help="MiB of those environments kept, least recently used out first"
                       " (default: %(default)d)")
    files.add_argument("--checkpoint-every", type=positive(float), default=CHECKPOINT_EVERY,
                       metavar="SECONDS", help="how often a running task's $RC_CHECKPOINT_DIR"
                       " is sent to the main node when it changed (default: %(default)g)")
    limits = parser.add_argument_group("limits on each task")
    limits.add_argument("--max-memory", type=not_negative(int), default=default_max_memory(),
                        metavar="MB", help="MiB of address space (0: no limit;"
                        " default: half the RAM, at least %d: %%(default)d)" % MIN_MEMORY_MB)
    limits.add_argument("--max-file-size", type=not_negative(int), default=MAX_FILE_MB,
                        metavar="MB", help="MiB, the largest file it may write (0: no"
                        " limit; default: %(default)d)")
    sandbox = parser.add_argument_group("the task sandbox (see docs/worker.md)")
    sandbox.add_argument("--task-user", metavar="USER|UID[:COUNT]",
                         help="as root: run tasks as USER, or as COUNT uids from UID, one per"
                         " running task (default as root: uids %d-%d without an account)"
                         % (TASK_UID_BASE, TASK_UID_BASE + TASK_UID_COUNT - 1))
    sandbox.add_argument("--isolate", action="store_true",
                         help="run tasks in a mount namespace (a user namespace when not"
                         " root) that hides the state dir, the home directory and each"
                         " --hide PATH, and in a PID namespace each where the kernel"
                         " allows; refuse to start where the mount namespace cannot be had")
    sandbox.add_argument("--isolate-network", action="store_true",
                         help="with --isolate: no network for tasks")
    sandbox.add_argument("--hide", action="append", default=[], metavar="PATH",
                         help="a path tasks must not read: hidden by isolation where it"
                         " works; where it does not and tasks run as this user, only"
                         " %s tasks are accepted" % "/".join(HARMLESS_TASK_TYPES))
    sandbox.add_argument("--read-only", action="append", default=[], metavar="PATH",
                         help="a path tasks must not write (bound read-only, as --hide)")
    sandbox.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                         type=passed_variable,
                         help="give tasks this variable of the worker's environment too;"
                         " may be repeated (tasks get PATH, LANG, LC_*, TZ, TERM, TMPDIR,"
                         " proxies and PIP_* without a password, and no other)")
    guest = parser.add_argument_group("a good guest: when this device takes new tasks")
    guest.add_argument("--only-when-charging", action="store_true",
                       help="only while on external power")
    guest.add_argument("--min-battery", type=percent, metavar="PCT",
                       help="stop below PCT %% battery")
    guest.add_argument("--resume-battery", type=percent, metavar="PCT",
                       help="resume only at PCT %%%% (default: --min-battery + %d)"
                       % BATTERY_RESUME_MARGIN)
    guest.add_argument("--max-temperature", type=float, metavar="C",
                       help="stop above C degrees Celsius, resume %g below"
                       % TEMPERATURE_RESUME_MARGIN)
    guest.add_argument("--idle-minutes", type=positive(float), metavar="M",
                       help="only when the owner has been idle (no keyboard, mouse or"
                       " terminal input, no other program busy) for M minutes")
    guest.add_argument("--quiet-hours", type=hours_window, metavar="HH:MM-HH:MM",
                       help="no new tasks in this window of local time")
    guest.add_argument("--on-unavailable", choices=("finish", "hand-back"), default="finish",
                       help="what running tasks do when the device becomes unavailable"
                       " (default: %(default)s)")
    guest.add_argument("--policy-interval", type=positive(float), default=POLICY_INTERVAL,
                       metavar="SECONDS", help="how often the rules are checked"
                       " (default: %(default)g)")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS, key=LOG_LEVELS.get),
                        default="info")
    parser.add_argument("--log-tasks", action="store_true",
                        help="log the start and end of every task at info level, echo"
                        " included (it is logged at debug level otherwise)")
    parser.add_argument("--self-test", action="store_true",
                        help="print the profile, run each task type locally, and exit")
    parser.add_argument("--version", action="version", version=__version__)
    options, unknown = parser.parse_known_args(config_arguments(parser, argv))
    if unknown:
        meant = near_option(parser, unknown)
        parser.error("unrecognized arguments: %s%s" % (
            " ".join(unknown), meant and " (did you mean %s?)" % meant))
    options.argv = list(sys.argv[1:] if argv is None else argv)
    options.fingerprint = pinned_fingerprint(parser, options)
    if options.min_battery is not None and options.resume_battery is None:
        options.resume_battery = min(100.0, options.min_battery + BATTERY_RESUME_MARGIN)
    if options.resume_battery is not None and options.resume_battery < (options.min_battery or 0):
        parser.error("--resume-battery must be at least --min-battery")
    if options.device_id is None:
        options.device_id = default_device_id(options.state_dir)
    if not re.match(r"[A-Za-z0-9._-]{1,64}\Z", options.device_id):
        parser.error("--device-id must be 1-64 characters of [A-Za-z0-9._-]")
    options.task_types = task_types(parser, options.allow, options.deny)
    sandbox_options(parser, options)
    if not options.self_test:
        if options.join is None:
            parser.error("--join HOST[:PORT] is required")
        if read_token and not reloading:
            options.token = join_token(parser, options)
    return options


def sandbox_options(parser, options):
    """Whom tasks run as and whether they are isolated (see Sandbox), with
    notes on what is left undone; --hide/--read-only that cannot be honoured
    narrow the task types to those that run no code."""
    try:
        options.task_users = resolve_task_user(options.task_user, options.slots)
    except ValueError as e:
        parser.error(str(e))
    wanted = options.isolate or bool(options.hide or options.read_only)
    why_not = isolation_works(options.isolate_network) if wanted else None
    options.isolated = wanted and why_not is None
    options.pid_namespace_problem = (pid_namespace_works(options.isolate_network)
                                     if options.isolated else None)
    options.pid_namespace = options.isolated and options.pid_namespace_problem is None
    options.sandbox_notes = []
    if options.isolate and why_not:
        parser.error("--isolate: %s" % why_not)
    if why_not and options.task_users is None:
        options.task_types = tuple(t for t in options.task_types if t in HARMLESS_TASK_TYPES)
        options.sandbox_notes.append(
            "tasks run as this worker's user and cannot be kept from %s: %s; only %s tasks"
            " are accepted (run the worker as root, or where user namespaces work)"
            % (", ".join(options.hide + options.read_only), why_not,
               ", ".join(options.task_types) or "no"))
    elif why_not:
        options.sandbox_notes.append("tasks are not isolated (%s): the task user's own"
                                     " rights keep them from %s" % (
                                         why_not, ", ".join(options.hide + options.read_only)))


def pinned_fingerprint(parser, options):
    text = options.fingerprint
    if options.fingerprint_file:
        text = read_option_file(parser, "--fingerprint-file", options.fingerprint_file)
    if text is None:
        return None
    fingerprint = normal_fingerprint(text)
    if fingerprint is None:
        parser.error("--fingerprint must be 64 hex digits (colons allowed): the SHA-256 of"
                     " the main node's certificate, as `rc join` prints it")
    return fingerprint


# <<< The end of region "options".


def read_option_file(parser, option, path):
    try:
        with open(os.path.expanduser(path)) as f:
            return f.read()
    except OSError as e:
        parser.error("cannot read %s: %s" % (option, e))


# >>> Region "options": the worker process loads it on first use (load_region).

def task_types(parser, allow, deny):
    def names(lists):
        chosen = [name.strip() for text in lists for name in text.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(TASK_TYPES))
        if unknown:
            parser.error("unknown task type %s (known: %s)"
                         % (", ".join(unknown), ", ".join(TASK_TYPES)))
        return set(chosen)
    allowed = names(allow) or set(TASK_TYPES)
    denied = names(deny)
    return tuple(t for t in TASK_TYPES if t in allowed and t not in denied)


# <<< The end of region "options".


def join_token(parser, options):
    """The token; options.token_from says where it came from, for a message
    that says what to fix when the main node refuses it."""
    # Tasks run with our environment: the token must not be in it.
    token, options.token_from = os.environ.pop("RC_TOKEN", None), "RC_TOKEN"
    if options.token_file:
        if options.task_users is not None and not options.isolated \
                and reachable(os.path.expanduser(options.token_file), True, ()):
            parser.error("--token-file %s may be read by every user, the uids tasks run as"
                         " included: chmod 600 it" % options.token_file)
        token = read_option_file(parser, "--token-file", options.token_file)
        options.token_from = "--token-file %s" % options.token_file
    if options.token is not None:
        token, options.token_from = options.token, "--token"
    token = (token or "").strip()
    if not token:
        parser.error("a join token is required: --token, --token-file or RC_TOKEN")
    return token


def main(argv=None, options_fd=None):
    """The worker; `options_fd` is a pipe with the options parsed (see start)."""
    global log_threshold
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--spawner"]:          # see Spawner: started by a worker, not by people
        return serve_spawner(int(argv[1]))
    if options_fd is None:
        load_region("options")      # loaded already: without start(), the whole file runs
        options = parse_args(argv)
    else:
        options = received_options(options_fd)
    log_threshold = LOG_LEVELS[options.log_level]
    if options.self_test:
        log_threshold = LOG_LEVELS["warning"]    # the report is the output
        load_region("self_test")
        return self_test(Worker(options))
    return Worker(options).run()


# -- start: parse here, run from bytecode in a fresh interpreter ------------------

MAX_HANDED_OPTIONS = 8192   # bytes: far below any pipe's capacity, so writing never waits


def start():
    """Parse the command line in this process, then exec (same pid) an
    interpreter that imports this file from its compiled bytecode and is
    handed the parsed options through a pipe. Compiling the source would
    leave ~5 MiB in the process and argparse ~1.4 MiB: the long-lived worker
    carries neither. Where that cannot be done, the worker runs here."""
    if sys.argv[1:2] == ["--spawner"]:
        return main()
    load_region("options")          # a no-op: this process runs the whole file
    options = parse_args(read_token=False)
    # -S as well: .pth files in site-packages may load anything, megabytes at
    # times; psutil, the one package the worker may use, finds its way back
    # through optional_psutil.
    options.site_dropped = not sys.flags.no_site
    data = handed_options(options)
    reader, writer = os.pipe()
    command = bytecode_argv("main(options_fd=%d)" % reader,
                            interpreter_argv() + ["-S"] * options.site_dropped,
                            tls=bool(options.fingerprint), whole=False)
    if command is None or data is None:
        os.close(reader)
        os.close(writer)
        return main()
    os.write(writer, data)
    os.close(writer)
    os.set_inheritable(reader, True)
    os.execv(sys.executable, command + sys.argv[1:])


def handed_options(options):
    """The options as marshal data (tuples stay tuples), or None if they will not go."""
    import marshal
    try:
        data = marshal.dumps(vars(options))
    except ValueError:
        return None
    return data if len(data) <= MAX_HANDED_OPTIONS else None


def received_options(fd):
    """The options start() handed over; the token is read here, so that it
    never passes through a pipe or the command line."""
    import marshal
    with os.fdopen(fd, "rb") as pipe:
        options = SimpleNamespace(**marshal.loads(pipe.read()))
    if getattr(options, "site_dropped", False):
        site_dropped.append(True)
    if not options.self_test:
        options.token = join_token(CommandLineErrors(), options)
    return options


class CommandLineErrors(object):
    """What join_token needs of an argparse parser, without argparse."""

    def error(self, message):
        sys.stderr.write("worker.py: error: %s\n" % message)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(start())
