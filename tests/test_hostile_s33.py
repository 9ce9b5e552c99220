"""attack33: what session 32 added (the restart hold, Idempotency-Key on
POST /api/v1/tasks, make-way at max_unauthenticated, rc.client's re-sends),
attacked by a device gone bad, strangers on many addresses beside a fleet
behind one, a client that reuses its keys, and an rc-web (or proxy) that
cuts or stretches its answers. Each test failed before the fix its
docstring names."""
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import wait_for
from rc import client, db, fleet, state_dir
from rc import config as config_module
from rc import server as server_module
from rc.log import Logger
from rc.server import Server
from test_client_http import Canned
from test_hostile_rows import server  # noqa: F401 (a fixture: rc-server in a thread, tcp and tls)
from test_hostile_s32 import read_until_closed
from test_restart_hold_s32 import frames_until_closed
from test_server import Client, token_of
from test_web import serve, stop


# -- the restart hold: only for a device the main node still trusts ---------------------

def test_a_graceful_stop_holds_no_device_revoked_or_forgotten_meanwhile(tmp_path):
    """`rc forget` (or `rc revoke`) commits, and rc-server stops before its
    next look hangs up on the device (refuse_revoked, at most a turn
    later; here never): the forgotten device's tasks are queued again
    already, so a hold would have its worker run them on for restart_hold
    beside their next attempt, and rc-reaper leave the device alone. It is
    neither held nor told; the device beside it is both. Before: both were
    (main_stopping to the forgotten one, held_until written for it)."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.tls = "127.0.0.1", 0, False
    config.device_secrets, config.restart_hold = False, 120.0
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io.BytesIO()))
    instance.refuse_revoked = lambda: None      # the stop comes before that look
    thread = threading.Thread(target=instance.run)
    thread.start()
    try:
        port = wait_for(lambda: getattr(instance, "listener", None)
                        and instance.listener.getsockname()[1], 10, "rc-server listening")
        token = token_of(instance)
        kept, forgotten, revoked = Client(port), Client(port), Client(port)
        for client, name in ((kept, "kept"), (forgotten, "forgotten"), (revoked, "revoked")):
            assert client.register(token, name, restart_hold=True)["message_type"] \
                == "register_ack"
        writer = db.open_database(config.db_path)
        fleet.forget(writer, config, "forgotten")
        with db.write(writer):
            writer.execute("UPDATE devices SET revoked = 1 WHERE device_id = 'revoked'")
    finally:
        instance.stop()
        thread.join(30)
    told = {name: [f["message_type"] for f in frames_until_closed(client)]
            for client, name in ((kept, "kept"), (forgotten, "forgotten"),
                                 (revoked, "revoked"))}
    assert told["kept"][-1:] == ["main_stopping"], told
    assert "main_stopping" not in told["forgotten"] + told["revoked"], told
    held = dict(writer.execute("SELECT device_id, held_until FROM devices").fetchall())
    assert held["kept"] is not None
    assert held["forgotten"] is None and held["revoked"] is None, held
    writer.close()
    instance.database.close()


# -- Idempotency-Key: the same key with another request ----------------------------------

@pytest.fixture
def web_port(cluster_home):
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    yield int(server.effective_port), state_dir.read_secret(config.admin_token_path)
    stop(server, thread)


def post(web_port, path, body, key):
    port, token = web_port
    request = urllib.request.Request(
        "http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + token,
                 "Idempotency-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def shell(command):
    return {"task_type": "shell", "payload": {"command": command}}


def commands_queued(connection):
    return sorted(row[0] for row in connection.execute(
        "SELECT json_extract(payload, '$.command') FROM tasks"))


def test_a_key_sent_again_with_another_request_is_refused_not_answered_as_queued(
        web_port, cluster_home):
    """A client that reuses a key (a counter started again, a key chosen
    by hand, two scripts choosing the same one) within the hour: its new
    tasks were never queued, yet it was answered 201 with the first
    request's ids, as though they were. Now 422, nothing queued, and the
    first request sent again is still answered as before. Before: 201 with
    the first ids, for one task, a list, and a list in another group."""
    _, connection = cluster_home
    status, first = post(web_port, "/api/v1/tasks", shell("echo one"), "k-one")
    assert status == 201
    status, answer = post(web_port, "/api/v1/tasks", shell("rm -rf ~/old"), "k-one")
    assert status == 422 and "Idempotency-Key" in answer["error"], answer
    batch = [shell("echo a"), shell("echo b")]
    status, listed = post(web_port, "/api/v1/tasks?group=new", batch, "k-list")
    assert status == 201
    for path, body in (("/api/v1/tasks?group=new", [shell("echo c"), shell("echo d")]),
                       ("/api/v1/tasks", batch),
                       ("/api/v1/tasks?group=%d" % listed["group_id"], batch)):
        status, answer = post(web_port, path, body, "k-list")
        assert status == 422, (path, body, answer)
    groups = connection.execute("SELECT count(*) FROM task_groups").fetchone()[0]
    assert groups == 1
    assert commands_queued(connection) == ["echo a", "echo b", "echo one"]
    # The first requests, sent again: their own answers, still.
    assert post(web_port, "/api/v1/tasks", shell("echo one"), "k-one") == (201, first)
    assert post(web_port, "/api/v1/tasks?group=new", batch, "k-list") == (201, listed)
    assert commands_queued(connection) == ["echo a", "echo b", "echo one"]


# -- max_unauthenticated: a fleet behind one address among strangers on many -------------

def test_at_the_cap_a_fleet_behind_one_address_gets_in_beside_strangers_on_many(server):
    """Strangers on as many addresses as max_unauthenticated, one idle
    connection each, hold the cap; then workers behind one address (a
    NAT'd fleet, all back at once after a restart hold) connect, and each
    registers after all have their hello. Each newcomer made the oldest
    connection of the busiest address make way: from the second on, that
    was the fleet's own, mid handshake, so only the last got in (4 runs of
    4: 1 of 4 registered, with and without TLS). Now the oldest connection,
    authenticating for longer than a worker needs, makes way: a stranger's;
    all four get in."""
    instance, port = server
    instance.config.max_unauthenticated, instance.config.auth_timeout = 8, 120.0
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=20,
                                          source_address=("127.0.0.%d" % (60 + n), 0))
                 for n in range(8)]
    wait_for(lambda: len(instance.unauthenticated) == 8, 20, "the strangers accepted")
    time.sleep(server_module.AUTH_QUICK + 1)     # older than any worker takes
    fleet = []
    for _ in range(4):
        fleet.append(Client(port, tls=instance.config.tls))
        wait_for(lambda: len(instance.unauthenticated) == 8, 20, "the newcomer accepted")
    answers = [client.register(token_of(instance), "nat-%d" % n)["message_type"]
               for n, client in enumerate(fleet)]
    assert answers == ["register_ack"] * 4
    closed = [sock for sock in strangers if read_until_closed(sock, 0.5) is not None]
    assert len(closed) == 4 and closed == strangers[:4]     # the oldest made way
    assert instance.failed_turns == []
    for sock in strangers:
        sock.close()


# -- rc.client: an answer cut in the middle ---------------------------------------------

ANSWER = b'{"tasks": [{"task_id": 7, "url": "/api/v1/tasks/7"}]}'
WHOLE = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


@pytest.mark.parametrize("cut", [WHOLE[:WHOLE.index(b"\r\n\r\n") + 4 + 12],      # mid-body
                                 WHOLE[:30]],                                       # mid-head
                         ids=["mid-body", "mid-head"])
def test_a_keyed_submit_whose_answer_is_cut_midway_is_sent_again(cut):
    """rc-web (or a proxy) closes the connection in the middle of the
    answer to a submit that carries its Idempotency-Key: sending it again
    is safe (the second answer names the tasks the first queued), as it
    was already when the connection closed (or was reset) before the
    answer. Before: ClusterError 'the answer was cut short' / 'closed in
    the answer's head', though the tasks were queued: the caller's futures
    failed while their tasks ran. A request that is not safe to send again
    is still not sent again; a GET cut so is."""
    server = Canned([(cut,), WHOLE])
    http = client.Http("http://127.0.0.1:%d" % server.port, "secret")
    answer = http.json("POST", "/api/v1/tasks", [{"task_type": "echo"}],
                       headers={"Idempotency-Key": "k-cut"})
    assert answer["tasks"][0]["task_id"] == 7
    assert len(server.requests) == 2
    assert all(b"\r\nIdempotency-Key: k-cut\r\n" in head for head, _ in server.requests)
    assert server.requests[0][1] == server.requests[1][1]
    server = Canned([(cut,), WHOLE])
    http = client.Http("http://127.0.0.1:%d" % server.port, "secret")
    with pytest.raises(client.ClusterError, match="cut short|closed in the answer"):
        # A group's cancel: sent again, its counts would be the second's.
        http.json("POST", "/api/v1/groups/3/cancel", {})
    assert len(server.requests) == 1
    server = Canned([(cut,), WHOLE])
    http = client.Http("http://127.0.0.1:%d" % server.port, "secret")
    assert http.json("GET", "/api/v1/tasks/7")["tasks"][0]["task_id"] == 7
    assert len(server.requests) == 2


def test_an_endless_run_of_interim_answers_is_refused_not_read_for_ever():
    """A hostile rc-web (or proxy) answers a request with '100 Continue'
    after '100 Continue', for ever: the client read one after another
    without end (each a few bytes, never its timeout), hung and spinning.
    Now past client.MAX_INTERIM_ANSWERS it is a bad answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def answer_for_ever():
        connection, _ = listener.accept()
        with connection:
            try:
                while not stop.is_set():
                    connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
            except OSError:
                pass           # the client hung up

    threading.Thread(target=answer_for_ever, daemon=True).start()
    http = client.Http("http://127.0.0.1:%d" % listener.getsockname()[1], "secret")
    errors = []

    def ask():
        try:
            http.request("POST", "/api/v1/tasks/7/cancel", b"{}", timeout=10)
        except client.ClusterError as e:
            errors.append(e)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(60)
    stop.set()
    listener.close()
    assert not asker.is_alive(), "still reading interim answers after 60 s"
    assert len(errors) == 1 and "interim" in str(errors[0]), errors
