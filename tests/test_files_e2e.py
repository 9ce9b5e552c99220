"""Task files end to end: the real supervisord with rc-files, the real
bin/worker.py. Files go in, a shell task transforms them, the outputs come
back byte-identical; the same input to two tasks on one device crosses the
network once; stdin and env reach the task; a device killed mid-task
hands its checkpoint to the next attempt on another device.

The worker's side is built on its own branch (issue 18); until this
checkout's bin/worker.py has it (its --help offers --cache-mb), the module
is skipped, saying so. RC_E2E_WORKER=/path/to/worker.py runs it against
another worker file."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster_harness import WORKER, Cluster, online, rc_files_events, wait_for

pytestmark = pytest.mark.e2e

E2E_WORKER = os.environ.get("RC_E2E_WORKER") or WORKER
DEVICE = "files-worker"


def worker_moves_files():
    done = subprocess.run([sys.executable, "-I", E2E_WORKER, "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    return "--cache-mb" in done.stdout


if not worker_moves_files():
    pytest.skip("%s has no file support yet (no --cache-mb in its --help): the worker side"
                " of issue 18 is on branch i18-worker-files" % E2E_WORKER,
                allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("files-cluster"))
    cluster.start()
    try:
        cluster.start_worker(DEVICE, "--slots", "2", worker=E2E_WORKER)
        wait_for(lambda: DEVICE in online(cluster), 30, "the files worker online")
        yield cluster
    finally:
        cluster.stop()


def submit(cluster, *arguments):
    """A task pinned to the worker under test (the local worker is the old one)."""
    done = cluster.rc("submit", *arguments, "--require", "device_id=%s" % DEVICE)
    return int(done.stdout)


def wait(cluster, task_id):
    done = cluster.rc("wait", str(task_id), "--timeout", "120", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr,
                                  cluster.rc("why", str(task_id)).stdout)
    return done.stdout


def test_files_in_transformed_outputs_back_byte_identical(cluster, tmp_path):
    folder = tmp_path / "texts"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"hello world\n")
    (folder / "deep" / "b.txt").write_bytes(b"second file\n")
    blob = os.urandom(3 * 1024 * 1024 + 5)
    (folder / "blob.bin").write_bytes(blob)
    task_id = submit(cluster, "shell",
                     "tr a-z A-Z < a.txt > a.up && tr a-z A-Z < deep/b.txt > deep/b.up"
                     " && cat blob.bin blob.bin > twice.bin",
                     "--input", str(folder) + "/", "--output", "*.up", "--output",
                     "deep/*.up", "--output", "twice.bin")
    wait(cluster, task_id)
    out = tmp_path / "out"
    cluster.rc("get", str(task_id), "-o", str(out))
    assert (out / "a.up").read_bytes() == b"HELLO WORLD\n"
    assert (out / "deep" / "b.up").read_bytes() == b"SECOND FILE\n"
    assert hashlib.sha256((out / "twice.bin").read_bytes()).hexdigest() == \
        hashlib.sha256(blob + blob).hexdigest()
    listing = cluster.rc("files", str(task_id)).stdout
    assert "twice.bin" in listing and "output" in listing


def test_the_same_input_to_two_tasks_on_one_device_is_fetched_once(cluster, tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(2 * 1024 * 1024))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    for _ in range(2):
        task_id = submit(cluster, "shell", "sha256sum model.bin", "--input", str(model))
        assert wait(cluster, task_id).split()[0] == digest
    assert rc_files_events(cluster, "file_sent", digest) == 1


def test_stdin_env_and_a_script_file_reach_the_task(cluster, tmp_path):
    numbers = tmp_path / "numbers"
    numbers.write_bytes(b"3\n1\n2\n")
    script = tmp_path / "job.sh"
    script.write_text('sort -n\necho "$GREETING from $RC_TASK_ID"\n')
    task_id = submit(cluster, "shell", "--file", str(script), "--stdin", str(numbers),
                     "--env", "GREETING=hi")
    assert wait(cluster, task_id) == "1\n2\n3\nhi from %d\n" % task_id


def test_the_next_attempt_starts_from_the_last_checkpoint(cluster):
    """A device that dies mid-task loses seconds, not the work: its worker
    checkpointed $RC_CHECKPOINT_DIR, and the next attempt, on another
    device, starts from it."""
    first = cluster.start_worker("ckpt-1", "--slots", "1", "--tag", "ckpt",
                                 "--checkpoint-every", "0.5", worker=E2E_WORKER)
    wait_for(lambda: "ckpt-1" in online(cluster), 30, "ckpt-1 online")
    script = ('if [ -f "$RC_CHECKPOINT_DIR/step" ]; then echo "resumed at $(cat'
              ' "$RC_CHECKPOINT_DIR/step")"; else echo 7 > "$RC_CHECKPOINT_DIR/step";'
              ' sleep 60; fi')
    task_id = int(cluster.rc("submit", "shell", script, "--require", "tags=ckpt").stdout)
    wait_for(lambda: cluster.db.execute(
        "SELECT 1 FROM task_files WHERE task_id = ? AND kind = 'checkpoint'",
        (task_id,)).fetchone(), 30, "a checkpoint stored")
    os.killpg(first.pid, signal.SIGKILL)          # the phone went flat
    first.wait()
    cluster.start_worker("ckpt-2", "--slots", "1", "--tag", "ckpt", worker=E2E_WORKER)
    assert wait(cluster, task_id) == "resumed at 7\n"
    task = json.loads(cluster.rc("task", str(task_id), "--json").stdout)
    assert task["attempt"] >= 2 and task["device_id"] == "ckpt-2"


def test_a_task_drained_away_now_starts_elsewhere_from_the_checkpoint_it_was_stopped_with(
        cluster):
    """`rc drain --now` takes a running task from its device: the worker stops
    it, sends its checkpoint, then answers for the attempt. Another device
    used to take the task within the retry backoff (under a second), before
    that checkpoint came, and started over (no periodic checkpoint here:
    --checkpoint-every is 300 s). Now the next attempt waits for the stopped
    one's checkpoint, and starts as soon as its worker has answered. rc-files
    is held (SIGSTOP) for 3 s over the drain, a slow phone's upload, so that
    without the wait the other device surely goes first."""
    cluster.start_worker("drain-1", "--slots", "1", "--tag", "drain",
                                 worker=E2E_WORKER)
    wait_for(lambda: "drain-1" in online(cluster), 30, "drain-1 online")
    # The count written whole (a new file renamed over the old): stopped
    # between `>`'s truncation and its write, the task left an empty n in
    # its checkpoint, and the next attempt said "from " (a loaded run).
    script = ('n=$(cat "$RC_CHECKPOINT_DIR/n" 2>/dev/null || echo 0); start=$n;'
              ' while [ "$n" -lt 120 ]; do n=$((n + 1)); echo $n > "$RC_CHECKPOINT_DIR/n.new";'
              ' mv "$RC_CHECKPOINT_DIR/n.new" "$RC_CHECKPOINT_DIR/n"; sleep 0.1; done;'
              ' echo "from $start"')
    task_id = int(cluster.rc("submit", "shell", script, "--require", "tags=drain",
                             "--retries", "0").stdout)
    wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                        (task_id,)).fetchone()[0] == "running", 30,
             "the task running on drain-1")
    cluster.start_worker("drain-2", "--slots", "1", "--tag", "drain", worker=E2E_WORKER)
    wait_for(lambda: "drain-2" in online(cluster), 30, "drain-2 online")
    rc_files = cluster.program_pid("rc-files")
    os.kill(rc_files, signal.SIGSTOP)
    try:
        cluster.rc("drain", "drain-1", "--now")
        time.sleep(3)
    finally:
        os.kill(rc_files, signal.SIGCONT)
    started_from = int(wait(cluster, task_id).split()[-1])
    task = json.loads(cluster.rc("task", str(task_id), "--json").stdout)
    assert task["device_id"] == "drain-2" and task["attempt"] == 2, task
    assert started_from >= 1, "the next attempt started from %d" % started_from
