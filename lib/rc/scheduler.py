"""rc-scheduler: gives queued tasks to online devices with free slots.

Order: priority (urgent first), then age. A task that fits no device is
passed over, so it never holds up the tasks behind it. The scheduler wakes
when its doorbell rings (a submit, a result, a device), and looks at other
commits (PRAGMA data_version) once per poll_interval, not on a fixed beat.

A device that turns short tasks over fast is given a few more than its free
slots (`prefetch_per_slot`), which wait in the worker's own queue: a slot
that frees then starts its next task at once instead of waiting a round trip
through rc-server and here. Tasks that run longer never wait behind each
other that way (see Turnover).

A task with input files goes, among the fitting devices with an idle slot,
to the one whose file cache (reported in heartbeats) holds the most of its
input bytes: the same 200 MB model is not sent to a second device when the
first has a slot free.

A row it cannot make sense of (a requirement or a device's list that is
not valid JSON, a claim beyond what the operator allows) costs that row
only: the task or device is passed over and logged (rate-limited), and a
pass that fails as a whole is logged and tried again; the loop never ends
on it.
"""
import heapq
import time

from rc import bell, db, files, program, schedules, services, tasks, throttle
from rc.states import ACTIVE_STATES, ASSIGNED, INSTANT_TASK_TYPES, ONLINE, QUEUED, TASK_TYPES

BATCH = 2000          # queued tasks looked at per pass
PASS_BUDGET = 0.1     # seconds a pass may spend choosing; the rest waits a pass
IDLE_CHECK = 1.0      # seconds; look again even without a change (backoffs end)
FAILED_PASS_PAUSE = 1.0   # seconds before a pass that raised is tried again
PREFETCH_WINDOW = 0.5  # seconds; a device whose tasks all began within this is quick
# Seconds a ring of the room bell (a result) waits for the next ones while
# every quick device still has a prefetched task in its own queue: its slot
# that freed has started that one already, and one pass then refills the
# room several results made, not one pass per result (a pass costs ~0.2 ms
# of CPU, as much as the assignment of a `true` task; at 800 tasks/s they
# were a tenth of the main node's work).
ROOM_GATHER = 0.002
RECURRING_INTERVAL = 0.5   # seconds between looks at schedules and services
# SQL: the task has input files (then the device holding them is preferred).
HAS_INPUTS = ("EXISTS (SELECT 1 FROM task_files f WHERE f.task_id = tasks.task_id"
              " AND f.kind = 'input')")
EARLIEST_QUEUED = "SELECT min(not_before) FROM tasks WHERE %s" % db.QUEUED_SQL
# When the next queued task in a backoff may start (a parameter: now).
NEXT_BACKOFF_END = ("SELECT min(not_before) FROM tasks WHERE %s AND not_before > ?"
                    % db.QUEUED_SQL)
# Queued tasks, counted up to QUEUED_COUNT_CAP (an index walk that stops
# there): a pass that assigned every one of fewer left nothing waiting.
QUEUED_COUNT_CAP = 64
QUEUED_COUNT = ("SELECT count(*) FROM (SELECT 1 FROM tasks WHERE %s LIMIT %d)"
                % (db.QUEUED_SQL, QUEUED_COUNT_CAP))
# The types that need a slot (the others are instant).
SLOT_TASK_TYPES = tuple(t for t in TASK_TYPES if t not in INSTANT_TASK_TYPES)
# How a walk of the queue ended (BATCH_READ: it read BATCH rows; the next reads on).
ROOM_FULL, QUEUE_ENDED, CUT_SHORT, BATCH_READ = ("room full", "queue ended", "cut short",
                                                 "batch read")


# What the scheduler reads of each device: only what matching and ranking need,
# with the two ranking figures pulled out of their JSON by SQLite itself (a
# column that is not valid JSON reads as no figure: json_extract would fail
# the whole query), and the slots it claims cut to what the operator allows.
DEVICE_QUERY = (
    "SELECT device_id, max(0, min(slots, coalesce(slots_limit, :max_slots))) AS slots,"
    " cpu_cores, memory_gb,"
    " platform, architecture,"
    " coalesce(role_override, role) AS role, capabilities, tags, task_types, labels,"
    " cached_files,"
    " coalesce(CASE WHEN json_valid(metrics) THEN json_extract(metrics, '$.cpu_percent') END,"
    " 50.0) AS cpu_busy,"
    " coalesce(CASE WHEN json_valid(profile)"
    " THEN json_extract(profile, '$.hardware_specs.cpu_speed') END, 0.0) AS speed"
    " FROM devices WHERE status = :online AND connected = 1 AND available = 1"
    " AND drained = 0 AND forgotten = 0"
    # A device that answers nothing (rc-server's Liveness) gets nothing new.
    " AND suspect_since IS NULL")


class Turnover:
    """Which devices finish their tasks fast enough to be given more than
    their free slots: those that finished at least one since the last pass
    (they hold fewer than the pass left them with) while everything they hold
    began less than PREFETCH_WINDOW ago. A device busy with long tasks never
    shows both, so nothing waits behind a long task on a device; should a
    task be prefetched just as long ones began, the worker hands it back
    after half the accept_timeout. Kept in memory: a restarted scheduler only
    waits one pass to see it again."""

    def __init__(self):
        self.held = {}        # device_id -> tasks it held when the last pass ended
        self.buffered = False     # the last pass left every quick device a task queued

    def is_quick(self, device_id, held, oldest, now):
        before = self.held.get(device_id)
        return (before is not None and 0 < held < before
                and oldest is not None and now - oldest < PREFETCH_WINDOW)

    def remember(self, devices):
        self.held = {device["device_id"]: device["held"] for device in devices}
        quick = [device for device in devices if device["prefetch"]]
        self.buffered = bool(quick) and all(device["held"] > device["slots"]
                                            for device in quick)


class Slots:
    """The online, connected, available devices and how many tasks each can
    still take: `free` for tasks that run a while (its free slots, plus what
    it may prefetch), `instant_free` for the instant types, which the worker
    answers at once without a slot.

    With thousands of devices a pass must not rank every device for every
    task: tasks without requirements take the top of a heap per (room, task
    type); only tasks with requirements scan the devices."""

    def __init__(self, connection, config, now, turnover=None, log_limited=None):
        held, oldest = {}, {}
        for row in connection.execute(
                "SELECT device_id, task_type IN (%s) AS instant, count(*) AS n,"
                " min(coalesce(started_at, assigned_at)) AS oldest FROM tasks"
                " WHERE %s GROUP BY 1, 2" % (db.sql_list(INSTANT_TASK_TYPES), db.ACTIVE_SQL)):
            held[(row["device_id"], row["instant"])] = row["n"]
            if not row["instant"]:
                oldest[row["device_id"]] = row["oldest"]
        decoded = {}      # most devices send identical lists: decode each text once

        def names(text):
            if text not in decoded:
                decoded[text] = frozenset(db.loads(text, []))
            return decoded[text]

        def labels(text):
            if text not in decoded:
                decoded[text] = db.loads(text, {})
            return decoded[text]
        turnover = turnover or Turnover()
        self.devices = []
        for row in connection.execute(DEVICE_QUERY, {"max_slots": config.max_device_slots,
                                                     "online": ONLINE}):
            device_id = row["device_id"]
            device = dict(row)
            try:
                for key in ("capabilities", "tags", "task_types"):
                    device[key] = names(row[key])
                device["labels"] = labels(row["labels"])
                if not isinstance(device["labels"], dict) or not isinstance(row["slots"], int):
                    raise ValueError("labels must be an object and slots a number")
            except (ValueError, TypeError) as e:      # orjson's errors are ValueErrors
                if log_limited:
                    log_limited("error", "device_unreadable", device_id, device_id=device_id,
                                error=repr(e)[:300])
                continue
            device["held"] = held.get((device_id, 0), 0)
            device["idle"] = row["slots"] - device["held"]       # slots with nothing in them
            prefetch = (row["slots"] * config.prefetch_per_slot if turnover.is_quick(
                device_id, device["held"], oldest.get(device_id), now) else 0)
            device["free"] = device["idle"] + prefetch
            device["prefetch"] = prefetch
            device["instant_free"] = (row["slots"] * config.instant_per_slot
                                      - held.get((device_id, 1), 0))
            self.devices.append(device)
        self.room_free = {room: sum(max(0, d[room]) for d in self.devices)
                          for room in ("free", "instant_free")}
        self.free = sum(self.room_free.values())
        self.heaps = {}

    def take(self, device, task_type):
        room = room_for(task_type)
        device[room] -= 1
        if room == "free":
            device["idle"] -= 1
            device["held"] += 1
        self.room_free[room] -= 1
        self.free -= 1

    def type_filter(self):
        """SQL that leaves out the task types no device has room for: with
        every slot busy and the instant room open, a pass must not walk the
        whole queue of shell tasks to find the few echo ones."""
        if self.room_free["free"] <= 0:
            return "task_type IN (%s)" % db.sql_list(INSTANT_TASK_TYPES)
        if self.room_free["instant_free"] <= 0:
            return "task_type IN (%s)" % db.sql_list(SLOT_TASK_TYPES)
        return "1"

    def best_for(self, task_type, requirements):
        """The fitting device that should take the task next: the most idle
        slots, so a batch spreads out (and a prefetch never wins over an idle
        slot elsewhere), then the least busy CPU, then the fastest (when the
        worker reported a speed). A device that gave the task back before
        (tasks.give_back) only when no other fits."""
        room = room_for(task_type)
        heap = self.heap(room, task_type)
        refused, best, gave_back = [], None, requirements.get(tasks.GAVE_BACK, ())
        # Best first; a device that misses a requirement is set aside for
        # this task only. Entries go stale when a device takes a task:
        # re-rank them and look again.
        try:
            while heap:
                rank, n, device = heap[0]
                current = negated(preference(device, room))
                if device[room] <= 0:
                    heapq.heappop(heap)
                elif current != rank:
                    heapq.heapreplace(heap, (current, n, device))
                elif requirements and tasks.unmet_requirements(requirements, device):
                    refused.append(heapq.heappop(heap))
                elif device["device_id"] in gave_back:
                    best = best or device       # the best of them, if no other fits
                    refused.append(heapq.heappop(heap))
                else:
                    best = device
                    break
        finally:       # requirements that raise must not cost the next task its devices
            for entry in refused:
                heapq.heappush(heap, entry)
        return best

    def best_holding(self, task_type, requirements, inputs):
        """best_for() for a task with input files: among the fitting devices
        with an idle slot (or, failing that, any room), the one whose cache
        holds the most of its input bytes, so it fetches the least. A scan
        of the devices, for these tasks only."""
        room = room_for(task_type)
        best, best_rank, gave_back = None, None, requirements.get(tasks.GAVE_BACK, ())
        for device in self.devices:
            if device[room] <= 0 or task_type not in device["task_types"] \
                    or (requirements and tasks.unmet_requirements(requirements, device)):
                continue
            rank = (device["device_id"] not in gave_back, device["idle"] > 0,
                    held_bytes(device, inputs), preference(device, room))
            if best_rank is None or rank > best_rank:
                best, best_rank = device, rank
        return best

    def heap(self, room, task_type):
        heap = self.heaps.get((room, task_type))
        if heap is None:
            heap = [(negated(preference(d, room)), n, d) for n, d in enumerate(self.devices)
                    if d[room] > 0 and task_type in d["task_types"]]
            heapq.heapify(heap)
            self.heaps[(room, task_type)] = heap
        return heap


def held_bytes(device, inputs):
    """Bytes of these inputs ({sha256: size}) the device's cache holds."""
    if "cached" not in device:
        try:
            cached = db.loads(device["cached_files"], [])
            device["cached"] = frozenset(cached) if isinstance(cached, list) else frozenset()
        except (ValueError, TypeError):
            device["cached"] = frozenset()
    return sum(size for sha256, size in inputs.items() if sha256 in device["cached"])


def room_for(task_type):
    return "instant_free" if task_type in INSTANT_TASK_TYPES else "free"


def preference(device, room):
    busy, speed = device["cpu_busy"], device["speed"]
    return (device["idle"] if room == "free" else device[room], device[room],
            -busy if isinstance(busy, (int, float)) else -50.0,
            speed if isinstance(speed, (int, float)) else 0.0)


def negated(rank):
    return tuple(-value for value in rank)


def schedule(connection, now, log, config, turnover=None, log_limited=None):
    """One pass: assign what fits now. Returns how many tasks were assigned.
    `turnover` carries what one pass learns to the next (see Turnover)."""
    earliest = earliest_queued(connection)
    if earliest is None or earliest > now:
        return 0      # the common case when idle: no transaction at all
    return assign_ready(connection, now, log, config, turnover, log_limited)[0]


def earliest_queued(connection):
    """When the first queued task may start (None: none queued); one index lookup."""
    return connection.execute(EARLIEST_QUEUED).fetchone()[0]


def assign_ready(connection, now, log, config, turnover, log_limited=None, cursor=None):
    """schedule() once some queued task is ready: how many tasks it assigned,
    and whether it stopped short of the queue's end (its time ran out; then
    `cursor`, a QueueCursor, says where the next pass goes on)."""
    # Choose outside any transaction, then write the choices in one short
    # one: reading is most of a pass, and rc-server's results must not wait
    # behind it (SQLite's busy wait sleeps a millisecond or more). Only this
    # program assigns, so no device's room shrinks in between; a task
    # cancelled meanwhile is no longer queued and is left alone.
    log_limited = log_limited or throttle.LimitedLog(log)
    slots = Slots(connection, config, now, turnover, log_limited)
    chosen, cut_short = choose(connection, slots, now, log_limited, cursor)
    given = []
    if chosen:
        with db.write_statements(connection, len(chosen)):
            given = [choice for choice in chosen
                     if assign(connection, choice, now, config.accept_timeout)]
    if given:
        bell.ring(config.run_dir, bell.SERVER_ASSIGNED)     # first: rc-server sends them on
    if turnover is not None:
        turnover.remember(slots.devices)
    # After the commit (never log a rollback), in one write.
    log.log_many([("info", "task_assigned",
                   {"task_id": task_id, "attempt": attempt, "device_id": device_id})
                  for task_id, attempt, device_id in given])
    return len(given), cut_short


class QueueCursor:
    """Where a pass that ran out of time stopped reading the queue. The next
    pass reads the head of the queue (new urgent tasks) and then goes on from
    there, not from the head again: thousands of tasks that fit no device at
    the head must not hide the ones behind them for ever."""

    def __init__(self):
        self.after = None       # (priority, task_id) of the last task read


def queue_order(key):
    return (-key[0], key[1])        # ORDER BY priority DESC, task_id


def choose(connection, slots, now, log_limited, cursor=None):
    """(task_id, attempt, device_id) for the tasks that fit now, in queue
    order; and whether a walk was cut short."""
    deadline = time.monotonic() + PASS_BUDGET
    chosen, after = [], None
    # A room (slots, or instant room) that fills up ends a walk of the queue;
    # the next walk asks only for the types that still have room, if any wait.
    while slots.free > 0 and any_queued(connection, slots.type_filter()):
        ended, last = walk_queue(connection, slots, now, deadline, chosen, log_limited, after)
        if ended == ROOM_FULL:
            after = None
        elif ended == BATCH_READ:
            after = last
            if cursor is not None and cursor.after is not None:
                after = max(last, cursor.after, key=queue_order)   # read that far already
                cursor.after = None
        else:
            if cursor is not None:
                cursor.after = last if ended == CUT_SHORT else None
            return chosen, ended == CUT_SHORT
    return chosen, False


def any_queued(connection, type_filter):
    """Whether a task of these types waits at all (an index lookup): walking
    the queue in order for a type it does not hold would read all of it."""
    return type_filter == "1" or connection.execute(
        "SELECT 1 FROM tasks WHERE %s AND %s LIMIT 1" % (db.QUEUED_SQL, type_filter)).fetchone()


def walk_queue(connection, slots, now, deadline, chosen, log_limited, after=None):
    """Walk the queue in order (past `after`, a (priority, task_id)), giving
    each task the best device for it, until a room fills up, the queue ends,
    BATCH rows were read, or the pass's time runs out (cut short); and the
    (priority, task_id) of the last task read."""
    # Read lazily: with thousands queued and a few free slots, a pass
    # should touch a few rows, not the whole queue.
    past, parameters = "", (now,)
    if after is not None:
        past = " AND (priority < ? OR (priority = ? AND task_id > ?))"
        parameters += (after[0], after[0], after[1])
    queued = connection.execute(
        "SELECT task_id, attempt, task_type, priority, requirements, %s AS has_inputs"
        " FROM tasks INDEXED BY tasks_ready"
        " WHERE %s AND not_before <= ?%s AND %s"
        " ORDER BY priority DESC, task_id LIMIT ?"
        % (HAS_INPUTS, db.READY_SQL, past, slots.type_filter()),
        parameters + (BATCH,))
    seen, last = 0, after
    for task in queued:
        seen += 1
        if time.monotonic() > deadline:
            return CUT_SHORT, last      # assign what we have; the next pass goes on
        last = (task["priority"], task["task_id"])
        try:
            if task["has_inputs"]:
                device = slots.best_holding(task["task_type"], requirements_of(task),
                                            files.input_hashes(connection, task["task_id"]))
            else:
                device = slots.best_for(task["task_type"], requirements_of(task))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            log_limited("error", "task_unreadable", task["task_id"], task_id=task["task_id"],
                        error=repr(e)[:300])
            continue       # it stays queued; `rc why` and the log say why
        if device is None:
            continue
        slots.take(device, task["task_type"])
        chosen.append((task["task_id"], task["attempt"], device["device_id"]))
        if slots.room_free[room_for(task["task_type"])] == 0:
            return ROOM_FULL, last
    return (BATCH_READ if seen == BATCH else QUEUE_ENDED), last


def requirements_of(task):
    requirements = db.loads(task["requirements"], {})
    if not isinstance(requirements, dict):
        raise ValueError("requirements must be an object, not %r" % task["requirements"][:100])
    return requirements


def assign(connection, choice, now, accept_timeout):
    """False when the task is no longer queued (cancelled since it was chosen)."""
    task_id, attempt, device_id = choice
    # The first lease is short: the device must accept it promptly.
    return connection.execute(
        "UPDATE tasks SET state = ?, device_id = ?, assigned_at = ?,"
        " lease_expires = ?, reason = ? WHERE task_id = ? AND attempt = ? AND state = ?",
        (ASSIGNED, device_id, now, now + accept_timeout, "scheduled",
         task_id, attempt, QUEUED)).rowcount == 1


def next_backoff_end(connection, now):
    return connection.execute(NEXT_BACKOFF_END, (now,)).fetchone()[0]


def run(config, log, should_stop):
    connection = db.open_database(config.db_path)
    doorbell = bell.Bell(config.run_dir, bell.SCHEDULER)
    log.info("scheduler_started", active_states=list(ACTIVE_STATES))
    log_limited = throttle.LimitedLog(log)
    state = {"seen": None, "wake_at": 0.0, "turnover": Turnover(), "rung": True,
             "passed_at": 0.0, "cursor": QueueCursor(), "waiting": False, "room_bell": None}
    while not should_stop():
        if look_after_recurring(connection, config, log, log_limited, state):
            state["wake_at"] = 0.0         # what it queued is assigned at once
        try:
            if one_look(connection, config, log, log_limited, state):
                continue       # go on at once with what the pass left
        except Exception as e:     # a pass that raises is tried again; the loop goes on
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            log_limited("error", "pass_failed", "pass", error=repr(e)[:500])
            state["wake_at"] = time.monotonic() + FAILED_PASS_PAUSE
        if listen_for_room(config, state, log_limited):
            continue
        bells = [doorbell] + ([state["room_bell"]] if state["room_bell"] else [])
        rung = bell.rung(bells, min(config.poll_interval,
                                    max(0.0, state["wake_at"] - time.monotonic())))
        state["rung"] = bool(rung)
        if gathers(rung, state):
            time.sleep(ROOM_GATHER)
            bell.rung(bells, 0)        # the results meanwhile: this pass sees them
    for listening in (doorbell, state["room_bell"]):
        if listening is not None:
            listening.close()


def gathers(rung, state):
    """Whether to wait ROOM_GATHER before the pass: only the room bell rang
    (results, no submit, no device), and the last pass left every quick
    device a task waiting in its queue (Turnover.buffered), so no slot idles
    meanwhile."""
    return bool(rung) and rung == [state["room_bell"]] and state["waiting"] \
        and state["turnover"].buffered


def listen_for_room(config, state, log_limited):
    """Listen to the room bell (bell.SCHEDULER_ROOM) while the last pass
    left tasks waiting, and not otherwise: then a result wakes us only when
    it may let one go. True when it was only now bound: a result committed
    since the pass read the devices rang nobody, so look again at once (its
    commit shows in data_version)."""
    if state["waiting"] and state["room_bell"] is None:
        try:
            state["room_bell"] = bell.Bell(config.run_dir, bell.SCHEDULER_ROOM)
        except OSError as e:
            # Looking once per poll_interval still finds the room; binding
            # is tried again at the next wait.
            log_limited("error", "room_bell_failed", "room_bell", error=repr(e)[:300])
            return False
        state["rung"] = True
        return True
    if not state["waiting"] and state["room_bell"] is not None:
        state["room_bell"].close()
        state["room_bell"] = None
    return False


def one_look(connection, config, log, log_limited, state):
    """Assign what is ready if anything changed or a backoff ended; True
    when the pass was cut short and should go on at once.

    A commit that may make room or work rings the bell (a submit, a
    result, a device joining): then the pass is now. Other commits (an
    acceptance, progress, a heartbeat: one or two for every task) are
    looked at once per poll_interval, so that a busy cluster is not walked
    again after each of them. When to look again is the monotonic clock's
    (the database's times are the wall clock's): set back a day, the wall
    clock held up every look not rung (a backoff's end) for a day."""
    now, clock = time.time(), time.monotonic()
    # And when a backoff ends, in the same statement: a pass only takes
    # tasks out of the queue, so what it leaves waits no less than that.
    version, earliest, backoff_end, queued = db.data_version_and(
        connection, "(%s), (%s), (%s)" % (EARLIEST_QUEUED, NEXT_BACKOFF_END, QUEUED_COUNT),
        (now,))
    if version == state["seen"] and clock < state["wake_at"]:
        return False
    if not state["rung"] and clock < state["wake_at"] \
            and clock - state["passed_at"] < config.poll_interval:
        return False      # looked at again when the wait below ends
    state["seen"], state["rung"], state["passed_at"] = version, True, clock
    # Our own commit does not change data_version for us; nothing to undo.
    later = earliest
    if earliest is None:
        state["waiting"] = False
    elif earliest <= now:
        assigned, cut_short = assign_ready(connection, now, log, config, state["turnover"],
                                           log_limited, state["cursor"])
        # What the pass left (no room, dependencies, a backoff) waits for a
        # result or a device: listen for them (see listen_for_room).
        state["waiting"] = cut_short or not (assigned == queued < QUEUED_COUNT_CAP)
        if assigned and cut_short:
            state["wake_at"] = clock
            return True
        later = backoff_end       # what is left waits
    state["wake_at"] = clock + (min(later - now, IDLE_CHECK) if later else IDLE_CHECK)
    return False


def look_after_recurring(connection, config, log, log_limited, state):
    """Fire the schedules that are due and keep services running
    (lib/rc/schedules.py, services.py), at most every RECURRING_INTERVAL;
    a failure is logged and tried at the next look. True when it queued
    something. By the monotonic clock: by the wall clock's, set back a day
    (an NTP step, a clock set by hand), no schedule fired and no service
    was started again for a day."""
    now = time.monotonic()
    if now < state.get("recurring_at", 0.0):
        return False
    state["recurring_at"] = now + RECURRING_INTERVAL
    queued = 0
    for name, chore in (("schedules", schedules.fire_due), ("services", services.tend)):
        try:
            queued += chore(connection, config, log)
        except Exception as e:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            log_limited("error", "recurring_failed", name, chore=name, error=repr(e)[:500])
    return queued > 0


def main():
    program.serve("rc-scheduler", run)


if __name__ == "__main__":
    main()
