"""Attacks on small files that ride the worker connection (issue 18,
docs/protocol.md "Small files"), against a real cluster on 127.0.0.1: a
device that joined with the token and speaks rc-server's protocol by hand
(test_inline_files.Device), and the real bin/worker.py where a plain task
was enough to break it. After each attack the programs keep their pids and
a good worker's tasks complete (hostile_harness.unharmed)."""
import os
import time

import pytest

from cluster_harness import online, wait_for
from hostile_harness import unharmed
from rc import protocol, tasks
from test_inline_files import (Device, entry, in_store, outputs_of, sha, submit,
                               with_the_good_worker)

pytestmark = pytest.mark.e2e

GOOD = "inline-good"
FRAME_DEADLINE = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("hostile-inline"),
                                    files_quota_mb=64, frame_deadline=FRAME_DEADLINE)


def ended(cluster, task_id, timeout=20):
    """The task's row once it is terminal (an assertion error naming what
    `rc why` says if it is not within `timeout`)."""
    def terminal():
        return tasks.get(cluster.db, task_id)["state"] in ("completed", "failed", "timed_out",
                                                           "cancelled")
    try:
        wait_for(terminal, timeout, "task %d to end" % task_id)
    except AssertionError:
        raise AssertionError(cluster.rc("why", str(task_id), check=False).stdout)
    return tasks.get(cluster.db, task_id)


# -- the real worker -------------------------------------------------------------------

def test_an_empty_output_file_comes_back_and_the_task_ends(cluster):
    """An empty output is a small file of 0 bytes: the worker announced
    "inline_bytes": 0, which rc-server took for a frame it cannot follow and
    closed the connection; the worker reconnected and resent the result, for
    ever, and the task never ended."""
    task_id = submit(cluster, GOOD, "touch empty.txt; echo fine", "--output", "empty.txt")
    row = ended(cluster, task_id)
    assert row["state"] == "completed" and row["result"]["output"] == "fine\n", row
    assert outputs_of(cluster, task_id)["empty.txt"]["sha256"] == sha(b"")


def test_a_thousand_outputs_and_a_long_stdout_are_all_stored(cluster, tmp_path):
    """The worker keeps at most 1,000 outputs, and its stdout past the cap
    is one more file: it put all 1,001 inside the task_result, over the
    1,000 files rc-server takes in one, and rc-server stored none of them."""
    device_id = "inline-many"
    process = cluster.start_worker(device_id, "--slots", "1", "--output-cap", "1000",
                                   "--state-dir", str(tmp_path / "state"))
    try:
        wait_for(lambda: device_id in online(cluster), 30, device_id)
        task_id = submit(cluster, device_id, "mkdir out && for n in $(seq 1000); do echo $n >"
                         " out/$n.txt; done; head -c 5000 /dev/zero | tr '\\0' x",
                         "--output", "out/*.txt")
        row = ended(cluster, task_id, timeout=60)
        assert row["state"] == "completed", row
        stored = outputs_of(cluster, task_id)
        assert len([name for name in stored if name.startswith("out/")]) == 1000, \
            row["result"]["stderr"][:500]
        assert stored["out/7.txt"]["sha256"] == sha(b"7\n")
        assert stored[".rc/stdout"]["sha256"] == sha(b"x" * 5000)
    finally:
        process.terminate()
        process.wait(30)


# -- framing ---------------------------------------------------------------------------

def test_a_result_whose_bytes_never_come_is_dropped_at_the_frame_deadline(cluster):
    """A task_result announcing bytes, then silence: the connection held its
    frame for good (its inbox was empty, so it was not a frame in progress
    to the slow-loris sweep), as many as the device had connections."""
    device = Device(cluster, "inline-loris")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.bin")
            key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
            meta, _ = entry("out.bin", b"x" * 1000)
            device.send("task_result", dict(key, status="completed", error=None,
                                            result={"output": "", "stderr": ""},
                                            files_inline=[meta], inline_bytes=1000))
            started = time.monotonic()
            error = device.next("error")
            assert error["code"] == "frame_timeout", error
            assert time.monotonic() - started < FRAME_DEADLINE + 5
            assert device.reader.readline() == b""
    finally:
        device.close()
        cluster.rc("cancel", str(assign["task_id"]))


# -- the store -------------------------------------------------------------------------

def test_a_result_sent_again_while_its_files_are_stored_stores_nothing_more(cluster):
    """rc-server reads no more from a device with 16 results waiting for
    their files, counted by (task, attempt): the same result sent again and
    again counted once, so one held attempt queued as many files as the
    device cared to send (each result 512 KiB, 10,000 a second), all kept."""
    device = Device(cluster, "inline-again")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out/*")
            first = os.urandom(1024)
            again = [os.urandom(1024) for _ in range(40)]
            key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
            frames = b""
            for data in [first] + again:
                meta, _ = entry("out/a.bin", data)
                frames += protocol.encode("task_result", dict(
                    key, status="completed", error=None, result={"output": "", "stderr": ""},
                    files_inline=[meta], inline_bytes=len(data)), sender_id=device.device_id)
                frames += data
            device.sock.sendall(frames)
            assert device.next("task_result_ack") == key
            row = ended(cluster, assign["task_id"])
            assert row["state"] == "completed"
            assert outputs_of(cluster, assign["task_id"])["out/a.bin"]["sha256"] == sha(first)
            # rc-server reads a connection's frames in order, and writes a
            # result's small files on its loop as it reads the frame: once a
            # heartbeat sent after them is answered, all 40 were dealt with
            # (a fixed 2 s before).
            device.send("heartbeat", {"active_tasks": []})
            device.next("heartbeat_ack")
            assert [n for n, data in enumerate(again) if in_store(cluster, sha(data))] == []
    finally:
        device.close()


# -- entries ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [["out.bin"], {"out.bin": 1}])
def test_a_name_that_is_not_text_is_refused_alone(cluster, name):
    """A name that is a list or an object raised TypeError where rc-server
    looked for it among the names given so far: every file of the result
    was dropped, a good one with it, for a message naming no value."""
    device = Device(cluster, "inline-name-%s" % type(name).__name__)
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.bin", "--output", "fine.txt")
            data = os.urandom(100)
            bad = ({"name": name, "size": len(data), "sha256": sha(data)}, data)
            row = device.finish(assign, [bad, entry("fine.txt", b"kept")])
            assert row["state"] == "completed"
            assert "not stored: the name must be a non-empty text" in row["result"]["stderr"], \
                row["result"]["stderr"]
            assert {n: r["sha256"] for n, r in outputs_of(cluster, assign["task_id"]).items()} \
                == {"fine.txt": sha(b"kept")}
            assert not in_store(cluster, sha(data))
    finally:
        device.close()


# -- framing, spelled otherwise ----------------------------------------------------------

def result_line(device, assign, data, separators, escaped):
    """A task_result with one small output, as JSON another encoder writes."""
    import json
    meta, _ = entry("out.txt", data)
    envelope = {"message_type": "task_result", "sender_id": device.device_id,
                "timestamp": time.time(), "message_id": "m1",
                "data": {"task_id": assign["task_id"], "attempt": assign["attempt"],
                         "status": "completed", "error": None,
                         "result": {"output": "done\n", "stderr": ""},
                         "files_inline": [meta], "inline_bytes": len(data)}}
    line = json.dumps(envelope, separators=separators).encode()
    return line.replace(b'"inline_bytes"', b'"inline\\u005fbytes"') if escaped else line


def test_raw_bytes_behind_a_frame_in_json_spaced_as_python_writes_it_are_its_bytes(cluster):
    """json.dumps writes "inline_bytes": 5 (a space after the colon): its bytes,
    which hold newlines, are read as its bytes, and the frames after them as frames."""
    device = Device(cluster, "inline-spaced")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.txt")
            data = b"line one\nline two\n" + b"x" * 100 + b"\n"
            heartbeat = protocol.encode("heartbeat", {"active_tasks": []},
                                        sender_id=device.device_id)
            device.sock.sendall(result_line(device, assign, data, (", ", ": "), False) + b"\n"
                                + data + heartbeat)
            assert device.next("task_result_ack") == {"task_id": assign["task_id"],
                                                      "attempt": assign["attempt"]}
            assert outputs_of(cluster, assign["task_id"])["out.txt"]["sha256"] == sha(data)
            # The heartbeat behind the bytes was read as a frame: still in step.
            assert device.finish(device.take("true"), [])["state"] == "completed"
    finally:
        device.close()


def test_raw_bytes_behind_a_frame_whose_name_is_escaped_close_that_connection(cluster):
    """"inline\\u005fbytes" decodes to inline_bytes but is not the text rc-server
    splits frames at: the lines of the file's bytes were served as frames and
    the frames after them taken as its bytes. Such a frame is refused and the
    connection closed; nothing of it is stored."""
    device = Device(cluster, "inline-escaped")
    try:
        with unharmed(cluster, GOOD):
            assign = device.take("true", "--output", "out.txt")
            data = b"line one\nline two\n"
            heartbeat = protocol.encode("heartbeat", {"active_tasks": []},
                                        sender_id=device.device_id)
            device.sock.sendall(result_line(device, assign, data, (",", ":"), True) + b"\n"
                                + data + heartbeat)
            error = device.next("error")
            assert error["code"] == "bad_frame" and "must spell" in error["message"], error
            assert device.reader.readline() == b""
            assert not in_store(cluster, sha(data))
    finally:
        device.close()
        cluster.rc("cancel", str(assign["task_id"]))
