"""A user updating under a running fleet (session 31's upgrade round): what
the upgrade from yesterday's releases showed, each fixed and checked here."""
import hashlib
import os
import re
import shutil

from rc import web
from test_web import Client, admin, call, client, serve, stop  # noqa: F401 (fixtures)

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
