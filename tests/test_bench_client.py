"""`make bench`, through the Python client (issue 19): what a user of
rc.client gets, from the first submit to the last result in hand, over HTTP,
on one worker with 4 slots; medians over RC_BENCH_REPEAT repetitions.
Beside each throughput, the CPU time of every process involved (the main
node's programs, the worker and its tasks, this client) per task: on a busy
machine that says more than the wall clock. Prints a table and writes
test-artifacts/bench_client.json. Not part of `make test`.
"""
import json
import os
import statistics
import sys
import time

import psutil
import pytest

from bench_common import waitress_request_ms
from cluster_harness import REPO, Cluster, bench_ready, log_records
from rc import client

pytestmark = pytest.mark.bench

REPEAT = int(os.environ.get("RC_BENCH_REPEAT", "3"))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": False}
PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-files")
RESULTS = []
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from client_functions import noop  # noqa: E402


def record(figure, target, measured, unit, passed, cpu_ms=None, by_process=None):
    RESULTS.append({"figure": figure, "target": target, "measured": round(measured, 3),
                    "unit": unit, "pass": bool(passed),
                    "cpu_ms_per_task": None if cpu_ms is None else round(cpu_ms, 3),
                    "cpu_ms_per_task_by_process": by_process})


@pytest.fixture(scope="module")
def bench_cluster(tmp_path_factory):
    cluster = bench_ready(Cluster(tmp_path_factory.mktemp("bench-client"), base=SETTINGS))
    yield cluster
    cluster.stop()


# -- what is measured: shared with tests/test_bench.py -------------------------------------

def cpu_seconds(cluster):
    """CPU seconds so far, by process: the main node's programs, supervisord
    (it files every line they log), the workers with everything they started
    (tasks reaped count with their parent), and this process (the client)."""
    seconds = {}
    for name in PROGRAMS:
        seconds[name] = process_seconds([psutil.Process(cluster.program_pid(name))])
    with open(os.path.join(cluster.home, "run", "supervisord.pid")) as f:
        seconds["supervisord"] = process_seconds([psutil.Process(int(f.read()))])
    for device_id, worker in cluster.workers.items():
        try:
            top = psutil.Process(worker.pid)
            seconds["worker " + device_id] = process_seconds(
                [top] + top.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    own = os.times()
    seconds["client"] = own.user + own.system
    return seconds


def process_seconds(processes):
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def measured(cluster, count, run):
    """(tasks per second, CPU milliseconds per task, those by process) of
    run(), which submits `count` tasks and has every result in hand when it
    returns."""
    cpu_before, started = cpu_seconds(cluster), time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    cpu_after = cpu_seconds(cluster)
    by_process = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 / count
                  for name in cpu_after}
    return count / elapsed, sum(by_process.values()), by_process


def medians(runs):
    """The medians of measured()'s figures over repetitions."""
    by_process = {name: round(statistics.median(run[2].get(name, 0.0) for run in runs), 3)
                  for name in runs[0][2]}
    return (statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs),
            by_process)


def submit_each(cluster, task_type, argument, count):
    """`count` tasks, one submit() call each, then every result."""
    with client.Cluster(cluster.url, cluster.token) as connection:
        def run():
            futures = [connection.submit(task_type, argument) for _ in range(count)]
            for future in futures:
                future.result(600)
        return measured(cluster, count, run)


def round_trips(cluster, rounds=200, pause=0.005):
    """(p50, p99, CPU ms of all processes per round, those by process, the
    median ms of each hop) of one echo submit and its result in hand, on an
    otherwise idle cluster."""
    samples, clock = [], {}
    with client.Cluster(cluster.url, cluster.token) as connection:
        connection.submit("echo", "warm").result(60)
        cpu_before = cpu_seconds(cluster)
        for _ in range(rounds):
            time.sleep(pause)
            started, wall = time.perf_counter(), time.time()
            future = connection.submit("echo", "x")
            future.result(60)
            samples.append(time.perf_counter() - started)
            clock[future.task_id] = (wall, wall + samples[-1])
        cpu_after = cpu_seconds(cluster)
    by_process = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 / rounds
                  for name in cpu_after}
    samples.sort()
    return (samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000,
            sum(by_process.values()), by_process, hops(cluster, clock))


# Where a round's time goes, read from the times of the lines each program
# logs as its step ends: rc-web's tasks_submitted (the POST answered next),
# rc-scheduler's task_assigned, rc-server's task_finished (the result
# committed and rc-web's stream woken).
HOPS = ("client's POST until rc-web logged the submit",
        "... until rc-scheduler logged the assignment",
        "... until rc-server logged the result",
        "... until the result was in the client's hands")


def hops(cluster, clock):
    """The median milliseconds of each of HOPS over the rounds in `clock`
    (task id -> (submitted, result in hand), wall clock)."""
    marks = {task_id: [started] for task_id, (started, _) in clock.items()}
    for program, event in (("rc-web", "tasks_submitted"), ("rc-scheduler", "task_assigned"),
                           ("rc-server", "task_finished")):
        for line in log_records(cluster, program, event=event):
            task_id = line.get("task_id", line.get("first_task_id"))
            if task_id in marks:
                marks[task_id].append(line["time"])
    spans = [[b - a for a, b in zip(times, times[1:])]
             for task_id, times in ((n, m + [clock[n][1]]) for n, m in marks.items())
             if len(times) == 5]
    return [statistics.median(span[i] for span in spans) * 1000 for i in range(len(HOPS))] \
        if spans else []


# -- the figures -----------------------------------------------------------------------------

def test_executor_submit_each(bench_cluster):
    """The default (calls close together packed into one task, each call
    forked in a process of its own), and beside it, in the same minutes,
    pack=1 (a task per call) for comparison."""
    def once(**options):
        first = bench_cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks") \
            .fetchone()[0]
        with client.Executor(bench_cluster.url, bench_cluster.token, **options) as executor:
            def run():
                futures = [executor.submit(noop, i) for i in range(5000)]
                assert [f.result(600) for f in futures][-1] == 4999
            figures = measured(bench_cluster, 5000, run)
        tasks = bench_cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ?",
                                         (first,)).fetchone()[0]
        print("executor.submit x5,000 %s: %.0f calls/s, %.3f CPU ms/call, %d tasks"
              % (options or "default", figures[0], figures[1], tasks))
        return figures
    runs = [(once(), once(pack=1)) for _ in range(REPEAT)]
    rate, cpu, by_process = medians([packed for packed, _ in runs])
    record("executor.submit(noop, i) x5,000, then .result()", ">= 1000", rate, "tasks/s",
           rate >= 1000, cpu, by_process)
    rate, cpu, by_process = medians([alone for _, alone in runs])
    record("  the same with Executor(pack=1): a task per call", "(compare)", rate, "tasks/s",
           True, cpu, by_process)


def test_executor_map(bench_cluster):
    def once():
        with client.Executor(bench_cluster.url, bench_cluster.token) as executor:
            def run():
                assert sum(executor.map(noop, range(20000))) == 20000 * 19999 // 2
            return measured(bench_cluster, 20000, run)
    rate, cpu, by_process = medians([once() for _ in range(REPEAT)])
    record("executor.map(noop, range(20000)), default chunks", ">= 6000", rate, "results/s",
           rate >= 6000, cpu, by_process)


def test_echo_submitted_one_call_at_a_time(bench_cluster):
    rate, cpu, by_process = medians([submit_each(bench_cluster, "echo", "x", 5000)
                                     for _ in range(REPEAT)])
    record("echo x5,000, one submit() each, then results", ">= 3000", rate, "tasks/s",
           rate >= 3000, cpu, by_process)


def test_echo_round_trip(bench_cluster):
    rounds = [round_trips(bench_cluster) for _ in range(REPEAT)]
    p50 = statistics.median(r[0] for r in rounds)
    p99 = statistics.median(r[1] for r in rounds)
    cpu = statistics.median(r[2] for r in rounds)
    by_process = {name: round(statistics.median(r[3].get(name, 0.0) for r in rounds), 3)
                  for name in rounds[0][3]}
    record("echo submit + result, idle cluster, p50", "<= 1.5 ms", p50, "ms", p50 <= 1.5, cpu,
           by_process)
    record("echo submit + result, idle cluster, p99", "<= 5 ms", p99, "ms", p99 <= 5)
    spans = [r[4] for r in rounds if r[4]]
    for i, hop in enumerate(HOPS if spans else ()):
        record("  " + hop + " (p50)", "-", statistics.median(s[i] for s in spans), "ms", True)
    record("  this machine: one request to a hello-world WSGI app under waitress in another"
           " process (p50)", "-", waitress_request_ms(), "ms", True)


def test_zz_print_the_table():
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "bench_client.json"), "w") as f:
        json.dump(RESULTS, f, indent=2)
    width = max(len(r["figure"]) for r in RESULTS)
    print("\nthrough rc.client over HTTP, one worker with 4 slots, Python %s (%s)"
          % (sys.version.split()[0], os.path.realpath(sys.executable)))
    print("%-*s  %-10s  %12s  %-6s  %s" % (width, "figure", "target", "measured", "result",
                                           "CPU ms/task (all processes)"))
    for r in RESULTS:
        print("%-*s  %-10s  %9.2f %-2s  %-6s  %s" % (
            width, r["figure"], r["target"], r["measured"], r["unit"][:2],
            "pass" if r["pass"] else "FAIL",
            "" if r["cpu_ms_per_task"] is None else "%.3f" % r["cpu_ms_per_task"]))
    print("CPU ms per task by process (medians):")
    for r in RESULTS:
        if r["cpu_ms_per_task_by_process"]:
            print("  %s: %s" % (r["figure"], ", ".join(
                "%s %.3f" % item for item in sorted(r["cpu_ms_per_task_by_process"].items()))))
    print("written to %s" % os.path.join(ARTIFACTS, "bench_client.json"))
