"""attack39b: the other direction and the edges. A device gone bad, a task
and what they choose, against the user's own terminal and laptop (the
text `rc`, rc.client and the logs print; the files `rc get` and `rc map`
write), and a main node gone wrong, or whatever answers at its address,
against the worker (frames it could not survive). Each test failed before
the fix its docstring names. What held is in the session's report."""
import io
import json
import os
import re
import time

import pytest

from rc import commands, db, devices, tasks
from rc.states import ASSIGNED, FAILED
from test_worker import DETAILED, WAIT, main, registered, short_name, spawn  # noqa: F401

# What a device may send in any text it chooses: OSC 52 (writes the
# user's clipboard), a clear screen, a right-to-left override, an 8-bit CSI
# and a backspace, as a terminal would act on them.
ESCAPES = "\x1b]52;c;cHduZWQ=\x07\x1b[2J\u202eevil\x9b31m\x08"
# Control characters the rc process must never pass to a terminal from a
# device; rc's own colours (ESC [ digits m) are taken out before looking.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
OWN_COLOURS = re.compile("\x1b\\[[0-9;]*m")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def on_a_terminal(*argv):
    out, err = Terminal(), Terminal()
    status = commands.run_command(list(argv), out, err, width=100)
    return status, OWN_COLOURS.sub("", out.getvalue()), OWN_COLOURS.sub("", err.getvalue())


def hostile_device(connection, device_id="pi"):
    """A device whose register and heartbeat carry escapes in every text
    they may: keys and values of its profile, its role, its reason to pause."""
    data = {"device_info": {"hostname": "h", "platform": "linux", "architecture": "aarch64",
                            "extra" + ESCAPES: "x"},
            "hardware_specs": {"cpu_cores": 4, "memory_gb": 2.0, "gpu" + ESCAPES: "x"},
            "task_types": ["echo", "shell"], "slots": 2, "role": "compute" + ESCAPES,
            "protocol": 1}
    now = time.time()
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", now)
        devices.heartbeat(connection, device_id, {"cpu_percent": 5.0, "m" + ESCAPES: 1},
                          now, {"available": False, "reason": "on battery" + ESCAPES})
    return device_id


def failed_with(connection, config, device_id, error):
    """A shell task the device ran and reported failed with `error`."""
    now = time.time()
    with db.write(connection):
        task_id = tasks.submit(connection, config, "shell", {"command": "true"})
        connection.execute("UPDATE tasks SET state = ?, device_id = ?, assigned_at = ?"
                           " WHERE task_id = ?", (ASSIGNED, device_id, now, task_id))
        assert tasks.accept(connection, task_id, 1, device_id, now, 180.0)
        assert tasks.finish(connection, task_id, 1, device_id, FAILED,
                            {"output": "", "stderr": "", "exit_code": 1}, error, FAILED, now)
    return task_id


# -- the user's terminal ------------------------------------------------------------

def test_rc_device_shows_no_escape_from_the_names_of_a_devices_figures(cluster_home):
    """`rc device ID` printed the keys of the profile and metrics a device
    sent (device_info, hardware_specs, heartbeat metrics: any names, up to
    64 characters) as they came: a device named its metric
    "\\x1b]52;c;..." and the operator's `rc device` (or the web terminal's)
    wrote the device's text to the clipboard. render.key_values now shows
    keys as it shows values (render.cell)."""
    config, connection = cluster_home
    hostile_device(connection)
    status, out, err = on_a_terminal("device", "pi")
    assert status == 0 and "hardware_specs.gpu" in out and "metrics.m" in out
    assert not RAW.search(out + err), [line for line in out.splitlines() if RAW.search(line)]
    assert "\u202e" not in out


def test_rc_role_shows_no_escape_from_the_role_a_device_reports(cluster_home):
    """`rc role ID ROLE` answers with the role the device reports, which was
    written as the device sent it. Now render.cell."""
    config, connection = cluster_home
    hostile_device(connection)
    status, out, err = on_a_terminal("role", "pi", "storage")
    assert status == 0 and out.startswith("pi role: storage (it reports compute")
    assert not RAW.search(out + err) and "\u202e" not in out


def test_a_failed_tasks_error_reaches_the_terminal_without_its_escapes(cluster_home):
    """The error a device reports for a task ended `rc wait` and `rc submit
    --wait` ("rc: error: task N failed: ERROR") as it came, and so did every
    error message naming what a device chose (`submit --each`: "paused: pi,
    REASON"). rc's last word (commands.fail) now shows control characters
    and bidi overrides as "?", as a table cell does."""
    config, connection = cluster_home
    device_id = hostile_device(connection)
    task_id = failed_with(connection, config, device_id, "boom" + ESCAPES)
    status, out, err = on_a_terminal("wait", str(task_id))
    assert status == 1 and err.startswith("rc: error: task %d failed: boom?]52" % task_id)
    assert not RAW.search(out + err) and "\u202e" not in err
    status, out, err = on_a_terminal("submit", "echo", "hi", "--each")
    assert status == 1 and "paused: pi, on battery?]52" in err
    assert not RAW.search(out + err) and "\u202e" not in err


def test_rc_why_shows_no_escape_from_a_devices_error(cluster_home):
    """`rc why N` wrote the task's error (or the reason a retry was queued
    with, which quotes the device's error) as the device sent it; the web
    terminal ran it too. Now shown as render.printable shows output."""
    config, connection = cluster_home
    device_id = hostile_device(connection)
    task_id = failed_with(connection, config, device_id, "boom" + ESCAPES)
    status, out, err = on_a_terminal("why", str(task_id))
    assert status == 0 and out.startswith("Task %d failed (attempt 1 on pi): boom?]52" % task_id)
    assert not RAW.search(out + err)


def test_rc_json_output_carries_no_c1_control_nor_bidi_override_raw(cluster_home):
    """`rc device ID --json` (and every --json) is orjson's, which escapes
    only what JSON must (below U+0020): a device's text with U+009B (CSI)
    or U+009D...U+009C (OSC) reached the terminal raw, and the dashboard's
    web terminal (xterm.js reads C1 controls: "secret\\u009b2K\\u009b1Gshown"
    leaves "shown" on its line) ran it; so did a right-to-left override.
    render.json_text now writes them as \\u escapes; the JSON reads back
    the same."""
    config, connection = cluster_home
    c1 = "\u009b2K\u009b1G\u009d0;title\u009c\u202e"
    data = {"device_info": {"hostname": "h" + c1, "platform": "linux"},
            "hardware_specs": {"cpu_cores": 1, "gpu" + c1: "x" + c1}, "slots": 1,
            "task_types": ["echo"], "role": "compute", "protocol": 1}
    with db.write(connection):
        devices.register(connection, "pi", data, "127.0.0.1:1", time.time())
    for argv in (["device", "pi", "--json"], ["devices", "--json"]):
        status, out, err = on_a_terminal(*argv)
        assert status == 0 and not re.search("[\x80-\x9f\u202e]", out), out
        record = json.loads(out)
        record = record if isinstance(record, dict) else record[0]
        assert record["hostname"] == "h" + c1


def test_the_python_clients_errors_quote_no_escape_from_a_device_or_an_answer():
    """rc.client's TaskFailed quoted the error a device reported as sent
    (its stderr's line was cleaned, the error itself not), and ClusterError
    the error an answer carried (rc-web's, or whoever answers at its
    address over plain HTTP): a script that let either go uncaught printed
    the device's escape sequences to its user's terminal in the traceback
    (OSC 52: their clipboard). Both messages are now client.shown()."""
    from rc import client
    failed = client.TaskFailed(7, "failed", "Traceback:\n  boom" + ESCAPES,
                               {"stderr": "said" + ESCAPES})
    assert str(failed).startswith("task 7 failed: Traceback:\n  boom?]52")
    assert not RAW.search(str(failed).replace("\n", "")) and "\u202e" not in str(failed)
    assert failed.error == "Traceback:\n  boom" + ESCAPES      # the data is the device's
    try:
        client.json_answer("GET", "/api/v1/tasks/7", 500,
                           ('{"error": "no%s"}' % ESCAPES.replace("\x1b", "\\u001b")
                            .replace("\x07", "\\u0007").replace("\x08", "\\b")).encode(),
                           (200,))
    except client.ClusterError as e:
        message = str(e)
    assert message.startswith("GET /api/v1/tasks/7: no?]52") and message.endswith("(HTTP 500)")
    assert not RAW.search(message) and "\u202e" not in message



def test_rc_get_writes_through_no_link_planted_beside_its_target(cluster_home, tmp_path):
    """`rc get` (and `rc map --into`) wrote each file to NAME.rc-partial
    with open(..., "wb"), which follows a link: in a directory others may
    write (a shared results directory, /tmp), another local user who
    planted NAME.rc-partial as a link to the user's ~/.bashrc had the
    device's bytes written over it. The partial file is now made anew,
    never through a link (O_EXCL | O_NOFOLLOW, a stale one removed first)."""
    from test_files_cli import finished_with_output
    config, connection = cluster_home
    task_id = finished_with_output(connection, config, "result.txt", b"the device's bytes")
    victim = tmp_path / "bashrc"
    victim.write_bytes(b"the user's own\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.symlink(str(victim), str(shared / "result.txt.rc-partial"))
    status, out, err = on_a_terminal("get", str(task_id), "result.txt", "-o", str(shared))
    assert status == 0, err
    assert victim.read_bytes() == b"the user's own\n"
    assert (shared / "result.txt").read_bytes() == b"the device's bytes"
    assert not (shared / "result.txt").is_symlink()
    assert not os.path.lexists(str(shared / "result.txt.rc-partial"))


def test_rc_map_results_are_written_through_no_link_planted_there(tmp_path):
    """`rc map --results DIR` wrote DIR/N/stdout (the task's output: the
    device's bytes) and its neighbours with open(..., "w"), through a link
    another local user planted in a shared DIR (DIR/1/stdout to the user's
    ~/.bashrc). Each is now written to a partial file made anew (as rc get
    does) and renamed over whatever was there."""
    from types import SimpleNamespace
    from rc import map_cli
    victim = tmp_path / "bashrc"
    victim.write_bytes(b"the user's own\n")
    results = tmp_path / "results"
    (results / "1").mkdir(parents=True)
    os.symlink(str(victim), str(results / "1" / "stdout"))
    os.symlink(str(victim), str(results / "1" / "state.rc-partial"))
    outcome = map_cli.Outcome.__new__(map_cli.Outcome)
    outcome.job = SimpleNamespace(number=1, value="a.txt", state="completed")
    outcome.stdout, outcome.stderr, outcome.exit_code, outcome.notes = "bytes\n", "", 0, []
    outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    assert victim.read_bytes() == b"the user's own\n"
    assert (results / "1" / "stdout").read_text() == "bytes\n"
    assert not (results / "1" / "stdout").is_symlink()
    assert (results / "1" / "state").read_text() == "completed\n"
    assert sorted(os.listdir(str(results / "1"))) == ["exit_code", "input", "state", "stderr",
                                                     "stdout"]


def test_the_programs_logs_carry_no_c1_control_nor_bidi_override_raw(cluster_home):
    """rc-files logs the name of each output a device stores (file_stored),
    and orjson escapes only what JSON must (below U+0020): a device naming
    its output "\\u009d52;c;...\\u009c" (OSC 52 in C1 form, which a
    terminal that reads C1 controls acts on) or with a right-to-left
    override had it written into rc-files.log as it came, for whoever tails
    it (`rc ctl tail rc-files`, tail -f). The programs' logs and the audit
    log now write those as \\u escapes; a line reads back the same."""
    from rc import audit, log
    config, connection = cluster_home
    name = "out\u009d52;c;cHduZWQ=\u009c\u202egnp.exe \u2066x\u2069 \u00e9t\u00e9 \u2603"
    stream = io.BytesIO()
    log.Logger("rc-files", stream=stream).info("file_stored", name=name, device_id="pi")
    audit.record(config, "file_named", "pi", "127.0.0.1", name=name)
    with open(audit.path(config), "rb") as f:
        written = [stream.getvalue(), f.read()]
    for line in written:
        assert re.search(rb"\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]", line) is None
        assert json.loads(line)["name"] == name
        assert "\u00e9t\u00e9 \u2603".encode() in line        # letters stay as they are

# -- the worker and its device ------------------------------------------------------

def frame(message_type, data_text):
    """An envelope whose data is written out as given (numbers JSON may
    spell but Python's json.dumps would not)."""
    return ('{"message_type": "%s", "sender_id": "main", "timestamp": 1, "message_id": "t",'
            ' "data": %s}\n' % (message_type, data_text)).encode()


def answers_after(link, task_id):
    """The frames the worker sends until task `task_id`'s result (None if
    it closed the connection or went silent for WAIT seconds)."""
    frames = []
    while True:
        envelope = link.try_recv(WAIT)
        if envelope in (None, "timeout"):
            return frames, None
        if link.answered(envelope):
            continue
        if envelope["message_type"] == "task_result" and envelope["data"]["task_id"] == task_id:
            return frames, envelope["data"]
        frames.append(envelope)


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_numbers_no_double_holds_are_a_bad_frame_not_the_workers_end(main, spawn, python):
    """The worker read Infinity, -Infinity, NaN and 1e999 from a frame as
    floats, and integers of any length: a task_assign with a timeout of
    Infinity raised OverflowError as the task started (int(timeout) for its
    CPU rlimit), and an integer past a double's range (10**400) as a
    heartbeat_interval, hold, watch or timeout raised in float(); each
    ended the worker, with every task it ran (the watchdog kills them), and
    a worker started by hand (Termux) stayed down. Whoever answers for the
    main node on plain TCP after the handshake, or a main node gone wrong,
    could end every worker with one frame. Such numbers now make the frame
    a bad_frame, as any frame that is not JSON."""
    worker, link = registered(main, spawn, python)
    link.send_raw(frame("task_assign", '{"task_id": 1, "attempt": 1, "task_type": "shell",'
                        ' "payload": {"command": "true"}, "timeout": Infinity}'))
    link.send_raw(frame("task_assign", '{"task_id": 2, "attempt": 1, "task_type": "echo",'
                        ' "payload": {"message": "x"}, "timeout": 1e999}'))
    link.send_raw(frame("main_stopping", '{"hold": 1%s}' % ("0" * 400)))
    link.send_raw(frame("watch", '{"interval": 1%s, "seconds": 60}' % ("0" * 400)))
    link.send_raw(frame("task_assign", '{"task_id": 3, "attempt": 1, "task_type": "shell",'
                        ' "payload": {"command": "true"}, "timeout": 1%s}' % ("0" * 400)))
    link.assign(4, "echo", {"message": "still here"})
    frames, result = answers_after(link, 4)
    assert result is not None and result["result"]["output"] == "still here", frames
    assert [f["data"]["code"] for f in frames if f["message_type"] == "error"] \
        == ["bad_frame"] * 5
    assert worker.proc.poll() is None


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_task_ids_that_are_not_numbers_end_no_worker(main, spawn, python):
    """task_cancel, task_watch and task_result_ack looked their (task_id,
    attempt) up as sent: a list there (unhashable) raised TypeError in the
    worker's loop and ended it with every task it ran. Now task_key():
    anything but two integers names no task."""
    worker, link = registered(main, spawn, python)
    link.assign(1, "sleep", {"seconds": 0.5})
    link.send("task_cancel", {"task_id": [1], "attempt": 1})
    link.send("task_watch", {"task_id": {"1": 1}, "attempt": 1, "seconds": 5})
    link.send("task_result_ack", {"task_id": 1, "attempt": [1]})
    link.assign(2, "echo", {"message": "still here"})
    frames, result = answers_after(link, 2)
    assert result is not None and result["result"]["output"] == "still here", frames
    frames, result = answers_after(link, 1)
    assert result is not None and result["status"] == "completed", frames
    assert worker.proc.poll() is None


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_a_stranger_at_the_main_nodes_address_ends_no_worker_with_one_frame(main, spawn,
                                                                           python):
    """Without TLS a worker reads an error frame, and a hello, from whatever
    answers at the main node's address, before anything is proved (a box
    that took the address over, ARP spoofing: no token needed). An error
    whose code was a list or an object (`code in REFUSED_FOR_GOOD`) and a
    hello whose cluster_id was one (the secret's lookup) raised TypeError
    and ended the worker for good, where docs/security.md says a device
    that joined before keeps trying whatever answers there. Now a code or
    cluster_id that is not text is none."""
    from rc.protocol import server_proof
    from test_worker import DEVICE_ID, TOKEN
    worker = spawn(python)
    link = main.accept()
    link.send("error", {"code": [], "message": "go away"})
    link.send("error", {"code": {}, "message": "go away"})
    link.close()
    link = main.accept()          # it came back; this time the hello is odd
    link.send("hello", {"nonce": "ab" * 16, "protocol": 1, "cluster_id": ["x"]})
    register = link.expect("register")
    link.send("register_ack", {"heartbeat_interval": 60, "proof": server_proof(
        TOKEN, "ab" * 16, register["nonce"], DEVICE_ID)})
    link.assign(1, "echo", {"message": "still here"})
    frames, result = answers_after(link, 1)
    assert result is not None and result["result"]["output"] == "still here", frames
    assert worker.proc.poll() is None


@pytest.mark.parametrize("python", DETAILED, ids=short_name)
def test_a_timeout_of_ages_is_a_year_and_the_task_runs(main, spawn, python):
    """A timeout of 1e308 seconds (a double, which the worker reads) made a
    CPU rlimit of int(1e308) + 6: a Python task's process could not set it
    and exited 127, and once the spawner read its requests as the main
    node's frames are read, no task with it started at all. The worker now
    takes at most LONGEST_TIMEOUT (a year; the main node allows a week)."""
    worker, link = registered(main, spawn, python)
    link.assign(1, "python_eval", {"expression": "6 * 7"}, timeout=1e308)
    link.assign(2, "shell", {"command": "echo 42"}, timeout=1e308)
    results = link.results(2)
    assert [results[i]["status"] for i in (1, 2)] == ["completed"] * 2, results
    assert results[1]["result"]["output"] == "42" and results[2]["result"]["output"] == "42\n"


def test_the_workers_log_carries_no_c1_control_nor_bidi_override_raw(main, spawn):
    """The worker logs what the main node says in an error frame, which
    without TLS whatever answers at its address may send before anything is
    proved; its JSON log escaped only what JSON must, so U+009D...U+009C
    (OSC 52 in C1 form) or a right-to-left override went raw into the file
    whoever tails. Now \\u escapes, as in the main node's logs."""
    import sys
    worker = spawn(sys.executable)
    link = main.accept()
    said = "go away\u009d52;c;cHduZWQ=\u009c\u202e txt.exe \u00e9t\u00e9"
    link.send("error", {"code": "something_new", "message": said})
    link.close()
    main.accept()                 # it logged the error and came back
    with open(worker.log_path, "rb") as f:
        written = f.read()
    assert re.search(rb"\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]", written) is None
    assert said in [line.get("message") for line in worker.log()]
    assert "\u00e9t\u00e9".encode() in written
