"""The worker as it lives on a phone and a Pi (session 45), on one real
cluster: killed by the OOM killer, frozen, its disk small. Moments are caught
as test_chaos_files catches them (the program halted and let run a moment at
a time until what it leaves on the disk shows it is there)."""
import hashlib
import os
import signal

import pytest

from cluster_harness import Cluster, online, wait_for
from test_chaos_files import halt, halted_when, terminal_once

pytestmark = pytest.mark.e2e

PHONE = "phone45"
CACHE_MB = 4        # a phone's small --cache-mb
MIB = 1048576


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("device45"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # tasks go to this module's workers
        yield cluster
    finally:
        cluster.stop()


def start_phone(cluster):
    process = cluster.start_worker(PHONE, "--slots", "2", "--cache-mb", str(CACHE_MB))
    wait_for(lambda: PHONE in online(cluster), 30, "the phone online")
    return process


def submit(cluster, *arguments):
    return int(cluster.rc("submit", *arguments, "--require", "device_id=%s" % PHONE).stdout)


def cache_bytes(cluster):
    """Bytes under the phone's cache directory, partial fetches included."""
    total = 0
    for folder, _, names in os.walk(os.path.join(cluster.home, "worker-state", "cache")):
        total += sum(os.lstat(os.path.join(folder, name)).st_size for name in names)
    return total


def test_a_fetch_cut_by_the_oom_killer_leaves_no_partial_past_the_cache_cap(cluster, tmp_path):
    """Killed mid-fetch, its task cancelled meanwhile (or run elsewhere), a
    phone restarted by its boot script kept the partial file for a week
    (PARTIAL_MAX_AGE), outside --cache-mb: a few such kills filled it."""
    data = os.urandom(6 * CACHE_MB * MIB)
    path = tmp_path / "big.in"
    path.write_bytes(data)
    partial = os.path.join(cluster.home, "worker-state", "cache", "partial",
                           hashlib.sha256(data).hexdigest())
    phone = start_phone(cluster)
    server = cluster.program_pid("rc-files")
    halt(server)
    try:
        task_id = submit(cluster, "shell", "true", "--input", str(path))
        assert halted_when(server, lambda: os.path.exists(partial)
                           and os.path.getsize(partial) > 2 * CACHE_MB * MIB)
        os.killpg(phone.pid, signal.SIGKILL)
        phone.wait()
    finally:
        os.kill(server, signal.SIGCONT)
    cluster.rc("cancel", str(task_id))
    assert terminal_once(cluster, task_id) == "cancelled"
    start_phone(cluster)
    small = tmp_path / "small.in"
    small.write_bytes(b"x" * 1000)
    assert terminal_once(cluster, submit(cluster, "shell", "cat small.in", "--input",
                                         str(small))) == "completed"
    assert not os.path.exists(partial)
    assert cache_bytes(cluster) <= CACHE_MB * MIB
