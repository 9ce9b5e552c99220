"""max_receive_mb: rc-server reads at most so many MiB a second from one
connection, so that a device sending as fast as it can does not hold the
loop every other device waits on. What comes faster waits in its socket;
the connection stays, and everything it sent is served, later."""
import time

import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import unharmed
from rc import protocol, state_dir
from rc.states import MAX_FRAME_BYTES
from test_inline_files import Device

pytestmark = pytest.mark.e2e

GOOD = "good-rate"
RATE_MB = 1
FRAME_CHARS = 64 * 1024
FRAMES = 96             # 6 MiB: the 2 MiB burst and a read's 1 MiB, then ~3 s
# Shorter than the flood: its frames come back to back, each read ending
# inside the next, and none of them is late (see the test's docstring).
FRAME_DEADLINE = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("rate"), base={"max_receive_mb": RATE_MB,
                                                                 "frame_deadline": FRAME_DEADLINE})
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(GOOD, "--slots", "2")
        wait_for(lambda: GOOD in online(cluster), 30, "the worker " + GOOD)
        cluster.token = state_dir.read_secret(cluster.config.token_path)
        cluster.secrets = {}
        yield cluster
    finally:
        cluster.stop()


def test_a_device_sending_fast_is_read_at_its_rate_and_kept(cluster):
    """Before: rc-server read whatever a device sent as fast as it came (a
    flood of 64 KiB frames of any type kept a core busy: ~250 MB/s), and
    these 5 MiB were all served within a second. Now the marker frame sent
    behind them is answered only once the bucket let them through (2 MiB of
    burst, then 1 MiB a second), on the same connection, while the good
    worker's tasks complete meanwhile. And the flood lasts longer than
    frame_deadline: rc-server once timed its frames from the first one left
    unfinished at the end of a read, until a read ended on a frame's end
    (never, here), and refused the device as a slow-loris (frame_timeout)."""
    device = Device(cluster, "fast-rate")
    # Output of a task nobody watches: dropped unread, the cheapest frame
    # for rc-server, so what limits the pace here is the rate alone.
    frame = protocol.encode("task_output", {
        "task_id": 999999, "attempt": 1, "stream": "stdout", "start": 0,
        "end": FRAME_CHARS, "data": "x" * FRAME_CHARS}, sender_id="fast-rate")
    marker = protocol.encode("no_such_message", {}, sender_id="fast-rate")
    with unharmed(cluster, GOOD):
        started = time.monotonic()
        # Sent, then read: one thread at a time. A TLS socket (OpenSSL's SSL
        # object) written by one thread while another reads it breaks now
        # and then: in a CI run the test saw its connection end mid-flood.
        # The answer can only be read later than it came, so the bound
        # below still holds for a server that reads at the rate, and still
        # fails for one that reads the 6 MiB at once (sendall returns then).
        device.sock.sendall(frame * FRAMES + marker)
        answer = device.next("error")
        elapsed = time.monotonic() - started
    assert answer["code"] == "unknown_message", answer
    # The burst, and the last read's bytes (a read is charged once made: up
    # to a frame's limit and one more recv), come at once; the rest at the rate.
    sent_mb = len(frame) * FRAMES / 1048576.0
    at_once_mb = 2 * RATE_MB + (MAX_FRAME_BYTES + 64 * 1024) / 1048576.0
    assert elapsed >= (sent_mb - at_once_mb) / RATE_MB * 0.9, \
        "%.1f MiB read in %.2f s at %d MiB/s" % (sent_mb, elapsed, RATE_MB)
    # Not refused: the same connection is served as before.
    device.send("no_such_message_either", {})
    assert device.next("error")["code"] == "unknown_message"
    assert "fast-rate" in online(cluster)
    device.sock.close()
