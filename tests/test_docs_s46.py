"""What a new user copied from the README and docs/ and found otherwise
(docs46): why `make run` says the local worker stopped, what to do about a
state directory that lost its cluster_id, config refusals that name both
values and misspelt alert rules, rc-web on "::", a 405's words, the
client at a port that hangs up, a wait through make stop ... make run,
free ports suggested, a task type misspelt, help for every option,
schedules given files, and `rc token --admin --rotate`."""
import http.client
import io
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from rc import commands, health, program, tasks, web_server
from rc import config as config_module

from cluster_harness import free_ports
from test_web import client  # noqa: F401 (its fixture: rc-web under waitress)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_make_run_names_the_local_workers_error_not_its_last_line(cluster_home, monkeypatch):
    # After its error a worker logs worker_stopping and worker_stopped:
    # make run said `exits as it starts: {..."event":"worker_stopped"}`.
    config, _ = cluster_home
    monkeypatch.setattr(health, "program_states", lambda config: {"rc-worker": "BACKOFF"})
    lines = [{"level": "info", "event": "connected"},
             {"level": "error", "event": "device_id_taken",
              "message": "the main node already knows a device vm-local " + "x" * 300},
             {"level": "info", "event": "worker_stopping"},
             {"level": "info", "event": "worker_stopped"}]
    with open(os.path.join(config.log_dir, "rc-worker.log"), "w") as f:
        f.writelines(json.dumps(dict(line, program="worker")) + "\n" for line in lines)
    said = commands.local_worker_failing(config)
    assert said.startswith("device_id_taken: the main node already knows a device vm-local")
    assert "worker_stopped" not in said and "BACKOFF" in said
    # A later run that stopped otherwise: its own words, not the older error.
    with open(os.path.join(config.log_dir, "rc-worker.log"), "a") as f:
        f.write("usage: worker.py [-h] ...\nworker.py: error: unrecognized arguments: --slotz 2\n")
    assert commands.local_worker_failing(config).startswith("worker.py: error: unrecognized")
    with open(os.path.join(config.log_dir, "rc-worker.log"), "a") as f:
        for event in ("worker_started", "connected", "worker_stopped"):
            f.write(json.dumps({"level": "info", "event": event}) + "\n")
    assert '"worker_stopped"' in commands.local_worker_failing(config)


def test_the_command_state_damaged_gives_puts_the_cluster_id_back(cluster_home):
    # A new cluster_id (what `make run` made) stranded every device's secret,
    # kept under the old one's name: each stopped with device_id_taken.
    config, _ = cluster_home
    with open(config.cluster_id_path, encoding="utf-8") as f:
        cluster_id = f.read().strip()
    os.makedirs(os.path.join(config.home, "worker", cluster_id))
    os.remove(config.cluster_id_path)
    advice = program.state_damaged_advice(config, [config.cluster_id_path])
    assert "device_id_taken" in advice
    command = re.search(r": (\(umask 077; .*\))$", advice).group(1)
    subprocess.run(["sh", "-c", command], check=True)
    with open(config.cluster_id_path, encoding="utf-8") as f:
        assert f.read().strip() == cluster_id
    assert os.stat(config.cluster_id_path).st_mode & 0o077 == 0
    assert "fingerprint" in program.state_damaged_advice(config, [config.home + "/tls/cert.pem"])


def test_troubleshooting_gives_the_state_supervisord_leaves_a_dying_program_in():
    # supervisord never gives up on a program (startretries beyond reach):
    # one missing its cluster_id shows BACKOFF in rc health, never FATAL.
    assert re.search(r"^startretries=1000000000$", read("etc/supervisord.conf"), re.M)
    row = next(line for line in read("docs/troubleshooting.md").splitlines()
               if "state_damaged" in line and line.startswith("| `rc health`"))
    assert "BACKOFF" in row and "FATAL" not in row
    assert "grep ^rc1_ > var/cluster_id" in row


def test_a_heartbeat_rule_refusal_gives_both_values(tmp_path):
    # A file raising heartbeat_interval alone was refused for a default the
    # user never wrote: "lease_duration must be at least 1.5 x heartbeat_interval".
    settings = tmp_path / "settings.json"
    settings.write_text('{"heartbeat_interval": 300}')
    environ = {"RC_HOME": str(tmp_path / "var")}
    with pytest.raises(config_module.ConfigError) as refused:
        config_module.load(str(settings), environ=environ)
    assert "lease_duration" in str(refused.value)
    assert "450 s with heartbeat_interval 300), not 180" in str(refused.value)
    settings.write_text('{"tcp_port": 70000}')
    with pytest.raises(config_module.ConfigError) as refused:
        config_module.load(str(settings), environ=environ)
    assert "not 70000" in str(refused.value)
    text = read("docs/configuration.md").split("Each setting is checked")[1].split("## ")[0]
    assert "port past 65535" in text and "gives both values" in text


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 here")
def test_rc_web_on_every_address_answers_ipv4_as_ipv4():
    # web_host "::": waitress made its socket IPv6 only, so 127.0.0.1 (make
    # run's own check, and every IPv4 client) could not reach it; once it
    # could, the client was ::ffff:127.0.0.1, not loopback to read_access=local.
    seen = []

    def app(environ, start_response):
        seen.append(environ["REMOTE_ADDR"])
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    limits = {"connections_per_address": 10, "read_timeout": 10, "body_limit": 1024}
    server = web_server.Server(app, limits, lambda *args, **fields: None, host="::", port=0,
                               threads=1)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        connection.request("GET", "/")
        assert connection.getresponse().read() == b"ok"
        connection.close()
    finally:
        server.close()
        server.task_dispatcher.shutdown()
    assert seen == ["127.0.0.1"]
    row = re.search(r"^\| `web_host` \|.*$", read("docs/configuration.md"), re.M).group(0)
    assert "`::`" in row


@pytest.mark.parametrize("rules, named", [
    ([{"rule": "device_ofline", "after": 600}], "device_ofline"),
    ([{"rule": "device_offline", "afer": 600}], "afer"),
    ([{"rule": "failure_rate", "above": "x"}], "above")])
def test_an_alert_rule_misspelt_is_refused_as_the_file_is_read(tmp_path, rules, named):
    # Found before only by rc-reaper (alert_rules_invalid each minute, no
    # alert ever), while make run said "cluster healthy"; an option misspelt
    # was not found at all (its rule ran with the default).
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"alerts": rules}))
    with pytest.raises(config_module.ConfigError) as refused:
        config_module.load(str(settings), environ={"RC_HOME": str(tmp_path / "var")})
    assert "alerts" in str(refused.value) and named in str(refused.value)


def test_the_alert_rules_operations_md_shows_are_taken(tmp_path):
    example = re.search(r'^"alerts": (\[.*\]),$', read("docs/operations.md"), re.M).group(1)
    settings = tmp_path / "settings.json"
    settings.write_text('{"alerts": %s}' % example)
    config = config_module.load(str(settings), environ={"RC_HOME": str(tmp_path / "var")})
    assert [rule["rule"] for rule in config.alerts] == ["device_offline", "failure_rate"]


def test_a_method_an_endpoint_does_not_take_names_those_it_does(client):  # noqa: F811
    # `curl -T -` (a PUT) for an upload, as http.md once said to send one
    # chunked, got a bare "Method not allowed." and no word of POST.
    status, answer = client.json("/api/v1/files", data=b"hi", method="PUT", token=client.token)
    assert status == 405
    assert answer["error"] == "Method not allowed: /api/v1/files takes GET or POST, not PUT"
    assert "`curl -X POST -T -`" in read("docs/http.md")


def test_the_client_at_a_port_that_hangs_up_does_not_promise_to_wait_600_s(caplog):
    # The devices' port hangs up on HTTP: the client tries the request
    # CUT_RETRIES times more and gives up in seconds, but said "waiting for
    # it to answer again (a restart?), up to 600 s".
    from rc import client
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def hang_up():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.recv(65536)
            connection.close()
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with client.Cluster("http://127.0.0.1:%d" % listener.getsockname()[1], "token") as cluster:
            with pytest.raises(client.ClusterError) as refused:
                cluster.submit("echo", "hi").result(timeout=60)
    finally:
        done.set()
        listener.shutdown(socket.SHUT_RDWR)     # ends the accept() the thread waits in
        listener.close()
    assert "rc-web?" in str(refused.value)
    waiting = [record.getMessage() for record in caplog.records if "waiting for it" in
               record.getMessage()]
    assert waiting and "trying %d times more" % client.CUT_RETRIES in waiting[0]
    assert "600" not in waiting[0]


def test_a_wait_through_a_stopped_main_node_says_it_runs_again(cluster_home, monkeypatch):
    # README: rc wait and rc map, through make stop ... make run, say once
    # that the main node is not running and once that it runs again. A task
    # that ended a moment after make run (before the next look was due)
    # left the second unsaid.
    config, connection = cluster_home
    stopped = [time.time() - 3]
    monkeypatch.setattr(health, "main_node_stopped", lambda config: stopped[0])
    err = io.StringIO()
    watch = health.StoppedWatch(config, err, "rc")
    assert watch.look() and "not running" in err.getvalue()
    stopped[0] = None
    assert not watch.look()                      # its next look is not due yet
    task_id = tasks.submit(connection, config, "echo", {"message": "hi"})
    tasks.cancel(connection, task_id)
    assert commands.wait_for(connection, task_id, 5, watch)["state"] == "cancelled"
    assert err.getvalue().splitlines()[-1] == "rc: the main node is running again"
    assert watch.back_at is not None


def test_the_ports_make_run_suggests_for_a_taken_one_are_free(cluster_home):
    # It suggested each port + 10 unchecked: beside two clusters 10 apart,
    # a third was told to use the second's ports.
    config, _ = cluster_home
    config.tcp_host = config.web_host = "127.0.0.1"
    held = []
    try:
        for _ in range(40):         # a port and the one 10 above it, both held
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", first.getsockname()[1] + 10))
            except OSError:
                first.close()
                second.close()
                continue
            held = [first, second]
            break
        assert held, "no port with a free one 10 above it"
        for sock in held:
            sock.listen(1)
        config.tcp_port = held[0].getsockname()[1]
        config.web_port, config.files_port = free_ports(2)
        problem = config_module.ports_taken(config)
    finally:
        for sock in held:
            sock.close()
    suggested = int(re.search(r"RC_TCP_PORT=(\d+)", problem).group(1))
    assert suggested > config.tcp_port and suggested != config.tcp_port + 10


def test_a_task_type_misspelt_names_the_one_meant():
    with pytest.raises(tasks.TaskError) as refused:
        tasks.check_type("shel")
    assert "did you mean shell?" in str(refused.value)
    with pytest.raises(tasks.TaskError) as refused:
        tasks.check_type("bash")
    assert "did you mean" not in str(refused.value) and "known: echo" in str(refused.value)


def test_every_option_of_every_rc_command_says_what_it_is():
    # `rc map --help` said of --timeout only "each task's"; `rc tasks
    # --help` nothing of --state, --device or --limit.
    import argparse

    def silent(name, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from silent(name + " " + sub_name, sub)
            elif action.option_strings and (not action.help or len(action.help) < 10):
                yield "%s %s" % (name, "/".join(action.option_strings))
    found = []
    for name, parser in commands.command_parsers(commands.build_parser(io.StringIO())).items():
        found.extend(silent(name, parser))
    assert found == []


def test_a_schedule_or_service_given_files_says_they_take_none(cluster_home):
    # docs/schedules.md: not --input, --stdin, --file or --output yet; rc
    # said only "unrecognized arguments: --input photos".
    for argv in (["schedule", "add", "x", "@daily", "shell", "ls", "--input", "photos"],
                 ["service", "add", "x", "python_exec", "--file=job.py"]):
        out, err = io.StringIO(), io.StringIO()
        assert commands.run_command(argv, out, err) == 2
        assert "takes no --" in err.getvalue() and "docs/schedules.md" in err.getvalue()


def test_rc_token_admin_rotate_makes_a_new_admin_token(cluster_home):
    # docs/http.md: "rotating the admin token (`rc token --admin --rotate`)
    # ends every session"; rc refused it: "the admin token stays".
    config, _ = cluster_home
    with open(config.admin_token_path, encoding="utf-8") as f:
        before = f.read().strip()
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["token", "--admin", "--rotate"], out, err) == 0, err.getvalue()
    with open(config.admin_token_path, encoding="utf-8") as f:
        after = f.read().strip()
    assert after != before and out.getvalue().splitlines()[0] == after
    assert os.stat(config.admin_token_path).st_mode & 0o777 == 0o600
    with open(os.path.join(config.log_dir, "audit.log"), encoding="utf-8") as f:
        assert '"admin_token_rotated"' in f.read()
    assert "`rc token --admin --rotate`" in read("docs/http.md")


def test_make_run_refuses_a_listen_address_this_machine_has_not(cluster_home):
    # rc-server exited with cannot_listen, and make run waited 30 s for it:
    # "no sign of rc-server on 192.0.2.99:8080 after 30 s".
    config, _ = cluster_home
    config.web_host = "127.0.0.1"
    config.tcp_port, config.web_port, config.files_port = free_ports(3)
    config.tcp_host = "203.0.113.77"        # TEST-NET-3: no machine's own
    problem = config_module.ports_taken(config)
    assert "tcp_host is '203.0.113.77', not an address of this machine" in problem
    config.tcp_host = "127.0.0.1"
    assert config_module.ports_taken(config) is None


def test_make_run_refuses_a_listen_name_that_resolves_to_nothing(cluster_home, monkeypatch):
    # A misspelt name ("nas.lan" for "nas.local") was not refused: rc-server
    # exited with cannot_listen and make run waited 30 s for it. The
    # resolver's answer is stood in for: a test sends no query to a name server.
    config, _ = cluster_home
    config.tcp_host, config.web_host = "nas.lan", "127.0.0.1"
    config.tcp_port, config.web_port, config.files_port = free_ports(3)
    resolve = socket.getaddrinfo

    def no_such_name(host, *args, **kwargs):
        if host == "nas.lan":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    problem = config_module.ports_taken(config)
    assert "tcp_host is 'nas.lan', not an address of this machine" in problem


def test_a_command_misspelt_names_the_one_meant(cluster_home):
    # argparse said "invalid choice: 'stauts' (choose from 'help', 'init',
    # ...)", all 39 of them, and not the one meant.
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["stauts"], out, err) == 2
    assert "did you mean status?" in err.getvalue() and "choose from" not in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["stats", "--json"], out, err) == 0, err.getvalue()  # an alias
