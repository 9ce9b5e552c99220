"""`make bench`: the file figures of issue 18, on a real cluster with TLS on
(the default), measured through what a user has (`rc submit --input`, the
HTTP API), each against a ceiling measured in the same run:

- a 1 GiB input moved from rc-files to a worker at >= 70 % of what one
  Python TLS socket pair moves here, the worker's RSS <= 32 MiB throughout,
  and other devices' heartbeat acknowledgements p99 <= 100 ms meanwhile;
- 1,000 tasks each with a 100 KiB input and a 100 KiB output at >= 40 % of
  the `shell true` rate.

Prints one table and writes it to test-artifacts/bench_files.json. The
machine may be busy with other work: wall-clock rates move with it, so CPU
seconds per GiB and per task are printed too (no target), and for the small
files the whole machine's busy time per task (kernel work done outside the
programs: the journal, writeback, loopback softirq) and what creating one
file costs where the programs make theirs (file_create_us). Next to the 1 GiB
share, the most the machine allows: the CPU the transfer cannot do without
(the ceiling's TLS at both ends, SHA-256, the write and the read of the
file, each measured here) spread perfectly over its cores.
RC_BENCH_FILE_MIB and RC_BENCH_FILE_TASKS make it smaller for a try.
"""
import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import psutil
import pytest

from bench_common import (RssSampler, Table, cpu_seconds, file_create_us, percentile,
                          process_start_ms)
from cluster_harness import REPO, Cluster, online, wait_for
from rc import tls

pytestmark = pytest.mark.bench

BIG_MIB = int(os.environ.get("RC_BENCH_FILE_MIB", "1024"))
SMALL_TASKS = int(os.environ.get("RC_BENCH_FILE_TASKS", "1000"))
SMALL_BYTES = 100 * 1024
UPLOADERS = 4       # HTTP connections uploading the small inputs at once
BATCH = 50          # small tasks per POST /api/v1/tasks
DEVICE = "files-bench"
SLOTS = 4
HEARTBEAT_DEVICES = 4
HEARTBEAT_INTERVAL = 0.2      # seconds between one simulated device's heartbeats
MIB = 1024 * 1024
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "tls": True}
TABLE = Table()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("bench-files"), base=SETTINGS)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(DEVICE, "--slots", str(SLOTS),
                             "--cache-mb", str(2 * BIG_MIB + 1024))
        wait_for(lambda: DEVICE in online(cluster), 30, "the bench worker")
        yield cluster
    finally:
        cluster.stop()


# -- the ceiling: one Python TLS socket pair -------------------------------------------

def tls_ceiling(config, total, chunk=MIB):
    """(bytes per second, CPU seconds) of `total` bytes sent through one TLS
    socket pair in this process: rc-files' certificate and server context,
    a client context like the worker's, sendall and recv_into of `chunk`."""
    server_end, client_end = socket.socketpair()
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server = tls.server_context(config).wrap_socket(server_end, server_side=True,
                                                    do_handshake_on_connect=False)
    client = client_context.wrap_socket(client_end, do_handshake_on_connect=False)

    def send():
        server.do_handshake()
        block, left = memoryview(os.urandom(chunk)), total
        while left:
            server.sendall(block[:min(chunk, left)])
            left -= min(chunk, left)

    sender = threading.Thread(target=send)
    sender.start()
    client.do_handshake()
    started, cpu = time.perf_counter(), time.process_time()
    buffer, received = bytearray(chunk), 0
    while received < total:
        received += client.recv_into(buffer)
    sender.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    server.close()
    client.close()
    return total / elapsed, cpu


def floor_cpu(directory, total, chunk=MIB):
    """CPU seconds of what moving `total` bytes into a checked file adds to
    the ceiling's TLS and cannot do without, each measured alone in this
    thread: SHA-256 (in `chunk` updates), writing the file into the page
    cache, and reading it back (what rc-files does before it sends)."""
    block, path = os.urandom(chunk), os.path.join(directory, "floor.bin")
    digest, started = hashlib.sha256(), time.thread_time()
    for _ in range(total // chunk):
        digest.update(block)
    hashing = time.thread_time() - started
    with open(path, "wb", buffering=0) as f:
        started = time.thread_time()
        for _ in range(total // chunk):
            f.write(block)
        writing = time.thread_time() - started
    buffer = bytearray(256 * 1024)
    with open(path, "rb", buffering=0) as f:
        started = time.thread_time()
        while f.readinto(buffer):
            pass
        reading = time.thread_time() - started
    os.unlink(path)
    return hashing, writing, reading


# -- one big input ---------------------------------------------------------------------

def make_file(path, mib):
    digest = hashlib.sha256()
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for n in range(mib):
            chunk = n.to_bytes(8, "big") + block[8:]       # no two MiB alike
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def start_heartbeats(cluster, report, duration):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "bench_common.py"),
         "--join", "127.0.0.1:%d" % cluster.config.tcp_port,
         "--token-file", cluster.config.token_path, "--count", str(HEARTBEAT_DEVICES),
         "--interval", str(HEARTBEAT_INTERVAL), "--duration", str(duration),
         "--report", report])


def watch_fetch(cluster, sha256, pids, timeout=600):
    """(start, end, [CPU seconds of each of `pids` between them]): from the
    partial file's appearance in the worker's cache to the blob's."""
    cache = os.path.join(cluster.home, "worker-state", "cache")
    partial, blob = os.path.join(cache, "partial", sha256), os.path.join(cache, sha256)
    deadline = time.time() + timeout
    while not (os.path.exists(partial) or os.path.exists(blob)):
        assert time.time() < deadline, "the worker never started to fetch the input"
        time.sleep(0.002)
    started, cpu = time.time(), [cpu_seconds([pid]) for pid in pids]
    while not os.path.exists(blob):
        assert time.time() < deadline, "the worker never finished fetching the input"
        time.sleep(0.005)
    return started, time.time(), [cpu_seconds([pid]) - before for pid, before in zip(pids, cpu)]


@pytest.mark.timeout(1800)
def test_big_input_over_tls(cluster, tmp_path):
    total = BIG_MIB * MIB
    ceiling_before, ceiling_cpu = tls_ceiling(cluster.config, total)
    big = str(tmp_path / "big.bin")
    sha256 = make_file(big, BIG_MIB)
    worker = cluster.workers[DEVICE].pid
    pids = [worker, cluster.program_pid("rc-files")]
    report = str(tmp_path / "acks.json")
    heartbeats = start_heartbeats(cluster, report, duration=600)
    try:
        wait_for(lambda: {"hb-%02d" % n for n in range(HEARTBEAT_DEVICES)} <= online(cluster),
                 60, "the heartbeating devices")
        sampler = RssSampler(worker).start()
        try:
            task_id = int(cluster.rc("submit", "shell", "wc -c < big.bin", "--input", big,
                                     "--require", "device_id=%s" % DEVICE).stdout)
            started, ended, cpus = watch_fetch(cluster, sha256, pids)
            cpu = sum(cpus)
            done = cluster.rc("wait", str(task_id), "--timeout", "600", check=False)
        finally:
            peak = sampler.stop()
    finally:
        heartbeats.terminate()      # it writes its report and ends
        heartbeats.wait(60)
    assert done.returncode == 0 and done.stdout.strip() == str(total), done
    # Before and after, so that a machine busy with other work part of the time
    # weighs on both figures alike.
    ceiling_after, _ = tls_ceiling(cluster.config, total)
    ceiling = (ceiling_before + ceiling_after) / 2
    hashing, writing, reading = floor_cpu(str(tmp_path), total)
    rate = total / (ended - started)
    gib = total / (1024.0 * MIB)
    TABLE.record("ceiling: one Python TLS socket pair, %d MiB (mean of %.0f before and %.0f"
                 " after)" % (BIG_MIB, ceiling_before / MIB, ceiling_after / MIB), "-",
                 ceiling / MIB, "MiB/s", True)
    TABLE.record("ceiling: CPU seconds per GiB (both ends)", "-", ceiling_cpu / gib, "s", True)
    TABLE.record("%d MiB input, rc-files to worker over TLS" % BIG_MIB, "-", rate / MIB,
                 "MiB/s", True)
    TABLE.record("... as a share of the ceiling", ">= 70 %", 100 * rate / ceiling, "%",
                 rate >= 0.7 * ceiling)
    # What the machine allows at best: the CPU no transfer can do without,
    # spread perfectly over every core, against the ceiling (which has no
    # file, no hash and two busy threads at most).
    needed = ceiling_cpu + hashing + writing + reading
    cores = psutil.cpu_count() or 1
    TABLE.record("... at best on %d cores: TLS both ends %.2f + SHA-256 %.2f + write %.2f +"
                 " read %.2f = %.2f CPU s/GiB, spread over them" % (
                     cores, ceiling_cpu / gib, hashing / gib, writing / gib, reading / gib,
                     needed / gib), "-", 100 * total * cores / needed / ceiling, "%", True)
    TABLE.record("... CPU seconds per GiB (rc-files + worker)", "-", cpu / gib, "s", True)
    TABLE.record("... of which the worker's (receives, hashes, writes)", "-", cpus[0] / gib, "s",
                 True)
    TABLE.record("... of which rc-files' (reads, sends)", "-", cpus[1] / gib, "s", True)
    TABLE.record("worker RSS peak during it (%d samples)" % sampler.samples, "<= 32 MiB",
                 peak, "MiB", peak <= 32)
    with open(report) as f:
        acks = [seconds for at, seconds in json.load(f)["acks"] if started <= at <= ended]
    assert acks, "no heartbeat was acknowledged while the file moved"
    p99 = percentile(acks) * 1000
    TABLE.record("heartbeat ack p99 of %d devices meanwhile (%d acks)"
                 % (HEARTBEAT_DEVICES, len(acks)), "<= 100 ms", p99, "ms", p99 <= 100)


# -- many small files through the HTTP API ---------------------------------------------

class Api:
    """POST /api/v1/... with the admin token on one kept-alive connection."""

    def __init__(self, cluster):
        self.connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                                     timeout=120)
        with open(cluster.config.admin_token_path) as f:
            self.headers = {"Authorization": "Bearer " + f.read().strip()}

    def post(self, path, body, content_type):
        self.connection.request("POST", path, body, dict(self.headers, **{
            "Content-Type": content_type}))
        response = self.connection.getresponse()
        answer = response.read()
        assert response.status == 201, (response.status, answer[:500])
        return json.loads(answer)

    def upload(self, data):
        return self.post("/api/v1/files", data, "application/octet-stream")

    def submit(self, specs):
        answer = self.post("/api/v1/tasks", json.dumps(specs), "application/json")
        return [entry["task_id"] for entry in answer["tasks"]]

    def close(self):
        self.connection.close()


def finished_at(cluster, task_ids, timeout=900):
    """When the last of the tasks ended; each must have completed."""
    marks = ",".join(map(str, task_ids))

    def ended():
        return cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE task_id IN (%s) AND state IN"
            " ('completed', 'failed', 'timed_out', 'cancelled')" % marks).fetchone()[0] \
            == len(task_ids)
    wait_for(ended, timeout, "%d tasks" % len(task_ids))
    failed = cluster.db.execute("SELECT task_id, state, error FROM tasks WHERE task_id IN (%s)"
                                " AND state != 'completed' LIMIT 3" % marks).fetchall()
    assert not failed, [tuple(row) for row in failed]
    return cluster.db.execute("SELECT max(finished_at) FROM tasks WHERE task_id IN (%s)"
                              % marks).fetchone()[0]


PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-files")


def main_node_and_worker(cluster):
    """The main node's programs, the worker and its spawner (whose waited-for
    children are the tasks)."""
    worker = psutil.Process(cluster.workers[DEVICE].pid)
    return [cluster.program_pid(p) for p in PROGRAMS] + [worker.pid] + [
        child.pid for child in worker.children()]


def cpu_by_program(cluster):
    """CPU seconds so far of each main node program and of the worker with
    its spawner and tasks, by name."""
    pids = main_node_and_worker(cluster)
    found = {name: cpu_seconds([pid]) for name, pid in zip(PROGRAMS, pids)}
    found["worker"] = cpu_seconds(pids[len(PROGRAMS):])
    return found


def shell_true_rate(cluster, api, count):
    pids = main_node_and_worker(cluster)
    cpu, started = cpu_seconds(pids), time.time()
    task_ids = api.submit([{"task_type": "shell", "payload": {"command": "true"},
                            "requirements": {"device_id": DEVICE}}] * count)
    ended = finished_at(cluster, task_ids)
    return count / (ended - started), (cpu_seconds(pids) - cpu) / count


def small_files_rate(cluster, api, count):
    """Tasks per second from the first upload to the last task ended with its
    output stored, every output checked against the expected hash. As a
    script of a user would: UPLOADERS connections upload the inputs, and
    each BATCH of tasks is submitted as soon as its inputs are stored."""
    inputs = [os.urandom(SMALL_BYTES) for _ in range(count)]
    pids = main_node_and_worker(cluster)
    cpu, started = cpu_seconds(pids), time.time()
    stored = uploaded(cluster, inputs)
    task_ids, submitted = [], 0
    while submitted < count:
        ready = min(count, submitted + BATCH)
        while not all(n in stored for n in range(submitted, ready)):
            assert "failed" not in stored, stored.get("failed")
            time.sleep(0.001)
        task_ids += api.submit([small_task(stored[n]) for n in range(submitted, ready)])
        submitted = ready
    ended = finished_at(cluster, task_ids)
    elapsed, cpu = ended - started, cpu_seconds(pids) - cpu
    table = bytes.maketrans(b"abcdefghijklm", b"nopqrstuvwxyz")
    for task_id, data in zip(task_ids, inputs):
        row = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                                 " AND kind = 'output' AND name = 'out.bin'",
                                 (task_id,)).fetchone()
        assert row is not None, "task %d stored no output" % task_id
        assert row[0] == hashlib.sha256(data.translate(table)).hexdigest()
    return count / elapsed, cpu / count


def uploaded(cluster, inputs):
    """A dict that fills, from threads, with n -> the stored file of inputs[n]
    (POST /api/v1/files); "failed" -> the error if an upload failed."""
    stored = {}

    def upload(numbers):
        api = Api(cluster)
        try:
            for n in numbers:
                stored[n] = api.upload(inputs[n])
        except Exception as e:
            stored["failed"] = repr(e)
        finally:
            api.close()
    for first in range(UPLOADERS):
        numbers = range(first, len(inputs), UPLOADERS)
        threading.Thread(target=upload, args=(numbers,), daemon=True).start()
    return stored


def small_task(stored):
    return {"task_type": "shell", "requirements": {"device_id": DEVICE},
            "payload": {"command": "tr a-m n-z < in.bin > out.bin",
                        "inputs": [{"path": "in.bin", "sha256": stored["sha256"],
                                    "size": stored["size"]}],
                        "outputs": ["out.bin"]}}


@pytest.mark.timeout(1800)
def test_small_files_tasks(cluster):
    api = Api(cluster)
    try:
        shell_true_rate(cluster, api, 10)       # the worker's spawner started
        # Before and after, so that a machine busy with other work part of the time
        # weighs on both figures alike.
        programs = cpu_by_program(cluster)
        busy = machine_busy_seconds()
        before, plain_cpu = shell_true_rate(cluster, api, SMALL_TASKS)
        plain_busy = machine_busy_seconds() - busy
        plain_programs, programs = difference(cpu_by_program(cluster), programs), \
            cpu_by_program(cluster)
        creating = files_created_us(cluster)
        busy = machine_busy_seconds()
        with_files, files_cpu = small_files_rate(cluster, api, SMALL_TASKS)
        files_busy = machine_busy_seconds() - busy
        files_programs = difference(cpu_by_program(cluster), programs)
        creating = [(a + b) / 2 for a, b in zip(creating, files_created_us(cluster))]
        after, _ = shell_true_rate(cluster, api, SMALL_TASKS)
    finally:
        api.close()
    plain = (before + after) / 2
    TABLE.record("shell true tasks/s (%d, HTTP, TLS cluster; mean of %.0f before and %.0f"
                 " after)" % (SMALL_TASKS, before, after), "-", plain, "tasks/s", True)
    TABLE.record("... CPU ms per task (main node + worker)", "-", plain_cpu * 1000, "ms", True)
    TABLE.record("... whole machine busy ms per task (%s)" % MACHINE_BUSY, "-",
                 plain_busy * 1000 / SMALL_TASKS, "ms", True)
    TABLE.record("tasks/s with a 100 KiB input and output (%d, HTTP)" % SMALL_TASKS, "-",
                 with_files, "tasks/s", True)
    TABLE.record("... as a share of shell true", ">= 40 %", 100 * with_files / plain, "%",
                 with_files >= 0.4 * plain)
    TABLE.record("... CPU ms per task (main node + worker)", "-", files_cpu * 1000, "ms", True)
    TABLE.record("... whole machine busy ms per task (%s)" % MACHINE_BUSY, "-",
                 files_busy * 1000 / SMALL_TASKS, "ms", True)
    TABLE.record("... this machine: one process started and reaped (sh -c true, median);"
                 " a task here starts one (tr, its simple command), as shell true does",
                 "-", process_start_ms(),
                 "ms", True)
    TABLE.record("... this machine: one file created where rc-web and rc-server make blobs"
                 " (median, mean of before and after; where the worker makes its tasks'"
                 " directories %.0f us); a task here creates five (docs/benchmarks.md)"
                 % creating[1], "-",
                 creating[0], "us", True)
    for name in ("worker", "rc-files", "rc-web", "rc-server", "rc-scheduler"):
        TABLE.record("... of which %s (shell true: %.2f)" % (
            "the worker, its spawner and tasks" if name == "worker" else name,
            plain_programs[name] * 1000 / SMALL_TASKS), "-",
            files_programs[name] * 1000 / SMALL_TASKS, "ms", True)


def files_created_us(cluster):
    """file_create_us where rc-web and rc-server make the blobs, and where the
    worker makes its tasks' files (made as rc-web would, if not yet)."""
    partial = os.path.join(cluster.home, "files", "partial")
    os.makedirs(partial, 0o700, exist_ok=True)
    return [file_create_us(directory) for directory in (partial, worker_task_root(cluster))]


def worker_task_root(cluster):
    """The bench worker's directory of task directories (worker.py's
    task_root), or its state directory if that is elsewhere (a $TMPDIR/
    rc-worker-EUID someone else made)."""
    root = os.path.join(os.environ.get("TMPDIR") or "/tmp", "rc-worker-%d" % os.geteuid(),
                        "%s.%d" % (DEVICE, cluster.workers[DEVICE].pid))
    return root if os.path.isdir(root) else os.path.join(cluster.home, "worker-state")


# Every process, the bench's own, and kernel threads (journal, writeback, softirq),
# from /proc/stat: other work on the machine meanwhile counts too.
MACHINE_BUSY = "/proc/stat: kernel threads, the bench and any other work too"


def machine_busy_seconds():
    """CPU seconds the whole machine has been busy (user, nice, system, irq,
    softirq of every core; idle, iowait and steal left out)."""
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq = [int(v) for v in f.readline().split()[1:8]]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def difference(after, before):
    return {name: after[name] - before[name] for name in after}


def test_zz_print_the_table():
    TABLE.report("bench_files.json")
