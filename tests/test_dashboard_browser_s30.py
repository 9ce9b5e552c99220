"""The dashboard as a user on a phone (390x844, touch, scale 3) and a laptop
(1366x768) meets it, in Debian's Chromium driven by Playwright, against a
main node that wants the admin token to be read (read_access=token: the
phone on the Wi-Fi is not 127.0.0.1). Each test is a fault found in session
30 and fails without its fix; screenshots go to test-artifacts/s30_*.png."""
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from test_dashboard_browser import ARTIFACTS, CHROMIUM, MainNode, wait_for  # noqa: E402
from test_dashboard_browser import browser  # noqa: E402,F401  (its fixture: one Chromium a module)

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium"
                                 " (.ci/run installs it with apt-get)"),
              pytest.mark.timeout(120)]

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3,
         "is_mobile": True, "has_touch": True}
LAPTOP = {"viewport": {"width": 1366, "height": 768}}
INPUT_BYTES = os.urandom(3 * 1024 * 1024)        # a photo's worth


def api(node, path, body=None, raw=None):
    request = urllib.request.Request(
        node.base + path, data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + node.admin_token,
                 "Content-Type": "application/octet-stream" if raw else "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AssertionError("%s: %s" % (path, e.read()))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = MainNode(tmp_path_factory.mktemp("dashboard_s30"), read_access="token")
    try:
        node.start()
        node.start_worker("s30-pi")
        wait_for(lambda: node.online("s30-pi"), 30, "the worker to join")
        blob = api(node, "/api/v1/files", raw=INPUT_BYTES)
        # Queued for good (no device has 512 GB): its input stays listed.
        node.files_task = api(node, "/api/v1/tasks", {
            "task_type": "shell", "requirements": {"min_memory_gb": 512},
            "payload": {"command": "wc -c photo.jpg",
                        "inputs": [{"sha256": blob["sha256"], "size": blob["size"],
                                    "path": "photo.jpg", "mode": 0o644}]}})["task_id"]
        node.echo_task = api(node, "/api/v1/tasks", {"task_type": "echo",
                                                     "payload": "hello"})["task_id"]
        wait_for(lambda: node.db.execute("SELECT state FROM tasks WHERE task_id = ?",
                                         (node.echo_task,)).fetchone()[0] == "completed",
                 30, "the echo task to complete")
    except BaseException:
        node.stop()
        raise
    yield node
    node.stop()


def open_page(browser, request, device, token=None):
    context = browser.new_context(accept_downloads=True, **device)
    if token:
        context.add_init_script("localStorage.setItem('rc.adminToken', %s)" % json.dumps(token))
    page = context.new_page()
    request.addfinalizer(lambda: shot_and_close(page, context, request.node.name))
    return page


def shot_and_close(page, context, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "s30_" + name + ".png"))
    context.close()


def test_a_wrong_token_given_on_the_overview_is_said_and_asked_again(browser, node, request):
    """It was kept without a word: the dialog closed, and the next one had
    no field for the token at all (one was kept), so no right one could
    be given without the terminal's `logout`."""
    page = open_page(browser, request, PHONE)
    page.goto(node.base + "/")
    page.get_by_role("button", name="Give the admin token").click()
    page.fill("input[name=token]", "not-the-token")
    page.click("#modal-confirm")
    wait_for(lambda: "not accepted" in page.inner_text("#modal-error"), 15, "the refusal")
    assert page.is_visible("#modal")
    page.fill("input[name=token]", node.admin_token)
    page.click("#modal-confirm")
    page.wait_for_selector("#modal", state="hidden")
    page.wait_for_selector(".device-grid [data-device=s30-pi]")
    wait_for(lambda: page.inner_text("#connection") == "live", 20, "the live link")


def test_the_overview_lists_the_newest_tasks(browser, node, request):
    """It listed running tasks and failures only: a task just completed, or
    queued for want of a device, could not be found without a command."""
    page = open_page(browser, request, LAPTOP, token=node.admin_token)
    page.goto(node.base + "/")
    newest = page.locator(".panel", has=page.locator("h2", has_text="Newest tasks"))
    wait_for(lambda: newest.count() and ["completed", "queued"] == [
        newest.locator("tr", has=page.get_by_role("link", name=str(task_id), exact=True))
        .locator(".chip").inner_text() for task_id in (node.echo_task, node.files_task)],
        15, "both tasks among the newest")
    assert "wc -c photo.jpg" in newest.inner_text()
    # None while a live update redraws the panel: the box once it is laid out.
    box = wait_for(lambda: newest.bounding_box(), 15, "the panel laid out")
    assert box["y"] < 768                                   # on arrival, without scrolling


def test_a_failure_just_now_counts_in_the_failed_tile(browser, node, request):
    """The tile counted the minute history only, which holds minutes that
    have ended: it said 0 failed over a failure listed just below it."""
    page = open_page(browser, request, LAPTOP, token=node.admin_token)
    page.goto(node.base + "/")
    page.wait_for_selector(".tiles")
    failed = api(node, "/api/v1/tasks", {"task_type": "shell", "payload": "exit 3"})["task_id"]
    failures = page.locator(".panel", has=page.locator("h2", has_text="Recent failures"))
    failures.locator('a[href="#/task/%d"]' % failed).wait_for(timeout=30000)
    tile = page.locator(".tile", has=page.locator(".tile-label", has_text="failed (15 min)"))
    assert int(tile.locator(".tile-value").inner_text()) >= 1


def test_a_tasks_file_downloads_where_reading_needs_the_token(browser, node, request):
    """The file's link cannot carry the token: the phone got a 401, no file.
    Then it came through fetch() into the page's memory (a blob: URL): now
    the browser saves it from the link itself, with the stream cookie."""
    page = open_page(browser, request, PHONE, token=node.admin_token)
    page.goto(node.base + "/#/task/%d" % node.files_task)
    link = page.get_by_role("link", name="photo.jpg")
    with page.expect_download(timeout=30000) as download:
        link.click()
    assert download.value.suggested_filename == "photo.jpg"
    assert download.value.url == "%s/api/v1/tasks/%d/files/photo.jpg" % (node.base,
                                                                        node.files_task)
    with open(download.value.path(), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(INPUT_BYTES).digest()


def test_phone_taps_and_reading_order(browser, node, request):
    """Ids and names were links 9 to 50 px wide and 16 px high, the
    navigation 26 px high, buttons 31 px; a task's
    output and files came after its payload (a screen of JSON with inputs);
    a completed task's state read "completed (completed)"."""
    page = open_page(browser, request, PHONE, token=node.admin_token)
    page.goto(node.base + "/#/task/%d" % node.files_task)
    targets = [page.get_by_role("link", name="photo.jpg"), page.locator("a.back")]
    page.goto(node.base + "/#/task/%d" % node.echo_task)
    page.wait_for_selector(".panel h2:text-is('Payload')")
    for target in [page.locator("a.back"), page.get_by_role("link", name="s30-pi").first,
                   page.locator("#bar nav a").first, page.get_by_role("button", name="Retry")]:
        box = target.bounding_box()
        assert box["width"] >= 44 and box["height"] >= 44, (target, box)
    tops = {name: page.locator(".panel", has=page.locator("h2", has_text=name)).bounding_box()["y"]
            for name in ("Output", "Files", "Payload")}
    assert tops["Output"] < tops["Files"] < tops["Payload"], tops
    state = page.locator(".key-values dt:text-is('state') + dd").inner_text()
    assert state == "completed", state
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.goto(node.base + "/#/task/%d" % node.files_task)
    for target in targets:
        box = target.bounding_box()
        assert box["width"] >= 44 and box["height"] >= 44, (target, box)


def test_a_devices_log_lines_keep_their_time_on_a_phone(browser, node, request):
    """The time column was the first a phone dropped: lines without a time."""
    page = open_page(browser, request, PHONE, token=node.admin_token)
    page.goto(node.base + "/#/device/s30-pi")
    logs = page.locator(".panel", has=page.locator("h2", has_text="Logs"))
    logs.locator("tbody tr").first.wait_for(timeout=30000)    # the worker's lines come
    first = logs.locator("tbody tr").first.locator("td").first     # with its heartbeats
    assert first.is_visible()
    # (under it, on a phone, the line's task if it has one: test_first_hour_s39)
    assert re.match(r"\d\d:\d\d:\d\d$", first.inner_text().splitlines()[0]), first.inner_text()
    assert logs.locator("th:text-is('time')").is_visible()
    assert logs.locator("tbody tr").first.locator("td").nth(2).inner_text()   # the event


def test_an_open_task_view_asks_one_read_at_a_time_on_a_slow_link(browser, node, request):
    """Every 2 s the view read the task again, whether or not the last read
    had come back: on a link with 2.5 s of latency they piled up."""
    page = open_page(browser, request, LAPTOP, token=node.admin_token)
    path = re.compile(r"/api/v1/tasks/%d(/|$)" % node.files_task)  # queued: read again and again
    flying, most = set(), [0]

    def started(req):
        if path.search(req.url):
            flying.add(req)
            most[0] = max(most[0], len(flying))
            most.append(sorted(r.method + " " + r.url.split("/api/v1")[1] for r in flying))
    page.on("request", started)
    page.on("requestfinished", lambda req: flying.discard(req))
    page.on("requestfailed", lambda req: flying.discard(req))
    # The page and its scripts load at full speed (each took 2.5 s more on
    # the slow link); the task's view opens, and lives, on the slow link.
    page.goto(node.base + "/")
    page.wait_for_selector("#connection.live", timeout=60000)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 2500,
                                                  "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    page.evaluate("location.hash = %s" % json.dumps("#/task/%d" % node.files_task))
    page.wait_for_selector("#view-object h1", timeout=60000)
    time.sleep(10)
    assert most[0] <= 2, (most[0], most[1:])  # the task, then its why and files together


def tab_to(page, selector, most=40):
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    raise AssertionError("Tab never reached " + selector)


def test_keyboard_only(browser, node, request):
    """The live overview, drawn anew on every picture, sent the keyboard's
    focus back to the page's top within a second or two; PageDown and the
    arrows scrolled no view; a dialog left with Esc left the focus nowhere."""
    page = open_page(browser, request, {"viewport": {"width": 390, "height": 700}},
                     token=node.admin_token)
    page.goto(node.base + "/")
    link = 'a[href="#/device/s30-pi"]'
    page.wait_for_selector(link)
    tab_to(page, link)
    page.evaluate("document.querySelector('.device-grid').dataset.old = 'yes'")
    wait_for(lambda: page.locator(".device-grid:not([data-old])").count(), 20,
             "the overview drawn anew")            # the worker's heartbeats change it
    assert page.evaluate("s => document.activeElement.matches(s)", link)
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-object h1:has-text('s30-pi')")
    page.wait_for_selector("#view-object .panel h2:text-is('Logs')")
    page.keyboard.press("PageDown")
    wait_for(lambda: page.evaluate("document.getElementById('view-object').scrollTop") > 0, 5,
             "PageDown to scroll the device's view")
    tab_to(page, "#view-object .actions button:first-child")            # Drain
    page.keyboard.press("Enter")
    page.wait_for_selector("#modal:not([hidden])")
    page.keyboard.press("Escape")
    page.wait_for_selector("#modal", state="hidden")
    assert page.evaluate("document.activeElement.textContent") == "Drain"


def test_a_group_opened_again_is_drawn_again(browser, node, request):
    """docs46: a map's view opened, then the overview, then the same map
    again (or its #/group/ID, as a task's view links it) said "Loading…"
    for good: the answer was the one the view had shown, so it was not
    drawn again over the "Loading…" put in its place."""
    group = api(node, "/api/v1/tasks?group=new", [{"task_type": "echo", "payload": "a"}])
    group_id = group["group_id"]
    page = open_page(browser, request, LAPTOP, token=node.admin_token)
    page.goto(node.base + "/")
    page.wait_for_selector("#connection.live", timeout=60000)
    for fragment, title in (("#/group/%d", "Group %d"), ("#/", None), ("#/group/%d", "Group %d"),
                            ("#/map/%d", "Map %d")):
        page.evaluate("location.hash = %s" % json.dumps(fragment % group_id if title else "#/"))
        if title:
            page.wait_for_function(
                "t => { const h = document.querySelector('#view-object h1');"
                " return h && h.offsetParent && h.textContent.startsWith(t) }",
                arg=title % group_id, timeout=15000)
