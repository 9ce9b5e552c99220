"""What the `make bench` modules share: the table of figures they print and
write under test-artifacts/, memory and CPU readings of processes, and a few
devices that heartbeat over TLS and time each acknowledgement.

The heartbeating devices run as a process of their own, so that what they
measure is rc-server's answer, not the bench's own threads:

    python tests/bench_common.py --join 127.0.0.1:8080 --token-file var/token \\
        --count 4 --interval 0.25 --duration 30 --report acks.json

It writes the report at the end of --duration or on SIGTERM.
"""
import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
sys.path.insert(0, os.path.join(REPO, "lib"))
from rc import protocol  # noqa: E402


class Table:
    """Figures, each with its target, what was measured and whether it passed."""

    def __init__(self):
        self.rows = []      # {"figure", "target", "measured", "unit", "pass", "library"?}

    def record(self, figure, target, measured, unit, passed, library=None):
        """`measured` is what a user gets (through the client, HTTP or rc);
        `library`, where given, the same work through rc.tasks and SQLite."""
        row = {"figure": figure, "target": target, "measured": round(measured, 3),
               "unit": unit, "pass": bool(passed)}
        if library is not None:
            row["library"] = round(library, 3)
        self.rows.append(row)

    def report(self, name):
        """Written to test-artifacts/NAME and printed as a table."""
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, name)
        with open(path, "w") as f:
            json.dump(self.rows, f, indent=2)
        width = max([len(r["figure"]) for r in self.rows] + [6])
        library = any("library" in r for r in self.rows)
        print("\nmain node and workers on Python %s (%s)"
              % (sys.version.split()[0], os.path.realpath(sys.executable)))
        if library:
            print("`measured`: as a user gets it (the target's); `library`: rc.tasks and"
                  " SQLite directly")
        print("%-*s  %-12s  %12s  %s%s" % (width, "figure", "target", "measured", "result",
                                          "  library" if library else ""))
        for r in self.rows:
            print("%-*s  %-12s  %9.2f %-2s  %-6s%s" % (
                width, r["figure"], r["target"], r["measured"], r["unit"][:2],
                "pass" if r["pass"] else "FAIL",
                "  %9.2f %-2s" % (r["library"], r["unit"][:2]) if "library" in r else ""))
        print("written to %s" % path)


def percentile(values, p=99):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


def rss_mib(pids):
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1024 / 1024


def cpu_seconds(pids):
    """User and system CPU seconds the processes, and the children they
    have waited for, have used so far, summed."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def process_start_ms(times=500):
    """Milliseconds to start and reap one `sh -c true` (posix_spawn, as the
    worker starts a shell task), the median of `times`. A condition of the
    machine, printed beside the figures it weighs on: every shell task
    starts at least one process, and on a VM where the loader's CPUID
    instructions trap to the host (cpuid_us(): 7.5 to 13 us each on
    2026-12-06's; ~50 of them as a C program starts) it costs 2-3 times
    what it does on the metal."""
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "true"], os.environ)
        os.waitpid(pid, 0)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1000


def file_create_us(directory, times=50):
    """Microseconds to create one empty file in `directory` (open with
    O_CREAT | O_EXCL, then close), the median of `times`; each is removed
    after. A condition of the machine where the bench's programs make their
    files, printed beside the figures it weighs on: on ext4 without a
    journal (this VM's root file system) a new inode is not one freed in the
    last 60 to 360 seconds, and the allocator looks at each of those in
    turn, so a file made where other work removed thousands (pytest's old
    temporary directories, other clusters' task directories) costs 0.2-1 ms
    of CPU instead of ~20-40 us. Few: the ones it removes are such inodes
    for the files the bench makes next."""
    samples, paths = [], []
    try:
        for number in range(times):
            path = os.path.join(directory, "bench-probe-%d-%d" % (os.getpid(), number))
            started = time.perf_counter()
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            samples.append(time.perf_counter() - started)
            paths.append(path)
    finally:
        for path in paths:
            os.unlink(path)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


# push rbx; mov eax, 4; xor ecx, ecx; cpuid; pop rbx; ret (x86-64): CPUID leaf
# 4, the cache description the C library's start-up asks for again and again.
CPUID_CODE = bytes.fromhex("53b80400000031c90fa25bc3")


def cpuid_us(times=20000):
    """Microseconds of one CPUID instruction (x86-64 Linux; None elsewhere).
    On the metal it is ~0.1 us; on a VM it traps to the hypervisor, and
    every program started pays it some 50 times in glibc's start-up
    (init_cpu_features, the cache sizes): the part of a process start, and
    so of every shell task, that depends on the host, not on us."""
    import ctypes
    import mmap
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or not hasattr(mmap, "PROT_EXEC"):
        return None
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    cpuid = ctypes.CFUNCTYPE(None)(address)
    started = time.perf_counter()
    for _ in range(times):
        cpuid()
    return (time.perf_counter() - started) * 1e6 / times


HELLO_WSGI = """
import sys, waitress
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4, _quiet=True)
"""


def waitress_request_ms(times=300, pause=0.003):
    """Milliseconds of one request, through rc.client's own HTTP, to a
    hello-world WSGI app under waitress in another process (the median of
    `times`): the least any request to rc-web costs on this machine, which
    an echo round trip pays at least once, printed beside it."""
    from cluster_harness import free_port, wait_for
    from rc import client
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", HELLO_WSGI, str(port)])
    try:
        wait_for(lambda: accepting(port), 30, "the hello-world app")
        http = client.Http("http://127.0.0.1:%d" % port, None)
        samples = []
        for _ in range(times):
            time.sleep(pause)
            started = time.perf_counter()
            http.request("GET", "/")
            samples.append(time.perf_counter() - started)
    finally:
        server.kill()
        server.wait()
    samples.sort()
    return samples[len(samples) // 2] * 1000


def accepting(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class RssSampler:
    """The largest RSS a process reached while sampled every `interval`
    seconds, in a thread, from start() to stop()."""

    def __init__(self, pid, interval=0.05):
        self.process, self.interval = psutil.Process(pid), interval
        self.peak_mib = 0.0
        self.samples = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stopping.is_set():
            try:
                rss = self.process.memory_info().rss / 1024 / 1024
            except psutil.NoSuchProcess:
                return
            self.peak_mib = max(self.peak_mib, rss)
            self.samples += 1
            self.stopping.wait(self.interval)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join()
        return self.peak_mib


# -- devices that heartbeat over TLS and time the acknowledgements ---------------------

class HeartbeatingDevice(threading.Thread):
    """One device on a TLS connection of its own, blocking: joins with the
    token, then sends a heartbeat every `interval` seconds and waits for its
    acknowledgement. It takes echo tasks only, which the bench never sends."""

    def __init__(self, options, number, stop):
        super().__init__(daemon=True)
        self.options, self.stop = options, stop
        self.device_id = "hb-%02d" % number
        self.token = open(options.token_file).read().strip()
        self.acks = []          # (wall-clock time of the ack, seconds it took)
        self.inbox = bytearray()

    def run(self):
        host, port = self.options.join.rsplit(":", 1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(socket.create_connection((host, int(port)), timeout=30)) \
                as self.sock:
            self.register()
            while not self.stop.is_set():
                sent = time.monotonic()
                self.send("heartbeat", {"system_metrics": {"cpu_percent": 1.0},
                                        "status": "idle", "active_tasks": []})
                self.wait_for("heartbeat_ack")
                self.acks.append((time.time(), time.monotonic() - sent))
                self.stop.wait(self.options.interval)

    def register(self):
        hello = self.wait_for("hello")
        nonce = protocol.new_nonce()
        self.send("register", {
            "device_id": self.device_id, "protocol": 1, "nonce": nonce,
            "proof": protocol.worker_proof(self.token, hello["nonce"], nonce, self.device_id),
            "device_info": {"hostname": self.device_id, "platform": "linux",
                            "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": 1, "memory_gb": 1.0},
            "task_types": ["echo"], "slots": 1, "role": "compute"})
        self.wait_for("register_ack")

    def send(self, kind, data):
        self.sock.sendall(protocol.encode(kind, data, sender_id=self.device_id))

    def wait_for(self, kind):
        """The data of the next frame of that kind; other frames are passed over."""
        while True:
            for line in protocol.split_frames(self.inbox):
                envelope = json.loads(line)
                if envelope["message_type"] == kind:
                    return envelope["data"]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("rc-server closed the connection of %s" % self.device_id)
            self.inbox += chunk


def heartbeat_main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--join", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--report", required=True)
    options = parser.parse_args()
    stop = threading.Event()
    # SIGTERM, or the end of --duration, ends the heartbeats; the report is written then.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    timer = threading.Timer(options.duration, stop.set)
    timer.daemon = True
    timer.start()
    devices = [HeartbeatingDevice(options, n, stop) for n in range(options.count)]
    for device in devices:
        device.start()
    for device in devices:
        device.join()
    acks = [ack for device in devices for ack in device.acks]
    with open(options.report, "w") as f:
        json.dump({"acks": sorted(acks)}, f)


if __name__ == "__main__":
    heartbeat_main()
