"""A task's environment is its own, not the worker's (session 43): a worker
started from its owner's shell, or by a service manager, carries that
shell's variables (cloud keys, tokens, SSH_AUTH_SOCK: the owner's ssh
agent, proxies with passwords). A task starts from a small documented set
(PATH, LANG, LC_*, TZ, TERM, TMPDIR, proxies and PIP_* without a password,
what Termux needs), the sandbox's HOME, USER and LOGNAME, the RC_
variables, then its own env; `--pass-env NAME` gives it one more.

Each worker test runs as test_sandbox.py's do: as root (a uid per task)
and as nobody (the worker's own uid), through the spawner's three ways to
start a task (posix_spawn of a simple command, a fork for the shell and
for Python) and through subprocess (an env too large for the spawner)."""
import ast
import json
import os
import pwd
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sandbox import IS_ROOT, drop_dir, start  # noqa: E402,F401
from test_worker import (INTERPRETERS, main, registered, short_name,  # noqa: E402,F401
                         spawn)
from test_shared_definitions import worker  # noqa: E402,F401 (its fixture: bin/worker.py loaded)

SECRETS = {"SECRET_FROM_OWNER": "owner-secret-6d1f", "SSH_AUTH_SOCK": "/tmp/ssh-agent-6d1f",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-6d1f", "XDG_RUNTIME_DIR": "/run/user/6d1f",
           "https_proxy": "http://alice:pw-6d1f@proxy.invalid:3128"}
KEPT = {"LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC",
        "http_proxy": "http://proxy.invalid:3128", "PIP_NO_INPUT": "1"}
# Each of the task's ways to start: posix_spawn (a simple command), the
# shell forked by the spawner, Python forked by the spawner.
PRINT_ENV = "import json, os; print(json.dumps(dict(os.environ)))"
TASKS = [("shell", {"command": "env"}), ("shell", {"command": "env; true"}),
         ("python_eval", {"expression": "dict(__import__('os').environ)"}),
         ("python_exec", {"code": PRINT_ENV})]


# Over FILES_SPAWN_ENV (256 KiB): the task starts through subprocess.
LARGE_ENV = {"BIG%d" % n: "x" * 32000 for n in range(9)}


def parsed(task_type, output):
    if task_type == "shell":
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    if task_type == "python_eval":
        return ast.literal_eval(output)
    return json.loads(output)


def environments(link, tasks, env=None):
    """The environment each task saw, in order (task ids new on `link`)."""
    first = link.next_task_id = getattr(link, "next_task_id", 1)
    link.next_task_id += len(tasks)
    for number, (task_type, payload) in enumerate(tasks, first):
        link.assign(number, task_type, dict(payload, env=env) if env else payload)
    results = link.results(len(tasks))
    seen = []
    for number, (task_type, _) in enumerate(tasks, first):
        assert results[number]["status"] == "completed", results[number]
        seen.append(parsed(task_type, results[number]["result"]["output"]))
    return seen


@pytest.fixture
def owner_shell(monkeypatch):
    """The worker started from a shell that holds its owner's secrets."""
    for name, value in dict(SECRETS, **KEPT).items():
        monkeypatch.setenv(name, value)


def expected_user(runner):
    """A task's USER: its uid's name, else its number (as root, 59000...)."""
    return None if runner == "machine" and IS_ROOT else pwd.getpwuid(
        os.geteuid() if runner == "machine" else pwd.getpwnam("nobody").pw_uid).pw_name


def test_a_task_gets_none_of_the_workers_secrets(start, owner_shell):
    worker, link = start()
    for environment in environments(link, TASKS):
        assert not set(SECRETS) & set(environment), environment
        assert not [v for v in environment.values() if "6d1f" in v], environment
        for name, value in KEPT.items():
            assert environment[name] == value
        assert environment["PATH"] and environment["RC_TASK_ID"] and environment["RC_ATTEMPT"]
        assert environment["USER"] == environment["LOGNAME"]
        wanted = expected_user(start.runner)
        if wanted is None:      # a uid of its own, without an account: its number
            assert environment["USER"].isdigit() and int(environment["USER"]) >= 59000
        else:
            assert environment["USER"] == wanted
    assert worker.events("task_env_withheld")[0]["names"] == ["https_proxy"]


def test_pass_env_gives_tasks_a_variable_and_their_own_env_wins(start, owner_shell):
    worker, link = start("--pass-env", "SECRET_FROM_OWNER", "--pass-env", "https_proxy",
                         "--pass-env", "AWS_SECRET_ACCESS_KEY")
    for environment in environments(link, TASKS, env={"AWS_SECRET_ACCESS_KEY": "the task's"}):
        assert environment["SECRET_FROM_OWNER"] == SECRETS["SECRET_FROM_OWNER"]
        assert environment["https_proxy"] == SECRETS["https_proxy"]
        assert environment["AWS_SECRET_ACCESS_KEY"] == "the task's"
        assert "SSH_AUTH_SOCK" not in environment and "XDG_RUNTIME_DIR" not in environment
    assert not worker.events("task_env_withheld")


def test_a_task_started_without_the_spawner_gets_none_either(start, owner_shell):
    """An env over FILES_SPAWN_ENV: subprocess starts the task, from the
    worker itself, whose environment holds the secrets."""
    for environment in environments(start()[1], TASKS, env=LARGE_ENV):
        assert not set(SECRETS) & set(environment)
        assert environment["LANG"] == "C.UTF-8" and environment["BIG8"] == "x" * 32000
        assert environment["PATH"] and environment["RC_TASK_ID"]
        if start.runner == "machine" and IS_ROOT:
            assert environment["USER"].isdigit()


OLDEST_AND_NEWEST = [p for p in INTERPRETERS if "/3.6." in p or "/3.13." in p]


@pytest.mark.skipif(not OLDEST_AND_NEWEST, reason="no CPython 3.6 or 3.13 under ~/.pyenv")
@pytest.mark.parametrize("python", OLDEST_AND_NEWEST, ids=short_name)
def test_on_the_oldest_and_newest_python(main, spawn, python, owner_shell):
    _, link = registered(main, spawn, python, "--pass-env", "SECRET_FROM_OWNER")
    # With the spawner, and without it (an env too large for it: subprocess).
    for env in (None, LARGE_ENV):
        for environment in environments(link, TASKS, env=env):
            assert "SSH_AUTH_SOCK" not in environment
            assert "AWS_SECRET_ACCESS_KEY" not in environment
            assert environment["SECRET_FROM_OWNER"] == SECRETS["SECRET_FROM_OWNER"]
            assert environment["LANG"] == "C.UTF-8" and environment["PATH"]
            assert ("BIG8" in environment) == (env is not None)


# -- the worker's own pieces ----------------------------------------------------------

def environment_of(worker, monkeypatch, variables, **arguments):
    monkeypatch.setattr(worker.os, "environ", dict(variables))
    return worker.task_environment(**arguments)


def test_termux_keeps_what_its_programs_need(worker, monkeypatch):
    termux = {"PATH": "/data/data/com.termux/files/usr/bin", "ANDROID_ROOT": "/system",
              "ANDROID_DATA": "/data", "PREFIX": "/data/data/com.termux/files/usr",
              "TMPDIR": "/data/data/com.termux/files/usr/tmp", "TERMUX_VERSION": "0.118.0",
              "BOOTCLASSPATH": "/apex/core.jar", "EXTERNAL_STORAGE": "/sdcard",
              "LD_PRELOAD": "/data/data/com.termux/files/usr/lib/libtermux-exec.so",
              "LD_LIBRARY_PATH": "/data/data/com.termux/files/usr/lib",    # Android 5 and 6
              "HOME": "/data/data/com.termux/files/home", "SSH_AUTH_SOCK": "/x/agent"}
    environment, withheld = environment_of(worker, monkeypatch, termux)
    assert set(environment) == set(termux) - {"SSH_AUTH_SOCK"} | {"USER", "LOGNAME"}
    assert withheld == []
    # Elsewhere (and another LD_PRELOAD on Android) nothing of the kind is kept.
    linux = dict(termux, LD_PRELOAD="/home/me/libsnoop.so")
    del linux["ANDROID_ROOT"]
    environment, _ = environment_of(worker, monkeypatch, linux)
    assert set(environment) == {"PATH", "TMPDIR", "HOME", "USER", "LOGNAME"}
    environment, _ = environment_of(worker, monkeypatch, dict(linux, ANDROID_ROOT="/system"))
    assert "LD_PRELOAD" not in environment and environment["PREFIX"] == termux["PREFIX"]


def test_proxies_and_pip_settings_pass_without_a_password(worker, monkeypatch):
    variables = {"PATH": "/usr/bin", "http_proxy": "http://proxy:3128",
                 "HTTPS_PROXY": "http://bob:pw@proxy:3128", "no_proxy": "localhost,.lan",
                 "PIP_INDEX_URL": "https://__token__:pypi-abc@pypi.example/simple",
                 "PIP_FIND_LINKS": "/opt/wheels", "SSL_CERT_FILE": "/etc/ssl/ca.pem",
                 "GITHUB_TOKEN": "ghp_x", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/bus"}
    environment, withheld = environment_of(worker, monkeypatch, variables)
    assert withheld == ["HTTPS_PROXY", "PIP_INDEX_URL"]
    assert {"http_proxy", "no_proxy", "PIP_FIND_LINKS", "SSL_CERT_FILE"} <= set(environment)
    assert not {"GITHUB_TOKEN", "DBUS_SESSION_BUS_ADDRESS"} & set(environment)
    environment, withheld = environment_of(worker, monkeypatch, variables,
                                           pass_env=("PIP_INDEX_URL", "GITHUB_TOKEN"))
    assert withheld == ["HTTPS_PROXY"] and environment["GITHUB_TOKEN"] == "ghp_x"


def test_a_tmpdir_tasks_cannot_write_is_left_out(worker, monkeypatch):
    variables = {"PATH": "/usr/bin", "TMPDIR": "/home/me/tmp"}
    environment, _ = environment_of(worker, monkeypatch, variables,
                                    tmpdir_usable=lambda path: False)
    assert "TMPDIR" not in environment      # programs use /tmp then
    environment, _ = environment_of(worker, monkeypatch, variables,
                                    tmpdir_usable=lambda path: True)
    assert environment["TMPDIR"] == "/home/me/tmp"


def test_pass_env_names_are_checked(worker, tmp_path, capsys):
    worker.load_region("options")
    base = ["--join", "127.0.0.1:1", "--token", "t", "--state-dir", str(tmp_path)]
    for bad in ("RC_TOKEN", "rc_token", "1X", "A-B", ""):
        with pytest.raises(SystemExit):
            worker.parse_args(base + ["--pass-env", bad])
        assert "--pass-env" in capsys.readouterr().err
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"pass_env": ["GITHUB_TOKEN", "HTTPS_PROXY"]}))
    options = worker.parse_args(base + ["--config", str(config), "--pass-env", "AWS_PROFILE"])
    assert options.pass_env == ["GITHUB_TOKEN", "HTTPS_PROXY", "AWS_PROFILE"]
    assert "pass_env" in worker.NEEDS_RESTART
