"""Hostile round of session 22 (attack46): a stranger, a token holder, a
lying device and a task, where no round looked (the newest code: rc map's
--results, the Python client, rc-files, the checkpoint path)."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from types import SimpleNamespace

import pytest

from test_worker import WORKER, interpreter_version

# The oldest and newest CPython the worker runs on, and this one.
PYTHONS = [sys.executable] + [paths[0] for paths in (
    sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.%d*/bin/python3" % minor)),
           key=interpreter_version) for minor in (6, 13)) if paths]


def test_rc_map_results_folder_planted_as_a_link_is_not_written_through(tmp_path):
    """`rc map --results DIR` made DIR/N with os.makedirs, which follows a
    link: in a shared DIR another local user who planted DIR/1 as a link to
    a folder of the user's had its state, stdout, stderr, input and
    exit_code replaced (and an exit_code there removed) by the map's
    results. DIR/N is now made and entered with O_NOFOLLOW (as --into's
    folders are): the link is left alone and the input says why."""
    from rc import map_cli
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "state").write_text("the user's own\n")
    (victim / "exit_code").write_text("the user's too\n")
    results = tmp_path / "results"
    results.mkdir()
    os.symlink(str(victim), str(results / "1"))
    outcome = map_cli.Outcome.__new__(map_cli.Outcome)
    outcome.job = SimpleNamespace(number=1, value="a.txt", state="failed")
    outcome.stdout, outcome.stderr, outcome.exit_code, outcome.notes = "bytes\n", "", None, []
    try:
        outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    except OSError as e:
        assert "is a link" in str(e)
    else:
        raise AssertionError("wrote DIR/1 through a link")
    assert sorted(os.listdir(str(victim))) == ["exit_code", "state"]
    assert (victim / "state").read_text() == "the user's own\n"
    assert (victim / "exit_code").read_text() == "the user's too\n"
    # An honest DIR/2 is written as before.
    outcome.job = SimpleNamespace(number=2, value="b.txt", state="completed")
    outcome.exit_code = 0
    outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    assert sorted(os.listdir(str(results / "2"))) == ["exit_code", "input", "state", "stderr",
                                                     "stdout"]
    assert (results / "2" / "stdout").read_text() == "bytes\n"
    assert (results / "2" / "input").read_text() == "b.txt\n"


# -- a checkpoint tar whose headers are the size of a file ----------------------------

RESTORE = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
worker.load_region("files")


def peak():         # KiB; ru_maxrss keeps the forking pytest's
    with open("/proc/self/status") as f:
        return int([line.split()[1] for line in f if line.startswith("VmHWM:")][0])


before = peak()
for archive in sys.argv[3:]:
    worker.restore_checkpoint(archive, sys.argv[2], "0" * 64)
    print(json.dumps(sorted(os.listdir(sys.argv[2]))))
    worker.remove_tree(sys.argv[2])
    os.mkdir(sys.argv[2])
print(peak() - before)
"""
HEADER_BYTES = 48 << 20        # a pax header, a sparse map: 48 MiB each


def pax_record(key, value):
    """One "LENGTH KEY=VALUE\\n" record of a pax header, its length its own."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return str(length).encode() + body


def member_bytes(info, data):
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def hostile_checkpoints(directory):
    """A tar whose first member's pax header is HEADER_BYTES long; one whose
    GNU sparse 1.0 map is; one of members whose pax headers are each under
    CHECKPOINT_HEADER_MAX and HEADER_BYTES together; an honest one (the
    worker's own, deep names)."""
    a_file = tarfile.TarInfo("a.txt")
    a_file.size = 1
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    data = pax_record(b"comment", b"x" * HEADER_BYTES)
    header.size = len(data)
    with open(os.path.join(directory, "pax.tar"), "wb") as f:
        f.write(member_bytes(header, data) + member_bytes(a_file, b"a") + b"\0" * 1024)
    count = HEADER_BYTES // 4
    sparse_map = b"%d\n" % count + b"1\n" * (2 * count)
    data = b"".join(pax_record(k, v) for k, v in (
        (b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"s"), (b"GNU.sparse.realsize", b"1")))
    header.size = len(data)
    sparse = tarfile.TarInfo("GNUSparseFile.0/s")
    sparse.size = len(sparse_map)
    with open(os.path.join(directory, "sparse.tar"), "wb") as f:
        f.write(member_bytes(header, data) + member_bytes(sparse, sparse_map)
                + member_bytes(a_file, b"a") + b"\0" * 1024)
    with open(os.path.join(directory, "many.tar"), "wb") as f:
        for number in range(HEADER_BYTES // (900 << 10)):      # each under the bound
            data = pax_record(b"comment", b"x" * (900 << 10))
            header.size = len(data)
            a_file.name = "f%d" % number
            f.write(member_bytes(header, data) + member_bytes(a_file, b"a"))
        f.write(b"\0" * 1024)
    honest = os.path.join(directory, "honest")
    deep = os.path.join(honest, *["d" * 200] * 10)
    os.makedirs(deep)
    with open(os.path.join(deep, "f.txt"), "wb") as f:
        f.write(b"kept")
    from test_worker_identity import load_worker_module
    load_worker_module().write_checkpoint(honest, os.path.join(directory, "honest.tar"))

    return [os.path.join(directory, name) for name in ("pax.tar", "sparse.tar", "many.tar",
                                                       "honest.tar")]


@pytest.mark.parametrize("python", PYTHONS, ids=lambda path: path.split("/versions/")[-1])
def test_a_checkpoint_whose_headers_are_huge_is_set_aside_unread(tmp_path, python):
    """A lying device may hand back any bytes as its task's checkpoint, and
    the next device unpacks them: tarfile reads a member's pax header (or
    GNU long name, or sparse map) whole into memory and decodes it, so a
    300 MB pax header took the next worker 1.2 GB of memory (RSS measured),
    an OOM kill on a phone or a Pi, on each device the task moved to; a
    sparse map of "1\\n"s cost a list entry each. Now a member's headers
    past CHECKPOINT_HEADER_MAX set the checkpoint aside before tarfile reads
    them, and the attempt starts afresh. Nor does tarfile keep each member
    read (with its headers: 185 MB of them held 196 MB) while the rest are
    unpacked. The worker's own checkpoints (a name 10 folders deep) restore
    as before."""
    archives = hostile_checkpoints(str(tmp_path))
    directory = tmp_path / "restored"
    directory.mkdir()
    done = subprocess.run([python, "-c", RESTORE, WORKER, str(directory)] + archives,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()        # the worker's log lines among them
    assert [json.loads(line) for line in lines if line.startswith("[")] == [
        [], [], sorted("f%d" % n for n in range(HEADER_BYTES // (900 << 10))), ["d" * 200]], \
        done.stdout
    set_aside = [json.loads(line) for line in lines if '"checkpoint_set_aside"' in line]
    assert len(set_aside) == 2 and all("CHECKPOINT_HEADER_MAX" in line["error"]
                                       for line in set_aside), done.stdout
    assert int(lines[-1]) < HEADER_BYTES // 1024 // 2, "peak RSS grew %s KiB" % lines[-1]


# -- a main node that streams results of tasks it never names --------------------------

class StreamingWeb:
    """An rc-web of our own on 127.0.0.1: POST /api/v1/tasks names the next
    task ids (group 1), each done at once; GET of the group's result stream
    sends `before(after)`'s lines, then the record of every done task past
    `after`, then holds the stream open."""

    def __init__(self, before=lambda after: (), on_batch=None):
        import http.server
        import threading
        self.done, self.next_id, self.opened = [], 1, []
        self.streams = []       # each stream's writer, in the order they opened
        self.pushed = {}        # a stream -> the ids whose results were sent on it early
        self.lock = threading.Condition()
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with web.lock:
                    ids = list(range(web.next_id, web.next_id + len(batch)))
                    web.next_id += len(batch)
                done = ids if on_batch is None else on_batch(web, ids)
                web.finish(done)
                body = json.dumps({"group_id": 1, "tasks": [{"task_id": i} for i in ids]})
                self.send_response(201)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self):
                after = int(self.path.rsplit("after=", 1)[1])
                web.opened.append(after)
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                web.streams.append(self.wfile)
                try:
                    for line in before(after):
                        self.wfile.write(line)
                    sent = set()
                    while True:
                        with web.lock:
                            web.lock.wait_for(lambda: any(i > after and i not in sent
                                                          for i in web.done), 60)
                            new = sorted(i for i in web.done if i > after and i not in sent)
                        if not new:
                            return
                        for task_id in new:
                            if task_id not in web.pushed.get(self.wfile, ()):
                                self.wfile.write(record_line(task_id, "out %d" % task_id))
                        self.wfile.flush()
                        sent.update(new)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def finish(self, ids):
        with self.lock:
            self.done.extend(ids)
            self.lock.notify_all()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def record_line(task_id, output):
    return json.dumps({"task_id": task_id, "state": "completed",
                       "result": {"output": output}}).encode() + b"\n"


def test_results_of_task_ids_never_named_are_held_bounded(monkeypatch):
    """A result that comes on the group's stream before the batch's answer
    named its task id is held for that answer (Cluster.early). Nothing
    bounded them: a main node (compromised, or a man in the middle on plain
    http) streaming results of ids it never names grew the client's memory
    by each line, 500 MiB sent, 530 MiB of the laptop's memory taken, and
    on until the OOM killer. Now at most EARLY_MAX results and
    EARLY_MAX_BYTES of lines are held; the rest are dropped (and read again
    from the stream if a batch's answer names their ids)."""
    from rc import client
    monkeypatch.setattr(client, "EARLY_MAX_BYTES", 8 << 20)
    junk = "x" * (1 << 20)
    web = StreamingWeb(before=lambda after: (record_line(task_id, junk)
                                             for task_id in range(1000, 1040)))
    try:
        with client.Cluster(web.url, "token") as cluster:
            assert cluster.submit("echo", "x").result(timeout=60) == "out 1"
            held = [size for _, size in cluster.early.values()] \
                if cluster.early and isinstance(next(iter(cluster.early.values())), tuple) \
                else [len(json.dumps(record)) for record in cluster.early.values()]
            assert sum(held) <= 8 << 20, "%d results held, %d bytes" % (len(held), sum(held))
    finally:
        web.close()


def test_results_dropped_early_are_read_again_once_their_ids_are_named(monkeypatch):
    """The honest side of that bound: a batch's tasks that end before its
    answer is read, more of them than the client holds early, still each
    get their result: the stream is opened again from the first pending id
    (here EARLY_MAX is 0: every such result is dropped, and read again)."""
    from rc import client
    monkeypatch.setattr(client, "EARLY_MAX", 0)       # every such result dropped

    from cluster_harness import wait_for
    clients = []

    def on_batch(web, ids):         # results first, on the stream already open
        if ids == [1]:
            return []               # pending until the end: the stream is read meanwhile
        stream = web.streams[-1]    # the newest: the client's
        stream.write(b"".join(record_line(task_id, "out %d" % task_id) for task_id in ids))
        stream.flush()
        web.pushed.setdefault(stream, set()).update(ids)    # not sent on it again
        # Read by the client before this answer comes: past EARLY_MAX, dropped.
        wait_for(lambda: clients[0].early_dropped, 30, "results dropped")
        return ids

    web = StreamingWeb(on_batch=on_batch)
    try:
        with client.Cluster(web.url, "token") as cluster:
            clients.append(cluster)
            first = cluster.submit("echo", "x")
            first.wait_submitted(60)
            wait_for(lambda: web.streams, 30, "the result stream open")
            for task_id in (2, 3):
                opened = len(web.streams)
                assert cluster.submit("echo", "y").result(timeout=60) == "out %d" % task_id
                # Read again from a stream opened anew, the one the next batch meets.
                wait_for(lambda: len(web.streams) == opened + 1, 30, "the stream open again")
            web.finish([1])
            assert first.result(timeout=60) == "out 1"
            assert len(web.opened) == 3 and not cluster.early, web.opened
    finally:
        web.close()


# -- a map resumed after the file store's sweep took its files -------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster_harness import with_the_local_worker
    yield from with_the_local_worker(tmp_path_factory.mktemp("hostile-s46"))


def test_a_map_resumed_after_the_sweep_stores_its_files_again_or_says_why_not(
        cluster, tmp_path):
    """The store's sweep removes a file files_retention_days after its last
    task ended; a map's failed inputs stay resumable as long as their tasks
    are kept (task_retention, set apart). `rc map --resume` of such a map
    stopped with "input f1.txt: no file SHA in the store; upload it first
    ...; `rc map --resume 2` tries again", which never could. Now a --files
    file still where the map read it, unchanged, is stored again and run;
    one gone or changed is refused by name, saying to run it in a new map."""
    from cluster_harness import RC
    from rc import db, files
    work = tmp_path / "work"
    work.mkdir()
    (work / "f1.txt").write_text("one\n")
    (work / "f2.txt").write_text("two\n")
    # Where the task's uid (the worker's --task-user) may look: tmp_path is 0700.
    shared = tempfile.mkdtemp(prefix="rc-s46-")
    os.chmod(shared, 0o755)
    ok = os.path.join(shared, "ok")

    def rc_map(*args):
        return subprocess.run([RC, "map"] + list(args), env=cluster.env, cwd=str(work),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
    first = rc_map("cat {} && test -e %s" % ok, "--files", "f1.txt", "f2.txt")
    assert first.returncode == 2, first.stderr
    group_id = int(first.stderr.split("map ", 1)[1].split(":", 1)[0])
    connection = db.connect(cluster.config.db_path)
    try:
        files.sweep(connection, cluster.config,
                    time.time() + cluster.config.files_retention_days * 86400 + 60)
        assert not files.exists(connection, files.hash_file(str(work / "f2.txt"))[0])
    finally:
        connection.close()
    (work / "f2.txt").rename(work / "away.txt")
    refused = rc_map("--resume", str(group_id))
    assert refused.returncode != 0 and "input 2 ('f2.txt')" in refused.stderr \
        and "no longer in the file store" in refused.stderr \
        and "new map" in refused.stderr and "tries again" not in refused.stderr, refused.stderr
    (work / "away.txt").rename(work / "f2.txt")
    open(ok, "w").close()
    try:
        resumed = rc_map("--resume", str(group_id))
    finally:
        shutil.rmtree(shared)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(resumed.stdout.split()) == ["one", "two"]
