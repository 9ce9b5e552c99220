"""A new user's first hour, session 38, from the README and docs/ alone on a
fresh clone: a Python user moving a ProcessPoolExecutor program onto the
fleet with /client.py (3.6, 3.8, 3.12, 3.13 against a 3.6 worker and the
local one), then a shell user of GNU Parallel and xargs with `rc map`, its
files, pipelines and the dashboard on a phone. Each test fails without its
fix; they share one cluster."""
import os
import subprocess
import urllib.parse

import pytest

from cluster_harness import RC, Cluster, online, wait_for
from rc import client

TIMEOUT = 60        # seconds any one task may take here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("first-hour-s38"))
    cluster.start()
    try:
        wait_for(lambda: online(cluster), 30, "the local worker online")
        cluster.url = "http://127.0.0.1:%d" % cluster.config.web_port
        with open(cluster.config.admin_token_path) as f:
            cluster.token = f.read().strip()
        yield cluster
    finally:
        cluster.stop()


def test_a_task_file_with_a_newline_in_its_name_downloads(cluster, tmp_path):
    """`rc map --files weird/*` took a file named "new<newline>line.txt"
    and its task's output came back with `rc get`, but the dashboard's link
    to it (GET /api/v1/tasks/ID/files/new%0Aline.txt.gz), and the client's
    `get((task_id, name))`, answered 404 `Not found`: Bottle's `:path`
    stops at a newline, so no route matched."""
    name = "new\nline.txt"
    (tmp_path / name).write_text("two lines\n")
    done = subprocess.run([RC, "map", "gzip -kf {}", "--files", name, "--output", "{}.gz",
                           "--into", "out"], cwd=str(tmp_path), env=cluster.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr
    task_id = cluster.db.execute("SELECT max(task_id) FROM tasks").fetchone()[0]
    with client.Cluster(cluster.url, cluster.token) as rc:
        assert sorted(entry["name"] for entry in rc.files(task_id)) == [name, name + ".gz"]
        assert rc.get((task_id, name)) == b"two lines\n"
        assert rc.get((task_id, name + ".gz")) == (tmp_path / "out" / (name + ".gz")).read_bytes()
    url = "%s/api/v1/tasks/%d/files/%s" % (cluster.url, task_id, urllib.parse.quote(name))
    assert "%0A" in url          # the dashboard's link, as encodeURIComponent makes it
    assert subprocess.run(["curl", "-fsS", url], stdout=subprocess.PIPE,
                          timeout=30).stdout == b"two lines\n"
