"""Services: long-running tasks kept alive (`rc service add NAME TYPE ARG`).

A service is a row in `services` and, per place it runs, a row in
`service_runs`: one place ("") for a plain service, one per matching device
for `--each`. Each run is an ordinary task (fenced, leased, moved by the
reaper when its device is lost, counted against its device's slots) with
the idempotency key service:NAME:ADDED:PLACE:RUN (ADDED: when the service
was added, in milliseconds, so a service removed and added again under its
name never meets its predecessor's keys), so a crash between deciding to
start a run and recording it cannot start two.

rc-scheduler calls tend() from its loop. When a run's task ends, the next
one starts after a backoff that doubles with each quick exit in a row (a
run shorter than service_quick_exit), capped at service_restart_backoff_max:
a command that exits at once forever is tried a few times a second at
first, then once per cap, and shows `failing` with its last error, never a
tight loop. A run on a device that becomes unavailable (its own policy: on
battery, too hot, owner busy) is stopped and the service says why; the next
run waits for a device that is available (for --each, that same device).

Service tasks have the longest timeout a task may have (tasks.MAX_TIMEOUT,
a week); their lease is renewed by every heartbeat like any task's. A run
that reaches the timeout ends and the next one starts at once.
"""
import time

from rc import bell, db, devices, files, tasks
from rc.schedules import UNUSABLE_TASK, ScheduleError, check_name, checked_task, stored_task
from rc.states import ACTIVE_STATES, CANCELLED, ONLINE, QUEUED, RUNNING, TERMINAL_STATES

# Whole lines of a run's output `rc service logs` shows by default.
DEFAULT_LOG_LINES = 40
LOG_TAIL_BYTES = 64 * 1024     # bytes read from the end of a stored stdout/stderr
PLAIN = ""                     # the place of a service that is not --each
STARTING, RUNNING_STATE, STOPPED = "starting", "running", "stopped"


# -- adding and changing -----------------------------------------------------------------

def add(connection, config, name, spec, each=False):
    """Store a service; its first run starts at rc-scheduler's next look."""
    check_name(name, "service")
    with db.write(connection):
        if connection.execute("SELECT 1 FROM services WHERE name = ?", (name,)).fetchone():
            raise ScheduleError("a service named %r exists; `rc service remove %s` first,"
                                " or choose another name" % (name, name))
        connection.execute("INSERT INTO services(name, task, each, created_at)"
                           " VALUES (?, ?, ?, ?)",
                           (name, db.dumps(spec), int(bool(each)), time.time()))
    bell.ring(config.run_dir, bell.SCHEDULER)


def existing(connection, name):
    row = connection.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ScheduleError("no service %r (`rc service list` shows them)" % name)
    return row


def stop(connection, config, name):
    """Stop a service: its runs are cancelled and none start until
    `rc service start`. Returns how many runs were cancelled."""
    with db.write(connection):
        existing(connection, name)
        connection.execute("UPDATE services SET stopped = 1 WHERE name = ?", (name,))
        cancelled = cancel_runs(connection, name, "service %s stopped" % name)
    bell.ring(config.run_dir, bell.SERVER)        # rc-server tells the workers now
    return cancelled


def start(connection, config, name):
    """Start a stopped (or failing) service again, with its backoff forgotten."""
    with db.write(connection):
        existing(connection, name)
        connection.execute("UPDATE services SET stopped = 0 WHERE name = ?", (name,))
        connection.execute("UPDATE service_runs SET quick_exits = 0, restart_at = 0,"
                           " note = NULL WHERE name = ?", (name,))
    bell.ring(config.run_dir, bell.SCHEDULER)


def remove(connection, config, name):
    with db.write(connection):
        existing(connection, name)
        cancelled = cancel_runs(connection, name, "service %s removed" % name)
        connection.execute("DELETE FROM service_runs WHERE name = ?", (name,))
        connection.execute("DELETE FROM services WHERE name = ?", (name,))
    bell.ring(config.run_dir, bell.SERVER)
    return cancelled


def cancel_runs(connection, name, reason, place=None):
    """Cancel the service's unfinished tasks inside the caller's transaction:
    a queued one at once, an active one by asking its device."""
    count = 0
    for row in connection.execute(
            "SELECT t.task_id, t.state FROM service_runs r JOIN tasks t ON t.task_id = r.task_id"
            " WHERE r.name = ? AND (? IS NULL OR r.place = ?) AND t.state IN (?, ?, ?)",
            (name, place, place, QUEUED) + ACTIVE_STATES).fetchall():
        count += cancel_task(connection, row["task_id"], row["state"], reason)
    return count


def cancel_task(connection, task_id, state, reason):
    if state == QUEUED:
        return connection.execute(
            "UPDATE tasks SET state = ?, finished_at = ?, reason = ? WHERE task_id = ?"
            " AND state = ?", (CANCELLED, time.time(), reason, task_id, QUEUED)).rowcount
    return connection.execute("UPDATE tasks SET cancel_requested = 1, reason = ?"
                              " WHERE task_id = ? AND state IN (?, ?)",
                              (reason, task_id) + ACTIVE_STATES).rowcount


# -- keeping them alive (rc-scheduler) ----------------------------------------------------

def tend(connection, config, log, now=None):
    """One look at every service that should run: start, restart, pause.
    A service with nothing to do costs reads only; one with something to
    do gets one short write transaction. Returns how many runs started."""
    now = time.time() if now is None else now
    started, failed = 0, []
    for service in connection.execute("SELECT * FROM services WHERE stopped = 0"
                                      " ORDER BY name").fetchall():
        try:
            started += tend_one(connection, config, log, service, now)
        except Exception as e:     # a row no program would write: the others go on
            failed.append(e)
    if failed:
        raise failed[0]            # rc-scheduler logs it (rate-limited) and looks again
    return started


def tend_one(connection, config, log, service, now):
    if not chores(connection, config, service, now):
        return 0
    started = 0
    with db.write(connection):
        service = connection.execute("SELECT * FROM services WHERE name = ?"
                                     " AND stopped = 0", (service["name"],)).fetchone()
        if service is not None:
            for chore in chores(connection, config, service, now):
                started += do(connection, config, log, service, chore, now)
    return started


def chores(connection, config, service, now):
    """What a service needs done now: [(action, place, run, task)]."""
    wanted = places(connection, service)
    runs = {row["place"]: row for row in connection.execute(
        "SELECT * FROM service_runs WHERE name = ?", (service["name"],))}
    todo = [("drop", place, run, None) for place, run in runs.items() if place not in wanted]
    todo += [("start", place, None, None) for place in wanted if place not in runs]
    for place, run in runs.items():
        if place not in wanted:
            continue
        task = task_of(connection, run["task_id"])
        action = chore_for(run, task, now, config)
        if action:
            todo.append((action, place, run, task))
    return todo


def chore_for(run, task, now, config):
    if task is not None and task["state"] not in TERMINAL_STATES:
        if task["state"] == RUNNING and task["cancel_requested"] == 0 \
                and task["available"] == 0:
            return "pause"
        if task["state"] == RUNNING and run["note"]:
            return "clear"
        return None
    if task is not None and run["ended_task_id"] != task["task_id"]:
        return "account"
    # A restart further away than the longest backoff was set before the
    # clock was set back (an NTP step): the service waited the whole step.
    if not now < run["restart_at"] <= now + config.service_restart_backoff_max:
        return "start"
    return None


def places(connection, service):
    """Where the service should run: one place, or each matching device that
    has not been forgotten (one gone offline keeps its place, and its run
    waits for it)."""
    if not service["each"]:
        return {PLAIN}
    spec = stored_task(service["task"])
    return {device["device_id"] for device in devices.list_devices(connection)
            if spec["task_type"] in device["task_types"]
            and not tasks.unmet_requirements(spec["requirements"], device)}


def task_of(connection, task_id):
    if task_id is None:
        return None
    return connection.execute(
        "SELECT t.task_id, t.state, t.device_id, t.started_at, t.finished_at, t.error,"
        " t.result, t.reason, t.cancel_requested, d.available, d.unavailable_reason"
        " FROM tasks t LEFT JOIN devices d ON d.device_id = t.device_id"
        " WHERE t.task_id = ?", (task_id,)).fetchone()


def do(connection, config, log, service, chore, now):
    action, place, run, task = chore
    name = service["name"]
    if action == "drop":
        cancel_runs(connection, name, "device %s left service %s" % (place, name), place)
        connection.execute("DELETE FROM service_runs WHERE name = ? AND place = ?",
                           (name, place))
        log.info("service_place_dropped", service=name, place=place)
    elif action == "pause":
        note = "paused: %s unavailable: %s" % (task["device_id"],
                                               task["unavailable_reason"] or "its own policy")
        cancel_task(connection, task["task_id"], task["state"], note)
        connection.execute("UPDATE service_runs SET note = ? WHERE name = ? AND place = ?",
                           (note, name, place))
        log.warning("service_paused", service=name, place=place, task_id=task["task_id"],
                    reason=note)
    elif action == "clear":
        connection.execute("UPDATE service_runs SET note = NULL WHERE name = ? AND place = ?",
                           (name, place))
    elif action == "account":
        account(connection, config, log, service, run, task, now)
    elif action == "start":
        return start_run(connection, config, log, service, place, run, now)
    return 0


def account(connection, config, log, service, run, task, now):
    """A run ended: when may the next start, and was it a quick exit."""
    paused = (run["note"] or "").startswith("paused")
    began = task["started_at"] or task["finished_at"] or now
    lasted = (task["finished_at"] or now) - began
    quick = run["quick_exits"] + 1 if lasted < config.service_quick_exit else 0
    # A pause after a long run restarts at once (on a device that is
    # available); pauses in quick succession (a device flapping) back off too.
    delay = 0.0 if paused and not quick else restart_delay(config, quick)
    why = ended_because(task)
    connection.execute(
        "UPDATE service_runs SET ended_task_id = ?, quick_exits = ?, restart_at = ?,"
        " last_error = ?, last_exit_at = ? WHERE name = ? AND place = ?",
        (task["task_id"], quick, now + delay, why, task["finished_at"] or now,
         service["name"], run["place"]))
    level = "warning" if quick >= config.service_failing_after else "info"
    getattr(log, level)("service_run_ended", service=service["name"], place=run["place"],
                        task_id=task["task_id"], state=task["state"],
                        lasted=round(lasted, 3), quick_exits=quick,
                        restart_in=round(delay, 3), reason=why)


def restart_delay(config, quick_exits):
    """Seconds before the next run: the base after a run that lasted, then
    doubling with each quick exit in a row, capped."""
    return min(config.service_restart_backoff
               * 2 ** min(max(0, quick_exits - 1), tasks.MAX_DOUBLINGS),
               config.service_restart_backoff_max)


def ended_because(task):
    """One line: how the run ended and its most telling line."""
    result = db.loads(task["result"], {}) if task["result"] else {}
    result = result if isinstance(result, dict) else {}
    # The program's own last words first: "exit status 3" is already in the head.
    lines = non_empty_lines(result.get("stderr")) or non_empty_lines(
        task["error"] or task["reason"])
    exit_code = result.get("exit_code")
    head = task["state"] + (" (exit %s)" % exit_code if exit_code is not None else "")
    return "%s: %s" % (head, lines[-1][:300]) if lines else head


def non_empty_lines(text):
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def start_run(connection, config, log, service, place, run, now):
    name = service["name"]
    number = (run["runs"] if run else 0) + 1
    key = "service:%s:%d:%s:%d" % (name, service["created_at"] * 1000, place or "-", number)
    if run is None:
        connection.execute("INSERT INTO service_runs(name, place) VALUES (?, ?)", (name, place))
    connection.execute("SAVEPOINT service_start")
    try:
        task = checked_task(config, db.loads(service["task"]), timeout=tasks.MAX_TIMEOUT)
        if place:
            task["requirements"] = dict(task["requirements"], device_id=place)
        task_id = tasks.insert_once(connection, task, key, None)
    except UNUSABLE_TASK as e:
        connection.execute("ROLLBACK TO service_start")
        connection.execute("RELEASE service_start")
        quick = (run["quick_exits"] if run else 0) + 1
        connection.execute("UPDATE service_runs SET quick_exits = ?, restart_at = ?,"
                           " last_error = ? WHERE name = ? AND place = ?",
                           (quick, now + restart_delay(config, quick),
                            "not started: %s" % e, name, place))
        log.warning("service_not_started", service=name, place=place, error=str(e))
        return 0
    connection.execute("RELEASE service_start")
    connection.execute("UPDATE service_runs SET task_id = ?, runs = ? WHERE name = ?"
                       " AND place = ?", (task_id, number, name, place))
    log.info("service_run_started", service=name, place=place, task_id=task_id, run=number)
    return 1


# -- reading ---------------------------------------------------------------------------

def list_services(connection, config, now=None):
    now = time.time() if now is None else now
    return [service_dict(connection, config, row, now) for row in
            connection.execute("SELECT * FROM services ORDER BY name").fetchall()]


def get(connection, config, name, now=None):
    return service_dict(connection, config, existing(connection, name),
                        time.time() if now is None else now)


def service_dict(connection, config, row, now):
    service = {"name": row["name"], "task": stored_task(row["task"]), "each": bool(row["each"]),
               "stopped": bool(row["stopped"]), "created_at": row["created_at"], "runs": []}
    for run in connection.execute("SELECT * FROM service_runs WHERE name = ? ORDER BY place",
                                  (row["name"],)).fetchall():
        task = task_of(connection, run["task_id"])
        service["runs"].append({
            "place": run["place"] or None, "task_id": run["task_id"], "runs": run["runs"],
            "device_id": task["device_id"] if task else None,
            "task_state": task["state"] if task else None,
            "quick_exits": run["quick_exits"], "last_error": run["last_error"],
            "last_exit_at": run["last_exit_at"],
            "state": run_state(config, row, run, task, now, connection)})
    service["state"] = overall_state(service)
    return service


def run_state(config, service, run, task, now, connection):
    """What a run is doing, in words: running on pi4, starting, paused: why,
    restarting in 4s, failing (6 quick exits; next try in 60s), failing (6
    quick exits; trying again on pi4), stopped."""
    if service["stopped"]:
        return STOPPED
    if task is not None and task["state"] not in TERMINAL_STATES:
        trying_again = still_failing(config, run, task, now)
        if task["state"] == RUNNING and not task["cancel_requested"]:
            where = "on %s" % task["device_id"]
            return ("failing (%d quick exits; trying again %s)" % (run["quick_exits"], where)
                    if trying_again else "%s %s" % (RUNNING_STATE, where))
        if run["note"]:
            return run["note"]
        return waiting_for_device(connection, run["place"]) or (
            "failing (%d quick exits; starting again)" % run["quick_exits"]
            if trying_again else STARTING)
    if run["note"]:                # paused, between one run's end and the next's start
        return run["note"]
    wait = max(0.0, run["restart_at"] - now)
    if run["quick_exits"] >= config.service_failing_after:
        return "failing (%d quick exits; next try in %.0fs)" % (run["quick_exits"], wait)
    return "restarting in %.0fs" % wait if task is not None or run["last_error"] else STARTING


def still_failing(config, run, task, now):
    """Whether a failing service's new run has yet to outlast
    service_quick_exit: until it does, the service is still `failing`, so
    `rc status` does not count a crash loop as running at each try."""
    if run["quick_exits"] < config.service_failing_after:
        return False
    return task["state"] != RUNNING or now - (task["started_at"] or now) < \
        config.service_quick_exit


def waiting_for_device(connection, place):
    """Why an --each run waits for its device, when it does."""
    device = place and connection.execute(
        "SELECT status, connected, available, unavailable_reason FROM devices"
        " WHERE device_id = ?", (place,)).fetchone()
    if not device:
        return None
    if device["status"] != ONLINE or not device["connected"]:
        return "waiting: %s is offline" % place
    if not device["available"]:
        return "paused: %s unavailable: %s" % (place, device["unavailable_reason"]
                                                or "its own policy")
    return None


def overall_state(service):
    """The service's one word: stopped, failing, paused, starting, running."""
    if service["stopped"]:
        return STOPPED
    states = [run["state"] for run in service["runs"]]
    for word in ("failing", "paused", "waiting", "restarting", STARTING):
        if any(state.startswith(word) for state in states):
            return word
    return RUNNING_STATE if states else STARTING


def status_counts(connection, config):
    """services_running, services_failing ... for `rc status`."""
    counts = dict.fromkeys(("running", "starting", "restarting", "waiting", "paused",
                            "failing", "stopped"), 0)
    for service in list_services(connection, config):
        counts[service["state"]] = counts.get(service["state"], 0) + 1
    return {"services_%s" % state: count for state, count in counts.items()}


def logs(connection, config, name, lines=DEFAULT_LOG_LINES):
    """For each place: the last run that ended (or the current one, when
    none has), its stdout and stderr tails."""
    existing(connection, name)
    found = []
    for run in connection.execute("SELECT * FROM service_runs WHERE name = ? ORDER BY place",
                                  (name,)).fetchall():
        task_id = run["ended_task_id"] or run["task_id"]
        try:
            task = tasks.get(connection, task_id)
        except tasks.TaskError:        # none yet, or pruned after task_retention
            continue
        result = task.get("result") if isinstance(task.get("result"), dict) else {}
        found.append({"place": run["place"] or None, "task_id": task_id,
                      "state": task["state"], "device_id": task["device_id"],
                      "stdout": tail(connection, config, task_id, "stdout",
                                     result.get("output"), lines),
                      "stderr": tail(connection, config, task_id, "stderr",
                                     result.get("stderr"), lines),
                      "error": task.get("error")})
    return found


def tail(connection, config, task_id, stream, inline, lines):
    """The last lines of a run's stream: the stored file when the output
    went past the inline cap (issue 18's .rc/stdout), else the result's text."""
    entry = files.task_file(connection, task_id, ".rc/" + stream)
    text = inline or ""
    if entry is not None:
        try:
            blob, size = files.open_blob(connection, config, entry["sha256"])
            with blob:
                blob.seek(max(0, size - LOG_TAIL_BYTES))
                text = blob.read().decode("utf-8", "replace")
        except files.FileStoreError:
            pass
    return "\n".join(str(text).splitlines()[-lines:]) if lines else ""
