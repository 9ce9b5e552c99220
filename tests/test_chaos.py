"""Chaos: programs and workers die, freeze and misbehave under load, and a
checker that reads the database and the workers' execution logs asserts
what a user must be able to trust:

- every submitted task ends in a terminal state, recorded exactly once;
- attempt numbers rise by one;
- no two executions of one task overlap in time;
- a completed task's result comes from an execution that completed;
- no task process outlives the test.

Scaled to stay short in `make test`; RC_CHAOS_TASKS=2000 runs the full size.
"""
import os
import random
import signal
import threading
import time
import uuid

import orjson
import psutil
import pytest

from cluster_harness import Cluster, online, wait_all_finished, wait_for
from rc import explain, tasks
from rc.states import TERMINAL_STATES

pytestmark = pytest.mark.e2e

CHAOS_TASKS = int(os.environ.get("RC_CHAOS_TASKS", "600"))
WORKERS = ("c1", "c2", "c3", "c4")
# Fast heartbeats and short leases so that failures play out in seconds.
CHAOS_SETTINGS = {"heartbeat_interval": 1.0, "lease_duration": 3.0, "disconnect_grace": 3.0,
                  "retry_backoff": 0.1, "retry_backoff_max": 1.0, "accept_timeout": 3.0}
MARKER = "chaos-" + uuid.uuid4().hex[:12]    # in every task's command line


class ChaosCluster(Cluster):
    """A cluster whose workers are restarted when they die, like a
    supervisor would, and which remembers every death and freeze."""

    def __init__(self, home):
        super().__init__(home, **CHAOS_SETTINGS)
        self.deaths = {}       # device id -> times its worker died
        self.freezes = {}      # device id -> (stopped, continued) windows
        self.keeping = True
        self.keeper = threading.Thread(target=self.keep_workers, daemon=True)

    def start_chaos_worker(self, device_id):
        return self.start_worker(device_id, "--slots", "2", "--log-tasks")

    def keep_workers(self):
        while self.keeping:
            for device_id, process in list(self.workers.items()):
                if process.poll() is not None and self.keeping:
                    self.deaths.setdefault(device_id, []).append(time.time())
                    self.start_chaos_worker(device_id)
            time.sleep(0.05)

    def kill_worker(self, device_id):
        os.kill(self.workers[device_id].pid, signal.SIGKILL)   # the worker only

    def freeze(self, device_id):
        """Stop the worker and everything it started, as a suspended laptop."""
        family = family_of(self.workers[device_id].pid)
        for process in family:
            process.send_signal(signal.SIGSTOP)
        return family, time.time()

    def thaw(self, device_id, family, stopped):
        for process in family:
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        self.freezes.setdefault(device_id, []).append((stopped, time.time()))


def family_of(pid):
    parent = psutil.Process(pid)
    return [parent] + parent.children(recursive=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = ChaosCluster(tmp_path_factory.mktemp("chaos"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")     # only workers that log every task
    for device_id in WORKERS:
        cluster.start_chaos_worker(device_id)
    cluster.keeper.start()
    wait_for(lambda: set(WORKERS) <= online(cluster), 30, "the chaos workers")
    try:
        yield cluster
    finally:
        cluster.keeping = False
        cluster.keeper.join()
        cluster.stop()
        assert no_task_processes_left(), "task processes outlived the cluster"


# -- the checker ------------------------------------------------------------------

# Worker log events that end a run: the task's process group is gone by then.
RUN_ENDS = ("task_finished", "task_fenced", "task_abandoned", "task_given_away")


class Executions:
    """Who ran which attempt when, from the workers' own logs."""

    def __init__(self, cluster):
        self.cluster = cluster
        # (task_id, attempt, device_id) -> [[start, end, status], ...]: one
        # attempt can start twice on a device whose worker died before the
        # main node heard it had started, so it was sent to the new one.
        self.runs = {}
        for device_id in WORKERS:
            self.read(device_id)

    def read(self, device_id):
        path = self.cluster.worker_log(device_id)
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "task_id" not in record:
                    continue
                runs = self.runs.setdefault(
                    (record["task_id"], record["attempt"], device_id), [])
                if record["event"] == "task_started":
                    runs.append([record["time"], None, None])
                elif record["event"] in RUN_ENDS and runs and runs[-1][1] is None:
                    runs[-1][1] = record["time"]
                    runs[-1][2] = record.get("status", record["event"])

    def last_run(self, key):
        runs = self.runs.get(key)
        return runs[-1] if runs else None

    def intervals(self, task_id):
        """Each execution as the stretches of time it could actually run:
        until its worker died, and never while its device was frozen."""
        found = []
        for (tid, attempt, device_id), runs in self.runs.items():
            if tid != task_id:
                continue
            for start, end, status in runs:
                if end is None:
                    deaths = [t for t in self.cluster.deaths.get(device_id, []) if t >= start]
                    end = min(deaths) if deaths else time.time()
                pieces = [(start, end)]
                for stopped, continued in self.cluster.freezes.get(device_id, []):
                    pieces = [part for a, b in pieces
                              for part in ((a, min(b, stopped)), (max(a, continued), b))
                              if part[0] < part[1]]
                found.extend((attempt, device_id, a, b) for a, b in pieces)
        return found

    def check(self, task_ids):
        db = self.cluster.db
        for task_id in task_ids:
            task = tasks.get(db, task_id)
            assert task["state"] in TERMINAL_STATES, task
            terminal = [e for e in task["events"] if e["state"] in TERMINAL_STATES]
            assert len(terminal) == 1, "task %d: %s" % (task_id, task["events"])
            attempts = [e["attempt"] for e in task["events"]]
            assert attempts[0] == 1 and all(b - a in (0, 1) for a, b in zip(attempts,
                                                                               attempts[1:]))
            spans = sorted(self.intervals(task_id), key=lambda span: span[2])
            for (a1, d1, s1, e1), (a2, d2, s2, e2) in zip(spans, spans[1:]):
                assert s2 >= e1, ("task %d: attempt %d on %s overlaps attempt %d on %s"
                                  % (task_id, a1, d1, a2, d2))
            if task["state"] == "completed" and task["task_type"] != "echo":
                run = self.last_run((task_id, task["attempt"], task["device_id"]))
                assert run and run[2] == "completed", (task, run)


def no_task_processes_left():
    def ours(process):
        try:
            return MARKER in " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
    deadline = time.time() + 10
    while time.time() < deadline:
        if not any(ours(p) for p in psutil.process_iter()):
            return True
        time.sleep(0.2)
    return False


def submit_mix(cluster, count, priority="normal"):
    ids = []
    for n in range(count):
        kind = n % 3
        if kind == 0:
            ids.append(tasks.submit(cluster.db, cluster.config, "echo", {"message": str(n)},
                                    priority))
        elif kind == 1:
            ids.append(tasks.submit(cluster.db, cluster.config, "sleep",
                                    {"seconds": random.choice((0.01, 0.05, 0.2))}, priority))
        else:
            ids.append(tasks.submit(cluster.db, cluster.config, "shell",
                                    {"command": "echo %d # %s" % (n, MARKER)}, priority))
    return ids


def shell(cluster, command, **options):
    return tasks.submit(cluster.db, cluster.config, "shell",
                        {"command": "%s # %s" % (command, MARKER)}, **options)


# -- scenarios --------------------------------------------------------------------

def test_main_node_programs_killed_at_random_moments(cluster):
    task_ids = submit_mix(cluster, CHAOS_TASKS)
    victims = ["rc-server", "rc-scheduler", "rc-reaper"] * 2
    random.shuffle(victims)
    for program in victims:
        time.sleep(random.uniform(0.2, 1.0))
        old = cluster.program_pid(program)
        if old:
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: cluster.program_pid(program) not in (0, old), 30,
                     "supervisord to restart %s" % program)
    wait_all_finished(cluster, task_ids, 240)
    Executions(cluster).check(task_ids)
    states = {tasks.get(cluster.db, t)["state"] for t in task_ids}
    assert states == {"completed"}


def test_a_worker_killed_mid_task(cluster):
    task_ids = [shell(cluster, "sleep 1; echo slept") for _ in range(12)]
    wait_for(lambda: running_on(cluster, "c2"), 30, "a task running on c2")
    cluster.kill_worker("c2")
    wait_all_finished(cluster, task_ids, 120)
    Executions(cluster).check(task_ids)
    assert all(tasks.get(cluster.db, t)["state"] == "completed" for t in task_ids)
    assert any(tasks.get(cluster.db, t)["attempt"] > 1 for t in task_ids)


def test_a_frozen_worker_s_late_work_is_ignored(cluster):
    task_id = shell(cluster, "sleep 2; echo thawed")
    device_id = wait_for(lambda: running_device(cluster, task_id), 30, "the task to start")
    family, stopped = cluster.freeze(device_id)
    try:
        wait_all_finished(cluster, [task_id], 60)
    finally:
        cluster.thaw(device_id, family, stopped)
    # Thawed, the worker ends its frozen run (the event the checks below
    # read) and is back on a connection of its own, where any late result of
    # that run would have gone: waited for, not a fixed two heartbeats.
    wait_for(lambda: (Executions(cluster).last_run((task_id, 1, device_id)) or [0, None])[1]
             is not None, 60, "the frozen run's end in %s's log" % device_id)
    wait_for(lambda: device_id in online(cluster), 60, "%s back online" % device_id)
    task = tasks.get(cluster.db, task_id)
    assert task["state"] == "completed" and task["device_id"] != device_id
    assert task["attempt"] >= 2
    Executions(cluster).check([task_id])
    fenced = Executions(cluster).last_run((task_id, 1, device_id))
    assert fenced[2] == "task_fenced", fenced


def test_a_task_that_kills_its_worker_is_failed_as_poison(cluster):
    poison = shell(cluster, "kill -9 $PPID; sleep 5", retries=10)
    others = submit_mix(cluster, 60)
    # Run as root, a worker runs each task as a uid of its own, which cannot
    # kill it (docs/worker.md, the sandbox): the test then deals the blow.
    killed, deadline = set(), time.time() + 120
    while tasks.get(cluster.db, poison)["state"] not in TERMINAL_STATES and \
            time.time() < deadline:
        task = tasks.get(cluster.db, poison)
        if task["state"] == "running" and (task["attempt"], task["device_id"]) not in killed:
            killed.add((task["attempt"], task["device_id"]))
            cluster.kill_worker(task["device_id"])
        time.sleep(0.05)
    wait_all_finished(cluster, [poison] + others, 120)
    task = tasks.get(cluster.db, poison)
    assert task["state"] == "failed" and "poison" in task["reason"], task
    assert task["device_losses"] == cluster.config.poison_limit
    assert all(tasks.get(cluster.db, t)["state"] == "completed" for t in others)
    Executions(cluster).check([poison] + others)


def test_urgent_tasks_overtake_a_queue_of_low_ones(cluster):
    low = [tasks.submit(cluster.db, cluster.config, "sleep", {"seconds": 0.02}, "low")
           for _ in range(1000)]
    wait_for(lambda: started_count(cluster, low) >= 40, 60, "low tasks to get going")
    # All at once, so that every scheduling pass that sees one sees them all;
    # a pass under way when they came may still assign low ones, before the
    # first urgent one. From the first urgent assignment on, none of the low.
    urgent = tasks.submit_many(cluster.db, cluster.config, [
        {"task_type": "sleep", "payload": {"seconds": 0.02}, "priority": "urgent"}] * 100)
    wait_all_finished(cluster, low + urgent, 180)
    first_urgent, last_urgent = min(assigned_times(cluster, urgent)), max(
        assigned_times(cluster, urgent))
    later_low = [t for t in assigned_times(cluster, low) if t > first_urgent]
    assert later_low and min(later_low) >= last_urgent
    Executions(cluster).check(low + urgent)


def test_a_task_no_device_can_take_waits_and_says_why(cluster):
    big = tasks.submit(cluster.db, cluster.config, "echo", {"message": "big"},
                       requirements={"min_cpu_cores": 64})
    others = submit_mix(cluster, 30)
    wait_all_finished(cluster, others, 60)
    assert tasks.get(cluster.db, big)["state"] == "queued"
    text = cluster.rc("why", str(big)).stdout
    assert "needs 64 CPU cores" in text, text
    assert "needs 64 CPU cores" in explain.why(cluster.db, big)
    cluster.rc("cancel", str(big))
    assert tasks.get(cluster.db, big)["state"] == "cancelled"


# -- helpers ----------------------------------------------------------------------

def running_on(cluster, device_id):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE state = 'running'"
                              " AND device_id = ?", (device_id,)).fetchone()[0]


def running_device(cluster, task_id):
    task = tasks.get(cluster.db, task_id)
    return task["device_id"] if task["state"] == "running" else None


def assigned_times(cluster, task_ids):
    return [event["time"] for task_id in task_ids
            for event in tasks.get(cluster.db, task_id)["events"] if event["state"] == "assigned"]


def started_count(cluster, task_ids):
    return cluster.db.execute(
        "SELECT count(*) FROM tasks WHERE started_at IS NOT NULL AND task_id BETWEEN ? AND ?",
        (min(task_ids), max(task_ids))).fetchone()[0]


def test_no_task_process_is_left_behind(cluster):
    assert no_task_processes_left()


def test_progress_is_stored_and_cancel_stops_a_running_task(cluster):
    code = ("import time\nfor step in range(1, 100):\n"
            "    print('PROGRESS %%d/100 step %%d' %% (step, step), flush=True)\n"
            "    time.sleep(0.2)\n# %s" % MARKER)
    task_id = tasks.submit(cluster.db, cluster.config, "python_exec", {"code": code})
    wait_for(lambda: (tasks.get(cluster.db, task_id)["progress"] or 0) >= 3, 30,
             "progress to be reported")
    shown = cluster.rc("task", str(task_id)).stdout
    assert "progress" in shown and "step" in shown, shown
    cancelled_at = time.time()
    cluster.rc("cancel", str(task_id))
    wait_all_finished(cluster, [task_id], 10)
    assert time.time() - cancelled_at < 5
    assert tasks.get(cluster.db, task_id)["state"] == "cancelled"
    Executions(cluster).check([task_id])
