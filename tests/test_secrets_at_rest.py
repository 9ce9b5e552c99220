"""Secrets at rest on the main node (issue 17, item 3), against a real
cluster: nothing under the state directory is readable by another user,
an install an older version left readable is fixed by the next `make run`,
and the database and its backups hold no device secret a thief could use,
while devices that joined before the upgrade keep connecting."""
import glob
import json
import os
import random
import re
import shutil
import stat

import pytest

import schema_fixture
from cluster_harness import Cluster, online, wait_for
from hostile_harness import assert_completes, readable_by_others, submit_to
from rc import audit, db, device_secrets, protocol

pytestmark = pytest.mark.e2e

LAPTOP = "laptop"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("secrets"))
    cluster.start()
    cluster.start_worker(LAPTOP)
    cluster.local = cluster.db.execute(
        "SELECT device_id FROM devices WHERE device_id LIKE '%-local'").fetchone()[0]
    wait_for(lambda: {LAPTOP, cluster.local} <= online(cluster), 30, "both workers")
    cluster.outside = tmp_path_factory.mktemp("outside")     # where a user keeps backups
    yield cluster
    cluster.stop()


def device_secrets_held(cluster):
    """device id -> the secret each worker keeps in its own state directory."""
    cluster_id = open(cluster.config.cluster_id_path).read().strip()
    found = {}
    for path in glob.glob(os.path.join(cluster.home, "**", cluster_id, "*.secret"),
                          recursive=True):
        found[os.path.basename(path)[:-len(".secret")]] = open(path).read().strip()
    return found


def files_holding(paths, secret):
    """Those of `paths` with the secret in them, as hex text or as bytes."""
    return [path for path in paths if copies_in([path], secret)]


def copies_in(paths, secret):
    needles = (secret.encode(), secret.upper().encode(), bytes.fromhex(secret))
    count = 0
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            count += sum(data.count(needle) for needle in needles)
    return count


def database_files(cluster):
    return [cluster.config.db_path + suffix for suffix in ("", "-wal", "-shm")]


def run_tasks_on_both(cluster):
    for device_id in (LAPTOP, cluster.local):
        assert_completes(cluster, submit_to(cluster, device_id, "echo hello > out; cat out"),
                         "hello")


def actors_since(cluster, lines_before, event):
    """Who the audit log names for `event` past its first `lines_before` lines."""
    return {line["actor"] for line in audit.read(cluster.config)[lines_before:]
            if line["event"] == event}


def wait_for_actors(cluster, lines_before, event, devices):
    """rc-server writes a register's audit line once its transaction has
    committed: a moment after online() sees the device."""
    wait_for(lambda: actors_since(cluster, lines_before, event) >= set(devices), 10,
             "%s audit lines for %s" % (event, ", ".join(sorted(devices))))


def undo_migrations_after(connection, version):
    """Take the devices table back to schema `version`: drop what the later
    migrations added to it (columns and triggers), and their columns of
    other tables (health_probe's, migration 18)."""
    later = "\n".join(db.MIGRATIONS[version:])
    for trigger in re.findall(r"CREATE TRIGGER (?:IF NOT EXISTS )?(\w+)", later):
        connection.execute("DROP TRIGGER IF EXISTS %s" % trigger)
    # An index on a later column would stop its DROP COLUMN (tasks_ready, 23).
    for index in re.findall(r"CREATE INDEX (?:IF NOT EXISTS )?(\w+) ON", later):
        connection.execute("DROP INDEX IF EXISTS %s" % index)
    for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", later):
        connection.execute("ALTER TABLE %s DROP COLUMN %s" % (table, column))


def restart(cluster, while_stopped=lambda: None):
    """`make stop`, something done to the stopped node, `make run`; the
    output of `make run` (rc init says there what it changed)."""
    cluster.stop()
    while_stopped()
    started = cluster.make("run")
    assert started.returncode == 0, started.stdout
    cluster.db = db.connect(cluster.config.db_path)
    cluster.start_worker(LAPTOP)
    wait_for(lambda: {LAPTOP, cluster.local} <= online(cluster), 30, "both workers back")
    return started.stdout


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def proof_refused(cluster, device_id, key):
    """Whether rc-server refuses a register proved with `key` as the
    device's own secret (auth_failed), as a thief with the database would try."""
    sock = cluster.connect()
    reader = sock.makefile("rb")
    try:
        hello = json.loads(reader.readline())
        mine = protocol.new_nonce()
        sock.sendall(protocol.encode("register", {
            "device_id": device_id, "protocol": 1, "nonce": mine, "auth": "device",
            "proof": protocol.worker_proof(key, hello["data"]["nonce"], mine, device_id)},
            sender_id=device_id))
        reply = json.loads(reader.readline())
    finally:
        reader.close()
        sock.close()
    return reply["message_type"] == "error" and reply["data"]["code"] == "auth_failed"


# -- the seal, alone ------------------------------------------------------------------


def test_a_seal_opens_only_with_its_key_and_for_its_device():
    key, other_key = os.urandom(32), os.urandom(32)
    secret = protocol.new_device_secret()
    sealed = device_secrets.seal(key, "pi", secret)
    assert secret not in sealed and device_secrets.seal(key, "pi", secret) != sealed
    assert device_secrets.unseal(key, "pi", sealed) == secret
    assert device_secrets.unseal(other_key, "pi", sealed) is None
    assert device_secrets.unseal(key, "other-pi", sealed) is None
    nonce, ciphertext, tag = sealed.split(".")
    flipped = "%s.%s%x.%s" % (nonce, ciphertext[:-1], int(ciphertext[-1], 16) ^ 1, tag)
    for damaged in (flipped, sealed[:-2], "", "a.b.c", secret, None, 7):
        assert device_secrets.unseal(key, "pi", damaged) is None, damaged


def test_clear_secrets_an_older_version_left_are_sealed_and_leave_no_copy(tmp_path):
    """Even where SQLite keeps freed bytes (built without SECURE_DELETE)."""
    path = str(tmp_path / "rc.db")
    old = schema_fixture.load(path)
    old.execute("PRAGMA secure_delete=OFF")
    secrets_by_device = {"pi%d" % n: protocol.new_device_secret() for n in range(8)}
    for device_id, secret in secrets_by_device.items():
        old.execute("INSERT INTO devices(device_id, secret, revoked, registered_at, last_seen)"
                    " VALUES (?, ?, ?, 1, 1)", (device_id, secret, int(device_id == "pi7")))
    sizes = random.Random(3)
    for _ in range(300):   # heartbeats rewrite rows (long ones spill onto pages of their own)
        old.execute("UPDATE devices SET metrics = ? WHERE device_id = ?",
                    (json.dumps({"pad": "x" * sizes.randint(1000, 6000)}),
                     sizes.choice(sorted(secrets_by_device))))
    old.close()
    assert sum(copies_in([path], s) for s in secrets_by_device.values()) > 8
    connection = db.open_database(path)
    connection.execute("PRAGMA secure_delete=OFF")
    key = os.urandom(32)
    assert device_secrets.seal_clear_secrets(connection, key) == 8
    assert device_secrets.seal_clear_secrets(connection, key) == 0       # once is enough
    stored = dict(connection.execute("SELECT device_id, sealed_secret FROM devices"
                                     " WHERE secret IS NULL").fetchall())
    connection.close()
    for device_id, secret in secrets_by_device.items():
        assert copies_in([path, path + "-wal"], secret) == 0, device_id
        opened = device_secrets.unseal(key, device_id, stored[device_id])
        assert opened == (None if device_id == "pi7" else secret)    # pi7 was revoked


# -- files ------------------------------------------------------------------------


def test_nothing_under_the_state_directory_is_readable_by_others(cluster):
    run_tasks_on_both(cluster)
    assert cluster.rc("backup", os.path.join(cluster.home, "kept.db")).returncode == 0
    assert readable_by_others(cluster.home) == []
    # SQLite gives its -wal and -shm files the database file's own mode.
    for path in database_files(cluster) + [os.path.join(cluster.home, "kept.db")]:
        assert mode(path) == 0o600, path
    for name in ("device_key", "token", "admin_token", "tls/cert.pem", "tls/key.pem",
                 "log/rc-server.log", "log/supervisord.log", "log/audit.log"):
        assert mode(os.path.join(cluster.home, name)) == 0o600, name


def test_an_install_left_readable_is_made_private_by_the_next_run(cluster, tmp_path):
    elsewhere = tmp_path / "not-ours.txt"
    elsewhere.write_text("a file a symlink in the state directory points at")
    elsewhere.chmod(0o644)
    os.symlink(str(elsewhere), os.path.join(cluster.home, "link"))
    for directory, names, files in os.walk(cluster.home):     # as an older version left it
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o644)
    assert len(readable_by_others(cluster.home)) > 10
    output = restart(cluster)
    assert "now owner-only" in output
    assert readable_by_others(cluster.home) == []
    assert mode(str(elsewhere)) == 0o644          # a symlink is not followed
    os.remove(os.path.join(cluster.home, "link"))
    run_tasks_on_both(cluster)


# -- device secrets -------------------------------------------------------------------


def test_neither_the_database_nor_a_backup_holds_a_device_secret(cluster):
    held = device_secrets_held(cluster)
    assert set(held) == {LAPTOP, cluster.local}
    backup = str(cluster.outside / "rc-backup.db")
    assert cluster.rc("backup", backup).returncode == 0
    assert mode(backup) == 0o600
    for device_id, secret in held.items():
        assert files_holding(database_files(cluster) + [backup], secret) == [], device_id
    clear = cluster.db.execute("SELECT count(*) FROM devices WHERE secret IS NOT NULL")
    assert clear.fetchone()[0] == 0


def test_what_a_stolen_database_holds_proves_no_device(cluster):
    stolen = str(cluster.outside / "stolen.db")
    assert cluster.rc("backup", stolen).returncode == 0
    copy = db.connect(stolen)
    row = copy.execute("SELECT secret, sealed_secret FROM devices WHERE device_id = ?",
                       (LAPTOP,)).fetchone()
    copy.close()
    assert row["secret"] is None
    sealed = row["sealed_secret"]
    ciphertext = sealed.split(".")[1]         # as long as a secret: the best guess
    assert len(ciphertext) == len(device_secrets_held(cluster)[LAPTOP])
    assert proof_refused(cluster, LAPTOP, sealed)
    assert proof_refused(cluster, LAPTOP, ciphertext)
    # The secret the worker holds is what proves it, and it still does.
    assert not proof_refused(cluster, LAPTOP, device_secrets_held(cluster)[LAPTOP])
    wait_for(lambda: LAPTOP in online(cluster), 30, "the laptop to reconnect")
    run_tasks_on_both(cluster)


def test_devices_that_joined_before_the_upgrade_keep_connecting(cluster):
    held = device_secrets_held(cluster)

    def as_an_older_version_left_it():
        old = db.connect(cluster.config.db_path)
        # As SQLite writes where it is built without SECURE_DELETE (Debian's
        # has it; macOS's and python.org's do not): freed space keeps its bytes.
        old.execute("PRAGMA secure_delete=OFF")
        undo_migrations_after(old, 4)
        for device_id, secret in held.items():
            old.execute("UPDATE devices SET secret = ? WHERE device_id = ?", (secret, device_id))
        sizes = random.Random(17)
        for _ in range(200):     # rewritten rows (long ones spill onto pages of their own)
            old.execute("UPDATE devices SET metrics = ? WHERE device_id = ?",
                        (json.dumps({"pad": "x" * sizes.randint(1000, 6000)}),
                         sizes.choice(sorted(held))))
        old.execute("PRAGMA user_version=4")
        old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        old.close()
        stale = sum(copies_in(database_files(cluster), secret) for secret in held.values())
        assert stale > len(held)         # the case to fix: more than the rows themselves

    joined_before = len(audit.read(cluster.config))
    output = restart(cluster, as_an_older_version_left_it)
    assert "2 device secrets were in the database in clear; now sealed" in output
    assert device_secrets_held(cluster) == held        # no device had to join again
    wait_for_actors(cluster, joined_before, "device_connected", held)
    assert not actors_since(cluster, joined_before, "device_joined")
    for device_id, secret in held.items():
        assert files_holding(database_files(cluster), secret) == [], device_id
    run_tasks_on_both(cluster)
    assert readable_by_others(cluster.home) == []


def test_restored_onto_a_node_with_another_device_key_devices_join_again(cluster):
    held = device_secrets_held(cluster)
    backup = str(cluster.outside / "before-the-move.db")
    said = {}

    def restore_with_a_new_key():
        os.remove(os.path.join(cluster.home, "device_key"))
        said["restore"] = cluster.rc("restore", backup).stdout

    def all_renewed():
        # A worker writes its new secret just after the main node records its
        # join (which is all online() sees), over the old one: until then
        # the file holds the secret the moved database can no longer open.
        found = device_secrets_held(cluster)
        return found if set(found) == set(held) and all(
            found[d] != held[d] for d in held) else None

    try:
        assert cluster.rc("backup", backup).returncode == 0
        joined_before = len(audit.read(cluster.config))
        restart(cluster, restore_with_a_new_key)
        assert "2 devices in the backup were sealed with another main node's device key" \
            in said["restore"]
        wait_for_actors(cluster, joined_before, "device_joined", held)
        wait_for(all_renewed, 10, "both workers' new secrets")
        run_tasks_on_both(cluster)
    finally:
        shutil.rmtree(str(cluster.outside))
