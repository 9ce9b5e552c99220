"""attack36: a running task's output so far (task_watch, task_output, rc
tail, GET .../output), long shell commands, and what comes from outside,
against a real TLS cluster: a device gone bad, a task, a user of the API.
Each test failed before the fix its docstring names, or says what held."""
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from hostile_harness import assert_completes, readable_by_others, submit_to, unharmed
from rc import protocol, state_dir, tails, tasks
from rc.states import TAIL_BYTES
from test_inline_files import Device

pytestmark = pytest.mark.e2e

GOOD = "good36"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster, TLS on, with one good worker of two slots (root: its
    tasks run as 61800-61803, uids no other test's worker uses) and what
    test_inline_files.Device needs to play a device by hand."""
    cluster = Cluster(tmp_path_factory.mktemp("s36"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(GOOD, "--slots", "2", "--task-user", "61800:4")
        wait_for(lambda: GOOD in online(cluster), 30, "the worker " + GOOD)
        cluster.token = state_dir.read_secret(cluster.config.token_path)
        cluster.admin = state_dir.read_secret(cluster.config.admin_token_path)
        cluster.secrets = {}
        yield cluster
    finally:
        cluster.stop()
    assert readable_by_others(cluster.home) == []


def api(cluster, method, path, body=None):
    """rc-web's /api/v1 with the admin token: (status, the answer's JSON)."""
    request = urllib.request.Request(
        "http://127.0.0.1:%d%s" % (cluster.config.web_port, path), method=method,
        data=None if body is None and method == "GET" else json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Bearer " + cluster.admin})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def watched_by_hand(cluster, device_id):
    """A device played by hand that holds a running task someone watches
    (POST .../watch, as rc tail does): (the device, its task_assign)."""
    device = Device(cluster, device_id)
    assign = device.take("sleep 600")
    status, _ = api(cluster, "POST", "/api/v1/tasks/%d/watch?seconds=600" % assign["task_id"])
    assert status == 200
    told = device.next("task_watch")
    assert (told["task_id"], told["attempt"]) == (assign["task_id"], assign["attempt"])
    return device, assign


def output_frame(device_id, assign, stream, start, text, end=None):
    return protocol.encode("task_output", {
        "task_id": assign["task_id"], "attempt": assign["attempt"], "stream": stream,
        "start": start, "end": start + len(text.encode()) if end is None else end,
        "data": text}, sender_id=device_id)


def written_bytes(pid):
    """Bytes the process has passed to write() and pwrite() (its database's
    WAL among them; rc-server answers devices with send())."""
    with open("/proc/%d/io" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


# -- a flood of task_output --------------------------------------------------------------

FLOOD_FRAMES = 100
FLOOD_CHARS = 16 * 1024


def test_a_task_output_flood_costs_the_database_a_few_writes(cluster):
    """rc-server wrote every task_output it was sent to the database, a row
    of up to 64 Ki characters each time (a turn's frames at once): a device
    holding a watched task had it write ~6 MB a second for as long as it
    liked (3,500 frames a second of 64 KiB, within max_message_rate), the
    disk of a NAS busy for everyone. Now one stream of an attempt is
    written at most every tails.WRITE_GAP seconds, what comes sooner held
    and merged: what is kept is the same. Before: 200 frames of 16 KiB,
    one every 10 ms, cost rc-server ~13 MB of writes."""
    device, assign = watched_by_hand(cluster, "flooder36")
    # Text unlike what it follows: SQLite skips writing pages left the same.
    chunks = [("%06d" % n) * (FLOOD_CHARS // 6) for n in range(FLOOD_FRAMES)]
    size = len(chunks[0])
    pid = cluster.program_pid("rc-server")
    with unharmed(cluster, GOOD):
        before = written_bytes(pid)
        for n in range(FLOOD_FRAMES):
            device.sock.sendall(output_frame("flooder36", assign, "stdout", n * size, chunks[n]))
            time.sleep(0.02)
        end = FLOOD_FRAMES * size + len("the end\n")
        device.sock.sendall(output_frame("flooder36", assign, "stdout", end - 8, "the end\n"))

        def kept():
            record = api(cluster, "GET", "/api/v1/tasks/%d/output" % assign["task_id"])[1]
            return record["stdout_end"] == end and record
        record = wait_for(kept, 30, "the last frame kept")
        written = written_bytes(pid) - before
    assert record["stdout"] == ("".join(chunks[-5:]) + "the end\n")[-tails.TAIL_CHARS:], \
        "kept as before"
    assert written < 2.5 * 1024 * 1024, "%d bytes written for %d frames" % (written, FLOOD_FRAMES)
    device.sock.close()


# -- what a task writes, as rc tail shows it ----------------------------------------------

def running(cluster, task_id):
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 60,
             "task %d to run" % task_id)


def test_rc_tail_of_output_that_is_not_utf8_loses_and_repeats_nothing(cluster, drop_dir):
    """The worker sent each stream's offsets in the bytes the task wrote
    but the text decoded (an undecodable byte as U+FFFD, three bytes), and
    rc tail took the new part of the text by those offsets: 'line0' before
    100 bytes of Latin-1 was never shown, and -f printed the end of the
    result again once the task ended. Now the offsets count the text's
    bytes, as the result's output does. Before: rc tail showed no line0."""
    gate = drop_dir / "open"
    task_id = submit_to(cluster, GOOD, "printf 'line0\\n'; head -c 100 /dev/zero | tr '\\0'"
                        " '\\351'; printf '\\nline1\\n'; while [ ! -e %s ]; do sleep 0.05;"
                        " done; echo line2" % gate)
    running(cluster, task_id)
    follow = subprocess.Popen([RC, "tail", "-f", str(task_id)], env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = b""
        while not first.endswith(b"line1\n"):
            line = follow.stdout.readline()
            assert line, "rc tail -f ended early: %r" % (first + follow.stderr.read())
            first += line
        gate.write_text("")
        rest, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    output = tasks.get(cluster.db, task_id)["result"]["output"]
    assert output == "line0\n" + "\ufffd" * 100 + "\nline1\nline2\n", output
    assert (first + rest).decode() == output, (first + rest, err)
    assert follow.returncode == 0, err
