"""attack37: what session 36 changed, attacked on a real cluster: an
upload sent chunked to rc-web; a worker's partial fetches holding what a
fetch does not expect, or shared with another worker of its state
directory; rc.client and rc submit given a FIFO or a terabyte for an
input. Each test failed before the fix its docstring names."""
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import threading

import pytest

from cluster_harness import RC, rc_files_records, wait_for
from hostile_harness import assert_completes, unharmed
from rc import state_dir
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

GOOD = "good37"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster with one good worker of two slots (root: its tasks
    run as 61810-61813, uids no other test's worker uses)."""
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("s37"), GOOD,
                                        ("--task-user", "61810:4")):
        cluster.admin = state_dir.read_secret(cluster.config.admin_token_path)
        yield cluster


def sha(data):
    return hashlib.sha256(data).hexdigest()


def web_exchange(cluster, head, body=b""):
    """Send a request by hand to rc-web; the answer's bytes, up to its end."""
    with socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=20) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return answer
            if not chunk:
                return answer
            answer += chunk


def chunked_upload_head(cluster, extra=""):
    return ("POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n%s\r\n"
            % (cluster.admin, extra))


def test_an_upload_sent_chunked_is_refused_on_its_headers(cluster):
    """docs/http.md says 411 without a length; waitress takes a chunked
    body whole (up to files_quota_mb, into a temporary file) and hands it
    on with a length of its own, so the app never saw it chunked: it was
    stored (201), and an admin's chunked upload of the whole quota was
    buffered before the app could refuse it. Now 411 on the headers, no
    '100 Continue' asking for the body, nothing stored. Fails before: 201."""
    data = b"chunked upload of attack37\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    with unharmed(cluster, GOOD):
        answer = web_exchange(cluster, chunked_upload_head(cluster), body)
        assert answer.startswith(b"HTTP/1.1 411 "), answer[:300]
        assert cluster.db.execute("SELECT count(*) FROM files WHERE sha256 = ?",
                                  (sha(data),)).fetchone()[0] == 0
        # A client that waits to be asked for the body is refused at once.
        answer = web_exchange(cluster, chunked_upload_head(cluster, "Expect: 100-continue\r\n"))
        assert answer.startswith(b"HTTP/1.1 411 "), answer[:300]
        # Held: one with a Content-Length is stored as ever.
        answer = web_exchange(cluster, chunked_upload_head(cluster).replace(
            "Transfer-Encoding: chunked", "Content-Length: %d" % len(data)), data)
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


def partial_path(cluster, digest):
    """The worker's cache/partial/DIGEST, its directories made as the worker makes them."""
    path = os.path.join(cluster.home, "worker-state", "cache", "partial", digest)
    for directory in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
    return path


@pytest.mark.parametrize("kind", ["fifo", "link", "directory"])
def test_a_partial_fetch_that_is_not_a_file_is_fetched_again(cluster, tmp_path, kind):
    """The worker resumes a fetch from cache/partial/SHA. Something else of
    that name (a FIFO, a link, a directory: left by hand, or by another
    program of the device's user) is removed and the blob fetched whole;
    the link's target is not written. Before (worker.open_partial): each
    failed every task reading the blob on that device ("not seekable", the
    link's ELOOP, "is a directory")."""
    data = os.urandom(1048576 + 7)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    partial = partial_path(cluster, sha(data))
    outside = tmp_path / "outside"
    outside.write_bytes(b"not yours")
    if kind == "fifo":
        os.mkfifo(partial, 0o600)
    elif kind == "link":
        os.symlink(str(outside), partial)
    else:
        os.mkdir(partial, 0o700)
        os.mkdir(os.path.join(partial, "inside"), 0o700)
    done = cluster.rc("submit", "shell", "sha256sum in.bin", "--input", str(source),
                      "--require", "device_id=%s" % GOOD, "--wait", "--wait-timeout", "30",
                      check=False)
    assert done.returncode == 0 and done.stdout.split()[:1] == [sha(data)], done
    assert outside.read_bytes() == b"not yours"
    assert not os.path.lexists(partial)


def test_a_blob_another_worker_of_the_state_directory_fetches_is_waited_for(cluster, tmp_path):
    """Workers may share a state directory (the harness's all do; one
    user's two workers on ~/.rc-worker). Two fetching one blob at once
    wrote one partial file: the second's task failed ("No such file" as
    the first moved it into the cache, or "changed under us"; 1 round in 3
    of /tmp/attack37/shared_state.py, 48 MiB each). Now a fetch holds its
    partial file (flock) and one that finds it held waits, then takes the
    blob from the cache. Here the test is the other worker: it holds the
    partial file, the worker waits, and takes the blob it leaves in the
    cache without fetching it. Fails before: no wait, rc-files sent it."""
    data = os.urandom(1048576 + 11)
    source = tmp_path / "shared.bin"
    source.write_bytes(data)
    partial = partial_path(cluster, sha(data))
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data[:300000])
        done = cluster.rc("submit", "shell", "sha256sum shared.bin", "--input", str(source),
                          "--require", "device_id=%s" % GOOD)
        task_id = int(done.stdout.strip())
        wait_for(lambda: sha(data) in worker_events(cluster, GOOD, "fetch_waits"), 20,
                 "the worker to wait for the other's fetch")
        os.write(fd, data[300000:])
        os.chmod(partial, 0o400)
        os.rename(partial, os.path.join(os.path.dirname(os.path.dirname(partial)), sha(data)))
    finally:
        os.close(fd)
    assert_completes(cluster, task_id, sha(data))
    assert rc_files_records(cluster, "file_sent", sha(data)) == []


def worker_events(cluster, device_id, event):
    """The sha256 of each `event` line in the worker's log."""
    found = []
    with open(cluster.worker_log(device_id), encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"event":"%s"' % event in line:
                found.append(json.loads(line).get("sha256"))
    return found


def test_the_client_refuses_an_input_path_that_is_not_a_regular_file(cluster, tmp_path):
    """rc.client inputs=/stdin= as paths (session 36) put whatever the path
    opened: a FIFO's bytes were taken as the file, and /dev/zero (a link
    to it, a typo) was read into memory for ever; rc submit --input
    refuses both. Now a TypeError names the path before anything is read
    or sent. Fails before: the FIFO's bytes were submitted."""
    from rc.client import Cluster as Client
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as f:
            f.write(b"from a fifo\n")
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    client = Client("http://127.0.0.1:%d" % cluster.config.web_port, cluster.admin)
    try:
        for given in ({"inputs": [fifo]}, {"stdin": fifo}):
            with pytest.raises(TypeError, match="not a regular file"):
                client.submit("shell", "cat fifo", **given)
    finally:
        if thread.is_alive():
            with open(fifo, "rb") as f:      # the writer waits for a reader
                f.read()
        client.close()


def test_an_input_over_the_quota_is_refused_before_it_is_read(cluster, tmp_path):
    """rc submit --input (on the main node) hashed a file whole before the
    store's quota refused it: --input DIR now follows links to directories,
    and a sparse disk image of a terabyte in one took hours of zeros to be
    refused. Now its size is looked at first. Fails before: still hashing
    after 30 s."""
    image = tmp_path / "disk.img"
    with open(str(image), "wb") as f:
        f.truncate(1 << 40)
    done = subprocess.run([RC, "submit", "shell", "ls", "--input", str(tmp_path)],
                          env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert done.returncode != 0 and "over the store's quota" in done.stderr, done
