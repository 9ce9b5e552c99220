"""Doorbells between programs: a ring wakes the sleeper at once; no listener
is no error."""
import os
import socket
import threading
import time

from rc import bell


def test_a_ring_wakes_the_waiting_program(tmp_path):
    doorbell = bell.Bell(str(tmp_path), "rc-scheduler")
    threading.Timer(0.05, bell.ring, (str(tmp_path), "rc-scheduler")).start()
    started = time.monotonic()
    assert doorbell.wait(5.0)
    assert time.monotonic() - started < 1.0
    assert not doorbell.wait(0.01)       # every ring was swallowed
    doorbell.close()


def test_many_rings_are_one_wake_up(tmp_path):
    doorbell = bell.Bell(str(tmp_path), "rc-server")
    for _ in range(100):
        bell.ring(str(tmp_path), "rc-server")
    assert doorbell.wait(1.0) and not doorbell.wait(0.01)
    doorbell.close()


def test_ringing_nobody_is_harmless(tmp_path):
    bell.ring(str(tmp_path), "rc-scheduler")          # no such socket
    doorbell = bell.Bell(str(tmp_path), "rc-scheduler")
    doorbell.close()
    bell.ring(str(tmp_path), "rc-scheduler")          # closed and removed


def test_a_predecessor_s_stale_bell_is_replaced(tmp_path):
    first = bell.Bell(str(tmp_path), "rc-server")
    first.socket.close()                               # killed with -9: file left
    second = bell.Bell(str(tmp_path), "rc-server")
    bell.ring(str(tmp_path), "rc-server")
    assert second.wait(1.0)
    second.close()


def test_a_pid_file_counts_only_while_supervisord_answers_on_its_socket(tmp_path):
    """What a power cut leaves: a pid file whose pid another process has now,
    and a socket file nobody listens on. `make stop` would signal that
    process if the pid file alone were believed."""
    run_dir = str(tmp_path)
    with open(os.path.join(run_dir, bell.SUPERVISOR_PID_FILE), "w") as f:
        f.write("%d\n" % os.getpid())
    assert bell.supervisord_pid(run_dir) is None
    path = os.path.join(run_dir, bell.SUPERVISOR_SOCKET)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(path)
    left.close()                                        # the socket file stays
    assert bell.supervisord_pid(run_dir) is None
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(path)
        listening.listen(1)
        assert bell.supervisord_pid(run_dir) == os.getpid()
