"""Operations features under an admin's mistakes, attacks and crashes
(session 48): backups and restores, upgrades, environments, schedules,
services and device logs. Each test is one fault found, and its fix."""
import io
import json
import os
import shutil
import signal
import subprocess

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import db, tasks
from rc.states import TERMINAL_STATES


def rc(*args):
    """The rc command on the cluster_home fixture's RC_HOME."""
    return subprocess.run([RC] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


# -- rc restore -------------------------------------------------------------------------

def test_a_restore_from_a_copy_with_its_wal_keeps_what_the_wal_holds(cluster_home, tmp_path):
    """An admin's own copy of a live database (`cp var/db/rc.db* /mnt/usb/`)
    is a main file and a -wal beside it holding the latest commits. restore
    counted the tasks through the WAL ("5 tasks") but copied the main file's
    bytes alone: the restored database held none of them."""
    config, connection = cluster_home
    connection.execute("PRAGMA wal_autocheckpoint=0")     # the commits stay in the WAL
    ids = [tasks.submit(connection, config, "echo", {"message": str(n)}) for n in range(5)]
    usb = tmp_path / "usb"
    usb.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(config.db_path + suffix, str(usb / "rc.db") + suffix)
    connection.close()       # the main node stopped (its WAL checkpointed)
    done = rc("restore", str(usb / "rc.db"))
    assert done.returncode == 0, done.stderr
    assert "5 tasks" in done.stdout
    restored = db.connect(config.db_path)
    try:
        assert sorted(row[0] for row in restored.execute("SELECT task_id FROM tasks")) \
            == sorted(ids)
    finally:
        restored.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_rc_backup_force_never_writes_over_the_live_database(cluster_home, suffix):
    """`rc backup --force var/db/rc.db` (restore's arguments, typed for
    backup) put the copy in place of the live database, or of its -wal:
    the running programs went on writing to the file unlinked, and what
    they committed was gone for every later reader."""
    config, connection = cluster_home
    connection.execute("PRAGMA wal_autocheckpoint=0")
    before = os.stat(config.db_path + suffix).st_ino
    done = rc("backup", "--force", config.db_path + suffix)
    assert done.returncode != 0
    assert "the live database" in done.stderr
    assert os.stat(config.db_path + suffix).st_ino == before
    task_id = tasks.submit(connection, config, "echo", {"message": "after"})
    later = db.connect(config.db_path)
    try:
        assert later.execute("SELECT count(*) FROM tasks WHERE task_id = ?",
                             (task_id,)).fetchone()[0] == 1
    finally:
        later.close()


# -- environments -----------------------------------------------------------------------

def wheel(directory, who):
    """A wheel of package rcdemo 1.0 whose WHO says where it came from."""
    import zipfile
    os.makedirs(directory, 0o755, exist_ok=True)
    info = "rcdemo-1.0.dist-info/"
    members = {"rcdemo.py": "WHO = %r\n" % who,
               info + "METADATA": "Metadata-Version: 2.1\nName: rcdemo\nVersion: 1.0\n",
               info + "WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n"}
    members[info + "RECORD"] = "".join("%s,,\n" % name for name in members) + info + "RECORD,,\n"
    path = os.path.join(directory, "rcdemo-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    os.chmod(path, 0o644)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    """A cluster with one worker that builds environments; its own pip
    configuration (the device's index) offers the good rcdemo only."""
    import tempfile
    cluster = Cluster(tmp_path_factory.mktemp("ops48-venvs"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    places = tempfile.mkdtemp(prefix="rc-ops48-")      # task users pass through it
    os.chmod(places, 0o755)
    cluster.places = places
    wheel(os.path.join(places, "good"), "the device's own index")
    wheel(os.path.join(places, "evil"), "a submitter's index")
    cluster.venvs = os.path.join(places, "cache")
    cluster.index = HeldIndex()
    try:
        start_builder(cluster)
        yield cluster
    finally:
        cluster.index.close()
        cluster.stop()
        shutil.rmtree(places, ignore_errors=True)


class HeldIndex:
    """A find-links page on 127.0.0.1 that lists nothing, and that a test
    can make pip wait for (a slow index), so that a build is surely under
    way when it acts."""

    def __init__(self):
        import http.server
        import threading
        self.hold, self.release = threading.Event(), threading.Event()
        index = self

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if index.hold.is_set():
                    index.release.wait(60)
                body = b"<html><body></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stall(self):
        self.release.clear()
        self.hold.set()

    def answer(self):
        self.hold.clear()
        self.release.set()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def start_builder(cluster):
    """The worker, its pip told to take packages from the good place only."""
    saved = {name: os.environ.get(name) for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX",
                                                     "PIP_CONFIG_FILE")}
    os.environ.update(PIP_FIND_LINKS=os.path.join(cluster.places, "good") + " "
                      + cluster.index.url, PIP_NO_INDEX="1")
    os.environ.pop("PIP_CONFIG_FILE", None)
    try:
        cluster.start_worker("builder", "--slots", "2", "--venv-dir", cluster.venvs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    wait_for(lambda: "builder" in online(cluster), 30, "the worker")


def submitted(cluster, *args):
    done = cluster.rc("submit", *args, "--retries", "0", "--wait",
                      "--wait-timeout", "90", check=False)
    return done.stdout + done.stderr


@pytest.mark.e2e
def test_a_submitter_cannot_choose_the_index_another_tasks_environment_comes_from(builder):
    """One environment per set of specifiers serves every task that names
    the set; the build ran with the task's own variables, so a task's `--env
    PIP_FIND_LINKS=...` (or PIP_INDEX_URL) chose where the packages came
    from, and the next submitter's task with the same `--pip` imported that
    submitter's code."""
    first = submitted(builder, "shell", "true", "--pip", "rcdemo==1.0",
                      "--env", "PIP_FIND_LINKS=" + os.path.join(builder.places, "evil"))
    victim = submitted(builder, "python_eval", "__import__('rcdemo').WHO",
                       "--pip", "rcdemo==1.0")
    assert "the device's own index" in victim, (first, victim)


@pytest.mark.e2e
def test_a_worker_killed_mid_build_builds_again_when_it_is_back(builder):
    """kill -9 of the worker while a task user built an environment left a
    directory of that uid, never adopted. The task's next attempt, back on
    the same device (another uid), refused it ("belongs to uid N ... another
    task may have made it"): an environment failure charged to the task,
    which then avoided the device, its only one."""
    # A task that holds the first uid, so the build runs as another one.
    holder = builder.rc("submit", "shell", "sleep 300").stdout.split()[-1]
    wait_for(lambda: task_state(builder, holder) == "running", 30, "the first task")
    task_id = builder.rc("submit", "shell", "true", "--pip", "rcdemo>=0.9",
                         "--retries", "1").stdout.split()[-1]

    def building():
        return os.path.isdir(builder.venvs) and [
            name for name in os.listdir(builder.venvs) if not name.endswith(".lock")
            and os.lstat(os.path.join(builder.venvs, name)).st_uid != os.geteuid()]
    wait_for(building, 60, "the build to start")
    worker = builder.workers["builder"]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    builder.rc("cancel", holder)
    start_builder(builder)
    wait_for(lambda: task_state(builder, task_id) in TERMINAL_STATES, 90, "the task to end")
    assert task_state(builder, task_id) == "completed", builder.rc("task", task_id).stdout


@pytest.mark.e2e
def test_a_task_waiting_for_a_build_that_is_cut_short_builds_it_itself(builder):
    """Two tasks with one set: the second waits for the first's build. The
    first was cancelled (or timed out: a package that builds for an hour)
    mid-build, and the second, running as another uid, woke to a directory
    of the first's uid and refused it: "belongs to uid N ... another task
    may have made it", an environment failure, the device then avoided."""
    builder.index.stall()              # the first build waits on the index
    try:
        first = builder.rc("submit", "shell", "true", "--pip", "rcdemo<2").stdout.split()[-1]

        def building():
            return os.path.isdir(builder.venvs) and [
                os.path.join(builder.venvs, name) for name in os.listdir(builder.venvs)
                if not name.endswith(".lock")
                and os.lstat(os.path.join(builder.venvs, name)).st_uid != os.geteuid()]
        target = wait_for(building, 60, "the first build")[0]
        second = builder.rc("submit", "shell", "true", "--pip", "rcdemo<2",
                            "--retries", "1").stdout.split()[-1]
        lock = "%d" % os.stat(target + ".lock").st_ino

        def waiting():      # the second's driver waits for the lock (a blocked flock)
            with open("/proc/locks") as f:
                return any("->" in line and ":%s " % lock in line for line in f)
        wait_for(waiting, 60, "the second task to wait for the build")
        builder.rc("cancel", first)
    finally:
        builder.index.answer()
    wait_for(lambda: ended_or_retried(builder, second), 90, "the second task")
    assert task_state(builder, second) == "completed", builder.rc("task", second).stdout


def ended_or_retried(cluster, task_id):
    task = json.loads(cluster.rc("task", str(task_id), "--json").stdout)
    return task["state"] in TERMINAL_STATES or task["attempt"] > 1


def task_state(cluster, task_id):
    return json.loads(cluster.rc("task", str(task_id), "--json").stdout)["state"]


# -- rc logs ----------------------------------------------------------------------------

def test_rc_logs_device_names_a_device_that_does_not_exist(cluster_home, add_device):
    """`rc logs --device PI` (a typo, a case that differs) printed nothing
    and exited 0, as for a device with no lines: `rc logs --task N` says
    "no task N"."""
    add_device("pi")
    done = rc("logs", "--device", "PI")
    assert done.returncode != 0
    assert "no device 'PI' (did you mean pi?)" in done.stderr
    known = rc("logs", "--device", "pi")
    assert known.returncode == 0, known.stderr


@pytest.mark.parametrize("name", ["rc #2.db", "rc?.db", "rc 100%25.db"])
def test_a_backup_restores_whatever_its_file_is_named(cluster_home, tmp_path, name):
    """restore opened the backup as the URI file:PATH?mode=ro, unquoted:
    'rc #2.db' opened (and made) an empty database 'rc ' beside it, and was
    refused as "not a backup: no such table: tasks"; in 'rc 100%25.db' the
    %25 was read as an escape, and no such file opened."""
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "echo", {"message": "kept"})
    assert rc("backup", str(tmp_path / name)).returncode == 0
    tasks.submit(connection, config, "echo", {"message": "after the backup"})
    connection.close()
    done = rc("restore", str(tmp_path / name))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(str(tmp_path))) == sorted([name, "var"])
    restored = db.connect(config.db_path)
    try:
        assert [row[0] for row in restored.execute("SELECT task_id FROM tasks")] == [task_id]
    finally:
        restored.close()


def test_restore_of_a_directory_says_so(cluster_home, tmp_path):
    done = rc("restore", str(tmp_path))
    assert done.returncode != 0
    assert "is a directory; name the backup file" in done.stderr


def small_disk():
    """The child may write files of 100 kB at most: a disk that fills up
    (the write fails with EFBIG instead of killing it)."""
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))


def test_a_full_disk_is_named_and_leaves_no_partial_file(cluster_home, tmp_path):
    """A backup onto a full USB disk said only `rc: error: disk I/O error`
    (or `database or disk is full`): not which file, which disk."""
    config, connection = cluster_home
    target = str(tmp_path / "usb.db")
    done = subprocess.run([RC, "backup", target], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          preexec_fn=small_disk)
    assert done.returncode == 1
    assert "cannot write %s" % target in done.stderr
    assert not os.path.exists(target) and not os.path.exists(target + ".partial")
    assert rc("backup", target).returncode == 0
    connection.close()
    done = subprocess.run([RC, "restore", target], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          preexec_fn=small_disk)
    assert done.returncode == 1
    assert "cannot write %s" % config.db_path in done.stderr
    assert not os.path.exists(config.db_path + ".partial")


@pytest.mark.e2e
def test_a_tasks_input_files_do_not_run_in_the_build_of_an_environment(builder, tmp_path):
    """The build ran `python -m venv` and `python -m pip` in the task's
    directory, which `-m` puts first on sys.path: a `pip/` among the task's
    inputs ran instead of pip, as the task, before the worker adopted the
    environment, and wrote what the next task with the same set imported."""
    fake = tmp_path / "inputs" / "pip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os, sysconfig\n"
        "with open(os.path.join(sysconfig.get_paths()['purelib'], 'rcdemo.py'), 'w') as f:\n"
        "    f.write('WHO = \"a task\\'s own pip\"\\n')\n")
    first = submitted(builder, "shell", "true", "--pip", "rcdemo==1.0.0",
                      "--input", str(tmp_path / "inputs") + "/")
    victim = submitted(builder, "python_eval", "__import__('rcdemo').WHO",
                       "--pip", "rcdemo==1.0.0")
    assert "the device's own index" in victim, (first, victim)


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_second_backup_to_the_same_file_is_refused_while_the_first_writes(cluster_home, tmp_path, command):
    """Two `rc backup --force FILE` at once (cron's and one by hand) each
    removed the other's FILE.partial as it began: all failed ('disk I/O
    error', 'attempt to write a readonly database'), and one could have
    renamed the other's half-written copy to FILE. The same for restore."""
    import fcntl
    config, connection = cluster_home
    copy = str(tmp_path / "copy.db")
    assert rc("backup", copy).returncode == 0
    connection.close()
    written = copy if command == "backup" else config.db_path
    with open(written + ".partial", "w") as held:      # one under way
        fcntl.flock(held, fcntl.LOCK_EX)
        done = rc(command, "--force", copy) if command == "backup" else rc("restore", copy)
        assert done.returncode == 1
        assert "another `rc %s` is writing %s now" % (command, written) in done.stderr
        assert os.path.samefile(held.name, written + ".partial")


@pytest.mark.e2e
def test_a_task_that_times_out_building_its_environment_says_so(builder):
    """A package that builds for an hour (or an index that does not answer)
    ended the task 'timed out after 4 s' and nothing else: its stdout and
    stderr empty, as pip's output is kept for a failed build only."""
    builder.index.stall()
    try:
        task_id = builder.rc("submit", "shell", "true", "--pip", "rcdemo!=0.1",
                             "--timeout", "4", "--retries", "0").stdout.split()[-1]
        wait_for(lambda: task_state(builder, task_id) in TERMINAL_STATES, 60, "the timeout")
    finally:
        builder.index.answer()
    task = json.loads(builder.rc("task", task_id, "--json").stdout)
    assert task["state"] == "timed_out"
    assert "while building its Python environment" in task["error"], task["error"]
    assert "--timeout" in task["error"]


# -- schedules --------------------------------------------------------------------------

def test_a_firing_skipped_for_a_task_that_never_started_says_queued(cluster_home,
                                                                    monkeypatch, tmp_path):
    """A schedule for a task no device takes (`--require tags=gpu`, no such
    device): its first task waits queued, and every later firing said
    `skipped: task 1 still running`, a task that never ran."""
    from rc import commands, schedules
    config, connection = cluster_home
    clock = tmp_path / "clock"
    clock.write_text(repr(float(schedules.now() + 3600)))
    assert commands.run_command(["schedule", "add", "train", "@every 1m", "shell", "train.sh",
                                 "--require", "tags=gpu"], io.StringIO(), io.StringIO(),
                                config) == 0
    monkeypatch.setenv(schedules.TEST_CLOCK_VARIABLE, str(clock))
    log = type("Log", (), {"info": lambda *a, **k: None, "warning": lambda *a, **k: None})()
    assert schedules.fire_due(connection, config, log) == 1
    [task_id] = [row[0] for row in connection.execute("SELECT task_id FROM tasks")]
    clock.write_text(repr(float(schedules.now() + 60)))
    schedules.fire_due(connection, config, log)
    outcome = schedules.get(connection, "train")["last_outcome"]
    assert outcome == "skipped: task %d still queued (`rc why %d`)" % (task_id, task_id)
