"""Where the time of a task goes: CPU per task of every process of a real
cluster, and wall rates and latency, through HTTP (issue 19).

Starts a cluster as `make bench` does (one worker, 4 slots), submits through
`POST /api/v1/tasks` with a JSON list, reads every result through `GET
/api/v1/tasks/ID/result`, and prints for each scenario the CPU milliseconds
per task of rc-web, rc-server, rc-scheduler, rc-reaper, rc-files,
supervisord, the worker (with, in brackets, what of it its spawner and the
task processes took) and this driver; for `latency`, where a lone echo
task's time goes, from the times the programs stored. CPU time moves far
less than wall time when other work shares the machine, but it still moves
(caches): compare two versions by running them in turn, A B A B. Not a
test; run by hand:

    .venv/bin/python tests/perf_driver.py [echo shell python_exec python_eval latency] \
        [--count 5000] [--batch 500] [--private-tmp]

To see inside a program, `py-spy record -p PID` (the pids are printed first),
or `strace -c -f -p PID` for its system calls.
"""
import argparse
import base64
import http.client
import json
import os
import pickle
import resource
import shutil
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import WORKER, Cluster, online, wait_for  # noqa: E402

PROGRAMS = ("rc-web", "rc-server", "rc-scheduler", "rc-reaper", "rc-files")
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": False}


def noop(x):
    return x


def python_exec_code(value):
    """A function call as a client ships one: the function's source and its
    arguments pickled; the result pickled on stdout."""
    args = base64.b64encode(pickle.dumps((value,))).decode()
    return ("import base64, pickle, sys\n"
            "def noop(x):\n    return x\n"
            "args = pickle.loads(base64.b64decode(%r))\n"
            "sys.stdout.write(base64.b64encode(pickle.dumps(noop(*args))).decode())\n" % args)


def spec(kind, number):
    if kind == "echo":
        return {"task_type": "echo", "payload": {"message": "x"}}
    if kind == "shell":
        return {"task_type": "shell", "payload": {"command": "true"}}
    if kind == "python_eval":
        return {"task_type": "python_eval", "payload": {"expression": "1"}}
    if kind == "python_exec":
        return {"task_type": "python_exec", "payload": {"code": python_exec_code(number)}}
    raise ValueError(kind)


class Http:
    def __init__(self, cluster):
        self.connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port)
        with open(cluster.config.admin_token_path) as f:
            self.headers = {"Authorization": "Bearer " + f.read().strip(),
                            "Content-Type": "application/json"}

    def request(self, method, path, body=None):
        self.connection.request(method, path, body=body, headers=self.headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def submit(self, specs):
        status, data = self.request("POST", "/api/v1/tasks", json.dumps(specs))
        assert status == 201, data
        body = json.loads(data)
        return [t["task_id"] for t in body["tasks"]] if isinstance(specs, list) \
            else [body["task_id"]]

    def result(self, task_id):
        """The result, asking again until the task has ended."""
        while True:
            status, data = self.request("GET", "/api/v1/tasks/%d/result" % task_id)
            if status == 200:
                return json.loads(data)
            assert status == 409, data
            time.sleep(0.0005)


class CpuMeter:
    """CPU seconds of each process of the cluster: a process's own time and
    that of its children it has reaped, summed over every live process of a
    tree, so task processes count once, whoever reaps them."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.pids = {name: cluster.program_pid(name) for name in PROGRAMS}
        self.pids["supervisord"] = int(open(os.path.join(cluster.home, "run",
                                                         "supervisord.pid")).read())

    def sample(self):
        figures = {name: tree_cpu(pid, recursive=False) for name, pid in self.pids.items()}
        figures["worker"] = sum(tree_cpu(p.pid, recursive=True)
                                for p in self.cluster.workers.values())
        # Of which the task processes (reaped by the spawner) and the spawner.
        figures["(tasks)"], figures["(spawner)"] = spawner_cpu(self.cluster)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        figures["driver"] = usage.ru_utime + usage.ru_stime
        return figures


def spawner_cpu(cluster):
    """CPU seconds of the spawners' reaped children (the task processes) and
    of the spawners themselves."""
    children = own = 0.0
    for worker in cluster.workers.values():
        try:
            for process in psutil.Process(worker.pid).children(recursive=True):
                if "serve_spawner" in " ".join(process.cmdline()):
                    t = process.cpu_times()
                    children += t.children_user + t.children_system
                    own += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return children, own


def tree_cpu(pid, recursive):
    try:
        root = psutil.Process(pid)
        processes = [root] + (root.children(recursive=True) if recursive else [])
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def per_task(before, after, count):
    figures = {name: (after[name] - before[name]) * 1000.0 / count for name in after}
    figures["total"] = sum(v for name, v in figures.items() if not name.startswith("("))
    return figures


def show(title, figures, extra):
    print("%-34s %s" % (title, extra))
    print("   ms/task: " + "  ".join("%s %.3f" % (name, value) for name, value in
                                     sorted(figures.items(), key=lambda kv: -kv[1])))
    sys.stdout.flush()


def throughput(cluster, meter, http, kind, count, batch):
    before = meter.sample()
    started = time.perf_counter()
    ids = []
    for first in range(0, count, batch):
        ids += http.submit([spec(kind, n) for n in range(first, min(count, first + batch))])
    submitted = time.perf_counter()
    wait_for(lambda: cluster.db.execute(
        "SELECT count(*) FROM tasks WHERE task_id BETWEEN ? AND ? AND finished_at IS NOT NULL",
        (ids[0], ids[-1])).fetchone()[0] == len(ids), 600, "the tasks")
    stored = time.perf_counter()
    middle = meter.sample()
    failed = [r for r in (http.result(i) for i in ids) if not r["completed"]]
    done = time.perf_counter()
    after = meter.sample()
    assert not failed, failed[:3]
    show("%s x%d (batches of %d)" % (kind, count, batch), per_task(before, middle, count),
         "submit %.0f/s, stored %.0f/s, with results read %.0f/s"
         % (count / (submitted - started), count / (stored - started), count / (done - started)))
    show("   reading the results", per_task(middle, after, count),
         "%.0f results/s" % (count / (done - stored)))


def latency(cluster, meter, http, count):
    samples, steps = [], []
    before = meter.sample()
    for _ in range(count):
        time.sleep(0.005)            # an idle cluster between tasks
        started, wall = time.perf_counter(), time.time()
        task_id = http.submit(spec("echo", 0))[0]
        http.result(task_id)
        samples.append((time.perf_counter() - started) * 1000)
        steps.append((task_id, wall, wall + samples[-1] / 1000))
    after = meter.sample()
    samples.sort()
    show("echo round trip x%d" % count, per_task(before, after, count),
         "p50 %.2f ms, p90 %.2f ms, p99 %.2f ms" % (
             statistics.median(samples), samples[int(len(samples) * 0.9)],
             samples[int(len(samples) * 0.99)]))
    # Where the time goes, from the times the programs stored.
    parts = {"post->inserted": [], "inserted->assigned": [], "assigned->finished": [],
             "finished->read": []}
    for task_id, posted, read in steps:
        row = cluster.db.execute("SELECT created_at, assigned_at, finished_at FROM tasks"
                                 " WHERE task_id = ?", (task_id,)).fetchone()
        for name, value in zip(parts, (row[0] - posted, row[1] - row[0], row[2] - row[1],
                                       read - row[2])):
            parts[name].append(value * 1000)
    print("   median ms: " + "  ".join("%s %.2f" % (name, statistics.median(values))
                                       for name, values in parts.items()))


def start_worker(cluster, device_id, private_tmp, *extra):
    """cluster.start_worker, or the same worker with a /tmp of its own (a
    mount namespace with a tmpfs there): on a machine shared with other work,
    /tmp changes all the time, and the worker then reads it after each task
    (Leftovers), which a device's quiet /tmp spares it."""
    if not private_tmp:
        return cluster.start_worker(device_id, *extra)
    import subprocess
    argv = [sys.executable, "-I", WORKER] + cluster.worker_arguments(device_id) + list(extra)
    with open(cluster.worker_log(device_id), "ab") as log:
        process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs rc-perf-tmp /tmp && exec "$@"', "sh"] + argv,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.workers[device_id] = process
    return process


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*",
                        default=["echo", "shell", "python_exec", "latency"])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--latency-count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--private-tmp", action="store_true",
                        help="give the worker a /tmp of its own (root only)")
    options = parser.parse_args()
    # Not under /tmp, which a private one would hide from the worker.
    home = tempfile.mkdtemp(prefix="rc-perf-", dir=os.path.expanduser("~")
                            if options.private_tmp else None)
    cluster = Cluster(home, base=SETTINGS)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        start_worker(cluster, "perf", options.private_tmp, "--slots", "4")
        wait_for(lambda: "perf" in online(cluster), 30, "the worker")
        meter, http = CpuMeter(cluster), Http(cluster)
        print("pids: %s" % json.dumps(dict(meter.pids, worker=cluster.workers["perf"].pid)))
        http.submit(spec("python_exec", 0))     # the spawner starts before we measure
        time.sleep(1)
        for _ in range(options.repeat):
            for scenario in options.scenarios:
                if scenario == "latency":
                    latency(cluster, meter, http, options.latency_count)
                else:
                    throughput(cluster, meter, http, scenario, options.count, options.batch)
    finally:
        for worker in cluster.workers.values():     # a worker that profiles writes it out
            worker.terminate()
            try:
                worker.wait(20)
            except Exception:
                pass
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
