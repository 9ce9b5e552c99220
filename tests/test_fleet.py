"""Managing the fleet with real workers: drain and resume, forget, labels and
roles in requirements, one task on every device."""
import pytest

from cluster_harness import online, start_fleet, wait_all_finished, wait_for
from rc import devices, fleet, tasks

pytestmark = pytest.mark.e2e
WORKERS = ("f1", "f2", "f3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_fleet(tmp_path_factory.mktemp("fleet"), WORKERS)
    yield cluster
    cluster.stop()


def submit(cluster, *args, **kwargs):
    return tasks.submit(cluster.db, cluster.config, *args, **kwargs)


def test_each_runs_once_on_every_device(cluster):
    group_id = fleet.submit_each(cluster.db, cluster.config, "system_info", {})
    task_ids = [t["task_id"] for t in fleet.group(cluster.db, group_id)["tasks"]]
    wait_all_finished(cluster, task_ids, 30)
    summary = fleet.group(cluster.db, group_id)
    assert sorted(t["device_id"] for t in summary["tasks"]) == list(WORKERS)
    assert summary["summary"] == {"tasks": 3, "completed": 3}
    for member in summary["tasks"]:                     # each ran on its own device
        assert tasks.get(cluster.db, member["task_id"])["device_id"] == member["device_id"]
        assert '"cpu_cores"' in member["output"]


def test_labels_pick_devices_and_survive_reconnecting(cluster):
    fleet.label(cluster.db, "f2", ["kind=pi", "disk=big"])
    fleet.set_role(cluster.db, "f2", "storage")
    group_id = fleet.submit_each(cluster.db, cluster.config, "echo", {"message": "hi"},
                                 tasks.parse_requirements(["label.kind=pi"]))
    assert [t["device_id"] for t in fleet.group(cluster.db, group_id)["tasks"]] == ["f2"]
    cluster.workers["f2"].terminate()
    cluster.workers["f2"].wait()
    wait_for(lambda: "f2" not in online(cluster), 30, "f2 gone")
    cluster.start_worker("f2", "--slots", "1")
    wait_for(lambda: "f2" in online(cluster), 30, "f2 back")
    device = devices.get(cluster.db, "f2")
    assert device["labels"] == {"kind": "pi", "disk": "big"} and device["role"] == "storage"
    task_id = submit(cluster, "echo", {"message": "x"},
                     requirements=tasks.parse_requirements(["label.disk=big", "role=storage"]))
    wait_all_finished(cluster, [task_id], 30)
    assert tasks.get(cluster.db, task_id)["device_id"] == "f2"


def test_a_drained_device_finishes_its_task_and_gets_nothing_new(cluster):
    running = submit(cluster, "shell", {"command": "sleep 1.5; echo finished"},
                     requirements={"device_id": "f1"})
    wait_for(lambda: tasks.get(cluster.db, running)["state"] == "running", 30, "start")
    fleet.drain(cluster.db, cluster.config, "f1")
    later = [submit(cluster, "shell", {"command": "echo later"}) for _ in range(6)]
    wait_all_finished(cluster, [running] + later, 60)
    assert tasks.get(cluster.db, running)["result"]["output"].strip() == "finished"
    assert all(tasks.get(cluster.db, t)["device_id"] != "f1" for t in later)
    assert devices.get(cluster.db, "f1")["drained"]
    fleet.resume(cluster.db, cluster.config, "f1")
    pinned = submit(cluster, "echo", {"message": "back"}, requirements={"device_id": "f1"})
    wait_all_finished(cluster, [pinned], 30)


def test_drain_now_hands_the_running_task_back(cluster):
    task_id = submit(cluster, "shell", {"command": "sleep 3; echo moved"})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 30, "start")
    holder = tasks.get(cluster.db, task_id)["device_id"]
    assert fleet.drain(cluster.db, cluster.config, holder, now=True) == 1
    wait_all_finished(cluster, [task_id], 60)
    task = tasks.get(cluster.db, task_id)
    assert task["state"] == "completed" and task["device_id"] != holder
    assert task["retries_used"] == 0
    fleet.resume(cluster.db, cluster.config, holder)


def test_a_forgotten_device_is_refused_and_its_work_goes_elsewhere(cluster):
    fleet.drain(cluster.db, cluster.config, "f3")         # so the queue waits for f3 only
    queued = [submit(cluster, "echo", {"message": str(n)}) for n in range(3)]
    fleet.forget(cluster.db, cluster.config, "f3")
    wait_for(lambda: "f3" not in online(cluster), 30, "f3 refused")
    wait_all_finished(cluster, queued, 30)
    assert all(tasks.get(cluster.db, t)["device_id"] in ("f1", "f2") for t in queued)
    assert "f3" not in [d["device_id"] for d in devices.list_devices(cluster.db)]
    assert devices.get(cluster.db, "f3")["forgotten"]           # history stays readable
    log = open(cluster.worker_log("f3")).read()
    assert "forgotten" in log
