"""bin/worker.py's device secret, its TLS pin and its control messages,
against the fake main node of test_worker.py (rc.protocol and rc.tls make
the proofs, the seal and the certificate, so the worker is checked against
the main node's own definitions).

The handshakes run on the oldest and the newest CPython found under
~/.pyenv as well as the current one."""
import json
import os
import ssl
import stat
import sys
import types

import pytest

from rc import tls
from rc.protocol import seal, server_proof, worker_proof

from test_worker import (DEVICE_ID, INTERPRETERS, TOKEN, WAIT, FakeMain, Link, main, short_name,  # noqa: F401 (fixtures)
                         spawn, wait_until)

SECRET = "5e" * 32
CLUSTER = "cluster-A_1"
EDGES = [sys.executable] + [p for p in (INTERPRETERS[:1] + INTERPRETERS[-1:])
                            if "/3.6." in p or "/3.13." in p]
edges = pytest.mark.parametrize("python", sorted(set(EDGES)), ids=short_name)
# TLS runs on _ssl directly, whose methods changed between versions: every one.
every_python = pytest.mark.parametrize("python", sorted(set([sys.executable] + INTERPRETERS)),
                                       ids=short_name)


class TlsMain(FakeMain):
    """The fake main node behind TLS with a certificate made like rc's."""

    def __init__(self, home):
        super().__init__()
        config = types.SimpleNamespace(home=str(home))
        tls.ensure_certificate(config)
        self.fingerprint = tls.fingerprint(config)
        self.context = tls.server_context(config)

    def accept(self, timeout=WAIT, handshake=True):
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        sock.settimeout(timeout)
        if handshake:
            sock = self.context.wrap_socket(sock, server_side=True)
        link = Link(sock)
        self.links.append(link)
        return link


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def start(spawn, python, state, *arguments):
    return spawn(python, "--state-dir", str(state), *arguments)


def hello(link, cluster_id=CLUSTER):
    nonce = os.urandom(16).hex()
    link.send("hello", {"nonce": nonce, "protocol": 1, "cluster_id": cluster_id})
    return nonce, link.expect("register")


def register(link, key=TOKEN, give_secret=None, cluster_id=CLUSTER):
    """A main node's side of the handshake; the register the worker sent."""
    nonce, register = hello(link, cluster_id)
    assert register["proof"] == worker_proof(key, nonce, register["nonce"], DEVICE_ID)
    ack = {"proof": server_proof(key, nonce, register["nonce"], DEVICE_ID),
           "heartbeat_interval": 60}
    if give_secret:
        ack["device_secret"] = seal(TOKEN, nonce, register["nonce"], DEVICE_ID, give_secret)
    link.send("register_ack", ack)
    link.register = register
    return register


def secret_file(state):
    return state / CLUSTER / (DEVICE_ID + ".secret")


# -- the device secret -------------------------------------------------------------

@edges
def test_the_secret_from_a_token_join_is_kept_and_proved_from_then_on(main, spawn, python,
                                                                      state):
    worker = start(spawn, python, state)
    link = main.accept()
    assert register(link, give_secret=SECRET)["auth"] == "token"
    assert link.recv()["message_type"] == "heartbeat"       # it believed our proof
    assert wait_until(lambda: secret_file(state).exists())
    assert secret_file(state).read_text().strip() == SECRET
    assert stat.S_IMODE(os.stat(str(secret_file(state))).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(state)).st_mode) == 0o700
    link.close()
    again = main.accept()
    assert register(again, key=SECRET)["auth"] == "device"
    assert again.recv()["message_type"] == "heartbeat"
    assert worker.events("device_secret_stored")
    assert not os.listdir(str(secret_file(state).parent)) == []   # no temporary left over
    assert sorted(os.listdir(str(secret_file(state).parent))) == [DEVICE_ID + ".secret"]


def test_a_main_node_proving_only_the_token_is_not_believed_once_we_hold_a_secret(
        main, spawn, state):
    secret_file(state).parent.mkdir(parents=True)
    secret_file(state).write_text(SECRET + "\n")
    worker = start(spawn, sys.executable, state)
    link = main.accept()
    nonce, register_data = hello(link)
    assert register_data["auth"] == "device"
    link.send("register_ack", {"proof": server_proof(TOKEN, nonce, register_data["nonce"],
                                                     DEVICE_ID)})
    assert link.next() is None                # it hangs up
    assert "this device's secret" in worker.events("server_proof_wrong")[0]["message"]


def test_another_cluster_gets_the_token_and_a_secret_of_its_own(main, spawn, state):
    secret_file(state).parent.mkdir(parents=True)
    secret_file(state).write_text(SECRET + "\n")
    start(spawn, sys.executable, state)
    link = main.accept()
    assert register(link, cluster_id="other", give_secret="77" * 32)["auth"] == "token"
    link.recv()
    assert (state / "other" / (DEVICE_ID + ".secret")).read_text().strip() == "77" * 32
    assert secret_file(state).read_text().strip() == SECRET


def test_unknown_device_drops_the_secret_and_joins_with_the_token(main, spawn, state):
    secret_file(state).parent.mkdir(parents=True)
    secret_file(state).write_text(SECRET + "\n")
    worker = start(spawn, sys.executable, state)
    link = main.accept()
    assert hello(link)[1]["auth"] == "device"
    link.send("error", {"code": "unknown_device", "message": "no secret for it"})
    link.close()
    again = main.accept()
    assert register(again, give_secret="88" * 32)["auth"] == "token"
    again.recv()
    assert wait_until(lambda: secret_file(state).read_text().strip() == "88" * 32)
    assert worker.events("device_secret_unknown")


@pytest.mark.parametrize("code", ["revoked", "forgotten", "device_id_taken"])
def test_a_refusal_for_good_ends_the_worker_with_what_to_do(main, spawn, state, code):
    worker = start(spawn, sys.executable, state)
    link = main.accept()
    hello(link)
    link.send("error", {"code": code, "message": "no"})
    assert worker.proc.wait(WAIT) == 3
    line = worker.events(code)[0]
    assert line["level"] == "error" and "--device-id" in line["message"]


def test_wrong_proof_is_retried_with_backoff_not_in_a_tight_loop(main, spawn, state):
    worker = start(spawn, sys.executable, state)
    for _ in range(3):
        link = main.accept()
        hello(link)
        link.send("error", {"code": "auth_failed", "message": "wrong join token"})
        link.close()
    retries = [e["retry_in"] for e in worker.events("disconnected")]
    assert retries[-1] > retries[0] and worker.proc.poll() is None
    assert "check --token" in worker.events("auth_failed")[0]["message"]


# -- TLS with the certificate pinned -------------------------------------------------

@every_python
def test_tls_with_the_pinned_certificate(tmp_path, spawn, python, state):
    main = TlsMain(tmp_path)
    try:
        pin = ":".join(main.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
        worker = spawn_against(spawn, main, python, state, "--fingerprint", pin)
        link = main.accept()
        register(link, give_secret=SECRET)
        link.assign(1, "echo", {"message": "over tls"})
        assert link.results(1)[1]["result"]["output"] == "over tls"
        assert worker.events("connected")[0]["tls"] is True
    finally:
        main.close()


def spawn_against(spawn, main, python, state, *arguments):
    """A worker joining `main` rather than the `main` fixture's fake."""
    worker = start(spawn, python, state, "--join", "127.0.0.1:%d" % main.port, *arguments)
    return worker


def test_tls_from_a_worker_given_the_fingerprint_file(tmp_path, spawn, state):
    main = TlsMain(tmp_path)
    try:
        pin_file = tmp_path / "pin"
        pin_file.write_text("sha256 Fingerprint=%s\n" % main.fingerprint.upper())
        spawn_against(spawn, main, sys.executable, state, "--fingerprint-file", str(pin_file))
        register(main.accept())
    finally:
        main.close()


def test_a_wrong_pin_sends_nothing_and_ends_the_worker(tmp_path, spawn, state):
    main = TlsMain(tmp_path)
    try:
        worker = spawn_against(spawn, main, sys.executable, state, "--fingerprint", "ab" * 32)
        link = main.accept()
        try:
            link.send("hello", {"nonce": "00" * 16, "protocol": 1, "cluster_id": CLUSTER})
        except (ssl.SSLError, OSError):
            pass      # it checked the certificate and hung up first: as it should
        assert link.try_recv(WAIT) is None        # closed: no register, nothing else
        assert worker.proc.wait(WAIT) == 3
        message = worker.events("fingerprint_mismatch")[0]["message"]
        assert main.fingerprint in message and "ab" * 32 in message
    finally:
        main.close()


def test_a_pinned_worker_against_a_plain_main_node_says_so(main, spawn, state):
    worker = start(spawn, sys.executable, state, "--fingerprint", "ab" * 32)
    link = main.accept()
    link.send("hello", {"nonce": "00" * 16, "protocol": 1, "cluster_id": CLUSTER})
    # The worker then looks whether HTTP answers there (the dashboard port):
    # a plain main node sends its hello on that connection too. (Left in the
    # listener's backlog, the look waited out its 3 s.)
    probe = main.accept()
    probe.send("hello", {"nonce": "01" * 16, "protocol": 1, "cluster_id": CLUSTER})
    assert worker.proc.wait(WAIT) == 3
    assert "without --fingerprint" in worker.events("tls_failed")[0]["message"]


def test_a_plain_worker_against_a_tls_main_node_says_so(tmp_path, spawn, state):
    main = TlsMain(tmp_path)
    try:
        worker = spawn_against(spawn, main, sys.executable, state)
        main.accept(handshake=False)               # a TLS server waits for a ClientHello
        # ... and, too busy to take another connection, refuses the worker's
        # looks at what answers there (HTTP? TLS?): no diagnosis, so no_hello.
        # (Left in the listener's backlog, each look waited out its 3 s.)
        main.listener.close()
        assert wait_until(lambda: worker.events("no_hello"), timeout=WAIT)
        assert "--fingerprint" in worker.events("no_hello")[0]["message"]
        assert worker.proc.poll() is None          # it keeps trying, with backoff
    finally:
        main.close()


def test_bad_fingerprints_are_refused_at_start(tmp_path):
    import subprocess
    from test_worker import WORKER
    for arguments in (["--fingerprint", "abc"], ["--fingerprint-file", str(tmp_path / "no")]):
        done = subprocess.run([sys.executable, "-I", WORKER, "--join", "h", "--token", "t"]
                              + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
        assert done.returncode == 2 and "fingerprint" in done.stderr


# The long-lived worker process: what start() leaves out of it. Each of these
# Python modules would weigh on an idle worker for good (issue 7: <= 16 MiB).
HEAVY_MODULES = ("argparse", "ssl", "json", "enum", "re", "socket", "signal", "types", "struct")

RECEIVING_WORKER = """
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import worker
options = worker.received_options(int(sys.argv[2]))
worker.loads(worker.dumps({"device": options.device_id, "join": options.join}))
plain = "_ssl" in sys.modules
connection = worker.tls_socket(worker.TcpSocket())
print(options.token, options.join, plain, "_ssl" in sys.modules,
      ",".join(name for name in %r if name in sys.modules), sep="|")
""" % (HEAVY_MODULES,)


def hand_over(arguments):
    """Options parsed as start() parses them, handed through a pipe to a new
    interpreter as start() hands them: what it printed, and how it ended."""
    import subprocess
    from test_worker import WORKER
    module = load_worker_module()
    reader, writer = os.pipe()
    os.write(writer, module.handed_options(module.parse_args(arguments, read_token=False)))
    os.close(writer)
    try:
        return subprocess.run([sys.executable, "-I", "-S", "-c", RECEIVING_WORKER, WORKER,
                               str(reader)] + arguments, pass_fds=(reader,),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
    finally:
        os.close(reader)


def load_worker_module():
    import importlib.util
    from test_worker import WORKER
    spec = importlib.util.spec_from_file_location("rc_worker_start", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_long_lived_worker_holds_no_heavy_module():
    done = hand_over(["--join", "nas.local", "--token", " t0k "])
    assert done.returncode == 0, done.stderr
    token, join, plain, tls, heavy = done.stdout.split("|")
    assert token == "t0k" and join == "('nas.local', 8080)"   # read there; tuples stay
    assert plain == "False" and tls == "True"                  # _ssl only once TLS is used
    assert heavy.strip() == ""


# What a TLS worker's interpreter runs before it loads the worker's code.
SSL_PROBE = """
import socket, ssl, sys
names = sum(len(getattr(sys.modules["_ssl"], name, None) or ()) for name in %r)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
ours, theirs = socket.socketpair()
theirs.sendall(b"HTTP/1.0 400 Bad Request\\r\\n\\r\\n" * 20)
try:
    context.wrap_socket(ours).do_handshake()
except ssl.SSLError as e:
    print(names, "worker" in sys.modules, e, sep="|")
"""


@every_python
def test_a_tls_worker_loads_ssl_first_without_its_error_names(python, monkeypatch):
    """With --fingerprint, start() has _ssl loaded before the worker's code
    and its tables of error names emptied: the memory they held then holds
    that code (issue 7: an idle TLS worker <= 16 MiB). An SSLError still
    says what went wrong, in OpenSSL's words."""
    module = load_worker_module()
    monkeypatch.setattr(sys, "dont_write_bytecode", False)     # PYTHONDONTWRITEBYTECODE
    interpreter = [python, "-I", "-S"]
    plain = module.bytecode_argv("main()", interpreter)[-1]
    code = module.bytecode_argv("main()", interpreter, tls=True)[-1]
    assert "_ssl" not in plain and code.endswith(plain)
    import subprocess
    done = subprocess.run(interpreter + ["-c", code[:-len(plain)] + SSL_PROBE
                                         % (module.SSL_ERROR_NAME_TABLES,)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert done.returncode == 0, done.stderr
    names, loaded, message = done.stdout.strip().split("|")
    assert names == "0" and loaded == "False"
    assert "wrong version number" in message or "record layer failure" in message, message


# Prints, under the interpreter that runs it, the command bytecode_argv makes
# for the long-lived worker process (the spawner's code left out).
LOOP_COMMAND = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rc_worker_copy", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.bytecode_argv("main()", [sys.executable, "-I", "-S"], whole=False)[-1])
"""
WORKER_PROBE = (" print(hasattr(worker, 'serve_spawner'), hasattr(worker, 'spawn_simple'),"
                " worker.main.__code__.co_firstlineno,"
                " worker.WORKER_FILE == worker.__file__, getattr(worker, 'PROBE', None), sep='|')")


@every_python
def test_the_worker_process_loads_the_file_without_the_spawners_code(python, tmp_path):
    """start() has the long-lived worker process load this file's bytecode
    without what only the spawner runs (~0.3 MiB of an idle TLS worker:
    16.16 -> 15.85 MiB). Every other line keeps its number, and a changed
    file is compiled again."""
    import shutil
    import subprocess
    from test_worker import WORKER
    copy = str(tmp_path / "worker.py")
    shutil.copy(WORKER, copy)

    def probe():
        made = subprocess.run([python, "-I", "-S", "-c", LOOP_COMMAND, copy],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert made.returncode == 0 and "marshal" in made.stdout, made.stderr
        code = made.stdout.strip()
        code = code[:code.index(" sys.argv[0] = ")] + WORKER_PROBE
        done = subprocess.run([python, "-I", "-S", "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split("|")

    line = load_worker_module().main.__code__.co_firstlineno
    assert probe() == ["False", "False", str(line), "True", "None"]
    with open(copy, "a") as f:
        f.write("PROBE = 1\n")
    assert probe() == ["False", "False", str(line), "True", "1"]
    cached = os.listdir(str(tmp_path / "__pycache__"))
    assert any(".opt-nospawner" in name for name in cached)
    assert any(name.endswith(".pyc") and ".opt-" not in name for name in cached)  # the spawner's


def test_without_writing_bytecode_the_copies_made_beforehand_are_used(tmp_path):
    """PYTHONDONTWRITEBYTECODE (our Dockerfile sets it; this machine too):
    the worker writes nothing and ran from source, 38 MiB where it is 16.
    Copies compile_bytecode made beforehand (`make install` does, for the
    local worker) are used while they are up to date."""
    import shutil
    import subprocess
    from test_worker import WORKER
    copy = str(tmp_path / "worker.py")
    shutil.copy(WORKER, copy)
    load = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
            "'rc_worker_copy', %r); module = importlib.util.module_from_spec(spec);"
            " spec.loader.exec_module(module); " % copy)

    def run(code):
        done = subprocess.run([sys.executable, "-B", "-I", "-c", load + code],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()
    argv = "print(module.bytecode_argv('main()', whole=False) is not None)"
    assert run(argv) == "False"
    assert not (tmp_path / "__pycache__").exists()
    run("module.compile_bytecode()")
    assert len(os.listdir(str(tmp_path / "__pycache__"))) == 2
    assert run(argv) == "True"
    with open(copy, "a") as f:
        f.write("# changed\n")
    assert run(argv) == "False"         # stale: from source, as before


def test_nothing_the_worker_process_runs_names_the_spawners_code():
    """What compile_without_spawner leaves out must be out of the worker
    process's reach: from main() and every statement at module level,
    through every function and class they name, no name defined between the
    markers is reached. main() names serve_spawner only for `--spawner`,
    which runs the whole file as a script."""
    import ast
    from test_worker import WORKER
    module = load_worker_module()
    with open(WORKER) as f:
        source = f.read()
    lines = source.split("\n")
    begin = lines.index(module.SPAWNER_CODE_BEGINS) + 1
    end = lines.index(module.SPAWNER_CODE_ENDS) + 1
    tree = ast.parse(source)
    inside = [node for node in tree.body if begin < node.lineno < end]
    outside = [node for node in tree.body if not begin < node.lineno < end]
    assert len(inside) > 20

    def names_in(node):
        found = set()
        for child in ast.walk(node):
            if isinstance(child, ast.Name):
                found.add(child.id)
            elif isinstance(child, ast.Attribute):
                found.add(child.attr)
        return found

    def defined(nodes):
        return {node.name: node for node in nodes
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))}

    spawners = set(defined(inside)) | {target.id for node in inside
                                       if isinstance(node, ast.Assign)
                                       for target in node.targets if isinstance(target, ast.Name)}
    definitions = defined(outside)
    main = definitions["main"]
    branch = [node for node in ast.walk(main) if isinstance(node, ast.If)
              and "serve_spawner" in names_in(node)]
    assert len(branch) == 1 and "--spawner" in ast.dump(branch[0].test)
    main.body = [node for node in main.body if node is not branch[0]]
    reached, todo = set(), set().union(*(names_in(node) for node in outside
                                        if node.__class__ not in (ast.FunctionDef, ast.ClassDef)))
    todo.add("main")
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            if name in definitions:
                todo |= names_in(definitions[name])
    assert reached & spawners == set()


def test_a_missing_token_is_a_usage_error_after_the_hand_over(tmp_path):
    done = hand_over(["--join", "nas.local", "--token-file", str(tmp_path / "none")])
    assert done.returncode == 2 and "cannot read --token-file" in done.stderr


def test_json_as_the_json_module_writes_and_reads_it():
    """dumps and loads run on _json: they must agree with json itself, but
    that loads refuses the numbers no double holds (test_hostile_s39b)."""
    import json
    module = load_worker_module()
    refused = [10 ** 30, {"nan": float("nan")}, [float("inf")]]
    values = [{"a": [1, -0.0, 1e300, None, True, "\u00e9\u2603 \"\\\n"], "b": {}},
              "text", 10 ** 19, [], "lone \ud800"] + refused
    for value in values:
        try:
            expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            expected = expected.encode("utf-8")
        except UnicodeEncodeError:
            expected = json.dumps(value, separators=(",", ":")).encode("ascii")
        assert module.dumps(value) == expected
        if value in refused:
            with pytest.raises(ValueError):
                module.loads(expected)
            continue
        assert json.dumps(module.loads(expected)) == json.dumps(json.loads(expected))
    assert module.loads(b' {"a": 1}\r\n') == {"a": 1}
    for bad in (b"", b" ", b"{", b"{} x", b"[1,]", b"\xff", b'{"a":1}{"b":2}', b"nul"):
        with pytest.raises(ValueError):
            module.loads(bad)
    with pytest.raises(TypeError, match="not JSON serializable"):
        module.dumps({"a": [object()]})
    assert module.dumps({"a": object()}, default=lambda o: "seen") == b'{"a":"seen"}'


# -- control messages -------------------------------------------------------------

def controls(link, *commands):
    """Send each control; the control_ack of each, by id."""
    for number, command in enumerate(commands, 1):
        link.send("control", {"control_id": number, "command": command})
    acks = {}
    while len(acks) < len(commands):
        envelope = link.next()
        assert envelope is not None, "closed while waiting for control_ack"
        if envelope["message_type"] == "control_ack":
            acks[envelope["data"]["control_id"]] = envelope["data"]
    return [acks[n] for n in range(1, len(commands) + 1)]


def next_heartbeat(link):
    """The next heartbeat's data (acknowledged; a lease_check is answered)."""
    while True:
        envelope = link.recv()
        assert envelope is not None, "closed while waiting for a heartbeat"
        if link.answered(envelope) and envelope["message_type"] == "heartbeat":
            return envelope["data"]


def test_controls_without_config_or_upgrade_permission(main, spawn, state):
    start(spawn, sys.executable, state)
    link = main.accept()
    register(link)
    unknown, upgrade, reload = controls(link, "bogus", "upgrade", "reload")
    assert unknown["ok"] is False and "unknown command" in unknown["detail"]
    assert upgrade == {"control_id": 2, "ok": False, "detail": "upgrade not allowed on this"
                       " device (start with --allow-upgrade)"}
    assert reload["ok"] is True and "nothing to reload" in reload["detail"]


def test_reload_applies_the_config_file_and_registers_again(main, spawn, state, tmp_path):
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"tag": ["a"]}))
    start(spawn, sys.executable, state, "--config", str(config))
    link = main.accept()
    assert register(link)["tags"] == ["a"]
    assert controls(link, "reload")[0]["detail"] == "nothing changed"
    config.write_text(json.dumps({"tag": ["b"], "deny": "shell", "min_battery": 5,
                                  "web_port": 5001}))
    link.send("control", {"control_id": 9, "command": "reload"})
    ack = link.expect("control_ack")
    assert ack["ok"] is True
    assert ack["detail"] == ("changed: task_types, tags, min_battery, resume_battery;"
                             " registering again with the new profile; needs a restart:"
                             " web_port")
    again = main.accept()
    fresh = register(again)
    assert fresh["tags"] == ["b"] and "shell" not in fresh["task_types"]
    config.write_text("{not json")
    again.send("control", {"control_id": 10, "command": "reload"})
    ack = again.expect("control_ack")
    assert ack["ok"] is False and "cannot reload" in ack["detail"]


def test_report_profile_registers_again_and_keeps_running_tasks(main, spawn, state):
    start(spawn, sys.executable, state)
    link = main.accept()
    register(link)
    link.assign(1, "sleep", {"seconds": 1.5})
    assert link.expect("task_accept")["task_id"] == 1
    assert controls(link, "report_profile")[0]["ok"] is True
    again = main.accept()
    assert register(again)["active_tasks"] == [{"task_id": 1, "attempt": 1}]
    assert again.results(1)[1]["status"] == "completed"


def test_drain_hands_new_tasks_back_and_lets_running_ones_finish(main, spawn, state):
    start(spawn, sys.executable, state, "--on-unavailable", "hand-back")
    link = main.accept()
    register(link)
    link.assign(1, "sleep", {"seconds": 1.0})
    assert link.expect("task_accept")["task_id"] == 1
    ack = controls(link, "drain")[0]
    assert ack["ok"] is True and "1 running will finish" in ack["detail"]
    heartbeat = next_heartbeat(link)
    assert heartbeat["availability"]["available"] is False
    assert heartbeat["status"] == "busy"
    link.assign(2, "sleep", {"seconds": 0.1})
    results = link.results(2)
    assert results[2]["status"] == "handed_back" and "drained" in results[2]["error"]
    assert results[1]["status"] == "completed"
