"""What an attack on a running main node found after issue 17's fixes, each
held here against a real cluster: after each attack every program keeps
its pid and a good worker's tasks still complete (hostile_harness.unharmed).
"""
import os
import secrets
import shutil
import urllib.request

import pytest

from cluster_harness import Cluster, online, wait_for
from hostile_harness import assert_completes, submit_to, unharmed
from rc import tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("found"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("good", "--slots", "2")
    # One slot: as root, its tasks run one after another as the same uid.
    cluster.start_worker("reuser", "--slots", "1")
    wait_for(lambda: {"good", "reuser"} <= online(cluster), 30, "the workers")
    yield cluster
    cluster.stop()


def output_of(cluster, task_id):
    return (tasks.get(cluster.db, task_id)["result"] or {}).get("output", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per task needs a root worker")
def test_a_task_finds_nothing_its_uid_left_in_shared_temp_dirs(cluster):
    """Task uids are reused: what one task leaves in /tmp, /var/tmp or
    /dev/shm (owner-only or not) must be gone before the next task of that
    uid starts, or that task reads it."""
    name = "rc-leftover-%s" % secrets.token_hex(4)
    paths = ["/tmp/" + name, "/dev/shm/" + name, "/var/tmp/" + name]
    try:
        with unharmed(cluster, "good"):
            writer = submit_to(cluster, "reuser",
                               "id -u; umask 077; echo secret-one > /tmp/{0};"
                               " echo secret-two > /dev/shm/{0}; mkdir /var/tmp/{0};"
                               " echo secret-three > /var/tmp/{0}/f;"
                               " cat /tmp/{0} /dev/shm/{0} /var/tmp/{0}/f; echo written"
                               .format(name))
            # Written (they are gone once it has ended: attack38).
            assert_completes(cluster, writer, "secret-one\nsecret-two\nsecret-three\nwritten")
            reader = submit_to(cluster, "reuser", "id -u; cat /tmp/{0} /dev/shm/{0}"
                               " /var/tmp/{0}/f; echo read".format(name))
            assert_completes(cluster, reader, "read")
        uid = output_of(cluster, writer).split()[0]
        assert output_of(cluster, reader).split()[0] == uid, "not the same uid: no test"
        assert "secret" not in output_of(cluster, reader)
        assert not any(os.path.exists(path) for path in paths)
    finally:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                os.path.exists(path) and os.unlink(path))


# A SysV shared memory segment (ctypes: the standard library has no shmget).
SHM_SCRIPT = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
key = int(sys.argv[2])
if sys.argv[1] == "write":
    address = libc.shmat(libc.shmget(key, 4096, 0o1600), None, 0)
    ctypes.memmove(address, b"shm-secret", 10)
    print("written")
else:
    segment = libc.shmget(key, 0, 0)
    print("found" if segment >= 0 else "none",
          ctypes.string_at(libc.shmat(segment, None, 0o10000), 10) if segment >= 0 else "")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/proc/sysvipc/shm"),
                    reason="a uid per task needs a root worker; SysV IPC needs Linux")
def test_a_task_finds_no_shared_memory_its_uid_left(cluster):
    """A SysV segment outlives its task (and holds its memory): the next
    task of the uid must not attach it."""
    key = str(secrets.randbelow(2 ** 30) + 1)
    command = "id -u; python3 -c '%s' %%s %s" % (SHM_SCRIPT, key)
    with unharmed(cluster, "good"):
        writer = submit_to(cluster, "reuser", command % "write")
        assert_completes(cluster, writer, "written")
        reader = submit_to(cluster, "reuser", command % "read")
        assert_completes(cluster, reader, "none")
    assert output_of(cluster, reader).split()[0] == output_of(cluster, writer).split()[0]
    assert key not in [line.split()[0] for line in open("/proc/sysvipc/shm")]


READ_TASKS = ("python3 -c \"import urllib.request, urllib.error\n"
              "try:\n"
              "    urllib.request.urlopen('http://127.0.0.1:%d/api/v1/tasks'); print('read-it')\n"
              "except urllib.error.HTTPError as e:\n"
              "    print('refused', e.code)\"")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/proc/net/tcp"),
                    reason="a uid per task needs a root worker; socket owners need /proc")
def test_a_task_on_this_machine_is_not_a_local_reader(cluster):
    """read_access=local opens reading to the main node's own user on this
    machine, not to every loopback client: a task running here (as a uid of
    its own) reads no other task's command or result without the token."""
    port = cluster.config.web_port
    with unharmed(cluster, "good"):
        reader = submit_to(cluster, "good", READ_TASKS % port)
        assert_completes(cluster, reader, "refused 401")
    # The main node's own user, from the same machine, still reads freely.
    with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/tasks" % port) as answer:
        assert answer.status == 200
