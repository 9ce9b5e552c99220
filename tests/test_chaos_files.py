"""kill -9 in the middle of the file paths, on a real cluster (TLS on, the
default): rc-web during a large POST /api/v1/files, rc-files during a
worker's fetch and during its output put, the worker during its output
upload. supervisord restarts the program; afterwards every task ends in
exactly one terminal state, every row names a blob of the right size and
SHA-256, and var/files/partial/ holds nothing that nobody owns once the
store's sweep (rc-reaper's, run here at once) has been round.

Moments are found by polling (a partial file appearing and growing), so
each scenario takes a few seconds."""
import hashlib
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest

from cluster_harness import Cluster, online, rc_files_records, wait_for
from rc import db, files, state_dir, tasks
from rc.states import TERMINAL_STATES

pytestmark = pytest.mark.e2e

DEVICE = "chaos-files"
BIG = 96 * 1024 * 1024      # bytes: large enough that a transfer is caught half way


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("chaos-files"), files_quota_mb=1024)
    cluster.start()
    try:
        cluster.start_worker(DEVICE, "--slots", "2")
        wait_for(lambda: DEVICE in online(cluster), 30, "the worker online")
        yield cluster
    finally:
        cluster.stop()


def partial_dir(cluster):
    return files.partial_dir(cluster.config)


def partials(cluster, prefix):
    try:
        return [name for name in os.listdir(partial_dir(cluster)) if name.startswith(prefix)]
    except FileNotFoundError:
        return []


def partial_size(cluster, prefix):
    total = 0
    for name in partials(cluster, prefix):
        try:
            total += os.path.getsize(os.path.join(partial_dir(cluster), name))
        except OSError:
            pass
    return total


def kill_program(cluster, name):
    """kill -9, then wait until supervisord has it running again."""
    pid = cluster.program_pid(name)
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: cluster.program_pid(name) not in (0, pid), 30, "%s restarted" % name)
    return pid


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def sent_offsets(cluster, digest):
    """The offsets rc-files sent a blob from (its file_sent lines)."""
    return [record.get("offset") for record in rc_files_records(cluster, "file_sent", digest)]


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def sweep(cluster):
    """The store's sweep as rc-reaper runs it once a minute."""
    connection = db.connect(cluster.config.db_path)
    try:
        files.sweep(connection, cluster.config, time.time())
    finally:
        connection.close()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def assert_store_whole(cluster):
    """Every row names a blob of its size and SHA-256; the usage row is the
    sum of the rows; each task_files row names a stored blob."""
    # One snapshot: a checkpoint committed or a replaced one deleted between
    # two reads (the ended task's last put, rc-reaper's sweep) is no fault.
    cluster.db.execute("BEGIN")
    try:
        rows = cluster.db.execute("SELECT sha256, size FROM files").fetchall()
        used = files.used_bytes(cluster.db)
        dangling = cluster.db.execute("SELECT count(*) FROM task_files WHERE sha256 NOT IN"
                                      " (SELECT sha256 FROM files)").fetchone()[0]
    finally:
        cluster.db.execute("COMMIT")
    assert used == sum(size for _, size in rows)
    assert dangling == 0
    for digest, size in rows:
        path = files.blob_path(cluster.config, digest)
        try:
            assert os.path.getsize(path) == size, digest
            assert files.hash_file(path)[0] == digest
        except FileNotFoundError:
            # rc-reaper's sweep deletes a row, then its blob: a blob swept
            # since the snapshot (a replaced checkpoint's, last_used_at 0)
            # is gone with its row. Gone under a row still there, a fault.
            kept = cluster.db.execute("SELECT 1 FROM files WHERE sha256 = ?",
                                      (digest,)).fetchone()
            assert kept is None or os.path.exists(path), "blob %s gone, its row kept" % digest


def terminal_once(cluster, task_id, timeout=60):
    wait_for(lambda: cluster.db.execute(
        "SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()[0]
        in TERMINAL_STATES, timeout, "task %d terminal" % task_id)
    ends = cluster.db.execute("SELECT count(*) FROM task_events WHERE task_id = ? AND state IN"
                              " (%s)" % ",".join("?" * len(TERMINAL_STATES)),
                              (task_id,) + tuple(TERMINAL_STATES)).fetchone()[0]
    assert ends == 1, "task %d ended %d times" % (task_id, ends)
    return cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                              (task_id,)).fetchone()[0]


def submit(cluster, *arguments):
    done = cluster.rc("submit", *arguments, "--require", "device_id=%s" % DEVICE)
    return int(done.stdout)


def start_upload(cluster, size):
    """A POST /api/v1/files of `size` zero bytes, sent whole from a thread
    (waitress holds a body until it is all in, then rc-web copies it into
    a partial file): the socket, held open."""
    token = state_dir.read_secret(cluster.config.admin_token_path)
    sock = socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=30)
    sock.sendall(("POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Authorization: Bearer %s\r\nContent-Type: application/octet-stream\r\n"
                  "Content-Length: %d\r\n\r\n" % (token, size)).encode())

    def send():
        chunk = b"\0" * (1024 * 1024)
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass        # rc-web was killed
    threading.Thread(target=send, daemon=True).start()
    return sock


def blob_files(cluster):
    store = files.root(cluster.config)
    if not os.path.isdir(store):
        return set()
    return {name for directory in os.listdir(store) if len(directory) == 2
            for name in os.listdir(os.path.join(store, directory))}


def halt(pid):
    """SIGSTOP, and back once every thread of `pid` is stopped: the signal
    arrives a moment later on another core. False if `pid` has ended (a
    zombie never stops), True once halted."""
    os.kill(pid, signal.SIGSTOP)
    directory = "/proc/%d/task" % pid
    while True:
        states = []
        for thread in os.listdir(directory):
            try:
                with open(os.path.join(directory, thread, "stat")) as f:
                    states.append(f.read().rpartition(")")[2].split()[0])
            except OSError:
                pass
        if any(state in "ZX" for state in states):
            return False
        if all(state in "tT" for state in states):
            return True


def halted_when(pid, predicate, timeout=30):
    """Let `pid` (halted) run a moment at a time (SIGCONT, 0.5 ms, halt)
    until `predicate` holds, and leave it halted; whether it did within
    `timeout`. A transfer is then caught half way however busy the machine
    (polling while it runs free missed a 96 MiB fetch that took 0.3 s).
    False too if `pid` ended first."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.0005)
        if not halt(pid):
            return False
    return True


def caught(predicate, timeout):
    """Polled without a pause: the moment may last a few milliseconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
    raise AssertionError("the moment never came in %ss" % timeout)


def test_rc_web_killed_mid_upload_leaves_no_partial_nobody_owns(cluster):
    reserved = files.RESERVED_PREFIX        # an upload's partial file, named with its length
    before = set(partials(cluster, reserved))
    for _ in range(3):      # an upload done before rc-web was halted is tried again
        web = cluster.program_pid("rc-web")
        sock = start_upload(cluster, BIG)
        try:
            caught(lambda: partial_size(cluster, reserved) > 0, 30)
            halt(web)
            cut = set(partials(cluster, reserved)) - before
            kill_program(cluster, "rc-web")
        finally:
            sock.close()
        if cut:
            break
        wait_for(lambda: listening(cluster.config.web_port), 30, "rc-web listening again")
    assert cut, "the cut upload's partial file"
    # rc-web drops the reservations nobody holds as it starts, before it listens.
    wait_for(lambda: listening(cluster.config.web_port), 30, "rc-web listening again")
    assert partials(cluster, reserved) == [], \
        "a cut upload's partial file outlived its rc-web: it holds quota for an hour"
    # The store takes the next upload whole.
    wait_for(lambda: listening(cluster.config.web_port), 30, "rc-web listening again")
    data = os.urandom(2 * 1024 * 1024 + 3)
    sock = socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=10)
    token = state_dir.read_secret(cluster.config.admin_token_path)
    sock.sendall(("POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  "Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
                  % (token, len(data))).encode() + data)
    answer = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            break
        answer += piece
    sock.close()
    assert b" 201 " in answer.split(b"\r\n")[0], answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["sha256"] == sha(data)
    assert_store_whole(cluster)


def output_put_under_way(cluster):
    """A task whose BIG output is being put (a MiB of it in rc-files' partial file)."""
    task_id = submit(cluster, "shell", "head -c %d /dev/urandom > out.bin && sha256sum out.bin"
                     % BIG, "--output", "out.bin")
    wait_for(lambda: partial_size(cluster, "put-%d-" % task_id) >= 1024 * 1024, 30,
             "the output put under way")
    return task_id


def test_rc_files_killed_during_an_output_put_the_task_ends_once_with_its_output(cluster):
    task_id = output_put_under_way(cluster)
    kill_program(cluster, "rc-files")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    row = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                             " AND name = 'out.bin'", (task_id,)).fetchone()
    assert row is not None and row[1] == BIG
    stdout = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                (task_id,)).fetchone()[0]
    assert row[0] in stdout
    assert_store_whole(cluster)


def test_rc_files_killed_during_a_worker_fetch_the_task_still_runs_once(cluster, tmp_path):
    data = os.urandom(BIG)
    path = tmp_path / "big.in"
    path.write_bytes(data)
    server = cluster.program_pid("rc-files")
    cached = os.path.join(cluster.home, "worker-state", "cache", "partial", sha(data))
    halt(server)            # till the fetch is under way (rc submit stores the input itself)
    task_id = submit(cluster, "shell", "sha256sum big.in", "--input", str(path))
    under_way = halted_when(server, lambda: os.path.exists(cached)
                            and os.path.getsize(cached) > 0)
    if not under_way:
        os.kill(server, signal.SIGCONT)
    assert under_way, "the fetch never caught half way"
    # Far from the end: rc-files cannot have sent the rest into the sockets' buffers.
    cut_early = os.path.getsize(cached) < BIG - 32 * 1024 * 1024
    kill_program(cluster, "rc-files")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    result = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                (task_id,)).fetchone()[0]
    assert sha(data) in result
    # The fetch went on from the bytes the worker had, not from the start.
    assert not cut_early or any(offset > 0 for offset in sent_offsets(cluster, sha(data)))
    assert_store_whole(cluster)


def test_the_worker_killed_during_its_output_put_the_task_runs_again_and_ends_once(cluster):
    task_id = output_put_under_way(cluster)
    os.killpg(cluster.workers[DEVICE].pid, signal.SIGKILL)
    cluster.workers[DEVICE].wait()
    cluster.start_worker(DEVICE, "--slots", "2")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    rows = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                              " AND name = 'out.bin'", (task_id,)).fetchall()
    assert len(rows) == 1 and rows[0][1] == BIG, rows
    result = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                (task_id,)).fetchone()[0]
    assert rows[0][0] in result
    # The cut put of the first attempt goes with the next sweep once it is a minute old.
    for name in partials(cluster, "put-%d-" % task_id):
        age(os.path.join(partial_dir(cluster), name), 61)
    sweep(cluster)
    assert partials(cluster, "put-%d-" % task_id) == []
    assert_store_whole(cluster)


def test_rc_server_killed_while_inline_outputs_are_stored_each_task_ends_once(cluster):
    recorded = {row[0] for row in cluster.db.execute("SELECT sha256 FROM files")}
    server = cluster.program_pid("rc-server")
    answer = http(cluster, "POST", "/api/v1/tasks", json.dumps([{
        "task_type": "shell", "requirements": {"device_id": DEVICE}, "payload": {
            "command": "printf 'task-%d-%%s' $$ | tee o.txt" % number, "outputs": ["o.txt"]}}
        for number in range(60)]).encode())
    task_ids = [task["task_id"] for task in answer["tasks"]]
    # Between an output's blob placed and its row (about a millisecond):
    # rc-server let run a moment at a time, and looked at while stopped,
    # until a blob file shows that no row names; then killed.
    unrecorded, deadline = set(), time.time() + 20
    os.kill(server, signal.SIGSTOP)
    try:
        while not unrecorded and time.time() < deadline:
            os.kill(server, signal.SIGCONT)
            time.sleep(0.0005)
            halt(server)
            unrecorded = blob_files(cluster) - recorded - {
                row[0] for row in cluster.db.execute("SELECT sha256 FROM files")}
    finally:
        kill_program(cluster, "rc-server")
    assert unrecorded, "rc-server never caught between an output's blob and its row"
    time.sleep(0.5)
    kill_program(cluster, "rc-server")
    for task_id in task_ids:
        assert terminal_once(cluster, task_id) == "completed", \
            cluster.rc("why", str(task_id)).stdout
        rows = cluster.db.execute("SELECT sha256 FROM task_files WHERE task_id = ?"
                                  " AND name = 'o.txt'", (task_id,)).fetchall()
        result = json.loads(cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                               (task_id,)).fetchone()[0] or "null")
        assert len(rows) == 1, (task_id, rows)
        with open(files.blob_path(cluster.config, rows[0][0]), "rb") as f:
            content = f.read().decode()
        assert content.startswith("task-") and content in json.dumps(result), (content, result)
    assert_store_whole(cluster)


@pytest.mark.parametrize("left", ["orphan-%s-0a1b2c3d" % ("e" * 64), "inline-%s" % ("0f" * 16)])
def test_what_a_kill_mid_move_leaves_in_partial_goes_at_the_next_sweep(cluster, left):
    """rc-reaper killed between moving an orphan blob aside and removing it
    (remove_orphan), or rc-server between writing an inline output and
    renaming it into place (write_unsynced): both hold a file for moments
    only, and what a kill leaves there holds its size of quota meanwhile."""
    path = os.path.join(partial_dir(cluster), left)
    with open(path, "wb") as f:
        f.write(b"\0" * (4 * 1024 * 1024))
    age(path, 120)
    sweep(cluster)
    assert not os.path.exists(path), "%s outlived its writer" % left


CHECKPOINTING = "chaos-checkpoints"
# A task that starts from its checkpoint's count, writes a large checkpoint,
# and stops a moment later: each attempt says where it started.
COUNTING = ("n=$(cat \"$RC_CHECKPOINT_DIR/n\" 2>/dev/null || echo 0); echo start-$n;"
            " head -c %d /dev/urandom > \"$RC_CHECKPOINT_DIR/big\";"
            " echo $((n + 1)) > \"$RC_CHECKPOINT_DIR/n\"; sleep 4; echo done-$n" % BIG)


@pytest.fixture(scope="module")
def checkpointing(cluster):
    cluster.start_worker(CHECKPOINTING, "--checkpoint-every", "1")
    wait_for(lambda: CHECKPOINTING in online(cluster), 30, "the checkpointing worker online")
    return cluster


def submit_counting(cluster):
    done = cluster.rc("submit", "shell", COUNTING, "--require",
                      "device_id=%s" % CHECKPOINTING)
    return int(done.stdout)


def worker_temporaries(cluster):
    return os.listdir(os.path.join(cluster.home, "worker-state", "cache", "tmp"))


def test_rc_files_killed_during_a_checkpoint_put_the_task_ends_once(checkpointing):
    cluster = checkpointing
    task_id = submit_counting(cluster)
    wait_for(lambda: partial_size(cluster, "put-%d-" % task_id) >= 1024 * 1024, 30,
             "the checkpoint put under way")
    kill_program(cluster, "rc-files")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    assert_store_whole(cluster)


def test_the_worker_killed_during_a_checkpoint_put_leaves_no_temporary_behind(checkpointing):
    cluster = checkpointing
    task_id = submit_counting(cluster)
    wait_for(lambda: partial_size(cluster, "put-%d-" % task_id) >= 1024 * 1024, 30,
             "the checkpoint put under way")
    process = cluster.workers[CHECKPOINTING]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any(name.startswith(("checkpoint-", "p")) for name in worker_temporaries(cluster))
    cluster.start_worker(CHECKPOINTING, "--checkpoint-every", "1")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    # The new worker's own last checkpoint (attempt 2) may still be on its
    # way as the task ends, its tar removed once it is sent: give it time.
    wait_for(lambda: worker_temporaries(cluster) == [], 30,
             "no checkpoint tar left (the killed worker's would stay a day on the device)")
    assert_store_whole(cluster)


def test_the_worker_killed_during_a_fetch_resumes_and_the_task_ends_once(cluster, tmp_path):
    data = os.urandom(BIG)
    path = tmp_path / "again.in"
    path.write_bytes(data)
    cached = os.path.join(cluster.home, "worker-state", "cache", "partial", sha(data))
    process = cluster.workers[DEVICE]
    server = cluster.program_pid("rc-files")
    halt(server)            # till the fetch is under way (rc submit stores the input itself)
    try:
        task_id = submit(cluster, "shell", "sha256sum again.in", "--input", str(path))
        halted_when(server, lambda: os.path.exists(cached) and os.path.getsize(cached) > 0)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        os.kill(server, signal.SIGCONT)
    assert os.path.exists(cached), "the fetch never caught half way"
    cluster.start_worker(DEVICE, "--slots", "2")
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    result = cluster.db.execute("SELECT result FROM tasks WHERE task_id = ?",
                                (task_id,)).fetchone()[0]
    assert sha(data) in result
    assert any(offset > 0 for offset in sent_offsets(cluster, sha(data)))
    assert not os.path.exists(cached)
    assert_store_whole(cluster)


def http(cluster, method, path, body, timeout=30):
    token = state_dir.read_secret(cluster.config.admin_token_path)
    request = urllib.request.Request(
        "http://127.0.0.1:%d%s" % (cluster.config.web_port, path), data=body, method=method,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def quietly(function, *arguments):
    """For a thread whose request rc-web may be killed under."""
    try:
        function(*arguments)
    except Exception:
        pass


def test_rc_web_killed_during_a_batch_submit_with_inputs_queues_all_or_none(cluster):
    data = os.urandom(1000)
    stored = http(cluster, "POST", "/api/v1/files", data)
    assert stored["sha256"] == sha(data)
    count = 2000
    batch = json.dumps([{"task_type": "shell", "payload": {
        "command": "true", "inputs": [{"path": "in-%d" % number, "sha256": sha(data),
                                       "size": len(data)}]},
        "requirements": {"device_id": "nobody-%d" % number}}
        for number in range(count)]).encode()
    first = cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]
    for delay in (0.0, 0.05, 0.15):
        last = cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]
        sender = threading.Thread(target=quietly, args=(
            http, cluster, "POST", "/api/v1/tasks", batch), daemon=True)
        sender.start()
        time.sleep(delay)
        kill_program(cluster, "rc-web")
        sender.join(30)
        queued = cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ?",
                                    (last,)).fetchone()[0]
        assert queued in (0, count), (delay, queued)
        assert cluster.db.execute(
            "SELECT count(*) FROM tasks t WHERE t.task_id > ? AND NOT EXISTS (SELECT 1 FROM"
            " task_files f WHERE f.task_id = t.task_id AND f.sha256 = ?)",
            (last, sha(data))).fetchone()[0] == 0
        wait_for(lambda: listening(cluster.config.web_port), 30, "rc-web listening again")
    for (task_id,) in cluster.db.execute("SELECT task_id FROM tasks WHERE state = 'queued'"
                                         " AND task_id > ?", (first,)).fetchall():
        tasks.cancel(cluster.db, task_id)       # none of them can run: out of the queue
    assert_store_whole(cluster)


def test_rc_files_killed_between_a_put_s_blob_and_its_row_the_task_ends_once(cluster):
    line = "chaos-%s\n" % os.urandom(6).hex()
    size = 32 * 1024 * 1024
    data = (line * (size // len(line) + 1)).encode()[:size]
    digest = sha(data)
    server = cluster.program_pid("rc-files")
    task_id = submit(cluster, "shell", "yes %s | head -c %d > out.bin" % (line.strip(), size),
                     "--output", "out.bin")
    caught(lambda: partials(cluster, "put-%d-" % task_id), 30)
    # rc-files let run a moment at a time until the blob is in place with no
    # row: the moments shortest once the bytes are nearly all in.
    placed, deadline = False, time.time() + 20
    os.kill(server, signal.SIGSTOP)
    try:
        while not placed and time.time() < deadline:
            nearly_in = partial_size(cluster, "put-%d-" % task_id) > size - 2 * 1024 * 1024
            os.kill(server, signal.SIGCONT)
            if not nearly_in:
                time.sleep(0.0005)
            halt(server)
            placed = os.path.exists(files.blob_path(cluster.config, digest)) and \
                not files.exists(cluster.db, digest)
    finally:
        kill_program(cluster, "rc-files")
    # Killed at that moment or, on a busy machine that let it pass, at
    # another: the task ends once with its one output row either way.
    assert terminal_once(cluster, task_id) == "completed", cluster.rc("why", str(task_id)).stdout
    rows = cluster.db.execute("SELECT sha256, size FROM task_files WHERE task_id = ?"
                              " AND name = 'out.bin'", (task_id,)).fetchall()
    assert [tuple(row) for row in rows] == [(digest, size)]
    assert_store_whole(cluster)
    if not placed:
        pytest.skip("rc-files was not caught between the blob and its row this time (the"
                    " moment lasts microseconds); the end state after its kill holds")


def test_rc_reaper_killed_during_its_file_sweep_leaves_no_row_without_its_blob(cluster):
    """rc-reaper runs the store's sweep as it starts: blobs past their
    retention, killed while it deletes them (rows first, then files)."""
    connection = db.connect(cluster.config.db_path)
    try:
        expired = [files.store_stream(connection, cluster.config,
                                      io.BytesIO(os.urandom(4096)))[0] for _ in range(1200)]
        with db.write(connection):
            connection.executemany("UPDATE files SET last_used_at = 0 WHERE sha256 = ?",
                                   [(digest,) for digest in expired])
    finally:
        connection.close()
    for digest in expired:      # placed long ago, as a blob past its retention was
        age(files.blob_path(cluster.config, digest), files.ORPHAN_BLOB_AGE + 60)
    reaper = kill_program(cluster, "rc-reaper")
    assert reaper
    reaper = cluster.program_pid("rc-reaper")
    marks = ",".join("?" * len(expired))

    def mid_sweep():
        rows = cluster.db.execute("SELECT count(*) FROM files WHERE sha256 IN (%s)" % marks,
                                  expired).fetchone()[0]
        on_disk = sum(os.path.exists(files.blob_path(cluster.config, d)) for d in expired)
        return rows < on_disk
    stopped = False
    try:
        halt(reaper)
        deadline = time.time() + 20
        while not stopped and time.time() < deadline:
            os.kill(reaper, signal.SIGCONT)
            time.sleep(0.002)
            halt(reaper)
            stopped = mid_sweep()
    finally:
        kill_program(cluster, "rc-reaper")
    assert stopped, "rc-reaper never caught mid sweep"
    # The restarted reaper sweeps again at once: every expired row goes.
    wait_for(lambda: cluster.db.execute("SELECT count(*) FROM files WHERE sha256 IN (%s)"
                                        % marks, expired).fetchone()[0] == 0, 30,
             "the expired rows gone")
    left = sum(os.path.exists(files.blob_path(cluster.config, d)) for d in expired)
    print("expired blob files left without a row by the kill:", left)
    # The files the kill left go with the orphan sweep's round of the store
    # (ORPHAN_BLOB_DIRS directories a minute), the quota meanwhile short of
    # the disk by their bytes.
    for _ in range(256 // files.ORPHAN_BLOB_DIRS):
        sweep(cluster)
    assert not any(os.path.exists(files.blob_path(cluster.config, d)) for d in expired)
    assert_store_whole(cluster)


def test_after_it_all_the_sweep_leaves_partial_empty_and_no_blob_without_its_row(cluster):
    """Last: every task above has ended, so nothing owns a partial file
    once it is past the ages the sweep allows a live writer."""
    for name in os.listdir(partial_dir(cluster)):
        age(os.path.join(partial_dir(cluster), name), 3601)
    sweep(cluster)
    assert os.listdir(partial_dir(cluster)) == []
    recorded = {row[0] for row in cluster.db.execute("SELECT sha256 FROM files")}
    on_disk = blob_files(cluster)
    print("blob files without a row (left for the orphan sweep):", len(on_disk - recorded))
    assert recorded <= on_disk
    assert_store_whole(cluster)
