"""Issue 17, the cheap half: what rc-server, rc-scheduler and rc-reaper do
with hostile values, one piece at a time on real sockets and real SQLite
files (tests/test_hostile_server.py attacks a running main node)."""
import io
import socket
import struct
import threading
import time

import orjson
import pytest

from rc import config as config_module
from rc import audit, commands, db, devices, protocol, reaper, scheduler, state_dir, tasks
from rc.log import Logger
from rc.protocol import ProtocolError
from rc.server import Server
from rc.throttle import Throttle

from test_server import Client, committed, token_of


# -- the wire: numbers SQLite cannot hold ---------------------------------------------

@pytest.mark.parametrize("number", [2 ** 63, 2 ** 64 - 1])
@pytest.mark.parametrize("kind", ["register", "heartbeat", "task_accept", "task_progress",
                                  "task_result", "control_ack"])
def test_an_int_out_of_sqlites_range_anywhere_in_a_frame_is_refused(kind, number):
    for data in ({"control_id": number}, {"task_id": 1, "deep": [{"x": [number]}]}):
        frame = orjson.dumps({"message_type": kind, "data": data})
        with pytest.raises(ProtocolError) as refused:
            protocol.decode(frame)
        assert str(number) in str(refused.value) and "frame.data." in str(refused.value)


def test_numbers_in_range_and_digits_in_text_pass():
    frame = orjson.dumps({"message_type": "heartbeat",
                          "data": {"n": 2 ** 63 - 1, "m": -2 ** 63, "s": "9" * 40}})
    assert protocol.decode(frame)["data"]["n"] == 2 ** 63 - 1


@pytest.mark.parametrize("frame", [
    b'{"message_type":"heartbeat","message_type":"register","data":{}}',
    b'{"message_type":"task_result","data":{"files_inline":[{"size":1,"size":2}]}}',
    b'{"message_type":"task_result","data":{"x":1,"x":1}}'])
def test_a_key_twice_is_refused_in_a_compact_frame_too(frame):
    """decode() leaves out its duplicate-key parse for a frame that is
    exactly what orjson writes of it: a compact one with a key twice is not."""
    with pytest.raises(ProtocolError, match="duplicate key"):
        protocol.decode(frame)
    once = orjson.dumps(orjson.loads(frame))
    assert protocol.decode(once) == orjson.loads(frame)


def test_field_checks_bounds_and_names_the_field():
    assert protocol.field({"slots": 4}, "slots", int, low=0) == 4
    for value in (-1, 2 ** 63):
        with pytest.raises(ProtocolError, match="'slots'"):
            protocol.field({"slots": value}, "slots", int, low=0)
    with pytest.raises(ProtocolError, match="finite"):
        protocol.field({"x": float("nan")}, "x", float)


# -- what a device reports is cleaned before it is stored ------------------------------

def test_junk_metrics_are_cleaned_before_they_are_stored():
    junk = {"cpu_percent": "lots", "memory_percent": True, "disk_percent": 12.5,
            "system_metrics": "x", "load_avg": "high", "nested": {"a": 1},
            "charging": "yes", "battery": {"percent": "full", "charging": True},
            "x" * 100: 1, "note": "n" * 1000}
    junk.update(("extra%d" % n, n) for n in range(100))
    cleaned = devices.clean_metrics(junk)
    assert cleaned["disk_percent"] == 12.5 and cleaned["battery"] == {"charging": True}
    for name in ("cpu_percent", "memory_percent", "system_metrics", "load_avg", "nested",
                 "charging", "x" * 100):
        assert name not in cleaned
    assert len(cleaned["note"]) == 200 and len(cleaned) <= devices.MAX_METRICS
    assert devices.clean_metrics(["not", "an", "object"]) == {}


def test_claimed_slots_are_cut_to_the_operators_cap():
    assert devices.claimed_slots(1024, 16) == 16
    assert devices.claimed_slots(-5, 16) == devices.claimed_slots("8", 16) == 1
    assert devices.claimed_slots(4, 16) == 4


# -- rate limits and the audit log ------------------------------------------------------

def test_throttle_lets_a_burst_through_then_counts_what_it_holds_back():
    now = [0.0]
    limit = Throttle(60, burst=3, clock=lambda: now[0])
    assert [limit.allow("k") for _ in range(5)] == [0, 0, 0, None, None]
    assert limit.allow("other") == 0          # each key on its own
    now[0] += 1.0                             # one line a second comes back
    assert limit.allow("k") == 2
    limit.allow("k")
    now[0] += 1.0
    assert limit.held_back() == [("k", 1)]
    now[0] += 60.0
    assert limit.held_back() == [] and limit.keys == {}     # idle keys forgotten


def test_the_audit_log_rotates_and_keeps_five_backups(tmp_path):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.audit_log_max_bytes = 1000
    for n in range(200):
        audit.record(config, "connection_refused", "unknown", "10.0.0.1:1", n=n)
    log = tmp_path / "log"
    backups = sorted(path.name for path in log.iterdir() if path.name != "audit.log")
    assert backups == ["audit.log.%d" % n for n in range(1, 6)]
    assert all(path.stat().st_size <= 1000 + 200 for path in log.iterdir())
    lines = audit.read(config) or [orjson.loads(line) for line in
                                   (log / "audit.log.1").read_bytes().splitlines()]
    assert lines[-1]["n"] == 199


# -- rc-server: one connection's trouble is its own ------------------------------------

@pytest.fixture(params=["tcp", "tls"])
def server(tmp_path, request):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.auth_timeout = "127.0.0.1", 0, 2.0
    config.tls = request.param == "tls"
    config.device_secrets = False
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io.BytesIO()))
    port = instance.listen()
    instance.turning = threading.Event()       # cleared: the loop waits
    instance.turning.set()
    instance.failed_turns = []                 # what would have reached run()'s defence
    thread = threading.Thread(target=turn_until_stopped, args=(instance,))
    thread.start()
    yield instance, port
    instance.stopping = True
    thread.join()
    instance.database.close()


def turn_until_stopped(instance):
    while not instance.stopping:
        if not instance.turning.is_set():
            time.sleep(0.001)
            continue
        try:
            instance.turn(0.002)
        except Exception as e:
            instance.failed_turns.append(e)


def connect_and_reset(port, send=b""):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.connect(("127.0.0.1", port))
    if send:
        sock.sendall(send)
    sock.close()          # a reset, not a FIN


CLIENT_HELLO_START = bytes.fromhex("16030100c4010000c00303") + bytes(32)


def test_connect_then_reset_bursts_leave_the_server_serving(server):
    instance, port = server
    for burst in range(5):
        for n in range(20):
            connect_and_reset(port, CLIENT_HELLO_START if n % 2 else b"")
        time.sleep(0.05)
    client = Client(port, tls=instance.config.tls)
    assert client.register(token_of(instance))["message_type"] == "register_ack"
    assert instance.failed_turns == []
    assert not instance.unauthenticated and not instance.unauthenticated_by_host


def registered(instance, port, device_id):
    client = Client(port, tls=instance.config.tls)
    assert client.register(token_of(instance), device_id)["message_type"] == "register_ack"
    return client


def test_a_message_the_database_refuses_costs_only_its_sender(server):
    instance, port = server
    good, evil = registered(instance, port, "good"), registered(instance, port, "evil")
    connection = db.connect(instance.config.db_path)
    with db.write(connection):     # a real SQLite error for one device's heartbeats
        connection.execute("CREATE TRIGGER no_evil BEFORE INSERT ON heartbeats"
                           " WHEN NEW.device_id = 'evil' BEGIN SELECT RAISE(ABORT, 'no'); END")
    instance.turning.clear()       # both heartbeats in one turn: one transaction
    time.sleep(0.05)
    evil.send("heartbeat", {"active_tasks": []})
    good.send("heartbeat", {"active_tasks": []})
    time.sleep(0.1)
    instance.turning.set()
    assert good.receive()["message_type"] == "heartbeat_ack"
    refusal = evil.receive()
    assert refusal["message_type"] == "error" and refusal["data"]["code"] == "not_stored"
    assert evil.closed()
    counts = dict(connection.execute("SELECT device_id, count(*) FROM heartbeats GROUP BY 1"))
    assert counts == {"good": 1}
    assert instance.failed_turns == []
    connection.close()


def test_heartbeats_closer_than_the_interval_are_acked_but_not_written(server):
    instance, port = server
    client = registered(instance, port, "chatty")
    # Each heartbeat written sets the device's figures (its history keeps
    # fewer still: one a heartbeat_interval), seen as rc-server's statements.
    figures = []
    instance.database.set_trace_callback(
        lambda statement: figures.append(1) if statement.startswith(
            "UPDATE devices SET metrics") else None)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 1.5:
        client.send("heartbeat", {"active_tasks": [], "system_metrics": {"cpu_percent": 1}})
        assert client.receive()["message_type"] == "heartbeat_ack"
        sent += 1
    instance.database.set_trace_callback(None)
    written = committed(instance, "SELECT count(*) FROM heartbeats")[0][0]
    assert sent > 20 and 1 <= len(figures) <= 2 and written <= 2, (sent, len(figures), written)


def test_first_joins_per_token_stop_at_the_cap_and_a_new_token_starts_again(server):
    instance, port = server
    instance.config.max_devices_per_token = 3
    for n in range(3):
        registered(instance, port, "d%d" % n)
    client = Client(port, tls=instance.config.tls)
    refusal = client.register(token_of(instance), "d3")
    assert refusal["data"]["code"] == "too_many_devices"
    assert "max_devices_per_token" in refusal["data"]["message"]
    assert registered(instance, port, "d0")       # a joined device still comes back
    time.sleep(0.01)
    state_dir.rotate_token(instance.config)
    assert registered(instance, port, "d3")


# -- rc-scheduler and rc-reaper: a hostile row costs that row ---------------------------

LOG = Logger("test", "error", io.BytesIO())


@pytest.fixture
def store(tmp_path):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    yield config, connection
    connection.close()


def add_device(connection, device_id, slots=1):
    data = {"device_info": {"platform": "linux"}, "hardware_specs": {"cpu_cores": 2},
            "task_types": ["shell"], "slots": slots}
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", 1000.0, 1024)


def test_the_scheduler_passes_over_hostile_rows_and_caps_claimed_slots(store):
    config, connection = store
    add_device(connection, "greedy", slots=1024)
    add_device(connection, "junk")
    with db.write(connection):
        connection.execute("UPDATE devices SET task_types = 'not json', metrics = '{'"
                           " WHERE device_id = 'junk'")
        connection.execute("UPDATE devices SET metrics = 'nope', profile = '['"
                           " WHERE device_id = 'greedy'")
    bad = tasks.submit(connection, config, "shell", {"command": "true"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET requirements = '{oops' WHERE task_id = ?", (bad,))
    good = [tasks.submit(connection, config, "shell", {"command": "true"}) for _ in range(40)]
    assigned = scheduler.schedule(connection, time.time() + 1, LOG, config)
    assert assigned == config.max_device_slots == 16
    assert tasks.get(connection, good[0])["device_id"] == "greedy"
    assert connection.execute("SELECT state FROM tasks WHERE task_id = ?",
                              (bad,)).fetchone()[0] == "queued"


def test_the_reaper_rolls_back_a_hostile_row_alone(store):
    config, connection = store
    add_device(connection, "a")
    add_device(connection, "b")
    ids = [tasks.submit(connection, config, "shell", {"command": "true"}) for _ in range(2)]
    scheduler.schedule(connection, 1001.0, LOG, config)
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', started_at = 1001,"
                           " timeout = 10, lease_expires = 1e12")
        # A timeout no program writes: formatting it raises, for this row only.
        connection.execute("UPDATE tasks SET timeout = x'00' WHERE task_id = ?", (ids[0],))
    reaper.sweep(connection, config, LOG, 1001.0 + 10 + config.timeout_grace + 1)
    states = dict(connection.execute("SELECT task_id, state FROM tasks"))
    assert states[ids[1]] == "timed_out"
    assert states[ids[0]] in ("running", "timed_out")


def rc(*argv):
    out, err = io.StringIO(), io.StringIO()
    return commands.run_command(list(argv), out, err), out.getvalue(), err.getvalue()


def test_the_operator_sets_a_devices_slots_whatever_it_claims(cluster_home):
    config, connection = cluster_home
    data = {"slots": 1024, "task_types": ["shell"]}
    with db.write(connection):
        devices.register(connection, "big", data, "127.0.0.1:1", 1.0, config.max_device_slots)
    assert rc("slots", "big") == (0, "big slots: 16 (it claims 1024; max_device_slots"
                                     " allows 16)\n", "")
    assert rc("slots", "big", "64")[0] == 0
    with db.write(connection):        # it reconnects, still claiming 1024
        devices.register(connection, "big", data, "127.0.0.1:1", 2.0, config.max_device_slots)
    assert devices.get(connection, "big")["slots"] == 64
    assert rc("slots", "big", "default")[1].startswith("big slots: 16 ")
    assert rc("slots", "big", "0")[0] == 2 and rc("slots", "big", "-1")[0] == 2
    assert rc("slots", "nobody", "4")[0] == 1
    assert [line["slots"] for line in audit.read(config)
            if line["event"] == "device_slots_set"] == [64, None]


def test_a_frame_sent_a_byte_at_a_time_is_split_once(server, monkeypatch):
    """Each byte (with TLS, each one-byte record) wakes the loop; looking for
    frames in all that came so far on every wake made a trickling device cost
    rc-server a core. Bytes with no end of line are only kept."""
    instance, port = server
    client = registered(instance, port, "trickle")
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    splits = []
    real_split = protocol.split_frames
    monkeypatch.setattr(protocol, "split_frames",
                        lambda buffer, *limit: splits.append(len(buffer))
                        or real_split(buffer, *limit))
    frame = protocol.encode("heartbeat", {"active_tasks": [], "pad": "x" * 200}, sender_id="t")
    for n in range(len(frame)):
        client.send_raw(frame[n:n + 1])
        time.sleep(0.0005)
    assert client.receive()["message_type"] == "heartbeat_ack"
    assert len(splits) <= 2, "split %d times for one frame" % len(splits)
