"""What each SQLite statement of a main-node program costs on an echo round
trip's way (issues 7 and 19): its count a trip, and the median thread CPU
and wall time of its execute() (the first step: a write whole, a query up
to its first row), measured inside the program while a client makes round
trips as `make bench` does.

critical_path.py says which hop the trip waits for; this says what the
statements of a hop cost. It starts a cluster as the bench does (one worker,
4 slots, no TLS), then for each program asked for stops supervisord's copy
and runs one of its own whose connections time every statement, makes
`--trips` round trips through rc.client (one echo submit, its result in
hand, a `--pause` between), and starts supervisord's copy again. Not a
test; run by hand:

    .venv/bin/python tests/statement_times.py [--programs rc-scheduler,rc-server,rc-web]
        [--trips 1000] [--pause 0.005]

Note what a statement costs here is on the trip's way only in part: the
first statement after another program's commit re-reads the pages it
touches, whatever it asks.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import REPO, Cluster, bench_ready, wait_for  # noqa: E402

from rc import client  # noqa: E402

SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": False}
MODULES = {"rc-scheduler": "rc.scheduler", "rc-server": "rc.server", "rc-web": "rc.web"}
SQL_SHOWN = 90          # characters of a statement's text in the table
# The program, run with every connection timing its statements; SIGUSR1
# writes what it measured to the file named in RC_STATEMENT_TIMES.
TIMED_PROGRAM = r"""
import collections, json, os, runpy, signal, sqlite3, sys, time
times = collections.defaultdict(list)

class Timed(sqlite3.Connection):
    def execute(self, sql, *parameters):
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        try:
            return super().execute(sql, *parameters)
        finally:
            times[sql].append((time.thread_time_ns() - cpu, time.perf_counter_ns() - wall))

connect = sqlite3.connect
sqlite3.connect = lambda *args, **kwargs: connect(*args, **dict(kwargs, factory=Timed))

def dump(*_):
    with open(os.environ["RC_STATEMENT_TIMES"], "w") as f:
        json.dump({sql: list(values) for sql, values in list(times.items())}, f)

signal.signal(signal.SIGUSR1, dump)
module = sys.argv[1]
sys.argv = [module]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def timed(cluster, name, trips, pause, scratch):
    """({statement: [(cpu ns, wall ns)]} after a warm-up, the same after
    `trips` round trips more) of program `name`."""
    out = os.path.join(scratch, name + ".json")
    cluster.supervisorctl("stop", name)
    env = dict(cluster.env, RC_STATEMENT_TIMES=out)
    with open(os.path.join(scratch, name + ".log"), "wb") as log:
        program = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "python"), "-c",
                                    TIMED_PROGRAM, MODULES[name]], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(cluster.config.web_port), 30, "rc-web, listening")
        round_trips(cluster, 20, pause)          # warm up; then what is measured
        program.send_signal(signal.SIGUSR1)
        before = read_dump(out)
        round_trips(cluster, trips, pause)
        program.send_signal(signal.SIGUSR1)
        return before, read_dump(out)
    finally:
        program.kill()
        program.wait()
        cluster.supervisorctl("start", name)


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def round_trips(cluster, trips, pause):
    with client.Cluster(cluster.url, cluster.token) as connection:
        for _ in range(trips):
            time.sleep(pause)
            connection.submit("echo", "x").result(60)


def read_dump(path):
    """What the program wrote on SIGUSR1 (then the file is taken away)."""
    wait_for(lambda: os.path.exists(path), 10, "the program's figures")
    time.sleep(0.2)                             # written whole
    with open(path) as f:
        figures = json.load(f)
    os.unlink(path)
    return figures


def report(name, before, after, trips):
    """The statements since the warm-up (`before`: the program's figures
    then), by their share of a trip."""
    print("\n%s: statements a trip, median thread CPU and wall of execute(), microseconds"
          % name)
    rows = []
    for sql, values in after.items():
        values = values[len(before.get(sql, [])):]
        if not values:
            continue
        cpu = sorted(v[0] for v in values)
        wall = sorted(v[1] for v in values)
        rows.append((len(values) / trips, cpu[len(cpu) // 2] / 1e3, wall[len(wall) // 2] / 1e3,
                     " ".join(sql.split())[:SQL_SHOWN]))
    rows.sort(key=lambda row: -row[0] * row[1])
    print("  %6s %7s %7s  %s" % ("a trip", "cpu", "wall", "statement"))
    for per_trip, cpu, wall, sql in rows:
        if per_trip >= 0.01:
            print("  %6.2f %7.1f %7.1f  %s" % (per_trip, cpu, wall, sql))
    print("  sum of cpu x count a trip: %.1f" % sum(row[0] * row[1] for row in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", default="rc-scheduler,rc-server,rc-web")
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=0.005)
    options = parser.parse_args()
    names = [name for name in options.programs.split(",") if name]
    unknown = set(names) - set(MODULES)
    if unknown:
        parser.error("--programs: one of %s, not %s" % (", ".join(MODULES), ", ".join(unknown)))
    scratch = tempfile.mkdtemp(prefix="rc-statements-")
    cluster = Cluster(os.path.join(scratch, "cluster"), base=SETTINGS)
    try:
        bench_ready(cluster)
        for name in names:
            report(name, *timed(cluster, name, options.trips, options.pause, scratch),
                   trips=options.trips)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
