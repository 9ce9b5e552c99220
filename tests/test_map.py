"""`rc map` end to end: the real supervisord, a real bin/worker.py with 4
slots, `bin/rc map` run as a user types it (arguments, stdin, files).
Replacement strings and their quoting, order with -k, files in and out,
--results, resume after failures and cancels, Ctrl-C, exit status, errors.
The replacement-string grammar itself is checked first without a cluster."""
import fcntl
import io
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import commands, defaults, map_cli

DEVICE = "map-worker"
TIMEOUT = 120       # seconds any one `rc map` may take here
OUTPUT_CAP = 4096   # bytes of stdout the worker sends inline


# -- the grammar, no cluster --------------------------------------------------------

@pytest.mark.parametrize("text, value, number, expected", [
    ("echo {}", "a/b.tar.gz", 7, "echo a/b.tar.gz"),
    ("{/} {.} {/.} {//} {#}", "a/b.tar.gz", 7, "b.tar.gz a/b.tar b.tar a 7"),
    ("{//} {/.}", "plain", 1, ". plain"),
    ("{.}", "dir.d/file", 1, "dir.d/file"),        # the extension of the last part only
    ("cat", "x", 3, "cat x"),                       # none given: the input is appended
    ("echo {#}", "x", 3, "echo 3"),                 # {#} alone counts as given
    ("awk '{print $1}' {}", "f", 1, "awk '{print $1}' f"),   # the command's own braces
])
def test_replacement_strings(text, value, number, expected):
    assert map_cli.Template(text, "the command", append_input=True).fill(
        value, number) == expected


def test_values_are_quoted_into_one_shell_word():
    template = map_cli.Template("rm {}", "the command", append_input=True)
    assert template.fill("a; rm -rf ~", 1, map_cli.QUOTERS["shell"]) == "rm 'a; rm -rf ~'"
    assert template.fill("it's", 1, map_cli.QUOTERS["shell"]) == "rm 'it'\"'\"'s'"


@pytest.mark.parametrize("token", ["{%}", "{1}", "{..}", "{= s/a/b/ =}", "{+/}"])
def test_unknown_replacement_strings_are_named(token):
    with pytest.raises(map_cli.MapUsageError) as raised:
        map_cli.Template("echo %s" % token, "the command")
    assert token in str(raised.value) and "{/.}" in str(raised.value)


def test_the_web_terminal_refuses_map():
    with pytest.raises(commands.CommandError) as raised:
        commands.web_access(["map", "echo", "1"])
    assert "POST /api/v1/tasks" in str(raised.value)


def test_map_is_in_the_help(cluster_home):
    out = io.StringIO()
    assert commands.run_command(["help"], out, io.StringIO()) == 0
    assert "map" in out.getvalue() and "GNU Parallel" in out.getvalue()
    out = io.StringIO()
    assert commands.run_command(["help", "map"], out, io.StringIO()) == 0
    assert "--keep-order" in out.getvalue() and "{/.}" in out.getvalue()
    err = io.StringIO()
    assert commands.run_command(["help", "mapp"], io.StringIO(), err) == 2
    assert "no command 'mapp'" in err.getvalue()


# -- on a real cluster ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # rc map reads its group again, and says why nothing ends, after 1 s,
    # not the default 5 s that two tests here waited out.
    cluster = Cluster(tmp_path_factory.mktemp("map-cluster"), map_recheck_interval=1.0)
    cluster.start()
    try:
        cluster.supervisorctl("stop", "rc-worker")     # one worker: this test's
        # A small inline cap: a longer stdout comes back as a stored stream.
        cluster.start_worker(DEVICE, "--slots", "4", "--output-cap", str(OUTPUT_CAP))
        wait_for(lambda: DEVICE in online(cluster), 30, "the map worker online")
        yield cluster
    finally:
        cluster.stop()


def rc_map(cluster, *arguments, stdin="", cwd=None):
    return subprocess.run([RC, "map"] + list(arguments), env=cluster.env, cwd=cwd,
                          input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)


def map_id(stderr):
    """The map's number from its first line, `map 12: 3 inputs`."""
    first = stderr.splitlines()[0]
    assert first.startswith("map ") and " input" in first, stderr
    return int(first.split()[1].rstrip(":"))


def groups(cluster):
    return cluster.db.execute("SELECT count(*) FROM task_groups").fetchone()[0]


def test_replacements_quoting_and_order(cluster, drop_dir):
    hostile = "$(touch %s/pwned); touch %s/pwned2" % (drop_dir, drop_dir)
    done = rc_map(cluster, "printf '%s|%s|%s|%s|%s|%s\\n' {} {/} {.} {/.} {//} {#}", "-k",
                  "a/b.tar.gz", "x y", "it's", hostile)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "a/b.tar.gz|b.tar.gz|a/b.tar|b.tar|a|1",
        "x y|x y|x y|x y|.|2",
        "it's|it's|it's|it's|.|3",
        "%s|%s|%s|%s|%s|4" % (hostile, hostile.rsplit("/", 1)[1], hostile,
                              hostile.rsplit("/", 1)[1], hostile.rsplit("/", 1)[0])]
    assert not os.listdir(str(drop_dir)), "an input ran as a command"
    assert map_id(done.stderr) > 0


def test_input_is_appended_without_replacement_strings(cluster):
    done = rc_map(cluster, "printf '[%s]\\n'", "-k", "one two", "three")
    assert (done.returncode, done.stdout) == (0, "[one two]\n[three]\n"), done.stderr


def test_inputs_after_options_and_after_a_double_dash(cluster):
    done = rc_map(cluster, "echo {}", "a", "-k", "-5", "--", "-x", "--y")
    assert (done.returncode, done.stdout) == (0, "a\n-5\n-x\n--y\n"), done.stderr
    refused = rc_map(cluster, "echo {}", "a", "--bogus")
    assert refused.returncode == 2 and "--bogus" in refused.stderr


def test_stdin_lines_are_the_inputs_and_keep_order_keeps_it(cluster):
    lines = ["%d" % n for n in range(1, 13)]
    # Early inputs sleep longest, so they end last: only -k puts them back.
    done = rc_map(cluster, "sleep 0.$(( 12 - {} ))0; echo {}", "-k",
                  stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == lines
    unordered = rc_map(cluster, "echo {}", stdin="\n".join(lines) + "\n")
    assert sorted(unordered.stdout.splitlines(), key=int) == lines


def test_an_empty_line_is_an_input_too(cluster):
    done = rc_map(cluster, "printf '<%s>\\n' {}", "-k", stdin="a\n\nb c\n")
    assert done.stdout == "<a>\n<>\n<b c>\n", done.stderr


def test_exit_status_is_the_number_of_failed_inputs(cluster):
    done = rc_map(cluster, "echo {}; exit $(( {} % 2 ))", stdin="1\n2\n3\n4\n5\n")
    assert done.returncode == 3, done.stderr
    assert sorted(done.stdout.split(), key=int) == ["1", "2", "3", "4", "5"]
    for number in (1, 3, 5):
        assert "input %d ('%d') failed" % (number, number) in done.stderr
    assert "3 of 5 inputs did not complete" in done.stderr
    one = rc_map(cluster, "exit 1", "x")
    assert one.returncode == 1 and one.stderr.startswith("map %d: 1 input\n" % map_id(one.stderr))
    assert "1 of 1 input did not complete" in one.stderr


def test_exit_status_is_capped_at_101(cluster):
    done = rc_map(cluster, "false", "--no-progress", stdin="x\n" * 105)
    assert done.returncode == 101, done.stderr
    assert "105 of 105 inputs did not complete" in done.stderr


def test_results_dir_holds_each_inputs_streams(cluster, tmp_path):
    results = tmp_path / "results"
    done = rc_map(cluster, "echo out {}; echo err {} >&2; exit {}", "--results", str(results),
                  "0", "3")
    assert done.returncode == 1, done.stderr
    first, second = results / "1", results / "2"
    assert (first / "input").read_text() == "0\n"
    assert (first / "stdout").read_text() == "out 0\n"
    assert (first / "stderr").read_text() == "err 0\n"
    assert (first / "state").read_text() == "completed\n"
    assert (second / "stdout").read_text() == "out 3\n"
    assert (second / "state").read_text() == "failed\n"
    assert (second / "exit_code").read_text() == "3\n"
    assert "err 3" in done.stderr          # the tasks' stderr reaches ours too


def test_stdout_past_the_inline_cap_comes_out_whole(cluster, tmp_path):
    size = OUTPUT_CAP * 3 + 5
    done = rc_map(cluster, "head -c %d /dev/zero | tr '\\0' {}" % size, "--results",
                  str(tmp_path), "-k", "a", "b")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a" * size + "b" * size
    assert (tmp_path / "2" / "stdout").read_text() == "b" * size


def test_long_or_undecodable_stdin_lines_are_refused(cluster):
    done = subprocess.run([RC, "map", "echo"], env=cluster.env, input=b"ok\n\xff\xfe\n",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert done.returncode == 2 and b"stdin line 2 is not UTF-8" in done.stderr
    done = subprocess.run([RC, "map", "echo"], env=cluster.env,
                          input=b"x" * (300 * 1024) + b"\n", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert done.returncode == 2 and b"stdin line 1 is over" in done.stderr


def test_files_go_in_and_outputs_come_back_into(cluster, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    done = rc_map(cluster, "tr a-z A-Z < {} > {.}.up && echo {/}", "--files", "a.txt",
                  "sub/b.txt", "--output", "{.}.up", "--into", "out", "-k", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a.txt\nb.txt\n"
    assert (tmp_path / "out" / "a.up").read_text() == "ALPHA\n"
    assert (tmp_path / "out" / "sub" / "b.up").read_text() == "BETA\n"


def test_every_task_gets_the_shared_input_and_env(cluster, tmp_path):
    (tmp_path / "sim.sh").write_text('echo "$GREETING $1"\n')
    done = rc_map(cluster, "sh sim.sh {}", "--input", "sim.sh", "--env", "GREETING=hello",
                  "-k", "ann", "bob", cwd=str(tmp_path))
    assert (done.returncode, done.stdout) == (0, "hello ann\nhello bob\n"), done.stderr


def test_python_types_get_each_input_as_a_string_literal(cluster):
    done = rc_map(cluster, "--type", "python_eval", "int({}) * 2", "-k", "1", "2", "21")
    assert (done.returncode, done.stdout) == (0, "2\n4\n42\n"), done.stderr


def test_progress_bar_when_asked(cluster):
    done = rc_map(cluster, "true", "--progress", stdin="1\n2\n3\n")
    assert done.returncode == 0
    assert "#] 3/3  100%" in done.stderr and "/s ETA" in done.stderr
    quiet = rc_map(cluster, "true", stdin="1\n")       # stderr is no terminal here
    assert "[" not in quiet.stderr


def test_resume_runs_again_only_what_did_not_complete(cluster, drop_dir):
    marker = os.path.join(str(drop_dir), "ok")
    done = rc_map(cluster, "[ {} -le 3 ] || [ -e %s ]; s=$?; echo {}; exit $s" % marker,
                  stdin="1\n2\n3\n4\n5\n")
    assert done.returncode == 2, done.stderr
    group_id = map_id(done.stderr)
    open(marker, "w").close()
    resumed = subprocess.run([RC, "map", "--resume", str(group_id), "-k"], env=cluster.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "4\n5\n"            # only the two that failed ran again
    assert "3 completed before; 2 to run again" in resumed.stderr
    tasks_in_group = cluster.db.execute("SELECT count(*) FROM tasks WHERE group_id = ?",
                                        (group_id,)).fetchone()[0]
    assert tasks_in_group == 7
    again = subprocess.run([RC, "map", "--resume", str(group_id)], env=cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=TIMEOUT)
    assert (again.returncode, again.stdout) == (0, ""), again.stderr
    assert "nothing to run" in again.stderr


def test_resume_of_files_gives_the_stored_file_again(cluster, drop_dir, tmp_path):
    marker = os.path.join(str(drop_dir), "files-ok")
    (tmp_path / "a.txt").write_text("keep a\n")
    (tmp_path / "b.txt").write_text("drop b\n")
    done = rc_map(cluster, "{ [ -e %s ] || grep -q keep {}; } && cat {}" % marker,
                  "--files", "a.txt", "b.txt", cwd=str(tmp_path))
    assert (done.returncode, done.stdout) == (1, "keep a\n"), done.stderr
    (tmp_path / "b.txt").unlink()             # the stored copy is what runs again
    open(marker, "w").close()
    resumed = rc_map(cluster, "--resume", str(map_id(done.stderr)), cwd=str(tmp_path))
    assert (resumed.returncode, resumed.stdout) == (0, "drop b\n"), resumed.stderr


def test_a_task_that_times_out_counts_as_failed(cluster):
    done = rc_map(cluster, "sleep {}", "--timeout", "1", "0", "30")
    assert done.returncode == 1, done.stderr
    assert "input 2 ('30') timed_out" in done.stderr


def hears_ctrl_c():
    """For a child that is sent SIGINT: a shell's background job (`make
    test &`, `nohup`) passes SIGINT on ignored, and Python then raises no
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_leaves_the_queue_then_cancel_and_resume(cluster):
    """Ctrl-C (no terminal here) leaves the queued tasks and says how to
    cancel or resume; --resume waits for them rather than running them
    twice; --cancel cancels; --resume then runs the cancelled ones."""
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen([RC, "map", "echo {}", "a", "b", "c"], env=cluster.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, preexec_fn=hears_ctrl_c)
        group_id = map_id(process.stderr.readline())
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ? AND state = 'queued'",
            (group_id,)).fetchone()[0] == 3, 30, "the map's tasks queued")
        first = cluster.db.execute("SELECT min(task_id) FROM tasks WHERE group_id = ?",
                                   (group_id,)).fetchone()[0]
        # Nothing can run: after a while it says why, as `rc why` would.
        notice = process.stderr.readline()
        assert notice.startswith("map %d: no input has ended after " % group_id), notice
        assert "Task %d is queued:" % first in notice
        assert "%s (drained; `rc resume %s`" % (DEVICE, DEVICE) in notice
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGINT, err     # died of it, as a shell expects
        assert "3 tasks queued and 0 assigned or running go on" in err
        assert "rc map --resume %d" % group_id in err and "rc map --cancel %d" % group_id in err
        cancelled = cluster.rc("map", "--cancel", str(group_id))
        assert "3 queued tasks cancelled" in cancelled.stdout
    finally:
        cluster.rc("resume", DEVICE)
    resumed = subprocess.run([RC, "map", "--resume", str(group_id), "-k"], env=cluster.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=TIMEOUT)
    assert (resumed.returncode, resumed.stdout) == (0, "a\nb\nc\n"), resumed.stderr
    states = [row[0] for row in cluster.db.execute(
        "SELECT state FROM tasks WHERE group_id = ? ORDER BY task_id", (group_id,))]
    assert states == ["cancelled"] * 3 + ["completed"] * 3


def read_until(fd, pattern, timeout=30):
    """What a terminal shows until `pattern` appears in it."""
    seen, deadline = b"", time.time() + timeout
    while not re.search(pattern, seen):
        assert time.time() < deadline, "no %r on the terminal: %r" % (pattern, seen)
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:            # the other side closed: it has said all
                raise AssertionError("no %r on the terminal: %r" % (pattern, seen))
    return seen


def test_ctrl_c_on_a_terminal_asks_and_cancels_the_queued_tasks(cluster):
    """stderr on a terminal: the progress bar, then on Ctrl-C the question,
    asked on the terminal (stdin is the inputs' pipe); y cancels."""
    terminal, device = pty.openpty()
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen(
            [RC, "map", "echo {}"], env=cluster.env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=device, start_new_session=True,
            preexec_fn=lambda: (hears_ctrl_c(), fcntl.ioctl(2, termios.TIOCSCTTY, 0)))
        os.close(device)
        process.stdin.write(b"a\nb\n")
        process.stdin.close()
        shown = read_until(terminal, rb"map (\d+): 2 inputs")
        group_id = int(re.search(rb"map (\d+): 2 inputs", shown).group(1))
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ? AND state = 'queued'",
            (group_id,)).fetchone()[0] == 2, 30, "the map's tasks queued")
        assert b"0/2" in read_until(terminal, rb"ETA")          # the progress bar
        process.send_signal(signal.SIGINT)
        read_until(terminal, rb"cancel the 2 queued tasks of map %d\? \[y/N\]" % group_id)
        os.write(terminal, b"y\n")
        assert process.wait(timeout=30) == -signal.SIGINT
        assert b"2 queued tasks cancelled" in read_until(terminal, rb"cancelled;")
    finally:
        cluster.rc("resume", DEVICE)
        os.close(terminal)
    states = {row[0] for row in cluster.db.execute(
        "SELECT state FROM tasks WHERE group_id = ?", (group_id,))}
    assert states == {"cancelled"}


def test_a_terminal_never_gets_a_devices_escape_sequences(cluster):
    terminal, device = pty.openpty()
    try:
        process = subprocess.Popen(
            [RC, "map", "printf '\\033]0;owned\\007\\033[31m{}\\n' >&2; exit 1", "x"],
            env=cluster.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=device,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(2, termios.TIOCSCTTY, 0))
        os.close(device)
        shown = read_until(terminal, rb"did not complete")
        assert process.wait(timeout=TIMEOUT) == 1
    finally:
        os.close(terminal)
    assert b"?]0;owned??[31mx" in shown
    assert b"\x1b]" not in shown and b"\x07" not in shown and b"\x1b[31m" not in shown


def test_resume_waits_for_tasks_still_queued(cluster):
    cluster.rc("drain", DEVICE)
    try:
        process = subprocess.Popen([RC, "map", "echo {}", "x", "y"], env=cluster.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, preexec_fn=hears_ctrl_c)
        group_id = map_id(process.stderr.readline())
        wait_for(lambda: cluster.db.execute(
            "SELECT count(*) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[0] == 2,
            30, "the map's tasks queued")
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
        resumed = subprocess.Popen([RC, "map", "--resume", str(group_id), "-k"],
                                   env=cluster.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True)
        assert "0 to run again, 2 still queued or running" in resumed.stderr.readline()
    finally:
        cluster.rc("resume", DEVICE)
    out, err = resumed.communicate(timeout=TIMEOUT)
    assert (resumed.returncode, out) == (0, "x\ny\n"), err
    assert cluster.db.execute("SELECT count(*) FROM tasks WHERE group_id = ?",
                              (group_id,)).fetchone()[0] == 2     # not run twice


@pytest.mark.parametrize("arguments, stdin, says", [
    ([], "1\n", "rc map needs a command"),
    (["echo {%}", "1"], "", "unknown replacement string {%}"),
    (["cat {}", "--files", "no-such.txt"], "", "'no-such.txt': no such file"),
    (["echo", "1", "--files", "x"], "", "not both"),
    (["echo", "1", "--into", "out"], "", "--into says where --output files go"),
    (["--resume", "999999"], "", "no map 999999"),
    (["echo", "--resume", "1"], "", "leave out the command"),
    (["echo {}", "--timeout", "-3", "1"], "", "timeout"),
    (["echo {}", "--require", "nonsense", "1"], "", "nonsense"),
    (["echo {}", "--results", "/proc/no/such", "1"], "", "cannot make directory"),
])
def test_bad_input_is_a_usage_error_and_leaves_nothing(cluster, arguments, stdin, says, tmp_path):
    before = groups(cluster)
    done = rc_map(cluster, *arguments, stdin=stdin, cwd=str(tmp_path))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr and done.stderr.startswith("rc: error: "), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert groups(cluster) == before


def test_resume_of_a_group_that_is_not_a_map(cluster):
    group_id = cluster.rc("submit", "--each", "echo", "hi").stdout.strip()
    done = rc_map(cluster, "--resume", group_id)
    assert done.returncode == 2
    assert "group %s is not a map" % group_id in done.stderr


def test_a_map_ends_even_when_the_end_of_its_tasks_left_no_event(cluster):
    """The events are how rc map learns quickly; the periodic read of the
    group is how it learns surely."""
    with cluster.db:
        cluster.db.execute(
            "CREATE TRIGGER map_test_hides_ends AFTER INSERT ON task_events"
            " WHEN NEW.state = 'completed' BEGIN"
            " DELETE FROM task_events WHERE id = NEW.id; END")
    try:
        started = time.monotonic()
        done = rc_map(cluster, "echo {}", "-k", "p", "q")
    finally:
        cluster.db.execute("DROP TRIGGER map_test_hides_ends")
    assert (done.returncode, done.stdout) == (0, "p\nq\n"), done.stderr
    # (the bound of the default 5 s: a map that waits for its events ends never)
    assert time.monotonic() - started < defaults.MAP_RECHECK_INTERVAL * 4


def test_a_map_is_one_audit_line_not_one_per_task(cluster):
    path = os.path.join(cluster.home, "log", "audit.log")
    before = open(path).read().count("map_submitted") if os.path.exists(path) else 0
    rc_map(cluster, "true", stdin="1\n2\n3\n4\n")
    deadline = time.time() + 5
    while open(path).read().count("map_submitted") == before and time.time() < deadline:
        time.sleep(0.05)
    text = open(path).read()
    assert text.count("map_submitted") == before + 1


def test_dry_run_prints_each_command_and_queues_nothing(cluster, tmp_path):
    """As GNU Parallel's --dry-run: the commands the tasks would run, in
    input order, quoted as they would be; no group, no task, no file
    stored; a bad input or --resume is refused with nothing printed."""
    before = (groups(cluster), cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0],
              cluster.db.execute("SELECT count(*) FROM files").fetchone()[0])
    done = rc_map(cluster, "--dry-run", "gzip -k {} > {/.}.{#}", "a b.log", "it's.log")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "gzip -k 'a b.log' > 'a b'.1\ngzip -k 'it'\"'\"'s.log' > 'it'\"'\"'s'.2\n", "")
    song = tmp_path / "song.wav"
    song.write_bytes(b"RIFF")
    done = rc_map(cluster, "--dry-run", "ffmpeg -i {} {/.}.mp3", "--files", str(song),
                  "--output", "{/.}.mp3")
    assert (done.returncode, done.stdout) == (0, "ffmpeg -i song.wav song.mp3\n"), done.stderr
    done = rc_map(cluster, "--dry-run", "--type", "sleep", "{}", "1", "x")
    assert done.returncode == 2 and done.stdout == "" and "input 2 ('x')" in done.stderr
    done = rc_map(cluster, "--dry-run", "--resume", "1")
    assert done.returncode == 2 and "--resume" in done.stderr
    assert (groups(cluster), cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0],
            cluster.db.execute("SELECT count(*) FROM files").fetchone()[0]) == before


def group_states(cluster, group_id):
    return dict(cluster.db.execute("SELECT state, count(*) FROM tasks WHERE group_id = ?"
                                   " GROUP BY state", (group_id,)).fetchall())


def test_halt_soon_cancels_what_is_queued_and_resume_runs_it(cluster, drop_dir):
    """GNU Parallel's --halt soon,fail=1: the first input that fails stops
    the map from starting more; the running ones finish and print (in order
    with -k), the rest count as not completed, and --resume runs them."""
    marker = os.path.join(str(drop_dir), "halt-ok")
    command = "sleep 0.3; [ {} != 1 ] || [ -e %s ] && echo {}" % marker
    done = rc_map(cluster, "--halt", "soon,fail=1", "-k", command,
                  stdin="".join("%d\n" % n for n in range(1, 41)))
    group_id = map_id(done.stderr)
    assert "halted (--halt soon,fail=1)" in done.stderr, done.stderr
    states = group_states(cluster, group_id)
    assert states.get("queued", 0) == states.get("running", 0) == 0
    completed = states.get("completed", 0)
    assert states.get("failed") == 1 and 0 < completed < 39, states
    assert done.returncode == min(40 - completed, 101)
    printed = [int(line) for line in done.stdout.split()]
    assert printed == sorted(printed) and len(printed) == completed
    assert "cancelled" not in done.stdout and done.stderr.count("cancelled") == 1, done.stderr
    open(marker, "w").close()
    resumed = subprocess.run([RC, "map", "--resume", str(group_id)], env=cluster.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(printed + [int(line) for line in resumed.stdout.split()]) == \
        list(range(1, 41))


def test_halt_now_stops_the_running_tasks_too(cluster):
    started = time.monotonic()
    done = rc_map(cluster, "--halt", "now,fail=1",
                  "if [ {} = 1 ]; then exit 3; fi; sleep 30", "1", "2", "3", "4", "5", "6")
    assert time.monotonic() - started < 25, "the running tasks were not stopped"
    states = group_states(cluster, map_id(done.stderr))
    assert states == {"failed": 1, "cancelled": 5}, states
    assert done.returncode == 6 and "running ones asked to stop" in done.stderr


def test_halt_by_share_and_bad_rules(cluster):
    done = rc_map(cluster, "--halt", "soon,fail=50%", "[ {} != 2 ]", "1", "2", "3", "4")
    assert done.returncode == 1 and "halted" not in done.stderr    # 1 of 4 is 25 %
    assert group_states(cluster, map_id(done.stderr)) == {"completed": 3, "failed": 1}
    for rule in ("later,fail=1", "soon,fail=0", "now,fail=101%", "soon", "3"):
        refused = rc_map(cluster, "--halt", rule, "true", "1")
        assert refused.returncode == 2 and "is not a --halt rule" in refused.stderr, rule
