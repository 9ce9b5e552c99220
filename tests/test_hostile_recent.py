"""Attacks on what landed with issues 20-22 (device logs and watches, the
design document's aliases and per-device metrics, Python environments on
devices, the first hour's worker diagnoses), each against a real cluster on
127.0.0.1: a stranger on the LAN, a submitter, a task on a worker."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from cluster_harness import WORKER, Cluster, free_port, private, wait_for
from hostile_harness import readable_by_others, unharmed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("hostile-recent"))
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker("good")
        wait_for(lambda: "online" in cluster.rc("device", "good", check=False).stdout, 30,
                 "the good worker")
        with open(cluster.config.token_path) as f:
            cluster.token = f.read().strip()      # for test_device_logs.hostile
        yield cluster
    finally:
        cluster.stop()
    assert readable_by_others(cluster.home) == []


# -- a submitter: pip options through a line break --------------------------------

def test_a_line_break_cannot_smuggle_a_pip_option_into_the_requirements_file(cluster):
    # "x ;" is a requirement line pip takes; the next line would be read as
    # an option: here, a file of the task directory read as requirements.
    for specifier in ("six ;\n-r foo", "six ;\r--index-url=..", "six==1 ,\x1c-f."):
        done = cluster.rc("submit", "shell", "true", "--pip", specifier, check=False)
        assert done.returncode == 2, (specifier, done.stdout)
        assert "pip options, paths and URLs are not sent" in done.stderr


# -- a stranger at the main node's address ------------------------------------------

class Relay:
    """A port that forwards to rc-server, as the main node's address would,
    until a stranger takes it over (stop(), then serve HTTP there)."""

    def __init__(self, port, target):
        self.port, self.target = port, target
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.sockets = [self.listener]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def worker_through(cluster, device_id, port):
    arguments = cluster.worker_arguments(device_id)
    arguments[arguments.index("--join") + 1] = "127.0.0.1:%d" % port
    log = open(cluster.worker_log(device_id), "ab", opener=private)
    process = subprocess.Popen([sys.executable, "-I", WORKER] + arguments, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    cluster.workers[device_id] = process
    return process


def registrations(cluster, device_id):
    with open(cluster.worker_log(device_id), encoding="utf-8", errors="replace") as f:
        return sum('"registered"' in line for line in f)


def test_a_stranger_answering_http_at_the_main_nodes_address_stops_no_worker(cluster):
    """A device that has joined had its settings right: an HTTP server (or
    another certificate) at the address later is the address changing
    hands, not a misconfiguration. Before: the worker exited (wrong_port,
    exit 3, which its systemd unit does not restart) -- every device of
    the cluster, until someone visits each."""
    port = free_port()
    relay = Relay(port, cluster.config.tcp_port)
    with unharmed(cluster, "good"):
        worker = worker_through(cluster, "moved", port)
        wait_for(lambda: registrations(cluster, "moved") == 1, 30, "the worker to register")
        relay.stop()
        stranger = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                                   http.server.SimpleHTTPRequestHandler)
        stranger.daemon_threads = True
        threading.Thread(target=stranger.serve_forever, daemon=True).start()
        try:
            log_size = os.path.getsize(cluster.worker_log("moved"))
            wait_for(lambda: worker.poll() is not None or b"wrong_port" in open(
                cluster.worker_log("moved"), "rb").read()[log_size:], 30,
                "the worker to find the stranger")
            time.sleep(0.5)
            assert worker.poll() is None, "the worker exited with %s" % worker.returncode
        finally:
            stranger.shutdown()
            stranger.server_close()
        relay = Relay(port, cluster.config.tcp_port)
        try:
            wait_for(lambda: registrations(cluster, "moved") == 2, 60,
                     "the worker to register again once the main node is back")
        finally:
            relay.stop()
            worker.kill()
            worker.wait()


def stranger_says(port, code):
    """A stranger at the main node's address, with TLS off: a hello, then
    the worker's register answered with a refusal."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(30)
    link, _ = listener.accept()
    with listener, link:
        envelope = {"sender_id": "main", "timestamp": time.time(), "message_id": "1"}
        link.sendall(json.dumps(dict(envelope, message_type="hello", data={
            "nonce": "00" * 16, "protocol": 1, "cluster_id": "stranger"})).encode() + b"\n")
        link.settimeout(10)
        assert b"register" in link.recv(65536)
        link.sendall(json.dumps(dict(envelope, message_type="error", data={
            "code": code, "message": "no"})).encode() + b"\n")
        time.sleep(0.5)


def test_an_unproven_refusal_neither_ends_a_joined_worker_nor_deletes_its_secret(tmp_path):
    """Without TLS nothing proves who refuses. Before: "revoked" ended a
    joined worker for good (exit 3), and "unknown_device" deleted its
    secret, after which the real main node refused its token join
    (device_id_taken) -- a stranger on the LAN retired every device."""
    state = tmp_path / "state"
    secret = state / "stranger" / "joined.secret"
    secret.parent.mkdir(parents=True)
    secret.write_text("ab" * 32 + "\n")
    token = tmp_path / "token"
    token.write_text("cd" * 32 + "\n")
    port = free_port()
    with open(str(tmp_path / "worker.log"), "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-I", WORKER, "--join", "127.0.0.1:%d" % port, "--token-file",
             str(token), "--device-id", "joined", "--state-dir", str(state)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for code in ("unknown_device", "revoked"):
            stranger_says(port, code)
            assert secret.read_text().strip() == "ab" * 32, code
            assert worker.poll() is None, "%s ended the worker: %s" % (code, worker.returncode)
    finally:
        worker.kill()
        worker.wait()


# -- a task: the environment cache on a root worker ---------------------------------

POISON = ("import os, tabulate; open(os.path.join(os.path.dirname(tabulate.__file__),"
          " '__init__.py'), 'a').write('\\nPOISONED = True\\n')")


@pytest.fixture(scope="module")
def builder(cluster):
    """A worker with an environment cache task users can reach (pytest's
    temporary directories are not theirs), and that cache made."""
    if os.geteuid() != 0:
        pytest.skip("task users need a worker run as root")
    venvs = tempfile.mkdtemp(prefix="rc-test-venvs-")
    os.chmod(venvs, 0o755)
    cache = os.path.join(venvs, "cache")
    cluster.start_worker("builder", "--venv-dir", cache)
    try:
        wait_for(lambda: "online" in cluster.rc("device", "builder", check=False).stdout, 30,
                 "the builder worker")
        yield cache
    finally:
        cluster.workers.pop("builder").kill()
        import shutil
        shutil.rmtree(venvs, ignore_errors=True)


ON_BUILDER = ["--require", "device_id=builder", "--wait", "--wait-timeout", "240"]
TABULATE = ["--pip", "tabulate==0.9.0"]


def test_a_task_cannot_poison_the_environment_the_next_task_uses(cluster, builder):
    """A root worker gives each task a uid of its own, so one task cannot
    touch another's files; the environment its pip packages were built in
    is the one exception unless the worker takes it over (and kills what
    the build left running) before the task's own code runs in it."""
    first = cluster.rc("submit", "python_exec", POISON, *TABULATE, *ON_BUILDER, check=False)
    # It built the environment, yet may not write in it: the worker's now.
    assert first.returncode != 0 and "Permission denied" in first.stderr, first.stderr
    second = cluster.rc("submit", "python_eval",
                        "getattr(__import__('tabulate'), 'POISONED', 'clean')", *TABULATE,
                        *ON_BUILDER, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "clean" in second.stdout


def test_a_task_cannot_plant_an_environment_for_another_tasks_packages(cluster, builder):
    """The cache is open to every task user (sticky, like /tmp) and an
    environment's name follows from its packages: a task without packages
    could make one, marked ready, whose bin/python a later task with those
    packages ran as its own interpreter."""
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import worker as worker_module
    finally:
        sys.path.pop(0)
    made = cluster.rc("submit", "python_eval", "1", *TABULATE, *ON_BUILDER, check=False)
    assert made.returncode == 0, made.stdout + made.stderr     # the cache is there
    wanted = ["six==1.17.0"]
    target = os.path.join(builder, worker_module.environment_key(wanted))
    plant = ("mkdir -p {0}/bin && printf '#!/bin/sh\\necho PLANTED\\n' > {0}/bin/python"
             " && chmod 755 {0}/bin/python {0} && touch {0}/.rc-ready".format(target))
    planted = cluster.rc("submit", "shell", plant, *ON_BUILDER, check=False)
    assert planted.returncode == 0, planted.stdout + planted.stderr
    assert os.path.exists(os.path.join(target, ".rc-ready"))
    victim = cluster.rc("submit", "python_eval", "'genuine'", "--pip", wanted[0],
                        "--retries", "0", *ON_BUILDER, check=False)
    assert "PLANTED" not in victim.stdout + victim.stderr
    listed = json.loads(cluster.rc("tasks", "--json").stdout)
    task = [t for t in listed if t["payload"].get("pip") == wanted][-1]
    task = json.loads(cluster.rc("task", str(task["task_id"]), "--json").stdout)
    # Another uid's plant is refused; its own uid's (uids are reused) is removed
    # and built again: either way the plant never runs.
    assert (task["state"] == "failed" and "belongs to uid" in task["error"]) or (
        task["state"] == "completed" and task["result"]["output"] == "'genuine'"), task


# -- a device that holds the join token: its own log lines ------------------------

def test_a_device_cannot_date_its_lines_after_what_the_main_node_logs_about_it(cluster):
    """rc logs --device merges the device's lines with the main node's by
    time. Before: lines dated years ahead stayed the "latest" for ever, so
    the main node's later lines about the device (its disconnection, a
    refusal) fell out of the tail and printed above lines sent before them."""
    from test_device_logs import hostile, log_frame
    with unharmed(cluster, "good"):
        sock = hostile(cluster, "forger")
        sock.sendall(log_frame("forger", 5, time=time.time() + 10 * 365 * 86400,
                               event="from_the_future"))
        wait_for(lambda: "from_the_future" in cluster.rc("logs", "--device", "forger").stdout,
                 10, "the forged lines")
        sock.close()
        wait_for(lambda: "device_disconnected" in cluster.rc("logs", "--device", "forger")
                 .stdout, 10, "rc-server's line about the disconnection")
        # The newest line is the main node's: rc-server's disconnection, or
        # rc-reaper's device_offline if its pass came after it.
        latest = cluster.rc("logs", "--device", "forger", "--lines", "1").stdout
        assert "from_the_future" not in latest, latest
        assert re.search(r"\b(rc-server|rc-reaper) \S+ device_(disconnected|offline)\b",
                         latest), latest
        listed = json.loads(urllib_get(cluster, "/api/v1/devices/forger/logs"))["logs"]
        assert all(line["ts"] <= time.time() for line in listed), listed


def urllib_get(cluster, path):
    import urllib.request
    with open(cluster.config.admin_token_path) as f:
        token = f.read().strip()
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (cluster.config.web_port, path),
                                     headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read()


# -- a stranger without the token: what rc-server says of device ids ---------------

def test_a_stranger_without_the_token_learns_nothing_of_the_device_ids(cluster):
    """Before: a register with any proof was told device_id_taken for a
    joined id (auth_failed for the rest), and device_id_clash named the
    joined id's own spelling -- the devices of a LAN, listed to anyone."""
    from test_bad_input import connect, read_frame, register_frame
    with unharmed(cluster, "good"):
        for device_id in ("good", "GOOD"):
            sock, nonce = connect(cluster)
            with sock:
                sock.sendall(register_frame(cluster, nonce, device_id, proof="00" * 32))
                reply = read_frame(sock, timeout=5)
            assert reply["data"]["code"] == "auth_failed", (device_id, reply)
            assert "good" not in reply["data"]["message"].lower(), reply
