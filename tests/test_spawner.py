"""How the worker starts task processes (see Spawner in bin/worker.py):
Python tasks forked by the spawner, a warm interpreter of their own; shell
tasks started by it with posix_spawn, the shell setting its own limits; and
the plain subprocess path used where there is no spawner (no fork, no
SOCK_SEQPACKET). Each runs against the fake main node of test_worker.py.
"""
import ast
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from test_worker import (WAIT, WORKER, main, process_gone, registered,  # noqa: F401
                         spawn, wait_until)

# Where it runs and under which limits, as the task itself sees it.
PROBE = ("(__import__('os').getpid(), __import__('os').getppid(), __import__('os').getsid(0),"
         " __import__('os').getcwd(),"
         " __import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE),"
         " __import__('sys').flags.isolated, __name__)")


def probe(link, task_id):
    link.assign(task_id, "python_eval", {"expression": PROBE})
    result = link.results(1)[task_id]
    assert result["status"] == "completed", result
    return ast.literal_eval(result["result"]["output"])


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return f.read().split()


def task_children(spawner):
    """The spawner's children that are tasks: each in a session of its own
    (its template, which forks Python tasks, stays in the spawner's)."""
    def session(pid):
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[3]
    found = []
    for pid in children(spawner):
        try:
            if session(pid) != session(spawner):
                found.append(pid)
        except OSError:
            pass
    return found


def spawner_pids(worker):
    return [event["pid"] for event in worker.events("spawner_started")]


def test_python_tasks_are_forked_by_the_spawner(main, spawn):
    worker, link = registered(main, spawn, sys.executable)
    pid, parent, session, cwd, open_files, isolated, name = probe(link, 1)
    spawner = spawner_pids(worker)
    assert len(spawner) == 1
    assert pid not in (worker.proc.pid, spawner[0])
    # As root, forked by the spawner's template as the spawner's own child.
    assert parent == spawner[0]
    assert session == pid, "a session (and process group) of its own"
    assert os.path.basename(cwd).startswith("rc-task-")
    assert open_files == (1024, 1024) and isolated == 1 and name == "__main__"
    assert probe(link, 2)[1] == spawner[0], "one warm spawner serves every task"


def ran_in(link, task_id, expression):
    """The directory a python_eval task ran in, after evaluating `expression`
    there (python_eval writes no file of its own into it)."""
    link.assign(task_id, "python_eval",
                {"expression": "(%s, __import__('os').getcwd())[1]" % expression})
    result = link.results(1)[task_id]
    assert result["status"] == "completed", result
    return ast.literal_eval(result["result"]["output"])


def test_a_task_directory_goes_to_the_next_task_only_as_it_was_made(main, spawn):
    worker, link = registered(main, spawn, sys.executable)
    first = probe(link, 1)[3]
    assert probe(link, 2)[3] == first, "left empty, it is the next task's"
    # A directory left with files goes off the worker's loop (its Remover's
    # thread), so it may still be there as the result comes.
    littered = ran_in(link, 3, "open('left.txt', 'w').write('x')")
    assert littered == first
    assert wait_until(lambda: not os.path.exists(littered)), "files left: removed"
    opened_up = ran_in(link, 4, "__import__('os').chmod('.', 0o755)")
    assert opened_up != first
    assert wait_until(lambda: not os.path.exists(opened_up)), "mode changed: removed"
    kept = probe(link, 5)[3]
    assert os.path.isdir(kept)
    assert worker.stop() == 0
    assert not os.path.exists(kept), "the worker removes its spare directories as it stops"


def test_python_task_failures_read_as_from_an_interpreter(main, spawn):
    _, link = registered(main, spawn, sys.executable)
    link.assign(1, "python_eval", {"expression": "1 +"})
    link.assign(2, "python_exec", {"code": "import sys\nprint(sys.argv[0])\nsys.exit(3)"})
    link.assign(3, "python_exec", {"code": "import atexit, threading, time\n"
                                           "atexit.register(print, 'atexit ran')\n"
                                           "threading.Thread(target=lambda: (time.sleep(0.2),"
                                           " print('thread done'))).start()\n"})
    link.assign(4, "python_exec", {"code": "def f():\n    raise KeyError('k')\nf()\n"})
    results = link.results(4)
    assert results[1]["status"] == "failed" and results[1]["error"].startswith("SyntaxError")
    assert (results[2]["status"], results[2]["error"]) == ("failed", "exit status 3")
    assert results[2]["result"]["output"] == "script.py\n"
    assert results[3]["status"] == "completed"
    assert results[3]["result"]["output"] == "thread done\natexit ran\n"
    assert results[4]["error"] == "KeyError: 'k'"
    assert 'script.py", line 2, in f' in results[4]["result"]["stderr"]


def test_shell_tasks_set_their_own_limits(main, spawn):
    worker, link = registered(main, spawn, sys.executable, "--max-file-size", "3")
    link.assign(1, "shell", {"command": "ulimit -n; ulimit -t; ulimit -H -t; ulimit -c;"
                                        " ulimit -f; ps -o sid=,ppid= -p $$; no-such-command"},
                timeout=10)
    result = link.results(1)[1]
    assert result["result"]["exit_code"] == 127, result
    open_files, cpu, cpu_hard, core, blocks, session, parent = result["result"]["output"].split()
    assert open_files == "1024" and core == "0"
    assert int(cpu) > 10 and int(cpu_hard) == int(cpu) + 1
    assert int(blocks) * 512 == 3 * 1048576
    assert int(session) != os.getsid(worker.proc.pid)
    assert [int(parent)] == spawner_pids(worker), "started by the spawner"
    # The limits come first on the command's own line: its line numbers stay.
    assert " 1: no-such-command: not found" in result["result"]["stderr"]


def limits_of(text):
    """/proc/PID/limits as {"Max open files": [soft, hard]...}."""
    return {line[:26].strip(): line[26:].split()[:2] for line in text.splitlines()[1:]}


def shell_output(link, task_id, command, **options):
    link.assign(task_id, "shell", {"command": command}, timeout=10, **options)
    return link.results(1)[task_id]["result"]


def test_a_simple_command_starts_without_a_shell_under_the_same_limits(main, spawn):
    worker, link = registered(main, spawn, sys.executable, "--max-file-size", "3",
                              "--max-memory", "512")
    stat_fields = shell_output(link, 1, "cat /proc/self/stat")["output"].split()
    pid, comm, parent, session = int(stat_fields[0]), stat_fields[1], int(stat_fields[3]), \
        int(stat_fields[5])
    assert comm == "(cat)" and [parent] == spawner_pids(worker), "no shell between"
    assert session == pid, "a session (and process group) of its own"
    # Born with the soft limits (a task that reads them at once sees them)...
    limits = limits_of(shell_output(link, 2, "cat /proc/self/limits")["output"])
    assert limits["Max open files"][0] == "1024" and limits["Max core file size"][0] == "0"
    assert limits["Max file size"][0] == str(3 * 1048576)
    assert limits["Max address space"][0] == str(512 * 1048576)
    # ... the hard ones and CPU time's (20 s timeout + 1 + a 5 s margin) set as it
    # starts (read here from outside).
    link.assign(6, "shell", {"command": "sleep 60"}, timeout=20)
    assert link.wait_until(lambda: task_children(spawner_pids(worker)[0]))
    sleeper = int(task_children(spawner_pids(worker)[0])[0])

    def read_limits():
        with open("/proc/%d/limits" % sleeper) as f:
            return limits_of(f.read())
    # Seen from here the moment it is a child: the spawner may not have set them yet.
    assert wait_until(lambda: read_limits()["Max cpu time"] == ["26", "27"], WAIT)
    limits = read_limits()
    assert limits["Max open files"] == ["1024", "1024"]
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max file size"] == [str(3 * 1048576)] * 2
    assert limits["Max address space"] == [str(512 * 1048576)] * 2
    link.send("task_cancel", {"task_id": 6, "attempt": 1})
    assert link.results(1)[6]["status"] == "cancelled"
    # Set on each as posix_spawn returns, while its exec may not yet have taken
    # on the task's uid (which once failed a task in two: EPERM).
    for task_id in range(100, 130):
        assert shell_output(link, task_id, "/bin/true")["exit_code"] == 0, task_id
    environment = shell_output(link, 3, "env")["output"].splitlines()
    cwd = [line[4:] for line in environment if line.startswith("PWD=")]
    assert len(cwd) == 1 and os.path.basename(cwd[0]).startswith("rc-task-")
    with open("/etc/os-release") as f:
        expected = f.read().translate(str.maketrans("abcdefghijklm", "nopqrstuvwxyz"))
    into = tempfile.mkdtemp()
    try:
        os.chmod(into, 0o777)            # the task may run as a uid of its own
        out = os.path.join(into, "out.txt")
        for task_id, command in ((4, "tr a-m n-z </etc/os-release > " + out),
                                 (5, "tr a-m n-z < /etc/os-release >>" + out)):
            assert shell_output(link, task_id, command)["exit_code"] == 0
        with open(out) as f:
            assert f.read() == expected * 2
    finally:
        shutil.rmtree(into)


def test_what_a_simple_command_cannot_start_the_shell_runs_and_explains(main, spawn):
    worker, link = registered(main, spawn, sys.executable)
    missing = shell_output(link, 1, "no-such-command --flag")
    assert missing["exit_code"] == 127 and "no-such-command: not found" in missing["stderr"]
    unreadable = shell_output(link, 2, "cat < /no/such/file")
    assert unreadable["exit_code"] == 2 and "cannot open /no/such/file" in unreadable["stderr"]
    # Not simple: quotes, $, a pipe, a builtin, 2>, an assignment; the shell runs each.
    for task_id, command, output in ((3, "echo 'a  b'", "a  b"), (4, "echo $((1 + 2))", "3"),
                                     (5, "printf x | tr x y", "y"), (6, "true", ""),
                                     (7, "ls /no/such 2>/dev/null || echo gone", "gone"),
                                     (8, "X=1 env", None)):
        result = shell_output(link, task_id, command)
        assert result["exit_code"] == 0, (command, result)
        if output is not None:
            assert result["output"].strip() == output, (command, result)
    assert "X=1" in shell_output(link, 9, "X=1 env")["output"].splitlines()


def test_a_killed_spawner_restarts_the_worker(main, spawn):
    """As a crashed worker would, so that the main node takes the task back
    (and a task that kills the spawner ends as a poison pill)."""
    worker, link = registered(main, spawn, sys.executable)
    link.assign(1, "python_exec", {"code": "import time\ntime.sleep(60)\n"})
    assert link.wait_until(lambda: spawner_pids(worker)
                           and task_children(spawner_pids(worker)[0]))
    task_pid = int(task_children(spawner_pids(worker)[0])[0])
    os.kill(spawner_pids(worker)[0], signal.SIGKILL)
    # Frames sent before it may still be on their way; then the connection ends.
    assert any(link.recv() is None for _ in range(10)), "the old worker's connection ends"
    assert wait_until(lambda: process_gone(task_pid), WAIT)
    relink = main.accept()
    relink.handshake()
    assert relink.register["active_tasks"] == [] and worker.proc.poll() is None
    assert "spawner" in worker.events("worker_restarting")[-1]["reason"]
    assert probe(relink, 2)[1] == spawner_pids(worker)[-1] != spawner_pids(worker)[0]


def test_without_a_spawner_tasks_start_through_subprocess(main, spawn, tmp_path):
    # As on macOS: no SOCK_SEQPACKET. The wrapper takes the place of the
    # interpreter in `PYTHON -I -S worker.py ARGS` and runs the worker in it.
    wrapper = tmp_path / "python-without-seqpacket"
    wrapper.write_text(
        "#!/bin/sh\nshift 3\nexec %s -I -S -c 'import runpy, _socket, sys\n"
        "del _socket.SOCK_SEQPACKET\nsys.argv[0] = %s\n"
        "sys.exit(runpy.run_path(sys.argv[0])[\"main\"]())' \"$@\"\n"
        % (sys.executable, json.dumps(WORKER)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    worker, link = registered(main, spawn, str(wrapper))
    pid, parent, session, cwd, open_files, isolated, _ = probe(link, 1)
    assert parent == worker.proc.pid and session == pid
    assert open_files == (1024, 1024) and isolated == 1
    link.assign(2, "shell", {"command": "ulimit -n; ps -o ppid= -p $$"})
    assert link.results(1)[2]["result"]["output"].split() == ["1024", str(worker.proc.pid)]
    assert spawner_pids(worker) == []


def interpreters():
    """This Python, and the oldest and newest under ~/.pyenv (3.6 has no
    PyOS_BeforeFork: its template forks through a child)."""
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")),
                   key=lambda p: [int(n) for n in p.split("/versions/")[1].split(".")[:2]])
    return [sys.executable] + ([found[0], found[-1]] if found else [])


@pytest.mark.parametrize("python", interpreters())
def test_the_template_forks_each_task_as_the_spawners_child(python):
    """Before, a go-between forked each task and exited: a fork and an exit
    more per root worker's Python task (python_eval 514 -> 325 tasks/s)."""
    probe = os.path.join(os.path.dirname(__file__), "data", "template_fork_probe.py")
    report = json.loads(subprocess.run([python, probe, WORKER], stdout=subprocess.PIPE,
                                       check=True, timeout=60).stdout)
    glibc = sys.platform.startswith("linux") and "glibc" in os.confstr("CS_GNU_LIBC_VERSION")
    old = subprocess.run([python, "-c", "import sys; print(sys.version_info < (3, 7))"],
                         stdout=subprocess.PIPE, check=True).stdout.strip() == b"True"
    assert report["forks_as_sibling"] == (glibc and not old)
    for how in ("sibling", "through_child") if report["forks_as_sibling"] else ("through_child",):
        task = report[how]
        assert task["status"] == 7, "the spawner reaps it, as its child: %s" % how
        assert task["seen"][0] == task["pid"], "os.getpid() is its own: %s" % how
    if report["forks_as_sibling"]:
        assert report["sibling"]["seen"][1] == report["sibling"]["me"], \
            "the spawner's child from its start"


def test_a_shell_command_too_long_for_one_argument_runs_from_a_file(main, spawn):
    """The main node takes a command of up to 256 KiB, but Linux takes one
    argument of 128 KiB at most: such a task failed on every device with
    'Argument list too long'. The shell now reads a long one from a file."""
    _, link = registered(main, spawn, sys.executable)
    padding = "x" * 200000
    link.assign(1, "shell", {"command": "x=%s; echo ${#x}; ulimit -c; echo $#" % padding})
    link.assign(2, "shell", {"command": ": %s; exit 3" % padding})
    results = link.results(2)
    assert results[1]["status"] == "completed", results[1]
    assert results[1]["result"]["output"] == "200000\n0\n0\n", "its limits set, no arguments"
    assert (results[2]["status"], results[2]["error"]) == ("failed", "exit status 3")
