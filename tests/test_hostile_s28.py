"""Session 28's attacks on a running main node (127.0.0.1 only): a task
that checkpoints a sparse file, a device that half-closes its connection
and reads nothing, a main node whose result stream a client refuses.
After each attack the programs keep their pids and a good worker's tasks
complete (hostile_harness.unharmed)."""
import json
import tarfile
import time

import pytest

from cluster_harness import wait_for
from hostile_harness import unharmed
from rc import files, tasks
from rc.states import TERMINAL_STATES
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s28"), "good",
                                        auth_timeout=2.0):
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster


def ended(cluster, task_id, timeout=60):
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, timeout,
             "task %d to end" % task_id)
    return tasks.get(cluster.db, task_id)


# -- a sparse file in the checkpoint directory ----------------------------------------------

def test_a_sparse_file_in_a_checkpoint_costs_what_it_holds_not_its_apparent_size(cluster):
    """A task truncates a file in $RC_CHECKPOINT_DIR to 64 MiB (a terabyte
    costs the task no more): a few blocks on the device's disk. The worker
    tarred it at its apparent size, zeros and all, into its cache, hashed
    it and sent it to rc-files: the main node's quota and disk, and the
    link, paid for bytes the task never wrote. A file with holes is left
    out of the checkpoint (rc-worker's reader skips sparse members too);
    the task's real files go up as before."""
    command = ('cd "$RC_CHECKPOINT_DIR" && echo kept > real.txt && truncate -s 64M holes.bin'
               ' && exit 3')
    with unharmed(cluster, "good"):
        done = cluster.rc("submit", "shell", command, "--require", "device_id=good",
                          "--retries", "0")
        task_id = int(done.stdout.strip())
        assert ended(cluster, task_id)["state"] == "failed"
    row = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                             " AND kind = 'checkpoint'", (task_id,)).fetchone()
    assert row is not None, "the checkpoint of the failed attempt was not stored"
    assert row[1] < MIB, "a checkpoint of %d bytes for 5 bytes written" % row[1]
    with tarfile.open(files.blob_path(cluster.config, row[0])) as archive:
        names = archive.getnames()
        assert "real.txt" in names and "holes.bin" not in names, names
        assert archive.extractfile("real.txt").read() == b"kept\n"
