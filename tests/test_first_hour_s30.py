"""A new user's first hour, session 30, commands copied from the README and
docs/: `rc ctl tail -f`, docs/operations.md's backup and restore, `rc group`
of a map, and what they did."""
import io
import shlex
import time

from rc import commands, db, tasks
from rc import files as file_store
from test_worker import main  # noqa: F401 (a fixture)
from test_worker_files import also_36, files, run, start  # noqa: F401 (fixtures)


def run_command(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err, actor=("cli", "local"))
    return status, out.getvalue(), err.getvalue()


# -- rc ctl ---------------------------------------------------------------------------

def test_rc_ctl_tail_follow_takes_the_program_after_the_option(cluster_home):
    """The README's `bin/rc ctl tail -f rc-server` said `rc: error:
    unrecognized arguments: rc-server` (exit 2): argparse had matched the
    programs, empty, before -f. Now the program is taken; with no main node
    running for this RC_HOME it says so (exit 3)."""
    status, out, err = run_command("ctl", "tail", "-f", "rc-server")
    assert status == commands.NOT_RUNNING, err
    assert "not running" in out and err == ""
    arguments = commands.parse(commands.build_parser(io.StringIO()),
                               ["ctl", "tail", "-f", "rc-server"])
    assert arguments.programs == ["rc-server"] and arguments.follow
    # An unknown option after the action is still refused, naming it.
    status, _, err = run_command("ctl", "stop", "-x", "rc-web")
    assert status == 2 and "unrecognized arguments: -x" in err


# -- docs/operations.md: backups ------------------------------------------------------

def test_a_backup_into_a_missing_directory_says_so(cluster_home, tmp_path):
    """`bin/rc backup /mnt/usb/rc-$(date +%F).db` with the disk not mounted
    (and the nightly cron line's `var/backup-….db` with another RC_HOME)
    ended in a FileNotFoundError traceback."""
    target = tmp_path / "not-mounted" / "rc.db"
    status, out, err = run_command("backup", str(target))
    assert status == 1 and out == ""
    assert "Traceback" not in err
    assert err == "rc: error: cannot write %s: No such file or directory\n" % target
    status, out, err = run_command("backup", str(tmp_path / "rc.db"))
    assert status == 0 and "integrity ok" in out, err


def test_restoring_a_file_that_is_no_database_names_it(cluster_home, tmp_path):
    """`rc restore notes.txt` said only `rc: error: file is not a database`:
    which file, the backup or the cluster's own?"""
    config, _ = cluster_home
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, " * 100)
    status, out, err = run_command("restore", str(notes))
    assert status == 1 and out == ""
    assert err.startswith("rc: error: %s is not a backup: " % notes), err
    assert "file is not a database" in err


# -- rc group of a map ----------------------------------------------------------------

def shell_group(connection):
    """A group of shell tasks, as a map makes one (no device added to it later)."""
    with db.write(connection):
        return connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
            " include_new) VALUES (?, 'shell', '{}', '{}', '{}', 0)", (time.time(),)).lastrowid


def test_rc_group_of_a_map_says_where_each_input_ran(cluster_home, add_device):
    """docs/map.md: `rc group 12` shows a map's tasks. Its DEVICE column was
    empty, and a multi-line output's heading read `==  (task 25,
    completed)`: only `submit --each` tasks are pinned to a device."""
    config, connection = cluster_home
    add_device("phone")
    group_id = shell_group(connection)
    ran, waiting = [tasks.submit(connection, config, "shell", {"command": "printf 'a\\nb\\n'"},
                                 group_id=group_id) for _ in range(2)]
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'completed', device_id = 'phone',"
                           " finished_at = ?, result = ? WHERE task_id = ?",
                           (time.time(), '{"output": "a\\nb\\n", "exit_code": 0}', ran))
    status, out, err = run_command("group", str(group_id))
    assert status == 0, err
    assert "== phone (task %d, completed)\na\nb\n" % ran in out
    assert "==  (task %d, queued)" % waiting in out      # given to no device yet
    status, out, err = run_command("group", str(group_id), "--csv")
    assert "phone,%d,completed,a," % ran in out


# -- rc why: the device's cache, when every slot is busy ------------------------------

def test_rc_why_names_the_device_holding_the_inputs_while_every_slot_is_busy(cluster_home):
    """The same 300 kB input sent twice to a phone started with --cache-mb:
    while the phone ran another task, `rc why` of the second said only '1
    device fits (phone) but all their slots are busy', not that the phone
    held its input (which it said once a slot was free)."""
    from rc import explain
    from test_files import add_worker, sha, submit_with_input
    config, connection = cluster_home
    blob = b"x" * 300000
    digest, size = file_store.store_stream(connection, config, io.BytesIO(blob), len(blob))
    add_worker(connection, "laptop", slots=1)
    add_worker(connection, "phone", cached=[digest, sha(b"other")], slots=1)
    for device_id in ("laptop", "phone"):
        busy = tasks.submit(connection, config, "shell", {"command": "sleep 60"})
        with db.write(connection):
            connection.execute("UPDATE tasks SET state = 'running', device_id = ?,"
                               " started_at = ? WHERE task_id = ?",
                               (device_id, time.time(), busy))
    task_id = submit_with_input(connection, config, digest, size)
    why = explain.why(connection, task_id)
    assert "2 devices fit (laptop, phone) but all their slots are busy" in why
    assert why.endswith(" Devices holding its inputs are preferred:"
                        " phone holds 300000 of its 300000 input bytes."), why


# -- rc join on another RC_WEB_PORT ---------------------------------------------------

def test_the_join_command_of_a_cluster_on_another_web_port_names_it(cluster_home):
    """A cluster started with RC_WEB_PORT=18631: the device joined with the
    command `rc join` printed, with --allow-upgrade added, answered `rc
    broadcast upgrade` with 'cannot download
    http://127.0.0.1:5000/worker.py: Connection refused' (--web-port's
    default). The command now carries the port when it is not 5000."""
    config, _ = cluster_home
    for web_port, option in ((18631, ["--web-port=18631"]), (5000, [])):
        config.web_port = web_port
        out, err = io.StringIO(), io.StringIO()
        assert commands.run_command(["join"], out, err, config) == 0, err.getvalue()
        for line in out.getvalue().splitlines()[2], out.getvalue().splitlines()[-1]:
            words = shlex.split(line.split(" && ")[-1])
            assert [w for w in words if w.startswith("--web-port")] == option, line


# -- rc map --resume after Ctrl-C ---------------------------------------------------------

def test_resume_of_a_map_whose_tasks_ended_after_ctrl_c_says_where_their_outputs_are(
        cluster_home):
    """Ctrl-C with 4 tasks running, then `rc map --resume 9` once they had
    ended: 'every input completed; nothing to run', and their outputs, never
    printed by the interrupted run, were nowhere it said."""
    config, connection = cluster_home
    with db.write(connection):
        group_id = connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
            " include_new) VALUES (?, 'shell', ?, '{}', '{}', 0)",
            (time.time(), db.dumps({"command": "echo {}"}))).lastrowid
        connection.execute("INSERT INTO maps(group_id, inputs) VALUES (?, 2)", (group_id,))
    for job, value in enumerate(("a", "b"), 1):
        task_id = tasks.submit(connection, config, "shell", {"command": "echo " + value},
                               group_id=group_id)
        with db.write(connection):
            connection.execute("INSERT INTO map_jobs(group_id, job, input, task_id)"
                               " VALUES (?, ?, ?, ?)", (group_id, job, value, task_id))
            connection.execute("UPDATE tasks SET state = 'completed', finished_at = ?"
                               " WHERE task_id = ?", (time.time(), task_id))
    status, out, err = run_command("map", "--resume", str(group_id))
    assert (status, out) == (0, ""), err
    assert ("map %d: 2 inputs (2 completed before; 0 to run again, 0 still queued or running;"
            " their outputs: `rc group %d`)\n" % (group_id, group_id)) in err
    assert "every input completed; nothing to run" in err


# -- rc submit shell --file: a script's #! line ---------------------------------------------

BASH_SCRIPT = b"""#!/bin/bash
words=(one two three)
echo "${words[1]} $GREETING $(cat a.txt)"
"""
ENV_SCRIPT = b"#!/usr/bin/env python3\nimport sys\nprint('python', sys.argv[0].endswith('go.py'))\n"
MISSING_SCRIPT = b"#!/no/such/dir/no-such-shell\necho plain sh\n"


@also_36
def test_a_shell_script_from_a_file_runs_with_its_own_interpreter(start, files, python):
    """`rc submit shell --file count.sh --input photos/` with count.sh
    beginning `#!/bin/bash`: the worker ran `sh count.sh`, and dash said
    `Syntax error: "(" unexpected` at its first array. The #! line's
    interpreter runs it now (found on PATH by name when its path is not
    there, as on Termux); one with no such interpreter still runs with sh."""
    worker, link = start(python=python)
    text = files.add(b"photos\n")
    results = {}
    for task_id, script in enumerate((BASH_SCRIPT, ENV_SCRIPT, MISSING_SCRIPT), 1):
        results[task_id] = run(link, task_id, "shell", {
            "file": "go.py" if script is ENV_SCRIPT else "go.sh", "env": {"GREETING": "hi"},
            "inputs": [dict(files.add(script), path="go.py" if script is ENV_SCRIPT else "go.sh"),
                       dict(text, path="a.txt")]})
    assert [r["status"] for r in results.values()] == ["completed"] * 3, results
    assert results[1]["result"]["output"] == "two hi photos\n"
    assert results[2]["result"]["output"] == "python True\n"
    assert results[3]["result"]["output"] == "plain sh\n"


def test_ctrl_c_says_how_many_tasks_run_on_once_it_has_been_answered(cluster_home, add_device,
                                                                        monkeypatch):
    """Ctrl-C on a terminal with 4 tasks running and 2 queued, answered y a
    few seconds later: 'map 10: 0 queued tasks cancelled; 4 running ones
    finish', though those 4 had ended and the 2 run meanwhile; the count
    was the one from before the question."""
    import types
    from rc import map_cli
    config, connection = cluster_home
    add_device("phone")
    group_id = shell_group(connection)
    ids = [tasks.submit(connection, config, "shell", {"command": "sleep 3"}, group_id=group_id)
           for _ in range(3)]
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'phone',"
                           " started_at = ? WHERE task_id IN (?, ?)",
                           (time.time(),) + tuple(ids[:2]))

    def answered_late(err, question):
        assert question == "cancel the 1 queued tasks of map %d? [y/N] " % group_id
        with db.write(connection):        # meanwhile the two end, the third starts
            connection.execute("UPDATE tasks SET state = 'completed', finished_at = ?"
                               " WHERE task_id IN (?, ?)", (time.time(),) + tuple(ids[:2]))
            connection.execute("UPDATE tasks SET state = 'running', device_id = 'phone',"
                               " started_at = ? WHERE task_id = ?", (time.time(), ids[2]))
        return True
    monkeypatch.setattr(map_cli, "ask", answered_late)
    plan = map_cli.Plan(group_id, "shell", map_cli.Template("sleep 3", "the command"), {}, [],
                        {}, {}, None, 3)
    err = io.StringIO()
    context = types.SimpleNamespace(connection=connection, config=config, out=io.StringIO(),
                                    err=err, audit=lambda *args, **fields: None)
    arguments = types.SimpleNamespace(keep_order=False, results=None, progress=False,
                                      resume=None, halt=None)
    assert map_cli.Runner(plan, arguments, context, None).interrupted() == 130
    assert "map %d: 0 queued tasks cancelled; 1 assigned or running ones finish;" % group_id \
        in err.getvalue()
