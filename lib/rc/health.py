"""Is the main node well? One verdict for cron, HTTP checkers and alerts.

check() looks at everything a person would look at with a shell: the
supervisord programs, the database (does it take a write, does it pass
`PRAGMA quick_check`), the queue, the devices, the disk and the WAL. Each
look gives OK, WARNING or CRITICAL; the worst is the verdict, and its exit
code is the monitoring-plugin convention (0, 1, 2).
"""
import os
import shutil
import socket
import sqlite3
import time

from rc import bell, db, devices, tasks
from rc.render import age
from rc.states import ONLINE

OK, WARNING, CRITICAL = 0, 1, 2
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}
STOPPED_LOOK_INTERVAL = 1.0   # seconds between looks, by a command that waits for tasks,
                              # at whether the main node still runs
# Seconds a passed `PRAGMA quick_check` is trusted: it reads the whole
# database (0.4-0.9 s for a year's 250 MB), and monitoring looks far more
# often than damage comes (Docker's HEALTHCHECK each minute, the open /health).
INTEGRITY_EVERY = 600.0
STUCK_LOOKED_AT = 200         # oldest ready tasks the queue check looks at
# supervisord's states: a program restarting after a crash is only a warning.
PASSING_STATES = {"RUNNING": OK, "STARTING": WARNING}


class Finding:
    def __init__(self, name, status, message, public=None, **values):
        """`public`: the message as anyone may read it (the open /health),
        where `message` names a device or a task; else `message` itself."""
        self.name, self.status, self.message, self.values = name, status, message, values
        self.public = message if public is None else public

    def as_dict(self, public=False):
        return dict({"check": self.name, "status": NAMES[self.status].lower(),
                     "message": self.public if public else self.message}, **self.values)


class Report:
    def __init__(self, findings):
        self.findings = findings
        self.status = max([f.status for f in findings] or [OK])

    def line(self, public=False):
        """One line: `RC CRITICAL - what is wrong; ... | perfdata`."""
        worst = [f for f in self.findings if f.status == self.status]
        shown = [f.public if public else f.message
                 for f in (self.findings if self.status == OK else worst)]
        text = (", " if self.status == OK else "; ").join(shown)
        perf = " ".join("%s=%s" % (key, value) for f in self.findings
                        for key, value in f.values.items() if isinstance(value, (int, float)))
        return "RC %s - %s%s" % (NAMES[self.status], text, " | " + perf if perf else "")

    def as_dict(self, public=False):
        """`public`: for a client that may not read the cluster (docs/http.md),
        whose answer names no device and no task."""
        return {"status": NAMES[self.status].lower(), "code": self.status,
                "line": self.line(public), "checks": [f.as_dict(public) for f in self.findings]}


def main_node_stopped(config):
    """When the main node in this state directory has run under supervisord
    before and does not run now: the time it stopped (its supervisord log's
    last write); None while it runs, before its first start, or when
    something else supervises it. Devices are then shown as last seen, and
    none of them as online: nothing is there for them to be connected to."""
    if not config.health_supervisor:
        return None
    try:
        stopped_at = os.path.getmtime(os.path.join(config.log_dir, "supervisord.log"))
    except OSError:
        return None
    return None if supervisor_answers(config) else stopped_at


class StoppedWatch:
    """For a command that waits for tasks (rc map, rc wait): it says once on
    `err` when the main node is not running (its tasks wait with it, and
    the command waits on), and once when it runs again, so that a wait
    through `make stop` ... `make run` is not a silence. look() is cheap
    between its looks, every STOPPED_LOOK_INTERVAL seconds."""

    def __init__(self, config, err, who, before_saying=None):
        self.config, self.err, self.who = config, err, who
        self.before_saying = before_saying      # e.g. clear a progress bar
        self.looked_at, self.stopped = None, False
        self.back_at = None         # time.monotonic() when it said it runs again

    def look(self, at_once=False):
        """Whether it said something now."""
        now = time.monotonic()
        if not at_once and self.looked_at is not None and \
                now - self.looked_at < STOPPED_LOOK_INTERVAL:
            return False
        self.looked_at = now
        stopped_at = main_node_stopped(self.config)
        if (stopped_at is not None) == self.stopped:
            return False
        self.stopped = stopped_at is not None
        if self.before_saying is not None:
            self.before_saying()
        if self.stopped:
            self.err.write("%s: the main node is not running (stopped %s ago); waiting for"
                           " it to start again (`make run`)\n"
                           % (self.who, age(time.time() - stopped_at)))
        else:
            self.back_at = now
            self.err.write("%s: the main node is running again\n" % self.who)
        self.err.flush()
        return True

    def ended(self):
        """The wait is over: if it said the main node was not running, it
        says it runs again, which a task ending a moment after `make run`
        left unsaid (the next look was not due yet)."""
        if self.stopped:
            self.look(at_once=True)


def supervisor_answers(config):
    return bell.supervisor_answers(config.run_dir)


def check(config, now=None, without_supervisor=CRITICAL):
    """The report. `without_supervisor` is how bad it is that supervisord
    is not running at all: CRITICAL for `rc health` (the cluster is down);
    rc-web, which answers, was started some other way, so it says WARNING."""
    now = time.time() if now is None else now
    findings = []
    if config.health_supervisor:
        findings.append(programs(config, without_supervisor))
    connection = None
    try:
        connection = open_connection(config)
        findings.append(writable(connection, now))
        findings.append(integrity(connection, now))
        findings.append(queue(connection, config, now))
        findings.append(devices_online(connection, config, main_node_stopped(config)))
        findings.append(unfit_tasks(connection, config, now))
    except (sqlite3.Error, OSError, RuntimeError) as e:
        findings.append(Finding("database", CRITICAL, "database: %s" % one_line(e)))
    finally:
        if connection is not None:
            connection.close()
    findings.append(disk(config))
    findings.append(wal(config))
    return Report(findings)


def one_line(error):
    return " ".join(str(error).split())


# -- supervisord --------------------------------------------------------------------

class SupervisorError(Exception):
    """supervisord answered, but not as XML-RPC says it should."""


def supervisor_proxy(path):
    """XML-RPC over supervisord's unix socket, with a timeout (a wedged
    supervisord must not hang cron). xmlrpc.client is imported here only:
    with http.client, email and ssl it is ~15 ms of every `rc` command's
    start, and only health, restore and make's checks talk to supervisord."""
    import xmlrpc.client

    class UnixConnection(xmlrpc.client.http.client.HTTPConnection):
        def __init__(self):
            super().__init__("localhost", timeout=bell.SUPERVISOR_TIMEOUT)

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    class UnixTransport(xmlrpc.client.Transport):
        def make_connection(self, host):
            return UnixConnection()

    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport())


def supervisor_socket(config):
    return os.path.join(config.run_dir, bell.SUPERVISOR_SOCKET)


def program_states(config):
    """{program: state name} from supervisord's XML-RPC interface. A program
    configured not to start (autostart=false: the container's local worker)
    and not started is left out: it is stopped on purpose."""
    import xmlrpc.client
    proxy = supervisor_proxy(supervisor_socket(config))
    try:
        by_hand = {info["name"] for info in proxy.supervisor.getAllConfigInfo()
                   if not info.get("autostart", True)}
        return {info["name"]: info["statename"] for info in proxy.supervisor.getAllProcessInfo()
                if not (info["name"] in by_hand and info["statename"] == "STOPPED")}
    except xmlrpc.client.Error as e:
        raise SupervisorError(str(e))


def programs_note(config):
    """For an answer about a task that waits (rc why): a sentence naming
    the main-node programs that are not running, without which it may wait
    for ever; "" when every one runs, or when that cannot be read."""
    stopped_at = main_node_stopped(config)
    if stopped_at is not None:
        return " But the main node was stopped %s ago: `make run`." % age(
            time.time() - stopped_at)
    if not config.health_supervisor or not os.path.exists(supervisor_socket(config)):
        return ""
    try:
        states = program_states(config)
    except (OSError, SupervisorError):
        return ""
    # The local worker is a device like any other: explain.why names devices.
    down = sorted(name for name, state in states.items()
                  if state != "RUNNING" and name != "rc-worker")
    return "".join(" But %s is %s: `rc ctl start %s`." % (name, states[name], name)
                   for name in down)


def programs(config, without_supervisor=CRITICAL):
    # programs_running=0 when none runs: a monitoring graph drops to 0 rather
    # than losing the figure just when the main node is down.
    if not os.path.exists(supervisor_socket(config)):
        return Finding("programs", without_supervisor, "supervisord is not running (no %s)"
                       % supervisor_socket(config), programs_running=0)
    try:
        states = program_states(config)
    except (OSError, SupervisorError) as e:
        return Finding("programs", CRITICAL, "supervisord does not answer on %s (%s)"
                       % (supervisor_socket(config), one_line(e)), programs_running=0)
    if not states:
        return Finding("programs", CRITICAL, "supervisord runs no programs", programs_running=0)
    bad = {name: state for name, state in states.items() if PASSING_STATES.get(state) != OK}
    status = max([PASSING_STATES.get(state, CRITICAL) for state in states.values()])
    running = len(states) - len(bad)
    if not bad:
        return Finding("programs", OK, "%d programs running" % running, programs_running=running)
    return Finding("programs", status, ", ".join("%s %s" % item for item in sorted(bad.items())),
                   programs_running=running)


# -- the database -------------------------------------------------------------------

def open_connection(config):
    if not os.path.exists(config.db_path):
        raise RuntimeError("no database at %s; run `make install`" % config.db_path)
    connection = db.connect(config.db_path)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version < db.SCHEMA_VERSION:
        connection.close()
        raise RuntimeError("schema %d is older than this code's %d; run `make install`"
                           % (version, db.SCHEMA_VERSION))
    return connection


def writable(connection, now):
    """A real write, committed: a read-only file, a full disk or a lock held
    for ever all show here."""
    try:
        with db.write(connection):
            connection.execute("INSERT INTO health_probe(id, time) VALUES (1, ?)"
                               " ON CONFLICT(id) DO UPDATE SET time = excluded.time", (now,))
    except sqlite3.Error as e:
        return Finding("database", CRITICAL, "database not writable: %s" % one_line(e))
    return Finding("database", OK, "database writable")


def integrity(connection, now):
    """PRAGMA quick_check, unless one passed within INTEGRITY_EVERY (its
    time is kept beside the write probe's, written above)."""
    row = connection.execute("SELECT integrity_ok_at FROM health_probe WHERE id = 1").fetchone()
    if row is not None and row[0] is not None and 0 <= now - row[0] < INTEGRITY_EVERY:
        return Finding("integrity", OK, "integrity ok")
    rows = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if rows != ["ok"]:
        return Finding("integrity", CRITICAL, "database damaged: %s" % "; ".join(rows[:3]))
    try:
        connection.execute("UPDATE health_probe SET integrity_ok_at = ? WHERE id = 1", (now,))
    except sqlite3.Error:
        pass        # not writable: the database finding says so; checked again next time
    return Finding("integrity", OK, "integrity ok")


def ready_queued(connection, now, older_than):
    """Queued tasks free to run (backoff over, dependencies completed) that
    were submitted before `older_than`, oldest first, with when each was
    last queued. Ordered by +t.task_id (the unary plus keeps SQLite from
    walking the whole table in task_id order): the queued tasks are found
    through a partial index, however many finished ones the table keeps."""
    return connection.execute(
        "SELECT t.task_id, t.requirements, t.task_type,"
        " (SELECT max(e.time) FROM task_events e WHERE e.task_id = t.task_id) AS since"
        " FROM tasks t WHERE t.%s AND t.not_before <= ? AND t.created_at < ?"
        " ORDER BY +t.task_id LIMIT ?" % db.READY_SQL,
        (now, older_than, STUCK_LOOKED_AT)).fetchall()


def free_devices(connection):
    """Online devices that take new tasks and have a free slot."""
    return [d for d in devices.list_devices(connection, ONLINE)
            if d["connected"] and d.get("available", True) and not d.get("drained")
            and d["active_tasks"] < d["slots"]]


def stuck_tasks(connection, config, now):
    """Tasks waiting past health_queue_stuck that a device with a free slot
    could run: the scheduler should have given them out. A task counts as
    waiting for a device only since that device connected: after a restart
    or a restored backup, tasks queued days ago are not stuck before the
    scheduler's first pass over them."""
    limit = now - config.health_queue_stuck
    candidates = [row for row in ready_queued(connection, now, limit)
                  if (row["since"] or 0) < limit]
    if not candidates:
        return []
    free = free_devices(connection)
    stuck = []
    for row in candidates:
        requirements = db.loads(row["requirements"], {})
        waits = [(now - max(row["since"] or 0, d["connected_at"] or 0), d["device_id"])
                 for d in free if not tasks.unmet_requirements(requirements, d)
                 and (not d["task_types"] or row["task_type"] in d["task_types"])]
        waited, device_id = max(waits, default=(0, None))
        if waited > config.health_queue_stuck:
            stuck.append((row["task_id"], waited, device_id))
    return stuck


def queue(connection, config, now):
    queued = connection.execute("SELECT count(*) FROM tasks WHERE %s" % db.QUEUED_SQL
                                ).fetchone()[0]
    stuck = stuck_tasks(connection, config, now)
    if stuck:
        task_id, waited, device_id = stuck[0]
        return Finding("queue", CRITICAL, "queue stuck: task %d waited %ds while %s had a"
                       " free slot (%d such tasks)" % (task_id, waited, device_id, len(stuck)),
                       "queue stuck: %d tasks waited while a device had a free slot"
                       % len(stuck), queued=queued, stuck=len(stuck))
    return Finding("queue", OK, "queue %d" % queued, queued=queued, stuck=0)


UNFIT_KINDS_LOOKED_AT = 20   # distinct (type, requirements) the unfit check matches


def unfit_tasks(connection, config, now):
    """Queued tasks older than health_unfit_task that no device this cluster
    knows, online or not, could ever run (a requirement or a task type
    none of them has): they would wait for ever without a word."""
    limit = now - config.health_unfit_task
    # +task_id: from the queued tasks' partial index, as in ready_queued.
    rows = connection.execute(
        "SELECT task_id, task_type, requirements, created_at FROM tasks"
        " WHERE %s AND created_at < ? ORDER BY +task_id LIMIT ?" % db.QUEUED_SQL,
        (limit, STUCK_LOOKED_AT)).fetchall()
    known = devices.list_devices(connection) if rows else []    # a long list: only if needed
    unfit, verdicts = [], {}
    for row in rows:
        kind = (row["task_type"], row["requirements"])
        if kind not in verdicts:
            if len(verdicts) >= UNFIT_KINDS_LOOKED_AT:
                break
            requirements = db.loads(row["requirements"], {})
            verdicts[kind] = not any(
                row["task_type"] in d["task_types"]
                and not tasks.unmet_requirements(requirements, d) for d in known)
        if verdicts[kind]:
            unfit.append(row)
    if not unfit:
        return Finding("unfit", OK, "unfit tasks 0", unfit=0)
    first = unfit[0]
    return Finding("unfit", WARNING, "task %d has waited %s and no known device fits it"
                   " (%d such tasks); `rc why %d` says what it needs"
                   % (first["task_id"], age(now - first["created_at"]), len(unfit),
                      first["task_id"]),
                   "%d tasks wait that no known device fits" % len(unfit), unfit=len(unfit))


def devices_online(connection, config, stopped_at=None):
    counts = devices.counts(connection)
    if stopped_at is not None:     # what the table says is from before the stop
        counts = dict(counts, online=0)
    message = "devices %d/%d online" % (counts["online"], counts["total"])
    if stopped_at is not None:
        message += " (main node not running since %s)" % time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(stopped_at))
    values = {"devices_online": counts["online"], "devices_total": counts["total"]}
    if counts["online"] < config.health_min_devices_online:
        return Finding("devices", WARNING, message + " (fewer than %d)"
                       % config.health_min_devices_online, **values)
    return Finding("devices", OK, message, **values)


# -- files ------------------------------------------------------------------------------

def disk(config):
    try:
        usage = shutil.disk_usage(config.home)
    except OSError as e:
        return Finding("disk", CRITICAL, "state directory: %s" % one_line(e))
    free = 100.0 * usage.free / usage.total if usage.total else 0.0
    message = "disk %.0f%% free" % free
    values = {"disk_free_percent": round(free, 1), "disk_free_bytes": usage.free}
    if free < config.health_disk_free_critical:
        return Finding("disk", CRITICAL, message + " on %s" % config.home, **values)
    if free < config.health_disk_free_warning:
        return Finding("disk", WARNING, message + " on %s" % config.home, **values)
    return Finding("disk", OK, message, **values)


def wal_size(config):
    try:
        return os.path.getsize(config.db_path + "-wal")
    except OSError:
        return 0


def wal(config):
    size = wal_size(config)
    message = "wal %.1f MiB" % (size / 1048576.0)
    if size > config.health_wal_warning:
        return Finding("wal", WARNING, message + " (over %d MiB; is a reader holding it?)"
                       % (config.health_wal_warning // 1048576), wal_bytes=size)
    return Finding("wal", OK, message, wal_bytes=size)

