"""Round 30 of attacks: a task, an enrolled device or a stranger on the LAN
doing what it should not. Each test failed on the code before its fix."""
import errno
import os
import shutil
import sys
import tempfile

import pytest

from test_worker import WAIT, main, registered, spawn, wait_until  # noqa: F401


@pytest.fixture
def shared_dir():
    """A directory a task may use whatever uid it runs as."""
    into = tempfile.mkdtemp()
    os.chmod(into, 0o777)
    yield into
    shutil.rmtree(into)


def write_when_read(fifo, data):
    """Write `data` into `fifo` once something opened it to read; False
    while nothing has."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def test_a_simple_command_reading_a_fifo_holds_up_no_other_task(main, spawn, shared_dir):
    """posix_spawn's child opened `< fifo` itself while the spawner waited
    for it: every later task on the device timed out, for ever."""
    worker, link = registered(main, spawn, sys.executable)
    fifo = os.path.join(shared_dir, "fifo")
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    link.assign(1, "shell", {"command": "cat < " + fifo}, timeout=120)
    link.assign(2, "shell", {"command": "echo hi"}, timeout=60)
    assert link.results(1)[2]["result"]["output"] == "hi\n"
    # The reader waits for a writer, as in a shell.
    assert wait_until(lambda: write_when_read(fifo, b"from the fifo\n"), WAIT)
    first = link.results(1)[1]
    assert first["status"] == "completed" and first["result"]["output"] == "from the fifo\n"
    # Writing into one too, and /dev/null as ever.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        link.assign(3, "shell", {"command": "cat /etc/os-release > " + fifo}, timeout=60)
        assert link.results(1)[3]["status"] == "completed"
        with open("/etc/os-release", "rb") as f:
            assert os.read(reader, 1 << 20) == f.read()
    finally:
        os.close(reader)
    link.assign(4, "shell", {"command": "cat /etc/hostname > /dev/null"}, timeout=60)
    assert link.results(1)[4]["status"] == "completed"
