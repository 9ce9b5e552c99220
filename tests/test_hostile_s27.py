"""Session 27's attacks on a running main node (127.0.0.1 only): a device
that joined with the token (it holds its own secret and the tasks it is
given), and what it can reach through rc-files, rc-web's streams and the
client. After each attack the programs keep their pids and a good worker's
tasks complete (hostile_harness.unharmed)."""
import hashlib
import json
import os

import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import readable_by_others, unharmed
from rc import files
from test_files_hostile import ask, authenticated
from test_hostile_round23 import HostileDevice, ended

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("hostile-s27"), auth_timeout=2.0)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker("good", "--slots", "2")
        wait_for(lambda: "good" in online(cluster), 30, "the good worker")
        cluster.token = open(cluster.config.token_path).read().strip()
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        cluster.secrets = {}
        yield cluster
    finally:
        cluster.stop()
    assert readable_by_others(cluster.home) == []


@pytest.fixture(scope="module")
def mallory(cluster):
    device = HostileDevice(cluster, "mallory")
    wait_for(lambda: "mallory" in online(cluster), 20, "mallory to be online")
    yield device
    device.sock.close()


def get_blob(cluster, sha256):
    """rc-files' first answer to mallory's get of a blob (and the connection)."""
    sock, reader, welcome = authenticated(cluster)
    assert welcome == {"ok": True}
    return sock, reader, ask(sock, reader, {"get": {"sha256": sha256}})


# -- a device reads a blob no task of its reads -------------------------------------------

def test_a_device_cannot_claim_a_blob_it_has_no_bytes_of_to_read_it(cluster, mallory, tmp_path):
    """rc-files stores nothing twice: a put of a blob the store holds is
    answered "have" at once, bytes unseen. A device that knew (or guessed:
    a well-known file, a config template with one secret in it) another
    user's input's SHA-256 put it as its own task's checkpoint, learning
    its size from the "is N bytes, not M" refusal, and then rc-files served
    it the blob: its task now "reads" that checkpoint. A blob a device may
    not read must come with its bytes, as rc-server's inline outputs must."""
    secret = b"the victim's private input: password=hunter2\n"
    path = tmp_path / "secret.txt"
    path.write_bytes(secret)
    sha256, size = hashlib.sha256(secret).hexdigest(), len(secret)
    victim = cluster.rc("submit", "shell", "cat secret.txt", "--input", str(path),
                        "--require", "device_id=good")
    victim_task = int(victim.stdout.strip())
    wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                        (victim_task,)).fetchone()[0] == "completed",
             30, "the victim's task")
    task_id, attempt = mallory.take("sleep 60")
    with unharmed(cluster, "good"):
        sock, reader, answer = get_blob(cluster, sha256)
        assert answer["error"]["code"] == "not_yours", answer     # as it should be
        sock.close()
        sock, reader, welcome = authenticated(cluster)
        wrong = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                           "name": files.CHECKPOINT_NAME, "size": size + 1,
                                           "sha256": sha256}})
        assert "is %d bytes" % size not in json.dumps(wrong), wrong   # no size oracle
        sock.close()
        sock, reader, welcome = authenticated(cluster)
        claim = ask(sock, reader, {"put": {"task_id": task_id, "attempt": attempt,
                                           "name": files.CHECKPOINT_NAME, "size": size,
                                           "sha256": sha256}})
        assert claim == {"ok": True, "have": 0}, claim     # the bytes are wanted
        sock.sendall(os.urandom(size))                      # not the victim's: refused
        assert "hash_mismatch" in reader.readline().decode()
        sock.close()
        sock, reader, answer = get_blob(cluster, sha256)
        assert answer["error"]["code"] == "not_yours", answer
        sock.close()
    kinds = [row[0] for row in cluster.db.execute(
        "SELECT kind FROM task_files WHERE task_id = ?", (task_id,))]
    assert kinds == [], kinds
    ended(cluster, mallory, task_id, attempt)
