"""A new user's first hour, session 29, commands copied from the README and
docs/: a worker started as a user without a home (`nobody`), `--self-test`
added to the join command, and what they do."""
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cluster_harness import WORKER, Cluster, free_port, free_ports, online, wait_for
from test_server import running_on_dev1, server  # noqa: F401 (a fixture)
from rc import commands, db, files, tasks
from rc import config as config_module


def listener():
    """A socket on 127.0.0.1 that only counts who dials it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def dialled(sock):
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def worker(*argv, timeout=90):
    return subprocess.run([sys.executable, "-I", WORKER] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def test_self_test_with_the_join_command_runs_here_alone(tmp_path):
    """`python3 worker.py --join … --self-test` (the join command `rc join`
    prints, with --self-test added, or a --config that names `join`) dialled
    the main node, signed its hello with the token it had not read, and
    ended in AttributeError: 'NoneType' object has no attribute 'encode'."""
    main_node = listener()
    with main_node:
        done = worker("--join", "127.0.0.1:%d" % main_node.getsockname()[1],
                      "--token=rc1_00", "--state-dir", str(tmp_path / "state"), "--self-test")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "python_eval  completed    ok" in done.stdout
        assert not dialled(main_node)


def test_a_worker_that_cannot_keep_its_state_dir_says_so_before_it_joins(tmp_path):
    """As `nobody` (HOME=/nonexistent) the worker joined, could not keep the
    secret it was given, and at its next connection was refused for good as
    an impostor of itself (device_id_taken); tasks with inputs failed too.
    Now it names the directory and the option, and exits 3 (as systemd's
    RestartPreventExitStatus expects) without dialling."""
    (tmp_path / "a-file").write_text("")
    state_dir = str(tmp_path / "a-file" / "state")     # unmakeable, even as root
    main_node = listener()
    with main_node:
        done = worker("--join", "127.0.0.1:%d" % main_node.getsockname()[1],
                      "--token=rc1_00", "--state-dir", state_dir)
        assert done.returncode == 3, done.stdout + done.stderr
        said = done.stdout + done.stderr
        assert "state_dir_unusable" in said and state_dir in said and "--state-dir" in said
        assert not dialled(main_node)
    test = worker("--state-dir", state_dir, "--self-test")
    assert test.returncode == 1, test.stdout + test.stderr
    assert "state dir:      %s UNUSABLE" % state_dir in test.stdout
    assert "shell        completed    ok" in test.stdout


@pytest.mark.e2e
def test_a_secret_that_cannot_be_written_still_lets_the_worker_reconnect(tmp_path):
    """A secret the worker could not write (here: its cluster's directory is
    a file) was forgotten at once, so the first reconnect (rc-server
    restarted, a Wi-Fi drop) ended the worker with device_id_taken."""
    cluster = Cluster(tmp_path / "var")
    cluster.start()
    try:
        state_dir = os.path.join(cluster.home, "worker-state")
        os.makedirs(state_dir, mode=0o700)
        with open(cluster.config.cluster_id_path) as f:
            cluster_id = f.read().strip()
        open(os.path.join(state_dir, cluster_id), "w").close()
        process = cluster.start_worker("unfiled")

        def logged(text, times=1):
            with open(cluster.worker_log("unfiled")) as f:
                return f.read().count(text) >= times
        wait_for(lambda: logged('"event":"device_secret_not_kept"'), 60, "the secret not kept")
        wait_for(lambda: "unfiled" in online(cluster), 60, "the worker online")
        cluster.supervisorctl("restart", "rc-server")
        wait_for(lambda: logged('"event":"registered"', 2) and "unfiled" in online(cluster)
                 or process.poll() is not None, 90, "the worker registered again, or ended")
        assert process.poll() is None
        assert not logged('"event":"device_id_taken"')
    finally:
        cluster.stop()


# -- a second cluster beside the first ------------------------------------------------

def test_make_run_names_a_port_another_cluster_holds(tmp_path):
    """The Makefile's header said RC_HOME, RC_TCP_PORT and RC_WEB_PORT run a
    second cluster beside the first; its rc-files then could not bind the
    first's files port, and `make run` failed after its wait saying only
    `RC CRITICAL - rc-files BACKOFF`, the cause in a traceback in a log."""
    cluster = Cluster(tmp_path / "var")
    with socket.socket() as first:
        first.bind(("127.0.0.1", cluster.config.files_port))
        first.listen(1)
        try:
            started = cluster.make("run")
            assert started.returncode != 0, started.stdout
            assert "holds port %d (files_port, RC_FILES_PORT)" % cluster.config.files_port \
                in started.stdout
            assert "RC_WEB_PORT=%d" % (cluster.config.web_port + 10) in started.stdout
            assert "not running" in cluster.rc("ctl", "status", check=False).stdout
        finally:
            cluster.make("stop")


def test_ports_taken_names_only_ports_in_use(cluster_home):
    config, _ = cluster_home
    config.tcp_host = config.web_host = "127.0.0.1"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        config.web_port = held.getsockname()[1]
        config.tcp_port, config.files_port = free_ports(2)
        problem = config_module.ports_taken(config)
        assert "port %d (web_port, RC_WEB_PORT)" % config.web_port in problem
        assert "tcp_port" not in problem and "files_port" not in problem
    assert config_module.ports_taken(config) is None


# -- output past the inline cap ------------------------------------------------------

def run_command(*argv, actor=("cli", "local")):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err, actor=actor)
    return status, out.getvalue(), err.getvalue()


def test_rc_wait_prints_all_of_a_long_output(cluster_home):
    """`rc submit shell 'seq 1 300000' --wait` (or `rc wait`) printed the
    inline part, 891,764 of 1,988,895 bytes, ending mid-way at 143267, with
    exit status 0 and no word of the rest; rc map printed all of it."""
    config, connection = cluster_home
    whole = "".join("%d\n" % n for n in range(1, 300001)).encode()
    digest, size = files.store_stream(connection, config, io.BytesIO(whole), len(whole))
    task_id = tasks.submit(connection, config, "shell", {"command": "seq 1 300000"})
    with db.write(connection):
        files.add_task_file(connection, task_id, 1, ".rc/stdout", digest, size, time.time())
        connection.execute("UPDATE tasks SET state = 'completed', finished_at = 1, result = ?",
                           (json.dumps({"output": whole[:891764].decode(), "exit_code": 0,
                                        "truncated": True}),))
    status, out, err = run_command("wait", str(task_id), "--timeout", "1")
    assert status == 0 and err == "" and out.encode() == whole
    # The web terminal shows the inline part and says where the rest is.
    status, out, err = run_command("wait", str(task_id), "--timeout", "1",
                                   actor=("admin", "127.0.0.1"))
    assert status == 0 and out.encode() == whole[:891764]
    assert "GET /api/v1/tasks/%d/files/.rc/stdout" % task_id in err


# -- the Python client's tasks in `rc tasks` --------------------------------------------

def test_an_executor_task_says_which_function_it_calls(cluster_home):
    """Every Executor task showed as `import sys, binascii, os as _rc_os
    try:…` in `rc tasks`, /text/tasks and the dashboard: which was which?"""
    from rc import client
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    import client_functions
    config, connection = cluster_home
    for calls, shown in ((1, "# add_offset, 1 call (rc.client)"),
                         (64, "# add_offset, 64 calls (rc.client)")):
        code, _, _ = client.call_code(client_functions.add_offset, [((n,), {})
                                                                   for n in range(calls)])
        task_id = tasks.submit(connection, config, "python_exec", {"code": code})
        status, out, err = run_command("tasks", "--json")
        assert status == 0, err
        summary = {task["task_id"]: task["summary"] for task in json.loads(out)}[task_id]
        assert summary.startswith(shown), summary


def test_rc_get_says_why_a_finished_task_has_no_outputs(cluster_home):
    """`--output '*.gz'` on a task that left a.txt: it completed, and `rc get`
    said 'has no output files (yet)', as if they might still come."""
    config, connection = cluster_home
    globbed = tasks.submit(connection, config, "shell", {"command": "echo x > a.txt",
                                                         "outputs": ["*.gz"]})
    bare = tasks.submit(connection, config, "shell", {"command": "true"})
    status, _, err = run_command("get", str(globbed))
    assert status == 1 and "no output files yet (it is queued)" in err
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'completed', finished_at = 1")
    status, _, err = run_command("get", str(globbed))
    assert status == 1 and "(yet)" not in err
    assert "it completed, and *.gz matched no file it left" in err
    status, _, err = run_command("get", str(bare))
    assert status == 1 and "submitted without --output" in err


def test_rc_why_of_a_finished_task_does_not_say_its_state_twice(cluster_home):
    """`rc why` of a completed task: 'Task 21 completed (attempt 1 on
    phone3): completed.'"""
    config, connection = cluster_home
    done = tasks.submit(connection, config, "echo", {"message": "hi"})
    failed = tasks.submit(connection, config, "shell", {"command": "false"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'completed', reason = 'completed',"
                           " finished_at = 1 WHERE task_id = ?", (done,))
        connection.execute("UPDATE tasks SET state = 'failed', error = 'exit status 1',"
                           " finished_at = 1 WHERE task_id = ?", (failed,))
    assert run_command("why", str(done))[1] == "Task %d completed (attempt 1).\n" % done
    assert run_command("why", str(failed))[1] == \
        "Task %d failed (attempt 1): exit status 1.\n" % failed


# -- rc logs --level warning after a routine drain ------------------------------------

def test_a_devices_answer_for_an_attempt_taken_back_is_no_warning(server):
    """`rc drain laptop --now`, then `rc logs --level warning`: rc-server's
    'WARNING stale_result … status=cancelled' for the attempt it had just
    taken back itself; a result for an attempt not the device's still is."""
    instance, port = server
    client, task_id, connection = running_on_dev1(instance, port)
    with db.write(connection):
        connection.execute("UPDATE tasks SET state='queued', device_id=NULL, attempt=2"
                           " WHERE task_id = ?", (task_id,))
    assert client.receive()["message_type"] == "task_cancel"
    client.send("task_result", {"task_id": task_id, "attempt": 1, "status": "cancelled",
                                "result": {}})
    client.send("task_result", {"task_id": task_id, "attempt": 1, "status": "completed",
                                "result": {"output": "late"}})

    def stale_levels():
        lines = [json.loads(line) for line in instance.log.stream.getvalue().splitlines()]
        return [line["level"] for line in lines if line["event"] == "stale_result"]
    wait_for(lambda: len(stale_levels()) == 2, 10, "both results logged")
    assert stale_levels() == ["info", "warning"]
    connection.close()


def test_a_forgotten_device_is_not_counted_offline(cluster_home, add_device):
    """`rc forget phone1` retires it for good, yet `rc status`, `rc health`
    and /text/metrics went on counting it: 'devices 3/5 online' with four
    devices in `rc devices`."""
    add_device("phone1")
    add_device("phone2")
    assert run_command("forget", "phone1")[0] == 0
    status, out, err = run_command("status")
    assert status == 0, err
    assert "devices_offline: 0\n" in out and "devices_total: 1\n" in out
    status, out, _ = run_command("health")
    assert "devices_total=1 " in out


def test_ports_taken_names_a_port_given_twice(cluster_home):
    """A make test run gave one cluster's rc-server and rc-files port 28313
    both (free_port() twice); rc-files could only restart, and make run said
    'rc-files BACKOFF'. The harness now picks three different ports."""
    config, _ = cluster_home
    config.tcp_port = config.files_port = free_port()
    problem = config_module.ports_taken(config)
    assert problem.startswith("RC_TCP_PORT and RC_FILES_PORT are the same port, %d"
                              % config.tcp_port)
    assert len(set(free_ports(3))) == 3
