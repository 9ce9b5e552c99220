"""kill -9 at the worst moments of the newest paths (session 44), on one
real cluster: what each kill left is checked once the killed program is
back (or, for `rc map`, once `rc map --resume` has run).

Moments are caught as test_chaos_files catches them: the program stopped
(SIGSTOP) and let run a moment at a time until what it leaves on the disk
shows it is there, then killed; no fault point in the product."""
import hashlib
import io
import os
import signal
import subprocess
import threading
import time

import pytest

from cluster_harness import RC, online, task_state, wait_for, with_one_worker
from rc import client, db, files, state_dir
from rc.states import TERMINAL_STATES
from test_chaos_files import halt, halted_when, kill_program

pytestmark = pytest.mark.e2e

DEVICE = "crash44"
RESULT_FILES = ("input", "stdout", "stderr", "exit_code", "state")
BIG = 64 * 1024 * 1024      # bytes: more than the sockets hold, so a transfer is cut half way


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_one_worker(tmp_path_factory.mktemp("crash44"), DEVICE, 4)


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
        ended = mapping.poll() is not None
    finally:
        mapping.kill()
        mapping.wait()
    if not caught and ended:
        pytest.skip("rc map wrote its last entry between two of its steps this time"
                    " (the moment lasts microseconds); nothing was cut")
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


def test_a_new_clients_first_download_cut_by_rc_web_s_kill_is_taken_up_when_it_is_back(
        cluster, tmp_path):
    """The client's get() into a file asks for the rest (Range) once rc-web
    answers again. As a Cluster's first request, cut mid-file, it failed at
    once: 'it has never answered this client: is the main node running?'."""
    data = os.urandom(BIG)
    connection = db.connect(cluster.config.db_path)
    try:
        digest = files.store_stream(connection, cluster.config, io.BytesIO(data))[0]
    finally:
        connection.close()
    token = state_dir.read_secret(cluster.config.admin_token_path)
    url = "http://127.0.0.1:%d" % cluster.config.web_port
    target = str(tmp_path / "got.bin")
    done = {}

    def download():
        try:
            with client.Cluster(url, token) as fresh:
                done["path"] = fresh.get(digest, target)
        except Exception as e:
            done["error"] = e

    def received():
        return sum(os.path.getsize(str(path)) for path in tmp_path.glob(".got.bin.*.part"))
    web = cluster.program_pid("rc-web")
    halt(web)
    downloading = threading.Thread(target=download, daemon=True)
    downloading.start()
    caught = halted_when(web, lambda: received() > 0)
    cut_early = received() < BIG - 32 * 1024 * 1024
    kill_program(cluster, "rc-web")
    downloading.join(120)
    assert caught and cut_early, "the download was not caught half way"
    assert "error" not in done, done
    assert done["path"] == target and files.hash_file(target)[0] == digest


def test_tasks_moving_files_while_rc_files_is_down_a_while_wait_for_it(cluster, tmp_path,
                                                                       drop_dir):
    """rc-files killed in a row (supervisord waits 1 s, 2 s, 3 s... between
    starts of a program that died at once) or slow to start on a small
    main node: a worker gave up after 4 connections in 3.5 s, and a task
    that fetched its inputs then failed for good ('inputs: cannot reach
    rc-files'), one that put its output completed without it (a line of
    stderr). Stopped here for 6 s, with each transfer under way."""
    data = os.urandom(files.INLINE_FILE_BYTES + 1)     # past what rides the worker connection
    (tmp_path / "in.bin").write_bytes(data)
    # The worker has reached rc-files before (a refused connection is then
    # a restart to wait for; one never reached fails fast: a firewall).
    (tmp_path / "first.bin").write_bytes(os.urandom(files.INLINE_FILE_BYTES + 1))
    first = cluster.rc("submit", "shell", "wc -c < first.bin", "--input",
                       str(tmp_path / "first.bin"), "--require", "device_id=%s" % DEVICE,
                       "--wait", check=False)
    assert first.returncode == 0 and first.stdout.strip() == str(files.INLINE_FILE_BYTES + 1), \
        first
    # It writes its output once rc-files is stopped: after a fixed second, a
    # loaded run put it before `supervisorctl stop` had stopped rc-files.
    go = drop_dir / "go"
    producing = cluster.rc("submit", "shell", "until [ -e %s ]; do sleep 0.05; done;"
                           " head -c 400000 /dev/urandom > o.bin; sha256sum o.bin" % go,
                           "--output", "o.bin", "--require", "device_id=%s" % DEVICE)
    producing = int(producing.stdout)
    wait_for(lambda: task_state(cluster, producing) == "running", 30, "the task running")
    cluster.supervisorctl("stop", "rc-files")
    go.touch()
    try:
        reading = int(cluster.rc("submit", "shell", "sha256sum in.bin", "--input",
                                 str(tmp_path / "in.bin"), "--require",
                                 "device_id=%s" % DEVICE).stdout)
        wait_for(lambda: transfer_cuts(cluster) >= 2, 30, "both transfers refused")
        time.sleep(6)       # past the 3.5 s of 4 tries
    finally:
        cluster.supervisorctl("start", "rc-files")
    for task_id in (producing, reading):
        wait_for(lambda: task_state(cluster, task_id) in TERMINAL_STATES, 60, "the task ended")
        row = cluster.db.execute("SELECT state, error, result FROM tasks WHERE task_id = ?",
                                 (task_id,)).fetchone()
        assert row[0] == "completed", tuple(row)
    stored = [entry for entry in files.task_files(cluster.db, producing)
              if entry["name"] == "o.bin"]
    assert len(stored) == 1 and stored[0]["sha256"] in cluster.db.execute(
        "SELECT result FROM tasks WHERE task_id = ?", (producing,)).fetchone()[0]
    assert hashlib.sha256(data).hexdigest() in cluster.db.execute(
        "SELECT result FROM tasks WHERE task_id = ?", (reading,)).fetchone()[0]


def transfer_cuts(cluster):
    """transfer_cut lines in the worker's log: a transfer refused, to be tried again."""
    with open(cluster.worker_log(DEVICE), "rb") as log:
        return sum(b'"transfer_cut"' in line for line in log)


CHECKPOINTING = "crash44-checkpoints"
# A task that writes a checkpoint (a few MiB) and runs on: each attempt says where it started.
COUNTING = ("n=$(cat \"$RC_CHECKPOINT_DIR/n\" 2>/dev/null || echo 0); echo start-$n;"
            " head -c 8000000 /dev/urandom > \"$RC_CHECKPOINT_DIR/big\";"
            " echo $((n + 1)) > \"$RC_CHECKPOINT_DIR/n\"; sleep 3; echo done-$n")


def spawner_of(pid):
    """The pid of a worker's task spawner (its child running serve_spawner)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                command = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"serve_spawner" in command:
            return int(entry)
    return None


def restarted(log):
    """Whether the worker's log shows it started again after restarting."""
    with open(log, "rb") as f:
        before, restarting, after = f.read().partition(b'"worker_restarting"')
    return restarting and b'"worker_started"' in after


def test_checkpoints_a_worker_restarted_by_its_spawner_s_death_left_are_removed(cluster):
    """The spawner killed: the worker runs itself again in the same process
    (execv), its checkpoint still going up after the 10 s it waits. The
    tar, named after the pid, was kept for a day as a live process's."""
    worker = cluster.start_worker(CHECKPOINTING, "--checkpoint-every", "1")
    temporaries = os.path.join(cluster.home, "worker-state", "cache", "tmp")

    def tars():
        try:
            return {name for name in os.listdir(temporaries)
                    if name.startswith("p%d-checkpoint-" % worker.pid)}
        except FileNotFoundError:
            return set()
    try:
        wait_for(lambda: CHECKPOINTING in online(cluster), 30, "the worker online")
        task_id = int(cluster.rc("submit", "shell", COUNTING, "--require",
                                 "device_id=%s" % CHECKPOINTING).stdout)
        wait_for(lambda: task_state(cluster, task_id) == "running", 30, "the task running")
        files_server = cluster.program_pid("rc-files")
        os.kill(files_server, signal.SIGSTOP)    # the checkpoint cannot go up
        try:
            wait_for(tars, 30, "a checkpoint made")
            os.kill(spawner_of(worker.pid), signal.SIGKILL)
            wait_for(lambda: restarted(cluster.worker_log(CHECKPOINTING)), 60,
                     "the worker restarted")
            left = tars()       # its checkpoints not sent in the 10 s it waited
            assert left
        finally:
            os.kill(files_server, signal.SIGCONT)
        assert worker.poll() is None, "the worker restarts in its own process"
        wait_for(lambda: task_state(cluster, task_id) in TERMINAL_STATES, 60, "the task ended")
        wait_for(lambda: not tars() & left, 30, "the checkpoint tars of the run before gone")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
