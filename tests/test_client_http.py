"""rc.client's own HTTP/1.1 exchange (Http.request), against a real socket
on 127.0.0.1 that answers with canned bytes: every framing rc-web or a proxy
may use, a kept-alive connection closed meanwhile, and hostile answers,
each refused with a clear ClusterError instead of a hang or a crash."""
import socket
import threading

import pytest

from rc import client


class Canned:
    """A server that reads one request at a time and answers each with the
    next of `answers` (bytes; a 1-tuple of bytes: then it closes), None
    closing the connection without an answer; it records the requests."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
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
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nshort",),
     "cut short"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
])
def test_hostile_answers_are_clear_errors(answer, message):
    server = Canned([answer, None])
    with pytest.raises(client.ClusterError, match=message):
        http_to(server).request("GET", "/x", timeout=10)


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
