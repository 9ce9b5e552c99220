"""Control messages as a user sends them: `rc broadcast` to real workers,
their acknowledgements read back with `rc control ID`, and an upgrade that
replaces a copied worker.py, which then runs again, connected."""
import json
import os

import pytest

from cluster_harness import WORKER, Cluster, online, wait_for
from rc import devices, tasks

pytestmark = pytest.mark.e2e
OLD_VERSION = "0.0.9-old"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("controls"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    # "old" runs a copy of worker.py from before, and may upgrade itself;
    # "plain" runs bin/worker.py with a --config file and no upgrades.
    cluster.old_worker = os.path.join(cluster.home, "device", "worker.py")
    os.makedirs(os.path.dirname(cluster.old_worker))
    with open(WORKER) as f:
        source = f.read()
    assert source.count('\n__version__ = "') == 1
    with open(cluster.old_worker, "w") as f:
        f.write(source.replace('\n__version__ = "', '\n__version__ = "%s" or "' % OLD_VERSION))
    cluster.plain_config = os.path.join(cluster.home, "plain.json")
    write_json(cluster.plain_config, {"tag": ["a"]})
    cluster.start_worker("old", "--slots", "1", "--allow-upgrade", worker=cluster.old_worker)
    cluster.start_worker("plain", "--slots", "1", "--config", cluster.plain_config)
    wait_for(lambda: {"old", "plain"} <= online(cluster), 30, "both workers")
    yield cluster
    cluster.stop()


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def broadcast(cluster, command):
    return int(cluster.rc("broadcast", command).stdout)


def acks(cluster, control_id):
    """The acknowledgements of both workers, by device id."""
    def both():
        status = json.loads(cluster.rc("control", str(control_id), "--json").stdout)
        return status["acks"] if len(status["acks"]) == 2 else None
    return {ack["device_id"]: ack for ack in wait_for(both, 20, "both acknowledgements")}


def started(cluster, device_id):
    with open(cluster.worker_log(device_id)) as f:
        return [json.loads(line) for line in f
                if line.startswith("{") and '"worker_started"' in line]


def test_reload_reads_the_config_file_again(cluster):
    write_json(cluster.plain_config, {"tag": ["a", "b"]})
    got = acks(cluster, broadcast(cluster, "reload"))
    assert got["plain"]["ok"] and got["plain"]["detail"].startswith("changed: tags;")
    assert got["old"]["ok"] and "nothing to reload" in got["old"]["detail"]
    wait_for(lambda: devices.get(cluster.db, "plain")["tags"] == ["a", "b"], 20,
             "the new tags on the main node")


def test_report_profile_registers_again(cluster):
    before = {d: devices.get(cluster.db, d)["connected_at"] for d in ("old", "plain")}
    got = acks(cluster, broadcast(cluster, "report_profile"))
    assert all(ack["ok"] for ack in got.values())
    wait_for(lambda: all(devices.get(cluster.db, d)["connected_at"] > before[d]
                         for d in before), 20, "new registrations")
    wait_for(lambda: {"old", "plain"} <= online(cluster), 20, "both back")


def test_upgrade_replaces_the_file_and_the_worker_runs_it(cluster):
    process = cluster.workers["old"]
    assert started(cluster, "old")[-1]["version"] == OLD_VERSION
    got = acks(cluster, broadcast(cluster, "upgrade"))
    assert got["old"]["ok"] and "replaced" in got["old"]["detail"], got["old"]
    # "plain" runs the served file: up to date, though not allowed to upgrade
    assert got["plain"]["ok"] and got["plain"]["detail"] == \
        "already the served worker.py; nothing to do"
    with open(WORKER, "rb") as served, open(cluster.old_worker, "rb") as replaced:
        assert replaced.read() == served.read()
    wait_for(lambda: len(started(cluster, "old")) == 2, 20, "the worker to run again")
    assert started(cluster, "old")[-1]["version"] != OLD_VERSION
    assert process.poll() is None            # the same process, exec'd in place
    wait_for(lambda: "old" in online(cluster), 20, "the upgraded worker online")
    task_id = tasks.submit(cluster.db, cluster.config, "shell", {"command": "echo new"},
                           requirements={"device_id": "old"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "completed", 20, "its task")
    again = acks(cluster, broadcast(cluster, "upgrade"))
    assert again["old"]["ok"] and "nothing to do" in again["old"]["detail"]


def test_drain_stops_new_tasks_on_the_device(cluster):
    control_id = broadcast(cluster, "drain")
    got = acks(cluster, control_id)
    assert all(ack["ok"] and ack["detail"].startswith("draining") for ack in got.values())
    wait_for(lambda: not devices.get(cluster.db, "plain")["available"], 20,
             "the device to say it is unavailable")
    assert "drained" in devices.get(cluster.db, "plain")["unavailable_reason"]
    table = cluster.rc("control", str(control_id)).stdout
    assert table.startswith("control %d: drain to every worker" % control_id)
    assert any(line.split()[0] == "plain" and " yes " in line for line in table.splitlines())
