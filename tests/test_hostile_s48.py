"""Session 48's attacks: each test is a fault found, and fails without its fix."""
import json
import os
import threading
import time

import pytest

from rc import audit, web

from test_web import call

STRANGER = "192.168.1.66"


def audit_lines(config):
    """Every line of the audit log and its backups, oldest file first."""
    path = audit.path(config)
    lines = []
    for name in ["%s.%d" % (path, n) for n in range(audit.BACKUPS, 0, -1)] + [path]:
        if os.path.exists(name):
            with open(name, "rb") as f:
                lines.extend(json.loads(line) for line in f if line.strip())
    return lines


def test_a_reader_cannot_rotate_the_audit_log_away(cluster_home):
    """Every web-terminal command was an audit line, a reader's and one
    refused for want of the token alike, with up to 50 words of 200
    characters each: a reader (anyone on the LAN with read_access=open, the
    main node's user with local; the dashboard's `monitor` alone sends one
    every 5 s) rotated the whole audit log (6 x audit_log_max_bytes: 60 MB)
    away in about a minute, the admin's revocations and joins with it. A
    reader's lines are now a few a minute per address, the rest counted."""
    config, connection = cluster_home
    config.health_supervisor = False
    config.read_access = "open"
    config.audit_log_max_bytes = 64 * 1024
    app = web.make_app(config)
    audit.record(config, "device_revoked", "admin", "10.0.0.1", device_id="stolen")
    long_words = ["x" * 200] * 48
    sent = 0
    for _ in range(150):
        for argv in (["status"] + long_words,                   # a reader's, a usage error
                     ["label", "a"] + ["k=" + word for word in long_words]):   # refused
            status, _, _ = call(app, "/api/v1/command", "POST", remote=STRANGER,
                                body=json.dumps({"argv": argv}).encode())
            assert status in (200, 401)
            sent += 1
    lines = audit_lines(config)
    assert [line["device_id"] for line in lines if line["event"] == "device_revoked"] \
        == ["stolen"], "the admin's line was rotated away"
    assert len([line for line in lines if line["source"] == STRANGER]) <= 40
    # A minute later the stranger's next command tells what was held back.
    web_app, later = app.config["rc.web"], time.monotonic() + 60
    web_app.reader_lines.clock = lambda: later
    web_app.next_held_back = 0.0
    assert call(app, "/api/v1/command", "POST", remote=STRANGER,
                body=json.dumps({"argv": ["status"]}).encode())[0] == 200
    sent += 1
    strangers = [line for line in audit_lines(config) if line["source"] == STRANGER]
    told = sum(line["count"] if line["event"] == "web_commands_held_back"
               else 1 + line.get("suppressed", 0) for line in strangers)
    assert told == sent, "the commands held back were not counted"


def spy_on_removals(module, monkeypatch):
    """([the thread of each remove_tree call], an Event set after each) of
    the worker module's remove_tree, which still removes."""
    removed_in, done = [], threading.Event()
    original = module.remove_tree

    def removing(path):
        removed_in.append(threading.current_thread())
        original(path)
        done.set()
    monkeypatch.setattr(module, "remove_tree", removing)
    return removed_in, done


def test_a_task_directory_left_full_is_emptied_off_the_workers_loop(tmp_path, monkeypatch):
    """A task directory left with files in it was removed in the worker's
    loop as its task ended: a task that left 300,000 files held the loop
    ~5 s (a million, ~17 s), no heartbeat sent nor ping answered (the main
    node held the device suspect), no other task's output read, and the
    worker took itself for frozen (leases_in_doubt). It is now made the
    worker's (no task of its uid reaches into it) and emptied by a thread."""
    from test_worker_identity import load_worker_module
    module = load_worker_module()
    removed_in, done = spy_on_removals(module, monkeypatch)
    workdirs = module.WorkDirs(0, str(tmp_path))
    path = workdirs.take()
    os.mkdir(os.path.join(path, "deep"))
    for n in range(100):
        open(os.path.join(path, "deep", "f%d" % n), "w").close()
    workdirs.give_back(path)
    assert done.wait(30), "the directory was not removed"
    assert removed_in and removed_in[0] is not threading.main_thread(), \
        "removed in the worker's loop"
    assert not os.path.exists(path)
    empty = workdirs.take()            # an empty one still goes at once, in the loop
    workdirs.give_back(empty)
    assert not os.path.exists(empty) and len(removed_in) == 1


def test_a_tree_a_tasks_uid_left_in_tmp_is_emptied_off_the_workers_loop(tmp_path, monkeypatch):
    """What a task's uid left in /tmp went in the worker's loop as the task
    ended, a tree of hundreds of thousands of files holding it for seconds
    as its own directory did (above). A tree is now moved into the task
    root (the worker's, the same file system), made the worker's, and
    emptied by the remover's thread; the name in /tmp is free at once."""
    if os.geteuid() != 0:
        pytest.skip("gives a tree away (chown): root only")
    from test_worker_identity import load_worker_module
    module = load_worker_module()
    monkeypatch.setattr(module, "remove_ipc_of", lambda uid: 0)
    monkeypatch.setattr(module, "remove_keys_of", lambda uid: 0)
    removed_in, done = spy_on_removals(module, monkeypatch)
    shared, root = tmp_path / "tmp", tmp_path / "tasks"
    shared.mkdir()
    os.chmod(str(shared), 0o1777)
    root.mkdir()
    module.REMOVER.root = str(root)
    uid, tree = 59996, shared / "build"
    (tree / "deep").mkdir(parents=True)
    for n in range(100):
        (tree / "deep" / ("f%d" % n)).touch()
    for path in [tree, tree / "deep"] + list((tree / "deep").iterdir()):
        os.chown(str(path), uid, uid)
    module.Leftovers(directories=(str(shared),), watch=False).remove(uid)
    assert not tree.exists(), "the tree is still in /tmp"
    assert done.wait(30), "the tree was not removed"
    assert removed_in and removed_in[0] is not threading.main_thread(), \
        "removed in the worker's loop"
    assert os.listdir(str(root)) == []


def test_the_open_health_names_no_device_nor_task(cluster_home, add_device):
    """/health is open to anyone, and a stuck queue's finding named the
    device with a free slot and the task waiting (`queue stuck: task 1
    waited 900s while kitchen-pi had a free slot`): a stranger learnt a
    joined device's id, which rc-server tells no one before a proof. A
    client that may not read the cluster gets the counts only."""
    from test_web import admin
    from rc import tasks
    config, connection = cluster_home
    config.health_supervisor = False
    config.health_queue_stuck = 0
    add_device("kitchen-pi")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    app = web.make_app(config)
    status, _, text = call(app, "/health", remote="192.168.1.20")
    assert status == 503 and "queue stuck: 1 tasks waited" in text, text
    assert "kitchen-pi" not in text and "task %d" % task_id not in text, text
    status, _, text = call(app, "/api/v1/health", remote="192.168.1.20", headers=admin(config))
    assert status == 503 and "kitchen-pi" in text, text


def test_a_local_user_reaching_another_loopback_address_is_not_taken_for_the_owner(
        tmp_path, monkeypatch):
    """read_access=local asks /proc/net/tcp who owns the client's end of a
    loopback connection, matched by its address and port and by rc-web's
    port only. rc-web on 0.0.0.0 (the default) answers at 127.0.0.2 too,
    and the kernel gives a connect() there the very address and port of
    one of the owner's own connections to 127.0.0.1 (a dashboard, a
    client's long poll: its port is in /proc/net/tcp for anyone to read),
    as the two go to different places: when the owner's came first in the
    table, another local user (or a task of the local worker, as a uid of
    its own) read every task as the main node's user. The client's socket
    must now lead to the address it reached."""
    from ipaddress import ip_address
    port, web_port, owner, other = 40001, 5000, os.getuid(), 65534
    client = web.proc_net_address(ip_address("127.0.0.1"), port)

    def row(number, remote, uid):
        return ("%4d: %s %s 01 00000000:00000000 00:00000000 00000000 %5d        0 %d 1"
                " 0000000000000000 20 4 30 10 -1\n"
                % (number, client, web.proc_net_address(ip_address(remote), web_port), uid,
                   1000 + number))
    (tmp_path / "tcp").write_text("  sl  local_address rem_address   st tx_queue rx_queue tr"
                                  " tm->when retrnsmt   uid  timeout inode\n"
                                  + row(0, "127.0.0.1", owner) + row(1, "127.0.0.2", other))
    monkeypatch.setattr(web, "PROC_NET", str(tmp_path))
    environ = {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(port),
               "SERVER_PORT": str(web_port), "rc.local_address": "127.0.0.2"}
    assert not web.is_local_peer(environ), "another user's connection read as the owner's"
    environ["rc.local_address"] = "::ffff:127.0.0.2"       # rc-web on "::"
    assert not web.is_local_peer(environ)
    environ["rc.local_address"] = "127.0.0.1"
    assert web.is_local_peer(environ)


def test_a_checkpoint_of_many_sparse_files_is_one_line_of_the_workers_log(
        tmp_path, monkeypatch):
    """Each sparse file left out of a checkpoint was a warning line of the
    worker's own log: a task touching its 10,000 files (CHECKPOINT_MAX_ENTRIES)
    between checkpoints wrote 2.5 MB of the device's log at each one, every
    CHECKPOINT_EVERY while it ran. One line a checkpoint, with the count."""
    from test_worker_identity import load_worker_module
    module = load_worker_module()
    lines = []
    monkeypatch.setattr(module, "log", lambda level, event, **fields: lines.append(
        (event, fields)))
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    for n in range(40):
        with open(str(directory / ("sparse%d" % n)), "wb") as f:
            f.truncate(module.CHECKPOINT_HOLES_MAX + 1024 * 1024)
    (directory / "kept").write_text("kept")
    module.write_checkpoint(str(directory), str(tmp_path / "c.tar"))
    left_out = [fields for event, fields in lines if "left_out" in event]
    assert len(left_out) == 1, len(left_out)
    assert left_out[0]["count"] == 40 and len(left_out[0]["names"]) == 5


def test_a_task_filling_tmp_does_not_grow_the_worker_by_its_names(tmp_path, monkeypatch):
    """Leftovers kept the name and owner of every entry of a shared
    directory between its looks: a task that left 300,000 files in /tmp
    while it ran grew the worker from 21 to 117 MB at the next task's end
    (a million: ~330 MB, a phone's worker killed). It keeps at most
    LEFTOVERS_NAMES_KEPT names of one owner; that owner's entries are found
    by reading the directory whole, at its own task's end."""
    if os.geteuid() != 0:
        pytest.skip("gives files away (chown): root only")
    from test_worker_identity import load_worker_module
    module = load_worker_module()
    monkeypatch.setattr(module, "remove_ipc_of", lambda uid: 0)
    monkeypatch.setattr(module, "remove_keys_of", lambda uid: 0)
    monkeypatch.setattr(module, "LEFTOVERS_NAMES_KEPT", 10, raising=False)
    shared = str(tmp_path / "tmp")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    leftovers = module.Leftovers(directories=(shared,))
    if not leftovers.watch():
        pytest.skip("no inotify here")
    filler, other = 59994, 59995

    def make(uid, count, prefix):
        for n in range(count):
            path = os.path.join(shared, "%s%d" % (prefix, n))
            open(path, "w").close()
            os.chown(path, uid, uid)
    make(filler, 30, "a")
    leftovers.remove(other)                # read whole: the filler's 30 are too many
    make(filler, 30, "b")
    make(other, 3, "o")
    leftovers.remove(other + 1)            # the names since: the filler's not kept
    assert len(leftovers.owner_of[shared]) <= 10 + 3, len(leftovers.owner_of[shared])
    assert leftovers.names_of[shared][filler] is None
    leftovers.remove(filler)               # its own end: every one of its 60 found
    assert sorted(os.listdir(shared)) == ["o0", "o1", "o2"]
    leftovers.remove(other)
    assert os.listdir(shared) == []
