"""A new user's first hour, session 39, from the README and docs/ alone on a
fresh clone: the operator of a drawer of devices (a phone's worker.py run
alone under Python 3.6 with its good-guest rules, a second worker with
labels, cron's health checks, backups, secrets, broadcasts, logs, /text in
pipelines, `make stop` and `make run` with tasks running), then a data user
with a folder of files (issue 18: inputs, stdin, env, scripts, outputs,
checkpoints, bad inputs, the dashboard on a phone). Each test fails without
its fix."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cluster_harness import RC, WORKER as SERVED_WORKER, online, wait_for, with_the_local_worker
from rc import db, device_logs, health, scheduler, tasks
from test_cli import rc, task_count
from test_dashboard_browser import ARTIFACTS, panel_screenshot
from test_first_hour import add
from test_first_hour_s34 import phone  # noqa: F401 (a fixture: one Chromium, a phone's pages)
from test_worker import DEVICE_ID, TOKEN, WORKER, main, wait_until  # noqa: F401 (a fixture)
from test_worker_identity import hello
from test_worker_policy import battery, options, worker, write  # noqa: F401 (a fixture)

TIMEOUT = 60        # seconds any one task may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_local_worker(tmp_path_factory.mktemp("first-hour-s39")):
        cluster.local = online(cluster).pop()        # the main node's own worker
        yield cluster


# -- the operator: cron's health check ---------------------------------------------------

def test_health_with_the_main_node_down_reports_no_program_running(cluster_home):
    """Cron's `bin/rc health >/dev/null || bin/rc health -v` with the main node
    stopped: `RC CRITICAL - supervisord is not running ... | queued=0 ...`,
    its performance data without `programs_running`, which a monitoring
    graph then lost just when it mattered. Now it is there, 0."""
    config, _ = cluster_home
    line = health.check(config).line()
    assert line.startswith("RC CRITICAL - supervisord is not running"), line
    assert " | programs_running=0 " in line, line


# -- the operator: a phone's good-guest rules --------------------------------------------

def test_a_phone_paused_by_one_rule_then_another_says_so_at_once(worker, tmp_path):  # noqa: F811
    """A phone with `--min-battery 30 --max-temperature 45` paused at 25 %;
    charged to 90 % but now at 50 °C, it stayed paused, rightly, but `rc
    devices`, `rc why` and the dashboard went on saying `battery 25% (stops
    below 30%, resumes at 40%)` until its next heartbeat, up to a minute: the
    worker told the main node at once only when it flipped between available
    and not. Now a change of the rules that hold it back is told at once too;
    the owner's idle seconds moving is not (that would be a heartbeat every
    policy check)."""
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0" / "temp"
    write(zone, "41000")
    battery(tmp_path, 25)
    policy = worker.Availability(options(worker, "--min-battery", "30", "--max-temperature",
                                         "45"), worker.Power())
    assert policy.check() and policy.reason.startswith("battery 25%")
    battery(tmp_path, 90)
    write(zone, "50000")
    assert policy.check(), "told at once"
    assert not policy.available and policy.reason.startswith("temperature 50 C")
    assert not policy.check()           # nothing new: nothing to tell

    owner = worker.Availability(options(worker, "--idle-minutes", "10"), worker.Power())
    assert owner.check() and "owner active 0 s ago" in owner.reason
    owner.owner.seen -= 5.0
    assert not owner.check() and "owner active 5 s ago" in owner.reason


# -- the operator: a fleet ---------------------------------------------------------------

def test_each_with_a_label_no_device_has_names_what_they_lack(cluster_home, add_device):
    """The README's `rc submit --each --require label.kind=pi shell 'df -h /'
    --wait` before any `rc label` said `no online device accepts shell tasks
    with those requirements`: which one, on which devices? Now the
    requirement the online devices lack follows, with their names."""
    _, connection = cluster_home
    add_device("pi")
    add_device("nas")
    status, _, err = rc("submit", "--each", "--require", "label.kind=pi", "--require",
                        "platform=linux", "python_eval", "1 + 1", "--wait")
    assert status == 1 and task_count(connection) == 0
    assert err == "rc: error: no online device accepts python_eval tasks with those" \
        " requirements:" \
        " needs label kind=pi (nas, pi)\n", err


# -- the operator: a drawer of phones ------------------------------------------------------

def test_phones_named_localhost_each_get_an_id_of_their_own(worker, tmp_path,  # noqa: F811
                                                             monkeypatch):
    """Every Android phone's host name is `localhost`, the worker's default
    --device-id: the README's join line (and share/termux/start-rc-worker,
    which gives no --device-id) joined the first phone as `localhost` and had
    the second refused for good (`device_id_taken`, exit 3, which ends the
    boot script's loop). Now such a device makes an id of its own once
    (android-3fa2c1) and keeps it in its state directory; a phone that
    joined as localhost before keeps that id, and a real host name is used
    as before."""
    monkeypatch.setattr(worker.socket, "gethostname", lambda: "localhost")
    monkeypatch.setenv("TERMUX_VERSION", "0.118.0")
    ids = []
    for phone_state in ("phone1", "phone2"):
        state = str(tmp_path / phone_state)
        first = options(worker, "--state-dir", state).device_id
        assert re.match(r"android-[0-9a-f]{6}\Z", first), first
        assert options(worker, "--state-dir", state).device_id == first     # kept
        ids.append(first)
    assert ids[0] != ids[1]
    joined_before = tmp_path / "old-phone"
    (joined_before / "cluster-A").mkdir(parents=True)
    (joined_before / "cluster-A" / "localhost.secret").write_text("5e" * 32)
    assert options(worker, "--state-dir", str(joined_before)).device_id == "localhost"
    assert options(worker, "--state-dir", state, "--device-id", "p3").device_id == "p3"
    monkeypatch.setattr(worker.socket, "gethostname", lambda: "pi-kitchen")
    assert options(worker, "--state-dir", str(tmp_path / "pi")).device_id == "pi-kitchen"


def test_self_test_says_which_device_id_the_worker_joins_as(tmp_path):
    """`python3 worker.py --self-test` (the README's check on a new device)
    printed the profile, the sandbox and the state directory, but not the id
    the device would join as, which on a phone is now made, not its host
    name."""
    done = subprocess.run([sys.executable, "-I", WORKER, "--self-test", "--allow", "echo",
                           "--state-dir", str(tmp_path / "state"), "--device-id", "p3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "\ndevice id:      p3\n" in done.stdout, done.stdout[-600:]


def test_resume_of_a_device_its_worker_holds_back_says_so(cluster_home):
    """`rc broadcast drain` (the worker holds itself) and then `rc resume
    phone` printed `phone resumed: it takes new tasks again`, while the phone
    stayed paused (`drained by the main node (rc broadcast drain); restart
    the worker to undo`), as does one paused by its battery. Now resume says
    what still holds it back."""
    _, connection = cluster_home
    reason = "drained by the main node (rc broadcast drain); restart the worker to undo"
    add(connection, "phone", availability={"available": False, "reason": reason})
    add(connection, "pi")
    assert rc("drain", "phone")[0] == 0
    assert rc("resume", "phone")[1] == \
        "phone resumed, but its worker takes nothing new yet: %s\n" % reason
    assert rc("resume", "pi")[1] == "pi resumed: it takes new tasks again\n"
    # The reason is the device's own text: shown as a cell, its escapes as "?".
    add(connection, "tv", availability={"available": False, "reason": "\x1b]52;c;aGk=\x07"})
    assert rc("resume", "tv")[1] == "tv resumed, but its worker takes nothing new yet:" \
        " ?]52;c;aGk=?\n"


# -- the operator: secrets --------------------------------------------------------------

def test_a_refused_join_token_names_the_file_it_came_from(main, tmp_path):  # noqa: F811
    """A worker joined with `--token-file ~/.rc-token` after `rc token
    --rotate` (or with a stale file) logged, every few seconds, `wrong join
    token: the main node refused this worker's proof; check --token`: an
    option it was not given. Now it names the file it read, and where the
    right token is."""
    token_file = tmp_path / "rc-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    log_path = tmp_path / "worker.log"
    with open(str(log_path), "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", WORKER, "--join", "127.0.0.1:%d" % main.port,
             "--token-file", str(token_file), "--device-id", DEVICE_ID,
             "--state-dir", str(tmp_path / "state")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        link = main.accept()
        hello(link)
        link.send("error", {"code": "auth_failed", "message": "wrong join token"})
        link.close()

        def refused():
            with open(str(log_path)) as f:
                return [json.loads(line) for line in f if '"auth_failed"' in line]
        wait_until(refused)
    finally:
        process.terminate()
        process.wait(10)
    message = refused()[0]["message"]
    assert "check --token-file %s against `rc token` there" % token_file in message, message
    assert "rc token --rotate" in message


# -- the operator: upgrades -------------------------------------------------------------

def test_broadcast_upgrade_of_a_file_copied_by_hand_says_to_restart(cluster, tmp_path):
    """docs/operations.md: copy the new worker to a device (`curl -O
    http://NAS:5000/worker.py`) and restart it there. Copied and not yet
    restarted, `rc broadcast upgrade` had it answer `already the served
    worker.py; nothing to do` (it compared the file, not what it runs), and
    it ran the old code on. Now it says to restart it, and a worker allowed
    to upgrade restarts itself; a worker running the served file is still
    up to date."""
    with open(SERVED_WORKER) as f:
        served = f.read()
    copies = {}
    for device_id, extra in (("handcopy", ()), ("handcopy-allowed", ("--allow-upgrade",))):
        copies[device_id] = tmp_path / device_id / "worker.py"
        copies[device_id].parent.mkdir()
        copies[device_id].write_text(served.replace('\n__version__ = "',
                                                    '\n__version__ = "0.0.1" or "'))
        cluster.start_worker(device_id, "--slots", "1", *extra, worker=str(copies[device_id]))
    try:
        wait_for(lambda: set(copies) <= online(cluster), 30, "the devices online")
        for path in copies.values():
            path.write_text(served)                  # curl -O, not restarted
        control_id = int(cluster.rc("broadcast", "upgrade").stdout)

        def answered():
            acks = json.loads(cluster.rc("control", str(control_id), "--json").stdout)["acks"]
            return {ack["device_id"]: ack for ack in acks} if len(acks) == 3 else None
        acks = wait_for(answered, TIMEOUT, "the three answers")
        late = "%s is the served worker.py, put there after this worker started"
        assert not acks["handcopy"]["ok"] and acks["handcopy"]["detail"] == \
            late % copies["handcopy"] + ": restart the worker to run it"
        assert acks["handcopy-allowed"]["ok"] and acks["handcopy-allowed"]["detail"] == \
            late % copies["handcopy-allowed"] + "; restarting now"
        assert acks[cluster.local]["ok"] and \
            acks[cluster.local]["detail"] == "already the served worker.py; nothing to do"

        def versions():
            with open(cluster.worker_log("handcopy-allowed")) as f:
                return [json.loads(line)["version"] for line in f
                        if line.startswith("{") and '"worker_started"' in line]
        wait_for(lambda: len(versions()) == 2, TIMEOUT, "the allowed one to run the file")
        assert versions()[-1] != "0.0.1"
    finally:
        for device_id in copies:
            process = cluster.workers.pop(device_id)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- the operator: logs ----------------------------------------------------------------

def test_rc_logs_task_shows_what_the_device_said_about_it(cluster_home, add_device):
    """`rc logs --task 17` of a task that failed on the phone showed the main
    node's three lines (submitted, assigned, `task_finished ... status=failed`)
    and not the phone's own, kept on the main node and shown by `rc logs
    --device phone`: `task_finished ... error=exit status 3`. The README says
    `--task` follows one task through every program; now it adds the lines of
    every device the task ran on."""
    config, connection = cluster_home
    add_device("phone")
    add_device("laptop")
    task_id = tasks.submit(connection, config, "shell", {"command": "exit 3"})
    with db.write(connection):
        assert scheduler.assign(connection, (task_id, 1, "phone"), 1.7e9, 15.0)
        for device_id, n, event, message in (
                ("phone", task_id, "task_finished", "status=failed error=exit status 3"),
                ("phone", None, "availability_changed", "available=true"),
                ("phone", task_id + 1, "task_finished", "another task's"),
                ("laptop", task_id, "task_fenced", "not the laptop's to run")):
            device_logs.store(connection, device_id, device_logs.checked_lines({"lines": [
                {"time": 1.7e9 + 1, "level": "warning", "event": event, "message": message,
                 "task_id": n}]}), 1.8e9)
    status, out, err = rc("logs", "--task", str(task_id))
    assert status == 0, err
    assert out.splitlines() == [
        "%s worker WARNING task_finished device_id=phone task_id=%d message=\"status=failed"
        " error=exit status 3\"" % (time.strftime("%H:%M:%S", time.localtime(1.7e9 + 1)),
                                    task_id)]
    # The main node's own worker (rc-worker) forwards its lines too, and they are in
    # its log file already: shown once.
    os.makedirs(config.log_dir, exist_ok=True)
    with open(os.path.join(config.log_dir, "rc-worker.log"), "w") as f:
        f.write(json.dumps({"time": 1.7e9 + 1, "program": "worker", "level": "warning",
                            "event": "task_finished", "device_id": "phone", "task_id": task_id,
                            "status": "failed"}, separators=(",", ":")) + "\n")
    out = rc("logs", "--task", str(task_id))[1]
    assert len(out.splitlines()) == 1 and "status=failed" in out and "message=" not in out


# -- bad inputs ---------------------------------------------------------------------------

def test_python_eval_of_a_file_here_names_python_exec_file(cluster_home, tmp_path,
                                                            monkeypatch):
    """`rc submit python_eval script.py` was queued, ran on a device and
    failed there with `NameError: name 'script' is not defined` (the file
    name read as an expression), where `python_exec script.py` is refused at
    once with `did you mean --file script.py?`. Now python_eval is refused
    too, naming the type and option that run a file."""
    config, connection = cluster_home
    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.py").write_text("print(1)\n")
    status, _, err = rc("submit", "python_eval", "script.py")
    assert status == 2 and task_count(connection) == 0
    assert "'script.py' is a file here, and python_eval takes an expression; did you mean" \
        " python_exec --file script.py?" in err
    # An expression that is not a file here is code, as before.
    assert rc("submit", "python_eval", "script.upper()")[0] == 0
    assert rc("submit", "python_eval", "len('script.py')")[0] == 0


# -- the dashboard on a phone -------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_task(cluster, tmp_path_factory):
    """A task that read a folder, left files and failed, as a data user's does."""
    here = tmp_path_factory.mktemp("failed-task")
    (here / "photos").mkdir()
    (here / "photos" / "a.txt").write_text("one\n")
    done = subprocess.run([RC, "submit", "shell", "mkdir res; echo half > res/part.txt;"
                           " echo 'cannot parse a.txt' >&2; exit 3", "--input", "photos/",
                           "--output", "res/*", "--retries", "0", "--require",
                           "device_id=" + cluster.local], cwd=str(here),
                          env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    task_id = int(done.stdout)
    assert cluster.rc("wait", str(task_id), check=False).returncode == 1
    return task_id


def test_a_failed_tasks_files_say_input_or_output_on_a_phone(phone, failed_task):
    """On a phone (390 px) a task's Files listed name and size only: its
    `kind` column was dropped below 430 px, so a failed task's page did not
    say which files were what it was given and which it left behind (`rc
    files` does, KIND). Now the kind stays."""
    page = phone("#/task/%d" % failed_task)
    files = page.locator("section.panel:has(h2:text-is('Files'))")
    files.locator("a", has_text="res/part.txt").wait_for(timeout=30000)
    for name, kind in (("a.txt", "input"), ("res/part.txt", "output")):
        cell = files.locator("tr", has=page.locator("a", has_text=name)).locator("td").nth(1)
        assert cell.inner_text() == kind and cell.is_visible(), name
    screenshot(files, "s39_failed_task_files.png")


def screenshot(panel, name):
    panel_screenshot(panel, os.path.join(ARTIFACTS, name))


def test_a_devices_log_lines_name_their_task_on_a_phone(cluster, phone, failed_task):
    """A device's Logs on a phone showed `task_finished` with `attempt=1
    task_type=shell status=failed error=exit status 3`, and no task: the task
    column is dropped below 700 px and the message does not name it. Now the
    task's link is under the line's time there."""
    device_id = cluster.local
    wait_for(lambda: cluster.db.execute(
        "SELECT count(*) FROM device_logs WHERE task_id = ? AND event = 'task_finished'",
        (failed_task,)).fetchone()[0], TIMEOUT, "the device's task_finished line")

    page = phone("#/device/%s" % device_id)
    logs = page.locator("section.panel:has(h2:text-is('Logs'))")
    line = logs.locator("tr", has_text="task_finished").filter(has_text="status=failed").first
    line.wait_for(timeout=30000)
    link = line.locator("a[href='#/task/%d']" % failed_task)
    assert [link.nth(i).is_visible() for i in range(link.count())].count(True) == 1
    screenshot(logs, "s39_device_logs.png")
