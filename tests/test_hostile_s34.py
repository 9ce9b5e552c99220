"""attack34: a task, its outputs and its artifacts as the attacker, against
the worker's sandbox of today (the spawner, the per-device cache, uploads).
Each test failed before the fix its docstring names."""
import binascii
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import Cluster, online, wait_for  # noqa: E402
from hostile_harness import assert_completes, submit_to  # noqa: E402
from rc import tasks  # noqa: E402
from test_sandbox import NOBODY, NOBODY_CAN_RUN, SETPRIV, nobody_python  # noqa: E402
from test_worker import FakeMain, WorkerProcess, main  # noqa: E402,F401 (main: a fixture)
from test_worker_files import files, run, start  # noqa: E402,F401 (fixtures)


def nobody_has_user_namespaces():
    unshare = shutil.which("unshare")
    return bool(NOBODY_CAN_RUN and unshare) and subprocess.run(
        [SETPRIV, "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", unshare,
         "--user", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


isolation = pytest.mark.skipif(not nobody_has_user_namespaces(),
                               reason="needs root (to run the worker as nobody) and user"
                                      " namespaces")


def nobody_dir(parent, name, mode=0o755):
    path = os.path.join(parent, name)
    os.mkdir(path, mode)
    os.chown(path, NOBODY, -1)
    return path


@pytest.fixture(scope="module")
def isolated():
    """A worker run as nobody with --isolate (a user namespace: the main
    node's local worker on a main node run as a normal user), hiding a
    directory that holds a secret and binding another read-only. The
    worker's HOME is hidden too, so the paths live beside it, not in it."""
    top = tempfile.mkdtemp(prefix="rc-test-s34-")
    os.chmod(top, 0o755)
    home, guarded = nobody_dir(top, "home"), nobody_dir(top, "guarded")
    hidden, read_only = nobody_dir(guarded, "hidden", 0o700), nobody_dir(guarded, "read-only")
    with open(os.path.join(hidden, "device_key"), "w") as f:
        f.write("the-worker-secret")
    os.chown(os.path.join(hidden, "device_key"), NOBODY, -1)
    main = FakeMain()
    worker = WorkerProcess(nobody_python(home), main.port, os.path.join(home, "worker.log"),
                           "--state-dir", nobody_dir(home, "state", 0o700), "--isolate",
                           "--hide", hidden, "--read-only", read_only)
    link = main.accept()
    link.handshake()
    yield link, hidden, read_only
    worker.stop()
    main.close()
    shutil.rmtree(top, ignore_errors=True)


# -- --isolate: a Python task kept every capability of its user namespace -------------

UNMASK = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH, MS_REMOUNT, MS_BIND = 2, 32, 4096
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000

def attack(where):
    libc.umount2(HIDDEN.encode(), MNT_DETACH)
    libc.mount(None, READ_ONLY.encode(), None, MS_REMOUNT | MS_BIND, None)
    try:
        print(where, "read", open(os.path.join(HIDDEN, "device_key")).read())
    except OSError as e:
        print(where, "refused", e.errno)
    try:
        open(os.path.join(READ_ONLY, where), "w").close()
        print(where, "wrote")
    except OSError as e:
        print(where, "refused", e.errno)

attack("here")
sys.stdout.flush()
# A namespace of its own gives capabilities again, over mounts locked in it.
if os.fork() == 0:
    code = libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    print("unshare", code)
    attack("nested")
    sys.stdout.flush()
    os._exit(0)
os.wait()
'''


@isolation
def test_an_isolated_python_task_cannot_unhide_nor_write_what_is_read_only(isolated):
    """A Python task runs in the spawner's forked child without an exec, so
    the capabilities unshare(CLONE_NEWUSER) gave it stayed: it unmounted
    the tmpfs over --hide (the main node's RC_HOME: admin token,
    device_key) and remounted --read-only writable (the checkout's
    bin/worker.py, which every device downloads). Now isolate() drops them
    all (capset). Before: "here read the-worker-secret", "here wrote"."""
    link, hidden, read_only = isolated
    code = "HIDDEN, READ_ONLY = %r, %r\n%s" % (hidden, read_only, UNMASK)
    result = link.run("python_exec", {"code": code}, task_id=101)
    assert result["status"] == "completed", result
    output = result["result"]["output"]
    assert "here refused" in output and "nested refused" in output, output
    assert "the-worker-secret" not in output and "wrote" not in output, output
    assert os.listdir(read_only) == []
    # A shell task (an exec) never had them; it still runs.
    result = link.run("shell", {"command": "grep CapEff /proc/self/status"}, task_id=102)
    assert result["result"]["output"].split() == ["CapEff:", "0000000000000000"], result


# -- the device's cache: checkpoints of a running task -----------------------------------

CACHE_MB = 1
CHECKPOINT_BYTES = 700000       # each checkpoint's file: three of them pass the cap


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster and one worker whose cache holds CACHE_MB, taking a
    checkpoint of each running task every half second."""
    cluster = Cluster(tmp_path_factory.mktemp("s34"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        # Each worker here has task uids (61330-61359) no other test's worker uses.
        cluster.start_worker("w34", "--slots", "2", "--cache-mb", str(CACHE_MB),
                             "--checkpoint-every", "0.5", "--task-user", "61330:4")
        wait_for(lambda: "w34" in online(cluster), 30, "the worker w34")
        cluster.cache = os.path.join(cluster.home, "worker-state", "cache")
        yield cluster
    finally:
        cluster.stop()


def cached_bytes(cluster):
    return sum(os.lstat(os.path.join(cluster.cache, name)).st_size
               for name in os.listdir(cluster.cache) if len(name) == 64)


def worker_events(cluster, event, **fields):
    found = []
    with open(cluster.worker_log("w34")) as log:
        for line in log:
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event and all(
                        record.get(name) == value for name, value in fields.items()):
                    found.append(record)
    return found


def test_checkpoints_of_a_running_task_keep_the_cache_within_its_cap(cluster, drop_dir):
    """Each checkpoint a running task sent went into the cache as it
    stood (so that its next attempt here fetches nothing), and nothing was
    evicted until the task ended: a task changing a 1 GiB checkpoint every
    five minutes filled the device's disk, whatever --cache-mb said. Now a
    checkpoint replaces the attempt's previous one in the cache, within the
    cap. Before: 3 checkpoints of 700 kB in a cache of 1 MiB, all kept."""
    stop = os.path.join(drop_dir, "stop")      # the task's uid looks for it
    command = ('while [ ! -e %s ]; do head -c %d /dev/urandom > "$RC_CHECKPOINT_DIR/state";'
               ' sleep 0.3; done; echo stopped' % (stop, CHECKPOINT_BYTES))
    task_id = submit_to(cluster, "w34", command)
    try:
        wait_for(lambda: len(worker_events(cluster, "checkpoint_sent", task_id=task_id)) >= 3,
                 60, "three checkpoints of task %d" % task_id)
        assert tasks.get(cluster.db, task_id)["state"] == "running"
        assert cached_bytes(cluster) <= CACHE_MB * 1048576, os.listdir(cluster.cache)
    finally:
        open(stop, "w").close()
    assert_completes(cluster, task_id, "stopped")


# -- a device whose disk a task filled -------------------------------------------------------

@pytest.fixture
def small_disk(drop_dir):
    """A tmpfs of 64 inodes, for a worker's task directories ($TMPDIR)."""
    path = os.path.join(drop_dir, "small")
    os.mkdir(path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=64", "tmpfs", path],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    os.chmod(path, 0o1777)
    yield path
    subprocess.run(["umount", "-l", path])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_task_that_fills_the_disk_neither_ends_the_worker_nor_fails_tasks_for_good(
        cluster, drop_dir, small_disk, monkeypatch):
    """A task used up the inodes of the device's disk; the next task with an
    input file could not have its directory made, and the OSError ended the
    worker's loop (a traceback, the worker gone, every task of the device
    queued again). Now an attempt that finds no room to start fails as the
    device's fault (`device_fault`): the main node queues it again while
    its retries last, and it runs once the disk has room. Before: the
    worker died, the task never ran."""
    monkeypatch.setenv("TMPDIR", small_disk)
    worker = cluster.start_worker("full34", "--slots", "2", "--task-user", "61340:4")
    monkeypatch.delenv("TMPDIR")
    wait_for(lambda: "full34" in online(cluster), 30, "the worker full34")
    stop = os.path.join(drop_dir, "stop")
    filler = submit_to(cluster, "full34", "i=0; while mkdir d$i 2>/dev/null; do i=$((i+1));"
                       " done; while [ ! -e %s ]; do sleep 0.1; done; echo filled" % stop)
    try:
        wait_for(lambda: os.statvfs(small_disk).f_ffree == 0, 30, "the disk's inodes used up")
        data = os.path.join(drop_dir, "input.txt")
        with open(data, "w") as f:
            f.write("an input\n")
        victim = int(cluster.rc("submit", "shell", "cat input.txt", "--input", data,
                                "--require", "device_id=full34", "--retries", "8").stdout)
        wait_for(lambda: tasks.get(cluster.db, victim)["attempt"] >= 2, 30,
                 "the attempt that found no room queued again")
        assert worker.poll() is None, "the worker ended"
        row = tasks.get(cluster.db, victim)
        assert row["state"] in ("queued", "assigned", "running"), row
        assert "No space left on device" in row["reason"], row
    finally:
        open(stop, "w").close()
    assert_completes(cluster, filler, "filled")
    assert_completes(cluster, victim, "an input", timeout=90)
    assert worker.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_output_past_the_cap_that_finds_no_room_says_so_in_the_result(
        cluster, small_disk, monkeypatch):
    """stdout past what the result carries goes to a file of the task
    directory; on a full disk it could not, and the result said only
    `truncated` (the reason was in the worker's log alone)."""
    monkeypatch.setenv("TMPDIR", small_disk)
    cluster.start_worker("spill34", "--slots", "1", "--task-user", "61344:2")
    monkeypatch.delenv("TMPDIR")
    wait_for(lambda: "spill34" in online(cluster), 30, "the worker spill34")
    task_id = submit_to(cluster, "spill34", "head -c 8000000 /dev/zero | tr '\\0' a")
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in ("completed", "failed"), 60,
             "the task ended")
    result = tasks.get(cluster.db, task_id)["result"]
    assert result["truncated"], result["stderr"]
    assert "rc-worker: stdout past its first" in result["stderr"], result["stderr"]
    assert "No space left on device" in result["stderr"], result["stderr"]


def test_inputs_that_find_no_room_are_the_devices_fault(start, files):
    """The same for an input larger than the device's free disk: the
    attempt fails before a byte moves, and says it was the device's fault,
    so that the main node queues it again. Before: no device_fault."""
    worker, link = start()
    ref = {"sha256": "ab" * 32, "size": 1 << 60}
    result = run(link, 1, "shell", {"command": "true", "inputs": [dict(ref, path="huge")]})
    assert result["status"] == "failed", result
    assert "not enough disk space on this device" in result["error"], result
    assert result["result"]["device_fault"] is True, result
    result = run(link, 2, "shell", {"command": "exit 3"})
    assert result["status"] == "failed" and "device_fault" not in result["result"], result


# -- two root workers of one machine, each with a /tmp of its own ----------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="task uids of their own need root")
def test_workers_with_their_own_tmpdir_never_share_a_task_uid(cluster, drop_dir, monkeypatch):
    """Root workers lock the task uids they use so that no two of a machine
    share one (a task's end kills every process of its uid), but the locks
    were under $TMPDIR: two workers each with a /tmp of its own (systemd's
    PrivateTmp, in both units we ship) took the same uid, and one task's
    end killed the other's. Now the locks live in /run/rc-worker. Before:
    both tasks ran as 61350."""
    uids = ("--task-user", "61350:2", "--slots", "1")
    cluster.start_worker("tmp-a", *uids)
    monkeypatch.setenv("TMPDIR", str(drop_dir))
    cluster.start_worker("tmp-b", *uids)
    monkeypatch.delenv("TMPDIR")
    wait_for(lambda: {"tmp-a", "tmp-b"} <= set(online(cluster)), 30, "both workers")
    stop = os.path.join(drop_dir, "stop")
    first = submit_to(cluster, "tmp-a", "while [ ! -e %s ]; do sleep 0.1; done; id -u" % stop)
    try:
        wait_for(lambda: tasks.get(cluster.db, first)["state"] == "running", 30, "the first task")
        second = submit_to(cluster, "tmp-b", "id -u")
        assert_completes(cluster, second, "613")
    finally:
        open(stop, "w").close()
    assert_completes(cluster, first, "613")
    outputs = [tasks.get(cluster.db, task_id)["result"]["output"].strip()
               for task_id in (first, second)]
    assert outputs[0] != outputs[1], outputs


def test_a_uid_locked_where_workers_before_locked_it_is_not_taken(cluster, drop_dir,
                                                                   monkeypatch):
    """A worker from before /run/rc-worker (one left running through an
    upgrade) locks its uids under $TMPDIR only: today's worker took the same
    uid, and one task's end killed the other's (`sleep` tasks killed by
    signal 9 while a test ran such a worker beside others). Before: the task
    ran as 61360, the uid the old worker held."""
    import fcntl
    monkeypatch.setenv("TMPDIR", str(drop_dir))
    top = os.path.join(str(drop_dir), "rc-worker-%d" % os.geteuid())
    os.mkdir(top, 0o711)
    held = os.open(os.path.join(top, "uid-61360.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)       # as the old worker does
        cluster.start_worker("after-old", "--task-user", "61360:2", "--slots", "1")
        monkeypatch.delenv("TMPDIR")
        wait_for(lambda: "after-old" in online(cluster), 30, "the worker after-old")
        assert_completes(cluster, submit_to(cluster, "after-old", "id -u"), "61361")
    finally:
        os.close(held)


# -- the spawner's memory: what earlier tasks were sent ---------------------------------------

READ_OWN_MEMORY = r'''
import ctypes, re
found = set()
for line in open("/proc/self/maps"):
    fields = line.split()
    if "rw" not in fields[1]:
        continue
    start, end = (int(x, 16) for x in fields[0].split("-"))
    try:
        found.update(re.findall(rb"victim-[0-9a-f]{32}", ctypes.string_at(start, end - start)))
    except (OSError, ValueError):
        pass
print(sorted(value.decode() for value in found))
'''


def test_a_python_task_finds_no_other_tasks_payload_in_its_memory(cluster):
    """A Python task is a fork of the spawner, and the spawner's memory
    held the payloads of the tasks it had started (freed, not wiped): a
    task that read its own memory found another uid's task's `--env`
    secret, and its code. Now Python tasks are forked from a template of
    the spawner made before any payload came, and read their own request
    themselves. Before: both secrets found."""
    secrets = [binascii.hexlify(os.urandom(16)).decode() for _ in range(2)]
    shell = cluster.rc("submit", "shell", "echo ran", "--env", "KEY=victim-" + secrets[0],
                       "--require", "device_id=w34").stdout
    python = cluster.rc("submit", "python_exec", "print('ran')", "--env",
                        "KEY=victim-" + secrets[1], "--require", "device_id=w34").stdout
    for task_id in (shell, python):
        assert_completes(cluster, int(task_id), "ran")
    attacker = int(cluster.rc("submit", "python_exec", READ_OWN_MEMORY,
                              "--require", "device_id=w34").stdout)
    assert_completes(cluster, attacker, "[")
    output = tasks.get(cluster.db, attacker)["result"]["output"]
    assert not any(secret in output for secret in secrets), output
