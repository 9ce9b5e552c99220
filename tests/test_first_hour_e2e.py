"""The first hour of a new user (issue 21) against a real main node:
`make run` returns healthy, `rc ctl` from anywhere, what the cluster was
started with kept for a new shell, a stopped main node shows no device
online, and a worker started wrongly (no fingerprint, the dashboard port,
Python 2.7) says what is wrong; on a terminal it speaks in sentences."""
import gzip
import json
import os
import pathlib
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from cluster_harness import PORT_TRIES, RC, REPO, WORKER, Cluster, wait_for

pytestmark = pytest.mark.e2e

NEW_SHELL_DROPS = ("RC_CONFIG", "RC_TCP_PORT", "RC_WEB_PORT", "RC_FILES_PORT")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("first-hour") / "var",
                      health_queue_stuck=321.0)
    started = cluster.make("run")
    assert started.returncode == 0, started.stdout
    cluster.started_output = started.stdout
    # `make run && bin/rc health`: healthy the moment make returns.
    cluster.health_right_after = cluster.rc("health", check=False)
    from rc import db
    cluster.db = db.connect(cluster.config.db_path)
    yield cluster
    cluster.stop_workers()
    cluster.make("stop")
    cluster.db.close()


def new_shell(cluster):
    """The environment of a new shell that names only RC_HOME."""
    env = {key: value for key, value in os.environ.items() if key not in NEW_SHELL_DROPS}
    env["RC_HOME"] = cluster.home
    return env


def test_make_run_returns_healthy_and_says_so(cluster):
    assert "cluster healthy: RC OK" in cluster.started_output
    assert cluster.health_right_after.returncode == 0, cluster.health_right_after.stdout
    assert cluster.health_right_after.stdout.startswith("RC OK")
    assert "STARTING" not in cluster.started_output


def test_a_new_shell_gets_the_ports_and_settings_it_was_started_with(cluster, tmp_path):
    env = new_shell(cluster)
    joined = subprocess.run([RC, "join"], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60).stdout
    assert ":%d " % cluster.config.tcp_port in joined
    assert ":%d/" % cluster.config.web_port in joined
    setting = subprocess.run(
        [os.path.join(REPO, ".venv", "bin", "python"), "-c",
         "from rc import config; print(config.load().health_queue_stuck)"],
        env=env, stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout
    assert setting.strip() == "321.0"
    health = subprocess.run([RC, "health"], env=env, stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert health.returncode == 0, health.stdout


def test_rc_ctl_from_any_directory(cluster, tmp_path):
    env = new_shell(cluster)
    status = subprocess.run([RC, "ctl", "status"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    assert status.returncode == 0, status.stdout
    assert "rc-scheduler" in status.stdout and "RUNNING" in status.stdout
    assert "ENV_" not in status.stdout
    # `rc ctl status | head -1`, its reader gone before it writes: it ends as
    # `cat` would, 141 and nothing on stderr (was supervisorctl's traceback).
    reader, writer = os.pipe()
    os.close(reader)
    try:
        piped = subprocess.run([RC, "ctl", "status"], env=env, cwd=str(tmp_path), stdout=writer,
                               stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    finally:
        os.close(writer)
    assert (piped.returncode, piped.stderr) == (141, ""), piped
    before = cluster.program_pid("rc-scheduler")
    restarted = subprocess.run([RC, "ctl", "restart", "rc-scheduler"], env=env,
                               cwd=str(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert restarted.returncode == 0, restarted.stdout
    assert cluster.program_pid("rc-scheduler") not in (0, before)
    tail = subprocess.run([RC, "ctl", "tail", "rc-server"], env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert tail.returncode == 0 and '"program":"rc-server"' in tail.stdout.replace(" ", "")
    made = cluster.make("status")
    assert made.returncode == 0 and "RUNNING" in made.stdout


def worker_output(process, timeout):
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return process.returncode, out


def test_a_worker_without_fingerprint_on_tls_says_what_is_missing(cluster, tmp_path):
    assert cluster.config.tls
    process = subprocess.Popen(
        [sys.executable, "-I", WORKER, "--join", "127.0.0.1:%d" % cluster.config.tcp_port,
         "--token-file", cluster.config.token_path, "--device-id", "nofp",
         "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    status, out = worker_output(process, 30)
    assert status == 3, out
    assert "fingerprint_missing" in out and "--fingerprint" in out and "rc join" in out
    assert out.count('"no_hello"') == 0


def test_a_worker_pointed_at_the_dashboard_port_gets_a_hint(cluster, tmp_path):
    # Both workers at once (each takes seconds to give up), a state
    # directory each.
    processes = [subprocess.Popen(
        [sys.executable, "-I", WORKER, "--join", "127.0.0.1:%d" % cluster.config.web_port,
         "--token-file", cluster.config.token_path, "--device-id", "webport",
         "--state-dir", str(tmp_path / ("state-%d" % number))] + pin,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        for number, pin in enumerate(([], ["--fingerprint", "ab" * 32]))]
    try:
        for process in processes:
            status, out = worker_output(process, 60)
            assert status == 3, out
            assert "this looks like the dashboard port (HTTP); the worker port is 8080" in out
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_the_worker_speaks_sentences_on_a_terminal_and_json_otherwise(cluster):
    parent, child = pty.openpty()
    arguments = cluster.worker_arguments("tty-worker") + ["--slots", "2"]
    process = subprocess.Popen([sys.executable, "-I", WORKER] + arguments, stdin=child,
                               stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    seen = b""
    try:
        deadline = time.time() + 30
        while b"waiting for tasks" not in seen and time.time() < deadline:
            if select.select([parent], [], [], 0.5)[0]:
                try:
                    seen += os.read(parent, 65536)
                except OSError:
                    break
        text = seen.decode("utf-8", "replace")
        assert "connected to 127.0.0.1:%d, 2 slots, waiting for tasks" \
            % cluster.config.tcp_port in text, text
        assert '{"time"' not in text
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.close(parent)
    # Not a terminal: JSON lines, as every program of the cluster writes.
    piped = cluster.start_worker("piped-worker")
    wait_for(lambda: b'"registered"' in open(cluster.worker_log("piped-worker"), "rb").read(),
             30, "the piped worker to register")
    for line in open(cluster.worker_log("piped-worker"), "rb").read().splitlines():
        assert isinstance(json.loads(line), dict)
    piped.terminate()
    piped.wait(timeout=30)


def test_a_task_nothing_can_run_warns_and_make_run_still_returns(cluster):
    task_id = int(cluster.rc("submit", "echo", "x", "--require", "cores=512").stdout)
    from rc import db
    with db.write(cluster.db):     # as if submitted long ago
        cluster.db.execute("UPDATE tasks SET created_at = created_at - ? WHERE task_id = ?",
                           (cluster.config.health_unfit_task + 60, task_id))
    try:
        health = cluster.rc("health", check=False)
        assert health.returncode == 1 and "task %d has waited" % task_id in health.stdout
        why = cluster.rc("why", str(task_id)).stdout
        assert "needs 512 CPU cores" in why
        again = cluster.make("run")
        assert again.returncode == 0 and "cluster up, with a warning" in again.stdout
    finally:
        cluster.rc("cancel", str(task_id))
    assert cluster.rc("health", check=False).returncode == 0


def test_with_the_main_node_stopped_no_device_is_online(cluster):
    online = cluster.rc("devices", "--tsv", "--no-header").stdout
    assert "\tonline\t" in online
    stopped = cluster.make("stop")
    assert stopped.returncode == 0, stopped.stdout
    try:
        devices = cluster.rc("devices", "--tsv", "--no-header")
        assert devices.stdout and "\tonline" not in devices.stdout
        assert "main node not running" in devices.stderr
        status = cluster.rc("status").stdout
        assert status.startswith("main_node: not running") and "devices_online: 0" in status
        health = cluster.rc("health", check=False)
        assert health.returncode == 2 and "devices_online=0 " in health.stdout
        ctl = cluster.rc("ctl", "status", check=False)
        assert ctl.returncode == 3 and ctl.stdout.startswith("not running")
        made = cluster.make("status")
        assert made.returncode == 0 and "not running" in made.stdout
        assert "Error" not in made.stdout
    finally:
        restarted = cluster.make("run")
        assert restarted.returncode == 0, restarted.stdout


def test_make_runs_worker_gives_a_task_its_own_files_by_absolute_path_too(cluster, tmp_path):
    """`make run`'s local worker (as root: a uid per task, in a mount
    namespace of its own) runs README's files example, a script by --file,
    and a task that writes $RC_CHECKPOINT_DIR and reads $PWD/FILE: the
    directories above the task's own were 0700 there, so every absolute path
    into it (python_exec --file's, the checkpoint directory's) was refused."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.txt").write_text("one\n")
    (tmp_path / "job.py").write_text("print(open('photos/a.txt').read().upper(), end='')\n")
    env = new_shell(cluster)
    readme = open(os.path.join(REPO, "README.md")).read()
    submitted = run(readme_command(
        readme, "bin/rc submit shell 'gzip -kf *.txt' --input photos/ --output '*.gz'",
        **{"bin/rc": RC}), str(tmp_path), env)
    task_id = submitted.stdout.strip()
    assert task_id.isdigit(), submitted.stdout
    assert run("%s wait %s" % (RC, task_id), str(tmp_path), env).returncode == 0
    got = run("%s get %s -o out/" % (RC, task_id), str(tmp_path), env)
    assert got.returncode == 0, got.stdout
    assert gzip.decompress((tmp_path / "out" / "a.txt.gz").read_bytes()) == b"one\n"
    script = run("%s submit python_exec --file job.py --input photos --wait" % RC,
                 str(tmp_path), env)
    assert script.stdout == "ONE\n", script.stdout
    absolute = run("%s submit shell 'echo 7 > \"$RC_CHECKPOINT_DIR/step\" && cat \"$PWD/job.py\"'"
                   " --input job.py --wait" % RC, str(tmp_path), env)
    assert absolute.returncode == 0 and absolute.stdout.startswith("print("), absolute.stdout


def test_the_files_over_http_example_of_the_docs_runs_as_written(cluster, tmp_path):
    """docs/http.md's curl block for files in and out, copied whole; only
    the dashboard's address and bin/rc's path are this cluster's."""
    text = open(os.path.join(REPO, "docs", "http.md")).read()
    start = text.index("```sh\n", text.index("Files in and out over HTTP")) + len("```sh\n")
    block = text[start:text.index("```", start)]
    block = block.replace("http://localhost:5000", "http://127.0.0.1:%d"
                          % cluster.config.web_port).replace("bin/rc", RC)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("one\n")
    done = run(block, str(tmp_path), new_shell(cluster), timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("}one\n"), done.stdout
    assert '"state":"completed"' in done.stdout and '"name":"a.txt.gz"' in done.stdout


def test_the_readmes_checkpoint_example_resumes_where_it_was(cluster, tmp_path):
    """README's $RC_CHECKPOINT_DIR example, copied whole (bin/rc's path is
    this checkout's): handed back by `rc drain --now`, the task's next
    attempt starts from the checkpoint, not from 0."""
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("id=$(bin/rc submit shell 'n=$(cat \"$RC_CHECKPOINT_DIR/n\"")
    block = readme[start:readme.index("```", start)].replace("bin/rc", RC)
    done = run(block, str(tmp_path), new_shell(cluster), timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("done at 15\n"), done.stdout
    resumed_from = int(done.stdout.split("from ")[1].split()[0])
    assert resumed_from >= 1, done.stdout


# -- a new user, following README.md on a fresh clone ---------------------------------

def readme_command(readme, command, **substitutions):
    """`command` as README.md writes it, checked to be there, with test
    values put in (free ports for 8080/5000/8081, a temporary RC_HOME, the
    local worker for the README's example device)."""
    assert command in readme, "README.md no longer says: %s" % command
    for old, new in substitutions.items():
        command = command.replace(old, new)
    return command


def run(command, cwd, env, timeout=240):
    return subprocess.run(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)


def free_ports(count):
    from cluster_harness import free_port
    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return [str(port) for port in ports]


def run_on_free_ports(start):
    """start(tcp, web, files) on three free ports, again on new ones when
    `make run` says another program took one of them between the pick and
    its bind (as cluster_harness.Cluster.start does). The ports and the run."""
    for _ in range(PORT_TRIES):
        ports = free_ports(3)
        done = start(*ports)
        if done.returncode == 0 or "holds port" not in done.stdout:
            break
    return ports, done


@pytest.fixture
def short_path():
    """A short directory: supervisord's socket path must fit in AF_UNIX's
    108 bytes, which pytest's own (longer under xdist) may not leave."""
    path = tempfile.mkdtemp(prefix="rcw-")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_new_user_follows_the_readme_on_a_fresh_clone(short_path):
    """The README's first-hour commands, as written, in a fresh `git clone`
    (its own virtualenv and var/); only the ports are free ones instead of
    8080/5000/8081, which other clusters on this machine may hold."""
    tmp_path = short_path
    clone = str(tmp_path / "retire-cluster")
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True, timeout=120)
    readme = open(os.path.join(clone, "README.md")).read()
    shell = {key: value for key, value in os.environ.items()
             if not key.startswith("RC_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    rc2 = str(tmp_path / "rc2")
    try:
        (tcp, web, files), started = run_on_free_ports(
            lambda tcp, web, files: run("make run && bin/rc health", clone, dict(
                shell, RC_TCP_PORT=tcp, RC_WEB_PORT=web, RC_FILES_PORT=files), timeout=300))
        assert started.returncode == 0, started.stdout
        assert "cluster healthy: RC OK" in started.stdout and "\nRC OK" in started.stdout
        # The main node's packages only: the tests' (Chromium's driver, Dask) are make test's.
        tests_only = run(".venv/bin/python -c 'import playwright'; .venv/bin/python -c"
                         " 'import distributed'; .venv/bin/python -c 'import pytest'",
                         clone, shell)
        assert tests_only.stdout.count("ModuleNotFoundError") == 3, tests_only.stdout
        # A new shell: no ports in the environment; what make run was given is recorded.
        assert run(readme_command(readme, "bin/rc health"), clone, shell).returncode == 0
        result = run(readme_command(
            readme, "bin/rc submit python_eval 'sum(range(100000))' --wait"), clone, shell)
        assert result.stdout.strip() == "4999950000", result.stdout
        devices = run(readme_command(readme, "bin/rc devices"), clone, shell).stdout
        local = [line.split()[0] for line in devices.splitlines()[1:] if " online " in line]
        assert len(local) == 1, devices
        joined = run("bin/rc join", clone, shell).stdout
        assert ":%s " % tcp in joined and ":%s/" % web in joined
        ctl = run("cd / && %s/bin/rc ctl status" % clone, clone, shell)
        assert ctl.returncode == 0 and "rc-worker" in ctl.stdout, ctl.stdout
        status = run(readme_command(readme, "make status"), clone, shell)
        assert status.returncode == 0 and "RUNNING" in status.stdout
        # The fleet at work, on the one device there is.
        labelled = run(readme_command(readme, "bin/rc label pi-kitchen kind=pi",
                                      **{"pi-kitchen": local[0]}), clone, shell)
        assert labelled.returncode == 0, labelled.stdout
        fleet = run(readme_command(
            readme, "bin/rc submit --each --require label.kind=pi shell 'df -h /' --wait"),
            clone, shell)
        assert fleet.returncode == 0, fleet.stdout
        assert "== %s (task " % local[0] in fleet.stdout and "Filesystem" in fleet.stdout
        assert len([line for line in fleet.stdout.splitlines() if line.endswith("/")]) >= 1
        # A second cluster beside the first, then read from a new shell.
        second_run = ("RC_HOME=/tmp/rc2 RC_TCP_PORT=8090 RC_WEB_PORT=5010"
                      " RC_FILES_PORT=8091 make run")
        (tcp2, web2, files2), done = run_on_free_ports(
            lambda tcp2, web2, files2: run(readme_command(readme, second_run, **{
                "/tmp/rc2": rc2, "8090": tcp2, "5010": web2, "8091": files2}), clone, shell,
                timeout=300))
        assert done.returncode == 0 and "cluster healthy" in done.stdout, done.stdout
        second = {"/tmp/rc2": rc2, "8090": tcp2, "5010": web2, "8091": files2}
        status2 = run(readme_command(readme, "RC_HOME=/tmp/rc2 bin/rc status", **second),
                      clone, shell)
        assert "devices_online: 1" in status2.stdout, status2.stdout
        joined2 = run(readme_command(readme, "RC_HOME=/tmp/rc2 bin/rc join", **second),
                      clone, shell).stdout
        assert ":%s " % tcp2 in joined2 and ":%s/" % web2 in joined2
        stopped2 = run(readme_command(readme, "RC_HOME=/tmp/rc2 make stop", **second),
                       clone, shell)
        assert stopped2.returncode == 0 and "stopped" in stopped2.stdout
        # The first is untouched by the second's stop.
        assert run("bin/rc health", clone, shell).returncode == 0
        stopped = run(readme_command(readme, "make stop"), clone, shell)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        after = run("bin/rc status", clone, shell).stdout
        assert after.startswith("main_node: not running") and "devices_online: 0" in after
        assert run("make status", clone, shell).returncode == 0
    finally:
        run("RC_HOME=%s make stop" % rc2, clone, shell)
        run("make stop", clone, shell)
