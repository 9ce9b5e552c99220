"""A worker's big fetches past the page cache (O_DIRECT, bin/worker.py's
FetchSink): on a real cluster (TLS on), a fetch arrives whole, with its
hash checked, and leaves the cached blob out of the page cache; a fetch
resumed from an unaligned length (what a Wi-Fi cut leaves) ends whole;
through the fake rc-files of test_worker_files, a cut at an unaligned byte
resumes there, on 3.6 too; and where the file system refuses O_DIRECT
(ramfs), the file comes through the cache all the same.

The worker sends only files that the page cache would not keep (over half
the memory available) past it, too big for a test: RC_TEST_DIRECT_IO=1, a
knob for tests only, sends every file of FILES_DIRECT_MIN bytes or more.
The files here are just over it."""
import ctypes
import hashlib
import mmap
import os
import subprocess
import sys

import pytest

from cluster_harness import Cluster, online, rc_files_records, wait_for
from test_worker_files import PYTHON36, run, sha, short_name, state_dir
from test_worker_files import files, start  # noqa: F401 -- fixtures
from test_worker import main  # noqa: F401 -- a fixture
from test_worker_identity import load_worker_module

pytestmark = pytest.mark.e2e

WORKER = load_worker_module()
BIG = WORKER.FILES_DIRECT_MIN + 3 * 4096 + 5     # just over: whole blocks and a partial one
DEVICE = "direct-files"


def cached_pages(path):
    """How many of a file's pages are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    vector = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in vector.raw)


def direct_io_works(directory):
    """Whether the file system of `directory` takes an O_DIRECT write."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "direct-probe")
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            os.write(fd, buffer)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        buffer.close()
        if os.path.exists(path):
            os.unlink(path)


# -- on a real cluster -----------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("files-direct"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        os.environ["RC_TEST_DIRECT_IO"] = "1"
        try:
            cluster.start_worker(DEVICE, "--slots", "2")
        finally:
            del os.environ["RC_TEST_DIRECT_IO"]
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker online")
        yield cluster
    finally:
        cluster.stop()


def cache_dir(cluster):
    return os.path.join(cluster.home, "worker-state", "cache")


def fetched(cluster, data, path):
    """Submit a task that counts `data`'s bytes without reading them (wc -c
    of a file stats it): the cached blob's pages are the fetch's alone."""
    with open(path, "wb") as f:
        f.write(data)
    done = cluster.rc("submit", "shell", "wc -c < big.bin", "--input", path, "--require",
                      "device_id=%s" % DEVICE, "--wait", "--wait-timeout", "60", check=False)
    assert done.returncode == 0 and done.stdout.strip() == str(len(data)), done
    blob = os.path.join(cache_dir(cluster), sha(data))
    assert os.path.exists(blob)
    return blob


def test_a_big_fetch_arrives_whole_past_the_page_cache(cluster, tmp_path):
    data = os.urandom(BIG)
    blob = fetched(cluster, data, str(tmp_path / "big.bin"))
    if direct_io_works(os.path.join(cache_dir(cluster), "tmp")):
        # The first and last blocks go through the cache (a partial one), the
        # rest past it. Read before the bytes are compared, which caches them.
        assert cached_pages(blob) <= 4, "the fetch went through the page cache"
    with open(blob, "rb") as f:
        assert f.read() == data


def test_a_fetch_resumed_from_an_unaligned_length_ends_whole(cluster, tmp_path):
    data = os.urandom(BIG + 1000)
    have = 3 * 1048576 + 4321          # what a cut left in partial/
    partial = os.path.join(cache_dir(cluster), "partial")
    os.makedirs(partial, mode=0o700, exist_ok=True)
    with open(os.path.join(partial, sha(data)), "wb") as f:
        f.write(data[:have])
    blob = fetched(cluster, data, str(tmp_path / "big.bin"))
    assert [r.get("offset") for r in rc_files_records(cluster, "file_sent", sha(data))] == [have]
    with open(blob, "rb") as f:
        assert f.read() == data
    assert not os.path.exists(os.path.join(partial, sha(data)))


# -- through the fake rc-files ---------------------------------------------------------

@pytest.mark.parametrize("python", [sys.executable] + PYTHON36, ids=short_name)
def test_a_cut_at_an_unaligned_byte_resumes_there_past_the_cache(start, files, monkeypatch,
                                                                  python):
    monkeypatch.setenv("RC_TEST_DIRECT_IO", "1")
    worker, link = start(python=python)
    data = os.urandom(BIG)
    files.cut_after = 5 * 1048576 + 5
    result = run(link, 1, "shell", {"command": "sha256sum big.bin",
                                    "inputs": [dict(files.add(data), path="big.bin")]})
    assert result["status"] == "completed", result
    assert result["result"]["output"].split()[0] == sha(data)
    assert [offset for _, offset in files.gets] == [0, 5 * 1048576 + 5]
    assert worker.events("transfer_cut")
    refused = worker.events("direct_write_refused")
    assert not refused or not direct_io_works(os.path.join(state_dir(worker), "cache", "tmp"))


# -- where O_DIRECT is refused: the rest of the file through the cache ---------------

@pytest.fixture
def refusals(monkeypatch):
    """The worker module's FetchSink sending files past the cache, and the
    direct_write_refused events it logs."""
    monkeypatch.setenv("RC_TEST_DIRECT_IO", "1")
    events = []
    monkeypatch.setattr(WORKER, "log", lambda level, event, **fields: events.append(event))
    yield events


def fetch_into(path, data):
    """`data` written to a new file at `path` as a fetch writes it: a
    FetchSink fed by a BlobWriter; (the sink, the sha256 hashed)."""
    digest = hashlib.sha256()
    with open(path, "w+b") as f:
        sink = WORKER.FetchSink(f.fileno(), len(data))
        writer = WORKER.BlobWriter(sink, digest)
        try:
            for start in range(0, len(data), WORKER.FILES_BUFFER):
                buffer = writer.free_buffer()
                chunk = data[start:start + WORKER.FILES_BUFFER]
                buffer[:len(chunk)] = chunk
                writer.write(buffer, len(chunk))
        finally:
            writer.close()
    return sink, digest.hexdigest()


def test_a_write_o_direct_refuses_goes_through_the_cache(refusals, tmp_path):
    """The kernel refuses (EINVAL) an O_DIRECT write from memory that is not
    aligned: the bytes are written all the same, and so is the rest."""
    if not direct_io_works(str(tmp_path)):
        pytest.skip("no O_DIRECT on this file system")
    data = os.urandom(BIG)
    with open(str(tmp_path / "partial"), "w+b") as f:
        sink = WORKER.FetchSink(f.fileno(), len(data))
        unaligned = memoryview(bytearray(b"x" + data[:65536]))[1:]
        sink.write(unaligned, True)         # claimed aligned: refused, then written
        sink.write(memoryview(data[65536:]), True)
        assert not sink.direct and sink.written == len(data)
    assert refusals == ["direct_write_refused"]
    assert (tmp_path / "partial").read_bytes() == data


@pytest.fixture
def ramfs(tmp_path):
    """A directory on a ramfs, which refuses O_DIRECT (mounting one takes root)."""
    path = str(tmp_path / "ramfs")
    os.mkdir(path)
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", path],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("cannot mount a ramfs here (not root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", path])


def test_a_file_system_that_refuses_o_direct_has_fetches_and_copies_through_the_cache(
        refusals, ramfs, tmp_path):
    assert not direct_io_works(ramfs)
    data = os.urandom(BIG)
    blob = os.path.join(ramfs, "blob")
    sink, digest = fetch_into(blob, data)
    assert digest == sha(data) and sink.written == len(data) and not sink.direct
    assert refusals == ["direct_write_refused"]         # once for the file
    with open(blob, "rb") as f:
        assert f.read() == data
    reader = os.open(blob, os.O_RDONLY)         # a copy into a task's directory
    writer = os.open(str(tmp_path / "copy"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        WORKER.copy_file(reader, writer, len(data))
    finally:
        os.close(reader)
        os.close(writer)
    assert (tmp_path / "copy").read_bytes() == data


def test_where_o_direct_works_a_fetch_and_a_copy_go_past_the_cache(refusals, tmp_path):
    if not direct_io_works(str(tmp_path)):
        pytest.skip("no O_DIRECT on this file system")
    data = os.urandom(BIG)
    sink, digest = fetch_into(str(tmp_path / "blob"), data)
    assert digest == sha(data) and sink.direct and not refusals
    assert cached_pages(str(tmp_path / "blob")) <= 4
    reader = os.open(str(tmp_path / "blob"), os.O_RDONLY)
    writer = os.open(str(tmp_path / "copy"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        WORKER.copy_file(reader, writer, len(data))
    finally:
        os.close(reader)
        os.close(writer)
    assert cached_pages(str(tmp_path / "blob")) <= 4, "the copy read the blob through the cache"
    assert (tmp_path / "copy").read_bytes() == data
