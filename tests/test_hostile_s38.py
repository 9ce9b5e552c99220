"""attack38: Retire-Cluster attacked from outside as a stranger on the LAN,
a device gone bad, a hostile task and a hostile input would: what held is
in the session's report; each test here failed before the fix its
docstring names."""
import importlib.util
import os
import socket
import threading
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "..", "bin", "worker.py")


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
