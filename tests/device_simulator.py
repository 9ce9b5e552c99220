"""Thousands of simulated devices from one process, for `make bench`.

It speaks plain TCP: run it against a main node with "tls": false (the
bench does); thousands of TLS handshakes in one Python process would make the
simulator, not rc-server, the thing measured.

Each connection authenticates like a real worker (HMAC on the join token),
heartbeats at the given interval (spread evenly, so 10,000 devices at 60 s
are 167 heartbeats a second), answers every task at once, and the process
writes what it measured as JSON when it is done:

    python tests/device_simulator.py --join 127.0.0.1:8080 --token-file var/token \\
        --count 10000 --interval 60 --duration 60 --report sim.json
"""
import argparse
import heapq
import json
import os
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "lib"))
from rc import protocol  # noqa: E402


IN_FLIGHT = 500     # devices connected and not yet registered, at most


class Device:
    def __init__(self, number, sock):
        self.device_id = "sim-%05d" % number
        self.sock = sock
        self.inbox = bytearray()
        self.nonce = protocol.new_nonce()
        self.registered = False
        self.heartbeat_sent = None


class Simulator:
    def __init__(self, options):
        self.options = options
        self.token = open(options.token_file).read().strip()
        self.selector = selectors.DefaultSelector()
        self.devices = []
        self.ack_latencies = []
        self.ack_times = []         # wall-clock time of each acknowledgement
        self.registered = 0
        self.reconnects = 0        # refused or cut off before registering
        self.tasks_answered = 0

    def connect_all(self):
        """Like a fleet booting: at most IN_FLIGHT devices authenticating at
        once (rc-server refuses more than max_unauthenticated, 1,000 by
        default), and a device refused or cut off before its register_ack
        connects again, as a worker would after its backoff."""
        for number in range(self.options.count):
            while len(self.devices) - self.registered >= IN_FLIGHT:
                self.turn(0.01)
            device = Device(number, None)
            self.devices.append(device)
            self.connect(device)

    def connect(self, device):
        host, port = self.options.join.rsplit(":", 1)
        device.sock = socket.create_connection((host, int(port)))
        device.sock.setblocking(False)
        device.inbox = bytearray()
        device.nonce = protocol.new_nonce()      # a new one per connection, as a worker's
        self.selector.register(device.sock, selectors.EVENT_READ, device)

    def lost(self, device):
        self.selector.unregister(device.sock)
        device.sock.close()
        if not device.registered:
            self.reconnects += 1
            self.connect(device)

    def run(self):
        started = time.monotonic()
        self.connect_all()
        while self.registered < len(self.devices) and time.monotonic() - started < 120:
            self.turn(0.05)
        registered_in = time.monotonic() - started
        # Spread the heartbeats evenly over one interval.
        now = time.monotonic()
        self.due = [(now + self.options.interval * n / len(self.devices), n)
                    for n in range(len(self.devices))]
        end = now + self.options.duration
        while time.monotonic() < end:
            self.turn(0.01)
            self.send_due_heartbeats()
        return {"devices": len(self.devices), "registered": self.registered,
                "registered_in_s": registered_in, "reconnects": self.reconnects,
                "heartbeats_acked": len(self.ack_latencies),
                "ack_p50_ms": percentile(self.ack_latencies, 50) * 1000,
                "ack_p99_ms": percentile(self.ack_latencies, 99) * 1000,
                "tasks_answered": self.tasks_answered,
                "acks": list(zip(self.ack_times, self.ack_latencies))}

    def send_due_heartbeats(self):
        """Heartbeats that are due, from a queue ordered by time (looking at
        every device each turn would make the simulator the bottleneck)."""
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            _, n = heapq.heappop(self.due)
            heapq.heappush(self.due, (now + self.options.interval, n))
            device = self.devices[n]
            if device.registered and device.heartbeat_sent is None:
                device.heartbeat_sent = time.monotonic()
                self.send(device, "heartbeat", {"system_metrics": {"cpu_percent": 3.0},
                                                "status": "idle", "active_tasks": []})

    def turn(self, timeout):
        for key, _ in self.selector.select(timeout):
            device = key.data
            try:
                chunk = device.sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.lost(device)
                continue
            device.inbox += chunk
            for line in protocol.split_frames(device.inbox):
                self.receive(device, json.loads(line))

    def receive(self, device, envelope):
        kind, data = envelope["message_type"], envelope["data"]
        if kind == "hello":
            self.send(device, "register", {
                "device_id": device.device_id, "protocol": 1, "nonce": device.nonce,
                "proof": protocol.worker_proof(self.token, data["nonce"], device.nonce,
                                               device.device_id),
                "device_info": {"hostname": device.device_id, "platform": "linux",
                                "architecture": "aarch64"},
                "hardware_specs": {"cpu_cores": 4, "memory_gb": 1.0},
                "task_types": ["echo", "sleep", "shell"], "slots": 1, "role": "compute"})
        elif kind == "register_ack":
            device.registered = True
            self.registered += 1
        elif kind == "heartbeat_ack" and device.heartbeat_sent is not None:
            self.ack_latencies.append(time.monotonic() - device.heartbeat_sent)
            self.ack_times.append(time.time())
            device.heartbeat_sent = None
        elif kind == "task_assign":
            self.tasks_answered += 1
            self.send(device, "task_result", {
                "task_id": data["task_id"], "attempt": data["attempt"], "status": "completed",
                "result": {"output": "", "exit_code": 0}})

    def send(self, device, kind, data):
        try:
            device.sock.sendall(protocol.encode(kind, data, sender_id=device.device_id))
        except (BlockingIOError, OSError):
            pass


def percentile(values, p):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--join", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--report", required=True)
    options = parser.parse_args()
    report = Simulator(options).run()
    with open(options.report, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
