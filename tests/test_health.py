"""`rc health` and GET /health against a real cluster under supervisord:
each CRITICAL case is made real (a program stopped, a database that cannot
be written, a scheduler wedged so the queue sticks), and OK when all is well."""
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import Cluster, online, wait_for
from rc import health, tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("health"), health_queue_stuck=2.0)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def rc_health(cluster):
    done = cluster.rc("health", check=False)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    return done.returncode, lines[0]


def http_health(cluster):
    url = "http://127.0.0.1:%d/health" % cluster.config.web_port
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def healthy(cluster):
    code, line = rc_health(cluster)
    return line if code == 0 else None


def test_ok_when_all_is_well(cluster):
    wait_for(lambda: online(cluster), 30, "the local worker")
    line = wait_for(lambda: healthy(cluster), 30, "rc health to say OK")
    assert line.startswith("RC OK - 6 programs running, database writable, integrity ok")
    assert "devices 1/1 online" in line and "| " in line
    status, body = http_health(cluster)
    assert (status, body["status"], body["code"]) == (200, "ok", 0)


def test_critical_when_a_program_is_stopped(cluster):
    cluster.supervisorctl("stop", "rc-scheduler")
    try:
        code, line = rc_health(cluster)
        assert code == 2 and line.startswith("RC CRITICAL - rc-scheduler STOPPED"), line
        status, body = http_health(cluster)
        assert status == 503 and body["status"] == "critical"
        assert [c for c in body["checks"] if c["check"] == "programs"][0]["status"] == "critical"
    finally:
        cluster.supervisorctl("start", "rc-scheduler")
    wait_for(lambda: healthy(cluster), 30, "OK again")


def test_critical_when_the_database_is_not_writable(cluster):
    path = cluster.config.db_path
    os.chmod(path, 0o444)
    # root writes whatever the mode says; an immutable file stops root too.
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", path]).returncode != 0:
        os.chmod(path, 0o644)
        pytest.skip("running as root and cannot make the file immutable")
    try:
        code, line = rc_health(cluster)
        status, body = http_health(cluster)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", path], check=True)
        os.chmod(path, 0o644)
    assert code == 2 and "database not writable" in line and "readonly" in line, line
    assert status == 503
    assert {c["check"]: c["status"] for c in body["checks"]}["database"] == "critical"
    wait_for(lambda: healthy(cluster), 30, "OK again")


def test_critical_when_the_queue_is_stuck(cluster):
    """The scheduler is wedged (SIGSTOP: supervisord still sees it running)
    while the local worker has free slots: the task waits past
    health_queue_stuck (2 s here)."""
    scheduler = cluster.program_pid("rc-scheduler")
    os.kill(scheduler, signal.SIGSTOP)
    try:
        task_id = tasks.submit(cluster.db, cluster.config, "shell", {"command": "echo unstuck"})
        time.sleep(cluster.config.health_queue_stuck + 0.5)
        code, line = rc_health(cluster)
        assert code == 2 and line.startswith("RC CRITICAL - queue stuck: task %d" % task_id), line
        status, body = http_health(cluster)
        assert status == 503 and "queue stuck" in body["line"]
    finally:
        os.kill(scheduler, signal.SIGCONT)
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "completed", 30,
             "the task to run once the scheduler wakes")
    wait_for(lambda: healthy(cluster), 30, "OK again")


def test_warning_when_no_device_is_online(cluster):
    cluster.supervisorctl("stop", "rc-worker")
    try:
        def offline():
            return cluster.db.execute("SELECT count(*) FROM devices WHERE status = 'online'"
                                      ).fetchone()[0] == 0
        wait_for(offline, 30, "the local worker to go offline")
        code, line = rc_health(cluster)
        # The stopped worker is itself CRITICAL; the device count adds its WARNING.
        report = health.check(cluster.config)
        assert code == 2 and "rc-worker STOPPED" in line
        statuses = {f.name: f.status for f in report.findings}
        assert statuses["devices"] == health.WARNING and statuses["programs"] == health.CRITICAL
    finally:
        cluster.supervisorctl("start", "rc-worker")
    wait_for(lambda: healthy(cluster), 60, "OK again")


@pytest.mark.parametrize("error", [OSError("refused"), health.SupervisorError("bad answer")])
def test_a_supervisord_that_cannot_be_read_leaves_no_note(tmp_path, monkeypatch, error):
    """rc why's note on stopped programs is left out when supervisord does
    not answer as it should; its errors are OSError and SupervisorError
    (xmlrpc.client is imported only where it is used)."""
    import types
    config = types.SimpleNamespace(health_supervisor=True, run_dir=str(tmp_path),
                                   log_dir=str(tmp_path))
    (tmp_path / "supervisor.sock").write_text("")
    monkeypatch.setattr(health, "main_node_stopped", lambda config: None)

    def unreadable(config):
        raise error
    monkeypatch.setattr(health, "program_states", unreadable)
    assert health.programs_note(config) == ""
