"""Small task files ride the worker connection (issue 18): an input of at
most INLINE_FILE_BYTES comes inside its task_assign, an output inside its
task_result, with no round trip to rc-files; bigger ones, and every file of
a worker or main node that does not offer it, still go through rc-files.
Against a running main node: the real bin/worker.py, and devices that
speak rc-server's protocol by hand to see exactly what is sent, and to send
what a hostile device would (hostile_harness.unharmed around each attack).
"""
import hashlib
import json
import os

import pytest

from cluster_harness import WORKER, Cluster, online, rc_files_events, wait_for
from hostile_harness import readable_by_others, unharmed
from rc import files, protocol, tasks
from rc.states import INLINE_FILE_BYTES, INLINE_TOTAL_BYTES
from test_bad_input import connect, register_frame

pytestmark = pytest.mark.e2e

GOOD = "inline-good"
QUOTA_MB = 6
FRAME_DEADLINE = 3.0      # seconds a frame, its raw bytes included, may take to arrive


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("inline-files"),
                                    files_quota_mb=QUOTA_MB, frame_deadline=FRAME_DEADLINE)


def with_the_good_worker(home, good=GOOD, worker_options=(), **settings):
    """A module's cluster: the good worker (device id `good`, with
    `worker_options`) alone, 2 slots, and what Device needs to play another
    device; afterwards, nothing readable by others."""
    cluster = Cluster(home, **settings)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(good, "--slots", "2", *worker_options)
        wait_for(lambda: good in online(cluster), 30, "the good worker")
        cluster.token = open(cluster.config.token_path).read().strip()
        cluster.secrets = {}
        yield cluster
    finally:
        cluster.stop()
    assert readable_by_others(cluster.home) == []


def sha(data):
    return hashlib.sha256(data).hexdigest()


def submit(cluster, device_id, command, *options):
    done = cluster.rc("submit", "shell", command, "--require", "device_id=%s" % device_id,
                      *options)
    return int(done.stdout.strip())


def wait(cluster, task_id):
    done = cluster.rc("wait", str(task_id), "--timeout", "60", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr, cluster.rc("why", str(task_id)).stdout)
    return done.stdout


def write(path, data):
    path.write_bytes(data)
    return str(path)


class Device:
    """A device that speaks rc-server's protocol by hand, with or without
    the inline_files capability: it reads its assignments whole and sends
    whatever task_result it is told to."""

    def __init__(self, cluster, device_id, inline=True):
        self.cluster, self.device_id = cluster, device_id
        sock, nonce = connect(cluster)
        mine = protocol.new_nonce()
        extra = {"inline_files": True} if inline else {}
        sock.sendall(register_frame(cluster, nonce, device_id, mine=mine, task_types=["shell"],
                                    slots=4, **extra))
        self.sock, self.reader = sock, sock.makefile("rb")
        sock.settimeout(20)
        self.ack = self.next("register_ack")
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     self.ack["device_secret"])
        wait_for(lambda: device_id in online(cluster), 20, "%s online" % device_id)

    def next(self, kind):
        """The data of the next frame of that kind (pings answered on the
        way); the raw bytes a frame announces are its data's "raw"."""
        while True:
            line = self.reader.readline()
            assert line, "rc-server closed %s's connection" % self.device_id
            frame = json.loads(line)
            if "inline_bytes" in frame["data"]:
                frame["data"]["raw"] = self.reader.read(frame["data"]["inline_bytes"])
            if frame["message_type"] == "ping":
                self.send("pong", {})
            elif frame["message_type"] == kind:
                return frame["data"]

    def send(self, kind, data, raw=b""):
        self.sock.sendall(protocol.encode(kind, data, sender_id=self.device_id) + raw)

    def take(self, command, *options):
        """A task submitted for this device, its task_assign read and accepted."""
        task_id = submit(self.cluster, self.device_id, command, *options)
        while True:
            assign = self.next("task_assign")
            if assign["task_id"] == task_id:
                break
        self.send("task_accept", {"task_id": task_id, "attempt": assign["attempt"]})
        wait_for(lambda: tasks.get(self.cluster.db, task_id)["state"] == "running", 20,
                 "task %d running on %s" % (task_id, self.device_id))
        return assign

    def finish(self, assign, entries, raw=None, inline_bytes=None):
        """A completed task_result with these small files (entry() each, or
        `raw` and `inline_bytes` as given); the task's row once acknowledged."""
        key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
        if raw is None:
            raw = b"".join(blob for _, blob in entries)
        data = dict(key, status="completed", error=None,
                    result={"output": "done\n", "stderr": "", "exit_code": 0})
        if entries or raw:
            data.update(files_inline=[meta for meta, _ in entries],
                        inline_bytes=len(raw) if inline_bytes is None else inline_bytes)
        self.send("task_result", data, raw)
        assert self.next("task_result_ack") == key
        return tasks.get(self.cluster.db, assign["task_id"])

    def close(self):
        self.reader.close()
        self.sock.close()


def entry(name, data, size=None, digest=None):
    """(what files_inline says of a file, its bytes)."""
    return {"name": name, "size": len(data) if size is None else size,
            "sha256": digest or sha(data)}, data


def outputs_of(cluster, task_id):
    return {row["name"]: row for row in files.task_files(cluster.db, task_id)
            if row["kind"] != files.INPUT}


def in_store(cluster, digest):
    return os.path.exists(files.blob_path(cluster.config, digest))


def partial_files(cluster):
    try:
        return os.listdir(os.path.join(files.root(cluster.config), files.PARTIAL_DIR))
    except FileNotFoundError:
        return []


# -- the real worker ------------------------------------------------------------------

def test_small_input_and_output_come_back_byte_identical_without_rc_files(cluster, tmp_path):
    data = os.urandom(100 * 1024)
    task_id = submit(cluster, GOOD, "tr a-m n-z < in.bin > out.bin",
                     "--input", write(tmp_path / "in.bin", data), "--output", "out.bin")
    wait(cluster, task_id)
    out = tmp_path / "out"
    cluster.rc("get", str(task_id), "-o", str(out))
    expected = data.translate(bytes.maketrans(b"abcdefghijklm", b"nopqrstuvwxyz"))
    assert (out / "out.bin").read_bytes() == expected
    assert outputs_of(cluster, task_id)["out.bin"]["sha256"] == sha(expected)
    assert rc_files_events(cluster, "file_sent", sha(data)) == 0
    assert rc_files_events(cluster, "file_stored", sha(expected)) == 0


def test_a_small_input_for_two_tasks_on_one_worker_lands_in_its_cache_once(cluster, tmp_path):
    data = os.urandom(50 * 1024)
    path = write(tmp_path / "model.bin", data)
    for _ in range(2):
        task_id = submit(cluster, GOOD, "sha256sum model.bin", "--input", path)
        assert wait(cluster, task_id).split()[0] == sha(data)
    cached = os.path.join(cluster.home, "worker-state", "cache", sha(data))
    assert open(cached, "rb").read() == data
    assert rc_files_events(cluster, "file_sent", sha(data)) == 0


def test_big_files_still_go_through_rc_files(cluster, tmp_path):
    data = os.urandom(INLINE_FILE_BYTES + 1)
    task_id = submit(cluster, GOOD, "cat in.bin in.bin > out.bin",
                     "--input", write(tmp_path / "in.bin", data), "--output", "out.bin")
    wait(cluster, task_id)
    out = tmp_path / "out"
    cluster.rc("get", str(task_id), "-o", str(out))
    assert (out / "out.bin").read_bytes() == data + data
    assert rc_files_events(cluster, "file_sent", sha(data)) == 1
    assert rc_files_events(cluster, "file_stored", sha(data + data)) == 1


def test_small_outputs_read_by_the_workers_loop_still_refuse_what_leads_outside(cluster):
    """A task directory of a few files is looked through in the worker's
    loop (no transfer thread): a link out of it is refused there as a
    thread refuses it, and the file beside it still comes back."""
    task_id = submit(cluster, GOOD, "ln -s /etc/passwd passwd; ln -s ../ up;"
                     " echo fine > good.txt; ln -s good.txt inside.lnk", "--output", "*",
                     "--output", "up/*")
    wait(cluster, task_id)
    assert sorted(outputs_of(cluster, task_id)) == ["good.txt", "inside.lnk"]
    stderr = tasks.get(cluster.db, task_id)["result"]["stderr"]
    for name in ("passwd", "up"):
        assert "output %r refused" % name in stderr, stderr
    assert rc_files_events(cluster, "file_stored", sha(b"fine\n")) == 0


def test_a_task_directory_goes_to_the_next_task_with_files_empty(cluster, tmp_path):
    """The worker keeps the directory of a task whose outputs it read in
    its loop for the next task with files: that task finds its own input
    and an empty checkpoint directory there, nothing of the task before.
    A directory with a folder in it, a checkpoint, or a checkpoint directory
    its task opened to others, is removed instead."""
    first = submit(cluster, GOOD, "cp in.bin copy.bin; echo left > junk.txt; pwd > where.txt",
                   "--input", write(tmp_path / "in.bin", b"first"), "--output", "where.txt")
    wait(cluster, first)
    where = tmp_path / "where"
    cluster.rc("get", str(first), "-o", str(where))
    second = submit(cluster, GOOD, "pwd; ls -A; ls -A .rc-checkpoint; cat in2.bin",
                    "--input", write(tmp_path / "in2.bin", b"second"))
    lines = wait(cluster, second).splitlines()
    assert lines == [(where / "where.txt").read_text().strip(), ".rc-checkpoint", "in2.bin",
                     "second"]
    for number, command in enumerate(["mkdir sub; echo x > sub/x",
                                      "echo x > \"$RC_CHECKPOINT_DIR/x\"",
                                      "chmod 777 \"$RC_CHECKPOINT_DIR\""], 3):
        task_id = submit(cluster, GOOD, command + "; pwd > where.txt", "--input",
                         write(tmp_path / ("in%d.bin" % number), b"%d" % number),
                         "--output", "where.txt")
        wait(cluster, task_id)
        cluster.rc("get", str(task_id), "-o", str(where))
        kept = (where / "where.txt").read_text().strip()
        wait_for(lambda: not os.path.exists(kept), 10, "the directory with a folder removed")


def test_a_checkpoint_is_restored_into_a_kept_task_directory(cluster, tmp_path):
    """The next attempt of a task that failed with a checkpoint starts from
    it, also in a task directory kept from an earlier task (which has its
    empty checkpoint directory already)."""
    together = [submit(cluster, GOOD, "sleep 1; echo %d > out.txt" % number, "--input",
                       write(tmp_path / ("in%d" % number), b"%d" % number),
                       "--output", "out.txt") for number in range(2)]
    for kept in together:         # both slots' directories kept, one for each attempt
        wait(cluster, kept)
    task_id = submit(cluster, GOOD, 'if [ -f "$RC_CHECKPOINT_DIR/state" ]; then'
                     ' cat "$RC_CHECKPOINT_DIR/state"; else echo half > "$RC_CHECKPOINT_DIR/state";'
                     " exit 1; fi", "--input", write(tmp_path / "in", b"x"),
                     "--retry-on-failure")
    assert wait(cluster, task_id) == "half\n"
    assert tasks.get(cluster.db, task_id)["attempt"] == 2


def test_an_old_worker_moves_small_files_through_rc_files(cluster, tmp_path):
    """A worker from before inline files neither announces them nor reads
    the main node's offer: everything goes by rc-files, as before."""
    source = open(WORKER).read()
    old = source.replace("auth=self.auth, inline_files=True,", "auth=self.auth,") \
        .replace('offer = data.get("inline_files")', "offer = None")
    assert old.count("inline_files=True") == 0 and "offer = None" in old
    old_worker = tmp_path / "old_worker.py"
    old_worker.write_text(old)
    process = cluster.start_worker("inline-old", "--slots", "1",
                                   "--state-dir", str(tmp_path / "old-state"),
                                   worker=str(old_worker))
    try:
        wait_for(lambda: "inline-old" in online(cluster), 30, "the old worker")
        data = os.urandom(10 * 1024)
        task_id = submit(cluster, "inline-old", "cat in.txt in.txt > out.txt",
                         "--input", write(tmp_path / "in.txt", data), "--output", "out.txt")
        wait(cluster, task_id)
        stored = outputs_of(cluster, task_id)["out.txt"]
        assert rc_files_events(cluster, "file_sent", sha(data)) == 1
        assert rc_files_events(cluster, "file_stored", stored["sha256"]) == 1
    finally:
        process.terminate()
        process.wait(30)


# -- what rc-server sends ---------------------------------------------------------------

def test_a_device_gets_a_small_input_once_and_none_it_holds_or_cannot_take(cluster, tmp_path):
    small, big = os.urandom(1000), os.urandom(INLINE_FILE_BYTES + 1)
    small_path = write(tmp_path / "small", small)
    big_path = write(tmp_path / "big", big)
    device = Device(cluster, "inline-raw")
    try:
        assert device.ack["inline_files"] == {"file_bytes": INLINE_FILE_BYTES,
                                              "total_bytes": INLINE_TOTAL_BYTES}
        first = device.take("true", "--input", small_path, "--input", big_path)
        assert first["files_inline"] == [{"sha256": sha(small), "size": len(small)}]
        assert first["raw"] == small           # the big one: fetched from rc-files
        device.finish(first, [])
        second = device.take("true", "--input", small_path)
        assert "files_inline" not in second    # sent on this connection already
        device.finish(second, [])
        cached = os.urandom(500)
        device.send("heartbeat", {"active_tasks": [], "cached_files": [sha(cached)]})
        device.next("heartbeat_ack")
        third = device.take("true", "--input", write(tmp_path / "cached", cached))
        assert "files_inline" not in third     # its cache holds it
        device.finish(third, [])
    finally:
        device.close()
    old = Device(cluster, "inline-raw-old", inline=False)
    try:
        assert "files_inline" not in old.take("true", "--input", small_path)
    finally:
        old.close()


def test_a_result_with_small_outputs_is_stored_with_the_result(cluster):
    device = Device(cluster, "inline-out")
    try:
        assign = device.take("true", "--output", "out/*.txt")
        a, b = os.urandom(3000), b""
        row = device.finish(assign, [entry("out/a.txt", a), entry("out/b.txt", b),
                                     entry(".rc/stdout", b"all of it\n")])
        assert row["state"] == "completed" and row["result"]["stderr"] == ""
        stored = outputs_of(cluster, assign["task_id"])
        assert {name: r["sha256"] for name, r in stored.items()} == {
            "out/a.txt": sha(a), "out/b.txt": sha(b), ".rc/stdout": sha(b"all of it\n")}
        assert open(files.blob_path(cluster.config, sha(a)), "rb").read() == a
    finally:
        device.close()


# -- hostile devices --------------------------------------------------------------------

HOSTILE = {      # name -> (files_inline and the bytes sent, what the task's stderr says)
    "lying hash": (lambda d: [entry("out.bin", d, digest=sha(b"other"))],
                   "expected %s got " % sha(b"other")),
    "outside the globs": (lambda d: [entry("notes.txt", d)], "no --output glob"),
    "dot dot": (lambda d: [entry("../out.bin", d)], "must not contain '..'"),
    "absolute": (lambda d: [entry("/etc/passwd", d)], "must be relative"),
    "a checkpoint": (lambda d: [entry(".rc/checkpoint", d)], "goes to rc-files"),
    "given twice": (lambda d: [entry("out.bin", b"first"), entry("out.bin", d)], "given twice"),
}
UNREADABLE = {   # files_inline that says nothing usable of the bytes: none stored
    "lying size": (lambda d: [entry("out.bin", d, size=len(d) + 1), entry("fine.txt", b"kept")],
                   "their sizes add up to 1005 bytes, not the 1004 sent"),
    "over the file cap": (lambda d: [entry("out.bin", d, size=INLINE_FILE_BYTES + 1)],
                          "each size must be a whole number from 0 to %d" % INLINE_FILE_BYTES),
    "size not a number": (lambda d: [entry("out.bin", d, size="1000")],
                          "each size must be a whole number"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE) + sorted(UNREADABLE))
def test_a_hostile_inline_output_is_refused_alone(cluster, attack):
    make, reason = HOSTILE.get(attack) or UNREADABLE[attack]
    device = Device(cluster, "inline-bad-%d" % (sorted(HOSTILE) + sorted(UNREADABLE))
                    .index(attack))
    try:
        with unharmed(cluster, GOOD):
            data = os.urandom(1000)
            assign = device.take("true", "--output", "out.bin", "--output", "fine.txt")
            bad = make(data)
            if attack in HOSTILE:
                bad.append(entry("fine.txt", b"kept"))
            row = device.finish(assign, bad)
            assert row["state"] == "completed" and row["result"]["output"] == "done\n"
            assert reason in row["result"]["stderr"], row["result"]["stderr"]
            if attack in HOSTILE:
                name = bad[-2][0]["name"]
                assert "rc-server: output %r not stored" % name in row["result"]["stderr"]
                kept = {"fine.txt": sha(b"kept")}
                if attack == "given twice":
                    kept["out.bin"] = sha(b"first")       # the first one given
                assert {name: row["sha256"] for name, row in
                        outputs_of(cluster, assign["task_id"]).items()} == kept
            else:
                assert "rc-server: no inline file stored" in row["result"]["stderr"]
                assert outputs_of(cluster, assign["task_id"]) == {}
            assert not in_store(cluster, sha(b"other")) and not in_store(cluster, sha(data))
            assert partial_files(cluster) == []
    finally:
        device.close()


def test_inline_outputs_over_the_total_are_all_refused(cluster):
    device = Device(cluster, "inline-big")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "*.bin")
            parts = [os.urandom(200 * 1024) for _ in range(3)]     # 600 KiB
            row = device.finish(assign, [entry("%d.bin" % n, part)
                                         for n, part in enumerate(parts)])
            assert row["state"] == "completed"
            assert "over the 1000 files or %d bytes allowed" % INLINE_TOTAL_BYTES \
                in row["result"]["stderr"]
            assert outputs_of(cluster, assign["task_id"]) == {}
            assert not any(in_store(cluster, sha(part)) for part in parts)
    finally:
        device.close()


def test_inline_bytes_that_cannot_be_followed_close_that_connection_alone(cluster):
    device = Device(cluster, "inline-lost")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.bin")
            key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
            data = os.urandom(1000)
            meta, _ = entry("out.bin", data)
            device.send("task_result", dict(key, status="completed", error=None, result={},
                                            files_inline=[meta], inline_bytes="1000"), data)
            error = device.next("error")
            assert error["code"] == "bad_frame" and "inline_bytes must be" in error["message"]
            assert device.reader.readline() == b""
            assert not in_store(cluster, sha(data))
    finally:
        device.close()
        cluster.rc("cancel", str(assign["task_id"]))


def test_raw_bytes_that_never_come_cost_that_connection_alone(cluster):
    """A task_result that announces more bytes than it sends is a frame
    that never ends: frame_deadline hangs up on it, as on any other."""
    device = Device(cluster, "inline-short")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.bin")
            key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
            data = os.urandom(1000)
            meta, _ = entry("out.bin", data)
            device.send("task_result", dict(key, status="completed", error=None, result={},
                                            files_inline=[meta], inline_bytes=1000), data[:10])
            error = device.next("error")
            assert error["code"] == "frame_timeout", error
            assert device.reader.readline() == b""
            assert tasks.get(cluster.db, assign["task_id"])["state"] == "running"
            assert not in_store(cluster, sha(data))
    finally:
        device.close()
        cluster.rc("cancel", str(assign["task_id"]))


def test_a_result_for_an_attempt_the_device_does_not_hold_stores_nothing(cluster):
    device = Device(cluster, "inline-stale")
    try:
        assign = device.take("true", "--output", "out.bin")
        data = os.urandom(2000)
        stale = dict(assign, attempt=assign["attempt"] + 5)
        device.finish(stale, [entry("out.bin", data)])
        assert device.next("error")["code"] == "stale_result"
        assert not in_store(cluster, sha(data))
        row = device.finish(assign, [])
        assert row["state"] == "completed" and outputs_of(cluster, assign["task_id"]) == {}
    finally:
        device.close()


def test_a_full_store_refuses_the_inline_output_and_the_task_still_ends(cluster, tmp_path):
    """The quota counts inline outputs as rc-files counts puts."""
    used = files.used_bytes(cluster.db) + 4096
    filler = os.urandom(QUOTA_MB * 1024 * 1024 - used - 20000)
    holder = submit(cluster, "nobody-here", "true", "--input", write(tmp_path / "filler", filler))
    device = Device(cluster, "inline-full")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.bin")
            data = os.urandom(100 * 1024)
            row = device.finish(assign, [entry("out.bin", data)])
            assert row["state"] == "completed"
            assert "does not fit" in row["result"]["stderr"] and "files_quota_mb=%d" % QUOTA_MB \
                in row["result"]["stderr"], row["result"]["stderr"]
            assert outputs_of(cluster, assign["task_id"]) == {}
            assert not in_store(cluster, sha(data)) and partial_files(cluster) == []
    finally:
        device.close()
        cluster.rc("cancel", str(holder))


def test_a_result_kept_for_a_main_node_without_inline_files_goes_without_them():
    """Results are kept until acknowledged and sent again after a reconnect;
    if the main node now takes no inline files (an older one), their bytes
    must not follow the frame (it would read them as frames): they are left
    out, and the result's stderr says so."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_inline", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    result = {"task_id": 7, "attempt": 1, "status": "completed", "error": None,
              "result": {"output": "", "stderr": "its own\n"},
              "files_inline": [{"name": "out.bin", "size": 3, "sha256": sha(b"abc"),
                                "data": b"abc"}]}
    assert worker.encode_frame("task_result", result, "d").endswith(b"\nabc")
    worker.Files.drop_inline(result)
    frame = worker.encode_frame("task_result", result, "d")
    assert frame.endswith(b"}\n") and b"inline_bytes" not in frame
    assert result["result"]["stderr"] == ("rc-worker: outputs not stored (the main node takes"
                                          " no inline files): out.bin\nits own\n")
