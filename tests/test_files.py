"""The file store (lib/rc/files.py): blobs committed atomically by their
SHA-256, cut uploads and full quotas leave nothing behind, references from
tasks keep blobs, retention deletes them after the last task ended."""
import hashlib
import io
import os
import shutil
import time

import pytest

from rc import db, devices, files, housekeeping, tasks
from rc.log import Logger


def sha(data):
    return hashlib.sha256(data).hexdigest()


def blobs(config):
    """Every file under var/files except partial/ (the committed blobs)."""
    found = []
    for directory, _, names in os.walk(files.root(config)):
        if os.path.basename(directory) != files.PARTIAL_DIR:
            found.extend(os.path.join(directory, name) for name in names)
    return found


def partials(config):
    path = os.path.join(files.root(config), files.PARTIAL_DIR)
    return os.listdir(path) if os.path.isdir(path) else []


class CutStream:
    """A stream that ends (like a dropped connection) after `cut` bytes."""

    def __init__(self, data, cut):
        self.data = io.BytesIO(data[:cut])

    def read(self, n):
        return self.data.read(n)


def test_a_stored_blob_is_in_place_with_its_row(cluster_home):
    config, connection = cluster_home
    data = os.urandom(3 * files.CHUNK_BYTES + 17)
    digest, size = files.store_stream(connection, config, io.BytesIO(data), len(data), sha(data))
    assert (digest, size) == (sha(data), len(data))
    path = files.blob_path(config, digest)
    assert path.endswith(os.path.join(digest[:2], digest))
    with open(path, "rb") as f:
        assert f.read() == data
    assert files.stored_size(connection, digest) == len(data)
    assert partials(config) == []


def test_the_same_bytes_are_stored_once(cluster_home, tmp_path):
    config, connection = cluster_home
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights" * 1000)
    first = files.store_path(connection, config, str(path))
    second = files.store_path(connection, config, str(path))
    assert first == second
    assert len(blobs(config)) == 1
    assert connection.execute("SELECT count(*) FROM files").fetchone()[0] == 1


def test_a_cut_upload_leaves_no_blob_no_row_no_partial(cluster_home):
    config, connection = cluster_home
    data = os.urandom(2 * files.CHUNK_BYTES)
    with pytest.raises(files.FileStoreError) as error:
        files.store_stream(connection, config, CutStream(data, files.CHUNK_BYTES + 5),
                           len(data), sha(data))
    assert error.value.code == "short"
    assert "after %d of %d bytes" % (files.CHUNK_BYTES + 5, len(data)) in str(error.value)
    assert blobs(config) == [] and partials(config) == []
    assert connection.execute("SELECT count(*) FROM files").fetchone()[0] == 0


def test_a_hash_mismatch_names_both_hashes_and_keeps_nothing(cluster_home):
    config, connection = cluster_home
    data = b"the real bytes"
    wrong = sha(b"other bytes")
    with pytest.raises(files.FileStoreError, match="expected %s got %s" % (wrong, sha(data))):
        files.store_stream(connection, config, io.BytesIO(data), len(data), wrong)
    assert blobs(config) == [] and partials(config) == []
    assert connection.execute("SELECT count(*) FROM files").fetchone()[0] == 0


def test_a_full_disk_mid_write_leaves_nothing(cluster_home, monkeypatch):
    config, connection = cluster_home
    real_write = files.Writer.write

    def write(self, data):
        if self.size > 0:
            self.file.close()      # the next write fails as ENOSPC would
            raise files.disk_error(OSError(28, "No space left on device"))
        real_write(self, data)
    monkeypatch.setattr(files.Writer, "write", write)
    data = os.urandom(2 * files.CHUNK_BYTES)
    with pytest.raises(files.FileStoreError) as error:
        files.store_stream(connection, config, io.BytesIO(data), len(data), sha(data))
    assert error.value.code == "disk_full" and "No space left" in str(error.value)
    assert blobs(config) == [] and partials(config) == []


def test_the_quota_refuses_before_any_byte_is_stored(cluster_home):
    config, connection = cluster_home
    config.files_quota_mb = 1
    small = os.urandom(600 * 1024)
    files.store_stream(connection, config, io.BytesIO(small), len(small))

    class Untouched:
        def read(self, n):
            raise AssertionError("read before the quota was checked")
    with pytest.raises(files.FileStoreError) as error:
        files.store_stream(connection, config, Untouched(), 600 * 1024)
    assert error.value.code == "quota" and "files_quota_mb=1" in str(error.value)
    assert partials(config) == []
    # What the store holds already always fits.
    files.check_room(connection, config, len(small), sha(small))


def test_the_bytes_held_follow_every_store_and_sweep_without_a_sum(cluster_home):
    config, connection = cluster_home

    def held():
        counted = connection.execute("SELECT coalesce(sum(size), 0) FROM files").fetchone()[0]
        assert files.used_bytes(connection) == counted
        return counted
    assert held() == 0
    first, _ = files.store_stream(connection, config, io.BytesIO(b"a" * 1000), 1000)
    files.store_stream(connection, config, io.BytesIO(b"b" * 300), 300)
    files.store_stream(connection, config, io.BytesIO(b"a" * 1000), 1000)   # held already
    assert held() == 1300
    files.record(connection, first, 1000)          # used again: counted once
    assert held() == 1300
    connection.execute("UPDATE files SET last_used_at = 0")
    assert files.sweep(connection, config, time.time()) == 2
    assert held() == 0


def test_a_full_disk_is_refused_before_storing(cluster_home, monkeypatch):
    config, connection = cluster_home
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(files.FileStoreError, match="1000 bytes free") as error:
        files.check_room(connection, config, 10)
    assert error.value.code == "disk_full"


def test_paths_inside_a_task_directory(cluster_home):
    for good in ("a.txt", "photos/2024/x.jpg", ".hidden", "a b/ü.txt", ".rcfile", "x/.rc-y"):
        assert files.path_problem(good) is None, good
    for bad, why in (("", "non-empty"), ("/etc/passwd", "relative"), ("a/../../b", ".."),
                     ("a//b", "empty"), ("./a", "'.'"), ("a\x00b", "NUL"),
                     ("x" * 256, "255"), (".rc/stdout", "worker's own"), (None, "non-empty"),
                     (".rc-checkpoint/x", ".rc-checkpoint"), (".rc-stdin", ".rc-stdin")):
        assert why in files.path_problem(bad), bad


def submit_with_input(connection, config, digest, size, **extra):
    payload = dict({"command": "cat in.txt",
                    "inputs": [{"path": "in.txt", "sha256": digest, "size": size}]}, **extra)
    return tasks.submit(connection, config, "shell", payload)


def test_a_task_refers_to_its_inputs(cluster_home):
    config, connection = cluster_home
    digest, size = files.store_stream(connection, config, io.BytesIO(b"hello"), 5)
    task_id = submit_with_input(connection, config, digest, size,
                                stdin={"sha256": digest, "size": size})
    listed = files.task_files(connection, task_id)
    assert [(f["kind"], f["name"], f["sha256"]) for f in listed] == [
        ("input", ".rc/stdin", digest), ("input", "in.txt", digest)]
    assert files.input_hashes(connection, task_id) == {digest: 5}


def test_a_missing_input_is_refused_and_nothing_is_queued(cluster_home):
    config, connection = cluster_home
    missing = sha(b"never uploaded")
    with pytest.raises(tasks.TaskError, match="input in.txt: no file %s" % missing):
        submit_with_input(connection, config, missing, 3)
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    assert connection.execute("SELECT count(*) FROM task_files").fetchone()[0] == 0


def finish(connection, task_id, state, finished):
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi',"
                           " started_at = ? WHERE task_id = ?", (finished - 1, task_id))
        connection.execute("UPDATE tasks SET state = ?, finished_at = ? WHERE task_id = ?",
                           (state, finished, task_id))


def age_files(connection, when):
    connection.execute("UPDATE files SET last_used_at = ?, created_at = ?", (when, when))


def test_retention_keeps_a_blob_while_a_task_needs_it(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    now = time.time()
    day = files.DAY
    digest, size = files.store_stream(connection, config, io.BytesIO(b"input"), 5)
    used = submit_with_input(connection, config, digest, size)
    loose, _ = files.store_stream(connection, config, io.BytesIO(b"nobody's"), 8)
    age_files(connection, now - 40 * day)
    # Queued (not ended) keeps it however old; the blob nobody uses goes.
    assert files.sweep(connection, config, now) == 1
    assert files.exists(connection, digest) and not files.exists(connection, loose)
    assert not os.path.exists(files.blob_path(config, loose))
    # Ended 10 days ago: still within the 30 days of retention.
    finish(connection, used, "completed", now - 10 * day)
    assert files.sweep(connection, config, now) == 0
    # Ended 31 days ago: gone, its rows too, row before blob.
    connection.execute("UPDATE tasks SET finished_at = ? WHERE task_id = ?",
                       (now - 31 * day, used))
    assert files.sweep(connection, config, now) == 1
    assert not os.path.exists(files.blob_path(config, digest))
    assert connection.execute("SELECT count(*) FROM task_files").fetchone()[0] == 0


def test_a_pruned_task_leaves_no_rows_behind(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    digest, size = files.store_stream(connection, config, io.BytesIO(b"input"), 5)
    task_id = submit_with_input(connection, config, digest, size)
    finish(connection, task_id, "completed", time.time() - 40 * files.DAY)
    done = housekeeping.sweep(connection, config, Logger("test", stream=io.BytesIO()),
                              time.time())
    assert done["tasks_pruned"] == 1
    assert connection.execute("SELECT count(*) FROM task_files").fetchone()[0] == 0


def test_partials_of_ended_attempts_are_removed(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    digest, size = files.store_stream(connection, config, io.BytesIO(b"input"), 5)
    task_id = submit_with_input(connection, config, digest, size)
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi'"
                           " WHERE task_id = ?", (task_id,))
    live = files.put_partial_name(task_id, 1, "out.txt", digest)
    dead = files.put_partial_name(task_id, 7, "out.txt", digest)
    for name in (live, dead):
        with open(os.path.join(files.partial_dir(config), name), "wb") as f:
            f.write(b"half")
    files.clean_partials(connection, config, time.time())
    assert sorted(partials(config)) == sorted([live, dead])     # written to just now
    files.clean_partials(connection, config, time.time() + 61)
    assert partials(config) == [live]


def test_a_resumed_writer_continues_the_hash(cluster_home):
    config, connection = cluster_home
    data = os.urandom(files.CHUNK_BYTES + 100)
    writer = files.Writer(config, "put-1-1-abc")
    writer.write(data[:1000])
    writer.file.close()          # the connection dropped
    again = files.Writer(config, "put-1-1-abc")
    assert again.have == 1000
    again.write(data[1000:])
    assert again.commit(connection, sha(data)) == (sha(data), len(data))


def test_a_checkpoint_goes_into_the_next_attempts_payload(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    digest, size = files.store_stream(connection, config, io.BytesIO(b"state"), 5)
    task_id = tasks.submit(connection, config, "shell", {"command": "true"})
    with db.write(connection):
        assert files.add_task_file(connection, task_id, 1, files.CHECKPOINT_NAME, digest,
                                   size, time.time()) == "checkpoint"
    payload = tasks.get(connection, task_id)["payload"]
    assert payload == {"command": "true", "checkpoint": {"sha256": digest, "size": 5}}


def test_cached_files_from_a_heartbeat_are_bounded_and_checked():
    good = sha(b"x")
    assert devices.cached_files_text([good, "nope", good.upper(), 5]) == '["%s"]' % good
    assert devices.cached_files_text("not a list") == "[]"
    assert len(db.loads(devices.cached_files_text([good] * 5000))) == devices.MAX_CACHED_FILES


# -- data-aware scheduling ----------------------------------------------------------------

def add_worker(connection, device_id, cached=(), slots=2):
    data = {"device_info": {"platform": "linux", "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": 2, "memory_gb": 4.0},
            "task_types": ["shell"], "slots": slots, "role": "compute"}
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", 1000.0)
        devices.set_cached_files(connection, device_id, devices.cached_files_text(list(cached)))


def test_the_device_holding_the_inputs_is_preferred_and_rc_why_says_so(cluster_home):
    from rc import explain, scheduler
    config, connection = cluster_home
    model = os.urandom(4096)
    digest, size = files.store_stream(connection, config, io.BytesIO(model), len(model))
    # "a" comes first in every other ranking (more idle slots); "b" holds the model.
    add_worker(connection, "a", slots=4)
    add_worker(connection, "b", cached=[digest, sha(b"other")], slots=2)
    task_id = submit_with_input(connection, config, digest, size)
    plain = tasks.submit(connection, config, "shell", {"command": "true"})
    why = explain.why(connection, task_id)
    assert "Devices holding its inputs are preferred: b holds 4096 of its 4096 input bytes" \
        in why
    log = Logger("test", "error", io.BytesIO())
    assert scheduler.schedule(connection, time.time() + 10, log, config) == 2
    placed = {row[0]: row[1] for row in connection.execute("SELECT task_id, device_id FROM tasks")}
    assert placed == {task_id: "b", plain: "a"}
    assert "b holds 4096" in explain.why(connection, task_id)


def test_without_a_cached_copy_rc_why_says_what_must_be_sent(cluster_home):
    from rc import explain
    config, connection = cluster_home
    digest, size = files.store_stream(connection, config, io.BytesIO(b"x" * 10), 10)
    add_worker(connection, "a")
    task_id = submit_with_input(connection, config, digest, size)
    assert "No device that fits holds its inputs in its cache yet (10 bytes to send)" \
        in explain.why(connection, task_id)
