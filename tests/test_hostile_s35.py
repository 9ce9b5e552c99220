"""attack35: the root worker's Template and spawner as a task and as its
submitter, then what comes from outside into each main-node program.
Each test failed before the fix its docstring names, or says what held."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rc import tasks  # noqa: E402
from test_worker import WORKER, FakeMain, WorkerProcess, wait_until  # noqa: E402

own_uids = pytest.mark.skipif(os.geteuid() != 0, reason="task uids of their own need root")


@pytest.fixture(scope="module")
def worker_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_module_s35", WORKER)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def root_worker(tmp_path_factory):
    """A root worker (a uid per task, the Template) on one slot, against a
    fake main node: each task runs as 61770, the lowest of its two uids,
    and what one task does to the next is plain to see."""
    log = str(tmp_path_factory.mktemp("s35w") / "worker.log")
    main = FakeMain()
    worker = WorkerProcess(sys.executable, main.port, log, "--task-user", "61770:2",
                           "--slots", "1")
    link = main.accept()
    link.handshake()
    yield worker, link
    worker.stop()
    main.close()


def run(link, task_id, task_type, payload, timeout=30.0):
    link.assign(task_id, task_type, payload, timeout)
    return link.results(1)[task_id]


def spawner_children(worker):
    pid = worker.events("spawner_started")[-1]["pid"]
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(child) for child in f.read().split()]


# -- a request larger than one of the spawner's messages ----------------------------------

@own_uids
def test_a_large_task_neither_breaks_the_spawner_nor_ends_its_neighbours(root_worker):
    """The worker sends the spawner each request as one SOCK_SEQPACKET
    message, which may be no larger than the socket's buffer (212992 bytes
    by default), while the main node takes code of up to 256 KiB: sendmsg
    failed (EMSGSIZE), the worker took the spawner for broken and, as it
    was running a task, restarted itself: its neighbour was killed, the
    large task never ran anywhere (each device it went to restarted), and
    every later task started without the spawner. Now that request alone
    starts as without a spawner. Before: task 3's parent was the worker
    (no spawner); with a task beside it, the worker restarted."""
    worker, link = root_worker
    code = ("#" + "x" * 1000 + "\n") * (tasks.MAX_PAYLOAD_TEXT // 1002) + "print('large ran')\n"
    assert 212992 < len(code) <= tasks.MAX_PAYLOAD_TEXT
    # The neighbour shares the slot's only uid: it runs first, its end awaited.
    link.assign(1, "python_exec", {"code": "import time; time.sleep(0.5); print('before')"})
    result = link.results(1)[1]
    assert result["status"] == "completed" and result["result"]["output"] == "before\n", result
    result = run(link, 2, "python_exec", {"code": code})
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "large ran\n", result
    result = run(link, 3, "python_eval", {"expression": "__import__('os').getppid()"})
    spawner = worker.events("spawner_started")[-1]["pid"]
    assert result["result"]["output"] == str(spawner), "later tasks still come from the spawner"
    assert not worker.events("spawner_failed") and not worker.events("worker_restarting")
