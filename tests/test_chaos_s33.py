"""Chaos, session 33: the state this session added stays true when the
programs die. On a real cluster under load (client batches with their
Idempotency-Key, files, dependencies that fail, cancels, a forgotten
device), each program is killed with SIGKILL at a few points, and then:

- the kept_<state> counter rows equal a recount of the tasks, also after a
  prune killed half-way, a backup and a restore;
- every task ends in exactly one terminal state; a keyed batch is queued
  once, all or none (every task of a client's group is one its keys name);
- no device stays held (held_until) once its worker is back, and none is
  held for a stop that did not happen;
- `rc status`, /api/v1/status and the dashboard's overview say what the
  database holds.
"""
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request

import pytest

import schema_fixture
import test_migrations

from cluster_harness import (RC, REPO, Cluster, assert_one_terminal_state_each, log_records, online,
                             wait_all_finished, wait_for)
from rc import client as rc_client
from rc import config as config_module
from rc import db, tasks
from rc.states import TASK_STATES, TERMINAL_STATES

pytestmark = pytest.mark.e2e

SETTINGS = {"heartbeat_interval": 1.0, "lease_duration": 3.0, "disconnect_grace": 3.0,
            "retry_backoff": 0.1, "retry_backoff_max": 1.0, "accept_timeout": 3.0}
WORKERS = ("w1", "w2")
PROGRAMS = ("rc-web", "rc-server", "rc-scheduler", "rc-reaper", "rc-files")


class KeptCluster(Cluster):
    """A cluster whose workers are started again when they die."""

    def __init__(self, home, **settings):
        super().__init__(home, **dict(SETTINGS, **settings))
        self.keeping = True
        self.keeper = threading.Thread(target=self.keep_workers, daemon=True)

    def keep_workers(self):
        while self.keeping:
            for device_id, process in list(self.workers.items()):
                if process.poll() is not None and self.keeping and device_id in WORKERS:
                    self.start_worker(device_id, "--slots", "2")
            time.sleep(0.1)

    def kill(self, name):
        """SIGKILL to a program (supervisord starts it again) or a worker."""
        if name in self.workers:
            os.kill(self.workers[name].pid, signal.SIGKILL)
            return
        pid = wait_for(lambda: self.program_pid(name), 60, "%s running" % name)
        os.kill(pid, signal.SIGKILL)
        # Started again by supervisord before the next kill.
        wait_for(lambda: self.program_pid(name) not in (0, pid), 60, "%s back" % name)

    def kill_web_after_a_commit(self, watcher):
        """SIGKILL to rc-web as soon as a keyed batch of it has committed
        (a new request_keys row): most often before its answer is out."""
        pid = wait_for(lambda: self.program_pid("rc-web"), 60, "rc-web running")
        last = watcher.execute("SELECT coalesce(max(rowid), 0) FROM request_keys").fetchone()[0]
        deadline = time.time() + 30
        while time.time() < deadline and watcher.execute(
                "SELECT coalesce(max(rowid), 0) FROM request_keys").fetchone()[0] == last:
            pass
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.program_pid("rc-web") not in (0, pid), 60, "rc-web back")

    def settings(self, **changes):
        path = self.env["RC_CONFIG"]
        with open(path) as f:
            settings = json.load(f)
        settings.update(changes)
        with open(path, "w") as f:
            json.dump(settings, f)

    def get(self, path):
        request = urllib.request.Request("http://127.0.0.1:%d%s" % (self.config.web_port, path),
                                         headers={"Authorization": "Bearer " + self.token})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())


# -- what must hold ---------------------------------------------------------------------

def recount(connection):
    found = dict.fromkeys(TASK_STATES, 0)
    found.update(connection.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
    return found


def kept(connection):
    return {name[len("kept_"):]: value for name, value in connection.execute(
        "SELECT name, value FROM counters WHERE name LIKE 'kept!_%' ESCAPE '!'")}


def assert_counts_true(connection):
    """The counters against a recount, in one snapshot (the programs run on)."""
    connection.execute("BEGIN")
    try:
        truth = recount(connection)
        counters = kept(connection)
        counted = tasks.counts_by_state(connection)
    finally:
        connection.execute("COMMIT")
    assert {s: counters.get(s, 0) for s in TERMINAL_STATES} == \
        {s: truth[s] for s in TERMINAL_STATES}, (counters, truth)
    assert counted == truth


def assert_reads_agree(cluster):
    """rc status --json, /api/v1/status and the dashboard's overview: the
    database's counts (read while nothing is unfinished, so none moves)."""
    truth = recount(cluster.db)
    by_state = {"tasks_" + state: count for state, count in truth.items()}
    cli = json.loads(cluster.rc("status", "--json").stdout)
    api = cluster.get("/api/v1/status")
    overview = cluster.get("/api/v1/overview")["summary"]
    for name, answer in (("rc status", cli), ("/api/v1/status", api),
                         ("overview", overview)):
        assert {key: answer.get(key) for key in by_state} == by_state, name


def assert_no_hold_left(cluster):
    """Every device whose worker is back holds nothing any more."""
    back = online(cluster)
    held = {row[0] for row in cluster.db.execute(
        "SELECT device_id FROM devices WHERE held_until IS NOT NULL")}
    assert not held & back, held


# -- the load ----------------------------------------------------------------------------

class Load:
    """A Python client submitting batches (each with its Idempotency-Key,
    some with a file as stdin) from a thread while programs die."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.stopping = threading.Event()
        self.futures = {}
        self.client = rc_client.Cluster(url="http://127.0.0.1:%d" % cluster.config.web_port,
                                        token=cluster.token)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        stdin, number = None, 0
        while not self.stopping.is_set():
            number += 1
            if number % 50 == 0:
                try:
                    stdin = self.client.put(b"file %d\n" % number)
                except Exception:       # rc-web or rc-files killed: the next one
                    stdin = None
            command = "echo s33-%d" % number if number % 7 else "echo s33-%d; exit 3" % number
            payload = {"command": command}
            if stdin is not None and number % 5 == 0:
                payload = dict(payload, command="cat >/dev/null; " + command, stdin=stdin)
            self.futures[number] = self.client.submit("shell", payload=payload, timeout=60)
            if number % 20 == 0:
                time.sleep(0.3)

    def settle(self):
        self.stopping.set()
        self.thread.join(300)
        for future in self.futures.values():
            try:
                future.exception(timeout=300)
            except Exception:
                pass
        self.client.close(wait=False)


def marked(connection):
    """Task count of each load task's mark (s33-N) the tasks table holds."""
    counts = {}
    for (payload,) in connection.execute(
            "SELECT payload FROM tasks WHERE payload LIKE '%s33-%'"):
        number = int(db.loads(payload)["command"].split("s33-")[1].split(";")[0])
        counts[number] = counts.get(number, 0) + 1
    return counts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = KeptCluster(tmp_path_factory.mktemp("chaos33"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    for device_id in WORKERS:
        cluster.start_worker(device_id, "--slots", "2")
    cluster.keeper.start()
    wait_for(lambda: set(WORKERS) <= online(cluster), 60, "the workers")
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    try:
        yield cluster
    finally:
        cluster.keeping = False
        cluster.keeper.join()
        cluster.stop()


def test_counts_keys_and_holds_stay_true_when_each_program_is_killed(cluster, tmp_path):
    connection = cluster.db
    # Dependencies that fail and cancels, made beside the load.
    parent = tasks.submit(connection, cluster.config, "shell", {"command": "sleep 1; exit 1"})
    children = [tasks.submit(connection, cluster.config, "echo", {"message": "child"},
                             depends_on=[parent]) for _ in range(5)]
    grandchild = tasks.submit(connection, cluster.config, "echo", {"message": "grandchild"},
                              depends_on=[children[0]])
    waiting = [tasks.submit(connection, cluster.config, "echo", {"message": "nowhere"},
                            requirements={"device_id": "nobody"}) for _ in range(4)]
    retried = [tasks.submit(connection, cluster.config, "shell", {"command": "exit 4"},
                            retries=2, retry_on_failure=True) for _ in range(3)]
    # A device forgotten while its tasks run: they go back to the queue
    # (pinned there, then cancelled).
    cluster.start_worker("f1", "--slots", "2")
    wait_for(lambda: "f1" in online(cluster), 60, "f1 online")
    pinned = [tasks.submit(connection, cluster.config, "shell", {"command": "sleep 30"},
                           requirements={"device_id": "f1"}) for _ in range(2)]
    wait_for(lambda: all(tasks.get(connection, t)["state"] == "running" for t in pinned), 60,
             "f1's tasks running")
    inputs = []
    for number in range(12):
        inputs.append(str(tmp_path / ("in%d.txt" % number)))
        with open(inputs[-1], "w") as f:
            f.write("map input %d\n" % number)
    mapping = subprocess.Popen([RC, "map", "--no-progress", "wc -c {}", "--files"] + inputs,
                               env=cluster.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    load = Load(cluster)
    load.thread.start()
    cluster.kill("f1")
    cluster.rc("forget", "f1")
    for name in PROGRAMS + ("w1",) + PROGRAMS:
        # Each kill under load: after the cluster has been seen at work since
        # the one before (a task the client queued, a task ended), not after
        # a fixed 1.5 s.
        at_work(cluster, load)
        cluster.kill(name)
    watcher = db.connect(cluster.config.db_path)
    try:
        for _ in range(6):
            cluster.kill_web_after_a_commit(watcher)
    finally:
        watcher.close()
    for task_id in waiting + pinned:
        cluster.rc("cancel", str(task_id))
    load.settle()
    out, err = mapping.communicate(timeout=300)
    assert mapping.returncode == 0, err
    assert sorted(out.split("\n"))[1:] == sorted(
        "%d in%d.txt" % (len("map input %d\n" % n), n) for n in range(12)), out
    submitted = [f.task_id for f in load.futures.values() if f.task_id is not None]
    every = [row[0] for row in connection.execute("SELECT task_id FROM tasks")]
    wait_all_finished(cluster, every, 300)

    assert_counts_true(connection)
    assert_one_terminal_state_each(cluster, every)
    assert {tasks.get(connection, t)["state"] for t in children + [grandchild]} == {"failed"}
    assert {(tasks.get(connection, t)["state"], tasks.get(connection, t)["attempt"])
            for t in retried} == {("failed", 3)}
    assert {tasks.get(connection, t)["state"] for t in pinned} == {"cancelled"}
    # Queued once each: a batch sent again after rc-web died is answered,
    # never queued twice; every task the client was told of is there.
    counts = marked(connection)
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c > 1}
    assert len(submitted) == len(set(submitted))
    # All or none: each task of the client's group is one a key names.
    keyed = set()
    for (ids,) in connection.execute("SELECT task_ids FROM request_keys"):
        keyed.update(tasks.ids_in_ranges(ids))
    grouped = {row[0] for row in connection.execute(
        "SELECT task_id FROM tasks WHERE group_id = ?", (load.client.group_id,))}
    assert grouped == keyed, (sorted(grouped - keyed)[:10], sorted(keyed - grouped)[:10])
    assert set(submitted) <= grouped
    wait_for(lambda: set(WORKERS) <= online(cluster), 60, "the workers back")
    assert not held(cluster)        # no graceful stop: nobody held
    assert_reads_agree(cluster)
    print("tasks %d, submitted by the client %d of %d, sent again %d, states %s"
          % (len(every), len(submitted), len(load.futures),
             len(log_records(cluster, "rc-web", event="submit_repeated")), recount(connection)))


def at_work(cluster, load, timeout=120):
    """Back once, since the call, the client has had a task queued (its
    answer come) and a task has ended: rc-web, rc-scheduler, rc-server and
    a worker all at work between two kills."""
    def newest():
        return cluster.db.execute("SELECT coalesce(max(task_id), 0), coalesce(max(finished_at),"
                                  " 0) FROM tasks").fetchone()
    task_before, finish_before = newest()
    answered_before = sum(1 for f in list(load.futures.values()) if f.task_id is not None)

    def moved():
        task_now, finish_now = newest()
        answered = sum(1 for f in list(load.futures.values()) if f.task_id is not None)
        return task_now > task_before and finish_now > finish_before \
            and answered > answered_before
    wait_for(moved, timeout, "the cluster at work under load")


def backlog(connection, count, finished_at):
    """`count` finished tasks, of every final state, that ended at `finished_at`
    (as a reaper stopped for days leaves them), made as the programs make them."""
    with db.write(connection):
        first = connection.execute("SELECT coalesce(max(task_id), 0) + 1 FROM tasks").fetchone()[0]
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, created_at)"
            " VALUES ('echo', '{}', 60, 0, ?)", [(finished_at,)] * count)
        for offset, state in enumerate(TERMINAL_STATES):
            connection.execute(
                "UPDATE tasks SET state = ?, finished_at = ? WHERE task_id >= ?"
                " AND task_id % ? = ?", (state, finished_at, first, len(TERMINAL_STATES),
                                          offset))
    return first


def test_a_prune_killed_half_way_leaves_the_counts_true(cluster):
    """rc-reaper prunes as it starts; killed between two of its chunks, the
    next one goes on from there, and the counters follow every chunk."""
    connection = cluster.db
    kills, first = 0, None

    def left():
        return connection.execute("SELECT count(*) FROM tasks WHERE task_id >= ?",
                                  (first,)).fetchone()[0]
    # A prune over before this test looked again (its process held back on a
    # busy machine: CI of af20821) is no finding: another backlog, up to 3.
    for _ in range(3):
        first = backlog(connection, 20000, time.time() - 7200)
        assert_counts_true(connection)
        cluster.settings(task_retention=3600.0)
        cluster.kill("rc-reaper")                   # started again, it prunes at once
        while left() and kills < 3:
            before = left()
            wait_for(lambda: left() < before, 60, "the prune under way")
            pid = cluster.program_pid("rc-reaper")
            if left():
                os.kill(pid, signal.SIGKILL)        # between two chunks, or in one
                kills += 1
                wait_for(lambda: cluster.program_pid("rc-reaper") not in (0, pid), 60,
                         "rc-reaper back")
            assert_counts_true(connection)
        if kills:
            break
    assert kills > 0, "the prune ended before it was killed, three times"
    print("prune of 20,000 tasks killed %d times" % kills)
    wait_for(lambda: left() == 0, 120, "the prune done")
    assert_counts_true(connection)
    assert_reads_agree(cluster)


def run_tasks(cluster, count, seconds):
    ids = [tasks.submit(cluster.db, cluster.config, "shell",
                        {"command": "sleep %g; echo s33-stop-%d" % (seconds, n)})
           for n in range(count)]
    wait_for(lambda: cluster.db.execute("SELECT count(*) FROM tasks WHERE state = 'running'")
             .fetchone()[0] >= 2, 60, "tasks running")
    return ids


def held(cluster):
    return {row[0] for row in cluster.db.execute(
        "SELECT device_id FROM devices WHERE held_until IS NOT NULL")}


def restart(cluster):
    started = cluster.make("run")
    assert started.returncode == 0, started.stdout
    cluster.db = db.connect(cluster.config.db_path)
    wait_for(lambda: set(WORKERS) <= online(cluster), 60, "the workers back")


def test_make_stop_with_rc_server_killed_in_its_hold_then_a_restore(cluster, tmp_path):
    """make stop, rc-server killed once it has written the hold: the hold
    ends when the workers are back. Then a backup taken while tasks run,
    and a restore: the counters are the copy's tasks each time."""
    ids = run_tasks(cluster, 12, 2)
    pid = cluster.program_pid("rc-server")
    stopping = subprocess.Popen(["make", "-s", "-C", REPO, "stop"], env=cluster.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: set(WORKERS) <= held(cluster), 60, "the hold written")
    try:
        # In its drain, the notices sent (the window between the hold's
        # commit and them is microseconds), or already ended.
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert stopping.wait(120) == 0
    assert set(WORKERS) <= held(cluster)
    cluster.db.close()
    restart(cluster)
    wait_for(lambda: not held(cluster) & set(WORKERS), 60, "the hold ended")
    wait_all_finished(cluster, ids, 120)
    assert_counts_true(cluster.db)
    assert_one_terminal_state_each(cluster, ids)

    ids = run_tasks(cluster, 12, 2)
    copy = str(tmp_path / "copy.db")
    cluster.rc("backup", copy)
    backup_db = sqlite3.connect("file:%s?mode=ro" % copy, uri=True, isolation_level=None)
    try:
        assert_counts_true(backup_db)
    finally:
        backup_db.close()
    assert cluster.make("stop").returncode == 0
    cluster.db.close()
    cluster.rc("restore", copy)
    restart(cluster)
    wait_all_finished(cluster, ids, 120)
    assert_counts_true(cluster.db)
    assert_no_hold_left(cluster)
    assert_reads_agree(cluster)


# -- one read, one snapshot ------------------------------------------------------------

class Rows(list):
    def fetchone(self):
        return self[0] if self else None


class CommitsBetween:
    """A connection on which another program commits just after the first
    SELECT has been answered: what a busy cluster does, now and then,
    between two statements of a read."""

    def __init__(self, connection, commit):
        self.connection, self.commit, self.done = connection, commit, False

    def __getattr__(self, name):
        return getattr(self.connection, name)

    def execute(self, sql, *parameters):
        cursor = self.connection.execute(sql, *parameters)
        if self.done or not sql.lstrip().upper().startswith("SELECT"):
            return cursor
        self.done = True
        rows = Rows(cursor.fetchall())
        self.commit()
        return rows


def test_the_status_counts_are_read_from_one_snapshot(tmp_path):
    """A task that finishes while rc status reads the counts is counted
    once: queued or completed, never both. Before, counts_by_state read
    the queue, the active tasks and the kept_ counters in three statements,
    and a finish between them showed six tasks of five."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    other = db.connect(config.db_path)
    try:
        ids = [tasks.submit(connection, config, "echo", {"message": "m%d" % n})
               for n in range(5)]

        def finish_one():
            with db.write(other):
                other.execute("UPDATE tasks SET state = 'completed', finished_at = ?"
                              " WHERE task_id = ?", (time.time(), ids[0]))
        counts = tasks.counts_by_state(CommitsBetween(connection, finish_one))
        assert sum(counts.values()) == 5, counts
        assert tasks.counts_by_state(connection) == recount(connection)
        assert recount(connection)["completed"] == 1
    finally:
        other.close()
        connection.close()


def test_a_restored_backup_of_the_first_schema_counts_true_as_it_runs(cluster, tmp_path):
    """A backup made by the first release, restored: migration 17 counts
    its finished tasks, the programs (killed as they start on it) run the
    rest, and the counters follow."""
    old_path = str(tmp_path / "v1.db")
    old = schema_fixture.load(old_path)
    test_migrations.fill(old)
    old.execute("PRAGMA journal_mode=DELETE")
    old.close()
    assert cluster.make("stop").returncode == 0
    cluster.db.close()
    cluster.rc("restore", old_path)
    started = cluster.make("run")
    assert started.returncode == 0, started.stdout
    cluster.db = db.connect(cluster.config.db_path)
    assert_counts_true(cluster.db)
    for name in ("rc-server", "rc-scheduler", "rc-reaper"):
        cluster.kill(name)
    wait_for(lambda: set(WORKERS) <= online(cluster), 60, "the workers back")
    every = [row[0] for row in cluster.db.execute("SELECT task_id FROM tasks")]
    wait_all_finished(cluster, every, 120)
    assert_counts_true(cluster.db)
    assert_no_hold_left(cluster)
    assert_reads_agree(cluster)
