"""Operations features under an admin's mistakes, attacks and crashes
(session 48): backups and restores, upgrades, environments, schedules,
services and device logs. Each test is one fault found, and its fix."""
import os
import shutil
import sqlite3
import subprocess

import pytest

from cluster_harness import RC
from rc import db, tasks


def rc(*args):
    """The rc command on the cluster_home fixture's RC_HOME."""
    return subprocess.run([RC] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


# -- rc restore -------------------------------------------------------------------------

def test_a_restore_from_a_copy_with_its_wal_keeps_what_the_wal_holds(cluster_home, tmp_path):
    """An admin's own copy of a live database (`cp var/db/rc.db* /mnt/usb/`)
    is a main file and a -wal beside it holding the latest commits. restore
    counted the tasks through the WAL ("5 tasks") but copied the main file's
    bytes alone: the restored database held none of them."""
    config, connection = cluster_home
    connection.execute("PRAGMA wal_autocheckpoint=0")     # the commits stay in the WAL
    ids = [tasks.submit(connection, config, "echo", {"message": str(n)}) for n in range(5)]
    usb = tmp_path / "usb"
    usb.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(config.db_path + suffix, str(usb / "rc.db") + suffix)
    connection.close()       # the main node stopped (its WAL checkpointed)
    done = rc("restore", str(usb / "rc.db"))
    assert done.returncode == 0, done.stderr
    assert "5 tasks" in done.stdout
    restored = db.connect(config.db_path)
    try:
        assert sorted(row[0] for row in restored.execute("SELECT task_id FROM tasks")) \
            == sorted(ids)
    finally:
        restored.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_rc_backup_force_never_writes_over_the_live_database(cluster_home, suffix):
    """`rc backup --force var/db/rc.db` (restore's arguments, typed for
    backup) put the copy in place of the live database, or of its -wal:
    the running programs went on writing to the file unlinked, and what
    they committed was gone for every later reader."""
    config, connection = cluster_home
    connection.execute("PRAGMA wal_autocheckpoint=0")
    before = os.stat(config.db_path + suffix).st_ino
    done = rc("backup", "--force", config.db_path + suffix)
    assert done.returncode != 0
    assert "the live database" in done.stderr
    assert os.stat(config.db_path + suffix).st_ino == before
    task_id = tasks.submit(connection, config, "echo", {"message": "after"})
    later = db.connect(config.db_path)
    try:
        assert later.execute("SELECT count(*) FROM tasks WHERE task_id = ?",
                             (task_id,)).fetchone()[0] == 1
    finally:
        later.close()
