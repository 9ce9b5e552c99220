"""Session 44's attack: what a reader (anyone rc-web lets read: the default
read_access=local, every local user and task of the main node; `open`, the
LAN) can make rc-web hold or fail through the web terminal's commands,
which the HTTP routes beside them bound. One shared cluster."""
import http.client
import json
import os

import pytest

from cluster_harness import Cluster
from rc import bounded

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("hostile-s44"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def command(cluster, line, timeout=120):
    """POST /api/v1/command as a reader: no token, from 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                            timeout=timeout)
    try:
        connection.request("POST", "/api/v1/command", json.dumps({"command": line}).encode(),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def peak_rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM for %d" % pid)


def reset_peak_rss(pid):
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")


# -- the largest count a command takes -------------------------------------------------

def test_the_largest_count_a_command_takes_is_answered_not_a_traceback(cluster):
    """`--limit` and `--minutes` take any whole number SQLite holds, but
    `tasks` asked SQLite for one row more than the limit and `history` for
    the minute `minutes` before now: at 2**63-1 both were OverflowError, a
    traceback from `rc` and a 500 from the web terminal's route."""
    largest = str(bounded.LARGEST)
    for argv in (["tasks", "--limit", largest], ["history", "--minutes", largest]):
        done = cluster.rc(*argv, check=False)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
        status, answer = command(cluster, " ".join(argv))
        assert status == 200 and answer["status"] == 0, (argv, status, answer)
