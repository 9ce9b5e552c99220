"""Stop 42's attack on what session 17 built: an --isolate task's PID
namespace and its init (bin/worker.py, serve_as_init), run as a hostile
task would run it (the worker as nobody and as root, as in
test_sandbox_pid); and rc.client's new quota question and TLS handshake
message, answered by something other than the rc-web it expects."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sandbox_pid import isolated  # noqa: E402,F401 -- the fixture


TRACEME_THEN_SIGNAL = (
    "import ctypes, os, signal, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "print('traceme', libc.ptrace(0, 0, None, None), flush=True)\n"   # PTRACE_TRACEME
    "signal.signal(signal.SIGUSR1, lambda s, f: print('got', s, flush=True))\n"
    "os.kill(os.getpid(), signal.SIGUSR1)\n"
    "time.sleep(0.2)\n"
    "print('after', flush=True)\n")


def test_a_task_that_asks_to_be_traced_by_its_init_is_not_ended_by_a_signal(isolated):
    """Before: PTRACE_TRACEME made the init its tracer, whose wait took the
    stop of its SIGUSR1 for its end: failed, "exit status 10", the rest of
    it killed with the namespace."""
    worker, link = isolated
    result = link.run("python_exec", {"code": TRACEME_THEN_SIGNAL}, task_id=4201)
    assert result["status"] == "completed", result
    assert result["result"]["output"].split("\n")[1:] == ["got 10", "after", ""], result
    # A traced exec's SIGTRAP is not the task's: it runs the program.
    exec_after = link.run("python_exec", {"code": TRACEME_THEN_SIGNAL.replace(
        "print('after', flush=True)\n", "os.execv('/bin/echo', ['echo', 'after'])\n")},
        task_id=4204)
    assert exec_after["status"] == "completed", exec_after
    assert exec_after["result"]["output"].split("\n")[1:] == ["got 10", "after", ""]


def test_a_flood_of_signals_at_its_init_neither_ends_nor_stalls_it(isolated):
    worker, link = isolated
    result = link.run("shell", {"command": (
        "trap 'n=$((n+1))' TERM INT; n=0; i=0;"
        " while [ $i -lt 300 ]; do kill -TERM 1; kill -INT 1; kill -KILL 1; kill -STOP 1;"
        " kill -HUP 1; kill -USR1 1; kill -SEGV 1; i=$((i+1)); done; echo alive")},
        task_id=4202)
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "alive\n", result
    assert link.run("echo", {"message": "next"}, task_id=4203)["status"] == "completed"


def test_a_task_that_stops_itself_or_leaves_zombies_ends_once_and_leaves_nothing(isolated):
    """Held: a task that SIGSTOPs itself times out (the worker's SIGKILL
    reaches its init, and the namespace ends); orphans that exit by the
    hundred are reaped by the init, and the task's end is its own."""
    worker, link = isolated
    link.assign(4211, "shell", {"command": "sleep 30 & kill -STOP $$"}, timeout=1.0)
    link.assign(4212, "shell", {"command": (
        "i=0; while [ $i -lt 200 ]; do (sh -c 'exit 0' &); i=$((i+1)); done;"
        " (sleep 0.3; kill -TERM 1) & exec 1>&- 2>&-; sleep 5")})
    results = link.results(2)
    assert results[4211]["status"] == "timed_out", results[4211]
    assert results[4212]["result"]["exit_code"] == -15, results[4212]
    link.assign(4213, "echo", {"message": "next"})
    assert list(link.results(1)) == [4213]      # no second end of 4211 nor 4212 before it


# -- the client's quota question, answered by something else than rc-web --------------

def test_a_quota_answer_that_names_no_quota_leaves_the_refusal_to_rc_web():
    """Before: put() of a file over 1 MiB raised KeyError('quota_bytes')
    (or a TypeError) when GET /api/v1/files answered 200 with anything but
    rc-web's JSON: a proxy's page of its own (an app's fallback page), or
    a main node gone wrong. Such an answer says nothing of the quota:
    the file goes, for rc-web to refuse if it must, as before polish41."""
    import hashlib
    import http.server
    import threading
    from rc import client
    answers = [b"<html>the dashboard</html>", b'{"quota_bytes": null}', b"[1]",
               b'{"quota_bytes": "9"}', b'{"quota_bytes": true}']
    stored = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply(200, answers[0])

        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            stored.append(len(data))
            self.reply(201, json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                        "size": len(data)}).encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        data = b"x" * (3 << 20)
        while answers:
            with client.Cluster("http://127.0.0.1:%d" % server.server_address[1],
                                "token") as cluster:
                assert cluster.put(data)["size"] == len(data), answers[0]
            answers.pop(0)
    finally:
        server.shutdown()
        server.server_close()
    assert stored == [len(data)] * 5


# -- what the init is a copy of -------------------------------------------------------

def test_the_init_shows_no_command_line_of_the_worker(isolated):
    """A Python task too large for the spawner (its code over the socket's
    ~208 KiB) starts through subprocess, whose child is a copy of the
    worker: so was its PID namespace's init, and /proc/1/cmdline (which no
    ptrace check guards, unlike environ and mem) showed the task the
    worker's command line, its --token among it, though an isolated task
    reads no other process's command line (docs/security.md). The init
    now blanks its copy of the command line before it forks the task."""
    from test_worker import TOKEN
    worker, link = isolated
    read = "tr '\\0' ' ' </proc/1/cmdline; echo; tr '\\0' ' ' </proc/1/environ 2>/dev/null; echo"
    small = link.run("shell", {"command": read}, task_id=4221)
    large = link.run("python_exec", {"code": "#%s\nimport os\nos.system(%r)" % (
        "x" * 300000, read)}, task_id=4222)
    for result in (large, small):
        assert result["status"] == "completed", result
        cmdline, environ = result["result"]["output"].split("\n")[:2]
        assert TOKEN not in cmdline, cmdline
        assert (cmdline.strip(), environ) == ("", ""), cmdline


def test_a_certificate_refused_never_points_to_plain_http(tmp_path, monkeypatch):
    """user41's message for a failed handshake (58e0136) tells to use the
    http:// url: a certificate refused kept its own error by its class,
    ssl.SSLCertVerificationError, which Python 3.6 (the client's oldest)
    does not have: there a certificate refused (a stranger's in the middle
    too) said to send the token in plain http. The certificate's own
    reason keeps it apart (the class removed stands in for 3.6)."""
    import socket
    import ssl
    import threading
    import types
    from rc import client, tls
    tls.ensure_certificate(types.SimpleNamespace(home=str(tmp_path)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls.paths(types.SimpleNamespace(home=str(tmp_path))))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.delattr(ssl, "SSLCertVerificationError")
    try:
        http = client.Http("https://127.0.0.1:%d" % listener.getsockname()[1], "token", None)
        with pytest.raises(ssl.SSLError) as refused:
            http.open_socket(5)
    finally:
        thread.join(5)
        listener.close()
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert "http://" not in str(refused.value)
