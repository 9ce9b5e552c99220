"""Logs: one task's id finds its submit, assignment, start and result lines
across the programs' logs (`rc logs --task`), the filters, the CLI's own log,
and an old worker told clearly to upgrade."""
import io
import json
import os
import re
import subprocess
import sys
import time

import orjson
import pytest

from cluster_harness import WORKER, Cluster, online, wait_for
from rc import commands, housekeeping, logs, protocol
from rc.log import Logger

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("logs"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def records(cluster):
    """Every JSON record in the cluster's log files."""
    found = []
    for path in logs.log_paths(cluster.config.log_dir):
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    found.append(dict(record, file=os.path.basename(path)))
    return found


def test_one_task_id_follows_the_task_through_every_program(cluster):
    wait_for(lambda: online(cluster), 30, "the local worker")
    done = cluster.rc("submit", "shell", "echo traced", "--wait")
    assert done.stdout.strip() == "traced"
    task_id = json.loads(cluster.rc("tasks", "--json", "--limit", "1").stdout)[0]["task_id"]

    def lines_of_the_task():
        mine = [r for r in records(cluster) if r.get("task_id") == task_id]
        events = {(r["program"], r["event"]) for r in mine}
        wanted = {("rc-cli", "task_submitted"), ("rc-scheduler", "task_assigned"),
                  ("worker", "task_started"), ("worker", "task_finished"),
                  ("rc-server", "task_finished")}
        return events if wanted <= events else None
    wait_for(lines_of_the_task, 15, "every program's line about task %d" % task_id)

    shown = cluster.rc("logs", "--task", str(task_id), "-n", "50").stdout.splitlines()
    assert any(" rc-cli INFO task_submitted task_id=%d" % task_id in line for line in shown)
    assert any(" worker INFO task_started task_id=%d" % task_id in line for line in shown)
    assert any(" rc-server INFO task_finished task_id=%d" % task_id in line for line in shown)
    assert all(re.search(r"task_id=%d\b" % task_id, line) for line in shown), shown
    times = [line[:8] for line in shown]
    assert times == sorted(times)


def test_http_submit_is_logged_by_rc_web(cluster):
    import urllib.request
    token = cluster.rc("token", "--admin").stdout.strip()
    request = urllib.request.Request(
        "http://127.0.0.1:%d/api/v1/tasks" % cluster.config.web_port,
        data=json.dumps({"task_type": "echo", "payload": "via http"}).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        task_id = json.loads(response.read())["task_id"]
    wait_for(lambda: [r for r in records(cluster) if r.get("task_id") == task_id
                      and r["event"] == "task_submitted" and r["program"] == "rc-web"],
             10, "rc-web's task_submitted line")


def test_filters_by_device_and_level(cluster):
    device = [r for r in records(cluster) if r.get("event") == "device_registered"][0]
    shown = cluster.rc("logs", "--device", device["device_id"], "-n", "100").stdout
    assert shown and all("device_id=%s" % device["device_id"] in line
                         for line in shown.splitlines())
    refused_register(cluster)          # rc-server logs a warning about it
    warnings = wait_for(lambda: cluster.rc("logs", "--level", "warning", "-n", "100"
                                           ).stdout.splitlines(), 10, "a warning")
    assert warnings and all(re.search(r" (WARNING|ERROR) ", line) for line in warnings)
    assert cluster.rc("logs", "--level", "loud", check=False).returncode == 2


def test_an_old_worker_is_told_to_upgrade(cluster, tmp_path):
    """A worker.py from before this protocol: its log says what to do."""
    with open(WORKER) as f:
        source = f.read()
    old = tmp_path / "worker.py"
    old.write_text(source.replace("\nPROTOCOL_VERSION = 1\n", "\nPROTOCOL_VERSION = 0\n"))
    process = subprocess.Popen(
        [sys.executable, "-I", str(old)] + cluster.worker_arguments("old"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = b""
        deadline = time.time() + 20
        while b"bad_protocol" not in output and time.time() < deadline:
            output += process.stdout.readline()
    finally:
        process.kill()
        process.wait()
    line = [orjson.loads(l) for l in output.splitlines() if b"bad_protocol" in l][0]
    assert line["level"] == "error" and "copy the current bin/worker.py" in line["message"]
    assert "protocol 1, not 0" in line["message"]


def test_a_raw_register_with_an_old_protocol_is_refused_with_the_reason(cluster):
    refused_register(cluster)


def refused_register(cluster):
    sock = cluster.connect(timeout=10)
    reader = sock.makefile("rb")
    hello = json.loads(reader.readline())
    assert hello["message_type"] == "hello" and hello["data"]["protocol"] == 1
    sock.sendall(protocol.encode("register", {"device_id": "ancient", "protocol": 0},
                                 sender_id="ancient"))
    error = json.loads(reader.readline())
    assert error["message_type"] == "error" and error["data"]["code"] == "bad_protocol"
    assert "copy the current bin/worker.py" in error["data"]["message"]
    assert reader.readline() == b""          # and the connection is closed
    sock.close()


# -- without a cluster ----------------------------------------------------------------

def test_the_cli_log_is_appended_by_many_processes_without_mixing(tmp_path):
    path = str(tmp_path / "rc-cli.log")
    loggers = [Logger.appending("rc-cli", path) for _ in range(4)]
    for n in range(200):
        loggers[n % 4].info("task_submitted", task_id=n, padding="x" * 500)
    for logger in loggers:
        logger.close()
    with open(path, "rb") as f:
        lines = [orjson.loads(line) for line in f]
    assert sorted(r["task_id"] for r in lines) == list(range(200))


class Writes(list):
    """A stream that keeps each write apart."""

    def write(self, data):
        self.append(bytes(data))

    def flush(self):
        pass


def test_one_step_s_lines_go_out_in_one_write():
    """A scheduler pass's or a server turn's lines: one wake-up of
    supervisord, not one a line; lines under the level are left out."""
    writes = Writes()
    logger = Logger("rc-scheduler", "info", writes)
    logger.log_many([("info", "task_assigned", {"task_id": 1}),
                     ("debug", "task_assigned", {"task_id": 2}),
                     ("warning", "pass_failed", {"task_id": 3})])
    assert len(writes) == 1
    lines = [orjson.loads(line) for line in writes[0].splitlines()]
    assert [(r["program"], r["level"], r["task_id"]) for r in lines] == [
        ("rc-scheduler", "info", 1), ("rc-scheduler", "warning", 3)]
    logger.log_many([("debug", "task_assigned", {"task_id": 4})])
    logger.log_many([])
    assert len(writes) == 1          # nothing to say: no write at all


def test_the_cli_log_is_rotated_like_supervisord_s(tmp_path):
    path = tmp_path / "rc-cli.log"
    path.write_bytes(b"x" * 100)
    assert not housekeeping.rotate_cli_log(str(tmp_path), max_bytes=200)
    for generation in range(3):
        path.write_bytes(b"%d" % generation * 300)
        assert housekeeping.rotate_cli_log(str(tmp_path), max_bytes=200, backups=2)
    assert not path.exists()
    assert (tmp_path / "rc-cli.log.1").read_bytes()[:1] == b"2"
    assert (tmp_path / "rc-cli.log.2").read_bytes()[:1] == b"1"
    assert not (tmp_path / "rc-cli.log.3").exists()


def test_logs_task_reads_rotated_files_too(cluster_home):
    config, _ = cluster_home
    os_log = os.path.join(config.log_dir, "rc-server.log")
    with open(os_log + ".1", "wb") as f:
        f.write(orjson.dumps({"time": 1.0, "program": "rc-server", "level": "info",
                              "event": "task_finished", "task_id": 7}) + b"\n")
    with open(os_log, "wb") as f:
        f.write(orjson.dumps({"time": 2.0, "program": "rc-server", "level": "info",
                              "event": "task_finished", "task_id": 77}) + b"\n")
    out = io.StringIO()
    assert commands.run_command(["logs", "--task", "7"], out, io.StringIO()) == 0
    assert "task_id=7" in out.getvalue() and "task_id=77" not in out.getvalue()
