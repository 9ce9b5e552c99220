"""Python environments on devices (issue 22): `--requirements FILE` and
`--pip PKG==VER` give a task the packages it imports; the worker builds a
virtual environment once per set, Python and machine, from this machine's
package index, and the next task with the same set reuses it; a set pip
cannot install fails the attempt with pip's error and sends the task's next
attempt elsewhere."""
import io
import json
import os
import tempfile

import pytest

from cluster_harness import Cluster, wait_for
from rc import commands, environments, tasks

# A small pure-Python package that neither the test environment nor the
# system's Python has: only the task's environment can import it.
PACKAGE, VERSION = "tabulate", "0.9.0"


# -- what may be sent -------------------------------------------------------------

@pytest.mark.parametrize("good", ["numpy", "numpy==1.26.4", "requests[socks]>=2.0,<3",
                                  "pkg ~= 1.2", "foo; python_version >= '3.8'"])
def test_plain_specifiers_are_taken(good):
    assert environments.check_packages([good]) == [good]


@pytest.mark.parametrize("bad", ["-r other.txt", "--index-url=http://evil/", "./local/pkg",
                                 "/abs/path.whl", "pkg @ https://evil/pkg.whl",
                                 "http://evil/x.tar.gz", "pkg==1.0 --hash=sha256:00",
                                 "", "a" * 300, "pkg\nother"])
def test_options_paths_and_urls_are_refused_by_name(bad):
    with pytest.raises(environments.PackagesError) as refused:
        environments.check_packages([bad])
    assert "pip" in str(refused.value)


def test_a_requirements_file_without_comments_and_without_options():
    text = "# data\nnumpy==1.26.4  # pinned\n\nrequests>=2\n"
    assert environments.read_requirements_file(text) == ["numpy==1.26.4", "requests>=2"]
    with pytest.raises(environments.PackagesError, match="line 2.*pip option"):
        environments.read_requirements_file("numpy\n-r more.txt\n")
    with pytest.raises(environments.PackagesError, match="names no package"):
        environments.read_requirements_file("# nothing\n")


def test_a_task_with_packages_needs_a_device_that_can_build_them(cluster_home, add_device):
    config, connection = cluster_home
    task = tasks.check_task(config, "shell", {"command": "true", "pip": ["numpy"]})
    assert environments.VENV_CAPABILITY in task["requirements"]["capabilities"]
    with pytest.raises(tasks.TaskError, match="echo tasks take no Python packages"):
        tasks.check_task(config, "echo", {"message": "x", "pip": ["numpy"]})
    with pytest.raises(tasks.TaskError, match="list of requirement specifiers"):
        tasks.check_task(config, "shell", {"command": "true", "pip": "numpy"})
    add_device("old-pi")        # its profile has no python_venv
    task_id = tasks.submit(connection, config, "python_eval", {"expression": "1",
                                                               "pip": ["numpy"]})
    out = io.StringIO()
    commands.run_command(["why", str(task_id)], out, io.StringIO(), config)
    assert "python_venv" in out.getvalue()


def test_rc_submit_reads_a_requirements_file_and_pip_options(cluster_home, tmp_path):
    config, connection = cluster_home
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("tabulate==0.9.0\n")
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_command(["submit", "python_exec", "import tabulate", "--requirements",
                            str(wanted), "--pip", "six==1.16.0"], out, err, config) == 0
    task = tasks.get(connection, int(out.getvalue().split()[-1]))
    assert task["payload"]["pip"] == ["tabulate==0.9.0", "six==1.16.0"]
    wanted.write_text("--index-url http://evil/\n")
    assert commands.run_command(["submit", "shell", "true", "--requirements", str(wanted)],
                           io.StringIO(), err, config) == 2
    assert "pip option" in err.getvalue()


# -- on a real worker -------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("venvs"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    # A cache task users can write into (pytest's tmp dirs are not theirs).
    venvs = tempfile.mkdtemp(prefix="rc-test-venvs-")
    os.chmod(venvs, 0o755)
    # A directory between for the worker to make, and the umask supervisord
    # gives the main node's own worker (umask=077): as root, neither may keep
    # task users out of what the worker makes and their builds.
    cluster.venvs = os.path.join(venvs, "made-by-the-worker", "cache")
    umask = os.umask(0o077)
    try:
        cluster.start_worker("builder", "--slots", "2", "--venv-dir", cluster.venvs)
    finally:
        os.umask(umask)
    wait_for(lambda: "builder" in cluster.rc("devices").stdout
             and "online" in cluster.rc("devices").stdout, 30, "the worker")
    yield cluster
    cluster.stop()
    import shutil
    shutil.rmtree(venvs, ignore_errors=True)


def submit(cluster, *args):
    done = cluster.rc("submit", *args, "--wait", "--wait-timeout", "240", check=False)
    return done


def task_json(cluster, task_id):
    return json.loads(cluster.rc("task", str(task_id), "--json").stdout)


@pytest.mark.e2e
def test_a_task_imports_a_package_the_workers_python_lacks_and_the_next_reuses_it(cluster):
    profile = json.loads(cluster.rc("device", "builder", "--json").stdout)
    assert environments.VENV_CAPABILITY in profile["capabilities"]
    pin = "%s==%s" % (PACKAGE, VERSION)
    first = submit(cluster, "python_eval", "__import__(%r).__version__" % PACKAGE, "--pip", pin)
    assert first.returncode == 0, first.stdout + first.stderr
    assert VERSION in first.stdout
    built = [name for name in os.listdir(cluster.venvs) if not name.endswith(".lock")]
    assert len(built) == 1
    config_file = os.path.join(cluster.venvs, built[0], "pyvenv.cfg")
    made = os.stat(config_file).st_mtime_ns
    # The same set from a shell task: the same environment, not built again.
    second = submit(cluster, "shell", "python -c 'import tabulate; print(tabulate.tabulate("
                    "[[1, 2]]))'", "--pip", pin)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1  2" in second.stdout
    assert [n for n in os.listdir(cluster.venvs) if not n.endswith(".lock")] == built
    assert os.stat(config_file).st_mtime_ns == made
    # The worker's own Python still lacks it: only the task's environment has it.
    plain = submit(cluster, "python_exec", "import importlib.util\n"
                   "print(importlib.util.find_spec(%r))" % PACKAGE)
    assert plain.stdout.strip() == "None", plain.stdout + plain.stderr


@pytest.mark.e2e
def test_a_long_running_task_does_not_hold_others_off_its_environment(cluster):
    """A service keeps its environment for days: another task with the same
    packages starts beside it, it does not wait for it to end."""
    pin = "%s==%s" % (PACKAGE, VERSION)
    long = int(cluster.rc("submit", "shell", "sleep 120", "--pip", pin).stdout.split()[-1])
    wait_for(lambda: task_json(cluster, long)["state"] == "running", 240, "the long task")
    quick = submit(cluster, "python_eval", "__import__(%r).__version__" % PACKAGE,
                   "--pip", pin, "--wait-timeout", "60")
    assert quick.returncode == 0 and VERSION in quick.stdout, quick.stdout + quick.stderr
    assert task_json(cluster, long)["state"] == "running"
    cluster.rc("cancel", str(long))


@pytest.mark.e2e
def test_a_set_pip_cannot_install_fails_with_pips_error_then_avoids_the_device(cluster):
    broken = "rc-no-such-package-anywhere==0.0.1"
    # The task with a retry left is submitted first, with a set of its own:
    # both environments fail to build at once in the worker's two slots,
    # not one after the other (each build is a venv with pip, ~10 s).
    retried = "rc-no-such-package-anywhere==0.0.2"
    queued = cluster.rc("submit", "shell", "true", "--pip", retried, "--retries", "1").stdout
    queued_id = int(queued.split()[-1])
    done = submit(cluster, "shell", "true", "--pip", broken, "--retries", "0")
    assert done.returncode != 0
    listed = json.loads(cluster.rc("tasks", "--json").stdout)
    task = [t for t in listed if t["payload"].get("pip") == [broken]][0]
    task = task_json(cluster, task["task_id"])
    assert task["state"] == "failed"
    assert "could not build the Python environment" in task["error"]
    assert "rc-no-such-package-anywhere" in task["error"]          # pip's own words
    assert task["result"]["environment_failed"] is True
    # With a retry left, the next attempt waits for another device, and says why.
    def requeued():
        t = task_json(cluster, queued_id)
        return t["state"] == "queued" and t["attempt"] == 2
    wait_for(requeued, 240, "the task queued again after its environment failed")
    # Once its backoff has passed, `rc why` names the device's failed build.
    wait_for(lambda: "failed to build there" in cluster.rc("why", str(queued_id)).stdout, 60,
             "rc why to name the failed build")
    cluster.rc("cancel", str(queued_id))


def test_rc_map_and_the_client_carry_the_packages_too(cluster_home, tmp_path):
    """--pip/--requirements on `rc map`, pip= on the client's submit and
    Executor: the same payload field, checked the same way."""
    import types
    from rc import client, map_cli
    config, connection = cluster_home
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("tabulate==0.9.0\n")
    arguments = types.SimpleNamespace(input=None, env=None, pip=["six==1.16.0"],
                                      requirements=str(wanted))
    fields = map_cli.shared_fields(connection, config, "shell", arguments)
    assert fields["pip"] == ["tabulate==0.9.0", "six==1.16.0"]
    arguments.pip = ["--index-url=http://evil/"]
    with pytest.raises(map_cli.MapUsageError, match="not a plain requirement"):
        map_cli.shared_fields(connection, config, "shell", arguments)
    spec = client.task_spec("python_exec", None, {"payload": {"code": "1"},
                                                   "pip": ["tabulate==0.9.0"]})
    assert spec["payload"] == {"code": "1", "pip": ["tabulate==0.9.0"]}
    client.Executor("http://127.0.0.1:9", "t", pip=["tabulate==0.9.0"]).shutdown(wait=False)
