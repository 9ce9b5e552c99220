"""Faults earlier sessions noticed and left (the forty-fourth session's brief).

Each test names the fault it keeps fixed."""
import glob
import os
import ssl
import subprocess
import threading
import time

import pytest

from test_server import Client, server, token_of  # noqa: F401 (server is a fixture)
from test_shared_definitions import worker  # noqa: F401 (a fixture: bin/worker.py loaded)
from test_transfer import Client as FilesClient
from test_transfer import Node
from test_worker_identity import TlsMain
from rc import db, files, scheduler, tasks

MIB = 1024 * 1024


# -- a task bounced between devices that will not start it ----------------------

def assigned_to_dev1(instance, connection, client, task_id):
    """Play rc-scheduler's next pass (past any backoff): the task goes to
    dev1, which is sent it. Returns the attempt."""
    assert scheduler.schedule(connection, time.time() + 3600, instance.log,
                              instance.config) == 1
    assign = client.receive()
    assert (assign["message_type"], assign["data"]["task_id"]) == ("task_assign", task_id)
    return assign["data"]["attempt"]


def answer(client, task_id, attempt, status, error):
    client.send("task_result", {"task_id": task_id, "attempt": attempt, "status": status,
                                "error": error})
    assert client.receive()["message_type"] == "task_result_ack"


def test_a_device_refusing_what_it_claims_to_run_fails_the_task_after_bounce_limit(server):
    # Before: not_allowed requeued the task uncharged every time, and the one
    # device that fits got it again after each backoff, for ever.
    instance, port = server
    instance.config.bounce_limit = 3
    client = Client(port)
    client.register(token_of(instance), task_types=["echo", "shell"])   # a lie: no shell
    connection = db.connect(instance.config.db_path)
    task_id = tasks.submit(connection, instance.config, "shell", {"command": "true"})
    for bounce in range(1, 4):
        attempt = assigned_to_dev1(instance, connection, client, task_id)
        answer(client, task_id, attempt, "not_allowed",
               "this worker does not accept 'shell' tasks")
        task = tasks.get(connection, task_id)
        assert task["retries_used"] == 0
        assert task["state"] == ("failed" if bounce == 3 else "queued")
        # A bounce is also a give-back: other fitting devices go first.
        assert task["requirements"].get(tasks.GAVE_BACK) == ["dev1"]
    assert "3 times in a row" in task["error"] and "dev1 (3)" in task["error"]
    assert "does not accept 'shell' tasks" in task["error"]
    connection.close()


def test_a_started_attempt_resets_the_bounce_count_and_a_running_hand_back_is_no_bounce(
        server):
    instance, port = server
    instance.config.bounce_limit = 2
    client = Client(port)
    client.register(token_of(instance), task_types=["echo", "shell"])
    connection = db.connect(instance.config.db_path)
    task_id = tasks.submit(connection, instance.config, "shell", {"command": "sleep 9"})
    attempt = assigned_to_dev1(instance, connection, client, task_id)
    answer(client, task_id, attempt, "handed_back", "waited 7.5 s for a free slot")
    # Started, then given back with its checkpoint (battery low): no bounce,
    # and the one before it no longer counts.
    attempt = assigned_to_dev1(instance, connection, client, task_id)
    client.send("task_accept", {"task_id": task_id, "attempt": attempt})
    answer(client, task_id, attempt, "handed_back", "battery 12%")
    attempt = assigned_to_dev1(instance, connection, client, task_id)
    answer(client, task_id, attempt, "handed_back", "battery 12%")
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["retries_used"]) == ("queued", 4, 0)
    attempt = assigned_to_dev1(instance, connection, client, task_id)
    answer(client, task_id, attempt, "handed_back", "battery 12%")
    task = tasks.get(connection, task_id)
    assert task["state"] == "failed" and "2 times in a row" in task["error"]
    connection.close()


# -- rc-files and rc-web count each other's bytes in flight ----------------------

@pytest.fixture
def files_node(tmp_path):
    node = Node(tmp_path, files_quota_mb=8)
    yield node
    node.close()


def test_rc_files_puts_count_rc_webs_uploads_in_flight(files_node):
    # Before: rc-web's reservations were a count in its memory, which
    # rc-files never saw: its puts and rc-web's uploads together could
    # hold twice the quota.
    node = files_node
    node.add_device("pi")
    task_id = node.running_task("pi")
    uploads = files.Reservations()          # rc-web's, as an upload's headers arrive
    held = uploads.reserve(node.db, node.config, 6 * MIB)
    client = FilesClient(node, "pi")
    answer, _ = client.put(task_id, 1, "out.bin", os.urandom(3 * MIB))
    assert answer["error"]["code"] == "quota", answer
    held.release()
    answer, done = client.put(task_id, 1, "out.bin", os.urandom(3 * MIB))
    assert answer == {"ok": True, "have": 0} and done == {"ok": True, "stored": True}
    client.close()
    # And rc-web counts what rc-files stored and holds.
    with pytest.raises(files.FileStoreError) as refused:
        uploads.reserve(node.db, node.config, 6 * MIB)
    assert "the store holds %d bytes" % (3 * MIB) in str(refused.value)

    # One whose rc-web was killed (its lock gone with it) goes when rc-web
    # starts again, or at the sweep, and no longer counts.
    dead = uploads.reserve(node.db, node.config, MIB)
    dead.file.close()
    alive = uploads.reserve(node.db, node.config, MIB)
    assert files.partial_bytes(node.config) == 2 * MIB
    files.drop_dead_reservations(node.config)
    assert files.partial_bytes(node.config) == MIB
    alive.file.close()
    files.sweep(node.db, node.config, time.time() + files.UNOWNED_UPLOAD_AGE + 1)
    assert files.partial_bytes(node.config) == 0


# -- an old Python running client.py --------------------------------------------

PYTHON27 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python")))
CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "lib", "rc", "client.py")


@pytest.mark.skipif(not PYTHON27, reason="no Python 2.7 under ~/.pyenv/versions")
def test_python_2_7_is_shown_what_the_client_needs_not_a_line_deep_in_it():
    # Before: a SyntaxError at line 302, `... from None`, which says nothing.
    done = subprocess.run([PYTHON27[-1], CLIENT], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert done.returncode == 1
    assert "client.py needs Python 3.6 or newer: run it with python3" in done.stderr, \
        done.stderr


# -- a worker without --fingerprint against a TLS main node ----------------------

def handshake_every_connection(main):
    """What a TLS main node does with each connection: a handshake (the
    worker's own connection, silent, waits in its thread for ever)."""
    held = []

    def handshake(sock):
        try:
            held.append(main.context.wrap_socket(sock, server_side=True))
        except (OSError, ssl.SSLError):
            sock.close()    # not TLS (the look for an HTTP server)
    while True:
        try:
            sock, _ = main.listener.accept()
        except OSError:
            return          # closed: the test is over
        threading.Thread(target=handshake, args=(sock,), daemon=True).start()


def test_a_first_join_without_fingerprint_looks_at_a_silent_main_node_after_a_second(
        worker, tmp_path):
    # Before: it waited HELLO_TIMEOUT (5 s) for the hello a TLS main node
    # never sends, saying nothing, then looked and said what was missing.
    main = TlsMain(tmp_path)
    threading.Thread(target=handshake_every_connection, args=(main,), daemon=True).start()
    joining = worker.Worker(worker.parse_args([
        "--join", "127.0.0.1:%d" % main.port, "--token", "t",
        "--state-dir", str(tmp_path / "state")]))
    try:
        joining.connect()
        joining.on_connected()
        assert joining.state == worker.AWAIT_HELLO
        assert joining.hello_deadline <= time.monotonic() + worker.HELLO_LOOK_AFTER
        joining.no_hello()          # the loop, at that deadline
        assert joining.exit_status == worker.EXIT_REFUSED     # fingerprint_missing
        # A device that has joined before (a reconnect) gives a main node
        # slow after its restart the whole HELLO_TIMEOUT, no early probes.
        joining.registered_once = True
        joining.connect()
        joining.on_connected()
        assert joining.hello_deadline > time.monotonic() + worker.HELLO_LOOK_AFTER
    finally:
        if joining.sock is not None:
            joining.sock.close()
        main.close()
