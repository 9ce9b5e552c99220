"""attack38b: the main node fed hostile rows through its own inputs, and
rc-server's protocol from a joined device. A chain of dependencies deeper
than SQLite's trigger depth (1,000), which anyone with the admin token
builds with a submit per link (or a pipeline of a thousand steps does):
the failure of its first task could not be written, so that task could be
neither cancelled, failed nor timed out. A joined device naming 10,000
tasks in each lease_check (heartbeat, register): a core of the main node held,
every other device answered late. Each test failed before the fix its
docstring names."""
import time

import pytest

from cluster_harness import wait_for
from hostile_harness import unharmed
from rc import db, protocol, scheduler, tasks, throttle
from rc.states import CANCELLED, FAILED, QUEUED
from test_hostile_rows import LOG, add_device
from test_bad_input import (connect, read_frame, register_frame, registered,
                            send_while_reading)
from test_hostile_server import audit_lines
from test_inline_files import with_the_good_worker
from test_store import store  # noqa: F401 (a fixture)


def chain(connection, config, length):
    """length tasks, each depending on the one before, as that many
    submits queue them (in one transaction here, for speed); their ids."""
    ids = []
    with db.write(connection):
        for n in range(length):
            ids.append(tasks.insert(connection, tasks.check_task(
                config, "echo", {"message": str(n)}, depends_on=ids[-1:])))
    return ids


def test_the_first_task_of_a_chain_deeper_than_sqlites_trigger_depth_can_end(store):
    """Before migration 22 the cancel raised 'too many levels of trigger
    recursion' and the first task stayed queued (a failure of it from a
    device, or its timeout, was refused the same way: rolled back for ever).
    Every task behind it fails with it, naming it."""
    config, connection = store
    ids = chain(connection, config, 1500)
    assert tasks.cancel(connection, ids[0]) == CANCELLED
    states = dict(connection.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
    assert states == {CANCELLED: 1, FAILED: 1499}
    last = tasks.get(connection, ids[-1])
    assert last["reason"] == "dependency %d cancelled" % ids[0]


def test_a_failure_reaches_every_dependent_of_a_lattice_once(store):
    """Tasks that depend on many of the layer before (a lattice, paths
    without number) all fail with the task under them, and the ones beside
    it, which depend on nothing that failed, stay queued."""
    config, connection = store
    root = tasks.submit(connection, config, "echo", {"message": "root"})
    beside = tasks.submit(connection, config, "echo", {"message": "beside"})
    layer = [root, beside]
    dependents = []
    for depth in range(30):
        layer = [tasks.submit(connection, config, "echo", {"message": "%d" % depth},
                              depends_on=layer) for _ in range(3)]
        dependents += layer
    assert tasks.cancel(connection, root) == CANCELLED
    for task_id in dependents:
        assert tasks.get(connection, task_id)["state"] == FAILED
    assert tasks.get(connection, beside)["state"] == QUEUED
    events = connection.execute(
        "SELECT count(*) FROM task_events WHERE task_id IN (%s) AND state = 'failed'"
        % ",".join(map(str, dependents))).fetchone()[0]
    assert events == len(dependents)


# -- a joined device names thousands of tasks in each message --------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """max_message_rate 1,000 (bursts of 2,000): a registration is at most
    ~128 KiB (a profile and its lists), ~3,600 tasks, so at the default a
    test would need registrations faster than 0.36 s each to pass it."""
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s38b"), "good",
                                        max_message_rate=1000):
        yield cluster


@pytest.mark.e2e
def test_a_device_naming_thousands_of_tasks_a_message_is_held_to_the_message_rate(cluster):
    """A lease_check may name 10,000 (task, attempt) pairs, and rc-server
    runs two UPDATEs for each: ~0.1 s of its loop for a frame of 350 KB,
    well within max_receive_mb. A device sending them as fast as rc-server
    read them held a core of the main node for as long as it liked, and
    another device's answers came ~0.4 s late instead of 2 ms (100 frames:
    9.5 s). Each task named now counts as a message of max_message_rate
    (10,000 a second, bursts of twice that) for its device, across its
    connections (a reconnect would give it the burst again): past it, the
    connection is refused as for any flood (before: all ten frames
    answered). The answers to frames read in the same turn as the one
    refused may be lost with the connection: only their order is checked."""
    frames = 10
    keys = [{"task_id": 10 ** 9 + n, "attempt": 1} for n in range(10000)]
    flood = protocol.encode("lease_check", {"tasks": keys}, sender_id="mallory") * frames
    with unharmed(cluster, "good"):
        mallory = registered(cluster, "mallory")
        answers = send_while_reading(mallory, flood, frames)[:frames]
        mallory.close()
    acks = answers
    if answers and answers[-1]["message_type"] == "error":
        assert answers[-1]["data"]["code"] == "rate_limited", answers[-1]
        acks = answers[:-1]
    else:
        # rc-server hung up with the flood unread: its reset may take the
        # refusal's frame with it, so the audit log is where it shows.
        assert len(answers) < frames, "every frame answered: %s" % answers[-1]
        wait_for(lambda: [line for line in audit_lines(cluster)
                          if line["event"] == "connection_refused" and line["actor"] == "mallory"
                          and line.get("code") == "rate_limited"], 15,
                 "rc-server's refusal of mallory in the audit log")
    assert [a["message_type"] for a in acks] == ["lease_check_ack"] * len(acks)


@pytest.mark.e2e
def test_a_device_naming_thousands_of_tasks_as_it_registers_is_held_to_the_rate(cluster):
    """A register may name ~3,600 active and fenced tasks (its frame is
    held to ~128 KiB), each a look-up or a write, and a device may
    register again as soon as it is answered (its own secret, no wrong
    proof: nothing shuts it out), each connection a fresh allowance. They
    count against the same allowance of its device as a lease_check's:
    registrations naming 1,900 each, at max_message_rate 1,000, are
    refused once the burst is spent (before: all answered register_ack)."""
    device_id = "mallory-registers"
    registered(cluster, device_id).close()      # joined: its secret is known now
    named = {"active_tasks": [{"task_id": 10 ** 9 + n, "attempt": 1} for n in range(950)],
             "fenced_tasks": [{"task_id": 2 * 10 ** 9 + n, "attempt": 1} for n in range(950)]}
    answers = []
    with unharmed(cluster, "good"):
        while len(answers) < 5 and not (answers and answers[-1]["message_type"] == "error"):
            sock, nonce = connect(cluster)
            mine = protocol.new_nonce()
            proof = protocol.worker_proof(cluster.secrets[device_id], nonce, mine, device_id)
            sock.sendall(register_frame(cluster, nonce, device_id, proof, mine,
                                        auth="device", **named))
            answers.append(read_frame(sock, timeout=30))
            sock.close()
    assert answers[-1]["message_type"] == "error", answers
    assert answers[-1]["data"]["code"] == "rate_limited", answers[-1]
    assert all(a["message_type"] == "register_ack" for a in answers[:-1]), answers


# -- a task whose requirements take the scheduler's whole pass -------------------------

def test_a_task_requiring_thousands_of_labels_is_refused_and_starves_no_queue(store):
    """One urgent task requiring 20,000 labels (300 KB, one submit) that
    no device has: rc-scheduler reads the head of the queue first at each
    pass, and matching that task against 20 devices took longer than a
    pass may spend (0.1 s), so each pass ended on it and no task behind it
    was ever assigned (100 passes, 16 s: none). A requirement names at
    most 64 now (before: queued); 64 labels at the head cost one pass."""
    config, connection = store
    for n in range(20):
        add_device(connection, "d%d" % n)
    too_many = {"k%d" % n: "v" for n in range(20000)}
    with pytest.raises(tasks.TaskError, match="labels may name at most 64"):
        tasks.submit(connection, config, "shell", {"command": "true"}, priority="urgent",
                     requirements={"labels": too_many})
    with pytest.raises(tasks.TaskError, match="tags may name at most 64"):
        tasks.submit(connection, config, "shell", {"command": "true"},
                     requirements={"tags": ["t%d" % n for n in range(65)]})
    tasks.submit(connection, config, "shell", {"command": "true"}, priority="urgent",
                 requirements={"labels": {"k%d" % n: "v" for n in range(64)}})
    plain = tasks.submit(connection, config, "shell", {"command": "true"}, priority="low")
    scheduler.assign_ready(connection, time.time(), LOG, config, None,
                           throttle.LimitedLog(LOG), scheduler.QueueCursor())
    assert tasks.get(connection, plain)["state"] == "assigned"
