"""The dashboard's routes over real HTTP (rc-web's app under waitress on
127.0.0.1, port 0, on a real database): GET /api/v1/overview, the live
/stream/overview, GET /api/v1/terminal, and who may read them."""
import time

from rc import commands, db, scheduler, tasks, web
from rc.states import FAILED
from test_text_metrics import Stream, port
from test_web import admin, call, client, serve, stop  # noqa: F401 (client is a fixture)


def running_task(connection, config, device_id, progress=None, message=None):
    task_id = tasks.submit(connection, config, "echo", {"message": "render"})
    now = time.time()
    with db.write(connection):
        scheduler.assign(connection, (task_id, 1, device_id), now, 30)
        tasks.accept(connection, task_id, 1, device_id, now, 60)
        if progress is not None:
            tasks.record_progress(connection, task_id, 1, device_id, progress, message)
    return task_id


def failed_task(connection, config, device_id, error):
    task_id = running_task(connection, config, device_id)
    with db.write(connection):
        tasks.finish(connection, task_id, 1, device_id, FAILED, None, error, "failed", time.time())
    return task_id


def test_overview_is_the_cluster_in_one_answer(client, cluster_home, add_device):
    config, connection = cluster_home
    now = time.time()
    add_device("pi", metrics={"cpu_percent": 37.5, "memory_percent": 20, "temperature_c": 51.0,
                              "battery": {"percent": 80, "charging": True}}, now=now)
    add_device("phone_a52", now=now - 900)
    with db.write(connection):
        connection.execute("UPDATE devices SET status = 'offline', connected = 0"
                           " WHERE device_id = 'phone_a52'")
    running = running_task(connection, config, "pi", 42.5, "frame 17 of 40")
    failed = failed_task(connection, config, "pi", "Traceback\n" + "x" * 5000)
    queued = tasks.submit(connection, config, "echo", {"message": "later"})

    status, body = client.json("/api/v1/overview")
    assert status == 200
    assert abs(body["now"] - time.time()) < 5
    assert body["summary"]["devices_online"] == 1 and body["summary"]["queue_length"] == 1
    shown = {d["device_id"]: d for d in body["devices"]}
    assert shown["pi"]["cpu_percent"] == 37.5 and shown["pi"]["battery_percent"] == 80
    assert shown["pi"]["temperature_c"] == 51.0 and shown["pi"]["available"] is True
    assert shown["phone_a52"]["status"] == "offline"
    assert shown["phone_a52"]["last_seen"] < now - 800          # the page shows it stale
    assert "metrics" not in shown["pi"] and "profile" not in shown["pi"]   # compact
    assert [(t["task_id"], t["progress"], t["progress_message"]) for t in body["running"]] == \
        [(running, 42.5, "frame 17 of 40")]
    assert "payload" not in body["running"][0] and body["running"][0]["summary"] == "render"
    assert [t["task_id"] for t in body["failures"]] == [failed]
    assert len(body["failures"][0]["error"]) == web.OVERVIEW_TEXT   # cut, not the 5 kB
    assert queued not in [t["task_id"] for t in body["running"]]
    assert [(t["task_id"], t["state"], t["summary"]) for t in body["recent"]][:1] == \
        [(queued, "queued", "later")]                            # newest first, any state
    assert {running, failed} <= {t["task_id"] for t in body["recent"]}
    assert "payload" not in body["recent"][0]
    assert isinstance(body["history"], list) and "success_rate" in body["history_summary"]


def test_failures_are_looked_for_among_the_last_events_only(client, cluster_home, add_device,
                                                            monkeypatch):
    config, connection = cluster_home
    add_device("pi", now=time.time())
    old = failed_task(connection, config, "pi", "long ago")
    for _ in range(3):
        tasks.submit(connection, config, "echo", {"message": "newer"})
    monkeypatch.setattr(web, "FAILURE_LOOKBACK_EVENTS", 2)
    assert client.json("/api/v1/overview")[1]["failures"] == []
    monkeypatch.setattr(web, "FAILURE_LOOKBACK_EVENTS", 100)
    assert [t["task_id"] for t in client.json("/api/v1/overview")[1]["failures"]] == [old]


def test_overview_stream_sends_a_new_picture_when_something_changed(client, cluster_home,
                                                                    add_device):
    config, connection = cluster_home
    stream = Stream(port(client), "/stream/overview")
    try:
        assert stream.response.getheader("Content-Type").startswith("text/event-stream")
        first = stream.event()
        assert first["event"] == "overview" and first["data"]["devices"] == []
        add_device("late-pi", now=time.time())
        tasks.submit(connection, config, "echo", {"message": "x"})
        deadline = time.time() + 10
        while time.time() < deadline:
            event = stream.event()
            if event.get("event") == "overview" and event["data"]["summary"]["queue_length"]:
                break
        assert [d["device_id"] for d in event["data"]["devices"]] == ["late-pi"]
        assert float(event["id"]) >= float(first["id"]) + web.OVERVIEW_MIN_INTERVAL - 0.1
    finally:
        stream.close()


def test_dashboard_routes_need_what_other_reads_need(cluster_home):
    config, connection = cluster_home
    config.health_supervisor = False
    app = web.make_app(config)
    for path in ("/api/v1/overview", "/api/v1/terminal"):
        assert call(app, path)[0] == 200
        assert call(app, path, remote="10.0.0.2")[0] == 401
        assert call(app, path, remote="10.0.0.2", headers=admin(config))[0] == 200
    assert call(app, "/stream/overview", remote="10.0.0.2")[0] == 401


def test_terminal_says_which_commands_the_browser_refuses(client):
    status, body = client.json("/api/v1/terminal")
    assert status == 200
    assert body["refused"] == commands.WEB_REFUSED
    assert "cancel" in body["admin"] and "status" not in body["admin"]


def test_overview_stream_counts_against_max_streams(cluster_home):
    config, connection = cluster_home
    config.health_supervisor = False
    config.max_streams = 1
    server, thread = serve(config)
    try:
        first = Stream(server.effective_port, "/stream/overview")
        second = Stream(server.effective_port, "/stream/overview")
        assert first.response.status == 200 and second.response.status == 503
        first.close()
        second.close()
    finally:
        stop(server, thread)


def test_overview_shows_a_bounded_number_of_devices(client, cluster_home, add_device,
                                                    monkeypatch):
    now = time.time()
    for name, heard in (("b", now - 10), ("c", now - 30), ("a", now - 20)):
        add_device(name, now=heard)
    monkeypatch.setattr(web, "OVERVIEW_DEVICES", 2)
    body = client.json("/api/v1/overview")[1]
    # Those heard from last (test_long_lived_s32: the online ones first), by id.
    assert [d["device_id"] for d in body["devices"]] == ["a", "b"]
    assert body["summary"]["devices_total"] == 3


def test_monitor_fits_a_phone_and_shows_progress_messages(cluster_home, add_device):
    """`monitor` in the web terminal at a phone's 45 columns: no line wraps,
    the task's own message shows, and full slots are blue, not red."""
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 50.0}, now=time.time())
    for _ in range(2):
        running_task(connection, config, "pi", 100, "frame 40 of 40: writing the video file")
    frame = commands.monitor_frame(connection, 45, colour=True)
    plain = frame.replace("\x1b[0m", "")
    for code in ("\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[36m", "\x1b[90m"):
        plain = plain.replace(code, "")
    assert all(len(line) <= 45 for line in plain.splitlines()), plain
    assert "slots 2/2" in plain and "frame 40 of 40" in plain
    slots_line = next(line for line in frame.splitlines() if line.startswith("slots"))
    assert "\x1b[34m" in slots_line and "\x1b[31m" not in slots_line
