"""A user updating under a running fleet (session 31's upgrade round): what
the upgrade from yesterday's releases showed, each fixed and checked here."""
import hashlib
import os
import re
import shutil

from rc import web
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
