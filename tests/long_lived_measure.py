"""What a user waits on a cluster that has run for a year: each `rc`
command's wall time and peak memory, each HTTP route's time, rc-web's
memory before and after, on a cluster started (tests/cluster_harness.py)
on a database tests/long_lived_db.py built. Not a test; run by hand:

    .venv/bin/python tests/long_lived_db.py /tmp/rc-year
    .venv/bin/python tests/long_lived_measure.py /tmp/rc-year [--keep-running]

RC_SQL_TRACE and PYTHONPATH are passed on to the cluster's programs: a
sitecustomize.py of your own on that path (one that wraps sqlite3.connect
and writes slow statements under $RC_SQL_TRACE) shows what a slow command
waits for.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cluster_harness import RC, Cluster  # noqa: E402


def rc_timed(cluster, *args):
    """(seconds, peak RSS in KiB, exit status, first line of output)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", RC] + list(args), env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300,
                          universal_newlines=True)
    seconds = time.perf_counter() - started
    rss = int(done.stderr.strip().splitlines()[-1]) if done.stderr.strip() else 0
    shown = done.stdout if done.returncode == 0 else done.stderr.rsplit("\n", 2)[0]
    first = (shown.strip().splitlines() or [""])[0][:70]
    return seconds, rss, done.returncode, first


def http_timed(cluster, path, stream=False):
    url = "http://127.0.0.1:%d%s" % (cluster.config.web_port, path)
    request = urllib.request.Request(url)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            if stream:
                body = b""
                while b"\n\n" not in body:
                    body += response.read1(65536)
            else:
                body = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return time.perf_counter() - started, status, len(body)


def rss_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--settings", default="{}")
    arguments = parser.parse_args()
    cluster = Cluster(arguments.home, **json.loads(arguments.settings))
    for name in ("PYTHONPATH", "RC_SQL_TRACE"):
        if name in os.environ:
            cluster.env[name] = os.environ[name]
    started = time.perf_counter()
    cluster.start()
    print("make run (rc init, supervisord, every program, wait-ready): %.2f s"
          % (time.perf_counter() - started))
    figures = []
    try:
        db = cluster.db
        old_task = db.execute("SELECT min(task_id) FROM tasks WHERE state = 'failed'"
                              " AND finished_at > ?", (time.time() - 29 * 86400,)).fetchone()[0]
        file_task = db.execute("SELECT max(task_id) FROM task_files").fetchone()[0]
        group = db.execute("SELECT min(group_id) FROM task_groups WHERE created_at > ?",
                           (time.time() - 29 * 86400,)).fetchone()[0]
        device = "old-0001"
        web_pid = cluster.program_pid("rc-web")
        web_rss = rss_of(web_pid)
        commands = [("status",), ("tasks",), ("tasks", "--state", "failed"),
                    ("tasks", "--state", "queued"), ("tasks", "--device", device),
                    ("tasks", "--state", "completed", "--device", device, "--limit", "10"),
                    ("devices",), ("devices", "--all"), ("device", device),
                    ("task", str(old_task)), ("why", str(old_task)), ("files", str(file_task)),
                    ("group", str(group)), ("logs", "-n", "100"),
                    ("logs", "--task", str(old_task)), ("logs", "--device", device),
                    ("history",), ("stats", "--minutes", "10080"), ("health",), ("health", "-v"),
                    ("control", "1"), ("schedule", "list"), ("service", "list"),
                    ("map", "--resume", str(group), "--keep-order")]
        for args in commands:
            seconds, rss, status, first = rc_timed(cluster, *args)
            figures.append(("rc " + " ".join(args), seconds, "%d KiB" % rss, status, first))
        paths = ["/api/v1/status", "/api/v1/devices", "/api/v1/devices/%s" % device,
                 "/api/v1/devices/%s/logs" % device, "/api/v1/tasks",
                 "/api/v1/tasks?state=failed", "/api/v1/tasks?state=completed&limit=1000",
                 "/api/v1/tasks?device=%s" % device, "/api/v1/tasks/%d" % old_task,
                 "/api/v1/tasks/%d/why" % old_task, "/api/v1/tasks/%d/files" % file_task,
                 "/api/v1/tasks/%d/result" % old_task, "/api/v1/groups/%d" % group,
                 "/api/v1/groups/%d/results" % group, "/api/v1/stats", "/api/v1/overview",
                 "/api/v1/completion", "/api/v1/schedules", "/api/v1/services",
                 "/api/v1/controls/1", "/api/v1/health", "/text/status", "/text/devices",
                 "/text/tasks", "/text/logs", "/text/metrics", "/metrics",
                 "/text/devices/%s/logs" % device, "/", "/api/v1/terminal"]
        for path in paths:
            seconds, status, size = http_timed(cluster, path)
            figures.append(("GET " + path, seconds, "%d B" % size, status, ""))
        for path in ("/stream/overview", "/stream/tasks", "/stream/devices", "/stream/logs"):
            seconds, status, size = http_timed(cluster, path, stream=True)
            figures.append(("GET %s (first event)" % path, seconds, "%d B" % size, status, ""))
        figures.append(("rc-web RSS before / after", 0, "%d / %d KiB" % (web_rss, rss_of(web_pid)),
                        0, ""))
        for name in ("rc-server", "rc-scheduler", "rc-reaper", "rc-files"):
            figures.append(("%s RSS" % name, 0, "%d KiB" % rss_of(cluster.program_pid(name)),
                            0, ""))
        backup = os.path.join(arguments.home, "backup-test.db")
        seconds, rss, status, first = rc_timed(cluster, "backup", "--force", backup)
        figures.append(("rc backup (while running)", seconds, "%d KiB" % rss, status, first))
    finally:
        for name, seconds, size, status, first in figures:
            print("%-62s %7.3f s  %-16s %s  %s" % (name[:62], seconds, size, status, first))
        if not arguments.keep_running:
            cluster.stop()


if __name__ == "__main__":
    main()
