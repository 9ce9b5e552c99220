"""A new user's first hour, session 29, commands copied from the README and
docs/: a worker started as a user without a home (`nobody`), `--self-test`
added to the join command, and what they do."""
import socket
import subprocess
import sys

from cluster_harness import WORKER


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
