"""rc-web's HTTP loop attacked where it sends answers and wakes itself
(one send per answer, the loop woken only when it has work, 256 KiB reads,
writable() leaving an answer to the thread sending it): pipelined
requests, a client that reads slowly or never, half-closed connections,
bodies trickled byte by byte, uploads around waitress's 512 KiB spooling
size, idle keep-alive connections, over HTTP and HTTPS, and many at once.

Each answer must arrive whole, in order and promptly: a missed wake-up
shows as a request waiting for the loop's 1 s timeout, so every request
here must answer within PROMPT seconds (normally a few milliseconds). A
client that does not read must cost rc-web no CPU (no loop spinning on
a socket) and must not hold up anyone else."""
import hashlib
import http.client
import os
import socket
import ssl
import threading
import time

import psutil
import pytest

from cluster_harness import Cluster, wait_for
from hostile_harness import unharmed
from rc import tls

pytestmark = pytest.mark.e2e

PROMPT = 0.6            # seconds: far above a normal answer, well under the loop's 1 s
IDLE_CPU = 0.25         # rc-web CPU seconds a reader stalled may add over STALL seconds
STALL = 2.5             # seconds a client sits on its answer without reading
SPOOL = 512 * 1024      # waitress's inbuf_overflow: larger bodies go to a file
BIG = 8 * 1024 * 1024   # a file download far larger than any socket buffer
STREAMS = 2             # max_streams: a stream whose client left must give its slot back
SETTINGS = {"web_channel_timeout": 20, "web_read_timeout": 10, "max_streams": STREAMS}


def start(home, **settings):
    cluster = Cluster(home, **dict(SETTINGS, **settings))
    cluster.start()
    cluster.start_worker("good", "--slots", "2")
    wait_for(lambda: cluster.db.execute(
        "SELECT 1 FROM devices WHERE device_id = 'good' AND status = 'online' AND connected = 1"
    ).fetchone(), 30, "good to join")
    cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
    cluster.context = None
    if settings.get("web_tls"):
        cluster.context = ssl.create_default_context(cafile=tls.paths(cluster.config)[0])
        cluster.context.check_hostname = False  # the certificate names retire-cluster
    cluster.big = os.urandom(BIG)
    cluster.big_sha = upload(cluster, cluster.big)
    return cluster


@pytest.fixture(scope="module", params=["http", "https"])
def cluster(request, tmp_path_factory):
    tls_on = request.param == "https"
    cluster = start(tmp_path_factory.mktemp("web-send-" + request.param), web_tls=tls_on)
    yield cluster
    cluster.stop()


# -- clients ---------------------------------------------------------------------------

def connect(cluster, rcvbuf=None, timeout=15):
    sock = socket.socket()
    if rcvbuf:          # set before connect, so the window offered is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", cluster.config.web_port))
    if cluster.context:
        sock = cluster.context.wrap_socket(sock)
    return sock


def head(cluster, method, path, length=None, extra=b""):
    auth = b"Authorization: Bearer %s\r\n" % cluster.admin_token.encode()
    body = b"Content-Length: %d\r\n" % length if length is not None else b""
    return (b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s%s\r\n"
            % (method.encode(), path.encode(), auth, body, extra))


class Responses:
    """The answers on one connection, read in order from one buffered file."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def makefile(self, *args, **kwargs):
        return KeptOpen(self.file)

    def next(self, method="GET"):
        response = http.client.HTTPResponse(self, method=method)
        response.begin()
        body = response.read()
        return response.status, dict(response.getheaders()), body


class KeptOpen:
    """The connection's file, which http.client closes after each answer."""

    def __init__(self, file):
        self.file = file

    def __getattr__(self, name):
        return getattr(self.file, name)

    def close(self):
        pass


def upload(cluster, body):
    sock = connect(cluster)
    try:
        sock.sendall(head(cluster, "POST", "/api/v1/files", len(body),
                          b"Content-Type: application/octet-stream\r\n") + body)
        status, _, answer = Responses(sock).next()
    finally:
        sock.close()
    assert status == 201, answer[:300]
    digest = hashlib.sha256(body).hexdigest()
    assert digest.encode() in answer
    return digest


def timed_get(cluster, path="/health"):
    """(seconds, status, body) of one GET on a fresh connection."""
    sock = connect(cluster)
    try:
        started = time.monotonic()
        sock.sendall(head(cluster, "GET", path, extra=b"Connection: close\r\n"))
        status, _, body = Responses(sock).next()
        return time.monotonic() - started, status, body
    finally:
        sock.close()


def rc_web_cpu(cluster):
    times = psutil.Process(cluster.program_pid("rc-web")).cpu_times()
    return times.user + times.system


def stalled_readers(cluster, paths, rcvbuf=4096):
    """Connections that asked for `paths` and read nothing."""
    socks = []
    for path, extra in paths:
        sock = connect(cluster, rcvbuf=rcvbuf, timeout=30)
        sock.sendall(head(cluster, "GET", path, extra=extra))
        socks.append(sock)
    return socks


# -- the attacks -----------------------------------------------------------------------

def test_pipelined_requests_answer_whole_in_order_and_promptly(cluster):
    """Several requests in one send, over and over on one connection: each
    round's answers come in the order asked, none waits for the loop."""
    paths = ["/health", "/api/v1/files/" + cluster.big_sha[:8] + "x", "/worker.py",
             "/text/status", "/health"]
    with unharmed(cluster, "good"):
        sock = connect(cluster)
        responses, slowest = Responses(sock), 0.0
        for _ in range(25):
            started = time.monotonic()
            sock.sendall(b"".join(head(cluster, "GET", path) for path in paths))
            answers = [responses.next() for _ in paths]
            slowest = max(slowest, time.monotonic() - started)
            assert [status for status, _, _ in answers] == [200, 404, 200, 200, 200]
            assert b"def main" in answers[2][2] and b"status" in answers[4][2]
        sock.close()
        assert slowest < PROMPT, "a pipelined round took %.3f s" % slowest


def test_a_request_sent_while_an_answer_streams_is_answered_next(cluster):
    """The second request arrives while the first's 8 MiB answer is still
    being sent (the loop is not reading then): it is answered right after,
    and so is one sent after the connection sat idle."""
    with unharmed(cluster, "good"):
        for _ in range(3):
            sock = connect(cluster)
            responses = Responses(sock)
            sock.sendall(head(cluster, "GET", "/api/v1/files/" + cluster.big_sha))
            first = responses.file.read(64 * 1024)         # the answer is under way
            sock.sendall(head(cluster, "GET", "/health"))
            rest = responses.file.read(64 * 1024)
            assert first.startswith(b"HTTP/1.1 200") and rest
            time.sleep(0.3)
            # The rest of the first answer, then the second.
            header_end = first.index(b"\r\n\r\n") + 4
            body = first[header_end:] + rest
            body += responses.file.read(BIG - len(body))
            assert hashlib.sha256(body).hexdigest() == cluster.big_sha
            started = time.monotonic()
            status = responses.next()[0]
            assert status == 200 and time.monotonic() - started < PROMPT
            for idle in (0.2, 1.3):       # keep-alive, idle across the loop's timeout
                time.sleep(idle)
                started = time.monotonic()
                sock.sendall(head(cluster, "GET", "/health"))
                assert responses.next()[0] == 200
                assert time.monotonic() - started < PROMPT, "after %.1f s idle" % idle
            sock.close()


def others_served(cluster):
    """Another client's GET /health four times a second for STALL seconds:
    (rc-web's CPU seconds meanwhile, the slowest answer's seconds)."""
    cpu_before, slowest = rc_web_cpu(cluster), 0.0
    ended = time.monotonic() + STALL
    while time.monotonic() < ended:
        seconds, status, _ = timed_get(cluster, "/health")
        assert status == 200
        slowest = max(slowest, seconds)
        time.sleep(0.25)
    return rc_web_cpu(cluster) - cpu_before, slowest


def test_clients_that_never_read_cost_no_cpu_and_hold_no_one_up(cluster):
    """Large answers (a whole file, a Range of it, the task table) to
    clients with a 4 KiB receive window that read nothing: rc-web's CPU
    stays near zero meanwhile, others are served promptly, and when the
    clients do read, every answer is whole."""
    ranged = (1000, BIG - 1001)
    paths = [("/api/v1/files/" + cluster.big_sha, b""),
             ("/api/v1/files/" + cluster.big_sha, b"Range: bytes=%d-%d\r\n" % ranged),
             ("/text/tasks?limit=1000", b""),
             ("/api/v1/files/" + cluster.big_sha, b"")]
    with unharmed(cluster, "good"):
        # What the others' requests cost rc-web by themselves, on this machine
        # as fast as it is today (a slow VM once made them 0.38 CPU s).
        alone, _ = others_served(cluster)
        socks = stalled_readers(cluster, paths)
        try:
            time.sleep(0.5)                 # the answers fill every buffer they can
            spent, slowest = others_served(cluster)
            assert spent < alone + IDLE_CPU, \
                "rc-web spent %.2f CPU s with readers stalled, %.2f without" % (spent, alone)
            assert slowest < PROMPT, "another client waited %.3f s" % slowest
            answers = [Responses(sock).next() for sock in socks]
        finally:
            for sock in socks:
                sock.close()
    assert hashlib.sha256(answers[0][2]).hexdigest() == cluster.big_sha
    assert answers[1][0] == 206 and answers[1][2] == cluster.big[ranged[0]:ranged[1] + 1]
    assert answers[2][0] == 200
    assert answers[3][2] == answers[0][2]


def test_a_half_closed_connection_gets_its_whole_answer(cluster):
    """shutdown(SHUT_WR) right after the request (a client saying it will
    send nothing more) still gets the answer, small or large."""
    if cluster.context:
        pytest.skip("a TLS client closes its writing half with close_notify, not shutdown")
    with unharmed(cluster, "good"):
        for path, check in (("/health", lambda body: b"status" in body),
                            ("/api/v1/files/" + cluster.big_sha,
                             lambda body: hashlib.sha256(body).hexdigest() == cluster.big_sha)):
            for _ in range(5):
                sock = connect(cluster)
                sock.sendall(head(cluster, "GET", path))
                sock.shutdown(socket.SHUT_WR)
                try:
                    status, _, body = Responses(sock).next()
                finally:
                    sock.close()
                assert status == 200 and check(body), path


def test_a_stream_whose_client_leaves_gives_its_slot_back(cluster):
    """A client that hangs up on a stream (or half-closes it) ends it: its
    thread and its stream slot are free again within a stream's poll, not
    at the next ping, 15 s on."""
    def open_stream():
        sock = connect(cluster)
        sock.sendall(head(cluster, "GET", "/stream/tasks"))
        return sock, sock.recv(4096)

    with unharmed(cluster, "good"):
        for leave in (socket.SHUT_RDWR, socket.SHUT_WR):
            deadline = time.monotonic() + 15
            while True:
                streams = []        # every slot taken (another client may hold some)
                while len(streams) < STREAMS + 3 and not (
                        streams and streams[-1][1].startswith(b"HTTP/1.1 503")):
                    streams.append(open_stream())
                if len(streams) > 1 or time.monotonic() > deadline:
                    break
                # All still held: the last round's probe, or one of its streams,
                # until rc-web's next poll of it (make test once met that).
                for sock, _ in streams:
                    sock.close()
                time.sleep(0.2)
            assert len(streams) > 1 and streams[-1][1].startswith(b"HTTP/1.1 503"), \
                [first[:12] for _, first in streams]
            for sock, _ in streams:
                if cluster.context or leave == socket.SHUT_RDWR:
                    sock.close()
                else:
                    sock.shutdown(leave)
            started, answer = time.monotonic(), b""
            while time.monotonic() - started < 3 and not answer.startswith(b"HTTP/1.1 200"):
                time.sleep(0.1)
                sock, answer = open_stream()
                sock.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            for sock, _ in streams:
                sock.close()


def test_a_body_trickled_byte_by_byte_is_answered_at_its_last_byte(cluster):
    body = b'{"task_type": "shell", "payload": {"command": "echo trickled"}, ' \
           b'"requirements": {"device_id": "good"}}'
    with unharmed(cluster, "good"):
        sock = connect(cluster)
        sock.sendall(head(cluster, "POST", "/api/v1/tasks", len(body),
                          b"Content-Type: application/json\r\n"))
        for byte in body[:-1]:
            sock.sendall(bytes([byte]))
            time.sleep(0.005)
        started = time.monotonic()
        sock.sendall(body[-1:])
        status, _, answer = Responses(sock).next()
        sock.close()
        assert status in (200, 201, 202), answer[:300]
        assert time.monotonic() - started < PROMPT


def test_uploads_around_the_spooling_size_arrive_whole(cluster):
    with unharmed(cluster, "good"):
        for size in (SPOOL - 1, SPOOL, SPOOL + 1, 2 * SPOOL + 7):
            body = os.urandom(size)
            started = time.monotonic()
            upload(cluster, body)
            assert time.monotonic() - started < PROMPT * 2, size


def test_many_clients_at_once_with_stalled_readers(cluster):
    """Pipelined, slow and idle clients all at once, beside readers that
    stalled: every answer whole, none late, rc-web unharmed."""
    failures, latencies = [], []

    def client(number):
        try:
            sock = connect(cluster)
            responses = Responses(sock)
            for _ in range(6):
                started = time.monotonic()
                sock.sendall(head(cluster, "GET", "/health") + head(cluster, "GET", "/worker.py"))
                assert responses.next()[0] == 200 and b"def main" in responses.next()[2]
                latencies.append(time.monotonic() - started)
                time.sleep(0.05 * (number % 3))
            sock.close()
        except Exception as e:          # reported by the test, not lost in a thread
            failures.append(repr(e))

    with unharmed(cluster, "good"):
        socks = stalled_readers(cluster, [("/api/v1/files/" + cluster.big_sha, b"")] * 3)
        try:
            threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert failures == []
            assert len(latencies) == 12 * 6
            # Twelve clients share two cores with the tests: the median, not
            # the slowest, is the loop's, and a missed wake-up costs ~1 s.
            assert sorted(latencies)[len(latencies) // 2] < PROMPT
            answers = [Responses(sock).next()[2] for sock in socks]
            assert all(hashlib.sha256(a).hexdigest() == cluster.big_sha for a in answers)
        finally:
            for sock in socks:
                sock.close()
