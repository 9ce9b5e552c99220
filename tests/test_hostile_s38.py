"""attack38: Retire-Cluster attacked from outside as a stranger on the LAN,
a device gone bad, a hostile task and a local user would: a worker.py
download dripped by whoever answers at the main node's web port (rc
broadcast upgrade); a root worker's tasks and the kernel's keyrings (the
worker's session keyring, the user and persistent keyrings a reused uid
keeps) and an --isolate task and its user's login keyring; rc-web's
read_access=local taken by another local user bound to 127.0.0.2; the main
node's wall clock stepped forward and back under rc-reaper. Each test
failed before the fix its docstring names."""
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from cluster_harness import WORKER, Cluster, online, private, wait_for
from hostile_harness import assert_completes, readable_by_others, submit_to, unharmed
from rc import tasks


@pytest.fixture(scope="module")
def worker_module():
    spec = importlib.util.spec_from_file_location("rc_worker_module_s38", WORKER)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def dripping_server(head):
    """A listener on 127.0.0.1 answering its first request with `head`,
    then a byte of body every tenth of a second, for as long as it is read."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(head)
                while True:
                    connection.sendall(b"#")
                    time.sleep(0.1)
            except OSError:     # the worker hung up
                pass
    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("head", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 4000000\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nX-Drip: ",         # a header that never ends
])
def test_a_worker_py_served_a_byte_at_a_time_is_given_up_at_the_deadline(worker_module,
                                                                           monkeypatch, head):
    """`rc broadcast upgrade`: the worker downloads http://MAIN:WEB_PORT/
    worker.py in its loop. UPGRADE_TIMEOUT ("seconds the download may
    take") was urlopen's timeout, which bounds each wait for a byte, not
    the download: whoever answers at that address (rc-web on loopback,
    another program or a box that took the address) sending a byte now and
    then held the worker's loop, its heartbeats and results, for days (4
    MiB a byte at a time). Fails before: still downloading after 20 s of a
    2 s limit."""
    monkeypatch.setattr(worker_module, "UPGRADE_TIMEOUT", 2.0)
    listener = dripping_server(head)
    outcome = []

    def fetch():
        try:
            worker_module.fetch_worker("127.0.0.1", listener.getsockname()[1], "ab" * 32)
        except worker_module.UpgradeError as e:
            outcome.append(str(e))
    fetching = threading.Thread(target=fetch, daemon=True)
    fetching.start()
    fetching.join(20)
    listener.close()
    assert not fetching.is_alive(), "the download outlived its deadline"
    assert outcome and "within 2 seconds" in outcome[0], outcome


# -- a root worker's tasks and the kernel's keyrings --------------------------------

KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(platform.machine())
keyrings = pytest.mark.skipif(
    os.geteuid() != 0 or KEYCTL is None or not os.path.exists("/proc/keys"),
    reason="a uid per task needs a root worker; keyrings need Linux on x86-64 or arm64")

# A worker started as systemd starts a service (KeyringMode=private: a
# session keyring of its own) or from a root login (pam_keyinit), holding a
# key of root's there.
IN_A_SESSION_KEYRING = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(%(keyctl)d, ctypes.c_long(1), None) >= 0         # a session keyring
secret = b"root's own key"
assert libc.syscall(%(add_key)d, b"user", b"rc38-root", secret, ctypes.c_size_t(len(secret)),
                    ctypes.c_long(-3)) >= 0
os.execv(sys.executable, [sys.executable, "-I", %(worker)r] + sys.argv[1:])
"""
# A task: add a key to its session keyring (argument "add"), or print
# what its session keyring gives for each name.
KEY_TASK = ("python3 -c 'import ctypes, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "if sys.argv[1] == \"add\":\n"
            "    libc.syscall(%(add_key)d, b\"user\", b\"rc38-task\", b\"a task secret\","
            " ctypes.c_size_t(13), ctypes.c_long(-3)); print(\"added\")\n"
            "for name in (b\"rc38-root\", b\"rc38-task\"):\n"
            "    key = libc.syscall(%(keyctl)d, ctypes.c_long(10), ctypes.c_long(-3), b\"user\","
            " name, ctypes.c_long(0))\n"
            "    data = ctypes.create_string_buffer(64)\n"
            "    size = libc.syscall(%(keyctl)d, ctypes.c_long(11), ctypes.c_long(key), data,"
            " ctypes.c_long(64)) if key > 0 else -1\n"
            "    print(name.decode(), data.raw[:size] if size > 0 else None)' %%s")


PYTHON_KEY_TASK = ("import ctypes\n"
                   "libc = ctypes.CDLL(None, use_errno=True)\n"
                   "key = libc.syscall(%d, ctypes.c_long(10), ctypes.c_long(-3), b'user',"
                   " b'rc38-root', ctypes.c_long(0))\n"
                   "print('rc38-root', 'found' if key > 0 else None)\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster; its good worker is root (tasks as 61820-61823) and,
    as a system service's is, in a session keyring of its own."""
    cluster = Cluster(tmp_path_factory.mktemp("s38"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        start_in_keyring(cluster, GOOD, "--slots", "2", "--task-user", "61820:4")
        wait_for(lambda: GOOD in online(cluster), 30, "the worker " + GOOD)
        yield cluster
    finally:
        cluster.stop()
    assert readable_by_others(cluster.home) == []


GOOD = "good38"


def output_of(cluster, task_id):
    return tasks.get(cluster.db, task_id)["result"]["output"]


def start_in_keyring(cluster, device_id, *extra):
    if KEYCTL is None:
        return cluster.start_worker(device_id, *extra)
    wrapper = os.path.join(cluster.home, "in_keyring.py")
    with open(wrapper, "w", opener=private) as f:
        f.write(IN_A_SESSION_KEYRING % dict(keyctl=KEYCTL[1], add_key=KEYCTL[0],
                                            worker=os.path.abspath(WORKER)))
    return cluster.start_worker(device_id, *extra, worker=wrapper)


@keyrings
def test_a_task_has_a_session_keyring_of_its_own(cluster):
    """A task's process was born with the worker's session keyring, and a
    keyring one's session is, it possesses, whatever its uid: every task of
    a root worker read root's own keys there, and what one task added any
    other task read, as long as the worker ran. Fails before: the second
    task (another uid, and the same one later) printed both keys."""
    command = KEY_TASK % dict(keyctl=KEYCTL[1], add_key=KEYCTL[0])
    with unharmed(cluster, GOOD):
        writer = submit_to(cluster, GOOD, command % "add")
        assert_completes(cluster, writer, "added")
        for _ in range(2):      # one of each of the two slots' uids
            reader = submit_to(cluster, GOOD, command % "look")
            assert_completes(cluster, reader, "rc38-root None\nrc38-task None\n")
        # A Python task, forked from the spawner's template rather than spawned.
        done = cluster.rc("submit", "python_exec", PYTHON_KEY_TASK % KEYCTL[1], "--require",
                          "device_id=%s" % GOOD)
        assert_completes(cluster, int(done.stdout.strip()), "rc38-root None\n")


# A task of a uid: keep a key in the uid's user keyring and persistent
# keyring ("add"), or link both into its session (as any process of the uid
# may) and print what it finds there ("look"); its uid first.
UID_KEY_TASK = ("python3 -c 'import ctypes, os, sys\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                "print(os.getuid())\n"
                "libc.syscall(%(keyctl)d, ctypes.c_long(8), ctypes.c_long(-4), ctypes.c_long(-3))\n"
                "persistent = libc.syscall(%(keyctl)d, ctypes.c_long(22), ctypes.c_long(-1),"
                " ctypes.c_long(-4))\n"
                "if sys.argv[1] == \"add\":\n"
                "    for name, ring in ((b\"rc38-user\", -4),"
                " (b\"rc38-persistent\", persistent)):\n"
                "        assert libc.syscall(%(add_key)d, b\"user\", name, b\"left behind\","
                " ctypes.c_size_t(11), ctypes.c_long(ring)) > 0, name\n"
                "    print(\"added\")\n"
                "for name in (b\"rc38-user\", b\"rc38-persistent\"):\n"
                "    key = libc.syscall(%(keyctl)d, ctypes.c_long(10), ctypes.c_long(-3),"
                " b\"user\", name, ctypes.c_long(0))\n"
                "    print(name.decode(), \"found\" if key > 0 else None)' %%s")


@keyrings
def test_a_task_finds_no_key_its_uid_left(cluster):
    """A uid's user keyring and persistent keyring outlive its task (the
    persistent one three days), and task uids are reused: the next task of
    the uid, any submitter's, linked them into its session and read what
    the last one kept there (a credential a tool stores, a plant for the
    next). As SysV IPC: removed before the uid's next task. Fails before:
    the next task of the uid found both."""
    command = UID_KEY_TASK % dict(keyctl=KEYCTL[1], add_key=KEYCTL[0])
    with unharmed(cluster, GOOD):
        writer = submit_to(cluster, GOOD, command % "add")
        assert_completes(cluster, writer, "added")
        uid = output_of(cluster, writer).split()[0]
        # Two at once: each slot's uid (the lowest free is taken), the writer's among them.
        readers = [submit_to(cluster, GOOD, "sleep 1; " + command % "look") for _ in range(2)]
        for reader in readers:
            assert_completes(cluster, reader, "rc38-user None\nrc38-persistent None\n")
        assert uid in [output_of(cluster, reader).split()[0] for reader in readers]


# -- rc-web's read_access=local -------------------------------------------------------

# As another local user: connect to rc-web from 127.0.0.N, bound to the port
# of an established socket of the main node's user (rc-web's own listening
# port: its side of this very connection is one), and print each answer.
SAME_PORT_READER = r"""import os, socket, sys
os.setgid(65534)
os.setuid(65534)
port = int(sys.argv[1])
for last in range(2, 22):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.%d" % last, port))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/v1/tasks HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    print(answer.split(b"\r\n")[0].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/proc/net/tcp")
                    or not os.path.exists("/usr/bin/python3"),
                    reason="another uid needs root to become; socket owners need /proc")
def test_another_local_user_is_not_taken_for_the_main_nodes_own(cluster):
    """read_access=local: rc-web found the owner of a loopback client's
    socket by its port alone in /proc/net/tcp, the first established
    socket with that local port: another local user (or a task on the local
    worker) bound to 127.0.0.2:WEB_PORT matched rc-web's own side of its
    connection and read every task, payloads and results, without the
    token (the local worker's connection's port serves as well with rc-web
    on 0.0.0.0). Now the client's end is matched by its address and port,
    and the remote end's port. Fails before: 200 for about half of the 20
    connections."""
    with unharmed(cluster, GOOD):
        done = subprocess.run(["/usr/bin/python3", "-I", "-c", SAME_PORT_READER,
                               str(cluster.config.web_port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        answers = done.stdout.splitlines()
        assert len(answers) == 20, done.stdout[-2000:]
        assert all(" 401 " in answer for answer in answers), answers


# -- a worker of a normal user with --isolate, in that user's login keyring ---------

def nobody_can_isolate():
    from test_hostile_s34 import nobody_has_user_namespaces
    return os.geteuid() == 0 and KEYCTL is not None and nobody_has_user_namespaces()


# The user's own "interpreter" for WorkerProcess: python3 as nobody, in a
# session keyring that holds a key of the user's (a login's, pam_keyinit).
AS_NOBODY_IN_A_KEYRING = """#!/bin/sh
exec %(setpriv)s --reuid=%(nobody)d --regid=%(gid)d --clear-groups env HOME=%(home)s \\
    %(python)s -I -c 'import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(%(keyctl)d, ctypes.c_long(1), None) >= 0
secret = b"the user key"
assert libc.syscall(%(add_key)d, b"user", b"rc38-user", secret, ctypes.c_size_t(len(secret)),
                    ctypes.c_long(-3)) >= 0
os.execv(sys.executable, [sys.executable] + sys.argv[1:])' "$@"
"""
LOOK_FOR_THE_USER_KEY = ("python3 -c 'import ctypes\n"
                         "libc = ctypes.CDLL(None, use_errno=True)\n"
                         "key = libc.syscall(%d, ctypes.c_long(10), ctypes.c_long(-3), b\"user\","
                         " b\"rc38-user\", ctypes.c_long(0))\n"
                         "print(\"found\" if key > 0 else \"none\")'")


@pytest.mark.skipif(not nobody_can_isolate(),
                    reason="needs root (to run the worker as nobody), user namespaces and"
                           " keyrings on x86-64 or arm64")
def test_an_isolated_task_has_a_session_keyring_of_its_own():
    """--isolate hides the worker's user's secrets from its tasks; its
    session keyring (a login's, which pam_keyinit links to the user's own
    keyring) stayed theirs to read. Fails before: 'found'."""
    from test_sandbox import NOBODY, SETPRIV, SYSTEM_PYTHON
    from test_worker import FakeMain, WorkerProcess
    import pwd
    top = tempfile.mkdtemp(prefix="rc-test-s38-")     # pytest's tmp_path is root's only
    os.chmod(top, 0o755)
    home = os.path.join(top, "home")
    os.mkdir(home)
    os.chown(home, NOBODY, -1)
    python = os.path.join(home, "python-in-a-keyring")
    with open(python, "w") as f:
        f.write(AS_NOBODY_IN_A_KEYRING % dict(
            setpriv=SETPRIV, nobody=NOBODY, gid=pwd.getpwnam("nobody").pw_gid, home=home,
            python=SYSTEM_PYTHON, keyctl=KEYCTL[1], add_key=KEYCTL[0]))
    os.chmod(python, 0o755)
    state = os.path.join(home, "state")
    os.mkdir(state, 0o700)
    os.chown(state, NOBODY, -1)
    main = FakeMain()
    worker = WorkerProcess(python, main.port, os.path.join(home, "worker.log"),
                           "--state-dir", state, "--isolate")
    try:
        link = main.accept()
        link.handshake()
        result = link.run("shell", {"command": LOOK_FOR_THE_USER_KEY % KEYCTL[1]})
        assert result["status"] == "completed", result
        assert result["result"]["output"] == "none\n", result
    finally:
        worker.stop()
        main.close()
        shutil.rmtree(top, ignore_errors=True)


# -- the main node's clock jumps forward (an NTP step, a clock set by hand) --------

class JumpingClock:
    """time.time and time.monotonic for rc-reaper's loop, and its stop flag:
    between its first and second sweep the wall clock jumps an hour ahead
    while one second passes; it stops after the second."""

    JUMP = 3600.0

    def __init__(self, wall):
        self.wall, self.mono, self.sweeps = wall, 100.0, 0

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono

    def __call__(self):         # should_stop
        return self.sweeps >= 2

    def pause(self, seconds):
        self.sweeps += 1
        self.wall += self.JUMP + 1.0
        self.mono += 1.0


def test_a_forward_jump_of_the_clock_fails_no_running_task(tmp_path, monkeypatch):
    """Every time in the database is the wall clock's: after a jump of an
    hour the reaper's next sweep failed every task running for good
    (timed_out: its device's result then went nowhere), took back every
    lease and put every device offline, as if an hour had passed. Now
    rc-reaper notices the jump (the wall clock moving past the monotonic
    one) and moves the times written before it by as much. Fails before:
    ('queued', 2): the device put offline, its running task taken back."""
    import io
    from rc import config as config_module
    from rc import db, devices, reaper, scheduler
    from rc.log import Logger
    log = Logger("test", "error", io.BytesIO())
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    start = time.time()
    data = {"device_info": {"platform": "linux", "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": 2, "memory_gb": 4.0}, "task_types": ["shell"],
            "slots": 1, "role": "compute"}
    with db.write(connection):
        devices.register(connection, "steady", data, "127.0.0.1:1", start)
    task_id = tasks.submit(connection, config, "shell", {"command": "sleep 1200"},
                           timeout=600)
    scheduler.schedule(connection, start, log, config)
    with db.write(connection):
        tasks.accept(connection, task_id, 1, "steady", start, 180.0)
        devices.heartbeat(connection, "steady", {}, start)
    clock = JumpingClock(start + 1.0)
    monkeypatch.setattr(reaper, "time", clock)
    reaper.run(config, log, clock)
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"]) == ("running", 1), task
    device = connection.execute("SELECT status FROM devices WHERE device_id = 'steady'")
    assert device.fetchone()[0] == "online"
    connection.close()


class ClockSteppingBack(JumpingClock):
    """A minute and a second pass between the two sweeps, while the wall
    clock is set back a day."""

    def pause(self, seconds):
        self.sweeps += 1
        self.wall -= 86400.0
        self.mono += 61.0


def test_a_backward_step_of_the_clock_holds_up_no_minute_of_upkeep(tmp_path, monkeypatch):
    """rc-reaper ran its minute's upkeep (the history row, the alert rules,
    retention and the file store's sweep) when the wall clock passed the
    last run's plus a minute: set back a day, it ran none for a day, and
    no alert fired meanwhile. Now the minute is the monotonic clock's.
    Fails before: one run of the two."""
    import io
    from rc import config as config_module
    from rc import housekeeping, reaper
    from rc.log import Logger
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    runs = []
    monkeypatch.setattr(housekeeping, "every_minute", lambda *arguments: runs.append(1))
    clock = ClockSteppingBack(time.time())
    monkeypatch.setattr(reaper, "time", clock)
    reaper.run(config, Logger("test", "error", io.BytesIO()), clock)
    assert len(runs) == 2


# -- what a task's uid leaves in shared places, after the task ----------------------

@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/dev/shm"),
                    reason="a uid per task needs a root worker")
def test_what_a_task_leaves_in_dev_shm_goes_when_it_ends(cluster):
    """/dev/shm is memory. What a task's uid left there (and in /tmp,
    /var/tmp...) was removed only before that uid's next task, and uids are
    taken lowest first: the uid of a second slot, used only while another
    task ran, may not run again for days, and its task's files held the
    device's memory (or disk) all that time. Now they go at its task's end
    too. Fails before: the file is still there 10 s after its task ended."""
    name = "/dev/shm/rc38-%d" % os.getpid()
    try:
        with unharmed(cluster, GOOD):
            holder = submit_to(cluster, GOOD, "sleep 3; echo held")
            wait_for(lambda: tasks.get(cluster.db, holder)["state"] == "running", 20,
                     "the first slot taken")
            leaver = submit_to(cluster, GOOD, "head -c 1048576 /dev/zero > %s; id -u" % name)
            assert_completes(cluster, leaver, "\n")
            assert_completes(cluster, holder, "held")
            wait_for(lambda: not os.path.exists(name), 10, "%s removed" % name)
    finally:
        if os.path.exists(name):
            os.remove(name)
