"""`rc why ID`: one readable paragraph on why a task is where it is.

For a queued task it goes through what the scheduler checks, in its order:
backoff, dependencies, online devices, task type, each requirement, free
slots, and the tasks ahead in the queue (like HTCondor's
`condor_q -better-analyze`)."""
import time

from rc import db, devices, files, tasks
from rc.render import age, cell, counted
from rc.states import ASSIGNED, INSTANT_TASK_TYPES, ONLINE, RUNNING, TERMINAL_STATES


def why(connection, task_id, now=None):
    """The answer on one line: it quotes what devices chose (a task's error,
    a reason to pause), which must not start lines of its own in a terminal
    or in a script reading `rc why` line by line; shown as a table cell is."""
    return cell(answer(connection, task_id, time.time() if now is None else now))


def answer(connection, task_id, now):
    task = tasks.get(connection, task_id)
    if task["state"] in TERMINAL_STATES:
        reason = task["error"] or task["reason"] or "no reason recorded"
        return "Task %d %s (attempt %d%s)%s." % (
            task_id, task["state"], task["attempt"], on_device(task),
            "" if reason == task["state"] else ": " + reason)    # not "completed: completed"
    if task["state"] == ASSIGNED:
        device = devices.get(connection, task["device_id"]) or {}
        if device.get("suspect"):
            return ("Task %d is assigned to %s, which is suspect (it answered nothing);"
                    " it goes back to the queue at once, uncharged."
                    % (task_id, task["device_id"]))
        return ("Task %d is assigned to %s and waits for it to start (lease until %s).%s"
                % (task_id, task["device_id"], clock(task["lease_expires"]),
                   cache_note(connection, task_id, [task["device_id"]])))
    if task["state"] == RUNNING:
        # Whole percents, never 100 before the end (%g said 23.3333).
        progress = "" if task["progress"] is None else ", %d%% done" % task["progress"]
        return "Task %d has been running on %s for %s (attempt %d%s).%s" % (
            task_id, task["device_id"], age(now - task["started_at"]), task["attempt"],
            progress, away_note(connection, task["device_id"], now))
    return "Task %d is queued: %s" % (task_id, why_queued(connection, task, now))


def why_queued(connection, task, now):
    if task["not_before"] > now:
        return "backing off until %s (in %s) before attempt %d, after: %s." % (
            clock(task["not_before"]), age(task["not_before"] - now), task["attempt"],
            task["reason"])
    waiting = [row for row in connection.execute(
        "SELECT p.task_id, p.state FROM task_dependencies d JOIN tasks p"
        " ON p.task_id = d.depends_on WHERE d.task_id = ? AND p.state != 'completed'",
        (task["task_id"],))]
    if waiting:
        return "it waits for %s to complete." % ", ".join(
            "task %d (%s)" % (row["task_id"], row["state"]) for row in waiting)
    online = [d for d in devices.list_devices(connection, ONLINE) if d["connected"]]
    if not online:
        return "no device is online; it will run when one joins."
    paused = [d for d in online if takes_nothing_new(d)]
    online = [d for d in online if not takes_nothing_new(d)]
    if not online:
        return "every online device takes nothing new now: %s." % "; ".join(
            "%s (%s)" % (d["device_id"], unavailable_reason(d, now)) for d in paused)
    fitting, refusals = [], {}
    for device in online:
        reasons = unmet(task, device)
        if reasons:
            for reason in reasons:
                refusals.setdefault(reason, []).append(device["device_id"])
        else:
            fitting.append(device)
    held_back = [d for d in paused if not unmet(task, d)]
    if not fitting and held_back:
        return "the devices that fit take nothing new now: %s." % "; ".join(
            "%s (%s)" % (d["device_id"], unavailable_reason(d, now)) for d in held_back)
    if not fitting:
        return "none of the %d online devices fits: %s." % (len(online), "; ".join(
            "%s (%s)" % (reason, count_of(names, "device"))
            for reason, names in sorted(refusals.items(), key=lambda item: -len(item[1]))))
    instant = task["task_type"] in INSTANT_TASK_TYPES     # needs no slot
    free = [d for d in fitting if instant or d["slots"] > d["active_tasks"]]
    ahead = tasks_ahead(connection, task)
    names = ", ".join(d["device_id"] for d in fitting[:5])
    if not free:
        return ("%s fit%s (%s) but all their slots are busy; %s ahead of it in the queue.%s"
                % (count_of(fitting, "device"), "" if len(fitting) > 1 else "s", names,
                   count_of(range(ahead), "task"),
                   cache_note(connection, task["task_id"], [d["device_id"] for d in fitting])))
    return ("%s with free slots fit%s (%s); it should be assigned in a moment"
            " (%s ahead of it).%s" % (count_of(free, "device"), "" if len(free) > 1 else "s",
                                       ", ".join(d["device_id"] for d in free[:5]),
                                       count_of(range(ahead), "task"),
                                       cache_note(connection, task["task_id"],
                                                  [d["device_id"] for d in free])))


def cache_note(connection, task_id, device_ids):
    """For a task with input files: which of these devices already hold
    them in their cache (the scheduler prefers those), in one sentence."""
    inputs = files.input_hashes(connection, task_id)
    if not inputs:
        return ""
    total = sum(inputs.values())
    holding = []
    for device_id in device_ids:
        row = connection.execute("SELECT cached_files FROM devices WHERE device_id = ?",
                                 (device_id,)).fetchone()
        try:
            cached = set(db.loads(row[0], [])) if row else set()
        except (ValueError, TypeError):
            cached = set()
        held = sum(size for sha256, size in inputs.items() if sha256 in cached)
        if held:
            holding.append("%s holds %d of its %d input bytes" % (device_id, held, total))
    if not holding:
        return " No device that fits holds its inputs in its cache yet (%d bytes to send)." \
            % total
    return " Devices holding its inputs are preferred: %s." % "; ".join(holding[:5])


def takes_nothing_new(device):
    """Connected, but given nothing new: drained by a person, paused by its
    worker's own rule (battery, temperature, owner, quiet hours), or suspect."""
    return device["drained"] or not device["available"] or device["suspect"]


def unavailable_reason(device, now):
    if device["drained"]:
        return "drained; `rc resume %s` lets it take tasks again" % device["device_id"]
    if not device["available"] and not device["suspect"]:
        return "paused by its worker's own rule: %s; it takes tasks again once that" \
            " rule passes" % (device["unavailable_reason"] or "unavailable")
    if device["suspect"]:
        return ("suspect for %s: its connection is open but it answered no ping and"
                " accepted no task in time; no new tasks until it speaks again"
                % age(now - device["suspect_since"]))
    return device["unavailable_reason"]


def unmet(task, device):
    reasons = []
    if task["task_type"] not in device["task_types"]:
        reasons.append("does not accept %s tasks" % task["task_type"])
    return reasons + tasks.unmet_requirements(task["requirements"], device)


def tasks_ahead(connection, task):
    return connection.execute(
        "SELECT count(*) FROM tasks WHERE %s AND (priority > ? OR (priority = ?"
        " AND task_id < ?))" % db.QUEUED_SQL,
        (db_priority(task), db_priority(task), task["task_id"])).fetchone()[0]


def db_priority(task):
    return tasks.parse_priority(task["priority"])


def count_of(items, noun):
    return counted(len(items), noun)


def on_device(task):
    return " on %s" % task["device_id"] if task["device_id"] else ""


def away_note(connection, device_id, now):
    """What a running task's device being away means for it: held through a
    restart of the main node (restart_hold), or taken back unless it calls
    back in time."""
    row = connection.execute("SELECT connected, disconnected_at, held_until FROM devices"
                             " WHERE device_id = ?", (device_id,)).fetchone()
    if row is None or row["connected"]:
        return ""
    away = " %s has been disconnected for %s:" % (
        device_id, age(now - row["disconnected_at"]) if row["disconnected_at"] else "a while")
    if row["held_until"] and row["held_until"] > now:
        return away + (" the main node restarted and holds its tasks for it until %s"
                       " (restart_hold); it goes on running there meanwhile."
                       % clock(row["held_until"]))
    return away + (" the task goes back to the queue if it does not call back within"
                   " disconnect_grace.")


def clock(timestamp):
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "-"

