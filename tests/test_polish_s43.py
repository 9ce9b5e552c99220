"""Rough edges found in the nineteenth session (a new user's first hour
with files, the Python client and rc map), each with the test that found
it."""
import io
import os
import sys

import pytest

from rc import commands

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_worker import main, spawn, wait_until  # noqa: E402,F401 (fixtures)
from test_worker_identity import hello, start  # noqa: E402


def rc(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


# -- a glob that matched nothing is named as one ------------------------------------------

@pytest.mark.parametrize("argv, what", [
    (["submit", "shell", "ls", "--input", "*.wav"], "input '*.wav'"),
    (["submit", "shell", "cat", "--stdin", "notes-?.txt"], "--stdin 'notes-?.txt'"),
    (["submit", "shell", "--file", "run-[0-9].sh"], "--file 'run-[0-9].sh'"),
    (["map", "ffmpeg -i {} {/.}.mp3", "--files", "*.wav"], "--files '*.wav'"),
])
def test_a_pattern_the_shell_left_unmatched_is_named_as_one(cluster_home, tmp_path,
                                                             monkeypatch, argv, what):
    """`rc map CMD --files *.wav` in a folder with no .wav said `--files
    '*.wav': no such file`, and `--stdin notes-?.txt` that it `is not a
    regular file`: true, but the new user looks for a file named *.wav.
    The shell passes a pattern that matches nothing on as it is; the error
    now says so, and a path that is not there says "no such file" for
    every file option alike."""
    monkeypatch.chdir(tmp_path)
    status, out, err = rc(*argv)
    assert status == 2, err
    assert what + ": no such file or directory (a pattern that matched no file here" in err, err
    status, out, err = rc("submit", "shell", "cat", "--stdin", "missing.txt")
    assert status == 2 and "--stdin 'missing.txt': no such file or directory\n" in err, err


# -- a worker that gives up does not say it is trying again ---------------------------------

def test_a_worker_that_gives_up_does_not_say_it_tries_again(tmp_path):
    """`python3 worker.py --join NAS:5000 ...` (the dashboard's port) said
    `ERROR wrong port: ...`, then `disconnected: wrong_port; trying again
    in 0.343s`, then `worker stopping` and exited 3: the line between
    promised an attempt that never came. A refusal the worker exits on now
    reads `disconnected: wrong_port; not trying again`, and its JSON line
    has no time for a next attempt (retry_in null)."""
    import http.server
    import json
    import subprocess
    import threading
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    worker_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bin", "worker.py")
    try:
        done = subprocess.run(
            [sys.executable, "-I", worker_py, "--join", "127.0.0.1:%d" % server.server_port,
             "--token", "t" * 32, "--state-dir", str(tmp_path / "state"), "--device-id", "pi"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()
             if line.startswith("{")]
    assert done.returncode == 3, done.stdout
    assert [line["event"] for line in lines if line["level"] == "error"] == ["wrong_port"]
    disconnected = [line for line in lines if line["event"] == "disconnected"]
    assert len(disconnected) == 1 and disconnected[0]["retry_in"] is None, disconnected
    sys.path.insert(0, os.path.dirname(worker_py))
    try:
        import worker
    finally:
        sys.path.remove(os.path.dirname(worker_py))
    text = worker.readable_line(disconnected[0])
    assert text.endswith("disconnected: wrong_port; not trying again"), text
    again = dict(disconnected[0], retry_in=0.5, reason="cannot connect: Connection refused")
    assert worker.readable_line(again).endswith("; trying again in 0.5s")


# -- a typo'd option is answered with the option meant -----------------------------------------

@pytest.mark.parametrize("argv, meant", [
    (["submit", "shell", "ls", "--inputs", "photos/"], "--input"),
    (["submit", "shell", "ls", "--ouput", "*.gz"], "--output"),
    (["map", "echo {}", "--keep-ordr", "a"], "--keep-order"),
    (["map", "echo {}", "--resluts", "out", "a"], "--results"),
    (["schedule", "add", "n", "@daily", "echo", "hi", "--alow-overlap"], "--allow-overlap"),
])
def test_a_typo_of_an_option_names_the_option_meant(cluster_home, argv, meant):
    """`rc map 'echo {}' --keep-ordr a` said `unrecognized arguments:
    --keep-ordr` and nothing more; the new user had to find the spelling
    in `rc map --help`. Now the error ends `(did you mean --keep-order?)`
    when an option of that command is that close, and adds nothing for a
    word that is no near miss."""
    status, out, err = rc(*argv)
    assert status == 2 and "unrecognized arguments" in err, err
    assert err.rstrip().endswith("(did you mean %s?)" % meant), err
    status, out, err = rc("submit", "shell", "ls", "--bogus")
    assert status == 2 and err.rstrip().endswith("unrecognized arguments: --bogus"), err


# -- a wrong RC_URL says what to check --------------------------------------------------

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_url_that_never_answered_says_what_to_check(monkeypatch):
    """RC_URL=http://nas:5001 (a typo of the port) gave `cannot reach
    http://nas:5001: [Errno 111] Connection refused` and no word of what
    to do, where an unset RC_URL was told to set it. A URL that never
    answered this client now asks whether the main node runs and whether
    this is the dashboard's address that `rc join` prints."""
    from rc import client
    url = "http://127.0.0.1:%d" % free_port()
    monkeypatch.setenv("RC_URL", url)
    with client.Cluster(token="t") as cluster:
        with pytest.raises(client.Unreachable) as raised:
            cluster.get_result(1)
    message = str(raised.value)
    assert message.startswith("cannot reach %s: " % url), message
    assert "is the main node running" in message and "`rc join`" in message, message
    assert "RC_URL is not set" not in message


# -- a refused join token is not followed by a TLS fault ---------------------------------

def test_a_refused_join_token_hangs_up_as_what_it_is(main, spawn, tmp_path):
    """A worker with a wrong --token printed `ERROR auth failed: wrong join
    token ...` and then `WARNING disconnected: read failed: [SSL]
    unexpected eof while reading (_ssl.c:2309)`: the main node's close
    after its refusal, read as a TLS fault, the last word a new user saw
    before each retry. The worker now hangs up itself on the refusal: the
    line reads `disconnected: auth_failed; trying again in ...`, at once,
    with the connection left open by the main node."""
    worker = start(spawn, sys.executable, tmp_path / "state")
    link = main.accept()
    hello(link)
    link.send("error", {"code": "auth_failed", "message": "wrong join token"})
    assert wait_until(lambda: worker.events("disconnected"), timeout=10), worker.log()
    assert worker.events("disconnected")[0]["reason"] == "auth_failed"
    assert "check --token" in worker.events("auth_failed")[0]["message"]
    main.accept().close()        # and it tries again


# -- a mistyped URL is answered with the one meant -----------------------------------------

@pytest.mark.parametrize("path, meant", [
    ("/api/v1/task/5", "/api/v1/tasks/5"),
    ("/api/tasks", "/api/v1/tasks"),
    ("/api/v1/tasks/5/resut", "/api/v1/tasks/5/result"),
    ("/text/device", "/text/devices"),
    ("/workers.py", "/worker.py"),
    ("/dashboard/api/v1/tasks/7/files", "/api/v1/tasks/7/files"),
])
def test_a_mistyped_url_names_the_one_meant(cluster_home, path, meant):
    """`curl http://nas:5000/api/v1/task/5` answered `{"error": "Not found:
    '/api/v1/task/5'"}`, bottle's words, with nothing of what was meant.
    A path that nearly names an endpoint now adds it, numbers kept (`did
    you mean /api/v1/tasks/5?`), and any other unknown path where the
    endpoints are listed."""
    import http.client
    import json
    from test_web import serve, stop
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    try:
        answers = {}
        for asked in (path, "/nothing/like/it"):
            connection = http.client.HTTPConnection("127.0.0.1", server.effective_port,
                                                    timeout=30)
            connection.request("GET", asked)
            answer = connection.getresponse()
            answers[asked] = answer.status, json.loads(answer.read().decode())["error"]
            connection.close()
    finally:
        stop(server, thread)
    status, error = answers[path]
    assert status == 404 and error.startswith("Not found: "), error
    assert "(did you mean %s? docs/http.md lists the endpoints)" % meant in error, error
    status, error = answers["/nothing/like/it"]
    assert status == 404 and error.endswith("(docs/http.md lists the endpoints)"), error


# -- Ctrl-C leaves an Executor's block at once ----------------------------------------------

def waiting_in(thread, function):
    """Whether `thread` is inside `function` now (its stack names it)."""
    import traceback
    frame = sys._current_frames().get(thread.ident) if thread is not None else None
    return frame is not None and any(
        entry.name == function for entry in traceback.extract_stack(frame))


def test_closing_a_client_wakes_its_receiver_waiting_for_a_streams_head(cluster_home):
    """Ctrl-C in `as_completed` printed `the Executor's block was left by
    KeyboardInterrupt; the cluster goes on with tasks ...` at once, then
    the program sat 5 s more before it ended: rc-web sends a result
    stream's head with its first result or ping, and close() waited its
    join's 5 s for the receiver thread, blocked reading that head (only a
    stream already open was woken). Now close() wakes it there too: the
    thread has ended when close() returns."""
    from test_web import serve, stop
    from rc import client, state_dir
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    try:
        cluster = client.Cluster("http://127.0.0.1:%d" % int(server.effective_port),
                                 state_dir.read_secret(config.admin_token_path))
        future = cluster.submit("shell", "true")       # queued: no device runs it
        assert wait_until(lambda: waiting_in(cluster.receiver, "read_head"), timeout=60)
        cluster.close(wait=False)
        assert not cluster.receiver.is_alive()
        assert not future.done()
    finally:
        stop(server, thread)


# -- the client's mistakes said in the client's words ---------------------------------------

def test_cluster_map_refuses_a_string_for_its_list():
    """`cluster.map("shell", "ls")` ran two tasks, `l` and `s`, one per
    character of the string, both failing on the device. A string (or
    bytes) is refused at once with a TypeError saying how to run it."""
    from rc import client
    with client.Cluster("http://127.0.0.1:1", "t") as cluster:
        with pytest.raises(TypeError) as raised:
            cluster.map("shell", "ls")
        assert not cluster.queue
    assert "not the string 'ls'" in str(raised.value)
    assert "map('shell', ['ls'])" in str(raised.value), raised.value


def test_a_file_that_is_not_there_is_refused_in_rc_webs_words(cluster_home, tmp_path):
    """`cluster.get((2, "nothere.gz"), "x.gz")` raised `GET
    /api/v1/tasks/2/files/nothere.gz: {"error":"task 2 has no file
    'nothere.gz'"} (HTTP 404)`, rc-web's JSON as it came, where every other
    answer's error is its words alone (`get_result(99999)`: `no task
    99999 (HTTP 404)`)."""
    from test_web import serve, stop
    from rc import client, state_dir
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    try:
        with client.Cluster("http://127.0.0.1:%d" % int(server.effective_port),
                            state_dir.read_secret(config.admin_token_path)) as cluster:
            errors = []
            for name, where in (((5, "nothere.gz"), None), ((5, "nothere.gz"), "x.gz"),
                                ("ab" * 32, None)):
                with pytest.raises(client.ClusterError) as raised:
                    cluster.get(name, where and str(tmp_path / where))
                errors.append(str(raised.value))
    finally:
        stop(server, thread)
    assert errors[0] == "GET /api/v1/tasks/5/files/nothere.gz: no task 5 (HTTP 404)", errors
    assert errors[1] == errors[0] and not (tmp_path / "x.gz").exists()
    assert errors[2].endswith(": no file %s in the store (HTTP 404)" % ("ab" * 32)), errors


# -- the worker's options misspelt, on the command line or in --config --------------------

def test_a_worker_option_misspelt_names_the_one_meant(tmp_path):
    """`python3 worker.py --join nas:8080 --min-batery 30` said
    `unrecognized arguments: --min-batery 30`, and a --config file with
    "min_batery" `unknown setting 'min_batery'`: the user typing options on
    a phone's keyboard had to find the spelling in --help. Both now end
    with the option meant, and say nothing more of a word that is no near
    miss."""
    import json
    import subprocess
    worker_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bin", "worker.py")
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"join": "127.0.0.1:1", "min_batery": 30}))

    def refusal(*argv):
        done = subprocess.run([sys.executable, "-I", worker_py, "--token", "t" * 32] + list(argv),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert done.returncode == 2, done
        return done.stderr.strip().splitlines()[-1]
    assert refusal("--join", "127.0.0.1:1", "--min-batery", "30").endswith(
        "unrecognized arguments: --min-batery 30 (did you mean --min-battery?)")
    assert refusal("--config", str(config)).endswith(
        "unknown setting 'min_batery' (did you mean 'min_battery'?)")
    assert refusal("--join", "127.0.0.1:1", "--bogus").endswith(
        "unrecognized arguments: --bogus")


# -- an optional positional is not named as required ---------------------------------------

@pytest.mark.parametrize("argv, required", [
    (["get"], "ID"),
    (["ctl"], "ACTION"),
])
def test_what_is_missing_names_only_what_is_required(cluster_home, argv, required):
    """`rc get` alone said `the following arguments are required: ID,
    NAME`, and `rc ctl` alone `ACTION, PROGRAM`, though `rc get ID` writes
    every file and `rc ctl status` takes no program (argparse counts a
    positional of nargs="*" without a default as required)."""
    status, out, err = rc(*argv)
    assert status == 2, err
    assert err.rstrip().endswith("the following arguments are required: %s" % required), err


# -- the note on inputs that are files here points to a way that keeps their names ---------

def test_the_note_on_file_names_as_inputs_suggests_what_keeps_them_whole(tmp_path,
                                                                           monkeypatch):
    """`ls *.txt | rc map 'wc -l'` in a folder holding `my file.txt` got
    the note that --files sends each input's file, with the example `ls
    *.txt | xargs bin/rc map CMD --files`: which splits `my file.txt` into
    `my` and `file.txt` (and stops at a quote). The example is now the
    shell's own glob, which keeps every name whole."""
    from rc import files_cli
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my file.txt").write_text("one\n")
    note = files_cli.inputs_left_here(["my file.txt"], [])
    assert note is not None and "'my file.txt' is a file here" in note, note
    assert "xargs" not in note and note.endswith("(bin/rc map CMD --files *.txt)"), note


# -- rc map --resume --into, for a map that brings back no files -----------------------------

def test_resume_with_into_of_a_map_without_output_is_refused(cluster_home, tmp_path):
    """`rc map 'echo {}' a --into out/` is refused (`--into says where
    --output files go`), but `rc map --resume 1 --into out/` of a map
    started without --output was taken in silence, and out/ stayed empty
    for a reason not given. Now it is refused, saying the map has no
    --output."""
    import json
    import time
    from rc import db
    config, connection = cluster_home
    groups = {}
    for name, payload in (("plain", {"command": "echo {}"}),
                          ("with_outputs", {"command": "gzip -k {}", "outputs": ["{}.gz"]})):
        with db.write(connection):
            groups[name] = connection.execute(
                "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
                " include_new) VALUES (?, 'shell', ?, '{}', '{}', 0)",
                (time.time(), json.dumps(payload))).lastrowid
            connection.execute("INSERT INTO maps(group_id, inputs, into_dir) VALUES (?, 0, ?)",
                               (groups[name], str(tmp_path)))
    status, out, err = rc("map", "--resume", str(groups["plain"]), "--into", str(tmp_path / "x"))
    assert status == 2 and "map %d was started without --output" % groups["plain"] in err, err
    status, out, err = rc("map", "--resume", str(groups["with_outputs"]),
                          "--into", str(tmp_path / "x"))
    assert "without --output" not in err, err


# -- RC_URL without its scheme --------------------------------------------------------------

def test_an_rc_url_without_http_is_named_as_rc_url(monkeypatch):
    """`export RC_URL=nas:5000` (the address `rc join` prints, without
    http://) failed in a program that names no URL with `url must look like
    http://HOST:PORT, not 'nas:5000'`: which url? Now the error names
    RC_URL and what is missing."""
    from rc import client
    monkeypatch.setenv("RC_URL", "nas:5000")
    with pytest.raises(ValueError) as raised:
        client.Cluster(token="t")
    assert str(raised.value) == ("RC_URL: url must look like http://HOST:PORT, not"
                                 " 'nas:5000' (http:// before it)"), raised.value
    with pytest.raises(ValueError) as raised:
        client.Cluster("nas:5000", token="t")
    assert not str(raised.value).startswith("RC_URL"), raised.value
