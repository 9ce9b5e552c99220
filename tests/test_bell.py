"""Doorbells between programs: a ring wakes the sleeper at once; no listener
is no error."""
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
