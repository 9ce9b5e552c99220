"""attack36: a running task's output so far (task_watch, task_output, rc
tail, GET .../output), long shell commands, and what comes from outside,
against a real TLS cluster: a device gone bad, a task, a user of the API.
Each test failed before the fix its docstring names, or says what held."""
import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import RC, wait_for
from hostile_harness import assert_completes, submit_to, unharmed
from rc import protocol, state_dir, tails, tasks
from rc.states import TAIL_BYTES
from test_inline_files import Device, with_the_good_worker

pytestmark = pytest.mark.e2e

GOOD = "good36"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster, TLS on, with one good worker of two slots (root: its
    tasks run as 61800-61803, uids no other test's worker uses) and what
    test_inline_files.Device needs to play a device by hand."""
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("s36"), GOOD,
                                        ("--task-user", "61800:4")):
        cluster.admin = state_dir.read_secret(cluster.config.admin_token_path)
        yield cluster


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


def test_a_task_progress_flood_costs_the_database_a_few_writes(cluster):
    """The same for task_progress, an UPDATE of the task's row each (its
    payload, up to 256 KiB, with it when the message's length changes): a
    device flooding progress for a task with a large command had rc-server
    write ~12 MB a second. Now a task's progress from one device is
    written at most every PROGRESS_WRITE_GAP seconds, the last one kept.
    Before: 100 frames, one every 20 ms, cost ~25 MB of writes."""
    device = Device(cluster, "progress36")
    command = ": %s; sleep 600" % ("p" * (tasks.MAX_PAYLOAD_TEXT - 100))
    status, answer = api(cluster, "POST", "/api/v1/tasks", {
        "task_type": "shell", "payload": {"command": command},
        "requirements": {"device_id": "progress36"}})
    assert status in (200, 201), answer
    assign = device.next("task_assign")
    assert assign["task_id"] == answer["task_id"]
    key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
    device.send("task_accept", key)
    running(cluster, key["task_id"])
    pid = cluster.program_pid("rc-server")
    with unharmed(cluster, GOOD):
        before = written_bytes(pid)
        for n in range(100):
            device.send("task_progress", dict(key, progress=n % 100, message="m" * (n % 50)))
            time.sleep(0.02)
        device.send("task_progress", dict(key, progress=99.5, message="the last word"))
        wait_for(lambda: tasks.get(cluster.db, key["task_id"])["progress_message"]
                 == "the last word", 30, "the last progress written")
        written = written_bytes(pid) - before
    assert tasks.get(cluster.db, key["task_id"])["progress"] == 99.5
    assert written < 16 * 1024 * 1024, "%d bytes written for 100 frames" % written
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


def next_within(device, kind, seconds):
    """The data of the device's next frame of that kind within `seconds`
    (pings answered on the way), or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        device.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            line = device.reader.readline()
        except OSError:        # a timeout: the reader is spent, as is the test's use of it
            return None
        assert line, "rc-server closed %s's connection" % device.device_id
        message = json.loads(line)
        if message["message_type"] == "ping":
            device.send("pong", {})
        elif message["message_type"] == kind:
            return message["data"]
    return None


def test_a_task_watched_before_it_starts_is_told_again_once_it_runs(cluster):
    """A watch on a task assigned but not started yet (prefetched: the
    worker holds up to prefetch_per_slot tasks a slot in its queue) was
    told to the device once; the worker, which watches running tasks only,
    ignored it, and nothing was told again when the task started: no
    output until the watch was extended (rc tail -f: 15 s later; a single
    look, never). Now the device is told again when the task starts.
    Before: no second task_watch."""
    device = Device(cluster, "prefetch36")
    task_id = submit_to(cluster, "prefetch36", "sleep 600")
    assign = device.next("task_assign")
    assert assign["task_id"] == task_id
    assert api(cluster, "POST", "/api/v1/tasks/%d/watch?seconds=300" % task_id)[0] == 200
    assert device.next("task_watch")["task_id"] == task_id
    device.send("task_accept", {"task_id": task_id, "attempt": assign["attempt"]})
    running(cluster, task_id)
    told = next_within(device, "task_watch", 15)
    assert told is not None, "not told again"
    assert (told["task_id"], told["attempt"]) == (task_id, assign["attempt"])
    cluster.rc("cancel", str(task_id))
    device.sock.close()


def frame(device_id, data):
    return protocol.encode("task_output", data, sender_id=device_id)


def test_output_from_a_stranger_a_stale_attempt_or_malformed_is_kept_nowhere(cluster):
    """What held: a device that does not hold the attempt (another device,
    an attempt before or after) has nothing kept and pays nothing more; a
    malformed task_output (a stream that is not one, a negative or huge
    offset, an end before its start, text over TAIL_BYTES characters, a
    list for text) gets an error and its connection goes on; NULs and
    escape sequences are kept as sent, GET .../output gives them back, and
    `rc tail` in the web terminal shows them as '?'."""
    with unharmed(cluster, GOOD):
        device, assign = watched_by_hand(cluster, "hand36")
        other = Device(cluster, "other36")
        key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
        text = "a\x00b\x1b]0;title\x07c\x9b31m\u202ed\n"
        other.sock.sendall(frame("other36", dict(key, stream="stdout", start=0, end=5,
                                                 data="fake\n")))
        device.sock.sendall(frame("hand36", dict(key, attempt=key["attempt"] + 1,
                                                 stream="stdout", start=0, end=5,
                                                 data="fake\n")))
        for bad in (dict(stream="stdin"), dict(stream="stdout\x00"), dict(start=-1),
                    dict(end=2 ** 63), dict(start=9, end=3), dict(data="x" * (TAIL_BYTES + 1)),
                    dict(data=["x"]), dict(task_id=0), dict(attempt=2 ** 40),
                    dict(start=1.5), dict(stream=None)):
            data = dict(key, stream="stdout", start=0, end=3, data="bad")
            data.update(bad)
            device.sock.sendall(frame("hand36", data))
            error = device.next("error")
            assert error["code"] in ("bad_request", "bad_frame"), (bad, error)
        device.sock.sendall(frame("hand36", dict(key, stream="stderr", start=0,
                                                 end=len(text.encode()), data=text)))

        def kept():
            record = api(cluster, "GET", "/api/v1/tasks/%d/output" % key["task_id"])[1]
            return record["stderr_end"] and record
        record = wait_for(kept, 30, "the holder's frame kept")
        assert (record["stdout"], record["stdout_end"]) == ("", 0), "another's kept"
        assert record["stderr"] == text
        status, shown = api(cluster, "POST", "/api/v1/command",
                            {"command": "tail %d" % key["task_id"]})
        assert status == 200 and shown["error"] == "a?b?]0;title?c?31m\u202ed\n", shown
        for device_id, sock in (("hand36", device.sock), ("other36", other.sock)):
            sock.sendall(protocol.encode("heartbeat", {"active_tasks": []},
                                         sender_id=device_id))
        device.next("heartbeat_ack")
        other.next("heartbeat_ack")
        device.sock.close()
        other.sock.close()


def test_watch_and_output_requests_out_of_range_are_answered_never_500(cluster):
    """What held: ?seconds= negative, huge, not a number; a task id past
    what SQLite holds, zero, unknown; a task that has ended: a 400 or 404,
    or a watch of at least a second and at most tails.WATCH_MAX_SECONDS."""
    task_id = submit_to(cluster, GOOD, "sleep 30")
    running(cluster, task_id)
    for seconds, lasts in (("-5", None), ("0", 1.0), ("99999999999999999999", None),
                           ("1e30", None), ("nan", None), ("%00", None), ("7200", 600.0),
                           ("9223372036854775807", 600.0)):
        before = time.time()
        status, answer = api(cluster, "POST", "/api/v1/tasks/%d/watch?seconds=%s"
                             % (task_id, seconds))
        if lasts is None:
            assert status == 400, (seconds, status, answer)
        else:
            assert status == 200, (seconds, answer)
            # Written only when it moves the watch on: the longest one stays.
            assert answer["watched_until"] <= time.time() + tails.WATCH_MAX_SECONDS
            assert answer["watched_until"] >= before + lasts - 1
    for path in ("/api/v1/tasks/%d/watch" % 2 ** 63, "/api/v1/tasks/0/watch",
                 "/api/v1/tasks/99999999/watch", "/api/v1/tasks/%d/output" % 2 ** 70):
        status, _ = api(cluster, "GET" if path.endswith("output") else "POST", path)
        assert status == 404, (path, status)
    cluster.rc("cancel", str(task_id))
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "cancelled", 30, "cancelled")
    status, answer = api(cluster, "POST", "/api/v1/tasks/%d/watch" % task_id)
    assert (status, answer["watched_until"]) == (200, None)
    status, answer = api(cluster, "GET", "/api/v1/tasks/%d/output" % task_id)
    assert status == 200 and answer["live"] is False, answer


def test_what_was_kept_of_a_watched_task_goes_once_it_has_ended(cluster, drop_dir):
    """A watched task's row kept up to 64 Ki characters of each stream
    after the task ended, never read again (GET .../output reads the
    result then) until the task was pruned, 30 days later: a script
    watching each task of a large map (Cluster.output) kept ~128 KiB a
    task for a month. Now rc-reaper's upkeep deletes the rows of ended
    tasks. Before: the row was still there after housekeeping.sweep."""
    from rc import housekeeping
    from rc.log import Logger
    gate = drop_dir / "tail-gate"
    task_id = submit_to(cluster, GOOD, "head -c 100000 /dev/zero | tr '\\0' y; echo; while"
                        " [ ! -e %s ]; do sleep 0.05; done; echo done" % gate)
    running(cluster, task_id)
    assert api(cluster, "POST", "/api/v1/tasks/%d/watch" % task_id)[0] == 200
    wait_for(lambda: api(cluster, "GET", "/api/v1/tasks/%d/output" % task_id)[1]["stdout_end"]
             == 100001, 30, "the output so far")
    gate.write_text("")
    assert_completes(cluster, task_id, "y\ndone")
    housekeeping.sweep(cluster.db, cluster.config, Logger("test", "error"), time.time())
    assert cluster.db.execute("SELECT count(*) FROM task_tails WHERE task_id = ?",
                              (task_id,)).fetchone()[0] == 0, "kept after the end"
    record = api(cluster, "GET", "/api/v1/tasks/%d/output" % task_id)[1]
    assert record["live"] is False and record["stdout"] == "y" * 100000 + "\ndone\n"


def test_the_python_clients_get_result_takes_a_wait_of_a_few_microseconds(cluster):
    """Cluster.get_result(task, wait=S) wrote S with %g: what a program has
    left of its deadline (3.2e-05 s) went as ?wait=3.2e-05, which rc-web
    refuses (a 400, ClusterError), while results(wait=3.2e-05) took it.
    Before: ClusterError 'wait must be a number of seconds'."""
    from rc.client import Cluster as Client
    client = Client("http://127.0.0.1:%d" % cluster.config.web_port, cluster.admin)
    task_id = submit_to(cluster, GOOD, "echo waited")
    assert_completes(cluster, task_id, "waited")
    for wait in (3.2e-05, 0, 12.5, 59.9999999):
        assert client.get_result(task_id, wait=wait)["state"] == "completed", wait
        assert client.results([task_id], wait=wait)["results"][0]["task_id"] == task_id


# -- a shell command over 64 KiB, run from command.sh -------------------------------------

def test_a_long_command_runs_as_sent_beside_an_input_named_command_sh(cluster, tmp_path):
    """What held: a shell command over 64 KiB goes to the shell in
    command.sh, which the worker writes after the task's inputs are in
    place: an input of that name does not run instead,
    and the task, run as a uid of its own, reads it. The input's name is
    the command's: that input is not there (what the task sees of it is
    its command), as for python_exec's script.py."""
    (tmp_path / "command.sh").write_text("echo hijacked\n")
    command = ": %s; echo long ran as $(id -u) in $(basename $PWD)" % ("x" * 70000)
    done = cluster.rc("submit", "shell", command, "--input", str(tmp_path / "command.sh"),
                      "--require", "device_id=%s" % GOOD)
    task_id = int(done.stdout.strip())
    assert_completes(cluster, task_id, "long ran as 618")
    assert "hijacked" not in tasks.get(cluster.db, task_id)["result"]["output"]


def test_rc_tail_of_an_ended_task_in_the_web_terminal_shows_escapes_as_question_marks(
        cluster):
    """What held: once the task has ended, rc tail prints its result as rc
    wait does; in the web terminal its escape sequences show as '?'."""
    task_id = submit_to(cluster, GOOD, "printf 'a\\033]0;t\\007b\\n'; printf 'e\\033[2Jf\\n' >&2")
    assert_completes(cluster, task_id, "a\x1b]0;t\x07b")
    status, shown = api(cluster, "POST", "/api/v1/command", {"command": "tail %d" % task_id})
    assert status == 200, shown
    assert "a?]0;t?b" in shown["output"] and "\x1b" not in shown["output"] + shown["error"], \
        shown
