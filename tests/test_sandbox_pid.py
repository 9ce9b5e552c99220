"""--isolate gives each task a PID namespace with a /proc of its own
(docs/worker.md, The sandbox): a task run as the worker's own user (in a
user namespace) could `kill -9` the worker, its spawner and the user's
other tasks, and list and read /proc of them all. Now it sees and signals
only its own processes; its exit status, timeout and the end of what it
started are as before.

The worker runs as nobody with --isolate (the path of a laptop or of the
main node's local worker run as a normal user), and as root for the /proc
look (a uid per task, a mount namespace: Python tasks forked from the
spawner's template)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hostile_s34 import nobody_dir, nobody_has_user_namespaces  # noqa: E402
from test_sandbox import NOBODY, SETPRIV, marked, new_marker, nobody_python  # noqa: E402
from test_worker import WORKER, FakeMain, WorkerProcess, main, wait_until  # noqa: E402,F401
from test_worker_files import (check_transform, files, run as run_task, start,  # noqa: E402,F401
                               transform_payload)   # main, files, start: fixtures

IS_ROOT = os.geteuid() == 0
UNSHARE = shutil.which("unshare")


def pid_namespaces_work(*as_user):
    """Whether a PID namespace with a /proc of its own can be had here,
    asked of unshare(1): not of the worker, which must say so itself."""
    return bool(UNSHARE) and subprocess.run(
        list(as_user) + [UNSHARE, "--user", "--pid", "--fork", "--mount", "--mount-proc",
                         "true"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL).returncode == 0


RUNNERS = (["nobody"] if nobody_has_user_namespaces() and pid_namespaces_work(
    SETPRIV, "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups") else []) + (
    ["root"] if IS_ROOT and pid_namespaces_work() else [])


@pytest.fixture(scope="module", params=RUNNERS or ["none"])
def isolated(request):
    """(worker, link) of a worker run with --isolate as request.param,
    shared by the module's tests; its pid namespaces must work here."""
    if request.param == "none":
        pytest.skip("needs PID namespaces, and root (or user namespaces for nobody)")
    top = tempfile.mkdtemp(prefix="rc-test-pid-")
    os.chmod(top, 0o755)
    fake = FakeMain()
    if request.param == "nobody":
        home = nobody_dir(top, "home")
        python, state = nobody_python(home), nobody_dir(home, "state", 0o700)
    else:
        home, python, state = top, sys.executable, os.path.join(top, "state")
    venvs = os.path.join(home, "venvs")
    worker = WorkerProcess(python, fake.port, os.path.join(home, "worker.log"),
                           "--state-dir", state, "--isolate", "--venv-dir", venvs)
    link = fake.accept()
    link.handshake()
    link.runner = request.param
    # The spawner starts with the first task.
    assert link.run("shell", {"command": "true"}, task_id=900)["status"] == "completed"
    link.spawner = [e["pid"] for e in worker.events("spawner_started")][0]
    yield worker, link
    worker.stop()
    fake.close()
    shutil.rmtree(top, ignore_errors=True)


def nobody_only(link):
    if link.runner != "nobody":
        pytest.skip("a task of a uid of its own (root's worker) never could signal it")


def test_an_isolated_task_cannot_kill_the_worker_its_spawner_nor_another_task(isolated):
    """Before: the shell task's `kill -9` ended the worker (status -9, its
    connection closed), and the neighbour with it."""
    worker, link = isolated
    nobody_only(link)
    link.assign(1, "shell", {"command": "sleep 1.5; echo survived"})
    link.expect("task_accept")
    pids = "%d %d" % (worker.proc.pid, link.spawner)
    link.assign(2, "shell", {"command": "kill -9 %s; echo $?" % pids})
    link.assign(3, "python_exec", {"code": (
        "import os, signal\n"
        "for pid in (%d, %d):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('killed', pid)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n" % (worker.proc.pid, link.spawner))})
    # kill(-1): every process it may signal; the task itself among them.
    link.assign(4, "shell", {"command": "kill -9 -1; echo alive"})
    # One too large for the spawner starts through subprocess: no way around.
    link.assign(6, "shell", {"command": "#%s\nkill -9 %s; echo $?" % ("x" * 300000, pids)})
    results = link.results(5)
    assert results[2]["result"]["output"] == results[6]["result"]["output"] == "1\n", \
        (results[2], results[6])       # no such process
    assert results[3]["result"]["output"].split() == ["refused", "3", "refused", "3"], results[3]
    assert results[4]["result"]["output"] == "alive\n", results[4]    # kill(-1) spares the caller
    assert results[1]["status"] == "completed", results[1]
    assert results[1]["result"]["output"] == "survived\n"
    assert worker.proc.poll() is None
    assert not worker.events("spawner_lost")
    assert link.run("echo", {"message": "still here"}, task_id=5)["status"] == "completed"


def test_proc_shows_only_the_tasks_own_processes(isolated):
    """Before: /proc listed every process of the machine, the worker's
    command line among them."""
    worker, link = isolated
    shell = link.run("shell", {"command": (
        "sleep 30 & ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' ';"
        " cat /proc/%d/cmdline >/dev/null 2>&1 && echo READ; kill $!" % worker.proc.pid)},
        task_id=11)
    assert shell["status"] == "completed", shell
    seen = [int(pid) for pid in shell["result"]["output"].split()]
    # The init, the shell, its sleep, ls, grep, sort, tr: nothing of the worker.
    assert seen[:2] == [1, 2] and max(seen) < 20, seen
    python = link.run("python_eval", {"expression": (
        "(__import__('os').getpid(), sorted(int(p) for p in __import__('os').listdir('/proc')"
        " if p.isdigit()))")}, task_id=12)
    assert python["status"] == "completed", python
    assert python["result"]["output"].strip() == "(2, [1, 2])", python["result"]
    # Its init is a copy of the spawner, which held other tasks' payloads.
    probe = link.run("python_exec", {"code": (
        "for name in ('environ', 'mem'):\n"
        "    try:\n"
        "        open('/proc/1/' + name, 'rb').read(1)\n"
        "        print('read', name)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n")}, task_id=13)
    assert probe["result"]["output"].split() == ["refused", "13"] * 2, probe["result"]


def test_exit_status_signal_timeout_env_and_limits_are_as_before(isolated):
    worker, link = isolated
    nobody_only(link)
    link.assign(21, "shell", {"command": "echo out; echo err >&2; exit 7"})
    link.assign(22, "shell", {"command": "kill -SEGV $$"})
    link.assign(23, "python_exec", {"code": "import os, signal\n"
                                    "os.kill(os.getpid(), signal.SIGTERM)\n"})
    link.assign(24, "shell", {"command": "sleep 30"}, timeout=1.0)
    link.assign(25, "python_exec", {"code": (
        "import ctypes, os, resource\n"
        "print(os.environ['GREETING'], resource.getrlimit(resource.RLIMIT_NPROC)[0],\n"
        "      ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"),      # PR_GET_DUMPABLE
        "env": {"GREETING": "hello"}})
    results = link.results(5)
    first = results[21]["result"]
    assert (results[21]["status"], first["exit_code"], first["output"], first["stderr"]) == (
        "failed", 7, "out\n", "err\n"), results[21]
    assert results[21]["error"] == "exit status 7"
    assert results[22]["result"]["exit_code"] == -11, results[22]
    assert results[22]["error"].startswith("killed by signal 11"), results[22]
    assert results[23]["result"]["exit_code"] == -15, results[23]
    assert results[24]["status"] == "timed_out", results[24]
    greeting, nproc, dumpable = results[25]["result"]["output"].split()
    assert greeting == "hello" and 256 <= int(nproc) < 100000, results[25]
    assert dumpable == "1", "not as before: its own memory is no more its own to read"



def test_a_detached_process_is_gone_at_its_tasks_end(isolated):
    worker, link = isolated
    nobody_only(link)
    done, timed = new_marker(), new_marker()
    result = link.run("shell", {"command": "setsid -f sleep %s; nohup sleep %s >/dev/null 2>&1 &"
                                " echo ok" % (done, done)}, task_id=31)
    assert result["status"] == "completed", result
    assert wait_until(lambda: not marked(done), timeout=3), marked(done)
    link.assign(32, "shell", {"command": "setsid -f sleep %s; sleep %s" % (timed, timed)},
                timeout=1.0)
    assert link.results(1)[32]["status"] == "timed_out"
    assert wait_until(lambda: not marked(timed), timeout=3), marked(timed)


def test_the_sandbox_line_and_the_self_test_say_so(isolated):
    worker, link = isolated
    isolation = worker.events("task_sandbox")[0]["isolation"]
    assert "a PID namespace of its own" in isolation, isolation


def test_where_no_proc_can_be_mounted_tasks_run_as_before_and_the_self_test_says_so():
    """A container's masked /proc (a file bound over one of its entries, as
    Docker binds /dev/null over /proc/kcore): a user namespace may mount no
    /proc of its own then. The worker says so and runs its tasks without."""
    if "nobody" not in RUNNERS:
        pytest.skip("needs user and PID namespaces for nobody")
    top = tempfile.mkdtemp(prefix="rc-test-pid-masked-")
    try:
        os.chmod(top, 0o755)
        home = nobody_dir(top, "home")
        masked = subprocess.run(
            [UNSHARE, "--mount", "sh", "-c", 'mount --bind /dev/null /proc/%s && exec "$0" "$@"'
             % sorted(n for n in os.listdir("/proc") if os.path.isfile("/proc/" + n))[0],
             nobody_python(home), "-I", WORKER, "--self-test", "--isolate",
             "--state-dir", nobody_dir(home, "state", 0o700)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
            timeout=60)
        assert masked.returncode == 0, masked.stdout
        isolation = [line for line in masked.stdout.splitlines()
                     if line.startswith("task isolation:")][0]
        assert "no PID namespace (" in isolation and "can signal the worker's" in isolation, \
            isolation
        assert "FAILED" not in masked.stdout, masked.stdout
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_task_uid_builds_its_python_environment_and_the_worker_takes_it_over(isolated):
    """As root, the task's own uid builds it, and the worker makes it its
    own once the build's driver (the task's process, pid 2 in its
    namespace) has written its ready mark: the worker must know that
    driver, and spare it and its init when it kills what the build left."""
    worker, link = isolated
    if link.runner != "root":
        pytest.skip("a worker of the task's own uid has nothing to take over")
    link.assign(41, "shell", {"command": "python3 -c 'import tabulate; print(tabulate.__version__)'",
                              "pip": ["tabulate==0.9.0"]}, timeout=240)
    result = link.results(1, timeout=240)[41]
    assert result["status"] == "completed", result
    assert result["result"]["output"] == "0.9.0\n"


def test_inputs_stdin_env_and_outputs_of_an_isolated_task_are_as_before(start, files):
    if "root" not in RUNNERS:
        pytest.skip("needs PID namespaces and root")
    worker, link = start("--isolate")
    assert "a PID namespace of its own" in worker.events("task_sandbox")[0]["isolation"]
    check_transform(files, run_task(link, 1, "shell", transform_payload(files)), 1)
