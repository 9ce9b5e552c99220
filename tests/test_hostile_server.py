"""Issue 17 against a running main node: what a LAN stranger or a device
holding the join token can throw at rc-server. After each attack every
program keeps its pid and a good worker's tasks still complete
(hostile_harness.unharmed), and the database holds nothing of the attack.
The one deliberate kill (kill -9 rc-server, ten times) must end RUNNING.
"""
import glob
import os
import signal
import socket
import stat
import struct
import time

import orjson
import psutil
import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import assert_completes, readable_by_others, submit_to, unharmed
from rc import audit, protocol, tasks
from test_bad_input import answered_or_closed, connect, error_code, read_frame, register_frame

pytestmark = pytest.mark.e2e

DEVICE_CAP = 12          # max_devices_per_token here, so a flood is quick


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The raw devices here answer no ping and accept nothing: with the default
    # 10 s (suspect_after) a busy machine's slow submits let rc-server take
    # the greedy device's tasks back before the test had counted them.
    cluster = Cluster(tmp_path_factory.mktemp("hostile"), auth_timeout=3.0,
                      max_devices_per_token=DEVICE_CAP, audit_log_max_bytes=4096,
                      audit_refusals_per_minute=30, suspect_after=120.0, accept_timeout=120.0)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("good", "--slots", "2")
    wait_for(lambda: "good" in online(cluster), 30, "the good worker")
    cluster.token = open(cluster.config.token_path).read().strip()
    cluster.secrets = {}
    yield cluster
    # Whatever the attacks did, the state directory stays owner-only.
    assert readable_by_others(cluster.home) == []
    cluster.stop()


def joined(cluster, device_id, **extra):
    """A registered connection (the join token the first time)."""
    sock, nonce = connect(cluster)
    mine = protocol.new_nonce()
    secret = cluster.secrets.get(device_id)
    proof = protocol.worker_proof(secret, nonce, mine, device_id) if secret else None
    sock.sendall(register_frame(cluster, nonce, device_id, proof, mine,
                                auth="device" if secret else "token", **extra))
    ack = read_frame(sock, timeout=5)
    assert ack and ack["message_type"] == "register_ack", ack
    if "device_secret" in ack["data"]:
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     ack["data"]["device_secret"])
    return sock


def count(cluster, sql, *parameters):
    return cluster.db.execute(sql, parameters).fetchone()[0]


def audit_lines(cluster):
    """Every line of the audit log, rotated files first (oldest first)."""
    current = audit.path(cluster.config)
    lines = []
    for path in sorted(glob.glob(current + ".*"), reverse=True) + [current]:
        if os.path.exists(path):
            with open(path, "rb") as f:
                lines += [orjson.loads(line) for line in f if line.strip()]
    return lines


def connect_and_reset(port, send=b""):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.connect(("127.0.0.1", port))
    if send:
        sock.sendall(send)
    sock.close()          # SO_LINGER 0: a reset, as a port scanner leaves


# The start of a TLS ClientHello: the reset then comes in the middle of the handshake.
CLIENT_HELLO_START = bytes.fromhex("16030100c4010000c00303") + bytes(32)


# -- a LAN stranger ------------------------------------------------------------------

def test_connect_then_reset_bursts_before_and_during_tls(cluster):
    with unharmed(cluster, "good"):
        for burst in range(5):
            for n in range(20):
                connect_and_reset(cluster.config.tcp_port, CLIENT_HELLO_START if n % 2 else b"")
            time.sleep(0.2)
        sock, _ = connect(cluster)         # still greeting newcomers
        sock.close()


def test_one_address_cannot_fill_the_unauthenticated_cap(cluster):
    with unharmed(cluster, "good"):
        idle = [socket.create_connection(("127.0.0.1", cluster.config.tcp_port))
                for _ in range(cluster.config.max_unauthenticated_per_address)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", cluster.config.tcp_port), timeout=2)
        assert extra.recv(100) == b""      # closed at once: no TLS yet to say why
        for sock in idle + [extra]:
            sock.close()
        time.sleep(0.3)
        sock, _ = connect(cluster)         # the address's connections are counted down
        sock.close()


def test_refusal_audit_lines_are_rate_limited_and_the_audit_log_rotates(cluster):
    started = time.time()
    with unharmed(cluster, "good"):
        for _ in range(150):
            sock, _ = connect(cluster)
            sock.sendall(protocol.encode("heartbeat", {}))
            assert error_code(answered_or_closed(sock)) == "not_registered"
            sock.close()

        def told():
            """The refusal lines, once they and the counts of those held back add up."""
            lines = [line for line in audit_lines(cluster) if line["time"] >= started
                     and line.get("code") == "not_registered"]
            refusals = [line for line in lines if line["event"] == "connection_refused"]
            counted = len(refusals) + sum(line.get("suppressed", 0) + line.get("count", 0)
                                          for line in lines)
            return refusals if counted == 150 else None
        refusals = wait_for(told, 15, "the held-back refusals to be counted")
    assert len(refusals) <= cluster.config.audit_refusals_per_minute + 10
    directory = cluster.config.log_dir
    rotated = sorted(glob.glob(os.path.join(directory, "audit.log.*")))
    assert rotated and len(rotated) <= audit.BACKUPS
    for path in rotated + [audit.path(cluster.config)]:
        assert os.path.getsize(path) <= cluster.config.audit_log_max_bytes + 1024
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- a device holding the join token ---------------------------------------------------------

OUT_OF_RANGE = [2 ** 63, 2 ** 64 - 1]


@pytest.mark.parametrize("number", OUT_OF_RANGE)
def test_ints_out_of_sqlites_range_in_every_message_type(cluster, number):
    with unharmed(cluster, "good"):
        sock = joined(cluster, "ranger")
        acks = count(cluster, "SELECT count(*) FROM control_acks")
        for kind, data in [
                ("control_ack", {"control_id": number, "ok": True}),
                ("heartbeat", {"system_metrics": {"cpu_percent": number}}),
                ("heartbeat", {"active_tasks": [{"task_id": number, "attempt": 1}]}),
                ("task_accept", {"task_id": 1, "attempt": number}),
                ("task_progress", {"task_id": number, "attempt": 1, "progress": 5}),
                ("task_result", {"task_id": 1, "attempt": 1, "status": "completed",
                                 "result": {"exit_code": number}}),
                ("register", {"device_id": "ranger", "slots": number})]:
            sock.sendall(protocol.encode(kind, data))
            frame = answered_or_closed(sock)
            assert error_code(frame) == "bad_frame", (kind, frame)
            assert str(number) in frame["data"]["message"]
        for kind, data in [("control_ack", {"control_id": -1, "ok": True}),
                           ("task_accept", {"task_id": 0, "attempt": 1})]:
            sock.sendall(protocol.encode(kind, data))
            assert error_code(answered_or_closed(sock)) == "bad_request", kind
        sock.sendall(protocol.encode("heartbeat", {}))
        assert answered_or_closed(sock)["message_type"] == "heartbeat_ack"   # still served
        sock.close()
        fresh, nonce = connect(cluster)
        fresh.sendall(register_frame(cluster, nonce, "ranger-%d" % number, slots=number))
        assert error_code(answered_or_closed(fresh)) == "bad_frame"
    assert count(cluster, "SELECT count(*) FROM control_acks") == acks
    assert count(cluster, "SELECT count(*) FROM task_events WHERE device_id = 'ranger'") == 0
    assert count(cluster, "SELECT count(*) FROM devices WHERE device_id LIKE 'ranger-%'") == 0


def test_junk_metrics_are_cleaned_and_big_profiles_refused(cluster):
    with unharmed(cluster, "good"):
        sock = joined(cluster, "junk")
        sock.sendall(protocol.encode("heartbeat", {"system_metrics": {
            "cpu_percent": "lots", "memory_percent": 40, "system_metrics": "x",
            "load_avg": "high", "nested": {"deep": [1, 2]}}}))
        assert read_frame(sock)["message_type"] == "heartbeat_ack"
        sock.sendall(protocol.encode("heartbeat", {"system_metrics": [1, 2]}))
        assert error_code(answered_or_closed(sock)) == "bad_request"
        sock.close()
        big, nonce = connect(cluster)
        big.sendall(register_frame(cluster, nonce, "bloated",
                                   device_info={"hostname": "x" * 70000}))
        assert error_code(answered_or_closed(big)) == "profile_too_large"
        assert cluster.rc("devices").returncode == 0
    metrics = orjson.loads(cluster.db.execute(
        "SELECT metrics FROM devices WHERE device_id = 'junk'").fetchone()[0])
    assert metrics == {"memory_percent": 40}
    assert count(cluster, "SELECT count(*) FROM devices WHERE device_id = 'bloated'") == 0


def test_a_heartbeat_flood_writes_at_most_one_a_second(cluster):
    """Seen by the device's figures_at, which each heartbeat written sets
    (its history, the heartbeats table, keeps fewer still: one a
    heartbeat_interval). rc-server acks a heartbeat once what it wrote is
    committed, so reading it after each ack misses no turn that wrote: one
    value for all the heartbeats of a turn, written with one time."""
    with unharmed(cluster, "good"):
        sock = joined(cluster, "chatty")
        beat = protocol.encode("heartbeat", {"system_metrics": {"cpu_percent": 1}})
        before = figures_at(cluster, "chatty")
        written = set()
        started = time.monotonic()
        for _ in range(30):
            sock.sendall(beat * 100)
            for _ in range(100):
                assert read_frame(sock, timeout=5)["message_type"] == "heartbeat_ack"
                written.add(figures_at(cluster, "chatty"))
        elapsed = time.monotonic() - started
        sock.close()
    written.discard(before)
    assert len(written) <= elapsed / cluster.config.min_heartbeat_interval + 1, \
        (len(written), elapsed)


def figures_at(cluster, device_id):
    return count(cluster, "SELECT figures_at FROM devices WHERE device_id = ?", device_id)


def test_a_device_claiming_1024_slots_gets_the_operators_cap(cluster):
    with unharmed(cluster, "good"):
        sock = joined(cluster, "greedy", slots=1024, task_types=["shell"])
        cap = cluster.config.max_device_slots
        assert count(cluster, "SELECT slots FROM devices WHERE device_id = 'greedy'") == cap
        # Queued in one batch from this process (one transaction, as rc-web's
        # batches): 24 `rc submit` processes cost 0.3 s to 0.6 s each, and the
        # scheduler sees every task at once, past the cap from the start.
        ids = tasks.submit_many(cluster.db, cluster.config, [
            {"task_type": "shell", "payload": {"command": "true"},
             "requirements": {"device_id": "greedy"}} for _ in range(cap + 8)])

        def assigned():
            return count(cluster, "SELECT count(*) FROM tasks WHERE device_id = 'greedy'"
                         " AND state = 'assigned'")
        wait_for(lambda: assigned() == cap, 30, "the greedy device's slots to fill")
        time.sleep(0.5)
        assert assigned() == cap
        for task_id in ids:
            tasks.cancel(cluster.db, task_id)
        sock.close()


def test_a_device_id_flood_stops_at_the_cap_and_rotating_the_token_starts_again(cluster):
    with unharmed(cluster, "good"):
        written_at = os.stat(cluster.config.token_path).st_mtime
        joined_so_far = count(cluster, "SELECT count(*) FROM devices WHERE registered_at >= ?",
                              written_at)
        for n in range(DEVICE_CAP - joined_so_far):
            joined(cluster, "flood-%d" % n).close()
        sock, nonce = connect(cluster)
        sock.sendall(register_frame(cluster, nonce, "flood-over"))
        frame = answered_or_closed(sock)
        assert error_code(frame) == "too_many_devices", frame
        assert "max_devices_per_token" in frame["data"]["message"]
        assert count(cluster, "SELECT count(*) FROM devices WHERE registered_at >= ?",
                     written_at) == DEVICE_CAP
        joined(cluster, "flood-0").close()      # a joined device still comes back
        cluster.token = cluster.rc("token", "--rotate").stdout.split()[0]
        joined(cluster, "after-rotation").close()
    assert count(cluster, "SELECT count(*) FROM devices WHERE device_id = 'flood-over'") == 0


# -- a program that dies is restarted for ever ---------------------------------------

def status_of(cluster, name):
    """A program's state name as supervisorctl status shows it, asked in
    this process: polled until RUNNING, a supervisorctl each look cost
    ~0.1 s of CPU."""
    return cluster.programs().get(name, ("not configured", 0))[0]


def server_process(cluster):
    """rc-server's pid as soon as supervisord has started it (supervisorctl
    itself takes longer to ask than startsecs lasts)."""
    with open(os.path.join(cluster.config.run_dir, "supervisord.pid")) as f:
        supervisord = psutil.Process(int(f.read()))
    for child in supervisord.children():
        try:
            # /bin/sh bin/rc-server, which execs python -m rc.server
            if any(part.endswith("rc-server") or part == "rc.server"
                   for part in child.cmdline()):
                return child.pid
        except psutil.Error:
            pass
    return None


def kill_and_wait_for_the_next(cluster, pid):
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        new = server_process(cluster)
        if new not in (None, pid):
            return new
        time.sleep(0.01)
    raise AssertionError("rc-server was not started again (%s)" % status_of(cluster,
                                                                          "rc-server"))


def test_kill_9_rc_server_ten_times_and_it_comes_back_running(cluster):
    others = {name: cluster.program_pid(name) for name in ("rc-scheduler", "rc-reaper",
                                                           "rc-web")}
    pid = cluster.program_pid("rc-server")
    # Five deaths before startsecs (supervisord's defaults gave up after four)...
    for _ in range(5):
        pid = kill_and_wait_for_the_next(cluster, pid)
    wait_for(lambda: status_of(cluster, "rc-server") == "RUNNING", 30, "RUNNING")
    # ... and five after it.
    for _ in range(5):
        pid = kill_and_wait_for_the_next(cluster, pid)
        wait_for(lambda: status_of(cluster, "rc-server") == "RUNNING", 30, "RUNNING")
    assert "FATAL" not in cluster.supervisorctl("status")
    assert {name: cluster.program_pid(name) for name in others} == others
    wait_for(lambda: "good" in online(cluster), 60, "the good worker to come back")
    assert_completes(cluster, submit_to(cluster, "good", "echo back"), "back", timeout=60)


# -- the shut-out: last, since it keeps the token's joins out for a minute -------------

def test_a_device_proving_its_own_secret_connects_while_its_address_is_shut_out(cluster):
    with unharmed(cluster, "good"):
        joined(cluster, "loyal").close()           # has its own secret now
        for n in range(cluster.config.auth_failures_per_minute):
            sock, nonce = connect(cluster)
            sock.sendall(register_frame(cluster, nonce, "guess-%d" % n, proof="0" * 64))
            assert error_code(answered_or_closed(sock)) == "auth_failed"
        sock, nonce = connect(cluster)
        sock.sendall(register_frame(cluster, nonce, "newcomer"))     # the right token
        assert error_code(answered_or_closed(sock)) == "shut_out"
        joined(cluster, "loyal").close()           # its own secret still lets it in
    assert count(cluster, "SELECT count(*) FROM devices WHERE device_id LIKE 'guess-%'"
                 " OR device_id = 'newcomer'") == 0
