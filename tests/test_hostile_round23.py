"""Round 23's attacks on what issues 18, 19 and 22 built, against a real
cluster on 127.0.0.1: a hostile device (it holds the join token and its own
secret, and the tasks the scheduler gives it) against rc-files and
rc-server, and a submitter's worst cron lines against rc-web. After each
attack the programs keep their pids and a good worker's tasks complete
(hostile_harness.unharmed)."""
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from cluster_harness import WORKER, log_records, online, wait_for
from hostile_harness import unharmed
from rc import files, protocol, tasks, transfer, web_results
from rc.states import INLINE_FILE_BYTES
from test_bad_input import (answered_or_closed, connect, error_code, read_frame, register_frame,
                            registered)
from test_files_hostile import ask, authenticated, closed
from test_hostile_web import request
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

QUOTA_MB = 64
MIB = 1024 * 1024
MAX_STREAMS = 2                         # fewer waitress threads to tie up (26)
CHANNEL_TIMEOUT = 3.0
CONNECTION_LIMIT = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-round23"), "good",
                                        auth_timeout=2.0, files_quota_mb=QUOTA_MB,
                                        max_streams=MAX_STREAMS,
                                        web_channel_timeout=CHANNEL_TIMEOUT,
                                        web_connection_limit=CONNECTION_LIMIT):
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster


class HostileDevice:
    """A device that joined with the token and speaks rc-server's protocol
    by hand: it accepts what it is given and answers what it likes."""

    def __init__(self, cluster, device_id):
        self.cluster, self.device_id = cluster, device_id
        sock, nonce = connect(cluster)
        mine = protocol.new_nonce()
        sock.sendall(register_frame(cluster, nonce, device_id, mine=mine, task_types=["shell"],
                                    slots=4))
        ack = read_frame(sock, timeout=10)
        assert ack["message_type"] == "register_ack", ack
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     ack["data"]["device_secret"])
        self.sock = sock

    def take(self, command, *options, pinned=True):
        """A shell task for this device (`pinned` to it, else `options` say
        how it goes there), submitted as a user would, accepted:
        (task_id, attempt), which it now holds."""
        pin = ["--require", "device_id=%s" % self.device_id] if pinned else []
        done = self.cluster.rc("submit", "shell", command, *(pin + list(options)))
        task_id = int(done.stdout.strip())
        while True:
            frame = read_frame(self.sock, timeout=20)
            assert frame is not None, "rc-server closed the hostile device's connection"
            if frame["message_type"] == "task_assign" and frame["data"]["task_id"] == task_id:
                break
        attempt = frame["data"]["attempt"]
        self.send("task_accept", {"task_id": task_id, "attempt": attempt})
        wait_for(lambda: tasks.get(self.cluster.db, task_id)["state"] == "running", 20,
                 "task %d to run on %s" % (task_id, self.device_id))
        return task_id, attempt

    def send(self, kind, data):
        self.sock.sendall(protocol.encode(kind, data, sender_id=self.device_id))

    def answer(self, kind, data):
        """Send a frame; the first frame back that is not an assignment or a ping."""
        self.send(kind, data)
        while True:
            frame = answered_or_closed(self.sock)
            if frame is None or frame["message_type"] not in ("task_assign", "ping"):
                return frame


@pytest.fixture(scope="module")
def mallory(cluster):
    device = HostileDevice(cluster, "mallory")
    wait_for(lambda: "mallory" in online(cluster), 20, "mallory to be online")
    yield device
    device.sock.close()


def files_on_disk(cluster):
    """Bytes under the file store: blobs and partial files alike."""
    total = 0
    for directory, _, names in os.walk(files.root(cluster.config)):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except OSError:
                pass
    return total


def start_put(cluster, task_id, attempt, name, size):
    """An rc-files put as mallory of `size` bytes of a made-up hash: the
    connection and rc-files' first answer."""
    sock, reader, welcome = authenticated(cluster)
    assert welcome == {"ok": True}
    answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt, "name": name,
                                        "size": size, "sha256": os.urandom(32).hex()}})
    return sock, reader, answer


def send_until_refused(sock, count):
    """Send up to `count` bytes; how many went before rc-files hung up."""
    sent, block = 0, b"\0" * (256 * 1024)
    try:
        while sent < count:
            sock.sendall(block[:min(len(block), count - sent)])
            sent += min(len(block), count - sent)
    except OSError:
        pass
    return sent


# -- readers that never read -----------------------------------------------------------

def test_readers_that_never_read_a_large_file_leave_rc_web_serving(cluster):
    """waitress holds a request's thread while more than 16 MiB of its answer
    wait for the client; a channel with a request in progress was never
    closed for silence. Requests for a stored file, never read, held every
    thread: the dashboard, submits and /health waited for ever."""
    data = os.urandom(24 * MIB)
    status, _, text = request(cluster, "/api/v1/files", "POST", data,
                              {"Content-Type": "application/octet-stream"}, timeout=60)
    assert status == 201, text
    path = "/api/v1/files/" + json.loads(text)["sha256"]
    threads = MAX_STREAMS + 8 + 16                     # rc.web.create_server's
    held = []
    try:
        with unharmed(cluster, "good"):
            for _ in range(threads + 2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", cluster.config.web_port))
                sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s"
                              "\r\n\r\n" % (path, cluster.admin_token)).encode())
                held.append(sock)
            time.sleep(CHANNEL_TIMEOUT)
            started = time.monotonic()
            status, _, text = request(cluster, "/api/v1/status", timeout=30)
            assert status == 200, text
            assert time.monotonic() - started < CHANNEL_TIMEOUT * 4
    finally:
        for sock in held:
            sock.close()


def test_answers_never_read_do_not_fill_rc_webs_connections(cluster):
    """An answer under 16 MiB frees its thread, but waitress closes a
    channel only once its socket takes a write: connections whose client
    never read their file stayed open for good, and at web_connection_limit
    the one rc-web closed to make way never went, so it accepted nothing."""
    status, _, text = request(cluster, "/api/v1/files", "POST", os.urandom(10 * MIB),
                              {"Content-Type": "application/octet-stream"}, timeout=60)
    assert status == 201, text
    path = "/api/v1/files/" + json.loads(text)["sha256"]
    held = []
    try:
        with unharmed(cluster, "good"):
            for address in ("127.0.0.2", "127.0.0.3"):
                for _ in range(CONNECTION_LIMIT // 2):
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.bind((address, 0))
                    sock.connect(("127.0.0.1", cluster.config.web_port))
                    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                                  "Bearer %s\r\n\r\n" % (path, cluster.admin_token)).encode())
                    held.append(sock)
            time.sleep(CHANNEL_TIMEOUT * 2)
            status, _, text = request(cluster, "/api/v1/status", timeout=CHANNEL_TIMEOUT * 5)
            assert status == 200, text
    finally:
        for sock in held:
            sock.close()


def test_a_groups_results_come_in_answers_of_bounded_size(cluster):
    """GET /api/v1/groups/ID/results read every ended task's result into one
    answer (a map of 100,000 inputs: gigabytes, for any reader, as often as
    it asks): it now stops at 8 MiB like /api/v1/results and lists the rest
    in not_sent; the stream reads them a page at a time."""
    command = "head -c 120000 /dev/zero | tr '\\0' x"        # inline: under 128 KiB
    specs = [{"task_type": "shell", "payload": command,
              "requirements": {"device_id": "good"}} for _ in range(80)]
    status, _, text = request(cluster, "/api/v1/tasks?group=new", "POST", specs)
    assert status == 201, text
    group_id, ids = json.loads(text)["group_id"], [t["task_id"] for t in json.loads(text)["tasks"]]
    with unharmed(cluster, "good"):
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ? AND state = 'completed'",
            (group_id,)).fetchone()[0] == len(ids), 120, "the group's tasks")
        status, _, text = request(cluster, "/api/v1/groups/%d/results" % group_id, timeout=60)
        assert status == 200
        answer = json.loads(text)
        assert len(text) <= web_results.MAX_RESULTS_BYTES + 200 * 1024
        sent = [entry["task_id"] for entry in answer["results"]]
        assert sent and answer["not_sent"] and sent + answer["not_sent"] == ids
        status, _, text = request(cluster, "/api/v1/groups/%d/results?after=%d"
                                  % (group_id, sent[-1]), timeout=60)
        assert json.loads(text)["results"][0]["task_id"] == answer["not_sent"][0]
        status, _, text = request(cluster, "/api/v1/groups/%d/results?stream=1" % group_id,
                                  timeout=60)
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert [line["task_id"] for line in lines[:-1]] == ids
        assert lines[-1] == {"end": True, "group_id": group_id, "tasks": len(ids)}
        assert all(len(line["result"]["output"]) == 120000 for line in lines[:-1])


def part_size(cluster):
    """One upload of 3/4 of the room the store has left: two do not fit."""
    part = (QUOTA_MB * MIB - files.used_bytes(cluster.db)) * 3 // 4
    assert part > 8 * MIB
    return part


def ended(cluster, device, task_id, attempt):
    """Cancel the task (the device says it stopped) and sweep what its
    attempt left, as rc-reaper's upkeep does a minute later."""
    cluster.rc("cancel", str(task_id))
    device.send("task_result", {"task_id": task_id, "attempt": attempt, "status": "cancelled"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "cancelled", 20,
             "task %d to be cancelled" % task_id)
    files.clean_partials(cluster.db, cluster.config, time.time() + 120)
    assert files.partial_bytes(cluster.config) == 0


# -- a device fills the main node's disk past files_quota_mb -------------------------

def test_cut_uploads_of_one_device_count_against_the_quota(cluster, mallory):
    """A put cut in the middle keeps its partial file (the next try resumes
    it); a device that starts put after put and cuts each one must not
    hold more of the disk than files_quota_mb allows."""
    task_id, attempt = mallory.take("sleep 60", "--output", "*")
    part = part_size(cluster)
    with unharmed(cluster, "good"):
        refused = None
        for number in range(4):                     # 4 x 3/4 of the quota
            sock, reader, answer = start_put(cluster, task_id, attempt, "part%d" % number,
                                             part)
            if "error" in answer:
                refused = answer["error"]
                sock.close()
                break
            assert answer == {"ok": True, "have": 0}
            send_until_refused(sock, part - 1)       # all but the last byte, then gone
            sock.close()
        assert refused is not None and refused["code"] == "quota", refused
        assert files_on_disk(cluster) <= QUOTA_MB * MIB
    ended(cluster, mallory, task_id, attempt)


def test_uploads_at_once_cannot_pass_the_quota_together(cluster, mallory):
    """Each put is checked against the room left when it starts: two that
    start together both fit in the same room, and must not both be kept."""
    task_id, attempt = mallory.take("sleep 60", "--output", "*")
    with unharmed(cluster, "good"):
        part = part_size(cluster)
        first, second = (os.urandom(part) for _ in range(2))
        puts = []
        for number, data in enumerate((first, second)):
            sock, reader, welcome = authenticated(cluster)
            answer = ask(sock, reader, {"put": {
                "task_id": task_id, "attempt": attempt, "name": "together%d" % number,
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
            assert answer == {"ok": True, "have": 0}, answer    # both fit when they start
            puts.append((sock, reader, data))
        (sock, reader, data), (other, other_reader, other_data) = puts
        sock.sendall(data[:part - MIB])
        wait_for(lambda: files.partial_bytes(cluster.config) >= part - 2 * MIB, 20,
                 "the first put to be on disk")
        send_until_refused(other, len(other_data))
        assert json.loads(other_reader.readline())["error"]["code"] == "quota"
        sock.sendall(data[part - MIB:])
        assert json.loads(reader.readline()) == {"ok": True, "stored": True}
        for sock, _, _ in puts:
            sock.close()
        assert files_on_disk(cluster) <= QUOTA_MB * MIB
    ended(cluster, mallory, task_id, attempt)


def test_idle_connections_of_many_device_ids_lock_no_worker_out(cluster, tmp_path):
    """One join token makes up to 100 device ids, each allowed 16 connections
    to rc-files: 8 of them, idle, held all 128 and every worker's input
    fetch was refused ("cannot reach rc-files")."""
    held = []
    try:
        for number in range(transfer.MAX_CONNECTIONS // transfer.MAX_PER_DEVICE):
            device_id = "sybil%d" % number
            registered(cluster, device_id).close()
            for _ in range(transfer.MAX_PER_DEVICE):
                sock, _, welcome = authenticated(cluster, device_id)
                assert welcome == {"ok": True}
                held.append(sock)
        source = tmp_path / "in.txt"
        source.write_text("through rc-files\n")
        with unharmed(cluster, "good"):
            done = cluster.rc("submit", "--wait", "shell", "cat in.txt", "--input",
                              str(source), "--require", "device_id=good", check=False)
            assert done.returncode == 0 and done.stdout == "through rc-files\n", done.stderr
    finally:
        for sock in held:
            sock.close()


def test_strangers_on_many_addresses_lock_no_worker_out(cluster, tmp_path):
    """Connections that prove nothing are cut at auth_timeout and held at
    most 8 from one address; from 17 addresses, opened again as soon as
    they were cut, they kept all 128 of rc-files' connections."""
    per_address = cluster.config.max_unauthenticated_per_address
    addresses = ["127.0.0.%d" % (20 + n)
                 for n in range(transfer.MAX_CONNECTIONS // per_address + 1)]
    stop = threading.Event()

    def hold(address):
        while not stop.is_set():
            try:
                sock = socket.socket()
                sock.bind((address, 0))
                sock.connect(("127.0.0.1", cluster.config.files_port))
                sock.settimeout(0.5)
                while not stop.is_set():
                    try:
                        if not sock.recv(4096):
                            break            # cut: open another at once
                    except socket.timeout:
                        pass
            except OSError:
                pass
            finally:
                sock.close()
    holders = [threading.Thread(target=hold, args=(address,), daemon=True)
               for address in addresses for _ in range(per_address)]
    for holder in holders:
        holder.start()
    try:
        # Over INLINE_FILE_BYTES: it goes through rc-files, not with the task.
        source = tmp_path / "in.txt"
        source.write_bytes(b"past the strangers\n" * (2 * INLINE_FILE_BYTES // 19))
        time.sleep(1)
        with unharmed(cluster, "good"):
            done = cluster.rc("submit", "--wait", "shell", "wc -c < in.txt", "--input",
                              str(source), "--require", "device_id=good", check=False)
            assert done.returncode == 0, done.stderr
            assert int(done.stdout) == source.stat().st_size
            assert log_records(cluster, "rc-files", event="file_sent", device_id="good",
                               sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    finally:
        stop.set()
        for holder in holders:
            holder.join(5)


# -- a device names outputs nobody asked for --------------------------------------------

def test_a_device_stores_only_outputs_its_task_asked_for(cluster, mallory, tmp_path):
    """`rc get` and `rc map --into` (the current directory by default) write
    a task's outputs under their stored names: a device that could store
    any name would write ~/.bashrc or ~/.ssh/authorized_keys for a user
    who maps from their home directory."""
    task_id, attempt = mallory.take("sleep 60", "--output", "*.mp3")
    with unharmed(cluster, "good"):
        for name in (".bashrc", ".ssh/authorized_keys", "song.mp3/../../x", "a.mp3.sh"):
            sock, reader, answer = start_put(cluster, task_id, attempt, name, 3)
            assert answer["error"]["code"] == "bad_name", (name, answer)
            assert name[:40] in answer["error"]["message"]
            sock.close()
        data = b"ID3"
        sock, reader, welcome = authenticated(cluster)
        for name in ("song.mp3", "\x1b]2;owned\x07\x1b[2J.mp3"):   # a glob's, escapes and all
            answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                                "name": name, "size": len(data),
                                                "sha256": hashlib.sha256(data).hexdigest()}})
            assert answer in ({"ok": True, "have": 0}, {"ok": True, "have": 3}), answer
            if answer["have"] == 0:
                sock.sendall(data)
            assert json.loads(reader.readline()) == {"ok": True, "stored": True}
        sock.close()
    names = sorted(entry["name"] for entry in files.task_files(cluster.db, task_id))
    assert names == ["\x1b]2;owned\x07\x1b[2J.mp3", "song.mp3"]
    # rc get says what it wrote; a name's escape sequences never reach the terminal.
    got = cluster.rc("get", str(task_id), "-o", str(tmp_path / "got"))
    assert "\x1b" not in got.stdout and "\x07" not in got.stdout
    assert sorted(os.listdir(tmp_path / "got")) == names
    ended(cluster, mallory, task_id, attempt)


# -- a device's checkpoint, for the next attempt on another device ----------------------

def sparse_checkpoint(directory, apparent_bytes):
    """A checkpoint tar of a few KiB holding a sparse file `apparent_bytes`
    long (GNU tar's 'S' member): unpacked naively, every byte is written."""
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar here to make a sparse member")
    with open(os.path.join(directory, "big"), "wb") as f:
        f.truncate(apparent_bytes)
    with open(os.path.join(directory, "note.txt"), "w") as f:
        f.write("kept\n")
    subprocess.run([tar, "--sparse", "-cf", "checkpoint.tar", "big", "note.txt"],
                   cwd=directory, check=True)
    with open(os.path.join(directory, "checkpoint.tar"), "rb") as f:
        return f.read()


def test_a_checkpoint_cannot_blow_up_on_the_next_device(cluster, mallory, tmp_path):
    """A device hands a task back with a checkpoint of a few KiB whose sparse
    member says gigabytes: the next device, unpacking it into the task's
    $RC_CHECKPOINT_DIR, wrote every byte (a disk filled on each device the
    task moved to). Sparse members are left out like links."""
    apparent = 64 * MIB            # enough to see; the attack would say terabytes
    archive = sparse_checkpoint(str(tmp_path), apparent)
    assert len(archive) < 64 * 1024
    cluster.rc("label", "mallory", "pool=bomb")
    command = 'cd "$RC_CHECKPOINT_DIR" && ls -l && cat note.txt'
    task_id, attempt = mallory.take(command, "--require", "label.pool=bomb", pinned=False)
    with unharmed(cluster, "good"):
        sock, reader, _ = authenticated(cluster)
        answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                            "name": files.CHECKPOINT_NAME, "size": len(archive),
                                            "sha256": hashlib.sha256(archive).hexdigest()}})
        assert answer == {"ok": True, "have": 0}, answer
        sock.sendall(archive)
        assert json.loads(reader.readline()) == {"ok": True, "stored": True}
        sock.close()
        cluster.rc("label", "mallory", "pool=")
        cluster.rc("label", "good", "pool=bomb")
        frame = mallory.answer("task_result", {"task_id": task_id, "attempt": attempt,
                                               "status": "handed_back"})
        assert frame["message_type"] == "task_result_ack", frame
        wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in ("completed", "failed"),
                 60, "the next attempt on the good device")
    cluster.rc("label", "good", "pool=")
    task = tasks.get(cluster.db, task_id)
    assert task["device_id"] == "good" and task["state"] == "completed", task
    output = task["result"]["output"]
    assert "kept" in output and " big" not in output, output


@pytest.mark.parametrize("glob,name", [("*.mp3", "a.mp3"), ("*.mp3", "d/a.mp3"),
                                       ("**/*.mp3", "d/e/a.mp3"), ("**", "x/y"),
                                       ("out/*", "out/.bashrc"), ("*", ".bashrc"),
                                       ("a[!b]c", "abc"), ("/out/", "out")])
def test_rc_files_matches_output_globs_as_the_worker_does(glob, name):
    spec = importlib.util.spec_from_file_location("rc_worker_copy", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    parts = glob.strip("/").split("/")
    assert files.glob_match(parts, name.split("/")) == worker.glob_match(parts, name.split("/"))


# -- a device's result that is not text ------------------------------------------------

@pytest.mark.parametrize("result", [{"output": ["not", "text"]},
                                    {"output": "fine", "stderr": {"sha256": "0" * 64}},
                                    {"output": 7}])
def test_a_result_whose_output_is_not_text_is_refused(cluster, mallory, result):
    """rc map, rc submit --wait and rc group read output and stderr as
    text (a dict is even taken for a stored stream's entry): a device that
    sends anything else is refused, and the task is not completed with it."""
    task_id, attempt = mallory.take("echo hi")
    with unharmed(cluster, "good"):
        frame = mallory.answer("task_result", {"task_id": task_id, "attempt": attempt,
                                               "status": "completed", "result": result})
        assert error_code(frame) == "bad_request", frame
        assert "text" in frame["data"]["message"]
        assert tasks.get(cluster.db, task_id)["state"] == "running"
        frame = mallory.answer("task_result", {"task_id": task_id, "attempt": attempt,
                                               "status": "completed",
                                               "result": {"output": "hi\n"}})
        assert frame["message_type"] == "task_result_ack", frame
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "completed", 20,
             "the task to complete")
    done = cluster.rc("submit", "--wait", "echo", "x")       # the views still read
    assert done.returncode == 0
    assert "hi" in cluster.rc("task", str(task_id)).stdout


# -- a submitter's cron line ------------------------------------------------------------

@pytest.mark.parametrize("cron", ["\u00b2 * * * *", "*/\u00b2 * * * *", "1-\u00b9 * * * *"])
def test_a_cron_field_of_unicode_digits_is_a_400_not_a_500(cluster, cron):
    """str.isdigit() is true of '²', which int() refuses."""
    with unharmed(cluster, "good"):
        status, _, text = request(cluster, "/api/v1/schedules", "POST",
                                  {"name": "odd", "cron": cron, "task_type": "echo",
                                   "payload": "x"})
        assert status == 400, (status, text)
        assert "cron field" in text
        done = cluster.rc("schedule", "add", "odd", cron, "echo", "x", check=False)
        assert done.returncode != 0 and "cron field" in done.stderr, done.stderr
    assert cluster.db.execute("SELECT count(*) FROM schedules").fetchone()[0] == 0


def test_an_empty_batch_for_a_new_group_is_a_400_not_a_500(cluster):
    groups = cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0]
    with unharmed(cluster, "good"):
        status, _, text = request(cluster, "/api/v1/tasks?group=new", "POST", [])
        assert status == 400 and "a batch holds 1 to" in text, (status, text)
    assert cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0] == groups
