"""What session 46 found left: a map's cancels made while rc-web restarts,
an Executor's large arguments swept from the file store, absurd settings,
a checkpoint upload that cannot fit, and a packed task's time per call."""
import concurrent.futures
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster_harness import (WORKER, log_records, map_queued, online, task_state, wait_for,
                             with_one_worker)
from rc import client, files
from rc import config as config_module
from rc.defaults import DEFAULTS
from test_chaos_files import halt

pytestmark = pytest.mark.e2e

DEVICE = "leftovers46"
DAY = 86400.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_one_worker(tmp_path_factory.mktemp("leftovers46"), DEVICE, 2)


# -- 1. a map's cancels while rc-web restarts -----------------------------------------

def never_run(number):      # required of a device that is not there
    return number


def test_a_map_s_cancels_rc_web_did_not_take_reach_it_once_it_is_back(cluster, caplog):
    caplog.set_level(logging.WARNING, "rc.client")
    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            with client.Executor(cluster.url, cluster.token,
                                 requirements={"device_id": "nobody"}) as executor:
                calls, task_ids = map_queued(executor, never_run)
                cluster.supervisorctl("stop", "rc-web")
                list(calls)
        # Before: the cancels were dropped and both tasks stayed queued.
        assert "did not take the cancel of tasks %d, %d" % tuple(task_ids) in caplog.text
    finally:
        cluster.supervisorctl("start", "rc-web")
    wait_for(lambda: all(task_state(cluster, task_id) == "cancelled" for task_id in task_ids),
             60, "the cancels sent again")
    wait_for(lambda: "reached the cluster" in caplog.text, 30, "said so")


# -- 2. an Executor's large arguments swept from the file store ----------------------

BIG_ARGUMENT = b"y" * (client.MAX_ARGUMENT_BYTES + 1)    # goes as a file of its own


def test_a_call_whose_large_arguments_were_swept_since_they_were_put_puts_them_again(
        cluster):
    with client.Executor(cluster.url, cluster.token, pack=1) as executor:
        first = executor.submit(len, BIG_ARGUMENT)
        assert first.result(60) == len(BIG_ARGUMENT)
        # A month idle: its task pruned (its file rows, as prune_tasks
        # deletes them; the task's events kept, as a stream open over a
        # prune of the newest events misses what comes next), then the file
        # of its arguments swept.
        cluster.db.execute("DELETE FROM task_files WHERE task_id = ?", (first.task_id,))
        assert files.sweep(cluster.db, cluster.config, time.time()
                           + cluster.config.files_retention_days * DAY + 60) >= 1
        # Before: ClusterError: ... no file ... in the store, for this call
        # (the client put the same bytes once, long ago, and held them not).
        assert executor.submit(len, BIG_ARGUMENT).result(60) == len(BIG_ARGUMENT)
        assert list(executor.map(len, [BIG_ARGUMENT] * 2)) == [len(BIG_ARGUMENT)] * 2


# -- 3. settings representable but absurd ---------------------------------------------

ABSURD = [
    ('"max_streams": 1000000', "max_streams must be at most 1,000"),   # a million threads
    ('"poll_interval": 1000000', "poll_interval must be at most 86,400"),
    ('"max_profile_bytes": 2097152', "max_profile_bytes must be at most 1,048,576"),
    ('"health_disk_free_warning": 101', "health_disk_free_warning must be at most 100"),
    ('"offline_timeout": 1e9', "offline_timeout must be at most 604,800"),
]


@pytest.mark.parametrize("setting, said", ABSURD)
def test_a_setting_past_its_ceiling_is_refused_naming_it(tmp_path, setting, said):
    path = tmp_path / "rc.json"
    path.write_text("{%s}" % setting)
    with pytest.raises(config_module.ConfigError, match=said):
        config_module.load(str(path), environ={"RC_HOME": str(tmp_path)})


def test_every_ceiling_is_above_its_default_and_in_the_docs():
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        ceilings = f.read().split("The ceilings", 1)[1].split("\n\n", 2)[1]
    for key, (largest, _) in config_module.LARGEST.items():
        assert DEFAULTS[key] <= largest, key
        assert "`%s`" % key in ceilings, key


# -- 4. a checkpoint that cannot be written or stored ---------------------------------

def limited_file_size():
    """The worker's own `ulimit -f` (soft: its tasks may have more): 1 MiB."""
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_checkpoint_too_large_for_the_device_is_one_warning_and_the_task_ends_well(cluster):
    device = "efbig46"
    with open(cluster.worker_log(device), "ab") as log:
        cluster.workers[device] = subprocess.Popen(
            [sys.executable, "-I", WORKER] + cluster.worker_arguments(device)
            + ["--checkpoint-every", "0.2"], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=limited_file_size)
    try:
        wait_for(lambda: device in online(cluster), 30, "the worker online")
        # Three files of 512 KiB: a 1.5 MiB tar, which the worker cannot write
        # (EFBIG) each time it tries, for the ~4 s the task runs.
        script = ('for n in 1 2 3; do head -c 524288 /dev/urandom > "$RC_CHECKPOINT_DIR/$n";'
                  ' done; sleep 4; echo done')
        with client.Cluster(cluster.url, cluster.token) as session:
            future = session.submit("shell", script, requirements={"device_id": device})
            assert future.result(60).strip() == "done"
        warnings = log_records(cluster, "worker-" + device, event="checkpoint_not_sent")
        assert warnings and "File too large" in warnings[0]["error"], warnings
        # Before: one warning at each --checkpoint-every, ~20 of them.
        assert len(warnings) == 1, warnings
    finally:
        process = cluster.workers.pop(device)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# -- 5. a packed task's time on the worker, and a map's submits --------------------------

sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from client_functions import add_offset, unlucky  # noqa: E402


def test_a_map_returns_its_iterator_without_waiting_for_rc_web_s_answers(cluster):
    with client.Executor(cluster.url, cluster.token) as executor:
        assert list(executor.map(add_offset, range(3))) == [10, 11, 12]     # its group
        pid = cluster.program_pid("rc-web")
        assert halt(pid)
        returned = threading.Event()
        try:
            mapping = threading.Thread(target=lambda: (results.append(executor.map(
                add_offset, range(20000), chunksize=1000)), returned.set()))
            results = []
            mapping.start()
            # Before: its first chunk (each came more than IDLE_GAP after the
            # last) was sent from this thread, which waited for rc-web's
            # answer, and so on chunk after chunk: a map of 400 waited for
            # 400 answers in turn before it gave its first result.
            assert returned.wait(30), "map() waited for rc-web"
        finally:
            os.kill(pid, signal.SIGCONT)
        mapping.join(60)
        assert list(results[0]) == [n + 10 for n in range(20000)]


def run_alone(code, tmp_path):
    """The task's script in a Python of its own whose compile() raises: what
    the device compiles in the task's process, not with the script."""
    path = tmp_path / "script.py"
    path.write_text(code)
    return subprocess.run(
        [sys.executable, "-I", "-c", "import builtins, sys\n"
         "def refused(*args, **kwargs):\n    raise RuntimeError('compiled in the task')\n"
         "code = compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')\n"
         "builtins.compile = refused\nexec(code, {'__name__': '__main__'})\n", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_a_chunk_s_function_is_compiled_with_its_script_not_in_the_task_s_process(tmp_path):
    code, home, _ = client.call_code(add_offset, [((n,), {}) for n in range(3)])
    done = run_alone(code, tmp_path)
    # Before: RuntimeError('compiled in the task'), from _rc_define.
    outcomes = client.decode_outcomes({"result": {"output": done.stdout}, "task_id": 1}, home)
    assert [outcome[1] for outcome in outcomes] == [10, 11, 12], done.stderr
    # And a call that raises shows its own file and line, as before.
    code, home, _ = client.call_code(unlucky, [((13,), {})])
    done = run_alone(code, tmp_path)
    assert 'client_functions.py", line 24, in unlucky' in done.stderr, done.stderr
