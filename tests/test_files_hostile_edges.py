"""The worst form of every value from outside on rc-files' port and on the
file routes of /api/v1 (sizes, hashes, names, Range headers), and peers
that stop reading or writing in the middle of a transfer, against a running
main node. After each attack every program keeps its pid and a good
worker's tasks complete (hostile_harness.unharmed); no answer is a 500, and
the store holds nothing of the attack."""
import hashlib
import json
import os
import socket
import time

import pytest

from cluster_harness import wait_for
from hostile_harness import unharmed
from rc import db, files
from test_bad_input import registered
from test_files_hostile import ask, authenticated, closed
from test_inline_files import GOOD, with_the_good_worker

pytestmark = pytest.mark.e2e

BLOB_BYTES = 3 * 1024 * 1024 + 17     # over rc-files' and rc-web's chunks, odd on purpose


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("files-edges"),
                                        auth_timeout=2.0, files_quota_mb=16):
        cluster.admin = open(cluster.config.admin_token_path).read().strip()
        registered(cluster, "mallory").close()       # a joined device with its own secret
        cluster.blob = os.urandom(BLOB_BYTES)
        cluster.digest = hashlib.sha256(cluster.blob).hexdigest()
        status, body = request(cluster, "POST", "/api/v1/files", cluster.blob)
        assert status == 201, body
        yield cluster


def request(cluster, method, path, body=None, headers=(), read=True):
    """One HTTP/1.0 request written by hand (any header, any value, any
    length); (status, body) -- the body up to the server's close."""
    sock = socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=30)
    head = ["%s %s HTTP/1.0" % (method, path), "Authorization: Bearer " + cluster.admin]
    if body is not None and not any(h.lower().startswith("content-length:") for h in headers):
        head.append("Content-Length: %d" % len(body))
    head += list(headers)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
    if not read:
        return sock
    answer = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        answer += chunk
    sock.close()
    head, _, content = answer.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else None), content


def rows(cluster):
    return cluster.db.execute("SELECT count(*) FROM files").fetchone()[0]


RANGES = ["bytes=0-0", "bytes=-1", "bytes=-0", "bytes=0-", "bytes=5-2", "bytes=%d-" % BLOB_BYTES,
          "bytes=0-%d" % (10 ** 30), "bytes=-%d" % (10 ** 30), "bytes=1-2,3-4", "bytes=",
          "bytes=-", "items=0-1", "bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000,
          "bytes=-" + "9" * 5000, "bytes=\xb2-\xb3", "bytes=0x10-0x20", "bytes= 1-2",
          "bytes=1 -2", "bytes=+1-2", "bytes=1_0-2_0"]


def number(digits):
    """A Range position (None: left out); a long one is past every end."""
    return None if digits == "" else int(digits) if len(digits) < 100 else 10 ** 100


def test_every_range_header_gets_its_bytes_or_a_416(cluster):
    with unharmed(cluster, GOOD):
        for header in RANGES:
            status, body = request(cluster, "GET", "/api/v1/files/" + cluster.digest,
                                   headers=["Range: " + header])
            assert status in (200, 206, 416), (header[:40], status, body[:200])
            if status == 206:
                first, last = (number(text) for text in header[len("bytes="):].split("-"))
                start = max(0, BLOB_BYTES - last) if first is None else first
                assert body == cluster.blob[start:start + len(body)] and body, header[:40]
            elif status == 200:
                assert body == cluster.blob, header[:40]


# With a body of 5 bytes: those that read as 5 may store it; the rest are refused.
CONTENT_LENGTHS = ["-1", "abc", "1e3", "0x10", " 5", "5 ", "+5", "05", str(2 ** 70), "9" * 5000,
                   "5, 5", "5,5", "\xb3"]


def test_uploads_with_the_worst_headers_store_nothing_and_never_fail_the_server(cluster):
    before = rows(cluster)
    with unharmed(cluster, GOOD):
        answers = [(length[:20],) + request(cluster, "POST", "/api/v1/files", b"abcde",
                                            headers=["Content-Length: " + length])
                   for length in CONTENT_LENGTHS]
        # 5000 digits: waitress's int() passes Python's 4300-digit limit, and
        # it closes the connection with no answer (waitress's parser, not rc-web).
        assert [answer for answer in answers if not (
            answer[1] is not None and (400 <= answer[1] < 500 and answer[1] != 404
                                       or answer[1] == 201 and answer[2].startswith(b"{"))
            or answer[1] is None and answer[0] == "9" * 20)] == []
        for digest in ("A" * 64, "g" * 64, "0" * 63, "0" * 65, "", " ", "\xe9" * 64,
                       "0" * 64 + "\x00"):
            status, body = request(cluster, "POST", "/api/v1/files", b"abc",
                                   headers=["X-Content-SHA256: " + digest])
            assert status in (400, 201), (digest[:40], status, body[:200])
            if status == 201:       # upper-case hex is the same hash, and right
                assert json.loads(body)["sha256"] == hashlib.sha256(b"abc").hexdigest()
        for path in ("/api/v1/files/" + "0" * 64, "/api/v1/files/" + "G" * 64,
                     "/api/v1/files/" + "0" * 5000, "/api/v1/files/%00",
                     "/api/v1/tasks/99999999999999999999999/files",
                     "/api/v1/tasks/1/files/" + "a/" * 3000, "/api/v1/tasks/-1/files"):
            status, _ = request(cluster, "GET", path)
            assert 400 <= status < 500, (path[:60], status)
    # abcde and abc (X-Content-SHA256 in upper case, or none) are the only new rows
    assert rows(cluster) <= before + 2


def test_a_cut_upload_leaves_no_row_and_no_blob(cluster):
    before = rows(cluster)
    data = os.urandom(2 * 1024 * 1024)
    with unharmed(cluster, GOOD):
        sock = request(cluster, "POST", "/api/v1/files", data[:1024 * 1024],
                       headers=["Content-Length: %d" % len(data)], read=False)
        sock.close()          # half of it sent, then gone
    assert rows(cluster) == before
    assert not os.path.exists(files.blob_path(cluster.config, hashlib.sha256(data).hexdigest()))


def test_rc_files_fields_in_their_worst_form_are_refused_by_name(cluster):
    with unharmed(cluster, GOOD):
        sock, reader, welcome = authenticated(cluster, "mallory")
        assert welcome == {"ok": True}
        base = {"task_id": 1, "attempt": 1, "name": "out.txt", "size": 3, "sha256": "0" * 64}
        worst = [("size", 1.5), ("size", True), ("size", "3"), ("size", -1), ("size", 2 ** 63),
                 ("size", None), ("task_id", 2 ** 64), ("attempt", [1]),
                 ("sha256", "A" * 64), ("sha256", 64), ("sha256", "0" * 64 + "\n"),
                 ("name", "a" * 5000), ("name", "a\x00b"), ("name", ".rc/x"),
                 ("name", ["x"]), ("name", ""), ("name", "/etc/passwd"), ("name", "a/../../b"),
                 ("name", "a//b"), ("name", "x/" * 300 + "y" * 256)]
        for field, value in worst:
            answer = ask(sock, reader, {"put": dict(base, **{field: value})})
            assert "error" in answer and answer["error"]["code"] in (
                "bad_request", "bad_name", "stale_attempt"), (field, str(value)[:40], answer)
        for offset in (-1, 1.5, "0", None, True, 2 ** 64):
            answer = ask(sock, reader, {"get": {"sha256": cluster.digest, "offset": offset}})
            assert answer["error"]["code"] in ("bad_request", "not_yours"), (offset, answer)
        for digest in ("A" * 64, "", None, 0, ["0" * 64]):
            answer = ask(sock, reader, {"get": {"sha256": digest}})
            assert answer["error"]["code"] == "bad_request", (digest, answer)
        # A lone surrogate is not JSON: the connection is refused, and closed.
        sock.sendall(b'{"put": {"name": "\\udc80"}}\n')
        assert "error" in json.loads(reader.readline())
        assert closed(reader)


def test_peers_that_stop_reading_or_writing_mid_transfer_hold_nobody_up(cluster):
    """Downloads that are never read (more than rc-web serves at once) and
    uploads that stop half way: the good worker's tasks, other downloads,
    and the API go on."""
    with unharmed(cluster, GOOD):
        stalled = [request(cluster, "GET", "/api/v1/files/" + cluster.digest, read=False)
                   for _ in range(12)]
        halfway = [request(cluster, "POST", "/api/v1/files", b"x" * 1000,
                           headers=["Content-Length: 2000"], read=False) for _ in range(12)]
        started = time.monotonic()
        status, body = request(cluster, "GET", "/api/v1/files/" + cluster.digest)
        assert status == 200 and body == cluster.blob
        status, _ = request(cluster, "GET", "/api/v1/health")
        assert status in (200, 503) and time.monotonic() - started < 10
        for sock in stalled + halfway:
            sock.close()
    partial = os.path.join(files.root(cluster.config), files.PARTIAL_DIR)
    wait_for(lambda: not os.path.isdir(partial) or os.listdir(partial) == [], 10,
             "no partial file left of the cut uploads")


def test_a_device_that_stops_reading_its_downloads_holds_up_only_those(cluster, tmp_path):
    """mallory (a joined device) starts downloads of a task's 3 MiB input
    over rc-files and never reads them: each holds its own connection until
    rc-files' data timeout, and a download on another connection, the good
    worker's tasks and the programs go on."""
    local = tmp_path / "input.bin"
    local.write_bytes(cluster.blob)
    online_meanwhile = registered(cluster, "mallory")    # its running task is not taken back
    task_id = int(cluster.rc("submit", "shell", "true", "--input", str(local),
                             "--require", "device_id=mallory").stdout)
    with db.write(cluster.db):       # as if assigned to mallory: its input is its to read
        cluster.db.execute("UPDATE tasks SET state = 'running', device_id = 'mallory',"
                           " attempt = 1 WHERE task_id = ?", (task_id,))
    with unharmed(cluster, GOOD):
        stalled = []
        for _ in range(4):
            sock, reader, welcome = authenticated(cluster, "mallory")
            assert welcome == {"ok": True}
            sock.sendall(json.dumps({"get": {"sha256": cluster.digest}}).encode() + b"\n")
            assert json.loads(reader.readline())["length"] == BLOB_BYTES
            stalled.append(sock)             # and never read again
        started = time.monotonic()
        sock, reader, _ = authenticated(cluster, "mallory")
        sock.sendall(json.dumps({"get": {"sha256": cluster.digest}}).encode() + b"\n")
        assert json.loads(reader.readline())["length"] == BLOB_BYTES
        assert reader.read(BLOB_BYTES) == cluster.blob and time.monotonic() - started < 10
        sock.close()
        for sock in stalled:
            sock.close()
    cluster.rc("cancel", str(task_id))
    online_meanwhile.close()
