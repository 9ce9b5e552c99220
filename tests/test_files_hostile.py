"""Issue 18's bad input against a running main node: what a LAN stranger, a
device holding its own secret, and an HTTP client without the admin token
can throw at rc-files and POST /api/v1/files. After each attack every
program (rc-files too) keeps its pid and a good worker's tasks complete
(hostile_harness.unharmed), and the store holds nothing of the attack."""
import hashlib
import http.client as http_client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import readable_by_others, unharmed
from rc import files, tasks, tls, transfer
from test_bad_input import registered

pytestmark = pytest.mark.e2e

QUOTA_MB = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("files-hostile"), auth_timeout=2.0,
                      files_quota_mb=QUOTA_MB)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("good", "--slots", "2")
    wait_for(lambda: "good" in online(cluster), 30, "the good worker")
    cluster.token = open(cluster.config.token_path).read().strip()
    cluster.secrets = {}
    registered(cluster, "mallory").close()       # a joined device with its own secret
    registered(cluster, "victim").close()        # one whose secret a stranger guesses
    yield cluster
    cluster.stop()


def raw(cluster, tls_on=True):
    sock = socket.create_connection(("127.0.0.1", cluster.config.files_port), timeout=5)
    if not tls_on:
        return sock
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    sock = context.wrap_socket(sock)
    assert hashlib.sha256(sock.getpeercert(True)).hexdigest() == tls.fingerprint(cluster.config)
    return sock


def lines(sock):
    return sock.makefile("rb")


def authenticated(cluster, device_id="mallory", secret=None):
    sock = raw(cluster)
    reader = lines(sock)
    hello = json.loads(reader.readline())["hello"]
    mine = os.urandom(16).hex()
    secret = secret or cluster.secrets[device_id]
    sock.sendall(json.dumps({"auth": {"device_id": device_id, "nonce": mine, "proof":
                            transfer.proof(secret, hello["nonce"], mine, device_id)}})
                 .encode() + b"\n")
    return sock, reader, json.loads(reader.readline())


def ask(sock, reader, message):
    sock.sendall(json.dumps(message).encode() + b"\n")
    return json.loads(reader.readline())


def closed(reader):
    try:
        return reader.readline() == b""
    except (ConnectionResetError, ssl.SSLError, socket.timeout):
        return True


def test_a_lan_stranger_gets_nothing_and_breaks_nothing(cluster):
    with unharmed(cluster, "good"):
        plain = raw(cluster, tls_on=False)          # no TLS at all: the handshake fails
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
        assert closed(lines(plain))
        sock = raw(cluster)                          # TLS, then a line without an end
        reader = lines(sock)
        reader.readline()
        sock.sendall(b"x" * (transfer.MAX_LINE_BYTES + 1))
        assert "over" in json.loads(reader.readline())["error"]["message"]
        silent = raw(cluster)                        # says nothing: cut at auth_timeout
        silent_reader = lines(silent)
        silent_reader.readline()
        started = time.monotonic()
        assert closed(silent_reader) and time.monotonic() - started < 10
        for n in range(12):                           # guessing a device's secret
            _, reader, answer = authenticated(cluster, "victim", secret="%064x" % n)
            assert answer["error"]["code"] in ("auth_failed", "shut_out")
        assert answer["error"]["code"] == "shut_out"
        _, _, answer = authenticated(cluster, "good-but-unknown", secret="00" * 32)
        assert answer["error"]["code"] == "unknown_device"
        flood = [socket.create_connection(("127.0.0.1", cluster.config.files_port))
                 for _ in range(transfer.MAX_CONNECTIONS + 20)]
        for sock in flood:
            sock.close()


def test_a_joined_device_reads_and_writes_only_its_own(cluster, tmp_path):
    secret_input = tmp_path / "others.txt"
    secret_input.write_bytes(b"the good device's input")
    digest = hashlib.sha256(secret_input.read_bytes()).hexdigest()
    theirs = int(cluster.rc("submit", "shell", "sleep 30", "--input", str(secret_input),
                            "--require", "device_id=good").stdout)
    wait_for(lambda: tasks.get(cluster.db, theirs)["state"] in ("assigned", "running"), 20,
             "the good device's task to start")
    with unharmed(cluster, "good"):
        sock, reader, welcome = authenticated(cluster)
        assert welcome == {"ok": True}
        assert ask(sock, reader, {"get": {"sha256": digest, "offset": 0}})["error"]["code"] \
            == "not_yours"
        for put, code in (
                ({"task_id": theirs, "attempt": 1, "name": "x", "size": 3,
                  "sha256": "0" * 64}, "stale_attempt"),
                ({"task_id": theirs, "attempt": 1, "name": "../../etc/passwd", "size": 3,
                  "sha256": "0" * 64}, "bad_name"),
                ({"task_id": -1, "attempt": 1, "name": "x", "size": 3,
                  "sha256": "0" * 64}, "bad_request"),
                ({"task_id": theirs, "attempt": 1, "name": "x", "size": 2 ** 70,
                  "sha256": "0" * 64}, "bad_request"),
                ({"task_id": theirs, "attempt": 1, "name": "x", "size": 3,
                  "sha256": "../" * 30}, "bad_request")):
            assert ask(sock, reader, {"put": put})["error"]["code"] == code, put
        assert ask(sock, reader, {"get": {"sha256": digest, "offset": 2 ** 80}})["error"][
            "code"] == "bad_request"
        assert ask(sock, reader, {"delete": {}})["error"]["code"] == "bad_request"
        assert closed(reader)
    cluster.rc("cancel", str(theirs))
    partial = os.path.join(files.root(cluster.config), files.PARTIAL_DIR)
    assert not os.path.isdir(partial) or os.listdir(partial) == []


def http(cluster, path, data=None, headers=None):
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (cluster.config.web_port, path),
                                     data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_uploads_without_the_token_or_past_the_quota_store_nothing(cluster):
    admin = {"Authorization": "Bearer " + open(cluster.config.admin_token_path).read().strip()}
    rows_before = cluster.db.execute("SELECT count(*) FROM files").fetchone()[0]
    with unharmed(cluster, "good"):
        assert http(cluster, "/api/v1/files", b"x" * 1000)[0] == 401
        # Past the quota: refused on the headers, before the body is sent.
        connection = http_client.HTTPConnection("127.0.0.1", cluster.config.web_port, timeout=10)
        connection.putrequest("POST", "/api/v1/files")
        for name, value in dict(admin, **{"Content-Length": str(QUOTA_MB * files.MIB + 1)}
                                ).items():
            connection.putheader(name, value)
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        status, body = http(cluster, "/api/v1/files", b"abc",
                            dict(admin, **{"X-Content-SHA256": "1" * 64}))
        assert status == 400 and b"expected" in body
        assert http(cluster, "/api/v1/files/" + "../" * 10)[0] in (400, 404)
        assert http(cluster, "/api/v1/tasks/1/files/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert cluster.db.execute("SELECT count(*) FROM files").fetchone()[0] == rows_before
    assert readable_by_others(cluster.home) == []
