"""rc-web's routes for programs that submit and collect many tasks (issue 19):
a result that can be waited for, many results in one request, a group's
results as they finish, a batch submit that costs one audit line, and the
Python client itself (/client.py).

Waiting never polls the tasks a request waits for: one waiting request at
a time (ChangeWatch) looks at `PRAGMA data_version` for all of them, woken
at once by rc-web's doorbell (rc-server rings it when results are committed)
or every WATCH_INTERVAL without one, and a waiter then reads only the task
events committed since its last look. Each waiting request holds a waitress
thread, so there are at most MAX_WAITERS of them (MAX_WAITERS_PER_ADDRESS
from one address); past that a request is answered at once, as if it had
not asked to wait, and says so (`wait_refused`).
"""
import hashlib
import ipaddress
import os
import sqlite3
import threading
import time

import bottle
import orjson

from rc import bell, bounded, db, tasks, web_server
from rc import config as rc_config
from rc.states import COMPLETED, TERMINAL_STATES

MAX_WAIT = 60.0                 # seconds one request may wait for results
MAX_WAITERS = 16                # requests waiting at once (each holds a waitress thread)
MAX_WAITERS_PER_ADDRESS = 4     # ... of those, from one address (an IPv6 /64)
STREAM_SHARE = 3                # one address but loopback holds at most 1/3 of max_streams
MAX_RESULT_IDS = 10000          # task ids one bulk read names
MAX_RESULTS_BYTES = 8 * 1024 * 1024     # bytes of results one answer carries at most;
                                # the rest are listed in `not_sent`, to be asked again
WATCH_INTERVAL = 0.05           # seconds between looks at data_version when no doorbell
                                # rings (rc-server rings it for results)
WAKE_EVERY = 1.0                # seconds a waiter sleeps at most (to see its client leave)
STREAM_PING = 15.0              # seconds between keep-alive blank lines on a quiet stream
STREAM_PAGE = 64                # ended tasks a group's stream reads and sends at once
MAX_KNOWN_GROUPS = 10000        # client groups rc-web remembers as checked (ClientGroups)
ID_CHUNK = 500                  # ids per IN (...) query: old SQLite allows 999 parameters
UNTIL = ("any", "all")
CLIENT_PATH = os.path.join(rc_config.CHECKOUT, "lib", "rc", "client.py")
TERMINAL_SQL = "state IN (%s)" % db.sql_list(TERMINAL_STATES)
# The newest event's id (the first row, ordered by -1), then a group's tasks
# that ended in events past a cursor, past a task id: one statement, so one
# snapshot and one trip through SQLite a wake. CROSS JOIN keeps the events
# outside: otherwise SQLite walks every task of the group on each look (its
# index on group_id), ~3 ms a wake for a session of 5,000 tasks.
GROUP_ENDED_SQL = ("SELECT -1, coalesce(max(id), 0), NULL, NULL, NULL FROM task_events"
                   " UNION ALL SELECT e.id, t.task_id, t.state, t.result, t.error"
                   " FROM task_events e CROSS JOIN tasks t ON t.task_id = e.task_id"
                   " WHERE e.id > ? AND e." + TERMINAL_SQL + " AND t.group_id = ?"
                   " AND t.task_id > ? ORDER BY 1")
# A page of a group's tasks that had ended when a stream began, by task id.
ENDED_PAGE_SQL = ("SELECT task_id, state, result, error FROM tasks WHERE group_id = ?"
                  " AND task_id > ? AND task_id <= ? AND " + TERMINAL_SQL +
                  " ORDER BY task_id LIMIT ?")


class ApiError(Exception):
    """As rc.web.ApiError (that module imports this one): {"error"} with `status`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def contained(handler):
    """The handler, with its ApiError answered as {"error"}."""
    def answer(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except ApiError as e:
            return json_response({"error": str(e)}, e.status)
    return answer


def json_response(value, status=200, headers=None):
    return bottle.HTTPResponse(orjson.dumps(value, default=repr), status,
                               dict({"Content-Type": "application/json"}, **(headers or {})))


# -- waking up waiters -----------------------------------------------------------------

class ChangeWatch:
    """Tells waiting requests that the database changed. `generation` grows
    by one for each change seen; a waiter remembers the generation before it
    looks at the database and sleeps until it moves on.

    It has no thread of its own: one waiter at a time watches for all of
    them (sleeps on the doorbell, then looks at data_version), so the one
    waiting request, the usual case, is woken by the ring itself rather
    than by a thread the ring woke. The others sleep on the condition until
    the watcher sees a change, or leaves (its own wait is over) and hands
    the watch to one of them."""

    def __init__(self, config):
        self.config = config
        self.condition = threading.Condition()
        self.generation = 0
        self.watching = False
        self.connection = self.doorbell = self.version = None

    def wait(self, seen, timeout):
        """Sleep until the generation is past `seen` or `timeout` passes;
        returns the generation now."""
        deadline = time.monotonic() + timeout
        with self.condition:
            try:
                while self.generation == seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if self.watching:
                        self.condition.wait(left)
                    else:
                        self.watch(seen, deadline)
                return self.generation
            finally:
                if not self.watching:
                    # It watched and leaves, or was handed the watch as its own
                    # wait ended: a waiter still waiting takes it on.
                    self.condition.notify()

    def watch(self, seen, deadline):
        """Watch for everyone until a change or the deadline; the condition's
        lock is held, and let go while it sleeps on the doorbell."""
        self.watching = True
        try:
            while self.generation == seen and time.monotonic() < deadline:
                self.condition.release()
                try:
                    changed = self.look(min(deadline - time.monotonic(), WATCH_INTERVAL))
                finally:
                    self.condition.acquire()
                if changed:
                    self.generation += 1
                    self.condition.notify_all()
        finally:
            self.watching = False

    def look(self, seconds):
        """Sleep on the doorbell for up to `seconds`, then whether the
        database changed since the last look (the watcher's alone)."""
        if self.connection is None:
            self.connection = db.connect(self.config.db_path)
            self.version = db.data_version(self.connection)
            try:
                self.doorbell = bell.Bell(self.config.run_dir, bell.WEB)
            except OSError:
                pass            # no run directory to bind in: looking is enough
        if self.doorbell is not None:
            if self.doorbell.wait(seconds):
                # Rung: rc-server committed results. Asking data_version too
                # would cost the waiters a statement before they look; the next
                # quiet look reads it afresh (and says "changed" once, to be safe).
                self.version = None
                return True
        else:
            time.sleep(max(0.0, seconds))
        now = db.data_version(self.connection)
        changed, self.version = now != self.version, now
        return changed


class WaitSlots:
    """How many requests wait at once, in all and per address (an IPv6
    /64; an `unlimited` address has no share of its own)."""
    REFUSED_IN_ALL = ("%(total)d requests are waiting already, the most rc-web allows;"
                      " answered without waiting")
    REFUSED_FOR_ADDRESS = ("%(per_address)d requests from %(key)s are waiting already, the"
                           " most one address may hold; answered without waiting")

    def __init__(self, total=MAX_WAITERS, per_address=MAX_WAITERS_PER_ADDRESS):
        self.total, self.per_address = total, per_address
        self.lock = threading.Lock()
        self.by_address = {}

    @property
    def open(self):
        return sum(self.by_address.values())

    def unlimited(self, address):
        return False

    def take(self, address):
        """A message saying why not, or None when the slot is taken."""
        key = web_server.address_key(address or "")
        with self.lock:
            if self.open >= self.total:
                return self.REFUSED_IN_ALL % {"total": self.total}
            if self.by_address.get(key, 0) >= self.per_address and not self.unlimited(address):
                return self.REFUSED_FOR_ADDRESS % {"per_address": self.per_address, "key": key}
            self.by_address[key] = self.by_address.get(key, 0) + 1
        return None

    def give(self, address):
        key = web_server.address_key(address or "")
        with self.lock:
            left = self.by_address.get(key, 1) - 1
            if left:
                self.by_address[key] = left
            else:
                self.by_address.pop(key, None)


class StreamSlots(WaitSlots):
    """Streams open at once (each holds a waitress thread): max_streams in
    all, and at most a third of them from one address other than the main
    node's own, so that one reader on the LAN cannot take every stream and
    leave the others' dashboards and clients with 503s."""
    REFUSED_IN_ALL = ("%(total)d streams are open, the most rc-web allows (max_streams);"
                      " try again later")
    REFUSED_FOR_ADDRESS = ("%(per_address)d streams from %(key)s are open, the most one"
                           " address may hold (a third of max_streams); try again later")

    def __init__(self, total):
        super().__init__(total, max(1, total // STREAM_SHARE))

    def unlimited(self, address):
        return is_loopback(address)

    def take(self, address):
        """(a function that gives the slot back, once however often it is
        called; None) or (None, why the stream is refused)."""
        refused = super().take(address)
        if refused:
            return None, refused
        held = [True]

        def give_back():
            try:
                held.pop()          # atomic: only the first call gets here
            except IndexError:
                return
            self.give(address)
        return give_back, None


def is_loopback(address):
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


# -- reading results -------------------------------------------------------------------

def last_event(connection):
    return connection.execute("SELECT coalesce(max(id), 0) FROM task_events").fetchone()[0]


def group_ended(connection, cursor, group_id, after):
    """(the cursor of the next look, [(task id, state, result, error)] of
    the group's tasks past `after` that ended in events past `cursor`): at
    most STREAM_PAGE of them, the first, and the cursor then at the last
    one's event. A stream whose client read nothing for a while (its
    thread waits until waitress's buffer drains) finds every task that
    ended meanwhile, each result up to a frame's 1 MiB: all at once, that
    was hundreds of MiB in rc-web for one wake."""
    rows = connection.execute(GROUP_ENDED_SQL + " LIMIT ?",
                              (cursor, group_id, after, STREAM_PAGE + 1)).fetchall()
    ended = [tuple(row)[1:] for row in rows[1:]]
    return (rows[-1][0] if len(ended) == STREAM_PAGE else rows[0][1]), ended


def finished_since(connection, after, until_id):
    """Ids of tasks that reached a terminal state in events (after, until_id]."""
    return {row[0] for row in connection.execute(
        "SELECT task_id FROM task_events WHERE id > ? AND id <= ? AND " + TERMINAL_SQL,
        (after, until_id))}


def task_rows(connection, task_ids):
    """{task id: (state, result JSON text, error)} of those that exist."""
    found, ids = {}, list(task_ids)
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start:start + ID_CHUNK]
        for row in connection.execute(
                "SELECT task_id, state, result, error FROM tasks WHERE task_id IN (%s)"
                % ",".join("?" * len(chunk)), chunk):
            found[row[0]] = (row[1], row[2], row[3])
    return found


def result_sizes(connection, task_ids):
    """{task id: characters of its result and error}, counted by SQLite:
    the texts themselves stay in the database."""
    found, ids = {}, list(task_ids)
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start:start + ID_CHUNK]
        found.update(connection.execute(
            "SELECT task_id, coalesce(length(result), 0) + coalesce(length(error), 0)"
            " FROM tasks WHERE task_id IN (%s)" % ",".join("?" * len(chunk)), chunk))
    return found


def within_answer(connection, task_ids):
    """(those of `task_ids` whose results one answer carries, in order, the
    first always; the rest, not_sent): MAX_RESULTS_BYTES of them, their
    sizes read a chunk at a time until it is reached."""
    size = 0
    for start in range(0, len(task_ids), ID_CHUNK):
        chunk = task_ids[start:start + ID_CHUNK]
        sizes = result_sizes(connection, chunk)
        for n, task_id in enumerate(chunk):
            size += sizes.get(task_id, 0) + 100
            if size > MAX_RESULTS_BYTES and start + n:
                return task_ids[:start + n], task_ids[start + n:]
    return task_ids, []


def task_states(connection, task_ids):
    """{task id: state} of those that exist."""
    found, ids = {}, list(task_ids)
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start:start + ID_CHUNK]
        found.update(connection.execute(
            "SELECT task_id, state FROM tasks WHERE task_id IN (%s)"
            % ",".join("?" * len(chunk)), chunk))
    return found


def result_entry(task_id, row):
    """One task's result, in the shape of GET /api/v1/tasks/ID/result; the
    result is passed on as the JSON it is stored as, never decoded."""
    state, result, error = row
    return {"task_id": task_id, "state": state, "completed": state == COMPLETED,
            "result": orjson.Fragment(result) if result is not None else None,
            "error": error}


class Progress:
    """What one waiting request knows of its tasks: which are finished (and
    in which state), which pending; `look` reads the database the first
    time, `look_again` only the events since. Never their results: 10,000
    of up to 1 MiB each are read only as far as one answer takes them."""

    def __init__(self, task_ids):
        self.wanted = list(dict.fromkeys(task_ids))
        self.finished, self.pending, self.unknown = {}, set(), []
        self.cursor = 0

    def look(self, connection):
        self.cursor = last_event(connection)     # first: a change after it is seen later
        states = task_states(connection, self.wanted)
        for task_id in self.wanted:
            state = states.get(task_id)
            if state is None:
                self.unknown.append(task_id)
            elif state in TERMINAL_STATES:
                self.finished[task_id] = state
            else:
                self.pending.add(task_id)

    def look_again(self, connection):
        newest = last_event(connection)
        if newest == self.cursor:
            return
        ended = finished_since(connection, self.cursor, newest) & self.pending
        self.cursor = newest
        if ended:
            for task_id, state in task_states(connection, ended).items():
                self.finished[task_id] = state
                self.pending.discard(task_id)

    def satisfied(self, until):
        return not self.pending or (until == "any" and self.finished)


# -- the routes ------------------------------------------------------------------------

class ResultRoutes:
    def __init__(self, web):
        self.web = web
        self.watch = ChangeWatch(web.config)
        self.slots = WaitSlots()
        self.client_groups = ClientGroups()
        self.submit_batch = contained(self.batch)      # for Web.submit

    def routes(self):
        """(method, path, handler, access) for rc.web's route table."""
        return [("GET", "/api/v1/tasks/<task_id:id>/result", contained(self.result), "read"),
                ("POST", "/api/v1/results", contained(self.results), "read"),
                ("GET", "/api/v1/results", contained(self.results), "read"),
                ("GET", "/api/v1/groups/<group_id:id>/results", contained(self.group_results),
                 "read"),
                ("GET", "/client.py", self.client_file, "open")]

    def address(self):
        return bottle.request.environ.get("REMOTE_ADDR")

    def disconnected(self):
        gone = bottle.request.environ.get("waitress.client_disconnected")
        return bool(gone and gone())

    def wait_for(self, progress, seconds, until):
        """Wait up to `seconds` until `progress` is satisfied. Returns (seconds
        waited, why waiting was refused or None)."""
        connection = self.web.connection()
        seen = self.watch.generation
        progress.look(connection)
        if seconds <= 0 or progress.satisfied(until):
            return 0.0, None
        refused = self.slots.take(self.address())
        if refused:
            return 0.0, refused
        started = time.monotonic()
        deadline = started + seconds
        try:
            allowed = self.web.still_allowed()     # in here: its 503 gives the slot back
            while not progress.satisfied(until) and not self.disconnected():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                seen = self.watch.wait(seen, min(left, WAKE_EVERY))
                progress.look_again(connection)
        finally:
            self.slots.give(self.address())
        if not allowed():       # `rc token --admin --rotate` while it waited: not answered
            raise ApiError(401, "the admin token this request came with was replaced while"
                                " it waited (rc token --admin --rotate): send the new one")
        return round(time.monotonic() - started, 6), None

    # GET /api/v1/tasks/ID/result?wait=S
    def result(self, task_id):
        seconds = wait_seconds(bottle.request.query.get("wait"))
        if seconds is None:
            return self.web.result(task_id)
        progress = Progress([task_id])
        waited, refused = self.wait_for(progress, seconds, "all")
        if progress.unknown:
            raise ApiError(404, "no task %d" % task_id)
        if task_id in progress.finished:
            return self.web.result(task_id)
        state = self.web.connection().execute("SELECT state FROM tasks WHERE task_id = ?",
                                              (task_id,)).fetchone()[0]
        answer = {"error": "task %d is still %s" % (task_id, state), "task_id": task_id,
                  "state": state, "waited": waited}
        if refused:
            answer["wait_refused"] = refused
        return json_response(answer, 409, {"Retry-After": "1"} if refused else None)

    # POST /api/v1/results {"task_ids": [...], "wait": S, "until": "any"|"all"}
    # GET /api/v1/results?ids=1,2,3&wait=S&until=any
    def results(self):
        task_ids, seconds, until = self.bulk_request()
        progress = Progress(task_ids)
        waited, refused = self.wait_for(progress, seconds or 0.0, until)
        answer = {"results": [], "pending": sorted(progress.pending),
                  "unknown": progress.unknown, "waited": waited}
        connection = self.web.connection()
        sent, not_sent = within_answer(
            connection, [task_id for task_id in progress.wanted if task_id in progress.finished])
        rows = task_rows(connection, sent)
        answer["results"] = [result_entry(task_id, rows[task_id]) for task_id in sent
                             if task_id in rows]
        if not_sent:
            answer["not_sent"] = not_sent
        if refused:
            answer["wait_refused"] = refused
        return json_response(answer, 200, {"Retry-After": "1"} if refused else None)

    def bulk_request(self):
        if bottle.request.method == "POST":
            body = self.web.json_body()
            unknown = sorted(set(body) - {"task_ids", "wait", "until"})
            if unknown:
                raise ApiError(400, "unknown field %s (known: task_ids, until, wait)"
                               % ", ".join(unknown))
            task_ids, wait, until = body.get("task_ids"), body.get("wait"), body.get("until")
            if not isinstance(task_ids, list) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in task_ids):
                raise ApiError(400, "task_ids must be a list of task ids")
        else:
            query = bottle.request.query
            text, wait, until = query.get("ids") or "", query.get("wait"), query.get("until")
            if len(text) > MAX_RESULT_IDS * 21:
                raise ApiError(400, "ids is too long: at most %d task ids" % MAX_RESULT_IDS)
            task_ids = [request_number(item, "task id", 1) for item in text.split(",")
                        if item.strip()]
        if not 0 < len(task_ids) <= MAX_RESULT_IDS:
            raise ApiError(400, "name 1 to %d task ids, not %d" % (MAX_RESULT_IDS,
                                                                   len(task_ids)))
        for task_id in task_ids:
            if not 0 < task_id <= bounded.LARGEST:
                raise ApiError(400, "task id must be from 1 to %d, not %s"
                               % (bounded.LARGEST, bounded.shown(task_id)))
        until = until if until is not None else "all"
        if until not in UNTIL:
            raise ApiError(400, "until must be any or all, not %r" % bounded.shown(until))
        return task_ids, wait_seconds(wait), until

    # GET /api/v1/groups/ID/results[?stream=1&follow=1&after=TASK_ID]
    def group_results(self, group_id):
        connection = self.web.connection()
        existing_group(connection, group_id)
        query = bottle.request.query
        stream, follow = yes_or_no(query.get("stream"), "stream"), \
            yes_or_no(query.get("follow"), "follow")
        after = request_number(query.get("after") or "0", "after")
        if not stream:
            return json_response(group_answer(connection, group_id, after))
        return self.stream_group(group_id, after, follow)

    def stream_group(self, group_id, after, follow):
        """NDJSON, one line per member task as it finishes (those finished
        already first), a blank line now and then on a quiet stream, and a
        last line {"end": true, ...} once every member has finished. With
        follow=1 it stays open for tasks added to the group later (a
        client's session), until the client leaves. It holds one of rc-web's
        max_streams."""
        from rc.web import StreamBody        # rc.web imports this module: not at the top
        give_back, refused = self.web.stream_slots.take(self.address())
        if refused:
            raise ApiError(503, refused)
        try:
            lines = self.group_lines(group_id, self.web.connection(), after, follow,
                                     self.web.still_allowed())
            body = StreamBody(lines, give_back)
        except BaseException:
            give_back()
            raise
        bottle.response.content_type = "application/x-ndjson"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return body

    def group_lines(self, group_id, connection, after, follow, allowed=lambda: True):
        """The stream's lines. The group's tasks are read once, and only
        those not ended yet are remembered, with the largest id: a set of
        every id sent was ~90 MB a stream for a group of a million. Those
        ended already are read again a page at a time; after that each wake
        reads only the terminal events since its last look, with their tasks
        (one query), whoever joined the group meanwhile. A task ends once
        (its terminal state is final), so a task that ends after the first
        read is sent from its event alone: one of those remembered, or one
        past the largest id, added to the group since."""
        disconnected = bottle.request.environ.get("waitress.client_disconnected")
        follow = follow or include_new(connection, group_id)
        seen = self.watch.generation
        cursor = last_event(connection)      # first: what ends after it is seen below
        pending, newest = set(), after
        for task_id, state in connection.execute(
                "SELECT task_id, state FROM tasks WHERE group_id = ? AND task_id > ?"
                " ORDER BY task_id", (group_id, after)):
            newest = task_id
            if state not in TERMINAL_STATES:
                pending.add(task_id)
        sent = 0
        # Those ended already, a page at a time: their results together may be
        # gigabytes, and a request is not to hold them all at once. One pending
        # above that has ended since is left to its event.
        page_after = after
        while page_after < newest:
            rows = connection.execute(ENDED_PAGE_SQL, (group_id, page_after, newest,
                                                       STREAM_PAGE)).fetchall()
            if not rows:
                break
            page_after = rows[-1][0]
            page = [row for row in rows if row[0] not in pending]
            if page:
                sent += len(page)
                yield b"".join(orjson.dumps(result_entry(row[0], row[1:]),
                                            option=orjson.OPT_APPEND_NEWLINE) for row in page)
        ended, quiet_since = [], time.monotonic()
        while True:
            if not allowed():   # the admin token rotated: the client's reopen gets the 401
                return
            fresh = [row for row in ended if row[0] > newest or row[0] in pending]
            if fresh:
                pending.difference_update(row[0] for row in fresh)
                sent += len(fresh)
                quiet_since = time.monotonic()
                yield b"".join(orjson.dumps(result_entry(row[0], row[1:]),
                                            option=orjson.OPT_APPEND_NEWLINE) for row in fresh)
            if not pending and not follow:
                yield orjson.dumps({"end": True, "group_id": group_id, "tasks": sent},
                                   option=orjson.OPT_APPEND_NEWLINE)
                return
            if self.web.closing.is_set() or (disconnected and disconnected()):
                return
            if time.monotonic() - quiet_since >= STREAM_PING:
                quiet_since = time.monotonic()
                yield b"\n"
            if len(ended) < STREAM_PAGE:       # a whole page: the next may be there now
                seen = self.watch.wait(seen, WAKE_EVERY)
            cursor, ended = group_ended(connection, cursor, group_id, after)

    # POST /api/v1/tasks with a list (?group=new|ID): called by Web.submit
    def batch(self, specs, is_list=True, key=(None, None)):
        """A list of tasks in one transaction, with one log line and one audit
        line for the whole batch (a line per task cost more than the insert).
        ?group=new puts them in a new group (a client's session: its results
        stream from /api/v1/groups/ID/results), ?group=ID in that group.
        With a request `key` (Idempotency-Key, request_key()) already used,
        the answer is the first request's and nothing is queued, not even a
        new group."""
        if not is_list:
            raise ApiError(400, "group= goes with a list of tasks")
        connection, config = self.web.connection(), self.web.config
        group = bottle.request.query.get("group")
        group_id = None if group in (None, "", "new") else request_number(group, "group", 1)
        if group_id is not None and not self.client_groups.knows(group_id):
            # The group's row is read: a request sent again may find it
            # pruned since, and is to be answered from its key all the same.
            queued = self.queued_before(connection, key)
            if queued is not None:
                return batch_answer(*queued)
            group_id = self.client_groups.checked(connection, group_id)
        # Otherwise a key used before is found by its insert, which fails
        # (IntegrityError, below), not by a query before each submit: one
        # statement less on a lone task's way.
        made = []           # ?group=new: its group, made in the batch's own transaction

        def make_group(connection):
            made.append(new_group(connection, specs))
            return made[0]
        try:
            task_ids = tasks.submit_many(
                connection, config, specs, group_id=group_id, request_key=key[0],
                request_sha256=key[1], new_group=make_group if group == "new" else None)
        except (tasks.TaskError, sqlite3.IntegrityError) as e:
            # The same request sent twice at once: the other one queued it
            # (RequestKeyReused: another request took the key).
            queued = self.queued_before(connection, key)
            if queued is not None:
                return batch_answer(*queued)
            if isinstance(e, sqlite3.IntegrityError) and group_id is not None \
                    and self.client_groups.forget(group_id):
                client_group(connection, group_id)      # 404 if it was pruned since we saw it
            raise
        if made:
            group_id = self.client_groups.add(made[0])
        types = sorted({spec["task_type"] for spec in specs})
        fields = dict(count=len(task_ids), first_task_id=task_ids[0],
                      last_task_id=task_ids[-1], task_types=types, group_id=group_id)
        self.web.audit("tasks_submitted", task_ids=task_ids if len(task_ids) <= 10
                       else tasks.id_ranges(task_ids), **fields)
        # The log line goes once the answer is sent: writing it wakes
        # supervisord, nothing the client waits for. It says when it was queued.
        line = [("info", "tasks_submitted", dict(fields, address=self.address()))]
        queued_at = time.time()
        return batch_answer(task_ids, group_id,
                            then=lambda: self.web.logger.log_many(line, now=queued_at))

    def queued_before(self, connection, key):
        """(task ids, group id) an earlier request with this key (request_key())
        queued (logged: a client sent a request again, its answer lost), or
        None; RequestKeyReused when that request was another."""
        queued = None if key[0] is None else tasks.queued_for_key(connection, *key)
        if queued is not None:
            self.web.logger.info("submit_repeated", address=self.address(), count=len(queued[0]),
                                 first_task_id=queued[0][0], group_id=queued[1])
        return queued

    # GET /client.py
    def client_file(self):
        """The Python client, one file, for `curl -O http://NAS:5000/client.py`."""
        return bottle.static_file(os.path.basename(CLIENT_PATH),
                                  root=os.path.dirname(CLIENT_PATH),
                                  mimetype="text/x-python", download=True)


def group_answer(connection, group_id, after):
    """GET /api/v1/groups/ID/results: the group's ended tasks' results past
    `after`, at most MAX_RESULTS_BYTES of them (the rest in `not_sent`, as
    /api/v1/results does), read a row at a time, never all at once."""
    answer = {"group_id": group_id, "results": [], "pending": []}
    not_sent, size = [], 0
    for task_id, state, result, error in connection.execute(
            "SELECT task_id, state, result, error FROM tasks WHERE group_id = ?"
            " AND task_id > ? ORDER BY task_id", (group_id, after)):
        if state not in TERMINAL_STATES:
            answer["pending"].append(task_id)
            continue
        size += len(result or "") + len(error or "") + 100
        if not_sent or (size > MAX_RESULTS_BYTES and answer["results"]):
            not_sent.append(task_id)
        else:
            answer["results"].append(result_entry(task_id, (state, result, error)))
    if not_sent:
        answer["not_sent"] = not_sent
    return answer


def batch_answer(task_ids, group_id, then=None):
    """The answer to a batch; `then`, if given, runs once it is sent (or
    its client gone)."""
    answer = {"tasks": [{"task_id": task_id, "url": "/api/v1/tasks/%d" % task_id}
                        for task_id in task_ids]}
    if group_id is not None:
        answer["group_id"] = group_id
    if then is None:
        return json_response(answer, 201)
    data = orjson.dumps(answer)
    return bottle.HTTPResponse(ThenBody(data, then), 201, {
        "Content-Type": "application/json", "Content-Length": str(len(data))})


class ThenBody:
    """A body of one piece whose close() -- the WSGI server calls it once
    the body is sent, or its client has gone -- runs `then`."""

    def __init__(self, data, then):
        self.data, self.then = data, then

    def __iter__(self):
        return iter((self.data,))

    def close(self):
        then, self.then = self.then, None
        if then is not None:
            then()


def request_key():
    """(the request's Idempotency-Key header, checked, and the SHA-256 of
    the request it comes with: its ?group= and body), or (None, None)."""
    key = bottle.request.headers.get("Idempotency-Key")
    if key is None:
        return None, None
    digest = hashlib.sha256(bottle.request.query.get("group", "").encode() + b"\n")
    digest.update(bottle.request.body.read())
    return tasks.check_request_key(key), digest.hexdigest()


def new_group(connection, specs):
    """A group for a client's tasks: a row like `rc submit --each`'s, with
    the first task's type, that no new device is ever added to. Made inside
    the transaction that queues its first tasks (tasks.submit_many)."""
    return connection.execute(
        "INSERT INTO task_groups(created_at, task_type, payload, options)"
        " VALUES (?, ?, '{}', '{\"client\": true}')",
        (time.time(), str(specs[0]["task_type"]) if specs else "")).lastrowid


def existing_group(connection, group_id):
    if connection.execute("SELECT 1 FROM task_groups WHERE group_id = ?",
                          (group_id,)).fetchone() is None:
        raise ApiError(404, "no group %d" % group_id)
    return group_id


def members(connection, group_id, after=0):
    """The group's task ids past `after`, in order."""
    return [row[0] for row in connection.execute(
        "SELECT task_id FROM tasks WHERE group_id = ? AND task_id > ? ORDER BY task_id",
        (group_id, after))]


def client_group(connection, group_id):
    """A group made by ?group=new: the only kind tasks may be added to (an
    `rc submit --each` group holds one task per device, and says so)."""
    row = connection.execute("SELECT options FROM task_groups WHERE group_id = ?",
                             (group_id,)).fetchone()
    if row is None:
        raise ApiError(404, "no group %d" % group_id)
    if not db.loads(row[0], {}).get("client"):
        raise ApiError(400, "group %d is one task per device (rc submit --each); tasks"
                            " are added only to a group made with ?group=new" % group_id)
    return group_id


class ClientGroups:
    """The client groups (?group=new) this rc-web has seen: a client's
    session submits into its group again and again, and its row need not
    be read each time. A group pruned since (housekeeping, idle past
    task_retention) is caught by the tasks' foreign key: the submit fails
    whole, and batch() asks again."""

    def __init__(self, most=MAX_KNOWN_GROUPS):
        self.most = most
        self.known = set()

    def add(self, group_id):
        if len(self.known) >= self.most:
            self.known.clear()          # the next submit of each reads its row again
        self.known.add(group_id)
        return group_id

    def knows(self, group_id):
        return group_id in self.known

    def checked(self, connection, group_id):
        """`group_id`, if it is a client group (else ApiError)."""
        if group_id in self.known:
            return group_id
        return self.add(client_group(connection, group_id))

    def forget(self, group_id):
        """Whether it was known."""
        try:
            self.known.remove(group_id)
            return True
        except KeyError:
            return False


def include_new(connection, group_id):
    row = connection.execute("SELECT include_new FROM task_groups WHERE group_id = ?",
                             (group_id,)).fetchone()
    return bool(row and row[0])


def yes_or_no(value, name):
    if value in (None, "", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ApiError(400, "%s must be 0 or 1, not %r" % (name, bounded.shown(value)))


def wait_seconds(value):
    """?wait= or "wait": seconds from 0 to MAX_WAIT (a number or its text);
    None when not given."""
    if value is None or value == "":
        return None
    try:
        return bounded.seconds(value, "wait", 0.0, MAX_WAIT)
    except ValueError as e:
        raise ApiError(400, str(e))


def request_number(text, name, low=0):
    try:
        return bounded.whole(text, name, low)
    except ValueError as e:
        raise ApiError(400, str(e))
