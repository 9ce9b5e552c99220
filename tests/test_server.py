"""rc-server on a real socket: the handshake, fencing, and bad input.

The server runs in a thread of the test; the client speaks the protocol by
hand so that it can also say what a real worker never would."""
import hashlib
import io
import json
import os
import socket
import ssl
import threading
import time

import pytest

from cluster_harness import wait_for
from rc import config as config_module
from rc import server as server_module
from rc import audit, bell, db, device_secrets, devices, files, fleet, protocol, scheduler
from rc import state_dir, tasks, throttle
from rc import tls
from rc.log import Logger
from rc.server import Server
from rc.states import MAX_FRAME_BYTES


@pytest.fixture(params=["tcp"])
def server(tmp_path, request):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.auth_timeout = "127.0.0.1", 0, 1.0
    config.tls = request.param == "tls"
    # These clients reconnect a device id with the join token, as a worker
    # without a state directory would; the device-secret test turns this on.
    config.device_secrets = False
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io.BytesIO()))
    port = instance.listen()
    thread = threading.Thread(target=lambda: [instance.turn(0.002)
                                              for _ in iter(lambda: instance.stopping, True)])
    thread.start()
    yield instance, port
    instance.stopping = True
    thread.join()
    instance.database.close()


class Client:
    def __init__(self, port, tls=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls:
            # As the worker does: no certificate authority, the fingerprint pinned.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock)
            self.fingerprint = hashlib.sha256(self.sock.getpeercert(binary_form=True)).hexdigest()
        self.buffer = b""

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, message_type, data):
        self.send_raw(protocol.encode(message_type, data, sender_id="t"))

    def receive(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def closed(self):
        try:
            while True:
                self.receive()
        except (EOFError, ConnectionResetError):
            return True

    def register(self, token, device_id="dev1", **extra):
        hello = self.receive()
        assert hello["message_type"] == "hello"
        nonce = protocol.new_nonce()
        data = {"device_id": device_id, "protocol": 1, "nonce": nonce,
                "proof": protocol.worker_proof(token, hello["data"]["nonce"], nonce, device_id),
                "device_info": {"platform": "linux"}, "hardware_specs": {"cpu_cores": 2},
                "task_types": ["echo"], "slots": 2}
        data.update(extra)
        self.send("register", data)
        reply = self.receive()
        if reply["message_type"] == "register_ack":
            assert reply["data"]["proof"] == protocol.server_proof(
                token, hello["data"]["nonce"], nonce, device_id)
            if "device_secret" in reply["data"]:
                self.secret = protocol.unseal(token, hello["data"]["nonce"], nonce, device_id,
                                              reply["data"]["device_secret"])
        return reply


def token_of(instance):
    return state_dir.read_secret(instance.config.token_path)


def committed(instance, sql, *parameters):
    """The rows of a query, read on the test's own connection to the
    server's database as another program would read them: instance.database
    is the server loop's, in its thread, and a read on it in the middle of
    the loop's transaction sees rows not yet committed, or interleaves with
    its statements."""
    connection = db.connect(instance.config.db_path)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def test_register_proves_both_ways_and_records_the_device(server):
    instance, port = server
    client = Client(port)
    assert client.register(token_of(instance))["message_type"] == "register_ack"
    row = committed(instance, "SELECT connected, status FROM devices")[0]
    assert tuple(row) == (1, "online")


def test_wrong_token_is_refused_and_nothing_recorded(server):
    instance, port = server
    client = Client(port)
    reply = client.register("not-the-token")
    assert reply["data"]["code"] == "auth_failed"
    assert client.closed()
    assert committed(instance, "SELECT count(*) FROM devices")[0][0] == 0


def test_messages_before_register_close_the_connection(server):
    instance, port = server
    client = Client(port)
    client.receive()
    client.send("heartbeat", {})
    assert client.receive()["data"]["code"] == "not_registered"
    assert client.closed()


def test_silent_connections_are_dropped(server):
    instance, port = server
    client = Client(port)
    client.receive()
    assert client.receive()["data"]["code"] == "auth_timeout"


def test_bad_frames_get_errors_and_others_keep_being_served(server):
    instance, port = server
    token = token_of(instance)
    bad, good = Client(port), Client(port)
    bad.register(token, "bad")
    good.register(token, "good")
    bad.send_raw(b"this is not json\n")
    assert bad.receive()["data"]["code"] == "bad_frame"
    bad.send("launch_missiles", {})
    assert bad.receive()["data"]["code"] == "unknown_message"
    bad.send("heartbeat", {"active_tasks": "lots"})
    assert bad.receive()["data"]["code"] == "bad_request"
    bad.send_raw(b"x" * (MAX_FRAME_BYTES + 10))
    assert bad.receive()["data"]["code"] == "frame_too_large"
    assert bad.closed()
    good.send("heartbeat", {"system_metrics": {"cpu_percent": 5}, "active_tasks": []})
    assert good.receive()["message_type"] == "heartbeat_ack"


def test_assignment_is_pushed_and_result_committed_before_ack(server):
    instance, port = server
    client = Client(port)
    client.register(token_of(instance))
    config = instance.config
    connection = db.connect(config.db_path)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='dev1'")
    assign = client.receive()
    assert assign["message_type"] == "task_assign"
    assert assign["data"]["payload"] == {"message": "hi"}
    key = {"task_id": task_id, "attempt": 1}
    client.send("task_accept", key)
    client.send("task_result", dict(key, status="completed", result={"output": "hi"}))
    ack = client.receive()
    assert ack["message_type"] == "task_result_ack"
    # The ack came after the commit: the result is there to read now.
    assert tasks.get(connection, task_id)["state"] == "completed"
    connection.close()


def assign_next(connection, config, task_id, ring=True):
    """Play rc-scheduler: give the task to dev1 and ring rc-server's bell."""
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='dev1'"
                           " WHERE task_id = ?", (task_id,))
    if ring:
        bell.ring(config.run_dir, bell.SERVER)


def echo_sent_to_dev1(instance, port):
    """A client registered as dev1, sent an echo task: the client, a
    database connection and the task's id."""
    client = Client(port)
    client.register(token_of(instance))
    connection = db.connect(instance.config.db_path)
    task_id = tasks.submit(connection, instance.config, "echo", {"message": "hi"})
    assign_next(connection, instance.config, task_id)
    assert client.receive()["data"]["task_id"] == task_id
    return client, connection, task_id


def send_completed(client, task_id):
    client.send("task_result", {"task_id": task_id, "attempt": 1, "status": "completed",
                                "result": {"output": "hi"}})


def test_a_lone_result_ack_rides_with_the_next_assignment(server, monkeypatch):
    """The worker keeps a result until its ack comes and waits for nothing
    else: the ack goes with the next frame to that device (here the next
    task), so a worker given one task after another wakes once per task."""
    monkeypatch.setattr(server_module, "RESULT_ACK_DELAY", 30.0)
    instance, port = server
    config = instance.config
    client, connection, first = echo_sent_to_dev1(instance, port)
    second = tasks.submit(connection, config, "echo", {"message": "two"})
    send_completed(client, first)
    wait_for(lambda: tasks.get(connection, first)["state"] == "completed", 5, "stored")
    client.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        client.receive()                 # the ack waits ...
    client.sock.settimeout(5)
    assign_next(connection, config, second)
    ack, assign = client.receive(), client.receive()     # ... for the next task
    assert (ack["message_type"], ack["data"]) == ("task_result_ack",
                                                  {"task_id": first, "attempt": 1})
    assert (assign["message_type"], assign["data"]["task_id"]) == ("task_assign", second)
    connection.close()


def test_a_lone_result_ack_goes_within_its_delay_when_nothing_follows(server, monkeypatch):
    monkeypatch.setattr(server_module, "RESULT_ACK_DELAY", 0.2)
    client, connection, task_id = echo_sent_to_dev1(*server)
    send_completed(client, task_id)
    ack = client.receive()          # the socket gives up after 5 s
    assert (ack["message_type"], ack["data"]) == ("task_result_ack",
                                                  {"task_id": task_id, "attempt": 1})
    connection.close()


def test_a_lone_completed_result_costs_rc_server_one_statement(server, monkeypatch):
    """A turn that brought only a completed result runs its UPDATE and no
    look for other programs' changes: those are looked for when the
    doorbell rings, or once per poll_interval (here pushed out of the way)."""
    monkeypatch.setattr(server_module, "FULL_SCAN_INTERVAL", 3600.0)
    instance, port = server
    client, connection, task_id = echo_sent_to_dev1(instance, port)
    instance.config.poll_interval = 3600.0
    client.send("heartbeat", {"active_tasks": [{"task_id": task_id, "attempt": 1}]})
    assert client.receive()["message_type"] == "heartbeat_ack"    # its first frame: answering
    # And the once-a-second sweep (liveness, watches), which a slow machine's
    # window here would otherwise take in now and then (make test, 2026-12-06).
    instance.next_sweep = time.monotonic() + 3600.0
    statements = []
    instance.database.set_trace_callback(statements.append)
    send_completed(client, task_id)
    wait_for(lambda: tasks.get(connection, task_id)["state"] == "completed", 5, "stored")
    time.sleep(0.1)
    instance.database.set_trace_callback(None)
    # (The trace repeats a statement for each trigger it fires.)
    assert statements and set(statements) == {statements[0]}, statements
    assert statements[0].startswith("UPDATE tasks SET state = 'completed'")
    connection.close()


def test_the_schedulers_ring_costs_rc_server_one_statement(server, monkeypatch):
    """rc-scheduler rings rc-server's assignment bell after it commits: the
    assignment goes out after one statement that reads it (no data_version
    look on the task's way); the next look, at poll_interval, sees the change
    and sends nothing twice."""
    monkeypatch.setattr(server_module, "FULL_SCAN_INTERVAL", 3600.0)
    instance, port = server
    config = instance.config
    client, connection, first = echo_sent_to_dev1(instance, port)
    config.poll_interval = 3600.0
    time.sleep(0.1)             # the turns after the first assignment are over
    second = tasks.submit(connection, config, "echo", {"message": "two"})
    instance.next_sweep = time.monotonic() + 3600.0     # as in the test above
    statements = []
    instance.database.set_trace_callback(statements.append)
    assign_next(connection, config, second, ring=False)
    bell.ring(config.run_dir, bell.SERVER_ASSIGNED)
    assert client.receive()["data"]["task_id"] == second
    time.sleep(0.1)
    instance.database.set_trace_callback(None)
    assert len(statements) == 1 and statements[0].startswith(
        "SELECT task_id, attempt, device_id, state"), statements
    config.poll_interval = 0.05              # the next look: data_version moved
    time.sleep(0.3)
    client.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        client.receive()                      # nothing sent twice
    connection.close()


def running_on_dev1(instance, port):
    """A client registered as dev1, running a task it was sent; the connection
    and task id, and a database connection to play the other programs."""
    client = Client(port)
    client.register(token_of(instance))
    connection = db.connect(instance.config.db_path)
    task_id = tasks.submit(connection, instance.config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='dev1'")
    assert client.receive()["message_type"] == "task_assign"
    client.send("task_accept", {"task_id": task_id, "attempt": 1})
    wait_for(lambda: tasks.get(connection, task_id)["state"] == "running", 5, "accepted")
    return client, task_id, connection


def test_assignments_and_cancels_go_out_on_each_change(server, monkeypatch):
    """Not only at the full read of every active attempt, pushed out of the way here."""
    monkeypatch.setattr(server_module, "FULL_SCAN_INTERVAL", 3600.0)
    instance, port = server
    client, task_id, connection = running_on_dev1(instance, port)
    assert tasks.cancel(connection, task_id) == "running"
    cancel = client.receive()
    assert cancel["message_type"] == "task_cancel"
    assert cancel["data"] == {"task_id": task_id, "attempt": 1}
    connection.close()


def test_an_attempt_taken_back_elsewhere_is_stopped_on_its_device(server):
    """Another program takes the attempt back (as the reaper does when a
    lease runs out); the device hears task_cancel at the next full read of
    the active attempts (a second), not at its next heartbeat (a minute):
    the client's socket gives up after 5 s."""
    instance, port = server
    client, task_id, connection = running_on_dev1(instance, port)
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='queued', device_id=NULL, attempt=2"
                           " WHERE task_id = ?", (task_id,))
    cancel = client.receive()
    assert cancel["message_type"] == "task_cancel"
    assert cancel["data"] == {"task_id": task_id, "attempt": 1}
    connection.close()


def test_result_for_a_task_not_assigned_to_the_worker_changes_nothing(server):
    instance, port = server
    token = token_of(instance)
    owner, intruder = Client(port), Client(port)
    owner.register(token, "owner")
    intruder.register(token, "intruder")
    config = instance.config
    connection = db.connect(config.db_path)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='assigned', device_id='owner'")
    intruder.send("task_result", {"task_id": task_id, "attempt": 1, "status": "completed",
                                  "result": {"output": "forged"}})
    replies = [intruder.receive(), intruder.receive()]
    assert {r["message_type"] for r in replies} == {"task_result_ack", "error"}
    assert any(r["data"].get("code") == "stale_result" for r in replies)
    assert tasks.get(connection, task_id)["state"] == "assigned"
    connection.close()


def test_a_lost_running_task_is_retried_when_the_worker_no_longer_has_it(server):
    instance, port = server
    client = Client(port)
    client.register(token_of(instance))
    config = instance.config
    connection = db.connect(config.db_path)
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='running', device_id='dev1'")
    client.send("heartbeat", {"active_tasks": []})
    assert client.receive()["message_type"] == "heartbeat_ack"
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"]) == ("queued", 2)
    connection.close()


def test_disconnect_is_recorded(server):
    instance, port = server
    client = Client(port)
    client.register(token_of(instance))
    client.sock.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        if committed(instance, "SELECT connected FROM devices")[0][0] == 0:
            break
        time.sleep(0.01)
    assert committed(instance, "SELECT connected FROM devices")[0][0] == 0


def test_thousands_of_idle_connections_in_one_process(server):
    instance, port = server
    # One address, one token: lift the limits a fleet behind one address needs.
    instance.config.max_unauthenticated_per_address = 2000
    instance.config.max_devices_per_token = 2000
    instance.new_connections = throttle.NewConnections(0)     # new_connections_per_address
    token = token_of(instance)
    clients = []
    for n in range(2000):
        client = Client(port)
        hello = client.receive()
        nonce = protocol.new_nonce()
        device_id = "d%d" % n
        client.send("register", {
            "device_id": device_id, "protocol": 1, "nonce": nonce,
            "proof": protocol.worker_proof(token, hello["data"]["nonce"], nonce, device_id)})
        clients.append(client)
    assert all(c.receive()["message_type"] == "register_ack" for c in clients)
    connected = committed(instance, "SELECT count(*) FROM devices WHERE connected = 1")[0][0]
    assert connected == 2000
    clients[1234].send("heartbeat", {"active_tasks": []})
    assert clients[1234].receive()["message_type"] == "heartbeat_ack"
    for c in clients:
        c.sock.close()


def test_tasks_a_worker_fenced_itself_are_retried_without_charge(server):
    instance, port = server
    config = instance.config
    connection = db.connect(config.db_path)
    first = Client(port)
    first.register(token_of(instance))
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='running', device_id='dev1'")
    first.sock.close()
    again = Client(port)
    assert again.register(token_of(instance), fenced_tasks=[
        {"task_id": task_id, "attempt": 1}])["message_type"] == "register_ack"
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["retries_used"]) == ("queued", 2, 0)
    assert "fenced by dev1" in task["reason"]
    connection.close()


def test_an_unavailable_device_hands_back_without_charge_and_gets_nothing(server):
    instance, port = server
    config = instance.config
    connection = db.connect(config.db_path)
    client = Client(port)
    client.register(token_of(instance))
    task_id = tasks.submit(connection, config, "shell", {"command": "sleep 9"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='running', device_id='dev1'")
    client.send("heartbeat", {"availability": {"available": False, "reason": "battery 12%"},
                              "active_tasks": [{"task_id": task_id, "attempt": 1}]})
    assert client.receive()["message_type"] == "heartbeat_ack"
    client.send("task_result", {"task_id": task_id, "attempt": 1, "status": "handed_back",
                                "error": "battery 12%"})
    assert client.receive()["message_type"] == "task_result_ack"
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["retries_used"]) == ("queued", 2, 0)
    device = devices.get(connection, "dev1")
    assert not device["available"] and device["unavailable_reason"] == "battery 12%"
    assert scheduler.schedule(connection, time.time() + 100, instance.log, config) == 0
    connection.close()


def test_a_new_device_gets_the_groups_that_asked_for_newcomers(server):
    instance, port = server
    config = instance.config
    connection = db.connect(config.db_path)
    wanted = fleet.submit_each(connection, config, "echo", {"message": "hi"},
                               include_new=True, priority="high")
    fleet.submit_each(connection, config, "echo", {"message": "no"}, {"tags": ["gpu"]},
                      include_new=True)
    with db.write(connection):     # stored by an older version, before options were checked
        connection.execute("INSERT INTO task_groups(created_at, task_type, payload, options,"
                           " include_new) VALUES (1, 'echo', '{\"message\": \"x\"}',"
                           " '{\"retries\": -1}', 1)")
    client = Client(port)
    assert client.register(token_of(instance), "newcomer")["message_type"] == "register_ack"
    client.send("heartbeat", {"active_tasks": []})
    assert client.receive()["message_type"] == "heartbeat_ack"
    given = [t for t in fleet.group(connection, wanted)["tasks"]]
    assert [t["device_id"] for t in given] == ["newcomer"]
    task = tasks.get(connection, given[0]["task_id"])
    assert task["priority"] == "high" and task["requirements"] == {"device_id": "newcomer"}
    assert len(tasks.list_tasks(connection)) == 1
    connection.close()


def test_a_device_gets_its_own_secret_and_its_id_cannot_be_taken(server):
    instance, port = server
    instance.config.device_secrets = True
    token = token_of(instance)
    first = Client(port)
    first.register(token, "phone")
    secret = first.secret
    clear, sealed = committed(instance, "SELECT secret, sealed_secret FROM devices")[0]
    assert len(secret) == 64 and clear is None and secret not in sealed     # never in clear
    assert device_secrets.unseal(instance.device_key, "phone", sealed) == secret
    first.sock.close()
    # The join token no longer claims this id...
    thief = Client(port)
    assert thief.register(token, "phone")["data"]["code"] == "device_id_taken"
    # ...the device's own secret does, and no new secret is handed out.
    again = Client(port)
    reply = again.register(secret, "phone", auth="device")
    assert reply["message_type"] == "register_ack" and "device_secret" not in reply["data"]


def test_rotating_the_token_keeps_joined_devices(server):
    instance, port = server
    old = token_of(instance)
    joined = Client(port)
    joined.register(old, "laptop")
    joined.sock.close()
    new = state_dir.rotate_token(instance.config)
    assert new != old
    assert Client(port).register(old, "newcomer")["data"]["code"] == "auth_failed"
    assert Client(port).register(new, "newcomer")["message_type"] == "register_ack"
    reply = Client(port).register(joined.secret, "laptop", auth="device")
    assert reply["message_type"] == "register_ack"


def test_a_revoked_device_is_shut_out_alone(server):
    instance, port = server
    token = token_of(instance)
    victim, bystander = Client(port), Client(port)
    victim.register(token, "lost-phone")
    bystander.register(token, "pi")
    connection = db.connect(instance.config.db_path)
    with db.write(connection):
        assert devices.revoke(connection, "lost-phone")
    assert victim.receive()["data"]["code"] == "revoked"
    assert victim.closed()
    reply = Client(port).register(victim.secret, "lost-phone", auth="device")
    assert reply["data"]["code"] == "revoked"
    bystander.send("heartbeat", {"active_tasks": []})
    assert bystander.receive()["message_type"] == "heartbeat_ack"
    refusals = [line["code"] for line in audit.read(instance.config)
                if line["event"] == "connection_refused"]
    assert refusals.count("revoked") == 2
    connection.close()


def test_looking_for_shut_out_devices_reads_an_index_not_every_device(server):
    """rc-server asks at every turn; with 10,000 devices a scan would cost
    more than all the rest of an idle turn."""
    instance, port = server
    connection = db.connect(instance.config.db_path)
    plan = " ".join(row["detail"] for row in connection.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM devices WHERE "
        + server_module.SHUT_OUT_BUT_CONNECTED))
    assert "USING INDEX devices_revoked" in plan
    connection.close()


@pytest.mark.parametrize("server", ["tls"], indirect=True)
def test_tls_on_the_worker_port_with_a_pinnable_certificate(server):
    instance, port = server
    client = Client(port, tls=True)
    assert client.fingerprint == tls.fingerprint(instance.config)
    assert client.register(token_of(instance))["message_type"] == "register_ack"
    for _ in range(3):           # several frames, decrypted in one read or many
        client.send("heartbeat", {"active_tasks": []})
    assert [client.receive()["message_type"] for _ in range(3)] == ["heartbeat_ack"] * 3
    # Plain bytes on the TLS port get nothing but a closed connection.
    plain = Client(port)
    plain.send_raw(b'{"message_type": "register"}\n')
    assert plain.closed()


def test_broadcast_reaches_the_devices_it_names_and_acks_are_kept(server):
    instance, port = server
    token = token_of(instance)
    pi, laptop = Client(port), Client(port)
    pi.register(token, "pi", tags=["pi"])
    laptop.register(token, "laptop")
    connection = db.connect(instance.config.db_path)
    control_id = fleet.broadcast(connection, instance.config, "report_profile",
                                 {"tags": ["pi"]})
    control = pi.receive()
    assert control["message_type"] == "control"
    assert control["data"] == {"control_id": control_id, "command": "report_profile"}
    pi.send("control_ack", {"control_id": control_id, "ok": True, "detail": "sent"})
    pi.send("heartbeat", {"active_tasks": []})
    assert pi.receive()["message_type"] == "heartbeat_ack"
    acks = fleet.control_status(connection, control_id)["acks"]
    assert [(a["device_id"], a["ok"]) for a in acks] == [("pi", 1)]
    laptop.send("heartbeat", {"active_tasks": []})
    assert laptop.receive()["message_type"] == "heartbeat_ack"   # and no control before it
    connection.close()


def test_the_files_port_is_told_and_cached_files_are_stored_checked(server):
    """Issue 18: register_ack names rc-files' port; a heartbeat's cached_files
    is kept for the scheduler, valid hashes only, bounded."""
    instance, port = server
    client = Client(port)
    ack = client.register(token_of(instance))
    assert ack["data"]["files_port"] == instance.config.files_port
    good = "ab" * 32
    client.send("heartbeat", {"active_tasks": [],
                              "cached_files": [good, "../../etc", 7, good.upper()] * 400})
    assert client.receive()["message_type"] == "heartbeat_ack"
    stored = committed(
        instance, "SELECT cached_files FROM devices WHERE device_id = 'dev1'")[0][0]
    assert json.loads(stored) == [good] * 250      # the first 1,000 entries, checked
    time.sleep(instance.config.min_heartbeat_interval + 0.1)   # folded otherwise
    client.send("heartbeat", {"active_tasks": [], "cached_files": "not a list"})
    assert client.receive()["message_type"] == "heartbeat_ack"
    assert committed(
        instance, "SELECT cached_files FROM devices WHERE device_id = 'dev1'")[0][0] == "[]"


def send_inline_results(client, ids, raw, name="out.bin"):
    """A completed task_result for each task, with `raw` as its one small output."""
    entry = {"name": name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    for task_id in ids:
        client.send_raw(protocol.encode("task_result", {
            "task_id": task_id, "attempt": 1, "status": "completed", "result": {},
            "files_inline": [entry], "inline_bytes": len(raw)}, sender_id="t") + raw)


def running_with_an_output(instance, connection, count):
    ids = [tasks.submit(connection, instance.config, "shell", {"command": str(n),
                                                               "outputs": ["out.bin"]})
           for n in range(count)]
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='running', device_id='dev1'")
    return ids


def test_an_output_the_disk_cannot_make_durable_is_left_out_and_said(server, monkeypatch):
    """Written into place on the loop, an output whose fsync fails gets no
    row (its blob is the sweep's), and the task's stderr says why."""
    instance, port = server

    def failing_sync(placed):
        for descriptor, _ in placed:
            os.close(descriptor)
        return [files.disk_error(OSError(5, "Input/output error"))] * len(placed)
    monkeypatch.setattr(files, "sync_placed", failing_sync)
    client = Client(port)
    client.register(token_of(instance), inline_files=True)
    connection = db.connect(instance.config.db_path)
    [task_id] = running_with_an_output(instance, connection, 1)
    raw = os.urandom(5000)
    send_inline_results(client, [task_id], raw)
    wait_for(lambda: tasks.get(connection, task_id)["state"] == "completed", 10, "the result")
    stderr = tasks.get(connection, task_id)["result"]["stderr"]
    assert "output 'out.bin' not stored: cannot write to the main node's disk" in stderr, stderr
    assert files.task_files(connection, task_id) == []
    assert not files.exists(connection, hashlib.sha256(raw).hexdigest())
    connection.close()


def test_a_result_whose_outputs_the_store_holds_waits_for_no_disk(server, monkeypatch):
    """The second result with the same bytes has nothing new to make
    durable: it is recorded without OutputStore, its row naming the blob."""
    instance, port = server
    puts = []
    put = server_module.OutputStore.put
    monkeypatch.setattr(server_module.OutputStore, "put",
                        lambda self, job: puts.append(job[1][0]) or put(self, job))
    client = Client(port)
    client.register(token_of(instance), inline_files=True)
    connection = db.connect(instance.config.db_path)
    first, second = running_with_an_output(instance, connection, 2)
    raw = os.urandom(5000)
    send_inline_results(client, [first], raw)
    wait_for(lambda: tasks.get(connection, first)["state"] == "completed", 10, "the first")
    send_inline_results(client, [second], raw)
    wait_for(lambda: tasks.get(connection, second)["state"] == "completed", 10, "the second")
    assert puts == [(first, 1)]
    for task_id in (first, second):
        assert [(row["name"], row["sha256"]) for row in files.task_files(connection, task_id)] \
            == [("out.bin", hashlib.sha256(raw).hexdigest())]
    assert open(files.blob_path(instance.config, hashlib.sha256(raw).hexdigest()),
                "rb").read() == raw
    connection.close()


def test_results_waiting_for_their_files_past_the_byte_bound_stop_reading_that_device(
        server, monkeypatch):
    """Past MAX_STORING_BYTES waiting for OutputStore from all devices, a
    device with a result waiting is not read from until it is stored: its
    next result stays in the socket, unread, and both end once the disk is back."""
    instance, port = server
    monkeypatch.setattr(server_module, "MAX_STORING_BYTES", 10)
    disk = threading.Event()

    sync = server_module.OutputStore.sync

    def slow_sync(placed_by_job):
        disk.wait(20)
        return sync(placed_by_job)
    monkeypatch.setattr(server_module.OutputStore, "sync", staticmethod(slow_sync))
    client = Client(port)
    client.register(token_of(instance), inline_files=True)
    connection = db.connect(instance.config.db_path)
    ids = running_with_an_output(instance, connection, 2)
    raw = b"0123456789abcdef"
    send_inline_results(client, ids, raw)
    peer = instance.peers_by_device["dev1"]
    wait_for(lambda: peer.storing, 5, "the first result handed to OutputStore")
    time.sleep(0.5)
    assert len(peer.storing) == 1 and instance.outputs.waiting_bytes == len(raw)
    assert [tasks.get(connection, i)["state"] for i in ids] == ["running", "running"]
    disk.set()
    wait_for(lambda: all(tasks.get(connection, i)["state"] == "completed" for i in ids), 10,
             "both results")
    wait_for(lambda: instance.outputs.waiting_bytes == 0, 5, "nothing waiting")
    connection.close()
