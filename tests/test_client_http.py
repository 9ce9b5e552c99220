"""rc.client's own HTTP/1.1 exchange (Http.request), against a real socket
on 127.0.0.1 that answers with canned bytes: every framing rc-web or a proxy
may use, a kept-alive connection closed meanwhile, and hostile answers,
each refused with a clear ClusterError instead of a hang or a crash."""
import socket
import ssl
import threading
import time
import types

import pytest

from rc import client, tls


class Canned:
    """A server that reads one request at a time and answers each with the
    next of `answers` (bytes; a 1-tuple of bytes: then it closes), None
    closing the connection without an answer; it records the requests."""

    def __init__(self, answers, tls_context=None):
        self.answers = list(answers)
        self.requests = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        if tls_context is not None:
            self.listener = tls_context.wrap_socket(self.listener, server_side=True)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while self.answers:
            connection, _ = self.listener.accept()
            with connection:
                while self.answers:
                    request = self.read_request(connection)
                    if request is None:
                        break
                    self.requests.append(request)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break           # close without answering
                    connection.sendall(answer[0] if isinstance(answer, tuple) else answer)
                    if isinstance(answer, tuple):
                        break

    @staticmethod
    def read_request(connection):
        data = b""
        while b"\r\n\r\n" not in data:
            piece = connection.recv(65536)
            if not piece:
                return None
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
                while len(body) < length:
                    body += connection.recv(65536)
        return head, body


def http_to(server):
    return client.Http("http://127.0.0.1:%d" % server.port, "secret")


def test_lengths_chunks_and_close_delimited_bodies():
    server = Canned([
        b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{\"a\": true}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\n{\"b\r\n6\r\n\": 2}\n\r\n0\r\nTrailer: z\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        (b"HTTP/1.0 200 OK\r\n\r\nto the end",)])
    http = http_to(server)
    assert http.json("POST", "/api/v1/tasks", {"task_type": "echo"}) == {"a": True}
    assert http.request("GET", "/x") == (200, b'{"b": 2}\n')
    assert http.request("GET", "/y") == (204, b"")
    assert http.request("GET", "/z", timeout=10) == (200, b"to the end")
    head, body = server.requests[0]
    assert head.startswith(b"POST /api/v1/tasks HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer secret\r\n" in head
    assert b"\r\nContent-Length: 21" in head and body == b'{"task_type": "echo"}'
    assert b"Host: 127.0.0.1:%d" % server.port in head


def test_a_kept_alive_connection_closed_meanwhile_is_opened_again_once():
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", None,
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
    http = http_to(server)
    assert http.json("GET", "/one") == {}
    assert http.json("GET", "/two") == {}          # the first connection closed: a new one
    assert [request[0].split(b" ")[1] for request in server.requests] == [
        b"/one", b"/two", b"/two"]


@pytest.mark.parametrize("answer, message", [
    (b"SSH-2.0-OpenSSH\r\n", "bad answer from .*: not an HTTP/1.x status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header fields"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "header line over"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\nshort",), "cut short"),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nshort",),
     "over the client's limit"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
])
def test_hostile_answers_are_clear_errors(answer, message):
    # A POST without a key is never sent again: a GET cut short would be
    # (tests/test_hostile_s33.py).
    server = Canned([answer, None])
    with pytest.raises(client.ClusterError, match=message):
        http_to(server).request("POST", "/x", timeout=10)
    assert len(server.requests) == 1


def test_nothing_listening_is_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(client.ClusterError, match="cannot reach http://127.0.0.1:%d" % port):
        client.Http("http://127.0.0.1:%d" % port, None).request("GET", "/x", timeout=5)


def test_a_large_body_arrives_whole():
    server = Canned([b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"])
    data = bytes(range(256)) * 1000            # past SMALL_BODY: head and body sent apart
    assert len(data) > client.SMALL_BODY
    assert client.Http("http://127.0.0.1:%d" % server.port, "t").request(
        "POST", "/api/v1/files", data, {"Content-Type": "application/octet-stream"}) == (201, b"{}")
    head, body = server.requests[0]
    assert body == data and b"\r\nContent-Length: 256000" in head


@pytest.mark.parametrize("path", ["/x y", "/x\r\nX-Injected: 1", "/é"])
def test_a_path_that_would_break_the_request_line_is_refused(path):
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
    with pytest.raises(ValueError, match="a request path must be printable ASCII"):
        http_to(server).request("GET", path)
    with pytest.raises(ValueError, match="the token must be printable ASCII"):
        client.Http("http://127.0.0.1:%d" % server.port, "tok\r\nX-Injected: 1")


class Trickled(Canned):
    """Canned, but each answer goes out a few bytes at a time, so that a
    chunk's size, data and CRLF arrive split anywhere."""

    def serve(self):
        connection, _ = self.listener.accept()
        with connection:
            self.requests.append(self.read_request(connection))
            data = self.answers.pop(0)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(data), 3):
                connection.sendall(data[start:start + 3])
                time.sleep(0.001)


def read_all(stream):
    lines = []
    while True:
        try:
            lines += stream.lines(5)
        except EOFError:
            return lines


def test_a_result_stream_is_read_line_by_line_however_its_chunks_are_cut():
    body = b'{"task_id": 1}\n\n{"task_id": 2, "x": "' + b"y" * 300 + b'"}\n{"end": true}\n'
    chunks = [body[:7], body[7:20], body[20:21], body[21:]]
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
    server = Trickled([answer])
    stream = http_to(server).stream("/api/v1/groups/1/results?stream=1", 5)
    assert read_all(stream) == body.rstrip(b"\n").split(b"\n")
    assert server.requests[0][0].startswith(b"GET /api/v1/groups/1/results?stream=1 HTTP/1.1")
    assert b"Authorization: Bearer secret" in server.requests[0][0]
    # A body without chunks, to the end of the connection (HTTP/1.0 style).
    server = Trickled([b"HTTP/1.0 200 OK\r\n\r\n" + body])
    assert read_all(http_to(server).stream("/s", 5)) == body.rstrip(b"\n").split(b"\n")


def test_a_quiet_stream_times_out_without_losing_its_place():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    http = client.Http("http://127.0.0.1:%d" % listener.getsockname()[1], None)
    opened = {}
    thread = threading.Thread(target=lambda: opened.update(stream=http.stream("/s", 5)))
    thread.start()
    connection, _ = listener.accept()
    Canned.read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"a\":")
    thread.join(5)
    stream = opened["stream"]
    started = time.monotonic()
    assert stream.lines(0.2) == []                  # half a chunk: no whole line yet
    assert 0.15 < time.monotonic() - started < 2
    connection.sendall(b" 1}\n\r\n")
    assert stream.lines(5) == [b'{"a": 1}']
    connection.close()
    with pytest.raises(EOFError):
        stream.lines(5)
    stream.close()
    listener.close()


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\n\r\n{\"error\": \"no group\"}",
     "no group"),
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", "over 65536 bytes"),
])
def test_a_stream_that_cannot_open_is_a_clear_error(answer, error):
    server = Canned([(answer,)])
    with pytest.raises(client.ClusterError, match=error):
        http_to(server).stream("/s", 5)


@pytest.mark.parametrize("body, error", [
    (b"zz\r\nabc\r\n", "bad chunk size"),
    (b"3\r\nabcXY", "not ended by CRLF"),
    (b"1" * 70000, "chunk size line over"),
])
def test_a_stream_with_broken_chunks_is_refused(body, error):
    server = Canned([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body,)])
    stream = http_to(server).stream("/s", 5)
    with pytest.raises(client.BadAnswer, match=error):
        read_all(stream)


def test_a_result_stream_over_tls_is_read_however_its_records_are_cut(tmp_path):
    """Over TLS, bytes OpenSSL has already decrypted are invisible to
    select(): a line that came with the answer's head, or in one record
    with the next, must still be read at once."""
    home = types.SimpleNamespace(home=str(tmp_path))
    tls.ensure_certificate(home)
    body = b"".join(b'{"task_id": %d}\n' % n for n in range(1, 40))
    chunks = [body[:5], body[5:400], body[400:]]
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
    server = Trickled([answer], tls.server_context(home))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    http = client.Http("https://127.0.0.1:%d" % server.port, "secret", context)
    started = time.monotonic()
    assert read_all(http.stream("/s", 5)) == body.rstrip(b"\n").split(b"\n")
    assert time.monotonic() - started < 4


class Endless:
    """A main node gone wrong: it answers the first request with `head` and
    then `piece` again and again, until the client hangs up or `most`
    bytes have gone (then it closes), and counts what it sent."""

    def __init__(self, head, piece, most=64 * 1024 * 1024):
        self.head, self.piece, self.most = head, piece, most
        self.sent = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        connection, _ = self.listener.accept()
        with connection:
            Canned.read_request(connection)
            try:
                connection.sendall(self.head)
                while self.sent < self.most:
                    connection.sendall(self.piece)
                    self.sent += len(self.piece)
            except OSError:
                pass                # the client hung up: what we want


@pytest.mark.parametrize("head, piece", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", b"x" * 65536),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"10000\r\n" + b"x" * 65536 + b"\r\n"),
    (b"HTTP/1.0 200 OK\r\n\r\n", b"x" * 65536),
])
def test_an_answer_past_the_clients_limit_is_refused_not_held(monkeypatch, head, piece):
    """However its body is framed, an answer larger than MAX_ANSWER_BYTES
    is an error naming the limit; the client stops reading it (the server
    could not send it all) instead of holding it in memory."""
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 1 << 20)
    server = Endless(head, piece)
    with pytest.raises(client.ClusterError, match="over the client's limit of 1048576 bytes"
                                                  r" \(MAX_ANSWER_BYTES\)"):
        http_to(server).request("GET", "/api/v1/results?ids=1", timeout=10)
    time.sleep(0.2)
    assert server.sent < server.most


def test_an_answer_at_the_limit_is_read_whole(monkeypatch):
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 1000)
    body = b"y" * 1000
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body,
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3e8\r\n" + body + b"\r\n0\r\n\r\n"])
    http = http_to(server)
    assert http.request("GET", "/a") == (200, body)
    assert http.request("GET", "/b") == (200, body)


def test_a_result_stream_line_past_the_limit_is_refused(monkeypatch):
    """A stream line that never ends (or ends past MAX_STREAM_LINE) is an
    error naming the limit, not a line the client keeps growing."""
    monkeypatch.setattr(client, "MAX_STREAM_LINE", 256 * 1024)
    server = Endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"1000\r\n" + b"z" * 4096 + b"\r\n")
    stream = http_to(server).stream("/api/v1/groups/1/results?stream=1", 5)
    with pytest.raises(client.BadAnswer, match=r"result stream line over the client's limit"
                                               r" of 262144 bytes \(MAX_STREAM_LINE\)"):
        read_all(stream)
    stream.close()
    time.sleep(0.2)
    assert server.sent < server.most
    # One that ends, but past the limit, in the same piece as its end.
    long_line = b'{"task_id": 1, "x": "' + b"y" * 300000 + b'"}\n'
    server = Canned([(b"HTTP/1.0 200 OK\r\n\r\n" + long_line,)])
    with pytest.raises(client.BadAnswer, match="MAX_STREAM_LINE"):
        read_all(http_to(server).stream("/s", 5))
