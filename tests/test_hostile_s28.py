"""Session 28's attacks on a running main node (127.0.0.1 only): a task
that checkpoints a sparse file, a device that half-closes its connection
and reads nothing, a main node whose result stream a client refuses.
After each attack the programs keep their pids and a good worker's tasks
complete (hostile_harness.unharmed)."""
import json
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile
import threading
import time

import pytest

from cluster_harness import wait_for
from hostile_harness import unharmed
from rc import client, files, server, tasks
from rc.states import TERMINAL_STATES
from test_bad_input import read_frame, register_frame
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s28"), "good",
                                        auth_timeout=2.0):
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory):
    """The same with TLS off: rc-server's plain sends."""
    yield from with_the_good_worker(tmp_path_factory.mktemp("hostile-s28-plain"), "good",
                                    auth_timeout=2.0, tls=False)


@pytest.fixture(params=["tls", "plain"])
def either_cluster(request):
    return request.getfixturevalue("cluster" if request.param == "tls" else "plain_cluster")


def ended(cluster, task_id, timeout=60):
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, timeout,
             "task %d to end" % task_id)
    return tasks.get(cluster.db, task_id)


# -- a sparse file in the checkpoint directory ----------------------------------------------

def failed_on_the_good_worker(cluster, command):
    """The id of a shell task run once on the good worker, failed (so its
    checkpoint goes up), the cluster unharmed meanwhile."""
    with unharmed(cluster, "good"):
        done = cluster.rc("submit", "shell", command, "--require", "device_id=good",
                          "--retries", "0")
        task_id = int(done.stdout.strip())
        assert ended(cluster, task_id)["state"] == "failed"
    return task_id


def test_a_sparse_file_in_a_checkpoint_costs_what_it_holds_not_its_apparent_size(cluster):
    """A task truncates a file in $RC_CHECKPOINT_DIR to 1 GiB (a terabyte
    costs the task no more): a few blocks on the device's disk. The worker
    tarred it at its apparent size, zeros and all, into its cache, hashed
    it and sent it to rc-files: the main node's quota and disk, and the
    link, paid for bytes the task never wrote. A file with more than
    CHECKPOINT_HOLES_MAX (64 MiB) of holes is left out of the checkpoint;
    the task's real files go up as before, and so does one with a few
    holes (an array mapped from a file, half written)."""
    command = ('cd "$RC_CHECKPOINT_DIR" && echo kept > real.txt && truncate -s 1G holes.bin'
               ' && echo start > few.bin && truncate -s 1M few.bin && exit 3')
    task_id = failed_on_the_good_worker(cluster, command)
    row = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                             " AND kind = 'checkpoint'", (task_id,)).fetchone()
    assert row is not None, "the checkpoint of the failed attempt was not stored"
    assert row[1] < 2 * MIB, "a checkpoint of %d bytes for 11 bytes written" % row[1]
    with tarfile.open(files.blob_path(cluster.config, row[0])) as archive:
        names = archive.getnames()
        assert "real.txt" in names and "holes.bin" not in names, names
        assert archive.extractfile("real.txt").read() == b"kept\n"
        few = archive.extractfile("few.bin").read()
        assert len(few) == MIB and few.startswith(b"start\n") and not few[6:].strip(b"\0")



def test_a_checkpoint_of_a_myriad_empty_files_is_not_sent(cluster):
    """A task leaves 12,000 empty files in $RC_CHECKPOINT_DIR: inodes, no
    data. The worker listed each in the checkpoint's signature, held a
    tar member for each, and sent a tar of 512 bytes a file (6 MB here,
    half a GB for a million) to the main node's quota and disk. Past
    CHECKPOINT_MAX_ENTRIES (10,000) the checkpoint is not sent, and says
    why in the worker's log. (12,000 is past the cap as 30,000 was, at
    less than half the files for the task to make and the worker to
    remove.)"""
    command = ('cd "$RC_CHECKPOINT_DIR" && python3 -c "import os\nfor n in range(12000):'
               ' os.close(os.open(str(n), os.O_CREAT | os.O_WRONLY))" && exit 3')
    task_id = failed_on_the_good_worker(cluster, command)
    row = cluster.db.execute("SELECT size FROM task_files WHERE task_id = ?"
                             " AND kind = 'checkpoint'", (task_id,)).fetchone()
    assert row is None, "a checkpoint of %d bytes for 12,000 empty files" % row[0]
    with open(cluster.worker_log("good"), encoding="utf-8", errors="replace") as log:
        refusals = [json.loads(line) for line in log if '"checkpoint_not_sent"' in line]
    assert any(line.get("task_id") == task_id and "more than 10000" in line.get("error", "")
               for line in refusals), refusals


def test_a_checkpoint_tar_of_a_myriad_members_is_set_aside_not_unpacked(memory_dir):
    """The other way: a device hands back a checkpoint tar of 10,001 empty
    members (the next device's tarfile held each, and made each file).
    It is set aside, and the attempt starts afresh. (In memory_dir: the
    10,000 files restore_checkpoint makes, and removes when it sets the
    tar aside, cost seconds on this VM's disk.)"""
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    tmp_path = memory_dir
    archive_path = tmp_path / "checkpoint.tar"
    with tarfile.open(str(archive_path), "w") as archive:
        for number in range(worker.CHECKPOINT_MAX_ENTRIES + 1):
            archive.addfile(tarfile.TarInfo(str(number)))
    directory = tmp_path / "restored"
    directory.mkdir()
    worker.restore_checkpoint(str(archive_path), str(directory), "0" * 64)
    assert list(directory.iterdir()) == []


@pytest.fixture
def memory_dir(tmp_path):
    """A directory in memory (tmpfs) when the machine has one: 200,000 files
    are made there in 2 s, not the 20 s to 30 s of this VM's disk, and what
    the worker lists of them is the same."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="rc-test-", dir="/dev/shm")
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_looking_at_a_checkpoint_of_a_myriad_files_costs_the_worker_no_list_of_them(
        memory_dir):
    """Whether the checkpoint changed is looked at every --checkpoint-every:
    os.walk listed all 200,000 names of the directory at once (~15 MB in
    the worker, per look, for a task's `touch`), to find them past the cap."""
    import tracemalloc
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    directory = memory_dir / "checkpoint"
    directory.mkdir()
    for number in range(200000):
        os.close(os.open(str(directory / str(number)), os.O_CREAT | os.O_WRONLY, 0o600))
    tracemalloc.start()
    try:
        assert worker.checkpoint_signature(str(directory)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, "%.1f MiB to find a checkpoint too large" % (peak / MIB)

# -- a device that half-closes and reads nothing ----------------------------------------------

def device_that_reads_nothing(cluster, device_id):
    """A device joined with the token (its receive buffer left as it is:
    one made smaller on an open connection still takes bytes now and then)."""
    sock = cluster.connect(timeout=10)
    nonce = read_frame(sock, timeout=10)["data"]["nonce"]
    sock.sendall(register_frame(cluster, nonce, device_id, task_types=["shell"], slots=1))
    assert read_frame(sock, timeout=10)["message_type"] == "register_ack"
    return sock


def send_until_backed_up(sock, line, seconds=20.0):
    """Send `line` 2,000 at a time, within rc-server's message rate, until
    it stops reading (its answers backed up: see Server.watch), or for
    `seconds`; whether it stopped."""
    sock.settimeout(1.0)
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        try:
            sock.sendall(line * 2000)
        except socket.timeout:
            return True
        time.sleep(0.25)
    return False


def connected(cluster, device_id):
    return cluster.db.execute("SELECT connected FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()[0] == 1


def test_a_device_that_half_closes_and_reads_nothing_is_let_go_soon(either_cluster):
    """A device sends frames that each earn an error answer until
    rc-server stops reading it (its answers backed up), ends its sending
    (shutdown SHUT_WR) and never reads a byte: rc-server, reading it no
    more, never saw the half-close, and kept the connection, and MiBs of
    answers for it, for as long as the device liked (HALF_CLOSED_GRACE,
    30 s, when it saw one). A peer that takes no byte of what it is owed
    for STALLED_READER_SECONDS (10 s) is closed then."""
    cluster = either_cluster
    with unharmed(cluster, "good"):
        sock = device_that_reads_nothing(cluster, "eve")
        try:
            wait_for(lambda: connected(cluster, "eve"), 10, "eve online")
            backed_up = send_until_backed_up(sock, b"not a frame, %s\n" % (b"x" * 200))
            assert backed_up, "rc-server kept reading: its answers did not back up"
            sock.shutdown(socket.SHUT_WR)
            ended_at = time.monotonic()
            wait_for(lambda: not connected(cluster, "eve"), 25, "eve let go")
            held = time.monotonic() - ended_at
        finally:
            sock.close()
    assert held < 18, "a half-closed device that read nothing was kept %.1f s" % held
    server_log = os.path.join(cluster.home, "log", "rc-server.log")
    with open(server_log, encoding="utf-8", errors="replace") as log:
        reasons = [json.loads(line).get("reason", "") for line in log
                   if '"device_disconnected"' in line and '"eve"' in line]
    assert reasons and "took no byte" in reasons[-1], reasons



def test_a_device_that_reads_its_answers_slowly_over_tls_keeps_its_connection(cluster):
    """The other side of the rule above: a device on a slow link, MiBs
    behind, that takes its answers at ~250 KB/s is not a stalled reader.
    Over TLS a send returns nothing until all it was handed is written,
    so rc-server hands it WRITE_SLICE bytes at a time and sees each go."""
    assert cluster.config.tls
    sock = device_that_reads_nothing(cluster, "slow")
    try:
        assert send_until_backed_up(sock, b"not a frame, %s\n" % (b"x" * 200))
        sock.settimeout(5)
        taken, until = 0, time.monotonic() + 1.5 * server.STALLED_READER_SECONDS
        while time.monotonic() < until:
            for _ in range(16):         # 16 KiB, as rc-server's small TLS records come
                piece = sock.recv(1024)
                assert piece, "rc-server closed a device that was reading (%d bytes)" % taken
                taken += len(piece)
            time.sleep(0.05)
        assert connected(cluster, "slow")
    finally:
        sock.close()

# -- a main node whose result stream the client refuses -----------------------------------

class StreamProxy:
    """A proxy in front of rc-web (127.0.0.1, a port of its own) that
    passes every request on, but hands a group's result stream to
    answer_stream; it counts the streams opened."""

    def __init__(self, web_port):
        self.web_port, self.opened = web_port, 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.connections = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return
            head += chunk
        upstream = socket.create_connection(("127.0.0.1", self.web_port))
        self.connections.append(upstream)
        if head.startswith(b"GET /api/v1/groups/") and b"stream=1" in head.split(b"\r\n")[0]:
            self.opened += 1
            self.answer_stream(sock, head, upstream)
            return
        upstream.sendall(head)
        threading.Thread(target=self.pipe, args=(upstream, sock), daemon=True).start()
        self.pipe(sock, upstream)

    def answer_stream(self, sock, head, upstream):
        raise NotImplementedError

    @staticmethod
    def pipe(source, target):
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for sock in self.connections:
            sock.close()


class RefusingStreams(StreamProxy):
    """Answers a result stream itself, with a line no client takes."""

    def __init__(self, web_port, line):
        StreamProxy.__init__(self, web_port)
        self.line = line

    def answer_stream(self, sock, head, upstream):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                     % (len(self.line), self.line))
        # left open, as a stream is


class CoalescingStreams(StreamProxy):
    """Passes a result stream on, its head in the same packet as its first
    task's record (as TCP, a proxy or a busy server may well send them)."""

    def answer_stream(self, sock, head, upstream):
        upstream.sendall(head)
        answer = b""
        while b'"task_id"' not in answer:
            chunk = upstream.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.sendall(answer)
        self.pipe(upstream, sock)


@pytest.mark.parametrize("line", [b"{this is not JSON}\n", b"[\"task_id\"]\n"],
                         ids=["not-json", "not-a-record"])
def test_a_refused_result_stream_is_given_up_with_a_clear_error_not_reopened_for_ever(
        cluster, line, monkeypatch):
    """The main node (or what stands between) answers a group's result
    stream with a line the client refuses: the client opened the stream
    again every RECONNECT_DELAY (0.5 s), for as long as the task was
    pending, and the caller waited for ever. It backs off (doubling the
    wait), and after STREAM_REFUSALS_MAX refusals in a row the futures
    still waiting fail with a ClusterError naming the refusal. (A line of
    JSON that is not a record, a list naming task_id, raised TypeError in
    whichever thread read it: the caller waited for ever.) The first wait
    is made 0.05 s here (the client in this process): the backoff still
    doubles, and the refusals are as many, in 0.75 s not the default 7.5 s."""
    monkeypatch.setattr(client, "RECONNECT_DELAY", 0.05)
    proxy = RefusingStreams(cluster.config.web_port, line)
    try:
        with client.Cluster(proxy.url, cluster.admin_token) as remote:
            future = remote.submit("shell", "echo never", requirements={"device_id": "nobody"})
            started = time.monotonic()
            with pytest.raises(client.ClusterError) as refused:
                future.result(timeout=30)
            took = time.monotonic() - started
            remote.cancel(future.task_id)
    finally:
        proxy.close()
    assert "refused %d times" % client.STREAM_REFUSALS_MAX in str(refused.value), refused.value
    assert repr(line.rstrip(b"\n")) in str(refused.value), refused.value
    assert proxy.opened <= client.STREAM_REFUSALS_MAX, proxy.opened
    assert took < 20, took
    assert tasks.get(cluster.db, future.task_id)["state"] == "cancelled"


def test_a_result_that_comes_in_the_packet_of_its_streams_head_is_taken_at_once(cluster):
    """The client's ResultStream took the bytes that came with the
    answer's head for a body not yet decoded, and so waited for the next
    bytes (rc-web's ping, every 15 s) before it saw the result already in
    hand."""
    proxy = CoalescingStreams(cluster.config.web_port)
    try:
        with client.Cluster(proxy.url, cluster.admin_token) as remote:
            future = remote.submit("shell", "echo in-hand", requirements={"device_id": "good"})
            assert future.result(timeout=10) == "in-hand\n"
    finally:
        proxy.close()
    assert proxy.opened >= 1
