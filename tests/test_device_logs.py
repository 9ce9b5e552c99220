"""Issue 20: workers' logs on the main node, and live device figures.

A real worker against a stand-in main node first (what it sends to an old
main node and to a new one, and how a watch changes its heartbeats), then a
real cluster: a failing task's warning in `rc logs --device` and the API, a
hostile device's flood of log lines capped while the main node stays
unharmed, a watch that makes heartbeats come every second and then stop,
and an offline device's figures shown as stale, with their age."""
import json
import os
import sys
import time

import psutil
import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import unharmed
from rc import db, device_logs, protocol
from test_bad_input import connect, http, read_frame, register_frame
from test_worker import WAIT, WorkerProcess, main  # noqa: F401 (main: the stand-in main node)

FLOOD_MESSAGES = 300          # device_log messages of 50 lines the hostile device sends
LOG_RATE = 5.0                # device_log_rate in the cluster: a burst of 300 lines
LOG_LINES = 40                # device_log_lines in the cluster


# -- the ring and the allowance, on a real database ---------------------------------

def line(n, **fields):
    values = {"time": 1.7e9 + n, "level": "warning", "event": "line_%d" % n,
              "message": "m%d" % n, "task_id": n or None}
    values.update(fields)
    return values


def test_the_ring_keeps_the_latest_lines_of_each_device(cluster_home):
    _, connection = cluster_home
    for n in range(1, 251):
        with db.write(connection):
            device_logs.store(connection, "pi", device_logs.checked_lines({"lines": [line(n)]}),
                              2e9, keep=40 if n % device_logs.TRIM_EVERY == 0 else None)
            device_logs.store(connection, "nas", device_logs.checked_lines({"lines": [line(n)]}),
                              2e9)
    kept = device_logs.recent(connection, "pi", 1000)
    assert len(kept) == 40 + 50            # trimmed to 40 at line 200, 50 since
    assert [l["event"] for l in kept[-2:]] == ["line_249", "line_250"]      # newest last
    assert kept[-1] == {"id": kept[-1]["id"], "time": 1.7e9 + 250, "ts": 1.7e9 + 250,
                        "level": "warning",
                        "event": "line_250", "message": "m250", "task_id": 250}
    assert len(device_logs.recent(connection, "nas", 1000)) == 250     # another device's ring
    assert [l["event"] for l in device_logs.recent(connection, "pi", 3)] == [
        "line_248", "line_249", "line_250"]


def test_the_allowance_counts_what_it_refuses_and_says_so_once_the_flood_pauses():
    allowance = device_logs.Allowance(rate=1.0)           # a burst of 60 lines
    fifty = device_logs.checked_lines({"lines": [line(n) for n in range(50)]})
    assert len(allowance.admit("pi", fifty, now=0.0)[0]) == 50
    assert len(allowance.admit("pi", fifty, now=0.0)[0]) == 10
    assert allowance.admit("pi", fifty, now=1.0)[0] == fifty[:1]    # no word of drops yet
    assert len(allowance.admit("other", fifty, now=1.0)[0]) == 50   # its own bucket
    kept, _ = allowance.admit("pi", fifty[:1], now=10.0)
    assert [l[2] for l in kept] == [device_logs.DROPPED_EVENT, "line_0"]
    assert kept[0][3].startswith("89 lines from this device")


@pytest.mark.parametrize("name, bad", [
    ("51 lines", {"lines": [line(1)] * 51}), ("not a list", {"lines": {"a": 1}}),
    ("no lines", {}), ("a line that is text", {"lines": ["warning: x"]}),
    ("a long message", {"lines": [line(1, message="x" * 501)]}),
    ("a level of its own", {"lines": [line(1, level="fatal")]}),
    ("an event with a space", {"lines": [line(1, event="a b")]}),
    ("a long event", {"lines": [line(1, event="a" * 65)]}),
    ("a task id of 0", {"lines": [line(1, task_id=0)]}),
    ("a task id true", {"lines": [line(1, task_id=True)]}),
    ("a time of NaN", {"lines": [line(1, time=float("nan"))]}),
    ("no time", {"lines": [{"level": "info", "event": "x"}]})])
def test_malformed_lines_refuse_the_message(name, bad):
    with pytest.raises(protocol.ProtocolError):
        device_logs.checked_lines(bad)


# -- the worker against a stand-in main node ---------------------------------------

@pytest.fixture
def worker(main, tmp_path):
    started = WorkerProcess(sys.executable, main.port, str(tmp_path / "worker.log"))
    yield started
    started.stop()


def frames_of(frames, kind):
    return [frame["data"] for frame in frames if frame["message_type"] == kind]


def test_a_main_node_that_does_not_take_logs_gets_none(main, worker):
    link = main.accept()
    link.handshake()                      # an older main node: no device_logs in register_ack
    link.assign(1, "shell", {"command": "exit 3"})
    frames = link.pump(WAIT, wanted=lambda frames: frames_of(frames, "task_result"))
    frames += link.pump(2.0)                # and no device_log after it either
    results = frames_of(frames, "task_result")
    assert results and results[0]["status"] == "failed"
    assert frames_of(frames, "device_log") == []
    finished = worker.events("task_finished")
    assert finished and finished[0]["level"] == "warning"     # its own log says it still


def test_a_failed_task_is_forwarded_as_a_warning(main, worker):
    link = main.accept()
    link.handshake(device_logs=True)
    link.assign(7, "shell", {"command": "exit 3"})
    lines = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            line["event"] == "task_finished" for line in lines):
        for log in frames_of(link.pump(0.5), "device_log"):
            lines += log["lines"]
    finished = [line for line in lines if line["event"] == "task_finished"]
    assert finished, lines
    line = finished[0]
    assert line["level"] == "warning" and line["task_id"] == 7
    assert "status=failed" in line["message"] and "exit status 3" in line["message"]
    assert len(line["message"]) <= device_logs.MAX_MESSAGE_CHARS
    # What rc-server checks, the worker's lines pass.
    assert device_logs.checked_lines({"lines": lines})


def test_a_watch_makes_heartbeats_come_every_interval_until_it_ends(main, worker):
    link = main.accept()
    link.handshake(device_logs=True, heartbeat_interval=60)
    link.pump(1.0)                        # the heartbeat right after register_ack
    link.send("watch", {"interval": 1.0, "seconds": 5.0})
    # Seconds from the watch on the worker's clock (its log line, the
    # timestamps of its frames): a loaded machine that stalls the worker
    # or this test may merge or delay heartbeats, but adds none.
    watched = wait_for(lambda: worker.events("watched"), WAIT, "the watch")[0]["time"]
    frames = link.pump(max(0.0, watched + 8.0 - time.time()))
    beats = [frame["timestamp"] - watched for frame in frames
             if frame["message_type"] == "heartbeat"]
    assert all(frame["data"]["system_metrics"] for frame in frames
               if frame["message_type"] == "heartbeat")
    during = [t for t in beats if t <= 5.0]
    assert len(during) >= 2, beats
    # At most the one due as the watch ends comes after it, then 60 s stand.
    assert len([t for t in beats if t > 5.0]) <= 1, beats


def test_a_malformed_watch_is_answered_and_changes_nothing(main, worker):
    link = main.accept()
    link.handshake(heartbeat_interval=60)
    link.pump(1.0)
    link.send("watch", {"interval": "often", "seconds": 30})
    frames = link.pump(WAIT, wanted=lambda frames: frames_of(frames, "error"))
    frames += link.pump(2.0)                # and no heartbeat comes of it
    errors = frames_of(frames, "error")
    assert errors and errors[0]["code"] == "bad_request"
    assert frames_of(frames, "heartbeat") == []


# -- a real cluster ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("device-logs"), device_log_rate=LOG_RATE,
                      device_log_lines=LOG_LINES, watch_report_interval=1.0,
                      min_heartbeat_interval=0.5)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("good", "--slots", "2")
    wait_for(lambda: "good" in online(cluster), 30, "the good worker")
    cluster.token = open(cluster.config.token_path).read().strip()
    yield cluster
    cluster.stop()


def api(cluster, path, method=None, headers=None):
    status, body = http(cluster, path, data=b"" if method == "POST" else None,
                        headers=headers, method=method)
    return status, json.loads(body)


def device_lines(cluster, device_id):
    return cluster.db.execute("SELECT level, event, message, task_id FROM device_logs"
                              " WHERE device_id = ? ORDER BY id", (device_id,)).fetchall()


@pytest.mark.e2e
def test_a_failing_task_shows_in_rc_logs_device_and_the_api(cluster):
    task_id = int(cluster.rc("submit", "shell", "echo oops >&2; exit 4", "--require",
                             "device_id=good").stdout.strip())
    wait_for(lambda: [row for row in device_lines(cluster, "good")
                      if row["task_id"] == task_id and row["event"] == "task_finished"],
             30, "the worker's task_finished line on the main node")
    shown = cluster.rc("logs", "--device", "good", "-n", "200").stdout
    worker_lines = [line for line in shown.splitlines()
                    if "worker" in line and "task_finished" in line and str(task_id) in line]
    assert worker_lines and "exit status 4" in worker_lines[-1], shown
    assert "warn" in worker_lines[-1].lower()
    warnings_only = cluster.rc("logs", "--device", "good", "--level", "warning").stdout
    assert "task_finished" in warnings_only and "task_started" not in warnings_only

    status, body = api(cluster, "/api/v1/devices/good/logs?limit=5")
    assert status == 200 and 0 < len(body["logs"]) <= 5
    assert set(body["logs"][-1]) >= {"ts", "level", "event", "message", "task_id"}
    ids = [line["id"] for line in body["logs"]]
    assert ids == sorted(ids)                       # newest last
    finished = [line for line in body["logs"] if line["task_id"] == task_id
                and line["event"] == "task_finished"]
    assert finished and finished[0]["level"] == "warning"
    status, text = http(cluster, "/text/devices/good/logs?header=0")
    assert status == 200 and b"|task_finished|%d|" % task_id in text
    assert api(cluster, "/api/v1/devices/nobody/logs")[0] == 404
    assert api(cluster, "/api/v1/devices/good/logs?limit=lots")[0] == 400


def hostile(cluster, device_id):
    """A raw connection registered with the join token, as a hostile device opens one."""
    sock, nonce = connect(cluster)
    mine = protocol.new_nonce()
    sock.sendall(register_frame(cluster, nonce, device_id, None, mine))
    ack = read_frame(sock, timeout=5)
    assert ack["message_type"] == "register_ack" and ack["data"]["device_logs"] is True
    return sock


def log_frame(device_id, count, **line):
    fields = {"time": time.time(), "level": "error", "event": "flood", "message": "x" * 100,
              "task_id": None}
    fields.update(line)
    return protocol.encode("device_log", {"lines": [fields] * count}, sender_id=device_id)


def next_of(sock, kind, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = read_frame(sock, timeout=timeout)
        assert frame is not None, "the connection was closed"
        if frame["message_type"] == kind:
            return frame["data"]
    raise AssertionError("no %s" % kind)


JUNK = [("too many lines", {"count": 51}),
        ("a message over the cap", {"message": "x" * (device_logs.MAX_MESSAGE_CHARS + 1)}),
        ("an unknown level", {"level": "panic"}),
        ("an event that is not snake_case", {"event": "Drop Table"}),
        ("a task id that is text", {"task_id": "7"}),
        ("a time that is not a time", {"time": 1e300}),
        ("a message that is not text", {"message": {"nested": [1, 2]}})]


@pytest.mark.e2e
def test_a_flood_of_log_lines_is_capped_and_the_main_node_unharmed(cluster):
    server = psutil.Process(cluster.program_pid("rc-server"))
    memory_before = server.memory_info().rss
    with unharmed(cluster, "good"):
        sock = hostile(cluster, "flood")
        for name, junk in JUNK:       # each refused alone; the connection stays
            junk = dict(junk)
            sock.sendall(log_frame("flood", junk.pop("count", 1), **junk))
            error = next_of(sock, "error")
            assert error["code"] == "bad_request", (name, error)
        sock.sendall(protocol.encode("device_log", {"lines": "everything"}))
        assert next_of(sock, "error")["code"] == "bad_request"
        assert device_lines(cluster, "flood") == []

        cpu_before = sum(server.cpu_times()[:2])
        started = time.monotonic()
        sock.sendall(b"".join(log_frame("flood", device_logs.MAX_LINES_PER_MESSAGE)
                              for _ in range(FLOOD_MESSAGES)))
        sock.sendall(protocol.encode("heartbeat", {"system_metrics": {}}))
        next_of(sock, "heartbeat_ack", timeout=30)      # all of it read and answered
        cpu = sum(server.cpu_times()[:2]) - cpu_before
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        sock.sendall(log_frame("flood", 1, event="after_the_flood"))
        dropped = wait_for(lambda: [row for row in device_lines(cluster, "flood")
                                    if row["event"] == device_logs.DROPPED_EVENT], 10,
                           "the count of dropped lines")
        sent = FLOOD_MESSAGES * device_logs.MAX_LINES_PER_MESSAGE
        print("\nflood: %d lines in %.2f s cost rc-server %.2f s of CPU; %s"
              % (sent, elapsed, cpu, dropped[-1]["message"]))
        kept = LOG_RATE * (device_logs.BURST_SECONDS + elapsed + 2)
        assert int(dropped[-1]["message"].split()[0]) >= sent - kept
        rows = device_lines(cluster, "flood")
        # More than the ring holds were kept (so it was trimmed), never more than
        # the ring and one trim's worth at once.
        assert len(rows) <= LOG_LINES + device_logs.TRIM_EVERY
        assert rows[-1]["event"] == "after_the_flood"
        sock.sendall(protocol.encode("heartbeat", {"system_metrics": {}}))
        next_of(sock, "heartbeat_ack")                  # still served
        sock.close()
    assert server.memory_info().rss - memory_before < 32 * 1024 * 1024


def figures_at(cluster, device_id):
    """When the device's figures were last written: a heartbeat written,
    each one (its history keeps one a heartbeat_interval, test_hostile_s45)."""
    return cluster.db.execute("SELECT figures_at FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()[0]


@pytest.mark.e2e
def test_a_watch_brings_figures_every_second_then_the_heartbeat_stands(cluster):
    status, watch = api(cluster, "/api/v1/devices/good/watch", method="POST")
    assert status == 200 and watch["report_interval"] == 1.0
    assert 55 < watch["watched_until"] - time.time() <= 60
    again = api(cluster, "/api/v1/devices/good/watch", method="POST")[1]
    assert again["watched_until"] == watch["watched_until"]       # not written again
    assert api(cluster, "/api/v1/devices/nobody/watch", method="POST")[0] == 404
    assert api(cluster, "/api/v1/devices/good/watch", method="POST",
               headers={"Sec-Fetch-Site": "cross-site"})[0] == 403

    started, seen = time.time(), set()

    def three_heartbeats():
        written = figures_at(cluster, "good")
        if written > started:
            seen.add(written)
        return len(seen) >= 3
    # Three within 10 s: the watch's doing, with 60 s between heartbeats
    # otherwise; a loaded machine that stalls the worker may delay them.
    wait_for(three_heartbeats, 10, "three heartbeats of the watch")
    device = api(cluster, "/api/v1/devices/good")[1]
    assert device["stale"] is False and device["figures_age"] < 2.5

    # The watch ends (rc-server learns it from the database alone, as it
    # learns of the POST): the heartbeats go back to one a minute.
    ends = time.time() + 1.5
    with cluster.db:
        cluster.db.execute("UPDATE devices SET watched_until = ? WHERE device_id = 'good'",
                           (ends,))
    # Three seconds without one, where the watch brought one a second: it
    # ended (within 20 s; it would have run on for a minute). A worker a
    # loaded machine stalls counts a watch's seconds from when it reads them.
    def quiet():
        last = figures_at(cluster, "good")
        return time.time() > ends and time.time() - last >= 3.0
    wait_for(quiet, 20, "the heartbeats of the watch to end")


@pytest.mark.e2e
def test_an_offline_device_keeps_its_figures_marked_stale(cluster):
    worker = cluster.start_worker("brief", "--slots", "1")
    # A row of (None,) is truthy: wait for figures, not for the row.
    wait_for(lambda: cluster.db.execute("SELECT figures_at FROM devices WHERE device_id"
                                        " = 'brief' AND figures_at IS NOT NULL").fetchone(),
             30, "brief's figures")
    live = api(cluster, "/api/v1/devices/brief")[1]
    assert live["stale"] is False and live["metrics"]
    os.killpg(worker.pid, 9)
    worker.wait()
    wait_for(lambda: not cluster.db.execute("SELECT connected FROM devices"
                                            " WHERE device_id = 'brief'").fetchone()[0],
             30, "brief to drop")
    gone = api(cluster, "/api/v1/devices/brief")[1]
    assert gone["stale"] is True and gone["metrics"] == live["metrics"]
    assert gone["figures_at"] == live["figures_at"] and gone["figures_age"] >= 0
    listed = {d["device_id"]: d for d in api(cluster, "/api/v1/devices")[1]["devices"]}
    assert listed["brief"]["stale"] is True and listed["good"]["stale"] is False
    row = [line for line in cluster.rc("devices").stdout.splitlines()
           if line.startswith("brief ")][0]
    assert "old)" in row, row              # MEM% with its age, not as if live
    shown = cluster.rc("device", "brief").stdout
    assert "stale" in shown and "taken" in shown
    assert "live, taken" in cluster.rc("device", "good").stdout
