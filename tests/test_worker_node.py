"""bin/worker.py against a real main node: rc-server, rc-scheduler and
rc-reaper as subprocesses on 127.0.0.1, sharing one SQLite file in a temporary
RC_HOME. Tasks are submitted with rc.tasks.submit and followed in the database.

Covers every CPython 3.6-3.13 found under ~/.pyenv (with `-I -S`), a simulated
Android phone (TERMUX_VERSION, no /proc/stat or /proc/loadavg, no psutil, a
fake battery under RC_SYSFS_ROOT), the sandbox (forking tasks past their
timeout, 100 MB of output, a task beyond its memory limit) and the battery
policy with its hysteresis.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from rc import config as config_module  # noqa: E402
from rc import db, tasks, tls  # noqa: E402
from rc.states import TERMINAL_STATES  # noqa: E402

from cluster_harness import free_ports  # noqa: E402
from test_worker import (INTERPRETERS, WAIT, short_name, process_gone,  # noqa: E402,F401
                         wait_until)

WORKER = os.path.join(ROOT, "bin", "worker.py")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
HEARTBEAT = 2.0          # seconds: the main node's heartbeat_interval for these tests
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1",
            "heartbeat_interval": HEARTBEAT, "retry_backoff": 0.1, "accept_timeout": 5.0,
            "disconnect_grace": 2.0}


class MainNode:
    def __init__(self, home):
        self.home = str(home)
        settings = os.path.join(self.home, "rc.json")
        with open(settings, "w") as f:
            json.dump(SETTINGS, f)
        tcp_port, web_port = free_ports(2)
        self.env = dict(os.environ, RC_HOME=os.path.join(self.home, "var"),
                        RC_CONFIG=settings, RC_TCP_PORT=str(tcp_port),
                        RC_WEB_PORT=str(web_port))
        self.config = config_module.load(environ=self.env)
        subprocess.run([VENV_PYTHON, "-m", "rc.cli", "init"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, timeout=60)
        self.programs = []
        for name in ("server", "scheduler", "reaper"):
            log = open(os.path.join(self.home, "%s.log" % name), "wb")
            self.programs.append((subprocess.Popen([VENV_PYTHON, "-m", "rc." + name],
                                                   env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT), log))
        self.db = db.connect(self.config.db_path)
        self.workers = []

    def worker(self, device_id, python=sys.executable, env=None, *arguments):
        log_path = os.path.join(self.home, "worker-%s.log" % device_id)
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [python, "-I", "-S", WORKER, "--join", "127.0.0.1:%d" % self.config.tcp_port,
             "--token-file", self.config.token_path, "--device-id", device_id,
             "--slots", "2", "--state-dir", os.path.join(self.home, "worker-state")]
            + self.pin() + list(arguments),
            env=dict(os.environ, **(env or {})), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        proc.log_path = log_path
        self.workers.append((proc, log))
        wait_until(lambda: self.device(device_id) and self.device(device_id)["connected"]
                   and self.device(device_id)["metrics"] not in (None, "{}"), timeout=20)
        assert self.device(device_id), open(log_path).read()
        return proc

    def pin(self):
        return ["--fingerprint", tls.fingerprint(self.config)] if self.config.tls else []

    def device(self, device_id):
        return self.db.execute("SELECT * FROM devices WHERE device_id = ?",
                               (device_id,)).fetchone()

    def metrics(self, device_id):
        return json.loads(self.device(device_id)["metrics"] or "{}")

    def submit(self, device_id, task_type, payload, timeout=30.0):
        return tasks.submit(self.db, self.config, task_type, payload, timeout=timeout,
                            retries=0, requirements={"device_id": device_id})

    def task(self, task_id):
        return self.db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()

    def wait(self, task_id, timeout=30.0):
        assert wait_until(lambda: self.task(task_id)["state"] in TERMINAL_STATES,
                          timeout=timeout), dict(self.task(task_id))
        row = dict(self.task(task_id))
        row["result"] = json.loads(row["result"] or "{}")
        return row

    def stop_worker(self, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0

    def close(self):
        for proc, log in self.workers + self.programs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        self.db.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    main = MainNode(tmp_path_factory.mktemp("main-node"))
    yield main
    main.close()


def fake_android(root, capacity=80):
    """A proc root without stat, loadavg or uptime (as Android denies them),
    and a sysfs root with a discharging battery, a charger and a thermal zone."""
    proc = root / "proc"
    proc.mkdir()
    for name in ("meminfo", "cpuinfo"):
        shutil.copy("/proc/" + name, str(proc / name))
    battery = root / "sys" / "class" / "power_supply" / "battery"
    battery.mkdir(parents=True)
    for name, value in (("type", "Battery"), ("present", "1"), ("capacity", capacity),
                        ("status", "Discharging"), ("temp", "312")):
        (battery / name).write_text("%s\n" % value)
    charger = root / "sys" / "class" / "power_supply" / "usb"
    charger.mkdir()
    (charger / "type").write_text("USB\n")
    (charger / "online").write_text("0\n")
    zone = root / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("41000\n")
    return {"TERMUX_VERSION": "0.118.0", "RC_PROC_ROOT": str(proc),
            "RC_SYSFS_ROOT": str(root / "sys")}, battery


# -- every interpreter, against the real main node ------------------------------------

@pytest.mark.skipif(not INTERPRETERS, reason="no CPython under ~/.pyenv/versions/3.*")
@pytest.mark.parametrize("python", INTERPRETERS or ["none"], ids=short_name)
def test_every_python_registers_heartbeats_and_runs_tasks(node, python):
    device_id = "py-" + short_name(python)
    worker = node.worker(device_id, python)
    row = node.device(device_id)
    profile = json.loads(row["profile"])
    assert profile["device_info"]["python_version"] == short_name(python)
    assert profile["hardware_specs"]["cpu_speed"] > 0
    assert row["status"] == "online" and row["available"] == 1
    assert "memory_percent" in node.metrics(device_id)
    evaluated = node.submit(device_id, "python_eval", {"expression": "sum(range(100000))"})
    shell = node.submit(device_id, "shell", {"command": "echo hi"})
    assert node.wait(evaluated)["result"]["output"] == "4999950000"
    done = node.wait(shell)
    assert (done["state"], done["result"]["output"]) == ("completed", "hi\n")
    node.stop_worker(worker)


# -- a simulated Android phone -----------------------------------------------------------

def test_simulated_android(node, tmp_path):
    env, _ = fake_android(tmp_path)
    worker = node.worker("phone", sys.executable, env)
    row = node.device("phone")
    profile = json.loads(row["profile"])
    assert row["platform"] == "android" and row["role"] == "mobile"
    assert profile["hardware_specs"]["battery"] is True
    metrics = node.metrics("phone")
    assert metrics["battery_percent"] == 80 and metrics["charging"] is False
    assert metrics["temperature_c"] == 41.0
    assert "cpu_percent" not in metrics and "load_avg" not in metrics
    assert "memory_percent" in metrics
    task = node.wait(node.submit("phone", "python_exec", {"code": "print('from the phone')"}))
    assert task["state"] == "completed" and task["result"]["output"] == "from the phone\n"
    node.stop_worker(worker)
    assert "Traceback" not in open(worker.log_path).read()


# -- the sandbox ---------------------------------------------------------------------------

def test_sandbox(node, drop_dir):
    worker = node.worker("sandbox", sys.executable, None, "--max-memory", "256")
    # Children, a grandchild that left its parent, all asleep past the timeout.
    pids = drop_dir / "pids"
    forking = node.submit("sandbox", "shell", {"command": (
        "sleep 60 & echo $! >> {0}; (sleep 60 & echo $! >> {0}) ; "
        "sh -c 'sleep 60 & echo $! >> {0}; wait' & echo $! >> {0}; "
        "echo $$ >> {0}; wait").format(pids)}, timeout=1.0)
    # 100 MB of output: cut at the cap while the worker stays small.
    chatty = node.submit("sandbox", "python_exec", {"code": (
        "import sys\nblock = b'x' * 1048576\n"
        "for _ in range(100):\n    sys.stdout.buffer.write(block)\n")})
    timed_out = node.wait(forking)
    assert timed_out["state"] == "timed_out", timed_out
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 5
    assert wait_until(lambda: all(map(process_gone, started)), timeout=WAIT), \
        [pid for pid in started if not process_gone(pid)]
    printed = node.wait(chatty, timeout=60)
    assert printed["state"] == "completed" and printed["result"]["truncated"] is True
    assert 900000 < len(printed["result"]["output"]) <= 1024 * 1024
    high_water_kb = int([line.split()[1] for line in open("/proc/%d/status" % worker.pid)
                         if line.startswith("VmHWM")][0])
    assert high_water_kb < 48 * 1024, "the worker's peak RSS was %d kB" % high_water_kb
    # Beyond its memory limit: a clear reason, and the worker carries on.
    greedy = node.wait(node.submit("sandbox", "python_exec",
                                   {"code": "block = bytearray(512 * 1024 * 1024)"}))
    assert greedy["state"] == "failed"
    assert greedy["error"] == "MemoryError: out of memory (limit 256 MiB)"
    shell = node.wait(node.submit("sandbox", "shell", {"command": (
        "%s -I -c 'bytearray(512 * 1024 * 1024)'" % sys.executable)}))
    assert shell["state"] == "failed" and "limit 256 MiB" in shell["error"], shell
    after = node.wait(node.submit("sandbox", "python_eval", {"expression": "6 * 7"}))
    assert after["state"] == "completed" and after["result"]["output"] == "42"
    assert worker.poll() is None
    node.stop_worker(worker)


# -- a good guest: the battery policy ------------------------------------------------------

def available(node, device_id):
    return node.device(device_id)["available"] == 1


def test_battery_threshold_with_hysteresis(node, tmp_path):
    env, battery = fake_android(tmp_path, capacity=50)
    worker = node.worker("battery", sys.executable, env, "--min-battery", "30",
                         "--resume-battery", "40", "--policy-interval", "0.2")
    assert available(node, "battery")

    (battery / "capacity").write_text("20\n")
    dropped = time.monotonic()
    assert wait_until(lambda: not available(node, "battery"), timeout=HEARTBEAT)
    assert time.monotonic() - dropped < HEARTBEAT
    assert "battery 20%" in node.device("battery")["unavailable_reason"]
    waiting = node.submit("battery", "echo", {"message": "later"})

    (battery / "capacity").write_text("35\n")       # above the minimum, below resume
    time.sleep(HEARTBEAT + 0.5)                      # a heartbeat and many checks later
    assert not available(node, "battery")
    assert node.task(waiting)["state"] == "queued"

    (battery / "capacity").write_text("40\n")
    assert wait_until(lambda: available(node, "battery"), timeout=HEARTBEAT)
    assert node.wait(waiting)["result"]["output"] == "later"
    node.stop_worker(worker)


def test_hand_back_when_unavailable_mid_task(node, tmp_path, drop_dir):
    env, battery = fake_android(tmp_path)
    worker = node.worker("handback", sys.executable, env, "--min-battery", "30",
                         "--on-unavailable", "hand-back", "--policy-interval", "0.2")
    pid_file = drop_dir / "pid"
    task = node.submit("handback", "shell", {"command": "echo $$ > %s; sleep 60" % pid_file})
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10)
    pid = int(pid_file.read_text())
    (battery / "capacity").write_text("10\n")
    assert wait_until(lambda: process_gone(pid), timeout=HEARTBEAT)
    assert wait_until(lambda: node.task(task)["state"] == "queued", timeout=HEARTBEAT)
    row = node.task(task)
    assert row["retries_used"] == 0 and row["device_id"] is None
    (battery / "capacity").write_text("90\n")
    assert wait_until(lambda: node.task(task)["state"] == "running", timeout=10)
    node.stop_worker(worker)


def test_a_task_waiting_for_a_slot_too_long_is_handed_back(node):
    """The scheduler gives a quick device a few tasks beyond its slots; one
    that then waits behind a long task goes back, uncharged, after half the
    accept_timeout (5 s here), before the main node would take it back."""
    worker = node.worker("prefetched", sys.executable, None, "--slots", "1")
    long_task = node.submit("prefetched", "shell", {"command": "sleep 30"})
    assert wait_until(lambda: node.task(long_task)["state"] == "running", timeout=10)
    # As a prefetch would: assigned to the device while its one slot is busy.
    waiting = tasks.submit(node.db, node.config, "shell", {"command": "true"}, retries=0,
                           requirements={"device_id": "nowhere"})
    assigned_at = time.time()
    with db.write(node.db):
        node.db.execute("UPDATE tasks SET state = 'assigned', device_id = 'prefetched',"
                        " assigned_at = ?, lease_expires = ? WHERE task_id = ?",
                        (assigned_at, assigned_at + node.config.accept_timeout, waiting))
    assert wait_until(lambda: node.task(waiting)["state"] == "queued", timeout=10)
    row = node.task(waiting)
    assert (row["attempt"], row["retries_used"], row["device_id"]) == (2, 0, None)
    assert "waited" in row["reason"] and "free slot" in row["reason"], row["reason"]
    handed_back_after = time.time() - assigned_at
    assert node.config.accept_timeout / 2 <= handed_back_after < node.config.accept_timeout
    assert node.task(long_task)["state"] == "running"
    node.stop_worker(worker)
