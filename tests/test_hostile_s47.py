"""Session 47's attacks on what landed in session 46: each test is a fault
found, and fails without its fix."""

import glob
import os
import shutil
import subprocess
import tempfile

import pytest

from test_worker_identity import load_worker_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def module():
    return load_worker_module()


def watched_directory(module, monkeypatch):
    # Only the directories: never the test machine's IPC and keyrings.
    monkeypatch.setattr(module, "remove_ipc_of", lambda uid: 0)
    monkeypatch.setattr(module, "remove_keys_of", lambda uid: 0)
    directory = tempfile.mkdtemp(prefix="rc-test-s47-")
    leftovers = module.Leftovers(directories=(directory,))
    if not leftovers.watch():
        shutil.rmtree(directory)
        pytest.skip("no inotify here")
    return directory, leftovers


def test_a_followed_directory_replaced_then_changed_does_not_raise(module, monkeypatch):
    """A shared directory replaced since its watch was set (renamed away and
    made again, or mounted over) is no longer followed: follows() forgot its
    names. An event on the old one (a process still in it) then raised
    KeyError in read(), out of the end of every task after (Sandbox.close:
    its uid never idle again, its directory never given back)."""
    if os.geteuid() != 0:
        pytest.skip("gives a file away (chown): root only")
    directory, leftovers = watched_directory(module, monkeypatch)
    task = 59993
    old = directory + "-old"
    try:
        leftovers.remove(task + 1)       # read whole: followed
        assert leftovers.watching.follows(directory)
        os.rename(directory, old)                    # replaced ...
        os.mkdir(directory)
        leftovers.remove(task + 1)       # ... and seen so: looked at by its mtime
        assert not leftovers.watching.follows(directory)
        open(os.path.join(old, "late"), "w").close()   # an event on the old one
        open(os.path.join(directory, "left"), "w").close()
        os.chown(os.path.join(directory, "left"), task, task)
        leftovers.remove(task)
        assert os.listdir(directory) == [], "the directory's leftovers stayed"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@pytest.mark.parametrize("rules, named", [
    ('[{"rule": ["device_offline"]}]', "must be one of"),
    ('[{"rule": {"device_offline": 1}}]', "must be one of"),
    ('[{"rule": "device_offline", "after": NaN}]', "after must be a number"),
    ('[{"rule": "failure_rate", "window": Infinity}]', "window must be a number"),
    ('[{"rule": "failure_rate", "above": 1e999}]', "above must be a number"),
    ('[{"rule": "failure_rate", "above": 2}]', "above must be a rate")])
def test_alert_rules_json_allows_but_no_rule_can_use_are_refused_in_one_line(
        tmp_path, monkeypatch, rules, named):
    """The alerts rules are checked as the file is read (make run, every rc
    command): a rule named by a list raised TypeError out of config.load (a
    traceback from `rc status`), and NaN or Infinity (json reads both) went
    through to rc-reaper, where the rule never fired, or raised there each
    minute ('%ds' of an infinite window)."""
    from rc import config
    monkeypatch.setenv("RC_HOME", str(tmp_path / "var"))
    path = tmp_path / "rc.json"
    path.write_text('{"alerts": %s}' % rules)
    with pytest.raises(config.ConfigError, match=named):
        config.load(str(path))


def test_a_failure_rate_rule_with_a_tiny_threshold_fires(cluster_home, add_device):
    """failure_rate with a small `above` (1e-300: any failure at all) counted
    completed tasks up to failed / above, past SQLite's integers: OverflowError
    in rc-reaper each minute, and the alert never fired."""
    import time
    from rc import alerts, db, tasks
    from rc.log import Logger
    import io
    config, connection = cluster_home
    now = time.time()
    add_device("pi", metrics={}, now=now)
    config.alerts = [{"rule": "failure_rate", "above": 1e-300, "min_tasks": 1}]
    ids = [tasks.submit(connection, config, "echo", {"message": "x"}) for _ in range(3)]
    with db.write(connection):
        for n, task_id in enumerate(ids):
            connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi',"
                               " started_at = ? WHERE task_id = ?", (now - 5, task_id))
            connection.execute("UPDATE tasks SET state = ?, finished_at = ? WHERE task_id = ?",
                               ("failed" if n else "completed", now - 1, task_id))
    fired = alerts.evaluate(connection, config, Logger("t", "info", io.BytesIO()), now + 1)
    assert [a.message for a in fired] == ["2 of 3 tasks failed in the last 900s"]


def test_a_host_setting_no_address_can_have_is_named_not_a_traceback(tmp_path, monkeypatch):
    """make run's check of tcp_host and web_host before it starts the
    cluster: a name with a label past 63 characters (a typo'd paste) raised
    UnicodeError (idna) out of ports_taken, a traceback from make run."""
    from rc import config
    monkeypatch.setenv("RC_HOME", str(tmp_path / "var"))
    path = tmp_path / "rc.json"
    path.write_text('{"web_host": "%s.local"}' % ("n" * 70))
    problem = config.ports_taken(config.load(str(path)))
    assert problem is not None and problem.startswith("web_host is 'nnnn"), problem


# -- code that crashes CPython 3.7-3.9's compiler -------------------------------------------
#
# The spawner compiles a Python task's code before it forks (python_code). On
# 3.7-3.9 the compiler recurses on C's stack without a limit: a chain of
# `1+` 20,000 long (40 KB, under the 256 KiB payload limit) under a small
# stack was SIGSEGV in the spawner, which took every task it had started
# with it. Past PRE_COMPILE_MAX such code is compiled in the task's process.

UNSAFE_PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[789].*/bin/python3")))


@pytest.mark.skipif(not UNSAFE_PYTHONS, reason="no CPython 3.7-3.9 under ~/.pyenv/versions")
@pytest.mark.parametrize("python", UNSAFE_PYTHONS[-1:])
def test_deep_code_is_not_compiled_in_the_spawner_of_a_3_9_worker(python):
    probe = ("import sys; sys.path.insert(0, %r); import worker\n"
             "print(worker.python_code({'exec': 'x = ' + '1+' * 20000 + '1', 'filename': 't'}))\n"
             "print(worker.python_code({'exec': 'x = 1', 'filename': 't'}) is not None)\n"
             % os.path.join(REPO, "bin"))
    done = subprocess.run(["sh", "-c", 'ulimit -s 512 && exec "$0" -c "$1"', python, probe],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["None", "True"], done.stdout
