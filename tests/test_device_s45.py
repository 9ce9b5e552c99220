"""The worker as it lives on a phone and a Pi (session 45), on one real
cluster: killed by the OOM killer, frozen, its disk small. Moments are caught
as test_chaos_files catches them (the program halted and let run a moment at
a time until what it leaves on the disk shows it is there)."""
import contextlib
import hashlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cluster_harness import WORKER, Cluster, on_a_free_port, online, private, rc_files_on
from cluster_harness import wait_for
from test_chaos_files import terminal_once
from test_worker import INTERPRETERS

pytestmark = pytest.mark.e2e

PHONE = "phone45"
CACHE_MB = 4        # a phone's small --cache-mb
MIB = 1048576


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("device45"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # tasks go to this module's workers
        yield cluster
    finally:
        cluster.stop()


def start_phone(cluster):
    process = cluster.start_worker(PHONE, "--slots", "2", "--cache-mb", str(CACHE_MB))
    wait_for(lambda: PHONE in online(cluster), 30, "the phone online")
    return process


def submit(cluster, *arguments):
    return int(cluster.rc("submit", *arguments, "--require", "device_id=%s" % PHONE).stdout)


def cache_bytes(cluster):
    """Bytes under the phone's cache directory, partial fetches included."""
    total = 0
    for folder, _, names in os.walk(os.path.join(cluster.home, "worker-state", "cache")):
        total += sum(os.lstat(os.path.join(folder, name)).st_size for name in names)
    return total


class StallingLink:
    """A TCP relay on 127.0.0.1 that can stall (relay nothing, close
    nothing: a Wi-Fi link gone quiet) and come back: what each side sent
    meanwhile arrives late, as TCP would retransmit it."""

    def __init__(self, port, target_port):
        self.target_port, self.stalled, self.relayed = target_port, False, 0
        self.stall_after, self.stalled_at = None, None     # bytes; time.monotonic()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.sockets = [self.listener]
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:     # closed
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:     # nothing behind it: a link to a server that is down
                near.close()
                continue
            self.sockets += [near, far]
            threading.Thread(target=self.relay, args=(near, far), daemon=True).start()

    def relay(self, near, far):
        try:
            while True:
                readable = select.select([near, far], [], [], 0.05)[0] if not self.stalled \
                    else select.select([], [], [], 0.05)[0]
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (far if sock is near else near).sendall(data)
                    self.relayed += len(data)
                    if self.stall_after is not None and self.relayed >= self.stall_after:
                        self.stall_after, self.stalled_at = None, time.monotonic()
                        self.stalled = True
        except (OSError, ValueError):      # ValueError: select on a socket close() closed
            pass
        finally:
            near.close()
            far.close()

    def close(self):
        # Closing alone leaves the listener listening while accept() blocks
        # on it (Linux), until a connection comes: rc-files, started on its
        # port next, exited with "Address already in use" meanwhile and
        # supervisord gave it up (the next test's fetch: connection refused).
        self.listener.shutdown(socket.SHUT_RDWR)
        for sock in self.sockets:
            sock.close()
        self.accepting.join(10)


@contextlib.contextmanager
def rc_files_behind_a_link(cluster):
    """rc-files on a port of its own, the one workers are told of relayed to
    it through a StallingLink."""
    cluster.supervisorctl("stop", "rc-files")
    log_path = os.path.join(cluster.home, "log", "rc-files-behind-link.log")
    real_port, rc_files = on_a_free_port(
        lambda port: (port, rc_files_on(port, cluster.env, log_path)))
    link = StallingLink(cluster.config.files_port, real_port)
    try:
        yield link
    finally:
        link.close()
        os.killpg(rc_files.pid, signal.SIGKILL)
        rc_files.wait()
        cluster.supervisorctl("start", "rc-files")


def test_a_fetch_cut_by_the_oom_killer_leaves_no_partial_past_the_cache_cap(cluster, tmp_path):
    """Killed mid-fetch, its task cancelled meanwhile (or run elsewhere), a
    phone restarted by its boot script kept the partial file for a week
    (PARTIAL_MAX_AGE), outside --cache-mb: a few such kills filled it."""
    data = os.urandom(6 * CACHE_MB * MIB)
    path = tmp_path / "big.in"
    path.write_bytes(data)
    partial = os.path.join(cluster.home, "worker-state", "cache", "partial",
                           hashlib.sha256(data).hexdigest())
    with rc_files_behind_a_link(cluster) as link:
        phone = start_phone(cluster)
        link.stall_after = link.relayed + 3 * CACHE_MB * MIB
        task_id = submit(cluster, "shell", "true", "--input", str(path))
        wait_for(lambda: os.path.exists(partial)
                 and os.path.getsize(partial) > 2 * CACHE_MB * MIB, 60, "the fetch half way")
        os.killpg(phone.pid, signal.SIGKILL)
        phone.wait()
        link.stalled = False
    cluster.rc("cancel", str(task_id))
    assert terminal_once(cluster, task_id) == "cancelled"
    start_phone(cluster)
    small = tmp_path / "small.in"
    small.write_bytes(b"x" * 1000)
    assert terminal_once(cluster, submit(cluster, "shell", "cat small.in", "--input",
                                         str(small))) == "completed"
    assert not os.path.exists(partial)
    assert cache_bytes(cluster) <= CACHE_MB * MIB


def test_an_input_too_large_for_the_device_s_files_is_its_fault_not_the_task_s(
        cluster, tmp_path):
    """A file larger than the device's file system takes (FAT32 on an SD
    card: 4 GiB) or its ulimit -f is EFBIG, not ENOSPC: the task failed for
    good at its first attempt, "cannot place inputs: File too large", though
    another device could run it. Now it is the device's fault (queued again
    while its retries last) and says why."""
    limit = 8 * MIB
    path = tmp_path / "large.in"
    path.write_bytes(os.urandom(2 * limit))
    device = "sdcard45"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    with open(cluster.worker_log(device), "ab", opener=private) as log:
        process = subprocess.Popen(
            [sys.executable, "-I", WORKER] + cluster.worker_arguments(device) + [
                "--state-dir", str(tmp_path / "sdcard-state")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=small_files)
    cluster.workers[device] = process
    wait_for(lambda: device in online(cluster), 30, "the device online")
    task_id = int(cluster.rc("submit", "shell", "true", "--input", str(path), "--retries", "1",
                             "--require", "device_id=%s" % device).stdout)
    assert terminal_once(cluster, task_id) == "failed"
    attempt, error = cluster.db.execute("SELECT attempt, error FROM tasks WHERE task_id = ?",
                                        (task_id,)).fetchone()
    assert attempt == 2, error
    assert "too large for this device" in error
    assert process.poll() is None
    # Its partial file, as large as the limit let it grow, could never be
    # resumed to the end here: it is gone, not kept in the cache.
    assert os.listdir(str(tmp_path / "sdcard-state" / "cache" / "partial")) == []


def test_an_upload_the_network_stalled_then_gave_back_is_stored_whole(cluster, tmp_path):
    """Its link stalled mid-put past FILES_TIMEOUT, the worker gave up on
    the connection and, closing it, said bye: the link back, rc-files read
    the bye as eleven bytes of the file, the put resumed after them failed
    its hash, and the task completed without its output ("not uploaded:
    rc-files: hash_mismatch"). Its execution time counted the stall too: a
    process that ended before the upload began was reported as running as
    long as its output took to go up."""
    device = "wifi45"
    os.environ["RC_TEST_FILES_TIMEOUT"] = "2"
    try:
        with rc_files_behind_a_link(cluster) as link:
            cluster.start_worker(device, "--state-dir", str(tmp_path / "wifi-state"))
            wait_for(lambda: device in online(cluster), 30, "the device online")
            submitted = time.monotonic()
            link.stall_after = link.relayed + 10 * MIB
            task_id = int(cluster.rc("submit", "shell", "head -c 40000000 /dev/urandom > o.bin",
                                     "--output", "o.bin", "--require",
                                     "device_id=%s" % device).stdout)
            wait_for(lambda: b"transfer_cut" in open(cluster.worker_log(device), "rb").read(),
                     60, "the worker giving the stalled connection up")
            link.stalled = False
            assert terminal_once(cluster, task_id) == "completed"
            result = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                        (task_id,)).fetchone()[0]
            assert "not uploaded" not in result
            # The task's process ended before its upload began (and stalled).
            assert json.loads(result)["execution_time"] < link.stalled_at - submitted
            assert cluster.db.execute("SELECT count(*) FROM task_files WHERE task_id = ?",
                                      (task_id,)).fetchone()[0] == 1
    finally:
        del os.environ["RC_TEST_FILES_TIMEOUT"]


def test_an_output_that_changed_while_it_went_up_is_hashed_and_sent_again(cluster, tmp_path):
    """The worker hashed an output, then sent it; what rc-files received
    was not what was hashed (the file changed meanwhile, here while the
    link stalled; or bytes spoilt on the way), rc-files refused it
    (hash_mismatch), and the task completed without its output. The worker
    now hashes and sends it once more, from the start."""
    device = "writer45"
    with rc_files_behind_a_link(cluster) as link:
        cluster.start_worker(device, "--state-dir", str(tmp_path / "writer-state"))
        wait_for(lambda: device in online(cluster), 30, "the device online")
        link.stall_after = link.relayed + 2 * MIB
        task_id = int(cluster.rc("submit", "shell", "head -c 20000000 /dev/zero > changed.bin",
                                 "--output", "changed.bin", "--require",
                                 "device_id=%s" % device).stdout)
        wait_for(lambda: link.stalled, 60, "the upload under way, its link stalled")
        # The task's directory, the worker's to remove once the result went
        # (where test_bench_files' worker_task_root finds it).
        root = os.path.join(os.environ.get("TMPDIR") or "/tmp", "rc-worker-%d" % os.geteuid(),
                            "%s.%d" % (device, cluster.workers[device].pid))
        path = next(os.path.join(folder, "changed.bin") for folder, _, names
                    in os.walk(root) if "changed.bin" in names)
        with open(path, "r+b") as f:
            f.seek(-1000, os.SEEK_END)
            f.write(b"x" * 1000)
        link.stalled = False
        assert terminal_once(cluster, task_id) == "completed"
    result = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                (task_id,)).fetchone()[0]
    assert "not uploaded" not in result, result
    stored = cluster.db.execute("SELECT sha256 FROM task_files WHERE task_id = ? AND name ="
                                " 'changed.bin'", (task_id,)).fetchone()
    assert stored is not None
    assert stored[0] == hashlib.sha256(b"\0" * (20000000 - 1000) + b"x" * 1000).hexdigest()


OLD_PYTHONS = [path for path in INTERPRETERS if "/3.6." in path or "/3.7." in path]


@pytest.mark.skipif(not OLD_PYTHONS, reason="no CPython 3.6 or 3.7 under ~/.pyenv/versions")
def test_a_first_join_whose_connection_is_closed_before_tls_tries_again(tmp_path):
    """rc-server closes a connection past new_connections_per_address
    before any TLS, as a dropping link does. On 3.6 and 3.7 built with
    OpenSSL 3 the handshake's end is a plain SSLError ("unexpected eof
    while reading"), and a first join took it for a main node without TLS:
    "start this worker without --fingerprint", exit status 3, for good."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def hang_up():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            accepted.append(sock)
            sock.close()
    threading.Thread(target=hang_up, daemon=True).start()
    log_path = str(tmp_path / "worker.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [OLD_PYTHONS[0], "-I", WORKER, "--join", "127.0.0.1:%d" % listener.getsockname()[1],
             "--token=rc1_" + "00" * 24, "--fingerprint", "ab" * 32, "--device-id", "newphone",
             "--state-dir", str(tmp_path / "state")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(accepted) >= 3 or process.poll() is not None, 60,
                 "three tries or an exit")
        with open(log_path) as f:
            assert process.poll() is None, f.read()
            assert "tls_failed" not in f.read()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        listener.close()
