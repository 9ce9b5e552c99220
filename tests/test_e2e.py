"""The whole cluster: `make run` starts the real supervisord with every
program, two more workers join over 127.0.0.1, and tasks of every type run
to the right result, through worker deaths and main-node program deaths."""
import os
import signal
import socket
import sys
import time

import pytest

from cluster_harness import (Cluster, alive, assert_one_terminal_state_each, online,
                             wait_all_finished, wait_for)
from rc import tasks

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_make_run_prints_the_dashboard_and_the_join_command(cluster):
    output = cluster.make("run").stdout
    assert "http://" in output and str(cluster.config.web_port) in output
    assert "worker.py --join" in output and ":%d" % cluster.config.tcp_port in output
    assert cluster.rc("token").stdout.strip() in output


def test_the_readme_session(cluster):
    wait_for(lambda: online(cluster), 30, "the local worker")
    done = cluster.rc("submit", "python_eval", "sum(range(100000))", "--wait")
    assert done.stdout.strip() == "4999950000"
    listing = cluster.rc("devices").stdout
    assert "online" in listing and socket.gethostname()[:10] in listing


def test_two_workers_join_and_run_200_mixed_tasks(cluster):
    cluster.start_worker("w1", "--slots", "3", "--tag", "blue")
    cluster.start_worker("w2", "--slots", "2")
    wait_for(lambda: {"w1", "w2"} <= online(cluster), 30, "w1 and w2 online")
    c, config = cluster.db, cluster.config
    expected = {}
    priorities = ["low", "normal", "high", "urgent"]
    for n in range(200):
        kind = n % 6
        priority = priorities[n % 4]
        if kind == 0:
            task_id = tasks.submit(c, config, "echo", {"message": "m%d" % n}, priority)
            expected[task_id] = ("completed", "m%d" % n)
        elif kind == 1:
            task_id = tasks.submit(c, config, "sleep", {"seconds": 0.05}, priority,
                                   requirements={"min_cpu_cores": 1})
            expected[task_id] = ("completed", "")
        elif kind == 2:
            task_id = tasks.submit(c, config, "system_info", {}, priority,
                                   requirements={"device_id": "w2"})
            expected[task_id] = ("completed", None)
        elif kind == 3:
            task_id = tasks.submit(c, config, "python_eval", {"expression": "%d * 3" % n},
                                   priority, requirements={"tags": ["blue"]})
            expected[task_id] = ("completed", str(n * 3))
        elif kind == 4:
            code = "import sys\nprint(sum(range(%d)))\nsys.exit(%d)" % (n, n % 2)
            task_id = tasks.submit(c, config, "python_exec", {"code": code}, priority)
            expected[task_id] = ("completed" if n % 2 == 0 else "failed", str(sum(range(n))))
        else:
            task_id = tasks.submit(c, config, "shell", {"command": "echo s%d" % n}, priority,
                                   requirements={"platform": sys.platform})
            expected[task_id] = ("completed", "s%d" % n)
    wait_all_finished(cluster, list(expected), 120)
    for task_id, (state, output) in expected.items():
        task = tasks.get(c, task_id)
        assert task["state"] == state, task
        if output is not None:
            assert task["result"]["output"].strip() == output, task
        if task["task_type"] == "system_info":
            assert task["device_id"] == "w2"
            assert "cpu_cores" in task["result"]["output"]
        if task["task_type"] == "python_eval":
            assert task["device_id"] == "w1"
    assert_one_terminal_state_each(cluster, list(expected))


def test_cli_submit_refuses_bad_input_with_one_line(cluster):
    for args in (["submit", "launch", "x"], ["submit", "echo", "x", "--require", "cores"]):
        done = cluster.rc(*args, check=False)
        assert done.returncode != 0
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_killed_worker_s_task_finishes_on_another(cluster, drop_dir):
    cluster.supervisorctl("stop", "rc-worker")
    for name in ("w1", "w2"):
        process = cluster.workers.pop(name, None)
        if process and process.poll() is None:
            process.terminate()
            process.wait()
    victim = cluster.start_worker("victim")
    wait_for(lambda: "victim" in online(cluster), 30, "victim online")
    # It ends only once victim is killed: after a fixed 2 s, a rescuer slow
    # to start on a loaded machine would find it done on victim.
    go = drop_dir / "go"
    task_id = tasks.submit(cluster.db, cluster.config, "shell", {
        "command": "until [ -e %s ]; do sleep 0.05; done; echo survived" % go})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 30,
             "the task to run on victim")
    cluster.start_worker("rescuer")
    wait_for(lambda: "rescuer" in online(cluster), 30, "rescuer online")
    os.killpg(victim.pid, signal.SIGKILL)
    go.touch()
    wait_all_finished(cluster, [task_id], 60)
    task = tasks.get(cluster.db, task_id)
    assert (task["state"], task["device_id"]) == ("completed", "rescuer")
    assert task["attempt"] == 2 and task["result"]["output"].strip() == "survived"
    assert_one_terminal_state_each(cluster, [task_id])


def test_each_main_node_program_killed_under_load(cluster):
    cluster.supervisorctl("start", "rc-worker")
    cluster.start_worker("w3", "--slots", "3")
    c, config = cluster.db, cluster.config
    task_ids = []
    for n in range(300):
        if n % 3 == 0:
            task_ids.append(tasks.submit(c, config, "echo", {"message": "e%d" % n}))
        elif n % 3 == 1:
            task_ids.append(tasks.submit(c, config, "sleep", {"seconds": 0.05}))
        else:
            task_ids.append(tasks.submit(c, config, "shell", {"command": "echo %d" % n}))
    for program in ("rc-server", "rc-scheduler", "rc-reaper", "rc-web"):
        old = cluster.program_pid(program)
        assert old > 0, program
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: cluster.program_pid(program) not in (0, old), 30,
                 "supervisord to restart %s" % program)
        time.sleep(0.5)
    wait_all_finished(cluster, task_ids, 180)
    assert_one_terminal_state_each(cluster, task_ids)
    for n, task_id in enumerate(task_ids):
        task = tasks.get(c, task_id)
        assert task["state"] == "completed", task
        if n % 3 == 0:
            assert task["result"]["output"] == "e%d" % n
        elif n % 3 == 2:
            assert task["result"]["output"].strip() == str(n)


def test_make_stop_leaves_nothing_running(cluster):
    pids = [cluster.program_pid(name) for name in
            ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-worker")]
    assert all(pids)
    assert cluster.make("stop").returncode == 0
    for pid in pids:
        wait_for(lambda: not alive(pid), 15, "pid %d to exit" % pid)
    # Start again so the fixture's own stop has a cluster to stop.
    assert cluster.make("run").returncode == 0
