"""A real cluster for tests: `make run` under a temporary RC_HOME with free
ports on 127.0.0.1, extra workers started and killed at will, and helpers
that read the database the programs share."""
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import xmlrpc.client

from rc import config as config_module
from rc import db, health, tls
from rc.states import TERMINAL_STATES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RC = os.path.join(REPO, "bin", "rc")
WORKER = os.path.join(REPO, "bin", "worker.py")
# Short grace and backoff so failover fits in a test; the defaults are longer.
TEST_SETTINGS = {"disconnect_grace": 2.0, "retry_backoff": 0.2, "accept_timeout": 5.0,
                 "tcp_host": "127.0.0.1", "web_host": "127.0.0.1"}
TERMINAL_MARKS = ",".join("?" * len(TERMINAL_STATES))


def private(path, flags):
    """An opener for the files the harness writes into a state directory:
    owner only, as the main node keeps every file there."""
    return os.open(path, flags, 0o600)


# Ports a test's programs listen on, below Linux's ephemeral range (32768
# up): a port found by binding port 0 is one the next outgoing connection
# of any test may take before the program binds it ("Address already in
# use", and a worker that joined another test's cluster).
FREE_PORTS = (20000, 32768)
PORT_TRIES = 3      # make runs of a cluster whose ports another took meanwhile


def free_port():
    """A port on 127.0.0.1 nothing holds now, out of FREE_PORTS."""
    chooser = random.SystemRandom()     # not the seed pytest workers may share
    for _ in range(1000):
        port = chooser.randrange(*FREE_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in %d-%d" % FREE_PORTS)


class PortTaken(Exception):
    """A program could not listen on the port a test chose for it: another
    process took it between free_port() and the program's bind."""


def on_a_free_port(start):
    """start(port) on a port free_port() chose, and on another each time it
    raises PortTaken, PORT_TRIES times in all, as Cluster.start does."""
    for tries_left in reversed(range(PORT_TRIES)):
        try:
            return start(free_port())
        except PortTaken:
            if not tries_left:
                raise


def rc_files_on(port, environ, log_path, program=None):
    """rc-files (bin/rc-files) started listening on `port`, its output
    appended to log_path, returned once its log says files_started: a
    connection the port accepts before then may be another process's, which
    took the port first (rc-files then says cannot_listen, here PortTaken)."""
    began = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [program or os.path.join(REPO, "bin", "rc-files")],
            env=dict(environ, RC_FILES_PORT=str(port)), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def said():
        with open(log_path, "rb") as f:
            f.seek(began)
            for line in f:
                whole = line.startswith(b"{") and line.endswith(b"\n")
                event = json.loads(line).get("event") if whole else None
                if event in ("files_started", "cannot_listen"):
                    return event
        return process.poll() is not None and "exit %s" % process.returncode
    started = wait_for(said, 20, "rc-files to listen or exit")
    if started == "cannot_listen":
        process.wait(10)
        raise PortTaken(port)
    assert started == "files_started", started
    return process


def free_ports(count):
    """`count` different free ports: free_port() twice may give one port
    twice (a make test run once gave rc-server and rc-files 28313 both)."""
    ports = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class Cluster:
    def __init__(self, home, base=None, **settings):
        """`base` replaces the short test timings (e.g. to measure defaults)."""
        self.home = str(home)
        settings_path = os.path.join(self.home, "rc.json")
        os.makedirs(self.home, exist_ok=True)
        with open(settings_path, "w", opener=private) as f:
            json.dump(dict(TEST_SETTINGS if base is None else base, **settings), f)
        self.env = dict(os.environ, RC_HOME=self.home, RC_CONFIG=settings_path)
        self.choose_ports()
        self.workers = {}

    def choose_ports(self):
        tcp_port, web_port, files_port = free_ports(3)
        self.env.update(RC_TCP_PORT=str(tcp_port), RC_WEB_PORT=str(web_port),
                        RC_FILES_PORT=str(files_port))
        self.config = config_module.load(environ=self.env)

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

    def programs(self):
        """{program: (state name, pid)}, what `supervisorctl status` shows,
        asked of supervisord's XML-RPC interface from this process: each
        supervisorctl is a Python started (~0.1 s of CPU), and
        hostile_harness.unharmed asked eleven times around every attack."""
        proxy = health.supervisor_proxy(health.supervisor_socket(self.config))
        return {info["name"]: (info["statename"], info["pid"])
                for info in proxy.supervisor.getAllProcessInfo()}

    def program_pid(self, name):
        """A program's pid; 0 when it is not running or supervisord does
        not answer (as `supervisorctl pid` prints)."""
        try:
            return self.programs().get(name, ("", 0))[1]
        except (OSError, health.SupervisorError, xmlrpc.client.Error):
            return 0

    def start_worker(self, device_id, *extra, worker=WORKER):
        with open(self.worker_log(device_id), "ab", opener=private) as log:
            process = subprocess.Popen(
                [sys.executable, "-I", worker] + self.worker_arguments(device_id) + list(extra),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[device_id] = process
        return process

    def worker_arguments(self, device_id):
        """How a worker joins this cluster: its secrets in the harness home,
        the certificate pinned when TLS is on."""
        arguments = ["--join", "127.0.0.1:%d" % self.config.tcp_port, "--token-file",
                     self.config.token_path, "--device-id", device_id, "--state-dir",
                     os.path.join(self.home, "worker-state"), "--web-port",
                     str(self.config.web_port)]
        if self.config.tls:
            arguments += ["--fingerprint", tls.fingerprint(self.config)]
        return arguments

    def connect(self, timeout=10):
        """A raw connection to rc-server as a worker opens one: with TLS, and
        the certificate pinned, when the cluster has TLS on."""
        sock = socket.create_connection(("127.0.0.1", self.config.tcp_port), timeout=timeout)
        if not self.config.tls:
            return sock
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # rc-server hangs up without a TLS close_notify: an end of file, not an error.
        context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        sock = context.wrap_socket(sock)
        assert hashlib.sha256(sock.getpeercert(True)).hexdigest() == tls.fingerprint(self.config)
        return sock

    def worker_log(self, device_id):
        return os.path.join(self.home, "log", "worker-%s.log" % device_id)

    def start(self):
        for _ in range(PORT_TRIES):
            started = self.make("run")
            if started.returncode == 0 or "holds port" not in started.stdout:
                break
            # Another test's cluster took one of the ports between
            # free_ports and this make run (it refuses before starting
            # anything, naming the port): once in a CI run of ~150 clusters.
            self.choose_ports()
        assert started.returncode == 0, started.stdout
        self.db = db.connect(self.config.db_path)

    def put_back(self):
        """A cluster a module's tests share, as the next test expects it: the
        main node running with every program (a test may stop one, or the
        whole main node) and the test's own workers stopped."""
        if "not running" in self.make("status").stdout:
            self.db.close()
            self.start()
        self.supervisorctl("start", "all")
        self.stop_workers()
        self.workers.clear()

    def stop(self):
        self.stop_workers()
        stopped = self.make("stop")
        self.db.close()
        assert stopped.returncode == 0, stopped.stdout

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


def task_state(cluster, task_id):
    return cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                              (task_id,)).fetchone()[0]


def map_queued(executor, function):
    """executor.map(function, range(4), timeout=3, chunksize=2), once both
    its chunks are queued: (its results' iterator, their task ids, in order)."""
    calls = executor.map(function, range(4), timeout=3, chunksize=2)
    wait_for(lambda: len(executor.outstanding) == 2 and all(
        future.task_id for future in executor.outstanding), 30, "its tasks queued")
    return calls, sorted({future.task_id for future in executor.outstanding})


def online(cluster):
    return {row[0] for row in cluster.db.execute(
        "SELECT device_id FROM devices WHERE status = 'online' AND connected = 1")}


def log_records(cluster, program, **fields):
    """The lines of a program's log (log/PROGRAM.log) whose fields have
    these values (event="file_sent", device_id=...), as dicts."""
    found = []
    with open(os.path.join(cluster.home, "log", program + ".log"), "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if all(record.get(name) == value for name, value in fields.items()):
                found.append(record)
    return found


def rc_files_records(cluster, event, digest):
    """The lines of rc-files' log that are `event` (file_sent, file_stored)
    for a blob, as dicts."""
    return log_records(cluster, "rc-files", event=event, sha256=digest)


def rc_files_events(cluster, event, digest):
    """How many lines of rc-files' log are `event` (file_sent, file_stored) for a blob."""
    return len(rc_files_records(cluster, event, digest))


def bench_ready(cluster):
    """The benches' cluster, started: one worker "bench" with 4 slots in
    place of the local one, and the client's url and token on `cluster`."""
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("bench", "--slots", "4")
    wait_for(lambda: "bench" in online(cluster), 30, "the bench worker")
    return for_the_client(cluster)


def for_the_client(cluster):
    """The cluster, with the url and admin token rc.client takes on it."""
    cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
    with open(cluster.config.admin_token_path) as f:
        cluster.token = f.read().strip()
    return cluster


def with_the_local_worker(home):
    """For a module-scoped fixture: a cluster started as `make run` starts
    it, its local worker online, the client's url and token on it; stopped
    after."""
    cluster = Cluster(home)
    cluster.start()
    try:
        wait_for(lambda: online(cluster), 30, "the local worker online")
        yield for_the_client(cluster)
    finally:
        cluster.stop()


def with_one_worker(home, device_id, slots, **settings):
    """For a module-scoped fixture: a cluster whose one worker is
    `device_id` with `slots` (the local worker stopped), online, the client's
    url and token on it; stopped after."""
    cluster = Cluster(home, **settings)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(device_id, "--slots", str(slots))
        wait_for(lambda: device_id in online(cluster), 30, "the worker online")
        yield for_the_client(cluster)
    finally:
        cluster.stop()


def wait_all_finished(cluster, task_ids, timeout):
    def finished():
        rows = cluster.db.execute("SELECT count(*) FROM tasks WHERE task_id IN (%s)"
                                  " AND state IN (%s)" % (",".join(map(str, task_ids)),
                                                          TERMINAL_MARKS),
                                  TERMINAL_STATES).fetchone()
        return rows[0] == len(task_ids)
    wait_for(finished, timeout, "%d tasks to finish" % len(task_ids))


def assert_one_terminal_state_each(cluster, task_ids):
    for task_id in task_ids:
        events = cluster.db.execute(
            "SELECT count(*) FROM task_events WHERE task_id = ? AND state IN (%s)"
            % TERMINAL_MARKS,
            (task_id,) + TERMINAL_STATES).fetchone()[0]
        assert events == 1, "task %s recorded %d terminal states" % (task_id, events)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_fleet(home, device_ids):
    """A cluster with one single-slot worker per id instead of the local one."""
    cluster = Cluster(home)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    for device_id in device_ids:
        cluster.start_worker(device_id, "--slots", "1")
    wait_for(lambda: set(device_ids) <= online(cluster), 30, "the fleet")
    return cluster
