"""The rc command, run in-process through run_command and once as a real
process, against a real SQLite file in a temporary RC_HOME."""
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import orjson
import pytest

from rc import (audit, commands, db, devices, fleet, logs, records, state_dir, tasks, tls,
                web_results)
from rc import config as config_module
from rc.states import ASSIGNED, CANCELLED, COMPLETED, FAILED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rc(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def task_count(connection):
    return connection.execute("SELECT count(*) FROM tasks").fetchone()[0]


def finish_later(config, task_id, device_id, state, output, error=None, stderr=""):
    """What rc-server would do when a worker reports: assign, accept, finish."""
    def run():
        connection = db.connect(config.db_path)
        deadline = time.time() + 30         # the submit lands when it lands (a loaded box)
        while time.time() < deadline and connection.execute(
                "SELECT count(*) FROM tasks WHERE task_id = ?", (task_id,)).fetchone()[0] == 0:
            time.sleep(0.01)
        now = time.time()
        with db.write(connection):
            connection.execute("UPDATE tasks SET state = ?, device_id = ?, assigned_at = ?"
                               " WHERE task_id = ?", (ASSIGNED, device_id, now, task_id))
            assert tasks.accept(connection, task_id, 1, device_id, now, 180.0)
        with db.write(connection):
            assert tasks.finish(connection, task_id, 1, device_id, state,
                                {"output": output, "stderr": stderr, "exit_code": 0}, error,
                                state, now)
        connection.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


# -- grammar and errors -----------------------------------------------------------

def test_unknown_command_is_one_line_usage_error(cluster_home):
    status, out, err = rc("launch")
    assert status == 2 and out == ""
    assert err.startswith("rc: error:") and len(err.splitlines()) == 1


def test_help_goes_to_the_given_stream(cluster_home):
    status, out, err = rc("--help")
    assert status == 0 and "submit" in out and err == ""
    status, out, err = rc("submit", "--help")
    assert status == 0 and "--require" in out


def test_a_missing_database_says_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("RC_HOME", str(tmp_path / "nothing"))
    status, out, err = rc("status")
    assert status == 1 and "make install" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "nothing" / "db" / "rc.db")


def test_a_broken_config_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "rc.json"
    bad.write_text("{not json")
    monkeypatch.setenv("RC_CONFIG", str(bad))
    status, out, err = rc("status")
    assert status == 1 and "not valid JSON" in err and len(err.splitlines()) == 1


def test_init_makes_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RC_HOME", str(tmp_path / "var"))
    assert rc("init")[0] == 0
    assert rc("status")[0] == 0
    assert os.path.exists(tmp_path / "var" / "token")


# -- status and devices -----------------------------------------------------------

def test_status_counts_devices_and_tasks(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    tasks.submit(connection, config, "echo", {"message": "hi"})
    status, out, err = rc("status")
    assert status == 0
    lines = dict(line.split(": ") for line in out.splitlines())
    assert lines["devices_online"] == "1" and lines["devices_total"] == "1"
    assert lines["tasks_queued"] == "1" and lines["queue_length"] == "1"
    assert orjson.loads(rc("status", "--json")[1])["tasks_completed"] == 0


def test_devices_in_every_format(cluster_home, add_device):
    add_device("pi", metrics={"cpu_percent": 12.5, "memory_percent": 40.0}, now=time.time())
    status, out, err = rc("devices")
    header, row = out.splitlines()
    assert header.split() == [name.upper() for name in records.DEVICE_TABLE]
    assert row.split() == ["pi", "online", "compute", "linux", "aarch64", "4", "3.8", "2",
                           "0", "12.5", "40", "0s", "ago"]
    csv_lines = rc("devices", "--csv")[1].splitlines()
    assert csv_lines[0] == ",".join(records.DEVICE_COLUMNS) and csv_lines[1].startswith("pi,online,")
    row = dict(zip(records.DEVICE_COLUMNS, next(csv.reader(csv_lines[1:]))))
    # Seconds and flags for scripts, not "0s ago".
    assert 0 <= float(row["heartbeat_age_seconds"]) < 60 and row["drained"] == "0"
    assert abs(float(row["last_seen"]) - time.time()) < 60 and row["cpu_percent"] == "12.5"
    assert rc("devices", "--tsv", "--no-header")[1].split("\t")[:2] == ["pi", "online"]
    found = orjson.loads(rc("devices", "--json")[1])
    assert found[0]["device_id"] == "pi" and found[0]["metrics"]["cpu_percent"] == 12.5
    assert found[0]["cpu_percent"] == 12.5 and set(records.DEVICE_COLUMNS) <= set(found[0])


def test_one_device_and_an_unknown_one(cluster_home, add_device):
    add_device("pi", metrics={"cpu_percent": 5.0})
    status, out, err = rc("device", "pi")
    assert status == 0
    assert "platform:" in out and "metrics.cpu_percent:" in out and "last_seen:" in out
    assert orjson.loads(rc("device", "pi", "--json")[1])["tags"] == ["kitchen"]
    status, out, err = rc("device", "ghost")
    assert status == 1 and out == "" and err == "rc: error: no device 'ghost'\n"


# -- submitting -------------------------------------------------------------------

def test_submit_prints_the_id_and_queues_the_task(cluster_home):
    config, connection = cluster_home
    status, out, err = rc("submit", "shell", "uptime", "--priority", "high", "--timeout", "30",
                          "--retries", "1", "--require", "cores=2", "--require", "tags=gpu",
                          "--key", "nightly")
    assert status == 0 and err == ""
    task = tasks.get(connection, int(out))
    assert task["payload"] == {"command": "uptime"} and task["priority"] == "high"
    assert task["timeout"] == 30 and task["max_retries"] == 1
    assert task["requirements"] == {"min_cpu_cores": 2, "tags": ["gpu"]}
    again = rc("submit", "shell", "uptime", "--key", "nightly")[1]
    assert again == out and task_count(connection) == 1


@pytest.mark.parametrize("argv", [
    ["submit", "launch", "x"],
    ["submit", "echo", "x", "--require", "cores"],
    ["submit", "echo", "x", "--require", "colour=red"],
    ["submit", "echo"],
    ["submit", "sleep", "soon"],
    ["submit", "echo", "x", "--priority", "asap"],
    ["submit", "echo", "x", "--timeout", "-1"],
])
def test_bad_submits_write_nothing_and_say_why_in_one_line(cluster_home, argv):
    config, connection = cluster_home
    status, out, err = rc(*argv)
    assert status == 2 and out == ""
    assert err.startswith("rc: error: ") and len(err.splitlines()) == 1
    assert task_count(connection) == 0


def test_submit_wait_prints_exactly_the_output(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    worker = finish_later(config, 1, "pi", COMPLETED, "4999950000")
    status, out, err = rc("submit", "python_eval", "sum(range(100000))", "--wait")
    worker.join()
    assert (status, out, err) == (0, "4999950000\n", "")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_submit_wait_shows_a_terminal_no_escape_sequence(cluster_home, add_device):
    """A device chooses the output: on a terminal an escape (here OSC 52,
    which sets the clipboard) is shown as "?"; a pipe still gets every byte."""
    config, connection = cluster_home
    add_device("pi")
    evil = "ok\x1b]52;c;ZWNobyBwd25lZA==\x07\n"
    worker = finish_later(config, 1, "pi", COMPLETED, evil)
    out = Terminal()
    status = commands.run_command(["submit", "echo", "x", "--wait"], out, io.StringIO())
    worker.join()
    assert status == 0 and "\x1b" not in out.getvalue() and out.getvalue().startswith("ok?]52")
    worker = finish_later(config, 2, "pi", COMPLETED, evil)
    assert rc("submit", "echo", "y", "--wait")[1] == evil
    worker.join()


def test_submit_wait_on_a_failure_exits_1_with_the_reason(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    error = "Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero"
    worker = finish_later(config, 1, "pi", FAILED, "", error)
    status, out, err = rc("submit", "python_eval", "1/0", "--wait")
    worker.join()
    assert status == 1 and out == ""
    assert err == "rc: error: task 1 failed: ZeroDivisionError: division by zero\n"


def test_a_failed_command_says_why_in_its_stderrs_last_line(cluster_home, add_device):
    """A shell task's error is only "exit status 1"; what the command said
    goes with it, one line, escape sequences from the device shown as "?"
    (after the task's stderr itself, as a command run here writes it)."""
    config, connection = cluster_home
    add_device("pi")
    stderr = "warming up\ngzip: a.log: No such file or directory\x1b[2J\n"
    worker = finish_later(config, 1, "pi", FAILED, "", "exit status 1", stderr)
    status, out, err = rc("submit", "shell", "gzip a.log", "--wait")
    worker.join()
    assert status == 1 and out == ""
    assert err == stderr + ("rc: error: task 1 failed: exit status 1 (stderr: gzip: a.log: No"
                            " such file or directory?[2J)\n")
    worker = finish_later(config, 2, "pi", FAILED, "", "exit status 4")
    rc("submit", "shell", "exit 4")
    worker.join()
    assert rc("wait", "2")[2] == "rc: error: task 2 failed: exit status 4\n"


def test_submit_wait_gives_up_after_its_timeout(cluster_home):
    started = time.monotonic()
    status, out, err = rc("submit", "echo", "hi", "--wait", "--wait-timeout", "0.2")
    assert status == 1 and "still queued" in err
    assert 0.2 <= time.monotonic() - started < 5


# -- tasks ------------------------------------------------------------------------

def test_tasks_list_filters_and_shortens(cluster_home):
    config, connection = cluster_home
    tasks.submit(connection, config, "echo", {"message": "first"})
    long_id = tasks.submit(connection, config, "shell", {"command": "echo " + "x" * 100})
    tasks.cancel(connection, long_id)
    lines = rc("tasks")[1].splitlines()
    assert lines[0].split() == [name.upper() for name in records.TASK_TABLE]
    assert lines[1].split()[:5] == [str(long_id), "shell", "cancelled", "normal", "1"]
    assert lines[1].endswith("…") and len(lines) == 3
    only = rc("tasks", "--state", "queued", "--csv", "--no-header")[1]
    assert only.startswith("1,echo,queued,") and only.count("\n") == 1
    assert len(orjson.loads(rc("tasks", "--limit", "1", "--json")[1])) == 1
    assert rc("tasks", "--state", "lost")[0] == 2


def test_one_task_shows_output_error_and_events(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    task_id = tasks.submit(connection, config, "echo", {"message": "hello"})
    finish_later(config, task_id, "pi", COMPLETED, "hello\nworld\n").join()
    status, out, err = rc("task", "1")
    assert status == 0
    assert "state:" in out and "completed" in out and "payload.message:" in out
    assert "\noutput:\nhello\nworld\n" in out
    events = out.split("events:\n")[1].splitlines()
    assert [line.split()[1] for line in events[1:]] == ["queued", "assigned", "running",
                                                        "completed"]
    assert orjson.loads(rc("task", "1", "--json")[1])["result"]["output"] == "hello\nworld\n"
    assert rc("task", "9") == (1, "", "rc: error: no task 9\n")


def test_cancel_prints_the_state(cluster_home):
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "sleep", {"seconds": 5})
    assert rc("cancel", str(task_id)) == (0, CANCELLED + "\n", "")
    assert tasks.get(connection, task_id)["state"] == CANCELLED
    assert rc("cancel", "99")[0] == 1


def test_cancel_group_stops_every_task_of_a_group_that_has_not_ended(cluster_home, add_device):
    """A Python client's tasks (one group), left running by a Ctrl-C, could be
    stopped only with one `rc cancel ID` each (`rc map --cancel` takes maps
    only). `rc cancel --group G` cancels the queued ones and asks the
    devices to stop the running ones; ended tasks and other groups stay."""
    config, connection = cluster_home
    add_device("dev-1")
    with db.write(connection):
        group_id = web_results.new_group(connection, [{"task_type": "sleep"}])
    other = tasks.submit(connection, config, "sleep", {"seconds": 5})
    done, running, waiting = [tasks.submit(connection, config, "sleep", {"seconds": 5},
                                           group_id=group_id) for _ in range(3)]
    finish_later(config, done, "dev-1", COMPLETED, "").join()
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = ?, device_id = 'dev-1' WHERE task_id = ?",
                           (ASSIGNED, running))
    status, out, err = rc("cancel", "--group", str(group_id))
    assert (status, err) == (0, "")
    assert out == "group %d: 1 queued task cancelled, 1 running task asked to stop\n" % group_id
    state = {task_id: tasks.get(connection, task_id) for task_id in (other, done, running, waiting)}
    assert [state[t]["state"] for t in (other, done, running, waiting)] \
        == ["queued", COMPLETED, ASSIGNED, CANCELLED]
    assert state[running]["cancel_requested"] and not state[other]["cancel_requested"]
    assert rc("cancel", "--group", "999") == (1, "", "rc: error: no group 999\n")
    assert rc("cancel")[0] == rc("cancel", "1", "--group", str(group_id))[0] == 2


# -- logs -------------------------------------------------------------------------

def write_log(config, program, lines):
    with open(os.path.join(config.log_dir, program + ".log"), "a") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_logs_merge_programs_by_time(cluster_home):
    config, _ = cluster_home
    base = time.mktime((2026, 1, 1, 12, 0, 0, 0, 0, -1))
    write_log(config, "rc-server", [
        {"time": base + 1, "program": "rc-server", "level": "info", "event": "started",
         "port": 8080},
        {"time": base + 3, "program": "rc-server", "level": "error", "event": "bad_frame",
         "reason": "too long"},
        "Traceback: not JSON"])
    write_log(config, "rc-reaper", [
        {"time": base + 2, "program": "rc-reaper", "level": "info", "event": "swept"}])
    write_log(config, "supervisord", ["2026-01-01 12:00:01,500 INFO spawned: 'rc-web'"])
    status, out, err = rc("logs")
    assert status == 0
    assert out.splitlines() == [
        "12:00:01 rc-server INFO started port=8080",
        "2026-01-01 12:00:01,500 INFO spawned: 'rc-web'",
        "12:00:02 rc-reaper INFO swept",
        '12:00:03 rc-server ERROR bad_frame reason="too long"',
        "Traceback: not JSON"]
    assert rc("logs", "-n", "1")[1] == "Traceback: not JSON\n"
    assert rc("logs", "--program", "rc-reaper")[1] == "12:00:02 rc-reaper INFO swept\n"
    status, out, err = rc("logs", "--program", "rc-nothing")
    assert status == 1 and "rc-reaper" in err


def test_logs_follow_reads_only_whole_new_lines(cluster_home):
    config, _ = cluster_home
    path = os.path.join(config.log_dir, "rc-web.log")
    with open(path, "w") as f:
        f.write('{"time": 1, "event": "old"}\n{"time": 2, "ev')
    lines, offset = logs.read_complete_lines(path, 0)
    assert lines == ['{"time": 1, "event": "old"}'] and offset == 28
    assert logs.tail_lines(path, 5)[1] == os.path.getsize(path)


def test_logs_follow_reads_a_rotated_log_to_its_end_then_the_new_one(tmp_path):
    """A line written after the follower's last look and before the log
    rotated (supervisord moves rc-web.log to rc-web.log.1 and opens a new
    one) was never shown: the new, shorter file was read from its start."""
    path = str(tmp_path / "rc-web.log")
    with open(path, "w") as f:
        f.write('{"time": 1, "event": "first"}\n')
    offsets = logs.Offsets()
    seen = [record["event"] for _, record in logs.new_lines(str(tmp_path), "rc-web", offsets)]
    assert seen == ["first"]
    with open(path, "a") as f:
        f.write('{"time": 2, "event": "just before the rotation"}\n')
    os.rename(path, path + ".1")
    with open(path, "w") as f:
        f.write('{"time": 3, "event": "after"}\n')
    seen = [record["event"] for _, record in logs.new_lines(str(tmp_path), "rc-web", offsets)]
    assert seen == ["just before the rotation", "after"]
    with open(path, "a") as f:
        f.write('{"time": 4, "event": "later"}\n')
    seen = [record["event"] for _, record in logs.new_lines(str(tmp_path), "rc-web", offsets)]
    assert seen == ["later"]


# -- tokens, join, local worker ------------------------------------------------------

def test_tokens_and_join(cluster_home):
    config, _ = cluster_home
    token = rc("token")[1].strip()
    web_token = rc("token", "--web")[1].strip()
    assert len(token) > 20 and token != web_token
    assert open(config.token_path).read().strip() == token
    status, out, err = rc("join")
    assert status == 0 and config_module.WORKER_PATH in out
    command = out.splitlines()[2]
    pin = " --fingerprint=" + tls.fingerprint(config)       # TLS is on by default
    assert command.startswith("python3 worker.py --join ")
    assert command.endswith(":%d --token=%s%s" % (config.tcp_port, token, pin))
    assert "http://" in out and ":%d/" % config.web_port in out
    fetch, start = out.splitlines()[-1].split(" && ")
    assert re.match(r"curl -fsSO http://\S+:%d/worker.py\Z" % config.web_port, fetch)
    assert start == command


def test_local_worker_execs_the_worker_with_the_token_file(cluster_home, monkeypatch):
    config, _ = cluster_home
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    assert rc("local-worker", "--slots", "2")[0] == 0
    path, argv = calls[0]
    assert path == sys.executable and argv[1] == config_module.WORKER_PATH
    assert argv[2:8] == ["--join", "127.0.0.1:%d" % config.tcp_port,
                         "--token-file", config.token_path, "--device-id",
                         commands.local_device_id()]
    assert argv[8:14] == ["--state-dir", os.path.join(config.home, "worker"), "--web-port",
                          str(config.web_port), "--fingerprint", tls.fingerprint(config)]
    # Its tasks must not reach var/ nor write the checkout (see docs/worker.md).
    assert argv[14:18] == ["--hide", config.home, "--read-only", config_module.CHECKOUT]
    assert argv[18:] == ["--slots", "2"] and commands.local_device_id().endswith("-local")


def test_local_worker_options_come_after_its_own_and_before_the_command_lines(
        cluster_home, monkeypatch, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"local_worker_options": ["--slots", "1", "--tag", "nas"]}))
    monkeypatch.setenv("RC_CONFIG", str(settings))
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    assert rc("local-worker", "--log-level", "debug")[0] == 0
    assert calls[0][18:] == ["--slots", "1", "--tag", "nas", "--log-level", "debug"]


@pytest.mark.parametrize("options, named", [
    ([1], "must be strings"), (["--state-dir=/tmp/elsewhere"], "--state-dir"),
    (["--state", "/tmp/elsewhere"], "--state"),          # argparse's abbreviation of it
    (["--token-file", "/tmp/t"], "--token-file"), (["--hide"], "--hide"),
    (["--slots", "2", "--join", "10.0.0.1"], "--join")])
def test_local_worker_options_that_rc_local_worker_sets_are_refused(tmp_path, options, named):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"local_worker_options": options}))
    with pytest.raises(config_module.ConfigError) as refused:
        config_module.load(str(settings), environ={"RC_HOME": str(tmp_path / "var")})
    assert named in str(refused.value) and "local_worker_options" in str(refused.value)


def test_wait_ready_says_at_once_why_the_local_worker_exits(cluster_home, monkeypatch):
    """A wrong option in local_worker_options: supervisord restarts the
    worker, which exits as it starts, again and again (BACKOFF). make run
    says the worker's own words, not 'no sign of a connected worker' after
    its whole timeout."""
    config, _ = cluster_home
    states = {"rc-server": "RUNNING", "rc-worker": "STARTING"}
    monkeypatch.setattr(commands, "accepts", lambda host, port: True)
    monkeypatch.setattr(commands.health, "supervisor_answers", lambda config: True)
    monkeypatch.setattr(commands.health, "program_states", lambda config: dict(states))
    with open(os.path.join(config.log_dir, "rc-worker.log"), "w") as f:
        f.write("usage: worker.py [-h] ...\nworker.py: error: unrecognized arguments: --slotz 2\n")
    status, out, err = rc("wait-ready", "--timeout", "0.3")      # starting: it waits
    assert status == 1 and "no sign of a connected worker" in err
    states["rc-worker"] = "BACKOFF"
    started = time.monotonic()
    status, out, err = rc("wait-ready", "--timeout", "20")
    assert status == 1 and time.monotonic() - started < 15
    assert "rc-worker" in err and "unrecognized arguments: --slotz 2" in err
    assert "BACKOFF" in err and "rc-worker.log" in err and len(err.splitlines()) == 1


def test_wait_ready_gives_up_with_one_line(cluster_home, monkeypatch):
    monkeypatch.setenv("RC_TCP_PORT", "1")
    status, out, err = rc("wait-ready", "--timeout", "0.1")
    assert status == 1 and "rc-server" in err and len(err.splitlines()) == 1


# -- as a real process --------------------------------------------------------------

def test_the_command_as_a_process(cluster_home):
    config, connection = cluster_home
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "lib"))

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "rc.cli"] + list(argv), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
    done = run("submit", "echo", "from a process")
    assert done.returncode == 0 and done.stdout.strip().isdigit()
    assert tasks.get(connection, int(done.stdout))["payload"] == {"message": "from a process"}
    done = run("submit", "launch", "x")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("rc: error:") and len(done.stderr.splitlines()) == 1
    assert task_count(connection) == 1


def test_submit_after_and_why(cluster_home):
    config, connection = cluster_home
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["submit", "echo", "first"], out, err, config) == 0
    first = int(out.getvalue())
    out = io.StringIO()
    assert commands.run_command(["submit", "echo", "second", "--after", str(first),
                            "--retry-on-failure"], out, err, config) == 0
    second = int(out.getvalue())
    task = tasks.get(connection, second)
    assert task["depends_on"] == [first] and task["retry_on_failure"]
    out = io.StringIO()
    assert commands.run_command(["why", str(second)], out, err, config) == 0
    assert "waits for task %d" % first in out.getvalue()
    err = io.StringIO()
    assert commands.run_command(["submit", "echo", "x", "--after", "nope"], out, err, config) == 2
    assert "task id must be a whole number" in err.getvalue()


def test_admin_token_with_web_as_its_old_name(cluster_home):
    config, _ = cluster_home
    admin = rc("token", "--admin")[1].strip()
    assert admin == rc("token", "--web")[1].strip() == open(config.admin_token_path).read().strip()
    assert config.admin_token_path.endswith("admin_token") and admin != rc("token")[1].strip()


def test_an_old_web_token_becomes_the_admin_token(tmp_path, monkeypatch):
    monkeypatch.setenv("RC_HOME", str(tmp_path))
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "web_token").write_text("old-secret\n")
    assert rc("init")[0] == 0
    assert rc("token", "--admin")[1] == "old-secret\n"


def test_monitor_once_and_the_device_grid(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 50.0, "battery_percent": 30}, now=time.time())
    task_id = tasks.submit(connection, config, "sleep", {"seconds": 5})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi',"
                           " progress = 40 WHERE task_id = ?", (task_id,))
    status, out, err = rc("monitor", "--once")
    assert status == 0 and out.startswith("rc monitor")
    assert "devices 1/1 online" in out and "slots 1/2" in out
    assert "|CPU [" in out and "30%" in out and "active tasks:" in out and " 40%" in out
    grid = rc("devices", "--grid")[1]
    assert grid.splitlines()[1].startswith("|pi") and "tasks 1/2" in grid


# -- the fleet: drain, forget, labels, roles, revoke, groups, broadcasts ------------

def audit_events(config):
    return [(line["event"], line["actor"], line["source"]) for line in audit.read(config)]


def test_drain_and_resume_show_in_devices(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    status, out, err = rc("drain", "pi")
    assert status == 0 and "pi drained" in out and err == ""
    # For scripts, status is one word and drained a column of its own (awk '$2 == "online"');
    # the table on a terminal says both in STATUS.
    header, row = [line.split("\t") for line in rc("devices", "--tsv")[1].splitlines()]
    assert row[1] == "online" and row[header.index("drained")] == "1"
    assert rc("devices")[1].splitlines()[1].split()[:2] == ["pi", "online,drained"]
    assert "drained:" in rc("device", "pi")[1] and devices.get(connection, "pi")["drained"]
    assert rc("resume", "pi")[0] == 0 and not devices.get(connection, "pi")["drained"]
    assert audit_events(config) == [("device_drained", "cli", "local"),
                                    ("device_resumed", "cli", "local")]


def test_drain_now_hands_tasks_back(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = ?, device_id = 'pi', assigned_at = 1"
                           " WHERE task_id = ?", (ASSIGNED, task_id))
    status, out, err = rc("drain", "pi", "--now")
    assert status == 0 and "pi drained: 1 task handed back to the queue\n" == out
    assert tasks.get(connection, task_id)["state"] == "queued"


def test_a_paused_device_and_labels_in_the_listing(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    with db.write(connection):
        devices.heartbeat(connection, "pi", {}, 2.0, {"available": False, "reason": "battery"})
    assert rc("label", "pi", "kind=pi", "disk=big") == (0, "pi labels: disk=big,kind=pi\n", "")
    assert rc("label", "pi", "disk=")[1] == "pi labels: kind=pi\n"
    header, row = rc("devices", "--csv")[1].splitlines()
    row = dict(zip(header.split(","), row.split(",")))
    assert row["status"] == "online" and row["available"] == "0" and row["labels"] == "kind=pi"
    table = rc("devices")[1].splitlines()
    assert table[0].split()[-1] == "LABELS" and table[1].split()[1] == "online,paused"
    assert table[1].endswith(" kind=pi")
    out = rc("device", "pi")[1]
    assert "labels:" in out and "kind=pi" in out and "unavailable_reason: battery" in " ".join(
        out.split())


def test_role_overrides_and_clears(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    assert rc("role", "pi", "storage")[1] == "pi role: storage (it reports compute)\n"
    out = rc("device", "pi")[1]
    assert "reported_role:" in out and devices.get(connection, "pi")["role"] == "storage"
    assert rc("role", "pi", "")[1] == "pi role: compute (as it reports)\n"
    assert "reported_role" not in rc("device", "pi")[1]


@pytest.mark.parametrize("argv, status", [
    (["drain", "ghost"], 1), (["resume", "ghost"], 1), (["forget", "ghost"], 1),
    (["revoke", "ghost"], 1), (["label", "ghost", "a=b"], 1), (["role", "ghost", "x"], 1),
    (["label", "pi", "nonsense"], 1), (["label", "pi"], 2), (["group", "7"], 1),
    (["control", "7"], 1), (["broadcast", "explode"], 2), (["drain"], 2),
    (["submit", "--each", "python_exec", "x"], 1), (["submit", "--each", "--key", "k",
                                                     "echo", "x"], 2),
    (["submit", "--include-new", "echo", "x"], 2), (["submit", "--each", "echo", "x",
                                                     "--require", "label.=x"], 2),
])
def test_fleet_errors_are_one_line(cluster_home, add_device, argv, status):
    config, connection = cluster_home
    add_device("pi")
    answer = rc(*argv)
    assert answer[0] == status and answer[1] == "", answer
    assert answer[2].startswith("rc: error:") and len(answer[2].splitlines()) == 1
    assert task_count(connection) == 0 and audit.read(config) == []


def test_forget_hides_the_device_but_keeps_its_history(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    add_device("nas")
    status, out, err = rc("forget", "nas")
    assert status == 0 and "can no longer connect" in out
    assert [line.split(",")[0] for line in rc("devices", "--csv")[1].splitlines()[1:]] == ["pi"]
    rows = rc("devices", "--csv", "--all")[1].splitlines()[1:]
    assert rows[0].startswith("nas,online,")
    assert rows[0].split(",")[records.DEVICE_COLUMNS.index("forgotten")] == "1"
    assert rc("devices", "--all")[1].splitlines()[1].split()[1] == "online,forgotten"
    assert "forgotten:" in rc("device", "nas")[1]
    assert audit_events(config) == [("device_forgotten", "cli", "local")]


def test_revoke_closes_the_device_out(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    status, out, err = rc("revoke", "pi")
    assert status == 0 and "closes its connection" in out and "can no longer connect" in out
    assert connection.execute("SELECT revoked FROM devices WHERE device_id = 'pi'"
                              ).fetchone()[0] == 1
    assert audit.read(config)[0]["event"] == "device_revoked"
    assert audit.read(config)[0]["device_id"] == "pi"


def test_new_secrets_are_safe_to_paste(cluster_home):
    # A prefix and hex: never a leading "-" an argument parser would take for
    # an option, nothing a shell would expand or split.
    config, _ = cluster_home
    for secret in [rc("token")[1].strip(), rc("token", "--admin")[1].strip()] + [
            state_dir.new_secret() for _ in range(200)]:
        assert re.match(r"rc1_[0-9a-f]{48}\Z", secret), secret


def test_join_prints_a_line_that_works_for_an_old_token_beginning_with_a_dash(cluster_home):
    config, _ = cluster_home
    with open(config.token_path, "w") as f:
        f.write("-Dgi7x_old-style\n")
    line = rc("join")[1].splitlines()[2]
    assert " --token=-Dgi7x_old-style" in line
    assert shlex.split(line)[4] == "--token=-Dgi7x_old-style"


def test_token_rotate_prints_a_new_join_token(cluster_home):
    config, _ = cluster_home
    old, admin_token = rc("token")[1].strip(), rc("token", "--admin")[1].strip()
    status, out, err = rc("token", "--rotate")
    new = out.splitlines()[0]
    assert status == 0 and new != old and "keep working" in out
    assert rc("token")[1].strip() == new and rc("token", "--admin")[1].strip() == admin_token
    # With --admin, the admin token (docs/http.md), and the join token stays.
    status, out, err = rc("token", "--rotate", "--admin")
    assert status == 0 and out.splitlines()[0] != admin_token
    assert rc("token", "--admin")[1].strip() == out.splitlines()[0]
    assert rc("token")[1].strip() == new
    assert audit_events(config) == [("join_token_rotated", "cli", "local"),
                                    ("admin_token_rotated", "cli", "local")]


def test_join_prints_the_fingerprint_with_tls(cluster_home):
    config, _ = cluster_home
    config.tls = True
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["join"], out, err, config) == 0
    for line in out.getvalue().splitlines()[2], out.getvalue().splitlines()[-1]:
        assert line.endswith(" --fingerprint=" + tls.fingerprint(config))
    config.tls = False
    out = io.StringIO()
    commands.run_command(["join"], out, err, config)
    assert "--fingerprint" not in out.getvalue()
    assert out.getvalue().splitlines()[-1].startswith("curl -fsSO http://")


def test_submit_each_makes_a_group_per_matching_device(cluster_home, add_device):
    config, connection = cluster_home
    for name in ("a", "b", "c"):
        add_device(name)
    rc("label", "b", "kind=pi")
    rc("drain", "c")
    status, out, err = rc("submit", "--each", "echo", "hi", "--priority", "high")
    assert status == 0 and err == ""
    group = fleet.group(connection, int(out))
    assert sorted(t["device_id"] for t in group["tasks"]) == ["a", "b"]
    status, out, err = rc("submit", "--each", "--require", "label.kind=pi", "echo", "hi")
    assert [t["device_id"] for t in fleet.group(connection, int(out))["tasks"]] == ["b"]
    events = [line for line in audit.read(config) if line["event"] == "group_submitted"]
    assert [line["devices"] for line in events] == [["a", "b"], ["b"]]


@pytest.mark.parametrize("argv", [
    ["--retries", "999"], ["--timeout", "0"], ["--after", "99"]])
def test_a_refused_submit_each_leaves_nothing_behind(cluster_home, add_device, argv):
    config, connection = cluster_home
    add_device("a")
    add_device("b")
    status, out, err = rc("submit", "--each", "echo", "hi", *argv)
    assert status != 0 and out == "" and err
    assert connection.execute("SELECT count(*) FROM task_groups").fetchone()[0] == 0
    assert task_count(connection) == 0


def test_a_group_is_written_whole_or_not_at_all(cluster_home, add_device):
    config, connection = cluster_home
    add_device("a")
    parent = tasks.submit(connection, config, "echo", {"message": "first"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'failed' WHERE task_id = ?", (parent,))
    with pytest.raises(tasks.TaskError, match="already failed"):
        fleet.submit_each(connection, config, "echo", {"message": "hi"}, include_new=True,
                          depends_on=[parent])
    with pytest.raises(tasks.TaskError, match="retries"):
        fleet.submit_each(connection, config, "echo", {"message": "hi"}, retries=-1)
    assert connection.execute("SELECT count(*) FROM task_groups").fetchone()[0] == 0
    assert task_count(connection) == 1


def test_group_shows_each_result_and_a_summary(cluster_home, add_device):
    config, connection = cluster_home
    add_device("a")
    add_device("b")
    group_id = fleet.submit_each(connection, config, "echo", {"message": "hi"})
    first, second = [t["task_id"] for t in fleet.group(connection, group_id)["tasks"]]
    finish_later(config, first, "a", COMPLETED, "hello\nmore").join()
    finish_later(config, second, "b", FAILED, "", "Traceback\nValueError: no").join()
    status, out, err = rc("group", str(group_id))
    lines = out.splitlines()
    # An output of more than one line: each device's whole output under a heading.
    assert status == 0 and lines[:3] == ["== a (task %d, completed)" % first, "hello", "more"]
    assert lines[3:5] == ["== b (task %d, failed)" % second, "error: ValueError: no"]
    assert lines[-1] == "2 tasks: 1 completed, 1 failed, 0 running"
    body = json.loads(rc("group", str(group_id), "--json")[1])
    assert body["summary"] == {"tasks": 2, "completed": 1, "failed": 1}


def test_submit_each_wait_prints_the_group(cluster_home, add_device):
    config, connection = cluster_home
    add_device("a")

    def finish_when_queued():
        waiter = db.connect(config.db_path)
        while not waiter.execute("SELECT count(*) FROM tasks").fetchone()[0]:
            time.sleep(0.01)
        waiter.close()
        finish_later(config, 1, "a", COMPLETED, "hi").join()
    thread = threading.Thread(target=finish_when_queued)
    thread.start()
    status, out, err = rc("submit", "--each", "echo", "hi", "--wait", "--wait-timeout", "10")
    thread.join()
    assert status == 0 and out.splitlines()[-1] == "1 task: 1 completed, 0 failed, 0 running"
    status, out, err = rc("submit", "--each", "echo", "x", "--wait", "--wait-timeout", "0.1")
    assert status == 1 and "gave up waiting" in err and "1 queued" in out


def test_broadcast_and_control(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    status, out, err = rc("broadcast", "reload", "--require", "role=compute")
    control_id = int(out)
    assert status == 0 and rc("control", out.strip())[1].endswith("no acknowledgements yet\n")
    with db.write(connection):
        connection.execute("INSERT INTO control_acks(control_id, device_id, time, ok, detail)"
                           " VALUES (?, 'pi', ?, 1, 'reloaded')", (control_id, time.time()))
    out = rc("control", str(control_id))[1]
    assert out.startswith("control %d: reload to role=compute" % control_id)
    assert out.splitlines()[-1].split()[:1] == ["pi"] and "reloaded" in out
    assert json.loads(rc("control", str(control_id), "--json")[1])["acks"][0]["ok"] == 1
    assert audit.read(config)[0]["command"] == "reload"


def test_submit_and_cancel_are_audited(cluster_home):
    config, _ = cluster_home
    task_id = int(rc("submit", "echo", "x")[1])
    rc("cancel", str(task_id))
    assert audit_events(config) == [("task_submitted", "cli", "local"),
                                    ("task_cancel_requested", "cli", "local")]
    assert audit.read(config)[0]["task_id"] == task_id


def test_web_access_of_the_fleet_commands():
    for line in ("drain pi", "drain pi --now", "resume pi", "forget pi", "revoke pi",
                 "label pi a=b", "role pi x", "broadcast reload", "submit --each echo x",
                 "token --rotate"):
        assert commands.web_access(line.split()) == "admin", line
    for line in ("group 1", "control 1", "devices --all", "device pi"):
        assert commands.web_access(line.split()) == "read", line
    words = commands.completion_words()
    assert "--now" in words["commands"]["drain"] and "--each" in words["commands"]["submit"]
    assert words["positional"]["label"] == "device"
    assert words["positional"]["broadcast"] == list(fleet.CONTROL_COMMANDS)


def test_the_audit_log_stays_out_of_the_merged_logs(cluster_home):
    config, _ = cluster_home
    write_log(config, "rc-server", ['{"time": 1.0, "level": "info", "event": "started"}'])
    rc("submit", "echo", "x")
    assert "rc-cli INFO task_submitted" in rc("logs")[1] and "actor=" not in rc("logs")[1]
    assert "actor=cli source=local" in rc("logs", "--program", "audit")[1]


# -- how quickly `rc` starts: a shell user's every command, cron's every check -----------

# What `rc` leaves out of its start (each is there when a command needs it):
# xmlrpc.client brings http.client, email, urllib and ssl (~15 ms here, far
# more on a Pi); subprocess ~4 ms.
RC_START_LEAVES_OUT = ("xmlrpc.client", "http.client", "ssl", "email", "subprocess")


def test_rc_starts_without_what_only_some_commands_need():
    probe = ("import sys; from rc import cli; print(','.join(name for name in %r"
             " if name in sys.modules))" % (RC_START_LEAVES_OUT,))
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "lib")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_make_install_leaves_every_module_of_lib_compiled():
    """lib/ is installed in place, so pip compiles none of it: where
    PYTHONDONTWRITEBYTECODE is set (or lib/ cannot be written by the user
    of `rc`), every command compiled ~60 modules again (170 ms of CPU
    instead of 115 here), and the local worker ran from source (38 MiB
    instead of 16). `make install` compiles what changed."""
    import importlib.util
    done = subprocess.run(["make", "-s", "-C", REPO, "install"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=600,
                          env=dict(os.environ, RC_HOME=os.environ.get("RC_HOME", os.path.join(
                              REPO, "var"))))
    assert done.returncode == 0, done.stdout
    package = os.path.join(REPO, "lib", "rc")
    worker = os.path.join(REPO, "bin", "worker.py")
    compiled = [(os.path.join(package, name), None) for name in sorted(os.listdir(package))
                if name.endswith(".py")]
    # The local worker's two copies (bin/worker.py, bytecode_argv): the same
    # interpreter runs it.
    compiled += [(worker, None), (worker, "nospawner")]
    stale = []
    for source, optimization in compiled:
        cached = importlib.util.cache_from_source(source, optimization=optimization)
        try:
            with open(cached, "rb") as f:
                header = f.read(16)
        except OSError:
            stale.append(cached)
            continue
        mtime = int.from_bytes(header[8:12], "little")
        if mtime != int(os.stat(source).st_mtime) & 0xFFFFFFFF:
            stale.append(cached)
    assert stale == []


def test_building_rcs_parser_looks_for_no_translation_file(monkeypatch):
    """argparse asked gettext for each of ~150 messages, and gettext looked
    through the locale directories for each (misses are not cached): 6.5 ms
    of every rc command's 10.5 ms of parser."""
    import gettext
    looked = []
    monkeypatch.setattr(gettext, "find", lambda *args, **kwargs: looked.append(args))
    parser = commands.build_parser(io.StringIO())
    with pytest.raises(commands.UsageError):
        commands.parse(parser, ["tasks", "--no-such-option"])
    assert looked == []
