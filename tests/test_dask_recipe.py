"""Dask on the fleet (issue 22, docs/dask.md), end to end on this machine:
the Dask scheduler and a `dask worker` on each device run as rc services,
each in a Python environment the device builds from `--pip` (Dask is in the
test environment only, for the client), and a Dask `Client` maps over them.
Killing a Dask worker's process: rc starts it again and it joins again."""
import json
import os
import signal
import tempfile
import time

import pytest

from cluster_harness import Cluster, free_port, online, wait_for

pytestmark = pytest.mark.e2e
distributed = pytest.importorskip("distributed")

DASK = "distributed==%s" % distributed.__version__      # the client's own version
DEVICES = ("dask-a", "dask-b")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("dask"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    # One environment cache for both workers of this machine: built once.
    venvs = tempfile.mkdtemp(prefix="rc-test-dask-")
    os.chmod(venvs, 0o755)
    for device in DEVICES:
        cluster.start_worker(device, "--slots", "2", "--tag", "dask",
                             "--venv-dir", os.path.join(venvs, "cache"))
    wait_for(lambda: set(DEVICES) <= online(cluster), 30, "both workers")
    cluster.scheduler = "tcp://127.0.0.1:%d" % free_port()
    yield cluster
    for name in ("dask-workers", "dask-scheduler"):
        cluster.rc("service", "remove", name, check=False)
    cluster.stop()
    import shutil
    shutil.rmtree(venvs, ignore_errors=True)


def services(cluster):
    return {s["name"]: s for s in json.loads(cluster.rc("service", "list", "--json").stdout)}


def test_dask_runs_on_the_fleet_as_rc_services(fleet):
    port = int(fleet.scheduler.rsplit(":", 1)[1])
    # As docs/dask.md has it, with this machine's address and free ports.
    fleet.rc("service", "add", "dask-scheduler", "shell",
             "dask scheduler --host 127.0.0.1 --port %d --dashboard-address 127.0.0.1:%d"
             % (port, free_port()), "--pip", DASK, "--require", "device=dask-a")
    fleet.rc("service", "add", "dask-workers", "shell",
             "dask worker %s --nthreads 1 --no-nanny --no-dashboard --memory-limit 0"
             " --local-directory . --name $RC_DEVICE_ID" % fleet.scheduler,
             "--pip", DASK, "--each", "--require", "tag=dask")
    client = distributed.Client(fleet.scheduler, timeout=240)
    try:
        client.wait_for_workers(len(DEVICES), timeout=240)
        futures = client.map(pow, range(20), [2] * 20)
        assert client.gather(futures) == [n * n for n in range(20)]
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert names == set(DEVICES)
        # rc keeps them alive: a Dask worker's process killed, it comes back.
        pids = client.run(os.getpid)
        address, pid = sorted(pids.items())[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: address not in client.scheduler_info()["workers"], 60,
                 "the scheduler to see the killed Dask worker gone")
        client.wait_for_workers(len(DEVICES), timeout=120)
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    finally:
        client.close()
    state = services(fleet)
    assert state["dask-workers"]["runs"] and all(
        run["runs"] >= 1 for run in state["dask-workers"]["runs"])
