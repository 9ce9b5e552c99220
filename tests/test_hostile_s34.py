"""attack34: a task, its outputs and its artifacts as the attacker, against
the worker's sandbox of today (the spawner, the per-device cache, uploads).
Each test failed before the fix its docstring names."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sandbox import NOBODY, NOBODY_CAN_RUN, SETPRIV, nobody_python  # noqa: E402
from test_worker import FakeMain, WorkerProcess  # noqa: E402


def nobody_has_user_namespaces():
    unshare = shutil.which("unshare")
    return bool(NOBODY_CAN_RUN and unshare) and subprocess.run(
        [SETPRIV, "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", unshare,
         "--user", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


isolation = pytest.mark.skipif(not nobody_has_user_namespaces(),
                               reason="needs root (to run the worker as nobody) and user"
                                      " namespaces")


def nobody_dir(parent, name, mode=0o755):
    path = os.path.join(parent, name)
    os.mkdir(path, mode)
    os.chown(path, NOBODY, -1)
    return path


@pytest.fixture(scope="module")
def isolated():
    """A worker run as nobody with --isolate (a user namespace: the main
    node's local worker on a main node run as a normal user), hiding a
    directory that holds a secret and binding another read-only. The
    worker's HOME is hidden too, so the paths live beside it, not in it."""
    top = tempfile.mkdtemp(prefix="rc-test-s34-")
    os.chmod(top, 0o755)
    home, guarded = nobody_dir(top, "home"), nobody_dir(top, "guarded")
    hidden, read_only = nobody_dir(guarded, "hidden", 0o700), nobody_dir(guarded, "read-only")
    with open(os.path.join(hidden, "device_key"), "w") as f:
        f.write("the-worker-secret")
    os.chown(os.path.join(hidden, "device_key"), NOBODY, -1)
    main = FakeMain()
    worker = WorkerProcess(nobody_python(home), main.port, os.path.join(home, "worker.log"),
                           "--state-dir", nobody_dir(home, "state", 0o700), "--isolate",
                           "--hide", hidden, "--read-only", read_only)
    link = main.accept()
    link.handshake()
    yield link, hidden, read_only
    worker.stop()
    main.close()
    shutil.rmtree(top, ignore_errors=True)


# -- --isolate: a Python task kept every capability of its user namespace -------------

UNMASK = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH, MS_REMOUNT, MS_BIND = 2, 32, 4096
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000

def attack(where):
    libc.umount2(HIDDEN.encode(), MNT_DETACH)
    libc.mount(None, READ_ONLY.encode(), None, MS_REMOUNT | MS_BIND, None)
    try:
        print(where, "read", open(os.path.join(HIDDEN, "device_key")).read())
    except OSError as e:
        print(where, "refused", e.errno)
    try:
        open(os.path.join(READ_ONLY, where), "w").close()
        print(where, "wrote")
    except OSError as e:
        print(where, "refused", e.errno)

attack("here")
sys.stdout.flush()
# A namespace of its own gives capabilities again, over mounts locked in it.
if os.fork() == 0:
    code = libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    print("unshare", code)
    attack("nested")
    sys.stdout.flush()
    os._exit(0)
os.wait()
'''


@isolation
def test_an_isolated_python_task_cannot_unhide_nor_write_what_is_read_only(isolated):
    """A Python task runs in the spawner's forked child without an exec, so
    the capabilities unshare(CLONE_NEWUSER) gave it stayed: it unmounted
    the tmpfs over --hide (the main node's RC_HOME: admin token,
    device_key) and remounted --read-only writable (the checkout's
    bin/worker.py, which every device downloads). Now isolate() drops them
    all (capset). Before: "here read the-worker-secret", "here wrote"."""
    link, hidden, read_only = isolated
    code = "HIDDEN, READ_ONLY = %r, %r\n%s" % (hidden, read_only, UNMASK)
    result = link.run("python_exec", {"code": code}, task_id=101)
    assert result["status"] == "completed", result
    output = result["result"]["output"]
    assert "here refused" in output and "nested refused" in output, output
    assert "the-worker-secret" not in output and "wrote" not in output, output
    assert os.listdir(read_only) == []
    # A shell task (an exec) never had them; it still runs.
    result = link.run("shell", {"command": "grep CapEff /proc/self/status"}, task_id=102)
    assert result["result"]["output"].split() == ["CapEff:", "0000000000000000"], result
