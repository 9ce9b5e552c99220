"""Recurring tasks (issue 22, part 1): cron lines and their next firing,
schedules kept in a real database and fired with a controlled clock, and
end to end through rc-scheduler, including a firing missed while it was
down, which runs once on its start."""
import datetime
import io
import json
import time

import pytest

from cluster_harness import Cluster, wait_for
from rc import commands, db, schedules, tasks

PARIS = "Europe/Paris"


def local(*fields):
    return datetime.datetime(*fields).timestamp()


def fire(line, after, zone=None):
    return schedules.wall_clock(schedules.next_fire(line, zone, after),
                                schedules.time_zone(zone)).strftime("%Y-%m-%d %H:%M:%S %a")


# -- cron lines ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("* * * * *", "2030-01-01 00:01:00 Tue"),
    ("*/15 * * * *", "2030-01-01 00:15:00 Tue"),
    ("5,35 */6 * * *", "2030-01-01 00:05:00 Tue"),
    ("0 9-17/4 * * *", "2030-01-01 09:00:00 Tue"),
    ("0 9 * * MON-fri", "2030-01-01 09:00:00 Tue"),
    ("0 0 * * 7", "2030-01-06 00:00:00 Sun"),          # 7 is Sunday too
    ("0 0 * jun *", "2030-06-01 00:00:00 Sat"),
    ("0 0 29 2 *", "2032-02-29 00:00:00 Sun"),         # the next leap day
    ("0 0 13 * fri", "2030-01-04 00:00:00 Fri"),       # both day fields: either matches
    ("@hourly", "2030-01-01 01:00:00 Tue"),
    ("@daily", "2030-01-02 00:00:00 Wed"),
    ("@weekly", "2030-01-06 00:00:00 Sun"),
    ("@monthly", "2030-02-01 00:00:00 Fri"),
    ("@yearly", "2031-01-01 00:00:00 Wed"),
])
def test_the_next_firing_of_a_cron_line(line, expected):
    assert fire(line, local(2030, 1, 1, 0, 0, 30)) == expected


def test_every_counts_from_when_the_schedule_was_made():
    made = 1000.0
    assert schedules.next_fire("@every 10m", None, made, made) == made + 600
    assert schedules.next_fire("@every 30s", None, made + 95, made) == made + 120
    assert schedules.next_fire("@every 1h30m", None, made, made) == made + 5400
    assert schedules.next_fire("@every 2h", None, made + 1, made) == made + 7200


def test_a_time_zone_reads_the_line_there_and_skips_a_time_the_clocks_skip():
    assert fire("0 9 * * *", local(2030, 1, 1, 12), PARIS).startswith("2030-01-02 09:00:00")
    utc_nine = schedules.next_fire("0 9 * * *", "UTC", 1893456000.0)     # 2030-01-01 00:00 UTC
    assert utc_nine == 1893456000.0 + 9 * 3600
    # 31 March 2030: Paris goes from 02:00 to 03:00; 02:30 does not happen that day.
    before = datetime.datetime(2030, 3, 30, 12, tzinfo=schedules.time_zone(PARIS)).timestamp()
    assert fire("30 2 * * *", before, PARIS) == "2030-04-01 02:30:00 Mon"
    # 27 October 2030: 02:30 happens twice; it fires once.
    before = datetime.datetime(2030, 10, 27, 0, tzinfo=schedules.time_zone(PARIS)).timestamp()
    first = schedules.next_fire("30 2 * * *", PARIS, before)
    assert fire("30 2 * * *", first, PARIS) == "2030-10-28 02:30:00 Mon"


@pytest.mark.parametrize("line, words", [
    ("* * * *", "has 4 fields"),
    ("* * * * * *", "has 6 fields"),
    ("61 * * * *", "field 1 (minute) '61': 61 is outside 0-59"),
    ("* 24 * * *", "field 2 (hour)"),
    ("* * 0 * *", "field 3 (day of month) '0'"),
    ("* * * foo *", "field 4 (month) 'foo': 'foo' is not a number or a name (jan-dec)"),
    ("* * * * 8", "field 5 (day of week)"),
    ("5-1 * * * *", "runs backwards"),
    ("*/0 * * * *", "step '0'"),
    ("*/x * * * *", "step 'x'"),
    ("1,,2 * * * *", "field 1 (minute)"),
    ("@reboot", "unknown @reboot"),
    ("@every", "give a duration"),
    ("@every 10x", "give a duration"),
    ("@every 0s", "must be from 1s"),
    ("0 0 31 2 *", "never fires"),
    ("", "give a cron line"),
    ("* " * 200, "at most 200 characters"),
])
def test_a_malformed_cron_line_names_the_bad_field(line, words):
    with pytest.raises(schedules.ScheduleError) as caught:
        schedules.next_fire(line, None, 0.0)
    assert words in str(caught.value)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "x" * 100, "/etc/localtime"])
def test_an_unknown_time_zone_is_refused_by_name(zone):
    with pytest.raises(schedules.ScheduleError, match="time zone"):
        schedules.time_zone(zone)


# -- schedules in a real database, with a controlled clock ----------------------------------

@pytest.fixture
def clock(tmp_path, monkeypatch):
    """The schedules' clock, set by the test (RC_TEST_CLOCK)."""
    path = tmp_path / "clock"

    def set_clock(moment):
        path.write_text(repr(float(moment)))
    set_clock(local(2030, 1, 1, 0, 0, 30))
    monkeypatch.setenv(schedules.TEST_CLOCK_VARIABLE, str(path))
    return set_clock


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))


def rc(config, *argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err, config)
    return status, out.getvalue(), err.getvalue()


def schedule_tasks(connection):
    return [dict(row) for row in connection.execute(
        "SELECT task_id, idempotency_key, state, payload FROM tasks"
        " WHERE idempotency_key LIKE 'schedule:%' ORDER BY task_id")]


def test_a_schedule_fires_when_due_once_and_moves_on(cluster_home, clock):
    config, connection = cluster_home
    status, out, err = rc(config, "schedule", "add", "tick", "* * * * *", "echo", "hi")
    assert status == 0, err
    assert "next firing 2030-01-01 00:01:00" in out
    assert schedules.fire_due(connection, config, Log()) == 0        # not yet
    clock(local(2030, 1, 1, 0, 1, 0, 200000))
    assert schedules.fire_due(connection, config, Log()) == 1
    assert schedules.fire_due(connection, config, Log()) == 0        # not twice
    [task] = schedule_tasks(connection)
    assert task["idempotency_key"] == "schedule:tick:%d" % local(2030, 1, 1, 0, 1)
    assert json.loads(task["payload"]) == {"message": "hi"}
    record = schedules.get(connection, "tick")
    assert record["last_outcome"] == "task %d" % task["task_id"]
    assert record["next_fire"] == local(2030, 1, 1, 0, 2)


def test_missed_firings_run_once_and_overlap_is_skipped_unless_allowed(cluster_home, clock):
    config, connection = cluster_home
    assert rc(config, "schedule", "add", "slow", "*/5 * * * *", "sleep", "60")[0] == 0
    assert rc(config, "schedule", "add", "both", "*/5 * * * *", "sleep", "60",
              "--allow-overlap")[0] == 0
    clock(local(2030, 1, 1, 1, 2))             # twelve firings missed: each runs once
    assert schedules.fire_due(connection, config, Log()) == 2
    assert len(schedule_tasks(connection)) == 2
    assert schedules.get(connection, "slow")["next_fire"] == local(2030, 1, 1, 1, 5)
    # Both tasks are still unended; "both"'s runs (overlap is side by side:
    # one still queued would hold its next firing too).
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running' WHERE task_id = ?",
                           (schedules.get(connection, "both")["last_task_id"],))
    clock(local(2030, 1, 1, 1, 5))
    assert schedules.fire_due(connection, config, Log()) == 1
    assert schedules.get(connection, "slow")["last_outcome"].startswith("skipped: task ")
    assert len(schedule_tasks(connection)) == 3


def test_a_second_process_cannot_fire_the_same_firing(cluster_home, clock):
    config, connection = cluster_home
    rc(config, "schedule", "add", "once", "@hourly", "echo", "x")
    other = db.connect(config.db_path)
    due = schedules.get(connection, "once")["next_fire"]
    clock(due + 1)
    # Both read the schedule as due; only the first commit fires it.
    assert schedules.fire_one(connection, config, "once", due, due + 1).startswith("task")
    assert schedules.fire_one(other, config, "once", due, due + 1) is None
    other.close()
    assert len(schedule_tasks(connection)) == 1


def test_the_idempotency_key_holds_if_the_schedule_row_was_not_moved(cluster_home, clock):
    """As if a crash had come between the task's insert and the schedule's
    move (they commit together, so this is the second fence)."""
    config, connection = cluster_home
    rc(config, "schedule", "add", "fenced", "@hourly", "echo", "x")
    due = schedules.get(connection, "fenced")["next_fire"]
    clock(due)
    schedules.fire_due(connection, config, Log())
    with db.write(connection):
        connection.execute("UPDATE schedules SET next_fire = ? WHERE name = 'fenced'", (due,))
    schedules.fire_due(connection, config, Log())
    assert len(schedule_tasks(connection)) == 1


def test_pause_resume_run_now_and_remove(cluster_home, clock):
    config, connection = cluster_home
    rc(config, "schedule", "add", "p", "@every 10m", "echo", "p")
    assert rc(config, "schedule", "pause", "p")[0] == 0
    clock(local(2030, 1, 2))
    assert schedules.fire_due(connection, config, Log()) == 0
    status, out, _ = rc(config, "schedule", "run-now", "p")
    assert status == 0 and out.startswith("task ")
    status, out, _ = rc(config, "schedule", "resume", "p")
    assert "next firing 2030-01-02 00:0" in out          # counted from now, nothing made up
    status, out, _ = rc(config, "schedule", "list", "--json")
    [record] = json.loads(out)
    assert record["name"] == "p" and record["state"] == "active"
    assert rc(config, "schedule", "remove", "p")[0] == 0
    assert schedules.list_schedules(connection) == []
    assert len(schedule_tasks(connection)) == 1             # the run-now task stays


def test_a_stored_task_no_program_would_write_costs_its_schedule_only(cluster_home, clock):
    config, connection = cluster_home
    rc(config, "schedule", "add", "a-broken", "@hourly", "echo", "x")
    rc(config, "schedule", "add", "b-fine", "@hourly", "echo", "y")
    with db.write(connection):
        connection.execute("UPDATE schedules SET task = '{not json' WHERE name = 'a-broken'")
    clock(schedules.get(connection, "b-fine")["next_fire"])
    assert schedules.fire_due(connection, config, Log()) == 1
    outcome = connection.execute("SELECT last_outcome FROM schedules WHERE name = 'a-broken'"
                                 ).fetchone()[0]
    assert outcome.startswith("not submitted: ")
    assert len(schedule_tasks(connection)) == 1


@pytest.mark.parametrize("argv, words", [
    (["bad", "* * * *", "echo", "x"], "has 4 fields"),
    (["bad", "0 25 * * *", "echo", "x"], "field 2 (hour) '25'"),
    (["bad", "@daily", "echo", "x", "--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["bad", "@daily", "nonsense", "x"], "unknown task type 'nonsense'"),
    (["bad", "@daily", "sleep", "soon"], "sleep seconds must be a number"),
    (["bad", "@daily", "echo", "x", "--require", "wings=2"], "unknown requirement"),
    (["bad name", "@daily", "echo", "x"], "schedule name 'bad name'"),
    (["dup", "@daily", "echo", "x"], "a schedule named 'dup' exists"),
])
def test_bad_input_is_refused_clearly_and_writes_nothing(cluster_home, clock, argv, words):
    config, connection = cluster_home
    assert rc(config, "schedule", "add", "dup", "@hourly", "echo", "first")[0] == 0
    before = schedules.list_schedules(connection)
    status, _, err = rc(config, "schedule", "add", *argv)
    assert status != 0 and words in err, err
    assert schedules.list_schedules(connection) == before
    assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


def test_each_fires_one_task_per_matching_device(cluster_home, clock, add_device):
    config, connection = cluster_home
    add_device("pi1")
    add_device("pi2")
    with db.write(connection):
        connection.execute("UPDATE devices SET connected = 1, status = 'online'")
    rc(config, "schedule", "add", "chore", "@hourly", "echo", "c", "--each")
    clock(schedules.get(connection, "chore")["next_fire"])
    assert schedules.fire_due(connection, config, Log()) == 1
    outcome = schedules.get(connection, "chore")["last_outcome"]
    assert outcome.startswith("group ") and outcome.endswith("(2 tasks)")
    pinned = sorted(json.loads(t["requirements"])["device_id"] for t in connection.execute(
        "SELECT requirements FROM tasks"))
    assert pinned == ["pi1", "pi2"]


def test_the_web_terminal_reads_schedules_and_needs_the_admin_token_to_change_them():
    assert commands.web_access(["schedule", "list"]) == "read"
    assert commands.web_access(["service", "logs", "x"]) == "read"
    assert commands.web_access(["schedule", "add", "n", "@daily", "echo", "x"]) == "admin"
    assert commands.web_access(["schedule", "run-now", "n"]) == "admin"
    assert commands.web_access(["service", "stop", "n"]) == "admin"


# -- over HTTP -------------------------------------------------------------------------------

@pytest.fixture
def client(cluster_home):
    from test_web import Client, serve, stop
    from rc import state_dir
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    yield Client(server.effective_port, state_dir.read_secret(config.admin_token_path))
    stop(server, thread)


def test_schedules_over_http_read_openly_and_change_only_with_the_admin_token(client, clock):
    body = {"name": "web1", "cron": "*/10 * * * *", "task_type": "shell",
            "payload": "uptime", "time_zone": "UTC"}
    status, answer = client.json("/api/v1/schedules", body=body)
    assert status == 401
    status, answer = client.json("/api/v1/schedules", body=body, token=client.token)
    assert status == 201 and answer["name"] == "web1", answer
    status, answer = client.json("/api/v1/schedules", body=body, token=client.token)
    assert status == 400 and "exists" in answer["error"]
    status, answer = client.json("/api/v1/schedules", body=dict(body, name="web2",
                                 cron="0 0 * 13 *"), token=client.token)
    assert status == 400 and "field 4 (month) '13'" in answer["error"]
    status, answer = client.json("/api/v1/schedules", body=dict(body, name="web3",
                                 time_zone="Nowhere/Else"), token=client.token)
    assert status == 400 and "unknown time zone" in answer["error"]
    status, answer = client.json("/api/v1/schedules", body=dict(body, name="web4",
                                 colour="red"), token=client.token)
    assert status == 400 and "unknown field colour" in answer["error"]
    status, answer = client.json("/api/v1/schedules")
    assert status == 200 and [s["name"] for s in answer["schedules"]] == ["web1"]
    status, _, text = client.request("/text/schedules")
    assert status == 200 and text.splitlines()[1].startswith("web1|*/10 * * * *|UTC|shell|")
    status, answer = client.json("/api/v1/schedules/web1", method="DELETE")
    assert status == 401
    status, answer = client.json("/api/v1/schedules/web1", method="DELETE", token=client.token)
    assert status == 200
    status, answer = client.json("/api/v1/schedules/web1", method="DELETE", token=client.token)
    assert status == 404


def test_services_over_http(client):
    body = {"name": "svc", "task_type": "shell", "payload": "sleep 100", "each": True,
            "requirements": ["platform=linux"]}
    status, answer = client.json("/api/v1/services", body=body)
    assert status == 401
    status, answer = client.json("/api/v1/services", body=body, token=client.token)
    assert status == 201 and answer["url"] == "/api/v1/services/svc", answer
    status, answer = client.json("/api/v1/services", body=dict(body, task_type="nope"),
                                 token=client.token)
    assert status == 400 and "unknown task type 'nope'" in answer["error"]
    status, answer = client.json("/api/v1/services", body=dict(body, each="yes",
                                 name="other"), token=client.token)
    assert status == 400 and "each must be true or false" in answer["error"]
    status, answer = client.json("/api/v1/services")
    [record] = answer["services"]
    assert record["name"] == "svc" and record["each"] and record["state"] == "starting"
    assert record["task"]["requirements"] == {"platform": "linux"}
    status, answer = client.json("/api/v1/services/svc/stop", body={})
    assert status == 401
    status, answer = client.json("/api/v1/services/svc/stop", body={}, token=client.token)
    assert status == 200 and answer["stopped"]
    status, _, text = client.request("/text/services?format=csv")
    assert text.splitlines()[1] == "svc,shell,,stopped,,,,,"
    status, answer = client.json("/api/v1/services/svc/start", body={}, token=client.token)
    assert status == 200 and not answer["stopped"]
    status, answer = client.json("/api/v1/services/svc", method="DELETE", token=client.token)
    assert status == 200 and answer["removed"]
    status, answer = client.json("/api/v1/services/svc")
    assert status == 404
    status, answer = client.json("/api/v1/completion")
    assert answer["positional"]["service"][:2] == ["add", "list"]


@pytest.mark.parametrize("body", [
    [], "text", {"name": 7}, {"name": "x", "cron": ["* * * * *"]},
    {"name": "x", "cron": "@daily", "time_zone": {"a": 1}, "task_type": "echo", "payload": "m"},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": ["m"]},
    {"name": "x", "cron": "@daily", "task_type": None},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": "m", "priority": 3},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": "m", "timeout": "soon"},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": "m", "retries": "3"},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": "m", "each": 1},
    {"name": "x", "cron": "@daily", "task_type": "echo", "payload": "m",
     "requirements": {"cores": -1}},
    {"name": "x" * 65, "cron": "@daily", "task_type": "echo", "payload": "m"},
])
def test_a_malformed_schedule_body_is_a_400_naming_it(client, clock, body):
    status, answer = client.json("/api/v1/schedules", body=body, token=client.token)
    assert status == 400 and answer["error"], answer
    status, answer = client.json("/api/v1/schedules")
    assert answer["schedules"] == []


def test_the_web_terminal_runs_schedule_commands(client, clock):
    status, answer = client.json("/api/v1/command", body={"command": "schedule add t @daily"
                                                          " echo x"})
    assert status == 401
    status, answer = client.json("/api/v1/command", body={"command": "schedule add t @daily"
                                                          " echo x"}, token=client.token)
    assert answer["status"] == 0 and "next firing" in answer["output"], answer
    status, answer = client.json("/api/v1/command", body={"command": "schedule list"})
    assert answer["status"] == 0 and "t " in answer["output"] and "@daily" in answer["output"]


# -- end to end: rc-scheduler fires on time, and a missed firing once after a restart ------

@pytest.mark.e2e
def test_rc_scheduler_fires_on_time_and_a_missed_firing_once_after_a_restart(tmp_path):
    clock_file = tmp_path / "clock"
    clock_file.write_text(repr(local(2030, 1, 1, 0, 0, 30)))
    cluster = Cluster(tmp_path / "home")
    cluster.env[schedules.TEST_CLOCK_VARIABLE] = str(clock_file)
    cluster.start()
    try:
        cluster.start_worker("w1")
        cluster.rc("schedule", "add", "tick", "* * * * *", "echo", "tock")
        time.sleep(1.5)                         # rc-scheduler looks twice a second
        assert schedule_tasks(cluster.db) == []
        clock_file.write_text(repr(local(2030, 1, 1, 0, 1, 0, 100000)))
        wait_for(lambda: len(schedule_tasks(cluster.db)) == 1, 10, "the firing at 00:01")
        [task] = schedule_tasks(cluster.db)
        wait_for(lambda: tasks.get(cluster.db, task["task_id"])["state"] == "completed", 30,
                 "the fired task to run")
        cluster.supervisorctl("stop", "all")                 # the main node is down
        clock_file.write_text(repr(local(2030, 1, 1, 0, 5, 30)))    # 00:02 to 00:05 missed
        time.sleep(1.0)
        assert len(schedule_tasks(cluster.db)) == 1
        cluster.supervisorctl("start", "all")
        wait_for(lambda: len(schedule_tasks(cluster.db)) == 2, 15, "the missed firing")
        time.sleep(1.5)
        assert len(schedule_tasks(cluster.db)) == 2      # once, not four times
        listed = cluster.rc("schedule", "list", "--json").stdout
        [record] = json.loads(listed)
        assert record["next_fire"] == local(2030, 1, 1, 0, 6)
        assert record["last_fired"] == local(2030, 1, 1, 0, 2)
        missed = schedule_tasks(cluster.db)[1]["task_id"]
        wait_for(lambda: tasks.get(cluster.db, missed)["state"] == "completed", 60,
                 "the missed firing's task to run once the worker is back")
    finally:
        cluster.stop()


# -- services' bookkeeping in a real database (their e2e tests: tests/test_services.py) ---

def end_run(connection, task_id, state, started, finished, result=None, error=None):
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi',"
                           " started_at = ? WHERE task_id = ?", (started, task_id))
        tasks.finish(connection, task_id, 1, "pi", state, result, error, state, finished)


@pytest.fixture
def crash_loop(cluster_home, add_device):
    """Service `svc`, whose command exits at once: backoff 1 s doubling up
    to 8 s, a quick exit under 30 s, failing after 3 of them."""
    from rc import services
    config, connection = cluster_home
    add_device("pi")
    config.service_restart_backoff, config.service_restart_backoff_max = 1.0, 8.0
    config.service_quick_exit, config.service_failing_after = 30.0, 3
    services.add(connection, config, "svc", schedules.task_spec(config, "shell",
                                                                {"command": "false"}))
    return config, connection


def test_service_backoff_doubles_with_quick_exits_is_capped_and_resets(crash_loop):
    from rc import services
    config, connection = crash_loop
    now, delays = 1000.0, []
    for number in range(6):
        assert services.tend(connection, config, Log(), now) == 1
        task_id = services.get(connection, config, "svc", now)["runs"][0]["task_id"]
        assert services.tend(connection, config, Log(), now) == 0    # running: nothing to do
        lasted = 100.0 if number == 4 else 1.0                       # run 5 lasts
        end_run(connection, task_id, "failed", now, now + lasted, {"exit_code": 1,
                "stderr": "no luck\n"}, "exit status 1")
        now += lasted
        services.tend(connection, config, Log(), now)                # takes the end in
        run = services.get(connection, config, "svc", now)["runs"][0]
        delays.append(run["state"])
        assert run["last_error"] == "failed (exit 1): no luck"
        assert services.tend(connection, config, Log(), now + 0.01) == 0  # waits its backoff
        now += 8.0
    assert delays == ["restarting in 1s", "restarting in 2s", "failing (3 quick exits;"
                      " next try in 4s)", "failing (4 quick exits; next try in 8s)",
                      "restarting in 1s", "restarting in 1s"]
    starts = [row[0] for row in connection.execute(
        "SELECT idempotency_key FROM tasks ORDER BY task_id")]
    added = int(connection.execute("SELECT created_at FROM services").fetchone()[0] * 1000)
    assert starts == ["service:svc:%d:-:%d" % (added, n) for n in range(1, 7)]


def test_a_failing_service_stays_failing_while_it_tries_again(crash_loop):
    """Until a new run outlasts service_quick_exit, a crash loop is not
    `running` (rc status would count it so at each try)."""
    from rc import services
    config, connection = crash_loop
    now = 1000.0
    for _ in range(3):
        services.tend(connection, config, Log(), now)
        task_id = services.get(connection, config, "svc", now)["runs"][0]["task_id"]
        end_run(connection, task_id, "failed", now, now + 1.0, {"exit_code": 1}, "exit 1")
        services.tend(connection, config, Log(), now + 1.0)          # takes the end in
        now += 9.0
    assert services.tend(connection, config, Log(), now) == 1
    record = services.get(connection, config, "svc", now)
    assert record["runs"][0]["state"] == "failing (3 quick exits; starting again)"
    assert record["state"] == "failing"
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi',"
                           " started_at = ? WHERE task_id = ?",
                           (now, record["runs"][0]["task_id"]))
    record = services.get(connection, config, "svc", now + 29.0)
    assert record["runs"][0]["state"] == "failing (3 quick exits; trying again on pi)"
    assert record["state"] == "failing"
    record = services.get(connection, config, "svc", now + 31.0)
    assert record["runs"][0]["state"] == "running on pi" and record["state"] == "running"


def test_a_service_added_again_under_its_name_starts_a_new_run(cluster_home, add_device):
    from rc import services
    config, connection = cluster_home
    add_device("pi")
    spec = schedules.task_spec(config, "shell", {"command": "sleep 100"})
    services.add(connection, config, "again", spec)
    services.tend(connection, config, Log(), 1000.0)
    first = services.get(connection, config, "again")["runs"][0]["task_id"]
    services.remove(connection, config, "again")
    time.sleep(0.002)
    services.add(connection, config, "again", spec)
    services.tend(connection, config, Log(), 1001.0)
    second = services.get(connection, config, "again")["runs"][0]
    assert second["task_id"] != first and second["task_state"] == "queued"
    assert tasks.get(connection, first)["state"] == "cancelled"


def test_service_logs_read_a_stdout_stored_past_the_inline_cap(cluster_home, add_device):
    from rc import files, services
    config, connection = cluster_home
    add_device("pi")
    services.add(connection, config, "chatty", schedules.task_spec(
        config, "shell", {"command": "yes"}))
    services.tend(connection, config, Log(), 1000.0)
    task_id = services.get(connection, config, "chatty")["runs"][0]["task_id"]
    end_run(connection, task_id, "completed", 1000.0, 1100.0,
            {"output": "the first MiB only", "exit_code": 0, "stderr": "warned\n"})
    text = "".join("line %d\n" % n for n in range(5000)).encode()
    sha256, size = files.store_stream(connection, config, io.BytesIO(text), len(text))
    with db.write(connection):
        files.add_task_file(connection, task_id, 1, ".rc/stdout", sha256, size, 1100.0)
    services.tend(connection, config, Log(), 1100.0)
    [run] = services.logs(connection, config, "chatty", 3)
    assert run["stdout"] == "line 4997\nline 4998\nline 4999"
    assert run["stderr"] == "warned" and run["state"] == "completed"
    status, out, _ = rc(config, "service", "logs", "chatty", "-n", "2")
    assert status == 0 and "stdout:\nline 4998\nline 4999\n" in out


def test_an_each_service_gains_devices_that_join_and_loses_forgotten_ones(cluster_home,
                                                                           add_device):
    from rc import fleet, services
    config, connection = cluster_home
    add_device("pi1")
    services.add(connection, config, "agent", schedules.task_spec(
        config, "python_eval", {"expression": "1"}, {"tags": ["kitchen"]}), each=True)
    services.tend(connection, config, Log(), 1000.0)
    places = [run["place"] for run in services.get(connection, config, "agent")["runs"]]
    assert places == ["pi1"]
    add_device("pi2")
    services.tend(connection, config, Log(), 1001.0)
    runs = services.get(connection, config, "agent")["runs"]
    assert [run["place"] for run in runs] == ["pi1", "pi2"]
    pinned = {json.loads(row[0])["device_id"] for row in connection.execute(
        "SELECT requirements FROM tasks WHERE state = 'queued'")}
    assert pinned == {"pi1", "pi2"}
    fleet.forget(connection, config, "pi1")
    services.tend(connection, config, Log(), 1002.0)
    assert [run["place"] for run in services.get(connection, config, "agent")["runs"]] == \
        ["pi2"]
    assert tasks.get(connection, runs[0]["task_id"])["state"] == "cancelled"
