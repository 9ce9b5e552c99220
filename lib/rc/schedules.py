"""Recurring tasks: `rc schedule add NAME 'CRON' TYPE ARG`, kept in the
schedules table and fired by rc-scheduler (fire_due, called from its loop).

A schedule stores the task it submits (checked when added, checked again
when it fires) and `next_fire`, the next firing time computed from the
last one. A firing that is due, however late (the main node was down),
runs once: the task's insert and the schedule's move to its next firing
commit in one transaction, which first checks that `next_fire` is still
the one it read, and the task carries the idempotency key
schedule:NAME:EPOCH, so no crash or second process can fire it twice.

Cron lines are the five fields of cron(5) (minute, hour, day of month,
month, day of week) with ranges, lists, steps and the names jan-dec and
sun-sat, or one of @yearly @monthly @weekly @daily @hourly, or
`@every 10m` (s, m, h, d; combined as 1h30m). They are read in the main
node's local time, or in `time_zone` (an IANA name, Python 3.9+).
"""
import datetime
import os
import re
import time

from rc import db, fleet, tasks
from rc.states import ACTIVE_STATES, QUEUED

NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_CRON_TEXT = 200            # characters of one cron line
MAX_ZONE_TEXT = 64             # characters of a time zone name
MIN_EVERY = 1.0                # seconds; the shortest @every
MAX_EVERY = 366 * 86400.0      # seconds; the longest @every
DAYS_AHEAD = 8 * 366           # days searched for the next firing (leap days in 8 years)
# A clock file for tests only: when RC_TEST_CLOCK names a readable file, the
# number in it is "now" for schedules (firing, next times), in seconds since
# the epoch. Nothing in a real installation sets it.
TEST_CLOCK_VARIABLE = "RC_TEST_CLOCK"
# What a schedule may carry to the task it submits (tasks.check_task's names).
TASK_OPTIONS = ("priority", "timeout", "retries", "retry_on_failure")
# What a stored task that cannot be submitted raises (refused, or not readable).
UNUSABLE_TASK = (tasks.TaskError, ValueError, TypeError, KeyError, AttributeError)
# SQL: a task that has not ended yet.
UNFINISHED = "state IN (%s)" % db.sql_list((QUEUED,) + ACTIVE_STATES)

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names counted from lowest)
FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
          ("month", 1, 12, MONTHS), ("day of week", 0, 7, WEEKDAYS))
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION = re.compile(r"\A(?:\d{1,9}[smhd])+\Z")


class ScheduleError(tasks.TaskError):
    """A schedule or service cannot be made or changed; the message says why."""


def now():
    """The schedules' clock: real time, unless a test set RC_TEST_CLOCK."""
    path = os.environ.get(TEST_CLOCK_VARIABLE)
    if path:
        try:
            with open(path) as f:
                return float(f.read().strip())
        except (OSError, ValueError):
            pass
    return time.time()


# -- when: cron lines and @every ---------------------------------------------------

class Cron:
    """The five fields of a cron line as sets of numbers."""

    def __init__(self, text):
        fields = text.split()
        if len(fields) != 5:
            raise ScheduleError("cron line %r has %d fields; it needs 5 (minute hour"
                                " day-of-month month day-of-week), @daily and the like,"
                                " or @every 10m" % (text, len(fields)))
        sets = [parse_field(field, number, *spec)
                for number, (field, spec) in enumerate(zip(fields, FIELDS), 1)]
        self.minutes, self.hours, self.days, self.months, weekdays = sets
        self.weekdays = {day % 7 for day in weekdays}           # 7 is Sunday too
        # cron(5): when both day fields are restricted, either one matching will do.
        self.any_day = fields[2].startswith("*")
        self.any_weekday = fields[4].startswith("*")
        self.hours, self.minutes = sorted(self.hours), sorted(self.minutes)

    def day_matches(self, day):
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return by_date and by_weekday
        return by_date or by_weekday

    def next_after(self, after, zone):
        """The first firing later than `after` (seconds since the epoch), in
        `zone` (None: local time); None when there is none in DAYS_AHEAD."""
        day = wall_clock(after, zone).date()
        for _ in range(DAYS_AHEAD):
            if self.day_matches(day):
                for hour in self.hours:
                    for minute in self.minutes:
                        moment = epoch_of(day, hour, minute, zone)
                        if moment is not None and moment > after:
                            return moment
            day += datetime.timedelta(days=1)
        return None


class Every:
    """@every DURATION: a firing each DURATION after the one before."""

    def __init__(self, text):
        self.seconds = parse_duration(text)

    def next_after(self, after, zone, anchor=None):
        if anchor is None or anchor > after:
            return after + self.seconds
        steps = int((after - anchor) // self.seconds) + 1
        return anchor + steps * self.seconds


def parse_duration(text):
    """10m, 30s, 2h, 1h30m, 1d -> seconds, within MIN_EVERY..MAX_EVERY."""
    if not DURATION.match(text):
        raise ScheduleError("@every %r: give a duration such as 30s, 10m, 2h, 1h30m or 1d"
                            % text)
    seconds = sum(int(number) * UNITS[unit]
                  for number, unit in re.findall(r"(\d+)([smhd])", text))
    if not MIN_EVERY <= seconds <= MAX_EVERY:
        raise ScheduleError("@every %s: must be from %gs to %gd"
                            % (text, MIN_EVERY, MAX_EVERY / 86400))
    return float(seconds)


def parse_field(text, number, name, lowest, highest, names):
    """One cron field (*, 5, 1-5, */15, 1-30/2, mon-fri, 1,15) as a set."""
    where = "cron field %d (%s) %r" % (number, name, text)
    values = set()
    for item in text.split(","):
        spread, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not is_number(step_text) or int(step_text) == 0:
                raise ScheduleError("%s: the step %r must be a whole number above 0"
                                    % (where, step_text))
            step = int(step_text)
        if spread == "*":
            first, last = lowest, highest
        else:
            first_text, dash, last_text = spread.partition("-")
            first = field_value(first_text, where, lowest, highest, names)
            last = field_value(last_text, where, lowest, highest, names) if dash else (
                highest if step_text else first)
            if last < first:
                raise ScheduleError("%s: the range %s runs backwards" % (where, spread))
        values.update(range(first, last + 1, step))
    return values


def field_value(text, where, lowest, highest, names):
    word = text.lower()
    if word in names:
        return lowest + names.index(word)
    if not is_number(text):
        raise ScheduleError("%s: %r is not a number%s" % (
            where, text, " or a name (%s-%s)" % (names[0], names[-1]) if names else ""))
    value = int(text)
    if not lowest <= value <= highest:
        raise ScheduleError("%s: %d is outside %d-%d" % (where, value, lowest, highest))
    return value


def is_number(text):
    """0-9 only: str.isdigit() is true of "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_when(text):
    """A cron line, a macro or @every as an object with next_after()."""
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("give a cron line such as '*/5 * * * *', @daily or '@every 10m'")
    if len(text) > MAX_CRON_TEXT:
        raise ScheduleError("a cron line is at most %d characters" % MAX_CRON_TEXT)
    text = text.strip()
    if text.startswith("@every"):
        return Every(text[len("@every"):].strip())
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise ScheduleError("unknown %s (known: %s, @every DURATION)"
                                % (text.split()[0], ", ".join(sorted(MACROS))))
        return Cron(MACROS[text.lower()])
    return Cron(text)


def time_zone(name):
    """A tzinfo for an IANA name; None (local time) for None or ""."""
    if not name:
        return None
    if not isinstance(name, str) or len(name) > MAX_ZONE_TEXT:
        raise ScheduleError("a time zone is a name such as Europe/Paris")
    try:
        import zoneinfo
    except ImportError:
        raise ScheduleError("--tz needs Python 3.9 or later on the main node;"
                            " without it schedules use the main node's local time")
    try:
        return zoneinfo.ZoneInfo(name)
    except (ValueError, KeyError, OSError):     # ZoneInfoNotFoundError is a KeyError
        raise ScheduleError("unknown time zone %r (an IANA name such as Europe/Paris,"
                            " America/New_York or UTC)" % name)


def wall_clock(moment, zone):
    if zone is None:
        return datetime.datetime.fromtimestamp(moment)
    return datetime.datetime.fromtimestamp(moment, zone)


def epoch_of(day, hour, minute, zone):
    """The moment a wall-clock time happens in `zone`; None for a time the
    clocks skip (spring forward). A time that happens twice (fall back)
    counts once, the first time."""
    wall = datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
    moment = wall.timestamp()
    back = wall_clock(moment, zone)
    if (back.day, back.hour, back.minute) != (day.day, hour, minute):
        return None
    return moment


def next_fire(when_text, zone_name, after, anchor=None):
    """The next firing of a schedule after `after`; ScheduleError if never."""
    when, zone = parse_when(when_text), time_zone(zone_name)
    moment = (when.next_after(after, zone, anchor) if isinstance(when, Every)
              else when.next_after(after, zone))
    if moment is None:
        raise ScheduleError("cron line %r never fires (no such date in %d years)"
                            % (when_text, DAYS_AHEAD // 366))
    return moment


# -- the task a schedule submits --------------------------------------------------

def check_name(name, what="schedule"):
    if not isinstance(name, str) or not NAME.match(name):
        raise ScheduleError("%s name %r: use 1-64 letters, digits, '.', '_' or '-',"
                            " starting with a letter or digit" % (what, str(name)[:80]))
    return name


def task_spec(config, task_type, payload, requirements=None, **options):
    """What a schedule or service keeps of its task, checked as a submit is."""
    unknown = set(options) - set(TASK_OPTIONS)
    if unknown:
        raise ScheduleError("unknown task option %s" % ", ".join(sorted(unknown)))
    options = {key: value for key, value in options.items() if value is not None}
    task = tasks.check_task(config, task_type, payload, requirements, **options)
    return {"task_type": task_type, "payload": task["payload"],
            "requirements": task["requirements"], "options": options}


def stored_task(text):
    """A schedule's or service's task as stored; one no program would write
    reads as type "unreadable" (it matches no device and submits nothing),
    so listing and the other rows go on."""
    try:
        spec = db.loads(text)
    except ValueError:
        spec = None
    if not isinstance(spec, dict) or not isinstance(spec.get("task_type"), str) \
            or not isinstance(spec.get("payload"), dict):
        return {"task_type": "unreadable", "payload": {}, "requirements": {}, "options": {}}
    return spec


def checked_task(config, spec, **overrides):
    """A stored spec as tasks.insert() takes it (checked again: the settings
    may have changed since it was stored)."""
    options = dict(spec.get("options") or {}, **overrides)
    return tasks.check_task(config, spec["task_type"], spec["payload"],
                            spec.get("requirements") or {}, **options)


def insert_for_each(connection, task, options, key_prefix):
    """One task per matching online device, as `submit --each` makes them,
    inside the caller's transaction: (group id, task count); (None, 0) when
    no device matches."""
    targets = fleet.matching_devices(connection, task["task_type"], task["requirements"])
    if not targets:
        return None, 0
    group_id = connection.execute(
        "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
        " include_new) VALUES (?, ?, ?, ?, ?, 0)",
        (time.time(), task["task_type"], db.dumps(task["payload"]),
         db.dumps(task["requirements"]), db.dumps(options))).lastrowid
    for device_id in targets:
        pinned = dict(task, requirements=dict(task["requirements"], device_id=device_id))
        tasks.insert_once(connection, pinned, "%s:%s" % (key_prefix, device_id), group_id)
    return group_id, len(targets)


# -- adding and changing schedules ----------------------------------------------------

def add(connection, config, name, when_text, spec, zone_name=None, each=False,
        allow_overlap=False):
    """Store a schedule; ScheduleError (nothing written) for a bad line, an
    unknown zone or a name in use."""
    check_name(name)
    zone_name = zone_name or None
    clock = now()
    first = next_fire(when_text, zone_name, clock)
    with db.write(connection):
        if connection.execute("SELECT 1 FROM schedules WHERE name = ?", (name,)).fetchone():
            raise ScheduleError("a schedule named %r exists; `rc schedule remove %s` first,"
                                " or choose another name" % (name, name))
        connection.execute(
            "INSERT INTO schedules(name, cron, time_zone, task, each, allow_overlap,"
            " created_at, next_fire) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, when_text.strip(), zone_name, db.dumps(spec), int(bool(each)),
             int(bool(allow_overlap)), clock, first))
    return first


def existing(connection, name):
    row = connection.execute("SELECT * FROM schedules WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ScheduleError("no schedule %r (`rc schedule list` shows them)" % name)
    return row


def pause(connection, name):
    with db.write(connection):
        existing(connection, name)
        connection.execute("UPDATE schedules SET paused = 1 WHERE name = ?", (name,))


def resume(connection, name):
    """Firings missed while paused are not made up: the next one counts from now."""
    with db.write(connection):
        row = existing(connection, name)
        connection.execute("UPDATE schedules SET paused = 0, next_fire = ? WHERE name = ?",
                           (next_fire(row["cron"], row["time_zone"], now(), row["created_at"]),
                            name))


def remove(connection, name):
    """The schedule goes; tasks it already submitted run on."""
    with db.write(connection):
        existing(connection, name)
        connection.execute("DELETE FROM schedules WHERE name = ?", (name,))


def run_now(connection, config, name):
    """Fire once now, outside the timetable (overlap allowed: it was asked
    for); the next firing stays as it was. Returns the outcome text."""
    with db.write(connection):
        row = existing(connection, name)
        clock = now()
        return submit_firing(connection, config, row, "%s:now:%.6f" % (name, clock),
                             clock, overlap_checked=False)


# -- firing (rc-scheduler) ------------------------------------------------------------

def fire_due(connection, config, log, clock=None):
    """Fire every schedule whose time has come, each in its own fenced
    transaction; returns how many submitted something."""
    clock = now() if clock is None else clock
    count_again_after_a_step_back(connection, clock)
    fired, failed = 0, []
    for row in connection.execute("SELECT name, next_fire FROM schedules"
                                  " WHERE paused = 0 AND next_fire <= ?", (clock,)).fetchall():
        try:
            outcome = fire_one(connection, config, row["name"], row["next_fire"], clock)
        except Exception as e:     # a row no program would write: the others go on
            failed.append(e)
            continue
        if outcome is not None:
            fired += outcome.startswith("task") or outcome.startswith("group")
            log.info("schedule_fired", schedule=row["name"], due=row["next_fire"],
                     late=round(clock - row["next_fire"], 3), outcome=outcome)
    if failed:
        raise failed[0]            # rc-scheduler logs it (rate-limited) and looks again
    return fired


def count_again_after_a_step_back(connection, clock):
    """Schedules added or fired later than now: the clock was set back (an
    NTP step, a clock set by hand). Their next firing, counted from then,
    waited for that time to come again: `* * * * *` set back a day fired
    nothing for a day. It is counted from now; a firing made already, its
    time come again, has its task's key (schedule:NAME:EPOCH) and runs once."""
    for row in connection.execute(
            "SELECT name, cron, time_zone, created_at, next_fire FROM schedules WHERE paused = 0"
            " AND max(created_at, coalesce(last_fired, 0), coalesce(last_run_at, 0)) > ?",
            (clock,)).fetchall():
        try:
            following = next_fire(row["cron"], row["time_zone"], clock, row["created_at"])
        except ScheduleError:
            continue            # fire_one pauses it, saying why, when it is due
        if following < row["next_fire"]:
            with db.write(connection):
                connection.execute("UPDATE schedules SET next_fire = ? WHERE name = ?"
                                   " AND next_fire = ?", (following, row["name"], row["next_fire"]))


def fire_one(connection, config, name, due, clock):
    """The firing due at `due`, once: None when another pass got there first."""
    with db.write(connection):
        row = connection.execute("SELECT * FROM schedules WHERE name = ? AND next_fire = ?"
                                 " AND paused = 0", (name, due)).fetchone()
        if row is None:
            return None
        outcome = submit_firing(connection, config, row, "%s:%d" % (name, due), clock)
        try:
            following = next_fire(row["cron"], row["time_zone"], clock, row["created_at"])
        except ScheduleError as e:         # a zone that vanished from the system
            following, outcome = None, "%s; paused: %s" % (outcome, e)
        connection.execute(
            "UPDATE schedules SET next_fire = coalesce(?, next_fire), paused = ?,"
            " last_fired = ?, last_outcome = ? WHERE name = ?",
            (following, int(following is None), due, outcome, name))
        return outcome


def submit_firing(connection, config, row, key, clock, overlap_checked=True):
    """Submit the schedule's task(s) inside the caller's transaction and
    record the outcome on the schedule; returns the outcome text."""
    held = holding_run(connection, row) if overlap_checked else None
    if held:
        outcome = "skipped: %s" % held
        connection.execute("UPDATE schedules SET last_outcome = ? WHERE name = ?",
                           (outcome, row["name"]))
        return outcome
    task_id = group_id = None
    # A task refused at firing time (settings changed since, or a stored
    # task no program would write) writes nothing of itself; the schedule
    # still moves on and says why.
    connection.execute("SAVEPOINT firing")
    try:
        spec = db.loads(row["task"])       # raw: an unreadable one is refused here
        task = checked_task(config, spec)
        if row["each"]:
            group_id, count = insert_for_each(connection, task, spec["options"], "schedule:" + key)
            outcome = ("group %d (%d tasks)" % (group_id, count) if group_id
                       else "skipped: no online device matches")
        else:
            task_id = tasks.insert_once(connection, task, "schedule:" + key, None)
            outcome = "task %d" % task_id
    except UNUSABLE_TASK as e:
        connection.execute("ROLLBACK TO firing")
        task_id = group_id = None
        outcome = "not submitted: %s" % e
    connection.execute("RELEASE firing")
    connection.execute(
        "UPDATE schedules SET last_outcome = ?, last_run_at = ?,"
        " last_task_id = coalesce(?, last_task_id), last_group_id = ? WHERE name = ?",
        (outcome, clock, task_id, group_id if row["each"] else None, row["name"]))
    return outcome


def holding_run(connection, row):
    """What holds a firing back, as its outcome's text ("task N still
    running"), or None. The last run unended (queued, assigned, running)
    holds it; with --allow-overlap only a last run still queued does:
    overlap is runs side by side, and a task no device takes otherwise
    gained one more queued task at every firing (`@every 1s`: 86,400 a day)."""
    started, queued = unended_run(connection, row)
    if started and not row["allow_overlap"]:
        return started
    return queued


def unended_run(connection, row):
    """The schedule's last run, when it has not ended, as (text if a task
    of it started, text if one still waits queued): "task N still running",
    "task N still queued (`rc why N`)" (one no device takes: `rc why` says
    why, "running" did not); for a group, a member queued for a device
    that takes nothing now waits for no firing (waits_for_its_device)."""
    started = queued = None
    if row["each"] and row["last_group_id"] is not None:
        group_id = row["last_group_id"]
        for member in connection.execute("SELECT task_type, state, requirements FROM tasks"
                                         " WHERE group_id = ? AND %s" % UNFINISHED,
                                         (group_id,)).fetchall():
            if member["state"] != QUEUED:
                started = "group %d still running" % group_id
            elif queued is None and waits_for_its_device(connection, member):
                queued = "group %d still queued (`rc group %d`)" % (group_id, group_id)
    elif not row["each"] and row["last_task_id"] is not None:
        task = connection.execute("SELECT task_id, state FROM tasks WHERE task_id = ? AND %s"
                                  % UNFINISHED, (row["last_task_id"],)).fetchone()
        if task is not None and task["state"] == QUEUED:
            queued = "task %d still queued (`rc why %d`)" % (task["task_id"], task["task_id"])
        elif task is not None:
            started = "task %d still running" % task["task_id"]
    return started, queued


def waits_for_its_device(connection, member):
    """Whether a queued task of a fleet chore waits for a device that will
    run it: one that takes new tasks now and has not given it back. One
    that gave back the task pinned to it, its only taker, kept the group
    unended, and every later firing skipped, on every device, for ever; so
    did a device gone offline with its task queued."""
    requirements = db.loads(member["requirements"], {})
    if not isinstance(requirements, dict):
        return False
    device_id = requirements.get("device_id")
    if device_id is None:
        return True            # not pinned: any device may run it
    if device_id in requirements.get(tasks.GAVE_BACK, ()):
        return False
    return device_id in fleet.matching_devices(connection, member["task_type"], requirements)


# -- reading ---------------------------------------------------------------------------

def list_schedules(connection):
    return [schedule_dict(row) for row in
            connection.execute("SELECT * FROM schedules ORDER BY name")]


def get(connection, name):
    return schedule_dict(existing(connection, name))


def schedule_dict(row):
    schedule = dict(row)
    schedule["task"] = stored_task(row["task"])
    for key in ("each", "allow_overlap", "paused"):
        schedule[key] = bool(schedule[key])
    schedule["state"] = "paused" if schedule["paused"] else "active"
    return schedule
