"""The first hour of a new user (issue 21): what `rc` says when something is
off, the settings a cluster was started with, the main node stopped, `rc
why` for drained and paused devices, and tasks no device can ever run."""
import glob
import io
import json
import os
import pty
import select
import subprocess
import time

import pytest

from rc import commands, db, devices, fleet, health, tasks
from rc import config as config_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RC = os.path.join(REPO, "bin", "rc")
WORKER_PATH = os.path.join(REPO, "bin", "worker.py")


def rc(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def add(connection, device_id, cores=4, availability=None, now=None):
    data = {"device_info": {"hostname": device_id, "platform": "linux",
                            "architecture": "aarch64"},
            "hardware_specs": {"cpu_cores": cores, "memory_gb": 3.8},
            "task_types": ["echo", "python_eval", "shell"], "tags": [], "slots": 2,
            "role": "compute", "protocol": 1}
    if availability is not None:
        data["availability"] = availability
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", now or time.time())
    return device_id


# -- the smaller things ---------------------------------------------------------------

def test_rc_alone_prints_a_short_hint(cluster_home):
    status, out, err = rc()
    assert status == 2 and "rc --help" in err and "rc status" in err
    assert len(err.splitlines()) <= 3


def test_a_negative_limit_and_zero_minutes_are_refused(cluster_home):
    status, _, err = rc("tasks", "--limit", "-1")
    assert status == 2 and "-1" in err
    status, out, err = rc("history", "--minutes", "0")
    assert status == 2 and "--minutes" in err and "from 1" in err and out == ""


def test_logs_of_a_task_that_does_not_exist(cluster_home):
    status, out, err = rc("logs", "--task", "99999")
    assert status == 1 and "no task 99999" in err and out == ""


def test_lease_expires_reads_as_a_time(cluster_home):
    config, connection = cluster_home
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    expires = time.time() + 120
    with db.write(connection):
        connection.execute("UPDATE tasks SET lease_expires = ? WHERE task_id = ?",
                           (expires, task_id))
    status, out, _ = rc("task", str(task_id))
    line = [line for line in out.splitlines() if line.startswith("lease_expires:")][0]
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(expires)) in line
    assert str(int(expires)) not in line


def test_every_submit_option_has_help(cluster_home):
    parser = commands.command_parsers(commands.build_parser(io.StringIO()))["submit"]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, "%s has no help text" % action.option_strings[0]


@pytest.mark.parametrize("name", ["computational", "network_services"])
def test_the_design_documents_capability_names_are_refused_clearly(cluster_home, name):
    config, connection = cluster_home
    status, _, err = rc("submit", "echo", "hi", "--require", "capability=" + name)
    assert status == 2 and name in err and "gcc" in err and "role=" in err
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


def test_monitor_leaves_on_q_and_says_so(cluster_home):
    parent, child = pty.openpty()
    process = subprocess.Popen([RC, "monitor"], stdin=child, stdout=child, stderr=child,
                               env=os.environ, start_new_session=True)
    os.close(child)
    seen = b""
    try:
        deadline = time.time() + 20
        while b"to leave" not in seen and time.time() < deadline:
            if select.select([parent], [], [], 0.5)[0]:
                seen += os.read(parent, 65536)
        assert b"q or Ctrl-C to leave" in seen
        os.write(parent, b"q")
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(parent)


PYTHON27 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python")))


@pytest.mark.skipif(not PYTHON27, reason="no Python 2.7 under ~/.pyenv/versions")
def test_python_2_7_is_told_what_the_worker_needs():
    done = subprocess.run([PYTHON27[-1], WORKER_PATH, "--join", "127.0.0.1:1"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert done.returncode == 1
    assert "needs Python 3.6 or newer" in done.stderr and "SyntaxError" not in done.stderr


# -- what the main node was started with ----------------------------------------------

def test_ports_and_config_given_at_init_are_used_by_every_later_command(tmp_path):
    home = tmp_path / "rc2"
    settings = tmp_path / "mine.json"
    settings.write_text(json.dumps({"health_queue_stuck": 123.0}))
    started = dict(os.environ, RC_HOME=str(home), RC_CONFIG=str(settings),
                   RC_TCP_PORT="18090", RC_WEB_PORT="15010", RC_FILES_PORT="18091")
    done = subprocess.run([RC, "init"], env=started, stdout=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0 and "RC_TCP_PORT=18090" in done.stdout
    assert oct(os.stat(config_module.started_with_path(str(home))).st_mode & 0o777) == "0o600"
    # A new shell: only RC_HOME.
    fresh = {key: value for key, value in os.environ.items()
             if key not in ("RC_CONFIG", "RC_TCP_PORT", "RC_WEB_PORT", "RC_FILES_PORT")}
    fresh["RC_HOME"] = str(home)
    joined = subprocess.run([RC, "join"], env=fresh, stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60).stdout
    assert ":18090 " in joined and ":15010/" in joined and ":8080" not in joined
    config = config_module.load(environ=fresh)
    assert (config.tcp_port, config.web_port, config.files_port) == (18090, 15010, 18091)
    assert config.health_queue_stuck == 123.0
    # What the environment says still wins, and is recorded in turn.
    assert config_module.load(environ=dict(fresh, RC_WEB_PORT="15011")).web_port == 15011


# -- with the main node stopped -------------------------------------------------------

def stopped_main_node(config):
    """A state directory whose supervisord ran once and is gone."""
    path = os.path.join(config.log_dir, "supervisord.log")
    with open(path, "w") as f:
        f.write("2026-12-05 08:00:00,000 INFO stopped\n")
    return os.path.getmtime(path)


def test_with_the_main_node_stopped_no_device_is_online(cluster_home):
    config, connection = cluster_home
    add(connection, "pi")
    stopped_main_node(config)
    status, out, err = rc("devices", "--tsv", "--no-header")
    assert status == 0 and out.split("\t")[1] == "offline"
    assert "main node not running" in err
    status, out, _ = rc("status")
    assert out.startswith("main_node: not running (stopped ")
    assert "devices_online: 0" in out and "devices_offline: 1" in out
    status, out, _ = rc("device", "pi")
    assert "status:" in out and "offline" in [line.split()[-1] for line in out.splitlines()
                                              if line.startswith("status:")]
    status, out, _ = rc("monitor")            # one frame, and back: nothing moves
    assert status == 0 and out.startswith("main node not running (stopped ")
    assert "devices 0/1 online" in out
    report = health.check(config)
    devices_finding = [f for f in report.findings if f.name == "devices"][0]
    assert devices_finding.values["devices_online"] == 0
    assert "main node not running" in devices_finding.message


def test_before_the_first_start_devices_show_as_stored(cluster_home):
    config, connection = cluster_home
    add(connection, "pi")
    status, out, err = rc("devices", "--tsv", "--no-header")
    assert out.split("\t")[1] == "online" and err == ""


def test_ctl_and_make_status_on_a_stopped_cluster(cluster_home, tmp_path):
    config, _ = cluster_home
    done = subprocess.run([RC, "ctl", "status"], env=os.environ, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 3 and done.stdout.startswith("not running")
    made = subprocess.run(["make", "-s", "-C", REPO, "status"], env=os.environ,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert made.returncode == 0 and "not running" in made.stdout
    assert "Error" not in made.stdout and "ENV_" not in made.stdout


def test_ctl_refuses_an_unknown_program(cluster_home):
    status, _, err = rc("ctl", "restart", "rc-shceduler")
    assert status == 2 and "rc-scheduler" in err


# -- rc why, submit --each and tasks nothing fits ------------------------------------

def test_why_a_task_only_a_drained_device_fits(cluster_home):
    config, connection = cluster_home
    add(connection, "small", cores=1)
    add(connection, "big", cores=8)
    fleet.drain(connection, config, "big")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"},
                           requirements={"min_cpu_cores": 4})
    status, out, _ = rc("why", str(task_id))
    assert "in a moment" not in out
    assert "big (drained; `rc resume big`" in out


def test_why_a_task_only_a_paused_device_fits_names_the_rule(cluster_home):
    config, connection = cluster_home
    add(connection, "small", cores=1)
    add(connection, "phone", cores=8, availability={
        "available": False, "reason": "battery 20% (stops below 30%, resumes at 40%)"})
    task_id = tasks.submit(connection, config, "echo", {"message": "x"},
                           requirements={"min_cpu_cores": 4})
    status, out, _ = rc("why", str(task_id))
    assert "paused by its worker's own rule: battery 20% (stops below 30%" in out


def test_submit_each_leaves_out_paused_devices_and_says_so(cluster_home):
    config, connection = cluster_home
    add(connection, "pi")
    add(connection, "phone", availability={"available": False, "reason": "not charging"})
    status, out, err = rc("submit", "--each", "shell", "true")
    assert status == 0, err
    group = fleet.group(connection, int(out))
    assert [m["device_id"] for m in group["tasks"]] == ["pi"]
    assert "left out phone: paused (not charging)" in err
    with db.write(connection):
        connection.execute("UPDATE devices SET available = 1 WHERE device_id = 'phone'")
        connection.execute("UPDATE devices SET available = 0, unavailable_reason = 'x'"
                           " WHERE device_id = 'pi'")
    with db.write(connection):
        connection.execute("UPDATE devices SET available = 0 WHERE device_id = 'phone'")
    status, out, err = rc("submit", "--each", "shell", "true")
    assert status == 1 and "paused" in err and "phone" in err and "pi" in err


def test_health_warns_of_a_task_no_device_can_ever_run(cluster_home):
    config, connection = cluster_home
    add(connection, "pi", cores=4)
    unfit = tasks.submit(connection, config, "echo", {"message": "x"},
                         requirements={"min_cpu_cores": 64})
    tasks.submit(connection, config, "echo", {"message": "y"})       # fits pi
    now = time.time()
    early = health.unfit_tasks(connection, config, now)
    assert early.status == health.OK
    late = health.unfit_tasks(connection, config, now + config.health_unfit_task + 1)
    assert late.status == health.WARNING and late.values["unfit"] == 1
    assert "task %d " % unfit in late.message and "rc why %d" % unfit in late.message


# -- device ids that differ only by case ----------------------------------------------

def test_a_device_id_differing_only_by_case_is_refused(tmp_path):
    from test_server import Client, committed, token_of
    import io as io_module
    import threading
    from rc import state_dir
    from rc.log import Logger
    from rc.server import Server
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.auth_timeout = "127.0.0.1", 0, 1.0
    config.tls, config.device_secrets = False, False
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io_module.BytesIO()))
    port = instance.listen()
    thread = threading.Thread(target=lambda: [instance.turn(0.002)
                                              for _ in iter(lambda: instance.stopping, True)])
    thread.start()
    try:
        token = token_of(instance)
        assert Client(port).register(token, "pi")["message_type"] == "register_ack"
        reply = Client(port).register(token, "PI")
        assert reply["data"]["code"] == "device_id_clash" and "pi" in reply["data"]["message"]
        # The same id again is the same device, as before.
        assert Client(port).register(token, "pi")["message_type"] == "register_ack"
        ids = [row[0] for row in committed(instance, "SELECT device_id FROM devices")]
        assert ids == ["pi"]
    finally:
        instance.stopping = True
        thread.join()
        instance.database.close()


# -- the README's fleet examples, and the docs' worker lines -----------------------------

def finished_group(config, connection, outputs):
    """A --each group whose tasks ended with these outputs, one per device."""
    for device_id in outputs:
        add(connection, device_id)
    status, out, err = rc("submit", "--each", "shell", "df -h /")
    group_id = int(out)
    now = time.time()
    with db.write(connection):
        for member in fleet.group(connection, group_id)["tasks"]:
            connection.execute(
                "UPDATE tasks SET state = 'completed', finished_at = ?, result = ?"
                " WHERE task_id = ?", (now, db.dumps({"output": outputs[member["device_id"]]}),
                                       member["task_id"]))
    return group_id


def test_a_group_shows_each_devices_whole_output(cluster_home):
    config, connection = cluster_home
    df = ("Filesystem      Size  Used Avail Use% Mounted on\n"
          "/dev/root        29G  5.1G   23G  19% /\n")
    group_id = finished_group(config, connection, {"pi-kitchen": df, "pi-attic": df})
    status, out, _ = rc("group", str(group_id))
    assert out.count("/dev/root        29G") == 2
    assert "== pi-attic (task " in out and "== pi-kitchen (task " in out
    assert out.rstrip().endswith("2 tasks: 2 completed, 0 failed, 0 running")


def test_the_readmes_offline_filter_finds_a_drained_offline_device(cluster_home):
    config, connection = cluster_home
    add(connection, "laptop")
    fleet.drain(connection, config, "laptop")
    with db.write(connection):
        connection.execute("UPDATE devices SET status = 'offline', connected = 0")
    readme = open(os.path.join(REPO, "README.md")).read()
    line = [line for line in readme.splitlines()
            if line.startswith("bin/rc devices --tsv --no-header | awk")][0]
    done = subprocess.run(line.replace("bin/rc", RC, 1), shell=True, env=os.environ,
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.stdout.split() == ["laptop"]


def worker_command_lines():
    """Every `worker.py --join ...` command in README.md and docs/, whole
    (a command may go on over the next lines, inside backticks or after \\)."""
    paths = [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(REPO, "docs", name) for name in os.listdir(os.path.join(REPO, "docs")))
    for path in paths:
        text = open(path).read().replace("\\\n", " ")
        for start in [i for i in range(len(text)) if text.startswith("worker.py --join", i)]:
            end = min([i for i in (text.find("`", start), text.find("\n\n", start),
                                   text.find("\n```", start)) if i != -1] + [len(text)])
            yield os.path.basename(path), " ".join(text[start:end].split())


def test_every_worker_command_in_the_docs_pins_the_certificate():
    lines = list(worker_command_lines())
    assert len(lines) >= 4
    for name, line in lines:
        if "--token" in line:
            assert "--fingerprint" in line, "%s: %s" % (name, line)


def test_the_capabilities_rc_names_are_those_the_worker_looks_for():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_capabilities", WORKER_PATH)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert commands.KNOWN_CAPABILITIES == worker.CAPABILITY_TOOLS


def test_the_worker_reads_as_sentences_on_a_terminal():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rc_worker_console", WORKER_PATH)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    record = {"time": 0.0, "program": "worker", "level": "info", "event": "registered",
              "device_id": "nas", "main_node": "nas:8080", "slots": 2}
    assert worker.readable_line(record).endswith(
        " connected to nas:8080, 2 slots, waiting for tasks")
    failed = dict(record, event="task_finished", level="warning", task_id=7, attempt=1,
                  task_type="shell", status="failed", execution_time=0.25,
                  error="Traceback\nValueError: \x1b]0;owned\x07")
    assert worker.readable_line(failed).endswith(
        " WARNING task 7 (shell) failed after 0.2s: ValueError: ?]0;owned?")
    odd = dict(record, event="bad_frame", level="error", message="line 3 \x1b[2J")
    assert worker.readable_line(odd).endswith(" ERROR bad frame: line 3 ?[2J")
