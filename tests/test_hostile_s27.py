"""Session 27's attacks on a running main node (127.0.0.1 only): a device
that joined with the token (it holds its own secret and the tasks it is
given), and what it can reach through rc-files, rc-web's streams and the
client. After each attack the programs keep their pids and a good worker's
tasks complete (hostile_harness.unharmed)."""
import base64
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import pytest

from cluster_harness import online, wait_for
from hostile_harness import unharmed
from rc import client, files, protocol, tasks, transfer
from rc.states import TERMINAL_STATES
from test_files_hostile import ask, authenticated
from test_bad_input import answered_or_closed
from test_hostile_round23 import HostileDevice, ended, mallory  # noqa: F401 (a fixture)
from test_hostile_web import request
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s27"), "good",
                                        auth_timeout=2.0):
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster


def good_counts(cluster, big, timeout):
    """The good worker's task counting the bytes of the input `big`, ended
    completed within `timeout` seconds; the task."""
    done = cluster.rc("submit", "shell", "wc -c < big.bin", "--input", str(big),
                      "--require", "device_id=good")
    task_id = int(done.stdout.strip())
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, timeout,
             "the good worker's task with a large input")
    task = tasks.get(cluster.db, task_id)
    assert task["state"] == "completed", task
    return task

def get_blob(cluster, sha256):
    """rc-files' first answer to mallory's get of a blob (and the connection)."""
    sock, reader, welcome = authenticated(cluster)
    assert welcome == {"ok": True}
    return sock, reader, ask(sock, reader, {"get": {"sha256": sha256}})


# -- a device reads a blob no task of its reads -------------------------------------------

def test_a_device_cannot_claim_a_blob_it_has_no_bytes_of_to_read_it(cluster, mallory, tmp_path):
    """rc-files stores nothing twice: a put of a blob the store holds is
    answered "have" at once, bytes unseen. A device that knew (or guessed:
    a well-known file, a config template with one secret in it) another
    user's input's SHA-256 put it as its own task's checkpoint, learning
    its size from the "is N bytes, not M" refusal, and then rc-files served
    it the blob: its task now "reads" that checkpoint. A blob a device may
    not read must come with its bytes, as rc-server's inline outputs must."""
    secret = b"the victim's private input: password=hunter2\n"
    path = tmp_path / "secret.txt"
    path.write_bytes(secret)
    sha256, size = hashlib.sha256(secret).hexdigest(), len(secret)
    victim = cluster.rc("submit", "shell", "cat secret.txt", "--input", str(path),
                        "--require", "device_id=good")
    victim_task = int(victim.stdout.strip())
    wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                        (victim_task,)).fetchone()[0] == "completed",
             30, "the victim's task")
    task_id, attempt = mallory.take("sleep 60")
    with unharmed(cluster, "good"):
        sock, reader, answer = get_blob(cluster, sha256)
        assert answer["error"]["code"] == "not_yours", answer     # as it should be
        sock.close()
        sock, reader, welcome = authenticated(cluster)
        wrong = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                           "name": files.CHECKPOINT_NAME, "size": size + 1,
                                           "sha256": sha256}})
        assert "is %d bytes" % size not in json.dumps(wrong), wrong   # no size oracle
        sock.close()
        for _ in range(50):     # "busy" until rc-files has seen the last connection go
            sock, reader, welcome = authenticated(cluster)
            claim = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                               "name": files.CHECKPOINT_NAME, "size": size,
                                               "sha256": sha256}})
            if claim.get("error", {}).get("code") != "busy":
                break
            sock.close()
            time.sleep(0.1)
        assert claim == {"ok": True, "have": 0}, claim     # the bytes are wanted
        sock.sendall(os.urandom(size))                      # not the victim's: refused
        assert "hash_mismatch" in reader.readline().decode()
        sock.close()
        sock, reader, answer = get_blob(cluster, sha256)
        assert answer["error"]["code"] == "not_yours", answer
        sock.close()
    kinds = [row[0] for row in cluster.db.execute(
        "SELECT kind FROM task_files WHERE task_id = ?", (task_id,))]
    assert kinds == [], kinds
    ended(cluster, mallory, task_id, attempt)


# -- transfers that barely move hold every rc-files connection ----------------------------

def slow_put(cluster, device_id, task_id, attempt):
    """A put of a checkpoint of 1 MiB, one byte of it sent: rc-files waits
    DATA_TIMEOUT for each next byte."""
    sock, reader, welcome = authenticated(cluster, device_id)
    assert welcome == {"ok": True}, welcome
    answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                        "name": files.CHECKPOINT_NAME, "size": MIB,
                                        "sha256": os.urandom(32).hex()}})
    assert answer == {"ok": True, "have": 0}, answer
    sock.sendall(b"x")
    return sock


def drip(socks, stop):
    """A byte on each connection every second: never idle, never moving."""
    while not stop.wait(1.0):
        for sock in list(socks):
            try:
                sock.sendall(b"x")
            except OSError:
                socks.remove(sock)


def test_transfers_that_barely_move_lock_no_worker_out_of_rc_files(cluster, tmp_path):
    """rc-files serves MAX_CONNECTIONS at once and, when full, hangs up only
    idle connections. A device that joined under eight ids (the join token
    makes as many as it likes), each holding a task, opened MAX_PER_DEVICE
    puts under each and sent a byte a second: no connection was idle, none
    timed out, and every worker's fetch was closed at once until its tries
    ran out, so a task with a large input failed. A transfer below
    MIN_TRANSFER_RATE past SLOW_GRACE now gives its slot up as an idle one."""
    ids = ["drip%d" % n for n in range(transfer.MAX_CONNECTIONS // transfer.MAX_PER_DEVICE)]
    devices = [HostileDevice(cluster, device_id) for device_id in ids]
    held = [(device, device.take("sleep 600")) for device in devices]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(files.INLINE_FILE_BYTES + 64 * 1024))   # through rc-files
    socks, stop = [], threading.Event()
    dripper = threading.Thread(target=drip, args=(socks, stop), daemon=True)
    try:
        with unharmed(cluster, "good"):
            for device, (task_id, attempt) in held:
                socks.extend(slow_put(cluster, device.device_id, task_id, attempt)
                             for _ in range(transfer.MAX_PER_DEVICE))
            dripper.start()
            time.sleep(transfer.SLOW_GRACE + 1)
            task = good_counts(cluster, big, 60)
            assert task["result"]["output"].strip() == str(big.stat().st_size), task
    finally:
        stop.set()
        if dripper.is_alive():
            dripper.join(30)    # a socket closed under its sendall: its fd reused
        for sock in list(socks):
            sock.close()
        for device, (task_id, attempt) in held:
            cluster.rc("cancel", str(task_id))
            device.send("task_result", {"task_id": task_id, "attempt": attempt,
                                        "status": "cancelled"})
        for device, (task_id, attempt) in held:
            wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "cancelled", 20,
                     "task %d to be cancelled" % task_id)
            device.sock.close()
        files.clean_partials(cluster.db, cluster.config, time.time() + 120)
        assert files.partial_bytes(cluster.config) == 0


# -- Range at the limits -----------------------------------------------------------------

def test_a_range_of_thousands_of_digits_is_answered_as_any_other(cluster):
    """Python will not read an int of more than 4,300 digits: a Range
    header with one made GET /api/v1/tasks/ID/files/NAME a 500 (a
    ValueError out of byte_range, its blob left open). A start past any
    file is a 416; an end or a suffix past it means the whole file."""
    done = cluster.rc("submit", "shell", "printf 0123456789 > out.txt", "--output", "out.txt",
                      "--require", "device_id=good")
    task_id = int(done.stdout.strip())
    wait_for(lambda: files.task_file(cluster.db, task_id, "out.txt"), 30, "the output")
    path = "/api/v1/tasks/%d/files/out.txt" % task_id
    many = "9" * 5000
    with unharmed(cluster, "good"):
        status, _, text = request(cluster, path, headers={"Range": "bytes=%s-" % many})
        assert status == 416, (status, text)
        for header in ("bytes=0-%s" % many, "bytes=-%s" % many):
            status, headers, text = request(cluster, path, headers={"Range": header})
            assert (status, text) == (206, "0123456789"), (status, text)
            assert headers["Content-Range"] == "bytes 0-9/10"


def test_a_task_id_past_what_sqlite_holds_names_no_files(cluster):
    """The file routes read their task id with bottle's int filter, not
    rc-web's id filter: an id past 2**63 reached SQLite, which cannot hold
    it (OverflowError, a 500), and a negative one was looked up."""
    with unharmed(cluster, "good"):
        for task_id in ("9" * 30, "-1"):
            for path in ("/api/v1/tasks/%s/files", "/api/v1/tasks/%s/files/out.txt"):
                status, _, text = request(cluster, path % task_id)
                assert status == 404, (path % task_id, status, text)


# -- the client: what a task's data can make it do -------------------------------------------

def checksum_with_a_tool(data):
    """A user's function for the Executor: a tool run on data from elsewhere
    (a web page, a file a stranger sent), its report on stdout as tools do."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", "import sys; sys.stdout.write(sys.argv[1] + '.' * 2"
                    "000000)", data], check=True)
    return len(data)


class Planted:
    """What the stranger's data unpickles to: a directory made in the client."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_tools_output_cannot_pose_as_the_result_the_client_unpickles(cluster, tmp_path):
    """Executor results come back as a line of the task's stdout that the
    client unpickles; the function's prints go to stderr, but a tool it runs
    writes to the task's stdout itself. Data holding that line, then more
    than the output cap, had the real line cut off and the forged one
    unpickled in the user's program (a directory made here; any code could
    have run). The runner now points descriptor 1 at stderr for the
    function, keeping stdout for its own line."""
    planted = str(tmp_path / "planted-by-the-data")
    forged = "\n%s%s\n" % (client.RESULT_MARK, base64.b64encode(
        pickle.dumps([(0, Planted(planted))], 4)).decode())
    url = "http://127.0.0.1:%d" % cluster.config.web_port
    with unharmed(cluster, "good"):
        with client.Executor(url, cluster.admin_token, requirements={"device_id": "good"}) as ex:
            future = ex.submit(checksum_with_a_tool, forged)
            try:
                value = future.result(timeout=60)
            except Exception as e:
                value = e
        assert not os.path.exists(planted), "the data's pickle ran in the client"
        assert value == len(forged), value


# -- output globs and dotfiles ------------------------------------------------------------

def put_small(cluster, task_id, attempt, name, data):
    """mallory's put of `data` as `name`: rc-files' last answer."""
    sock, reader, welcome = authenticated(cluster)
    try:
        answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                            "name": name, "size": len(data),
                                            "sha256": hashlib.sha256(data).hexdigest()}})
        if answer.get("have") == 0:
            sock.sendall(data)
            answer = json.loads(reader.readline())
        return answer
    finally:
        sock.close()


def test_a_glob_of_everything_does_not_bring_back_dotfiles(cluster, mallory, tmp_path):
    """`rc map ... --output '*'` (or '**/*.txt') and `rc get` write outputs
    where the user runs them. `*` matched `.bashrc` and `**` went into
    `.ssh/`, unlike a shell's glob: a device holding such a task wrote the
    user's shell start-up file or SSH keys. As in a shell, a wildcard
    matches a leading "." only when the pattern's part starts with one."""
    task_id, attempt = mallory.take("sleep 60", "--output", "*", "--output", "**/*.txt",
                                    "--output", ".keep/*")
    with unharmed(cluster, "good"):
        for name in (".bashrc", ".ssh/authorized_keys.txt", "a/.config/x.txt", ".keep/.x"):
            answer = put_small(cluster, task_id, attempt, name, b"echo owned\n")
            assert answer.get("error", {}).get("code") == "bad_name", (name, answer)
        for name in ("notes.txt", "a/b/notes.txt", ".keep/x", "x.bashrc"):
            assert put_small(cluster, task_id, attempt, name, name.encode()) == \
                {"ok": True, "stored": True}, name
    ended(cluster, mallory, task_id, attempt)
    # The worker brings back what rc-files takes: no dotfile for '*'.
    done = cluster.rc("submit", "shell", "echo a > .profile; echo b > seen; echo c > .kept",
                      "--output", "*", "--output", ".kept", "--require", "device_id=good")
    good_task = int(done.stdout.strip())
    wait_for(lambda: tasks.get(cluster.db, good_task)["state"] in TERMINAL_STATES, 30,
             "the good device's task")
    names = sorted(entry["name"] for entry in files.task_files(cluster.db, good_task)
                   if entry["kind"] == files.OUTPUT)
    assert names == [".kept", "seen"], names


# -- a checkpoint that cannot be unpacked ----------------------------------------------------

def duplicate_member_tar():
    """A tar holding the same file name twice (tar itself takes the last)."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for text in (b"first\n", b"second\n"):
            member = tarfile.TarInfo("state.txt")
            member.size = len(text)
            archive.addfile(member, io.BytesIO(text))
    return buffer.getvalue()


def archive_digest(data):
    return hashlib.sha256(data).hexdigest()


def long_path_tar():
    """A tar whose one file lies deeper than a path may be long (PATH_MAX)."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("d/" * 2500 + "state.txt")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"ok\n"))
    return buffer.getvalue()


@pytest.mark.parametrize("archive", [b"not a tar at all\n" * 10, duplicate_member_tar(),
                                     long_path_tar()],
                         ids=["not-a-tar", "a-name-twice", "a-path-too-long"])
def test_a_checkpoint_that_cannot_be_unpacked_fails_no_later_attempt(cluster, mallory,
                                                                     archive):
    """A device hands a task back with a checkpoint that is not a tar, or
    names a file twice: each next attempt, on every good device, failed
    while unpacking it, so one device made the task fail everywhere (a
    failure it reported itself would have been retried). Such a
    checkpoint is set aside (the worker logs checkpoint_set_aside) and the
    attempt starts afresh, as a first one does."""
    cluster.rc("label", "mallory", "pool=ckpt")
    command = 'ls "$RC_CHECKPOINT_DIR"; cat "$RC_CHECKPOINT_DIR"/state.txt; echo ran'
    task_id, attempt = mallory.take(command, "--require", "label.pool=ckpt", pinned=False)
    try:
        with unharmed(cluster, "good"):
            answer = put_small(cluster, task_id, attempt, files.CHECKPOINT_NAME, archive)
            assert answer == {"ok": True, "stored": True}, answer
            cluster.rc("label", "mallory", "pool=")
            cluster.rc("label", "good", "pool=ckpt")
            frame = mallory.answer("task_result", {"task_id": task_id, "attempt": attempt,
                                                   "status": "handed_back"})
            assert frame["message_type"] == "task_result_ack", frame
            wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, 60,
                     "the next attempt on the good device")
    finally:
        cluster.rc("label", "good", "pool=")
        cluster.rc("label", "mallory", "pool=")
    task = tasks.get(cluster.db, task_id)
    assert task["device_id"] == "good" and task["state"] == "completed", task
    assert "ran" in task["result"]["output"], task
    with open(cluster.worker_log("good"), encoding="utf-8", errors="replace") as log:
        assert archive_digest(archive) in [json.loads(line).get("sha256") for line in log
                                           if "checkpoint_set_aside" in line]


# -- a task's directory deeper than Python's recursion limit ------------------------------

DEEP_TREE = ("python3 -c \"import os\nfor _ in range(%d): os.mkdir('d'); os.chdir('d')\n"
             "open('f', 'w').close()\"; echo made")


@pytest.mark.parametrize("where", [".", "$RC_CHECKPOINT_DIR"], ids=["task-dir", "checkpoint"])
def test_a_task_directory_deeper_than_the_recursion_limit_harms_no_worker(cluster, where):
    """A task leaves directories nested past Python's recursion limit in its
    own directory (or its checkpoint directory): the worker walks them with
    os.fwalk, which recurses, to remove (or tar) them."""
    depth = sys.getrecursionlimit() * 3
    pid = cluster.workers["good"].pid
    with unharmed(cluster, "good"):
        done = cluster.rc("submit", "shell", "cd %s && %s" % (where, DEEP_TREE % depth),
                          "--require", "device_id=good")
        task_id = int(done.stdout.strip())
        wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, 60,
                 "the deep task")
        assert "made" in tasks.get(cluster.db, task_id)["result"]["output"]
    assert cluster.workers["good"].poll() is None and cluster.workers["good"].pid == pid
    # ... and removed it all (the deepest file too), within a few seconds.
    root = task_root(cluster, "good")
    wait_for(lambda: not subprocess.run(["find", root, "-name", "f"], stdout=subprocess.PIPE,
                                        universal_newlines=True).stdout, 10, "the tree to go")


def task_root(cluster, device_id):
    """Where the worker makes its tasks' directories (its task_sandbox log line)."""
    with open(cluster.worker_log(device_id), encoding="utf-8", errors="replace") as log:
        return [json.loads(line)["task_dirs"] for line in log
                if '"task_sandbox"' in line][-1]


FORGE = r"""
import json, os, sys, time
victim = int(sys.argv[1])
frame = {"message_type": "task_result", "sender_id": "good", "timestamp": time.time(),
         "message_id": "f" * 16, "data": {"task_id": victim, "attempt": 1,
         "status": "completed", "error": None, "result": {"output": "forged by another task",
         "stderr": "", "exit_code": 0, "execution_time": 0.1, "cpu_time": 0.0,
         "peak_memory_kb": None, "truncated": False}}}
open(b"\xff.txt", "wb").write(b"x")
open("ok.txt", "wb").write(b"\n" + json.dumps(frame).encode() + b"\n")
print("made")
"""


def test_an_output_name_that_is_not_utf8_smuggles_no_frame(cluster, tmp_path, drop_dir):
    """A task leaves a file whose name is not UTF-8 (any bytes but / and NUL
    make a Linux name) where its --output glob looks: the worker sent the
    name as a lone surrogate, rc-server refused the task_result frame as
    not JSON, and went on to read the raw bytes of its small files as
    frames of the device. A file of the task holding a task_result line
    then finished another task running on the same device, with output of
    the attacker's choosing (and the attacker's own result never came).
    The worker now refuses such a name, and rc-server hangs up on a frame
    it cannot read that has raw bytes behind it. The victim runs until the
    forging task has ended (a file the test makes then), not a fixed 4 s
    that a slow machine could outlast."""
    script = tmp_path / "forge.py"
    script.write_text(FORGE)
    forged = drop_dir / "forging-task-ended"
    pid = cluster.workers["good"].pid
    with unharmed(cluster, "good"):
        victim = int(cluster.rc(
            "submit", "shell", "for n in $(seq 1200); do test -e %s && break; sleep 0.1; done;"
            " echo genuine" % forged, "--require", "device_id=good").stdout.strip())
        wait_for(lambda: tasks.get(cluster.db, victim)["state"] == "running", 20, "the victim")
        done = cluster.rc("submit", "shell", "python3 forge.py %d" % victim, "--input",
                          str(script), "--output", "*.txt", "--require", "device_id=good")
        task_id = int(done.stdout.strip())
        wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, 30,
                 "the forging task")
        assert tasks.get(cluster.db, victim)["state"] == "running", \
            tasks.get(cluster.db, victim)
        forged.touch()
        wait_for(lambda: tasks.get(cluster.db, victim)["state"] in TERMINAL_STATES, 30,
                 "the victim")
        assert "genuine" in tasks.get(cluster.db, victim)["result"]["output"], \
            tasks.get(cluster.db, victim)
        task = tasks.get(cluster.db, task_id)
        assert task["state"] == "completed" and "made" in task["result"]["output"], task
        assert "not UTF-8" in task["result"]["stderr"], task
    assert cluster.workers["good"].poll() is None and cluster.workers["good"].pid == pid
    names = [entry["name"] for entry in files.task_files(cluster.db, task_id)
             if entry["kind"] == files.OUTPUT]
    assert names == ["ok.txt"], names


def test_rc_server_reads_no_frame_from_the_raw_bytes_of_a_frame_it_cannot_read(cluster):
    """What the test above showed, for a worker of an older copy (devices
    keep theirs): a task_result that is not JSON but says "inline_bytes"
    has raw bytes behind it whose end is unknown; rc-server read them as
    the device's frames. Now it hangs up."""
    device = HostileDevice(cluster, "old-copy")
    wait_for(lambda: "old-copy" in online(cluster), 20, "the old copy to be online")
    task_id, attempt = device.take("sleep 60")
    forged = protocol.encode("task_result", {
        "task_id": task_id, "attempt": attempt, "status": "completed", "error": None,
        "result": {"output": "smuggled", "stderr": "", "exit_code": 0}},
        sender_id="old-copy")
    unreadable = b'{"message_type": "task_result", "data": {"inline_bytes": %d, "files_inline":' \
                 b' [{"name": "\xff.txt", "size": %d}]}}\n' % (len(forged) + 1, len(forged) + 1)
    with unharmed(cluster, "good"):
        device.sock.sendall(unreadable + b"\n" + forged)
        frames = []
        while True:
            frame = answered_or_closed(device.sock)
            if frame is None:
                break
            frames.append(frame["message_type"])
            assert frame["message_type"] != "task_result_ack", frames
        time.sleep(0.5)
        assert tasks.get(cluster.db, task_id)["state"] != "completed"
    device.sock.close()
    cluster.rc("cancel", str(task_id))


# -- connections reset at every step of rc-files' handshake ---------------------------------

def reset(sock):
    """Close with a TCP reset (SO_LINGER 0), as a peer that vanished mid-step."""
    import struct
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_connections_reset_mid_handshake_lock_no_worker_out(cluster, tmp_path):
    """Each connection counts against its address until it proves a device
    (max_unauthenticated_per_address): connections reset before TLS, in
    the middle of it, after it, and in the middle of the auth line must
    each give their count back, or the address (here the good worker's)
    is locked out of rc-files."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    rounds = cluster.config.max_unauthenticated_per_address * 3
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(files.INLINE_FILE_BYTES + 1024))
    with unharmed(cluster, "good"):
        for n in range(rounds):
            sock = socket.create_connection(("127.0.0.1", cluster.config.files_port), timeout=5)
            step = n % 4
            if step == 1:         # half a ClientHello
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
            elif step >= 2:
                sock = context.wrap_socket(sock)
                sock.makefile("rb").readline()          # the hello
                if step == 3:
                    sock.sendall(b'{"auth": {"device_id": "good", "non')
            reset(sock)
        good_counts(cluster, big, 30)


# -- checkpoints replaced, kept for the whole retention --------------------------------------

def test_a_replaced_checkpoint_does_not_hold_the_quota_for_the_retention(cluster, mallory):
    """A task's checkpoint replaces its last one, which no attempt will read
    again; but its blob stayed, counted against files_quota_mb, until
    files_retention_days (30) after it was stored. A device holding one
    task put checkpoint after checkpoint of fresh bytes and filled the
    quota for a month: every upload and output of every user refused. (A
    long task checkpointing 100 MB every 5 minutes did the same in a
    day.) A replaced checkpoint now goes at the next sweep."""
    task_id, attempt = mallory.take("sleep 60")
    digests = []
    with unharmed(cluster, "good"):
        for _ in range(4):
            data = os.urandom(512 * 1024)
            answer = put_small(cluster, task_id, attempt, files.CHECKPOINT_NAME, data)
            assert answer == {"ok": True, "stored": True}, answer
            digests.append(hashlib.sha256(data).hexdigest())
        files.sweep(cluster.db, cluster.config, time.time())      # rc-reaper's, each minute
        assert [files.exists(cluster.db, digest) for digest in digests] == \
            [False, False, False, True]
        assert tasks.get(cluster.db, task_id)["payload"]["checkpoint"]["sha256"] == digests[-1]
    ended(cluster, mallory, task_id, attempt)


def test_an_output_put_again_does_not_hold_the_quota_for_the_retention(cluster, mallory):
    """The same for an output: put again under its name (any task with one
    --output), the bytes it replaced stayed for files_retention_days."""
    task_id, attempt = mallory.take("sleep 60", "--output", "result.txt")
    digests = []
    with unharmed(cluster, "good"):
        for _ in range(3):
            data = os.urandom(512 * 1024)
            answer = put_small(cluster, task_id, attempt, "result.txt", data)
            assert answer == {"ok": True, "stored": True}, answer
            digests.append(hashlib.sha256(data).hexdigest())
        files.sweep(cluster.db, cluster.config, time.time())
        assert [files.exists(cluster.db, digest) for digest in digests] == [False, False, True]
        assert files.task_file(cluster.db, task_id, "result.txt")["sha256"] == digests[-1]
    ended(cluster, mallory, task_id, attempt)


def test_an_upload_that_ends_after_its_attempt_does_not_hold_the_quota(cluster, mallory):
    """A put admitted while the device held its attempt, whose last byte
    comes after the attempt ended (the device finished the task on its
    rc-server connection meanwhile): the blob is placed and refused as
    stale, with no task's row; its own row said it was used just now, so
    it counted against files_quota_mb for files_retention_days. A device
    could leave up to the room left behind each task it held. Now the
    next sweep takes it."""
    task_id, attempt = mallory.take("sleep 60", "--output", "late.bin")
    data = os.urandom(512 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with unharmed(cluster, "good"):
        sock, reader, welcome = authenticated(cluster)
        answer = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                            "name": "late.bin", "size": len(data),
                                            "sha256": digest}})
        assert answer == {"ok": True, "have": 0}, answer
        sock.sendall(data[:-1])
        cluster.rc("cancel", str(task_id))
        mallory.send("task_result", {"task_id": task_id, "attempt": attempt,
                                     "status": "cancelled"})
        wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "cancelled", 20,
                 "task %d to be cancelled" % task_id)
        sock.sendall(data[-1:])
        answer = json.loads(reader.readline())
        assert answer["error"]["code"] == "stale_attempt", answer
        sock.close()
        files.sweep(cluster.db, cluster.config, time.time())
        assert not files.exists(cluster.db, digest)
