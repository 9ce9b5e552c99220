"""supervisord sees a program exit at once (lib/rc/supervisord_wake.py), and a
program pausing between steps stops at SIGTERM, not when its pause is over
(rc.program.StopFlag): `make stop` and `supervisorctl stop` no longer wait out
seconds that nothing happens in."""
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from cluster_harness import REPO, Cluster, alive, wait_for

pytestmark = pytest.mark.e2e

LONG_PAUSE = 60.0   # longer than supervisord's stopwaitsecs (10 s): a pause slept out is killed


def run_python(code):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "lib")),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_a_signal_makes_the_waker_readable_and_a_reload_leaves_one_waker():
    output = run_python("""
        import os, select, signal, types
        from supervisor.medusa import asyncore_25 as asyncore
        from rc import supervisord_wake
        said = []
        supervisord = types.SimpleNamespace(options=types.SimpleNamespace(
            logger=types.SimpleNamespace(info=said.append)))
        signal.signal(signal.SIGCHLD, lambda *_: None)   # as supervisord's own handler
        supervisord_wake.make_interface(supervisord)
        supervisord_wake.make_interface(supervisord)     # a reload
        wakers = [(fd, d) for fd, d in asyncore.socket_map.items()
                  if isinstance(d, supervisord_wake.SignalWaker)]
        assert len(wakers) == 1, wakers
        fd, waker = wakers[0]
        assert select.select([fd], [], [], 0)[0] == []
        os.kill(os.getpid(), signal.SIGCHLD)
        assert select.select([fd], [], [], 5)[0] == [fd], "no wake-up"
        waker.handle_read_event()
        assert select.select([fd], [], [], 0)[0] == [], "not drained"
        print(said[-1])
    """)
    assert "a signal wakes supervisord" in output


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("wake"), reaper_interval=LONG_PAUSE)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_supervisord_loads_the_waker(cluster):
    with open(os.path.join(cluster.home, "log", "supervisord.log")) as f:
        assert "rc_wake: a signal wakes supervisord's loop at once" in f.read()


def test_the_reaper_pausing_between_sweeps_stops_at_sigterm(cluster):
    """Before, its sleep of reaper_interval ran out first: with a minute,
    supervisord killed it after stopwaitsecs and it never logged "stopped"."""
    pid = cluster.program_pid("rc-reaper")
    assert pid
    stopped = cluster.supervisorctl("stop", "rc-reaper")
    assert "rc-reaper: stopped" in stopped, stopped
    assert not alive(pid)
    with open(os.path.join(cluster.home, "log", "rc-reaper.log")) as f:
        assert '"event":"stopped"' in f.read().replace(" ", "")
    with open(os.path.join(cluster.home, "log", "supervisord.log")) as f:
        assert "killing 'rc-reaper'" not in f.read()
    cluster.supervisorctl("start", "rc-reaper")
    wait_for(lambda: cluster.program_pid("rc-reaper"), 30, "rc-reaper back")


def test_make_stop_ends_once_supervisord_is_done_and_make_run_starts_again(cluster):
    pid = int(open(os.path.join(cluster.home, "run", "supervisord.pid")).read())
    programs = {name: cluster.program_pid(name) for name in
                ("rc-server", "rc-files", "rc-scheduler", "rc-reaper", "rc-web", "rc-worker")}
    assert all(programs.values()), programs
    stopped = cluster.make("stop")
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith("stopped"), stopped.stdout
    for name, program in programs.items():
        assert not alive(program), name
    assert not os.path.exists(os.path.join(cluster.home, "run", "supervisord.pid"))
    wait_for(lambda: not alive(pid), 30, "supervisord gone")
    assert cluster.make("run").returncode == 0


def test_a_pid_file_left_by_a_power_cut_names_nothing_to_make_stop_or_run(cluster):
    """A power cut leaves supervisord's pid file and socket behind, and after
    the reboot that pid may be another program's. `make stop` must not
    signal it, and `make run` must start the main node (lib/rc/bell.py
    supervisord_pid: the socket must answer, not just the pid live)."""
    pid_file = os.path.join(cluster.home, "run", "supervisord.pid")
    supervisord = psutil.Process(int(open(pid_file).read()))
    everything = supervisord.children(recursive=True) + [supervisord]
    for process in everything:
        process.kill()
    psutil.wait_procs(everything, timeout=30)
    assert os.path.exists(pid_file)
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        with open(pid_file, "w") as f:
            f.write("%d\n" % bystander.pid)
        stopped = cluster.make("stop")
        assert stopped.returncode == 0 and stopped.stdout.strip() == "not running", stopped.stdout
        assert bystander.poll() is None
        started = cluster.make("run")
        assert started.returncode == 0, started.stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
