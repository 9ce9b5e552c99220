"""flood38: a stranger on the LAN, with no token, opens connections to
rc-server and completes TLS handshakes as fast as it can (attack38's
hs_flood.py: 3,228 in 6 s from one address, ~0.9 ms of rc-server's one
loop each), closing each before authenticating; every device's heartbeats
and results waited behind them. Nothing limited new connections per
address: max_unauthenticated_per_address counts those authenticating at
once, auth_failures_per_minute wrong proofs. Now new_connections_per_address
does, before any TLS work, without shutting out a fleet behind one NAT."""
import json
import multiprocessing
import os
import socket
import ssl
import threading
import time

import psutil
import pytest

from cluster_harness import Cluster, log_records, wait_for
from rc import protocol, throttle
from test_hostile_rows import server  # noqa: F401 (a fixture: rc-server in a thread, tcp and tls)
from test_server import Client, token_of

pytestmark = pytest.mark.e2e

FLOOD_ADDRESS = "127.0.0.38"      # the stranger
FLEET_ADDRESS = "127.0.0.50"      # a NAT with a household's devices behind it
DEVICE_ADDRESS = "127.0.0.1"      # the device that heartbeats through the flood
FLOOD_PROCESSES = 2               # as hs_flood.py's two threads
MEASURED_SECONDS = 3.0            # the flood measured, once its address's burst is spent
FLEET = 50                        # devices behind the NAT, back at once


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("flood38"))       # TLS on: the default
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.token = open(cluster.config.token_path).read().strip()
    yield cluster
    cluster.stop()


def tls_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


class Device:
    """A worker's connection, spoken by hand: TLS, hello, register with the
    join token (a first join), then frames and their answers."""

    def __init__(self, cluster, device_id, source):
        sock = socket.create_connection(("127.0.0.1", cluster.config.tcp_port), timeout=10,
                                        source_address=(source, 0))
        self.sock = tls_context().wrap_socket(sock)
        self.reader = self.sock.makefile("rb")
        hello = self.receive()
        nonce = protocol.new_nonce()
        self.send("register", {
            "device_id": device_id, "protocol": 1, "nonce": nonce,
            "proof": protocol.worker_proof(cluster.token, hello["data"]["nonce"], nonce,
                                           device_id),
            "device_info": {"platform": "linux"}, "hardware_specs": {"cpu_cores": 1},
            "task_types": ["echo"], "slots": 1})
        self.answer = self.receive()

    def send(self, message_type, data):
        self.sock.sendall(protocol.encode(message_type, data, sender_id="t"))

    def receive(self):
        line = self.reader.readline()
        if not line:
            raise EOFError("rc-server hung up")
        return json.loads(line)

    def heartbeat_round_trip(self):
        started = time.monotonic()
        self.send("heartbeat", {"status": "idle", "active_tasks": []})
        while self.receive()["message_type"] != "heartbeat_ack":
            pass
        return time.monotonic() - started

    def close(self):
        self.reader.close()
        self.sock.close()


def cpu_seconds(process):
    times = process.cpu_times()
    return times.user + times.system


def flood(port, source, stop, handshakes, refused):
    """hs_flood.py, one of its threads: TLS connections from one address,
    each closed once its handshake is done, for as long as `stop` is clear."""
    context = tls_context()
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                            source_address=(source, 0))
            context.wrap_socket(sock).close()
            count = handshakes
        except OSError:          # closed or reset before the handshake was done
            count = refused
        with count.get_lock():
            count.value += 1


class Flood:
    """FLOOD_PROCESSES of them, each a process of its own: in this one they
    would hold the GIL while the device's answers wait to be read."""

    def __init__(self, port, source):
        forks = multiprocessing.get_context("fork")      # they need nothing of this one
        self.stop = forks.Event()
        self.handshakes, self.refused = forks.Value("l", 0), forks.Value("l", 0)
        self.processes = [forks.Process(target=flood, daemon=True, args=(
            port, source, self.stop, self.handshakes, self.refused))
            for _ in range(FLOOD_PROCESSES)]

    def counts(self):
        return self.handshakes.value, self.refused.value

    def __enter__(self):
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


@pytest.mark.parametrize("program", ["rc-server", "rc-files"])
def test_a_strangers_handshake_flood_costs_little_and_slows_no_device(cluster, program):
    """The stranger's address gets new_connections_per_address (500)
    handshakes at once, then 25 a second; past them its connections are
    closed as soon as accepted, before any TLS work. Measured for 3 s once
    that burst is spent. Fails before: every handshake asked for was made
    (600-2,100 in 3 s at rc-server, 0.8-1.1 ms of its loop each, a device's
    heartbeat round trip 3.9-6.1 ms at p50; 430-1,100 at rc-files, 2-3.3 ms
    of CPU, a thread and a timer each); now 75, and 0.1-0.2 ms a connection
    refused (round trips 1.3-1.8 ms, 0.4 ms when quiet)."""
    device = Device(cluster, "through-the-flood-%s" % program, DEVICE_ADDRESS)
    assert device.answer["message_type"] == "register_ack", device.answer
    quiet = sorted(device.heartbeat_round_trip() for _ in range(20))
    process = psutil.Process(cluster.program_pid(program))
    port = cluster.config.tcp_port if program == "rc-server" else cluster.config.files_port
    per_second = cluster.config.new_connections_per_address \
        / throttle.NEW_CONNECTIONS_REFILL_SECONDS
    with Flood(port, FLOOD_ADDRESS) as flood:
        # Until the first refusal for it (one for max_unauthenticated_per_address
        # may come sooner: connections closed by the flood and not yet by rc-server).
        # 500 handshakes took 1.5 s (rc-files 2 s) on a quiet machine; on a
        # loaded one the flood makes ~80 a second against a refill of 25, and
        # measuring before the burst is spent counts handshakes it still had.
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not refusals_logged(cluster, program):
            time.sleep(0.05)
        assert refusals_logged(cluster, program), \
            "%s refused none of %d handshakes in 60 s" % (program, flood.counts()[0])
        # Connections let in before the first refusal may still be in their
        # handshakes (rc-files makes them in threads): on a loaded machine
        # they finish in the next seconds, at more than 25 a second.
        settled_by = time.monotonic() + 30.0
        while time.monotonic() < settled_by:
            before = flood.counts()[0]
            time.sleep(1.0)
            if flood.counts()[0] - before <= per_second + 5:
                break
        counted, cpu, started = flood.counts(), cpu_seconds(process), time.monotonic()
        trips = []
        while time.monotonic() - started < MEASURED_SECONDS:
            trips.append(device.heartbeat_round_trip())
            time.sleep(0.02)
        cpu, elapsed = cpu_seconds(process) - cpu, time.monotonic() - started
        handshakes, refused = (now - then for now, then in zip(flood.counts(), counted))
    device.close()
    trips.sort()
    connections = max(1, handshakes + refused)
    figures = ("%s: %d handshakes and %d refused in %.1f s; %.2f s of CPU (%.3f ms a"
               " connection); heartbeat round trip p50 %.1f ms p90 %.1f ms (quiet p50 %.1f ms)"
               % (program, handshakes, refused, elapsed, cpu, 1000 * cpu / connections,
                  1000 * trips[len(trips) // 2], 1000 * trips[len(trips) * 9 // 10],
                  1000 * quiet[len(quiet) // 2]))
    print(figures)
    # 25 a second, and what the burst had left when the first refusal came.
    assert handshakes <= per_second * elapsed + 20, figures
    # A refusal costs an accept and a close, 0.11-0.20 ms here (the
    # kernel's ~0.05 ms of it), a handshake 0.8-1.1 ms at rc-server and
    # 2.7-3.3 ms at rc-files: the stranger's refused connections come 3 to
    # 8 times as fast as its handshakes did, and cost half as much or less in all.
    assert cpu / connections < 0.0004, figures
    assert cpu / elapsed < 0.5, figures
    # rc-server's loop is never held long: the device's round trips stay
    # within a few ms (1,100 handshakes a second would fill the loop).
    assert trips[len(trips) // 2] < max(0.005, 3 * quiet[len(quiet) // 2]), figures
    assert 1 <= refusals_logged(cluster, program) <= 10, "logged a few a minute, not each"


def refusals_logged(cluster, program):
    return len(log_records(cluster, program, event="too_many_new_connections",
                           address=FLOOD_ADDRESS))


def test_a_fleet_behind_one_address_back_at_once_all_get_in(cluster):
    """A NAT with 50 devices behind it, all reconnecting at once after a
    main node restart: rc-server lets max_unauthenticated_per_address (8)
    of them authenticate at a time and closes the rest before TLS; each
    comes back after a worker's backoff. Those closes cost no handshake
    and spend nothing of new_connections_per_address: every device gets
    in, none is refused for it."""
    registered, errors, attempts = [], [], []
    lock = threading.Lock()
    together = threading.Barrier(FLEET)

    def device(number):
        backoff = 0.5                     # as worker.py: BACKOFF_START, doubled, jittered
        deadline = time.monotonic() + 30
        together.wait(10)
        while time.monotonic() < deadline:
            attempts.append(number)
            try:
                joined = Device(cluster, "nat-%02d" % number, FLEET_ADDRESS)
                answer = joined.answer
                joined.close()
                if answer["message_type"] == "register_ack":
                    with lock:
                        registered.append(number)
                    return
            except (OSError, EOFError):
                pass                      # closed before TLS, or before its hello
            time.sleep(backoff * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070.0))
            backoff = min(backoff * 2, 30.0)
        with lock:
            errors.append(number)

    threads = [threading.Thread(target=device, args=(n,), daemon=True) for n in range(FLEET)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert sorted(registered) == list(range(FLEET)), errors
    assert len(attempts) > FLEET      # the cap closed some, which came back
    assert not log_records(cluster, "rc-server", event="too_many_new_connections",
                           address=FLEET_ADDRESS)


# -- what is counted --------------------------------------------------------------------

def test_new_connections_are_a_burst_per_address_then_a_twentieth_of_it_a_second():
    clock = [0.0]
    limit = throttle.NewConnections(40, clock=lambda: clock[0])
    assert all(limit.allow("10.0.0.7") for _ in range(40))
    assert not limit.allow("10.0.0.7")
    assert limit.allow("10.0.0.8")                  # another address has its own
    limit.give_back("10.0.0.7")                     # closed before any work
    assert limit.allow("10.0.0.7") and not limit.allow("10.0.0.7")
    clock[0] += 0.5                                 # 2 a second come back
    assert limit.allow("10.0.0.7") and not limit.allow("10.0.0.7")
    # One IPv6 client holds a whole /64: its addresses share one count.
    ipv6 = [throttle.address_key("2001:db8::%x" % n) for n in range(41)]
    assert all(limit.allow(key) for key in ipv6[:40]) and not limit.allow(ipv6[40])
    unlimited = throttle.NewConnections(0)
    assert all(unlimited.allow("10.0.0.7") for _ in range(10000))


@pytest.mark.parametrize("server", ["tls"], indirect=True)
def test_connections_closed_for_the_authenticating_cap_spend_no_new_connection(server):
    """With TLS, a connection past max_unauthenticated_per_address is
    closed before its handshake: a fleet behind one NAT refused so, again
    and again until its turn, must not spend its address's
    new_connections_per_address on it, or the last devices in are shut
    out for it. Fails without give_back: the fourth connection is refused."""
    instance, port = server
    instance.new_connections = throttle.NewConnections(3)
    instance.config.max_unauthenticated_per_address = 1
    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)   # its handshake not begun
    wait_for(lambda: len(instance.unauthenticated) == 1, 10, "the first connection taken")
    for _ in range(6):
        refused = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            assert refused.recv(1) == b""
        except ConnectionResetError:
            pass
        refused.close()
    waiting.close()
    wait_for(lambda: not instance.unauthenticated, 10, "the first connection gone")
    client = Client(port, tls=True)
    assert client.register(token_of(instance))["message_type"] == "register_ack"
    assert instance.failed_turns == []
