"""Doorbells: how one program tells another "look at the database now".

State is only ever shared through the SQLite file; a ring carries nothing
but the hint that something was committed. A waiting program sleeps on its
bell (a Unix datagram socket in the run directory) with a timeout, so a
missed or lost ring costs at most that timeout, never correctness: the
program still checks `PRAGMA data_version` when it wakes.
"""
import os
import select
import socket

SCHEDULER = "rc-scheduler"    # work to give out: a submit, a retry, a device to fill
# Room freed (a result, a device joining or heard from): the scheduler
# listens to this one only while tasks wait for room, so that on a cluster
# with nothing queued a result wakes nobody but who waits for it. Its name
# is no longer than the others': a socket's path has at most 107 bytes, and
# a run directory deep enough for theirs must hold it too.
SCHEDULER_ROOM = "rc-room"
SERVER = "rc-server"
# Assignments committed (rc-scheduler's ring): rc-server reads and sends
# them at once, in one statement, and leaves every other change to its
# usual look (SERVER above, or poll_interval). No longer than the others' names.
SERVER_ASSIGNED = "rc-assigned"
WEB = "rc-web"          # results committed: a request waiting for them looks now

_sender = None      # one unbound socket per process is enough to ring any bell

SOCKET_PATH_BYTES = 107     # bytes a Unix socket's path may hold here (sun_path, its NUL aside)
SUPERVISOR_SOCKET = "supervisor.sock"   # etc/supervisord.conf's, in the same run directory
SUPERVISOR_PID_FILE = "supervisord.pid"  # etc/supervisord.conf's, likewise
SUPERVISOR_TIMEOUT = 5.0    # seconds to wait for supervisord's socket (a wedged one must not hang cron)
PID_MAX_PATH = "/proc/sys/kernel/pid_max"
PID_MAX = 2 ** 22           # the most Linux allows pid_max to be, where it cannot be read


def socket_names():
    """The names of every socket the main node binds in its run directory.
    supervisord binds "<its socket>.<its pid>" first, then links it into
    place: with the longest pid this system gives, the longest of them."""
    try:
        with open(PID_MAX_PATH) as f:
            pid_max = int(f.read())
    except (OSError, ValueError):
        pid_max = PID_MAX
    return ["%s.%d" % (SUPERVISOR_SOCKET, pid_max - 1)] + [
        os.path.basename(path("", name)) for name in (SCHEDULER, SCHEDULER_ROOM, SERVER, SERVER_ASSIGNED, WEB)]


def run_dir_problem(run_dir):
    """Why the run directory cannot hold the main node's sockets (a clone
    under a deep directory), saying what to do; None when every one fits."""
    names = socket_names()
    longest = max((os.path.join(run_dir, name) for name in names),
                  key=lambda socket_path: len(os.fsencode(socket_path)))
    if len(os.fsencode(longest)) <= SOCKET_PATH_BYTES:
        return None
    return ("the socket %s is %d bytes long, over the %d a Unix socket's path may have:"
            " RC_HOME (%s) is too deep. Keep the cluster's state in a shorter directory,"
            " e.g. `make run RC_HOME=$HOME/rc-var` (or move the clone), then run again"
            % (longest, len(os.fsencode(longest)), SOCKET_PATH_BYTES,
               os.path.dirname(os.path.abspath(run_dir))))


def supervisor_answers(run_dir):
    """Does a supervisord listen on this run directory's socket? (One left
    behind by a supervisord that was killed refuses the connection.)"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(SUPERVISOR_TIMEOUT)
            probe.connect(os.path.join(run_dir, SUPERVISOR_SOCKET))
        return True
    except OSError:
        return False


def supervisord_pid(run_dir):
    """The pid of the supervisord that answers on this run directory's
    socket, or None: for `make run` and `make stop`, ~20 ms of CPU where
    `supervisorctl pid` took ~100. The pid file alone could be one a power
    cut left, naming a pid reused since; a socket that accepts is not."""
    if not supervisor_answers(run_dir):
        return None
    try:
        with open(os.path.join(run_dir, SUPERVISOR_PID_FILE)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def path(run_dir, name):
    return os.path.join(run_dir, name + ".bell")


def ring(run_dir, name):
    """Ring a program's bell; never blocks, never fails loudly."""
    global _sender
    if _sender is None:
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
    try:
        _sender.sendto(b"!", path(run_dir, name))
    except OSError:
        pass      # nobody listening, or the bell is full: it will look anyway


class Bell:
    """The bell a program waits on."""

    def __init__(self, run_dir, name):
        self.path = path(run_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        try:
            os.unlink(self.path)     # left by a predecessor killed with -9
        except FileNotFoundError:
            pass
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)

    def fileno(self):
        return self.socket.fileno()

    def wait(self, timeout):
        """Sleep until rung or `timeout` seconds pass; True when rung."""
        return wait_any([self], timeout)

    def drain(self):
        """Swallow every ring so far: one look at the database answers all."""
        rung = False
        while True:
            try:
                self.socket.recv(64)
                rung = True
            except (BlockingIOError, InterruptedError):
                return rung

    def close(self):
        self.socket.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def wait_any(bells, timeout):
    """Sleep until one of these bells rings or `timeout` seconds pass; True
    when rung (every ring so far swallowed)."""
    return bool(rung(bells, timeout))


def rung(bells, timeout):
    """wait_any(), saying which of the bells rang."""
    readable, _, _ = select.select(bells, [], [], max(0.0, timeout))
    return [doorbell for doorbell in readable if doorbell.drain()]
