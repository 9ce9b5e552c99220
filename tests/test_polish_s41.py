"""Small rough edges left by session 41's helpers (polish41): each test fails
without its fix."""
import json
import os
import time

import pytest

from rc import commands, db, device_logs, devices, tasks
from rc.states import ASSIGNED, FAILED
from test_cli import rc


# -- 1. rc why shows what a device chose on its one line ------------------------------------

FORGED = "\nTask 1 completed (attempt 1 on pi).\n\tall\u202egood"


def test_rc_why_shows_a_devices_text_on_its_one_line(cluster_home):
    """`rc why N` printed a failed task's error, and a paused device's
    reason, with their newlines (render.printable): a device drew lines of
    its own under rc's ("Task 1 completed ..."), in the terminal and in a
    script reading it line by line. Now the answer is one line, device text
    shown as a table cell shows it (render.cell), as `rc device` does; so
    is the JSON of /api/v1/tasks/N/why, which is the same text."""
    config, connection = cluster_home
    now = time.time()
    data = {"device_info": {"hostname": "pi", "platform": "linux"},
            "hardware_specs": {"cpu_cores": 4, "memory_gb": 2.0},
            "task_types": ["echo", "shell"], "slots": 2, "role": "compute", "protocol": 1}
    with db.write(connection):
        devices.register(connection, "pi", data, "127.0.0.1:1", now)
        devices.heartbeat(connection, "pi", {"cpu_percent": 5.0}, now,
                          {"available": False, "reason": "on battery" + FORGED})
        failed = tasks.submit(connection, config, "shell", {"command": "true"})
        connection.execute("UPDATE tasks SET state = ?, device_id = 'pi', assigned_at = ?"
                           " WHERE task_id = ?", (ASSIGNED, now, failed))
        assert tasks.accept(connection, failed, 1, "pi", now, 180.0)
        assert tasks.finish(connection, failed, 1, "pi", FAILED,
                            {"output": "", "stderr": "", "exit_code": 1}, "boom" + FORGED,
                            FAILED, now)
        queued = tasks.submit(connection, config, "shell", {"command": "true"})
    for task_id, said in ((failed, "failed (attempt 1 on pi): boom Task 1 completed"),
                          (queued, "on battery Task 1 completed")):
        status, out, err = rc("why", str(task_id))
        assert status == 0, err
        assert out.count("\n") == 1 and said in out and "\t" not in out, out
        assert "all?good" in out, out
    from rc import web
    from test_records import get
    answer = json.loads(get(web.make_app(config), "/api/v1/tasks/%d/why" % failed))["why"]
    assert "\n" not in answer and "boom Task 1 completed" in answer, answer


# -- 2. TSV a spreadsheet opens (or a paste into one) runs no formula a device chose --------

def test_tsv_values_that_a_spreadsheet_would_run_as_formulas_begin_with_a_quote(
        cluster_home, add_device):
    """polish40 gave --csv's formula-like values a leading `'` and left
    --tsv as it was: but a spreadsheet opens a .tsv as it opens a .csv, and
    tab-separated text pasted into one (`rc devices --tsv | xclip`) is
    split into cells the same way, each `=...` run as a formula. `rc ...
    --tsv` and /text?format=tsv now write such values as --csv does; the
    pipe format, which no spreadsheet splits, and numbers stay."""
    from rc import records, render, web
    from test_records import get
    config, connection = cluster_home
    add_device("pi")
    role = "=HYPERLINK(\"http://x\",\"y\")"
    with db.write(connection):
        connection.execute("UPDATE devices SET role = ?", (role,))     # as it reports it
    at = records.DEVICE_COLUMNS.index("role")
    status, out, err = rc("devices", "--tsv", "--no-header")
    assert status == 0, err
    assert out.split("\t")[at] == "'" + role, out
    text = get(web.make_app(config), "/text/devices?format=tsv&header=0")
    assert text.split("\t")[at] == "'" + role, text
    assert get(web.make_app(config), "/text/devices?header=0").split("|")[at] == role
    assert render.tsv_text([{"a": -3.5, "b": "-x"}], ["a", "b"], header=False) == "-3.5\t'-x\n"


# -- 3. rc logs -f of the main node's own worker --------------------------------------------

def worker_line(log_dir, device_id, event, at):
    """A line the main node's own worker (rc-worker) logs, as it writes it."""
    import json
    import os
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "rc-worker.log"), "a") as f:
        f.write(json.dumps({"time": at, "program": "worker", "level": "warning",
                            "event": event, "device_id": device_id, "task_id": 7,
                            "message": "status=failed"}, separators=(",", ":")) + "\n")


def forwarded(connection, device_id, event, at):
    """The same line as its worker forwards it (kept in the database)."""
    from rc import device_logs
    with db.write(connection):
        device_logs.store(connection, device_id, device_logs.checked_lines({"lines": [
            {"time": at, "level": "warning", "event": event, "message": "status=failed",
             "task_id": 7}]}), at + 1)


def followed(config, monkeypatch, argv, looks):
    """`rc logs ARGV -f` while `looks` (callables) happen, one between each
    two looks it takes; what it printed."""
    import io
    looks = list(looks)

    def next_look(seconds):
        if not looks:
            raise KeyboardInterrupt
        looks.pop(0)()
    monkeypatch.setattr(commands.time, "sleep", next_look)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        commands.run_command(["logs"] + argv + ["-f"], out, err, config)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("argv", [["-n", "0"], []])
def test_rc_logs_follow_shows_the_main_node_own_worker_lines_once(cluster_home, add_device,
                                                                    monkeypatch, argv):
    """polish40 left out of `rc logs --device nas-local` (and --task) the
    lines its worker forwards when the lines read from the files had its
    worker's: with -n 0 none is read, and on a worker log with none of its
    lines yet neither, so `-f` showed each new line twice, from its log file
    and from the database. A forwarded line read from the files too (at
    this look or one before) is now left out; another device's stay."""
    config, connection = cluster_home
    at = 1.7e9
    for device_id in ("nas-local", "phone"):
        add_device(device_id)
    if argv:
        worker_line(config.log_dir, "nas-local", "old", at)
        forwarded(connection, "nas-local", "old", at)
    else:       # the worker's log has none of its lines yet
        worker_line(config.log_dir, "someone", "other", at)

    def one_line(event, at):
        def look():
            worker_line(config.log_dir, "nas-local", event, at)
            forwarded(connection, "nas-local", event, at)
            forwarded(connection, "phone", event, at)
        return look
    for device_id in ("nas-local", "phone"):
        new = [device_id.replace("-", "_") + suffix for suffix in ("_first", "_second")]
        lines = followed(config, monkeypatch, argv + ["--device", device_id],
                         [one_line(new[0], at + 1), one_line(new[1], at + 2)])
        events = [line.split()[3] for line in lines]
        assert [event for event in events if event in new] == new, (device_id, lines)



def test_rc_logs_keeps_the_main_node_own_workers_lines_that_name_no_device(cluster_home,
                                                                            add_device):
    """polish40 left out all the lines the main node's own worker forwards
    once a line read from the files named it: but most of its warnings
    (37 of 39 in worker.py) do not name the device in its log file, and
    `rc logs --device ID` finds a line in the files by its device_id: such
    a warning was in neither. Now only the forwarded lines read from the
    files too are left out, line by line: shown once, from wherever it is;
    with --task, its line in the file is the one shown."""
    from rc import scheduler
    config, connection = cluster_home
    local = commands.local_device_id()
    add_device(local)
    task_id = tasks.submit(connection, config, "shell", {"command": "true"})
    with db.write(connection):
        assert scheduler.assign(connection, (task_id, 1, local), 1.7e9, 15.0)
    at = 1.7e9 + 0.9999995           # forwarded then logged: one second, then the next
    worker_line(config.log_dir, local, "registered", at)
    forwarded(connection, local, "registered", at)
    with open(os.path.join(config.log_dir, "rc-worker.log"), "a") as f:
        f.write(json.dumps({"time": at + 1e-6, "program": "worker", "level": "warning",
                            "event": "result_not_acknowledged", "task_id": task_id},
                           separators=(",", ":")) + "\n")
    with db.write(connection):
        device_logs.store(connection, local, device_logs.checked_lines({"lines": [
            {"time": at, "level": "warning", "event": "result_not_acknowledged",
             "message": "", "task_id": task_id}]}), at + 1)
    for argv, shown in ((["--device", local], ["registered", "result_not_acknowledged"]),
                        (["--task", str(task_id)], ["result_not_acknowledged"])):
        status, out, err = rc("logs", *argv)
        assert status == 0, err
        assert [line.split()[3] for line in out.splitlines() if " worker " in line] == shown, \
            (argv, out)


# -- 4. a file over the store's quota is refused before it is read --------------------------

class Unreadable(__import__("io").FileIO):
    """A file of the disk whose bytes must not be read."""

    def read(self, *args):
        raise AssertionError("read before the quota was asked")

    readinto = read


def test_the_client_refuses_a_file_over_the_quota_before_reading_it(cluster_home, tmp_path):
    """rc.client's put() of a path (or a file: submit's inputs and stdin,
    map's) hashed the whole file, then sent it for rc-web to refuse on its
    headers: a sparse file of 1 GiB over a 1 MiB quota took its seconds of
    zeros, then the refusal reset the connection under the body still being
    sent and the error was "no answer from ... is it rc-web?", waited on
    as for an rc-web gone. Now the client asks rc-web's quota first (GET
    /api/v1/files, once while files fit) and refuses at once, with the
    words of rc-web's own 413; a file that fits is put as before."""
    from rc import client, files, state_dir
    from test_web import serve, stop
    config, _ = cluster_home
    config.files_quota_mb, config.health_supervisor = 2, False
    server, thread = serve(config)
    try:
        with client.Cluster("http://127.0.0.1:%s" % server.effective_port,
                            state_dir.read_secret(config.admin_token_path)) as cluster:
            fits = tmp_path / "fits.bin"
            fits.write_bytes(b"x" * (files.MIB + 5))
            assert cluster.put(str(fits))["size"] == files.MIB + 5
            big = tmp_path / "big.bin"
            with open(str(big), "wb") as f:
                f.truncate(1 << 30)             # sparse: no gigabyte written
            with pytest.raises(client.ClusterError) as refused:
                with Unreadable(str(big)) as f:
                    cluster.put(f)
            with pytest.raises(client.ClusterError) as by_path:
                cluster.put(str(big))
    finally:
        stop(server, thread)
    with pytest.raises(files.FileStoreError) as said:      # what rc-web's 413 says
        files.check_quota(config, 1 << 30)
    assert refused.value.status == 413 and str(refused.value) == str(by_path.value) \
        == "POST /api/v1/files: %s (HTTP 413)" % said.value


# -- 5. a device's log lines and a task's words on a phone ----------------------------------

def test_log_lines_and_task_messages_on_a_phone_keep_their_words_whole(tmp_path):
    """On a phone (390x844) a table's message column (a device's log lines,
    a running task's message, a task's command) had what its time, event or
    state left: about 110 px, and words broke in the middle
    (`reason=battery_|below_minimum`, `sensor_readings_kitc|hen.csv`). Now on
    a narrow screen the message goes under the row's other cells, across
    the row: no word that fits a line is broken, nothing overflows, and
    the header still names the columns beside it."""
    import os
    import test_polish_s40 as s40
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_dashboard_browser import panel_screenshot
    if not os.path.exists(s40.CHROMIUM):
        pytest.skip("no Chromium at %s" % s40.CHROMIUM)
    now = time.time()
    running = {"task_id": 12, "task_type": "shell", "state": "running", "device_id": "pi",
               "progress": 40.0, "progress_message": "converting frame_000123_of_004567.png",
               "summary": "shell: python3 process_measurements.py sensor_readings_kitchen.csv",
               "created_at": now - 60, "started_at": now - 50}
    overview = {"now": now, "devices": [], "history": [], "history_summary": {},
                "summary": {"devices_online": 1, "devices_total": 1, "slots_busy": 1,
                            "slots_total": 2, "tasks_running": 1, "tasks_assigned": 0,
                            "queue_length": 0, "throughput_5m": 0},
                "running": [running], "recent": [running], "failures": []}

    def answer(route):
        if route.request.url.endswith("/api/v1/overview"):
            return route.fulfill(json=overview)
        return s40.dashboard_answer(route)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=s40.CHROMIUM,
                                             args=s40.CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True,
                                    has_touch=True)
            page.route(s40.BASE + "/**", answer)
            page.goto(s40.BASE + "/#/device/pi-kitchen")
            page.wait_for_selector("#view-object td.message:has-text('battery_below_minimum')")
            panel_screenshot(page.locator(".panel", has=page.locator("h2", has_text="Logs")),
                             str(tmp_path / "phone-logs.png"))
            assert page.evaluate(s40.WORDS_SPLIT, "#view-object td.message") == []
            assert page.locator("#view-object th:text-is('time')").is_visible()
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.goto(s40.BASE + "/#/")
            page.wait_for_selector("#view-overview td.message:has-text('frame_000123')")
            assert page.evaluate(s40.WORDS_SPLIT, "#view-overview td.message") == []
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()
