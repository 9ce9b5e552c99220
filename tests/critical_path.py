"""Where the wall time of one echo round trip goes: the critical path of
each trip, hop by hop, from the kernel's own timeline (issues 7 and 19).

CPU sums say what each program costs, not what the trip waits for: the
trip is a chain (client -> rc-web -> rc-scheduler -> rc-server -> worker
-> rc-server -> rc-web -> client), and on a small machine much of it is
the wake-ups between links. This starts a cluster as `make bench` does (one
worker, 4 slots), records the scheduler's switch and wake-up events and
the system calls of the cluster's threads with ftrace (an instance of its
own under /sys/kernel/tracing; needs root), while the client submits one
echo task at a time and waits for its result (marks written into the trace
around each trip). Then, for each trip, it walks back from the client's
result in hand: which thread woke it, when that thread had been woken and
by whom, and so on back to the submit. Each hop is split into

  wake     woken -> on a CPU (an idle CPU's wake-up, or a CPU held by another)
  on-cpu   running, until it wakes the next hop
  preempt  runnable but off the CPU in between

and printed with the system calls it made and who held the CPU while it
waited. Not a test; run by hand:

    .venv/bin/python tests/critical_path.py [--trips 300] [--pause 0.005] [--keep FILE]

Wake-ups depend on how long the target CPU has been idle (a virtual CPU
that halted must be woken by its host): the last table gives the wake-up
latency by that idle time.
"""
import argparse
import bisect
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import Cluster, bench_ready  # noqa: E402

from rc import client  # noqa: E402

TRACING = "/sys/kernel/tracing"
INSTANCE = os.path.join(TRACING, "instances", "rc-critical-path")
SCHED_EVENTS = ("sched/sched_switch", "sched/sched_waking")
SYSCALL_EVENTS = ("raw_syscalls/sys_enter",)
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": False}
PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-files")
LINE = re.compile(r"^\s*(.+)-(\d+)\s+\[(\d+)\]\s+(\S+)\s+([\d.]+): (\w+): (.*)$")
UNISTD = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


# -- recording -------------------------------------------------------------------------

def put(name, value):
    with open(os.path.join(INSTANCE, name), "w") as f:
        f.write(value)


def thread_labels(pids):
    """tid -> "program" for a process's first thread, "program.tTID" for the others."""
    labels = {}
    for name, pid in pids.items():
        tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))
        for tid in tids:
            labels[tid] = name if tid == pid else "%s.t%d" % (name, tid)
    return labels


def record(cluster, url, token, trips, pause):
    """Run `trips` round trips under ftrace; (trace text, labels, seconds each)."""
    pids = {name: cluster.program_pid(name) for name in PROGRAMS}
    pids["worker"] = cluster.workers["bench"].pid
    with open(os.path.join(cluster.home, "run", "supervisord.pid")) as f:
        pids["supervisord"] = int(f.read())
    labels = thread_labels(pids)
    os.makedirs(INSTANCE, exist_ok=True)
    put("tracing_on", "0")
    put("trace", "")
    put("buffer_size_kb", "40000")
    seconds = []
    with client.Cluster(url, token) as connection:
        for _ in range(30):
            connection.submit("echo", "warm").result(60)
        for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
            labels[tid] = "client" if tid == threading.get_native_id() else "client.t%d" % tid
        only_ours = " || ".join("common_pid == %d" % tid for tid in labels)
        for event in SYSCALL_EVENTS:
            put("events/%s/filter" % event, only_ours)
        for event in SCHED_EVENTS + SYSCALL_EVENTS:
            put("events/%s/enable" % event, "1")
        with open(os.path.join(INSTANCE, "trace_marker"), "w", buffering=1) as marker:
            put("tracing_on", "1")
            try:
                for number in range(trips):
                    time.sleep(pause)
                    marker.write("S %d\n" % number)
                    started = time.perf_counter()
                    connection.submit("echo", "x").result(60)
                    seconds.append(time.perf_counter() - started)
                    marker.write("E %d\n" % number)
            finally:
                put("tracing_on", "0")
    with open(os.path.join(INSTANCE, "trace")) as f:
        text = f.read()
    for event in SCHED_EVENTS + SYSCALL_EVENTS:
        put("events/%s/enable" % event, "0")
    put("trace", "")
    os.rmdir(INSTANCE)          # its buffers go with it
    return text, labels, seconds


# -- reading the trace -----------------------------------------------------------------

class Timeline:
    """Runs on CPUs, wake-ups and system calls of every thread, and the trips' marks."""

    def __init__(self, text, labels):
        self.labels, self.comm = labels, {}
        self.runs = collections.defaultdict(list)       # tid -> [(start, end, cpu, end state)]
        self.wakes = collections.defaultdict(list)      # tid -> [(time, waker tid)]
        self.calls = collections.defaultdict(list)      # tid -> [(time, name)]
        self.cpu_runs = collections.defaultdict(list)   # cpu -> [(start, end, tid)]
        self.marks = collections.defaultdict(dict)      # trip -> {"S"|"E": (time, tid)}
        names = syscall_names()
        current = {}
        for line in text.splitlines():
            match = LINE.match(line)
            if not match:
                continue
            _, pid, cpu, _, at, event, rest = match.groups()
            pid, cpu, at = int(pid), int(cpu), float(at)
            if event == "sched_switch":
                fields = dict(item.split("=", 1) for item in rest.replace(" ==> ", " ").split()
                              if "=" in item)
                before, after = int(fields["prev_pid"]), int(fields["next_pid"])
                self.comm[before], self.comm[after] = fields["prev_comm"], fields["next_comm"]
                if current.get(cpu, (None,))[0] == before:
                    start = current[cpu][1]
                    self.runs[before].append((start, at, cpu, fields["prev_state"]))
                    self.cpu_runs[cpu].append((start, at, before))
                current[cpu] = (after, at)
            elif event == "sched_waking":
                woken = int(re.search(r"\bpid=(\d+)", rest).group(1))
                self.wakes[woken].append((at, pid))
            elif event == "sys_enter":
                number = int(rest.split()[1])
                self.calls[pid].append((at, names.get(number, str(number))))
            elif event == "tracing_mark_write":
                kind, trip = rest.split()[:2]
                self.marks[int(trip)][kind] = (at, pid)
        self.starts = {tid: [run[0] for run in runs] for tid, runs in self.runs.items()}
        self.busy = {cpu: sorted((s, e) for s, e, tid in runs if tid)
                     for cpu, runs in self.cpu_runs.items()}

    def name(self, tid):
        return self.labels.get(tid, "%s-%d" % (self.comm.get(tid, "?"), tid))

    def program(self, tid):
        label = self.name(tid)
        return label.split(".")[0] if tid in self.labels else self.comm.get(tid, "?")

    def holders(self, cpu, start, end):
        held = collections.Counter()
        for s, e, tid in self.cpu_runs[cpu]:
            if e > start and s < end and tid:
                held[self.program(tid)] += min(e, end) - max(s, start)
        return held

    def idle_for(self, cpu, at):
        """How long `cpu` had been idle at `at` (0 when busy)."""
        runs = self.busy.get(cpu, [])
        index = bisect.bisect_right([s for s, _ in runs], at) - 1
        if index < 0:
            return None
        return max(0.0, at - runs[index][1])

    def critical_path(self, trip):
        """The hops of one trip, first to last: dicts with thread, wake,
        on_cpu, preempted (seconds), calls, held (who had the CPU during the
        wake) and idle (how long the CPU it ran on had been idle)."""
        start, _ = self.marks[trip]["S"]
        end, tid = self.marks[trip]["E"]
        hops, at = [], end
        while at > start and self.runs.get(tid):
            runs = self.runs[tid]
            last = bisect.bisect_right(self.starts[tid], at + 1e-7) - 1
            slept = last - 1            # back to its last sleep (not a preemption)
            while slept >= 0 and runs[slept][3].startswith("R"):
                slept -= 1
            asleep_at = runs[slept][1] if slept >= 0 else -1.0
            woken = [w for w in self.wakes[tid] if asleep_at <= w[0] <= at]
            mine = runs[slept + 1:last + 1]
            if not woken or woken[0][0] < start:       # running since before the submit
                on_cpu = sum(min(e, at) - max(s, start) for s, e, _, _ in mine
                             if min(e, at) > max(s, start))
                hops.append(self.hop(tid, start, at, 0.0, on_cpu, at - start - on_cpu, None))
                break
            wake_at, waker = woken[0]
            first = next(run for run in mine if run[0] >= wake_at - 1e-7)
            on_cpu = sum(min(e, at) - s for s, e, _, _ in mine if s < at)
            hops.append(self.hop(tid, wake_at, at, first[0] - wake_at, on_cpu,
                                 at - first[0] - on_cpu, first))
            if waker in (0, tid):
                break                   # an interrupt or a timer
            tid, at = waker, wake_at
        return list(reversed(hops))

    def hop(self, tid, begin, end, wake, on_cpu, preempted, first_run):
        hop = {"thread": self.name(tid), "program": self.program(tid), "wake": wake,
               "on_cpu": on_cpu, "preempted": preempted,
               "calls": [name for at, name in self.calls[tid] if begin <= at <= end],
               "held": collections.Counter(), "idle": None}
        if first_run is not None:
            hop["held"] = self.holders(first_run[2], begin, first_run[0])
            hop["idle"] = self.idle_for(first_run[2], begin)
        return hop


def syscall_names():
    names = {}
    try:
        with open(UNISTD) as f:
            for line in f:
                match = re.match(r"#define __NR_(\w+) (\d+)", line)
                if match:
                    names[int(match.group(2))] = match.group(1)
    except OSError:
        pass                # numbers, then
    return names


# -- the report ------------------------------------------------------------------------

def microseconds(values):
    return statistics.median(values) * 1e6 if values else 0.0


def report(timeline, seconds):
    trips = [timeline.critical_path(trip) for trip in sorted(timeline.marks)
             if {"S", "E"} <= set(timeline.marks[trip])]
    seconds = sorted(seconds)
    print("%d trips: p50 %.3f ms, p90 %.3f ms (traced; tracing adds a little)"
          % (len(seconds), seconds[len(seconds) // 2] * 1e3, seconds[len(seconds) * 9 // 10] * 1e3))
    chains = collections.Counter(tuple(hop["program"] for hop in hops) for hops in trips)
    print("\nchains of programs, commonest first:")
    for chain, count in chains.most_common(5):
        print("  %4d  %s" % (count, " -> ".join(chain)))
    chain = chains.most_common(1)[0][0]
    same = [hops for hops in trips if tuple(hop["program"] for hop in hops) == chain]
    print("\nmedians over the %d trips of the commonest chain, microseconds:" % len(same))
    print("  %-22s %7s %7s %7s   %s" % ("hop (thread)", "wake", "on-cpu", "preempt",
                                       "system calls a trip / CPU held during the wake by"))
    totals = collections.Counter()
    for index in range(len(chain)):
        hops = [trip[index] for trip in same]
        figures = {key: microseconds([hop[key] for hop in hops])
                   for key in ("wake", "on_cpu", "preempted")}
        totals.update(figures)
        calls, held = collections.Counter(), collections.Counter()
        for hop in hops:
            calls.update(hop["calls"])
            held.update(hop["held"])
        thread = collections.Counter(hop["thread"] for hop in hops).most_common(1)[0][0]
        print("  %-22s %7.0f %7.0f %7.0f   %s" % (
            thread, figures["wake"], figures["on_cpu"], figures["preempted"],
            " ".join("%s:%.1f" % (name, n / len(hops)) for name, n in calls.most_common(8))))
        if held:
            print("  %-46s held: %s" % ("", " ".join(
                "%s %.0f" % (name, t / len(hops) * 1e6) for name, t in held.most_common(4))))
    print("  %-22s %7.0f %7.0f %7.0f   (sums of the medians)"
          % ("all hops", totals["wake"], totals["on_cpu"], totals["preempted"]))
    print("\nwake-up latency on the path by how long the CPU it ran on had been idle:")
    wakes = [(hop["idle"], hop["wake"]) for hops in trips for hop in hops
             if hop["idle"] is not None]
    for low, high in ((-1, 0), (0, 1e-4), (1e-4, 2e-4), (2e-4, 5e-4), (5e-4, 1e9)):
        picked = [wake for idle, wake in wakes if low < idle <= high]
        if picked:
            print("  %-24s %5d wakes, median %4.0f us" % (
                "CPU busy" if high == 0 else "idle %g-%g ms" % (max(low, 0) * 1e3, high * 1e3)
                if high < 1 else "idle over %g ms" % (low * 1e3), len(picked),
                microseconds(picked)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.005,
                        help="seconds between trips, as the bench (default 0.005)")
    parser.add_argument("--keep", help="also write the raw trace and labels to FILE(.labels)")
    options = parser.parse_args()
    if not os.path.isdir(TRACING):
        sys.exit("needs ftrace at %s (and root)" % TRACING)
    with tempfile.TemporaryDirectory(prefix="rc-critical-path-") as home:
        cluster = Cluster(home, base=SETTINGS)
        try:
            bench_ready(cluster)
            token = cluster.token
            text, labels, seconds = record(cluster, "http://127.0.0.1:%d"
                                           % cluster.config.web_port, token,
                                           options.trips, options.pause)
        finally:
            cluster.stop()
    if options.keep:
        with open(options.keep, "w") as f:
            f.write(text)
        with open(options.keep + ".labels", "w") as f:
            json.dump(labels, f)
    report(Timeline(text, labels), seconds)


if __name__ == "__main__":
    main()
