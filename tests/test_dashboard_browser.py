"""The dashboard in a real browser: Debian's Chromium driven by Playwright,
against a real main node (rc-server, rc-scheduler, rc-reaper, rc-web as
processes on 127.0.0.1) with a real worker. A screenshot of each page is
kept in test-artifacts/."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from cluster_harness import free_ports
from rc import config as config_module
from rc import db, devices, tls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "bin", "worker.py")
ARTIFACTS = os.path.join(REPO, "test-artifacts")
CHROMIUM = next((path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if os.path.exists(path)), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SETTINGS = {"tcp_host": "127.0.0.1", "web_host": "127.0.0.1", "heartbeat_interval": 2.0,
            "lease_duration": 6.0, "disconnect_grace": 2.0}
HOSTILE = "<img src=x onerror=alert(1)>"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium"
                                 " (.ci/run installs it with apt-get)"),
              pytest.mark.timeout(120)]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


def wait_terminal(page, timeout=30):
    """Until the page's terminal is made. Polled with page.evaluate, not
    wait_for_function: that one polls by evaluating a string in the page,
    which the dashboard's CSP (no 'unsafe-eval') refuses whenever its first
    look finds nothing, as on a busy machine."""
    wait_for(lambda: page.evaluate("window.rcTerm !== undefined"), timeout, "the terminal")


class MainNode:
    """The four programs as processes, without supervisord, and workers."""

    def __init__(self, home, **settings):
        self.home = str(home)
        settings_path = os.path.join(self.home, "rc.json")
        os.makedirs(os.path.join(self.home, "log"), exist_ok=True)
        with open(settings_path, "w") as f:
            json.dump(dict(SETTINGS, **settings), f)
        tcp_port, web_port = free_ports(2)
        self.env = dict(os.environ, RC_HOME=self.home, RC_CONFIG=settings_path,
                        RC_TCP_PORT=str(tcp_port), RC_WEB_PORT=str(web_port),
                        PYTHONPATH=os.path.join(REPO, "lib"))
        self.config = config_module.load(environ=self.env)
        self.processes = {}
        self.base = "http://127.0.0.1:%d" % self.config.web_port

    def start(self):
        subprocess.run([sys.executable, "-m", "rc.cli", "init"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        for program in ("server", "scheduler", "reaper", "web"):
            self.spawn("rc-" + program, [sys.executable, "-m", "rc." + program])
        self.admin_token = open(self.config.admin_token_path).read().strip()
        self.db = db.connect(self.config.db_path)
        wait_for(self.web_answers, 20, "rc-web")

    def spawn(self, name, argv):
        log = open(os.path.join(self.home, "log", name + ".log"), "ab")
        self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)
        log.close()

    def start_worker(self, device_id):
        pin = ["--fingerprint", tls.fingerprint(self.config)] if self.config.tls else []
        self.spawn(device_id, [sys.executable, "-I", WORKER, "--join",
                               "127.0.0.1:%d" % self.config.tcp_port, "--token-file",
                               self.config.token_path, "--device-id", device_id,
                               "--slots", "2", "--state-dir",
                               os.path.join(self.home, "worker-state")] + pin)

    def web_answers(self):
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def online(self, device_id):
        row = self.db.execute("SELECT status, connected FROM devices WHERE device_id = ?",
                              (device_id,)).fetchone()
        return row is not None and row["status"] == "online" and row["connected"]

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.db.close()


def joined_node(home):
    """A main node with one worker, browser-pi, online; the caller stops it."""
    node = MainNode(home)
    try:
        node.start()
        node.start_worker("browser-pi")
        wait_for(lambda: node.online("browser-pi"), 20, "the worker to join")
    except BaseException:
        node.stop()
        raise
    return node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = joined_node(tmp_path_factory.mktemp("dashboard"))
    yield node
    node.stop()


def panel_screenshot(panel, path):
    """A panel's picture for a person to look at. A view redraws its panels
    as news comes: one may be replaced between the locator finding it and
    the picture (a CI run: "Element is not attached to the DOM"), so the
    locator finds it again."""
    from playwright.sync_api import Error
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(3):
        try:
            return panel.screenshot(path=path)
        except Error as e:
            if "not attached" not in str(e) or attempt == 2:
                raise


@pytest.fixture(scope="module")
def browser():
    """One Chromium for a module's dashboard checks (other modules import it)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, node, request):
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(node.base + "/#/terminal")
    wait_terminal(page)
    yield page
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, request.node.name + ".png"))
    context.close()


def screen(page):
    """The terminal's text, every line of its buffer."""
    return page.evaluate("""() => {
        const buffer = window.rcTerm.buffer.active, lines = [];
        for (let i = 0; i < buffer.length; i++)
            lines.push(buffer.getLine(i).translateToString(true));
        return lines.join("\\n");
    }""").rstrip()


def current_line(page):
    return page.evaluate("""() => {
        const buffer = window.rcTerm.buffer.active;
        return buffer.getLine(buffer.baseY + buffer.cursorY).translateToString(true);
    }""").rstrip()


def type_line(page, text, enter=True):
    page.keyboard.type(text)
    if enter:
        page.keyboard.press("Enter")


def wait_screen(page, text, timeout=15):
    return wait_for(lambda: text in screen(page), timeout, repr(text) + " on the screen")


def wait_prompt(page, timeout=15):
    wait_for(lambda: current_line(page) == "rc>", timeout, "the prompt")


def test_devices_shows_the_worker(page):
    wait_prompt(page)
    type_line(page, "devices")
    wait_screen(page, "browser-pi")
    assert "DEVICE" in screen(page) and "online" in screen(page)


def test_submit_from_the_terminal_asks_for_the_token_and_shows_the_result(page, node):
    wait_prompt(page)
    type_line(page, "submit echo hello-from-the-browser --wait")
    wait_screen(page, "admin token")
    type_line(page, node.admin_token)
    wait_for(lambda: "hello-from-the-browser" in screen(page).split("(Esc cancels):")[-1], 20,
             "the task's output")
    assert node.admin_token not in screen(page)        # typed as stars
    wait_prompt(page)
    type_line(page, "tasks")                          # the token is remembered
    wait_screen(page, "completed")


def test_tab_completes_commands_and_device_ids(page):
    wait_prompt(page)
    type_line(page, "stat", enter=False)
    page.keyboard.press("Tab")
    wait_for(lambda: current_line(page) == "rc> status", 5, "status completed")
    page.keyboard.press("Control+U")
    type_line(page, "device browser", enter=False)
    page.keyboard.press("Tab")
    wait_for(lambda: current_line(page) == "rc> device browser-pi", 5, "device id completed")
    page.keyboard.press("Enter")
    wait_screen(page, "platform:")


def test_history_survives_a_reload(page):
    wait_prompt(page)
    type_line(page, "status")
    wait_screen(page, "devices_online")
    page.reload()
    wait_terminal(page)
    wait_prompt(page)
    page.keyboard.press("ArrowUp")
    wait_for(lambda: current_line(page) == "rc> status", 5, "the last command recalled")


def test_theme_is_switched_and_remembered(page):
    wait_prompt(page)
    type_line(page, "theme amber")
    wait_screen(page, "theme amber")
    assert page.evaluate("document.body.className") == "theme-amber"
    page.reload()
    wait_terminal(page)
    assert page.evaluate("document.body.className") == "theme-amber"
    assert page.evaluate("window.rcTerm.options.theme.background") == "#140c00"
    type_line(page, "theme blue")
    wait_for(lambda: page.evaluate("document.body.className") == "theme-blue", 5, "blue")


def test_monitor_updates_when_a_device_joins(page, node):
    wait_prompt(page)
    type_line(page, "monitor")
    wait_screen(page, "rc monitor")
    assert "late-laptop" not in screen(page)
    node.start_worker("late-laptop")
    wait_screen(page, "late-laptop", timeout=20)
    assert "press any key" in screen(page)
    page.keyboard.press("q")
    wait_prompt(page)


def test_a_hostile_device_name_is_text_everywhere(page, node):
    with db.write(node.db):
        devices.register(node.db, HOSTILE, {"device_info": {"hostname": HOSTILE},
                                            "role": HOSTILE}, "127.0.0.1:9", time.time())
    wait_prompt(page)
    type_line(page, "devices")
    wait_screen(page, "<img src=x")
    type_line(page, "monitor")
    wait_screen(page, "rc monitor")
    page.keyboard.press("q")
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    page.goto(node.base + "/#/")                      # the overview's device grid
    wait_for(lambda: HOSTILE in page.locator(".device-grid").inner_text(), 15,
             "the device's name in the grid")
    page.goto(node.base + "/#/device/" + urllib.parse.quote(HOSTILE, safe=""))
    page.wait_for_selector("#view-object h1")
    assert HOSTILE in page.locator("#view-object h1").inner_text()
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    for path in ("/text/devices", "/api/v1/devices", "/text/metrics"):
        response = page.goto(node.base + path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert not response.headers["content-type"].startswith("text/html")
        assert HOSTILE in page.content().replace("&lt;", "<").replace("&gt;", ">")
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        page.screenshot(path=os.path.join(ARTIFACTS, "hostile" + path.replace("/", "_")
                                          + ".png"))
    assert page.dialogs == []
