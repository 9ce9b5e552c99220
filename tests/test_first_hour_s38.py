"""A new user's first hour, session 38, from the README and docs/ alone on a
fresh clone: a Python user moving a ProcessPoolExecutor program onto the
fleet with /client.py (3.6, 3.8, 3.12, 3.13 against a 3.6 worker and the
local one), then a shell user of GNU Parallel and xargs with `rc map`, its
files, pipelines and the dashboard on a phone. Each test fails without its
fix; they share one cluster."""
import json
import os
import re
import shlex
import subprocess
import urllib.parse
import urllib.request

import pytest

from cluster_harness import RC, with_the_local_worker
from rc import client
from test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

TIMEOUT = 60        # seconds any one task may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_local_worker(tmp_path_factory.mktemp("first-hour-s38"))


def test_a_task_file_with_a_newline_in_its_name_downloads(cluster, tmp_path):
    """`rc map --files weird/*` took a file named "new<newline>line.txt"
    and its task's output came back with `rc get`, but the dashboard's link
    to it (GET /api/v1/tasks/ID/files/new%0Aline.txt.gz), and the client's
    `get((task_id, name))`, answered 404 `Not found`: Bottle's `:path`
    stops at a newline, so no route matched."""
    name = "new\nline.txt"
    (tmp_path / name).write_text("two lines\n")
    done = subprocess.run([RC, "map", "gzip -kf {}", "--files", name, "--output", "{}.gz",
                           "--into", "out"], cwd=str(tmp_path), env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    task_id = cluster.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
    with client.Cluster(cluster.url, cluster.token) as rc:
        assert sorted(entry["name"] for entry in rc.files(task_id)) == [name, name + ".gz"]
        assert rc.get((task_id, name)) == b"two lines\n"
        assert rc.get((task_id, name + ".gz")) == (tmp_path / "out" / (name + ".gz")).read_bytes()
    url = "%s/api/v1/tasks/%d/files/%s" % (cluster.url, task_id, urllib.parse.quote(name))
    assert "%0A" in url          # the dashboard's link, as encodeURIComponent makes it
    assert subprocess.run(["curl", "-fsS", url], stdout=subprocess.PIPE,
                          timeout=30).stdout == b"two lines\n"


def map_group(cluster, stderr):
    """The map number `rc map` printed first on stderr (`map 12: 40 inputs`)."""
    first = stderr.splitlines()[0]
    assert first.startswith("map "), stderr
    return int(first.split()[1].rstrip(":"))


def test_rc_map_into_head_stops_queuing_and_says_so(cluster, tmp_path):
    """`seq 40 | rc map 'sleep 0.3; echo {}' | head -1`, as with GNU
    Parallel or xargs, printed one line; rc map then died of the closed
    pipe (status 141) without a word, and every one of the 40 tasks still
    ran on the fleet, unseen. Now it cancels what is queued, as GNU
    Parallel and xargs start nothing more once their output is gone, and
    one line says so and how to run the rest."""
    done = subprocess.run(
        ["bash", "-c", "seq 40 | %s map 'sleep 0.3; echo {}' | head -1;"
         " echo \"status ${PIPESTATUS[1]}\"" % RC], env=cluster.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].isdigit() and lines[1] == "status 141", done
    group_id = map_group(cluster, done.stderr)
    states = dict(cluster.db.execute("SELECT state, count(*) FROM tasks WHERE group_id = ?"
                                     " GROUP BY state", (group_id,)).fetchall())
    assert "queued" not in states and states.get("cancelled", 0) > 20, states
    said = done.stderr.splitlines()[-1]
    assert said.startswith("map %d: its output was closed (a reader such as `head` left): "
                           % group_id), done.stderr
    assert said.endswith("`rc map --resume %d` runs the rest again" % group_id)
    assert "Traceback" not in done.stderr


def test_an_executor_says_when_the_device_lacks_a_module_of_yours(cluster, tmp_path,
                                                                   monkeypatch):
    """A ProcessPoolExecutor program whose function uses a helper module
    beside it (`import helpers`, then `helpers.ratio(data)`) moved to
    `Executor` failed with a bare `ModuleNotFoundError: No module named
    'helpers'` from the device: true, and documented, but nothing in it
    says that the module is the user's own file, which the device cannot
    have, nor what to do. The message now says both; the advice holds."""
    (tmp_path / "u38_helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "u38_job.py").write_text(
        "import u38_helpers\n"
        "from u38_helpers import double\n\n\n"
        "def whole(x):\n"
        "    return u38_helpers.double(x)\n\n\n"
        "def by_value(x):\n"
        "    return double(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import u38_job
    with client.Executor(cluster.url, cluster.token) as executor:
        with pytest.raises(ModuleNotFoundError) as raised:
            executor.submit(u38_job.whole, 4).result(TIMEOUT)
        assert executor.submit(u38_job.by_value, 4).result(TIMEOUT) == 8
    told = str(raised.value)
    assert told.startswith("No module named 'u38_helpers' (on the device: u38_helpers is a"
                           " module of yours, %s, " % (tmp_path / "u38_helpers.py")), told
    assert "`from u38_helpers import NAME` sends NAME with the function" in told
    assert raised.value.name == "u38_helpers"
    assert isinstance(raised.value.__cause__, client.RemoteTraceback)


def test_a_missing_library_module_is_left_as_the_device_said_it():
    """A module that is no file of this machine (a package the device
    lacks) keeps its own message: the advice is for a user's own file."""
    error = ModuleNotFoundError("No module named 'nowhere_u38'", name="nowhere_u38")
    client.say_own_module(error)
    assert str(error) == "No module named 'nowhere_u38'"
    error = ModuleNotFoundError("No module named 'json'", name="json")
    client.say_own_module(error)
    assert str(error) == "No module named 'json'"


def test_a_downloaded_task_file_keeps_its_name(cluster):
    """The dashboard's link to a task's file `it's "q".txt` (or `été.txt`)
    saved it as `it_s__q_.txt` (`_t_.txt`): rc-web's Content-Disposition
    named it with every other character replaced, and a browser takes that
    over the link's own `download` name. filename* now carries the name."""
    names = ["it's \"q\".txt", "été notes.txt", "plain-name.txt"]
    command = "; ".join("printf x > %s" % shlex.quote(name) for name in names)
    task_id = int(cluster.rc("submit", "shell", command, "--output", "*.txt").stdout)
    assert cluster.rc("wait", str(task_id), "--timeout", str(TIMEOUT)).returncode == 0
    for name in names:
        url = "%s/api/v1/tasks/%d/files/%s" % (cluster.url, task_id, urllib.parse.quote(name))
        with urllib.request.urlopen(url, timeout=30) as answer:
            said = answer.headers["Content-Disposition"]
            assert answer.read() == b"x"
        assert said.startswith('attachment; filename="'), said
        if name == "plain-name.txt":
            assert said == 'attachment; filename="plain-name.txt"'
        else:
            given = said.split("filename*=UTF-8''", 1)[1]
            assert urllib.parse.unquote(given) == name, said


def test_gnu_parallel_and_xargs_options_are_named_with_what_to_do(cluster):
    """Habit typed `rc map -j 4 ...`, `--bar`, `-a list.txt`: `rc: error:
    unrecognized arguments: -j`, with no word of why. Worse, `find ...
    -print0 | rc map -0 gzip` ran a task: argparse took `-0` (a number to
    it) for the command, `gzip` for its one input, and the task failed
    with status 127 (`-0: not found`). Each is now a usage error that says
    what rc map does instead, and nothing is queued."""
    tasks_before = cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    for words, instead in [(["-j", "4", "echo {}", "a"], "as many tasks at once as the fleet"),
                           (["-j4", "echo {}", "a"], "free slots"),
                           (["--jobs=4", "echo {}", "a"], "free slots"),
                           (["-0", "gzip"], "one input a line of stdin"),
                           (["echo {}", "--bar", "a"], "--progress"),
                           (["echo {}", "-a", "list.txt"], "rc map CMD < FILE"),
                           (["echo {}", "::::", "list.txt"], "rc map CMD < FILE"),
                           (["-I{}", "echo {}", "a"], "{} is the input")]:
        done = cluster.rc("map", *words, check=False)
        assert done.returncode == 2, (words, done)
        option = words[0] if words[0].startswith("-") else words[1]
        assert done.stderr.startswith("rc: error: %s is GNU Parallel's or xargs' option, not"
                                      " rc map's: " % option), done.stderr
        assert instead in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == tasks_before
    # An input that is such a word, after --, is an input as ever.
    done = cluster.rc("map", "--dry-run", "echo {}", "--", "-0", "-j4")
    assert done.stdout == "echo -0\necho -j4\n"


def test_rc_map_says_when_its_inputs_are_files_here(cluster, tmp_path):
    """xargs' habit, `ls *.txt | rc map 'wc -l'`, sends each file's name
    only: every task failed `wc: a.txt: No such file or directory` on its
    device, without a word that the inputs were files here (the note for
    a file the command names did not look at the inputs). One line now
    says so and that --files sends them; with --files, no note."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("one\ntwo\n")

    def rc_map(*words):
        return subprocess.run([RC, "map"] + list(words), input="a.txt\nb.txt\n",
                              cwd=str(tmp_path), env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    done = rc_map("wc -l")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        "rc map: note: the inputs 'a.txt' and 'b.txt' are files here, but each task runs in"
        " an empty directory on a device, where the command will not find them; --files"
        " sends each input's file to its task (bin/rc map CMD --files *.txt)")
    done = rc_map("wc -l", "-k", "--files", "a.txt", "b.txt")
    assert done.returncode == 0 and "note" not in done.stderr, done.stderr
    assert done.stdout == "2 a.txt\n2 b.txt\n"


def test_rc_map_says_when_inputs_leave_no_output_file(cluster, tmp_path):
    """`rc map 'gzip -k {}' --files *.log --output '{.}.gz' --into out/`
    (a slip: gzip writes a.log.gz) ended with status 0, out/ empty, and not
    a word: GNU Parallel's --return complains of a file that is not there.
    The first such input is named with the files it should have left, and
    the end says how many."""
    into = tmp_path / "out"
    done = cluster.rc("map", "echo {} > {}.txt", "a", "b", "c", "-k", "--output", "{}.gz",
                      "--into", str(into))
    lines = done.stderr.splitlines()
    group_id = map_group(cluster, done.stderr)
    assert re.fullmatch(r"map %d: input \d \('([abc])'\) completed but left no file that"
                        r" --output '\1\.gz' names \(`rc files \d+` lists what its task has\)"
                        % group_id, lines[1]), done.stderr
    assert lines[2:] == ["map %d: 3 completed inputs left no file that --output names"
                         % group_id], done.stderr
    assert not into.exists() or not list(into.iterdir())
    done = cluster.rc("map", "echo {} > {}.txt", "a", "b", "--output", "{}.txt",
                      "--into", str(into))
    assert len(done.stderr.splitlines()) == 1, done.stderr      # map N: 2 inputs
    assert sorted(p.name for p in into.iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("port", ["tcp_port", "files_port"])
def test_the_client_pointed_at_a_devices_port_says_so(cluster, port, monkeypatch):
    """RC_URL=http://nas:8080, the port `rc join` prints for the devices:
    `Cut: no answer from http://nas:8080: [Errno 104] Connection reset by
    peer`, after a warning that it waits for it to answer again (a
    restart?). The error now asks whether that is rc-web and names the
    dashboard's port."""
    monkeypatch.setattr(client, "RECONNECT_DELAY", 0.01)     # its tries, without the waits
    url = "http://127.0.0.1:%d" % getattr(cluster.config, port)
    with client.Cluster(url, cluster.token) as rc:
        with pytest.raises(client.ClusterError) as raised:
            rc.submit("echo", "hi").result(TIMEOUT)
    assert str(raised.value).endswith(
        " (is %s rc-web? The client wants the dashboard's address, port 5000 unless"
        " RC_WEB_PORT moved it, not the devices' ports, 8080 and 8081)" % url), raised.value


def test_a_value_inside_the_commands_own_quotes_stays_one_value(cluster, tmp_path):
    """`rc map "echo '{}'"`, a habit from find -exec and xargs -I: each value
    was shlex-quoted as if bare, so inside the user's quotes it came out
    unquoted: `it's` failed (Unterminated quoted string), `a b` lost its
    quoting, and an input `x$(id)` ran `id`, where docs/map.md promises an
    input is never run as code. Inside '...' and "..." a value is now
    escaped for them; python_exec and python_eval refuse a replacement
    string inside a string literal of the code, where repr() would end it."""
    marker = tmp_path / "ran"
    hostile = "x$(touch %s)`touch %s`" % (marker, marker)
    values = ["a b", "it's", hostile, 'q"\\', "two\nlines"]
    done = cluster.rc("map", "--dry-run", "echo '{}' \"{/}\" {} \\\"{}", "--", *values)
    assert done.stdout.split("\n")[:2] == [
        "echo 'a b' \"a b\" 'a b' \\\"'a b'", "echo 'it'\\''s' \"it's\" 'it'\"'\"'s' \\\"'it'\"'\"'s'"]
    done = cluster.rc("map", "-k", "printf '%s|' '{}' \"{}\" {} \\\"{}; echo", "--", *values)
    assert done.stdout == "".join("%s|%s|%s|\"%s|\n" % ((value,) * 4) for value in values)
    assert not marker.exists()
    for code in ("len('{}')", 'print("""{/.}""")', "print('%s' % '{.}')"):
        done = cluster.rc("map", "--type", "python_eval" if code.startswith("len") else
                          "python_exec", code, "a", check=False)
        assert done.returncode == 2 and done.stderr.startswith(
            "rc: error: a replacement string inside a string literal of the code"), done.stderr
    done = cluster.rc("map", "--type", "python_exec", "-k", "print('job {#}', {})", "a", "b")
    assert done.stdout == "job 1 a\njob 2 b\n"


def test_executor_takes_max_workers_first_as_process_pool_executor_does(cluster,
                                                                         monkeypatch):
    """`ProcessPoolExecutor(4)` changed to `Executor(4)`, the one-line
    change the README promises: `AttributeError: 'int' object has no
    attribute 'decode'`, since Executor's first parameter is the url. A
    number there is max_workers now (ignored, as by name); a url that is
    no string is a TypeError that says so."""
    monkeypatch.setenv("RC_URL", cluster.url)
    monkeypatch.setenv("RC_TOKEN", cluster.token)
    with client.Executor(4) as executor:
        assert list(executor.map(abs, [-1, -2])) == [1, 2]
    with pytest.raises(TypeError) as raised:
        client.Cluster(5000)
    assert str(raised.value) == "url must be a string like http://HOST:PORT, not 5000"


def pool_module(tmp_path, monkeypatch):
    """A program's module of a ProcessPoolExecutor's habits: an initializer
    that sets a global its calls read, a call that names its process."""
    (tmp_path / "u38_pool.py").write_text(
        "import os\n\n"
        "SETTINGS = {}\n\n\n"
        "def setup(scale, fail=False):\n"
        "    if fail:\n"
        "        raise LookupError('no settings')\n"
        "    SETTINGS['scale'] = scale\n\n\n"
        "def scaled(x):\n"
        "    return SETTINGS.get('scale'), x, os.getpid()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import u38_pool
    return u38_pool


def test_executor_takes_process_pool_executors_other_arguments(cluster, tmp_path,
                                                               monkeypatch):
    """`ProcessPoolExecutor(max_workers=4, initializer=setup, initargs=(3,))`
    with Executor in its place: `TypeError: unknown task option initargs,
    initializer`; `mp_context=` and `max_tasks_per_child=` alike. The
    initializer now runs in each task's process before its calls (as in
    each of a pool's processes), max_tasks_per_child gives each call of a
    map's chunk a process of its own, and mp_context is accepted."""
    pool = pool_module(tmp_path, monkeypatch)
    with client.Executor(cluster.url, cluster.token, max_workers=4, initializer=pool.setup,
                         initargs=(3,), mp_context=None) as executor:
        assert executor.submit(pool.scaled, 1).result(TIMEOUT)[:2] == (3, 1)
        assert [r[:2] for r in executor.map(pool.scaled, [1, 2, 3], chunksize=3)] == [
            (3, 1), (3, 2), (3, 3)]
        packed = [executor.submit(pool.scaled, x) for x in range(6)]
        assert [f.result(TIMEOUT)[:2] for f in packed] == [(3, x) for x in range(6)]
    with client.Executor(cluster.url, cluster.token, max_tasks_per_child=1) as executor:
        pids = {r[2] for r in executor.map(pool.scaled, [1, 2, 3], chunksize=3)}
        assert len(pids) == 3
    with client.Executor(cluster.url, cluster.token, initializer=pool.setup,
                         initargs=(3, True)) as executor:
        with pytest.raises(LookupError):
            executor.submit(pool.scaled, 1).result(TIMEOUT)
    with pytest.raises(TypeError):
        client.Executor(cluster.url, cluster.token, initializer=lambda: None)


def test_a_big_maps_page_reads_a_bounded_part_of_it(cluster):
    """The dashboard's map page read GET /api/v1/groups/ID whole, every
    2 s: for `seq 100000 | rc map ...` 10 MB a read, and a phone showed
    its first row after 45 s (211 MB of JavaScript heap). `?limit=N`
    answers N tasks, those that did not complete first, with the summary
    of all and how many were left out ("more"); the page asks for 500."""
    done = cluster.rc("map", "test {} -ne 3 && test {} -ne 9", *[str(n) for n in range(1, 13)],
                      check=False)
    assert done.returncode == 2, done.stderr
    group_id = map_group(cluster, done.stderr)
    url = "%s/api/v1/groups/%d" % (cluster.url, group_id)
    with urllib.request.urlopen(url + "?limit=4", timeout=30) as answer:
        part = json.loads(answer.read())
    assert part["summary"] == {"tasks": 12, "completed": 10, "failed": 2}
    assert part["more"] == 8 and len(part["tasks"]) == 4
    assert [(t["input"], t["state"]) for t in part["tasks"]] == [
        ("3", "failed"), ("9", "failed"), ("1", "completed"), ("2", "completed")]
    with urllib.request.urlopen(url, timeout=30) as answer:
        whole = json.loads(answer.read())
    assert "more" not in whole and [t["input"] for t in whole["tasks"]] == [
        str(n) for n in range(1, 13)]
    with open(os.path.join(os.path.dirname(RC), "..", "share", "web", "dashboard.js")) as f:
        assert '"/api/v1/groups/" + state.id + "?limit=" + GROUP_VIEW_TASKS' in f.read()


def test_rc_files_of_a_maps_number_says_it_is_a_maps(cluster, tmp_path):
    """`rc map ... --output '{}.gz'` prints `map 12: 3 inputs`; `rc files 12`
    and `rc get 12` then took 12 for a task's id: an empty table with
    status 0, or "task 12 has no output files: it was submitted without
    --output", of another task. Each now says 12 is also a map's number
    and where its tasks' files are."""
    def newest(table, column):
        return cluster.db.execute("SELECT coalesce(max(%s), 0) FROM %s"
                                  % (column, table)).fetchone()[0]
    # A task, without files, whose id is the number the next map gets.
    while newest("tasks", "task_id") < newest("task_groups", "group_id") + 1:
        cluster.rc("submit", "echo", "a task without files")
    (tmp_path / "a.txt").write_text("a\n")
    done = cluster.rc("map", "gzip -kf {}", "--files", str(tmp_path / "a.txt"), "--output",
                      "{}.gz", "--into", str(tmp_path / "out"))
    group_id = map_group(cluster, done.stderr)
    if cluster.db.execute("SELECT count(*) FROM task_files WHERE task_id = ?",
                          (group_id,)).fetchone()[0]:
        pytest.skip("task %d, of the map's number, has files of its own" % group_id)
    note = ("%d is also a map's number (`map %d: ... inputs`): `rc group %d` lists the map's"
            " tasks, whose files `rc files TASK` and `rc get TASK` show"
            % (group_id, group_id, group_id))
    listed = cluster.rc("files", str(group_id))
    assert listed.stderr == "rc: task %d has no files; %s\n" % (group_id, note)
    got = cluster.rc("get", str(group_id), "-o", str(tmp_path / "got"), check=False)
    assert got.returncode == 1 and got.stderr.rstrip("\n").endswith("; " + note), got.stderr


def test_a_line_of_stdin_that_is_not_utf8_is_shown(cluster):
    """`ls | rc map ...` in a directory with a Latin-1 name said only
    `stdin line 2 is not UTF-8 text`: which bytes, and what to do, were
    left to find. The line is shown as bytes, with the way out."""
    done = subprocess.run([RC, "map", "echo {}"], input=b"ok\ncaf\xe9.txt\n", env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "rc: error: stdin line 2 is not UTF-8 text: 'caf\\xe9.txt' (rc map takes UTF-8"
        " lines; iconv -f latin1 -t utf8 makes them of a Latin-1 list)\n")


def test_rc_map_into_a_reader_that_left_after_every_task_ran(cluster):
    """The same closed output once every task has ended: nothing is left
    to cancel or run again, and the line says where the outputs are."""
    done = subprocess.run(["bash", "-c", "%s map --type echo '{}' a | true;"
                           " echo \"status ${PIPESTATUS[0]}\"" % RC], env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.stdout == "status 141\n", done
    group_id = map_group(cluster, done.stderr)
    assert done.stderr.splitlines()[1:] == [
        "map %d: its output was closed (a reader such as `head` left); every task had run:"
        " `rc group %d` shows their outputs" % (group_id, group_id)]


PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}


def test_a_maps_page_says_what_it_runs_first(cluster):
    """A map's page on a phone: `Map 23 · shell`, then its tasks; what the
    map ran was in its Payload, below every row (500 on a big map). Maps
    of one day are told apart by their command: the Summary says it."""
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    done = cluster.rc("map", "echo {} && date +%s", "alpha", "beta")
    group_id = map_group(cluster, done.stderr)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(**PHONE).new_page()
            page.goto("%s/#/map/%d" % (cluster.url, group_id))
            summary = page.locator("section:has(h2:text-is('Summary')) dl")
            summary.locator("dd code").wait_for(timeout=30000)
            assert summary.locator("dt").first.inner_text() == "runs"
            assert summary.locator("dd code").inner_text() == "echo {} && date +%s"
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.screenshot(path=os.path.join(ARTIFACTS, "s38_map.png"))
        finally:
            browser.close()
