"""rc-files (lib/rc/transfer.py) as a real process on a real TLS socket:
devices prove their own secret, read only what their tasks read, store only
for the attempt they hold, and cut transfers resume to the right hash with
memory that does not grow with the file."""
import hashlib
import io
import json
import os
import select
import socket
import ssl
import sys
import time

import pytest

from rc import config as config_module
from rc import db, device_secrets, devices, files, protocol, state_dir, tasks, tls, transfer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cluster_harness import on_a_free_port, rc_files_on, wait_for  # noqa: E402

RC_FILES = os.path.join(os.path.dirname(HERE), "bin", "rc-files")
MIB = 1024 * 1024


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Node:
    """A state directory, its database, and rc-files running on it."""

    def __init__(self, home, **settings):
        (home / "rc.json").write_text(json.dumps(dict({"tcp_host": "127.0.0.1",
                                                        "auth_timeout": 2.0}, **settings)))
        self.home = home
        self.log_path = str(home / "rc-files.log")
        self.env = dict(os.environ, RC_HOME=str(home), RC_CONFIG=str(home / "rc.json"))
        self.process = on_a_free_port(self.start)
        self.db = db.connect(self.config.db_path)
        self.key = device_secrets.ensure_key(self.config)
        self.secrets = {}

    def start(self, port):
        self.env["RC_FILES_PORT"] = str(port)
        self.config = config_module.load(environ=self.env)
        state_dir.init(self.config)
        return rc_files_on(port, self.env, self.log_path, RC_FILES)

    def add_device(self, device_id):
        secret = protocol.new_device_secret()
        data = {"device_info": {"hostname": device_id}, "task_types": ["shell"], "slots": 2}
        with db.write(self.db):
            devices.register(self.db, device_id, data, "127.0.0.1:1", time.time())
            devices.set_secret(self.db, device_id,
                               device_secrets.seal(self.key, device_id, secret))
        self.secrets[device_id] = secret
        return secret

    def store(self, data):
        return files.store_stream(self.db, self.config, io.BytesIO(data), len(data))[0]

    def running_task(self, device_id, inputs=(), attempt=1):
        payload = {"command": "true", "outputs": ["**"],     # any name may come back
                   "inputs": [{"path": "in%d" % n, "sha256": digest, "size": size}
                              for n, (digest, size) in enumerate(inputs)]}
        task_id = tasks.submit(self.db, self.config, "shell", payload)
        with db.write(self.db):
            self.db.execute("UPDATE tasks SET state = 'running', device_id = ?, attempt = ?"
                            " WHERE task_id = ?", (device_id, attempt, task_id))
        return task_id

    def rss_peak_kib(self):
        with open("/proc/%d/status" % self.process.pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    def close(self):
        self.process.terminate()
        self.process.wait(10)
        self.db.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = Node(tmp_path_factory.mktemp("files"))
    yield node
    node.close()


class Client:
    """The worker's side of the contract, just enough to test with."""

    def __init__(self, node, device_id, secret=None):
        raw = socket.create_connection(("127.0.0.1", node.config.files_port), 10)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.sock = context.wrap_socket(raw)
        # Pinned, as workers pin the worker port's certificate.
        assert hashlib.sha256(self.sock.getpeercert(True)).hexdigest() == \
            tls.fingerprint(node.config)
        self.reader = self.sock.makefile("rb")
        hello = self.hello = self.line()["hello"]
        nonce = protocol.new_nonce()
        secret = node.secrets[device_id] if secret is None else secret
        self.send({"auth": {"device_id": device_id, "nonce": nonce,
                            "proof": transfer.proof(secret, hello["nonce"], nonce, device_id)}})
        self.welcome = self.line()

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def line(self):
        return json.loads(self.reader.readline())

    def get(self, digest, offset=0, stop_after=None):
        self.send({"get": {"sha256": digest, "offset": offset}})
        answer = self.line()
        if "error" in answer:
            return answer, b""
        want = answer["length"] if stop_after is None else stop_after
        body = bytearray()
        while len(body) < want:
            body += self.reader.read(min(MIB, want - len(body)))
        return answer, bytes(body)

    def put(self, task_id, attempt, name, data, cut=None, digest=None):
        self.send({"put": {"task_id": task_id, "attempt": attempt, "name": name,
                           "size": len(data), "sha256": digest or sha(data)}})
        answer = self.line()
        if "error" in answer:
            return answer, None
        have = answer["have"]
        end = len(data) if cut is None else cut
        for start in range(have, end, MIB):
            self.sock.sendall(data[start:min(end, start + MIB)])
        if cut is not None:
            return answer, None
        return answer, self.line()

    def put_whole(self, task_id, attempt, name, data, digest=None, size=None):
        """A put with its bytes right behind the request; the one answer."""
        request = {"task_id": task_id, "attempt": attempt, "name": name, "whole": True,
                   "size": len(data) if size is None else size, "sha256": digest or sha(data)}
        self.sock.sendall(json.dumps({"put": request}).encode() + b"\n" + data)
        return self.line()

    def close(self):
        self.reader.close()
        self.sock.close()


def test_a_device_proves_its_own_secret(node):
    node.add_device("laptop")
    client = Client(node, "laptop")
    assert client.welcome == {"ok": True}
    client.close()


@pytest.mark.parametrize("device_id, secret, code", [
    ("laptop2", "00" * 32, "auth_failed"),
    ("stranger", "00" * 32, "unknown_device"),
])
def test_a_wrong_proof_or_unknown_device_is_refused(node, device_id, secret, code):
    if device_id == "laptop2":
        node.add_device(device_id)
    client = Client(node, device_id, secret=secret)
    assert client.welcome["error"]["code"] == code
    assert client.reader.readline() == b""       # and the connection is closed
    client.close()


def test_a_revoked_device_cannot_connect(node):
    node.add_device("gone")
    with db.write(node.db):
        devices.revoke(node.db, "gone")
    client = Client(node, "gone")
    assert client.welcome["error"]["code"] == "unknown_device"
    client.close()


def test_get_reads_an_input_and_resumes_from_an_offset(node):
    node.add_device("pi")
    data = os.urandom(5 * MIB + 123)
    digest = node.store(data)
    node.running_task("pi", [(digest, len(data))])
    client = Client(node, "pi")
    answer, first = client.get(digest, stop_after=2 * MIB + 7)
    client.close()        # Wi-Fi dropped mid-transfer
    assert answer == {"ok": True, "size": len(data), "length": len(data)}
    client = Client(node, "pi")
    answer, rest = client.get(digest, offset=len(first))
    assert answer["length"] == len(data) - len(first)
    assert sha(first + rest) == digest
    client.close()


def test_a_device_reads_only_what_its_tasks_read(node):
    node.add_device("pi3")
    node.add_device("other")
    secret_digest = node.store(b"someone else's data")
    node.running_task("other", [(secret_digest, 19)])
    client = Client(node, "pi3")
    answer, _ = client.get(secret_digest)
    assert answer["error"]["code"] == "not_yours"
    answer, _ = client.get("nothex")
    assert answer["error"]["code"] == "bad_request"
    # The connection stays usable after a refusal.
    answer, _ = client.get(secret_digest, offset=-1)
    assert answer["error"]["code"] == "bad_request"
    client.close()


def test_put_stores_an_output_for_the_attempt_held(node):
    node.add_device("nas")
    task_id = node.running_task("nas")
    data = os.urandom(3 * MIB)
    client = Client(node, "nas")
    answer, done = client.put(task_id, 1, "out/result.bin", data)
    assert answer == {"ok": True, "have": 0} and done == {"ok": True, "stored": True}
    entry = files.task_file(node.db, task_id, "out/result.bin")
    assert (entry["kind"], entry["sha256"], entry["size"]) == ("output", sha(data), len(data))
    with open(files.blob_path(node.config, sha(data)), "rb") as f:
        assert f.read() == data
    client.close()


def test_a_cut_put_resumes_from_the_bytes_held(node):
    node.add_device("phone")
    task_id = node.running_task("phone")
    data = os.urandom(4 * MIB + 5)
    client = Client(node, "phone")
    client.put(task_id, 1, "video.mp4", data, cut=2 * MIB + 1)
    client.close()
    assert not files.exists(node.db, sha(data))      # no half blob, no row
    client = Client(node, "phone")
    wait_for(lambda: True, 1, "")
    answer, done = client.put(task_id, 1, "video.mp4", data)
    assert answer["have"] == 2 * MIB + 1
    assert done == {"ok": True, "stored": True}
    assert files.task_file(node.db, task_id, "video.mp4")["sha256"] == sha(data)
    client.close()


def test_a_put_with_the_wrong_hash_names_both(node):
    node.add_device("old")
    task_id = node.running_task("old")
    data = b"what was sent"
    claimed = sha(b"what was meant")
    client = Client(node, "old")
    _, done = client.put(task_id, 1, "x.txt", data, digest=claimed)
    assert done["error"] == {"code": "hash_mismatch",
                             "message": "expected %s got %s" % (claimed, sha(data))}
    assert not files.exists(node.db, sha(data))
    client.close()


def test_puts_are_fenced_by_task_and_attempt(node):
    node.add_device("a")
    node.add_device("b")
    task_id = node.running_task("a", attempt=2)
    client = Client(node, "b")
    answer, _ = client.put(task_id, 2, "x", b"data")
    assert answer["error"]["code"] == "stale_attempt"
    client.close()
    client = Client(node, "a")
    for attempt in (1, 3):
        answer, _ = client.put(task_id, attempt, "x", b"data")
        assert answer["error"]["code"] == "stale_attempt"
    answer, _ = client.put(task_id, 2, "../../etc/passwd", b"data")
    assert answer["error"]["code"] == "bad_name" and ".." in answer["error"]["message"]
    client.close()


def test_a_checkpoint_reaches_the_next_attempt(node):
    node.add_device("tab")
    task_id = node.running_task("tab")
    state = b"tar bytes of the checkpoint"
    client = Client(node, "tab")
    _, done = client.put(task_id, 1, ".rc/checkpoint", state)
    assert done == {"ok": True, "stored": True}
    client.close()
    payload = tasks.get(node.db, task_id)["payload"]
    assert payload["checkpoint"] == {"sha256": sha(state), "size": len(state)}


def test_the_quota_refuses_a_put_before_any_byte(node):
    node.add_device("big")
    task_id = node.running_task("big")
    client = Client(node, "big")
    too_big = node.config.files_quota_mb * MIB + 1
    client.send({"put": {"task_id": task_id, "attempt": 1, "name": "huge", "size": too_big,
                         "sha256": "0" * 64}})
    answer = client.line()
    assert answer["error"]["code"] == "quota"
    assert "files_quota_mb" in answer["error"]["message"]
    client.close()


def test_a_garbage_line_closes_only_that_connection(node):
    node.add_device("bad")
    client = Client(node, "bad")
    client.sock.sendall(b"{not json\n")
    assert json.loads(client.reader.readline())["error"]["code"] == "bad_request"
    assert client.reader.readline() == b""
    client.close()
    client = Client(node, "bad")
    assert client.welcome == {"ok": True}
    client.close()


def test_64_mib_in_and_out_with_bounded_memory(node):
    node.add_device("pi4")
    task_id = node.running_task("pi4")
    before = node.rss_peak_kib()
    data = os.urandom(64 * MIB)
    client = Client(node, "pi4")
    _, done = client.put(task_id, 1, "big.bin", data)
    assert done == {"ok": True, "stored": True}
    with db.write(node.db):
        files.attach_inputs(node.db, task_id, {"inputs": [
            {"path": "again.bin", "sha256": sha(data), "size": len(data)}]}, time.time())
    answer, back = client.get(sha(data))
    assert answer["size"] == len(data) and sha(back) == sha(data)
    client.close()
    grown = node.rss_peak_kib() - before
    assert grown < 16 * 1024, "rc-files peak RSS grew by %d KiB moving 64 MiB" % grown


def test_a_slow_stranger_is_cut_at_the_auth_timeout(node):
    raw = socket.create_connection(("127.0.0.1", node.config.files_port), 10)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = context.wrap_socket(raw)
    sock.settimeout(10)
    reader = sock.makefile("rb")
    reader.readline()
    started = time.monotonic()
    with pytest.raises(OSError):
        # A byte every 0.25 s, well within the per-read timeout, never a whole line.
        for _ in range(40):
            sock.sendall(b"{")
            time.sleep(0.25)
            if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                raise OSError("closed")
    assert 1.5 < time.monotonic() - started < 6
    sock.close()


def test_one_device_holds_a_bounded_number_of_connections(node):
    node.add_device("greedy")
    held = [Client(node, "greedy") for _ in range(transfer.MAX_PER_DEVICE)]
    assert all(client.welcome == {"ok": True} for client in held)
    extra = Client(node, "greedy")
    assert extra.welcome["error"]["code"] == "too_many_connections"
    extra.close()
    held.pop().close()
    wait_for(lambda: Client(node, "greedy").welcome == {"ok": True}, 10,
             "a connection to free up")
    for client in held:
        client.close()


def test_a_checkpoint_arriving_just_after_a_take_back_still_counts(node):
    """`rc drain --now` (or a lost lease) requeues the task first; the
    worker's last checkpoint of that attempt is kept while no later attempt
    has started, and refused once one has."""
    node.add_device("drained")
    node.add_device("next")
    task_id = node.running_task("drained")
    with db.write(node.db):
        row = node.db.execute("SELECT %s FROM tasks WHERE task_id = ?" % tasks.LEASE_COLUMNS,
                              (task_id,)).fetchone()
        assert tasks.take_back(node.db, row, "drained --now", time.time(), node.config,
                               charged=False)
    client = Client(node, "drained")
    _, done = client.put(task_id, 1, ".rc/checkpoint", b"late but in time")
    assert done == {"ok": True, "stored": True}
    assert tasks.get(node.db, task_id)["payload"]["checkpoint"]["sha256"] == \
        sha(b"late but in time")
    answer, _ = client.put(task_id, 1, "out.txt", b"an output is not a checkpoint")
    assert answer["error"]["code"] == "stale_attempt"
    with db.write(node.db):
        node.db.execute("UPDATE tasks SET state = 'assigned', device_id = 'next'"
                        " WHERE task_id = ?", (task_id,))
    answer, _ = client.put(task_id, 1, ".rc/checkpoint", b"too late now")
    assert answer["error"]["code"] == "stale_attempt"
    assert tasks.get(node.db, task_id)["payload"]["checkpoint"]["sha256"] == \
        sha(b"late but in time")
    client.close()


def test_a_small_put_comes_with_its_request_and_gets_one_answer(node):
    node.add_device("watch")
    task_id = node.running_task("watch")
    data = os.urandom(100 * 1024)
    client = Client(node, "watch")
    assert client.hello["whole_put"] == transfer.WHOLE_PUT_BYTES
    assert client.put_whole(task_id, 1, "out.bin", data) == {"ok": True, "stored": True}
    entry = files.task_file(node.db, task_id, "out.bin")
    assert (entry["sha256"], entry["size"]) == (sha(data), len(data))
    # The same bytes again, for another name: held already, its bytes read and dropped.
    assert client.put_whole(task_id, 1, "copy.bin", data) == {"ok": True, "stored": True}
    assert files.task_file(node.db, task_id, "copy.bin")["sha256"] == sha(data)
    client.close()


def test_a_refused_small_put_leaves_the_connection_in_step(node):
    node.add_device("clock")
    node.add_device("thief")
    task_id = node.running_task("clock")
    data = os.urandom(50 * 1024)
    client = Client(node, "thief")
    assert client.put_whole(task_id, 1, "out.bin", data)["error"]["code"] == "stale_attempt"
    wrong = client.put_whole(task_id, 1, "out.bin", data, digest=sha(b"other"))
    assert wrong["error"]["code"] == "stale_attempt"
    client.close()
    client = Client(node, "clock")
    wrong = client.put_whole(task_id, 1, "out.bin", data, digest=sha(b"other"))
    assert wrong["error"]["code"] == "hash_mismatch" and sha(data) in wrong["error"]["message"]
    # Each refusal read the bytes that came with it: the next request is understood.
    assert client.put_whole(task_id, 1, "out.bin", data) == {"ok": True, "stored": True}
    assert not files.exists(node.db, sha(b"other"))
    client.close()


def test_a_whole_put_over_the_limit_or_with_a_bad_name_closes_the_connection(node):
    node.add_device("lamp")
    task_id = node.running_task("lamp")
    client = Client(node, "lamp")
    answer = client.put_whole(task_id, 1, "big.bin", b"", digest="0" * 64,
                              size=transfer.WHOLE_PUT_BYTES + 1)
    assert answer["error"]["code"] == "bad_request" and "whole put" in answer["error"]["message"]
    assert client.reader.readline() == b""       # its bytes cannot be told from a request
    client.close()
    client = Client(node, "lamp")
    answer = client.put_whole(task_id, 1, "../escape", b"12345")
    assert answer["error"]["code"] == "bad_name"
    assert client.reader.readline() == b""
    client.close()
