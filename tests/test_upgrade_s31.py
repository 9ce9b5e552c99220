"""A user updating under a running fleet (session 31's upgrade round): what
the upgrade from yesterday's releases showed, each fixed and checked here."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cluster_harness import Cluster, online, wait_for
from rc import tasks, web
from rc.states import COMPLETED, TERMINAL_STATES
from test_web import Client, admin, call, client, serve, stop  # noqa: F401 (fixtures)
from test_worker import main, spawn  # noqa: F401 (fixtures)
from test_worker_identity import edges, register, start, state  # noqa: F401 (fixture)

WORKER = os.path.join(os.path.dirname(__file__), "..", "bin", "worker.py")
STATIC_LINK = re.compile(r'(?:src|href)="(/static/[^"]+)"')


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- the dashboard after an upgrade -----------------------------------------------------

def test_the_page_names_each_script_by_its_content_and_is_asked_for_again(client):
    """Before, / and /static/* came without Cache-Control: a browser kept
    them for a tenth of the files' age and, after `git pull` and a restart,
    ran the new page with the old dashboard.js (a reload fetched only the
    page). Now every link carries its file's digest and nothing is kept
    unasked."""
    status, headers, page = client.request("/")
    assert status == 200 and headers["Cache-Control"] == "no-cache"
    assert headers["Content-Type"].startswith("text/html")
    links = STATIC_LINK.findall(page)
    assert "/static/dashboard.js?v=%s" % sha256_of(
        os.path.join(web.WEB_ROOT, "dashboard.js"))[:16] in links
    assert len(links) == 7 and all("?v=" in link for link in links), links
    for link in links:
        status, headers, _ = client.request(link)
        assert status == 200 and headers["Cache-Control"] == "no-cache", link


def test_a_changed_file_changes_its_link_only(tmp_path):
    root = tmp_path / "web"
    shutil.copytree(web.WEB_ROOT, str(root))
    before = STATIC_LINK.findall(web.versioned_page(str(root)))
    with open(str(root / "dashboard.js"), "a") as f:
        f.write("\n// the next release\n")
    after = STATIC_LINK.findall(web.versioned_page(str(root)))
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(changed) == 1 and changed[0][1].startswith("/static/dashboard.js?v=")


# -- rc broadcast upgrade to workers that have the file already -------------------------

@edges
def test_an_up_to_date_worker_says_so_without_allow_upgrade(main, spawn, state, python):
    """The main node's own worker (never --allow-upgrade) and a phone given
    the new worker.py by hand answered 'upgrade not allowed', a 'no' in
    `rc control` after every upgrade though they run the served file."""
    start(spawn, python, state)
    link = main.accept()
    register(link)
    link.send("control", {"control_id": 1, "command": "upgrade", "sha256": sha256_of(WORKER)})
    link.send("control", {"control_id": 2, "command": "upgrade", "sha256": "ab" * 32})
    current, other = control_acks(link, 2)
    assert current == {"control_id": 1, "ok": True,
                       "detail": "already the served worker.py; nothing to do"}
    assert other == {"control_id": 2, "ok": False, "detail": "upgrade not allowed on this"
                     " device (start with --allow-upgrade)"}


def control_acks(link, count):
    """The first `count` control_acks, by control id (1, 2, ...)."""
    acks = {}
    while len(acks) < count:
        envelope = link.next()
        assert envelope is not None, "closed while waiting for control_ack"
        if envelope["message_type"] == "control_ack":
            acks[envelope["data"]["control_id"]] = envelope["data"]
    return [acks[n] for n in range(1, count + 1)]


# -- workers of earlier releases under this main node -----------------------------------

# 2026-12-05 05:51 (before task files and the client) and 2026-12-06 03:53.
OLD_RELEASES = ("2f398d9", "e0e5055")
PYTHON36 = os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")


def old_worker_source(release):
    """bin/worker.py as that release had it; the test skips in a clone
    without that history (a shallow one)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = subprocess.run(["git", "-C", repo, "show", "%s:bin/worker.py" % release],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if found.returncode != 0:
        pytest.skip("no git history of %s here" % release)
    return found.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("upgrade"))
    cluster.start()
    yield cluster
    cluster.stop()


def worker_starts(cluster, device_id):
    with open(cluster.worker_log(device_id)) as f:
        return sum('"worker_started"' in line for line in f)


def run_on(cluster, device_id, command):
    task_id = tasks.submit(cluster.db, cluster.config, "shell", {"command": command},
                           requirements={"device_id": device_id})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] in TERMINAL_STATES, 60,
             "task %d on %s" % (task_id, device_id))
    return tasks.get(cluster.db, task_id)


@pytest.mark.e2e
@pytest.mark.parametrize("release", OLD_RELEASES)
def test_an_old_releases_worker_runs_tasks_then_upgrades_to_this_one(cluster, release,
                                                                     tmp_path):
    """As a phone left on an old worker.py (Python 3.6 where there is one):
    it joins this main node, runs a task, takes `rc broadcast upgrade` and
    runs tasks as this release's worker, same process."""
    device_id = "old-" + release
    path = str(tmp_path / "worker.py")
    with open(path, "wb") as f:
        f.write(old_worker_source(release))
    python = PYTHON36 if os.path.exists(PYTHON36) else sys.executable
    with open(cluster.worker_log(device_id), "ab") as log:
        process = subprocess.Popen([python, path, "--allow-upgrade", "--slots", "1"]
                                   + cluster.worker_arguments(device_id),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.workers[device_id] = process
    wait_for(lambda: device_id in online(cluster), 60, "the old worker online")
    before = run_on(cluster, device_id, "echo old")
    assert (before["state"], before["result"]["output"]) == (COMPLETED, "old\n")

    control_id = int(cluster.rc("broadcast", "upgrade", "--require",
                                "device_id=" + device_id).stdout)
    ack = wait_for(lambda: json.loads(cluster.rc("control", str(control_id), "--json").stdout)
                   ["acks"], 30, "the old worker's answer")[0]
    assert ack["ok"] and "replaced" in ack["detail"], ack
    wait_for(lambda: worker_starts(cluster, device_id) == 2, 60, "the worker run again")
    with open(path, "rb") as replaced, open(WORKER, "rb") as served:
        assert replaced.read() == served.read()
    assert process.poll() is None                     # the same process, exec'd in place
    wait_for(lambda: device_id in online(cluster), 60, "the upgraded worker online")
    after = run_on(cluster, device_id, "echo new")
    assert (after["state"], after["result"]["output"]) == (COMPLETED, "new\n")
    assert after["device_id"] == device_id and after["attempt"] == 1
