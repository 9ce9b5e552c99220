"""bin/worker.py against a main node that lies about the small files it
sends behind a task_assign (issue 18, docs/protocol.md "Small files").

The main node is a fake on 127.0.0.1 (test_worker.py's), with the fake
rc-files of test_worker_files.py behind it; the worker is the real
bin/worker.py run as on a device. The fake sends inline bytes that do not
match their sha256, fewer or more bytes than it announces, a huge count,
input names that leave the task directory, an input it never sent, and
one input twice with different bytes. Each lie must end that attempt with
a clear error or be refused (the bytes then come from rc-files, which
checks them again), write nothing outside the task directory, leave only
true blobs in the device's cache, and leave the worker running the next
honest task.
"""
import hashlib
import itertools
import json
import os
import sys
import time

import pytest

from test_worker import WAIT, FakeMain, WorkerProcess, main  # noqa: F401 (fixture)
from test_worker_files import (FakeFiles, also_36, files, handshake, start,  # noqa: F401
                               state_dir)

GOOD = b"the true input\n" * 100
BAD = b"THE TRUE INPUT\n" * 100          # same size, other bytes


def sha(data):
    return hashlib.sha256(data).hexdigest()


def ref(data):
    return {"sha256": sha(data), "size": len(data)}


def cat_payload(data, path="in.txt"):
    """A shell task that prints its one input, given as `data` says."""
    return {"command": "cat %s" % path, "inputs": [dict(ref(data), path=path, mode=0o644)]}


def assign_with_bytes(link, task_id, payload, entries, raw, inline_bytes=None, after=b""):
    """A task_assign whose files_inline says `entries` and whose
    inline_bytes says `inline_bytes` (the true length unless given), with
    `raw` right behind it and then `after`."""
    data = {"task_id": task_id, "attempt": 1, "task_type": "shell", "payload": payload,
            "timeout": 30.0, "priority": "normal", "files_inline": entries,
            "inline_bytes": len(raw) if inline_bytes is None else inline_bytes}
    frame = json.dumps({"message_type": "task_assign", "sender_id": "main",
                        "timestamp": time.time(), "message_id": "t", "data": data})
    link.assigned.add((task_id, 1))       # still its own, should a lease_check ask
    link.send_raw(frame.encode() + b"\n" + raw + after)


def result_of(link, task_id, timeout=WAIT):
    """The task_result of `task_id`; frames of other tasks are left aside."""
    while True:
        results = link.results(1, timeout)
        if task_id in results:
            return results[task_id]


def honest_task_runs(link, task_id, files):
    """The worker still runs a task with an inline input sent truly."""
    data = b"honest %d\n" % task_id
    assign_with_bytes(link, task_id, cat_payload(data), [ref(data)], data)
    result = result_of(link, task_id)
    assert result["status"] == "completed", result
    assert result["result"]["output"] == data.decode()
    assert sha(data) not in files.blobs and (sha(data), 0) not in files.gets   # it came inline


def cache_holds_only_true_blobs(worker):
    """Every blob in the device's cache is what its name says."""
    cache = os.path.join(state_dir(worker), "cache")
    names = [name for name in os.listdir(cache) if len(name) == 64] \
        if os.path.isdir(cache) else []
    for name in names:
        with open(os.path.join(cache, name), "rb") as f:
            assert sha(f.read()) == name, "the cache holds a lie under %s" % name
    return set(names)


# What a task whose input rc-files does not hold ends with.
NOT_THERE = "inputs: in.txt (sha256 %s, %d bytes): rc-files: not_yours: no such file" % (
    sha(GOOD), len(GOOD))


def refused(worker):
    return worker.events("inline_file_refused")


# -- one worker for all the cases of a parametrized test ----------------------------
#
# A case costs a worker start and stop more than its two tasks: the cases of
# one parametrized test share a worker (and its link and fake rc-files).
# Each case lies with bytes of its own (the_case's good and bad: a cache
# holding another case's blob cannot answer for this one), its own task ids,
# and checks what this case added to the cache and the log. A case that
# fails ends the shared worker: the next case starts a fresh one.

class Case:
    """One case on the shared worker: its bytes, its task ids, and what
    the cache and the log held before it."""

    def __init__(self, shared, number):
        self.worker, self.link, self.files = shared.worker, shared.link, shared.files
        self.good = b"the true input %d\n" % number * 100
        self.bad = self.good.upper()           # same size, other bytes
        self.task_ids = shared.task_ids
        self.cache_before = cache_holds_only_true_blobs(self.worker)
        self.refused_before = len(refused(self.worker))
        self.home = shared.home

    def task_id(self):
        return next(self.task_ids)

    def not_there(self):
        return "inputs: in.txt (sha256 %s, %d bytes): rc-files: not_yours: no such file" % (
            sha(self.good), len(self.good))

    def cache_added(self):
        """The blobs this case added to the cache (all of them true); none
        it held before went missing."""
        now = cache_holds_only_true_blobs(self.worker)
        assert self.cache_before <= now, self.cache_before - now
        return now - self.cache_before

    def refused(self):
        return refused(self.worker)[self.refused_before:]


class Shared:
    def __init__(self, home):
        self.home = home
        self.main, self.files = FakeMain(), FakeFiles()
        self.worker = WorkerProcess(sys.executable, self.main.port,
                                    os.path.join(home, "worker.log"))
        self.link = self.main.accept()
        handshake(self.link, self.files.port)
        self.task_ids = itertools.count(1)
        self.cases = itertools.count(1)

    def close(self):
        try:
            self.worker.stop()
        finally:
            self.main.close()
            self.files.close()


@pytest.fixture(scope="module")
def shared_workers():
    workers = {}
    yield workers
    for shared in workers.values():
        shared.close()


@pytest.fixture
def the_case(request, shared_workers, tmp_path_factory):
    """A Case on the worker shared by the cases of this test function."""
    name = request.function.__name__
    shared = shared_workers.get(name)
    if shared is None or shared.worker.proc.poll() is not None:
        shared = shared_workers[name] = Shared(str(tmp_path_factory.mktemp("shared")))
    failed = request.session.testsfailed
    yield Case(shared, next(shared.cases))
    if request.session.testsfailed != failed or shared.worker.proc.poll() is not None:
        del shared_workers[name]             # out of step, maybe: a fresh one for the next
        shared.close()


# -- bytes that are not what they claim -------------------------------------------

@also_36
def test_bytes_that_fail_their_sha256_are_refused_and_fetched_from_rc_files(start, files,
                                                                            python):
    worker, link = start(python=python)
    files.add(GOOD)
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD)], BAD)
    result = result_of(link, 1)
    assert result["status"] == "completed", result
    assert result["result"]["output"] == GOOD.decode()      # rc-files' bytes, checked again
    assert (sha(GOOD), 0) in files.gets
    assert refused(worker)[0]["sha256"] == sha(GOOD)
    assert sha(BAD) not in cache_holds_only_true_blobs(worker)
    honest_task_runs(link, 2, files)


def test_bytes_that_fail_their_sha256_with_no_rc_files_copy_fail_the_attempt(start, files):
    worker, link = start()
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD)], BAD)
    result = result_of(link, 1)
    assert result["status"] == "failed", result
    assert result["error"] == NOT_THERE, result
    assert refused(worker)
    assert cache_holds_only_true_blobs(worker) == set()
    honest_task_runs(link, 2, files)


def test_the_same_input_twice_with_different_bytes_keeps_the_true_one(start, files):
    worker, link = start()
    # In one task_assign: a lie first, then the truth, under one sha256.
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD), ref(GOOD)], BAD + GOOD)
    assert result_of(link, 1)["result"]["output"] == GOOD.decode()
    # In a later one, once the cache holds it: the lie changes nothing.
    assign_with_bytes(link, 2, cat_payload(GOOD, "again.txt"), [ref(GOOD)], BAD)
    result = result_of(link, 2)
    assert result["status"] == "completed" and result["result"]["output"] == GOOD.decode()
    assert len(refused(worker)) == 2 and not files.gets
    assert cache_holds_only_true_blobs(worker) == {sha(GOOD)}
    honest_task_runs(link, 3, files)


def test_an_entry_whose_size_lies_is_refused(start, files):
    worker, link = start()
    short = GOOD[:-1]
    # Sizes that add up to the bytes sent, but split them wrongly.
    assign_with_bytes(link, 1, cat_payload(GOOD), [dict(ref(GOOD), size=len(short)),
                                                   dict(ref(BAD), size=len(BAD) + 1)],
                      short + b"\n" + BAD)
    result = result_of(link, 1)
    assert result["status"] == "failed" and result["error"] == NOT_THERE, result
    assert len(refused(worker)) == 2
    assert cache_holds_only_true_blobs(worker) == set()
    honest_task_runs(link, 2, files)


# -- counts that are not what follows ---------------------------------------------

@also_36
def test_fewer_bytes_than_announced_cost_the_connection_not_the_worker(start, files, main,
                                                                       python):
    worker, link = start(python=python)
    # The next frame's first bytes make up the count: whatever then reaches the
    # worker is out of step, and it must neither crash nor hold a lie.
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD)], GOOD[:-10],
                      inline_bytes=len(GOOD), after=b"0123456789")
    link.send("heartbeat_ack", {})
    result = result_of(link, 1)
    assert result["status"] == "failed" and result["error"] == NOT_THERE, result
    assert cache_holds_only_true_blobs(worker) == set()
    honest_task_runs(link, 2, files)
    # Fewer bytes and then silence: the worker waits for them, hears no more,
    # and registers again; the task it never got whole never started.
    assign_with_bytes(link, 3, cat_payload(GOOD), [ref(GOOD)], GOOD[:-10],
                      inline_bytes=len(GOOD))
    link.close()
    again = main.accept()
    register = handshake(again, files.port)
    assert register["active_tasks"] == []
    honest_task_runs(again, 4, files)
    assert cache_holds_only_true_blobs(worker) == {sha(b"honest 2\n"), sha(b"honest 4\n")}


@also_36
def test_more_bytes_than_announced_are_a_bad_frame_not_a_task(start, files, python):
    worker, link = start(python=python)
    files.add(GOOD)
    extra = b'{"message_type": "task_assign", "data": {"task_id": 9}} and more\n'
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD)], GOOD, after=extra)
    frames = [link.next()]
    while frames[-1]["message_type"] != "task_result":
        frames.append(link.next())
    errors = [f["data"] for f in frames if f["message_type"] == "error"]
    assert errors and errors[0]["code"] == "bad_frame"
    assert frames[-1]["data"]["task_id"] == 1
    assert frames[-1]["data"]["result"]["output"] == GOOD.decode()
    assert not files.gets
    honest_task_runs(link, 2, files)


@pytest.mark.parametrize("count", [2 ** 40, -5, 1.5, "1500", True, None])
def test_a_count_that_cannot_be_followed_sends_no_bytes_to_the_cache(the_case, count):
    """A huge, negative or not whole count: the worker reads no raw bytes
    (what follows is read as frames) and fetches the input instead."""
    case, link, files, good = the_case, the_case.link, the_case.files, the_case.good
    files.add(good)
    task_id, honest_id = case.task_id(), case.task_id()
    assign_with_bytes(link, task_id, cat_payload(good), [ref(good)], b"", inline_bytes=count)
    result = result_of(link, task_id)
    assert result["status"] == "completed" and result["result"]["output"] == good.decode()
    assert (sha(good), 0) in files.gets
    honest_task_runs(link, honest_id, files)
    assert case.cache_added() == {sha(good), sha(b"honest %d\n" % honest_id)}


def test_a_count_up_to_the_frame_limit_is_read_then_checked(start, files):
    """1 MiB, the most a frame may carry: taken, checked, and all refused."""
    worker, link = start()
    files.add(GOOD)
    junk = os.urandom(1024 * 1024)
    assign_with_bytes(link, 1, cat_payload(GOOD), [ref(GOOD)], junk)
    result = result_of(link, 1)
    assert result["status"] == "completed" and result["result"]["output"] == GOOD.decode()
    assert refused(worker)
    assert cache_holds_only_true_blobs(worker) == {sha(GOOD)}
    honest_task_runs(link, 2, files)


# files_inline entries, made of a case's good and bad bytes.
UNREADABLE = {"not a list": lambda good, bad: {"sha256": sha(good), "size": len(good)},
              "none": lambda good, bad: None,
              "an entry not an object": lambda good, bad: [sha(good)],
              "upper-case hex": lambda good, bad: [{"sha256": sha(good).upper(),
                                                    "size": len(good)}],
              "a negative size": lambda good, bad: [ref(good), {"sha256": sha(bad),
                                                                "size": -len(good)}],
              "a size not whole": lambda good, bad: [dict(ref(good), size=len(good) + 0.5)],
              "sizes short of the bytes": lambda good, bad: [dict(ref(good),
                                                                  size=len(good) - 1)],
              "sizes past the bytes": lambda good, bad: [ref(good), ref(bad)]}


@pytest.mark.parametrize("entries", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_files_inline_that_says_nothing_usable_caches_nothing(the_case, entries):
    case, link, good = the_case, the_case.link, the_case.good
    task_id = case.task_id()
    assign_with_bytes(link, task_id, cat_payload(good), entries(good, case.bad), good)
    result = result_of(link, task_id)
    assert result["status"] == "failed" and result["error"] == case.not_there(), result
    assert case.refused()
    assert case.cache_added() == set()
    honest_task_runs(link, case.task_id(), case.files)


def test_bytes_behind_a_frame_that_is_not_a_task_assign_are_skipped(start, files):
    worker, link = start()
    frame = {"message_type": "heartbeat_ack", "sender_id": "main", "timestamp": time.time(),
             "message_id": "t", "data": {"files_inline": [ref(GOOD)],
                                         "inline_bytes": len(GOOD)}}
    link.send_raw(json.dumps(frame).encode() + b"\n" + GOOD)
    honest_task_runs(link, 1, files)
    assert cache_holds_only_true_blobs(worker) == {sha(b"honest 1\n")}   # GOOD: not asked for
    assert worker.proc.poll() is None


# -- names that leave the task directory, inputs never sent --------------------------

OUTSIDE_NAMES = ["../escaped", "../../../../../../../../tmp/rc-lying-main-escaped",
                 "/tmp/rc-lying-main-escaped", "a/../../escaped", "a//b", "./a", "a/./b",
                 ".rc-stdin", ".rc/x", "nul\0byte", "", "x" * 300]


@pytest.mark.parametrize("name", OUTSIDE_NAMES, ids=repr)
def test_an_input_name_that_leaves_the_task_directory_fails_the_attempt(the_case, name):
    case, link, good = the_case, the_case.link, the_case.good
    task_id = case.task_id()
    assign_with_bytes(link, task_id, cat_payload(good, name), [ref(good)], good)
    result = result_of(link, task_id)
    assert result["status"] == "failed", result
    assert "relative path inside the task directory" in result["error"], result
    # (case.home holds the worker's log and state, as tmp_path did when each
    # case had a worker of its own.)
    for escaped in ("/tmp/rc-lying-main-escaped", os.path.join(case.home, "escaped")):
        assert not os.path.lexists(escaped)
    assert not [n for _, _, names in os.walk(case.home) for n in names if "escaped" in n]
    # The true bytes went to the cache nonetheless: they are what they say.
    assert case.cache_added() == {sha(good)}
    honest_task_runs(link, case.task_id(), case.files)


def test_inputs_that_collide_or_go_through_a_file_fail_the_attempt(start, files, tmp_path):
    worker, link = start()
    other = b"other\n"
    for task_id, paths in ((1, ["d", "d"]), (2, ["d", "d/x"]), (3, ["d/x", "d"])):
        payload = {"command": "ls -lR", "inputs": [
            dict(ref(data), path=path, mode=0o644) for data, path in zip((GOOD, other), paths)]}
        assign_with_bytes(link, task_id, payload, [ref(GOOD), ref(other)], GOOD + other)
        result = result_of(link, task_id)
        assert result["status"] == "failed", result
        assert "d" in result["error"] and ("twice" in result["error"]
                                           or "not a directory" in result["error"]
                                           or "exists" in result["error"]), result
    assert cache_holds_only_true_blobs(worker) == {sha(GOOD), sha(other)}
    honest_task_runs(link, 4, files)


def test_an_input_it_never_sent_nor_holds_fails_the_attempt_clearly(start, files):
    """The main node claims the device holds the input (it sends no bytes)
    and rc-files has no such file either."""
    worker, link = start()
    link.assign(1, "shell", cat_payload(GOOD))
    result = result_of(link, 1)
    assert result["status"] == "failed" and result["error"] == NOT_THERE, result
    assert (sha(GOOD), 0) in files.gets
    assert cache_holds_only_true_blobs(worker) == set()
    honest_task_runs(link, 2, files)


def test_inline_bytes_for_a_task_that_is_refused_stay_true(start, files):
    """Bytes behind a task_assign the worker refuses (a bad payload) are
    still only cached when they are what they claim."""
    worker, link = start()
    assign_with_bytes(link, 1, {"command": 5}, [ref(GOOD), ref(GOOD)], GOOD + BAD)
    result = result_of(link, 1)
    assert result["status"] == "failed", result
    assert cache_holds_only_true_blobs(worker) <= {sha(GOOD)}
    honest_task_runs(link, 2, files)


BAD_PAYLOADS = {   # name -> (payload of a case's good bytes, words the task's error holds)
    "inputs not a list": (lambda good: {"command": "true", "inputs": {"path": "a"}},
                          "'inputs' must be a list"),
    "too many inputs": (lambda good: {"command": "true", "inputs": [{}] * 10001},
                        "at most 10000"),
    "a path not a string": (lambda good: {"command": "true",
                                          "inputs": [dict(ref(good), path=["a"])]},
                            "relative path"),
    "stdin not a blob": (lambda good: {"command": "true", "stdin": {"sha256": "x", "size": 1}},
                         "'stdin' must be"),
    "checkpoint not a blob": (lambda good: {"command": "true", "checkpoint": "../x"},
                              "'checkpoint' must be"),
    "a script that is no input": (lambda good: {"file": "../in.txt", "inputs": [
        dict(ref(good), path="in.txt")]}, "not one of the task's inputs"),
}


@pytest.mark.parametrize("payload, words", list(BAD_PAYLOADS.values()), ids=list(BAD_PAYLOADS))
def test_a_payload_that_lies_about_its_inputs_fails_the_attempt(the_case, payload, words):
    case, link, good = the_case, the_case.link, the_case.good
    task_id = case.task_id()
    assign_with_bytes(link, task_id, payload(good), [ref(good)], good)
    result = result_of(link, task_id)
    assert result["status"] == "failed" and words in result["error"], result
    assert case.cache_added() == {sha(good)}
    honest_task_runs(link, case.task_id(), case.files)


def test_a_size_in_the_payload_that_is_not_the_blobs_fails_the_attempt(start, files):
    """The bytes arrive true, but the payload says the input is smaller:
    the cache keeps the true blob, and the task does not start on a file
    of another size than it was promised."""
    worker, link = start()
    files.add(GOOD)
    payload = cat_payload(GOOD)
    payload["inputs"][0]["size"] = 10
    assign_with_bytes(link, 1, payload, [ref(GOOD)], GOOD)
    result = result_of(link, 1)
    assert result["status"] == "failed", result
    assert result["error"] == ("inputs: in.txt: rc-files offers %d bytes of %s from byte 0, not"
                               " the 10 expected" % (len(GOOD), sha(GOOD))), result
    assert not worker.events("cache_blob_changed")
    assert cache_holds_only_true_blobs(worker) == {sha(GOOD)}
    honest_task_runs(link, 2, files)


def checkpoint_with_tricks(outside):
    """A checkpoint tar whose members try to leave the directory it is
    unpacked in: by name, through a link, as a link or a device."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        def add(name, data=b"x\n", **kinds):
            info = tarfile.TarInfo(name)
            info.size = len(data) if not kinds else 0
            for key, value in kinds.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(data) if not kinds else None)
        add("kept.txt", b"kept\n")
        add("../escaped-by-name")
        add(os.path.join(outside, "escaped-absolute"))
        add("link", type=tarfile.SYMTYPE, linkname=outside)
        add("link/through-the-link")
        add("hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        add("device", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("sub/../../escaped-by-dots")
    return buffer.getvalue()


def test_a_checkpoint_whose_members_try_to_leave_unpacks_only_what_stays(start, files,
                                                                        tmp_path):
    worker, link = start()
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = checkpoint_with_tricks(str(outside))
    payload = {"command": 'cd "$RC_CHECKPOINT_DIR" && find . | sort && find . -type l -o -type c'
                          ' -o -type b | sed s/^/SPECIAL:/', "checkpoint": ref(archive)}
    assign_with_bytes(link, 1, payload, [ref(archive)], archive)
    result = result_of(link, 1)
    assert result["status"] == "completed", result
    listing = result["result"]["output"].split()
    assert listing == [".", "./kept.txt", "./link", "./link/through-the-link"], listing
    assert os.listdir(str(outside)) == []
    assert not [name for _, _, names in os.walk(str(tmp_path)) for name in names
                if name.startswith("escaped")]
    assert worker.events("checkpoint_members_skipped")
    honest_task_runs(link, 2, files)
