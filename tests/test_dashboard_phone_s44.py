"""The dashboard as a user meets it on a phone (390x844, touch) in the first
hour, against a cluster started as `make run` starts it (rc-files too) with
real work in it: a map of a few inputs with files, one of them failing; a
task whose stdout passed the inline cap; a map still running. Each test
is a rough edge found by using it and fixed; screenshots go to
test-artifacts/s44_*.png. One cluster and one Chromium for the module."""
import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import RC, WORKER, online, wait_for, with_the_local_worker
from rc import db, devices, records
from test_dashboard_browser import ARTIFACTS, CHROMIUM, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3,
         "is_mobile": True, "has_touch": True}
# A script whose stdout passes the inline cap (960 KiB): 1.2 MB of rows.
LOUD = "import sys\nfor i in range(100000): sys.stdout.write('row %06d\\n' % i)\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("phone-s44")
    for cluster in with_the_local_worker(home):
        inputs = home / "inputs"
        inputs.mkdir()
        for name in ("a.txt", "b.txt", "bad.txt"):
            (inputs / name).write_text(name + "\n")
        done = subprocess.run([RC, "map", "case {} in *bad*) echo no >&2; exit 4;; esac; cat {}",
                               "--files", "a.txt", "b.txt", "bad.txt"], cwd=str(inputs),
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert done.returncode == 1, done.stderr          # one input did not complete
        cluster.map = map_number(done.stderr)
        # Run again, and failed again: the group holds 4 tasks for its 3 inputs.
        done = subprocess.run([RC, "map", "--resume", str(cluster.map)], cwd=str(inputs),
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert "1 of 3 inputs did not complete" in done.stderr, done.stderr
        (home / "loud.py").write_text(LOUD)
        cluster.loud = int(cluster.rc("submit", "python_exec", "--file", str(home / "loud.py"))
                           .stdout)
        cluster.rc("wait", str(cluster.loud))
        yield cluster


def map_number(stderr):
    """`map 12: 3 inputs`, rc map's first line on stderr."""
    return int(re.search(r"^map (\d+): ", stderr, re.M).group(1))


@pytest.fixture
def phone(browser, cluster, request):  # noqa: F811
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.open = lambda path: page.goto("http://127.0.0.1:%d/%s" % (cluster.config.web_port, path))
    yield page
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "s44_%s.png" % request.node.name[5:45]))
    context.close()
    assert page.problems == []


def test_a_script_sent_as_a_file_is_summed_up_by_its_name():
    """`rc tasks`' SUMMARY and the overview's `what` were blank for a task
    whose script came with --file: its code is a stored file."""
    task = {"task_type": "shell", "payload": {"file": "ck.sh", "inputs": []}}
    assert records.payload_summary(task) == "--file ck.sh"
    assert records.payload_summary({"task_type": "shell", "payload": {"command": "ls"}}) == "ls"


def test_a_revoked_device_is_revoked_in_rc_devices_too():
    """The dashboard's card said `revoked` at once; `rc devices` said
    `online` for the revoked device until the reaper marked it offline, then
    `offline`, as for a phone that only went out of Wi-Fi."""
    device = {"status": "online", "revoked": True, "available": True}
    assert records.device_status(device) == "online,revoked"
    assert records.device_status(dict(device, status="offline")) == "offline,revoked"
    assert records.device_status(dict(device, revoked=False)) == "online"


def test_lines_a_worker_did_not_forward_are_counted_once_a_minute(monkeypatch):
    """A device's Logs on the dashboard were 13 notices in one second, each
    `1 lines of this worker's log were not sent`, after a map of 36 tasks:
    each drop's notice took one of the warnings' burst, whose room they were
    kept for. Now one count goes at once, then one a minute at most."""
    spec = importlib.util.spec_from_file_location("rc_worker_s44", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    moment = [1000.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: moment[0])
    forwarder, sent = worker.LogForwarder(), []
    for task_id in range(1, 80):                      # a busy map: over the task events' burst
        forwarder.offer("info", "task_started", {"task_id": task_id})
        sent += forwarder.take()
        moment[0] += 0.01
    forwarder.offer("error", "disk_full", {"message": "no room"})
    sent += forwarder.take()
    moment[0] += worker.LOG_DROPPED_EVERY
    sent += forwarder.take()
    notices = [line["message"] for line in sent if line["event"] == "log_lines_dropped"]
    assert notices == ["1 line of this worker's log not sent: over its limit of 0.5 a second",
                       "48 lines of this worker's log not sent: over its limit of 0.5 a second"]
    assert [line["event"] for line in sent].count("disk_full") == 1


def test_the_overview_shows_the_map_and_the_file_store(cluster, phone):
    """A map of three inputs showed on the overview only as its newest
    tasks, with no word of the map; the file store's quota, which refuses
    an upload, was shown nowhere; a failure said `exit status 4` and not
    which task of the map it was."""
    phone.open("#/")
    row = phone.locator(".panel", has_text="Maps and groups").locator(
        "tr", has=phone.locator('a[href="#/map/%d"]' % cluster.map))
    row.wait_for()
    # By input, as rc map says `1 of 3 inputs did not complete` (not 4 tasks, 2 failed).
    assert "3/3" in row.inner_text() and "2 completed, 1 failed" in row.inner_text()
    store = phone.locator(".tile", has_text="files of")
    quota = "%.1f GiB" % (cluster.config.files_quota_mb / 1024)
    assert store.inner_text().split("\n")[-1] == "files of " + quota
    assert phone.locator(".tile", has_text="files of").locator(".bar").count() == 1
    assert "--file loud.py" in phone.locator(".panel", has_text="Newest tasks").inner_text()
    # Which of the map's look-alike tasks failed: its error says `exit status 4`, its command more.
    failures = phone.locator(".panel", has_text="Recent failures")
    failure = failures.locator("tr", has_text="exit status 4").first
    assert "case bad.txt in" in failure.inner_text()


def test_a_maps_failed_task_shows_its_error_and_the_way_to_resume(cluster, phone):
    """On a phone a map's failed task said only its input (the error
    column was dropped); #/group/ID, the link a task's view gives, did not
    show it as a map with its inputs."""
    phone.open("#/group/%d" % cluster.map)
    row = phone.locator("#view-object tr", has_text="bad.txt").first
    row.wait_for()
    assert phone.locator("#view-object h1").inner_text().startswith("Map %d" % cluster.map)
    error = row.locator(".error-text")
    assert error.is_visible() and error.inner_text() == "exit status 4"
    summary = phone.locator(".panel", has_text="Summary").inner_text()
    assert "`rc map --resume %d` on the main node runs the 1 input that did not complete" \
        % cluster.map in summary and "2 completed, 1 failed" in summary
    assert phone.locator("text=Cancel the rest").count() == 0       # nothing is left


def test_a_revoked_device_offers_no_drain(cluster, phone):
    """A revoked phone's view offered Drain, which can do nothing for a
    device that never connects again."""
    with db.write(cluster.db):
        devices.register(cluster.db, "old-phone", {"device_info": {"hostname": "old-phone"}},
                         "127.0.0.1:9", time.time() - 600)
        devices.revoke(cluster.db, "old-phone")
    phone.open("#/device/old-phone")
    phone.locator("#view-object h1", has_text="revoked").wait_for()
    assert phone.locator("#view-object .actions button").all_inner_texts() == ["Label"]
    # The main node's own worker ("old-phone" was registered as connected,
    # and may still be counted online).
    phone.open("#/device/%s" % (online(cluster) - {"old-phone"}).pop())
    phone.locator("#view-object button", has_text="Drain").wait_for()


def test_output_cut_at_the_inline_cap_says_so_and_downloads_whole(cluster, phone):
    """The task's stdout ended mid-line at 960 KiB with no word that more
    was kept; now a line under it names the stored copy, a download."""
    phone.open("#/task/%d" % cluster.loud)
    note = phone.locator(".stream-rest")
    note.wait_for()
    assert re.match(r"the first [0-9.]+ KiB of 1\.0 MiB above; all of it:", note.inner_text())
    with phone.expect_download() as download:
        note.locator("a").tap()
    with open(download.value.path(), "rb") as f:
        whole = f.read()
    assert len(whole) == 1100000 and whole.endswith(b"row 099999\n")


def test_the_rest_of_a_running_map_is_cancelled_from_a_phone(cluster, phone, tmp_path):
    """From a phone a running map could not be stopped: no button, no
    route (only `rc cancel --group` in the terminal)."""
    runner = subprocess.Popen([RC, "map", "sleep 60; echo {}", "1", "2", "3", "4", "5"],
                              env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              universal_newlines=True, start_new_session=True)
    try:
        group = map_number(runner.stderr.readline())
        phone.open("#/map/%d" % group)
        phone.locator("button", has_text="Cancel the rest").tap()
        phone.locator("#modal-fields input[name=token]").fill(cluster.token)
        phone.locator("#modal-confirm").tap()
        # The view says so (the running ones end once their device stopped them).
        phone.locator("#view-object dt", has_text="cancelled").wait_for()
        wait_for(lambda: runner.poll() is not None, 60, "rc map to end")
        states = cluster.db.execute("SELECT DISTINCT state FROM tasks WHERE group_id = ?",
                                    (group,)).fetchall()
        assert [row[0] for row in states] == ["cancelled"]
        assert runner.returncode == 5                       # five inputs did not complete
        phone.locator("#view-object dt", has_text="running").wait_for(state="detached")
        assert phone.locator("button", has_text="Cancel the rest").count() == 0
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, 9)
            runner.wait()
        runner.stderr.close()
    request = urllib.request.Request(cluster.url + "/api/v1/groups/99999/cancel", method="POST",
                                     data=b"{}", headers={"Authorization": "Bearer " + cluster.token})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404
    assert json.loads(refused.value.read())["error"] == "no group 99999"
