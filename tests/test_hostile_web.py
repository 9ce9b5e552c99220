"""rc-web attacked as a stranger on the LAN would (issue 17, items 2, 4, 5
and 9), each attack against a running main node under supervisord and
inside `unharmed`: every program keeps its pid and a good worker's tasks
before and after complete.

The attacker's address is 127.0.0.2 (Linux routes all of 127/8 to the
loopback device); the good client is 127.0.0.1."""
import hashlib
import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

from cluster_harness import Cluster, wait_for
from hostile_harness import readable_by_others, unharmed
from rc import tls

pytestmark = pytest.mark.e2e

ATTACKER = "127.0.0.2"
PER_ADDRESS = 8
CHANNEL_TIMEOUT = 3.0
READ_TIMEOUT = 2.0
SETTINGS = {"web_connections_per_address": PER_ADDRESS, "web_connection_limit": 60,
            "web_channel_timeout": CHANNEL_TIMEOUT, "web_read_timeout": READ_TIMEOUT,
            # Reading needs the token even here, so the browser's streams show
            # that the cookie, not a URL, carries it.
            "read_access": "token"}
HUGE = str(2 ** 64 * 10)


def start(home, device_id, **settings):
    cluster = Cluster(home, **dict(SETTINGS, **settings))
    cluster.start()
    cluster.start_worker(device_id, "--slots", "2")
    wait_for(lambda: cluster.db.execute(
        "SELECT 1 FROM devices WHERE device_id = ? AND status = 'online' AND connected = 1",
        (device_id,)).fetchone(), 30, device_id + " to join")
    cluster.admin_token = open(cluster.config.admin_token_path).read().strip()
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start(tmp_path_factory.mktemp("hostile-web"), "good")
    yield cluster
    # Whatever the attacks did, the state directory stays owner-only.
    assert readable_by_others(cluster.home) == []
    cluster.stop()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    cluster = start(tmp_path_factory.mktemp("hostile-web-tls"), "good", web_tls=True,
                    read_access="local")
    yield cluster
    # Whatever the attacks did, the state directory stays owner-only.
    assert readable_by_others(cluster.home) == []
    cluster.stop()


# -- clients ---------------------------------------------------------------------------

def request(cluster, path, method="GET", body=None, headers=None, token=True, timeout=10,
            context=None):
    """(status, headers, text) from the cluster's rc-web at 127.0.0.1."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = "Bearer " + cluster.admin_token
    if body is not None:
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    scheme = "https" if context else "http"
    url = "%s://127.0.0.1:%d%s" % (scheme, cluster.config.web_port, path)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method),
                                    timeout=timeout, context=context) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def attacker_socket(cluster, source=ATTACKER):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", cluster.config.web_port))
    return sock


def closed_by_server(sock, within):
    """Seconds until rc-web hangs up on `sock` (the first bytes, if any,
    are read past), or None if it stays open `within` seconds."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def whole_response(sock, within):
    """(status, body) of the one HTTP response on `sock`, read to its end:
    one recv() may hold only the headers, the body following in a later
    segment."""
    sock.settimeout(within)
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, response.read()
    finally:
        response.close()


def the_basics_answer(cluster, context=None, timeout=5):
    """The page, /health and /worker.py, as a second address sees them."""
    for path in ("/", "/health", "/worker.py"):
        status, _, text = request(cluster, path, token=False, timeout=timeout,
                                  context=context)
        assert status == 200, (path, status, text[:200])


# -- item 2: numbers ------------------------------------------------------------------

def test_huge_numbers_are_400_or_404_never_500(cluster):
    with unharmed(cluster, "good"):
        for path in ("/api/v1/tasks/" + HUGE, "/api/v1/tasks/%d/why" % 2 ** 63,
                     "/api/v1/groups/" + HUGE, "/api/v1/controls/" + HUGE,
                     "/api/v1/tasks?offset=" + HUGE, "/api/v1/tasks?limit=" + HUGE,
                     "/api/v1/stats?minutes=" + HUGE, "/text/logs?lines=" + HUGE,
                     "/text/tasks?limit=%E2%91%A0", "/stream/tasks?since=" + HUGE):
            status, _, text = request(cluster, path)
            assert status in (400, 404), (path, status, text)
        status, _, text = request(cluster, "/stream/tasks",
                                  headers={"Last-Event-ID": HUGE})
        assert status == 400
        for body in ({"task_type": "echo", "payload": "x", "depends_on": [2 ** 63]},
                     {"task_type": "echo", "payload": "x", "timeout": 2 ** 64 - 1},
                     [{"task_type": "echo", "payload": "x", "retries": 2 ** 63}],
                     {"command": "tasks --limit " + HUGE}):
            path = "/api/v1/command" if "command" in body else "/api/v1/tasks"
            status, _, text = request(cluster, path, "POST", body)
            assert status in (200, 400), (body, status, text)
            if status == 200:           # the command ran: its usage error, status 2
                assert json.loads(text)["status"] == 2, text
        status, _, _ = request(cluster, "/api/v1/tasks/%s/cancel" % HUGE, "POST", {})
        assert status == 404


# -- item 4: connections -------------------------------------------------------------

def test_idle_sockets_from_one_address_leave_room_for_another(cluster):
    with unharmed(cluster, "good"):
        held = [attacker_socket(cluster) for _ in range(100)]
        try:
            time.sleep(0.5)
            the_basics_answer(cluster)
            # At most PER_ADDRESS stay open; the rest were refused at once.
            still_open = [s for s in held if closed_by_server(s, 0.05) is None]
            assert len(still_open) <= PER_ADDRESS
            # The ones it kept close when idle past web_channel_timeout.
            waited = [closed_by_server(s, CHANNEL_TIMEOUT * 3) for s in still_open]
            assert all(w is not None for w in waited), waited
        finally:
            for s in held:
                s.close()
        the_basics_answer(cluster)


def test_idle_sockets_from_many_addresses_leave_room_too(cluster):
    """Eight addresses, each within its cap, together past the connection
    limit: the oldest idle ones make way for a new client."""
    with unharmed(cluster, "good"):
        held = [attacker_socket(cluster, "127.0.0.%d" % (2 + n % 8)) for n in range(64)]
        try:
            time.sleep(0.5)
            # Sooner than web_channel_timeout could have closed any of them.
            the_basics_answer(cluster, timeout=CHANNEL_TIMEOUT / 2)
        finally:
            for s in held:
                s.close()


def test_a_refused_connection_is_told_why(cluster):
    held = [attacker_socket(cluster) for _ in range(PER_ADDRESS)]
    try:
        time.sleep(0.3)
        held.append(attacker_socket(cluster))
        status, answer = whole_response(held[-1], 5)
        assert status == 503 and b"too many connections" in answer
    finally:
        for s in held:
            s.close()


def test_a_body_shorter_than_its_length_or_dripping_is_cut_off(cluster):
    with unharmed(cluster, "good"):
        short = attacker_socket(cluster)
        short.sendall(b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"ta")
        drip = attacker_socket(cluster)
        drip.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        closed = None
        # One header byte every half second: active, yet never a whole request.
        while closed is None and time.monotonic() - started < READ_TIMEOUT * 4:
            try:
                drip.sendall(b"X")
            except OSError:
                closed = time.monotonic() - started
                break
            closed = closed_by_server(drip, 0.5)
        assert closed is not None and closed < READ_TIMEOUT * 4
        waited = closed_by_server(short, READ_TIMEOUT * 4)
        assert waited is not None
        short.close()
        drip.close()
        the_basics_answer(cluster)


def upload_socket(cluster, length, token, source=ATTACKER):
    """A socket that has sent the headers of POST /api/v1/files."""
    sock = attacker_socket(cluster, source)
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    sock.sendall(b"POST /api/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n%s"
                 b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                 % (auth, length))
    return sock


def test_an_upload_may_outlast_the_read_timeout_while_it_keeps_coming(cluster):
    """POST /api/v1/files with the admin token: past the 4 MiB body limit and
    past web_read_timeout at a steady rate; a stranger's large body is
    refused on its headers, and an upload that drips is still cut off."""
    body = os.urandom(6 * 1024 * 1024)
    opened = []
    try:
        with unharmed(cluster, "good"):
            steady = upload_socket(cluster, len(body), cluster.admin_token, source="127.0.0.1")
            opened.append(steady)
            started, step = time.monotonic(), 64 * 1024
            for offset in range(0, len(body), step):      # ~1.3 MiB/s, for ~5 s
                steady.sendall(body[offset:offset + step])
                time.sleep(0.05)
            assert time.monotonic() - started > READ_TIMEOUT * 2
            status, answer = whole_response(steady, 30)
            assert status == 201, answer[:300]
            assert hashlib.sha256(body).hexdigest().encode() in answer
            stranger = upload_socket(cluster, len(body), None)
            opened.append(stranger)
            assert whole_response(stranger, 10)[0] == 413
            drip = upload_socket(cluster, len(body), cluster.admin_token)
            opened.append(drip)
            started, closed = time.monotonic(), None
            while closed is None and time.monotonic() - started < READ_TIMEOUT * 4:
                try:
                    drip.sendall(b"x" * 1024)       # 2 KiB/s: far under the minimum rate
                except OSError:
                    closed = time.monotonic() - started
                    break
                closed = closed_by_server(drip, 0.5)
            assert closed is not None and closed < READ_TIMEOUT * 4
            the_basics_answer(cluster)
    finally:
        for sock in opened:
            sock.close()


# -- item 5: junk in stored device reports ----------------------------------------------

JUNK = ['"not an object"', "[1, 2]", '{"system_metrics": 7}', "not json",
        '{"cpu_percent": "lots", "memory_percent": 1e308, "battery": {"percent": []},'
        ' "load_avg": {"a": 1}, "nested": %s}' % ("[" * 100 + "]" * 100),
        '{"cpu_percent": 18446744073709551615, "disk_percent": -1}']


def test_junk_reports_in_the_database_break_no_view(cluster):
    try:
        with unharmed(cluster, "good"):
            with cluster.db:
                for number, metrics in enumerate(JUNK):
                    cluster.db.execute(
                        "INSERT INTO devices(device_id, hostname, slots, profile, metrics, status,"
                        " connected, registered_at, last_seen) VALUES (?, 'junk', 1, ?, ?,"
                        " 'offline', 0, 1.0, 1.0)",
                        ("junk%d" % number, '{"device_info": ' + metrics + "}", metrics))
            for path in ("/text/devices", "/text/metrics", "/api/v1/devices",
                         "/api/v1/devices/junk4", "/text/status"):
                status, _, text = request(cluster, path)
                assert status == 200, (path, status, text[:300])
            status, _, text = request(cluster, "/text/devices?format=csv")
            row = next(line for line in text.splitlines() if line.startswith("junk4,"))
            assert row.split(",")[10] == "" and row.split(",")[11] == ""   # cpu, memory absent
            connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                                    timeout=10)
            connection.request("GET", "/stream/devices",
                               headers={"Authorization": "Bearer " + cluster.admin_token})
            response = connection.getresponse()
            assert response.status == 200
            seen = b""
            deadline = time.monotonic() + 10
            while b"junk5" not in seen and time.monotonic() < deadline:
                seen += response.fp.readline()
            connection.close()
            assert b"junk5" in seen
            for argv in (["devices"], ["devices", "--grid"], ["device", "junk4"],
                         ["monitor", "--once"], ["status"]):
                done = cluster.rc(*argv)
                assert "Traceback" not in done.stderr
    finally:
        with cluster.db:
            cluster.db.execute("DELETE FROM devices WHERE device_id LIKE 'junk%'")


# -- item 9: the token and HTTPS --------------------------------------------------------

def test_the_audit_log_needs_the_token_from_this_machine(cluster):
    with unharmed(cluster, "good"):
        for path in ("/text/logs?program=audit", "/stream/logs?program=audit"):
            status, _, text = request(cluster, path, token=False)
            assert status == 401 and "audit" not in text.replace("admin token", "")
        status, _, text = request(cluster, "/text/logs?program=audit")
        assert status == 200


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium at /usr/bin/chromium")
def test_the_dashboard_never_puts_the_token_in_a_url(cluster):
    """A real browser logs in and runs the live monitor (its streams need
    the token here: read_access is "token"); no URL it requests holds it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with unharmed(cluster, "good"), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context()
            page = context.new_page()
            urls, streams = [], []
            page.on("request", lambda r: urls.append(r.url))
            page.on("response", lambda r: streams.append((r.url, r.status))
                    if "/stream/devices" in r.url or "/stream/tasks" in r.url else None)
            page.goto("http://127.0.0.1:%d/#/terminal" % cluster.config.web_port)
            # page.evaluate, not wait_for_function: the CSP refuses its polling
            wait_for(lambda: page.evaluate("window.rcTerm !== undefined"), 30, "the terminal")
            page.keyboard.type("login")
            page.keyboard.press("Enter")
            page.keyboard.type(cluster.admin_token)
            page.keyboard.press("Enter")
            page.keyboard.type("monitor")
            page.keyboard.press("Enter")
            deadline = time.monotonic() + 15
            while len(streams) < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(100)      # playwright's events arrive while it waits
            assert len(streams) == 2, (streams, urls)
            assert all(status == 200 for _, status in streams), streams
            assert not [url for url in urls if cluster.admin_token in url]
            cookie = next(c for c in context.cookies() if c["name"] == "rc_stream")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert cluster.admin_token not in cookie["value"]
            page.keyboard.press("q")
        finally:
            browser.close()


def tls_client_context(cluster):
    """A TLS client that trusts exactly the cluster's certificate."""
    context = ssl.create_default_context(cafile=tls.paths(cluster.config)[0])
    context.check_hostname = False        # the certificate names retire-cluster, not 127.0.0.1
    return context


def test_https_serves_the_dashboard_and_survives_bad_clients(tls_cluster):
    context = tls_client_context(tls_cluster)
    with unharmed(tls_cluster, "good"):
        the_basics_answer(tls_cluster, context)
        status, _, text = request(tls_cluster, "/worker.py", token=False, context=context)
        assert status == 200 and len(text) > 50000 and "def main" in text
        # A body bigger than one TLS record, read whole.
        status, _, text = request(tls_cluster, "/api/v1/tasks", "POST",
                                  {"task_type": "echo", "payload": "x" * 200000},
                                  context=context)
        assert status == 201, text
        status, headers, _ = request(tls_cluster, "/api/v1/stream-session", "POST", {},
                                     context=context)
        assert status == 200 and "; Secure" in headers["Set-Cookie"]
        # Plain HTTP on the HTTPS port, a handshake never finished, a reset.
        plain = attacker_socket(tls_cluster)
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert closed_by_server(plain, 5) is not None
        silent = attacker_socket(tls_cluster)
        assert closed_by_server(silent, READ_TIMEOUT * 4) is not None
        reset = attacker_socket(tls_cluster)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        reset.close()
        held = [attacker_socket(tls_cluster) for _ in range(50)]
        try:
            the_basics_answer(tls_cluster, context)
        finally:
            for s in held + [plain, silent]:
                s.close()
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            request(tls_cluster, "/health", token=False, context=None, timeout=5)
