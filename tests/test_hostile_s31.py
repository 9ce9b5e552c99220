"""Round 31 of attacks: a stranger on the LAN, an enrolled device, or a
main node gone wrong (for rc.client) doing what it should not. Each test
failed on the code before its fix."""
import hashlib
import io
import os
import signal
import socket
import threading
import time

import pytest

from rc import client
from test_client_http import Canned, Endless
from test_worker_files import files, run, start  # noqa: F401 (fixtures)
from test_worker import main  # noqa: F401 (a fixture)

try:        # the dashboard's terminal in Chromium: its fixtures (a main node, a worker)
    from test_dashboard_browser import CHROMIUM, browser, node, page  # noqa: F401
    from test_dashboard_browser import screen, type_line, wait_for, wait_prompt, wait_screen
except pytest.skip.Exception:           # no Playwright here
    CHROMIUM = None


class Listener:
    """A main node gone wrong, on 127.0.0.1: each connection is given to
    `answer(connection)` in a thread of its own."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            connection, _ = self.listener.accept()
            threading.Thread(target=self.answer_and_close, args=(connection,),
                             daemon=True).start()

    def answer_and_close(self, connection):
        with connection:
            try:
                self.answer(connection)
            except OSError:
                pass


def test_an_endless_error_answer_to_a_download_is_not_held(monkeypatch, tmp_path):
    """get(ref, path) with a 500 whose body never ends: the client held the
    whole error body in memory however long (no limit: a file's answer is
    unbounded, and an error's text is not written to the file); it now
    stops at MAX_ANSWER_BYTES, and leaves no partial file."""
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 1 << 20)
    server = Endless(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"10000\r\n" + b"e" * 65536 + b"\r\n", most=32 * 1024 * 1024)
    target = tmp_path / "out.bin"
    with client.Cluster("http://127.0.0.1:%d" % server.port, "secret") as cluster:
        with pytest.raises(client.ClusterError, match="MAX_ANSWER_BYTES"):
            cluster.get("a" * 64, str(target))
    time.sleep(0.2)
    assert server.sent < server.most
    assert os.listdir(str(tmp_path)) == []


FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"files\": 1}"


def test_an_answer_cut_by_ctrl_c_is_not_read_as_the_next_one(tmp_path):
    """Ctrl-C in the middle of get(): the kept-alive connection stayed in
    the thread with the rest of that file's bytes on it, and the next
    request read them as its answer (a 'bad answer', or whatever answer
    a task's output file spelled). It is now dropped."""
    body = b"y" * 1000 + b"\r\n" + FORGED
    rest = threading.Event()
    requests = []

    def answer(connection):
        while Canned.read_request(connection) is not None:
            requests.append(1)
            if len(requests) == 1:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                   % len(body) + body[:500])
                rest.wait(30)
                connection.sendall(body[500:])
            else:
                real = b'{"files": [{"name": "real.txt"}]}'
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                   % len(real) + real)

    server = Listener(answer)

    def interrupt(*_):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with client.Cluster(server.url, "secret") as cluster:
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with pytest.raises(KeyboardInterrupt):
                cluster.get((1, "out.txt"), str(tmp_path / "out.txt"))
            rest.set()
            time.sleep(0.5)             # the rest of the file is there to be read
            assert cluster.files(1) == [{"name": "real.txt"}]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        rest.set()
    assert os.listdir(str(tmp_path)) == []


def test_a_file_that_shrinks_while_it_is_put_is_a_clear_error_at_once(tmp_path):
    """put() sends a file of the disk with sendfile, as long as it was when
    asked; one truncated meanwhile (a log rotated) left the request short,
    the client waiting for an answer until rc-web's read timeout closed it
    (20 s, twice on a kept-alive connection), then 'no answer'."""
    source = tmp_path / "growing.log"
    with open(str(source), "wb") as f:
        f.truncate(64 * 1024 * 1024)        # sparse: cheap to make and to hash

    def answer(connection):
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        if data.startswith(b"GET /api/v1/files "):     # the quota, asked first: room enough
            quota = b'{"quota_bytes": %d}' % (1 << 30)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(quota), quota))
            data = data.partition(b"\r\n\r\n")[2]
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
        assert data.startswith(b"POST /api/v1/files "), data[:100]
        time.sleep(1)               # the client's sendfile fills the socket's buffers
        os.truncate(str(source), 1024 * 1024)
        connection.settimeout(10)   # rc-web's web_read_timeout, shorter: then it closes
        try:
            while connection.recv(1 << 20):
                pass
        except socket.timeout:
            pass

    server = Listener(answer)
    with client.Cluster(server.url, "secret") as cluster:
        started = time.monotonic()
        with pytest.raises(client.ClusterError, match="shrank while it was sent"):
            cluster.put(str(source))
        waited = time.monotonic() - started
    assert waited < 8, waited


@pytest.mark.parametrize("page, status", [
    (b"<html><head><title>413 Request Entity Too Large</title></head></html>", 413),
    (b"<html>502 Bad Gateway</html>", 502),
    (b'["not", "an", "object"]', 500),
])
def test_a_proxys_page_answering_a_put_is_a_cluster_error(page, status):
    """rc-web behind a reverse proxy that refuses a large upload with its
    own HTML page: put() raised json.JSONDecodeError (or AttributeError on
    a JSON list) instead of a ClusterError naming the status."""
    server = Canned([(b"HTTP/1.1 %d No\r\nContent-Length: %d\r\n\r\n" % (status, len(page))
                      + page,)])
    with client.Cluster("http://127.0.0.1:%d" % server.port, "secret") as cluster:
        with pytest.raises(client.ClusterError, match=r"POST /api/v1/files: .* \(HTTP %d\)"
                           % status) as caught:
            cluster.put(b"some bytes")
    assert caught.value.status == status


def test_a_download_into_a_directory_is_refused_before_it_is_fetched(tmp_path):
    """get(ref, DIRECTORY) fetched the whole file (gigabytes, perhaps) and
    only then failed to rename it onto the directory; open(path, "wb")
    would have said so at once, and so does get now."""
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"] * 2)
    (tmp_path / "sub").mkdir()
    with client.Cluster("http://127.0.0.1:%d" % server.port, "secret") as cluster:
        for path in (str(tmp_path / "sub"), str(tmp_path / "sub") + "/"):
            with pytest.raises(IsADirectoryError):
                cluster.get(hashlib.sha256(b"hello").hexdigest(), path)
    assert server.requests == []
    assert sorted(os.listdir(str(tmp_path))) == ["sub"] and os.listdir(str(tmp_path / "sub")) == []


def test_a_long_name_in_another_script_downloads_as_open_would_write_it(tmp_path):
    """A name of 84 CJK characters (252 bytes, within the 255 a name may
    have): its hidden .NAME.XXXX.part kept 100 characters of it, over 255
    bytes, and get() failed with 'File name too long'."""
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
    target = str(tmp_path / ("\u65e5" * 84))
    with client.Cluster("http://127.0.0.1:%d" % server.port, "secret") as cluster:
        assert cluster.get(hashlib.sha256(b"hello").hexdigest(), target) == target
    with open(target, "rb") as f:
        assert f.read() == b"hello"
    assert os.listdir(str(tmp_path)) == [os.path.basename(target)]



def test_a_submit_answer_naming_fewer_tasks_than_sent_leaves_no_future_without_an_end():
    """A main node gone wrong answers a batch of submits with fewer task
    ids than it was sent: the futures past the last id were never given
    one, nor an error, and result() waited for them for ever."""
    next_id = [0]

    def answer(connection):
        while True:
            request = Canned.read_request(connection)
            if request is None:
                return
            if request[0].startswith(b"POST /api/v1/tasks"):
                next_id[0] += 1
                body = b'{"group_id": 1, "tasks": [{"task_id": %d}]}' % next_id[0]
                connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n"
                                   % len(body) + body)
            else:               # the result stream: open, with nothing in it
                connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                time.sleep(60)

    server = Listener(answer)
    cluster = client.Cluster(server.url, "secret")
    try:
        futures = [cluster.submit("echo", str(n)) for n in range(200)]
        deadline = time.monotonic() + 30
        assert all(f.submitted.wait(max(0.0, deadline - time.monotonic())) for f in futures)
        refused = [f for f in futures if f.task_id is None]
        assert refused, "every batch was of one task: nothing tried"
        for future in refused:
            with pytest.raises(client.ClusterError, match=r"named 1 task id for a batch of \d+"):
                future.result(10)
    finally:
        cluster.close(wait=False)

# -- the web terminal: what a device printed -------------------------------------------

EVIL_OUTPUT = "ok\x1b]8;;http://127.0.0.1:9/token\x07click\x1b]8;;\x07\x1b[2J\x1b[H\n"


def test_submit_wait_through_the_web_terminals_command_shows_no_escape(cluster_home,
                                                                       add_device):
    """POST /api/v1/command runs `submit ... --wait` for the web terminal
    (an xterm.js, which obeys escape sequences: a link, a cleared screen,
    a prompt of the device's own): the output went raw, as to a pipe, since
    the command's stdout there is no tty."""
    from test_cli import finish_later
    from rc import commands
    config, _ = cluster_home
    add_device("pi")
    worker = finish_later(config, 1, "pi", "completed", EVIL_OUTPUT)
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(["submit", "echo", "x", "--wait"], out, err, config,
                                  actor=("admin", "127.0.0.1"))
    worker.join()
    assert status == 0, err.getvalue()
    assert out.getvalue() == "ok?]8;;http://127.0.0.1:9/token?click?]8;;??[2J?[H\n"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium or no Playwright")
@pytest.mark.timeout(120)
def test_the_web_terminal_shows_a_tasks_escape_sequences_as_text(page, node):
    """`submit ... --wait` in the dashboard's terminal: the task's output
    went to xterm.js raw, so a device could clear the screen and draw on
    it (a prompt of its own asking for the admin token), or put a link
    there (OSC 8). Now each control character shows as "?"."""
    wait_prompt(page)
    type_line(page, "submit python_exec \"print('ok'+chr(27)+'[2J'+chr(27)+'[Hgone')\" --wait")
    wait_screen(page, "admin token")
    type_line(page, node.admin_token)
    wait_for(lambda: "gone" in screen(page), 30, "the task's output")
    wait_prompt(page)
    assert "ok?[2J?[Hgone" in screen(page)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium or no Playwright")
@pytest.mark.timeout(120)
def test_submit_wait_in_the_web_terminal_keeps_a_quoted_command_whole(page, node):
    """The terminal split `submit shell "echo 'one  two' ..." --wait` at
    every space and quoted each piece, so rc got the words '"echo', "'one",
    "two'"...: 'unrecognized arguments'. Without --wait the line went as
    typed and ran; now with it too, less the words --wait takes."""
    wait_prompt(page)
    type_line(page, "login")
    wait_screen(page, "admin token")
    type_line(page, node.admin_token)
    wait_prompt(page)
    type_line(page, """submit shell "echo 'one  two' \\"three\\"" --wait""")
    wait_for(lambda: "one  two three" in screen(page) or "rc:" in screen(page), 30,
             "the task's output or an error")
    wait_prompt(page)
    assert "one  two three" in screen(page) and "rc:" not in screen(page), screen(page)


# -- the worker: what a task may make it write ------------------------------------------

def test_a_tasks_stdout_kept_by_the_worker_stops_at_the_largest_file_it_may_write(start, files):
    """Stdout past the output cap is written in full to a file by the
    worker, whose own writes RLIMIT_FSIZE does not limit: a task could
    fill the device's disk (an SD card) with `yes` until its timeout
    however small --max-file-size. The kept copy now stops there."""
    worker, link = start("--output-cap", "1000", "--max-file-size", "1")
    result = run(link, 1, "shell", {"command": "head -c 5000000 /dev/zero; echo done >&2"})
    assert result["status"] == "completed", result
    assert result["result"]["truncated"] is True and result["result"]["stderr"] == "done\n"
    assert files.stored[(1, 1, ".rc/stdout")] == b"\0" * 1048576


# -- rc logs -f --------------------------------------------------------------------------

def test_logs_follow_of_the_audit_log_outlives_its_rotation(cluster_home, tmp_path):
    """`rc logs -f --program audit`: the audit log rotates by moving the
    full file to audit.log.1, and the next line makes a new one; meanwhile
    there is no audit.log, and the follower stopped at its next look with
    'no log for program audit'. It now waits for the new file."""
    import json
    import subprocess
    import sys
    from rc import audit
    from rc import config as config_module
    settings = str(tmp_path / "rc.json")
    with open(settings, "w") as f:
        json.dump({"audit_log_max_bytes": 2000}, f)
    env = dict(os.environ, RC_CONFIG=settings, PYTHONPATH=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
    config = config_module.load(environ=env)      # cluster_home's RC_HOME, this rc.json
    audit.record(config, "before_following", "cli", "local")
    follower = subprocess.Popen([sys.executable, "-m", "rc.cli", "logs", "-f", "--program",
                                 "audit"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        # Following before the rotation (a loaded machine may take longer
        # than a second to start it): its first lines are out.
        seen = follower.stdout.readline()
        assert b"before_following" in seen, (seen, follower.stderr.read(500))
        for number in range(40):        # past 2000 bytes: rotated, no audit.log for now
            audit.record(config, "filler", "cli", "local", number=number)
            if not os.path.exists(audit.path(config)):
                break
        assert not os.path.exists(audit.path(config))
        time.sleep(2)                   # ten looks of the follower at no audit.log
        audit.record(config, "after_rotation", "cli", "local")
        time.sleep(2)
        assert follower.poll() is None, follower.communicate()
    finally:
        follower.terminate()
    out, err = follower.communicate(timeout=30)
    assert b"after_rotation" in out, (out[-500:], err[-500:])
