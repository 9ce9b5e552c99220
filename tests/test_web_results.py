"""rc-web's ChangeWatch (lib/rc/web_results.py) on a real SQLite file and a
real doorbell: the waiter that watches for the others hands the watch on
when its own wait ends, and a ring wakes whoever waits."""
import io
import json
import os
import threading
import time

from rc import bell, db, web_results
from rc import config as config_module


def make_watch(tmp_path):
    settings = tmp_path / "rc.json"
    settings.write_text(json.dumps({}))
    config = config_module.load(environ={"RC_HOME": str(tmp_path),
                                         "RC_CONFIG": str(settings)})
    os.makedirs(os.path.dirname(config.db_path), exist_ok=True)
    db.open_database(config.db_path).close()
    return config, web_results.ChangeWatch(config)


def commit_and_ring(config):
    connection = db.connect(config.db_path)
    with db.write(connection):
        connection.execute("INSERT INTO counters(name, value) VALUES ('test', 1)"
                           " ON CONFLICT(name) DO UPDATE SET value = value + 1")
    connection.close()
    bell.ring(config.run_dir, bell.WEB)


def waiting(watch, seen, timeout):
    """A thread waiting on the watch; its (generation, seconds waited) when done."""
    outcome = {}

    def run():
        started = time.monotonic()
        outcome["generation"] = watch.wait(seen, timeout)
        outcome["seconds"] = time.monotonic() - started
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_ring_wakes_the_waiter_and_a_quiet_wait_times_out(tmp_path):
    config, watch = make_watch(tmp_path)
    started = time.monotonic()
    assert watch.wait(0, 0.2) == 0
    assert 0.15 < time.monotonic() - started < 2
    thread, outcome = waiting(watch, 0, 10)
    time.sleep(0.3)
    commit_and_ring(config)
    thread.join(10)
    assert outcome["generation"] == 1 and outcome["seconds"] < 5


def test_the_watch_is_handed_on_when_the_watcher_leaves(tmp_path):
    config, watch = make_watch(tmp_path)
    short, short_outcome = waiting(watch, 0, 0.3)      # watches first, leaves first
    time.sleep(0.05)
    # Another whose wait ends about when the watcher leaves: if the watch is
    # handed to it, it passes it on as it goes.
    other, _ = waiting(watch, 0, 0.25)
    time.sleep(0.05)
    long, long_outcome = waiting(watch, 0, 10)
    short.join(5)
    other.join(5)
    assert short_outcome["generation"] == 0
    time.sleep(0.3)                         # the short waiter has gone: the long one watches
    commit_and_ring(config)
    rung = time.monotonic()
    long.join(10)
    assert long_outcome["generation"] == 1
    assert time.monotonic() - rung < 3, "woken by the ring, not by its own timeout"
    assert not watch.watching


def test_one_address_but_loopback_holds_a_third_of_the_streams():
    slots = web_results.StreamSlots(6)        # 2 from one address
    lan = [slots.take("192.168.1.50") for _ in range(3)]
    assert [refused is None for _, refused in lan] == [True, True, False]
    assert "the most one address may hold" in lan[2][1]
    assert slots.take("192.168.1.51")[1] is None          # another address has room
    local = [slots.take("127.0.0.1") for _ in range(3)]     # the main node's own: no share
    assert all(refused is None for _, refused in local)
    assert "max_streams" in slots.take("10.0.0.9")[1]      # all 6 are open
    give_back = lan[0][0]
    give_back()
    give_back()                                             # once, however often called
    assert slots.open == 5
    assert slots.take("192.168.1.50")[1] is None
    assert slots.take("fe80::1")[1] is not None and slots.open == 6


def test_a_batch_submit_logs_its_line_once_its_answer_is_sent(cluster_home):
    """The client waits for the answer, not for supervisord to be woken by
    rc-web's log line: the line is written once the body is sent (the
    server closes it), and says when the tasks were queued."""
    from rc import web
    from rc.log import Logger
    from test_web import admin
    config, connection = cluster_home
    stream = io.BytesIO()
    app = web.make_app(config, Logger("rc-web", stream=stream))
    body = json.dumps([{"task_type": "echo", "payload": "x"}]).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/tasks",
               "QUERY_STRING": "group=new", "REMOTE_ADDR": "127.0.0.1",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000",
               "HTTP_HOST": "127.0.0.1:5000", "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)), "wsgi.url_scheme": "http",
               "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_AUTHORIZATION": admin(config)["Authorization"]}
    answer = {}
    before = time.time()
    chunks = app(environ, lambda status, headers, exc_info=None: answer.update(
        status=status, headers=dict(headers)))
    data = b"".join(chunks)
    answered = time.time()
    assert answer["status"].startswith("201") and \
        int(answer["headers"]["Content-Length"]) == len(data)
    task_id = json.loads(data)["tasks"][0]["task_id"]
    assert b"tasks_submitted" not in stream.getvalue()       # not yet: the answer goes first
    time.sleep(0.05)
    chunks.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    line = [line for line in lines if line["event"] == "tasks_submitted"][0]
    assert line["first_task_id"] == task_id and line["address"] == "127.0.0.1"
    assert before <= line["time"] <= answered           # when queued, not when written
