"""Round 32 of attacks: denial of service. A stranger on the LAN (no token,
no device secret) or one enrolled device gone bad tries to stop everyone
else's work on a running TLS cluster, or to grow its memory, disk or
database without bound. Each test failed on the code before its fix; after
each attack the programs keep their pids and a good worker's tasks
complete (hostile_harness.unharmed)."""
import fnmatch
import importlib.util
import json
import random
import selectors
import socket
import ssl
import threading
import time

import psutil
import pytest

from cluster_harness import WORKER
from hostile_harness import unharmed
from rc import db, files, protocol
from rc.states import FILES_MAX_OUTPUTS
from test_bad_input import read_frame, register_frame
from test_files_hostile import authenticated
from test_hostile_rows import server  # noqa: F401 (a fixture: rc-server in a thread, tcp and tls)
from test_inline_files import Device, entry, sha, with_the_good_worker
from test_server import Client, token_of

pytestmark = pytest.mark.e2e

MAX_UNAUTHENTICATED = 64        # rc-server's cap, low: fewer sockets to fill it with
PER_ADDRESS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s32"), "good",
                                        max_unauthenticated=MAX_UNAUTHENTICATED,
                                        max_unauthenticated_per_address=PER_ADDRESS,
                                        read_access="token"):
        assert cluster.config.tls
        yield cluster


def joined(cluster, device_id):
    """A connection of a device that proved the token (its first time) or
    its own secret: (its register_ack, the socket); generous timeouts, the
    machine may be busy."""
    sock = cluster.connect(timeout=20)
    hello = read_frame(sock, timeout=20)
    assert hello and hello["message_type"] == "hello", hello
    nonce, mine = hello["data"]["nonce"], protocol.new_nonce()
    secret = cluster.secrets.get(device_id)
    proof = protocol.worker_proof(secret or cluster.token, nonce, mine, device_id)
    sock.sendall(register_frame(cluster, nonce, device_id, proof, mine,
                                auth="device" if secret else "token"))
    ack = read_frame(sock, timeout=20)
    assert ack and ack["message_type"] == "register_ack", ack
    if not secret:
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     ack["data"]["device_secret"])
    return ack, sock


def tls_client(sock):
    """A TCP connection to rc-server wrapped in TLS as a worker wraps it
    (the pinned certificate aside: cluster.connect checks that)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context.wrap_socket(sock)


class Strangers:
    """`per_address` idle TCP connections from each address to a port,
    never a TLS ClientHello; one that is cut is opened again at once."""

    def __init__(self, port, addresses, per_address):
        self.port, self.selector = port, selectors.DefaultSelector()
        self.stop, self.opened = threading.Event(), 0
        self.wanted = len(addresses) * per_address
        for address in addresses:
            for _ in range(per_address):
                self.open(address)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def open(self, address):
        sock = socket.socket()
        sock.bind((address, 0))
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.selector.register(sock, selectors.EVENT_READ, address)
        self.opened += 1

    def run(self):
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.2):
                try:
                    cut = not key.fileobj.recv(4096)
                except OSError:
                    cut = True
                if cut:
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open(key.data)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def test_strangers_on_many_addresses_lock_no_worker_out_of_rc_server(cluster):
    """rc-server refused every new connection once max_unauthenticated were
    authenticating: strangers on max_unauthenticated / 8 + 1 addresses (126
    by default), 8 idle connections each, opened again at each auth_timeout,
    locked out every worker that (re)connected, closed before its TLS
    handshake. Now the oldest connection of the address holding the most
    makes way for a newcomer, and a worker gets in at once."""
    addresses = ["127.0.0.%d" % (40 + n)
                 for n in range(MAX_UNAUTHENTICATED // PER_ADDRESS + 2)]
    with unharmed(cluster, "good"):
        strangers = Strangers(cluster.config.tcp_port, addresses, PER_ADDRESS)
        try:
            time.sleep(2)          # rc-server has accepted them all by now
            assert strangers.opened >= strangers.wanted > MAX_UNAUTHENTICATED
            for attempt in range(5):          # a worker reconnecting, again and again
                _, sock = joined(cluster, "returning")
                sock.close()
            assert strangers.opened > strangers.wanted     # they were made to wait
        finally:
            strangers.close()


class Heartbeats:
    """A device that heartbeats back to back in a thread of its own and
    keeps the longest wait for an ack (pings answered on the way)."""

    def __init__(self, cluster, device_id):
        _, self.sock = joined(cluster, device_id)
        self.device_id, self.longest, self.acks = device_id, 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        reader = self.sock.makefile("rb")
        self.sock.settimeout(300)
        while not self.stop.is_set():
            started = time.monotonic()
            self.sock.sendall(protocol.encode("heartbeat", {"active_tasks": []},
                                              sender_id=self.device_id))
            while True:
                frame = json.loads(reader.readline())
                if frame["message_type"] == "heartbeat_ack":
                    break
                if frame["message_type"] == "ping":
                    self.sock.sendall(protocol.encode("pong", {}, sender_id=self.device_id))
            self.longest = max(self.longest, time.monotonic() - started)
            self.acks += 1
            time.sleep(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(300)
        self.sock.close()


def test_deep_output_names_against_a_double_star_glob_stall_no_one(cluster):
    """A device holding a task with --output '**/*.txt' sent a result with
    a hundred empty inline files named 2,040 directories deep: rc-server's
    loop tried every split of each name among the "**"s (0.1 s a name; over
    a minute a name for '**/a/**/*.txt'), and no other device's heartbeat
    was answered meanwhile. Now a name costs one pass per part of the glob."""
    device = Device(cluster, "deep-names")
    probe = Heartbeats(cluster, "probe")
    deep = "/".join(["d"] * 2040)      # the name within 4096 bytes
    try:
        with unharmed(cluster, "good"):
            assign = device.take("true", "--output", "**/*.txt", "--output", "**/d/**/*.txt")
            entries = [entry("%s/%d.bin" % (deep, n), b"") for n in range(100)]
            row = device.finish(assign, entries)
            assert row["state"] == "completed"
            assert "no --output glob of the task matches it" in row["result"]["stderr"]
            time.sleep(0.5)
    finally:
        probe.close()
        device.close()
    assert probe.acks > 5
    assert probe.longest < 5.0, "a heartbeat waited %.1fs for its ack" % probe.longest


def every_split(pattern_parts, parts):
    """The glob matching of round 31 and before, which tried every split of
    the name among the "**"s: the meaning glob_match must keep."""
    if not pattern_parts:
        return not parts
    head = pattern_parts[0]
    if head == "**":
        return any(every_split(pattern_parts[1:], parts[skip:])
                   for skip in range(len(parts) + 1)
                   if not any(part.startswith(".") for part in parts[:skip]))
    return bool(parts) and (head.startswith(".") or not parts[0].startswith(".")) \
        and fnmatch.fnmatchcase(parts[0], head) and every_split(pattern_parts[1:], parts[1:])


def test_one_pass_globs_match_what_every_split_matched():
    spec = importlib.util.spec_from_file_location("rc_worker_copy", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    chooser = random.Random(32)
    heads, names = ["**", "*", "a", ".*", "*.txt", "b?", ".a", "[ab]"], \
        ["a", "b", ".a", "x.txt", ".x.txt", "ab", "bb"]
    for _ in range(3000):
        pattern = [chooser.choice(heads) for _ in range(chooser.randint(0, 4))]
        name = [chooser.choice(names) for _ in range(chooser.randint(0, 5))]
        expected = every_split(pattern, name)
        assert files.glob_match(pattern, name) == expected, (pattern, name)
        assert worker.glob_match(pattern, name) == expected, (pattern, name)


def test_a_device_cannot_grow_the_database_by_a_row_per_empty_output(cluster):
    """rc-files stored every output a device put for a task it held whose
    --output glob matched, however many: empty files cost the quota
    nothing, so a device holding one task with --output '*' added a
    task_files row (its name up to 4 KiB) per put, as long as it held it.
    An attempt now stores at most FILES_MAX_OUTPUTS outputs, as many as a
    worker uploads; a name it stored already may be put again."""
    most = FILES_MAX_OUTPUTS
    device = Device(cluster, "many-outputs")
    sock = None
    try:
        with unharmed(cluster, "good"):
            assign = device.take("true", "--output", "*")
            key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
            sock, reader, welcome = authenticated(cluster, "many-outputs")
            assert welcome == {"ok": True}
            sock.settimeout(60)
            names = ["out-%05d-%s" % (n, "x" * 200) for n in range(most + 20)]
            names.append(names[0])
            sock.sendall(b"".join(json.dumps({"put": dict(key, name=name, size=0, whole=True,
                                                          sha256=sha(b""))}).encode() + b"\n"
                                  for name in names))
            answers = [json.loads(reader.readline()) for _ in names]
            assert all(answer == {"ok": True, "stored": True} for answer in answers[:most])
            assert all(answer["error"]["code"] == "too_many_outputs"
                       for answer in answers[most:-1]), answers[most:-1]
            assert answers[-1] == {"ok": True, "stored": True}      # put again: replaced
            rows = cluster.db.execute("SELECT count(*) FROM task_files WHERE task_id = ?"
                                      " AND kind = 'output'", (key["task_id"],)).fetchone()[0]
            assert rows == most
            assert device.finish(assign, [])["state"] == "completed"
    finally:
        if sock is not None:
            sock.close()
        device.close()


def test_strangers_in_the_middle_of_a_frame_cost_rc_server_no_gigabyte(cluster):
    """Before it registers a connection could send a 1 MiB frame, and hold
    it unfinished until auth_timeout: strangers at max_unauthenticated
    (1,000 by default) made rc-server hold ~1 GB (measured: 325 MB for
    320 connections). Before registering a frame may now be a register's
    size: max_profile_bytes plus room for its task lists; a larger one is
    refused at once, and a register of that size still gets in."""
    server = psutil.Process(cluster.program_pid("rc-server"))
    before = server.memory_info().rss
    # A frame without its end, or a task_result announcing raw bytes that
    # do not all come: each would be held until auth_timeout.
    unfinished = {"frame_too_large": b'{"message_type": "register", "data": {"x": "'
                  + b"x" * (1024 * 1024 - 100),
                  "not_registered": protocol.encode("task_result", {
                      "task_id": 1, "attempt": 1, "status": "completed",
                      "files_inline": [], "inline_bytes": 1024 * 1024})
                  + b"x" * (1024 * 1024 - 100)}
    held, refused = [], []
    try:
        for address in ["127.0.0.%d" % (80 + n) for n in range(MAX_UNAUTHENTICATED
                                                                // PER_ADDRESS - 1)]:
            for code, data in unfinished.items():
                for _ in range(PER_ADDRESS // 2):
                    sock = socket.create_connection(("127.0.0.1", cluster.config.tcp_port),
                                                    timeout=20, source_address=(address, 0))
                    sock = tls_client(sock)
                    held.append((code, sock))
                    assert read_frame(sock, timeout=20)["message_type"] == "hello"
                    try:
                        sock.sendall(data)
                    except OSError:
                        pass            # refused before all of it went
        grown = server.memory_info().rss - before
        for code, sock in held:
            frame = read_frame(sock, timeout=20)
            refused.append(frame and frame["data"]["code"] == code)
    finally:
        for _, sock in held:
            sock.close()
    assert grown < 32 * 1024 * 1024, "rc-server grew by %d MB" % (grown >> 20)
    assert all(refused) and len(refused) == len(held)
    # A register as large as a device may send still gets in.
    profile = {"hostname": "big", "notes": "n" * (cluster.config.max_profile_bytes - 2000)}
    active = [{"task_id": 10 ** 6 + n, "attempt": 1} for n in range(1500)]
    sock = cluster.connect(timeout=20)
    hello = read_frame(sock, timeout=20)
    mine = protocol.new_nonce()
    frame = register_frame(cluster, hello["data"]["nonce"], "big-register", mine=mine,
                           device_info=profile, active_tasks=active)
    assert len(frame) > 100 * 1024
    sock.sendall(frame)
    ack = read_frame(sock, timeout=20)
    sock.close()
    assert ack["message_type"] == "register_ack", ack


def grow_the_database(cluster, tasks_added):
    """Copies of a finished task: a database of a cluster some weeks old."""
    done = cluster.rc("submit", "--wait", "echo", "seed")
    assert done.stdout == "seed\n"
    seed = cluster.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
    columns = [row[1] for row in cluster.db.execute("PRAGMA table_info(tasks)")
               if row[1] != "task_id"]
    copied = ["json_object('command', hex(randomblob(300)))" if name == "payload" else name
              for name in columns]
    for _ in range(tasks_added // 10000):
        with db.write(cluster.db):
            cluster.db.execute(
                "INSERT INTO tasks(%s) SELECT %s FROM tasks, (WITH RECURSIVE n(x) AS"
                " (SELECT 1 UNION ALL SELECT x + 1 FROM n LIMIT 10000) SELECT x FROM n)"
                " WHERE task_id = ?" % (", ".join(columns), ", ".join(copied)), (seed,))


def http_get(address, port, path, token=None):
    """(status, seconds, JSON body) of a GET from `address`."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(address, 0))
    with sock, sock.makefile("rb") as reader:
        sock.sendall(request_head(path, token))
        return read_answer(reader) + (time.monotonic() - started,)


def request_head(path, token=None):
    return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (
        path, "Authorization: Bearer %s\r\n" % token if token else "")).encode()


def read_answer(reader):
    status = int(reader.readline().split()[1])
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, reader.read(length)


def test_strangers_asking_for_health_cost_one_check_every_few_seconds(cluster):
    """/health is open to anyone, and each answer ran a check that writes the
    database and reads all of it (PRAGMA quick_check): with ~100 MB of task
    history, 8 strangers asking back to back kept both cores busy, got a
    few dozen answers in 4 s, and made a reader's /text/status wait
    seconds. A client that may not read the cluster now gets the last
    report while it is under HEALTH_REUSE_SECONDS old; a reader a new one."""
    grow_the_database(cluster, 100000)
    port = cluster.config.web_port
    admin = open(cluster.config.admin_token_path).read().strip()
    stop, answers, seen = threading.Event(), [], set()

    def ask(address):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60,
                                        source_address=(address, 0))
        with sock, sock.makefile("rb") as reader:
            while not stop.is_set():
                sock.sendall(request_head("/health"))
                status, body = read_answer(reader)
                answers.append(status)
                seen.add(json.loads(body).get("checked_at"))
    askers = [threading.Thread(target=ask, args=("127.0.0.%d" % (100 + n % 2),), daemon=True)
              for n in range(8)]
    started = time.time()
    for asker in askers:
        asker.start()
    time.sleep(1)
    status, body, seconds = http_get("127.0.0.1", port, "/text/status", admin)
    time.sleep(3)
    stop.set()
    for asker in askers:
        asker.join(60)
    assert status == 200 and b"devices_online" in body
    # What tells the fault: a check per answer gave dozens of checked_at in
    # `seen` (below). The reader's wait is a loose bound: 8 clients asking
    # back to back share rc-web's GIL with it even when each answer is the
    # kept report, and on this 2-core VM that alone held it 4-6 s on
    # 2026-12-06, the commit before this session's too (3 s was the bound).
    assert seconds < 15.0, "a reader waited %.1fs for /text/status" % seconds
    # 503: the programs check is CRITICAL, rc-worker is stopped here.
    assert len(answers) > 200 and set(answers) <= {200, 503}
    assert None not in seen and len(seen) <= 3, sorted(seen)
    _, body, _ = http_get("127.0.0.1", port, "/health", admin)     # a reader's: new
    assert json.loads(body)["checked_at"] > started + 4


def test_at_the_cap_the_busiest_address_makes_way_with_or_without_tls(server):
    """make_way in both modes: the oldest connection of the address holding
    the most is closed (told why once past TLS), the newcomer is greeted."""
    instance, port = server
    instance.config.max_unauthenticated = 4
    busiest = []
    for _ in range(3):
        busiest.append(socket.create_connection(("127.0.0.1", port), timeout=20,
                                                source_address=("127.0.0.51", 0)))
        time.sleep(0.2)          # accepted in this order
    other = socket.create_connection(("127.0.0.1", port), timeout=20,
                                     source_address=("127.0.0.52", 0))
    time.sleep(0.2)
    newcomer = Client(port, tls=instance.config.tls)       # the fifth, from 127.0.0.1
    assert newcomer.register(token_of(instance), "newcomer")["message_type"] == "register_ack"
    received = read_until_closed(busiest[0], 20)
    assert received is not None, "the oldest of the busiest address is still open"
    if not instance.config.tls:
        frames = [json.loads(line) for line in received.splitlines()]
        assert [frame["message_type"] for frame in frames] == ["hello", "error"]
        assert frames[1]["data"]["code"] == "too_many_connections"
    for sock in busiest[1:] + [other]:
        assert read_until_closed(sock, 0.5) is None
    assert instance.failed_turns == []
    for sock in busiest + [other]:
        sock.close()


def read_until_closed(sock, seconds):
    """What the server sent before it closed the socket; None when it was
    still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except socket.timeout:
        return None
    except ConnectionResetError:
        return received
