"""The bad-input suite: hostile bytes sent to a running main node (the real
supervisord with every program) while a good worker keeps working.

After each case: the server answered or closed within a second, the good
worker's tasks still run, the database holds nothing of it (only the audit
log does), and at the end the server's memory is back where it was.
"""
import json
import os
import select
import ssl
import time
import urllib.error
import urllib.request

import psutil
import pytest

from cluster_harness import Cluster, online, wait_for
from rc import audit, protocol, tasks
from rc.states import MAX_FRAME_BYTES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # 500 idle connections from one address (test_idle_connections_that_never_authenticate),
    # after the others' connections: more than new_connections_per_address's 500 at once
    cluster = Cluster(tmp_path_factory.mktemp("bad"), auth_timeout=2.0,
                      max_unauthenticated_per_address=1000, new_connections_per_address=1000)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("good", "--slots", "2")
    wait_for(lambda: "good" in online(cluster), 30, "the good worker")
    cluster.token = open(cluster.config.token_path).read().strip()
    cluster.secrets = {}         # device id -> the secret it got at its first join
    cluster.server_rss = server_memory(cluster)
    yield cluster
    cluster.stop()


def server_memory(cluster):
    return psutil.Process(cluster.program_pid("rc-server")).memory_info().rss


def connect(cluster):
    sock = cluster.connect(timeout=5)
    hello = read_frame(sock)
    assert hello["message_type"] == "hello"
    return sock, hello["data"]["nonce"]


def read_frame(sock, timeout=1.0):
    """The next frame, or None when the server closed the connection."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def send_while_reading(sock, data, wanted, idle=60.0):
    """Send `data` on `sock` while reading the frames that come back, in
    this one thread, until `wanted` frames have come and `data` is sent,
    or the server hangs up: the frames read, as dicts. A TLS socket
    written by one thread while another reads it (one OpenSSL SSL object)
    breaks now and then; a flood's answers read only after it was sent
    would fill the server's buffers. A write the server refused (it hung
    up) ends the sending, not the reading. AssertionError when nothing
    moves either way for `idle` seconds."""
    view, sent, sending = memoryview(data), 0, True
    inbox, frames, closed = bytearray(), [], False
    timeout = sock.gettimeout()
    sock.setblocking(False)
    still_since = time.monotonic()
    try:
        while not closed and (sending or len(frames) < wanted):
            decrypted = isinstance(sock, ssl.SSLSocket) and sock.pending()
            readable, writable, _ = select.select(
                [sock], [sock] if sending else [], [], 0 if decrypted else 0.5)
            moved = False
            if readable or decrypted:
                try:
                    chunk = sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    chunk = None        # not a whole TLS record yet
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                closed, moved = chunk == b"", bool(chunk)
                inbox += chunk or b""
                while b"\n" in inbox:
                    line, _, rest = bytes(inbox).partition(b"\n")
                    inbox[:] = rest
                    frames.append(json.loads(line))
            if sending and writable:
                try:
                    # After a WantWrite, the same bytes again (as OpenSSL asks).
                    sent += sock.send(view[sent:sent + 65536])
                    moved = True
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except OSError:
                    sending = False     # refused midway: the server hung up
                sending = sending and sent < len(view)
            if moved:
                still_since = time.monotonic()
            assert time.monotonic() - still_since < idle, \
                "nothing sent or received for %g s (%d of %d bytes sent, %d frames read)" % (
                    idle, sent, len(view), len(frames))
    finally:
        if sock.fileno() >= 0:
            sock.settimeout(timeout)
    return frames


def answered_or_closed(sock):
    """Within a second the server says something or hangs up."""
    started = time.monotonic()
    frame = read_frame(sock, timeout=1.0)
    assert time.monotonic() - started < 1.0
    return frame


def register_frame(cluster, nonce, device_id="intruder", proof=None, mine=None, **extra):
    mine = mine or protocol.new_nonce()
    data = {"device_id": device_id, "protocol": 1, "nonce": mine,
            "proof": proof or protocol.worker_proof(cluster.token, nonce, mine, device_id)}
    data.update(extra)
    return protocol.encode("register", data, sender_id=device_id)


def registered(cluster, device_id="intruder"):
    """Joined with the token the first time, with the device's own secret
    after that, as a worker does."""
    sock, nonce = connect(cluster)
    mine = protocol.new_nonce()
    secret = cluster.secrets.get(device_id)
    proof = protocol.worker_proof(secret, nonce, mine, device_id) if secret else None
    sock.sendall(register_frame(cluster, nonce, device_id, proof, mine,
                                auth="device" if secret else "token"))
    ack = read_frame(sock)
    assert ack["message_type"] == "register_ack", ack
    if "device_secret" in ack["data"]:
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     ack["data"]["device_secret"])
    return sock


def still_serving(cluster):
    """The good worker still gets and finishes a task."""
    task_id = tasks.submit(cluster.db, cluster.config, "shell", {"command": "echo ok"},
                           requirements={"device_id": "good"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "completed", 20,
             "the good worker's task")
    return True


def devices_named(cluster, device_id):
    return cluster.db.execute("SELECT count(*) FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()[0]


def error_code(frame):
    return frame and frame["message_type"] == "error" and frame["data"]["code"]


# -- frames --------------------------------------------------------------------

def test_oversized_frame(cluster):
    # Registered: before that a frame is refused at a register's size
    # (test_hostile_s32), while these bytes are still being sent.
    sock = registered(cluster, "oversized")
    sock.sendall(b"x" * (MAX_FRAME_BYTES + 100))
    assert error_code(answered_or_closed(sock)) == "frame_too_large"
    assert still_serving(cluster)


def test_one_byte_at_a_time_and_several_frames_in_one_packet(cluster):
    sock, nonce = connect(cluster)
    for byte in register_frame(cluster, nonce, "trickle"):
        sock.send(bytes([byte]))
    assert read_frame(sock)["message_type"] == "register_ack"
    beat = protocol.encode("heartbeat", {"active_tasks": []})
    sock.sendall(beat * 3)
    assert [read_frame(sock)["message_type"] for _ in range(3)] == ["heartbeat_ack"] * 3
    sock.close()


@pytest.mark.parametrize("name, raw", [
    ("non-utf8", b'{"message_type": "heartbeat", "data": {"x": "\xff\xfe"}}\n'),
    ("deep nesting", b'{"message_type": "heartbeat", "data": {"x": ' + b"[" * 1000
     + b"]" * 1000 + b"}}\n"),
    ("5000-digit integer", b'{"message_type": "heartbeat", "data": {"x": ' + b"9" * 5000
     + b"}}\n"),
    ("NaN", b'{"message_type": "heartbeat", "data": {"x": NaN}}\n'),
    ("Infinity", b'{"message_type": "heartbeat", "data": {"x": Infinity}}\n'),
    ("duplicate keys", b'{"message_type": "heartbeat", "message_type": "register"}\n'),
    ("duplicate keys deep inside", b' {"message_type": "heartbeat", "data": {"m": [{"a": 1,'
     b' "a": 2}]}}\n'),
    ("not an object", b'[1, 2, 3]\n'),
])
def test_malformed_frames_are_refused(cluster, name, raw):
    sock = registered(cluster, "malformed")
    sock.sendall(raw)
    assert error_code(answered_or_closed(sock)) == "bad_frame", name
    assert still_serving(cluster)


def test_metrics_too_deep_to_store(cluster):
    sock = registered(cluster, "deep")
    sock.sendall(b'{"message_type": "heartbeat", "data": {"system_metrics": {"a": '
                 + b"[" * 300 + b"]" * 300 + b"}}}\n")
    assert error_code(answered_or_closed(sock)) == "bad_request"
    assert cluster.db.execute("SELECT metrics FROM devices WHERE device_id = 'deep'"
                              ).fetchone()[0] == "{}"


@pytest.mark.parametrize("name, kind, data", [
    ("wrong types", "heartbeat", {"active_tasks": "all"}),
    ("negative task id", "task_accept", {"task_id": -1, "attempt": 1}),
    ("huge attempt", "task_result", {"task_id": 1, "attempt": 2 ** 40, "status": "completed"}),
    ("unknown status", "task_result", {"task_id": 1, "attempt": 1, "status": "pwned"}),
    ("progress out of range", "task_progress", {"task_id": 1, "attempt": 1, "progress": 1e9}),
    ("negative timeout-like number", "task_progress", {"task_id": 1, "attempt": 1,
                                                       "progress": -5}),
])
def test_invalid_messages_get_an_error_and_change_nothing(cluster, name, kind, data):
    sock = registered(cluster, "invalid")
    before = cluster.db.execute("SELECT count(*) FROM task_events").fetchone()[0]
    sock.sendall(protocol.encode(kind, data))
    assert error_code(answered_or_closed(sock)) == "bad_request", name
    after = cluster.db.execute("SELECT count(*) FROM task_events").fetchone()[0]
    assert before == after
    assert still_serving(cluster)


# -- identity and authentication ---------------------------------------------------

def test_messages_before_authentication(cluster):
    sock, _ = connect(cluster)
    sock.sendall(protocol.encode("task_result", {"task_id": 1, "attempt": 1,
                                                 "status": "completed"}))
    assert error_code(answered_or_closed(sock)) == "not_registered"
    assert read_frame(sock) is None


def test_wrong_and_replayed_proofs(cluster):
    sock, nonce = connect(cluster)
    sock.sendall(register_frame(cluster, nonce, "liar", proof="0" * 64))
    assert error_code(answered_or_closed(sock)) == "auth_failed"
    # A proof made for one connection's nonce is worthless on the next.
    first, first_nonce = connect(cluster)
    captured = register_frame(cluster, first_nonce, "replayer")
    first.close()
    second, _ = connect(cluster)
    second.sendall(captured)
    assert error_code(answered_or_closed(second)) == "auth_failed"
    assert devices_named(cluster, "liar") == devices_named(cluster, "replayer") == 0

    def refusals():
        return [line for line in audit.read(cluster.config)
                if line["event"] == "connection_refused" and line["code"] == "auth_failed"]
    # rc-server writes the audit line after it has answered: wait for it.
    wait_for(lambda: len(refusals()) >= 2, 10, "two auth_failed audit lines")


@pytest.mark.parametrize("device_id", ["a\x00b", "\ud800", "x'; DROP TABLE tasks; --",
                                       "a" * 65, ""])
def test_bad_device_ids(cluster, device_id):
    before = cluster.db.execute("SELECT count(*) FROM devices").fetchone()[0]
    sock, nonce = connect(cluster)
    mine = protocol.new_nonce()
    data = {"device_id": device_id, "protocol": 1, "nonce": mine, "proof": "0" * 64}
    raw = json.dumps({"message_type": "register", "data": data}).encode() + b"\n"
    sock.sendall(raw)
    assert error_code(answered_or_closed(sock)) in ("bad_request", "bad_frame")
    assert cluster.db.execute("SELECT count(*) FROM devices").fetchone()[0] == before


def test_results_for_tasks_not_assigned_to_the_sender(cluster):
    task_id = tasks.submit(cluster.db, cluster.config, "sleep", {"seconds": 2},
                           requirements={"device_id": "good"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 20, "running")
    sock = registered(cluster, "forger")
    sock.sendall(protocol.encode("task_result", {"task_id": task_id, "attempt": 1,
                                                 "status": "completed",
                                                 "result": {"output": "forged"}}))
    codes = {answered_or_closed(sock)["message_type"], answered_or_closed(sock)["message_type"]}
    assert codes == {"task_result_ack", "error"}
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "completed", 20, "done")
    assert tasks.get(cluster.db, task_id)["result"]["output"] == ""
    assert tasks.get(cluster.db, task_id)["device_id"] == "good"


def test_idle_connections_that_never_authenticate(cluster):
    socks = [cluster.connect(timeout=None) for _ in range(500)]
    assert still_serving(cluster)
    deadline = cluster.config.auth_timeout + 3
    for sock in socks:
        sock.settimeout(deadline)
        data = b""
        while True:               # hello, then the auth_timeout error, then closed
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert b"auth_timeout" in data
        sock.close()


# -- the dashboard ---------------------------------------------------------------

def http(cluster, path, data=None, headers=None, method=None):
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (cluster.config.web_port, path),
                                     data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_dashboard_refuses_what_it_must(cluster):
    body = json.dumps({"task_type": "echo", "payload": "x"}).encode()
    count = cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    assert http(cluster, "/api/v1/tasks", body, {"Content-Type": "application/json"})[0] == 401
    assert http(cluster, "/api/v1/status", headers={"Host": "evil.example"})[0] in (400, 403)
    form = http(cluster, "/api/v1/tasks", b"task_type=echo",
                {"Content-Type": "application/x-www-form-urlencoded",
                 "Origin": "http://evil.example"})
    assert form[0] in (401, 403)
    for path in ("/static/../../etc/rc.json", "/static/%2e%2e/%2e%2e/etc/rc.json",
                 "/static/%252e%252e/etc/rc.json", "/static//etc/passwd",
                 "/static/index.html%00.js", "/text/../token"):
        status, content = http(cluster, path)
        assert status in (400, 403, 404), path
        assert cluster.token.encode() not in content
    token = open(cluster.config.admin_token_path).read().strip()
    status, _ = http(cluster, "/api/v1/tasks", b"{" + b" " * (2 * 1024 * 1024) + b"}",
                     {"Content-Type": "application/json", "Authorization": "Bearer " + token})
    assert status == 413
    assert cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == count


def test_script_in_a_device_name_stays_text(cluster):
    sock = registered(cluster, "scripted")
    sock.sendall(protocol.encode("heartbeat", {"active_tasks": []}))
    read_frame(sock)
    status, page = http(cluster, "/text/devices")
    assert status == 200
    cluster.db.execute("UPDATE devices SET hostname = ? WHERE device_id = 'scripted'",
                       ("<img src=x onerror=alert(1)>",))
    status, content = http(cluster, "/api/v1/devices/scripted")
    assert status == 200 and json.loads(content)["hostname"] == "<img src=x onerror=alert(1)>"
    sock.close()


def test_memory_returns_to_where_it_was(cluster):
    time.sleep(1)
    grown = server_memory(cluster) - cluster.server_rss
    assert grown < 20 * 1024 * 1024, "rc-server grew by %d bytes" % grown
    assert os.path.exists(audit.path(cluster.config))
