"""A new user's first hour, session 34, commands copied from the README and
docs/ on a cluster of the main node's worker and a phone's: `rc map` with
--into and --results, Ctrl-C and `--resume`, and what they did."""
import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import db
from test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from test_map import hears_ctrl_c

TIMEOUT = 120       # seconds any one command may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("first-hour-s34"))
    cluster.start()
    try:
        wait_for(lambda: online(cluster), 30, "the local worker online")
        yield cluster
    finally:
        cluster.stop()


def local_device(cluster):
    return sorted(online(cluster))[0]


def group_states(cluster, group_id):
    return [row[0] for row in cluster.db.execute(
        "SELECT state FROM tasks WHERE group_id = ?", (group_id,))]


def test_resume_writes_the_files_of_inputs_that_ended_after_a_ctrl_c(cluster, tmp_path):
    """docs/map.md's `rc map … --files … --output '{}.gz' --into out/
    --results res/`, interrupted, the tasks left to run, then `rc map
    --resume N --into out/ --results res/` as the interrupt's line says:
    the inputs that completed between the two had no --results entry and
    no --into file, ever (the resume said `every input completed`, exit 0).
    Now the resume writes what no run wrote, and leaves what is there."""
    device = local_device(cluster)
    for number in range(1, 4):
        (tmp_path / ("f%d.log" % number)).write_text("line %d\n" % number)
    cluster.rc("drain", device)          # the tasks stay queued until the interrupt
    try:
        running = subprocess.Popen(
            [RC, "map", "gzip -kf {}", "--files", "f1.log", "f2.log", "f3.log", "--output",
             "{}.gz", "--into", "out/", "--results", "res/"], cwd=str(tmp_path),
            env=cluster.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, start_new_session=True,
            preexec_fn=hears_ctrl_c)
        first = running.stderr.readline()
        assert first.startswith("map ") and first.endswith(": 3 inputs\n"), first
        group_id = int(first.split()[1].rstrip(":"))
        wait_for(lambda: group_states(cluster, group_id) == ["queued"] * 3, 60,
                 "the map's tasks queued")
        running.send_signal(signal.SIGINT)
        _, err = running.communicate(timeout=TIMEOUT)
        assert running.returncode == -signal.SIGINT, err
        assert "rc map --resume %d" % group_id in err
    finally:
        cluster.rc("resume", device)
    wait_for(lambda: group_states(cluster, group_id) == ["completed"] * 3, 60,
             "the map's tasks completed unwatched")
    assert not os.listdir(str(tmp_path / "out")) and not os.listdir(str(tmp_path / "res"))
    # One file already there is the user's: it stays as it is.
    (tmp_path / "res" / "2").mkdir()
    (tmp_path / "res" / "2" / "state").write_text("mine\n")
    resumed = subprocess.run(
        [RC, "map", "--resume", str(group_id), "--into", "out/", "--results", "res/"],
        cwd=str(tmp_path), env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == ""                 # completed before: not printed again
    assert "3 completed before" in resumed.stderr
    assert sorted(os.listdir(str(tmp_path / "out"))) == ["f1.log.gz", "f2.log.gz",
                                                          "f3.log.gz"]
    for number in (1, 3):
        here = tmp_path / "res" / str(number)
        assert (here / "state").read_text() == "completed\n"
        assert (here / "input").read_text() == "f%d.log\n" % number
        assert (here / "exit_code").read_text() == "0\n"
    assert (tmp_path / "res" / "2" / "state").read_text() == "mine\n"


# -- a Python task's traceback -------------------------------------------------------

@pytest.mark.parametrize("task_type, code, frames", [
    ("python_eval", "1/0", ['File "<expression>", line 1']),
    ("python_exec", "def f():\n    return 1/0\nf()",
     ['File "script.py", line 3, in <module>', 'File "script.py", line 2, in f']),
])
def test_a_python_tasks_traceback_starts_at_its_own_code(cluster, task_type, code, frames):
    """`rc submit python_eval '1/0' --wait` printed a traceback whose first
    frame was the worker's own (`File "…/worker.py", line 4137, in
    run_python`, `value = eval(code, main.__dict__)`), which `python -I`
    never shows. Now it starts at the task's code."""
    done = cluster.rc("submit", task_type, code, "--wait", check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Traceback (most recent call last):\n"), done.stderr
    assert "worker.py" not in done.stderr and "run_python" not in done.stderr, done.stderr
    for frame in frames:
        assert frame in done.stderr
    assert "ZeroDivisionError: division by zero\n" in done.stderr


def test_a_syntax_error_is_shown_as_python_shows_it(cluster):
    done = cluster.rc("submit", "python_exec", "def (:", "--wait", check=False)
    assert done.returncode == 1, done.stderr
    assert "SyntaxError" in done.stderr and "worker.py" not in done.stderr, done.stderr


# -- the dashboard on a phone -----------------------------------------------------------

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}


@pytest.fixture(scope="module")
def phone(cluster):
    """Open a page of the dashboard as a phone does; one Chromium for the module."""
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            def open_page(path):
                page = browser.new_context(**PHONE).new_page()
                page.goto("http://127.0.0.1:%d/%s" % (cluster.config.web_port, path))
                return page
            yield open_page
        finally:
            browser.close()


def screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "s34_%s.png" % name))


def test_the_success_tile_is_not_100_percent_beside_a_failure(cluster, phone):
    """On the phone's first screen the overview said `100%` success (15
    min) beside `1 failed (15 min)`: 999 of 1,000 rounded up. Below 100 %
    it now shows a tenth (99.9%)."""
    minute = int(time.time() // 60) * 60 - 5 * 60
    # Once the reaper has caught up on the last hour, it leaves a past minute be.
    wait_for(lambda: cluster.db.execute("SELECT max(minute) FROM stats_minutes").fetchone()[0],
             60, "the reaper's first minutes")
    with db.write(cluster.db):
        cluster.db.execute(
            "INSERT OR REPLACE INTO stats_minutes(minute, submitted, completed, failed,"
            " cancelled, queue_length, running, devices_online, devices_total, slots,"
            " slots_busy) VALUES (?, 1000, 999, 1, 0, 0, 0, 1, 1, 2, 0)", (minute,))
    page = phone("")
    # A selector, not wait_for_function: its polling evaluates a string in the
    # page, which the dashboard's CSP (no 'unsafe-eval') refuses once the
    # first look finds nothing (a busy machine).
    page.wait_for_selector(".tile-value")
    shown = page.locator(".tile:has(.tile-label:text-is('success (15 min)')) .tile-value"
                         ).inner_text()
    screenshot(page, "overview")
    assert shown != "100%" and shown.startswith("99.") and shown.endswith("%"), shown


def test_a_maps_view_says_which_input_each_task_ran(cluster, phone):
    """`/#/map/2` on a phone: twelve rows of a task id and `completed`,
    and nothing to tell which file each was without opening every one.
    Now /api/v1/groups/ID gives each map task's input and the view shows it."""
    done = subprocess.run([RC, "map", "echo {}", "-k", "alpha", "beta"], env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    group_id = int(done.stderr.split()[1].rstrip(":"))
    members = json.loads(cluster.rc("group", str(group_id), "--json").stdout)["tasks"]
    assert [m["input"] for m in members] == ["alpha", "beta"]
    page = phone("#/map/%d" % group_id)
    rows = page.locator("section:has(h2:text-is('Tasks')) tbody tr")
    wait_for(lambda: rows.count() == 2, 30, "the map's two rows")
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(2)] == [
        "alpha", "beta"]
    screenshot(page, "map")


def test_a_task_views_device_link_is_on_the_line_of_its_name(cluster, phone):
    """The task view on a phone drew `device` on one line and the link
    `phone` half a line below it: the link is 44 px tall for a finger, and
    its name stayed at the top of the row."""
    task_id = cluster.rc("submit", "echo", "hello").stdout.strip()
    wait_for(lambda: cluster.db.execute("SELECT device_id FROM tasks WHERE task_id = ?",
                                        (task_id,)).fetchone()[0], 30, "the task given")
    page = phone("#/task/%s" % task_id)
    page.wait_for_selector(".key-values dd a")
    middles = page.evaluate("""() => {
        const name = [...document.querySelectorAll('.key-values dt')]
            .find(dt => dt.textContent === 'device');
        const middle = node => {
            const range = document.createRange();
            range.selectNodeContents(node);
            const box = range.getBoundingClientRect();
            return box.top + box.height / 2;
        };
        return [middle(name), middle(name.nextElementSibling.querySelector('a'))];
    }""")
    screenshot(page, "task")
    assert abs(middles[0] - middles[1]) < 3, middles


# -- the Python client ------------------------------------------------------------------

def test_a_running_tasks_future_is_not_running_but_can_be_cancelled(cluster):
    """docs/client.md: `running()` stays False while the task runs on a
    device (the client hears of ends only), and cancel() still stops it."""
    from rc import client
    with open(cluster.config.admin_token_path) as f:
        token = f.read().strip()
    with client.Cluster("http://127.0.0.1:%d" % cluster.config.web_port, token) as rc_cluster:
        future = rc_cluster.submit("sleep", "60")
        task_id = future.wait_submitted(30)
        wait_for(lambda: cluster.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                            (task_id,)).fetchone()[0] == "running",
                 30, "the sleep task running")
        assert not future.running() and not future.done()
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(10)
        wait_for(lambda: rc_cluster.get_result(task_id)["state"] == "cancelled", 30,
                 "the task cancelled on its device")


# -- rc device ----------------------------------------------------------------------------

def test_rc_device_and_rc_task_show_times_ahead_as_ahead():
    """`rc device phone` after the dashboard had shown the phone: every
    time a date and an age but `watched_until: 1796561651`, seconds since
    1970; and `rc task ID` of a running task said `lease_expires:
    2026-12-06 13:08:16 (0s ago)`, three minutes ahead. Now both read
    `(in 3m)`."""
    from rc import commands
    now = time.time()
    shown = dict(commands.detail_pairs({"watched_until": now + 42.0, "figures_at": now - 5,
                                        "lease_expires": now + 180.0}, now))
    assert shown["watched_until"].endswith(" (in 42s)"), shown
    assert shown["lease_expires"].endswith(" (in 3m)"), shown
    assert shown["figures_at"].endswith(" (5s ago)"), shown


# -- rc service logs ----------------------------------------------------------------------

def test_service_logs_of_a_first_run_still_running_says_why_it_shows_nothing(cluster):
    """The README's `bin/rc service logs web` right after `service add`
    printed `== task 1135, running on phone ==` and nothing under it: a
    run's output comes when it ends (docs/schedules.md), which it did not say."""
    cluster.rc("service", "add", "ticker", "shell", "while true; do echo tick; sleep 5; done")
    try:
        wait_for(lambda: "running on" in cluster.rc("service", "list").stdout, 60,
                 "the service running")
        shown = cluster.rc("service", "logs", "ticker").stdout
        assert shown.startswith("== task ") and ", running on " in shown, shown
        assert "no run has ended yet: a run's output comes when it ends" in shown, shown
        # ... and what shows it meanwhile (rc tail), which prints the ticks so far.
        task_id = int(shown.split()[2].rstrip(","))
        assert "`rc tail %d -f` shows it as it runs" % task_id in shown, shown
        wait_for(lambda: cluster.rc("tail", str(task_id)).stdout.startswith("tick\n"), 30,
                 "rc tail to show the running service's ticks")
    finally:
        cluster.rc("service", "remove", "ticker")
