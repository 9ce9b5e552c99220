"""Rough edges found in the nineteenth session (a new user's first hour
with files, the Python client and rc map), each with the test that found
it."""
import io

import pytest

from rc import commands


def rc(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


# -- a glob that matched nothing is named as one ------------------------------------------

@pytest.mark.parametrize("argv, what", [
    (["submit", "shell", "ls", "--input", "*.wav"], "input '*.wav'"),
    (["submit", "shell", "cat", "--stdin", "notes-?.txt"], "--stdin 'notes-?.txt'"),
    (["submit", "shell", "--file", "run-[0-9].sh"], "--file 'run-[0-9].sh'"),
    (["map", "ffmpeg -i {} {/.}.mp3", "--files", "*.wav"], "--files '*.wav'"),
])
def test_a_pattern_the_shell_left_unmatched_is_named_as_one(cluster_home, tmp_path,
                                                             monkeypatch, argv, what):
    """`rc map CMD --files *.wav` in a folder with no .wav said `--files
    '*.wav': no such file`, and `--stdin notes-?.txt` that it `is not a
    regular file`: true, but the new user looks for a file named *.wav.
    The shell passes a pattern that matches nothing on as it is; the error
    now says so, and a path that is not there says "no such file" for
    every file option alike."""
    monkeypatch.chdir(tmp_path)
    status, out, err = rc(*argv)
    assert status == 2, err
    assert what + ": no such file or directory (a pattern that matched no file here" in err, err
    status, out, err = rc("submit", "shell", "cat", "--stdin", "missing.txt")
    assert status == 2 and "--stdin 'missing.txt': no such file or directory\n" in err, err
