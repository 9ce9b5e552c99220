"""A client that sends its last message and then ends its sending over TLS
(a TCP half-close, with or without a TLS close_notify first) still gets the
answer it is owed, from rc-server and from rc-files, on a running main node
with TLS on.

Python's SSLSocket cannot read after shutdown(SHUT_WR) (it drops its TLS
state), so the client here is an ssl.SSLObject over a plain socket: the
same bytes a worker in any language, or `openssl s_client` closing stdin,
puts on the wire.
"""
import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import ssl

import pytest

from rc import protocol, transfer
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("halfclose"), tls=True)


class HalfClosingClient:
    """TLS over a plain socket through memory BIOs, so that it can end its
    sending and still read."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self.inbox = b""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.push()
                if not self.pull():
                    raise ConnectionError("closed during the handshake")
        self.push()

    def push(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def pull(self):
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def send(self, data):
        self.tls.write(data)
        self.push()

    def end_sending(self, close_notify):
        """A TCP half-close, after a TLS close_notify if asked."""
        if close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass      # sent; the server's own close_notify comes later
            self.push()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            # The server answered and ended the connection first (a refused
            # stranger): its answer waits to be read all the same.
            if e.errno != errno.ENOTCONN:
                raise

    def line(self):
        """The next line, or None when the server ended the connection."""
        while b"\n" not in self.inbox:
            try:
                self.inbox += self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self.pull():
                    return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return None
            except ssl.SSLError as e:
                return "tls error: %s" % e
        line, _, self.inbox = self.inbox.partition(b"\n")
        return json.loads(line)

    def close(self):
        self.sock.close()


def register_frame(cluster, nonce, device_id):
    mine = protocol.new_nonce()
    return protocol.encode("register", {
        "device_id": device_id, "protocol": 1, "nonce": mine, "auth": "token",
        "proof": protocol.worker_proof(cluster.token, nonce, mine, device_id)},
        sender_id=device_id)


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_rc_server_answers_a_register_sent_just_before_a_half_close(cluster, close_notify):
    client = HalfClosingClient(cluster.config.tcp_port)
    hello = client.line()
    assert hello["message_type"] == "hello"
    device_id = "half-%s" % ("notify" if close_notify else "fin")
    client.send(register_frame(cluster, hello["data"]["nonce"], device_id))
    client.end_sending(close_notify)
    answer = client.line()
    client.close()
    assert isinstance(answer, dict) and answer["message_type"] == "register_ack", answer


@contextlib.contextmanager
def server_held(cluster):
    """rc-server stopped (SIGSTOP) meanwhile: what the client sends, and the
    end of its sending, are all there when it next reads -- the interleaving
    forced, not waited for."""
    pid = cluster.program_pid("rc-server")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def answers(client):
    """The message types rc-server sends until it ends the connection."""
    kinds = []
    while True:
        frame = client.line()
        if not isinstance(frame, dict):
            return kinds
        kinds.append(frame["message_type"])


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_rc_server_answers_a_frame_whose_connection_ends_in_the_same_read(cluster,
                                                                          close_notify):
    """A whole frame and, in the same TLS record, the start of one that the
    end of the connection cuts: the whole one is still served and answered.
    Before the fix rc-server read on for the rest, met the end, and closed
    at once: the register was never served (no register_ack, no device)."""
    client = HalfClosingClient(cluster.config.tcp_port)
    hello = client.line()
    device_id = "cut-%s" % ("notify" if close_notify else "fin")
    with server_held(cluster):
        client.send(register_frame(cluster, hello["data"]["nonce"], device_id)
                    + b'{"message_type": "heartbeat", "data": {')
        client.end_sending(close_notify)
    kinds = answers(client)
    client.close()
    assert kinds[:1] == ["register_ack"], kinds


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_rc_server_answers_a_result_with_small_files_sent_just_before_a_half_close(
        cluster, close_notify):
    """A task_result's small files follow its frame as raw bytes, so the
    last thing a worker sends before it ends its sending is not the end of
    a line. Before the fix rc-server read on, met the end and closed: the
    result was never served and its ack never sent. (A result for no task
    of this device: acknowledged, and refused as stale.)"""
    device_id = "result-%s" % ("notify" if close_notify else "fin")
    client = HalfClosingClient(cluster.config.tcp_port)
    hello = client.line()
    client.send(register_frame(cluster, hello["data"]["nonce"], device_id))
    assert client.line()["message_type"] == "register_ack"
    data = b"bytes of a small output"
    frame = protocol.encode("task_result", {
        "task_id": 999999, "attempt": 1, "status": "completed", "result": {"output": "x"},
        "files_inline": [{"name": "out.txt", "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}],
        "inline_bytes": len(data)}, sender_id=device_id)
    with server_held(cluster):
        client.send(frame + data)
        client.end_sending(close_notify)
    kinds = answers(client)
    client.close()
    assert "task_result_ack" in kinds, kinds


def files_client(cluster, device_id, secret):
    client = HalfClosingClient(cluster.config.files_port)
    hello = client.line()["hello"]
    mine = os.urandom(16).hex()
    client.send(json.dumps({"auth": {"device_id": device_id, "nonce": mine, "proof":
                            transfer.proof(secret, hello["nonce"], mine, device_id)}})
                .encode() + b"\n")
    return client


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_rc_files_answers_a_request_sent_just_before_a_half_close(cluster, close_notify):
    """A stranger's auth (an unknown device) is answered with its error
    even when it ends its sending right after."""
    client = files_client(cluster, "nobody-%d" % close_notify, os.urandom(32).hex())
    client.end_sending(close_notify)
    answer = client.line()
    client.close()
    assert isinstance(answer, dict) and answer["error"]["code"] == "unknown_device", answer
