"""What the reaper does each minute (housekeeping.every_minute): the
history rows, alert rules with their cooldown and command, pruning finished
tasks, temporary files and the WAL; and `rc stats`."""
import io
import os
import time
from types import SimpleNamespace

import pytest

from rc import alerts, commands, db, fleet, health, housekeeping, map_cli, stats, tasks
from rc.log import Logger


class Lines(io.BytesIO):
    def records(self):
        import orjson
        return [orjson.loads(line) for line in self.getvalue().splitlines()]


def finish(connection, task_id, state, started, finished):
    with db.write(connection):
        connection.execute("UPDATE tasks SET state = 'running', device_id = 'pi', started_at = ?"
                           " WHERE task_id = ?", (started, task_id))
        connection.execute("UPDATE tasks SET state = ?, finished_at = ? WHERE task_id = ?",
                           (state, finished, task_id))


def test_history_counts_each_minute_and_stays_bounded(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi", metrics={}, now=time.time())
    now = time.time()
    ids = [tasks.submit(connection, config, "echo", {"message": str(n)}) for n in range(6)]
    for n, task_id in enumerate(ids[:4]):
        finish(connection, task_id, "completed" if n < 3 else "failed", now - 2, now - 1 + n * 0.1)
    later = now + 120 - (now + 120) % 60 + 30      # mid-minute: later + 1 closes no minute
    written = stats.record(connection, config, later)
    assert written == stats.CATCH_UP_MINUTES
    rows = stats.history(connection, 60, later)
    assert sum(r["submitted"] for r in rows) == 6
    assert sum(r["completed"] for r in rows) == 3 and sum(r["failed"] for r in rows) == 1
    timed = [r for r in rows if r["duration_mean"] is not None]
    assert timed and all(r["duration_mean"] > 0 for r in timed)
    assert rows[-1]["queue_length"] == 2 and rows[-1]["devices_online"] == 1
    assert stats.record(connection, config, later + 1) == 0      # nothing new closed
    summary = stats.summary(rows)
    assert summary["success_rate"] == 0.75 and summary["queue_length"] == 2
    config.stats_history = 30
    stats.record(connection, config, later + 60)
    assert connection.execute("SELECT count(*) FROM stats_minutes").fetchone()[0] <= 31

    out = io.StringIO()
    assert commands.run_command(["stats", "--minutes", "90"], out, io.StringIO(), config,
                           width=100) == 0
    text = out.getvalue()
    assert "completed/min" in text and "queue" in text and "success 75.0%" in text
    assert any(mark in text for mark in stats.SPARKS[1:])
    out = io.StringIO()
    commands.run_command(["history", "--csv"], out, io.StringIO(), config)
    assert out.getvalue().splitlines()[0] == ",".join(stats.COLUMNS)


def test_sparkline():
    assert stats.sparkline([0, 1, 2, None, 4], 10) == "▁▃▅ █"
    assert stats.sparkline([0, 0], 10) == "▁▁"
    assert len(stats.sparkline(range(100), 20)) == 20


def test_alerts_fire_once_per_cooldown_and_run_the_command(cluster_home, add_device, tmp_path):
    config, connection = cluster_home
    add_device("pi", now=1.0)          # last seen long ago
    with db.write(connection):         # as the reaper leaves it
        connection.execute("UPDATE devices SET status = 'offline', connected = 0")
    marker = tmp_path / "alert.txt"
    config.alert_command = 'echo "$RC_ALERT_RULE $RC_ALERT_DEVICE_ID $RC_ALERT_MESSAGE" >> %s' \
        % marker
    config.alerts = [{"rule": "device_offline", "after": 60}]
    log = Lines()
    logger = Logger("rc-reaper", "info", log)
    now = time.time()
    fired = alerts.evaluate(connection, config, logger, now)
    assert [a.key for a in fired] == ["device_offline:pi"]
    assert alerts.evaluate(connection, config, logger, now + 10) == []      # cooldown
    # The same outage fires once (test_long_lived_s32); heard from since, and
    # gone again, the device fires again, after the cooldown.
    assert alerts.evaluate(connection, config, logger, now + config.alert_cooldown + 1) == []
    with db.write(connection):
        connection.execute("UPDATE devices SET last_seen = ?", (now + 100,))
    assert len(alerts.evaluate(connection, config, logger,
                               now + config.alert_cooldown + 200)) == 1
    deadline = time.time() + 10
    while (not marker.exists() or len(marker.read_text().splitlines()) < 2) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert marker.read_text().splitlines()[0].startswith("device_offline pi device pi offline")
    assert [r["event"] for r in log.records()] == ["alert", "alert"]
    alerts.reap_children(time.time())


def test_failure_rate_and_queue_stuck_rules(cluster_home, add_device):
    config, connection = cluster_home
    now = time.time()
    add_device("pi", metrics={}, now=now)
    with db.write(connection):
        connection.execute("UPDATE devices SET status = 'online', connected = 1")
    config.alerts = [{"rule": "failure_rate", "above": 0.5, "min_tasks": 4},
                     {"rule": "queue_stuck"}]
    ids = [tasks.submit(connection, config, "echo", {"message": "x"}) for _ in range(5)]
    for n, task_id in enumerate(ids[:4]):
        finish(connection, task_id, "failed" if n else "completed", now - 5, now - 1)
    config.health_queue_stuck = 0.0
    fired = alerts.evaluate(connection, config, Logger("t", "info", io.BytesIO()), now + 1)
    assert sorted(a.rule for a in fired) == ["failure_rate", "queue_stuck"]
    assert "3 of 4 tasks failed" in [a for a in fired if a.rule == "failure_rate"][0].message


def test_a_task_is_stuck_only_for_the_time_a_device_could_have_taken_it(cluster_home, add_device):
    """A restored backup, or a main node back after a day: tasks queued long
    ago are not "stuck" until the device that connected just now has had
    health_queue_stuck to take them. Before, `make run` after a restore
    said "queue stuck: task 78 waited 1796635434s" and exited 1."""
    config, connection = cluster_home
    connected = time.time()
    add_device("pi", metrics={}, now=connected)
    task_id = tasks.submit(connection, config, "echo", {"message": "from the backup"})
    with db.write(connection):
        connection.execute("UPDATE devices SET status = 'online', connected = 1")
        connection.execute("UPDATE tasks SET created_at = 1000.0 WHERE task_id = ?", (task_id,))
        connection.execute("UPDATE task_events SET time = 1000.0 WHERE task_id = ?", (task_id,))
    config.health_queue_stuck = 600.0
    assert health.stuck_tasks(connection, config, connected + 599) == []
    [(stuck_id, waited, device_id)] = health.stuck_tasks(connection, config, connected + 601)
    assert (stuck_id, device_id) == (task_id, "pi") and waited == pytest.approx(601)


def test_bad_alert_rules_are_logged_not_fatal(cluster_home):
    config, connection = cluster_home
    config.alerts = [{"rule": "moon_phase"}]
    log = Lines()
    assert alerts.evaluate(connection, config, Logger("t", "info", log), time.time()) == []
    assert log.records()[0]["event"] == "alert_rules_invalid"


def test_finished_tasks_past_retention_are_pruned_with_their_events(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    now = time.time()
    old = [tasks.submit(connection, config, "echo", {"message": "old"}) for _ in range(3)]
    for task_id in old:
        finish(connection, task_id, "completed", now - 100, now - 90)
    recent = tasks.submit(connection, config, "echo", {"message": "new"})
    finish(connection, recent, "completed", now - 2, now - 1)
    waiting = tasks.submit(connection, config, "echo", {"message": "x"}, depends_on=[old[0]])
    queued = tasks.submit(connection, config, "echo", {"message": "q"})
    assert housekeeping.prune_tasks(connection, 60, now) == 3
    left = {row[0] for row in connection.execute("SELECT task_id FROM tasks")}
    assert left == {recent, waiting, queued}
    assert connection.execute("SELECT count(*) FROM task_events WHERE task_id IN (%s)"
                              % ",".join(map(str, old))).fetchone()[0] == 0
    assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    assert housekeeping.prune_tasks(connection, 0, now + 10 ** 9) == 0    # 0: keep for ever


def test_pruning_the_newest_events_gives_their_ids_to_none(cluster_home, add_device):
    """An idle cluster whose every task is past retention: the next event's
    id is past every id a reader (a result stream, rc map) has seen, not one
    of the pruned ones again."""
    config, connection = cluster_home
    add_device("pi")
    now = time.time()
    old = [tasks.submit(connection, config, "echo", {"message": "old"}) for _ in range(3)]
    for task_id in old:
        finish(connection, task_id, "completed", now - 100, now - 90)
    seen = connection.execute("SELECT max(id) FROM task_events").fetchone()[0]
    assert housekeeping.prune_tasks(connection, 60, now) == 3
    tasks.submit(connection, config, "echo", {"message": "next"})
    assert connection.execute("SELECT min(id) FROM task_events").fetchone()[0] > seen


def a_map(connection, config, inputs, queued=True):
    """A map as `rc map` records it (map_cli.create_group), with an echo
    task per input unless it stopped before queueing any."""
    jobs = [SimpleNamespace(number=n, value=v, blob=None) for n, v in enumerate(inputs, 1)]
    group_id = map_cli.create_group(connection, SimpleNamespace(
        task_type="echo", shared={}, template=SimpleNamespace(text="{}"), outputs=[],
        requirements={}, options={}, total=len(inputs), into=None, to_run=jobs))
    for job in jobs if queued else ():
        task_id = tasks.submit(connection, config, "echo", {"message": job.value},
                               group_id=group_id)
        with db.write(connection):
            connection.execute("UPDATE map_jobs SET task_id = ? WHERE group_id = ? AND job = ?",
                               (task_id, group_id, job.number))
    return group_id


def group_tasks(connection, group_id):
    return [row[0] for row in connection.execute(
        "SELECT task_id FROM tasks WHERE group_id = ? ORDER BY task_id", (group_id,))]


def test_groups_and_maps_left_without_a_task_are_pruned_after_them(cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    config.task_retention, now = 60, time.time()
    gone = a_map(connection, config, ["a", "b"])            # every task past retention
    kept = a_map(connection, config, ["c", "d"])            # one task ended just now
    stopped = a_map(connection, config, ["e"], queued=False)     # Ctrl-C before any task
    each = fleet.submit_each(connection, config, "echo", {"message": "f"})
    joining = fleet.submit_each(connection, config, "echo", {"message": "g"}, include_new=True)
    old = [gone, kept, stopped, each, joining]
    with db.write(connection):
        connection.execute("UPDATE task_groups SET created_at = ? WHERE group_id IN (%s)"
                           % ",".join(map(str, old)), (now - 100,))
    fresh = a_map(connection, config, ["h"], queued=False)  # rc map writing it now
    recent = group_tasks(connection, kept)[1]
    for group_id in (gone, kept, each, joining):
        for task_id in group_tasks(connection, group_id):
            ended = now - 1 if task_id == recent else now - 90
            finish(connection, task_id, "completed", ended - 1, ended)
    done = housekeeping.sweep(connection, config, Logger("t", "info", Lines()), now)
    assert (done["tasks_pruned"], done["groups_pruned"]) == (5, 3)
    groups = {row[0] for row in connection.execute("SELECT group_id FROM task_groups")}
    assert groups == {kept, joining, fresh}         # joining: devices that join get one
    assert {row[0] for row in connection.execute("SELECT group_id FROM maps")} == {kept, fresh}
    assert {row[0] for row in connection.execute("SELECT group_id FROM map_jobs")} == \
        {kept, fresh}
    assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    assert housekeeping.prune_groups(connection, 0, now + 10 ** 9) == 0   # 0: keep for ever
    assert housekeeping.prune_groups(connection, 60, now + 10 ** 9) == 1  # fresh, in time


def test_the_wal_is_truncated_past_its_limit(cluster_home):
    config, connection = cluster_home
    with db.write(connection):
        for n in range(2000):
            connection.execute("INSERT INTO counters(name, value) VALUES (?, 1)", ("c%d" % n,))
    size = os.path.getsize(config.db_path + "-wal")
    assert size > 10000
    assert housekeeping.checkpoint(connection, size + 1)["wal_checkpointed"] is False
    done = housekeeping.checkpoint(connection, 1000)
    assert done["wal_checkpointed"] and done["wal_bytes"] == 0


def test_old_temporary_files_are_removed(cluster_home):
    config, _ = cluster_home
    os.makedirs(os.path.join(config.home, "tmp"), exist_ok=True)
    old, new = (os.path.join(config.home, "tmp", name) for name in ("old", "new"))
    for path in (old, new, os.path.join(config.home, "token.new")):
        open(path, "w").close()
    os.utime(old, (1, 1))
    os.utime(os.path.join(config.home, "token.new"), (1, 1))
    assert housekeeping.clean_temp(config.home, 3600, time.time()) == 2
    assert os.path.exists(new) and not os.path.exists(old)


def test_every_minute_survives_a_broken_step(cluster_home, monkeypatch):
    config, connection = cluster_home
    log = Lines()
    monkeypatch.setattr(stats, "record", lambda *a: 1 / 0)
    housekeeping.every_minute(connection, config, Logger("rc-reaper", "info", log), time.time())
    assert [r["event"] for r in log.records()] == ["upkeep_failed"]
    assert not connection.in_transaction
