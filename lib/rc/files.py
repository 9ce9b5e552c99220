"""The file store: task inputs and outputs, kept once by their SHA-256.

Blobs live at var/files/<first two hex digits>/<sha256>; the `files` table
says which exist and how big they are, `task_files` which task reads or left
which. A blob is written to var/files/partial/ first, fsynced, its hash
checked, and only then renamed into place (os.replace) and its row
committed: a cut upload or a full disk leaves at most a partial file, never
a half blob, and never a row pointing at nothing (the row comes after the
rename; deletion removes the row first). A row is written only inside a
write transaction that has seen the blob file in place (record_present()),
and the sweep removes a file only inside one that has seen no row for it
(remove_unrecorded()): whoever stores a blob the store holds already,
while the sweep removes it, either keeps it or stores it again, never
records it without its bytes. A blob is kept while a task that
is not finished refers to it, then `files_retention_days` after the last one
ended; rc-reaper's upkeep deletes it after that (sweep()).

Used by rc-files (lib/rc/transfer.py), rc-server (small files that ride
the worker connection: inline_inputs(), check_inline_outputs()), rc-web and
the `rc` command; it never talks to the network itself.
"""
import fcntl
import fnmatch
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
import time

from rc import db
from rc.states import (FILES_MAX_OUTPUTS, INLINE_FILE_BYTES, INLINE_MAX_FILES, INLINE_TOTAL_BYTES,
                       TERMINAL_STATES)

CHUNK_BYTES = 1024 * 1024       # bytes read or written at once: memory stays bounded
DISK_RESERVE_BYTES = 64 * 1024 * 1024   # free bytes an upload must leave on the disk
ROOM_CHECK_BYTES = 1024 * 1024          # bytes an upload writes between looks at the room
MIB = 1024 * 1024
DAY = 86400.0
SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
PARTIAL_DIR = "partial"
# rc-web's reservation of an upload's length, as a partial file's name:
# "reserved-<bytes>-<token>"; it counts as that many bytes (Reservations).
RESERVED_PREFIX = "reserved-"
INPUT, OUTPUT, STREAM, CHECKPOINT = "input", "output", "stream", "checkpoint"
STDIN_NAME = ".rc/stdin"         # how a task's stdin is named among its inputs
CHECKPOINT_NAME = ".rc/checkpoint"
STREAM_NAMES = (".rc/stdout", ".rc/stderr")
SWEEP_CHUNK = 500                # blobs deleted per transaction
# Blob files removed per write transaction (remove_unrecorded): every other
# program's writes wait meanwhile; 100 took ~7 ms here, 500 ~35 ms.
REMOVE_CHUNK = 100
ORPHAN_BLOB_AGE = 3600.0         # seconds a blob file with no row is left alone before it goes
ORPHAN_BLOB_DIRS = 16            # of the 256 var/files/<aa>/ directories, looked through per sweep
# Seconds an upload's partial file is left to its writer before the sweep
# asks whether anyone holds it (the moment between creating it and locking it).
UNOWNED_UPLOAD_AGE = 5.0
# Seconds after which an orphan-* or inline-* partial file is a kill's
# leftover: its writer (remove_orphan, write_unsynced) holds it for moments.
MOMENT_FILE_AGE = 60.0
# Task ids rc-files' file_sent line names (tasks_reading): a device's tasks
# that read one blob, for `rc logs --task`; more are not worth a line's length.
MAX_READERS_NAMED = 10


class FileStoreError(Exception):
    """A file cannot be stored or found; `code` is what rc-files answers
    (quota, disk_full, hash_mismatch, short, not_found) and the message
    says why, naming the value."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def is_sha256(text):
    return isinstance(text, str) and SHA256_HEX.match(text) is not None


def root(config):
    return os.path.join(config.home, "files")


def blob_path(config, sha256):
    if not is_sha256(sha256):
        raise FileStoreError("bad_request", "%r is not a SHA-256 (64 lower-case hex digits)"
                             % (sha256,))
    return os.path.join(root(config), sha256[:2], sha256)


def partial_dir(config):
    path = os.path.join(root(config), PARTIAL_DIR)
    make_dir(path)
    return path


def make_dir(path):
    """os.makedirs(path, 0o700) unless it is there: the usual case, where a
    stat costs less than a mkdir that fails (every blob goes through here)."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)


def partial_path(config, name):
    """Where the partial file `name` goes, its directory not looked at:
    whoever creates the file makes the directory if the creation says it is
    missing (create_in), a system call less per blob than partial_dir()."""
    return os.path.join(root(config), PARTIAL_DIR, name)


def create_in(path, create):
    """create(path), and again once its directory is made if it said that
    was missing: the store's directories are there nearly always, and a
    stat of each before every blob was most of their cost (rc-web's upload
    threads hand the GIL over at each system call)."""
    try:
        return create(path)
    except FileNotFoundError:
        make_dir(os.path.dirname(path))
        return create(path)


def move_into_place(source, target):
    """os.replace into a blob's directory, made only if the rename says it
    is missing (create_in)."""
    create_in(target, lambda path: os.replace(source, path))


def disk_free(path):
    """Free bytes on the disk that holds the directory `path`, made if it
    is missing (create_in)."""
    try:
        return shutil.disk_usage(path).free
    except FileNotFoundError:
        make_dir(path)
        return shutil.disk_usage(path).free


# -- names inside a task directory -------------------------------------------------------

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# The worker's own names at the top of a task directory: ".rc" and ".rc-*"
# (.rc-checkpoint/, .rc-stdin, .rc-stdout...).
RESERVED_TOP = ".rc"


def path_problem(path):
    """What is wrong with a relative path inside a task directory (an
    input's place, an output's name), or None when it is fine."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty text"
    if "\x00" in path:
        return "must not contain NUL"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return "is over %d bytes" % MAX_PATH_BYTES
    if path.startswith("/"):
        return "must be relative, not absolute"
    parts = path.split("/")
    if ".." in parts:
        return "must not contain '..'"
    if any(part in ("", ".") for part in parts):
        return "must not have empty or '.' parts"
    if any(len(part.encode("utf-8")) > MAX_COMPONENT_BYTES for part in parts):
        return "has a part over %d bytes" % MAX_COMPONENT_BYTES
    if parts[0] == RESERVED_TOP or parts[0].startswith(RESERVED_TOP + "-"):
        return "must not start with %s (.rc and .rc-* are the worker's own)" % parts[0]
    return None


# -- room ------------------------------------------------------------------------------

def used_bytes(connection):
    """The bytes the store holds: one row kept by triggers (db.py, migration 12)."""
    row = connection.execute("SELECT bytes FROM files_usage WHERE id = 1").fetchone()
    return row[0] if row is not None else \
        connection.execute("SELECT coalesce(sum(size), 0) FROM files").fetchone()[0]


def stored_size(connection, sha256):
    """The size of a blob the store holds, or None."""
    row = connection.execute("SELECT size FROM files WHERE sha256 = ?", (sha256,)).fetchone()
    return None if row is None else row[0]


def exists(connection, sha256):
    return stored_size(connection, sha256) is not None


def partial_bytes(config, leave_out=None):
    """Bytes in partial files: uploads on their way in, and cut puts kept
    for their resume (the one named `leave_out`, or those in a set of
    names, aside). They take the disk as blobs do, so they count against
    the quota too; an upload rc-web reserved counts as its whole length
    from its headers on, whatever of it has arrived (Reservations)."""
    total = 0
    leave_out = () if leave_out is None else \
        (leave_out,) if isinstance(leave_out, str) else leave_out
    try:
        entries = list(os.scandir(os.path.join(root(config), PARTIAL_DIR)))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name not in leave_out:
            try:
                size = entry.stat().st_size
            except OSError:
                continue    # finished or removed meanwhile
            if entry.name.startswith(RESERVED_PREFIX):
                size = max(size, reserved_size(entry.name))
            total += size
    return total


def reserved_size(name):
    """The bytes a reservation's partial file holds by its name."""
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        return 0


def check_room(connection, config, size, sha256=None, partial=None):
    """FileStoreError (quota or disk_full) when `size` more bytes do not fit
    beside the blobs and the partial files (`partial`, the caller's own,
    aside); a blob the store already holds always fits. Returns the bytes
    the partial files may hold together (a Writer's `room`), or None."""
    if sha256 is not None and exists(connection, sha256):
        return None
    quota = config.files_quota_mb * MIB
    used = used_bytes(connection)
    held = used + partial_bytes(config, partial)
    if held + size > quota:
        raise FileStoreError("quota", "a file of %d bytes does not fit: the store holds %d"
                             " of %d bytes, uploads under way included (files_quota_mb=%d)"
                             % (size, held, quota, config.files_quota_mb))
    free = disk_free(root(config))
    if free < size + DISK_RESERVE_BYTES:
        raise FileStoreError("disk_full", "a file of %d bytes does not fit: %d bytes free on"
                             " the main node's disk (%d kept in reserve)"
                             % (size, free, DISK_RESERVE_BYTES))
    return quota - used


class Reservations:
    """rc-web's uploads in flight: each upload's declared length is
    reserved against the quota when its headers arrive (before any of its
    body, which the HTTP server holds whole before rc-web reads it) and
    released when its request ends, stored, refused or cut. Checked one at
    a time against what is stored, the partial files and the others in
    flight, so rc-web holds at most the quota however many upload at once
    (before, each was checked alone once it had all arrived: N uploads held
    N times the quota first).

    An upload whose body goes to the disk is reserved as its partial file,
    named with its length ("reserved-<bytes>-<token>"), which
    partial_bytes() counts as that length from the headers on: rc-files'
    puts and rc-server's inline outputs, which count the partial files,
    count it, as rc-web counts theirs. A body held in memory (`in_memory`)
    takes no disk until it is stored, and its store checks the room as a
    put does: its reservation is a count in this process (a file a small
    upload would cost ~30 us of rc-web's ~1 ms). Not rows: they are taken
    in waitress's loop, which must not wait on the database's write lock.
    Each file is locked while its holder lives: a killed rc-web's go when
    it starts again (drop_dead_reservations) or at the next sweep."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = set()

    def in_flight(self):
        with self.lock:
            return self.reserved()

    def reserved(self):
        """Bytes held by the reservations; the caller holds self.lock."""
        return sum(reservation.size for reservation in self.held)

    def reserve(self, connection, config, size, in_memory=False):
        """A Reservation of `size` bytes, or FileStoreError quota (naming the
        quota, the stored and the in-flight bytes) or disk_full."""
        quota = config.files_quota_mb * MIB
        check_quota(config, size)
        with self.lock:
            reserved = self.reserved()
            stored = used_bytes(connection)
            # Every program's partial files, the reservations' among them.
            in_flight = partial_bytes(config) + sum(
                reservation.size for reservation in self.held if reservation.path is None)
            if stored + in_flight + size > quota:
                raise FileStoreError(
                    "quota", "an upload of %d bytes does not fit: the store holds %d bytes and"
                    " %d more are on their way in (uploads under way), of its quota of %d"
                    " (files_quota_mb=%d); try again once they end or files expire"
                    % (size, stored, in_flight, quota, config.files_quota_mb))
            free = disk_free(root(config))
            if free < reserved + size + DISK_RESERVE_BYTES:
                raise FileStoreError(
                    "disk_full", "an upload of %d bytes does not fit on the main node's disk:"
                    " %d bytes free, %d of them promised to uploads under way, %d kept in"
                    " reserve" % (size, free, reserved, DISK_RESERVE_BYTES))
            reservation = Reservation(self, size, None if in_memory else config)
            self.held.add(reservation)
            return reservation

    def release(self, reservation):
        with self.lock:
            self.held.discard(reservation)


class Reservation:
    """One upload's bytes held against the quota until release(), and, for
    a body that goes to the disk, the partial file named with its length
    that the body is received into (`file`), which goes with it unless it
    was stored (store_received() renamed it into place)."""

    partial = path = file = None    # its partial file, if the body goes to the disk

    def __init__(self, reservations, size, config=None):
        self.reservations, self.size = reservations, size
        if config is None:
            return          # held in memory
        self.partial = "%s%d-%s" % (RESERVED_PREFIX, size, secrets.token_hex(16))
        path = os.path.join(partial_dir(config), self.partial)
        try:
            self.file = open(path, "x+b")
        except OSError as e:
            raise disk_error(e)
        self.path = path
        # Held while this process lives; the sweep leaves an unlocked one
        # alone for UNOWNED_UPLOAD_AGE (the moment before this lock), and
        # only rc-web, before it serves, drops unlocked ones at once.
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass        # no locks here: the sweep's hour rule is left

    def release(self):
        if self.path is not None:
            remove(self.path)
            self.file.close()
        self.reservations.release(self)


def drop_dead_reservations(config):
    """Remove the reservations no process holds (rc-web's at its start: a
    killed one's, which would count against the quota until the sweep)."""
    try:
        names = os.listdir(partial_dir(config))
    except OSError:
        return
    for name in names:
        path = os.path.join(partial_dir(config), name)
        if name.startswith(RESERVED_PREFIX) and unowned(path):
            remove(path)


# -- writing ---------------------------------------------------------------------------

class Writer:
    """One blob on its way in: bytes go to a partial file (a named one can
    be resumed: `have` bytes are there already), then commit() checks the
    hash and puts blob and row in place."""

    def __init__(self, config, partial_name=None, room=None):
        self.config = config
        name = partial_name or "upload-%s" % secrets.token_hex(16)
        self.path = partial_path(config, name)
        self.hash = hashlib.sha256()
        self.size = 0
        # Each upload was checked against the room when it began; uploads
        # under way together are held to it as they write (check_room()).
        self.room, self.unchecked = room, 0
        if partial_name and os.path.exists(self.path):
            self._rehash()
        # Unbuffered: bytes come in large pieces, and the buffered layer cost
        # a copy, a tty check and an 8 KiB buffer per file.
        self.file = create_in(self.path, lambda path: open(path, "ab", buffering=0))
        if not partial_name:
            # Held while it is written: the lock goes with a killed writer,
            # and the sweep then removes the file (unowned()) at once. Where
            # the file system has no locks, the sweep's hour rule is left.
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass

    def _rehash(self):
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
                self.hash.update(chunk)
                self.size += len(chunk)

    @property
    def have(self):
        return self.size

    def truncate(self):
        """Start again from nothing (the earlier part belonged to other bytes)."""
        self.file.truncate(0)
        self.file.seek(0)
        self.hash, self.size = hashlib.sha256(), 0

    def write(self, data):
        self._write_all(data)
        self.hash.update(data)
        self.size += len(data)
        self.unchecked += len(data)
        if self.unchecked >= ROOM_CHECK_BYTES:
            self.unchecked = 0
            self.check_room()

    def _write_all(self, data):
        try:
            written = self.file.write(data)
            while written < len(data):      # a raw file may take part of it
                written += self.file.write(memoryview(data)[written:])
        except OSError as e:
            raise disk_error(e)

    def check_room(self):
        """FileStoreError when the partial files together passed the room
        (the quota) or the disk's reserve is reached, whoever wrote them."""
        free = shutil.disk_usage(os.path.dirname(self.path)).free
        if free < DISK_RESERVE_BYTES:
            raise FileStoreError("disk_full", "the main node's disk is full: %d bytes free"
                                 " (%d kept in reserve)" % (free, DISK_RESERVE_BYTES))
        if self.room is not None and partial_bytes(self.config) > self.room:
            raise FileStoreError("quota", "uploads under way together are over the %d bytes"
                                 " left in the store (files_quota_mb=%d)"
                                 % (self.room, self.config.files_quota_mb))

    def commit(self, connection, expected=None):
        """Verify, rename into place, record; returns (sha256, size). On a
        mismatch or error the partial file is removed."""
        sha256, size = self.place(expected)
        with db.write(connection):
            record_present(connection, self.config, sha256, size)
        return sha256, size

    def place(self, expected=None):
        """commit() but the row, which the caller writes (record()) in a
        transaction of its own, after this."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            self.abort()
            raise disk_error(e)
        self.file.close()
        sha256 = self.hash.hexdigest()
        if expected is not None and sha256 != expected:
            self.abort()
            raise FileStoreError("hash_mismatch", "expected %s got %s" % (expected, sha256))
        target = blob_path(self.config, sha256)
        move_into_place(self.path, target)
        fsync_directory(os.path.dirname(target))
        return sha256, self.size

    def abort(self):
        try:
            self.file.close()
        finally:
            remove(self.path)


def disk_error(error):
    return FileStoreError("disk_full", "cannot write to the main node's disk: %s"
                          % (error.strerror or error))


def record(connection, sha256, size, now=None):
    """The blob's row, once the blob is in place (after, never before);
    record_present() checks that it still is."""
    now = time.time() if now is None else now
    connection.execute(
        "INSERT INTO files(sha256, size, created_at, last_used_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(sha256) DO UPDATE SET last_used_at = excluded.last_used_at",
        (sha256, size, now, now))


def record_present(connection, config, sha256, size, now=None):
    """The blob's row (its last use now), inside the caller's write
    transaction, if the blob file is in place; FileStoreError "busy" if the
    sweep has just removed it (the caller stores the bytes again). Under the
    write lock the sweep cannot remove the file between this look and the
    commit (remove_unrecorded())."""
    if not os.path.isfile(blob_path(config, sha256)):
        raise FileStoreError("busy", "file %s was removed from the store (retention) as it"
                             " was stored; send it again" % sha256)
    record(connection, sha256, size, now)


def hold(connection, config, sha256, size, now=None):
    """Whether the store holds the blob, in a write transaction of its own
    that records its use (record_present()): True, and it stays until the
    retention after now; False, and the caller stores its bytes."""
    try:
        with db.write(connection):
            record_present(connection, config, sha256, size, now)
    except FileStoreError:
        return False
    return True


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def store_stream(connection, config, stream, size=None, expected=None, limit=None):
    """Read a stream (anything with read(n)) into the store; (sha256, size).
    With `size`, the stream must hold exactly that many bytes (fewer: a cut
    upload, FileStoreError "short", nothing kept); with `limit`, at most
    that many."""
    room = check_room(connection, config, size, expected) if size is not None else None
    writer = Writer(config, room=room)
    try:
        while size is None or writer.size < size:
            want = CHUNK_BYTES if size is None else min(CHUNK_BYTES, size - writer.size)
            chunk = stream.read(want)
            if not chunk:
                break
            writer.write(chunk)
            if limit is not None and writer.size > limit:
                raise FileStoreError("quota", "the upload is over %d bytes (files_quota_mb)"
                                     % limit)
        if size is not None and writer.size < size:
            raise FileStoreError("short", "the upload ended after %d of %d bytes"
                                 % (writer.size, size))
        if size is None:
            check_room(connection, config, writer.size,
                       partial=os.path.basename(writer.path))
        return writer.commit(connection, expected)
    except BaseException:
        writer.abort()
        raise


def store_received(connection, config, name, size, expected=None):
    """A partial file an upload's body was received into whole (rc-web's
    reserved uploads: Reservation.open) into the store, hashed where it
    lies and renamed into place: no second copy on the disk."""
    writer = Writer(config, partial_name=name)
    try:
        if writer.size != size:
            raise FileStoreError("short", "the upload ended after %d of %d bytes"
                                 % (writer.size, size))
        check_room(connection, config, size, expected, partial=name)
        return writer.commit(connection, expected)
    except BaseException:
        writer.abort()
        raise


def hash_file(path):
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_quota(config, size):
    """FileStoreError("quota") for a file bigger than the whole store may
    hold, told before any of it is read."""
    quota = config.files_quota_mb * MIB
    if size > quota:
        raise FileStoreError("quota", "the file is %d bytes, over the store's quota of %d"
                                      " (files_quota_mb)" % (size, quota))


def store_path(connection, config, path):
    """A local file into the store (the `rc` command on the main node):
    hashed first, so a file the store holds already is not copied again;
    one over the quota is refused before (a sparse file of a terabyte took
    its hours of zeros to be told so)."""
    check_quota(config, os.stat(path).st_size)
    sha256, size = hash_file(path)
    if hold(connection, config, sha256, size):
        return sha256, size
    with open(path, "rb") as f:
        return store_stream(connection, config, f, size, sha256)


# -- reading ---------------------------------------------------------------------------

def open_blob(connection, config, sha256):
    """The blob opened for reading and its size; FileStoreError not_found."""
    row = connection.execute("SELECT size FROM files WHERE sha256 = ?", (sha256,)).fetchone() \
        if is_sha256(sha256) else None
    if row is None:
        raise FileStoreError("not_found", "no file %s in the store" % (sha256,))
    try:
        return open(blob_path(config, sha256), "rb"), row["size"]
    except FileNotFoundError:
        raise FileStoreError("not_found", "file %s is recorded but its blob is missing"
                             % sha256)


def task_files(connection, task_id):
    """What a task reads and left: inputs, its checkpoint (one, whichever
    attempt put it), then the outputs and streams of its last attempt only:
    an attempt that did not end the task (taken back, lost, failed and
    retried) left nothing that `rc get` or `rc map --into` should write as
    the task's (a device that put planted.txt, then let its attempt go, had
    it served beside what the attempt that completed the task left)."""
    rows = connection.execute(
        "SELECT kind, name, sha256, size, attempt, created_at FROM task_files t"
        " WHERE task_id = ? AND (kind IN ('input', 'checkpoint') OR attempt ="
        " (SELECT attempt FROM tasks WHERE task_id = t.task_id))"
        " ORDER BY kind != 'input', kind, name", (task_id,))
    return [dict(row) for row in rows]


def task_file(connection, task_id, name):
    """The newest stored file of this task by that name (outputs before inputs)."""
    for entry in task_files(connection, task_id):
        if entry["name"] == name and entry["kind"] != INPUT:
            return entry
    for entry in task_files(connection, task_id):
        if entry["name"] == name:
            return entry
    return None


# -- references from tasks -------------------------------------------------------------

class MissingFile(Exception):
    """A task names a file the store does not hold; the message says which."""


def attach_inputs(connection, task_id, payload, now):
    """Rows for the inputs (and stdin) of a task being inserted, inside the
    caller's transaction; MissingFile names the first one not in the store."""
    entries = [(item["path"], item["sha256"], item["size"])
               for item in payload.get("inputs", ())]
    if "stdin" in payload:
        entries.append((STDIN_NAME, payload["stdin"]["sha256"], payload["stdin"]["size"]))
    for name, sha256, size in entries:
        row = connection.execute("SELECT size FROM files WHERE sha256 = ?",
                                 (sha256,)).fetchone()
        if row is None:
            raise MissingFile("input %s: no file %s in the store; upload it first"
                              " (POST /api/v1/files, or rc submit --input)" % (name, sha256))
        if row["size"] != size:
            raise MissingFile("input %s: file %s is %d bytes, not %d"
                              % (name, sha256, row["size"], size))
    connection.executemany(
        "INSERT OR REPLACE INTO task_files(task_id, attempt, kind, name, sha256, size,"
        " created_at) VALUES (?, 0, 'input', ?, ?, ?, ?)",
        [(task_id, name, sha256, size, now) for name, sha256, size in entries])
    connection.executemany("UPDATE files SET last_used_at = ? WHERE sha256 = ?",
                           [(now, sha256) for _, sha256, _ in entries])


def add_task_file(connection, task_id, attempt, name, sha256, size, now):
    """A file a device stored for (task, attempt), inside the caller's
    transaction, which has checked the fence. A checkpoint replaces the
    task's last one and becomes its next attempt's payload "checkpoint"."""
    kind = (CHECKPOINT if name == CHECKPOINT_NAME else STREAM if name in STREAM_NAMES
            else OUTPUT)
    if kind == CHECKPOINT:
        replaced = [row[0] for row in connection.execute(
            "SELECT sha256 FROM task_files WHERE task_id = ? AND kind = 'checkpoint'"
            " AND sha256 != ?", (task_id, sha256))]
        connection.execute("DELETE FROM task_files WHERE task_id = ? AND kind = 'checkpoint'",
                           (task_id,))
        # No attempt reads a replaced checkpoint again: the next sweep takes it
        # (unless another task refers to it), or it would count against the
        # quota for files_retention_days.
        connection.executemany("UPDATE files SET last_used_at = 0 WHERE sha256 = ?",
                               [(digest,) for digest in replaced])
        connection.execute(
            "UPDATE tasks SET payload = json_set(payload, '$.checkpoint', json(?))"
            " WHERE task_id = ?", (db.dumps({"sha256": sha256, "size": size}), task_id))
    insert_task_file(connection, task_id, attempt, kind, name, sha256, size, now)
    connection.execute("UPDATE files SET last_used_at = ? WHERE sha256 = ?", (now, sha256))
    return kind


def insert_task_file(connection, task_id, attempt, kind, name, sha256, size, now):
    # A file put again under its name replaces the row: the blob it held
    # goes at the next sweep (as a replaced checkpoint), not a month later.
    replaced = connection.execute(
        "SELECT sha256 FROM task_files WHERE task_id = ? AND kind = ? AND name = ?"
        " AND attempt = ? AND sha256 != ?", (task_id, kind, name, attempt, sha256)).fetchone()
    if replaced is not None:
        connection.execute("UPDATE files SET last_used_at = 0 WHERE sha256 = ?", replaced)
    connection.execute(
        "INSERT OR REPLACE INTO task_files(task_id, attempt, kind, name, sha256, size,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (task_id, attempt, kind, name, sha256, size, now))


def glob_match(pattern_parts, parts):
    """fnmatch per path component; "**" matches any number of directories
    (bin/worker.py's glob_match, which picks a task's outputs). As in a
    shell, a leading "." is matched only by a part that starts with one:
    `*` and `**` never bring back .bashrc or .ssh/ to where `rc get` writes.

    One pass over the name per part of the pattern: trying every way to
    split the name among the "**"s cost a device's name of 2,048 parts
    0.1 s on rc-server's loop with "**/*.txt", over a minute with
    "**/a/**/*.txt", each."""
    reached = [True] + [False] * len(parts)    # reached[j]: parts[:j] are matched so far
    for head in pattern_parts:
        if head == "**":
            for j, part in enumerate(parts):
                reached[j + 1] = reached[j + 1] or (reached[j] and not part.startswith("."))
            continue
        dot_too = head.startswith(".")
        reached = [False] + [reached[j] and (dot_too or not part.startswith("."))
                             and fnmatch.fnmatchcase(part, head)
                             for j, part in enumerate(parts)]
    return reached[-1]


def asked_for(connection, task_id, name):
    """Whether a device may store `name` for the task: its stdout, stderr or
    checkpoint, or an output one of the task's --output globs matches (as
    the worker matches them). `rc get` and `rc map --into` write outputs
    under their names: a name nobody asked for (.bashrc) is never stored."""
    if name in STREAM_NAMES or name == CHECKPOINT_NAME:
        return True
    row = connection.execute("SELECT %s FROM tasks WHERE task_id = ?" % OUTPUT_GLOBS_SQL,
                             (task_id,)).fetchone()
    return globs_match(output_globs(row), name)


def outputs_full(connection, task_id, attempt, name):
    """Whether storing `name` would make one output too many for the
    attempt: it holds FILES_MAX_OUTPUTS already, none of them `name` (put
    again, it replaces its row). A worker uploads no more; without the cap
    a device holding a task with --output '*' added a row of task_files
    (a name up to 4 KiB) per empty file it put, which the quota never saw."""
    if name in STREAM_NAMES or name == CHECKPOINT_NAME:
        return False
    stored, this_one = connection.execute(
        "SELECT count(*), count(CASE WHEN name = ? THEN 1 END) FROM task_files"
        " WHERE task_id = ? AND kind = ? AND attempt = ?",
        (name, task_id, OUTPUT, attempt)).fetchone()
    return stored >= FILES_MAX_OUTPUTS and not this_one


# A task's --output globs (JSON text), or NULL when its payload has no list of them.
OUTPUT_GLOBS_SQL = ("CASE WHEN json_type(payload, '$.outputs') = 'array'"
                    " THEN json_extract(payload, '$.outputs') END")


def output_globs(row):
    """The globs of a row whose first column is OUTPUT_GLOBS_SQL (or no row)."""
    return db.loads(row[0]) if row is not None and row[0] is not None else []


def globs_match(globs, name):
    parts = name.split("/")
    return any(glob_match(glob.strip("/").split("/"), parts) for glob in globs
               if isinstance(glob, str) and glob and "\0" not in glob)


def held_output_globs(connection, device_id, task_id, attempt):
    """The --output globs of an attempt the device holds now, or None when it
    does not: holds_attempt's fence and asked_for's look in one query (a
    task_result's inline outputs, on rc-server's loop)."""
    row = connection.execute(
        "SELECT %s FROM tasks WHERE task_id = ? AND attempt = ? AND device_id = ? AND %s"
        % (OUTPUT_GLOBS_SQL, db.ACTIVE_SQL), (task_id, attempt, device_id)).fetchone()
    return None if row is None else output_globs(row)


def device_may_read(connection, device_id, sha256):
    """Whether a task assigned to or running on this device reads the blob
    (an input, its stdin, its checkpoint)."""
    return bool(tasks_reading(connection, device_id, sha256, 1))


def tasks_reading(connection, device_id, sha256, most=MAX_READERS_NAMED):
    """The ids of the tasks assigned to or running on this device that read
    the blob, lowest first, at most `most` of them: those a get serves."""
    # From the device's few active tasks: a blob a map's million tasks all
    # read has a million task_files rows.
    return [row[0] for row in connection.execute(
        "SELECT t.task_id FROM tasks t WHERE t.device_id = ? AND t.%s AND EXISTS"
        " (SELECT 1 FROM task_files f WHERE f.task_id = t.task_id AND f.sha256 = ?"
        " AND f.kind IN ('input', 'checkpoint')) ORDER BY t.task_id LIMIT ?"
        % db.ACTIVE_SQL, (device_id, sha256, most))]


def holds_attempt(connection, device_id, task_id, attempt):
    """The fence of a put: the device holds this attempt now."""
    return connection.execute(
        "SELECT 1 FROM tasks WHERE task_id = ? AND attempt = ? AND device_id = ? AND %s"
        % db.ACTIVE_SQL, (task_id, attempt, device_id)).fetchone() is not None


# A task waiting, queued, for the attempt after one the device held
# (parameter: the device id): its worker's last checkpoint, sent once it
# stopped the task, still counts (may_store), and its answer for that
# attempt ends the next one's wait for it (tasks.release_after_take_back).
QUEUED_AFTER_DEVICES_ATTEMPT = (
    "tasks.state = 'queued' AND EXISTS (SELECT 1 FROM task_events e"
    " WHERE e.task_id = tasks.task_id AND e.attempt = tasks.attempt - 1 AND e.device_id = ?)")


def may_store(connection, device_id, task_id, attempt, name):
    """The fence of a put: the device holds this attempt now; or, for a
    checkpoint only, the attempt was this device's and the task waits,
    queued, for its next one (taken back by `rc drain --now`, a lost
    connection, a lease: the worker's last checkpoint still counts, and no
    later attempt can have read an older one yet)."""
    if holds_attempt(connection, device_id, task_id, attempt):
        return True
    if name != CHECKPOINT_NAME:
        return False
    return connection.execute(
        "SELECT 1 FROM tasks WHERE task_id = ? AND attempt = ? AND "
        + QUEUED_AFTER_DEVICES_ATTEMPT, (task_id, attempt + 1, device_id)).fetchone() is not None


# -- retention (rc-reaper's upkeep, lib/rc/housekeeping.py) -----------------------------

# A blob is still wanted while a task that refers to it has not ended, or
# ended less than the retention ago.
STILL_WANTED = (
    "EXISTS (SELECT 1 FROM task_files r JOIN tasks t ON t.task_id = r.task_id"
    " WHERE r.sha256 = files.sha256 AND (t.state NOT IN (%s) OR t.finished_at >= :cutoff))"
    % db.sql_list(TERMINAL_STATES))


def sweep(connection, config, now):
    """Delete blobs no longer wanted (row first, then the blob: a crash in
    between leaves a file without a row, never the reverse), rows whose task
    was pruned, and partial files of attempts that ended or that are older
    than temp_file_age. Returns how many blobs went."""
    cutoff = now - config.files_retention_days * DAY
    removed = 0
    while True:
        started = time.monotonic()
        with db.write(connection):
            gone = [row[0] for row in connection.execute(
                "SELECT sha256 FROM files WHERE last_used_at < :cutoff AND NOT %s LIMIT :n"
                % STILL_WANTED, {"cutoff": cutoff, "n": SWEEP_CHUNK})]
            connection.executemany("DELETE FROM task_files WHERE sha256 = ?",
                                   [(sha,) for sha in gone])
            connection.executemany("DELETE FROM files WHERE sha256 = ?",
                                   [(sha,) for sha in gone])
            # The files these rows named: a blob placed again from now on is
            # another file, which remove_unrecorded leaves.
            found = blob_inodes(config, gone)
        remove_unrecorded(connection, config, found)
        removed += len(gone)
        if len(gone) < SWEEP_CHUNK:
            break
        db.give_way(time.monotonic() - started)
        db.checkpoint_past(connection)
    drop_orphan_rows(connection)
    removed += drop_orphan_blobs(connection, config, now)
    clean_partials(connection, config, now)
    return removed


ORPHAN_CHECK_TASKS = 1000     # tasks whose task_files rows one sweep checks for a pruned task
_orphans_checked_to = [0]     # the task id the last sweep stopped after


def drop_orphan_rows(connection):
    """Rows whose task is gone. prune_tasks deletes a task's rows with it,
    so these are only what an older version left: each sweep checks the
    next ORPHAN_CHECK_TASKS tasks' rows, by key, going round the table over
    successive sweeps, rather than reading every row once a minute."""
    ids = [row[0] for row in connection.execute(
        "SELECT DISTINCT task_id FROM task_files WHERE task_id > ? ORDER BY task_id LIMIT ?",
        (_orphans_checked_to[0], ORPHAN_CHECK_TASKS))]
    _orphans_checked_to[0] = ids[-1] if len(ids) == ORPHAN_CHECK_TASKS else 0
    if ids:
        connection.execute(
            "DELETE FROM task_files WHERE task_id IN (%s) AND NOT EXISTS"
            " (SELECT 1 FROM tasks t WHERE t.task_id = task_files.task_id)"
            % ",".join("?" * len(ids)), ids)


# The var/files/<aa>/ directory the next sweep starts at: at a random one
# in a new process, so that a reaper restarted more often than a round
# takes (16 sweeps) still comes to every directory in time.
_orphan_blobs_checked_to = [secrets.randbelow(256)]


def drop_orphan_blobs(connection, config, now):
    """Blob files with no row, older than ORPHAN_BLOB_AGE: what a crash
    between placing a blob and committing its row leaves (rc-files, rc-server's
    inline outputs), or between deleting a row and its blob (sweep). Nothing
    else removes them. Each sweep looks through the next ORPHAN_BLOB_DIRS of
    the 256 directories, going round over successive sweeps. Returns how
    many went."""
    start = _orphan_blobs_checked_to[0]
    _orphan_blobs_checked_to[0] = (start + ORPHAN_BLOB_DIRS) % 256
    removed = 0
    for number in range(start, start + ORPHAN_BLOB_DIRS):
        directory = os.path.join(root(config), "%02x" % (number % 256))
        old = old_blob_files(directory, now - ORPHAN_BLOB_AGE)
        names = list(old)
        held = set()
        for first in range(0, len(names), SWEEP_CHUNK):     # within SQLite's bound parameters
            chunk = names[first:first + SWEEP_CHUNK]
            held.update(row[0] for row in connection.execute(
                "SELECT sha256 FROM files WHERE sha256 IN (%s)" % ",".join("?" * len(chunk)),
                chunk))
        removed += remove_unrecorded(connection, config, {
            sha256: inode for sha256, inode in old.items() if sha256 not in held})
    return removed


def blob_inodes(config, hashes):
    """{sha256: inode} of those blobs whose file is there."""
    found = {}
    for sha256 in hashes:
        try:
            found[sha256] = os.lstat(blob_path(config, sha256)).st_ino
        except FileNotFoundError:
            pass
    return found


def remove_unrecorded(connection, config, found):
    """Remove the blob files `found` ({sha256: inode}) that no row names,
    each if it is still the file found (remove_orphan()), inside a write
    transaction: a row written meanwhile (record_present(), which looks for
    the file under the same lock) keeps its file. Returns how many went."""
    removed = 0
    hashes = list(found)
    started = time.monotonic()
    for first in range(0, len(hashes), REMOVE_CHUNK):
        chunk = hashes[first:first + REMOVE_CHUNK]
        if first:
            db.give_way(time.monotonic() - started)
            started = time.monotonic()
        with db.write(connection):
            recorded = {row[0] for row in connection.execute(
                "SELECT sha256 FROM files WHERE sha256 IN (%s)" % ",".join("?" * len(chunk)),
                chunk)}
            removed += sum(remove_orphan(config, os.path.dirname(blob_path(config, sha256)),
                                         sha256, found[sha256])
                           for sha256 in chunk if sha256 not in recorded)
    return removed


def old_blob_files(directory, before):
    """{sha256: inode} of the regular files named as blobs in `directory`
    last written before `before`."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    old = {}
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if is_sha256(entry.name) and stat.S_ISREG(info.st_mode) and info.st_mtime < before:
            old[entry.name] = info.st_ino
    return old


def remove_orphan(config, directory, sha256, inode):
    """Remove the blob file if it is still the one found (`inode`): moved
    aside first, so that a blob placed again meanwhile, which a row is about
    to name, is never the one removed; such a one is put back."""
    aside = os.path.join(partial_dir(config), "orphan-%s-%s" % (sha256, secrets.token_hex(4)))
    try:
        os.rename(os.path.join(directory, sha256), aside)
    except FileNotFoundError:
        return 0
    if os.lstat(aside).st_ino != inode:
        os.replace(aside, os.path.join(directory, sha256))   # the same bytes: its name says so
        return 0
    remove(aside)
    return 1


def put_partial_name(task_id, attempt, name, sha256):
    """The partial file of a put, the same on every try: a cut upload resumes."""
    key = hashlib.sha256(("%s|%s" % (name, sha256)).encode("utf-8", "surrogatepass"))
    return "put-%d-%d-%s" % (task_id, attempt, key.hexdigest()[:32])


def clean_partials(connection, config, now):
    directory = os.path.join(root(config), PARTIAL_DIR)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    active = {(row[0], row[1]) for row in connection.execute(
        "SELECT task_id, attempt FROM tasks WHERE %s" % db.ACTIVE_SQL)}
    removed = 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            stale = os.path.getmtime(path) < now - config.temp_file_age
        except OSError:
            continue
        parts = name.split("-")
        if name.startswith("put-") and len(parts) == 4 and parts[1].isdigit() \
                and parts[2].isdigit():
            # Of an attempt that ended, and not written to for a minute (a
            # late checkpoint may still be on its way in).
            stale = stale or ((int(parts[1]), int(parts[2])) not in active
                              and os.path.getmtime(path) < now - 60)
        elif name.startswith(("upload-", RESERVED_PREFIX)):
            # An HTTP upload in progress writes at least every few seconds;
            # one whose writer was killed is nobody's, and holds quota.
            stale = stale or os.path.getmtime(path) < now - 3600 or (
                os.path.getmtime(path) < now - UNOWNED_UPLOAD_AGE and unowned(path))
        elif name.startswith(("orphan-", "inline-")):
            stale = stale or os.path.getmtime(path) < now - MOMENT_FILE_AGE
        if stale:
            remove(path)
            removed += 1
    return removed


def unowned(path):
    """Whether no process holds the lock a Writer takes on its upload."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
    except OSError:
        return False        # gone meanwhile, or no locks here: left to the hour rule


# -- small files on the worker connection (rc-server) -----------------------------------
# A task's small inputs go out inside its task_assign and its small outputs
# come back inside its task_result (docs/protocol.md, "Small files"): no
# round trip to rc-files. The bytes are checked and stored as rc-files
# checks and stores them; rc-server records the rows with the result.

def read_small(config, sha256, size):
    """The bytes of a blob the store holds at exactly `size` bytes, or None
    (then the worker asks rc-files, which says what is wrong). Read by its
    path, no row looked up: the task's inputs were checked against the
    store at submit (attach_inputs), the worker checks the bytes against
    their sha256, and a blob swept since is simply not there."""
    try:
        descriptor = os.open(blob_path(config, sha256), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(descriptor).st_size != size:
            return None
        data = os.read(descriptor, size + 1)    # one past: a file that grew meanwhile
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return data if len(data) == size else None


def input_refs(payload):
    """(sha256, size) of every blob a task reads: inputs, stdin, checkpoint."""
    refs = [(item.get("sha256"), item.get("size")) for item in payload.get("inputs") or ()
            if isinstance(item, dict)]
    refs += [(ref.get("sha256"), ref.get("size")) for ref in
             (payload.get("stdin"), payload.get("checkpoint")) if isinstance(ref, dict)]
    return refs


def inline_inputs(config, refs, known, budget):
    """The task_assign "files_inline" of a task and the bytes that follow
    it: of `refs` (input_refs of its payload), each distinct blob of at
    most INLINE_FILE_BYTES that the device is not known to hold (`known`,
    sha256s), ([{"sha256", "size"}], their bytes one after the other) while
    those sum to at most `budget`. What is left out the worker fetches from
    rc-files as before."""
    entries, blobs, taken = [], [], set()
    for sha256, size in refs:
        if sha256 in taken or sha256 in known or not is_sha256(sha256) \
                or not isinstance(size, int) or not 0 < size <= min(INLINE_FILE_BYTES, budget):
            continue
        data = read_small(config, sha256, size)
        if data is None:
            continue
        taken.add(sha256)
        budget -= size
        entries.append({"sha256": sha256, "size": size})
        blobs.append(data)
    return entries, b"".join(blobs)


def check_inline_outputs(connection, globs, entries, raw, reserve):
    """rc-server's loop's part of storing the task_result "files_inline" of
    (a task's attempt the device holds) and the raw bytes that followed it,
    each entry's `size` of them in turn: what needs the database, read on
    the loop's own connection, whose pages are warm (a thread's connection
    reads them anew after each of the loop's writes). Each file is checked
    as rc-files checks a put: a name the task's --output globs match, or its
    stdout/stderr; a size within INLINE_FILE_BYTES; a sha256 of the right
    form; and, unless the store holds the blob, room in the quota and on the
    disk (`reserve(size)`, which also counts the bytes placed but not
    recorded yet). Returns (plan [(index, entry, its bytes, held)] for
    write_inline_outputs, notes {index: why that file was refused})."""
    problem = inline_problem(entries, raw)
    if problem:
        return [], {-1: "rc-server: no inline file stored: %s" % problem}
    plan, notes, offset, view = [], {}, 0, memoryview(raw)
    for index, entry in enumerate(entries):
        data, offset = view[offset:offset + entry["size"]], offset + entry["size"]
        try:
            check_inline_name(globs, entry.get("name"))
            if not is_sha256(entry.get("sha256")):
                raise FileStoreError("bad_request", "sha256 %r is not 64 lower-case hex digits"
                                     % (str(entry.get("sha256"))[:80],))
            held = exists(connection, entry["sha256"])
            if not held:
                reserve(len(data))
        except FileStoreError as e:
            notes[index] = refused_note(entry, e)
            continue
        plan.append((index, entry, data, held))
    return plan, notes


def write_inline_outputs(config, plan, notes):
    """rc-server's loop's second part: each planned file's bytes hashed and
    compared with the sha256 claimed (also for a blob the store holds: the
    device must have its bytes), and, unless held, written to a partial
    file and renamed into place, not synced yet (rc-server's OutputStore
    syncs them off the loop, sync_placed, before any row names them: a
    crash between leaves a blob with no row, which the sweep removes; a
    row never names a blob that is not on the disk). Returns (stored
    [(name, sha256, size, its InlineBlob)] whose rows the caller writes
    with the result once synced, notes {index: why that file was refused}, unsynced
    [((descriptor, directory) for sync_placed, index, name)])."""
    stored, names, unsynced = [], set(), []
    try:
        for index, entry, data, held in plan:
            name, sha256 = entry["name"], entry["sha256"]
            try:
                if name in names:
                    raise FileStoreError("bad_name", "given twice")
                got = hashlib.sha256(data).hexdigest()
                if got != sha256:
                    raise FileStoreError("hash_mismatch", "expected %s got %s" % (sha256, got))
                if not held:
                    unsynced.append((write_unsynced(config, data, sha256), index, name))
            except FileStoreError as e:
                notes[index] = refused_note(entry, e)
                continue
            names.add(name)
            stored.append((name, sha256, len(data), InlineBlob(config, data, sha256)))
    except BaseException:
        for (descriptor, _), _, _ in unsynced:
            os.close(descriptor)
        raise
    return stored, notes, unsynced


def write_unsynced(config, data, sha256):
    """Bytes whose SHA-256 the caller checked, into place as the blob:
    (its open descriptor, its directory) for sync_placed."""
    path = partial_path(config, "inline-%s" % secrets.token_hex(16))
    try:
        descriptor = create_in(path, lambda path: os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise disk_error(e)
    try:
        view, written = memoryview(data), 0
        while written < len(data):
            written += os.write(descriptor, view[written:])
        target = blob_path(config, sha256)
        move_into_place(path, target)
    except OSError as e:
        os.close(descriptor)
        remove(path)
        raise disk_error(e)
    return descriptor, os.path.dirname(target)


def sync_placed(placed):
    """What write_inline_outputs placed, made durable: each file fsynced
    and closed, then each directory they went into (once). Returns, for
    each of `placed` [(descriptor, directory)], None or why it is not."""
    errors, directories = [], {}
    for number, (descriptor, directory) in enumerate(placed):
        try:
            os.fsync(descriptor)
            errors.append(None)
        except OSError as e:
            errors.append(disk_error(e))
        finally:
            os.close(descriptor)
        directories.setdefault(directory, []).append(number)
    for directory, numbers in directories.items():
        try:
            fsync_directory(directory)
        except OSError as e:
            for number in numbers:
                errors[number] = errors[number] or disk_error(e)
    return errors


def place_bytes(config, data, sha256):
    """Bytes whose SHA-256 the caller checked into the store, durable
    (written, fsynced, renamed): not hashed a second time."""
    error = sync_placed([write_unsynced(config, data, sha256)])[0]
    if error is not None:
        raise error


class InlineBlob:
    """The bytes of an inline output, kept until its row is written: the
    sweep may remove a blob the store held when it was checked (or one
    just placed) before that, and then they are placed again."""

    def __init__(self, config, data, sha256):
        self.config, self.data, self.sha256 = config, data, sha256

    def record(self, connection, size, now):
        """Its row, inside the caller's write transaction (record_present())."""
        try:
            record_present(connection, self.config, self.sha256, size, now)
        except FileStoreError:
            place_bytes(self.config, self.data, self.sha256)
            record_present(connection, self.config, self.sha256, size, now)


def refused_note(entry, error):
    return "rc-server: output %r not stored: %s" % (str(entry.get("name"))[:200], error)


def inline_problem(entries, raw):
    """Why a task_result's files_inline cannot be read at all, or None: the
    entries must say where each file's bytes are, and hold them all."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return "files_inline must be a list of objects"
    sizes = [entry.get("size") for entry in entries]
    if not all(isinstance(size, int) and not isinstance(size, bool)
               and 0 <= size <= INLINE_FILE_BYTES for size in sizes):
        return "each size must be a whole number from 0 to %d" % INLINE_FILE_BYTES
    if len(entries) > INLINE_MAX_FILES or len(raw) > INLINE_TOTAL_BYTES:
        return "%d files of %d bytes in one result, over the %d files or %d bytes allowed" \
            % (len(entries), len(raw), INLINE_MAX_FILES, INLINE_TOTAL_BYTES)
    if sum(sizes) != len(raw):
        return "their sizes add up to %d bytes, not the %d sent" % (sum(sizes), len(raw))
    return None


def check_inline_name(globs, name):
    """FileStoreError unless a device may store an inline file of this name
    for a task with these --output globs (held_output_globs): its stdout or
    stderr, or a path one of the globs matches (a checkpoint goes to rc-files)."""
    if name in STREAM_NAMES:
        return
    problem = path_problem(name) if name != CHECKPOINT_NAME else \
        "is a checkpoint, which goes to rc-files"
    if problem:
        raise FileStoreError("bad_name", "the name %s" % problem)
    if not globs_match(globs, name):
        raise FileStoreError("bad_name", "no --output glob of the task matches it")


def record_inline_outputs(connection, task_id, attempt, stored, holds, now):
    """The rows of a result's inline files, in the result's transaction: each
    blob's (placed again if the sweep removed it meanwhile), and the task's
    when the device still holds the attempt (`holds`): an output or a
    stream, never a checkpoint (those go to rc-files), so add_task_file's
    other work is not needed. A file that cannot be placed again (a full
    disk) gets no rows: the result says nothing of a file it lacks."""
    for name, sha256, size, blob in stored:
        try:
            blob.record(connection, size, now)    # its last_used_at is now: nothing more
        except (FileStoreError, OSError):         # not the result's other rows' fault
            continue
        if holds:
            insert_task_file(connection, task_id, attempt,
                             STREAM if name in STREAM_NAMES else OUTPUT, name, sha256, size, now)


# -- what devices hold ------------------------------------------------------------------

def input_hashes(connection, task_id):
    return {row[0]: row[1] for row in connection.execute(
        "SELECT sha256, size FROM task_files WHERE task_id = ? AND kind = 'input'",
        (task_id,))}

