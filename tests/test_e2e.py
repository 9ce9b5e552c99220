"""The whole cluster: `make run` starts the real supervisord with every
program, two more workers join over 127.0.0.1, and tasks of every type run
to the right result, through worker deaths and main-node program deaths."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rc import config as config_module
from rc import db, tasks
from rc.states import TERMINAL_STATES

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RC = os.path.join(REPO, "bin", "rc")
WORKER = os.path.join(REPO, "bin", "worker.py")
# Short grace and backoff so failover fits in a test; the defaults are longer.
TEST_SETTINGS = {"disconnect_grace": 2.0, "retry_backoff": 0.2, "accept_timeout": 5.0,
                 "tcp_host": "127.0.0.1", "web_host": "127.0.0.1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, home):
        self.home = str(home)
        settings_path = os.path.join(self.home, "rc.json")
        os.makedirs(self.home, exist_ok=True)
        with open(settings_path, "w") as f:
            json.dump(TEST_SETTINGS, f)
        self.env = dict(os.environ, RC_HOME=self.home, RC_CONFIG=settings_path,
                        RC_TCP_PORT=str(free_port()), RC_WEB_PORT=str(free_port()))
        self.config = config_module.load(environ=self.env)
        self.workers = {}

    def make(self, target):
        return subprocess.run(["make", "-s", "-C", REPO, target], env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=180)

    def rc(self, *args, check=True):
        done = subprocess.run([RC] + list(args), env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def supervisorctl(self, *args):
        return subprocess.run([os.path.join(REPO, ".venv", "bin", "supervisorctl"), "-c",
                               os.path.join(REPO, "etc", "supervisord.conf")] + list(args),
                              env=self.env, stdout=subprocess.PIPE, universal_newlines=True,
                              timeout=60).stdout

    def program_pid(self, name):
        output = self.supervisorctl("pid", name).strip()
        return int(output) if output.isdigit() else 0

    def start_worker(self, device_id, *extra):
        log = open(os.path.join(self.home, "log", device_id + ".log"), "ab")
        process = subprocess.Popen(
            [sys.executable, "-I", WORKER, "--join", "127.0.0.1:%d" % self.config.tcp_port,
             "--token-file", self.config.token_path, "--device-id", device_id] + list(extra),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[device_id] = process
        return process

    def stop_workers(self):
        for process in self.workers.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    started = cluster.make("run")
    assert started.returncode == 0, started.stdout
    connection = db.connect(cluster.config.db_path)
    cluster.db = connection
    try:
        yield cluster
    finally:
        cluster.stop_workers()
        stopped = cluster.make("stop")
        connection.close()
        assert stopped.returncode == 0, stopped.stdout


def online(cluster):
    return {row[0] for row in cluster.db.execute(
        "SELECT device_id FROM devices WHERE status = 'online' AND connected = 1")}


def wait_all_finished(cluster, task_ids, timeout):
    marks = ",".join("?" * len(TERMINAL_STATES))

    def finished():
        rows = cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id IN (%s)"
                                  " AND state IN (%s)" % (",".join(map(str, task_ids)), marks),
                                  TERMINAL_STATES).fetchone()
        return rows[0] == len(task_ids)
    wait_for(finished, timeout, "%d tasks to finish" % len(task_ids))


def assert_one_terminal_state_each(cluster, task_ids):
    marks = ",".join("?" * len(TERMINAL_STATES))
    for task_id in task_ids:
        events = cluster.db.execute(
            "SELECT count(*) FROM task_events WHERE task_id = ? AND state IN (%s)" % marks,
            (task_id,) + TERMINAL_STATES).fetchone()[0]
        assert events == 1, "task %s recorded %d terminal states" % (task_id, events)


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


def test_a_killed_worker_s_task_finishes_on_another(cluster):
    cluster.supervisorctl("stop", "rc-worker")
    for name in ("w1", "w2"):
        process = cluster.workers.pop(name, None)
        if process and process.poll() is None:
            process.terminate()
            process.wait()
    victim = cluster.start_worker("victim")
    wait_for(lambda: "victim" in online(cluster), 30, "victim online")
    task_id = tasks.submit(cluster.db, cluster.config, "shell",
                           {"command": "sleep 2; echo survived"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 30,
             "the task to run on victim")
    cluster.start_worker("rescuer")
    wait_for(lambda: "rescuer" in online(cluster), 30, "rescuer online")
    os.killpg(victim.pid, signal.SIGKILL)
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


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
