"""What every hostile-input test checks after its attack on a running main
node (issue 17's bar): every program still RUNNING with the pid it had, a
good worker's tasks submitted before and after the attack complete, and no
file under the state directory readable by group or others.

    with unharmed(cluster, "good"):
        attack(cluster)
"""
import contextlib
import os
import stat

from cluster_harness import wait_for
from rc import tasks

PROGRAMS = ("rc-server", "rc-scheduler", "rc-reaper", "rc-web", "rc-files")


def program_pids(cluster, programs=None):
    """{program: pid}, 0 for one that is not running."""
    programs = cluster.programs() if programs is None else programs
    return {name: programs.get(name, ("", 0))[1] for name in PROGRAMS}


def assert_programs_unharmed(cluster, pids_before):
    programs = cluster.programs()
    for name in PROGRAMS:
        state = programs.get(name, ("not configured", 0))[0]
        assert state == "RUNNING", "%s is not running: %s" % (name, state)
    assert program_pids(cluster, programs) == pids_before, "a program was restarted"


def submit_to(cluster, device_id, command):
    """A shell task for one device, submitted as a user would (bin/rc)."""
    done = cluster.rc("submit", "shell", command, "--require", "device_id=%s" % device_id)
    return int(done.stdout.strip())


def assert_completes(cluster, task_id, expected_output, timeout=30):
    def ended():
        return cluster.db.execute("SELECT state FROM tasks WHERE task_id = ? AND state IN"
                                  " ('completed', 'failed', 'timed_out', 'cancelled')",
                                  (task_id,)).fetchone()
    wait_for(ended, timeout, "task %d to end" % task_id)
    row = tasks.get(cluster.db, task_id)
    assert row["state"] == "completed", row
    assert expected_output in (row["result"] or {}).get("output", ""), row


@contextlib.contextmanager
def unharmed(cluster, good_device):
    """Around an attack: the programs keep their pids, and the good device
    completes a task submitted before the attack and one submitted after."""
    pids = program_pids(cluster)
    before = submit_to(cluster, good_device, "sleep 0.5; echo before-attack")
    yield
    assert_completes(cluster, before, "before-attack")
    after = submit_to(cluster, good_device, "echo after-attack")
    assert_completes(cluster, after, "after-attack")
    assert_programs_unharmed(cluster, pids)


def readable_by_others(home):
    """Paths under the state directory with any group or other permission
    bit (sockets and symlinks aside: their bits mean nothing here)."""
    found = []
    for directory, names, files in os.walk(home):
        for name in [""] + names + files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                continue
            if mode & 0o077:
                found.append("%s %o" % (path, stat.S_IMODE(mode)))
    return found
