"""The Python client (lib/rc/client.py) and the HTTP it uses (lib/rc/web_results.py),
against a real cluster: an Executor that runs a ProcessPoolExecutor program
unchanged but for the executor, functions from this Python on a CPython 3.6
worker, remote exceptions, cancel, what cannot be shipped; long polls, bulk
result reads, a group's result stream, batch submits, and /client.py itself
under the oldest and newest Python."""
import concurrent.futures
import glob
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures.process import BrokenProcessPool

import pytest

from cluster_harness import (REPO, WORKER, Cluster, online, private, task_state,
                             wait_for)
from hostile_harness import unharmed
from rc import audit, client, files, web_results

pytestmark = pytest.mark.e2e

DATA = os.path.join(REPO, "tests", "data")
sys.path.insert(0, DATA)
import client_functions as functions  # noqa: E402

PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")),
                 key=lambda p: [int(n) for n in p.split("/versions/")[1].split("/")[0]
                                .split(".")[:2]])
OLDEST = PYTHONS[0] if PYTHONS and "/3.6." in PYTHONS[0] else None
NEWEST = PYTHONS[-1] if PYTHONS else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("client"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("main", "--slots", "4")
    devices = {"main"}
    if OLDEST:
        start_worker_on(cluster, "py36", OLDEST)
        devices.add("py36")
    wait_for(lambda: devices <= online(cluster), 30, "the workers")
    cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    yield cluster
    cluster.stop()


def start_worker_on(cluster, device_id, python):
    """A worker on another interpreter. As root its tasks would run as uids
    of their own, which cannot read a python under /root/.pyenv (the worker
    would run them with the system's python3 instead): here they run as root."""
    own_user = ["--task-user", "root"] if os.geteuid() == 0 else []
    with open(cluster.worker_log(device_id), "ab", opener=private) as log:
        cluster.workers[device_id] = subprocess.Popen(
            [python, "-I", WORKER] + cluster.worker_arguments(device_id) + ["--slots", "2"]
            + own_user,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def executor(cluster):
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "main"}) as executor:
        yield executor


@pytest.fixture
def rc_cluster(cluster):
    with client.Cluster(cluster.url, cluster.token) as connection:
        yield connection


def http(cluster, method, path, body=None, token=True):
    """(status, decoded JSON) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(cluster.url + path, data, method=method)
    if token:
        request.add_header("Authorization", "Bearer " + cluster.token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def submit(cluster, *specs, query=""):
    status, answer = http(cluster, "POST", "/api/v1/tasks" + query, list(specs))
    assert status == 201, answer
    return [entry["task_id"] for entry in answer["tasks"]], answer


def held(cluster):
    """A task that stays queued: it needs a device nobody has."""
    return submit(cluster, {"task_type": "echo", "payload": "x",
                            "requirements": {"device_id": "nobody"}})[0][0]


# -- the Executor ------------------------------------------------------------------------

def test_a_process_pool_program_runs_unchanged_but_for_the_executor(cluster):
    with open(os.path.join(DATA, "pool_program.py")) as f:
        program = f.read()
    line = "    with Executor(max_workers=4) as executor:\n"
    assert program.count(line) == 1
    original = program.replace(line, line.replace("Executor", "ProcessPoolExecutor"))
    env = dict(os.environ, RC_URL=cluster.url, RC_TOKEN=cluster.token)
    outputs = []
    for name, text in (("on_the_fleet.py", program), ("on_this_machine.py", original)):
        path = os.path.join(cluster.home, name)
        with open(path, "w") as f:
            f.write(text)
        done = subprocess.run([sys.executable, path, os.path.join(REPO, "lib")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=180)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert "ValueError: no real root of -1" in outputs[0]
    assert "Summary(5, " in outputs[0]
    ran = cluster.db.execute("SELECT count(*) FROM tasks WHERE task_type = 'python_exec'"
                             " AND payload LIKE '%summarise%'").fetchone()[0]
    assert ran >= 6         # the calls went to the cluster, each a task


def test_each_call_runs_in_its_own_process(executor):
    results = [f.result(60) for f in [executor.submit(functions.where, n) for n in range(6)]]
    assert [r[2] for r in results] == [0, 2, 4, 6, 8, 10]
    assert len({r[1] for r in results}) == 6
    assert executor.submit(functions.add_offset, 5).result(60) == 15   # its module's constant


def test_map_keeps_order_and_chunks(cluster, executor):
    before = cluster.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
    assert list(executor.map(functions.add_offset, range(200), chunksize=50)) == \
        [n + 10 for n in range(200)]
    tasks = cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ?",
                               (before,)).fetchone()[0]
    assert tasks == 4
    assert list(executor.map(functions.noop, [])) == []
    assert list(executor.map(pow, [2, 3], [5, 2])) == [32, 9]     # a builtin, by reference


@pytest.mark.skipif(not OLDEST, reason="no CPython 3.6 under ~/.pyenv/versions")
def test_a_function_from_this_python_runs_on_a_3_6_worker(cluster):
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "py36"}) as executor:
        version, _, doubled = executor.submit(functions.where, 21).result(60)
        assert version == [3, 6] and doubled == 42
        with pytest.raises(functions.Unlucky) as raised:
            executor.submit(functions.unlucky, 13).result(60)
        assert "13 is unlucky" in str(raised.value.__cause__)
        assert list(executor.map(functions.add_offset, range(5))) == [10, 11, 12, 13, 14]
        # Arguments as an input file, a result past the output cap: on 3.6 too.
        assert executor.submit(functions.length_of, "z" * 300000).result(60) == 300000
        assert executor.submit(functions.sized, 1200000).result(60) == "x" * 1200000


def test_an_exception_comes_back_with_its_remote_traceback(executor):
    future = executor.submit(functions.unlucky, 13)
    with pytest.raises(functions.Unlucky) as raised:
        future.result(60)
    cause = raised.value.__cause__
    assert isinstance(cause, client.RemoteTraceback)
    assert "client_functions.py" in cause.text and "in unlucky" in cause.text
    assert 'raise Unlucky("13 is unlucky")' in cause.text
    assert isinstance(future.exception(), functions.Unlucky)
    with pytest.raises(functions.Unlucky):
        list(executor.map(functions.unlucky, [1, 13, 2]))


def test_what_cannot_be_shipped_is_refused_at_submit(executor):
    with pytest.raises(TypeError, match="lambda"):
        executor.submit(lambda x: x, 1)
    with pytest.raises(TypeError, match="nested function or closure"):
        executor.submit(functions.make_adder(3), 1)

    def nested(x):
        return x
    with pytest.raises(TypeError, match="nested function or closure"):
        executor.submit(nested, 1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        executor.submit(functions.noop, threading.Lock())


def test_cancel_a_queued_and_a_running_call(cluster):
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "nobody"}) as nowhere:
        queued = nowhere.submit(functions.noop, 1)
        queued.wait_submitted(30)
        assert queued.cancel() and queued.cancelled()
        assert task_state(cluster, queued.task_id) == "cancelled"
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "main"}) as executor:
        running = executor.submit(functions.nap, 60)
        task_id = running.wait_submitted(30)
        wait_for(lambda: task_state(cluster, task_id) == "running", 30, "the nap to start")
        assert running.cancel() and running.cancelled()
        wait_for(lambda: task_state(cluster, task_id) == "cancelled", 30, "the task to stop")
        finished = executor.submit(functions.noop, 2)
        assert finished.result(60) == 2 and not finished.cancel()


def tasks_after(cluster, task_id):
    return cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id > ?",
                              (task_id,)).fetchone()[0]


def last_task(cluster):
    return cluster.db.execute("SELECT coalesce(max(task_id), 0) FROM tasks").fetchone()[0]


def test_calls_close_together_go_packed_each_in_its_own_process(cluster, executor):
    before = last_task(cluster)
    futures = [executor.submit(functions.where, n) for n in range(200)]
    results = [f.result(120) for f in futures]
    assert [r[2] for r in results] == [2 * n for n in range(200)]
    assert len({r[1] for r in results}) == 200
    # Packed (pack=1 makes one task each); how many a pack holds depends on how
    # fast the submits come, so on how busy the machine is (105 of 200 seen).
    assert tasks_after(cluster, before) <= 150
    assert len({f.task_id for f in futures}) == tasks_after(cluster, before)
    time.sleep(0.05)
    lone = executor.submit(functions.noop, 7)
    assert lone.task_id is not None             # a call after a pause is sent at once
    assert lone.result(60) == 7 and tasks_after(cluster, before) == len(
        {f.task_id for f in futures}) + 1


def test_pack_1_is_one_task_per_call(cluster):
    before = last_task(cluster)
    with client.Executor(cluster.url, cluster.token, pack=1,
                         requirements={"device_id": "main"}) as executor:
        assert [f.result(60) for f in [executor.submit(functions.noop, n)
                                       for n in range(30)]] == list(range(30))
    assert tasks_after(cluster, before) == 30
    with pytest.raises(ValueError, match="pack"):
        client.Executor(cluster.url, cluster.token, pack=0)


def test_a_call_that_crashes_or_raises_fails_alone(cluster, executor):
    before = last_task(cluster)
    futures = [executor.submit(functions.leave, n % 100) for n in range(200)]
    for n, future in enumerate(futures):
        if n % 100 == 3:
            with pytest.raises(BrokenProcessPool, match="exited with status 3"):
                future.result(120)
        elif n % 100 == 4:
            with pytest.raises(BrokenProcessPool, match="killed by SIGSEGV"):
                future.result(120)
        elif n % 100 == 5:
            with pytest.raises(functions.Unlucky, match="5 is unlucky"):
                future.result(120)
        else:
            assert future.result(120)[0] == n % 100
    assert tasks_after(cluster, before) < 200


def test_cancel_a_pending_call_leaves_its_pack_to_the_others(cluster, rc_cluster):
    gate = rc_cluster.submit("sleep", 3, requirements={"device_id": "main"})
    gate_id = gate.wait_submitted(30)
    before = last_task(cluster)
    with client.Executor(cluster.url, cluster.token, depends_on=[gate_id],
                         requirements={"device_id": "main"}) as executor:
        futures = [executor.submit(functions.noop, n) for n in range(200)]
        for future in futures:
            future.wait_submitted(30)   # all queued behind the gate
        packed = [n for n in range(1, 199)
                  if sum(f.task_id == futures[n].task_id for f in futures) > 1]
        victims = {0, packed[len(packed) // 2], 199}    # alone, in a pack, the last one
        pack_task = futures[packed[len(packed) // 2]].task_id
        for n in victims:
            assert futures[n].cancel() and futures[n].cancelled()
        assert task_state(cluster, pack_task) == "cancelled"      # the others went again
        for n, future in enumerate(futures):
            if n not in victims:
                assert future.result(120) == n
        assert not futures[1].cancel()
    assert gate.result(60) is not None
    assert tasks_after(cluster, before) < 150


@pytest.mark.skipif(not OLDEST, reason="no CPython 3.6 under ~/.pyenv/versions")
def test_packed_calls_run_on_a_3_6_worker(cluster):
    before = last_task(cluster)
    with client.Executor(cluster.url, cluster.token,
                         requirements={"device_id": "py36"}) as executor:
        futures = [executor.submit(functions.leave, n) for n in range(150)]
        with pytest.raises(BrokenProcessPool, match="exited with status 3"):
            futures[3].result(120)
        with pytest.raises(functions.Unlucky):
            futures[5].result(120)
        results = [f.result(120) for n, f in enumerate(futures) if n not in (3, 4, 5)]
    assert [r[0] for r in results] == [n for n in range(150) if n not in (3, 4, 5)]
    assert len({r[1] for r in results}) == len(results)
    assert tasks_after(cluster, before) < 150


WITHOUT_FORK = ("import os, sys; del os.fork; sys.argv = sys.argv[1:];"
                " exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'),"
                " {'__name__': '__main__'})")


@pytest.mark.parametrize("fork", [True, False], ids=["fork", "no-fork"])
def test_a_pack_script_runs_each_call_in_a_process_of_its_own(tmp_path, fork):
    """The script of a pack, run as python_exec runs it, on the oldest and
    newest Python; without os.fork (Windows) it runs itself once per call."""
    code, home, _ = client.call_code(functions.leave, [((n,), {}) for n in range(7)], each=True)
    script = tmp_path / "script.py"
    script.write_text(code)
    for python in {OLDEST or sys.executable, NEWEST or sys.executable}:
        command = [python, "-I", str(script)] if fork else [python, "-I", "-c", WITHOUT_FORK,
                                                             str(script)]
        done = subprocess.run(command, stdout=subprocess.PIPE, timeout=60)
        outcomes = client.decode_outcomes({"task_id": 1, "result": {
            "output": done.stdout.decode()}}, home)
        assert [o[0] for o in outcomes] == [0, 0, 0, 1, 1, 1, 0]
        assert len({o[1][1] for o in outcomes if o[0] == 0}) == 4
        assert "exited with status 3" in outcomes[3][3]
        assert "killed by SIGSEGV" in outcomes[4][3]
        assert outcomes[5][2] == "Unlucky"


def test_results_past_the_workers_output_cap_come_back_whole(executor, rc_cluster):
    """A result line longer than the worker's output cap (960 KiB) is read
    from the task's whole stdout, which the main node keeps: one call's
    3 MB result, and a map chunk of 400 calls whose results together pass
    the cap (before: "the results are ... bytes pickled, over 691200")."""
    assert executor.submit(functions.sized, 3000000).result(120) == "x" * 3000000
    values = list(executor.map(functions.sized, [4000] * 400, chunksize=400))
    assert values == ["x" * 4000] * 400
    future = executor.submit(functions.sized, 1500000, "y")
    assert future.result(120) == "y" * 1500000
    assert client.KEPT_STDOUT in [entry["name"] for entry in rc_cluster.files(future.task_id)]


def test_arguments_too_large_for_a_tasks_code_go_as_an_input_file(executor, rc_cluster):
    """Arguments over MAX_ARGUMENT_BYTES pickled go to the file store and
    reach the device as the task's input CALLS_FILE (before: "python_exec
    code is over 262144 bytes"); calls close together with small arguments
    still share a pack, its arguments in its code."""
    big = "z" * (2 * 1024 * 1024)
    future = executor.submit(functions.length_of, big)
    assert future.result(120) == len(big)
    inputs = [entry for entry in rc_cluster.files(future.task_id) if entry["kind"] == "input"]
    assert [entry["name"] for entry in inputs] == [client.CALLS_FILE]
    assert list(executor.map(functions.length_of, [big, "ab", big[:300000]])) == \
        [len(big), 2, 300000]
    small = [executor.submit(functions.length_of, "q" * n) for n in range(40)]
    assert [f.result(120) for f in small] == list(range(40))


def test_a_tasks_output_past_the_cap_comes_back_whole(rc_cluster):
    """submit().result() is the whole stdout, not the first 960 KiB of it
    (before: cut, the record's truncated the only sign)."""
    future = rc_cluster.submit("shell", "seq 1 400000")
    output = future.result(120)
    assert future.record["result"]["truncated"]
    assert output == "".join("%d\n" % n for n in range(1, 400001))
    assert rc_cluster.submit("shell", "echo short").result(60) == "short\n"


def test_a_kept_output_over_the_clients_limit_stays_cut(rc_cluster, monkeypatch):
    """A device that lies may leave gigabytes of stdout: result() holds at
    most MAX_ANSWER_BYTES of it, else the record's cut copy; the whole is
    still there for get() to write to a file."""
    # Over the 2.7 MB stdout, under its record (the cut 960 KiB as JSON, its
    # newlines escaped: ~1.1 MB), which may come by a bounded request too.
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 2 * 1024 * 1024)
    future = rc_cluster.submit("shell", "seq 1 400000")
    output = future.result(120)
    assert future.record["result"]["truncated"]
    assert output == future.record["result"]["output"] and len(output) < 1024 * 1024
    assert output.startswith("1\n2\n3\n")
    whole = rc_cluster.get((future.task_id, client.KEPT_STDOUT))
    assert whole.endswith(b"\n400000\n")
    with pytest.raises(client.AnswerTooLarge):
        rc_cluster.get((future.task_id, client.KEPT_STDOUT), bounded=True)


def test_a_cut_result_line_without_its_kept_stdout_is_a_clear_error():
    """A worker that could not keep the stream (no file store on its main
    node, a full disk): the call fails saying why, not with a base64 error."""
    class NothingKept:
        def get(self, ref, path=None, bounded=False):
            raise client.ClusterError("GET ...: not found (HTTP 404)", 404)
    record = {"task_id": 9, "state": "completed", "result": {
        "output": client.RESULT_MARK + "QUJD" * 1000, "truncated": True}}
    with pytest.raises(client.TaskFailed, match="whole stdout not kept"):
        client.decode_outcomes(record, None, NothingKept())


@pytest.mark.parametrize("outcomes", [[(0, 1)], [(0,), (0, 2)], 7, [], [(1, None)] * 2])
def test_outcomes_of_another_shape_fail_the_calls_with_a_clear_error(outcomes):
    """What a lying device might print as a pack's result: each call ends,
    with an error that says so."""
    import base64
    import pickle
    executor = client.Executor("http://127.0.0.1:9", "token")     # never asked anything
    pack = client.PackFuture(executor, functions.noop)
    calls = [client.CallFuture(executor, ((n,), {}), 10) for n in range(2)]
    for call in calls:
        pack.add(call)
    pack.add_done_callback(executor.pack_done)
    pack.decode, pack.task_id = client.outcomes_and_home, 5
    output = client.RESULT_MARK + base64.b64encode(pickle.dumps(outcomes)).decode() + "\n"
    executor.cluster.finish(pack, {"task_id": 5, "state": "completed",
                                   "result": {"output": output}})
    for call in calls:
        with pytest.raises(client.TaskFailed, match="task 5 completed"):
            call.result(0)


def test_shutdown_cancel_futures(cluster):
    executor = client.Executor(cluster.url, cluster.token,
                               requirements={"device_id": "nobody"})
    futures = [executor.submit(functions.noop, n) for n in range(3)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError):
        executor.submit(functions.noop, 1)


# -- the Cluster -------------------------------------------------------------------------

def test_cluster_submit_map_and_failures(cluster, rc_cluster):
    assert rc_cluster.submit("echo", "hello").result(60) == "hello"
    assert list(rc_cluster.map("shell", ["echo a", "echo b"])) == ["a\n", "b\n"]
    failing = rc_cluster.submit("shell", "echo oops >&2; exit 3")
    with pytest.raises(client.TaskFailed) as raised:
        failing.result(60)
    assert raised.value.state == "failed" and "oops" in raised.value.stderr
    assert str(raised.value).endswith("failed: exit status 3 (stderr: oops)")
    first = rc_cluster.submit("echo", "first")
    second = rc_cluster.submit("echo", "second", depends_on=[first])
    assert second.result(60) == "second"
    record = rc_cluster.get_result(second.task_id)
    assert record["state"] == "completed" and record["result"]["output"] == "second"
    done, not_done = rc_cluster.wait([first, second], timeout=60)
    assert len(done) == 2 and not not_done
    with pytest.raises(client.ClusterError, match="unknown task type"):
        rc_cluster.submit("nonsense").result(60)


def test_a_session_whose_group_was_pruned_goes_on_in_a_new_one(rc_cluster):
    assert rc_cluster.submit("echo", "before").result(60) == "before"
    old = rc_cluster.group_id
    rc_cluster.group_id = 10 ** 9        # as if housekeeping had pruned it (idle 30 days)
    assert rc_cluster.submit("echo", "after").result(60) == "after"
    assert rc_cluster.group_id not in (None, old, 10 ** 9)


def test_put_and_get_files(rc_cluster):
    stored = rc_cluster.put(b"one\ntwo\n")
    assert stored["size"] == 8
    assert rc_cluster.get(stored) == b"one\ntwo\n"
    counted = rc_cluster.submit("shell", payload={"command": "wc -l < data.txt"},
                                inputs=[dict(stored, path="data.txt")])
    assert counted.result(60).strip() == "2"


def test_a_file_damaged_on_the_main_nodes_disk_is_an_error_not_bytes(cluster, rc_cluster,
                                                                    tmp_path):
    stored = rc_cluster.put(b"the right bytes\n")
    made = rc_cluster.submit("shell", payload={"command": "cat data.txt > copy.txt"},
                             inputs=[dict(stored, path="data.txt")], outputs=["copy.txt"])
    made.result(60)
    assert rc_cluster.get((made.task_id, "copy.txt")) == b"the right bytes\n"
    with open(files.blob_path(cluster.config, stored["sha256"]), "r+b") as blob:
        blob.write(b"THE")           # same size: only the hash can tell
    for ref in (stored, stored["sha256"], (made.task_id, "copy.txt")):
        with pytest.raises(client.ClusterError, match="SHA-256 [0-9a-f]{64}, not %s"
                           % stored["sha256"]):
            rc_cluster.get(ref, str(tmp_path / "out.txt"))
    assert not os.path.exists(str(tmp_path / "out.txt"))
    assert os.listdir(str(tmp_path)) == [], "a partial file was left"


def test_put_and_get_of_a_file_never_hold_it_whole(rc_cluster, tmp_path):
    """A 48 MiB file put from its path and got into a path: the client's
    Python allocations stay far below the file's size (before: the whole
    file, twice on the way back), and the bytes are the same."""
    import tracemalloc
    source, target = tmp_path / "big.bin", tmp_path / "back" / "big.bin"
    target.parent.mkdir()
    with open(str(source), "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1024 * 1024))
    tracemalloc.start()
    try:
        stored = rc_cluster.put(str(source))
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()          # and started again: its peak from here
        tracemalloc.start()
        assert rc_cluster.get(stored, str(target)) == str(target)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored["size"] == 48 * 1024 * 1024
    assert put_peak < 8 * 1024 * 1024 and get_peak < 8 * 1024 * 1024, (put_peak, get_peak)
    assert files_equal(str(source), str(target))
    assert sorted(os.listdir(str(target.parent))) == ["big.bin"]
    with open(str(source), "rb") as f:          # a file object, from where it stands
        f.seek(1024)
        assert rc_cluster.put(f)["size"] == 48 * 1024 * 1024 - 1024


def files_equal(first, second):
    import filecmp
    return filecmp.cmp(first, second, shallow=False)


def test_a_wrong_token_is_a_clear_error(cluster):
    with client.Cluster(cluster.url, "wrong") as wrong:
        with pytest.raises(client.ClusterError, match="admin token"):
            wrong.submit("echo", "x").result(30)


# -- HTTP: long polls, bulk reads, the group stream, batches --------------------------------

def test_long_poll_returns_when_the_task_finishes(cluster):
    (task_id,), _ = submit(cluster, {"task_type": "shell", "payload": "sleep 1"})
    started = time.monotonic()
    status, answer = http(cluster, "GET", "/api/v1/tasks/%d/result?wait=20" % task_id)
    elapsed = time.monotonic() - started
    assert status == 200 and answer["state"] == "completed", answer
    assert 0.5 < elapsed < 10
    queued = held(cluster)
    started = time.monotonic()
    status, answer = http(cluster, "GET", "/api/v1/tasks/%d/result?wait=0.5" % queued)
    assert status == 409 and answer["state"] == "queued"
    assert 0.4 < time.monotonic() - started < 5 and answer["waited"] >= 0.4
    http(cluster, "POST", "/api/v1/tasks/%d/cancel" % queued, {})


@pytest.mark.parametrize("wait", ["abc", "-1", "61", "1e9", "nan", "inf"])
def test_bad_waits_are_400(cluster, wait):
    status, answer = http(cluster, "GET", "/api/v1/tasks/1/result?wait=" + wait)
    assert status == 400 and "wait must be" in answer["error"]


def test_waiters_are_capped_per_address(cluster):
    queued = held(cluster)
    answers = []

    def poll():
        answers.append(http(cluster, "GET", "/api/v1/tasks/%d/result?wait=3" % queued))
    threads = [threading.Thread(target=poll) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    refused = [a for s, a in answers if "wait_refused" in a]
    assert len(answers) == 6 and len(refused) == 2, answers
    assert all(s == 409 for s, _ in answers)
    assert "the most one address may hold" in refused[0]["wait_refused"]
    http(cluster, "POST", "/api/v1/tasks/%d/cancel" % queued, {})


def test_bulk_read_of_many_results(cluster, rc_cluster):
    ids, _ = submit(cluster, *[{"task_type": "echo", "payload": "n%d" % n} for n in range(50)])
    answer = rc_cluster.results(ids + [10 ** 12], wait=30)
    assert sorted(r["task_id"] for r in answer["results"]) == ids
    assert {r["result"]["output"] for r in answer["results"]} == {"n%d" % n for n in range(50)}
    assert answer["pending"] == [] and answer["unknown"] == [10 ** 12]
    status, got = http(cluster, "GET", "/api/v1/results?ids=%s" % ",".join(map(str, ids[:3])))
    assert status == 200 and [r["task_id"] for r in got["results"]] == ids[:3]
    queued = held(cluster)
    answer = rc_cluster.results([queued, ids[0]], wait=20, until="any")
    assert [r["task_id"] for r in answer["results"]] == [ids[0]]
    assert answer["pending"] == [queued] and answer["waited"] == 0
    for body, message in (({"task_ids": list(range(1, 10002))}, "1 to 10000 task ids"),
                          ({"task_ids": []}, "1 to 10000 task ids"),
                          ({"task_ids": ["1"]}, "list of task ids"),
                          ({"task_ids": [1], "until": "some"}, "until must be"),
                          ({"task_ids": [1], "wait": 100}, "wait must be"),
                          ({"task_ids": [1], "bogus": 1}, "unknown field bogus")):
        status, answer = http(cluster, "POST", "/api/v1/results", body)
        assert status == 400 and message in answer["error"], (body, answer)
    http(cluster, "POST", "/api/v1/tasks/%d/cancel" % queued, {})


def test_group_results_stream_as_they_finish(cluster):
    ids, answer = submit(cluster, {"task_type": "shell", "payload": "sleep 0.5; echo slow"},
                         {"task_type": "echo", "payload": "quick"},
                         {"task_type": "shell", "payload": "exit 4"}, query="?group=new")
    group_id = answer["group_id"]
    request = urllib.request.Request("%s/api/v1/groups/%d/results?stream=1"
                                     % (cluster.url, group_id))
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response if line.strip()]
    assert lines[-1] == {"end": True, "group_id": group_id, "tasks": 3}
    by_id = {line["task_id"]: line for line in lines[:-1]}
    assert sorted(by_id) == ids
    assert by_id[ids[0]]["result"]["output"] == "slow\n"
    assert by_id[ids[2]]["state"] == "failed"
    assert [line["task_id"] for line in lines[:-1]].index(ids[0]) == 2   # it finished last
    status, whole = http(cluster, "GET", "/api/v1/groups/%d/results" % group_id)
    assert status == 200 and [r["task_id"] for r in whole["results"]] == ids
    assert http(cluster, "GET", "/api/v1/groups/999999/results")[0] == 404
    assert http(cluster, "GET", "/api/v1/groups/%d/results?stream=2" % group_id)[0] == 400


def test_a_batch_submit_writes_one_audit_line(cluster):
    def lines():
        return [line for line in audit.read(cluster.config)
                if line["event"] in ("tasks_submitted", "task_submitted")]
    before = len(lines())
    ids, _ = submit(cluster, *[{"task_type": "echo", "payload": "b%d" % n}
                               for n in range(100)])
    new = lines()[before:]
    assert len(new) == 1 and new[0]["event"] == "tasks_submitted"
    assert new[0]["count"] == 100 and new[0]["task_ids"] == "%d-%d" % (ids[0], ids[-1])
    assert new[0]["actor"] == "admin" and new[0]["source"] == "127.0.0.1"
    status, answer = http(cluster, "POST", "/api/v1/tasks?group=new",
                          [{"task_type": "echo", "payload": "x"}], token=False)
    assert status == 401
    status, answer = http(cluster, "POST", "/api/v1/tasks?group=999999",
                          [{"task_type": "echo", "payload": "x"}])
    assert status == 404 and "no group 999999" in answer["error"]
    status, answer = http(cluster, "POST", "/api/v1/tasks?group=new",
                          [{"task_type": "echo", "payload": "x"}, {"task_type": "nope"}])
    assert status == 400 and "task 2 of 2" in answer["error"]
    status, each = http(cluster, "POST", "/api/v1/groups", {"task_type": "echo", "payload": "x"})
    assert status == 201
    status, answer = http(cluster, "POST", "/api/v1/tasks?group=%d" % each["group_id"],
                          [{"task_type": "echo", "payload": "x"}])
    assert status == 400 and "one task per device" in answer["error"]
    assert http(cluster, "POST", "/api/v1/tasks?group=x", [{"task_type": "echo"}])[0] == 400


def test_close_ends_the_result_stream_at_once(cluster):
    connection = client.Cluster(cluster.url, cluster.token)
    assert connection.submit("echo", "x").result(60) == "x"
    assert connection.receiver.is_alive()       # the stream stays open a while
    started = time.monotonic()
    connection.close()
    assert time.monotonic() - started < 2       # not until rc-web's next ping
    assert not connection.receiver.is_alive()
    with client.Cluster(cluster.url, cluster.token) as closed_early:
        held_future = closed_early.submit("echo", "x", requirements={"device_id": "nobody"})
        held_future.wait_submitted(60)
        closed_early.close(wait=False)
    # leaving the block closed it again, at once: no wait for a result nobody reads
    assert not held_future.done()
    http(cluster, "POST", "/api/v1/tasks/%d/cancel" % held_future.task_id, {})


def test_lone_submits_past_the_stream_idle_time_share_one_stream(cluster, monkeypatch):
    """The stream stays open STREAM_IDLE from the last result, not from its
    opening. An opening counts against it only when the result before it
    came well inside STREAM_IDLE: a loaded machine that stalls this thread
    past it rightly gets a new stream."""
    monkeypatch.setattr(client, "STREAM_IDLE", 1.0)
    with client.Cluster(cluster.url, cluster.token) as connection:
        last_result = [None]
        early_reopenings = []
        stream = connection.http.stream

        def counted(*args):
            if last_result[0] is not None and time.monotonic() - last_result[0] < 0.5:
                early_reopenings.append(time.monotonic() - last_result[0])
            return stream(*args)
        connection.http.stream = counted
        started = time.monotonic()
        while time.monotonic() - started < 3.5:         # over three times STREAM_IDLE
            assert connection.submit("echo", "x").result(60) == "x"
            last_result[0] = time.monotonic()
            time.sleep(0.02)
    assert not early_reopenings, "a stream opened again %s s after a result" % early_reopenings


def lone_submit(connection, *args, **options):
    """A submit after the client has been idle: sent from this thread."""
    time.sleep(client.IDLE_GAP * 3)
    return connection.submit(*args, **options)


def test_a_lone_result_is_read_by_the_thread_that_waits_for_it(cluster):
    """No hand-over from the receiver thread: the caller of result() reads
    the stream itself while no other thread does."""
    with client.Cluster(cluster.url, cluster.token) as connection:
        assert connection.submit("echo", "first").result(60) == "first"     # opens the stream
        readers = []
        take = connection.take_result
        connection.take_result = lambda record, size: readers.append(
            threading.current_thread().name) or take(record, size)
        for n in range(5):
            assert lone_submit(connection, "echo", "x%d" % n).result(60) == "x%d" % n
        assert readers == [threading.current_thread().name] * 5
        future = lone_submit(connection, "sleep", {"seconds": 0.5})
        with pytest.raises(concurrent.futures.TimeoutError):
            future.result(0.1)               # a timeout leaves the stream readable
        assert future.result(60) is not None and connection.reader is None
        future = lone_submit(connection, "echo", "later")

        def arrived():
            """Its line waits on the socket, unread (a fixed second was too
            short for the round trip on a loaded machine); or the receiver's
            idle timer woke it to read it (base done(): no wake-up asked)."""
            return concurrent.futures.Future.done(future) or \
                select.select([connection.stream.sock], [], [], 0)[0]
        wait_for(arrived, 60, "the result's line")
        assert future.result(0) == "later"      # a look without a wait reads it


@pytest.mark.parametrize("how", ["callback", "wait", "as_completed", "done", "other_thread"])
def test_a_lone_result_awaited_without_result_comes_promptly(cluster, monkeypatch, how):
    """A callback, wait(), as_completed(), polling done() or a result()
    in another thread: the receiver thread reads it, at once, not after
    its idle timer."""
    monkeypatch.setattr(client, "STREAM_IDLE", 60.0)
    with client.Cluster(cluster.url, cluster.token) as connection:
        assert connection.submit("echo", "first").result(60) == "first"
        for n in range(3):
            future = lone_submit(connection, "echo", "x")
            started = time.monotonic()
            if how == "callback":
                finished = threading.Event()
                future.add_done_callback(lambda _: finished.set())
                assert finished.wait(10)
            elif how == "wait":
                assert concurrent.futures.wait([future], 10).done == {future}
            elif how == "as_completed":
                assert list(concurrent.futures.as_completed([future], 10)) == [future]
            elif how == "done":
                while not future.done():
                    time.sleep(0.01)
            else:
                outcome = []
                thread = threading.Thread(target=lambda: outcome.append(future.result(10)))
                thread.start()
                thread.join(10)
                assert outcome == ["x"]
            assert time.monotonic() - started < 3, "%s waited for the idle timer" % how
            assert future.result(0) == "x"


def test_a_stream_wake_reads_the_new_events_not_the_whole_group(cluster):
    plan = [row[3] for row in cluster.db.execute(
        "EXPLAIN QUERY PLAN " + web_results.GROUP_ENDED_SQL, (1, 2, 0))]
    searches = [step for step in plan if step.startswith(("SEARCH", "SCAN"))]
    assert searches[-2].startswith("SEARCH e USING INTEGER PRIMARY KEY (rowid>?)"), plan
    assert searches[-1].startswith("SEARCH t USING INTEGER PRIMARY KEY (rowid=?)"), plan
    assert not any(step.startswith("SCAN") for step in plan), plan


# -- /client.py on the oldest and newest Python ----------------------------------------------

SMOKE = """
import sys
sys.path.insert(0, sys.argv[1])
import client
sys.path.insert(0, sys.argv[2])
import client_functions
with client.Cluster() as cluster:
    print(cluster.submit("echo", "from %d.%d" % sys.version_info[:2]).result(60))
with client.Executor(requirements={"device_id": sys.argv[3]}) as executor:
    print(executor.submit(client_functions.where, 4).result(60))
"""


@pytest.mark.parametrize("python", [p for p in (OLDEST, NEWEST) if p] or ["none"])
def test_client_file_served_runs_on_old_and_new_python(cluster, tmp_path, python):
    if python == "none":
        pytest.skip("no CPython under ~/.pyenv/versions")
    with urllib.request.urlopen(cluster.url + "/client.py", timeout=30) as response:
        served = response.read()
    with open(os.path.join(REPO, "lib", "rc", "client.py"), "rb") as f:
        assert served == f.read()
    (tmp_path / "client.py").write_bytes(served)
    device = "py36" if OLDEST else "main"
    done = subprocess.run([python, "-c", SMOKE, str(tmp_path), DATA, device],
                          env=dict(os.environ, RC_URL=cluster.url, RC_TOKEN=cluster.token),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    lines = done.stdout.splitlines()
    assert lines[0] == "from " + version
    assert lines[1].startswith("([3, 6]," if OLDEST else "([3, ") and lines[1].endswith(", 8)")


# -- clients that leave ----------------------------------------------------------------------

def raw_get(cluster, path):
    """A GET sent on a raw socket, left without reading its answer."""
    sock = socket.create_connection(("127.0.0.1", cluster.config.web_port), timeout=10)
    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
                  % (path, cluster.token)).encode())
    return sock


def test_clients_that_leave_give_back_their_waits_and_streams(cluster):
    queued = held(cluster)
    _, answer = submit(cluster, {"task_type": "echo", "payload": "x"}, query="?group=new")
    stream = "/api/v1/groups/%d/results?stream=1&follow=1" % answer["group_id"]
    with unharmed(cluster, "main"):
        for _ in range(2):
            sockets = [raw_get(cluster, "/api/v1/tasks/%d/result?wait=60" % queued)
                       for _ in range(4)]
            sockets += [raw_get(cluster, stream) for _ in range(cluster.config.max_streams)]
            # The four hold this address's share once rc-web has taken them in.
            def fifth_refused():
                # A probe that came before one of the four held a slot for its
                # second, and that one was refused and answered: sent again.
                for n, sock in enumerate(sockets[:4]):
                    if select.select([sock], [], [], 0)[0]:
                        sock.close()
                        sockets[n] = raw_get(cluster, "/api/v1/tasks/%d/result?wait=60"
                                             % queued)
                return "wait_refused" in http(
                    cluster, "GET", "/api/v1/tasks/%d/result?wait=1" % queued)[1]
            wait_for(fifth_refused, 30, "a fifth wait to be refused")
            for sock in sockets:
                sock.close()

            def freed():
                """All four given back: four waits at once, none refused (one
                left held would make the next round's fourth refused, and its
                fifth not)."""
                answers = []

                def probe():
                    answers.append(http(cluster, "GET",
                                        "/api/v1/tasks/%d/result?wait=2" % queued)[1])
                probes = [threading.Thread(target=probe) for _ in range(4)]
                for thread in probes:
                    thread.start()
                for thread in probes:
                    thread.join()
                return not any("wait_refused" in answer for answer in answers)
            wait_for(freed, 30, "the waits to be given back")
            request = urllib.request.Request(cluster.url + stream.replace("follow=1", "follow=0"))
            with urllib.request.urlopen(request, timeout=30) as response:
                assert json.loads(response.readline())["task_id"]    # a stream slot is free
    http(cluster, "POST", "/api/v1/tasks/%d/cancel" % queued, {})
