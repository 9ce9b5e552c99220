"""Session 40's attacks on what session 39 built: rc map's shell reader
(lib/rc/map_cli.py), the worker's device id of its own and its JSON
reader, the cleaning of a device's text on the way to a
terminal. Each test failed before the fix its docstring names."""

import re
import shutil
import subprocess
import time

import pytest

from cluster_harness import Cluster
from rc import db, tasks
from rc.states import ASSIGNED
from test_hostile_s39b import ESCAPES, RAW, answers_after, frame, hostile_device, on_a_terminal
from test_worker import DETAILED, main, short_name, spawn  # noqa: F401 (fixtures)
from test_worker_policy import options, worker  # noqa: F401 (a fixture)


def test_rc_map_refuses_a_value_bash_would_run_as_a_subscript(tmp_path):
    """bash reads a quoted word as a variable name or a number where no
    quoting reaches: the operands of [[ ... -eq ... ]], [ -v ... ],
    printf -v, read. A value a[$(cmd)] there ran cmd, quoted as rc map
    quoted it (bare, '...' or "..."), under bash (sh on Fedora, Arch,
    macOS); declare -a (local, readonly) ran a value ($(cmd)) as the list
    it assigns. Such a value is now refused (exit 2), naming the input;
    one without it is quoted as before."""
    marker = tmp_path / "ran"
    value = "a[$(touch %s)]" % marker
    cluster = Cluster(tmp_path / "home")
    cases = [(command, value) for command in (
        "[[ {} -eq 1 ]]", "[[ 1 -lt '{}' ]]", '[[ "{}" -gt 1 ]]', "[ -v {} ]", "[[ -v {} ]]",
        "read {} <<< 1", "printf -v {} x", "echo {}")]
    cases += [("declare -a x={}", "($(touch %s))" % marker),
              ("f() { local -a {}; }; f", "x=(`touch %s`)" % marker)]
    for command, value in cases:
        done = cluster.rc("map", "--dry-run", command, "--", value, check=False)
        if done.returncode == 0 and shutil.which("bash"):
            subprocess.run(["bash", "-c", done.stdout], cwd=str(tmp_path),
                           stderr=subprocess.DEVNULL)
        assert done.returncode == 2 and "which bash runs" in done.stderr, (command, done.stderr)
    assert not marker.exists()
    done = cluster.rc("map", "--dry-run", "[[ {} -eq 1 ]]", "--", "a[1]", "$(x)", "f(x) $5")
    assert done.stdout == "[[ 'a[1]' -eq 1 ]]\n[[ '$(x)' -eq 1 ]]\n[[ 'f(x) $5' -eq 1 ]]\n"


def test_rc_monitor_shows_a_devices_progress_message_on_its_one_line(cluster_home):
    """A device's progress frame may carry any message of up to 200
    characters: `rc monitor` printed it with its newlines and bidi overrides
    (render.printable, for outputs), so a device drew lines of its own into
    the screen (a fake task's bar, 'failed 0') or reversed what followed.
    Now shown as a table cell is: one line, controls and overrides as '?'."""
    config, connection = cluster_home
    device_id = hostile_device(connection)
    now = time.time()
    message = "copying\n    7 shell  completed  pi  [####] 100%\r" + ESCAPES
    with db.write(connection):
        task_id = tasks.submit(connection, config, "shell", {"command": "true"})
        connection.execute("UPDATE tasks SET state = ?, device_id = ?, assigned_at = ?"
                           " WHERE task_id = ?", (ASSIGNED, device_id, now, task_id))
        assert tasks.accept(connection, task_id, 1, device_id, now, 180.0)
        assert tasks.record_progress(connection, task_id, 1, device_id, 5.0, message)
    status, out, err = on_a_terminal("monitor", "--once")
    lines = [line for line in out.splitlines() if "copying" in line]
    assert status == 0 and len(lines) == 1 and "completed" in lines[0], out
    assert not any(line.lstrip().startswith("7 shell") for line in out.splitlines())
    assert not RAW.search(out + err) and "\u202e" not in out


def test_a_damaged_device_id_file_does_not_keep_the_worker_from_starting(worker, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """A phone (host name localhost) keeps the id it made in STATE_DIR/device_id.
    A file there that is not text (damaged) raised UnicodeDecodeError before
    the worker even parsed its options: it never started, at every boot. It
    is read as one that holds no id: a new one is made and kept."""
    monkeypatch.setattr(worker.socket, "gethostname", lambda: "localhost")
    state = tmp_path / "state"
    state.mkdir()
    (state / "device_id").write_bytes(b"\xff\xfe\x00garbage\n")
    made = options(worker, "--state-dir", str(state)).device_id
    assert re.match(r"[a-z0-9]+-[0-9a-f]{6}\Z", made), made
    assert (state / "device_id").read_text() == made + "\n"
    assert options(worker, "--state-dir", str(state)).device_id == made


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_a_frame_nested_past_the_recursion_limit_is_a_bad_frame(main, spawn, python):  # noqa: F811
    """The worker's JSON reader (loads) turned bad JSON into ValueError, a
    bad_frame, but not JSON nested deeper than the recursion limit: one
    frame of 200,000 ['s (400 KB, under the 1 MiB a frame may be) raised
    RecursionError in the worker's loop, which ended it with every task it
    ran. Whoever answers at the main node's address sends it before the
    handshake (without TLS, no token needed). Now a bad_frame."""
    process = spawn(python)
    link = main.accept()
    link.send_raw(frame("hello", "[" * 200000 + "]" * 200000))
    assert link.expect("error")["code"] == "bad_frame"
    link.handshake()
    link.send_raw(frame("task_assign", '{"a":' * 100000 + "1" + "}" * 100000))
    link.assign(1, "echo", {"message": "still here"})
    frames, result = answers_after(link, 1)
    assert result is not None and result["result"]["output"] == "still here", frames
    assert [f["data"]["code"] for f in frames if f["message_type"] == "error"] == ["bad_frame"]
    assert process.proc.poll() is None


def test_the_python_client_reads_an_answer_nested_past_the_limit_as_a_bad_one():
    """rc.client read an answer's JSON (and each line of a result stream)
    with json.loads and caught ValueError: an answer nested past Python's
    recursion limit, from whoever answers at rc-web's address over plain
    HTTP, raised RecursionError out of the client instead of the
    ClusterError a script catches and retries on (a stream's line:
    BadAnswer, which the client turns into one)."""
    from rc import client
    nested = b"[" * 100000 + b"]" * 100000
    with pytest.raises(client.ClusterError) as raised:
        client.json_answer("GET", "/api/v1/tasks/7", 502, nested, (200,))
    assert str(raised.value).startswith("GET /api/v1/tasks/7: [[[")
    with pytest.raises(client.BadAnswer):
        client.stream_record(nested + b"\n")


def test_rc_map_takes_only_a_whole_number_in_a_subscript(tmp_path):
    """bash reads name[...] as a subscript (arithmetic) in an assignment
    and in what takes a variable's name (unset, read, printf -v, [ -v ]),
    and runs what it holds whatever quotes the value was put in: a stdin
    line $(cmd) in a[{}]=1, a['{}']=1, unset "a[{}]" or a list's m=([{}]=1)
    ran cmd (found by fuzzing the reader against bash: 25 of 800 random
    commands ran one).
    A value there must be a whole number, as in $((...))."""
    marker = tmp_path / "ran"
    cluster = Cluster(tmp_path / "home")
    for command in ("a[{}]=1", "a['{}']=1", 'a["{}"]=1', "unset 'a[{}]'", 'read "a[{}]" <<< 1',
                    "declare -A m; m[{}]=1", 'printf -v "a[{}]" x', "a[b[{}]]=1",
                    "m=([{}]=1)", "m=( [1]=x [{}]=y )", "declare -a m='([{}]=1)'"):
        for value in ("$(touch %s)" % marker, "`touch %s`" % marker):
            done = cluster.rc("map", "--dry-run", command, "--", value, check=False)
            if done.returncode == 0 and shutil.which("bash"):
                subprocess.run(["bash", "-c", done.stdout], cwd=str(tmp_path),
                               stderr=subprocess.DEVNULL)
            assert done.returncode == 2 and "not a whole number" in done.stderr, \
                (command, done.stdout, done.stderr)
    assert not marker.exists()
    done = cluster.rc("map", "--dry-run", "a[{}]={}; echo x[1] {}; m=(a {})", "--", "7")
    assert done.stdout == "a[7]=7; echo x[1] 7; m=(a 7)\n"
