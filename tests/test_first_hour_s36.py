"""A new user's first hour, session 36, commands copied from the README and
docs/ (issues 18 and 19) on a fresh cluster: the join line of a main node
bound to one address, the Python client's `submit(..., inputs=)`, an
Executor's traceback on a device that has no copy of the function's file,
an `--output` that names a directory, and an upload sent as a form."""
import hashlib
import json
import linecache
import os
import re
import subprocess
import sys
import types

import pytest

from cluster_harness import RC, free_port, with_the_local_worker
from rc import client

TIMEOUT = 60        # seconds any one task may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_local_worker(tmp_path_factory.mktemp("first-hour-s36"))


def test_rc_join_names_the_address_the_main_node_listens_on(cluster):
    """With `tcp_host` and `web_host` 127.0.0.1 (a cluster kept to the box,
    as this one is), `rc join` printed the machine's LAN address, where
    nothing listened: the line it says to copy could never connect. Now it
    names the address the ports are bound to."""
    out = cluster.rc("join").stdout
    lines = out.splitlines()
    assert lines[0] == "Dashboard: http://127.0.0.1:%d/" % cluster.config.web_port
    assert " --join 127.0.0.1:%d " % cluster.config.tcp_port in lines[2]
    assert lines[-1].startswith("curl -fsSO http://127.0.0.1:%d/worker.py && "
                                % cluster.config.web_port)


def test_cluster_submit_and_map_take_an_argument_with_inputs(cluster, tmp_path):
    """docs/client.md: options are `payload` (instead of `arg`) and the
    payload's `inputs`, `outputs`, ...; "a file of this machine goes with
    `put` and `inputs=`". `submit("shell", "wc -l < data.txt", inputs=...)`
    raised TypeError ("give the payload as a dict"), and so did `map`."""
    data = tmp_path / "data.txt"
    data.write_text("one\ntwo\nthree\n")
    with client.Cluster(cluster.url, cluster.token) as rc:
        stored = dict(rc.put(str(data)), path="data.txt")
        counted = rc.submit("shell", "wc -l < data.txt", inputs=[stored])
        assert counted.result(TIMEOUT).strip() == "3"
        upper = rc.submit("shell", "tr a-z A-Z < data.txt > up.txt", inputs=[stored],
                          outputs=["up.txt"], env={"LANG": "C"})
        upper.result(TIMEOUT)
        assert rc.get((upper.task_id, "up.txt")) == b"ONE\nTWO\nTHREE\n"
        assert list(rc.map("shell", ["head -1 data.txt", "tail -1 data.txt"],
                           inputs=[stored])) == ["one\n", "three\n"]
        script = dict(rc.put(b"print(open('data.txt').read().count('o'))\n"), path="job.py")
        job = rc.submit("python_exec", file="job.py", inputs=[script, stored])
        assert job.result(TIMEOUT).strip() == "2"


def failing_module():
    """A module whose file exists only here, in linecache (as a module
    typed into a notebook, or a file on a laptop): no device can read it."""
    name, path = "u36_laptop_only", "/nonexistent-u36/u36_laptop_only.py"
    source = ("import math\n\n\n"
              "def halve(x):\n"
              "    return math.floor(x) // 0\n\n\n"
              "def job(x):\n"
              "    return halve(x + 1)\n")
    module = types.ModuleType(name)
    module.__file__ = path
    linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    exec(compile(source, path, "exec"), module.__dict__)
    sys.modules[name] = module
    return module


def test_a_remote_traceback_shows_the_lines_of_a_file_the_device_lacks(cluster):
    """The function goes to the device as source, compiled under its file's
    name; its traceback showed only `File "...", line 5, in halve`, with no
    line of code, wherever the device had no copy of the file (every
    device but the laptop itself). ProcessPoolExecutor shows the lines.
    Now the device shows them from the source it was sent, packed or not."""
    module = failing_module()
    try:
        for pack in (1, 64):
            with client.Executor(cluster.url, cluster.token, pack=pack) as executor:
                with pytest.raises(ZeroDivisionError) as raised:
                    executor.submit(module.job, 3).result(TIMEOUT)
            text = raised.value.__cause__.text
            assert 'u36_laptop_only.py", line 9, in job\n    return halve(x + 1)\n' in text
            assert 'line 5, in halve\n    return math.floor(x) // 0\n' in text
    finally:
        sys.modules.pop(module.__name__, None)


def test_an_output_that_names_a_directory_says_how_to_bring_its_files(cluster):
    """`rc submit ... --output results` where results is a directory
    completed with nothing brought back and nothing said; `--output
    results/` was refused as having "empty or '.' parts". Now the first
    says, on the task's stderr, that 'results/**' brings its files; the
    second is refused saying the same; a glob that matched files too, or
    one ending in **, says nothing."""
    refused = cluster.rc("submit", "shell", "true", "--output", "results/", check=False)
    assert refused.returncode == 2
    assert "'results/' names a directory" in refused.stderr
    assert "'results/**' brings back every file under it" in refused.stderr
    make = "mkdir -p results/deep && echo 1 > results/deep/a.txt && echo 2 > b.txt"
    done = cluster.rc("submit", "shell", make, "--output", "results", "--wait", check=False)
    assert done.returncode == 0, done.stderr
    assert ("rc-worker: output 'results' is a directory; outputs are files: 'results/**'"
            " brings back the files under it") in done.stderr
    task_id = cluster.rc("submit", "shell", make, "--output", "*", "--output",
                         "results/**").stdout.strip()
    quiet = cluster.rc("wait", task_id, check=False)
    assert quiet.returncode == 0 and "rc-worker" not in quiet.stderr, quiet.stderr
    names = cluster.rc("files", task_id, "--tsv", "--no-header").stdout
    assert sorted(line.split("\t")[0] for line in names.splitlines()) == [
        "b.txt", "results/deep/a.txt"]


def test_an_upload_sent_as_a_form_is_refused_not_stored_as_the_form(cluster, tmp_path):
    """`curl -F f=@photos/a.txt .../api/v1/files`, the way most web uploads
    go, was stored with its multipart envelope as the file (201, 184 bytes
    for a 4-byte file): the task then read boundaries and headers. Now it
    is refused (415) saying to send the bytes, and nothing is stored."""
    photo = tmp_path / "a.txt"
    photo.write_text("one\n")
    url = "%s/api/v1/files" % cluster.url
    before = cluster.db.execute("SELECT count(*) FROM files").fetchone()[0]
    form = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-H", "Authorization: Bearer " + cluster.token,
         "-F", "f=@%s" % photo, url], stdout=subprocess.PIPE, universal_newlines=True,
        timeout=TIMEOUT).stdout
    body, status = form.rsplit("\n", 1)
    assert status == "415", form
    assert "--data-binary" in json.loads(body)["error"]
    assert cluster.db.execute("SELECT count(*) FROM files").fetchone()[0] == before
    raw = subprocess.run(
        ["curl", "-sS", "-H", "Authorization: Bearer " + cluster.token,
         "--data-binary", "@%s" % photo, url], stdout=subprocess.PIPE,
        universal_newlines=True, timeout=TIMEOUT).stdout
    assert json.loads(raw) == {"sha256": hashlib.sha256(b"one\n").hexdigest(), "size": 4}


@pytest.mark.parametrize("header, status, length", [
    ("bytes=0-9", 206, 10), ("bytes=-5", 206, 5), ("bytes=25-1000", 206, 5),
    ("items=0-3", 200, 30), ("bytes=0-1,4-5", 200, 30), ("bytes=30-", 416, 33)])
def test_range_reads_of_a_tasks_file(cluster, header, status, length):
    """`GET /api/v1/tasks/ID/files/NAME` with Range, as curl sends it:
    what held, and two that were 416: a unit other than bytes, which a
    server must ignore (RFC 9110, 14.2), and several ranges, which it may:
    now the whole file."""
    if not hasattr(cluster, "thirty"):
        task_id = cluster.rc("submit", "shell", "head -c 30 /dev/zero > z.bin", "--output",
                             "z.bin").stdout.strip()
        cluster.rc("wait", task_id)
        cluster.thirty = task_id
    answer = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         "-H", "Authorization: Bearer " + cluster.token, "-H",
         "Range: " + header, "%s/api/v1/tasks/%s/files/z.bin" % (cluster.url, cluster.thirty)],
        stdout=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT).stdout
    assert answer == "%d %d" % (status, length)


def test_a_laptop_without_rc_url_or_rc_token_is_told_which_is_missing(cluster, monkeypatch):
    """docs/client.md: `export RC_URL=... RC_TOKEN=...` on the laptop. With
    one forgotten the error was `cannot reach http://127.0.0.1:5000` or
    `missing or wrong admin token`; now it names the variable not set."""
    monkeypatch.delenv("RC_URL", raising=False)
    monkeypatch.delenv("RC_TOKEN", raising=False)
    monkeypatch.delenv("RC_TOKEN_FILE", raising=False)
    monkeypatch.setattr(client, "DEFAULT_URL", "http://127.0.0.1:%d" % free_port())
    with client.Cluster() as nowhere:
        with pytest.raises(client.Unreachable, match="RC_URL is not set"):
            nowhere.submit("echo", "hi").result(TIMEOUT)
    with client.Cluster(cluster.url) as tokenless:
        with pytest.raises(client.ClusterError, match="RC_TOKEN is not set"):
            tokenless.submit("echo", "hi").result(TIMEOUT)
        with pytest.raises(client.ClusterError, match="RC_TOKEN is not set"):
            tokenless.put(b"data")
    with client.Cluster(cluster.url, "wrong") as wrong:
        with pytest.raises(client.ClusterError) as raised:
            wrong.submit("echo", "hi").result(TIMEOUT)
        assert raised.value.status == 401 and "is not set" not in str(raised.value)


def test_rc_map_files_of_a_directory_says_to_give_its_files(cluster, tmp_path):
    """`rc map 'ls {}' --files photos/` said "'photos/' is not a regular
    file"; now it says it is a directory and how to give its files."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("one\n")
    done = subprocess.run([RC, "map", "gzip -kf {}", "--files", "photos/"], cwd=str(tmp_path),
                          env=cluster.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("rc: error: --files 'photos/' is a directory; give its files"
                           " (--files photos/*)\n")


def test_env_and_files_on_a_task_that_runs_no_process_are_refused(cluster):
    """Issue 18: `--env` is "validated; never silently dropped". `rc submit
    echo hi --env A=1` (or sleep, system_info, with --input or --output
    too) was queued, the env and files dropped: those types run in the
    worker, with no process. Now they are refused, on the command line and
    over HTTP, before anything is stored or queued."""
    before = cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    for arguments in (["echo", "hi", "--env", "A=1"], ["sleep", "0", "--output", "*.log"],
                      ["system_info", "--env", "A=1"]):
        refused = cluster.rc("submit", *arguments, check=False)
        assert refused.returncode == 2, refused.stdout
        assert "%s tasks run no process, so they take no" % arguments[0] in refused.stderr
    with client.Cluster(cluster.url, cluster.token) as rc:
        with pytest.raises(client.ClusterError, match="echo tasks run no process") as raised:
            rc.submit("echo", "hi", env={"A": "1"}).result(TIMEOUT)
        assert raised.value.status == 400
    assert cluster.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == before


def test_a_command_naming_a_file_here_that_is_not_sent_gets_a_note(cluster, tmp_path):
    """docs/map.md: `seq 100 | rc map 'python3 sim.py {}' --input sim.py`.
    Without --input (the first thing a new user writes) every task failed
    on the device with `can't open file '.../sim.py'` and nothing here said
    why. Now `rc submit` and `rc map` say at once that sim.py is a file
    here, not an input, and that --input sim.py sends it; with it, no note."""
    (tmp_path / "sim.py").write_text("import sys\nprint(int(sys.argv[1]) ** 2)\n")
    note = ("note: 'sim.py' is a file here but not an input: the task runs in an empty"
            " directory on a device, where the command will not find it; --input sim.py"
            " sends it\n")

    def run(*arguments):
        return subprocess.run([RC] + list(arguments), cwd=str(tmp_path), env=cluster.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    alone = run("submit", "shell", "python3 sim.py 5")
    assert alone.returncode == 0 and alone.stderr == "rc: " + note, alone.stderr
    sent = run("submit", "shell", "python3 sim.py 5", "--input", "sim.py", "--wait")
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, "25\n", "")
    mapped = run("map", "python3 sim.py {}", "3", "--input", "sim.py")
    assert mapped.stdout == "9\n" and "note" not in mapped.stderr, mapped.stderr
    forgot = run("map", "--dry-run", "python3 sim.py {}", "3")
    assert forgot.returncode == 0 and forgot.stderr == ""      # --dry-run: nothing queued
    forgot = run("map", "python3 sim.py {}", "3")
    assert forgot.returncode == 1 and forgot.stderr.startswith("rc map: " + note)


def test_rc_get_into_a_file_says_so(cluster, tmp_path):
    """`rc get ID -o out` where out is a file here (a user who meant the
    name of the output) ended in a Python traceback (FileExistsError out of
    os.makedirs). Now one line says what is in the way."""
    task_id = cluster.rc("submit", "shell", "echo 1 > a.txt", "--output",
                         "a.txt").stdout.strip()
    cluster.rc("wait", task_id)
    (tmp_path / "out").write_text("mine\n")
    got = subprocess.run([RC, "get", task_id, "-o", "out"], cwd=str(tmp_path), env=cluster.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=TIMEOUT)
    assert got.returncode == 1
    assert got.stderr == ("rc: error: cannot write 'out/a.txt': 'out' is a file, not a"
                          " directory\n")
    assert (tmp_path / "out").read_text() == "mine\n"
    assert sorted(os.listdir(str(tmp_path))) == ["out"]


def test_rc_submit_takes_its_argument_after_an_option(cluster, tmp_path):
    """`rc submit shell --input a.txt 'cat a.txt'` (options first, as most
    commands take them) said "unrecognized arguments: cat a.txt": argparse
    reads TYPE alone once an option follows it. Now the word left over is
    the argument; a second one is still refused."""
    (tmp_path / "a.txt").write_text("one\n")

    def run(*arguments):
        return subprocess.run([RC, "submit"] + list(arguments), cwd=str(tmp_path),
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=TIMEOUT)
    done = run("shell", "--input", "a.txt", "cat a.txt", "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, "one\n", "")
    done = run("shell", "--priority", "high", "--wait", "echo hi")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    both = run("python_exec", "--file", "a.txt", "print(1)")
    assert both.returncode == 2 and "give either --file or the code, not both" in both.stderr
    extra = run("shell", "--priority", "high", "echo hi", "more")
    assert extra.returncode == 2 and "unrecognized arguments: more" in extra.stderr


def count_in_data(word):
    with open("data.txt") as f:
        return f.read().count(word)


def test_the_client_takes_inputs_as_paths_as_rc_submit_does(cluster, tmp_path, monkeypatch):
    """`rc submit --input data.txt`; in Python, `inputs=["data.txt"]` was a
    400 ("each input must be an object with path, sha256, size, mode"):
    put() first, then a dict naming its path. Now a path of this machine
    is put (once while it is unchanged, for map's many tasks) and goes by
    its base name; stdin too; an Executor's inputs as well."""
    data = tmp_path / "data.txt"
    data.write_text("x\ny\nx\n")
    monkeypatch.chdir(str(tmp_path))
    with client.Cluster(cluster.url, cluster.token) as rc:
        sent = []
        real_put = rc.put
        monkeypatch.setattr(rc, "put", lambda source: sent.append(source) or real_put(source))
        assert rc.submit("shell", "wc -l < data.txt",
                         inputs=["data.txt"]).result(TIMEOUT).strip() == "3"
        assert list(rc.map("shell", ["head -1 data.txt", "tail -1 data.txt"],
                           inputs=[str(data)])) == ["x\n", "x\n"]
        assert rc.submit("shell", "sort -u", stdin="data.txt").result(TIMEOUT) == "x\ny\n"
        assert [source for source in sent if isinstance(source, str)] == ["data.txt"]
        with pytest.raises(TypeError, match="is a directory"):
            rc.submit("shell", "ls", inputs=[str(tmp_path)])
        with client.Executor(cluster=rc, inputs=["data.txt"]) as executor:
            assert list(executor.map(count_in_data, ["x", "y"])) == [2, 1]


def test_a_syntax_error_on_the_device_names_its_python(cluster):
    """A function from a 3.13 laptop with syntax a 3.6 Pi does not know
    (`:=`) failed there with `SyntaxError: invalid syntax` in code that runs
    here, and nothing said the device's Python was older. Now the remote
    traceback ends with the device's version. (Here the source linecache
    holds, which is what goes, is made not to compile: the local worker
    runs a Python as new as this one.)"""
    name, path = "u36_too_new", "/nonexistent-u36/u36_too_new.py"
    module = types.ModuleType(name)
    module.__file__ = path
    exec(compile("def job(x):\n    return x\n", path, "exec"), module.__dict__)
    broken = "def job(x):\n    return x +\n"
    linecache.cache[path] = (len(broken), None, broken.splitlines(True), path)
    sys.modules[name] = module
    try:
        with client.Executor(cluster.url, cluster.token, pack=1) as executor:
            with pytest.raises(SyntaxError) as raised:
                executor.submit(module.job, 1).result(TIMEOUT)
        text = raised.value.__cause__.text
        assert re.search(r"\nSyntaxError: .*\n\(this device runs Python 3\.\d+\.\d+\)\n\Z",
                         text), text
    finally:
        sys.modules.pop(name, None)
        linecache.cache.pop(path, None)


def test_an_input_tree_follows_a_link_to_a_directory(cluster, tmp_path):
    """`--input data/` sent a linked file's bytes but left a linked
    directory out without a word (`data/latest -> v2`: the task found no
    latest/). Now a link to a directory is followed as a link to a file
    is, and one that leads back up to a directory holding it (a loop) is
    refused before anything is stored."""
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model.bin").write_text("weights\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("notes\n")
    os.symlink("../v2", str(tmp_path / "data" / "latest"))

    def submit(*arguments):
        return subprocess.run([RC, "submit", "shell"] + list(arguments), cwd=str(tmp_path),
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=TIMEOUT)
    done = submit("find . -type f | sort; cat latest/model.bin", "--input", "data/", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "./latest/model.bin\n./notes.txt\nweights\n"
    os.symlink("..", str(tmp_path / "data" / "up"))
    looped = submit("true", "--input", "data/")
    assert looped.returncode == 2 and looped.stdout == ""
    assert "the link 'data/up' leads to %r, which holds it (a loop)" % os.path.realpath(
        str(tmp_path)) in looped.stderr
    # Two links that lead into each other: no link leads up, yet the walk would
    # go round (a/to_b/to_a/to_b/...) until the path grew too long.
    os.unlink(str(tmp_path / "data" / "up"))
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir()
    os.symlink("../b", str(tmp_path / "data" / "a" / "to_b"))
    os.symlink("../a", str(tmp_path / "data" / "b" / "to_a"))
    crossed = submit("true", "--input", "data/")
    assert crossed.returncode == 2 and crossed.stdout == "", crossed
    assert "(a loop)" in crossed.stderr


def test_rc_map_says_when_inputs_outputs_replace_each_other_in_into(cluster, tmp_path):
    """`rc map 'sort {} > out.txt' a b c --output out.txt --into o/`: every
    input's out.txt went to o/out.txt, the last replacing the others, exit
    0 and not a word. Now one line says so and how to name them apart; a
    map whose outputs have names of their own says nothing."""
    def run(*arguments):
        return subprocess.run([RC, "map"] + list(arguments), cwd=str(tmp_path),
                              env=cluster.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=TIMEOUT)
    same = run("echo {} > out.txt", "a", "b", "c", "--output", "out.txt", "--into", "o/")
    assert same.returncode == 0, same.stderr
    notes = [line for line in same.stderr.splitlines() if "replaces" in line]
    assert len(notes) == 1 and re.match(
        r"map \d+: input \d \('[abc]'\) output out.txt replaces input \d's in --into: give"
        r" each input's outputs names of their own \('\{#\}.out', '\{/.\}.out'\)\Z",
        notes[0]), notes
    apart = run("echo {} > {}.txt", "a", "b", "--output", "{}.txt", "--into", "o/")
    assert apart.returncode == 0 and "replaces" not in apart.stderr, apart.stderr
    assert sorted(os.listdir(str(tmp_path / "o"))) == ["a.txt", "b.txt", "out.txt"]
