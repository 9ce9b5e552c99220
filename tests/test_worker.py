"""bin/worker.py against a small fake main node on 127.0.0.1.

The real worker runs as a subprocess under `python -I -S`, as on a device with
nothing but CPython. The fake main node here speaks the protocol of
docs/protocol.md with plain blocking sockets; rc.protocol computes the proofs,
so the worker is checked against the main node's own definition of them.
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from rc.protocol import server_proof, worker_proof  # noqa: E402

WORKER = os.path.join(ROOT, "bin", "worker.py")
TOKEN = "0123456789abcdef-test-token"
DEVICE_ID = "test-device"
WAIT = 15.0      # seconds any single expected frame may take on a slow machine


def interpreter_version(path):
    match = re.search(r"/3\.(\d+)\.(\d+)/", path)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


INTERPRETERS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")),
                      key=interpreter_version)
# The detailed checks run on the interpreter running the tests and on the oldest
# one supported; every other version gets the smoke test.
DETAILED = [sys.executable] + [p for p in INTERPRETERS[:1] if "/3.6." in p]


def short_name(path):
    match = re.search(r"/(3\.\d+\.\d+)/", path)
    return match.group(1) if match else "current"


# -- the fake main node ----------------------------------------------------------

class Link:
    """One accepted worker connection, read and written from the test."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""
        self.register = None
        self.heartbeats = []
        self.assigned = set()       # (task_id, attempt) sent with assign()
        self.unanswered = []        # lease_checks that came while we kept silent
        self.sent_at = None         # time.monotonic() of the last frame we sent
        self.kept = []              # frames wait_until() read, for the next reads

    def send(self, message_type, data):
        self.send_raw(json.dumps({"message_type": message_type, "sender_id": "main",
                                  "timestamp": time.time(), "message_id": "t",
                                  "data": data}).encode() + b"\n")

    def send_raw(self, frame):
        self.answer_late()
        self.sock.sendall(frame)
        self.sent_at = time.monotonic()

    def recv(self, timeout=WAIT):
        """The next envelope; None when the worker closed the connection."""
        envelope = self.try_recv(timeout)
        if envelope == "timeout":
            raise AssertionError("no frame from the worker within %g s" % timeout)
        return envelope

    def try_recv(self, timeout):
        """The next envelope, None when the worker closed the connection, or "timeout"."""
        if self.kept:
            return self.kept.pop(0)
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def pump(self, seconds, keep_alive=True, until=None, answer_checks=True, wanted=None):
        """Every frame the worker sends for `seconds`, or until `until()` or
        `wanted(frames so far)`: a slow machine's late frames are waited for.
        With keep_alive, a heartbeat_ack every 0.2 s, so the worker hears from
        us, and (unless not answer_checks) each lease_check answered as
        answered() does: a loaded machine may stall the worker into asking."""
        frames = []
        deadline = time.monotonic() + seconds
        next_ack = 0
        while time.monotonic() < deadline and not (until and until()) \
                and not (wanted and wanted(frames)):
            if keep_alive and time.monotonic() >= next_ack:
                self.send("heartbeat_ack", {})
                next_ack = time.monotonic() + 0.2
            envelope = self.try_recv(0.05)
            if envelope is None:
                break
            if envelope == "timeout":
                continue
            frames.append(envelope)
            if envelope["message_type"] != "lease_check":
                continue
            if keep_alive and answer_checks:
                self.answered(envelope)
            elif not keep_alive:
                self.unanswered.append(envelope)
        return frames

    def wait_until(self, condition, timeout=WAIT):
        """wait_until() for something outside the link (a process, a file),
        the link kept meanwhile as a main node keeps it: heartbeats and
        lease_checks answered, the worker's other frames kept for the next
        reads. A stalled worker asks before it starts a task it was sent."""
        deadline = time.monotonic() + timeout
        read = []
        try:
            while not condition() and time.monotonic() < deadline:
                envelope = self.try_recv(0.05)
                if envelope is None:
                    break
                if envelope != "timeout" and not self.answered(envelope):
                    read.append(envelope)
        finally:
            self.kept = read + self.kept
        return condition()

    def answer_late(self):
        """Answer the lease_checks a silence kept waiting, before anything
        else we send, as a main node that speaks again does: the worker
        starts nothing, and a fence_interval drops what it is sent, until then."""
        late, self.unanswered = self.unanswered, []
        for envelope in late:
            self.answered(envelope)

    def answered(self, envelope):
        """Answer a heartbeat or a lease_check as a main node does (True if
        it was one). A loaded machine may stall the worker's loop past
        FREEZE_THRESHOLD: it then asks which tasks are still its own, and
        this fake main node never gives one away: as rc-server, it names every
        task it gave this device, asked about or not (one may be on its way)."""
        kind = envelope["message_type"]
        if kind == "heartbeat":
            self.heartbeats.append(envelope["data"])
            self.send("heartbeat_ack", {})
        elif kind == "lease_check":
            held = self.assigned | {(t["task_id"], t["attempt"]) for t in envelope["data"]["tasks"]}
            self.send("lease_check_ack", {"active_tasks": [
                {"task_id": task_id, "attempt": attempt} for task_id, attempt in sorted(held)]})
        return kind in ("heartbeat", "lease_check")

    def next(self, timeout=WAIT):
        """The next frame that is not a heartbeat or a lease_check (both are answered)."""
        self.answer_late()
        while True:
            envelope = self.recv(timeout)
            if envelope is None or not self.answered(envelope):
                return envelope

    def expect(self, message_type, timeout=WAIT):
        envelope = self.next(timeout)
        assert envelope is not None, "worker closed the connection, wanted %s" % message_type
        assert envelope["message_type"] == message_type, envelope
        assert envelope["sender_id"] == DEVICE_ID
        return envelope["data"]

    def handshake(self, prove=True, heartbeat_interval=60, **fencing):
        server_nonce = os.urandom(16).hex()
        self.send("hello", {"nonce": server_nonce, "protocol": 1})
        register = self.expect("register")
        expected = worker_proof(TOKEN, server_nonce, register["nonce"], register["device_id"])
        assert register["proof"] == expected
        proof = server_proof(TOKEN, server_nonce, register["nonce"], register["device_id"])
        if not prove:
            proof = server_proof("some other token", server_nonce, register["nonce"],
                                 register["device_id"])
        self.send("register_ack", dict(fencing, proof=proof,
                                       heartbeat_interval=heartbeat_interval))
        self.register = register
        return register

    def assign(self, task_id, task_type, payload, timeout=30.0, attempt=1):
        self.assigned.add((task_id, attempt))
        self.send("task_assign", {"task_id": task_id, "attempt": attempt,
                                  "task_type": task_type, "payload": payload,
                                  "timeout": timeout, "priority": "normal"})

    def results(self, count, timeout=WAIT):
        """The next `count` task_results by task id; accepts and progress are
        noted on the side."""
        results = {}
        self.accepted = getattr(self, "accepted", set())
        self.progress = getattr(self, "progress", [])
        while len(results) < count:
            envelope = self.next(timeout)
            assert envelope is not None, "worker closed the connection"
            kind, data = envelope["message_type"], envelope["data"]
            if kind == "task_accept":
                self.accepted.add((data["task_id"], data["attempt"]))
            elif kind == "task_result":
                results[data["task_id"]] = data
            elif kind == "task_progress":
                self.progress.append(data)
            else:
                raise AssertionError("unexpected %s" % envelope)
        return results

    def run(self, task_type, payload, timeout=30.0, task_id=1):
        self.assign(task_id, task_type, payload, timeout)
        return self.results(1)[task_id]

    def close(self):
        self.sock.close()


class FakeMain:
    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.links = []

    def accept(self, timeout=WAIT):
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        link = Link(sock)
        self.links.append(link)
        return link

    def close(self):
        for link in self.links:
            link.close()
        self.listener.close()


class WorkerProcess:
    def __init__(self, python, port, log_path, *arguments):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [python, "-I", "-S", WORKER, "--join", "127.0.0.1:%d" % port, "--token", TOKEN,
             "--device-id", DEVICE_ID, "--slots", "4", "--log-level", "debug",
             "--state-dir", log_path + ".state"] + list(arguments),
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self):
        with open(self.log_path) as f:
            return [json.loads(line) if line.startswith("{") else {"raw": line} for line in f]

    def events(self, name):
        return [entry for entry in self.log() if entry.get("event") == name]

    def watchdog_pid(self):
        return self.events("worker_started")[0]["watchdog"]

    def stop(self):
        """SIGTERM, as supervisord would; the worker must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log_file.close()


@pytest.fixture
def main():
    fake = FakeMain()
    yield fake
    fake.close()


@pytest.fixture
def spawn(main, tmp_path):
    """Start the worker against `main`; teardown stops it and shows its log on failure."""
    started = []

    def start(python, *arguments):
        worker = WorkerProcess(python, main.port, str(tmp_path / ("worker%d.log" % len(started))),
                               *arguments)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def registered(main, spawn, python, *arguments, **handshake):
    worker = spawn(python, *arguments)
    link = main.accept()
    link.handshake(**handshake)
    return worker, link


def process_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_until(condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- every interpreter: registers, runs the core task types, stops cleanly -------

@pytest.mark.skipif(not INTERPRETERS, reason="no CPython under ~/.pyenv/versions/3.*")
@pytest.mark.parametrize("python", INTERPRETERS or ["none"], ids=short_name)
def test_smoke_on_every_python(main, spawn, python):
    worker, link = registered(main, spawn, python, "--tag", "kitchen")
    register = link.register
    assert register["device_id"] == DEVICE_ID and register["protocol"] == 1
    assert register["device_info"]["python_version"] == short_name(python)
    assert register["tags"] == ["kitchen"] and register["slots"] == 4
    assert register["active_tasks"] == []
    link.assign(1, "echo", {"message": "hi there"})
    link.assign(2, "python_eval", {"expression": "sum(range(100000))"})
    link.assign(3, "shell", {"command": "echo hi"})
    results = link.results(3)
    assert [results[i]["status"] for i in (1, 2, 3)] == ["completed"] * 3, results
    assert results[1]["result"]["output"] == "hi there"
    assert results[2]["result"]["output"] == "4999950000"
    assert results[3]["result"]["output"] == "hi\n"
    assert results[3]["result"]["exit_code"] == 0
    assert worker.stop() == 0


def test_no_interpreter_matrix_is_visible():
    if not INTERPRETERS:
        pytest.skip("no CPython 3.x under ~/.pyenv/versions: only the current one was tested")


# -- detailed checks on the current and the oldest interpreter --------------------

detailed = pytest.mark.parametrize("python", DETAILED, ids=short_name)


@detailed
def test_register_profile(main, spawn, python):
    _, link = registered(main, spawn, python, "--role", "storage")
    register = link.register
    info, specs = register["device_info"], register["hardware_specs"]
    assert {"hostname", "platform", "architecture", "os_version",
            "python_version"} <= set(info) <= {"hostname", "platform", "architecture",
                                               "os_version", "python_version", "os_name"}
    assert info["platform"] == sys.platform
    assert isinstance(specs["cpu_cores"], int) and specs["cpu_cores"] >= 1
    assert isinstance(specs["memory_gb"], float) and isinstance(specs["disk_gb"], float)
    assert isinstance(specs["network_interfaces"], dict)
    assert isinstance(specs["cpu_speed"], float) and specs["cpu_speed"] > 0
    assert isinstance(specs["battery"], bool)
    assert register["availability"] == {"available": True, "reason": ""}
    assert "python3" in register["capabilities"] or "sh" not in register["capabilities"]
    assert register["task_types"] == ["echo", "sleep", "system_info", "python_eval",
                                      "python_exec", "shell"]
    assert register["role"] == "storage"
    heartbeat = link.recv()   # the first heartbeat follows register_ack at once
    assert heartbeat["message_type"] == "heartbeat"
    assert heartbeat["data"]["status"] == "idle"
    assert heartbeat["data"]["active_tasks"] == []
    assert "memory_percent" in heartbeat["data"]["system_metrics"]


@detailed
def test_each_task_type(main, spawn, python):
    _, link = registered(main, spawn, python)
    link.assign(1, "echo", {"message": "héllo"})
    link.assign(2, "sleep", {"seconds": 0.2})
    link.assign(3, "system_info", {})
    link.assign(4, "python_eval", {"expression": "sum(range(100000))"})
    link.assign(5, "python_exec", {"code": "import sys\nprint('out')\nprint('err', file=sys.stderr)"})
    link.assign(6, "shell", {"command": "echo hi; echo oops >&2"})
    results = link.results(6)
    # echo and system_info are answered at once, without a task_accept.
    assert link.accepted == {(i, 1) for i in (2, 4, 5, 6)}
    for task_id, result in results.items():
        assert result["status"] == "completed", result
        assert result["error"] is None
        assert result["result"]["truncated"] is False
    assert results[1]["result"]["output"] == "héllo"
    assert results[2]["result"]["output"] == ""
    assert results[2]["result"]["execution_time"] >= 0.2
    info = json.loads(results[3]["result"]["output"])
    assert info["device_info"]["hostname"] and "system_metrics" in info
    assert results[4]["result"]["output"] == "4999950000"
    assert results[5]["result"]["output"] == "out\n"
    assert results[5]["result"]["stderr"] == "err\n"
    shell = results[6]["result"]
    assert (shell["output"], shell["stderr"], shell["exit_code"]) == ("hi\n", "oops\n", 0)
    assert shell["cpu_time"] >= 0 and shell["peak_memory_kb"] > 0


@detailed
def test_failures(main, spawn, python):
    _, link = registered(main, spawn, python)
    link.assign(1, "shell", {"command": "echo hi; exit 3"})
    link.assign(2, "python_eval", {"expression": "1/0"})
    link.assign(3, "python_exec", {"code": "raise SystemExit(5)"})
    link.assign(4, "echo", {})
    results = link.results(4)
    assert results[1]["status"] == "failed"
    assert results[1]["result"]["exit_code"] == 3 and results[1]["result"]["output"] == "hi\n"
    assert results[1]["error"] == "exit status 3"
    assert results[2]["status"] == "failed"
    assert results[2]["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in results[2]["result"]["stderr"]
    assert results[3]["status"] == "failed" and results[3]["error"] == "exit status 5"
    assert results[4]["status"] == "failed" and "message" in results[4]["error"]


@detailed
def test_timeout_kills_the_process_group(main, spawn, python):
    _, link = registered(main, spawn, python)
    link.assign(1, "shell", {"command": "sleep 30 & echo $!; wait"}, timeout=1.0)
    link.assign(2, "sleep", {"seconds": 30}, timeout=0.3)
    started = time.monotonic()
    results = link.results(2)
    assert time.monotonic() - started < 5
    assert results[2]["status"] == "timed_out"
    shell = results[1]
    assert shell["status"] == "timed_out", shell
    assert shell["result"]["exit_code"] == -signal.SIGKILL
    child = int(shell["result"]["output"].split()[0])
    assert wait_until(lambda: process_gone(child)), "the task's background child survived"


@detailed
def test_cancel(main, spawn, python):
    _, link = registered(main, spawn, python)
    link.assign(1, "shell", {"command": "sleep 30"})
    link.assign(2, "sleep", {"seconds": 30})
    assert link.expect("task_accept") == {"task_id": 1, "attempt": 1}
    assert link.expect("task_accept") == {"task_id": 2, "attempt": 1}
    link.send("task_cancel", {"task_id": 99, "attempt": 1})     # unknown: ignored
    link.send("task_cancel", {"task_id": 1, "attempt": 2})      # another attempt: ignored
    link.send("task_cancel", {"task_id": 1, "attempt": 1})
    link.send("task_cancel", {"task_id": 2, "attempt": 1})
    results = link.results(2, timeout=5)
    assert results[1]["status"] == "cancelled" and results[2]["status"] == "cancelled"
    assert link.run("echo", {"message": "still here"}, task_id=3)["status"] == "completed"


@detailed
def test_denied_type_is_not_allowed(main, spawn, python):
    _, link = registered(main, spawn, python, "--deny", "shell,python_exec")
    assert link.register["task_types"] == ["echo", "sleep", "system_info", "python_eval"]
    result = link.run("shell", {"command": "echo should not run"})
    assert result["status"] == "not_allowed" and "shell" in result["error"]
    assert not link.accepted


@detailed
def test_output_is_capped(main, spawn, python):
    _, link = registered(main, spawn, python, "--output-cap", "1000")
    result = link.run("python_exec", {"code": "import sys\nprint('x' * 50000)\n"
                                              "sys.stderr.write('e' * 300000)"})
    assert result["status"] == "completed"
    assert result["result"]["truncated"] is True
    assert result["result"]["output"] == "x" * 1000
    assert result["result"]["stderr"] == "e" * 1000


@detailed
def test_results_are_resent_until_acknowledged(main, spawn, python):
    _, link = registered(main, spawn, python)
    first = link.run("echo", {"message": "keep me"}, task_id=7)
    link.assign(8, "sleep", {"seconds": 1.0})
    assert link.expect("task_accept")["task_id"] == 8
    link.close()                                  # no task_result_ack for task 7

    link = main.accept()
    register = link.handshake()
    assert register["active_tasks"] == [{"task_id": 8, "attempt": 1}]
    resent = link.expect("task_result")
    assert resent == first
    link.send("task_result_ack", {"task_id": 7, "attempt": 1})
    finished = link.expect("task_result")           # the sleep kept running meanwhile
    assert (finished["task_id"], finished["status"]) == (8, "completed")
    link.send("task_result_ack", {"task_id": 8, "attempt": 1})
    link.close()

    link = main.accept()
    assert link.handshake()["active_tasks"] == []
    # Resent results come before the first heartbeat: none are left.
    assert link.recv()["message_type"] == "heartbeat"


@detailed
def test_main_node_with_wrong_proof_gets_nothing_run(main, spawn, python):
    worker, link = registered(main, spawn, python, prove=False)
    link.assign(1, "shell", {"command": "echo ran > ran.txt"})
    assert link.next() is None, "the worker should hang up on a main node without the token"
    link = main.accept()          # it keeps trying: the right main node may come back
    register = link.handshake()
    assert register["active_tasks"] == []
    assert link.recv()["message_type"] == "heartbeat"
    events = [entry.get("event") for entry in worker.log()]
    assert "server_proof_wrong" in events and "task_started" not in events


@detailed
def test_wrong_token_is_logged_and_retried(main, spawn, python):
    worker = spawn(python)
    link = main.accept()
    link.send("hello", {"nonce": os.urandom(16).hex(), "protocol": 1})
    link.expect("register")
    link.send("error", {"code": "auth_failed", "message": "wrong join token"})
    link.close()
    main.accept().handshake()
    errors = [e for e in worker.log() if e.get("event") == "auth_failed"]
    assert errors and errors[0]["level"] == "error" and "wrong join token" in errors[0]["message"]


@detailed
def test_heartbeats_follow_register_ack_interval(main, spawn, python):
    _, link = registered(main, spawn, python, heartbeat_interval=0.2)
    link.assign(1, "sleep", {"seconds": 0.7})
    results = link.results(1)
    assert results[1]["status"] == "completed"
    assert len(link.heartbeats) >= 3
    assert any(h["status"] == "busy" and h["active_tasks"] == [{"task_id": 1, "attempt": 1}]
               for h in link.heartbeats)
    for heartbeat in link.heartbeats:
        assert set(heartbeat) == {"system_metrics", "status", "active_tasks", "fenced_tasks",
                                  "availability"}
        assert heartbeat["fenced_tasks"] == []


@detailed
def test_oversized_frame_ends_the_connection(main, spawn, python):
    _, link = registered(main, spawn, python)
    link.send_raw(b"x" * (1024 * 1024 + 10))
    error = link.expect("error")
    assert error["code"] == "frame_too_large"
    assert link.next() is None
    main.accept().handshake()


@detailed
def test_sigterm_kills_running_tasks_and_exits_0(main, spawn, python, drop_dir):
    worker, link = registered(main, spawn, python)
    pid_file = drop_dir / "child.pid"
    link.assign(1, "shell", {"command": "sleep 30 & echo $! > %s; wait" % pid_file})
    link.expect("task_accept")
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
    child = int(pid_file.read_text())
    watchdog = worker.watchdog_pid()
    assert not process_gone(watchdog)
    assert worker.stop() == 0
    assert wait_until(lambda: process_gone(child))
    assert process_gone(watchdog), "the watchdog outlived a clean exit"
    assert not worker.events("orphans_killed")       # the worker cleaned up itself


# -- self-fencing, progress, the watchdog, task log lines ------------------------

def task_pids(link, path):
    """The pids a shell task wrote to `path` (itself, its group, and its
    child), and the frames read meanwhile: the link is kept alive and its
    lease_checks answered, or a worker a loaded machine stalled would start
    nothing."""
    def written():
        return path.exists() and len(path.read_text().split()) == 2
    frames = link.pump(WAIT, until=written)
    assert written(), frames
    return [int(pid) for pid in path.read_text().split()], frames


def background_task(path):
    return {"command": "sleep 30 & echo $$ $! > %s; wait" % path}


def assert_fenced(worker, frames, *task_ids):
    assert not [f for f in frames if f["message_type"] == "task_result"], frames
    # The worker logs once it has reaped what it killed.
    wait_until(lambda: len(worker.events("task_fenced")) >= len(task_ids))
    fenced = worker.events("task_fenced")
    assert sorted(e["task_id"] for e in fenced) == sorted(task_ids), fenced
    for entry in fenced:
        assert entry["level"] == "warning" and entry["attempt"] == 1
        assert entry["device_id"] == DEVICE_ID and entry["reason"]


@detailed
def test_fencing_while_connected(main, spawn, python, drop_dir):
    worker, link = registered(main, spawn, python, fence_interval=1.5, heartbeat_interval=0.5)
    link.assign(1, "shell", background_task(drop_dir / "pids"))
    pids, frames = task_pids(link, drop_dir / "pids")
    silent_since = link.sent_at            # from here on the main node says nothing
    frames += link.pump(WAIT, keep_alive=False, until=lambda: all(map(process_gone, pids)))
    assert all(map(process_gone, pids)), "the fenced task is still running"
    # After the fence_interval, and long before the task's own end (30 s).
    assert 1.4 < time.monotonic() - silent_since < WAIT
    # Heartbeats tell the main node what was fenced, so the task is not blamed.
    frames += link.pump(WAIT, keep_alive=False, wanted=lambda frames: any(
        f["message_type"] == "heartbeat" and f["data"].get("fenced_tasks") for f in frames))
    assert any(f["data"].get("fenced_tasks") == [{"task_id": 1, "attempt": 1}]
               for f in frames if f["message_type"] == "heartbeat")
    # (A stall of the worker on a loaded machine adds a lease_check.)
    assert [f["message_type"] for f in frames
            if f["message_type"] not in ("heartbeat", "lease_check")] == ["task_accept"]
    assert_fenced(worker, frames, 1)
    assert "no lease renewed" in worker.events("task_fenced")[0]["reason"]
    # The connection is still good, and so is the worker.
    assert link.run("echo", {"message": "after"}, task_id=2)["status"] == "completed"


@detailed
def test_fencing_after_disconnect(main, spawn, python, drop_dir):
    worker, link = registered(main, spawn, python, fence_interval=60, disconnect_fence=1)
    link.assign(1, "shell", background_task(drop_dir / "pids"))
    pids, frames = task_pids(link, drop_dir / "pids")
    frames += link.pump(0.2)
    link.close()
    main.listener.close()                   # and no reconnecting
    lost = time.monotonic()
    assert wait_until(lambda: all(map(process_gone, pids)), timeout=WAIT)
    # After the disconnect_fence, and long before the task's own end (30 s).
    assert 0.8 < time.monotonic() - lost < WAIT
    assert_fenced(worker, frames, 1)
    assert "disconnected" in worker.events("task_fenced")[0]["reason"]


@detailed
def test_fencing_checked_first_after_a_freeze(main, spawn, python, drop_dir):
    worker, link = registered(main, spawn, python, fence_interval=1)
    link.assign(1, "shell", background_task(drop_dir / "pids"))
    pids, frames = task_pids(link, drop_dir / "pids")
    # Ends while the worker is frozen, however long the first took to start.
    link.assign(2, "shell", {"command": "sleep 1"})
    frames += link.pump(WAIT, wanted=lambda more: [
        f["message_type"] for f in frames + more].count("task_accept") == 2)
    assert [f["message_type"] for f in frames].count("task_accept") == 2
    worker.proc.send_signal(signal.SIGSTOP)
    # Our heartbeat_acks wait in the worker's socket: it must not take them as
    # contact before it has looked at the clock.
    frames = link.pump(2.5)
    worker.proc.send_signal(signal.SIGCONT)
    frames += link.pump(WAIT, until=lambda: all(map(process_gone, pids)))
    assert all(map(process_gone, pids))
    frames += link.pump(0.5)
    assert_fenced(worker, frames, 1, 2)


@detailed
def test_progress_lines(main, spawn, python, drop_dir):
    _, link = registered(main, spawn, python)
    # The task goes on only once we have seen its progress: however slow the
    # machine, what the worker sends of it does not depend on when it runs.
    code = ("import os, time\n"
            "def say(line):\n"
            "    print(line, flush=True)\n"
            "def wait_for(path):\n"
            "    while not os.path.exists(path):\n"
            "        time.sleep(0.05)\n"
            "say('PROGRESS 1/4 a\\n'\n"      # sent at once
            "    'PROGRESS 30\\n'\n"         # within 0.5 s: replaced by the next one
            "    'PROGRESS 40%%')\n"         # sent 0.5 s after the first
            "wait_for(%r)\n"
            "say('PROGRESS 75')\n"
            "wait_for(%r)\n"
            "print('done')\n" % (str(drop_dir / "seen 40"), str(drop_dir / "seen 75")))
    link.assign(1, "python_exec", {"code": code})
    progress = []
    for value in (40.0, 75.0):
        frames = link.pump(WAIT, wanted=lambda frames: any(
            f["message_type"] == "task_progress" and f["data"]["progress"] == value
            for f in frames))
        progress += [f["data"] for f in frames if f["message_type"] == "task_progress"]
        (drop_dir / ("seen %g" % value)).touch()
    result = link.results(1)[1]
    assert result["status"] == "completed"
    assert result["result"]["output"] == "done\n"
    progress += link.progress
    assert len(progress) >= 2, progress
    assert progress[0] == {"task_id": 1, "attempt": 1, "progress": 25.0, "message": "a"}
    assert progress[-1]["progress"] == 75.0 and progress[-1]["message"] == ""
    values = [p["progress"] for p in progress]
    assert values == sorted(values) and 30.0 not in values


def kill_worker_and_spawner(worker, watchdog):
    """The worker and its spawner killed as one, its watchdog left: a
    spawner left alive ends the tasks itself, and under load it came first
    and the watchdog found none."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    for child in psutil.Process(worker.proc.pid).children():
        if child.pid != watchdog:
            child.kill()
    worker.proc.kill()
    worker.proc.wait()


@detailed
def test_watchdog_kills_tasks_of_a_killed_worker(main, spawn, python, drop_dir):
    worker, link = registered(main, spawn, python)
    link.assign(1, "shell", background_task(drop_dir / "pids"))
    pids, _ = task_pids(link, drop_dir / "pids")
    uid = psutil.Process(pids[0]).uids().real
    watchdog = worker.watchdog_pid()
    kill_worker_and_spawner(worker, watchdog)
    # Generous: under three test files at a time on two cores, 2 s was not.
    assert wait_until(lambda: all(map(process_gone, pids)), timeout=10)
    assert wait_until(lambda: process_gone(watchdog), timeout=10)
    assert wait_until(lambda: worker.events("orphans_killed"), timeout=10)
    killed = worker.events("orphans_killed")[0]
    if uid != os.geteuid():     # a uid of its own (a root worker's): killed by its uid
        assert killed["uids"] == [uid] and killed["pgids"] == []
    else:
        assert killed["pgids"] == [pids[0]]


def test_log_tasks_logs_every_task_at_info(main, spawn):
    for arguments, expected in (((), 0), (("--log-tasks",), 2)):
        worker, link = registered(main, spawn, sys.executable, "--log-level", "info",
                                  *arguments)
        link.run("echo", {"message": "hi"}, task_id=1)
        worker.stop()           # before it could reconnect to the next accept()
        link.close()
        lines = worker.events("task_started") + worker.events("task_finished")
        assert len(lines) == expected
        for entry in lines:
            assert entry["level"] == "info" and entry["device_id"] == DEVICE_ID
            assert (entry["task_id"], entry["attempt"]) == (1, 1) and entry["time"]


# -- the worker's pure functions, imported ---------------------------------------

@pytest.fixture(scope="module")
def module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_module", WORKER)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.mark.parametrize("line, expected", [
    (b"PROGRESS 42", (42.0, "")), (b"PROGRESS 42.5", (42.5, "")), (b"PROGRESS 42%", (42.0, "")),
    (b"PROGRESS 3/10 some message ", (30.0, "some message")), (b"PROGRESS 150", (100.0, "")),
    (b"PROGRESS -3 x", (0.0, "x")), (b"PROGRESS 1 " + b"m" * 300, (1.0, "m" * 200)),
    (b"PROGRESS 42\r", (42.0, "")),
    (b"PROGRESS", None), (b"PROGRESS report", None), (b"PROGRESS 1/0", None),
    (b"PROGRESS nan", None), (b"PROGRESSIVE 5", None)])
def test_parse_progress(module, line, expected):
    assert module.parse_progress(line) == expected


def test_progress_lines_split_across_reads(module):
    class Worker:
        sent = []

        def tell(self, kind, data):
            self.sent.append(data["progress"])

    task = module.PythonExecTask((1, 1), {}, None)
    chunks = [b"a\nPROG", b"RESS 50 half\nb", b"c\nPROGRESS x\n", b"xPROGRESS 5\n",
              b"PROGRESS 7\nPROGRESS 8\n", b"abc", b"PROGRESS 9\n", b"PROGRESS 60"]
    output = b"".join(task.without_progress(Worker(), chunk) for chunk in chunks)
    assert output == b"a\nbc\nPROGRESS x\nxPROGRESS 5\nabcPROGRESS 9\n"
    assert task.unfinished == b"PROGRESS 60"       # output if no newline ever comes
    assert Worker.sent == [50.0]                   # 8 waits for its 0.5 s
    assert task.progress["progress"] == 8.0
    long_line = b"PROGRESS 1 " + b"x" * 5000
    assert task.without_progress(Worker(), long_line) == b"PROGRESS 60" + long_line


@pytest.mark.parametrize("arguments", [
    [], ["--join", "127.0.0.1:70000", "--token", "t"], ["--join", "h", "--token", "t",
                                                        "--slots", "0"],
    ["--join", "h"], ["--join", "h", "--token", "t", "--allow", "nonsense"],
    ["--join", "h", "--token", "t", "--device-id", "bad id!"]])
def test_bad_arguments_exit_2(arguments):
    env = {k: v for k, v in os.environ.items() if k != "RC_TOKEN"}
    proc = subprocess.run([sys.executable, "-I", "-S", WORKER] + arguments, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=WAIT)
    assert proc.returncode == 2, proc.stderr


def test_token_from_file_and_environment(main, spawn, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen([sys.executable, "-I", "-S", WORKER, "--join",
                             "127.0.0.1:%d" % main.port, "--token-file", str(token_file),
                             "--device-id", DEVICE_ID], stdout=subprocess.DEVNULL)
    try:
        main.accept().handshake()          # the proof checks out with the file's token
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    env = dict(os.environ, RC_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-S", WORKER, "--join", "127.0.0.1:%d" % main.port,
                             "--device-id", DEVICE_ID], env=env, stdout=subprocess.DEVNULL)
    try:
        link = main.accept()
        link.handshake()
        # Tasks must not see the token.
        result = link.run("shell", {"command": "echo ${RC_TOKEN:-unset}"})
        assert result["result"]["output"] == "unset\n"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_self_test():
    proc = subprocess.run([sys.executable, "-I", "-S", WORKER, "--self-test"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"python_eval  completed    ok" in proc.stdout


def test_accepts_wait_a_moment_for_company_before_they_are_sent(module, tmp_path):
    """A short task's accept and result go to the main node in one send (one
    turn and transaction of rc-server, not two): an outbox that holds only
    task_accept frames waits ACCEPT_HOLD, and the loop wakes to send it then;
    anything else goes at once, with the accepts before it."""
    worker = module.Worker(module.parse_args(["--join", "127.0.0.1:1", "--token", "t",
                                              "--state-dir", str(tmp_path)]))
    worker.sock, main_end = socket.socketpair()
    try:
        worker.selector.register(worker.sock, module.selectors.EVENT_READ, lambda mask: None)
        worker.state, worker.last_heard, worker.connect_at = module.READY, time.monotonic(), None
        worker.next_policy_check = time.monotonic() + 60
        main_end.settimeout(0)

        def frames():
            try:
                data = main_end.recv(1 << 20)
            except BlockingIOError:
                return []
            return [json.loads(line)["message_type"] for line in data.splitlines()]
        worker.tell(module.TASK_ACCEPT, {"task_id": 1, "attempt": 1})
        worker.tell(module.TASK_ACCEPT, {"task_id": 2, "attempt": 1})
        worker.flush()
        assert frames() == []
        assert 0 < worker.select_timeout() <= module.ACCEPT_HOLD
        worker.tell(module.TASK_RESULT, {"task_id": 1, "attempt": 1, "status": "completed"})
        worker.flush()
        assert frames() == ["task_accept", "task_accept", "task_result"]
        worker.tell(module.TASK_ACCEPT, {"task_id": 3, "attempt": 1})
        worker.flush()
        assert frames() == []
        time.sleep(module.ACCEPT_HOLD)
        worker.flush()
        assert frames() == ["task_accept"]
    finally:
        worker.sock.close()
        main_end.close()
