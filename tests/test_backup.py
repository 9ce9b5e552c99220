"""`rc backup` while a real cluster runs 500 tasks: the copy passes
`PRAGMA integrity_check` and holds every task committed before it began;
`rc restore` puts it in place of a stopped cluster's database."""
import os
import sqlite3
import subprocess
import threading

import pytest

from cluster_harness import RC, Cluster, online, wait_all_finished, wait_for
from rc import backup, db, tasks
from rc import config as config_module

pytestmark = pytest.mark.e2e


def submit_500(cluster):
    ids = []
    for n in range(500):
        if n % 2:
            ids.append(tasks.submit(cluster.db, cluster.config, "sleep", {"seconds": 0.02}))
        else:
            ids.append(tasks.submit(cluster.db, cluster.config, "shell",
                                    {"command": "echo %d" % n}))
    return ids


def test_backup_under_load_holds_every_committed_task(tmp_path):
    cluster = Cluster(tmp_path / "cluster")
    cluster.start()
    try:
        cluster.start_worker("b1", "--slots", "4")
        cluster.start_worker("b2", "--slots", "4")
        wait_for(lambda: {"b1", "b2"} <= online(cluster), 30, "two workers")
        ids = submit_500(cluster)
        wait_for(lambda: tasks.counts_by_state(cluster.db)["completed"] >= 20, 60,
                 "the tasks to be running")
        # More tasks keep arriving while the backup is taken.
        stop = threading.Event()
        later = []

        def keep_submitting():
            connection = db.connect(cluster.config.db_path)
            while not stop.is_set():
                later.append(tasks.submit(connection, cluster.config, "echo", {"message": "x"}))
            connection.close()
        submitter = threading.Thread(target=keep_submitting)
        submitter.start()
        try:
            wait_for(lambda: len(later) > 10, 30, "submits during the backup")
            committed = {row[0]: row[1] for row in cluster.db.execute(
                "SELECT task_id, state FROM tasks")}
            target = str(tmp_path / "copy.db")
            before = len(later)
            done = cluster.rc("backup", target)
            during = len(later) - before
        finally:
            stop.set()
            submitter.join()
        # Tasks kept coming while it was taken (whether the workers kept up or not).
        assert during > 0, "the load was over before"
        assert "integrity ok" in done.stdout
        copy = sqlite3.connect(target)
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        copied = {row[0]: row[1] for row in copy.execute("SELECT task_id, state FROM tasks")}
        assert set(committed) <= set(copied)
        # Each task is in the copy at its state then or a later one.
        order = ["queued", "assigned", "running"]
        for task_id, state in committed.items():
            if state in order and copied[task_id] in order:
                assert order.index(copied[task_id]) >= order.index(state) or \
                    copied[task_id] == "queued"     # a retry goes back to queued
            elif state not in order:
                assert copied[task_id] == state
        # Every task's events came along with it.
        assert copy.execute("SELECT count(*) FROM tasks t WHERE NOT EXISTS"
                            " (SELECT 1 FROM task_events e WHERE e.task_id = t.task_id)"
                            ).fetchone()[0] == 0
        copy.close()
        assert cluster.rc("backup", target, check=False).returncode == 1   # no overwrite
        cluster.rc("backup", "--force", target)
        wait_all_finished(cluster, ids + later, 180)
    finally:
        cluster.stop()

    # Restore into another state directory, as after losing the first disk.
    home = str(tmp_path / "restored")
    env = dict(os.environ, RC_HOME=home, RC_CONFIG=str(tmp_path / "none.json"))
    restored = subprocess.run([RC, "restore", target], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
    assert restored.returncode == 0, restored.stderr
    config = config_module.load(environ=env)
    connection = db.connect(config.db_path)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert set(committed) <= {row[0] for row in connection.execute("SELECT task_id FROM tasks")}
    connection.close()


def test_restore_and_backup_refuse_what_they_cannot_use(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises((backup.BackupError, sqlite3.DatabaseError)):
        backup.restore(str(bad), str(tmp_path / "db" / "rc.db"))
    with pytest.raises(backup.BackupError, match="no database"):
        backup.backup(str(tmp_path / "missing.db"), str(tmp_path / "x.db"))
    with pytest.raises(backup.BackupError, match="directory"):
        backup.backup(str(tmp_path / "missing.db"), str(tmp_path))


def test_a_secret_left_in_clear_stays_out_of_the_copy(tmp_path):
    """A database an older version left (a clear devices.secret that no
    rc-server start has sealed yet) still backs up, without that secret."""
    source = str(tmp_path / "rc.db")
    connection = db.open_database(source)
    connection.execute("INSERT INTO devices(device_id, secret, registered_at, last_seen)"
                       " VALUES ('pi', 'clear-secret-17', 1, 1)")
    connection.close()
    copy = str(tmp_path / "copy.db")
    backup.backup(source, copy)
    with open(copy, "rb") as f:
        assert b"clear-secret-17" not in f.read()
    assert os.stat(copy).st_mode & 0o077 == 0
