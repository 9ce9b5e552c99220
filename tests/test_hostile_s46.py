"""Hostile round of session 22 (attack46): a stranger, a token holder, a
lying device and a task, where no round looked (the newest code: rc map's
--results, the Python client, rc-files, the checkpoint path)."""
import glob
import io
import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest

from test_worker import WORKER, interpreter_version

# The oldest and newest CPython the worker runs on, and this one.
PYTHONS = [sys.executable] + [paths[0] for paths in (
    sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.%d*/bin/python3" % minor)),
           key=interpreter_version) for minor in (6, 13)) if paths]


def test_rc_map_results_folder_planted_as_a_link_is_not_written_through(tmp_path):
    """`rc map --results DIR` made DIR/N with os.makedirs, which follows a
    link: in a shared DIR another local user who planted DIR/1 as a link to
    a folder of the user's had its state, stdout, stderr, input and
    exit_code replaced (and an exit_code there removed) by the map's
    results. DIR/N is now made and entered with O_NOFOLLOW (as --into's
    folders are): the link is left alone and the input says why."""
    from rc import map_cli
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "state").write_text("the user's own\n")
    (victim / "exit_code").write_text("the user's too\n")
    results = tmp_path / "results"
    results.mkdir()
    os.symlink(str(victim), str(results / "1"))
    outcome = map_cli.Outcome.__new__(map_cli.Outcome)
    outcome.job = SimpleNamespace(number=1, value="a.txt", state="failed")
    outcome.stdout, outcome.stderr, outcome.exit_code, outcome.notes = "bytes\n", "", None, []
    try:
        outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    except OSError as e:
        assert "is a link" in str(e)
    else:
        raise AssertionError("wrote DIR/1 through a link")
    assert sorted(os.listdir(str(victim))) == ["exit_code", "state"]
    assert (victim / "state").read_text() == "the user's own\n"
    assert (victim / "exit_code").read_text() == "the user's too\n"
    # An honest DIR/2 is written as before.
    outcome.job = SimpleNamespace(number=2, value="b.txt", state="completed")
    outcome.exit_code = 0
    outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    assert sorted(os.listdir(str(results / "2"))) == ["exit_code", "input", "state", "stderr",
                                                     "stdout"]
    assert (results / "2" / "stdout").read_text() == "bytes\n"
    assert (results / "2" / "input").read_text() == "b.txt\n"


# -- a checkpoint tar whose headers are the size of a file ----------------------------

RESTORE = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
worker.load_region("files")
for archive in sys.argv[3:]:
    worker.restore_checkpoint(archive, sys.argv[2], "0" * 64)
    print(json.dumps(sorted(os.listdir(sys.argv[2]))))
    worker.remove_tree(sys.argv[2])
    os.mkdir(sys.argv[2])
with open("/proc/self/status") as f:       # ru_maxrss keeps the forking pytest's
    print([line.split()[1] for line in f if line.startswith("VmHWM:")][0])
"""
HEADER_BYTES = 48 << 20        # a pax header, a sparse map: 48 MiB each


def pax_record(key, value):
    """One "LENGTH KEY=VALUE\\n" record of a pax header, its length its own."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return str(length).encode() + body


def member_bytes(info, data):
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def hostile_checkpoints(directory):
    """A tar whose first member's pax header is HEADER_BYTES long; one whose
    GNU sparse 1.0 map is; an honest one (the worker's own, deep names)."""

    a_file = tarfile.TarInfo("a.txt")
    a_file.size = 1
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    data = pax_record(b"comment", b"x" * HEADER_BYTES)
    header.size = len(data)
    with open(os.path.join(directory, "pax.tar"), "wb") as f:
        f.write(member_bytes(header, data) + member_bytes(a_file, b"a") + b"\0" * 1024)
    count = HEADER_BYTES // 4
    sparse_map = b"%d\n" % count + b"1\n" * (2 * count)
    data = b"".join(pax_record(k, v) for k, v in (
        (b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"s"), (b"GNU.sparse.realsize", b"1")))
    header.size = len(data)
    sparse = tarfile.TarInfo("GNUSparseFile.0/s")
    sparse.size = len(sparse_map)
    with open(os.path.join(directory, "sparse.tar"), "wb") as f:
        f.write(member_bytes(header, data) + member_bytes(sparse, sparse_map)
                + member_bytes(a_file, b"a") + b"\0" * 1024)
    honest = os.path.join(directory, "honest")
    deep = os.path.join(honest, *["d" * 200] * 10)
    os.makedirs(deep)
    with open(os.path.join(deep, "f.txt"), "wb") as f:
        f.write(b"kept")
    from test_worker_identity import load_worker_module
    load_worker_module().write_checkpoint(honest, os.path.join(directory, "honest.tar"))

    return [os.path.join(directory, name) for name in ("pax.tar", "sparse.tar", "honest.tar")]


@pytest.mark.parametrize("python", PYTHONS, ids=lambda path: path.split("/versions/")[-1])
def test_a_checkpoint_whose_headers_are_huge_is_set_aside_unread(tmp_path, python):
    """A lying device may hand back any bytes as its task's checkpoint, and
    the next device unpacks them: tarfile reads a member's pax header (or
    GNU long name, or sparse map) whole into memory and decodes it, so a
    300 MB pax header took the next worker 1.2 GB of memory (RSS measured),
    an OOM kill on a phone or a Pi, on each device the task moved to; a
    sparse map of "1\\n"s cost a list entry each. Now a member's headers
    past CHECKPOINT_HEADER_MAX set the checkpoint aside before tarfile reads
    them, and the attempt starts afresh; the worker's own checkpoints (a
    name 20 folders deep) restore as before."""
    archives = hostile_checkpoints(str(tmp_path))
    directory = tmp_path / "restored"
    directory.mkdir()
    done = subprocess.run([python, "-c", RESTORE, WORKER, str(directory)] + archives,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()        # the worker's log lines among them
    assert [json.loads(line) for line in lines if line.startswith("[")] == [
        [], [], ["d" * 200]], done.stdout
    set_aside = [json.loads(line) for line in lines if '"checkpoint_set_aside"' in line]
    assert len(set_aside) == 2 and all("CHECKPOINT_HEADER_MAX" in line["error"]
                                       for line in set_aside), done.stdout
    assert int(lines[-1]) < HEADER_BYTES // 1024, "peak RSS %s KiB" % lines[-1]
