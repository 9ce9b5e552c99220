"""The fleet commands as a user types them: bin/rc against a real cluster
with three workers."""
import socket

import pytest

from cluster_harness import start_fleet, wait_for

pytestmark = pytest.mark.e2e
WORKERS = ("w1", "w2", "w3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_fleet(tmp_path_factory.mktemp("fleet-cli"), WORKERS)
    yield cluster
    cluster.stop()


def group_rows(output):
    """DEVICE, TASK, STATE, OUTPUT of each row of `rc group`'s table."""
    lines = output.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "TASK", "STATE"]
    return [line.split()[:4] for line in lines[1:-1]]


def test_each_gives_one_result_per_device(cluster):
    done = cluster.rc("submit", "--each", "shell", "hostname", "--wait", "--wait-timeout", "20")
    rows = group_rows(done.stdout)
    assert [row[0] for row in rows] == list(WORKERS)
    assert all(row[2] == "completed" and row[3] == socket.gethostname() for row in rows)
    assert done.stdout.splitlines()[-1] == "3 tasks: 3 completed, 0 failed, 0 running"


def test_a_label_picks_the_device(cluster):
    assert cluster.rc("label", "w2", "kind=pi").stdout == "w2 labels: kind=pi\n"
    group_id = cluster.rc("submit", "--each", "--require", "label.kind=pi", "shell",
                          "hostname").stdout.strip()
    wait_for(lambda: "1 completed" in cluster.rc("group", group_id).stdout, 20, "w2's task")
    assert [row[0] for row in group_rows(cluster.rc("group", group_id).stdout)] == ["w2"]


def test_drain_shows_in_devices_until_resumed(cluster):
    def status_of(device_id):
        """status, then `,drained` when the drained column says 1 (as the table shows it)."""
        lines = cluster.rc("devices", "--tsv").stdout.splitlines()
        drained = lines[0].split("\t").index("drained")
        for line in lines[1:]:
            fields = line.split("\t")
            if fields[0] == device_id:
                return fields[1] + (",drained" if fields[drained] == "1" else "")
    cluster.rc("drain", "w1")
    assert status_of("w1") == "online,drained" and status_of("w2") == "online"
    group_id = cluster.rc("submit", "--each", "echo", "hi").stdout.strip()
    assert [row[0] for row in group_rows(cluster.rc("group", group_id).stdout)] == ["w2", "w3"]
    cluster.rc("resume", "w1")
    assert status_of("w1") == "online"
