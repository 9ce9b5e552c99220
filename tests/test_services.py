"""Services (issue 22, part 2) on a real cluster: a service is restarted
when its process is killed, moved when its device is forgotten, paused
(saying why) when its device goes on battery, shows `failing` with its last
error and a growing backoff when its command exits at once, and stops."""
import json
import os
import signal
import time
import urllib.error
import urllib.request

import psutil
import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import unharmed
from rc import db, state_dir

pytestmark = pytest.mark.e2e
WORKERS = ("s1", "s2", "s3")
# Short timings, so backoff and failing fit in a test; the defaults are longer.
GOOD_TASK = '{"task_type": "echo", "payload": {"message": "m"}, "requirements": {},' \
    ' "options": {}}'
SETTINGS = {"service_restart_backoff": 0.2, "service_restart_backoff_max": 1.6,
            "service_quick_exit": 2.0, "service_failing_after": 3}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("services")
    cluster = Cluster(home, **SETTINGS)
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    for device_id in WORKERS:
        cluster.start_worker(device_id, "--slots", "2")
    wait_for(lambda: set(WORKERS) <= online(cluster), 30, "the workers")
    yield cluster
    cluster.stop()


def state_of(cluster, name):
    for record in json.loads(cluster.rc("service", "list", "--json").stdout):
        if record["name"] == name:
            return record
    raise AssertionError("no service %s" % name)


def run_of(cluster, name):
    [run] = state_of(cluster, name)["runs"] or [None]
    return run


def running(cluster, name):
    run = run_of(cluster, name)
    return run if run and run["state"].startswith("running on ") else None


def process_with(argv):
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == argv:
            return process
    return None


def test_a_killed_service_process_is_restarted(cluster):
    cluster.rc("service", "add", "sleeper", "shell", "echo started; exec sleep 6011",
               "--require", "device=s1")
    first = wait_for(lambda: running(cluster, "sleeper"), 30, "the service to run")
    assert first["state"] == "running on s1" and first["runs"] == 1
    process = wait_for(lambda: process_with(["sleep", "6011"]), 10, "its process")
    os.kill(process.pid, signal.SIGKILL)
    second = wait_for(lambda: (running(cluster, "sleeper") or {}).get("runs") == 2
                      and running(cluster, "sleeper"), 30, "the restart")
    assert second["task_id"] != first["task_id"]
    assert "exit" in second["last_error"] or "failed" in second["last_error"]
    ended = cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                               (first["task_id"],)).fetchone()[0]
    assert ended == "failed"
    assert wait_for(lambda: process_with(["sleep", "6011"]), 10, "the new process")


def test_stop_cancels_the_run_and_nothing_restarts_it_until_start(cluster):
    try:
        wait_for(lambda: running(cluster, "sleeper"), 30, "the service to run")
        task_id = run_of(cluster, "sleeper")["task_id"]
        stopped = cluster.rc("service", "stop", "sleeper").stdout
        assert stopped == "sleeper stopped: 1 run cancelled\n"
        wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                            (task_id,)).fetchone()[0] == "cancelled", 30,
                 "the run to be cancelled")
        wait_for(lambda: process_with(["sleep", "6011"]) is None, 10, "its process to end")
        time.sleep(1.5)
        record = state_of(cluster, "sleeper")
        assert record["state"] == "stopped" and record["runs"][0]["task_id"] == task_id
        cluster.rc("service", "start", "sleeper")
        wait_for(lambda: running(cluster, "sleeper"), 30, "the service to run again")
    finally:
        cluster.rc("service", "remove", "sleeper", check=False)
    wait_for(lambda: process_with(["sleep", "6011"]) is None, 10, "its process to end")


def test_a_service_moves_when_its_device_is_forgotten(cluster):
    cluster.rc("label", "s2", "pool=move")
    cluster.rc("label", "s3", "pool=move")
    cluster.rc("service", "add", "mover", "shell", "exec sleep 6012",
               "--require", "label.pool=move")
    try:
        first = wait_for(lambda: running(cluster, "mover"), 30, "the service to run")
        gone = first["device_id"]
        other = ({"s2", "s3"} - {gone}).pop()
        cluster.rc("forget", gone)
        moved = wait_for(lambda: (running(cluster, "mover") or {}).get("device_id") == other
                         and running(cluster, "mover"), 30, "the move to %s" % other)
        assert moved["task_id"] == first["task_id"]     # the same run, its next attempt
    finally:
        cluster.rc("service", "remove", "mover", check=False)


def service_starts(cluster, name):
    """When each of a service's runs was made, oldest first."""
    return [row[0] for row in cluster.db.execute(
        "SELECT created_at FROM tasks WHERE idempotency_key LIKE ? ORDER BY task_id",
        ("service:%s:%%" % name,))]


def test_a_command_that_exits_at_once_backs_off_then_shows_failing(cluster):
    cluster.rc("service", "add", "crasher", "shell", "echo boom >&2; exit 3",
               "--require", "device=s1")
    try:
        def failing_run():
            run = run_of(cluster, "crasher")
            return run if run and run["state"].startswith("failing") else None
        failing = wait_for(failing_run, 30, "the failing state")
        assert failing["quick_exits"] >= 3
        assert failing["last_error"] == "failed (exit 3): boom", failing
        # Two more tries: the second waited the capped backoff. Failing the
        # whole time, while a try runs as well as between tries.
        tries = len(service_starts(cluster, "crasher")) + 2
        def tried_twice_more():
            assert state_of(cluster, "crasher")["state"] == "failing"
            return len(service_starts(cluster, "crasher")) >= tries
        wait_for(tried_twice_more, 30, "two more tries")
        starts = service_starts(cluster, "crasher")
        gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
        assert len(starts) < 12, "restarted %d times: a tight loop" % len(starts)
        assert all(gap >= 0.15 for gap in gaps), gaps
        assert gaps[-1] >= 1.5, gaps                    # the cap, once failing
        logs = cluster.rc("service", "logs", "crasher").stdout
        assert "stderr:\nboom" in logs and "failed on s1" in logs
        status = cluster.rc("status").stdout
        assert "services_failing: 1" in status
        text = cluster.rc("service", "list", "--tsv").stdout
        assert "crasher\tshell echo boom" in text
        cluster.rc("service", "stop", "crasher")
        assert state_of(cluster, "crasher")["state"] == "stopped"
    finally:
        cluster.rc("service", "remove", "crasher", check=False)


def test_rows_no_program_would_write_and_junk_requests_harm_nothing_else(cluster):
    """rc-scheduler keeps its pid and fires a good schedule and keeps a good
    service running while broken schedule and service rows sit next to
    them; rc-web answers junk bodies with 400s."""
    token = state_dir.read_secret(cluster.config.admin_token_path)
    try:
        with unharmed(cluster, "s1"):
            with db.write(cluster.db):
                for name, cron, zone, task in (("x-json", "@every 1s", None, "{not json"),
                                               ("x-cron", "every day", None, GOOD_TASK),
                                               ("x-zone", "@daily", "Nowhere/Else", GOOD_TASK),
                                               ("x-null", "@every 1s", None, "null")):
                    cluster.db.execute("INSERT INTO schedules(name, cron, time_zone, task,"
                                       " created_at, next_fire) VALUES (?, ?, ?, ?, 0, 1)",
                                       (name, cron, zone, task))
                for name, task in (("x-svc-json", "{not json"), ("x-svc-null", "null"),
                                   ("x-svc-type", '{"task_type": "nope", "payload": {}}')):
                    cluster.db.execute("INSERT INTO services(name, task, each, created_at)"
                                       " VALUES (?, ?, ?, 0)", (name, task, int("null" in task)))
            cluster.rc("schedule", "add", "good-tick", "@every 1s", "echo", "tick")
            cluster.rc("service", "add", "good-svc", "shell", "exec sleep 6015",
                       "--require", "device=s1")
            for body in (b"[", b"[]", b'{"name": "a", "cron": 5}', b"\xff" * 100,
                         b'{"name": "a", "task_type": {"x": 1}}'):
                for path in ("/api/v1/schedules", "/api/v1/services"):
                    request = urllib.request.Request(
                        "http://127.0.0.1:%d%s" % (cluster.config.web_port, path), data=body,
                        headers={"Authorization": "Bearer " + token,
                                 "Content-Type": "application/json"})
                    with pytest.raises(urllib.error.HTTPError) as refused:
                        urllib.request.urlopen(request, timeout=10)
                    assert refused.value.code == 400
            wait_for(lambda: cluster.db.execute(
                "SELECT count(*) FROM tasks WHERE idempotency_key LIKE 'schedule:good-tick:%'"
            ).fetchone()[0] >= 2, 15, "the good schedule to fire twice")
            wait_for(lambda: running(cluster, "good-svc"), 30, "the good service")
            outcomes = {row[0]: row[1] for row in cluster.db.execute(
                "SELECT name, last_outcome FROM schedules WHERE name LIKE 'x-%'")}
            assert outcomes["x-json"].startswith("not submitted")
            assert "paused" in outcomes["x-cron"] and "paused" in outcomes["x-zone"]
            assert "Nowhere/Else" in outcomes["x-zone"]
            listed = {s["name"]: s for s in json.loads(cluster.rc("service", "list",
                                                                  "--json").stdout)}
            assert listed["x-svc-json"]["task"]["task_type"] == "unreadable"
            assert "not started" in listed["x-svc-type"]["runs"][0]["last_error"]
            assert "x-json" in cluster.rc("schedule", "list").stdout
    finally:
        with db.write(cluster.db):
            cluster.db.execute("DELETE FROM schedules WHERE name LIKE 'x-%'")
            cluster.db.execute("DELETE FROM services WHERE name LIKE 'x-%'")
        cluster.rc("schedule", "remove", "good-tick", check=False)
        cluster.rc("service", "remove", "good-svc", check=False)


def test_a_service_on_a_phone_pauses_on_battery_and_says_why(cluster, tmp_path, monkeypatch):
    battery = tmp_path / "sys" / "class" / "power_supply" / "battery"
    battery.mkdir(parents=True)
    for name, value in (("type", "Battery"), ("present", "1"), ("capacity", "80"),
                        ("status", "Discharging")):
        (battery / name).write_text("%s\n" % value)
    monkeypatch.setenv("RC_SYSFS_ROOT", str(tmp_path / "sys"))
    cluster.start_worker("phone", "--slots", "1", "--min-battery", "50", "--resume-battery",
                         "60", "--policy-interval", "0.2")
    monkeypatch.delenv("RC_SYSFS_ROOT")
    wait_for(lambda: "phone" in online(cluster), 30, "the phone")
    cluster.rc("service", "add", "pocket", "shell", "exec sleep 6013", "--each",
               "--require", "device=phone")
    try:
        first = wait_for(lambda: running(cluster, "pocket"), 30, "the service on the phone")
        assert first["place"] == "phone"
        (battery / "capacity").write_text("20\n")
        def paused_run():
            run = run_of(cluster, "pocket")
            return run if run["state"].startswith("paused") else None
        paused = wait_for(paused_run, 30, "the pause")
        assert paused["state"].startswith("paused: phone unavailable: battery 20%"), paused
        assert state_of(cluster, "pocket")["state"] == "paused"
        wait_for(lambda: process_with(["sleep", "6013"]) is None, 10, "its process to end")
        (battery / "capacity").write_text("90\n")
        wait_for(lambda: running(cluster, "pocket"), 30, "the service back on the phone")
    finally:
        cluster.rc("service", "remove", "pocket", check=False)


def test_bad_input_is_refused_and_writes_nothing(cluster):
    cluster.rc("service", "add", "dup", "echo", "x")

    def names():
        return [s["name"] for s in json.loads(cluster.rc("service", "list", "--json").stdout)]
    try:
        before = names()
        for argv, words in (
                (["dup", "echo", "y"], "a service named 'dup' exists"),
                (["new", "nonsense", "y"], "unknown task type 'nonsense'"),
                (["new", "sleep", "forever"], "sleep seconds must be a number"),
                (["new", "echo", "y", "--require", "wings=2"], "unknown requirement"),
                (["no/slash", "echo", "y"], "service name 'no/slash'")):
            done = cluster.rc("service", "add", *argv, check=False)
            assert done.returncode != 0 and words in done.stderr, done.stderr
        assert names() == before == ["dup"]
        done = cluster.rc("service", "stop", "nobody", check=False)
        assert done.returncode == 1 and "no service 'nobody'" in done.stderr
    finally:
        cluster.rc("service", "remove", "dup", check=False)


def test_a_service_moves_when_its_device_dies(cluster):
    """The reaper's path: the device stops answering, its run is taken back
    after disconnect_grace and runs on another device that fits."""
    cluster.start_worker("s4", "--slots", "2")
    wait_for(lambda: "s4" in online(cluster), 30, "s4")
    cluster.rc("label", "s4", "pool=die")
    cluster.rc("label", "s1", "pool=die")
    cluster.rc("service", "add", "survivor", "shell", "exec sleep 6014",
               "--require", "label.pool=die")
    first = wait_for(lambda: running(cluster, "survivor"), 30, "the service to run")
    dead = first["device_id"]
    other = ({"s1", "s4"} - {dead}).pop()
    os.killpg(cluster.workers[dead].pid, signal.SIGKILL)
    cluster.workers[dead].wait()
    try:
        moved = wait_for(lambda: (running(cluster, "survivor") or {}).get("device_id") == other
                         and running(cluster, "survivor"), 60, "the move to %s" % other)
        assert moved["task_id"] == first["task_id"]
    finally:
        cluster.rc("service", "remove", "survivor")
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] == ["sleep", "6014"]:
                process.kill()          # the dead worker's orphan, if it left one
