"""kill -9 at the worst moments of the newest paths (session 44), on one
real cluster: what each kill left is checked once the killed program is
back (or, for `rc map`, once `rc map --resume` has run).

Moments are caught as test_chaos_files catches them: the program stopped
(SIGSTOP) and let run a moment at a time until what it leaves on the disk
shows it is there, then killed; no fault point in the product."""
import os
import signal
import subprocess

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from test_chaos_files import halt, halted_when

pytestmark = pytest.mark.e2e

DEVICE = "crash44"
RESULT_FILES = ("input", "stdout", "stderr", "exit_code", "state")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("crash44"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # one worker: this module's
        cluster.start_worker(DEVICE, "--slots", "4")
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker online")
        yield cluster
    finally:
        cluster.stop()


def group_count(cluster, sql, group_id):
    return cluster.db.execute(sql, (group_id,)).fetchone()[0]


def last_result_file_being_written(results):
    """An input's --results entry whose last file alone is still a
    .rc-partial (its other files in place): the moment a kill leaves an
    entry that looks whole but is not."""
    try:
        entries = os.listdir(results)
    except FileNotFoundError:
        return False
    for entry in entries:
        try:
            names = set(os.listdir(os.path.join(results, entry)))
        except FileNotFoundError:
            continue
        partial = {name[:-len(".rc-partial")] for name in names if name.endswith(".rc-partial")}
        if len(partial) == 1 and set(RESULT_FILES) - partial <= names:
            return True
    return False


def test_rc_map_killed_as_it_writes_an_entry_s_last_result_file_resume_writes_it_whole(
        cluster, tmp_path):
    count = 60
    results = str(tmp_path / "results")
    first = cluster.db.execute("SELECT coalesce(max(group_id), 0) FROM maps").fetchone()[0]
    mapping = subprocess.Popen(
        [RC, "map", "--results", results, "--require", "device_id=%s" % DEVICE, "echo"],
        env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        mapping.stdin.write("".join("in-%d\n" % number for number in range(count)).encode())
        mapping.stdin.close()
        group_id = wait_for(lambda: cluster.db.execute(
            "SELECT max(group_id) FROM maps WHERE group_id > ?", (first,)).fetchone()[0],
            30, "the map recorded")
        wait_for(lambda: group_count(cluster, "SELECT count(task_id) FROM map_jobs"
                                     " WHERE group_id = ?", group_id) == count, 30,
                 "every input queued")
        # Halted while its tasks end, then let run a moment at a time: it
        # writes their entries back to back.
        halt(mapping.pid)
        wait_for(lambda: group_count(cluster, "SELECT count(*) FROM tasks WHERE group_id = ?"
                                     " AND state = 'completed'", group_id) == count, 60,
                 "every task completed")
        caught = halted_when(mapping.pid, lambda: last_result_file_being_written(results))
    finally:
        mapping.kill()
        mapping.wait()
    assert caught, "rc map was never caught writing an entry's last file"
    resumed = subprocess.run([RC, "map", "--resume", str(group_id), "--results", results],
                             env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    for number in range(1, count + 1):
        entry = os.path.join(results, str(number))
        names = sorted(os.listdir(entry))
        assert names == sorted(RESULT_FILES), (number, names)
        with open(os.path.join(entry, "stdout")) as f:
            assert f.read() == "in-%d\n" % (number - 1), number
        with open(os.path.join(entry, "exit_code")) as f:
            assert f.read() == "0\n", number
