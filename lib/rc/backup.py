"""`rc backup FILE`: a consistent copy of the live database.

SQLite's online backup API copies every page in one step, inside one read
transaction: the copy is the database as it was when that transaction
began, whatever the programs commit meanwhile (WAL mode lets them go on
writing). It is written beside FILE as FILE.partial, checked with
`PRAGMA integrity_check`, and only then renamed to FILE, so FILE is never
half a database.

A backup is written owner-only and never holds a device secret in clear:
secrets are sealed with var/device_key (lib/rc/device_secrets.py), which is
not in the database, so a backup alone cannot log in as any device. The
other side of that: restored onto a main node with another device_key, the
devices join again with the join token (or copy the old node's device_key
across before starting, and they keep their identities).
"""
import contextlib
import fcntl
import os
import sqlite3

from rc import db, device_secrets

REJOIN_NOTICE = (
    "%(devices_to_rejoin)d devices in the backup were sealed with another main node's"
    " device key, not %(key)s: they join again with this node's join token (`rc token`)"
    " when they next connect. To keep their identities instead, copy the old node's"
    " device_key over %(key)s before `make run`.\n")


class BackupError(Exception):
    pass


@contextlib.contextmanager
def partial_file(path, command):
    """PATH.partial, empty and owner-only (whatever the umask), held with a
    lock while it is written and until it is renamed to PATH; removed if
    that fails. A second command writing PATH meanwhile (a cron backup and
    one by hand) is refused: it removed the first's partial file, and both
    failed with 'disk I/O error'."""
    partial = path + ".partial"
    try:
        descriptor = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:            # no such directory (a USB disk not mounted), no access
        raise BackupError("cannot write %s: %s" % (path, e.strerror))
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BackupError("another `rc %s` is writing %s now; wait for it" % (command, path))
        try:
            os.fchmod(descriptor, 0o600)
            os.ftruncate(descriptor, 0)        # what a killed one left
            yield partial
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
    finally:
        os.close(descriptor)     # after SQLite's own connection to it: see its POSIX locks


def backup(source_path, target_path, overwrite=False):
    """Copy the database at source_path to target_path; returns a summary."""
    target_path = os.path.abspath(target_path)
    if os.path.isdir(target_path):
        raise BackupError("%s is a directory; name the file to write" % target_path)
    if os.path.exists(target_path) and not overwrite:
        raise BackupError("%s exists; pass --force to replace it" % target_path)
    if not os.path.exists(source_path):
        raise BackupError("no database at %s" % source_path)
    if is_live_file(target_path, source_path):
        # The programs would go on writing to the file unlinked: --force or not.
        raise BackupError("%s is the live database; name a file elsewhere (to put a backup"
                          " in its place, `make stop` then `rc restore FILE`)" % target_path)
    with partial_file(target_path, "backup") as partial:
        source = db.connect(source_path)
        try:
            target = sqlite3.connect(partial, isolation_level=None)   # autocommit: VACUUM below
            try:
                try:
                    source.backup(target)           # all pages in one step: one snapshot
                    # A single file is easier to carry about than a WAL database.
                    target.execute("PRAGMA journal_mode=DELETE")
                    drop_clear_secrets(target)
                except sqlite3.OperationalError as e:   # a full disk: which one?
                    raise BackupError("cannot write %s: %s" % (target_path, e))
                summary = describe(target)
            finally:
                target.close()
        finally:
            source.close()
        if summary["integrity"] != "ok":
            raise BackupError("the copy failed its integrity check: %s" % summary["integrity"])
        os.replace(partial, target_path)
    summary["path"] = target_path
    summary["bytes"] = os.path.getsize(target_path)
    return summary


def is_live_file(path, db_path):
    """Whether path is the database at db_path, or its -wal, -shm or
    -journal, by another name (a link) too."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        live = db_path + suffix
        if os.path.realpath(path) == os.path.realpath(live):
            return True
        try:
            if os.path.samefile(path, live):
                return True
        except OSError:         # either is not there
            pass
    return False


def drop_clear_secrets(connection):
    """rc-server seals any secret an older version kept in clear as it
    starts; one that is in clear all the same is left out of the copy (that
    device joins again), and the copy rebuilt so no free page keeps it."""
    if connection.execute("UPDATE devices SET secret = NULL WHERE secret IS NOT NULL").rowcount:
        connection.execute("VACUUM")


def describe(connection):
    rows = [row[0] for row in connection.execute("PRAGMA integrity_check")]
    return {"integrity": "ok" if rows == ["ok"] else "; ".join(rows[:5]),
            "schema_version": connection.execute("PRAGMA user_version").fetchone()[0],
            "tasks": connection.execute("SELECT count(*) FROM tasks").fetchone()[0],
            "devices": connection.execute("SELECT count(*) FROM devices").fetchone()[0]}


def restore(backup_path, db_path, device_key=None):
    """Put a backup in place of the database; only while nothing runs
    (`make stop` first): the -wal and -shm files of the old one go too.
    Given this node's device key, seals what an older backup holds in
    clear and counts the devices whose seal it cannot open (they rejoin)."""
    if not os.path.exists(backup_path):
        raise BackupError("no backup at %s" % backup_path)
    if os.path.isdir(backup_path):
        raise BackupError("%s is a directory; name the backup file" % backup_path)
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    # Copied by SQLite, not byte by byte: a copy an admin made of a live
    # database (`cp rc.db* /mnt/usb/`) holds its latest commits in a -wal
    # beside it, which the count below reads and a byte copy left behind.
    import urllib.parse     # here: 4 ms of every other rc command's start
    # Quoted: a name with '#' or '?' ("rc #2.db") opened the file before it.
    check = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(backup_path)),
                            uri=True)
    try:
        try:
            summary = describe(check)
        except sqlite3.DatabaseError as e:      # "file is not a database": which file?
            raise BackupError("%s is not a backup: %s" % (backup_path, e))
        if summary["integrity"] != "ok":
            raise BackupError("%s fails its integrity check: %s"
                              % (backup_path, summary["integrity"]))
        if summary["schema_version"] > db.SCHEMA_VERSION:
            raise BackupError("%s has schema %d, newer than this code's %d"
                              % (backup_path, summary["schema_version"], db.SCHEMA_VERSION))
        with partial_file(db_path, "restore") as partial:
            target = sqlite3.connect(partial, isolation_level=None)
            try:
                check.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.OperationalError as e:       # a full disk: which one?
                raise BackupError("cannot write %s: %s" % (db_path, e))
            finally:
                target.close()
            for suffix in ("-wal", "-shm"):
                if os.path.exists(db_path + suffix):
                    os.remove(db_path + suffix)
            os.replace(partial, db_path)
    finally:
        check.close()
    connection = db.open_database(db_path)      # upgrades an older backup's schema
    try:
        if device_key is not None:
            device_secrets.seal_clear_secrets(connection, device_key)
            summary["devices_to_rejoin"] = len(device_secrets.unopenable(connection, device_key))
    finally:
        connection.close()
    summary["path"] = db_path
    return summary
