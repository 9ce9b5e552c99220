"""Managing devices as a fleet from the main node: drain and resume, forget,
labels and roles, one task on every matching device, control broadcasts.

What is set here is kept in the devices table next to what each device
reports about itself, so it survives the device reconnecting.
"""
import collections
import time

from rc import bell, db, devices, tasks
from rc.states import ONLINE, RUNNING

CONTROL_COMMANDS = ("reload", "report_profile", "drain", "upgrade")
# Characters of each task's output, error and input in a group's view: the
# dashboard, which reads it every 2 s, shows 300, `rc group` the first line
# (or a short block each); `rc get TASK` has the rest. Whole, a map of 300
# tasks of 900 KB outputs cost rc-web 250 MB and 2 s a read.
GROUP_TEXT_CHARS = 4096


class FleetError(ValueError):
    """A fleet request cannot be done; the message says why."""


def known_device(connection, device_id):
    row = connection.execute("SELECT device_id, forgotten FROM devices WHERE device_id = ?",
                             (device_id,)).fetchone()
    if row is None or row["forgotten"]:
        raise FleetError(devices.unknown(connection, device_id))


def drain(connection, config, device_id, now=False):
    """No new tasks for the device. With now=True its tasks also go back to
    the queue at once (not charged to them) and run elsewhere; otherwise
    they finish where they are. Returns how many tasks were handed back."""
    with db.write(connection):
        known_device(connection, device_id)
        connection.execute("UPDATE devices SET drained = 1 WHERE device_id = ?", (device_id,))
        handed_back = take_back_all(connection, config, device_id, "drained",
                                    await_checkpoints=True) if now else 0
    bell.ring(config.run_dir, bell.SERVER)       # tell the worker to stop them
    return handed_back


def resume(connection, config, device_id):
    with db.write(connection):
        known_device(connection, device_id)
        connection.execute("UPDATE devices SET drained = 0 WHERE device_id = ?", (device_id,))
    bell.ring(config.run_dir, bell.SCHEDULER)


def forget(connection, config, device_id):
    """Retire a device for good: its identity stops working, its tasks go
    elsewhere, its history (tasks, heartbeats) stays readable."""
    with db.write(connection):
        known_device(connection, device_id)
        connection.execute("UPDATE devices SET forgotten = 1, revoked = 1, secret = NULL,"
                           " drained = 1 WHERE device_id = ?", (device_id,))
        handed_back = take_back_all(connection, config, device_id, "device forgotten")
    bell.ring(config.run_dir, bell.SERVER)
    return handed_back


def take_back_all(connection, config, device_id, reason, await_checkpoints=False):
    """Queue the device's tasks again. With await_checkpoints, the next
    attempt of a task running on it, while it is online, waits for the
    checkpoint its worker sends once it has stopped the task."""
    count, now = 0, time.time()
    online = await_checkpoints and connection.execute(
        "SELECT 1 FROM devices WHERE device_id = ? AND status = ?",
        (device_id, ONLINE)).fetchone() is not None
    for row in connection.execute("SELECT %s FROM tasks WHERE device_id = ? AND %s"
                                  % (tasks.LEASE_COLUMNS, db.ACTIVE_SQL),
                                  (device_id,)).fetchall():
        not_before = now + tasks.HAND_BACK_CHECKPOINT_WAIT \
            if online and row["state"] == RUNNING else None
        count += tasks.take_back(connection, row, "%s: %s" % (reason, device_id), now,
                                 config, charged=False, not_before=not_before)
    return count


def label(connection, device_id, assignments):
    """Set labels from KEY=VALUE texts; KEY= (empty) removes one."""
    changes = {}
    for text in assignments:
        key, separator, value = text.partition("=")
        if not separator or not key:
            raise FleetError("label %r must look like KEY=VALUE (KEY= removes it)" % text)
        changes[key] = value
    try:
        tasks.check_labels({k: v for k, v in changes.items()})
    except tasks.TaskError as e:
        raise FleetError(str(e))
    with db.write(connection):
        known_device(connection, device_id)
        current = db.loads(connection.execute("SELECT labels FROM devices WHERE device_id = ?",
                                              (device_id,)).fetchone()[0], {})
        for key, value in changes.items():
            if value:
                current[key] = value
            else:
                current.pop(key, None)
        connection.execute("UPDATE devices SET labels = ? WHERE device_id = ?",
                           (db.dumps(current), device_id))
    return current


def set_role(connection, device_id, role):
    """The role the scheduler sees, whatever the device reports; "" undoes it."""
    if len(role) > 64:
        raise FleetError("a role is at most 64 characters")
    with db.write(connection):
        known_device(connection, device_id)
        connection.execute("UPDATE devices SET role_override = ? WHERE device_id = ?",
                           (role or None, device_id))


# -- one task on every matching device --------------------------------------------

def submit_each(connection, config, task_type, payload, requirements=None,
                include_new=False, **options):
    """One task per matching online device, grouped; returns the group id.
    Each task is pinned to its device. With include_new, devices that join
    later get one too (see tasks_for_new_device). Everything is checked as
    a single submit would be before anything is written, and the group and
    its tasks are written in one transaction: a refused request leaves
    nothing behind."""
    task = tasks.check_task(config, task_type, payload, requirements, **options)
    with db.write(connection):
        targets = matching_devices(connection, task_type, task["requirements"])
        if not targets and not include_new:
            paused = paused_matching(connection, task_type, task["requirements"])
            # Drained ones too: "no online device accepts shell tasks" of a
            # fleet whose one device is drained sent people looking elsewhere.
            paused.update((d["device_id"], "drained: `rc resume %s`" % d["device_id"])
                          for d in fitting_devices(connection, task_type, task["requirements"])
                          if d["drained"])
            raise FleetError("no online device accepts %s tasks%s%s%s" % (
                task_type, " with those requirements" if task["requirements"] else "",
                " now (paused: %s)" % "; ".join("%s, %s" % item for item in sorted(
                    paused.items())) if paused else "",
                unmet_note(connection, task_type, task["requirements"])))
        tasks.unmet_dependencies(connection, task["depends_on"])    # refuses what cannot start
        group_id = connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
            " include_new) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), task_type, db.dumps(task["payload"]),
             db.dumps(task["requirements"]), db.dumps(options), int(include_new))).lastrowid
        for device_id in targets:
            add_group_task(connection, group_id, task, device_id)
    bell.ring(config.run_dir, bell.SCHEDULER)
    return group_id


def matching_devices(connection, task_type, requirements):
    """The connected devices that take new tasks now and fit: a drained,
    paused (its worker's battery or availability rule) or suspect device
    is left out, and its task would only sit queued."""
    return [d["device_id"] for d in fitting_devices(connection, task_type, requirements)
            if not (d["drained"] or d["suspect"] or not d["available"])]


def paused_matching(connection, task_type, requirements):
    """{device id: why} for the devices --each leaves out though they fit:
    paused by their worker's rule, or suspect."""
    return {d["device_id"]: d["unavailable_reason"] if not d["suspect"] else "suspect"
            for d in fitting_devices(connection, task_type, requirements)
            if not d["drained"] and (d["suspect"] or not d["available"])}


def unmet_note(connection, task_type, requirements):
    """What the online devices that take this type lack, by requirement:
    `: needs label kind=pi (nas, phone)` (--require label.kind=pi where
    no device has that label); "" when none of them lacks anything."""
    lacking = {}
    for device in devices.list_devices(connection, ONLINE):
        if device["connected"] and task_type in device["task_types"]:
            for reason in tasks.unmet_requirements(requirements, device):
                lacking.setdefault(reason, []).append(device["device_id"])
    return (": " if lacking else "") + "; ".join(
        "%s (%s%s)" % (reason, ", ".join(names[:5]), ", …" if len(names) > 5 else "")
        for reason, names in sorted(lacking.items()))


def fitting_devices(connection, task_type, requirements):
    return [d for d in devices.list_devices(connection, ONLINE)
            if d["connected"] and task_type in d["task_types"]
            and not tasks.unmet_requirements(requirements, d)]


def add_group_task(connection, group_id, task, device_id):
    """The group's task (from tasks.check_task) pinned to one device,
    inside the caller's write transaction."""
    pinned = dict(task, requirements=dict(task["requirements"], device_id=device_id))
    return tasks.insert(connection, pinned, group_id=group_id)


def tasks_for_new_device(connection, config, device_id):
    """A device joined for the first time: give it the groups that asked
    for newcomers, when it matches them. Runs inside rc-server's write
    transaction, so a group that can no longer be given (a task it depends
    on has failed, or a group stored before options were checked) is
    passed over rather than raised: it must not fail the registration."""
    device = devices.get(connection, device_id)
    for group in connection.execute("SELECT * FROM task_groups WHERE include_new = 1"
                                    ).fetchall():
        if group["task_type"] not in device["task_types"]:
            continue
        try:
            task = tasks.check_task(config, group["task_type"], db.loads(group["payload"]),
                                    db.loads(group["requirements"]),
                                    **db.loads(group["options"], {}))
            if not tasks.unmet_requirements(task["requirements"], device):
                add_group_task(connection, group["group_id"], task, device_id)
        except tasks.TaskError:
            continue


def group(connection, group_id, limit=None, most=None):
    """Each device's task side by side, and a summary. A member's device is
    the one it is pinned to (`submit --each`), else the one it was given
    (a map's tasks are pinned to none), so `rc group` of a map says where
    each input ran; `input` is a map's input (None in a `submit --each` group).
    `limit`: at most that many tasks, those that have not completed first
    (a map of 100,000 inputs was 10 MB for a phone's dashboard), the
    summary of all of them, and "more": how many were left out. `most`: the
    same limit for a group of more tasks than that only (rc-web's bound: a
    map of 20,000 inputs, its outputs a few KB, grew it by 455 MiB)."""
    row = connection.execute("SELECT * FROM task_groups WHERE group_id = ?",
                             (group_id,)).fetchone()
    if row is None:
        raise FleetError("no group %s" % group_id)
    if limit is None and most is not None and connection.execute(
            "SELECT count(*) > ? FROM tasks WHERE group_id = ?", (most, group_id)).fetchone()[0]:
        limit = most
    # What each task shows, at most GROUP_TEXT_CHARS of each text (and one
    # more, to tell a cut one), cut by SQLite: no whole result comes here.
    members = [(task_id, state, device_id, cut(output), cut(error))
               for task_id, state, device_id, output, error in connection.execute(
        "SELECT task_id, state, coalesce(CASE WHEN json_valid(requirements)"
        " THEN json_extract(requirements, '$.device_id') END, device_id),"
        " CASE WHEN json_valid(result) AND json_type(result, '$.output') = 'text'"
        " THEN substr(json_extract(result, '$.output'), 1, :most) END, substr(error, 1, :most)"
        " FROM tasks WHERE group_id = :group ORDER BY %s LIMIT :limit"
        % ("task_id" if limit is None else "state = 'completed', task_id"),
        {"group": group_id, "most": GROUP_TEXT_CHARS + 1,
         "limit": -1 if limit is None else limit})]
    # A map's task: the input it ran (the value, or the path with --files).
    inputs = {task_id: cut(text) for task_id, text in connection.execute(
        "SELECT task_id, substr(input, 1, ?) FROM map_jobs WHERE group_id = ?"
        " AND task_id IS NOT NULL%s" % ("" if limit is None else " AND task_id IN (%s)"
                                        % ",".join(str(member[0]) for member in members)),
        (GROUP_TEXT_CHARS + 1, group_id))}
    # The summary of what is shown, or with a limit of all, counted apart.
    counted = collections.Counter(member[1] for member in members) if limit is None else dict(
        connection.execute("SELECT state, count(*) FROM tasks WHERE group_id = ?"
                           " GROUP BY state", (group_id,)).fetchall())
    summary = dict(tasks=sum(counted.values()), **counted)
    shown = {"group_id": group_id, "task_type": row["task_type"],
             "payload": db.loads(row["payload"]), "include_new": bool(row["include_new"]),
             "summary": summary,
             "tasks": [{"device_id": device_id, "task_id": task_id,
                        "input": inputs.get(task_id), "state": state, "output": output,
                        "error": error} for task_id, state, device_id, output, error in members]}
    if limit is not None:
        shown["more"] = summary["tasks"] - len(members)
    inputs = map_input_states(connection, group_id, counted)
    if inputs is not None:
        shown["inputs"] = inputs
    return shown


def map_input_states(connection, group_id, task_states):
    """A map's inputs counted by the state of the task that last ran each
    (`not queued` before one has), as `rc map` counts them: after `--resume`
    the group holds 38 tasks for its 36 inputs. None for a group that is no
    map. `task_states`: the group's tasks counted by state; while there is
    one task an input they are the same count (looking up each input's task
    took 176 ms for 100,000 inputs)."""
    row = connection.execute("SELECT inputs FROM maps WHERE group_id = ?", (group_id,)).fetchone()
    if row is None:
        return None
    if sum(task_states.values()) == row["inputs"]:
        return dict(task_states)
    return dict(connection.execute(
        "SELECT coalesce(t.state, 'not queued'), count(*) FROM map_jobs j"
        " LEFT JOIN tasks t ON t.task_id = j.task_id WHERE j.group_id = ?"
        " GROUP BY 1", (group_id,)).fetchall())


def cut(text):
    """A text of a group's view: its first GROUP_TEXT_CHARS, said so when cut."""
    if isinstance(text, str) and len(text) > GROUP_TEXT_CHARS:
        return text[:GROUP_TEXT_CHARS] + "\n[cut at %d characters]" % GROUP_TEXT_CHARS
    return text


# -- control messages -------------------------------------------------------------

def broadcast(connection, config, command, targets=None):
    """Queue a control message for every connected worker that meets
    `targets` (requirements); rc-server sends it, workers acknowledge."""
    if command not in CONTROL_COMMANDS:
        raise FleetError("unknown control %r (known: %s)" % (command,
                                                            ", ".join(CONTROL_COMMANDS)))
    targets = tasks.check_requirements(targets or {})
    with db.write(connection):
        control_id = connection.execute(
            "INSERT INTO controls(created_at, command, targets) VALUES (?, ?, ?)",
            (time.time(), command, db.dumps(targets))).lastrowid
    bell.ring(config.run_dir, bell.SERVER)
    return control_id


def control_status(connection, control_id):
    row = connection.execute("SELECT * FROM controls WHERE control_id = ?",
                             (control_id,)).fetchone()
    if row is None:
        raise FleetError("no control %s" % control_id)
    acks = [dict(r, ok=bool(r["ok"])) for r in connection.execute(
        "SELECT device_id, time, ok, detail FROM control_acks WHERE control_id = ?"
        " ORDER BY device_id", (control_id,))]
    return {"control_id": control_id, "command": row["command"],
            "targets": db.loads(row["targets"]), "acks": acks}
