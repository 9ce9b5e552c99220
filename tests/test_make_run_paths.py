"""`make run` in a clone whose RC_HOME is so deep that a Unix socket's path
(supervisord's, which it binds first as supervisor.sock.<pid>, or a
program's bell) would pass 107 bytes: it stops at once,
before starting anything, and says to choose a shorter RC_HOME; where every
socket fits, each one really binds (lib/rc/bell.py run_dir_problem)."""
import os
import socket
import subprocess
import sys

import pytest

from rc import bell

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cluster_harness import free_ports  # noqa: E402

SOCKET_NAMES = bell.socket_names()


def home_of_length(base, run_dir_bytes):
    """An RC_HOME under `base` whose run directory is exactly that long."""
    room = run_dir_bytes - len(os.fsencode(str(base))) - len("/") - len("/run")
    assert room > 0
    parts, left = [], room
    while left > 0:      # directories of at most 50 bytes, joined by "/"
        part = min(50, left)
        if left - part == 1:
            part -= 1       # no 0-byte last part
        parts.append("d" * part)
        left -= part + 1
    home = os.path.join(str(base), *parts)
    assert len(os.fsencode(os.path.join(home, "run"))) == run_dir_bytes, (home, run_dir_bytes)
    return home


def binds(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()
        if os.path.exists(path):
            os.unlink(path)


def longest_fitting_run_dir():
    return bell.SOCKET_PATH_BYTES - len("/") - max(len(name) for name in SOCKET_NAMES)


def test_every_socket_binds_where_the_run_directory_is_said_to_fit(tmp_path):
    fits = longest_fitting_run_dir()
    run_dir = os.path.join(home_of_length(tmp_path / "a", fits), "run")
    os.makedirs(run_dir)
    assert bell.run_dir_problem(run_dir) is None
    assert all(binds(os.path.join(run_dir, name)) for name in SOCKET_NAMES)
    deeper = os.path.join(home_of_length(tmp_path / "b", fits + 1), "run")
    os.makedirs(deeper)
    problem = bell.run_dir_problem(deeper)
    assert problem is not None and "RC_HOME" in problem and "107" in problem
    assert not all(binds(os.path.join(deeper, name)) for name in SOCKET_NAMES)


def make_run(home):
    tcp_port, web_port, files_port = free_ports(3)
    environ = dict(os.environ, RC_HOME=home, RC_TCP_PORT=str(tcp_port),
                   RC_WEB_PORT=str(web_port), RC_FILES_PORT=str(files_port))
    environ.pop("MAKEFLAGS", None)
    try:
        return subprocess.run(["make", "-s", "run"], cwd=ROOT, env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    finally:
        # Whatever it started (before the check: supervisord and its programs).
        subprocess.run(["make", "-s", "stop"], cwd=ROOT, env=environ,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("deeper_than", ["every socket", "supervisord's first bind"])
def test_make_run_in_a_deep_clone_stops_at_once_saying_what_to_do(tmp_path, deeper_than):
    """"every socket": not even supervisor.sock fits. "supervisord's first
    bind": supervisor.sock and the bells fit, the name supervisord binds
    first (supervisor.sock.<pid>) does not. Before the check, make run ended
    with supervisord's "Cannot open an HTTP server: socket.error reported
    AF_UNIX path too long", naming neither the path nor what to do."""
    fits = longest_fitting_run_dir()
    run_dir_bytes = fits + 20 if deeper_than == "every socket" else fits + 1
    home = home_of_length(tmp_path, run_dir_bytes)
    assert (len(os.fsencode(os.path.join(home, "run", bell.SUPERVISOR_SOCKET)))
            <= bell.SOCKET_PATH_BYTES) == (deeper_than != "every socket")
    done = make_run(home)
    message = done.stderr.decode()
    assert done.returncode != 0
    assert "make run: the socket %s/run/" % home in message, message
    assert "RC_HOME" in message and "107" in message and "shorter directory" in message
    assert not os.path.exists(os.path.join(home, "run", "supervisord.pid"))
