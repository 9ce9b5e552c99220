"""Session 45's attack: what earlier hostile rounds left untried. Settings
an operator may write in etc/rc.json that no program can use (NaN,
Infinity, a word no program knows, a host name that is a number); an
IPv6 address, or one this machine does not have, for tcp_host."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import cluster_harness
from cluster_harness import online, wait_for
from rc import config as config_module
from rc import db, devices, protocol, reaper, services, state_dir, tasks
from rc.log import Logger
from rc.states import ASSIGNED, QUEUED
from test_bad_input import connect, register_frame
from test_inline_files import GOOD, with_the_good_worker
from test_store import store  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


# -- settings no program can use ---------------------------------------------------------
#
# config.check refused a negative number and a wrong type, but Python's json
# reads NaN and Infinity (which JSON itself does not allow), and NaN is not
# below zero: {"reaper_interval": NaN} passed `make run`, and rc-reaper died
# at its first pause (ValueError: Invalid value NaN) and again at each of
# supervisord's restarts, for ever; rc-web could not listen with
# web_channel_timeout NaN. log_level, read_access and allowed_hosts were
# checked only by the programs, each as it started: `make run` went ahead,
# then every program died with a traceback (log_level), rc-web alone
# (read_access, allowed_hosts: AttributeError on an int), while the
# cluster seemed started.

UNUSABLE = [
    ('"reaper_interval": NaN', "reaper_interval"),
    ('"poll_interval": Infinity', "poll_interval"),
    ('"web_channel_timeout": NaN', "web_channel_timeout"),
    ('"log_level": "verbose"', "log_level"),
    ('"read_access": "everyone"', "read_access"),
    ('"allowed_hosts": ["nas", 1]', "allowed_hosts"),
    # Finite, but past what a pause takes (OverflowError: rc-reaper died at
    # each start, rc-server failed every turn) or SQLite holds.
    ('"reaper_interval": 1e308', "reaper_interval"),
    ('"poll_interval": 1e20', "poll_interval"),
    ('"heartbeat_history": 100000000000000000000', "heartbeat_history"),
    # Zero where nothing can be: rc-reaper swept without a pause (~35% of a
    # core), rc-server and rc-scheduler polled the database without one.
    ('"reaper_interval": 0', "reaper_interval"),
    ('"poll_interval": 0', "poll_interval"),
    # A heartbeat interval of 0 let lease_duration be 0 (1.5 x 0): every
    # lease ran out as it was given.
    ('"heartbeat_interval": 0, "lease_duration": 0', "heartbeat_interval"),
    # A device went offline between two of its heartbeats, and the reaper
    # took back what it ran: a `sleep 12` on a healthy connected worker
    # failed "retries spent: device vm-local offline" with heartbeat_interval
    # 4 and offline_timeout 2.
    ('"heartbeat_interval": 4, "lease_duration": 6, "offline_timeout": 2', "offline_timeout"),
    ('"offline_timeout": 60', "offline_timeout"),
]


@pytest.mark.parametrize("setting, name", UNUSABLE)
def test_a_setting_no_program_can_use_is_refused_as_the_file_is_read(tmp_path, setting, name):
    path = tmp_path / "rc.json"
    path.write_text("{%s}" % setting)
    with pytest.raises(config_module.ConfigError, match=name):
        config_module.load(str(path), environ={"RC_HOME": str(tmp_path)})


@pytest.mark.parametrize("program", ["rc.reaper", "rc.server", "rc.scheduler", "rc.transfer",
                                     "rc.web"])
def test_a_program_given_such_a_setting_says_which_in_one_line(tmp_path, program):
    """Started by supervisord with a file edited since `make run` (`rc ctl
    restart`): one line naming the setting, no traceback, no pause first."""
    path = tmp_path / "rc.json"
    ports = cluster_harness.free_ports(3)
    path.write_text('{"reaper_interval": NaN, "tcp_host": "127.0.0.1", "web_host": "127.0.0.1",'
                    ' "tcp_port": %d, "web_port": %d, "files_port": %d}' % tuple(ports))
    done = subprocess.run([PYTHON, "-m", program], cwd=os.path.join(REPO, "lib"),
                          env=dict(os.environ, RC_HOME=str(tmp_path), RC_CONFIG=str(path)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=30)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stdout and "reaper_interval" in done.stdout, done.stdout
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout


# -- the address the worker port and rc-files listen on ------------------------------------
#
# rc-server made an AF_INET socket whatever tcp_host said, and rc-files
# asked socket.create_server for one too: tcp_host "::" (every IPv6 and IPv4
# address: the docs count rc-server's clients by IPv6 /64) or "::1" passed
# `make run`'s check (getaddrinfo), then both died at each start with a
# traceback (gaierror: Address family for hostname not supported), while
# rc-web listened there. A host no address of this machine has (the NAS's
# old address after its lease changed) was a traceback too.

def program_at(tmp_path, module, **settings):
    """`module` started in a state directory of its own with `settings`."""
    home = tmp_path / "home"
    tcp_port, web_port, files_port = cluster_harness.free_ports(3)
    path = tmp_path / "rc.json"
    path.write_text(json.dumps(dict({"tls": False, "web_host": "127.0.0.1", "tcp_port": tcp_port,
                                     "web_port": web_port, "files_port": files_port},
                                    **settings)))
    env = dict(os.environ, RC_HOME=str(home), RC_CONFIG=str(path))
    config = config_module.load(environ=env)
    state_dir.init(config)
    process = subprocess.Popen([PYTHON, "-m", module], cwd=os.path.join(REPO, "lib"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True, start_new_session=True)
    return process, config


def first_line_from(process, port):
    """The first line rc-server or rc-files sends on [::1]:port (its hello)."""
    while True:
        try:
            sock = socket.create_connection(("::1", port), timeout=5)
            break
        except OSError:
            if process.poll() is not None:      # it did not start
                raise
            time.sleep(0.05)
    with sock:
        return sock.makefile("rb").readline()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
@pytest.mark.parametrize("module, port_key", [("rc.server", "tcp_port"),
                                              ("rc.transfer", "files_port")])
def test_the_worker_port_and_rc_files_listen_on_an_ipv6_host(tmp_path, module, port_key):
    process, config = program_at(tmp_path, module, tcp_host="::1")
    try:
        hello = json.loads(first_line_from(process, getattr(config, port_key)))
        assert "hello" in (hello.get("message_type"), *hello), hello
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
    assert "Traceback" not in output, output


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_an_ipv4_client_of_the_worker_port_on_every_address_is_named_by_its_ipv4(tmp_path):
    """On tcp_host "::" an IPv4 client came as ::ffff:127.0.0.1, and the logs
    and the audit named it so (rc-web, rc-files alike: throttle.as_accepted)."""
    process, config = program_at(tmp_path, "rc.server", tcp_host="::")
    try:
        first_line_from(process, config.tcp_port)
        with socket.create_connection(("127.0.0.1", config.tcp_port), timeout=5) as sock:
            sock.makefile("rb").readline()
            sock.sendall(b"{not json\n")
            assert sock.recv(65536) is not None      # its error, or the close
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
    named = [json.loads(line)["address"] for line in output.splitlines()
             if '"bad_frame"' in line]
    assert named and named[0].startswith("127.0.0.1:"), output


@pytest.mark.parametrize("module", ["rc.server", "rc.transfer"])
def test_a_host_it_cannot_listen_on_is_one_line_naming_it(tmp_path, module):
    process, config = program_at(tmp_path, module, tcp_host="192.0.2.1")   # TEST-NET-1
    try:
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = output.strip().splitlines()
    assert process.returncode != 0 and "Traceback" not in output, output
    assert "cannot_listen" in lines[-1] and "192.0.2.1" in lines[-1], output


# -- a retry or a restart past the thousandth ------------------------------------------------
#
# The backoff doubled per attempt as float * 2 ** (attempt - 1), capped by
# min() only after: past attempt 1024 the product is OverflowError. An
# attempt that is never charged (assigned, never accepted: a device that
# heartbeats and lets every assignment run out; drained, handed back) is
# queued again without end, a number up each time; at the 1025th the reaper
# failed on it at every sweep (one error line a second), and the task stayed
# assigned for good, neither queued nor ended. A service that exits at once
# for ~85 hours (1025 quick exits at service_restart_backoff_max) was never
# started again, rc-scheduler failing on it each pass.



def test_an_attempt_past_the_thousandth_is_queued_again_not_wedged(store):
    config, connection = store
    with db.write(connection):
        devices.register(connection, "liar", {"task_types": ["echo"], "slots": 1},
                         "127.0.0.1:1", 1000.0)
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = ?, attempt = 1100, device_id = 'liar',"
                           " assigned_at = 1000, lease_expires = 1001 WHERE task_id = ?",
                           (ASSIGNED, task_id))
        connection.execute("UPDATE devices SET last_seen = 1999, status = 'online'")
    reaper.sweep(connection, config, Logger("rc-reaper", "error", io.BytesIO()), 2000.0)
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"]) == (QUEUED, 1101), task
    assert task["not_before"] <= 2000.0 + config.retry_backoff_max


def test_a_service_past_its_thousandth_quick_exit_waits_the_longest_backoff(store):
    config, _ = store
    assert services.restart_delay(config, 1100) == config.service_restart_backoff_max


# -- a device that lets every assignment run out ------------------------------------------
#
# A device that gives a task back goes to the back of the line for it
# (session 44's GAVE_BACK), but one that says nothing about an assignment,
# while it heartbeats and answers pings (so it is never suspect), let the
# accept_timeout run out, and the reaper queued the task again uncharged,
# for the same device: claiming 16 idle slots, it was the scheduler's first
# choice again after each backoff. 8 `echo` tasks on a cluster with an idle
# good worker beside it: none ran in 60 s (attempt 8-9 each, every one
# "lease on silent1 expired"), and none would ever end.

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("hostile-s45"), bounce_limit=3)


class LetsEveryAssignmentRunOut:
    """A joined device claiming every task type and 16 idle slots, that
    heartbeats each second and answers pings, and never accepts, starts nor
    gives back what it is assigned. One thread reads and writes its (TLS)
    socket."""

    fences = False      # FencesEverything: accepts, then says it stopped it

    def __init__(self, cluster, device_id):
        sock, nonce = connect(cluster)
        sock.sendall(register_frame(
            cluster, nonce, device_id, slots=16,
            task_types=["echo", "sleep", "system_info", "python_eval", "python_exec", "shell"]))
        self.sock, self.device_id, self.assigned = sock, device_id, []
        self.fenced = []        # to name in the next heartbeat
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        buffer, next_heartbeat = b"", 0.0
        self.sock.settimeout(0.2)
        while not self.stopping:
            if time.monotonic() >= next_heartbeat:
                self.send("heartbeat", {"system_metrics": {}, "active_tasks": [],
                                        "fenced_tasks": self.fenced})
                self.fenced, next_heartbeat = [], time.monotonic() + 1.0
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                frame = json.loads(line)
                if frame["message_type"] == "ping":
                    self.send("pong", {})
                elif frame["message_type"] == "task_assign":
                    self.assigned.append((frame["data"]["task_id"], frame["data"]["attempt"]))
                    if self.fences:
                        key = {"task_id": frame["data"]["task_id"],
                               "attempt": frame["data"]["attempt"]}
                        self.send("task_accept", key)
                        self.fenced.append(key)

    def send(self, kind, data):
        self.sock.sendall(protocol.encode(kind, data, sender_id=self.device_id))

    def close(self):
        self.stopping = True
        self.thread.join(10)
        self.sock.close()


def test_a_device_that_lets_every_assignment_run_out_holds_no_task(cluster):
    silent = LetsEveryAssignmentRunOut(cluster, "silent-45")
    try:
        wait_for(lambda: silent.device_id in online(cluster), 20, "the silent device online")
        task_ids = [int(cluster.rc("submit", "shell", "echo s45-%d" % n).stdout)
                    for n in range(3)]
        try:
            wait_for(lambda: all(tasks.get(cluster.db, task_id)["state"] == "completed"
                                 for task_id in task_ids), 90, "the good worker's tasks")
        except AssertionError as e:
            raise AssertionError("%s; given to the silent one: %s; %s" % (
                e, silent.assigned, cluster.rc("tasks").stdout + cluster.rc(
                    "why", str(task_ids[0])).stdout + cluster.rc("task", str(task_ids[0])).stdout))
        # Pinned to it, the task is failed after bounce_limit (3 here) in a
        # row, naming it: it had no end before.
        pinned = int(cluster.rc("submit", "shell", "echo pinned", "--require",
                                "device_id=%s" % silent.device_id).stdout)
        wait_for(lambda: tasks.get(cluster.db, pinned)["state"] == "failed", 90,
                 "the pinned task failed; given: %s" % silent.assigned)
    finally:
        silent.close()
    for task_id in task_ids:
        task = tasks.get(cluster.db, task_id)
        assert task["device_id"] == GOOD and task["result"]["output"] == "s45-%d\n" % (
            task_ids.index(task_id)), task
        # Again only while the good worker's two slots were full.
        assert sum(given[0] == task_id for given in silent.assigned) <= 2, silent.assigned
    error = tasks.get(cluster.db, pinned)["error"]
    assert "silent-45 (3)" in error and "accept" in error, error


# -- the heartbeat history -------------------------------------------------------------------
#
# heartbeat_history (1440, "a day at 60 s") was kept by time only: every
# heartbeat written, one a second at most (min_heartbeat_interval), went
# into the history, read by nothing, pruned after heartbeat_history x
# heartbeat_interval seconds. A device sending a heartbeat a second with 64
# metrics of 200 characters (~17 KB a row) kept 86,400 rows, ~1.4 GB, a day;
# 100 devices of one join token, ~140 GB of a NAS's disk.

def test_a_device_heartbeating_each_second_keeps_one_history_row_an_interval(cluster):
    sock, nonce = connect(cluster)
    device_id = "hurried-45"
    sock.sendall(register_frame(cluster, nonce, device_id, task_types=["echo"]))
    reader = sock.makefile("rb")
    assert json.loads(reader.readline())["message_type"] == "register_ack"
    metrics = {"m%02d" % n: "x" * 200 for n in range(64)}
    try:
        for n in range(8):      # one heartbeat_interval (60 s) holds all of them
            metrics["m00"] = "heartbeat %d" % n
            sock.sendall(protocol.encode("heartbeat", {"system_metrics": metrics,
                                                       "active_tasks": []}, sender_id=device_id))
            assert json.loads(reader.readline())["message_type"] == "heartbeat_ack"
            time.sleep(cluster.config.min_heartbeat_interval * 0.6)
        # The device's own figures still follow each heartbeat written.
        wait_for(lambda: (devices.get(cluster.db, device_id)["metrics"] or {}).get("m00")
                 in ("heartbeat 6", "heartbeat 7"), 10, "the latest figures")
    finally:
        sock.close()
    rows = cluster.db.execute("SELECT count(*) FROM heartbeats WHERE device_id = ?",
                              (device_id,)).fetchone()[0]
    assert rows == 1, rows


class FencesEverything(LetsEveryAssignmentRunOut):
    """Accepts each task, then names it in its next heartbeat's fenced_tasks
    (a worker that lost the main node stopped it): uncharged, and before,
    given to it again after the backoff: none of 3 tasks ran on the idle
    good worker beside it in 60 s."""
    fences = True


def test_a_device_that_fences_every_task_it_accepts_holds_none(cluster):
    fencer = FencesEverything(cluster, "fencer-45")
    try:
        wait_for(lambda: fencer.device_id in online(cluster), 20, "the fencing device online")
        task_ids = [int(cluster.rc("submit", "shell", "echo f45-%d" % n).stdout)
                    for n in range(3)]
        wait_for(lambda: all(tasks.get(cluster.db, task_id)["state"] == "completed"
                             for task_id in task_ids), 60, "the good worker's tasks")
    finally:
        fencer.close()
    for task_id in task_ids:
        task = tasks.get(cluster.db, task_id)
        assert task["device_id"] == GOOD and task["retries_used"] == 0, task



# -- a state directory damaged by hand or a partial restore ---------------------------------
#
# rc-server and rc-files read the cluster's id (and, with TLS, its certificate
# and key) as they start: one of them gone, each died at every start with a
# FileNotFoundError traceback naming no file of ours, and supervisord gave up
# on it (FATAL). Now one line names what is missing and what makes it again.

@pytest.mark.parametrize("module", ["rc.server", "rc.transfer"])
@pytest.mark.parametrize("lost", ["cluster_id", os.path.join("tls", "cert.pem")])
def test_a_program_missing_a_state_file_names_it_in_one_line(tmp_path, module, lost):
    home = tmp_path / "home"
    tcp_port, web_port, files_port = cluster_harness.free_ports(3)
    path = tmp_path / "rc.json"
    path.write_text(json.dumps({"tcp_host": "127.0.0.1", "tcp_port": tcp_port,
                                "web_port": web_port, "files_port": files_port}))
    env = dict(os.environ, RC_HOME=str(home), RC_CONFIG=str(path))
    state_dir.init(config_module.load(environ=env))
    os.remove(str(home / lost))
    done = subprocess.run([PYTHON, "-m", module], cwd=os.path.join(REPO, "lib"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["event"] == "state_damaged" and line["missing"] == [str(home / lost)], line
    assert "make run" in line["message"]
