"""The file store's dedupe paths against rc-reaper's retention sweep, on a
real store and database: whoever finds a blob held already, or stores one,
while the sweep removes it, ends with its row AND its bytes, never a row
pointing at nothing (lib/rc/files.py record_present, remove_unrecorded).

The interleavings are forced, not waited for: a statement trace on one
connection runs the other side at the moment that connection is about to
write, outside any transaction (where a second connection can run).
"""
import hashlib
import io
import json
import os
import sys
import threading
import time

import pytest

from rc import config as config_module
from rc import db, device_secrets, devices, files, log, protocol, state_dir, tasks, transfer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cluster_harness import PortTaken, on_a_free_port  # noqa: E402
from test_transfer import Client  # noqa: E402


def stale(connection, digest):
    """Past its retention, referred to by no task: the next sweep's."""
    connection.execute("UPDATE files SET last_used_at = 0 WHERE sha256 = ?", (digest,))


def rows_without_bytes(connection, config):
    return [digest for (digest,) in connection.execute("SELECT sha256 FROM files")
            if not os.path.isfile(files.blob_path(config, digest))]


def held_and_local(config, connection, data, local):
    """The bytes stored and stale, and the same bytes in a local file."""
    digest, _ = files.store_stream(connection, config, io.BytesIO(data), len(data))
    stale(connection, digest)
    local.write_bytes(data)
    return digest, local


def readable(connection, config, digest):
    blob, _ = files.open_blob(connection, config, digest)
    with blob:
        return blob.read()


def before_next_write(connection, act, after=None):
    """Run act() once, the first time `connection` starts a write outside a
    transaction (BEGIN, or a lone INSERT/DELETE/UPDATE in autocommit) -- once
    it has run a statement starting with `after`, if given. Returns the list
    the statement that triggered it is appended to."""
    fired, seen = [], [after is None]

    def trace(statement):
        if fired or connection.in_transaction:
            seen[0] = seen[0] or statement.startswith(after)
            return
        if seen[0] and statement.split(None, 1)[0] in ("BEGIN", "INSERT", "DELETE", "UPDATE"):
            fired.append(statement)
            act()
        seen[0] = seen[0] or (after is not None and statement.startswith(after))
    connection.set_trace_callback(trace)
    return fired


@pytest.fixture
def second(cluster_home):
    """Another connection to the same database: the other program."""
    config, _ = cluster_home
    other = db.connect(config.db_path)
    yield other
    other.close()


def test_a_file_held_already_and_swept_before_its_row_is_stored_again(cluster_home, second,
                                                                       tmp_path):
    """`rc submit --input` (store_path) finds the bytes held, and rc-reaper's
    sweep removes row and blob before store_path records their use: before
    the fix the row came back and the blob did not (the INSERT that
    refreshed last use re-created it), so the task's input was gone."""
    config, connection = cluster_home
    data = b"a model sent once" * 1000
    digest, local = held_and_local(config, connection, data, tmp_path / "model.bin")
    swept = []
    fired = before_next_write(
        connection, lambda: swept.append(files.sweep(second, config, time.time())))
    assert files.store_path(connection, config, str(local)) == (digest, len(data))
    connection.set_trace_callback(None)
    assert fired and swept == [1]              # the sweep did run in between, and removed it
    assert rows_without_bytes(connection, config) == []
    assert readable(connection, config, digest) == data


def test_a_file_stored_while_the_sweep_removes_it_keeps_its_bytes(cluster_home, second,
                                                                   tmp_path, monkeypatch):
    """The other order: the sweep has deleted the row, and before it removes
    the blob `rc submit --input` stores the same bytes (and records them).
    Before the fix the sweep then removed the blob it had just been given."""
    config, connection = cluster_home
    data = b"the same bytes again" * 1000
    digest, local = held_and_local(config, connection, data, tmp_path / "again.bin")
    stored = []

    def store():
        stored.append(files.store_path(connection, config, str(local)))
    # After the sweep's DELETE of the row commits, at its next write or
    # before it removes a file, whichever comes first.
    fired = before_next_write(second, store, after="DELETE FROM files")
    unlink = files.remove

    def remove(path):
        if not fired and not second.in_transaction and \
                not files.exists(connection, digest):
            fired.append("remove")
            store()
        unlink(path)
    monkeypatch.setattr(files, "remove", remove)
    files.sweep(second, config, time.time())
    second.set_trace_callback(None)
    assert fired and stored == [(digest, len(data))]
    assert rows_without_bytes(connection, config) == []
    assert readable(connection, config, digest) == data


def written_and_synced(config, plan):
    """(stored, notes) of a result's inline outputs as rc-server has them
    before their rows: written on its loop, synced by OutputStore."""
    stored, notes, unsynced = files.write_inline_outputs(config, plan, {})
    assert files.sync_placed([placed for placed, _, _ in unsynced]) == [None] * len(unsynced)
    return stored, notes


def test_an_inline_output_held_when_checked_and_swept_before_its_row_is_placed_again(
        cluster_home, second):
    """rc-server checks a result's inline output on its loop (held: not
    written again), stores the rest off the loop, and records the rows with
    the result. A sweep in between removed row and blob; before the fix the
    result's rows named a blob that was no longer there."""
    config, connection = cluster_home
    data = b"an output another task left too" * 100
    digest, _ = files.store_stream(connection, config, io.BytesIO(data), len(data))
    stale(connection, digest)
    entry = {"name": "out.txt", "sha256": digest, "size": len(data)}
    held = files.exists(connection, digest)
    assert held
    stored, notes = written_and_synced(config, [(0, entry, memoryview(data), held)])
    assert notes == {}
    assert files.sweep(second, config, time.time()) == 1        # row and blob gone
    with db.write(connection):
        files.record_inline_outputs(connection, 1, 1, stored, False, time.time())
    assert rows_without_bytes(connection, config) == []
    assert readable(connection, config, digest) == data


# -- rc-files: a put of bytes the store holds ---------------------------------------------

class InProcessFiles:
    """rc-files's FilesServer on 127.0.0.1 in a thread of this process, so
    that its connections can be traced; a device and its running task."""

    def __init__(self, home, monkeypatch):
        (home / "rc.json").write_text(json.dumps({"tcp_host": "127.0.0.1"}))
        self.home = home
        self.secrets = {}
        self.connections = []
        connect = db.connect

        def traced_connect(path):
            opened = connect(path)
            if threading.current_thread() is not threading.main_thread():   # a session's
                self.connections.append(opened)
            return opened
        monkeypatch.setattr(transfer.db, "connect", traced_connect)
        self.server = on_a_free_port(self.listen)
        self.db = db.connect(self.config.db_path)
        self.stop = []
        self.thread = threading.Thread(target=self.server.serve, args=(lambda: self.stop,),
                                       daemon=True)
        self.thread.start()

    def listen(self, port):
        """A FilesServer listening on `port`; one that cannot (another
        process took the port since free_port) exits, here SystemExit."""
        environ = dict(os.environ, RC_HOME=str(self.home), RC_FILES_PORT=str(port),
                       RC_CONFIG=str(self.home / "rc.json"))
        self.config = config_module.load(environ=environ)
        state_dir.init(self.config)
        try:
            return transfer.FilesServer(self.config, log.Logger("rc-files", "warning"))
        except SystemExit:
            raise PortTaken(port)

    def add_device(self, device_id):
        key = device_secrets.ensure_key(self.config)
        secret = protocol.new_device_secret()
        data = {"device_info": {"hostname": device_id}, "task_types": ["shell"], "slots": 2}
        with db.write(self.db):
            devices.register(self.db, device_id, data, "127.0.0.1:1", time.time())
            devices.set_secret(self.db, device_id, device_secrets.seal(key, device_id, secret))
        self.secrets[device_id] = secret

    def running_task(self, device_id):
        task_id = tasks.submit(self.db, self.config, "shell", {"command": "true",
                                                                "outputs": ["**"]})
        with db.write(self.db):
            self.db.execute("UPDATE tasks SET state = 'running', device_id = ?, attempt = 1"
                            " WHERE task_id = ?", (device_id, task_id))
        return task_id

    def close(self):
        self.stop.append(True)
        self.thread.join(10)
        self.db.close()


def test_a_put_of_held_bytes_swept_before_its_row_is_sent_again(tmp_path, monkeypatch):
    """A worker puts an output whose bytes the store holds, from a stale
    task's past: rc-files asks for its bytes all the same (no task of this
    device reads that blob, so "have" would hand it over), places them and
    records the rows after. The sweep ran in between and removed the blob
    it found, the one just placed: before the fix the task's output row
    named a blob that was gone. Now the put is refused as busy, and the
    worker's retry (as bin/worker.py retries busy) sends the bytes again."""
    node = InProcessFiles(tmp_path, monkeypatch)
    try:
        node.add_device("pi")
        task_id = node.running_task("pi")
        data = os.urandom(300 * 1024)
        digest, _ = files.store_stream(node.db, node.config, io.BytesIO(data), len(data))
        stale(node.db, digest)
        sweeper = db.connect(node.config.db_path)
        swept = []
        client = Client(node, "pi")
        served = node.connections[-1]
        fired = before_next_write(served, lambda: swept.append(
            files.sweep(sweeper, node.config, time.time())), after="SELECT size FROM files")
        answer, done = client.put(task_id, 1, "out.bin", data)
        assert fired and swept == [1]
        assert answer == {"ok": True, "have": 0} and done["error"]["code"] == "busy"
        answer, done = client.put(task_id, 1, "out.bin", data)
        assert answer == {"ok": True, "have": 0} and done == {"ok": True, "stored": True}
        entry = files.task_file(node.db, task_id, "out.bin")
        assert entry["sha256"] == digest
        assert rows_without_bytes(node.db, node.config) == []
        assert readable(node.db, node.config, digest) == data
        client.close()
        sweeper.close()
    finally:
        node.close()



def test_an_inline_output_that_cannot_be_placed_again_gets_no_row_and_spares_the_others(
        cluster_home, second, monkeypatch):
    """As above, but the disk refuses the bytes placed again: that file gets
    no row (the task lists no such output, rather than one that is gone),
    and the result's other files their rows."""
    config, connection = cluster_home
    swept_data, kept_data = b"swept before its row" * 50, b"placed just now" * 50
    swept, _ = files.store_stream(connection, config, io.BytesIO(swept_data), len(swept_data))
    stale(connection, swept)
    kept = hashlib.sha256(kept_data).hexdigest()
    plan = [(0, {"name": "swept.txt", "sha256": swept, "size": len(swept_data)},
             memoryview(swept_data), True),
            (1, {"name": "kept.txt", "sha256": kept, "size": len(kept_data)},
             memoryview(kept_data), False)]
    stored, _ = written_and_synced(config, plan)
    assert files.sweep(second, config, time.time()) == 1

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files, "place_bytes", full_disk)
    with db.write(connection):
        files.record_inline_outputs(connection, 1, 1, stored, False, time.time())
    assert not files.exists(connection, swept)
    assert files.exists(connection, kept) and readable(connection, config, kept) == kept_data
    assert rows_without_bytes(connection, config) == []
