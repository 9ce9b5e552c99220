"""Uploads in flight count against the file store's quota (session 43's
attack): rc-web's HTTP server holds an upload's body whole (past 512 KiB in
a temporary file) before rc-web reads it, and the quota was checked only
then, per upload, against what was stored. Six parallel 60 MiB uploads to a
64 MiB store had rc-web hold 375 MiB on disk before all six got 413; the
ceiling was web_connection_limit x the quota. Now each upload's length is
reserved on its headers, beside what is stored and the others in flight,
and one that does not fit is refused at once (real main node, 127.0.0.1)."""
import collections
import hashlib
import os
import select
import signal
import socket
import stat
import threading
import time

import pytest

from cluster_harness import Cluster, wait_for
from rc import client, files

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
QUOTA_MB = 8
SIZE = 3 * MIB          # six of them: 18 MiB against an 8 MiB store
UPLOADS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("hostile-s43b"), files_quota_mb=QUOTA_MB)
    cluster.start()
    try:
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster
    finally:
        cluster.stop()


def held_on_disk(pid):
    """The bytes rc-web holds in files for uploads: the HTTP server's
    temporary files (unlinked as they are made) and the store's partial files."""
    sizes = {}
    directory = "/proc/%d/fd" % pid
    for fd in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, fd))
            info = os.stat(os.path.join(directory, fd))
        except OSError:
            continue        # closed meanwhile
        if stat.S_ISREG(info.st_mode) and ("/files/partial/" in target
                                           or target.endswith(" (deleted)")):
            sizes[info.st_dev, info.st_ino] = info.st_size     # a file open twice once
    return sum(sizes.values())


def start_upload(cluster, size):
    """An upload's headers, asking for 100 Continue as curl does for a large
    file; the socket and the first answer's status line."""
    sock = socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=30)
    sock.sendall(b"POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer %s\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                 % (cluster.admin_token.encode(), size))
    return sock, read_head(sock)


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def read_answer(sock, head=None, rest=b""):
    """(status code, body) of the next answer on the socket (of which
    `head` and `rest` were read already)."""
    if head is None:
        head, rest = read_head(sock)
    length = int([line.split(":", 1)[1] for line in head.split("\r\n")
                  if line.lower().startswith("content-length:")][0])
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return int(head.split()[1]), rest.decode("utf-8", "replace")


def upload(cluster, data):
    sock, (head, rest) = start_upload(cluster, len(data))
    try:
        if not head.startswith("HTTP/1.1 100"):
            return read_answer(sock, head, rest)
        sock.sendall(data)
        return read_answer(sock)
    finally:
        sock.close()


def test_uploads_in_flight_together_never_hold_more_than_the_quota(cluster):
    pid = cluster.program_pid("rc-web")
    quota = QUOTA_MB * MIB
    bodies = [os.urandom(SIZE) for _ in range(UPLOADS)]
    started = [start_upload(cluster, SIZE) for _ in bodies]
    accepted = [i for i, (_, (head, _)) in enumerate(started) if head.startswith("HTTP/1.1 100")]
    refused = [i for i in range(UPLOADS) if i not in accepted]
    most = [0]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            most[0] = max(most[0], held_on_disk(pid))
            time.sleep(0.01)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for i in accepted:
            started[i][0].sendall(bodies[i][:-1])
        # Every accepted body but its last byte is with rc-web.
        wait_for(lambda: held_on_disk(pid) >= len(accepted) * (SIZE - 1), 30,
                 "rc-web to take the bodies")
        for i in accepted:
            started[i][0].sendall(bodies[i][-1:])
        answers = {i: read_answer(started[i][0]) for i in accepted}
        # Each one that fits beside the others in flight went on; the rest
        # were told at once, before a byte of their body was sent.
        refusals = [read_answer(started[i][0], *started[i][1]) for i in refused]
    finally:
        sampling.set()
        sampler.join()
        for sock, _ in started:
            sock.close()
    assert most[0] <= quota + files.CHUNK_BYTES, most[0]
    assert len(accepted) == quota // SIZE, [h for _, (h, _) in started]
    for status, body in refusals:
        assert status == 413, body
        assert "quota of %d" % quota in body and "files_quota_mb=%d" % QUOTA_MB in body, body
        assert "the store holds 0 bytes and %d more are on their way in" \
            % (len(accepted) * SIZE) in body, body
    for i in accepted:
        assert answers[i][0] == 201, answers[i]
        assert hashlib.sha256(bodies[i]).hexdigest() in answers[i][1]
        assert files.exists(cluster.db, hashlib.sha256(bodies[i]).hexdigest())


def test_an_upload_cut_or_refused_leaves_nothing_reserved(cluster):
    """A reservation goes however its upload ends: stored (above), refused,
    cut mid-body, or refused on its hash. Once the stored files expire, an
    upload of the whole quota fits."""
    # The blobs stored above expire (rc-reaper's sweep, past files_retention_days).
    files.sweep(cluster.db, cluster.config,
                time.time() + (cluster.config.files_retention_days + 1) * files.DAY)
    assert files.used_bytes(cluster.db) == 0
    sock, (head, _) = start_upload(cluster, SIZE)
    assert head.startswith("HTTP/1.1 100"), head
    sock.sendall(os.urandom(SIZE // 2))
    pid = cluster.program_pid("rc-web")
    wait_for(lambda: held_on_disk(pid) >= SIZE // 2, 30, "rc-web to take half the body")
    sock.close()
    sock, (head, _) = start_upload(cluster, SIZE)
    assert head.startswith("HTTP/1.1 100"), head
    sock.close()            # its headers alone
    data = os.urandom(SIZE)
    status, body = upload_with_hash(cluster, data, "0" * 64)
    assert status == 400 and "expected" in body, body
    wait_for(lambda: held_on_disk(pid) == 0, 30, "rc-web to let go of the cut uploads")
    status, body = upload(cluster, os.urandom(1024) * (QUOTA_MB * 1024))
    assert status == 201, body


def upload_with_hash(cluster, data, sha256):
    with socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n"
                     b"X-Content-SHA256: %s\r\n\r\n%s"
                     % (cluster.admin_token.encode(), len(data), sha256.encode(), data))
        return read_answer(sock)


def test_a_refusal_on_the_headers_closes_before_the_body(cluster):
    """Without 100 Continue a client sends its body right behind the
    headers; a refused one is answered and closed, never read into a file."""
    with socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
                     % (cluster.admin_token.encode(), QUOTA_MB * MIB + 1))
        status, body = read_answer(sock)
        assert status == 413 and "files_quota_mb" in body, body
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable and sock.recv(1) == b""


def test_the_client_is_told_the_refusal_not_a_cut_connection(cluster, tmp_path):
    """rc.client's put of a file that does not fit beside an upload in
    flight: rc-web refuses it on its headers and closes; a client sending
    the body meanwhile met a reset connection ("no answer", tried again).
    It asks for 100 Continue and hears the 413 before sending."""
    files.sweep(cluster.db, cluster.config,
                time.time() + (cluster.config.files_retention_days + 1) * files.DAY)
    sock, (head, _) = start_upload(cluster, MIB)     # holds 1 of the 8 MiB
    assert head.startswith("HTTP/1.1 100"), head
    try:
        path = tmp_path / "big.bin"
        path.write_bytes(os.urandom(QUOTA_MB * MIB))
        url = "http://127.0.0.1:%d" % cluster.config.web_port
        with client.Cluster(url, cluster.admin_token) as connection:
            with pytest.raises(client.ClusterError) as refused:
                connection.put(str(path))
            assert refused.value.status == 413, refused.value
            assert "more are on their way in" in str(refused.value), refused.value
            small = connection.put(b"fits" * 1024)      # below the 100 Continue size
            assert small["size"] == 4096
    finally:
        sock.close()


def test_a_restarted_rc_web_begins_with_nothing_reserved(cluster):
    """rc-web killed with an upload in flight: its reservation, a partial
    file no longer locked, goes as rc-web starts again (before, at the next
    upkeep's sweep, a minute on); then the whole quota is free again."""
    files.sweep(cluster.db, cluster.config,
                time.time() + (cluster.config.files_retention_days + 1) * files.DAY)
    sock, (head, _) = start_upload(cluster, 6 * MIB)
    assert head.startswith("HTTP/1.1 100"), head
    sock.sendall(os.urandom(MIB))
    pid = cluster.program_pid("rc-web")
    wait_for(lambda: held_on_disk(pid) >= MIB, 30, "rc-web to take a MiB of the body")
    partial = files.partial_dir(cluster.config)
    assert [name for name in os.listdir(partial) if name.startswith(files.RESERVED_PREFIX)]
    os.kill(pid, signal.SIGKILL)
    sock.close()
    wait_for(lambda: cluster.program_pid("rc-web") not in (0, pid), 30, "rc-web restarted")
    wait_for(lambda: not os.listdir(partial), 30, "the killed upload's reservation to go")

    def whole_quota_stored():
        try:
            status, body = upload(cluster, os.urandom(1024) * (QUOTA_MB * 1024))
        except OSError:
            return False        # not listening yet
        assert status == 201, body
        return True
    wait_for(whole_quota_stored, 30, "the whole quota stored")


def test_reservations_count_each_other_and_a_full_disk(cluster, monkeypatch):
    """files.Reservations alone (rc-web's threads share one): each counts
    the others until released; a disk that would keep less than its reserve
    refuses with disk_full (507), naming the free and promised bytes."""
    files.sweep(cluster.db, cluster.config,
                time.time() + (cluster.config.files_retention_days + 1) * files.DAY)
    uploads = files.Reservations()
    first = uploads.reserve(cluster.db, cluster.config, 5 * MIB)
    with pytest.raises(files.FileStoreError) as refused:
        uploads.reserve(cluster.db, cluster.config, 4 * MIB)
    assert refused.value.code == "quota"
    assert "%d more are on their way in" % (5 * MIB) in str(refused.value)
    first.release()
    assert uploads.in_flight() == 0
    second = uploads.reserve(cluster.db, cluster.config, 4 * MIB)
    # A disk with 69.5 MiB free: 64 kept in reserve, 4 promised, 1.5 left.
    free = files.DISK_RESERVE_BYTES + 5 * MIB + MIB // 2
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda path: collections.namedtuple("Usage", "free")(free))
    uploads.reserve(cluster.db, cluster.config, MIB).release()
    with pytest.raises(files.FileStoreError) as full:
        uploads.reserve(cluster.db, cluster.config, 2 * MIB)
    assert full.value.code == "disk_full" and "promised to uploads under way" \
        in str(full.value), full.value
    second.release()
    uploads.reserve(cluster.db, cluster.config, 2 * MIB).release()
