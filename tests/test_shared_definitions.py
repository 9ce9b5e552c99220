"""bin/worker.py keeps its own copy of the wire-level names (it must stay one
file); this checks the copy against lib/rc/states.py."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from rc import log, states  # noqa: E402

WIRE_NAMES = (
    "PROTOCOL_VERSION", "MAX_FRAME_BYTES",
    "HELLO", "REGISTER", "REGISTER_ACK", "HEARTBEAT", "HEARTBEAT_ACK", "TASK_ASSIGN",
    "TASK_ACCEPT", "TASK_PROGRESS", "TASK_RESULT", "TASK_RESULT_ACK", "TASK_CANCEL", "ERROR",
    "CONTROL", "CONTROL_ACK", "PING", "PONG", "LEASE_CHECK", "LEASE_CHECK_ACK",
    "MESSAGE_TYPES", "TASK_TYPES", "INSTANT_TASK_TYPES", "PAYLOAD_FIELD",
    "OUTCOME_COMPLETED", "OUTCOME_FAILED", "OUTCOME_TIMED_OUT", "OUTCOME_CANCELLED",
    "OUTCOME_NOT_ALLOWED", "OUTCOME_HANDED_BACK", "OUTCOMES",
    "INLINE_FILE_BYTES", "INLINE_TOTAL_BYTES", "INLINE_MAX_FILES", "FILES_MAX_OUTPUTS",
    "TAIL_BYTES")


@pytest.fixture(scope="module")
def worker():
    spec = importlib.util.spec_from_file_location(
        "rc_worker_copy", os.path.join(ROOT, "bin", "worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", WIRE_NAMES)
def test_worker_agrees_with_states(worker, name):
    assert getattr(worker, name) == getattr(states, name)


def test_worker_escapes_in_its_log_what_the_main_nodes_logs_do(worker):
    assert worker.TERMINAL_UNSAFE == log.TERMINAL_UNSAFE
    assert worker.LOG_ESCAPES == log.JSON_ESCAPES


def test_every_message_type_is_copied(worker):
    for value in states.MESSAGE_TYPES:
        name = [n for n in dir(states) if getattr(states, n) is value and n.isupper()][0]
        assert getattr(worker, name) == value


def test_worker_runs_every_task_type(worker):
    assert set(worker.TASK_CLASSES) == set(states.TASK_TYPES)


@pytest.mark.parametrize("token", ["t", "0123456789abcdef-join-token", "k" * 100, "jöin"])
def test_worker_proofs_match_the_main_node(worker, token):
    # The worker computes HMAC on the built-in SHA-256 to stay off OpenSSL.
    from rc import protocol
    arguments = (token, "a" * 32, "b" * 32, "pi-kitchen")
    assert worker.sign(arguments[0], "rc-worker", *arguments[1:]) == protocol.worker_proof(*arguments)
    assert worker.sign(arguments[0], "rc-server", *arguments[1:]) == protocol.server_proof(*arguments)
    assert worker.proofs_match(protocol.server_proof(*arguments),
                               protocol.server_proof(*arguments))
    assert not worker.proofs_match(protocol.server_proof(*arguments), "x" * 64)
    assert not worker.proofs_match(protocol.server_proof(*arguments), None)


def test_worker_agrees_with_the_python_environments_module(worker):
    from rc import environments
    assert worker.VENV_CAPABILITY == environments.VENV_CAPABILITY
    assert worker.PIP_FIELD == environments.PAYLOAD_FIELD


def test_the_clients_copies_agree():
    """lib/rc/client.py is served as one file (/client.py) and imports
    nothing of rc: its copies of the main node's names are checked here."""
    from rc import client, files, states
    assert client.KEPT_STDOUT == files.STREAM_NAMES[0]
    assert client.PAYLOAD_FIELD == states.PAYLOAD_FIELD


@pytest.mark.parametrize("name", ["HOME", "_x", "A1", "RC_TASK_ID", "rc_token", "Rc_x",
                                  "1A", "A-B", "", "X" * 129, "é"])
def test_worker_takes_the_env_names_the_main_node_takes(worker, name):
    """A task's --env (lib/rc/tasks.py check_env) and the worker's own check
    of it, and of --pass-env: the same names, RC_ in any case the worker's."""
    from rc import tasks
    try:
        tasks.check_env({name: "v"})
        main_takes = True
    except tasks.TaskError:
        main_takes = False
    try:
        worker.task_env({"env": {name: "v"}})
        worker_takes = True
    except worker.BadPayload:
        worker_takes = False
    assert worker_takes == main_takes
    if name and len(name) <= 128:
        worker.load_region("options")
        try:
            passes = worker.passed_variable(name) == name
        except Exception:
            passes = False
        assert passes == main_takes
