"""Session 44's attack: what a reader (anyone rc-web lets read: the default
read_access=local, every local user and task of the main node; `open`, the
LAN) can make rc-web hold or fail through the web terminal's commands,
which the HTTP routes beside them bound; what a joined device that
gives back every task it is given holds from the others (one shared
cluster: the good worker alone); and a name in a task_assign that no file
system takes (the worker against test_worker_lying_main's fake main node)."""
import http.client
import json
import os
import socket
import threading
import time

import pytest

from cluster_harness import online, private, wait_for
from rc import bounded, db, logs, protocol, tasks
from test_bad_input import connect, register_frame
from test_hostile_s29 import (LARGE_OUTPUT, completed_with_large_results, peak_rss_mib,
                              reset_peak_rss)
from test_inline_files import GOOD, with_the_good_worker
from test_worker import main  # noqa: F401 (fixture)
from test_worker_files import files, start, state_dir  # noqa: F401 (fixtures)
from test_worker_lying_main import (assign_with_bytes, cat_payload, honest_task_runs, ref,
                                    result_of, shared_workers, the_case)  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("hostile-s44"))


def command(cluster, line, timeout=120):
    """POST /api/v1/command as a reader: no token, from 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                            timeout=timeout)
    try:
        connection.request("POST", "/api/v1/command", json.dumps({"command": line}).encode(),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


# -- the largest count a command takes -------------------------------------------------

def test_the_largest_count_a_command_takes_is_answered_not_a_traceback(cluster):
    """`--limit` and `--minutes` take any whole number SQLite holds, but
    `tasks` asked SQLite for one row more than the limit and `history` for
    the minute `minutes` before now: at 2**63-1 both were OverflowError, a
    traceback from `rc` and a 500 from the web terminal's route."""
    largest = str(bounded.LARGEST)
    for argv in (["tasks", "--limit", largest], ["history", "--minutes", largest]):
        done = cluster.rc(*argv, check=False)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
        status, answer = command(cluster, " ".join(argv))
        assert status == 200 and answer["status"] == 0, (argv, status, answer)



# -- a command line's size --------------------------------------------------------------

def post_command(cluster, body, timeout=300):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                            timeout=timeout)
    try:
        connection.request("POST", "/api/v1/command", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_a_command_line_too_long_to_read_is_refused_before_it_is_read(cluster):
    """The web terminal's route split a reader's line with shlex and parsed
    it with argparse before anything else (the admin check too): shlex's
    cost grows with the square of a word's length (800 KB: 13.6 s of CPU,
    the 4 MiB a body may hold: minutes, rc-web's GIL held all along) and
    argparse's with the square of the options (`tail 1 -f -f ...`, 50,000
    of them: 90 s, twice). Now a line longer than the route reads, or of
    more words, is refused at once, 400, naming the bound."""
    status, answer = post_command(cluster, {"command": "why '%s'" % ("x" * 900000)})
    assert status == 400 and "characters" in answer["error"], (status, answer)
    status, answer = post_command(cluster, {"argv": ["tail", "1"] + ["-f"] * 5000})
    assert status == 400 and "words" in answer["error"], (status, answer)
    status, answer = post_command(cluster, {"command": "tail 1" + " -f" * 5000})
    assert status == 400 and "words" in answer["error"], (status, answer)
    # A long quoted word within the bound is read as before.
    status, answer = post_command(cluster, {"command": "why '%s'" % ("1" * 30000)})
    assert status == 200 and answer["status"] == 2, (status, answer)


# -- the web terminal's `tasks` ---------------------------------------------------------

LARGE_RESULTS = 150


@pytest.fixture(scope="module")
def large_results(cluster):
    """The ids of LARGE_RESULTS completed tasks whose results are ~1 MiB each
    (what a device may return, and OUTPUT_CAP lets a task print)."""
    return completed_with_large_results(cluster, LARGE_RESULTS)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc clear_refs")
def test_the_web_terminals_task_list_holds_a_page_not_every_result(cluster, large_results):
    """GET /api/v1/tasks ends a page at MAX_LIST_BYTES of payloads and
    results (session 29), but the web terminal's `tasks --limit 1000` read
    every listed task's whole result, which its table does not even show:
    150 results of ~1 MiB grew rc-web by ~160 MiB for one reader's request
    (1,000 of them, a gigabyte). Now the table reads no result, and the web
    terminal reads a page as the route does, --json too, and says where
    the rest are."""
    pid = cluster.program_pid("rc-web")
    for line in ("tasks --limit 1000", "tasks --json --limit 1000"):
        reset_peak_rss(pid)
        before = peak_rss_mib(pid)
        status, answer = command(cluster, line)
        grown = peak_rss_mib(pid) - before
        assert status == 200 and answer["status"] == 0, (line, status, answer)
        assert grown < 60, "rc-web grew by %d MiB for `%s`" % (grown, line)
    listed = json.loads(answer["output"])
    assert 0 < len(listed) < LARGE_RESULTS and listed[0]["result"]["output"] == LARGE_OUTPUT
    assert "GET /api/v1/tasks?offset=%d" % len(listed) in answer["error"], answer["error"]
    # On the main node's own terminal `rc tasks` lists them all, its table
    # with no result read.
    done = cluster.rc("tasks", "--limit", "1000")
    assert all("\n%d " % task_id in done.stdout for task_id in large_results)


# -- the web terminal's `logs` ----------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc clear_refs")
def test_the_web_terminals_logs_hold_what_text_logs_would(cluster):
    """/text/logs shows at most 10,000 lines, but the web terminal's `logs
    -n N` took any N: with a filter (--level, --task, --device) it read
    every program's log and its rotated copies back to the first line and
    held every line it kept. 20 MiB of one program's rotated logs (where
    supervisord keeps up to 60 MiB of each) grew rc-web by ~120 MiB for one
    reader's `logs --level info -n 100000000`; every program's full logs, gigabytes. Now it
    shows the last 10,000 lines and says so."""
    line = json.dumps({"time": time.time() - 3600, "program": "rc-reaper", "level": "info",
                       "event": "upkeep_done", "took": 0.0123, "rows": 5},
                      separators=(",", ":")) + "\n"
    rotated = line * (4 * 1024 * 1024 // len(line))
    for number in range(1, 6):
        with open(os.path.join(cluster.config.log_dir, "rc-reaper.log.%d" % number), "w",
                  opener=private) as f:
            f.write(rotated)
    pid = cluster.program_pid("rc-web")
    reset_peak_rss(pid)
    before = peak_rss_mib(pid)
    status, answer = command(cluster, "logs --level info -n 100000000")
    grown = peak_rss_mib(pid) - before
    assert status == 200 and answer["status"] == 0, (status, answer)
    assert grown < 40, "rc-web grew by %d MiB for one `logs`" % grown
    assert len(answer["output"].splitlines()) == logs.MAX_WEB_LINES
    assert "the last %d lines" % logs.MAX_WEB_LINES in answer["error"], answer["error"]


# -- a large group's view ---------------------------------------------------------------

def get(cluster, path, timeout=120):
    """GET as a reader: no token, from 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                            timeout=timeout)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc clear_refs")
def test_a_large_groups_view_holds_a_page_of_its_tasks(cluster):
    """GET /api/v1/groups/ID cut each output and error at 4,096 characters
    (session 35) but, asked without ?limit (the dashboard asks for 500),
    listed every task of the group: a map of 20,000 inputs whose outputs
    and errors were a few KB grew rc-web by 455 MiB for one reader's
    request, and answered 167 MB (100,000 inputs: gigabytes); the web
    terminal's `group ID` as much. Now both show at most 1,000 tasks, those
    that did not complete first, with the summary of all and "more"."""
    # A page of 1,000 grows rc-web by 36-40 MiB, however large the group
    # (40 in a loaded run, when the bound was 40 and the group 3,000). The
    # group is large enough that listing all of it, as before, is far past
    # the bound: 191 MiB for these 6,000.
    members = 6000
    result = json.dumps({"output": "y" * 5000, "exit_code": 0})
    now = time.time()
    with db.write(cluster.db):
        group_id = cluster.db.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
            " include_new) VALUES (?, 'echo', '{}', '{}', '{}', 0)", (now,)).lastrowid
        cluster.db.executemany(
            "INSERT INTO tasks(task_type, timeout, max_retries, created_at, state, result,"
            " finished_at, group_id, error) VALUES ('echo', 10, 0, ?, 'completed', ?, ?, ?, ?)",
            [(now, result, now, group_id, "e" * 5000)] * members)
    pid = cluster.program_pid("rc-web")
    reset_peak_rss(pid)
    before = peak_rss_mib(pid)
    status, view = get(cluster, "/api/v1/groups/%d" % group_id)
    grown = peak_rss_mib(pid) - before
    assert status == 200, view
    assert view["summary"] == {"tasks": members, "completed": members}
    assert len(view["tasks"]) == tasks.MAX_PAGE_TASKS
    assert view["more"] == members - tasks.MAX_PAGE_TASKS
    assert grown < 80, "rc-web grew by %d MiB for one group's view" % grown
    status, view = get(cluster, "/api/v1/groups/%d?limit=%d" % (group_id, members))
    assert len(view["tasks"]) == tasks.MAX_PAGE_TASKS
    status, answer = command(cluster, "group --csv %d" % group_id)
    assert status == 200 and answer["status"] == 0, answer
    assert len(answer["output"].splitlines()) == tasks.MAX_PAGE_TASKS + 1
    assert "%d more" % (members - tasks.MAX_PAGE_TASKS) in answer["error"], answer["error"]
    # On the main node's own terminal, `rc group` shows every task.
    shown = cluster.rc("group", "--csv", str(group_id)).stdout
    assert len(shown.splitlines()) == members + 1


# -- a device that gives back every task ------------------------------------------------

class GivesEverythingBack:
    """A joined device that claims every task type, 16 idle slots and an
    idle CPU (the scheduler's first choice), and answers each assignment
    with a result saying it gave the task back: not allowed here, handed
    back, cancelled though nobody asked. Each is charged to nothing."""
    STATUSES = ("not_allowed", "handed_back", "cancelled")

    def __init__(self, cluster, device_id):
        sock, nonce = connect(cluster)
        mine = protocol.new_nonce()
        sock.sendall(register_frame(
            cluster, nonce, device_id, mine=mine, slots=16,
            task_types=["echo", "sleep", "system_info", "python_eval", "python_exec", "shell"]))
        self.sock, self.reader, self.device_id = sock, sock.makefile("rb"), device_id
        sock.settimeout(None)
        self.given_back = []        # (task_id, attempt) in the order given back
        self.thread = threading.Thread(target=self.answer, daemon=True)
        self.thread.start()

    def answer(self):
        try:
            for line in self.reader:
                frame = json.loads(line)
                kind, data = frame["message_type"], frame["data"]
                if kind == "ping":
                    self.send("pong", {})
                elif kind == "task_assign":
                    status = self.STATUSES[len(self.given_back) % len(self.STATUSES)]
                    self.given_back.append((data["task_id"], data["attempt"]))
                    self.send("task_result", {"task_id": data["task_id"],
                                              "attempt": data["attempt"], "status": status,
                                              "error": "not here", "result": {}})
        except (OSError, ValueError):
            pass            # closed by the test

    def send(self, kind, data):
        self.sock.sendall(protocol.encode(kind, data, sender_id=self.device_id))

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)      # the reading thread sees its end
        self.thread.join(10)        # before the close: its fd is not another's under it
        self.sock.close()


def test_a_device_that_gives_every_task_back_holds_none_from_the_others(cluster):
    """A device that refuses what it is given (`not_allowed`, `handed_back`,
    an unasked `cancelled`) gives the task back uncharged: right for a
    phone that went on battery. But a joined device claiming the most idle
    slots was the scheduler's choice for the task again after each backoff,
    for ever: the good worker, idle beside it, never ran it (attempt 9
    after 60 s, then one a minute), and no task of the queue ever ended.
    Now a device that gave a task back takes it again only when no other
    fitting device has room."""
    liar = GivesEverythingBack(cluster, "gives-back-44")
    try:
        wait_for(lambda: liar.device_id in online(cluster), 20,
                 "the device that gives everything back online")
        task_ids = [int(cluster.rc("submit", "shell", "echo s44-%d" % n).stdout)
                    for n in range(3)]
        wait_for(lambda: all(tasks.get(cluster.db, task_id)["state"] == "completed"
                             for task_id in task_ids), 60, "the tasks done by the good worker")
        # Where no other device fits (a task pinned to it, a phone that went
        # on battery and came back), it is given the task again.
        pinned = int(cluster.rc("submit", "shell", "echo pinned", "--require",
                                "device_id=%s" % liar.device_id).stdout)
        wait_for(lambda: sum(given[0] == pinned for given in liar.given_back) >= 2, 30,
                 "the pinned task given to the device again")
        cluster.rc("cancel", str(pinned))
    finally:
        liar.close()
    for task_id in task_ids:
        task = tasks.get(cluster.db, task_id)
        assert task["device_id"] == GOOD and task["result"]["output"] == "s44-%d\n" % (
            task_ids.index(task_id)), task
        assert sum(given[0] == task_id for given in liar.given_back) == 1, liar.given_back
        assert task["attempt"] == 2, task



def test_a_device_that_gives_its_own_task_back_stops_no_fleet_chore(cluster):
    """A schedule --each fires a group, one task pinned to each device, and
    skips a firing while the last group has not ended (no overlap). A
    device that gives back the task pinned to it, and is its only taker,
    kept that group unended for ever: every later firing was `skipped:
    group N still running`, on the good worker too. Now a task still queued
    for a device that gave it back, or that takes nothing now (offline,
    drained), holds up no firing."""
    liar = GivesEverythingBack(cluster, "gives-back-44b")
    try:
        wait_for(lambda: liar.device_id in online(cluster), 20,
                 "the device that gives everything back online")
        cluster.rc("schedule", "add", "chore44", "@every 1s", "shell", "echo chore", "--each")

        def groups_fired():
            return cluster.db.execute(
                "SELECT count(DISTINCT group_id) FROM tasks WHERE group_id IN (SELECT group_id"
                " FROM tasks WHERE requirements LIKE '%gives-back-44b%')").fetchone()[0]
        wait_for(lambda: groups_fired() >= 3, 60, "three firings of the chore; last: %s"
                 % cluster.rc("schedule", "list").stdout)
        done = cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE state = 'completed' AND requirements LIKE ?",
            ('%"device_id":"' + GOOD + '"%',)).fetchone()[0]
        assert done >= 2
    finally:
        cluster.rc("schedule", "remove", "chore44", check=False)
        liar.close()


# -- a name no file system takes, from the main node ------------------------------------

def test_an_input_name_no_file_system_takes_fails_the_attempt_not_the_worker(the_case):
    """A task_assign (JSON: "\\ud800" is a lone surrogate) naming an input
    whose bytes came with it: the worker placed it from its cache in its
    loop, os.open raised UnicodeEncodeError, which is no OSError, and the
    worker ended with a traceback and every task it ran. Now the name is
    refused as one that leaves the task directory is."""
    case, link, good = the_case, the_case.link, the_case.good
    task_id = case.task_id()
    assign_with_bytes(link, task_id, cat_payload(good, "lone\ud800"), [ref(good)], good)
    result = result_of(link, task_id)
    assert result["status"] == "failed", result
    assert "relative path inside the task directory" in result["error"], result
    honest_task_runs(link, case.task_id(), case.files)
    assert case.worker.proc.poll() is None
