"""`make bench`: `rc map` as a shell user types it (issue 19): `seq 2000 |
bin/rc map true` on a real cluster with one 4-slot worker, from the shell
starting the pipeline to `rc map` exiting with every result in hand; the
median of RC_BENCH_REPEAT runs. A second column, rc map's own CPU per task
(the shell, seq and rc map, from getrusage of the children), says how much
of that is the command rather than the cluster. Then what a shell user
waits for at every command: `rc status`, `rc tasks` and `rc submit`, each
from its start to its exit, and its CPU. Prints the figures and writes them
to test-artifacts/bench_map.json. Not part of `make test`."""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest

from cluster_harness import REPO, RC, Cluster, online, wait_for

pytestmark = pytest.mark.bench

REPEAT = int(os.environ.get("RC_BENCH_REPEAT", "3"))
INPUTS = int(os.environ.get("RC_BENCH_MAP_INPUTS", "2000"))
TARGET = 800.0                # tasks/s, issue 19
ARTIFACTS = os.path.join(REPO, "test-artifacts")
# As tests/test_bench.py: the defaults on the loopback interface, without TLS.
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": False}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("bench-map"), base=SETTINGS)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("bench", "--slots", "4")
    wait_for(lambda: "bench" in online(cluster), 30, "the bench worker")
    yield cluster
    cluster.stop()


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_map(cluster):
    """(tasks/s, CPU seconds of the shell, seq and rc map per task)."""
    cpu_before, started = children_cpu(), time.perf_counter()
    done = subprocess.run("seq %d | %s map true" % (INPUTS, RC), shell=True, env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)
    elapsed, cpu = time.perf_counter() - started, children_cpu() - cpu_before
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    return INPUTS / elapsed, cpu / INPUTS


def one_command(cluster, words):
    """(ms from the start of `rc WORDS` to its exit, its CPU ms)."""
    cpu_before, started = children_cpu(), time.perf_counter()
    done = subprocess.run([RC] + words, env=cluster.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    elapsed, cpu = time.perf_counter() - started, children_cpu() - cpu_before
    assert done.returncode == 0, done.stderr
    return elapsed * 1000, cpu * 1000


# What a shell user (and cron's health check) waits for at every command.
COMMANDS = (["status"], ["tasks"], ["submit", "echo", "hi"])
COMMAND_RUNS = 15


def test_rc_map_true_over_2000_inputs(cluster):
    runs = [one_map(cluster) for _ in range(REPEAT)]
    rate = statistics.median(run[0] for run in runs)
    cpu_ms = statistics.median(run[1] for run in runs) * 1000
    figures = [{"figure": "rc map true over %d inputs, 1 worker x 4 slots" % INPUTS,
                "target": ">= %g tasks/s" % TARGET, "measured": round(rate, 1),
                "unit": "tasks/s", "pass": rate >= TARGET},
               {"figure": "  rc map's own CPU (shell, seq, rc map) per task",
                "target": "", "measured": round(cpu_ms, 3), "unit": "ms", "pass": True}]
    for words in COMMANDS:
        runs = [one_command(cluster, words) for _ in range(COMMAND_RUNS)]
        figures.append({"figure": "rc %s, start to exit, median of %d" % (" ".join(words),
                                                                        COMMAND_RUNS),
                        "target": "", "measured": round(statistics.median(
                            run[0] for run in runs), 1), "unit": "ms", "pass": True})
        figures.append({"figure": "  its CPU", "target": "", "measured": round(
            statistics.median(run[1] for run in runs), 1), "unit": "ms", "pass": True})
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "bench_map.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print("\nrc map on Python %s, median of %d runs:" % (sys.version.split()[0], REPEAT))
    for figure in figures:
        print("%-52s  %-16s  %9.3f %-7s  %s" % (figure["figure"], figure["target"],
                                               figure["measured"], figure["unit"],
                                               "pass" if figure["pass"] else "FAIL"))
    print("written to %s" % os.path.join(ARTIFACTS, "bench_map.json"))
