"""`rc map` as a GNU Parallel user drives it from a shell (session 44): a
Ctrl-C in a shell loop, a progress bar on a narrow terminal while stdout
goes to a file, output names near the 255-byte limit, an empty stdin, a
map of tasks that run longer than the recheck interval, a file whose name
begins with a dash, --into onto a file, and Ctrl-D at the Ctrl-C question.
One cluster with one 4-slot worker for them all."""
import fcntl
import os
import re
import signal
import struct
import subprocess
import termios
import time

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import db, tasks
from test_map import rc_map, read_until

DEVICE = "map44-worker"
TIMEOUT = 120       # seconds any one `rc map` may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # 1 s, not 5 s: rc map says why nothing ended after this long.
    cluster = Cluster(tmp_path_factory.mktemp("map44-cluster"), map_recheck_interval=1.0)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")
        cluster.start_worker(DEVICE, "--slots", "4")
        wait_for(lambda: DEVICE in online(cluster), 30, "the map worker online")
        yield cluster
    finally:
        cluster.stop()


def groups(cluster):
    return cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0]


def hears_ctrl_c():
    """A child started from a background job inherits SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def on_a_terminal(columns=80):
    """(the terminal's side, the program's side) of a new pty `columns` wide."""
    terminal, device = os.openpty()
    fcntl.ioctl(device, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return terminal, device


def test_ctrl_c_stops_the_shell_loop_that_runs_rc_map(cluster):
    """A shell that hears Ctrl-C while it waits for a child goes on with its
    loop unless the child died of SIGINT: rc map exited 130, and the next
    map was queued after the user had pressed Ctrl-C."""
    cluster.rc("drain", DEVICE)             # the tasks wait in the queue
    try:
        loop = subprocess.Popen(
            ["bash", "-c", 'for i in 1 2; do echo "loop $i"; "$0" map "echo {}" a; done;'
             ' echo after', RC], env=cluster.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            start_new_session=True, preexec_fn=hears_ctrl_c)
        assert loop.stdout.readline() == "loop 1\n"
        first = loop.stderr.readline()
        assert re.match(r"map \d+: 1 input$", first), first
        group_id = int(first.split()[1].rstrip(":"))
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[0], 30,
            "the map's task queued")
        os.killpg(loop.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole job
        out, err = loop.communicate(timeout=TIMEOUT)
    finally:
        cluster.rc("resume", DEVICE)
    assert (loop.returncode, out) == (-signal.SIGINT, ""), err
    assert "map %d interrupted" % group_id in err
    assert groups(cluster) == group_id     # no second map
    cluster.rc("map", "--cancel", str(group_id))


def test_the_progress_bar_fits_its_terminal_while_stdout_goes_to_a_file(cluster):
    """shutil measures stdout's terminal: with stdout a file (`rc map … >
    out.txt`) the bar was 80 wide on a 40-column terminal, and each redraw
    wrapped into a new line."""
    terminal, device = on_a_terminal(columns=40)
    env = dict(cluster.env)
    env.pop("COLUMNS", None)
    try:
        process = subprocess.Popen([RC, "map", "echo {}", "a", "b", "c"], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=device, start_new_session=True)
        os.close(device)
        shown = read_until(terminal, rb" 3/3 .*\n", timeout=60)
        out = process.communicate(timeout=TIMEOUT)[0]
        assert (process.returncode, sorted(out.split())) == (0, [b"a", b"b", b"c"])
    finally:
        os.close(terminal)
    bars = [line for line in re.split(rb"[\r\n]+", shown.replace(b"\x1b[K", b""))
            if b"ETA" in line]
    assert bars and all(len(line) < 40 for line in bars), bars


def test_an_output_whose_name_is_near_the_limit_is_written_into(cluster, tmp_path):
    """A name of 245 to 255 bytes is a good file name; its temporary
    NAME.rc-partial was not ("File name too long"), so --into never had it."""
    name = "é" * 100 + "x" * 49 + ".out"            # 253 bytes
    done = rc_map(cluster, "touch {}", "--output", "{}", "--into", str(tmp_path / "out"),
                  name)
    assert done.returncode == 0, done.stderr
    assert "not written" not in done.stderr, done.stderr
    assert os.listdir(str(tmp_path / "out")) == [name]


def test_an_empty_stdin_runs_nothing_and_is_no_error(cluster):
    """`find … -newer stamp | rc map …` in cron when nothing is new: GNU
    Parallel and `xargs -r` run nothing and exit 0; rc map exited 2."""
    before = groups(cluster)
    done = rc_map(cluster, "gzip {}", stdin="")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr == "rc map: stdin gave no lines: nothing to run\n"
    assert groups(cluster) == before
    # The command and the options are still checked.
    done = rc_map(cluster, "gzip {}", "--require", "nonsense", stdin="")
    assert done.returncode == 2 and "nonsense" in done.stderr, done.stderr


def test_no_word_on_why_nothing_ended_while_a_task_of_the_map_runs(cluster):
    """'no input has ended after 1 s' is for a map that cannot run; a map
    of tasks that each take longer said it, with 'Task 4 has been running'."""
    done = rc_map(cluster, "sleep 2.5; echo {}", "a")
    assert done.returncode == 0 and done.stdout == "a\n", done.stderr
    assert "no input has ended" not in done.stderr, done.stderr


def test_a_file_whose_name_begins_with_a_dash_is_named_as_a_file(cluster, tmp_path):
    """`--files *` in a folder holding -dash.txt was refused as GNU
    Parallel's option -d."""
    for name in ("-dash.txt", "a.txt"):
        (tmp_path / name).write_text("x\n")
    done = rc_map(cluster, "cat {}", "--files", "-dash.txt", "a.txt", cwd=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == ("rc: error: -dash.txt is a file here whose name begins with -,"
                           " which reads as an option: give it as ./-dash.txt (--files ./*"
                           " keeps every name a name)\n"), done.stderr


def test_into_onto_a_file_says_it_is_no_directory(cluster, tmp_path):
    (tmp_path / "out").write_text("kept\n")
    done = rc_map(cluster, "echo {} > x", "--output", "x", "--into", "out", "a",
                  cwd=str(tmp_path))
    assert done.returncode == 2
    assert "'out' is there and is not a directory" in done.stderr, done.stderr
    assert (tmp_path / "out").read_text() == "kept\n"


def test_ctrl_d_at_the_ctrl_c_question_ends_its_line(cluster):
    """No answer (Ctrl-D) is a no; what followed was written on the
    question's line."""
    terminal, device = on_a_terminal()
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen(
            [RC, "map", "--no-progress", "echo {}", "a"], env=cluster.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=device,
            start_new_session=True,
            preexec_fn=lambda: (hears_ctrl_c(), fcntl.ioctl(2, termios.TIOCSCTTY, 0)))
        os.close(device)
        group_id = int(re.search(rb"map (\d+): 1 input", read_until(
            terminal, rb"map \d+: 1 input", timeout=60)).group(1))
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[0], 30,
            "the map's task queued")
        process.send_signal(signal.SIGINT)
        shown = read_until(terminal, rb"\[y/N\] ", timeout=60)
        os.write(terminal, b"\x04")
        shown += read_until(terminal, rb"cancels them", timeout=60)
        assert process.wait(timeout=30) == -signal.SIGINT
    finally:
        cluster.rc("resume", DEVICE)
        os.close(terminal)
    assert re.search(rb"\[y/N\] \r?\nmap %d interrupted: 1 tasks queued" % group_id, shown), \
        shown
    cluster.rc("map", "--cancel", str(group_id))


def test_a_maps_cancel_holds_the_write_lock_a_batch_at_a_time(cluster_home, monkeypatch):
    """`rc map --cancel` of 27,500 queued tasks was one transaction of 14 s:
    the map still queueing them, rc-scheduler and rc-server waited past
    their busy_timeout and failed with "database is locked"."""
    config, connection = cluster_home
    with db.write(connection):
        group_id = connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, options)"
            " VALUES (?, 'echo', '{}', '{}')", (time.time(),)).lastrowid
        for number in range(5):
            tasks.insert(connection, tasks.check_task(config, "echo", {"message": str(number)}),
                         group_id=group_id)
    monkeypatch.setattr(tasks, "CANCEL_BATCH", 2, raising=False)
    transactions, write = [], db.write
    monkeypatch.setattr(db, "write", lambda c: transactions.append(1) or write(c))
    assert tasks.cancel_group(connection, group_id, active_too=True) == (5, 0)
    assert len(transactions) == 4       # 2 + 2 + 1 queued ones, then the active ones
    assert {row[0] for row in connection.execute(
        "SELECT state FROM tasks WHERE group_id = ?", (group_id,))} == {"cancelled"}


def test_a_map_cancelled_from_elsewhere_stops_and_says_so_once(cluster):
    """`rc map --cancel` from another terminal: the running rc map went on
    queueing what it had not yet queued, and said each cancelled input on
    a line of its own (80,000 lines for a map of 100,000)."""
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen([RC, "map", "echo {}"], env=cluster.env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True)
        process.stdin.write("".join("%d\n" % n for n in range(20)))
        process.stdin.close()
        group_id = int(process.stderr.readline().split()[1].rstrip(":"))
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[0] == 20,
            30, "the map's tasks queued")
        cluster.rc("map", "--cancel", str(group_id))
        out, err = process.stdout.read(), process.stderr.read()
        process.wait(timeout=TIMEOUT)
    finally:
        cluster.rc("resume", DEVICE)
    assert (process.returncode, out) == (20, ""), err
    assert "map %d: cancelled (`rc map --cancel %d`)" % (group_id, group_id) in err, err
    # Its first line, perhaps why nothing ends (drained), the cancel, the count.
    assert "input 1 ('0')" not in err and len(err.splitlines()) <= 4, err


def test_a_file_name_that_is_not_utf8_is_shown_as_its_bytes(cluster, tmp_path):
    """A Latin-1 name was refused as 'bad\\udcff.txt', Python's escape."""
    with open(os.path.join(os.fsencode(str(tmp_path)), b"bad\xff.txt"), "w") as f:
        f.write("x\n")
    done = subprocess.run([RC, "map", "cat {}", "--files", b"bad\xff.txt"], env=cluster.env,
                          cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert done.stderr == ("rc: error: --files 'bad\\xff.txt': the name is not UTF-8, which a"
                           " file's name in a task's directory must be; rename it, or send it"
                           " in an archive\n"), done.stderr


def test_inputs_that_are_directories_here_get_a_note(cluster, tmp_path):
    """`ls -d */ | rc map 'du -s {}'`: each task failed on its device
    ('cannot access'), where inputs that are files here get a note."""
    (tmp_path / "photos").mkdir()
    done = rc_map(cluster, "test -d {}", stdin="photos/\n", cwd=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith(
        "rc map: note: the input 'photos/' is a directory here, but each task runs in an"
        " empty directory on a device, where the command will not find it; --files photos/*"
        " sends each of its files to a task of its own, --input photos the whole directory"
        " to every task\n"), done.stderr


def test_sigterm_says_what_goes_on_and_ends_by_it(cluster):
    """`timeout 1h rc map …` ended it without a word: the tasks went on
    unseen, and how to wait for them again or cancel them was not said."""
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen([RC, "map", "echo {}", "a"], env=cluster.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True)
        group_id = int(process.stderr.readline().split()[1].rstrip(":"))
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[0], 30,
            "the map's task queued")
        process.terminate()
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        cluster.rc("resume", DEVICE)
    assert (process.returncode, out) == (-signal.SIGTERM, ""), err
    assert "map %d terminated (SIGTERM): 1 tasks queued and 0 assigned or running go on;" \
        " `rc map --resume %d` waits for them" % (group_id, group_id) in err, err
    cluster.rc("map", "--cancel", str(group_id))
