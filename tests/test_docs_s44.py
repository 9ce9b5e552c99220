"""What a new user copied from the README and docs/ and found otherwise
(docs44): who `read_access=local` lets read, what `Cluster.results()`
returns, which logs operations.md lists, the output cap the README gives, a
`--require device=` that differs from the id only by case, and where a root
worker under supervisord's umask builds the environments of `--pip` tasks."""
import os
import re
import stat
import types

from rc import tasks

from test_shared_definitions import worker  # noqa: F401 (its fixture: bin/worker.py loaded)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_read_access_local_is_said_to_be_rc_webs_own_user_not_any_loopback_client():
    # A second local user (or a task of the local worker) reading over
    # 127.0.0.1 gets 401 (web.is_local_peer); the docs once said "127.0.0.1
    # and ::1 only", which promises that user the cluster's data.
    row = re.search(r"^\| `read_access` \|.*$", read("docs/configuration.md"), re.M).group(0)
    assert "::1 only" not in row
    assert "own user" in row and "needs the token" in row
    assert "::1 only" not in read("lib/rc/defaults.py")


def test_client_md_says_results_answers_an_object_not_a_list():
    text = read("docs/client.md")
    entry = text[text.index("- `results(task_ids"):]
    entry = entry[:entry.index("\n- ")]
    assert '"results"' in entry and '"pending"' in entry and '"unknown"' in entry


def test_operations_md_lists_the_log_of_every_supervisord_program():
    programs = re.findall(r"^\[program:([a-z-]+)\]", read("etc/supervisord.conf"), re.M)
    assert "rc-files" in programs
    table = read("docs/operations.md").split("**Rotation and retention**")[0]
    for program in programs:
        assert "`%s.log`" % program in table, program


def test_the_rc_cli_log_events_operations_md_names_are_logged_by_rc():
    row = re.search(r"^\| `rc-cli.log` \|.*$", read("docs/operations.md"), re.M).group(0)
    named = re.findall(r"`([a-z_]+)`", row.split("|")[2])
    assert len(named) >= 5
    code = read("lib/rc/commands.py") + read("lib/rc/map_cli.py")
    for event in named:
        assert re.search(r"logger\.info\(\s*\"%s\"" % event, code), event


def test_the_output_cap_the_readme_gives_is_the_workers(worker):  # noqa: F811
    kib = int(re.search(r"capped output \((\d+) KiB", read("README.md")).group(1))
    assert kib * 1024 == worker.OUTPUT_CAP


def test_a_device_id_requirement_differing_only_by_case_is_named_as_such():
    device = {"device_id": "vm-local"}
    reasons = tasks.unmet_requirements({"device_id": "VM-LOCAL"}, device)
    assert reasons and "not vm-local" in reasons[0]
    assert tasks.unmet_requirements({"device_id": "vm-local"}, device) == []
    assert tasks.unmet_requirements({"device_id": "pi"}, device) == ["needs device_id=pi"]


def test_the_directories_a_root_worker_makes_for_environments_let_task_users_in(
        worker, tmp_path):  # noqa: F811
    # The main node's own worker runs under supervisord's umask=077: what
    # makedirs made between was 0700, and every --pip task of a task uid
    # failed with a PermissionError before its build began.
    directory = str(tmp_path / "made" / "between" / "venvs")
    environments = worker.Environments(types.SimpleNamespace(venv_dir=directory, venv_mb=1))
    umask = os.umask(0o077)
    try:
        environments.make_directory({"uid": 59000, "gid": 59000})
    finally:
        os.umask(umask)
    for path in (str(tmp_path / "made"), os.path.dirname(directory)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755, path
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o1777


def test_the_environment_driver_builds_under_a_umask_task_users_can_read(worker):  # noqa: F811
    driver = worker.VENV_DRIVER
    assert "os.umask(0o022)" in driver
    # ... and gives the task its own umask back before running it.
    assert driver.index("os.umask(task_umask)") < driver.index("os.execv(")


def test_make_run_is_up_with_a_warning_when_the_fleet_is_smaller_than_health_asks():
    # health_min_devices_online 3 (configuration.md) on a one-box cluster:
    # make run waited its 30 s and failed, every time, "not healthy".
    from rc import commands, health

    def report(online, total, programs=health.OK):
        return health.Report([
            health.Finding("programs", programs, "6 programs running"),
            health.Finding("devices", health.WARNING if online < 3 else health.OK,
                           "devices %d/%d online" % (online, total),
                           devices_online=online, devices_total=total)])
    assert commands.settled(report(1, 1))              # nothing more to wait for
    assert not commands.settled(report(1, 2))          # one may still come back
    assert not commands.settled(report(0, 1))
    assert not commands.settled(report(1, 1, programs=health.WARNING))
    assert commands.programs_running(report(1, 2))
    assert not commands.programs_running(report(1, 1, programs=health.WARNING))


def test_the_body_limits_http_md_gives_are_rc_webs():
    from rc import web
    text = read("docs/http.md")
    assert "413 (a JSON body over %d MiB)" % (web.MAX_BODY_BYTES // 2 ** 20) in text
    assert "413 for any body over %d MiB" % (web.SERVER_BODY_LIMIT // 2 ** 20) in text


def test_the_worker_unit_makes_its_user_and_gives_it_the_token_file():
    # The unit runs the worker as User=rc-worker; the token written by root
    # under umask 077 was root's alone: "cannot read --token-file:
    # Permission denied" at the first start.
    text = read("share/systemd/rc-worker.service")
    user = re.search(r"^User=(\S+)$", text, re.M).group(1)
    assert re.search(r"useradd .*\b%s$" % user, text, re.M)
    assert re.search(r"chown %s /opt/rc/token" % user, text)


def slow_call(seconds):
    import time
    time.sleep(seconds)
    return seconds


def test_an_executor_left_by_an_exception_names_every_task_that_goes_on(cluster_home, caplog):
    # Calls submitted close together go as one batch while the first is on
    # its way; left by an exception before that batch was answered, the
    # block named the first call's task alone, though the others were
    # queued too and ran (`goes on with task 1187`, then 1188 ran as well).
    from test_web import serve, stop
    from rc import client, db, state_dir
    config, _ = cluster_home
    config.health_supervisor = False
    server, thread = serve(config)
    try:
        url = "http://127.0.0.1:%d" % int(server.effective_port)
        try:
            with client.Executor(url, state_dir.read_secret(config.admin_token_path),
                                 pack=1) as executor:
                for _ in range(3):
                    executor.submit(slow_call, 300)
                raise RuntimeError("left")
        except RuntimeError:
            pass
        told = [r.getMessage() for r in caplog.records if r.name == "rc.client"]
        connection = db.connect(config.db_path)
        try:
            queued = [row[0] for row in connection.execute("SELECT task_id FROM tasks")]
        finally:
            connection.close()
        assert len(queued) == 3
        line = [line for line in told if "goes on with" in line][0]
        assert "tasks %s " % ", ".join(map(str, sorted(queued))) in line, line
    finally:
        stop(server, thread)


def test_configuration_md_names_everything_in_a_new_state_directory(cluster_home):
    config, _ = cluster_home
    text = read("docs/configuration.md")
    section = text[text.index("## Files in the state directory"):]
    section = section[:section.index("\n## ", 1)]
    made = sorted(os.listdir(config.home)) + ["files", "worker", "started_with.json"]
    for name in made:
        shown = name + "/" if os.path.isdir(os.path.join(config.home, name)) else name
        assert re.search(r"^- `(%s|%s[^`]*)`" % (re.escape(name), re.escape(shown)),
                         section, re.M), name
    assert "never overwritten; readable" not in section     # rc token --rotate does


def test_the_readme_gives_every_requirement_alias():
    text = read("README.md")
    paragraph = text[text.index("Requirements (`--require`, repeatable)"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    for alias, key in tasks.REQUIREMENT_ALIASES.items():
        assert re.search(r"`%s=[^`]*` \(`%s`\)" % (key, alias), paragraph), alias


def test_a_broadcasts_acks_say_ok_as_json_true_or_false(cluster_home):
    # /api/v1/controls/ID and `rc control ID --json` gave "ok": 1, where
    # every other flag of the JSON answers is true or false (records.md).
    import json
    from rc import db, fleet
    config, connection = cluster_home
    with db.write(connection):
        connection.execute("INSERT INTO controls (control_id, command, targets, created_at)"
                           " VALUES (1, 'reload', '{}', 0)")
        connection.execute("INSERT INTO control_acks (control_id, device_id, time, ok, detail)"
                           " VALUES (1, 'pi', 0, 1, 'done'), (1, 'pc', 0, 0, 'no')")
    acks = json.loads(json.dumps(fleet.control_status(connection, 1)))["acks"]
    assert [(a["device_id"], a["ok"]) for a in acks] == [("pc", False), ("pi", True)]
    assert [type(a["ok"]) for a in acks] == [bool, bool]


def test_each_with_every_fitting_device_drained_names_them(cluster_home, add_device):
    # `rc submit --each` on a fleet whose devices are drained said "no online
    # device accepts echo tasks", which sent people looking for another cause.
    import pytest
    from rc import fleet
    config, connection = cluster_home
    add_device("pi")
    fleet.drain(connection, config, "pi")
    with pytest.raises(fleet.FleetError) as refused:
        fleet.submit_each(connection, config, "echo", {"message": "hi"})
    assert "pi, drained: `rc resume pi`" in str(refused.value)


def test_a_main_node_started_after_a_night_off_gives_devices_time_before_alerting(
        cluster_home, add_device):
    # The reaper's first minute after `make run` alerted device_offline for
    # every device at once ("offline for 1178s"): the hours the main node
    # was stopped counted, though no device had had a moment to reconnect.
    from rc import alerts, db, devices
    config, connection = cluster_home
    config.alerts = [{"rule": "device_offline", "after": 900}]
    config.alert_command = ""
    add_device("pi", now=1000.0)
    with db.write(connection):
        connection.execute("UPDATE devices SET status = 'offline', connected = 0")
    assert devices.list_devices(connection, "offline")

    class Log:
        def warning(self, *a, **k):
            pass
        error = info = warning
    started = 1000.0 + 8 * 3600          # a night later
    assert alerts.evaluate(connection, config, Log(), started + 60, started) == []
    fired = alerts.evaluate(connection, config, Log(), started + 901, started)
    assert [a.subject for a in fired] == ["pi"]
    assert "offline for %ds" % (started + 901 - 1000) in fired[0].message


def test_a_device_id_given_in_another_case_is_pointed_at_the_right_one(
        cluster_home, add_device):
    import pytest
    from rc import devices, fleet
    config, connection = cluster_home
    add_device("pi-kitchen")
    with pytest.raises(fleet.FleetError) as refused:
        fleet.drain(connection, config, "Pi-Kitchen")
    assert str(refused.value) == "no device 'Pi-Kitchen' (did you mean pi-kitchen?)"
    assert devices.unknown(connection, "oven") == "no device 'oven'"
