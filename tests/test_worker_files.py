"""bin/worker.py's files (issue 18): inputs from a per-device cache, stdin,
env, scripts from files, outputs, streams past the inline cap and
checkpoints, moved through a fake rc-files written here.

The fake rc-files is a small real server on 127.0.0.1 (plain or TLS with a
certificate made like rc's) that speaks the framing of the issue 18
contract and checks the device's proof with rc.protocol's own signing, role
"rc-files", under the device secret the fake main node gave the worker.
The worker is the real bin/worker.py, run as on a device (`python -I -S`).
"""
import glob
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time

import pytest

from rc.protocol import _sign, seal, server_proof, worker_proof

from test_worker import (DEVICE_ID, INTERPRETERS, TOKEN, WAIT, WorkerProcess,  # noqa: F401
                         main, short_name, wait_until)

SECRET = "5e" * 32
CLUSTER = "cluster-files"
PYTHON36 = [p for p in INTERPRETERS if "/3.6." in p]
# The file paths on the current interpreter and, when it is there, the oldest one.
also_36 = pytest.mark.parametrize("python", [sys.executable] + PYTHON36, ids=short_name)


def sha(data):
    return hashlib.sha256(data).hexdigest()


# -- the fake rc-files -----------------------------------------------------------

class FakeFiles:
    """rc-files as the contract describes it, with knobs to misbehave:
    `cut_after` ends a get's connection after that many bytes (once),
    `corrupt` serves wrong bytes for these sha256 (every time)."""

    def __init__(self, context=None, secret=SECRET):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.context, self.secret = context, secret
        self.blobs = {}          # sha256 -> bytes the main node holds
        self.gets = []           # (sha256, offset) of every get
        self.partial = {}        # (task, attempt, name, sha) -> bytes so far
        self.stored = {}         # (task, attempt, name) -> bytes
        self.auth_failures = 0
        self.cut_after = None
        self.cut_put_after = None
        self.refuse_puts = None      # an error code every put gets before any byte
        self.haves = []              # "have" answered to each put
        self.whole_put = None        # bytes a put may bring with its request (offered in hello)
        self.wholes = []             # names put whole
        self.pause = 0.0             # seconds between two 64 KiB pieces of a get or put
        self.corrupt = set()
        self.closing = False
        self.sessions = []           # sockets that proved the device, in order
        threading.Thread(target=self.serve, daemon=True).start()

    def add(self, data):
        self.blobs[sha(data)] = data
        return {"sha256": sha(data), "size": len(data)}

    def serve(self):
        while not self.closing:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.connection, args=(sock,), daemon=True).start()

    def connection(self, sock):
        try:
            sock.settimeout(WAIT)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True)
            self.session(sock, sock.makefile("rb"))
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def send(self, sock, message):
        sock.sendall(json.dumps(message).encode() + b"\n")

    def session(self, sock, reader):
        nonce = os.urandom(16).hex()
        hello = {"nonce": nonce, "cluster_id": CLUSTER}
        if self.whole_put:
            hello["whole_put"] = self.whole_put
        self.send(sock, {"hello": hello})
        auth = json.loads(reader.readline(65536))["auth"]
        if auth["proof"] != _sign(self.secret, "rc-files", nonce, auth["nonce"],
                                  auth["device_id"]):
            self.auth_failures += 1
            self.send(sock, {"error": {"code": "auth_failed", "message": "bad proof"}})
            return
        self.send(sock, {"ok": True})
        self.sessions.append(sock)
        while True:
            line = reader.readline(65536)
            if not line:
                return
            request = json.loads(line)
            if "get" in request:
                self.get(sock, **request["get"])
            elif "put" in request:
                self.put(sock, reader, **request["put"])
            else:
                return

    def get(self, sock, sha256, offset):
        self.gets.append((sha256, offset))
        data = self.blobs.get(sha256)
        if data is None:
            self.send(sock, {"error": {"code": "not_yours", "message": "no such file"}})
            return
        if sha256 in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        body = data[offset:]
        self.send(sock, {"ok": True, "size": len(data), "length": len(body)})
        if self.cut_after is not None and len(body) > self.cut_after:
            sock.sendall(body[:self.cut_after])
            self.cut_after = None
            raise OSError("cut, as a Wi-Fi drop would")
        for start in range(0, len(body), 65536) if self.pause else ():
            sock.sendall(body[start:start + 65536])
            time.sleep(self.pause)
        if not self.pause:
            sock.sendall(body)

    def put(self, sock, reader, task_id, attempt, name, size, sha256, whole=False):
        if whole:
            assert size <= self.whole_put, "a whole put over what rc-files offered"
            self.wholes.append(name)
            body = reader.read(size)
        if self.refuse_puts:
            self.send(sock, {"error": {"code": self.refuse_puts, "message": "no room"}})
            return
        key = (task_id, attempt, name, sha256)
        have = self.partial.setdefault(key, bytearray())
        if whole:
            have[:] = body
        else:
            self.haves.append(len(have))
            self.send(sock, {"ok": True, "have": len(have)})
        while len(have) < size:
            chunk = reader.read(min(65536, size - len(have)))
            if not chunk:
                return
            time.sleep(self.pause)
            have += chunk
            if self.cut_put_after is not None and len(have) >= self.cut_put_after:
                self.cut_put_after = None
                raise OSError("cut in the middle of an upload")
        del self.partial[key]
        have = bytes(have)
        if sha(have) != sha256:
            self.send(sock, {"error": {"code": "hash_mismatch",
                                       "message": "expected %s got %s" % (sha256, sha(have))}})
            return
        self.stored[(task_id, attempt, name)] = have
        self.blobs[sha256] = have
        self.send(sock, {"ok": True, "stored": True})

    def hang_up(self):
        """Close every connection, as rc-files does to one idle too long."""
        for sock in self.sessions:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.closing = True
        self.listener.close()


# -- the fake main node, which tells the worker where rc-files is --------------

def handshake(link, files_port):
    """Register the worker with the join token, hand it SECRET, name rc-files."""
    nonce = os.urandom(16).hex()
    link.send("hello", {"nonce": nonce, "protocol": 1, "cluster_id": CLUSTER})
    register = link.expect("register")
    key = SECRET if register["auth"] == "device" else TOKEN     # the secret, once it has it
    assert register["proof"] == worker_proof(key, nonce, register["nonce"], DEVICE_ID)
    ack = {"proof": server_proof(key, nonce, register["nonce"], DEVICE_ID),
           "heartbeat_interval": 60, "files_port": files_port}
    if key == TOKEN:
        ack["device_secret"] = seal(TOKEN, nonce, register["nonce"], DEVICE_ID, SECRET)
    link.send("register_ack", ack)
    link.register = register
    return register


@pytest.fixture
def files():
    server = FakeFiles()
    yield server
    server.close()


@pytest.fixture
def start(main, files, tmp_path):
    """start(*arguments, python=...) -> (worker, link), registered and told files_port."""
    started = []

    def run(*arguments, python=sys.executable, server=main, files_port=None):
        worker = WorkerProcess(python, server.port, str(tmp_path / ("worker%d.log" % len(started))),
                               *arguments)
        started.append(worker)
        link = server.accept()
        handshake(link, files_port or files.port)
        return worker, link

    yield run
    for worker in started:
        worker.stop()


def state_dir(worker):
    return worker.log_path + ".state"


def run(link, task_id, task_type, payload, attempt=1, timeout=30.0, wait=WAIT):
    """The task's result; `wait`: the longest silence of the worker meanwhile."""
    link.assign(task_id, task_type, payload, timeout=timeout, attempt=attempt)
    return link.results(1, wait)[task_id]


def stored_files(result):
    return {entry["name"]: entry for entry in result.get("files", [])}


# -- inputs in, outputs out ------------------------------------------------------

INPUT_A = os.urandom(300 * 1024) + b"end of a"
INPUT_B = b"line one\nline two\n" * 1000
STDIN = b"from stdin\n" * 50

TRANSFORM = ("set -e; mkdir -p out; tr a-z A-Z < data/b.txt > out/b.upper; cat data/a.bin > out/a.copy;"
             " cat > out/stdin.txt; printf '%s|%s|%s|%s' \"$GREETING\" \"$RC_TASK_ID\""
             " \"$RC_ATTEMPT\" \"$RC_CHECKPOINT_DIR\" > out/env.txt; ls -l data/tool.sh > /dev/null;"
             " ./data/tool.sh > out/tool.txt; echo done")


def transform_payload(files):
    a, b, stdin = files.add(INPUT_A), files.add(INPUT_B), files.add(STDIN)
    tool = files.add(b"#!/bin/sh\necho tool ran\n")
    return {"command": TRANSFORM,
            "inputs": [dict(a, path="data/a.bin", mode=0o644),
                       dict(b, path="data/b.txt", mode=0o644),
                       dict(tool, path="data/tool.sh", mode=0o755)],
            "stdin": stdin, "env": {"GREETING": "hello there"}, "outputs": ["out/**"]}


def check_transform(files, result, task_id, attempt=1):
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "done\n"
    got = {name: files.stored[(task_id, attempt, name)] for name in stored_files(result)}
    assert got["out/b.upper"] == INPUT_B.upper()
    assert got["out/a.copy"] == INPUT_A
    assert got["out/stdin.txt"] == STDIN
    assert got["out/tool.txt"] == b"tool ran\n"
    greeting, task, attempt_seen, checkpoint_dir = got["out/env.txt"].decode().split("|")
    assert (greeting, task, attempt_seen) == ("hello there", str(task_id), str(attempt))
    assert checkpoint_dir.endswith("/.rc-checkpoint")
    for name, entry in stored_files(result).items():
        assert entry["sha256"] == sha(got[name]) and entry["size"] == len(got[name])


@also_36
def test_inputs_land_byte_identical_and_outputs_come_back(start, files, python):
    worker, link = start(python=python)
    result = run(link, 1, "shell", transform_payload(files))
    check_transform(files, result, 1)
    assert sorted(stored_files(result)) == ["out/a.copy", "out/b.upper", "out/env.txt",
                                            "out/stdin.txt", "out/tool.txt"]
    assert files.auth_failures == 0


def test_the_same_inputs_twice_are_fetched_once_and_heartbeats_name_them(start, files, main):
    worker, link = start()
    payload = transform_payload(files)
    check_transform(files, run(link, 1, "shell", payload), 1)
    fetched = len(files.gets)
    assert fetched == 4             # a, b, the tool and stdin, once each
    check_transform(files, run(link, 2, "shell", payload), 2)
    assert len(files.gets) == fetched, "a second task with the same inputs fetched again"
    link.send("control", {"control_id": 1, "command": "report_profile"})   # registers again
    again = main.accept()
    handshake(again, files.port)
    heartbeat = again.recv()
    while heartbeat["message_type"] != "heartbeat":      # the results, sent again
        heartbeat = again.recv()
    cached = heartbeat["data"]["cached_files"]
    assert {entry["sha256"] for entry in payload["inputs"]} | {payload["stdin"]["sha256"]} \
        == set(cached)


def test_a_task_that_writes_its_input_in_place_leaves_the_cache_as_it_was(start, files):
    """As root a task runs as a uid of its own: its inputs are its own
    copies (it may change them), the directories and $RC_CHECKPOINT_DIR are
    its to write, the cached blob is untouched. As the worker's own uid an
    input is a read-only hard link to the blob, which the write cannot go through."""
    worker, link = start()
    data = files.add(b"original\n")
    payload = {"command": "id -u > out.uid; echo changed >> data/in.txt; cat data/in.txt > out.txt;"
                          " echo note > data/new.txt && echo kept > \"$RC_CHECKPOINT_DIR/c\" &&"
                          " cat \"$RC_CHECKPOINT_DIR/c\" > out.checkpoint",
               "inputs": [dict(data, path="data/in.txt", mode=0o644)], "outputs": ["out.*"]}
    for task_id in (1, 2):
        result = run(link, task_id, "shell", payload)
        assert result["status"] == "completed", result
        got = {name: files.stored[(task_id, 1, name)] for name in stored_files(result)}
        assert got["out.checkpoint"] == b"kept\n", result
        if os.geteuid() == 0:
            assert int(got["out.uid"]) != 0
            assert got["out.txt"] == b"original\nchanged\n", result   # each task its own copy
        else:
            assert got["out.txt"] == b"original\n"
            assert "Permission denied" in result["result"]["stderr"]
    assert len(files.gets) == 1
    cached = glob.glob(os.path.join(state_dir(worker), "**", data["sha256"]), recursive=True)
    assert cached and all(open(path, "rb").read() == b"original\n" for path in cached)
    assert all(os.stat(path).st_mode & 0o777 == 0o400 for path in cached)


def test_a_cut_transfer_resumes_from_the_last_byte(start, files):
    worker, link = start()
    data = os.urandom(3 * 1024 * 1024 + 17)
    files.cut_after = 1024 * 1024 + 5
    result = run(link, 1, "shell", {"command": "sha256sum big.bin",
                                    "inputs": [dict(files.add(data), path="big.bin")]})
    assert result["status"] == "completed", result
    assert result["result"]["output"].split()[0] == sha(data)
    assert [offset for _, offset in files.gets] == [0, 1024 * 1024 + 5]
    assert worker.events("transfer_cut")


def test_connections_are_kept_between_transfers_and_replaced_once_closed(start, files):
    worker, link = start()
    ref = files.add(b"small input\n")
    result = run(link, 1, "shell", {"command": "cat in.txt > out.txt", "outputs": ["out.txt"],
                                    "inputs": [dict(ref, path="in.txt")]})
    assert result["status"] == "completed", result
    assert files.stored[(1, 1, "out.txt")] == b"small input\n"
    assert len(files.sessions) == 1, "the get and the put shared one connection"
    files.hang_up()
    ref2 = files.add(b"another\n")
    result = run(link, 2, "shell", {"command": "cat in.txt", "inputs": [dict(ref2, path="in.txt")]})
    assert result["status"] == "completed" and result["result"]["output"] == "another\n", result
    assert len(files.sessions) == 2, "a closed kept connection was replaced once"
    assert not worker.events("transfer_cut"), "a kept connection closed by rc-files is no cut"


@also_36
def test_a_small_output_goes_up_with_its_request_when_rc_files_offers_it(start, files, python):
    files.whole_put = 256 * 1024
    worker, link = start(python=python)
    result = run(link, 1, "shell", {"command": "head -c 100000 /dev/urandom > small.bin;"
                                    " head -c 300000 /dev/urandom > large.bin",
                                    "outputs": ["*.bin"]})
    assert result["status"] == "completed", result
    assert files.wholes == ["small.bin"] and files.haves == [0]      # large.bin: have first
    for name, size in (("small.bin", 100000), ("large.bin", 300000)):
        data = files.stored[(1, 1, name)]
        assert len(data) == size and stored_files(result)[name]["sha256"] == sha(data)
    files.refuse_puts = "stale_attempt"
    result = run(link, 2, "shell", {"command": "echo x > x.txt", "outputs": ["x.txt"]})
    assert result["files"] == [] and "rc-files: stale_attempt" in result["result"]["stderr"]
    files.refuse_puts = None
    result = run(link, 3, "shell", {"command": "echo y > y.txt", "outputs": ["y.txt"]})
    assert files.stored[(3, 1, "y.txt")] == b"y\n" and files.wholes[-1] == "y.txt"


@also_36
def test_inputs_of_a_task_waiting_for_a_slot_come_while_the_slot_is_busy(start, files, python,
                                                                          drop_dir):
    worker, link = start("--slots", "1", python=python)
    first, second = files.add(b"first input\n"), files.add(b"second input\n")
    # The first task holds the one slot until we have seen the second's input
    # fetched (not for a time a slow machine may outlast).
    gate = drop_dir / "fetched"
    link.assign(1, "shell", {"command": "while [ ! -e %s ]; do sleep 0.05; done; cat in.txt"
                             % gate, "inputs": [dict(first, path="in.txt")]})
    link.assign(2, "shell", {"command": "cat in.txt", "inputs": [dict(second, path="in.txt")]})
    fetched = wait_until(lambda: (second["sha256"], 0) in files.gets, WAIT)
    gate.touch()
    assert fetched, "the waiting task's input was not fetched while the first task ran"
    results = link.results(2)
    assert results[1]["result"]["output"] == "first input\n"
    assert results[2]["status"] == "completed", results[2]
    assert results[2]["result"]["output"] == "second input\n"
    assert [sha256 for sha256, _ in files.gets].count(second["sha256"]) == 1
    # Cached and placed as it started; a third task with it fetches nothing either.
    result = run(link, 3, "shell", {"command": "cat in.txt", "inputs": [dict(second, path="in.txt")]})
    assert result["result"]["output"] == "second input\n" and len(files.gets) == 2


def test_a_hash_mismatch_is_fetched_once_more_then_fails_naming_both(start, files):
    worker, link = start()
    data = b"the right bytes" * 100
    ref = files.add(data)
    files.corrupt.add(ref["sha256"])
    result = run(link, 1, "shell", {"command": "true", "inputs": [dict(ref, path="x")]})
    assert result["status"] == "failed"
    wrong = sha(data[:-1] + bytes([data[-1] ^ 1]))
    assert ref["sha256"] in result["error"] and wrong in result["error"], result["error"]
    assert len(files.gets) == 2
    files.corrupt.clear()                # the next attempt gets it right, nothing left over
    assert run(link, 1, "shell", {"command": "cat x", "inputs": [dict(ref, path="x")]},
               attempt=2)["result"]["output"] == data.decode()


def test_inputs_that_would_leave_the_task_directory_are_refused(start, files):
    worker, link = start()
    ref = files.add(b"x")
    for number, path in enumerate(["../escape", "/etc/passwd", "a/../../b", ".rc-stdin"], 1):
        result = run(link, number, "shell", {"command": "true",
                                             "inputs": [dict(ref, path=path)]})
        assert result["status"] == "failed" and "relative path" in result["error"], result
    assert files.gets == []


def test_no_room_on_the_device_fails_the_attempt_before_any_byte(start, files):
    worker, link = start()
    ref = {"sha256": "ab" * 32, "size": 1 << 60}
    result = run(link, 1, "shell", {"command": "true", "inputs": [dict(ref, path="huge")]})
    assert result["status"] == "failed"
    assert "not enough disk space on this device" in result["error"], result
    assert files.gets == []


# -- outputs that point outside are refused -------------------------------------

def test_outputs_leading_outside_the_task_directory_are_never_uploaded(start, files):
    worker, link = start()
    assert wait_until(lambda: glob.glob(os.path.join(state_dir(worker), "*", "*.secret")))
    secret = glob.glob(os.path.join(state_dir(worker), "*", "*.secret"))[0]
    command = ("ln -s /etc/passwd passwd; ln -s ../ up; ln -s %s secret.lnk; ln %s secret.hard;"
               " echo fine > good.txt; ln -s good.txt inside.lnk" % (secret, secret))
    result = run(link, 1, "shell", {"command": command, "outputs": ["*", "up/*"]})
    assert result["status"] == "completed", result
    stored = stored_files(result)
    assert sorted(stored) == ["good.txt", "inside.lnk"]
    assert files.stored[(1, 1, "inside.lnk")] == b"fine\n"
    stderr = result["result"]["stderr"]
    # A task of a uid of its own (the worker run as root) cannot even make
    # the hard link: the state dir is not its to read.
    sandboxed = "ln: failed to access" in stderr
    for name in ("passwd", "up", "secret.lnk") + (() if sandboxed else ("secret.hard",)):
        assert "output %r refused" % name in stderr, stderr
    assert not any(SECRET.encode() in data for data in files.stored.values())
    assert not any(b"root:" in data for data in files.stored.values())


# -- streams past the inline cap are kept in full --------------------------------

def test_big_stdout_is_kept_in_full_as_a_file(start, files):
    worker, link = start("--output-cap", "1000")
    code = "import sys\nfor i in range(20000): print('line %05d' % i)\nsys.stderr.write('e' * 5000)"
    result = run(link, 1, "python_exec", {"code": code})
    assert result["status"] == "completed", result
    expected = "".join("line %05d\n" % i for i in range(20000)).encode()
    assert files.stored[(1, 1, ".rc/stdout")] == expected
    assert files.stored[(1, 1, ".rc/stderr")] == b"e" * 5000
    assert result["result"]["truncated"] is True
    assert len(result["result"]["output"]) == 1000
    assert stored_files(result)[".rc/stdout"]["size"] == len(expected)


# -- checkpoints -----------------------------------------------------------------

CHECKPOINTING = r"""
import os, time
d = os.environ["RC_CHECKPOINT_DIR"]
path = os.path.join(d, "state", "count")
n = int(open(path).read()) if os.path.exists(path) else 0
print("from", n)
os.makedirs(os.path.dirname(path), exist_ok=True)
for i in range(n + 1, n + 4):
    with open(path + ".tmp", "w") as f:
        f.write(str(i))
    os.replace(path + ".tmp", path)
    while not os.path.exists(GATE):     # until the test has seen a checkpoint go up
        time.sleep(0.05)
raise SystemExit(1)
"""


@also_36
def test_a_checkpoint_goes_up_and_the_next_attempt_starts_from_it(start, files, python,
                                                                   drop_dir):
    worker, link = start("--checkpoint-every", "0.3", python=python)
    gate = drop_dir / "seen"
    code = CHECKPOINTING.replace("GATE", repr(str(gate)))
    link.assign(1, "python_exec", {"code": code})
    # It runs on once one checkpoint went up while it ran; the last goes at its end.
    assert link.wait_until(lambda: worker.events("checkpoint_sent"))
    gate.touch()
    first = link.results(1)[1]
    assert first["status"] == "failed" and first["result"]["output"] == "from 0\n"
    checkpoint = files.stored[(1, 1, ".rc/checkpoint")]
    assert ".rc/checkpoint" in stored_files(first)
    assert len(worker.events("checkpoint_sent")) >= 2       # while running, and at the end
    fetched = len(files.gets)
    second = run(link, 1, "python_exec", {"code": code,
                                          "checkpoint": files.add(checkpoint)}, attempt=2)
    assert second["result"]["output"] == "from 3\n", second
    assert len(files.gets) == fetched, "the checkpoint it sent was in its own cache"


def test_a_checkpoint_from_elsewhere_is_fetched_and_unpacked_safely(start, files, tmp_path):
    import tarfile
    worker, link = start()
    archive = tmp_path / "c.tar"
    with tarfile.open(str(archive), "w") as out:
        for name, data in (("good/file", b"kept"), ("../evil", b"no"), ("/abs", b"no")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            out.addfile(member, __import__("io").BytesIO(data))
        link_member = tarfile.TarInfo("link")
        link_member.type, link_member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        out.addfile(link_member)
    ref = files.add(archive.read_bytes())
    result = run(link, 1, "shell", {"command": "cd \"$RC_CHECKPOINT_DIR\"; find . | sort;"
                                               " cat good/file", "checkpoint": ref})
    assert result["result"]["output"] == ".\n./good\n./good/file\nkept", result
    assert not os.path.exists(str(tmp_path / "evil"))


# -- scripts from files, on the oldest interpreter too ----------------------------

@also_36
def test_scripts_run_from_input_files(start, files, python):
    worker, link = start(python=python)
    script = files.add(b"import os, sys\nprint('py', os.environ['RC_ATTEMPT'], sys.flags.isolated,"
                       b" sys.stdin.read().strip())\n")
    shell = files.add(b"echo sh $0 $GREETING\n")
    stdin = files.add(b"piped")
    result = run(link, 1, "python_exec", {"file": "job/run.py", "stdin": stdin,
                                          "inputs": [dict(script, path="job/run.py")]})
    assert result["result"]["output"] == "py 1 1 piped\n", result
    result = run(link, 2, "shell", {"file": "go.sh", "env": {"GREETING": "hi"},
                                    "inputs": [dict(shell, path="go.sh")]})
    assert result["status"] == "completed", result
    assert result["result"]["output"].startswith("sh ") and result["result"]["output"].endswith(
        "go.sh hi\n")
    missing = run(link, 3, "shell", {"file": "nothere.sh", "inputs": [dict(shell, path="go.sh")]})
    assert missing["status"] == "failed" and "not one of the task's inputs" in missing["error"]


# -- uploads: resumed after a cut, never claimed unless stored ----------------------

def test_a_cut_upload_resumes_and_a_refused_one_is_not_claimed(start, files):
    worker, link = start()
    files.cut_put_after = 700 * 1024
    result = run(link, 1, "shell", {"command": "head -c 2000000 /dev/urandom > r.bin",
                                    "outputs": ["r.bin"]})
    data = files.stored[(1, 1, "r.bin")]
    assert len(data) == 2000000 and stored_files(result)["r.bin"]["sha256"] == sha(data)
    assert files.haves[0] == 0 and files.haves[-1] >= 700 * 1024     # resumed, not restarted
    files.refuse_puts = "quota"
    result = run(link, 2, "shell", {"command": "echo x > x.txt", "outputs": ["x.txt"]})
    assert result["status"] == "completed" and "files" in result
    assert result["files"] == []
    assert "'x.txt' not uploaded: rc-files: quota" in result["result"]["stderr"]


# -- over TLS, with the worker port's pinned certificate -----------------------------

@also_36
def test_files_move_over_tls_with_the_pinned_certificate(tmp_path, python):
    from test_worker_identity import TlsMain
    server = TlsMain(tmp_path / "home")
    secure = FakeFiles(context=server.context)
    worker = WorkerProcess(python, server.port, str(tmp_path / "w.log"),
                           "--fingerprint", server.fingerprint)
    try:
        link = server.accept()
        handshake(link, secure.port)
        payload = transform_payload(secure)
        check_transform(secure, run(link, 1, "shell", payload), 1)
        assert secure.auth_failures == 0 and len(secure.gets) == 4
    finally:
        worker.stop()
        secure.close()
        server.close()


def test_a_wrong_certificate_on_rc_files_gets_nothing(tmp_path):
    from test_worker_identity import TlsMain
    server = TlsMain(tmp_path / "home")
    other = TlsMain(tmp_path / "other")        # a certificate of its own
    stranger = FakeFiles(context=other.context)
    worker = WorkerProcess(sys.executable, server.port, str(tmp_path / "w.log"),
                           "--fingerprint", server.fingerprint)
    try:
        link = server.accept()
        handshake(link, stranger.port)
        ref = stranger.add(b"data")
        result = run(link, 1, "shell", {"command": "true", "inputs": [dict(ref, path="d")]})
        assert result["status"] == "failed" and "not the pinned" in result["error"], result
        assert stranger.gets == []
    finally:
        worker.stop()
        for fake in (stranger, other, server):
            fake.close()


# -- a task handed back, or a worker stopping, sends its checkpoint first ----------

HOLDING = r"""
import os, time
d = os.environ["RC_CHECKPOINT_DIR"]
with open(os.path.join(d, "progress"), "w") as f:
    f.write("step 7")
print("PROGRESS 50 written", flush=True)
time.sleep(60)
"""


def test_a_handed_back_task_sends_its_checkpoint_before_the_hand_back(start, files, tmp_path):
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"on_unavailable": "hand-back", "policy_interval": 0.2}))
    worker, link = start("--config", str(config))
    link.assign(1, "python_exec", {"code": HOLDING}, timeout=60)
    assert link.expect("task_accept")["task_id"] == 1
    assert link.expect("task_progress")["message"] == "written"
    now = time.localtime()
    window = "%02d:00-%02d:59" % ((now.tm_hour + 23) % 24, (now.tm_hour + 1) % 24)
    config.write_text(json.dumps({"on_unavailable": "hand-back", "policy_interval": 0.2,
                                  "quiet_hours": window}))
    link.send("control", {"control_id": 1, "command": "reload"})
    assert link.expect("control_ack")["ok"]
    result = link.results(1)[1]
    assert result["status"] == "handed_back", result
    assert (1, 1, ".rc/checkpoint") in files.stored, "the checkpoint must be up before"
    assert stored_files(result)[".rc/checkpoint"]["size"] == len(
        files.stored[(1, 1, ".rc/checkpoint")])


def test_a_cancelled_task_sends_its_checkpoint_before_its_result(start, files):
    worker, link = start()
    link.assign(1, "python_exec", {"code": HOLDING}, timeout=60)
    assert link.expect("task_accept")["task_id"] == 1
    assert link.expect("task_progress")["message"] == "written"
    link.send("task_cancel", {"task_id": 1, "attempt": 1})
    result = link.results(1)[1]
    assert result["status"] == "cancelled"
    assert files.stored[(1, 1, ".rc/checkpoint")] and ".rc/checkpoint" in stored_files(result)


def test_a_stopping_worker_sends_running_tasks_checkpoints(start, files):
    worker, link = start()
    link.assign(1, "python_exec", {"code": HOLDING}, timeout=60)
    assert link.expect("task_accept")["task_id"] == 1
    assert link.expect("task_progress")["message"] == "written"
    assert worker.stop() == 0
    assert (1, 1, ".rc/checkpoint") in files.stored
    assert worker.events("checkpoint_sent")


# -- memory: a 256 MiB file in and out ------------------------------------------------

@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_the_worker_moves_256_mib_in_bounded_memory(tmp_path, secure):
    """The bench's bar (issue 18: RSS <= 32 MiB throughout), on 256 MiB in and out."""
    psutil = pytest.importorskip("psutil")
    from test_worker import FakeMain
    from test_worker_identity import TlsMain
    server = TlsMain(tmp_path / "home") if secure else FakeMain()
    fake = FakeFiles(context=server.context if secure else None)
    worker = WorkerProcess(sys.executable, server.port, str(tmp_path / "w.log"),
                           *(("--fingerprint", server.fingerprint) if secure else ()))
    try:
        link = server.accept()
        handshake(link, fake.port)
        ref = fake.add(os.urandom(1024 * 1024) * 256)
        process = psutil.Process(worker.proc.pid)
        peak = [process.memory_info().rss]
        done = []

        def sample():
            while not done:
                try:
                    peak[0] = max(peak[0], process.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.02)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = run(link, 1, "shell", {"command": "cp big.bin out.bin",
                                            "inputs": [dict(ref, path="big.bin")],
                                            "outputs": ["out.bin"]}, timeout=120,
                         wait=120)   # no frame while 256 MiB go in: 15 s was not enough
        finally:
            done.append(True)
            sampler.join()
        assert result["status"] == "completed", result
        assert stored_files(result)["out.bin"]["sha256"] == ref["sha256"]
        print("worker peak RSS (%s) while moving 256 MiB in and 256 MiB out: %.1f MiB"
              % ("TLS" if secure else "plain", peak[0] / 1048576.0))
        assert peak[0] <= 32 * 1048576
    finally:
        worker.stop()
        fake.close()
        server.close()


def test_a_fetch_writes_and_hashes_in_order_and_a_full_disk_stops_both(tmp_path):
    """BlobWriter: the bytes received go to the file and the hash in their
    order, from threads of their own; a write that fails (a full disk)
    stops writing and hashing and comes back to the fetch."""
    import errno
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    chunks = [os.urandom(worker.FILES_BUFFER - n) for n in range(20)]
    digest = hashlib.sha256()
    with open(str(tmp_path / "partial"), "w+b") as f:
        sink = worker.FetchSink(f.fileno(), sum(map(len, chunks)))
        writer = worker.BlobWriter(sink, digest)
        for chunk in chunks:
            buffer = writer.free_buffer()
            buffer[:len(chunk)] = chunk
            writer.write(buffer, len(chunk))
        writer.close()
        assert sink.written == sum(map(len, chunks))
    assert (tmp_path / "partial").read_bytes() == b"".join(chunks)
    assert digest.hexdigest() == sha(b"".join(chunks))

    class FillsUp:
        written = []
        direct = False

        def write(self, view, aligned):
            if len(self.written) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written.append(bytes(view))
    digest = hashlib.sha256()
    writer = worker.BlobWriter(FillsUp(), digest)
    with pytest.raises(OSError) as raised:
        try:            # as FilesConnection.get does
            for chunk in chunks:
                buffer = writer.free_buffer()
                buffer[:len(chunk)] = chunk
                writer.write(buffer, len(chunk))
        finally:
            writer.close()
    assert raised.value.errno == errno.ENOSPC
    assert FillsUp.written == chunks[:3]
    assert digest.hexdigest() == sha(b"".join(chunks[:3])), "the hash covers what was written"
    assert not any(thread.is_alive() for thread in writer.threads)


# -- the cache: least recently used out first, and what --self-test says ----------

def test_the_cache_keeps_its_cap_least_recently_used_out_first(start, files):
    worker, link = start("--cache-mb", "1")
    first, second = (files.add(os.urandom(600 * 1024)) for _ in range(2))
    for number, ref in enumerate((first, second, second, first), 1):
        result = run(link, number, "shell", {"command": "true", "inputs": [dict(ref, path="f")]})
        assert result["status"] == "completed", result
    # the second evicted the first (1 MiB holds one), the third found the second,
    # the fourth fetched the first again
    assert [sha256 for sha256, _ in files.gets] == [first["sha256"], second["sha256"],
                                                     first["sha256"]]
    cached = os.listdir(os.path.join(state_dir(worker), "cache"))
    assert first["sha256"] in cached and second["sha256"] not in cached


@also_36
def test_a_blob_larger_than_the_cache_is_used_then_evicted(start, files, python):
    """A blob over --cache-mb was fetched, used and kept: the cache stayed
    over its cap until the next fetch made room. Now it goes once its task
    ends; one that fits stays."""
    worker, link = start("--cache-mb", "1", python=python)
    big, small = files.add(os.urandom(1536 * 1024)), files.add(os.urandom(300 * 1024))
    cache = os.path.join(state_dir(worker), "cache")
    for number, ref in enumerate((big, small), 1):
        result = run(link, number, "shell", {"command": "wc -c < f",
                                             "inputs": [dict(ref, path="f")]})
        assert result["result"]["output"].strip() == str(ref["size"]), result
        if ref is big:
            assert wait_until(lambda: big["sha256"] not in os.listdir(cache), WAIT), \
                "the blob over the cap is still cached"
    assert os.listdir(cache).count(small["sha256"]) == 1
    assert sum(os.path.getsize(os.path.join(cache, name)) for name in os.listdir(cache)
               if len(name) == 64) <= 1024 * 1024
    assert worker.events("cache_evicted")[0]["sha256"] == big["sha256"]


def test_self_test_says_where_the_cache_is_and_what_it_holds(tmp_path):
    import subprocess
    from test_worker import WORKER
    cache = tmp_path / "state" / "cache"
    cache.mkdir(parents=True)
    (cache / ("ab" * 32)).write_bytes(b"x" * 300000)
    done = subprocess.run([sys.executable, "-I", WORKER, "--self-test", "--state-dir",
                           str(tmp_path / "state"), "--cache-mb", "64"],
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
    report = json.loads(done.stdout[:done.stdout.rindex("}") + 1])["cache"]
    assert report == {"dir": str(cache), "cap_mb": 64, "used_mb": 0.3, "files": 1}


# -- a transfer holds up nothing else ---------------------------------------------

def test_other_tasks_and_controls_go_on_while_a_file_moves(start, files):
    worker, link = start()
    files.pause = 0.05                 # 2 MiB in about 1.6 s
    ref = files.add(os.urandom(2 * 1024 * 1024))
    link.assign(1, "shell", {"command": "true", "inputs": [dict(ref, path="slow.bin")]})
    link.assign(2, "echo", {"message": "meanwhile"})
    link.assign(3, "shell", {"command": "echo also"})
    link.send("control", {"control_id": 7, "command": "reload"})
    order = []
    while len(order) < 4:
        envelope = link.next()
        kind, data = envelope["message_type"], envelope["data"]
        if kind == "task_result":
            order.append(data["task_id"])
        elif kind == "control_ack":
            order.append("control")
    assert order[-1] == 1, order      # the others did not wait for the file
    assert files.gets[0][0] == ref["sha256"]


def test_a_worker_stopped_mid_upload_claims_nothing(start, files):
    worker, link = start()
    files.pause = 0.05
    link.assign(1, "shell", {"command": "head -c 3000000 /dev/urandom > r.bin",
                             "outputs": ["r.bin"]})
    assert link.expect("task_accept")["task_id"] == 1
    assert wait_until(lambda: files.partial, 15)          # the upload is under way
    assert worker.stop() == 0
    assert files.stored == {}
    frames = []
    while True:
        envelope = link.try_recv(1)
        if envelope in (None, "timeout"):
            break
        frames.append(envelope["message_type"])
    assert "task_result" not in frames


def test_a_task_cancelled_while_its_inputs_come_is_cancelled_and_the_fetch_resumes_later(
        start, files):
    worker, link = start()
    files.pause = 0.05
    data = os.urandom(2 * 1024 * 1024)
    ref = files.add(data)
    link.assign(1, "shell", {"command": "true", "inputs": [dict(ref, path="in.bin")]})
    assert link.expect("task_accept")["task_id"] == 1
    # Cancelled once some of the input is on the device (not 0.3 s after the
    # fetch began, which a stalled worker may spend without reading).
    partial = os.path.join(state_dir(worker), "cache", "partial", ref["sha256"])
    assert link.wait_until(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0)
    link.send("task_cancel", {"task_id": 1, "attempt": 1})
    assert link.results(1)[1]["status"] == "cancelled"
    files.pause = 0.0
    result = run(link, 2, "shell", {"command": "sha256sum in.bin",
                                    "inputs": [dict(ref, path="in.bin")]})
    assert result["result"]["output"].split()[0] == sha(data)
    assert files.gets[-1][1] > 0, "the second task resumed what the first had fetched"


def test_a_task_leaving_more_files_than_it_may_send_costs_the_worker_a_walk_not_a_list(
        tmp_path, monkeypatch):
    """find_outputs keeps at most FILES_MAX_MATCHES of a glob's matches
    (and checks only those): a task leaving a million files under
    --output '*' grew the worker's lists by a million entries, and its
    notes by one a file, before the 1,000-output cap applied. Past the
    matches kept, one note says how many more there were."""
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    monkeypatch.setattr(worker, "FILES_MAX_OUTPUTS", 10)
    monkeypatch.setattr(worker, "FILES_MAX_MATCHES", 40)
    for n in range(500):
        (tmp_path / ("f%03d.txt" % n)).write_bytes(b"x")
    checked, real_refusal = [], worker.refusal
    monkeypatch.setattr(worker, "refusal", lambda *a: checked.append(a[1]) or real_refusal(*a))
    found, notes = worker.find_outputs(str(tmp_path), worker.output_globs({"outputs": ["*"]}),
                                       frozenset())
    assert len(found) == 10 and len(checked) == 40
    assert notes[-1] == ("rc-worker: 460 more files matched the outputs' globs past the first"
                         " 40; not uploaded"), notes
    assert len(notes) <= worker.FILES_MAX_NOTES + 1


def test_outputs_found_in_a_listing_are_those_a_walk_finds(tmp_path):
    """upload_here looks for outputs in the listing few_entries made (no
    second read of the directory): the same files, the same refusals, as a
    walk of it finds -- a hard link to a file outside, links leading out,
    a link to a directory, dot files and the worker's own .rc- names."""
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    task, outside = tmp_path / "task", tmp_path / "state"
    task.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (task / "out.bin").write_bytes(b"o")
    (task / ".hidden").write_bytes(b"h")
    (task / ".rc-stdout").write_bytes(b"x")
    (task / worker.CHECKPOINT_DIR).mkdir()
    os.link(str(outside / "secret"), str(task / "linked"))
    os.symlink(str(outside / "secret"), str(task / "escape"))
    os.symlink(str(outside), str(task / "elsewhere"))
    os.symlink("out.bin", str(task / "inside"))
    entries = worker.few_entries(str(task))
    assert entries is not None
    globs = worker.output_globs({"outputs": ["*", ".*"]})
    walked = worker.find_outputs(str(task), globs, frozenset())
    listed = worker.find_outputs(str(task), globs, frozenset(), entries=entries)
    assert listed == walked
    found, notes = listed
    assert sorted(name for name, _, _ in found) == [".hidden", "inside", "out.bin"]
    assert len(notes) == 3 and all("refused" in note for note in notes), notes



def test_hex_names_are_read_as_before_the_set_test():
    """is_hex (every sha256 a task's files name passes it) is a set test now,
    not a generator over the characters: the same answers, to the last code
    point of the Basic Multilingual Plane (none lowers into 0-9a-f)."""
    from test_worker_identity import load_worker_module
    worker = load_worker_module()

    def before(text, length):
        return (isinstance(text, str) and len(text) == length
                and all(c in "0123456789abcdef" for c in text.lower()))
    digest = sha(b"x")
    for text in [digest, digest.upper(), digest[:63], digest + "0", digest[:-1] + "g",
                 digest[:-1] + "\u212a", "", None, b"ab", 64]:
        assert worker.is_hex(text, 64) == before(text, 64), text
    for point in range(0x10000):
        assert worker.is_hex(chr(point), 1) == before(chr(point), 1), hex(point)
    assert worker.is_sha256(digest) and not worker.is_sha256(digest.upper())

@also_36
def test_a_cache_over_a_cap_made_smaller_is_trimmed_at_start(start, files, tmp_path, python):
    """A worker started again with a smaller --cache-mb kept the cache it
    had until the first task with inputs ended. It trims it as it starts,
    least recently used first."""
    cache = tmp_path / "worker0.log.state" / "cache"
    cache.mkdir(parents=True)
    blobs = []
    for age in (300, 200, 100):             # seconds since each was last used
        name = hashlib.sha256(os.urandom(16)).hexdigest()
        (cache / name).write_bytes(os.urandom(600 * 1024))
        used = time.time() - age
        os.utime(str(cache / name), (used, used))
        blobs.append(name)
    worker, link = start("--cache-mb", "1", python=python)
    assert wait_until(lambda: sorted(os.listdir(str(cache))) == [blobs[-1]], WAIT), \
        os.listdir(str(cache))
    assert [event["sha256"] for event in worker.events("cache_evicted")] == blobs[:2]
