"""The grammar of the `rc` command and what each command does: look at the
cluster, submit and cancel tasks, manage the fleet (drain, forget, label,
revoke, broadcast), read logs, and show how a device joins.

Shared by two programs: `rc` (lib/rc/cli.py, its entry) and rc-web's
terminal (POST /api/v1/command). run_command() does the work without
exiting and writes only to the streams it is given; web_access() says what
the web terminal may run and with which token."""
import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import time

from rc import backup as rc_backup
from rc import config as rc_config
from rc import audit, bell, bounded, db, defaults, device_secrets, devices, explain, fleet
from rc import health
from rc import files, files_cli, housekeeping, map_cli, render, state_dir, stats, tasks, tls
from rc import program, schedule_cli, tail_cli, task_options
from rc.task_options import whole_number
from rc.records import (DEVICE_COLUMNS, DEVICE_TABLE, TASK_COLUMNS, TASK_TABLE, ago,
                        battery_percent, device_metrics, device_record, device_row,
                        device_status, device_table_row, fraction, labels_text,
                        status_summary, table_columns, task_record, task_row,
                        task_table_row, when, withheld_task)
from rc.log import LEVELS, Logger
from rc.logs import (AUDIT_PROGRAM, LOG_CONTEXT_LINES, MAX_WEB_LINES, DeviceLines, LogFilter,
                     NoSuchLog, Offsets, log_paths, new_lines, parse_log_lines, program_of,
                     rotated_paths, tail_lines)
from rc.states import (ASSIGNED, CANCELLED, COMPLETED, FAILED, OFFLINE, ONLINE,
                       PRIORITIES, QUEUED, RUNNING, TASK_STATES,
                       TASK_TYPES, TERMINAL_STATES, TIMED_OUT, WITHHELD)

WAIT_POLL_INTERVAL = 0.005    # seconds between looks at PRAGMA data_version in --wait
FOLLOW_POLL_INTERVAL = 0.2    # seconds between looks at the log files in logs -f
DEFAULT_TASK_LIMIT = 50       # rows `rc tasks` shows
DEFAULT_LOG_LINES = 20        # lines `rc logs` shows before following
READY_POLL_INTERVAL = 0.1   # seconds between tries in wait-ready
DEFAULT_READY_TIMEOUT = 30.0  # seconds wait-ready waits for the programs
# Characters of a failed command's stderr line rc wait quotes: client.py's
# STDERR_NOTE_MAX (that file stands alone, and importing it costs every rc 14 ms).
STDERR_NOTE_MAX = 200
# A result's stdout and stderr fields, in the order of their stored copies
# past the inline cap (files.STREAM_NAMES).
STREAM_FIELDS = ("output", "stderr")
# connect() on a UDP socket sends nothing; it only asks the kernel which local
# address would route there, which is the address other devices can reach.
LAN_PROBE_ADDRESS = ("10.255.255.255", 1)
DEVICE_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
MAX_DEVICE_ID = 64

EVENT_COLUMNS = ["TIME", "STATE", "ATTEMPT", "DEVICE", "REASON"]
GROUP_COLUMNS = ["DEVICE", "TASK", "STATE", "OUTPUT", "ERROR"]
ACK_COLUMNS = ["DEVICE", "TIME", "OK", "DETAIL"]
FILE_COLUMNS = ["NAME", "KIND", "SIZE", "ATTEMPT", "SHA256"]

STATE_COLOURS = {ONLINE: "green", OFFLINE: "red", QUEUED: "yellow", ASSIGNED: "blue",
                 RUNNING: "cyan", COMPLETED: "green", FAILED: "red", TIMED_OUT: "red",
                 CANCELLED: "grey"}
LEVEL_COLOURS = render.LEVEL_COLOURS
MONITOR_POLL_INTERVAL = 0.25  # seconds between looks for changes in `rc monitor`
MONITOR_TASKS = 8             # active tasks the monitor lists
# Commands the web terminal may not run, and why.
WEB_REFUSED = {"init": "run `rc init` (or make install) on the main node",
               "ctl": "it drives supervisord; run `bin/rc ctl` on the main node",
               "wait-ready": "it is for scripts on the main node",
               "local-worker": "it would start a worker inside rc-web",
               "monitor": "the web terminal has its own `monitor`; `monitor --once` works",
               "backup": "it writes a file on the main node; run it there",
               "restore": "it replaces the database; run it on the main node",
               "wait": "it holds the request open; use GET /api/v1/tasks/ID/result",
               "map": "it reads files and stdin on the main node and holds the request"
                      " open; use POST /api/v1/tasks with a list",
               "get": "it writes files on the main node; use"
                      " GET /api/v1/tasks/ID/files/NAME"}
# submit options that read files on the main node: not from the web terminal.
WEB_REFUSED_SUBMIT_OPTIONS = ("input", "stdin", "file", "requirements")
# Commands that change the cluster or show a secret: the admin token only.
WEB_ADMIN_COMMANDS = {"submit", "cancel", "token", "join", "drain", "resume", "forget",
                      "label", "role", "slots", "revoke", "broadcast"}
WEB_WAIT_LIMIT = 30.0         # seconds `submit --wait` may hold a web request


class CommandError(Exception):
    """A command cannot go on; the message, one line, says why."""
    status = 1


class UsageError(CommandError):
    status = 2


class ParserExit(Exception):
    """argparse finished early (--help); carries the exit status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


# argparse asks gettext for each of its messages as a parser is built (~150
# for rc's), and gettext looks for a translation file in each directory of
# each spelling of $LANG every time, finding none: its misses are not
# cached. That was 6.5 of build_parser's 10.5 ms, in every `rc` command and
# every line of the web terminal. rc's own words are English, so are argparse's.
argparse._ = str


class Parser(argparse.ArgumentParser):
    """argparse that reports instead of exiting, and prints help to `out`
    rather than to sys.stdout (which the web terminal does not own)."""

    def __init__(self, *args, out=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        raise ParserExit(status)

    def _print_message(self, message, file=None):
        if message:
            self.out.write(message)


class Context:
    """What a command runs with: streams, and config and database opened
    only when the command needs them (so --help works on a broken install)."""

    def __init__(self, out, err, config=None, width=None, colour=None, logger=None,
                 actor=("cli", "local"), env_values=True):
        self.out, self.err = out, err
        self.actor, self.source = actor
        # Whether tasks' --env values are shown: on the main node to its owner
        # (who can read the database anyway) and in the web terminal to the
        # admin token's holder; to anyone else each is WITHHELD (rc.states).
        self.env_values = env_values
        self._config, self._connection = config, None
        self._logger, self._own_logger = logger, False
        tty = hasattr(out, "isatty") and out.isatty()
        # The web terminal is a terminal too, but says so itself.
        self.colour = (tty and "NO_COLOR" not in os.environ) if colour is None else colour
        self.width = width or (shutil.get_terminal_size().columns if tty else None)

    @property
    def config(self):
        if self._config is None:
            self._config = rc_config.load()
        return self._config

    @property
    def main_node_stopped(self):
        """When the main node here stopped, or None while it runs (or before
        its first start); looked at once per command."""
        if not hasattr(self, "_stopped_at"):
            self._stopped_at = health.main_node_stopped(self.config)
        return self._stopped_at

    @property
    def connection(self):
        if self._connection is None:
            self._connection = connect(self.config)
        return self._connection

    @property
    def logger(self):
        """The web's own logger in the web terminal; otherwise rc-cli.log,
        since no supervisor files this command's stdout. A log that cannot
        be opened is no reason to refuse the command, nor one that cannot be
        written (a full disk): its lines tell of changes made already, and
        `rc submit` said "No space left on device" with a traceback, no id,
        of a task it had queued (sent again, it ran twice)."""
        if self._logger is None:
            path = os.path.join(self.config.log_dir, housekeeping.CLI_LOG)
            try:
                self._logger = Logger.appending("rc-cli", path, self.config.log_level)
                self._logger.on_write_error = lambda e: self.err.write(
                    "rc: warning: cannot write %s: %s\n" % (path, e))
                self._own_logger = True
            except OSError:
                self._logger = Logger("rc-cli", "error", io.BytesIO())
        return self._logger

    def audit(self, event, **fields):
        """A line in the audit log. The change is already made, so a log that
        cannot be written is reported, not a reason to say it failed."""
        try:
            audit.record(self.config, event, self.actor, self.source, **fields)
        except OSError as e:
            self.err.write("rc: warning: cannot write the audit log: %s\n" % e)

    def as_read(self, task):
        """A task, a group, a schedule or a service as this command may show
        it (env_values)."""
        return task if self.env_values else withheld_task(task)

    def close(self):
        if self._connection is not None:
            self._connection.close()
        if self._own_logger:
            self._logger.close()

    def colourize(self, column, value):
        if self.colour and column in ("STATUS", "STATE", "LEVEL"):
            # online,drained and online,paused are online but take nothing new;
            # a revoked device is out for good, whatever its connection's state.
            if value.endswith(",revoked"):
                return STATE_COLOURS.get(OFFLINE)
            return "yellow" if value.startswith(ONLINE + ",") else STATE_COLOURS.get(value)
        return None


def connect(config):
    """A connection to an installed cluster's database, or a CommandError
    that tells the user to install (connect() alone would create an empty file)."""
    if not os.path.exists(config.db_path):
        raise CommandError("no cluster database at %s; run `make install` first"
                           % config.db_path)
    connection = db.connect(config.db_path)
    if connection.execute("PRAGMA user_version").fetchone()[0] < db.SCHEMA_VERSION:
        connection.close()
        raise CommandError("the database at %s is not set up or is out of date;"
                           " run `make install`" % config.db_path)
    return connection


# -- what the commands show (the records are lib/rc/records.py) -------------------

def figures_text(device, now):
    """`rc device`: whether its figures are live, and how old."""
    if device.get("figures_at") is None:
        return "none yet"
    return "%s, taken %s" % ("stale: the device is %s" % device_status(device)
                             if device.get("stale") else "live",
                             ago(device["figures_at"], now))


def grid_cell(device):
    metrics = device_metrics(device)
    return {"device": device["device_id"], "status": device["status"],
            "cpu": fraction(metrics.get("cpu_percent")),
            "memory": fraction(metrics.get("memory_percent")),
            "battery": fraction(battery_percent(metrics)),
            "active": device.get("active_tasks"), "slots": device["slots"]}


def flatten(value, prefix=""):
    """Nested objects as dotted keys: metrics.cpu_percent, profile.device_info.os."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from flatten(item, "%s.%s" % (prefix, key) if prefix else key)
    else:
        yield prefix, value


def detail_pairs(record, now):
    """A record's fields, simple ones first, times read as dates and ages."""
    simple = [(k, v) for k, v in record.items() if not isinstance(v, dict)]
    nested = [(k, v) for k, v in record.items() if isinstance(v, dict) and v]
    for key, value in simple:
        is_time = key.endswith(("_at", "_expires", "_until")) or key in (
            "last_seen", "not_before", "suspect_since")
        if is_time:       # 0 (not_before of a task never held back) is no time at all
            yield key, when(value, now) if value else None
        else:
            yield key, value
    for key, value in nested:
        yield from flatten(value, key)


# -- output -------------------------------------------------------------------------

def write_rows(context, arguments, rows, columns, records):
    """The rows in the chosen format; --json gives the full records instead."""
    header = not arguments.no_header
    if arguments.format == "json":
        text = render.json_text(records)
    elif arguments.format == "csv":
        text = render.csv_text(rows, columns, header)
    elif arguments.format == "tsv":
        text = render.tsv_text(rows, columns, header)
    else:
        text = render.table(rows, columns, context.width, header, context.colourize)
    context.out.write(text)


def write_records(context, arguments, records, now, rows, table):
    """Records (devices, tasks) in the chosen format: --json as they are,
    --csv/--tsv as `rows` (a row function and its columns), a terminal as
    `table` (a row function given `now`, and its columns); only the rows that
    format needs are made."""
    if arguments.format is None:
        row, columns = table
        write_rows(context, arguments, [row(record, now) for record in records],
                   table_columns(columns), records)
    else:
        row, columns = rows
        write_rows(context, arguments, [row(record) for record in records], columns, records)


# -- commands -----------------------------------------------------------------------

def cmd_init(arguments, context):
    try:
        done = state_dir.init(context.config)
    except device_secrets.DeviceKeyError as e:
        raise CommandError(str(e))
    if done["secrets_sealed"]:
        context.out.write("%d device secrets were in the database in clear; now sealed with %s\n"
                          % (done["secrets_sealed"], device_secrets.key_path(context.config)))
    if done["made_private"]:
        context.out.write("%d files and directories were readable by others; now owner-only\n"
                          % len(done["made_private"]))
    for path, error in done["not_private"]:
        context.err.write("rc: warning: cannot make %s owner-only: %s\n" % (path, error))
    record_started_with(context)
    context.out.write("cluster state in %s\n" % context.config.home)


def record_started_with(context):
    """RC_CONFIG and the ports given now, kept for every later command with
    this RC_HOME (lib/rc/config.py); said when they differ from the defaults."""
    recorded = rc_config.record_environment(context.config.home)
    if recorded:
        context.out.write("started with %s (recorded in %s)\n" % (
            " ".join("%s=%s" % item for item in sorted(recorded.items())),
            rc_config.started_with_path(context.config.home)))


def cmd_status(arguments, context):
    summary = status_summary(context.connection, context.config)
    stopped_at = context.main_node_stopped
    if stopped_at is not None:
        summary = as_when_stopped(summary, stopped_at)
    if arguments.format == "json":
        context.out.write(render.json_text(summary))
        return
    rows = [{"key": key, "value": value} for key, value in summary.items()]
    if arguments.format in ("csv", "tsv"):
        write_rows(context, arguments, rows, ["key", "value"], summary)
    else:
        context.out.write(render.key_values(summary.items()))


def cmd_devices(arguments, context):
    records = devices.list_devices(context.connection, include_forgotten=arguments.all)
    records = devices_as_last_seen(context, records)
    if arguments.grid and arguments.format is None:
        context.out.write(render.device_grid([grid_cell(device) for device in records],
                                             context.width or 80, context.colour))
        return
    now = time.time()
    write_records(context, arguments, [device_record(device, now) for device in records], now,
                  (device_row, DEVICE_COLUMNS), (device_table_row, DEVICE_TABLE))


def cmd_device(arguments, context):
    device = devices.get(context.connection, arguments.device_id)
    if device is None:
        raise CommandError(devices.unknown(context.connection, arguments.device_id))
    now = time.time()
    device = devices_as_last_seen(context, [device])[0]
    if arguments.format == "json":
        context.out.write(render.json_text(device_record(device, now)))
        return
    shown = {}
    for key, value in device.items():
        if key == "labels":
            value = labels_text(value)
        shown[key] = value
        if key == "figures_at":
            shown["figures"] = figures_text(device, now)
        if key == "role" and "reported_role" in device:
            shown["reported_role"] = device["reported_role"]
    context.out.write(render.key_values(detail_pairs(shown, now), align=True))


# -- with the main node stopped ----------------------------------------------------

def stopped_text(stopped_at):
    return "not running (stopped %s)" % when(stopped_at, time.time())


def as_when_stopped(summary, stopped_at):
    """`rc status` with the main node stopped: it says so first, and no
    device counts as online (what the table holds is from before the stop)."""
    shown = {"main_node": stopped_text(stopped_at)}
    shown.update(summary)
    if "devices_online" in shown:
        shown["devices_offline"] = shown.get("devices_offline", 0) + shown["devices_online"]
        shown["devices_online"] = 0
    if "devices_connected" in shown:
        shown["devices_connected"] = 0
    return shown


def devices_as_last_seen(context, records):
    """With the main node stopped, every device is offline (nothing is there
    to be connected to), LAST_SEEN as it was; a note on stderr says why."""
    stopped_at = context.main_node_stopped
    if stopped_at is None:
        return records
    context.err.write("rc: main node %s; devices are shown as last seen, none online\n"
                      % stopped_text(stopped_at))
    return [dict(device, status=OFFLINE, connected=False, suspect=False)
            for device in records]


def cmd_tasks(arguments, context):
    """Only --json shows results, so only it reads them. The web terminal
    reads a page as GET /api/v1/tasks does: read whole, `tasks --limit 1000`
    of tasks with ~1 MiB results held a gigabyte in rc-web for one reader."""
    limit, max_bytes = arguments.limit, None
    if context.actor != "cli":
        limit, max_bytes = min(limit, tasks.MAX_PAGE_TASKS), tasks.MAX_PAGE_BYTES
    records, more = tasks.task_page(context.connection, arguments.state, arguments.device,
                                    limit, max_bytes=max_bytes,
                                    results=arguments.format == "json")
    now = time.time()
    write_records(context, arguments, [context.as_read(task_record(task, now))
                                       for task in records], now,
                  (task_row, TASK_COLUMNS), (task_table_row, TASK_TABLE))
    if more and len(records) < arguments.limit:
        from urllib.parse import urlencode     # only here: rc starts without it
        query = urlencode([(name, value) for name, value in (
            ("state", arguments.state), ("device", arguments.device),
            ("offset", len(records))) if value is not None])
        context.err.write("rc: the first %d tasks, what the web terminal reads at once;"
                          " GET /api/v1/tasks?%s lists the rest\n" % (len(records), query))


def cmd_task(arguments, context):
    task = context.as_read(tasks.get(context.connection, arguments.task_id))
    if arguments.format == "json":
        context.out.write(render.json_text(task))
        return
    now = time.time()
    result = task.get("result") or {}
    shown = {key: value for key, value in task.items() if key not in ("events", "result")}
    shown["result"] = {k: v for k, v in result.items() if k not in ("output", "stderr")}
    context.out.write(render.key_values(detail_pairs(shown, now), align=True))
    for name in ("output", "stderr"):
        if result.get(name):
            context.out.write("\n%s:\n%s" % (name, with_newline(render.printable(
                str(result[name])))))
    events = [{"TIME": time.strftime("%H:%M:%S", time.localtime(event["time"]))
               + ("%.3f" % (event["time"] % 1))[1:], "STATE": event["state"],
               "ATTEMPT": event["attempt"], "DEVICE": event["device_id"],
               "REASON": event["reason"]} for event in task["events"]]
    context.out.write("\nevents:\n" + render.table(events, EVENT_COLUMNS, context.width,
                                                  colourize=context.colourize))


def with_newline(text):
    return text if not text or text.endswith("\n") else text + "\n"


def cmd_submit(arguments, context):
    if arguments.each:
        return submit_each(arguments, context)
    if arguments.include_new:
        raise UsageError("--include-new goes with --each")
    try:
        payload = submitted_payload(arguments, context)
        requirements = checked_capabilities(tasks.parse_requirements(arguments.require))
        task_id = tasks.submit(context.connection, context.config, arguments.task_type,
                               payload, arguments.priority, arguments.timeout,
                               arguments.retries, requirements, arguments.key,
                               arguments.retry_on_failure,
                               tasks.parse_task_ids(arguments.after))
    except tasks.TaskError as e:
        raise UsageError(str(e))
    context.logger.info("task_submitted", task_id=task_id, task_type=arguments.task_type,
                        priority=arguments.priority, user=user_name())
    context.audit("task_submitted", task_id=task_id, task_type=arguments.task_type,
                  user=user_name())
    if not arguments.wait:
        context.out.write("%d\n" % task_id)
        if context.actor == "cli" and context.main_node_stopped is not None:
            context.err.write("rc: task %d is queued; the main node is not running (stopped %s"
                              " ago): it runs after `make run`\n"
                              % (task_id, render.age(time.time() - context.main_node_stopped)))
        return 0
    return report_outcome(context, wait_for(context.connection, task_id,
                                            arguments.wait_timeout, stopped_watch(context)))


# The design document's capability names are kinds of service, not programs a
# device has; they name no capability a worker reports (bin/worker.py's
# CAPABILITY_TOOLS), so a task requiring one would wait for ever.
DESIGN_CAPABILITIES = {"computational": "every device computes: leave it out, or use"
                                        " role=compute",
                       "network_services": "use role=storage, or a label (rc label DEVICE"
                                           " services=yes, then label.services=yes)"}
# The programs a worker looks for and reports as its capabilities.
KNOWN_CAPABILITIES = ("python3", "gcc", "g++", "make", "git", "curl", "docker", "podman",
                      "ffmpeg", "nvidia-smi", "node", "go", "rustc", "java")


def checked_capabilities(requirements):
    """Requirements, refused when a capability is one of the design
    document's service names (the message says what to require instead)."""
    for name in requirements.get("capabilities", ()):
        if name in DESIGN_CAPABILITIES:
            raise UsageError("capability %r is a kind of service, not a program a device"
                             " has: %s. Capabilities are the programs a worker finds: %s"
                             % (name, DESIGN_CAPABILITIES[name], ", ".join(KNOWN_CAPABILITIES)))
    return requirements


def submitted_payload(arguments, context):
    """The payload of `rc submit`: the argument, and the files, script,
    environment and outputs its options name (stored in the file store
    once all of them have been checked)."""
    if files_cli.looks_like_a_script_path(arguments.task_type, arguments.argument):
        if arguments.task_type == "python_eval":     # an expression; --file is python_exec's
            raise UsageError("%r is a file here, and python_eval takes an expression; did"
                             " you mean python_exec --file %s?"
                             % (arguments.argument, shlex.quote(arguments.argument)))
        raise UsageError("%r is a file here, and the task would run on another device;"
                         " did you mean --file %s?" % (arguments.argument,
                                                      shlex.quote(arguments.argument)))
    try:
        if arguments.file and not arguments.argument:
            payload = {}
            tasks.check_type(arguments.task_type)
        else:
            payload = tasks.payload_from_argument(arguments.task_type, arguments.argument)
        payload.update(files_cli.file_payload(context.connection, context.config,
                                              arguments.task_type, arguments.argument,
                                              arguments))
    except files_cli.FileOptionError as e:
        raise UsageError(str(e))
    if arguments.task_type == "shell" and context.actor == "cli":   # "here": this shell's
        note = files_cli.files_left_here(payload.get("command") or "",
                                         payload.get("inputs", []))
        if note:
            context.err.write("rc: %s\n" % note)
    return payload


def cmd_wait(arguments, context):
    """Wait for a task submitted earlier; as `submit --wait` from there on."""
    return report_outcome(context, wait_for(context.connection, arguments.task_id,
                                            arguments.timeout, stopped_watch(context)))


def stopped_watch(context):
    """What says so when the main node stops under `rc wait` (on this
    machine's command line: the web terminal runs only while it runs)."""
    return health.StoppedWatch(context.config, context.err, "rc") \
        if context.actor == "cli" else None


def cmd_tail(arguments, context):
    """`rc tail` lives in lib/rc/tail_cli.py; an ended task's output is rc wait's."""
    try:
        return tail_cli.run(arguments, context, lambda task_id: report_outcome(
            context, tasks.get(context.connection, task_id)))
    except tail_cli.TailError as e:
        raise CommandError(str(e))


def cmd_files(arguments, context):
    """The files a task reads and left."""
    task = tasks.get(context.connection, arguments.task_id)  # "no task N" when there is none
    rows = files_cli.listed(context.connection, arguments.task_id)
    records = files.task_files(context.connection, arguments.task_id)
    write_rows(context, arguments, rows, FILE_COLUMNS, records)
    if not rows and is_a_map(context.connection, arguments.task_id):
        context.err.write("rc: task %d has no files; %s\n" % (
            arguments.task_id, map_number_note(arguments.task_id)))
    else:
        note_unmatched_outputs(context, task, records)


def cmd_get(arguments, context):
    """Write a task's output files (or those named) under -o DIR."""
    task = tasks.get(context.connection, arguments.task_id)
    try:
        chosen = files_cli.wanted(context.connection, arguments.task_id, arguments.names)
        if not chosen:
            raise CommandError(no_outputs(task) + ("; %s" % map_number_note(task["task_id"])
                               if is_a_map(context.connection, task["task_id"]) else ""))
        with users_umask():
            for entry in chosen:
                path = files_cli.write_out(context.connection, context.config, entry,
                                           arguments.output_dir)
                context.out.write("%s\n" % render.cell(path))   # a device chose the name
    except (files_cli.FileOptionError, files.FileStoreError) as e:
        raise CommandError(str(e))


def is_a_map(connection, number):
    return connection.execute("SELECT 1 FROM maps WHERE group_id = ?",
                              (number,)).fetchone() is not None


def map_number_note(number):
    """`rc files 12` where 12 is the number `rc map` printed (`map 12: 40
    inputs`), not a task's: the task of that id is another."""
    return ("%d is also a map's number (`map %d: ... inputs`): `rc group %d` lists the"
            " map's tasks, whose files `rc files TASK` and `rc get TASK` show"
            % (number, number, number))


def note_unmatched_outputs(context, task, entries):
    """One line on stderr for each ended task's --output globs that matched
    no file it left (`rc get` explains why it has nothing; `rc wait` and
    `rc files` said nothing). `entries`: files.task_files of the task."""
    globs = (task["payload"] or {}).get("outputs") or []
    if not globs or task["state"] not in TERMINAL_STATES:
        return
    names = [entry["name"] for entry in entries if entry["kind"] == files.OUTPUT]
    unmatched = [glob for glob in globs if not any(files.globs_match([glob], name)
                                                   for name in names)]
    if unmatched:
        context.err.write("rc: task %d: --output %s %s\n" % (
            task["task_id"], ", ".join(render.cell(glob) for glob in unmatched),
            unmatched_because(task)))


# The line rc-server or the worker adds to a task's stderr for an output it
# left that was not kept (the main node's disk full, its quota, a name refused).
OUTPUT_NOT_KEPT = re.compile(r"^rc-(?:server|worker): outputs? ", re.MULTILINE)


def unmatched_because(task):
    """Why --output globs brought back nothing: a file the task left that
    was not kept, said in its stderr, was "matched no file it left" (the
    disk full, after the line that said so)."""
    stderr = (task.get("result") or {}).get("stderr")
    if isinstance(stderr, str) and OUTPUT_NOT_KEPT.search(stderr):
        return "brought back no file: its stderr says why"
    return "matched no file it left"


def no_outputs(task):
    """Why `rc get` has nothing to write: not yet, no --output, or globs
    that matched nothing."""
    globs = (task["payload"] or {}).get("outputs") or []
    if task["state"] not in TERMINAL_STATES:
        why = "no output files yet (it is %s)" % task["state"]
    elif not globs:
        why = "no output files: it was submitted without --output"
    else:
        why = "no output files: it %s, and %s %s" % (
            task["state"], ", ".join(render.cell(glob) for glob in globs), unmatched_because(task))
    return "task %d has %s; `rc files %d` lists what it has" % (task["task_id"], why,
                                                                 task["task_id"])


@contextlib.contextmanager
def users_umask():
    """The user's own umask while writing the user's files (see USER_UMASK)."""
    if USER_UMASK is None:
        yield
        return
    previous = os.umask(USER_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def submit_each(arguments, context):
    """One task on every matching online device, as a group; prints the
    group id, or with --wait the group once every task has ended."""
    if arguments.key:
        raise UsageError("--key does not go with --each (each device gets its own task)")
    try:
        payload = submitted_payload(arguments, context)
        requirements = checked_capabilities(tasks.parse_requirements(arguments.require))
        options = each_options(arguments)
    except tasks.TaskError as e:
        raise UsageError(str(e))
    group_id = fleet.submit_each(context.connection, context.config, arguments.task_type,
                                 payload, requirements, arguments.include_new, **options)
    left_out_paused(context, arguments.task_type, requirements)
    members = fleet.group(context.connection, group_id)["tasks"]
    context.logger.info("group_submitted", group_id=group_id, task_type=arguments.task_type,
                        tasks=len(members), user=user_name())
    context.audit("group_submitted", group_id=group_id, task_type=arguments.task_type,
                  devices=[m["device_id"] for m in members],
                  include_new=arguments.include_new, user=user_name())
    if not arguments.wait:
        context.out.write("%d\n" % group_id)
        return 0
    summary = wait_for_group(context.connection, group_id, arguments.wait_timeout)
    write_group(context, summary)
    unfinished = sum(1 for m in summary["tasks"] if m["state"] not in TERMINAL_STATES)
    if unfinished:
        raise CommandError("group %d: %d tasks not ended; gave up waiting" % (group_id, unfinished))
    if summary["summary"].get(COMPLETED, 0) < len(summary["tasks"]):
        raise CommandError("group %d: not every task completed" % group_id)
    return 0


def left_out_paused(context, task_type, requirements):
    """Say which fitting devices --each passed over because they take
    nothing new now, so the group is not mistaken for the whole fleet."""
    paused = fleet.paused_matching(context.connection, task_type,
                                   tasks.check_requirements(requirements))
    for device_id, reason in sorted(paused.items()):
        context.err.write("rc: left out %s: paused (%s)\n" % (device_id, reason))


def each_options(arguments):
    """submit's per-task options, checked before the group is made."""
    tasks.parse_priority(arguments.priority)
    options = {"priority": arguments.priority, "retry_on_failure": arguments.retry_on_failure,
               "depends_on": tasks.parse_task_ids(arguments.after)}
    if arguments.timeout is not None:
        options["timeout"] = tasks.parse_number("timeout", arguments.timeout)
    if arguments.retries is not None:
        options["retries"] = arguments.retries
    return options


def wait_for_group(connection, group_id, timeout=None):
    """The group once all its tasks have ended, or as it is at the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_version = None
    while True:
        version = db.data_version(connection)
        if version != seen_version:
            seen_version, summary = version, fleet.group(connection, group_id)
            if all(m["state"] in TERMINAL_STATES for m in summary["tasks"]):
                return summary
        if deadline is not None and time.monotonic() >= deadline:
            return summary
        time.sleep(WAIT_POLL_INTERVAL)


def group_row(member):
    output = (member["output"] or "").strip().splitlines()
    error = [line.strip() for line in (member["error"] or "").splitlines() if line.strip()]
    return {"DEVICE": member["device_id"], "TASK": member["task_id"], "STATE": member["state"],
            "OUTPUT": output[0] if output else "", "ERROR": error[-1] if error else ""}


def summary_line(summary):
    """3 tasks: 2 completed, 1 failed, 0 running (then any other states)."""
    counts = dict(summary)
    total = counts.pop("tasks")
    words = ["%d %s" % (counts.pop(name, 0), name) for name in (COMPLETED, FAILED, "running")]
    words += ["%d %s" % (count, name) for name, count in sorted(counts.items())]
    return "%d task%s: %s" % (total, "" if total == 1 else "s", ", ".join(words))


def write_group(context, summary):
    """A table, one line per device; when an output has more lines than
    one (`df -h /`), each device's whole output under a heading instead."""
    if any(len((m["output"] or "").strip().splitlines()) > 1 for m in summary["tasks"]):
        for member in summary["tasks"]:
            context.out.write(group_block(member))
    else:
        rows = [group_row(member) for member in summary["tasks"]]
        context.out.write(render.table(rows, GROUP_COLUMNS, context.width,
                                       colourize=context.colourize))
    context.out.write(summary_line(summary["summary"]) + "\n")


def group_block(member):
    """== DEVICE (task N, STATE), then its output as it printed it (control
    characters shown as "?": a device chose them), then its error's last line."""
    error = group_row(member)["ERROR"]
    text = "== %s (task %d, %s)\n" % (render.cell(member["device_id"]), member["task_id"],
                                      member["state"])
    text += with_newline(render.printable((member["output"] or "").rstrip("\n")))
    return text + ("error: %s\n" % render.cell(error) if error else "")


def cmd_map(arguments, context):
    """`rc map` lives in lib/rc/map_cli.py; its errors are this command's."""
    try:
        return map_cli.run(arguments, context, users_umask, each_options)
    except map_cli.MapUsageError as e:
        raise UsageError(str(e))
    except map_cli.MapError as e:
        raise CommandError(str(e))


def cmd_group(arguments, context):
    # The web terminal shows what GET /api/v1/groups/ID does: a page.
    summary = context.as_read(fleet.group(
        context.connection, arguments.group_id,
        most=None if context.actor == "cli" else tasks.MAX_PAGE_TASKS))
    if summary.get("more"):
        context.err.write("rc: %d more tasks not shown, past the %d the web terminal shows"
                          " (those not completed first); GET /api/v1/groups/%d/results has"
                          " them all\n" % (summary["more"], tasks.MAX_PAGE_TASKS,
                                            arguments.group_id))
    if arguments.format == "json":
        context.out.write(render.json_text(summary))
    elif arguments.format in ("csv", "tsv"):
        write_rows(context, arguments, [group_row(m) for m in summary["tasks"]],
                   GROUP_COLUMNS, summary)
    else:
        write_group(context, summary)


def user_name():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return None


def wait_for(connection, task_id, timeout=None, watch=None):
    """The task once it is terminal, or as it is when `timeout` runs out.
    PRAGMA data_version changes only when another connection commits, so the
    loop reads the task again only when something may have moved. `watch`
    (a health.StoppedWatch) says when the main node stops under the wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_version, task = None, None
    while True:
        if watch is not None:
            watch.look()
        version = db.data_version(connection)
        if version != seen_version:
            seen_version, task = version, tasks.get(connection, task_id)
            if task["state"] in TERMINAL_STATES:
                if watch is not None:
                    watch.ended()
                return task
        if deadline is not None and time.monotonic() >= deadline:
            return task
        time.sleep(WAIT_POLL_INTERVAL)


def report_outcome(context, task):
    """Exactly the task's output on stdout (a pipe gets it byte for byte; a
    terminal gets escape sequences shown as "?", since a device chose them),
    in full past the inline cap, as rc map prints it (the web terminal shows
    what is inline and says where the rest is); its stderr so on ours, as a
    command run here would show it; a one-line reason when it did not
    complete."""
    result = task.get("result") or {}
    write_stream(context, task, result, "output", context.out)
    if result.get("stderr"):
        context.out.flush()             # a terminal shows the two in the order written
        write_stream(context, task, result, "stderr", context.err)
    if task["state"] == COMPLETED:
        note_unmatched_outputs(context, task,
                               files.task_files(context.connection, task["task_id"]))
        return 0
    if task["state"] not in TERMINAL_STATES:
        raise CommandError("task %d is still %s; gave up waiting"
                           % (task["task_id"], task["state"]))
    raise CommandError("task %d %s%s" % (task["task_id"], task["state"],
                                         ": " + last_line(task) if last_line(task) else ""))


def write_stream(context, task, result, field, target):
    """The task's stdout ("output") or stderr on `target`, as report_outcome says."""
    # The web terminal (an actor other than the CLI) is a terminal too.
    terminal = context.actor != "cli" or hasattr(target, "isatty") and target.isatty()
    text = map_cli.stream(context.connection, task["task_id"], result, field,
                          STREAM_FIELDS.index(field))
    if isinstance(text, str):
        target.write(with_newline(render.printable(text) if terminal else text))
    elif context.actor != "cli":
        target.write(with_newline(render.printable(result.get(field) or "")))
        context.err.write("task %d's %s goes on past the inline cap: GET /api/v1/tasks/%d"
                          "/files/%s\n" % (task["task_id"], field,
                                           task["task_id"], text["name"]))
    else:
        notes = []
        map_cli.copy(context.connection, context.config, text, target, terminal, notes)
        for note in notes:
            context.err.write("rc: task %d: %s\n" % (task["task_id"], note))


def last_line(task):
    """The most telling line of why a task failed (a traceback ends with it).
    A command's error is only its exit status: its stderr's last line, which
    says why ("gzip: a.log: No such file or directory"), goes with it."""
    error = map_cli.last_line(task.get("error"))
    stderr = map_cli.last_line((task.get("result") or {}).get("stderr"))
    if error.startswith("exit status ") and stderr:
        return "%s (stderr: %s)" % (error, render.cell(render.shorten(stderr, STDERR_NOTE_MAX)))
    return error or stderr or map_cli.last_line(task["reason"])


def cmd_help(arguments, context):
    """`rc help [COMMAND]`: what `rc --help` and `rc COMMAND --help` print."""
    parser = build_parser(context.out)
    if arguments.name is None:
        parser.print_help()
        return
    parsers = command_parsers(parser)
    if arguments.name not in parsers:
        raise UsageError("no command %r; `rc help` lists them" % arguments.name)
    parsers[arguments.name].print_help()


def cmd_why(arguments, context):
    """explain.why, and which main-node program it waits for, if one is not running."""
    answer = explain.why(context.connection, arguments.task_id)
    if tasks.get(context.connection, arguments.task_id)["state"] not in TERMINAL_STATES:
        answer += health.programs_note(context.config)
    context.out.write(answer + "\n")


def cmd_cancel(arguments, context):
    if (arguments.task_id is None) == (arguments.group is None):
        raise UsageError("rc cancel: give a task ID or --group ID (not both)")
    if arguments.group is not None:
        return cancel_group(arguments.group, context)
    state = tasks.cancel(context.connection, arguments.task_id)
    context.logger.info("task_cancel_requested", task_id=arguments.task_id, state=state,
                        user=user_name())
    context.audit("task_cancel_requested", task_id=arguments.task_id, state=state,
                  user=user_name())
    context.out.write("%s\n" % state)


def cancel_group(group_id, context):
    """Every task of a group that has not ended: a map's, a `submit
    --each`'s, or a Python client's (the group its Ctrl-C message names)."""
    queued, stopping = tasks.cancel_group(context.connection, group_id, active_too=True)
    context.logger.info("group_cancel_requested", group_id=group_id, queued=queued,
                        running=stopping, user=user_name())
    context.audit("group_cancel_requested", group_id=group_id, queued=queued,
                  running=stopping, user=user_name())
    context.out.write("group %d: %s cancelled, %s asked to stop\n" % (
        group_id, render.counted(queued, "queued task"),
        render.counted(stopping, "running task")))


# -- the fleet --------------------------------------------------------------------

def cmd_drain(arguments, context):
    handed_back = fleet.drain(context.connection, context.config, arguments.device_id,
                              arguments.now)
    context.audit("device_drained", device_id=arguments.device_id, now=arguments.now,
                  handed_back=handed_back, user=user_name())
    if arguments.now:
        context.out.write("%s drained: %s handed back to the queue\n"
                          % (arguments.device_id, render.counted(handed_back, "task")))
    else:
        context.out.write("%s drained: no new tasks; its running tasks finish there\n"
                          % arguments.device_id)


def cmd_resume(arguments, context):
    fleet.resume(context.connection, context.config, arguments.device_id)
    context.audit("device_resumed", device_id=arguments.device_id, user=user_name())
    device = devices.get(context.connection, arguments.device_id)
    # Drained no more here; its worker may still hold itself back (its own rule,
    # or `rc broadcast drain`, which only a restart of the worker undoes).
    if not device["available"]:
        context.out.write("%s resumed, but its worker takes nothing new yet: %s\n"
                          % (arguments.device_id, render.cell(device["unavailable_reason"]
                                                              or "unavailable")))
    else:
        context.out.write("%s resumed: it takes new tasks again\n" % arguments.device_id)


def cmd_forget(arguments, context):
    handed_back = fleet.forget(context.connection, context.config, arguments.device_id)
    context.audit("device_forgotten", device_id=arguments.device_id,
                  handed_back=handed_back, user=user_name())
    context.out.write("%s forgotten: it can no longer connect; %s handed back to the"
                      " queue; its history stays (`rc devices --all`)\n"
                      % (arguments.device_id, render.counted(handed_back, "task")))


def cmd_revoke(arguments, context):
    with db.write(context.connection):
        revoked = devices.revoke(context.connection, arguments.device_id)
    if not revoked:
        raise CommandError(devices.unknown(context.connection, arguments.device_id))
    bell.ring(context.config.run_dir, bell.SERVER)      # rc-server hangs up on it now
    context.audit("device_revoked", device_id=arguments.device_id, user=user_name())
    context.out.write("%s revoked: rc-server closes its connection and it can no longer"
                      " connect; other devices keep working\n" % arguments.device_id)


def cmd_label(arguments, context):
    labels = fleet.label(context.connection, arguments.device_id, arguments.labels)
    context.audit("device_labelled", device_id=arguments.device_id,
                  changes=arguments.labels, user=user_name())
    context.out.write("%s labels: %s\n" % (arguments.device_id, labels_text(labels) or "none"))


def cmd_role(arguments, context):
    fleet.set_role(context.connection, arguments.device_id, arguments.role)
    context.audit("device_role_set", device_id=arguments.device_id, role=arguments.role,
                  user=user_name())
    device = devices.get(context.connection, arguments.device_id)
    context.out.write("%s role: %s%s\n" % (
        arguments.device_id, render.cell(device["role"] or "none"),    # the device's, maybe
        " (it reports %s)" % render.cell(device["reported_role"] or "none") if arguments.role
        else " (as it reports)"))


def cmd_slots(arguments, context):
    """The most slots a device gets, whatever it claims: shown, or set
    (`default` goes back to max_device_slots)."""
    connection, device_id = context.connection, arguments.device_id
    if arguments.slots is not None:
        limit = slots_limit(arguments.slots)
        with db.write(connection):
            fleet.known_device(connection, device_id)
            devices.set_slots_limit(connection, device_id, limit,
                                    context.config.max_device_slots)
        bell.ring(context.config.run_dir, bell.SCHEDULER)
        context.audit("device_slots_set", device_id=device_id, slots=limit, user=user_name())
    fleet.known_device(connection, device_id)
    row = connection.execute("SELECT slots, slots_claimed, slots_limit FROM devices"
                             " WHERE device_id = ?", (device_id,)).fetchone()
    allowed = row["slots_limit"] or context.config.max_device_slots
    context.out.write("%s slots: %d (it claims %s; %s allows %d)\n" % (
        device_id, row["slots"], row["slots_claimed"] or row["slots"],
        "rc slots" if row["slots_limit"] else "max_device_slots", allowed))


def slots_limit(text):
    """`default` (None) or a whole number of slots a device may have."""
    if text == "default":
        return None
    if not text.isdigit() or not 1 <= int(text) <= devices.MAX_SLOTS:
        raise UsageError("slots must be 1 to %d, or default, not %r" % (devices.MAX_SLOTS, text))
    return int(text)


def cmd_broadcast(arguments, context):
    try:
        targets = tasks.parse_requirements(arguments.require)
    except tasks.TaskError as e:
        raise UsageError(str(e))
    control_id = fleet.broadcast(context.connection, context.config, arguments.control,
                                 targets)
    context.audit("control_broadcast", control_id=control_id, command=arguments.control,
                  targets=targets, user=user_name())
    context.out.write("%d\n" % control_id)


def cmd_control(arguments, context):
    status = fleet.control_status(context.connection, arguments.control_id)
    if arguments.format == "json":
        context.out.write(render.json_text(status))
        return
    context.out.write("control %d: %s to %s\n" % (
        status["control_id"], status["command"],
        " ".join("%s=%s" % item for item in status["targets"].items()) or "every worker"))
    if not status["acks"]:
        context.out.write("no acknowledgements yet\n")
        return
    rows = [{"DEVICE": ack["device_id"], "TIME": ago(ack["time"], time.time()),
             "OK": "yes" if ack["ok"] else "no", "DETAIL": ack["detail"]}
            for ack in status["acks"]]
    context.out.write(render.table(rows, ACK_COLUMNS, context.width))


def cmd_monitor(arguments, context):
    """Draw the frame; without --once, draw it again whenever the database
    changes, until interrupted."""
    if context.main_node_stopped is not None:
        # Nothing moves with the main node stopped: one frame, devices as last seen.
        context.out.write(monitor_frame(context.connection, context.width or 80,
                                        context.colour, context.main_node_stopped))
        return
    if arguments.once:
        context.out.write(monitor_frame(context.connection, context.width or 80,
                                        context.colour))
        return
    seen = None
    with keys_one_at_a_time(sys.stdin) as keys:
        while True:
            version = db.data_version(context.connection)
            if version != seen:
                seen = version
                width = shutil.get_terminal_size().columns
                context.out.write("\x1b[H\x1b[2J" + monitor_frame(
                    context.connection, width, context.colour) + MONITOR_LEAVE_HINT)
                context.out.flush()
            if QUIT_KEY in keys(MONITOR_POLL_INTERVAL):
                return 0


MONITOR_LEAVE_HINT = "\nq or Ctrl-C to leave\n"
QUIT_KEY = "q"


@contextlib.contextmanager
def keys_one_at_a_time(stream):
    """Yields keys(timeout): the keys pressed within `timeout` seconds,
    read without waiting for Enter while the terminal is in cbreak mode
    (restored on the way out). Without a terminal: sleeps, returns none."""
    def no_keys(timeout):
        time.sleep(timeout)
        return ""
    try:
        import select
        import termios
        import tty
        descriptor = stream.fileno()
        saved = termios.tcgetattr(descriptor) if os.isatty(descriptor) else None
    except (ImportError, AttributeError, OSError, ValueError):
        saved = None
    if saved is None:
        yield no_keys
        return

    def keys(timeout):
        if select.select([descriptor], [], [], timeout)[0]:
            return os.read(descriptor, 64).decode("utf-8", "replace")
        return ""
    tty.setcbreak(descriptor)
    try:
        yield keys
    finally:
        termios.tcsetattr(descriptor, termios.TCSADRAIN, saved)


def monitor_frame(connection, width, colour=False, stopped_at=None):
    """Cluster utilisation, the device grid and the active tasks with their
    progress, in `width` columns; with the main node stopped (`stopped_at`),
    it says so first and shows every device offline, as last seen."""
    records = devices.list_devices(connection)
    if stopped_at is not None:
        records = [dict(device, status=OFFLINE, connected=False) for device in records]
    online = [d for d in records if d["status"] == ONLINE]
    slots = devices.total_slots(online)
    busy = devices.busy_slots(online)
    cpus = [fraction(device_metrics(d).get("cpu_percent")) for d in online]
    cpus = [value for value in cpus if value is not None]
    counts = tasks.counts_by_state(connection)
    words = ["rc monitor", time.strftime("%H:%M:%S"),
             "devices %d/%d online" % (len(online), len(records)), "queued %d" % counts[QUEUED],
             "running %d" % (counts[RUNNING] + counts[ASSIGNED]),
             "completed %d" % counts[COMPLETED],
             "failed %d" % (counts[FAILED] + counts[TIMED_OUT])]
    lines = fitted_words(words, width) + [
        render.progress_line("slots %d/%d" % (busy, slots),
                             busy / slots if slots else None, width, colour, calm=True),
        render.progress_line("cpu (mean)", sum(cpus) / len(cpus) if cpus else None,
                             width, colour), ""]
    if stopped_at is not None:
        lines.insert(0, "main node %s" % stopped_text(stopped_at))
    text = "\n".join(lines) + "\n"
    text += render.device_grid([grid_cell(d) for d in records], width, colour) or \
        "no devices yet; `rc join` shows how to add one\n"
    active = [t for state in (RUNNING, ASSIGNED)
              for t in tasks.list_tasks(connection, state, limit=MONITOR_TASKS)]
    if active:
        text += "\nactive tasks:\n"
        for task in active[:MONITOR_TASKS]:
            text += monitor_task_lines(task, width, colour)
    return text


def fitted_words(words, width):
    """Words joined by two spaces, in as many lines as `width` needs."""
    lines = [words[0]]
    for word in words[1:]:
        if width and len(lines[-1]) + 2 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] += "  " + word
    return lines


def monitor_task_lines(task, width, colour):
    """A task's progress bar in `width` (a narrow screen leaves out its type
    and device), then its own progress message, if it sent one."""
    device = render.cell(task["device_id"])[:16]
    label = ("%5d %-9s" % (task["task_id"], task["state"]) if width and width < 60 else
             "%5d %-11s %-9s %-16s" % (task["task_id"], task["task_type"][:11],
                                       task["state"], device))
    progress = task["progress"] / 100.0 if task["progress"] is not None else None
    text = render.progress_line(label, progress, width, colour, calm=True) + "\n"
    if task.get("progress_message"):
        # One line, whatever a device sent (up to 200 characters, newlines,
        # bidi overrides): it drew lines of its own into the screen otherwise.
        text += "      " + render.shorten(render.cell(task["progress_message"]),
                                          max((width or 80) - 6, 10)) + "\n"
    return text


def cmd_logs(arguments, context):
    if context.actor != "cli" and arguments.lines > MAX_WEB_LINES:
        # What /text/logs shows at most: `logs --level info -n 100000000` read
        # every log back to its first line, and held it, in rc-web.
        arguments.lines = MAX_WEB_LINES
        context.err.write("rc: the last %d lines, the most the web terminal shows;"
                          " `rc logs` on the main node shows more\n" % MAX_WEB_LINES)
    wanted = LogFilter(arguments.task, arguments.device, arguments.level)
    paths = log_paths(context.config.log_dir, arguments.program)
    offsets, lines = Offsets(), []
    for path in paths:
        if wanted.active:
            # A task's lines may be anywhere in the files, rotated ones too;
            # only the last `lines` found are kept (360 MB of logs at most).
            offsets[path] = os.path.getsize(path)
            parsed = wanted.last_records([(path, offsets[path])] + [
                (older, None) for older in rotated_paths(path)], arguments.lines)
        else:
            tail, offsets[path] = tail_lines(path, arguments.lines + LOG_CONTEXT_LINES)
            parsed = parse_log_lines(tail, program_of(path))
        lines.extend(parsed[-arguments.lines:] if arguments.lines else [])
    device_lines = [DeviceLines(context.connection, context.config, device_id, wanted,
                                logs_here=device_id == local_device_id())
                    for device_id in devices_logged(context.connection, arguments)]
    lines.extend(device_lines_new(device_lines, lines))
    lines.sort(key=lambda line: line[0])
    if not lines and arguments.task is not None:
        no_such_task(context, arguments.task)
    if not lines and arguments.device is not None and not arguments.follow:
        no_such_device(context, arguments.device)
    write_log_lines(context, lines[-arguments.lines:] if arguments.lines else [])
    if arguments.follow:
        follow_logs(context, arguments.program, offsets, wanted, device_lines)


def devices_logged(connection, arguments):
    """The devices whose own lines (forwarded by their workers, kept in the
    database) `rc logs` adds to the programs': the one --device names, or
    with --task every device the task ran on."""
    if arguments.program is not None:
        return []
    if arguments.device is not None:
        return [arguments.device]
    if arguments.task is not None:
        return [row[0] for row in connection.execute(
            "SELECT DISTINCT device_id FROM task_events WHERE task_id = ? AND device_id IS"
            " NOT NULL", (arguments.task,))]
    return []


def device_lines_new(device_lines, file_lines):
    """The devices' lines kept since the last look, but those read from the
    log files too (`file_lines`, read just before): the main node's own
    worker logs there and forwards its warnings and task events as well."""
    for source in device_lines:
        source.read_in_files(file_lines)
    return [line for source in device_lines for line in source.new()]


def no_such_task(context, task_id):
    """`rc logs --task N` found nothing: an error when there is no task N
    (a task past its retention may still have lines, so those are shown)."""
    try:
        tasks.get(context.connection, task_id)
    except tasks.TaskError:
        raise CommandError("no task %d (and no log line names it)" % task_id)


def no_such_device(context, device_id):
    """`rc logs --device ID` found nothing: an error when no device has that
    id (a typo, a case that differs), rather than an empty answer."""
    if context.connection.execute("SELECT 1 FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone() is None:
        raise CommandError("%s (and no log line names it)"
                           % devices.unknown(context.connection, device_id))


def format_log_line(record, colour=False):
    return render.log_line(record, colour)


def write_log_lines(context, lines):
    for _, record in lines:
        context.out.write(format_log_line(record, context.colour) + "\n")
    context.out.flush()


def follow_logs(context, program, offsets, wanted=None, device_lines=()):
    """Print lines as they are appended, until interrupted; a file that
    shrank was rotated, so it is read again from the start. The files are
    read before the devices' lines: a worker logs a line, then forwards it."""
    wanted = wanted or LogFilter()
    while True:
        time.sleep(FOLLOW_POLL_INTERVAL)
        lines = new_lines(context.config.log_dir, program, offsets, wanted)
        lines.extend(device_lines_new(device_lines, lines))
        lines.sort(key=lambda line: line[0])
        write_log_lines(context, lines)


def cmd_health(arguments, context):
    """One line and the monitoring-plugin exit code: 0 OK, 1 WARNING, 2 CRITICAL."""
    report = health.check(context.config)
    if arguments.format == "json":
        context.out.write(render.json_text(report.as_dict()))
    else:
        context.out.write(report.line() + "\n")
        if arguments.verbose:
            for finding in report.findings:
                context.out.write("  %-8s %-10s %s\n" % (health.NAMES[finding.status],
                                                        finding.name, finding.message))
    return report.status


def cmd_stats(arguments, context):
    rows = stats.history(context.connection, arguments.minutes)
    if arguments.format == "json":
        context.out.write(render.json_text({"summary": stats.summary(rows), "minutes": rows}))
    elif arguments.format in ("csv", "tsv"):
        write_rows(context, arguments, rows, stats.COLUMNS, rows)
    else:
        context.out.write(stats.text(rows, context.width or 80))


def cmd_backup(arguments, context):
    try:
        summary = rc_backup.backup(context.config.db_path, arguments.file, arguments.force)
    except rc_backup.BackupError as e:
        raise CommandError(str(e))
    context.logger.info("backup_made", **summary)
    context.out.write("%(path)s: %(tasks)d tasks, %(devices)d devices, schema %(schema_version)d,"
                      " %(bytes)d bytes, integrity %(integrity)s\n" % summary)


def cmd_restore(arguments, context):
    config = context.config
    if os.path.exists(health.supervisor_socket(config)):
        try:
            health.program_states(config)
            raise CommandError("the main node is running; `make stop` first, then restore")
        except (OSError, health.SupervisorError):
            pass        # a socket left by a supervisord that died
    try:
        summary = rc_backup.restore(arguments.file, config.db_path,
                                    device_secrets.ensure_key(config))
    except (rc_backup.BackupError, device_secrets.DeviceKeyError) as e:
        raise CommandError(str(e))
    context.logger.info("backup_restored", source=os.path.abspath(arguments.file), **summary)
    context.out.write("restored %s: %d tasks, %d devices; `make run` to start\n"
                      % (arguments.file, summary["tasks"], summary["devices"]))
    if summary.get("devices_to_rejoin"):
        context.out.write(rc_backup.REJOIN_NOTICE % dict(summary, key=device_secrets.key_path(config)))


def cmd_token(arguments, context):
    config = context.config
    if arguments.fingerprint:
        if not config.tls:
            raise CommandError("the worker port does not use TLS (tls is false): no fingerprint")
        context.out.write(tls.fingerprint(config) + "\n")
        return
    if arguments.rotate and arguments.admin:
        # docs/http.md said so (a leaked admin token), and it was refused.
        token = state_dir.rotate_token(config, config.admin_token_path)
        context.audit("admin_token_rotated", user=user_name())
        context.out.write("%s\nHTTP clients (RC_TOKEN, curl, the dashboard's terminal) need this"
                          " token now; the old one and every stream session it opened stop"
                          " working\n" % token)
        return
    if arguments.rotate:
        token = state_dir.rotate_token(config)
        context.audit("join_token_rotated", user=user_name())
        context.out.write("%s\nnew devices join with this token; devices that have joined"
                          " keep working\n" % token)
        return
    context.out.write(read_token(config.admin_token_path if arguments.admin
                                 else config.token_path) + "\n")


def read_token(path):
    try:
        return state_dir.read_secret(path)
    except FileNotFoundError:
        raise CommandError("no token at %s; run `make install` first" % path)
    except ValueError as e:
        raise CommandError(str(e))


def cmd_join(arguments, context):
    config = context.config
    token = read_token(config.token_path)
    address, web_address = reachable_host(config.tcp_host), reachable_host(config.web_host)
    context.out.write("Dashboard: http://%s:%d/\n" % (web_address, config.web_port))
    context.out.write("Copy %s to the device, then run there:\n" % rc_config.WORKER_PATH)
    options = " --fingerprint=%s" % tls.fingerprint(config) if config.tls else ""
    # The worker fetches worker.py from the dashboard's port for `rc broadcast
    # upgrade`, 5000 unless told: a cluster on another RC_WEB_PORT tells it.
    if config.web_port != defaults.WEB_PORT:
        options += " --web-port=%d" % config.web_port
    # --token=VALUE: a token from before may begin with "-", which a parser
    # would take for an option after a bare --token.
    start = "python3 worker.py --join %s:%d %s%s" % (
        address, config.tcp_port, shlex.quote("--token=" + token), options)
    context.out.write(start + "\n")
    context.out.write("Or fetch it from the dashboard and start it, in one line:\n")
    context.out.write("curl -fsSO http://%s:%d/worker.py && %s\n"
                      % (web_address, config.web_port, start))


def reachable_host(listen_host):
    """Where a device reaches a port bound to `listen_host`: the address
    itself when it names one (127.0.0.1 reaches no other machine, and a LAN
    address other than it would refuse), this machine's LAN address when
    it listens on all of them."""
    if listen_host in ("", "0.0.0.0", "::"):
        return lan_address()
    return "[%s]" % listen_host if ":" in listen_host else listen_host


def lan_address():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(LAN_PROBE_ADDRESS)
            address = probe.getsockname()[0]
        if not address.startswith("0."):
            return address
    except OSError:
        pass
    return socket.gethostname()


def cmd_wait_ready(arguments, context):
    """Wait until rc-server and rc-web accept connections and a worker is
    connected (for `make run`, so the next command can run a task)."""
    config = context.config
    deadline = time.monotonic() + arguments.timeout
    # A supervisord just started spawns its programs when its first poll
    # ends, a second later, unless something wakes it: a connection does.
    health.supervisor_answers(config)
    waiting = [("rc-server on %s:%d" % (local_host(config.tcp_host), config.tcp_port),
                lambda: accepts(local_host(config.tcp_host), config.tcp_port)),
               ("rc-web on %s:%d" % (local_host(config.web_host), config.web_port),
                lambda: accepts(local_host(config.web_host), config.web_port)),
               ("a connected worker",
                lambda: devices.counts(context.connection)["connected"])]
    while waiting:
        if waiting[0][1]():
            waiting.pop(0)
        elif len(waiting) == 1 and local_worker_failing(config):
            raise CommandError("the local worker (rc-worker) exits as it starts: %s"
                               % local_worker_failing(config))
        elif time.monotonic() >= deadline:
            raise CommandError("no sign of %s after %g s; see `rc logs`"
                               % (waiting[0][0], arguments.timeout))
        else:
            time.sleep(READY_POLL_INTERVAL)
    report = wait_healthy(config, deadline)
    if report.status == health.OK:
        context.out.write("cluster healthy: %s\n" % report.line())
    elif report.status == health.WARNING and programs_running(report):
        # Up, with something a person should look at (an old task nothing
        # fits, a filling disk, fewer devices back than
        # health_min_devices_online) that waiting longer would not change.
        context.out.write("cluster up, with a warning: %s\n" % report.line())
    else:
        raise CommandError("the main node started but is not healthy: %s; `rc health -v`"
                           " and `rc logs` say more" % report.line())


def local_worker_failing(config):
    """Why rc-worker stopped, as its log says (last_word), when
    supervisord finds it exiting as it starts (BACKOFF, FATAL: a wrong
    option in local_worker_options, a refusal), and where its log is; ""
    while it starts or runs."""
    try:
        state = health.program_states(config).get("rc-worker")
    except (OSError, health.SupervisorError):
        return ""
    if state not in ("BACKOFF", "FATAL"):
        return ""
    path = os.path.join(config.log_dir, "rc-worker.log")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    return "%s (%s, %s)" % (last_word(lines)[:600] or "it wrote nothing", state, path)


def last_word(lines):
    """Why the worker's last run stopped: its error (`device_id_taken: the
    main node already knows ...`) or a line that is not its JSON
    (argparse's `worker.py: error: ...`), whichever came last; else its last
    line. After its error a worker logs worker_stopping and worker_stopped,
    and make run said only `{"event":"worker_stopped"}` of why it stopped.
    Not past the run's worker_started: an older run's error is not why."""
    for line in reversed(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return line.strip()
        if not isinstance(record, dict) or record.get("event") == "worker_started":
            break
        if record.get("level") in ("error", "critical"):
            return "%s: %s" % (record.get("event"), record.get("message") or record.get("error")
                               or line.strip())
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


# Health findings that settle by themselves in the first seconds after a
# start: supervisord's STARTING turns RUNNING after startsecs, the local
# worker comes online. The others (disk, database) would not by waiting.
SETTLING_CHECKS = ("programs", "devices")


def wait_healthy(config, deadline):
    """`rc health`'s report once the settling checks pass, or at the deadline."""
    while True:
        report = health.check(config)
        if settled(report) or time.monotonic() >= deadline:
            return report
        time.sleep(READY_POLL_INTERVAL)


def settled(report):
    """Whether waiting longer could change the settling checks: not once
    they pass, nor once every device the cluster knows is online (a
    health_min_devices_online above the fleet's size stays a warning)."""
    return all(f.status == health.OK or (f.name == "devices" and every_device_online(f))
               for f in report.findings if f.name in SETTLING_CHECKS)


def every_device_online(finding):
    return 0 < finding.values.get("devices_online", 0) == finding.values.get("devices_total")


def programs_running(report):
    return all(f.status == health.OK for f in report.findings if f.name == "programs")


# -- supervisorctl, with the right config and RC_HOME from anywhere ----------------

SUPERVISOR_CONF = os.path.join(rc_config.CHECKOUT, "etc", "supervisord.conf")
CTL_ACTIONS = ("status", "start", "stop", "restart", "tail")
MAIN_PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-files", "rc-web", "rc-worker")
NOT_RUNNING = 3     # LSB's "program is not running", as supervisorctl status uses it
BROKEN_PIPE = 128 + signal.SIGPIPE      # a shell's status for a reader that left (`| head`)
# supervisorctl, ended by SIGPIPE as `cat` would be when its reader leaves
# (`rc ctl status | head -1`): Python ignores SIGPIPE, and supervisorctl
# printed a traceback of BrokenPipeError instead.
SUPERVISORCTL = ("import runpy, signal; signal.signal(signal.SIGPIPE, signal.SIG_DFL);"
                 " runpy.run_module('supervisor.supervisorctl', run_name='__main__')")


def cmd_ctl(arguments, context):
    """supervisorctl ACTION [PROGRAM...] for this cluster (its RC_HOME and
    etc/supervisord.conf) from any directory; exit 3 when the main node
    (or, for status, one of its programs) is not running."""
    config = context.config
    for name in arguments.programs:
        if name not in MAIN_PROGRAMS + ("all",):
            raise UsageError("no program %r (programs: %s, or all)"
                             % (name, ", ".join(MAIN_PROGRAMS)))
    if arguments.action in ("start", "stop", "restart", "tail") and not arguments.programs:
        raise UsageError("ctl %s needs a program (%s, or all)"
                         % (arguments.action, ", ".join(MAIN_PROGRAMS)))
    if arguments.action == "tail" and len(arguments.programs) != 1:
        raise UsageError("ctl tail takes one program")
    if not health.supervisor_answers(config):
        context.out.write("not running: no main node for RC_HOME=%s; `make run` starts it\n"
                          % config.home)
        return NOT_RUNNING
    import subprocess       # here only: ~4 ms of every other command's start
    argv = [sys.executable, "-c", SUPERVISORCTL, "-c", SUPERVISOR_CONF,
            arguments.action] + (["-f"] if arguments.follow else []) + arguments.programs
    context.out.flush()
    status = subprocess.call(argv, env=dict(os.environ, RC_HOME=config.home),
                             stdout=context.out.fileno() if has_fileno(context.out) else None)
    return BROKEN_PIPE if status == -signal.SIGPIPE else status


def has_fileno(stream):
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def local_host(listen_host):
    return "127.0.0.1" if listen_host in ("", "0.0.0.0", "::") else listen_host


def accepts(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def cmd_local_worker(arguments, context):
    config = context.config
    extra = [arg for arg in arguments.worker_args if arg != "--"]
    argv = [sys.executable, rc_config.WORKER_PATH, "--join", "127.0.0.1:%d" % config.tcp_port,
            "--token-file", config.token_path, "--device-id", local_device_id(),
            # Its device secret lives with the main node's state, not in ~/.rc-worker.
            "--state-dir", os.path.join(config.home, "worker"), "--web-port",
            str(config.web_port)]
    if config.tls:
        argv += ["--fingerprint", tls.fingerprint(config)]
    # Its tasks must not read var/ (the admin token, the TLS key, the database)
    # nor write the worker.py every device downloads. The worker hides the one
    # and binds the other read-only in a mount namespace where the kernel lets
    # it, and as root runs tasks as uids of their own; a worker that can do
    # neither accepts only echo, sleep and system_info, and logs why.
    argv += ["--hide", config.home, "--read-only", rc_config.CHECKOUT]
    argv += config.local_worker_options + extra
    context.out.flush()
    program.end_with_supervisord(config.run_dir)
    os.execv(sys.executable, argv)


def local_device_id():
    name = DEVICE_ID_CHARACTERS.sub("-", socket.gethostname()) or "main"
    return name[:MAX_DEVICE_ID - len("-local")] + "-local"


# -- grammar ------------------------------------------------------------------------

def build_parser(out):
    parser = Parser(prog="rc", out=out,
                    description="Look after a Retire-Cluster from its main node.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formats = Parser(add_help=False, out=out)
    group = formats.add_mutually_exclusive_group()
    for name in ("json", "csv", "tsv"):
        group.add_argument("--" + name, dest="format", action="store_const", const=name,
                           help="output %s" % name.upper())
    formats.add_argument("--no-header", action="store_true",
                         help="leave out the header line (table, CSV, TSV)")
    as_json = Parser(add_help=False, out=out)
    as_json.add_argument("--json", dest="format", action="store_const", const="json",
                         help="output JSON")

    def command(name, handler, help, parents=(), aliases=()):
        sub = commands.add_parser(name, help=help, description=help, out=out,
                                  parents=list(parents), aliases=list(aliases))
        sub.set_defaults(handler=handler)
        return sub

    sub = command("help", cmd_help, "list the commands, or one command's options")
    sub.add_argument("name", nargs="?", metavar="COMMAND")
    command("init", cmd_init, "create the state directory, database and tokens")
    command("status", cmd_status, "devices online and tasks by state", [formats])
    sub = command("devices", cmd_devices, "list the devices", [formats])
    sub.add_argument("--grid", action="store_true",
                     help="one box per device: state, CPU, memory, battery")
    sub.add_argument("--all", action="store_true", help="forgotten devices too")
    sub = command("device", cmd_device, "everything about one device", [as_json])
    sub.add_argument("device_id", metavar="ID")
    sub = command("tasks", cmd_tasks, "list tasks, newest first", [formats])
    sub.add_argument("--state", choices=TASK_STATES, help="only tasks in this state")
    sub.add_argument("--device", metavar="ID", help="only tasks given to this device")
    sub.add_argument("--limit", type=whole_number, default=DEFAULT_TASK_LIMIT, metavar="N",
                     help="at most N tasks (default %d)" % DEFAULT_TASK_LIMIT)
    sub = command("task", cmd_task, "one task: result, error and events", [as_json])
    sub.add_argument("task_id", type=whole_number, metavar="ID")
    add_submit_arguments(command("submit", cmd_submit, "queue a task"))
    sub = command("wait", cmd_wait, "wait until a task ends; print its output and stderr, exit 1"
                  " unless it completed (as submit --wait)")
    sub.add_argument("task_id", type=whole_number, metavar="ID")
    sub.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="give up waiting after this long (exit 1; the task goes on)")
    tail_cli.add_arguments(command("tail", cmd_tail, "a running task's output so far (-f: as"
                                   " it comes, until it ends)"))
    sub = command("files", cmd_files, "the files a task reads and left (inputs, outputs,"
                  " long stdout/stderr, checkpoint)", [formats])
    sub.add_argument("task_id", type=whole_number, metavar="ID")
    sub = command("get", cmd_get, "write a task's output files (or those named) into a"
                  " directory; prints each path")
    sub.add_argument("task_id", type=whole_number, metavar="ID")
    sub.add_argument("names", nargs="*", default=[], metavar="NAME")
    sub.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                     help="where to write them (default: here)")
    map_cli.add_arguments(command("map", cmd_map, "run a command once per input (arguments,"
                                  " stdin lines or --files), as GNU Parallel"))
    sub = command("group", cmd_group, "each device's task of a `submit --each` (or a map's"
                  " tasks, with where each ran), side by side", [formats])
    sub.add_argument("group_id", type=whole_number, metavar="ID")
    sub = command("why", cmd_why, "why a task is where it is (e.g. still queued)")
    sub.add_argument("task_id", type=whole_number, metavar="ID")
    sub = command("cancel", cmd_cancel, "cancel a task (prints its state after), or every"
                  " task of a group that has not ended")
    sub.add_argument("task_id", type=whole_number, metavar="ID", nargs="?")
    sub.add_argument("--group", type=whole_number, metavar="ID",
                     help="a map's, a `submit --each`'s or a Python client's group")
    sub = command("drain", cmd_drain, "no new tasks for a device; its running ones finish")
    sub.add_argument("device_id", metavar="DEVICE")
    sub.add_argument("--now", action="store_true",
                     help="hand its tasks back to the queue at once (not charged to them)")
    sub = command("resume", cmd_resume, "a drained device takes new tasks again")
    sub.add_argument("device_id", metavar="DEVICE")
    sub = command("forget", cmd_forget, "retire a device for good; its history stays")
    sub.add_argument("device_id", metavar="DEVICE")
    sub = command("revoke", cmd_revoke, "a device's secret stops working; it cannot connect")
    sub.add_argument("device_id", metavar="DEVICE")
    sub = command("label", cmd_label, "set a device's labels (KEY= removes one)")
    sub.add_argument("device_id", metavar="DEVICE")
    sub.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    sub = command("role", cmd_role, "the role the scheduler sees for a device (\"\" undoes it)")
    sub.add_argument("device_id", metavar="DEVICE")
    sub.add_argument("role", metavar="ROLE")
    sub = command("slots", cmd_slots, "the most slots a device gets, whatever it claims"
                  " (default: max_device_slots)")
    sub.add_argument("device_id", metavar="DEVICE")
    sub.add_argument("slots", metavar="N", nargs="?", help="1-%d, or default" % devices.MAX_SLOTS)
    sub = command("broadcast", cmd_broadcast, "a control message to connected workers;"
                  " prints its id")
    sub.add_argument("control", choices=fleet.CONTROL_COMMANDS, metavar="COMMAND",
                     help=", ".join(fleet.CONTROL_COMMANDS))
    sub.add_argument("--require", action="append", default=[], metavar="KEY=VALUE",
                     help="only the workers that meet it, as in submit")
    sub = command("control", cmd_control, "which workers acknowledged a broadcast", [as_json])
    sub.add_argument("control_id", type=whole_number, metavar="ID")
    sub = command("logs", cmd_logs, "the programs' logs, merged by time")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    sub.add_argument("--program", metavar="NAME", help="only this program's log")
    sub.add_argument("-n", "--lines", type=whole_number, default=DEFAULT_LOG_LINES, metavar="N",
                     help="the last N lines (default %d)" % DEFAULT_LOG_LINES)
    sub.add_argument("--task", type=whole_number, metavar="ID",
                     help="only lines about this task: submit, assignment, start, result")
    sub.add_argument("--device", metavar="ID", help="only lines about this device, and its"
                     " worker's own warnings, errors and task events")
    sub.add_argument("--level", choices=list(LEVELS), help="only this level and above")
    sub = command("health", cmd_health, "one line for cron and monitoring; exit 0 OK,"
                  " 1 WARNING, 2 CRITICAL", [as_json])
    sub.add_argument("-v", "--verbose", action="store_true", help="every check on its own line")
    # Also `rc stats`; named history so that "stat" + Tab still means status.
    sub = command("history", cmd_stats, "cluster history per minute: throughput, failures,"
                  " durations, queue, devices", [formats], aliases=["stats"])
    sub.add_argument("--minutes", type=at_least_one, default=60, metavar="N",
                     help="how far back (default 60)")
    sub = command("backup", cmd_backup, "a consistent copy of the live database")
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("--force", action="store_true", help="replace FILE if it exists")
    sub = command("restore", cmd_restore, "put a backup in place of the database"
                  " (with the main node stopped)")
    sub.add_argument("file", metavar="FILE")
    sub = command("token", cmd_token, "print the join token workers use")
    sub.add_argument("--admin", "--web", dest="admin", action="store_true",
                     help="print the admin token (HTTP: Authorization: Bearer) instead")
    sub.add_argument("--rotate", action="store_true",
                     help="issue a new join token (devices that have joined keep working),"
                     " or with --admin a new admin token")
    sub.add_argument("--fingerprint", action="store_true",
                     help="print the SHA-256 fingerprint of the worker port's TLS"
                          " certificate (a worker's --fingerprint) instead")
    sub = command("monitor", cmd_monitor, "a live view: utilisation, devices, active tasks")
    sub.add_argument("--once", action="store_true", help="draw it once and exit")
    command("join", cmd_join, "print the command that joins a device to this cluster")
    sub = command("ctl", cmd_ctl, "the main node's programs under supervisord, from any"
                  " directory: status, start|stop|restart PROGRAM, tail [-f] PROGRAM;"
                  " exit 3 when not running")
    sub.add_argument("action", choices=CTL_ACTIONS, metavar="ACTION",
                     help=", ".join(CTL_ACTIONS))
    # default=[]: without one, argparse counts a "*" positional as required,
    # and `rc ctl` alone said PROGRAM was.
    sub.add_argument("programs", nargs="*", default=[], metavar="PROGRAM",
                     help="%s, or all" % ", ".join(MAIN_PROGRAMS))
    sub.add_argument("-f", "--follow", action="store_true", help="with tail: keep printing")
    sub = command("wait-ready", cmd_wait_ready, "wait until rc-server and rc-web answer,"
                  " a worker is connected and `rc health` is OK")
    sub.add_argument("--timeout", type=float, default=DEFAULT_READY_TIMEOUT, metavar="SECONDS",
                     help="give up after this long (default %g)" % DEFAULT_READY_TIMEOUT)
    sub = command("local-worker", cmd_local_worker,
                  "run bin/worker.py here; other arguments go to the worker")
    sub.set_defaults(worker_args=[])
    schedule_cli.add_commands(commands, out, formats)
    return parser


def add_submit_arguments(sub):
    sub.add_argument("task_type", metavar="TYPE", help="echo, sleep, system_info,"
                     " python_eval, python_exec or shell")
    sub.add_argument("argument", nargs="?", metavar="ARG",
                     help="the message, seconds, expression, code or command")
    task_options.add(sub, "the task's")
    sub.add_argument("--key", metavar="IDEMPOTENCY_KEY",
                     help="a second submit with the same key returns the first task")
    sub.add_argument("--each", action="store_true",
                     help="one task on every matching online device; prints the group id")
    sub.add_argument("--include-new", action="store_true",
                     help="with --each: devices that join later get one too")
    sub.add_argument("--wait", action="store_true",
                     help="wait until it ends and print its output (--each: the group)")
    sub.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                     help="with --wait: give up waiting after this long (exit 1; the task"
                     " goes on)")
    sub.add_argument("--input", action="append", metavar="PATH",
                     help="a file, or a directory as a tree (dir/: its contents), placed in"
                     " the task's directory before it starts; repeatable")
    sub.add_argument("--stdin", metavar="FILE|-", help="the task's standard input")
    sub.add_argument("--file", metavar="SCRIPT",
                     help="python_exec/shell: run this script file instead of inline code")
    sub.add_argument("--env", action="append", metavar="KEY=VALUE",
                     help="an environment variable for the task; repeatable")
    files_cli.add_package_arguments(sub)
    sub.add_argument("--output", action="append", metavar="GLOB",
                     help="files the task leaves to bring back (rc get); repeatable")


# -- entry points -------------------------------------------------------------------

NO_COMMAND_HINT = ("usage: rc COMMAND [options]   (`rc --help` lists every command,"
                   " `rc COMMAND --help` its options)\n"
                   "to begin: rc status, rc devices, rc submit echo hello --wait, rc join\n")


def at_least_one(text):
    """argparse's type for a count that must be 1 or more (`--minutes 0`
    would ask for nothing and get "no history yet")."""
    try:
        return bounded.whole(text, "the value", low=1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def run_command(argv, out, err, config=None, width=None, colour=None, logger=None,
                actor=("cli", "local"), env_values=True):
    """Run one `rc` command line; returns the exit status, never exits.
    `width` and `colour` are for a terminal that is not this process's;
    `logger` is where task_submitted lines go (default var/log/rc-cli.log);
    `actor` is who and from where, for the audit log; `env_values` whether
    tasks' --env values are shown (Context)."""
    if not argv:
        err.write(NO_COMMAND_HINT)
        return UsageError.status
    context = Context(out, err, config, width, colour, logger, actor, env_values)
    try:
        arguments = parse(build_parser(out), argv)
        return arguments.handler(arguments, context) or 0
    except ParserExit as e:
        return e.status
    except CommandError as e:
        return fail(err, e, e.status)
    except (tasks.TaskError, fleet.FleetError, rc_config.ConfigError, NoSuchLog) as e:
        return fail(err, e, 1)
    except sqlite3.Error as e:
        return fail(err, db.on_full_disk(e, context.config.db_path) or e, 1)
    finally:
        context.close()


def parse(parser, argv):
    """Arguments; unknown options are an error except for local-worker,
    which hands them to the worker (argparse REMAINDER misses `--slots 2`)."""
    command = next((word for word in argv if not word.startswith("-")), None)
    if command is not None and subparser(parser, command) is None:
        # argparse lists all 39 commands and not the one meant (`rc stauts`).
        import difflib      # only on this error's path
        names = sorted(command_parsers(parser))
        close = difflib.get_close_matches(command, names, 1, 0.7)
        parser.error("no command %r%s (`rc help` lists them)" % (
            command, ": did you mean %s?" % close[0] if close else ""))
    if command == "map":    # before argparse, which has its own words for --files -x.txt
        named = map_cli.file_like_an_option(argv[argv.index("map") + 1:], subparser(
            parser, "map")._option_string_actions)
        if named:
            parser.error(named)
    arguments, extra = parser.parse_known_args(argv)
    if arguments.command == "map":
        extra = map_cli.more_inputs(arguments, extra) if extra else extra
        # -0 is no option to argparse but a number: it would be the command.
        foreign = map_cli.foreign_option(extra, [arguments.template] + [
            value for value in arguments.values[:1] if value == "::::"])
        if foreign:
            parser.error(foreign)
    if extra and arguments.command == "ctl":
        extra = more_programs(arguments, extra)
    if extra and arguments.command == "submit":
        extra = submit_argument(arguments, extra)
    if extra and arguments.command in ("schedule", "service"):
        files_given = [word.split("=", 1)[0] for word in extra
                       if word.split("=", 1)[0] in ("--input", "--stdin", "--file", "--output")]
        if files_given:     # argparse said only "unrecognized arguments: --input photos"
            parser.error("rc %s %s takes no %s: a %s's tasks carry no files yet (docs/"
                         "schedules.md); give the command what it needs on the devices"
                         % (arguments.command, arguments.action, files_given[0],
                            arguments.command))
    if extra and not hasattr(arguments, "worker_args"):
        parser.error("unrecognized arguments: %s%s" % (
            " ".join(extra), did_you_mean(parser, arguments.command, extra)))
    if extra:
        arguments.worker_args = extra
    return arguments


def did_you_mean(parser, command, extra):
    """` (did you mean --keep-order?)` when the first unknown option is a
    typo of one the command has (`--keep-ordr`, `--inputs`, `--ouput`),
    else "": argparse names the word and not what was meant."""
    import difflib      # only on this error's path
    known, parsers = set(), [subparser(parser, command)]
    while parsers:
        found = parsers.pop()
        if found is None:
            continue
        for action in found._actions:
            known.update(option for option in action.option_strings if option.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    for word in extra:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], sorted(known), 1, 0.8)
            return " (did you mean %s?)" % close[0] if close else ""
    return ""


def subparser(parser, command):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def submit_argument(arguments, extra):
    """The task's argument after an option (`rc submit shell --priority high
    'echo hi'`), which argparse leaves over once it has read TYPE alone."""
    if arguments.argument is None and not extra[0].startswith("-"):
        arguments.argument = extra[0]
        return extra[1:]
    return extra


def more_programs(arguments, extra):
    """Programs after an option (`rc ctl tail -f rc-server`), which argparse
    leaves over: it matches a positional of nargs="*", empty, before the
    option. What is left (an unknown option) goes back to be refused."""
    words = [word for word in extra if not word.startswith("-")]
    arguments.programs = list(arguments.programs) + words
    return [word for word in extra if word not in words]


def web_access(argv):
    """What the web terminal needs to run `argv`: "read" or "admin"; a
    CommandError when it must not run it there. May change argv (a
    `submit --wait` gets a bounded wait)."""
    return web_rules(argv)[0]


def web_rules(argv):
    """(web_access(argv), None or, for a command that may hold its request
    for seconds, what to do when rc-web has no room for it: `submit --wait`
    (up to WEB_WAIT_LIMIT) and `tail` (a running task's first report, up to
    tail_cli.FIRST_REPORT_WAIT) run only in one of the slots a long poll
    waits in, so that many at once cannot take every thread of rc-web)."""
    try:
        arguments = parse(build_parser(io.StringIO()), argv)
    except (CommandError, ParserExit):
        return "read", None      # run_command reports the usage error itself
    access = web_access_of(arguments, argv)
    if arguments.command == "submit" and arguments.wait:
        return access, ("nothing submitted; try again, or submit without --wait and ask"
                        " GET /api/v1/tasks/ID/result?wait=S")
    if arguments.command == "tail":
        return access, "try again, or ask GET /api/v1/tasks/ID/output"
    return access, None


def withheld_argv(argv):
    """argv with each --env value withheld (KEY=(withheld)), for the audit
    log: it says who ran what, not the secrets given to a task. Read word by
    word, not parsed, so that a command line argparse refuses is covered
    too: `--env K=V`, `--env=K=V` and the abbreviations argparse takes
    (`--en K=V`; `--e` where no other option begins so)."""
    shown, value_next = [], False
    for word in argv:
        option, equals, value = word.partition("=")
        if value_next:
            shown.append(withheld_entry(word))
        elif equals and is_env_option(option):
            shown.append(option + "=" + withheld_entry(value))
        else:
            shown.append(word)
        value_next = not value_next and not equals and is_env_option(word)
    return shown


def is_env_option(word):
    return len(word) >= 3 and "--env".startswith(word)


def withheld_entry(entry):
    """KEY=VALUE as KEY=(withheld); a word without a name, withheld whole."""
    name, equals, _ = entry.partition("=")
    return name + "=" + WITHHELD if equals else WITHHELD


def web_access_of(arguments, argv):
    name = arguments.command
    if name == "monitor" and arguments.once:
        return "read"
    if name in WEB_REFUSED:
        raise CommandError("`%s` does not run in the web terminal: %s"
                           % (name, WEB_REFUSED[name]))
    if name == "logs" and arguments.follow:
        raise CommandError("`logs -f` does not run in the web terminal; try `monitor`,"
                           " or /stream/logs")
    if name == "submit" and any(getattr(arguments, option) for option in
                                WEB_REFUSED_SUBMIT_OPTIONS):
        raise CommandError("--input, --stdin, --file and --requirements read files on the main"
                           " node and do not run in the web terminal; upload with"
                           " POST /api/v1/files (and give packages with --pip)")
    if name == "submit" and arguments.wait and (arguments.wait_timeout is None or
                                                arguments.wait_timeout > WEB_WAIT_LIMIT):
        argv.extend(["--wait-timeout", str(WEB_WAIT_LIMIT)])
    if name in schedule_cli.COMMANDS:
        return schedule_cli.web_access(arguments)
    if name == "logs" and arguments.program == AUDIT_PROGRAM:
        return "admin"           # who did what from where: not for every reader
    return "admin" if name in WEB_ADMIN_COMMANDS else "read"


def command_parsers(parser):
    """{name: subparser} for each command by its own name (aliases left out)."""
    action = parser._subparsers._group_actions[0]
    return {choice.dest: action.choices[choice.dest] for choice in action._choices_actions}


def completion_words(web=True):
    """For Tab in the web terminal: each command's options, the values some
    options take, and what each command's positional argument is."""
    parser = build_parser(io.StringIO())
    commands = {}
    for name, sub in command_parsers(parser).items():
        if web and name in WEB_REFUSED and name != "monitor":
            continue
        options = sorted(option for a in sub._actions for option in a.option_strings
                         if option.startswith("--"))
        commands[name] = options
    return {"commands": commands,
            "values": {"--state": list(TASK_STATES), "--priority": list(PRIORITIES),
                       "--device": "device", "--after": "task", "--task": "task",
                       "--level": list(LEVELS)},
            "positional": {"device": "device", "task": "task", "why": "task",
                           "cancel": "task", "submit": list(TASK_TYPES),
                           "files": "task",
                           "drain": "device", "resume": "device", "forget": "device",
                           "revoke": "device", "label": "device", "role": "device",
                           "slots": "device",
                           "broadcast": list(fleet.CONTROL_COMMANDS),
                           **schedule_cli.ACTIONS}}


def fail(err, error, status):
    """rc's last word, one line; it may quote what a device chose (a task's
    error, a device's reason to pause), so control characters show as "?"."""
    err.write("rc: error: %s\n" % render.cell(str(error)))
    return status


# The umask `rc` was started with: files it writes for the user outside the
# state directory (`rc get -o DIR`) follow it, not the state directory's 077.
# Set by lib/rc/cli.py; rc-web leaves it None.
USER_UMASK = None
