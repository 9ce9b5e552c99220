"""Small rough edges left by session 40's helpers (polish40): each test fails
without its fix."""
import json
import os
import re
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- 1. the token file is owner-only from the start --------------------------------------

def install_line(path, pattern):
    """The install comment's line of share/PATH that writes the token."""
    with open(os.path.join(ROOT, path)) as source:
        for line in source:
            if re.search(pattern, line):
                return line.lstrip("#").split("  #")[0].strip()
    raise AssertionError("no line matching %r in %s" % (pattern, path))


def test_the_install_comments_write_the_token_file_owner_only_from_the_start(tmp_path):
    """`echo TOKEN > ~/.rc-token && chmod 600 ~/.rc-token` (Termux) and
    `echo TOKEN | sudo tee /opt/rc/token && sudo chmod 600` (systemd) made the
    file 0644 under the default umask, readable by every user until the
    chmod. Run each line as written (sudo a no-op, the path moved into
    tmp_path, chmod left out): the file is 0600 before any chmod, one left
    0644 by the old line too (a file written over keeps its mode)."""
    lines = {
        "share/termux/start-rc-worker": install_line("share/termux/start-rc-worker",
                                                     r"TOKEN.*\.rc-token"),
        "share/systemd/rc-worker.service": install_line("share/systemd/rc-worker.service",
                                                        r"TOKEN.*/opt/rc/token"),
    }
    for source, line in lines.items():
        home = tmp_path / source.replace("/", "-")
        home.mkdir()
        (home / ".rc-token").write_text("OLD\n")
        os.chmod(str(home / ".rc-token"), 0o644)
        line = line.replace("/opt/rc/token", str(home / ".rc-token"))
        done = subprocess.run(
            ["sh", "-c", 'umask 022; sudo() { "$@"; }; chmod() { :; }; ' + line],
            env=dict(os.environ, HOME=str(home)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert done.returncode == 0, (source, line, done.stdout)
        token = home / ".rc-token"
        assert token.read_text() == "TOKEN\n", (source, line)
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, (source, line)


# -- 2. CSV a spreadsheet opens runs no formula a device chose ------------------------------

def test_csv_values_that_a_spreadsheet_would_run_as_formulas_begin_with_a_quote():
    """`rc devices --csv` (and /text?format=csv) wrote a device's own text as
    it came: a device named `=HYPERLINK(...)` or with a label `+cmd|...` ran
    as a formula when the file was opened in a spreadsheet (CSV injection).
    OWASP's fix: such a value begins with `'`. Numbers, negative ones too,
    stay numbers; the table is not opened as formulas and stays (TSV is:
    test_polish_s41)."""
    from rc import render
    rows = [{"device_id": '=HYPERLINK("http://x","y")', "labels": ["+cmd|' /C calc'!A0"],
             "os": "@SUM(1)", "note": "-2+3", "temp": -3.5, "exit": -1, "big": -2e7,
             "plain": "pi-kitchen"}]
    columns = ["device_id", "labels", "os", "note", "temp", "exit", "big", "plain"]
    parsed = list(__import__("csv").reader(render.csv_text(rows, columns, header=False)
                                           .splitlines()))
    assert parsed == [["'=HYPERLINK(\"http://x\",\"y\")", "'+cmd|' /C calc'!A0", "'@SUM(1)",
                       "'-2+3", "-3.5", "-1", "-20000000", "pi-kitchen"]]


# -- 3. rc logs --device of the main node's own worker --------------------------------------

def test_rc_logs_device_shows_the_main_node_own_worker_lines_once(cluster_home, add_device):
    """The main node's own worker (rc-worker) writes its lines to its log file
    and forwards them like any worker: `rc logs --device nas-local` showed each
    twice (user39), as `rc logs --task N` did before e5e826e. Now a device
    whose worker's lines are in the files is not added again from the
    database; another device's forwarded lines still are."""
    from rc import db, device_logs
    from test_cli import rc
    config, connection = cluster_home
    for device_id in ("nas-local", "phone"):
        add_device(device_id)
        with db.write(connection):
            device_logs.store(connection, device_id, device_logs.checked_lines({"lines": [
                {"time": 1.7e9 + 1, "level": "warning", "event": "task_finished",
                 "message": "status=failed", "task_id": 7}]}), 1.8e9)
    os.makedirs(config.log_dir, exist_ok=True)
    with open(os.path.join(config.log_dir, "rc-worker.log"), "w") as f:
        f.write(json.dumps({"time": 1.7e9 + 1, "program": "worker", "level": "warning",
                            "event": "task_finished", "device_id": "nas-local", "task_id": 7,
                            "message": "status=failed"}, separators=(",", ":")) + "\n")
    status, out, err = rc("logs", "--device", "nas-local")
    assert status == 0, err
    assert len(out.splitlines()) == 1 and "task_finished" in out, out
    status, out, err = rc("logs", "--device", "phone")
    assert status == 0, err
    assert len(out.splitlines()) == 1 and "device_id=phone" in out, out


# -- 4. an --output glob that matched nothing is said where the user looks ------------------

def test_wait_and_files_say_which_output_glob_matched_nothing(cluster_home):
    """`rc submit --output 'plots/*.png' --wait` of a task that wrote its
    plots elsewhere printed the output and exited 0, and `rc files` only a
    header: only `rc get` said the glob matched nothing. Now `rc wait`
    (so `submit --wait`) and `rc files` say which globs matched no file it
    left, on stderr; a glob that matched is not named, nor is a task that
    asked for no outputs."""
    from rc import db, files, tasks
    from test_cli import rc
    config, connection = cluster_home
    globbed = tasks.submit(connection, config, "shell", {
        "command": "echo x > a.txt", "outputs": ["plots/*.png", "*.txt"]})
    bare = tasks.submit(connection, config, "shell", {"command": "true"})
    status, _, err = rc("files", str(globbed))
    assert status == 0 and "matched no file" not in err     # queued: not yet
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'completed', finished_at = 1,"
                           " result = '{\"output\": \"x\\n\"}'")
        files.insert_task_file(connection, globbed, 1, files.OUTPUT, "a.txt", "ab" * 32, 2, 1)
    for command in ("wait", "files"):
        status, out, err = rc(command, str(globbed))
        assert status == 0, err
        assert err == "rc: task %d: --output plots/*.png matched no file it left\n" % globbed, \
            (command, err)
        status, out, err = rc(command, str(bare))
        assert status == 0 and err == "", (command, err)


# -- 5. a device's log messages on a laptop: room, and whole words -------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
BASE = "http://127.0.0.1:9"         # never opened: every request is answered by page.route
LOG_MESSAGES = [
    ("task_finished", "attempt=1 task_type=shell status=failed error=exit status 3"
                      " execution_time=0.516861"),
    ("registered", "main_node=127.0.0.1:24537 slots=2 resending=0 active_tasks=0"
                   " heartbeat_interval=60.0 fence_interval=150.0 disconnect_fence=1.0"),
    ("availability_changed", "available=false reason=battery_below_minimum"
                             " battery_percent=18 min_battery=30"),
]

# The words of the cells a selector names that a line break cut in two.
WORDS_SPLIT = """(selector) => {
    const split = [];
    for (const cell of document.querySelectorAll(selector)) {
        const text = cell.firstChild;
        let at = 0;
        for (const word of text.data.split(' ')) {
            const range = document.createRange();
            range.setStart(text, at);
            range.setEnd(text, at + word.length);
            const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            if (tops.size > 1) split.push(word);
            at += word.length + 1;
        }
    }
    return split;
}"""


def static_answer(route):
    """share/web as rc-web serves it (`/` is index.html): the path asked
    for when it is not one of them, None when it was answered."""
    from urllib.parse import urlsplit
    path = urlsplit(route.request.url).path
    if path in ("/", "/static/index.html"):
        path = "/static/index.html"
    if not path.startswith("/static/"):
        return path
    with open(os.path.join(ROOT, "share", "web", path[len("/static/"):]), "rb") as f:
        kind = {"js": "text/javascript", "css": "text/css"}.get(path.rsplit(".", 1)[-1],
                                                                "text/html")
        route.fulfill(body=f.read(), content_type=kind)
    return None


def dashboard_answer(route):
    """share/web as rc-web serves it, and a device's API answers."""
    import time
    path = static_answer(route)
    if path is None:
        return None
    now = time.time()
    answers = {
        "/api/v1/devices/pi-kitchen": {
            "device_id": "pi-kitchen", "status": "online", "connected": 1, "slots": 2,
            "active_tasks": 0, "labels": {}, "tags": [], "task_types": ["shell"],
            "cpu_cores": 4, "memory_gb": 3.8,
            "last_seen": now, "registered_at": now - 60, "connected_at": now - 60,
            "metrics": {"cpu_percent": 12.0, "memory_percent": 40.0}},
        "/api/v1/tasks": {"tasks": []},
        "/api/v1/devices/pi-kitchen/watch": {"watching": True},
        "/api/v1/devices/pi-kitchen/logs": {"logs": [
            {"ts": now - n, "level": "warning", "event": event, "message": message,
             "task_id": 7} for n, (event, message) in enumerate(LOG_MESSAGES)]},
    }
    if path in answers:
        return route.fulfill(json=answers[path])
    return route.fulfill(status=404, json={"error": "not here"})


def test_a_devices_log_messages_on_a_laptop_keep_their_words_whole(tmp_path):
    """On a laptop (1366 px) a device's Logs panel shares the view with its
    figures: the message column was about 220 px, and worker lines broke in
    the middle of their words (`reason=battery_below_min|imum`,
    `main_node=127.0.0.1:245|37`; user39). Now the device view gives the
    column of Tasks and Logs more of the width: every word of these messages
    stays on one line, and the column is the table's widest."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_dashboard_browser import panel_screenshot
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at %s" % CHROMIUM)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.route(BASE + "/**", dashboard_answer)
            page.goto(BASE + "/#/device/pi-kitchen")
            page.wait_for_selector("#view-object td.message:has-text('battery_below_minimum')")
            logs = page.locator(".panel", has=page.locator("h2", has_text="Logs"))
            panel_screenshot(logs, str(tmp_path / "logs.png"))
            panel_screenshot(logs, os.path.join(ROOT, "test-artifacts", "s40_device_logs.png"))
            # Each word's boxes: one line each, or the word was broken.
            split = page.evaluate(WORDS_SPLIT, "#view-object td.message")
            assert split == [], split
            widths = page.evaluate("""() => [...document.querySelectorAll(
                '#view-object .panel:last-child th')].map(th => th.getBoundingClientRect().width)""")
            assert max(widths) == widths[-1], widths
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366
        finally:
            browser.close()
