"""Faults noticed in session 9 and left alone, fixed in session 10 (loose31):
each test here failed before its fix."""
import collections
import io
import json
import os
import time
import tracemalloc

from cluster_harness import wait_for
from rc import db, map_cli, stats, web, web_results
from rc.states import COMPLETED, FAILED
from test_cli import finish_later, rc
from test_transfer import Client, Node
from test_web import admin, call


# -- a group's result stream remembers what is pending, not what it sent --------------

def stream(app, path, config):
    """The app's answer to GET `path` as waitress would take it: the body's
    chunks, read one at a time (a caller may change the database between)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path.split("?")[0],
               "QUERY_STRING": path.partition("?")[2], "REMOTE_ADDR": "127.0.0.1",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000",
               "HTTP_HOST": "127.0.0.1:5000", "wsgi.input": io.BytesIO(b""),
               "CONTENT_LENGTH": "0", "wsgi.url_scheme": "http",
               "SERVER_PROTOCOL": "HTTP/1.1"}
    environ.update(("HTTP_" + k.upper().replace("-", "_"), v)
                   for k, v in admin(config).items())
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])
    body = app(environ, start_response)
    assert answer["status"] == 200
    return body


def client_group(connection):
    with db.write(connection):
        return connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, options)"
            " VALUES (?, 'echo', '{}', '{\"client\": true}')", (time.time(),)).lastrowid


def add_tasks(connection, group_id, states):
    """A task in the group for each state given (completed ones with a
    result), in one transaction, as fast as SQLite takes them; their ids."""
    now = time.time()
    with db.write(connection):
        first = connection.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]
        connection.executemany(
            "INSERT INTO tasks(task_type, payload, timeout, max_retries, state, created_at,"
            " finished_at, result, group_id) VALUES ('echo', '{}', 60, 0, ?, ?, ?, ?, ?)",
            ((state, now, now if state == "completed" else None,
              '{"output": "x"}' if state == "completed" else None, group_id)
             for state in states))
    return list(range(first + 1, first + 1 + len(states)))


def complete(connection, task_ids):
    with db.write(connection):
        connection.executemany(
            "UPDATE tasks SET state = 'completed', finished_at = ?, result = '{\"output\": \"y\"}'"
            " WHERE task_id = ?", ((time.time(), task_id) for task_id in task_ids))


def lines_of(chunk):
    return [json.loads(line) for line in chunk.splitlines() if line.strip()]


def test_a_group_stream_holds_no_id_of_what_it_sent(cluster_home):
    """A stream kept a set of every task id it had sent (and a list of those
    ended at its start): ~90 MB for a group of a million. Now what it holds
    is bounded by the tasks still pending: for 100,000 ended ones, the
    peak is a page's worth, ~0.3 MB, where the set and list took 10.3 MB
    before."""
    config, connection = cluster_home
    group_id = client_group(connection)
    ids = add_tasks(connection, group_id, ["completed"] * 100000)
    app = web.make_app(config)
    body, held = None, None
    # What the stream's own code holds near its end, counted by where it was
    # allocated: other tests' threads in this process allocate meanwhile.
    ours = [tracemalloc.Filter(True, web_results.__file__)]
    tracemalloc.start()         # before the call: bottle reads the first chunk in it
    try:
        body = stream(app, "/api/v1/groups/%d/results?stream=1" % group_id, config)
        count, last = 0, None
        for chunk in body:
            for line in lines_of(chunk):
                if "end" in line:
                    last = line
                else:
                    assert line["task_id"] == ids[count]
                    count += 1
            if held is None and count >= len(ids) - 1000:
                snapshot = tracemalloc.take_snapshot().filter_traces(ours)
                held = sum(stat.size for stat in snapshot.statistics("filename"))
    finally:
        tracemalloc.stop()
        if body is not None:
            body.close()
    assert count == len(ids) and last == {"end": True, "group_id": group_id,
                                          "tasks": len(ids)}
    assert held is not None and held < 1024 * 1024, held


def test_a_group_stream_sends_each_task_once_as_tasks_end_while_it_reads(cluster_home):
    """Tasks pending when the stream began end while it sends those ended
    already (below and above the page it is on), and tasks join the group
    (follow=1) and end: every one is sent exactly once."""
    config, connection = cluster_home
    group_id = client_group(connection)
    states = ["completed" if n % 3 else "queued" for n in range(600)]
    ids = add_tasks(connection, group_id, states)
    pending = [task_id for task_id, state in zip(ids, states) if state == "queued"]
    app = web.make_app(config)
    body = stream(app, "/api/v1/groups/%d/results?stream=1&follow=1" % group_id, config)
    chunks = iter(body)
    got = lines_of(next(chunks))                # the first page of those ended already
    assert got and all(line["state"] == "completed" for line in got)
    complete(connection, pending[::2])          # some behind the page, most ahead of it
    joined = add_tasks(connection, group_id, ["queued"] * 30)
    complete(connection, joined[:10])
    try:
        for number, chunk in enumerate(chunks):
            got.extend(lines_of(chunk))
            if number == 3:
                complete(connection, pending[1::2] + joined[10:])
            if len({line["task_id"] for line in got}) == len(ids) + len(joined):
                break
        app.config["rc.web"].closing.set()      # then whatever it would still send
        for chunk in chunks:
            got.extend(lines_of(chunk))
    finally:
        body.close()
    counts = collections.Counter(line["task_id"] for line in got)
    assert set(counts) == set(ids + joined)
    assert set(counts.values()) == {1}, [n for n, c in counts.items() if c > 1]
    by_id = {line["task_id"]: line for line in got}
    assert all(by_id[n]["result"]["output"] == "y" for n in pending + joined)


def test_a_group_stream_ends_with_the_count_it_sent(cluster_home):
    config, connection = cluster_home
    group_id = client_group(connection)
    ids = add_tasks(connection, group_id, ["completed", "queued"] * 100)
    app = web.make_app(config)
    body = stream(app, "/api/v1/groups/%d/results?stream=1" % group_id, config)
    chunks, got = iter(body), []
    try:
        got.extend(lines_of(next(chunks)))
        complete(connection, ids[1::2])
        for chunk in chunks:
            got.extend(lines_of(chunk))
    finally:
        body.close()
    assert [line["task_id"] for line in got[:-1]] != []
    assert sorted(line["task_id"] for line in got[:-1]) == ids
    assert got[-1] == {"end": True, "group_id": group_id, "tasks": len(ids)}


# -- rc wait shows the task's stderr ---------------------------------------------------

def test_rc_wait_shows_the_stderr_of_a_task_that_failed_or_completed(cluster_home, add_device):
    """`rc wait` said only the failure's last stderr line, and nothing of a
    completed task's stderr: the user ran `rc task` to see what the command
    said. Now its stderr is on ours, as a command run here shows it, before
    the one-line reason with the exit status."""
    config, connection = cluster_home
    add_device("pi")
    stderr = "".join("make: step %d\n" % n for n in range(30)) + "make: *** [all] Error 2\n"
    worker = finish_later(config, 1, "pi", FAILED, "built half\n", "exit status 2", stderr)
    assert rc("submit", "shell", "make") == (0, "1\n", "")
    worker.join()
    status, out, err = rc("wait", "1")
    assert (status, out) == (1, "built half\n")
    assert err == stderr + ("rc: error: task 1 failed: exit status 2 (stderr: make: *** [all]"
                            " Error 2)\n")
    worker = finish_later(config, 2, "pi", COMPLETED, "done\n", None, "warning: slow disk")
    assert rc("submit", "shell", "make", "--wait") == (0, "done\n", "warning: slow disk\n")
    worker.join()


# -- rc logs --task shows the task's files fetched and stored --------------------------

def test_rc_logs_for_a_task_names_its_inputs_fetched(tmp_path, monkeypatch):
    """rc-files' file_sent named no task, so `rc logs --task N` showed the
    outputs a task stored (file_stored) but never the inputs its device
    fetched. It names them now: the first reader as task_id, and every
    task of the device that reads the blob as task_ids."""
    node = Node(tmp_path)
    try:
        os.symlink(os.path.join(str(tmp_path), "rc-files.log"),
                   os.path.join(node.config.log_dir, "rc-files.log"))
        monkeypatch.setenv("RC_HOME", node.env["RC_HOME"])
        monkeypatch.setenv("RC_CONFIG", node.env["RC_CONFIG"])
        node.add_device("pi")
        shared, alone = b"shared input\n" * 1000, b"its own input\n"
        shared_digest, alone_digest = node.store(shared), node.store(alone)
        first = node.running_task("pi", [(shared_digest, len(shared))])
        second = node.running_task("pi", [(shared_digest, len(shared))])
        third = node.running_task("pi", [(alone_digest, len(alone))])
        client = Client(node, "pi")
        assert client.get(shared_digest)[1] == shared
        assert client.put_whole(first, 1, "out.txt", b"result\n")["ok"]
        client.close()

        def lines(task_id):
            status, out, err = rc("logs", "--task", str(task_id), "--program", "rc-files")
            return out.splitlines()
        wait_for(lambda: any("file_stored" in line for line in lines(first)), 20,
                 "rc-files' lines for task %d" % first)
        assert [line.split()[3] for line in lines(first)] == ["file_sent", "file_stored"]
        sent = next(line for line in lines(second) if "file_sent" in line)
        assert "sha256=%s" % shared_digest in sent
        assert "task_ids=[%d,%d]" % (first, second) in sent
        assert lines(third) == []
    finally:
        node.close()


# -- the success rate leaves cancelled tasks out ---------------------------------------

def test_cancelling_tasks_does_not_lower_the_success_rate(cluster_home):
    """The overview's success tile (history_summary.success_rate, also
    /api/v1/stats and rc_history_success_ratio) counted cancelled tasks as
    failures: 3 completed, 1 failed and 6 a user cancelled showed 30%.
    Cancelled is neither: 75%, and a window of only cancelled ones has no
    rate."""
    config, connection = cluster_home
    minute = stats.minute_of(time.time()) - 120
    with db.write(connection):
        for start, counts in ((minute, (3, 1, 0)), (minute + 60, (0, 0, 6))):
            connection.execute("INSERT INTO stats_minutes(minute, submitted, completed, failed,"
                               " cancelled) VALUES (?, 10, ?, ?, ?)", (start,) + counts)
    app = web.make_app(config)
    status, _, text = call(app, "/api/v1/overview")
    assert status == 200 and json.loads(text)["history_summary"]["success_rate"] == 0.75
    status, _, text = call(app, "/api/v1/stats?minutes=15")
    assert json.loads(text)["summary"]["success_rate"] == 0.75
    status, _, text = call(app, "/text/metrics")
    assert 'rc_history_success_ratio{window="15m"} 0.75' in text
    assert stats.summary(stats.history(connection, 1))["success_rate"] is None
    assert "success 75.0%" in rc("history")[1]


# -- rc map --halt with inputs never queued ----------------------------------------------

def test_halt_with_inputs_never_queued_counts_them_and_resume_runs_them(cluster_home,
                                                                         monkeypatch):
    """A map of more than one batch (500) whose first batch has a failure
    before the next is queued: --halt's branch for inputs never queued, which
    no test reached. The first task queued fails as soon as its batch is in
    (as a device failing it at once would); the rest of the batch is
    cancelled, the 700 inputs after it never queued, all counted, and
    --resume has them to run."""
    config, connection = cluster_home
    submit_batch = map_cli.Runner.submit_batch
    batches = []

    def submit_then_fail_the_first(runner):
        submit_batch(runner)
        batches.append(runner.plan.group_id)
        if len(batches) == 1:
            first = min(runner.pending)
            with db.write(connection):
                connection.execute("UPDATE tasks SET state = 'failed', finished_at = ?,"
                                   " error = 'exit status 1' WHERE task_id = ?",
                                   (time.time(), first))
    monkeypatch.setattr(map_cli.Runner, "submit_batch", submit_then_fail_the_first)
    values = [str(n) for n in range(1, 1201)]
    status, out, err = rc("map", "--halt", "soon,fail=1", "-k", "echo {}", *values)
    group_id = int(err.split()[1].rstrip(":"))
    assert len(batches) == 1
    assert "halted (--halt soon,fail=1): 499 queued tasks cancelled and 700 inputs never" \
        " queued, 0 assigned or running ones finish" in err, err
    assert "1200 of 1200 inputs did not complete" in err, err
    assert (status, out) == (map_cli.MAX_EXIT_STATUS, "")
    states = dict(connection.execute("SELECT state, count(*) FROM tasks WHERE group_id = ?"
                                     " GROUP BY state", (group_id,)).fetchall())
    assert states == {"failed": 1, "cancelled": 499}
    jobs = map_cli.jobs_of(connection, group_id)
    assert [job.number for job in jobs if job.task_id is None] == list(range(501, 1201))

    def submit_then_complete(runner):      # the devices, quick this time
        submit_batch(runner)
        with db.write(connection):
            connection.executemany(
                "UPDATE tasks SET state = 'completed', finished_at = ?, result = ?"
                " WHERE task_id = ?", [(time.time(), json.dumps({"output": "%d\n" % job.number}),
                                        task_id) for task_id, job in runner.pending.items()])
    monkeypatch.setattr(map_cli.Runner, "submit_batch", submit_then_complete)
    status, out, err = rc("map", "--resume", str(group_id), "-k")
    assert status == 0, err
    assert out.split() == values

