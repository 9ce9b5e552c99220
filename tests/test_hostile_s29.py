"""Session 29's attacks: a stranger on the LAN and a hostile enrolled
device, on the newest paths (a task taken back and released, checkpoints
handed from one device to the next). After each attack on a running main
node the programs keep their pids and a good worker's tasks complete
(hostile_harness.unharmed)."""
import glob
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

import pytest

from cluster_harness import log_records, wait_for
from hostile_harness import unharmed
from rc import audit, db, protocol, web_results
from test_bad_input import read_frame, registered
from test_files_hostile import authenticated
from test_hostile_web import request
from test_hostile_round23 import mallory  # noqa: F401 (a fixture)
from test_inline_files import with_the_good_worker
from test_worker import WORKER, interpreter_version

PYTHON36 = [path for path in sorted(glob.glob(os.path.expanduser(
    "~/.pyenv/versions/3.6*/bin/python3")), key=interpreter_version)]


# -- a checkpoint whose names the next device cannot encode ---------------------------

RESTORE = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
print(sys.getfilesystemencoding())
worker.restore_checkpoint(sys.argv[2], sys.argv[3], "0" * 64)
print(sorted(os.listdir(sys.argv[3])))
"""


@pytest.mark.skipif(not PYTHON36, reason="no CPython 3.6 under ~/.pyenv/versions")
def test_a_checkpoint_name_the_next_device_cannot_encode_is_set_aside_not_failed(tmp_path):
    """CPython 3.6 in the C locale (a service started without LANG)
    encodes file names as ASCII: a checkpoint holding 'café.txt' (a
    hostile device's, or an honest one's from a UTF-8 device) raised
    UnicodeEncodeError, which restore_checkpoint let through, so the
    attempt failed ('inputs: UnicodeEncodeError') on each such device
    instead of starting afresh as docs/security.md says."""
    archive_path = tmp_path / "checkpoint.tar"
    with tarfile.open(str(archive_path), "w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("caf\u00e9.txt")
        member.size = 5
        archive.addfile(member, io.BytesIO(b"hello"))
    directory = tmp_path / "restored"
    directory.mkdir()
    done = subprocess.run([PYTHON36[0], "-c", RESTORE, WORKER, str(archive_path),
                           str(directory)],
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    encoding, listing = done.stdout.split()[-2:]
    assert encoding == "ascii", "this check needs the C locale's ASCII file names"
    assert listing == "[]"
    assert '"checkpoint_set_aside"' in done.stdout + done.stderr


# -- a device floods rc-server's log with results and acceptances of no task ---------

def rc_server_events(cluster, event, device_id):
    """rc-server's log lines that are `event` about `device_id`, as dicts."""
    return log_records(cluster, "rc-server", event=event, device_id=device_id)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s29"), "good",
                                        auth_timeout=2.0):
        cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
        yield cluster


FLOOD = 3000


# (message, its data but the task, the event it logs, the answer to each)
FLOODS = [("task_result", {"status": "cancelled"}, "stale_result", "error"),
          ("task_accept", {}, "stale_accept", "task_cancel"),
          ("lease_check", None, "lease_check", "lease_check_ack")]


@pytest.mark.e2e
@pytest.mark.parametrize("kind, data, event, answer", FLOODS)
def test_answers_for_tasks_a_device_never_held_cost_a_few_log_lines_not_one_each(
        cluster, mallory, kind, data, event, answer):
    """A joined device may send 10,000 messages a second (max_message_rate).
    Each task_result or task_accept for a (task, attempt) it does not hold,
    and each lease_check, wrote one line to rc-server's log, which
    supervisord keeps at 6 x 10 MB: a minute of them rotated away every
    line the main node had logged about every device. Such lines are
    throttled per device (LimitedLog), the number held back told with the
    next one (`suppressed`)."""
    before = len(rc_server_events(cluster, event, "mallory"))
    with unharmed(cluster, "good"):
        frames = []
        for n in range(FLOOD):
            task = {"task_id": 10 ** 9 + n, "attempt": 1}
            frames.append(protocol.encode(kind, {"tasks": [task]} if data is None
                                          else dict(data, **task), sender_id="mallory"))
        mallory.sock.sendall(b"".join(frames))
        answered = 0
        while answered < FLOOD:      # every one read and answered
            frame = read_frame(mallory.sock, timeout=60)
            assert frame is not None, "rc-server closed mallory's connection"
            answered += frame["message_type"] == answer
    lines = rc_server_events(cluster, event, "mallory")[before:]
    assert 0 < len(lines) <= 20, len(lines)


# -- a device reconnects in a loop -------------------------------------------------------

RECONNECTS = 300


@pytest.mark.e2e
def test_a_device_reconnecting_in_a_loop_does_not_rotate_the_audit_log_away(cluster):
    """Each connection of a joined device was a device_connected line in
    the audit log (and a device_registered line in rc-server's): one
    client here made 340 a second, so a compromised device rotated the
    whole audit log (6 x audit_log_max_bytes: every submit, cancel and
    refusal) away in half an hour. A few a minute per device and address
    are written; the rest are counted, in the next line's `suppressed` or
    a device_connections_held_back line, so the number is never lost."""
    registered(cluster, "rejoiner").close()      # its first join: device_joined
    before = len(audit.read(cluster.config))
    logged_before = len(rc_server_events(cluster, "device_registered", "rejoiner"))
    with unharmed(cluster, "good"):
        for _ in range(RECONNECTS):
            registered(cluster, "rejoiner").close()

    def lines():
        return [line for line in audit.read(cluster.config)[before:]
                if line["actor"] == "rejoiner"]

    def counted():
        return sum(1 + line.get("suppressed", 0) if line["event"] == "device_connected"
                   else line["count"] for line in lines())
    wait_for(lambda: counted() == RECONNECTS, 60, "every connection counted in the audit log")
    assert {line["event"] for line in lines()} <= {"device_connected",
                                                   "device_connections_held_back"}
    assert len(lines()) <= 30, len(lines())
    logged = rc_server_events(cluster, "device_registered", "rejoiner")[logged_before:]
    assert 0 < len(logged) <= 20, len(logged)


# -- a device gets its task's input again and again -----------------------------------

def rc_files_lines(cluster, event):
    return log_records(cluster, "rc-files", event=event)


GETS = 2000


@pytest.mark.e2e
def test_a_device_getting_its_input_again_and_again_costs_a_few_log_lines(cluster, mallory,
                                                                          tmp_path):
    """Each get was a file_sent line in rc-files' log (6 x 10 MB, rotated by
    supervisord): a device asking for its task's small input thousands of
    times a second rotated every other transfer's line away within
    minutes. A few a minute per device and blob are written, the rest
    counted (`suppressed`, or a lines_suppressed line)."""
    data = b"a small input\n"
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "small.txt"
    path.write_bytes(data)
    task_id, attempt = mallory.take("sleep 120", "--input", str(path))
    with unharmed(cluster, "good"):
        sock, reader, welcome = authenticated(cluster)
        assert welcome == {"ok": True}
        sock.sendall((json.dumps({"get": {"sha256": digest}}) + "\n").encode() * GETS)
        for _ in range(GETS):
            header = json.loads(reader.readline())
            assert header.get("length") == len(data), header
            assert reader.read(len(data)) == data
        sock.close()

    def mine():
        return [line for line in rc_files_lines(cluster, "file_sent")
                if line.get("device_id") == "mallory" and line.get("sha256") == digest]

    def counted():
        held = sum(line["count"] for line in rc_files_lines(cluster, "lines_suppressed")
                   if line.get("key") == ["mallory", digest])
        return sum(1 + line.get("suppressed", 0) for line in mine()) + held
    wait_for(lambda: counted() == GETS, 60, "every get counted in rc-files' log")
    assert len(mine()) <= 20, len(mine())


# -- a group's stream that fell behind ----------------------------------------------------

def test_a_group_stream_that_fell_behind_reads_what_ended_meanwhile_a_page_at_a_time(
        tmp_path):
    """A stream's wake read every task of its group that had ended since
    its last look, results and all, in one fetch. Its thread waits while
    waitress's buffer is full, so a client that stopped reading for up to
    web_channel_timeout (or read a little now and then) had rc-web fetch,
    and join into one write, every result that came meanwhile: up to 1 MiB
    each, hundreds of MiB for one stream. Now a page (STREAM_PAGE) at a
    time, the cursor going on from the page's last event."""
    connection = db.open_database(str(tmp_path / "rc.db"))
    group_id = web_results.new_group(connection, [{"task_type": "echo"}])
    cursor = web_results.last_event(connection)
    count = 3 * web_results.STREAM_PAGE + 5
    with db.write(connection):
        for n in range(count):
            connection.execute(
                "INSERT INTO tasks(task_type, timeout, max_retries, created_at, group_id)"
                " VALUES ('echo', 10, 0, 0, ?)", (group_id,))
        connection.execute("UPDATE tasks SET state = 'completed', result = '{}'"
                           " WHERE group_id = ?", (group_id,))
    seen, looks = [], 0
    while True:
        cursor, ended = web_results.group_ended(connection, cursor, group_id, 0)
        assert len(ended) <= web_results.STREAM_PAGE
        looks += 1
        if not ended:
            break
        seen += [row[0] for row in ended]
    assert looks == 5
    assert sorted(seen) == sorted(set(seen)) and len(seen) == count
    assert cursor == web_results.last_event(connection)
    connection.close()


# -- one bulk read of many large results ----------------------------------------------------

def peak_rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM for %d" % pid)


def reset_peak_rss(pid):
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")


LARGE_RESULTS = 300
LARGE_OUTPUT = "x" * (1024 * 1024 - 100)


@pytest.fixture(scope="module")
def large_results(cluster):
    """The ids of LARGE_RESULTS completed tasks whose results are ~1 MiB each."""
    return completed_with_large_results(cluster, LARGE_RESULTS)


def completed_with_large_results(cluster, count):
    """The ids of `count` completed tasks, each result's output LARGE_OUTPUT."""
    result = json.dumps({"output": LARGE_OUTPUT, "exit_code": 0})
    now = time.time()       # (not 0: the upkeep would prune them as long ended)
    with db.write(cluster.db):
        return [cluster.db.execute(
            "INSERT INTO tasks(task_type, timeout, max_retries, created_at, state, result,"
            " finished_at) VALUES ('echo', 10, 0, ?, 'completed', ?, ?)",
            (now, result, now)).lastrowid for _ in range(count)]


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc clear_refs")
def test_a_bulk_read_of_many_large_results_holds_what_it_sends_not_all_of_them(
        cluster, large_results):
    """POST /api/v1/results sends at most MAX_RESULTS_BYTES of results and
    lists the rest in not_sent, yet it read every named task's result into
    rc-web first: 10,000 ids of tasks with ~1 MiB outputs (what a device
    may return, and OUTPUT_CAP lets a task print) held 10 GiB for one
    request. Here 300 of them must cost rc-web far less than their 300 MiB."""
    ids = large_results
    pid = cluster.program_pid("rc-web")
    with unharmed(cluster, "good"):
        reset_peak_rss(pid)
        before = peak_rss_mib(pid)
        status, _, text = request(cluster, "/api/v1/results", "POST", {"task_ids": ids},
                                  timeout=120)
        grown = peak_rss_mib(pid) - before
    assert status == 200, text[:300]
    answer = json.loads(text)
    sent = [entry["task_id"] for entry in answer["results"]]
    assert sent == ids[:len(sent)] and 0 < len(sent) < LARGE_RESULTS
    assert answer["not_sent"] == ids[len(sent):]
    assert answer["results"][0]["result"]["output"] == LARGE_OUTPUT
    assert grown < 100, "rc-web grew by %d MiB for one request" % grown


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc clear_refs")
def test_a_page_of_the_task_list_holds_megabytes_not_gigabytes(cluster, large_results):
    """GET /api/v1/tasks?limit=1000 (and /text/tasks) read, decoded and
    encoded up to 1,000 whole task records: with results of ~1 MiB each
    (what a device may return, and OUTPUT_CAP lets a task print), 300 of
    them grew rc-web by 1.9 GiB for one reader's request. A page ends once
    its payloads and results pass MAX_LIST_BYTES; next_offset goes on, and
    the pages together still list every task once. /text/tasks, which
    shows no result, reads none."""
    pid = cluster.program_pid("rc-web")
    with unharmed(cluster, "good"):
        reset_peak_rss(pid)
        before = peak_rss_mib(pid)
        status, _, text = request(cluster, "/api/v1/tasks?limit=1000", timeout=120)
        grown = peak_rss_mib(pid) - before
        assert status == 200, text[:300]
        page = json.loads(text)
        assert 0 < len(page["tasks"]) < LARGE_RESULTS
        assert page["next_offset"] == len(page["tasks"])
        assert grown < 100, "rc-web grew by %d MiB for one request" % grown
        listed = [task["task_id"] for task in page["tasks"]]
        while page["next_offset"] is not None:
            status, _, text = request(cluster, "/api/v1/tasks?limit=1000&offset=%d"
                                      % page["next_offset"], timeout=120)
            page = json.loads(text)
            listed += [task["task_id"] for task in page["tasks"]]
    everything = [row[0] for row in cluster.db.execute(
        "SELECT task_id FROM tasks WHERE task_id <= ? ORDER BY task_id DESC", (listed[0],))]
    assert listed == everything
    assert set(large_results) <= set(listed)
    # The text view shows no results, and reads none: its rows are all there.
    reset_peak_rss(pid)
    before = peak_rss_mib(pid)
    status, _, text = request(cluster, "/text/tasks?limit=1000", timeout=120)
    assert status == 200 and len(text.splitlines()) >= len(everything)
    assert peak_rss_mib(pid) - before < 100
