"""Session 29's attacks: a stranger on the LAN and a hostile enrolled
device, on the newest paths (a task taken back and released, checkpoints
handed from one device to the next). After each attack on a running main
node the programs keep their pids and a good worker's tasks complete
(hostile_harness.unharmed)."""
import glob
import io
import os
import subprocess
import tarfile

import pytest

from test_worker import WORKER, interpreter_version

PYTHON36 = [path for path in sorted(glob.glob(os.path.expanduser(
    "~/.pyenv/versions/3.6*/bin/python3")), key=interpreter_version)]


# -- a checkpoint whose names the next device cannot encode ---------------------------

RESTORE = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
print(sys.getfilesystemencoding())
worker.restore_checkpoint(sys.argv[2], sys.argv[3], "0" * 64)
print(sorted(os.listdir(sys.argv[3])))
"""


@pytest.mark.skipif(not PYTHON36, reason="no CPython 3.6 under ~/.pyenv/versions")
def test_a_checkpoint_name_the_next_device_cannot_encode_is_set_aside_not_failed(tmp_path):
    """CPython 3.6 in the C locale (a service started without LANG)
    encodes file names as ASCII: a checkpoint holding 'café.txt' (a
    hostile device's, or an honest one's from a UTF-8 device) raised
    UnicodeEncodeError, which restore_checkpoint let through, so the
    attempt failed ('inputs: UnicodeEncodeError') on each such device
    instead of starting afresh as docs/security.md says."""
    archive_path = tmp_path / "checkpoint.tar"
    with tarfile.open(str(archive_path), "w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("caf\u00e9.txt")
        member.size = 5
        archive.addfile(member, io.BytesIO(b"hello"))
    directory = tmp_path / "restored"
    directory.mkdir()
    done = subprocess.run([PYTHON36[0], "-c", RESTORE, WORKER, str(archive_path),
                           str(directory)],
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    encoding, listing = done.stdout.split()[-2:]
    assert encoding == "ascii", "this check needs the C locale's ASCII file names"
    assert listing == "[]"
    assert '"checkpoint_set_aside"' in done.stdout + done.stderr
