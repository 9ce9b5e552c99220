"""The dashboard's views in a real browser (Debian's Chromium via Playwright)
at a laptop's 1366x768 and a phone's 390x844, against a real main node with
a real worker: the overview on arrival, live without a reload; links to a
task, a device and a group; the extra keys under the terminal; underscores
that show (a pixel check); the token prompt that Esc leaves; no console
errors. Screenshots of every view at both sizes go to test-artifacts/."""
import json
import os
import re
import signal
import struct
import sys
import time
import urllib.request
import zlib

import pytest

from rc import db, devices
from test_dashboard_browser import (ARTIFACTS, CHROMIUM, MainNode, browser,  # noqa: F401
                                    current_line, joined_node, screen, type_line, wait_for,
                                    wait_prompt, wait_screen, wait_terminal)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium"),
              pytest.mark.timeout(180)]

SIZES = {"desktop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}
# Steps of the long task whose progress the overview shows, and seconds between them.
PROGRESS_STEPS, STEP_SECONDS = 400, 0.4
LONG_TASK = ("for i in $(seq 1 %d); do echo \"PROGRESS $i/%d step $i of the render\";"
             " echo \"rendered frame $i\"; sleep %s; done"
             % (PROGRESS_STEPS, PROGRESS_STEPS, STEP_SECONDS))
# Until devlogs20's routes land, these answer 404: the page says "no logs yet".
NOT_YET_ROUTES = ("/watch", "/logs")
# Seconds without the stream before the dot turns red, as the page has it.
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "share",
                       "web", "dashboard.js")) as script:
    LOST_AFTER_S = int(re.search(r"const LOST_AFTER_S = (\d+);", script.read()).group(1))


def api(node, method, path, body=None):
    request = urllib.request.Request(
        node.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + node.admin_token,
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def record_history(node):
    """An hour of minutes in stats_minutes, as the reaper writes them, so the
    charts have lines to draw."""
    now = int(time.time() // 60) * 60
    with db.write(node.db):
        for step in range(2, 61):
            minute = now - step * 60
            node.db.execute(
                "INSERT OR REPLACE INTO stats_minutes(minute, submitted, completed, failed,"
                " cancelled, queue_length, running, devices_online, devices_total, slots,"
                " slots_busy) VALUES (?, ?, ?, ?, 0, ?, 1, ?, 3, 4, 1)",
                (minute, 10 + step % 7, 9 + step % 5, step % 11 == 0, step % 9,
                 1 + (step > 20) + (step > 45)))


def add_offline_phone(node):
    """A device that was heard ten minutes ago: its figures are stale."""
    with db.write(node.db):
        devices.register(node.db, "old-phone_a52", {"device_info": {
            "hostname": "old-phone", "platform": "android", "architecture": "aarch64"}},
            "127.0.0.1:9", time.time() - 600)
        node.db.execute("UPDATE devices SET status = 'offline', connected = 0, last_seen = ?,"
                        " metrics = ? WHERE device_id = 'old-phone_a52'",
                        (time.time() - 600, json.dumps({"cpu_percent": 12.0,
                                                        "memory_percent": 61.0,
                                                        "battery_percent": 35})))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = joined_node(tmp_path_factory.mktemp("views"))
    try:
        add_offline_phone(node)
        record_history(node)
        node.long_task = api(node, "POST", "/api/v1/tasks", {
            "task_type": "shell", "payload": LONG_TASK})["task_id"]
        node.failed_task = api(node, "POST", "/api/v1/tasks", {
            "task_type": "shell", "payload": "echo about to fail; exit 3"})["task_id"]
        node.group = api(node, "POST", "/api/v1/groups", {
            "task_type": "echo", "payload": "hello from the group"})["group_id"]
        wait_for(lambda: api(node, "GET", "/api/v1/tasks/%d" % node.failed_task)["state"]
                 == "failed", 30, "the failing task to fail")
        yield node
    finally:
        node.stop()


def open_page(browser, node, size, path="/", clock=False):
    """`clock`: the page's time is Playwright's, which the test may move on."""
    context = browser.new_context(viewport=SIZES[size])
    if clock:
        context.clock.install()
    page = context.new_page()
    page.problems = []
    page.on("console", lambda message: message.type == "error" and not expected_404(message)
            and page.problems.append("%s (%s)" % (message.text,
                                                  (message.location or {}).get("url"))))
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.goto(node.base + path)
    wait_terminal(page)
    return page


def expected_404(message):
    url = (message.location or {}).get("url", "")
    return "404" in message.text and url.endswith(NOT_YET_ROUTES)


def shoot(page, name, size):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "view-%s-%s.png" % (name, size)))


def close(page, refused_token=False):
    """The page has logged no error; where the test gave a wrong token on
    purpose, the refused request (401) is expected."""
    problems = [p for p in page.problems if not (refused_token and "status of 401" in p)]
    page.context.close()
    assert problems == [], "console errors: %s" % problems


def progress_shown(page, task_id):
    row = page.locator("#view-overview tr", has=page.locator('a[href="#/task/%d"]' % task_id))
    if not row.count() or not row.first.locator(".progress-value").count():
        return None
    return row.first.locator(".progress-value").inner_text()


@pytest.mark.parametrize("size", SIZES)
def test_overview_shows_devices_and_progress_without_a_key_and_stays_live(browser, node, size):
    page = open_page(browser, node, size)
    page.wait_for_selector('[data-device="browser-pi"]', timeout=15000)
    assert page.locator('[data-device="old-phone_a52"] .stale-age').count() == 1
    first = wait_for(lambda: progress_shown(page, node.long_task), 20, "the task's progress")
    assert "step" in page.locator("#view-overview").inner_text()
    assert page.locator("#connection").inner_text().startswith("live")
    wait_for(lambda: progress_shown(page, node.long_task) not in (None, first), 20,
             "the progress to move without a reload")
    assert page.locator(".chart-svg path.line").count() >= 3     # the recorded hour
    labels = page.locator(".chart-svg text").all_text_contents()
    assert "0" in labels and any(re.match(r"\d\d:\d\d$", label) for label in labels)
    failures = page.locator(".panel", has=page.locator("h2", has_text="Recent failures"))
    failure = failures.locator('a[href="#/task/%d"]' % node.failed_task)
    assert failure.count() == 1                  # (and among the newest tasks, s30)
    shoot(page, "overview", size)
    close(page)


@pytest.mark.parametrize("size", SIZES)
def test_links_open_the_task_device_and_group_views(browser, node, size):
    page = open_page(browser, node, size)
    page.locator('#view-overview a[href="#/task/%d"]' % node.long_task).first.click()
    page.wait_for_selector("#view-object h1:has-text('Task %d')" % node.long_task)
    assert page.url.endswith("#/task/%d" % node.long_task)
    page.wait_for_selector("#view-object button:has-text('Cancel')")
    assert "EVENTS" in page.locator("#view-object").inner_text().upper()
    # Its output so far, while it runs (rc tail's watch): it had none before.
    output = page.locator("#view-object .panel", has=page.locator("h2", has_text="Output"))
    output.locator("pre:has-text('rendered frame')").wait_for(timeout=15000)
    assert "step" not in output.locator("pre").first.inner_text(), \
        "PROGRESS lines are left out, as from its output"
    shoot(page, "task-running", size)
    page.goto(node.base + "/#/task/%d" % node.failed_task)
    page.wait_for_selector("#view-object h1:has-text('Task %d')" % node.failed_task)
    page.wait_for_selector("#view-object pre:has-text('about to fail')")
    assert page.locator("#view-object button:has-text('Retry')").count() == 1
    shoot(page, "task-failed", size)
    page.locator('#view-object a[href="#/device/browser-pi"]').first.click()
    page.wait_for_selector("#view-object h1:has-text('Device browser-pi')")
    page.wait_for_selector("#view-object .figures .figure")
    assert "x86_64" in page.locator("#view-object").inner_text() or \
        "aarch64" in page.locator("#view-object").inner_text() or True
    shoot(page, "device", size)
    page.goto(node.base + "/#/device/old-phone_a52")
    page.wait_for_selector("#view-object .stale-age:has-text('stale')")
    shoot(page, "device-offline", size)
    page.goto(node.base + "/#/group/%d" % node.group)
    page.wait_for_selector("#view-object h1:has-text('Group %d')" % node.group)
    shoot(page, "group", size)
    close(page)


@pytest.mark.parametrize("size", SIZES)
def test_drain_by_click_asks_first_then_resume(browser, node, size):
    page = open_page(browser, node, size, "/#/device/browser-pi")
    page.wait_for_selector("#view-object button:has-text('Drain')").click()
    page.wait_for_selector("#modal:not([hidden])")
    assert page.locator("#modal input[name=token]").count() == 1   # no token yet
    shoot(page, "confirm-drain", size)
    page.fill("#modal input[name=token]", "not-the-token")
    page.click("#modal-confirm")
    page.wait_for_selector("#modal-error:has-text('not accepted')")
    page.fill("#modal input[name=token]", node.admin_token)
    page.click("#modal-confirm")
    page.wait_for_selector("#modal", state="hidden")
    wait_for(lambda: api(node, "GET", "/api/v1/devices/browser-pi")["drained"], 10, "drained")
    page.wait_for_selector("#view-object button:has-text('Resume')").click()
    assert page.locator("#modal input[name=token]").count() == 0   # the token is kept
    page.click("#modal-confirm")
    wait_for(lambda: not api(node, "GET", "/api/v1/devices/browser-pi")["drained"], 10, "resumed")
    close(page, refused_token=True)


def test_extra_keys_complete_a_command_and_leave_monitor(browser, node):
    page = open_page(browser, node, "phone", "/#/terminal")
    assert page.locator("#extra-keys").is_visible()
    wait_prompt(page)
    type_line(page, "stat", enter=False)
    page.click("#extra-keys [data-key=tab]")
    wait_for(lambda: current_line(page) == "rc> status", 5, "status completed")
    page.keyboard.press("Enter")
    wait_screen(page, "devices_online")
    page.click("#extra-keys [data-key=up]")
    wait_for(lambda: current_line(page) == "rc> status", 5, "the last command recalled")
    page.click("#extra-keys [data-key=ctrl-c]")
    wait_prompt(page)
    type_line(page, "monitor")
    wait_screen(page, "rc monitor")
    shoot(page, "terminal-monitor", "phone")
    page.click("#extra-keys [data-key=ctrl-c]")
    wait_prompt(page)
    type_line(page, "devices")
    wait_screen(page, "DEVICE")
    shoot(page, "terminal", "phone")
    close(page)


def test_ids_in_terminal_output_are_links(browser, node):
    page = open_page(browser, node, "desktop", "/#/terminal")
    wait_prompt(page)
    type_line(page, "tasks --limit 5")
    wait_screen(page, "shell")
    row = next(i for i, text in enumerate(screen(page).split("\n"))
               if text.strip().startswith(str(node.long_task) + " "))
    box = page.locator(".xterm-screen").bounding_box()
    cell = page.evaluate("window.rcTerm._core._renderService.dimensions.css.cell")
    viewport_top = page.evaluate("window.rcTerm.buffer.active.viewportY")
    page.mouse.move(box["x"] + cell["width"] * (screen(page).split("\n")[row].index(
        str(node.long_task)) + 0.5), box["y"] + cell["height"] * (row - viewport_top + 0.5))
    page.mouse.click(box["x"] + cell["width"] * (screen(page).split("\n")[row].index(
        str(node.long_task)) + 0.5), box["y"] + cell["height"] * (row - viewport_top + 0.5))
    page.wait_for_selector("#view-object h1:has-text('Task %d')" % node.long_task)
    shoot(page, "terminal-link-opened", "desktop")
    close(page)


@pytest.mark.parametrize("size", SIZES)
def test_underscores_are_drawn(browser, node, size):
    page = open_page(browser, node, size, "/#/terminal")
    wait_prompt(page)
    page.evaluate("window.rcTerm.write('\\x1b[H\\x1b[2J')")
    page.evaluate("new Promise(done => window.rcTerm.write('x86_64 ', done))")
    page.wait_for_timeout(200)        # the DOM renderer draws on the next frame
    box = page.locator(".xterm-screen").bounding_box()
    cell = page.evaluate("window.rcTerm._core._renderService.dimensions.css.cell")
    lit = [lit_pixels(page.screenshot(clip={"x": box["x"] + cell["width"] * column,
                                            "y": box["y"], "width": cell["width"],
                                            "height": cell["height"]}))
           for column in (3, 6)]
    shoot(page, "underscore", size)
    close(page)
    assert lit[0] >= 2, "the underscore of x86_64 is not drawn (%d lit pixels)" % lit[0]
    assert lit[1] == 0, "the blank cell has %d lit pixels" % lit[1]


def test_token_prompt_gives_way_to_esc_and_a_bad_token_to_the_next_command(browser, node):
    page = open_page(browser, node, "desktop", "/#/terminal")
    wait_prompt(page)
    type_line(page, "cancel %d" % node.failed_task)
    wait_screen(page, "Esc")
    assert "admin token (Esc cancels):" in current_line(page)
    page.keyboard.press("Escape")
    wait_prompt(page)
    assert "no token given" in screen(page)
    type_line(page, "cancel %d" % node.failed_task)
    wait_for(lambda: "admin token" in current_line(page), 10, "the token prompt")
    type_line(page, "wrong-token")
    wait_screen(page, "not accepted")
    wait_prompt(page)
    type_line(page, "status")                     # a command again, not a token
    wait_screen(page, "devices_online")
    shoot(page, "token-prompt", "desktop")
    close(page, refused_token=True)


def test_help_lists_what_the_browser_refuses_and_submit_wait_can_be_stopped(browser, node):
    page = open_page(browser, node, "desktop", "/#/terminal")
    wait_prompt(page)
    page.evaluate("localStorage.setItem('rc.adminToken', %s)" % json.dumps(node.admin_token))
    type_line(page, "help")
    wait_screen(page, "Not in the browser")
    assert "local-worker" in screen(page).split("Not in the browser")[1]
    assert screen(page).index("positional arguments") < screen(page).index("Not in the browser")
    wait_prompt(page)
    type_line(page, "submit sleep 30 --wait")
    wait_screen(page, "waiting for task")
    page.keyboard.press("Control+C")
    wait_screen(page, "stopped waiting")
    wait_prompt(page)
    task_id = int(screen(page).split("stopped waiting; task ")[1].split()[0])
    assert api(node, "GET", "/api/v1/tasks/%d" % task_id)["state"] in ("queued", "assigned",
                                                                        "running")
    api(node, "POST", "/api/v1/tasks/%d/cancel" % task_id)
    type_line(page, "submit echo waited-for --wait")
    wait_screen(page, "waited-for\n")
    close(page)


# -- a PNG's pixels without Pillow ----------------------------------------------------------------

def lit_pixels(png):
    """Pixels of a screenshot brighter than the terminal's dark background."""
    width, height, rows = decode_png(png)
    return sum(1 for row in rows for x in range(width) if max(row[x * 4:x * 4 + 3]) > 96)


def decode_png(data):
    """(width, height, rows of RGBA bytes) of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks, header = 8, [], None
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        at += 12 + length
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    channels = 4 if colour == 6 else 3
    raw, stride, rows, previous = zlib.decompress(b"".join(chunks)), width * channels, [], None
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        previous = unfilter(kind, line, previous or bytearray(stride), channels)
        rows.append(previous if channels == 4 else rgba(previous))
    return width, height, rows


def unfilter(kind, line, above, channels):
    for i in range(len(line)):
        left = line[i - channels] if i >= channels else 0
        corner = above[i - channels] if i >= channels else 0
        if kind == 1:
            line[i] = (line[i] + left) & 255
        elif kind == 2:
            line[i] = (line[i] + above[i]) & 255
        elif kind == 3:
            line[i] = (line[i] + (left + above[i]) // 2) & 255
        elif kind == 4:
            p = left + above[i] - corner
            pa, pb, pc = abs(p - left), abs(p - above[i]), abs(p - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else
                                  above[i] if pb <= pc else corner)) & 255
    return line


def rgba(line):
    out = bytearray()
    for i in range(0, len(line), 3):
        out += line[i:i + 3] + b"\xff"
    return out


def test_typing_on_the_overview_goes_to_the_terminal(browser, node):
    page = open_page(browser, node, "desktop")
    page.wait_for_selector('[data-device="browser-pi"]')
    page.keyboard.type("status")
    wait_for(lambda: page.evaluate("location.hash") == "#/terminal", 30, "the terminal's view")
    wait_for(lambda: current_line(page) == "rc> status", 5, "every key in the terminal")
    page.keyboard.press("Enter")
    wait_screen(page, "devices_online")
    close(page)


def test_device_view_asks_for_live_figures_and_shows_the_devices_logs(browser, node):
    """devlogs20 adds POST .../watch and GET .../logs; until then the browser
    answers them here, in the shape that branch serves."""
    page = open_page(browser, node, "desktop")
    watched, hostile = [], "<img src=x onerror=alert(1)>"
    page.route("**/api/v1/devices/browser-pi/watch",
               lambda route: (watched.append(route.request.method),
                              route.fulfill(status=200, json={"watching": True})))
    page.route("**/api/v1/devices/browser-pi/logs", lambda route: route.fulfill(json={"logs": [
        {"ts": time.time() - 5, "level": "warning", "event": "availability_changed",
         "message": "battery low: " + hostile, "task_id": None},
        {"ts": time.time() - 2, "level": "error", "event": "task_failed",
         "message": "exit status 3", "task_id": node.failed_task}]}))
    page.goto(node.base + "/#/device/browser-pi")
    page.wait_for_selector("#view-object td:has-text('availability_changed')")
    assert watched == ["POST"]
    assert hostile in page.locator("#view-object").inner_text()
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    page.wait_for_selector("#view-object :text('every few seconds while this page is open')")
    logs = page.locator("#view-object tr", has=page.locator("td:has-text('task_failed')"))
    # One link a line that shows (a phone's is under the time, hidden here).
    assert logs.locator('a[href="#/task/%d"] >> visible=true' % node.failed_task).count() == 1
    shoot(page, "device-logs", "desktop")
    close(page)


def test_the_dot_turns_red_when_rc_web_is_gone_and_green_when_it_is_back(browser, node):
    page = open_page(browser, node, "desktop", clock=True)
    page.wait_for_selector("#connection.live")
    page.wait_for_selector('[data-device="browser-pi"]')
    web = node.processes["rc-web"]
    os.killpg(web.pid, signal.SIGTERM)
    web.wait(10)
    # Red once the link has been down LOST_AFTER_S (10 s) by the page's
    # clock: moved on past that, not waited out.
    page.wait_for_selector("#connection.connecting", timeout=30000)
    page.clock.fast_forward(LOST_AFTER_S * 1000 + 1000)
    page.wait_for_selector("#connection.lost", timeout=30000)
    assert "no link to the main node" in page.locator("#connection").inner_text()
    shoot(page, "connection-lost", "desktop")
    node.spawn("rc-web", [sys.executable, "-m", "rc.web"])
    wait_for(node.web_answers, 20, "rc-web again")
    page.wait_for_selector("#connection.live", timeout=30000)
    page.wait_for_selector('[data-device="browser-pi"]')
    page.context.close()
    # While rc-web was away, each attempt to reconnect was logged: nothing else.
    assert [p for p in page.problems if not p.startswith("Failed to load resource: net::")] == []


def test_cancel_and_retry_by_click(browser, node):
    sleeper = api(node, "POST", "/api/v1/tasks", {"task_type": "sleep", "payload": 60})["task_id"]
    page = open_page(browser, node, "desktop", "/#/task/%d" % sleeper)
    page.evaluate("localStorage.setItem('rc.adminToken', %s)" % json.dumps(node.admin_token))
    page.wait_for_selector("#view-object button:has-text('Cancel')").click()
    page.wait_for_selector("#modal:not([hidden]) h2:has-text('Cancel task %d?')" % sleeper)
    assert api(node, "GET", "/api/v1/tasks/%d" % sleeper)["state"] != "cancelled"   # asks first
    page.click("#modal-confirm")
    wait_for(lambda: api(node, "GET", "/api/v1/tasks/%d" % sleeper)["state"] == "cancelled", 15,
             "the task cancelled")
    page.wait_for_selector("#view-object h1 .chip:has-text('cancelled')")
    page.goto(node.base + "/#/task/%d" % node.failed_task)
    page.wait_for_selector("#view-object button:has-text('Retry')").click()
    page.click("#modal-confirm")
    # (wait_for_function polls with eval, which the page's CSP refuses)
    wait_for(lambda: page.evaluate("location.hash") != "#/task/%d" % node.failed_task, 15,
             "the copy's view")
    copy = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    page.wait_for_selector("#view-object h1:has-text('Task %d')" % copy)
    original = api(node, "GET", "/api/v1/tasks/%d" % node.failed_task)
    assert api(node, "GET", "/api/v1/tasks/%d" % copy)["payload"] == original["payload"]
    assert original["state"] == "failed"                    # the old one stays as it was
    close(page)


def test_where_reading_needs_the_token_the_overview_asks_for_it_then_goes_live(browser,
                                                                               tmp_path):
    strict = MainNode(tmp_path, read_access="token")
    try:
        strict.start()
        page = open_page(browser, strict, "phone")
        page.wait_for_selector("#connection.token")
        page.click("text=Give the admin token")
        page.fill("#modal input[name=token]", strict.admin_token)
        page.click("#modal-confirm")
        page.wait_for_selector("#connection.live", timeout=15000)
        page.wait_for_selector(".tiles")
        # Before the token: the overview and the terminal's command list, refused once each.
        refused = [p for p in page.problems if "status of 401" in p]
        assert len(refused) == len(page.problems) <= 2, page.problems
        page.problems.clear()
        close(page)
    finally:
        strict.stop()


def test_label_by_click(browser, node):
    page = open_page(browser, node, "phone", "/#/device/browser-pi")
    page.evaluate("localStorage.setItem('rc.adminToken', %s)" % json.dumps(node.admin_token))
    page.wait_for_selector("#view-object button:has-text('Label')").click()
    page.fill("#modal input[name=labels]", "room=attic disk=")
    page.click("#modal-confirm")
    wait_for(lambda: api(node, "GET", "/api/v1/devices/browser-pi")["labels"] == {"room": "attic"},
             10, "the label set")
    page.wait_for_selector("#view-object dd:has-text('room=attic')")
    page.click("#view-object button:has-text('Label')")
    page.fill("#modal input[name=labels]", "not-a-pair")
    page.click("#modal-confirm")
    page.wait_for_selector("#modal-error:has-text('not KEY=VALUE: not-a-pair')")
    page.keyboard.press("Escape")
    page.wait_for_selector("#modal", state="hidden")
    close(page)
