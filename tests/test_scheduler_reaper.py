"""rc-scheduler's choices and rc-reaper's sweeps, one pass at a time."""
import io
import os

import pytest

from rc import config as config_module
from rc import db, devices, explain, reaper, scheduler, tasks
from rc.log import Logger
from rc.states import ASSIGNED, QUEUED

LOG = Logger("test", "error", io.BytesIO())


@pytest.fixture
def store(tmp_path):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    yield config, connection
    connection.close()


def add_device(connection, device_id, slots=1, cores=2, types=("echo", "shell"), tags=()):
    data = {"device_info": {"platform": "linux", "architecture": "x86_64"},
            "hardware_specs": {"cpu_cores": cores, "memory_gb": 4.0},
            "task_types": list(types), "tags": list(tags), "slots": slots, "role": "compute"}
    with db.write(connection):
        devices.register(connection, device_id, data, "127.0.0.1:1", 1000.0)


def placement(connection):
    return {row["task_id"]: (row["state"], row["device_id"])
            for row in connection.execute("SELECT task_id, state, device_id FROM tasks")}


def test_priority_then_age_decides_who_runs_first(store):
    config, connection = store
    add_device(connection, "a", slots=2)
    low = tasks.submit(connection, config, "shell", {"command": "1"}, priority="low")
    normal = tasks.submit(connection, config, "shell", {"command": "2"})
    urgent = tasks.submit(connection, config, "shell", {"command": "3"}, priority="urgent")
    later_normal = tasks.submit(connection, config, "shell", {"command": "4"})
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 2
    state = placement(connection)
    assert state[urgent][0] == state[normal][0] == ASSIGNED
    assert state[low][0] == state[later_normal][0] == QUEUED


def test_a_pass_writes_its_lines_in_one_write(store):
    config, connection = store
    add_device(connection, "a", slots=3)
    for n in range(3):
        tasks.submit(connection, config, "shell", {"command": str(n)})

    class Writes(list):
        write, flush = list.append, lambda self: None
    writes = Writes()
    assert scheduler.schedule(connection, 2000.0, Logger("rc-scheduler", "info", writes),
                              config) == 3
    assert len(writes) == 1 and writes[0].count(b"task_assigned") == 3


def test_a_task_that_fits_nowhere_does_not_hold_up_others(store):
    config, connection = store
    add_device(connection, "small", slots=4, cores=2)
    big = tasks.submit(connection, config, "echo", {"message": "x"}, priority="urgent",
                       requirements={"min_cpu_cores": 16})
    wrong_type = tasks.submit(connection, config, "python_eval", {"expression": "1"})
    fits = tasks.submit(connection, config, "echo", {"message": "y"})
    scheduler.schedule(connection, 2000.0, LOG, config)
    state = placement(connection)
    assert state[big] == (QUEUED, None)
    assert state[wrong_type] == (QUEUED, None)
    assert state[fits] == (ASSIGNED, "small")


def test_requirements_pick_the_device(store):
    config, connection = store
    add_device(connection, "plain", slots=4)
    add_device(connection, "tagged", slots=1, tags=["gpu"])
    named = tasks.submit(connection, config, "echo", {"message": "n"},
                         requirements={"device_id": "plain"})
    gpu = tasks.submit(connection, config, "echo", {"message": "g"},
                       requirements={"tags": ["gpu"]})
    scheduler.schedule(connection, 2000.0, LOG, config)
    state = placement(connection)
    assert state[named] == (ASSIGNED, "plain")
    assert state[gpu] == (ASSIGNED, "tagged")


def test_slots_are_respected_and_disconnected_devices_get_nothing(store):
    config, connection = store
    add_device(connection, "one", slots=1)
    add_device(connection, "gone", slots=5)
    with db.write(connection):
        devices.disconnected(connection, "gone", 1001.0)
    for n in range(3):
        tasks.submit(connection, config, "shell", {"command": str(n)})
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 1
    assert sorted(placement(connection).values(), key=str) == [
        (ASSIGNED, "one"), (QUEUED, None), (QUEUED, None)]


def test_instant_tasks_need_no_free_slot(store):
    config, connection = store
    add_device(connection, "one", slots=1)
    long = tasks.submit(connection, config, "shell", {"command": "sleep 100"})
    room = config.instant_per_slot         # instant tasks in flight on a 1-slot device
    quick = [tasks.submit(connection, config, "echo", {"message": str(n)})
             for n in range(room + 2)]
    assert scheduler.schedule(connection, 2000.0, LOG, config) == room + 1
    state = placement(connection)
    assert state[long] == (ASSIGNED, "one")
    assert [state[t][0] for t in quick].count(ASSIGNED) == room


def test_backoff_delays_a_retry(store):
    config, connection = store
    add_device(connection, "a", slots=1)
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    with db.write(connection):
        connection.execute("UPDATE tasks SET not_before = 5000")
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 0
    assert scheduler.next_backoff_end(connection, 2000.0) == 5000
    assert scheduler.schedule(connection, 5000.0, LOG, config) == 1
    assert placement(connection)[task_id][0] == ASSIGNED


def test_a_device_gone_past_the_grace_has_its_tasks_requeued(store):
    config, connection = store
    add_device(connection, "a", slots=2)
    first = tasks.submit(connection, config, "echo", {"message": "x"})
    scheduler.schedule(connection, 1000.0, LOG, config)
    with db.write(connection):
        tasks.accept(connection, first, 1, "a", 1000.0, 180.0)
        devices.disconnected(connection, "a", 1001.0)
    reaper.sweep(connection, config, LOG, 1001.0 + config.disconnect_grace - 1)
    assert tasks.get(connection, first)["state"] == "running"
    reaper.sweep(connection, config, LOG, 1001.0 + config.disconnect_grace + 1)
    task = tasks.get(connection, first)
    assert (task["state"], task["attempt"]) == (QUEUED, 2)
    assert devices.get(connection, "a")["status"] == "offline"


def test_silent_device_goes_offline_after_the_timeout(store):
    config, connection = store
    add_device(connection, "quiet")
    reaper.sweep(connection, config, LOG, 1000.0 + config.offline_timeout + 1)
    assert devices.get(connection, "quiet")["status"] == "offline"


def test_unaccepted_assignment_is_taken_back(store):
    config, connection = store
    add_device(connection, "a")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    scheduler.schedule(connection, 1000.0, LOG, config)
    reaper.sweep(connection, config, LOG, 1000.0 + config.accept_timeout + 1)
    assert tasks.get(connection, task_id)["attempt"] == 2


def test_timeout_backstop_fails_a_task_its_device_never_reports(store):
    config, connection = store
    add_device(connection, "a")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"}, timeout=10)
    scheduler.schedule(connection, 1000.0, LOG, config)
    with db.write(connection):
        tasks.accept(connection, task_id, 1, "a", 1000.0, 180.0)
        devices.heartbeat(connection, "a", {}, 1000.0 + 10 + config.timeout_grace + 1)
    reaper.sweep(connection, config, LOG, 1000.0 + 10 + config.timeout_grace + 1)
    assert tasks.get(connection, task_id)["state"] == "timed_out"


def test_an_expired_lease_is_taken_back_and_charged(store):
    config, connection = store
    add_device(connection, "frozen")
    task_id = tasks.submit(connection, config, "echo", {"message": "x"})
    scheduler.schedule(connection, 1000.0, LOG, config)
    with db.write(connection):
        tasks.accept(connection, task_id, 1, "frozen", 1000.0, 30.0)
        devices.heartbeat(connection, "frozen", {}, 1029.0)
        tasks.renew_leases(connection, "frozen", {(task_id, 1)}, 1029.0 + 30.0)
    reaper.sweep(connection, config, LOG, 1050.0)
    assert tasks.get(connection, task_id)["state"] == "running"
    reaper.sweep(connection, config, LOG, 1060.0)
    task = tasks.get(connection, task_id)
    assert (task["state"], task["attempt"], task["retries_used"]) == (QUEUED, 2, 1)


def test_the_reaper_checkpoints_and_the_programs_on_a_tasks_way_do_not(store):
    """A program's commits leave the write-ahead log to rc-reaper (past
    SQLite's own 1000 pages, the database file is untouched); the reaper's
    look copies it and starts the log over itself (the log then holds its
    one write, not thousands of frames), so the program's next commit does
    not have to; a look with no commit since does nothing."""
    config, connection = store
    program, reaper_connection = db.connect(config.db_path), db.connect(config.db_path)
    keeper = reaper.WalKeeper(reaper_connection)
    keeper.look()
    program.execute("CREATE TABLE filler (data BLOB)")
    size = os.path.getsize(config.db_path)
    for _ in range(1200):
        program.execute("INSERT INTO filler VALUES (zeroblob(3000))")
    assert os.path.getsize(config.db_path) == size
    frames, copied = keeper.look()
    assert frames == copied > 1200 and os.path.getsize(config.db_path) > size + 1200 * 3000
    _, frames, _ = program.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames <= 2, "the log was not started over"
    assert keeper.look() is None
    program.close()
    reaper_connection.close()


def test_dependencies_hold_a_task_until_they_complete(store):
    config, connection = store
    add_device(connection, "a", slots=4)
    first = tasks.submit(connection, config, "echo", {"message": "1"})
    second = tasks.submit(connection, config, "echo", {"message": "2"}, depends_on=[first])
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 1
    assert "waits for task %d (assigned)" % first in explain.why(connection, second)
    with db.write(connection):
        tasks.accept(connection, first, 1, "a", 2000.0, 180.0)
        tasks.finish(connection, first, 1, "a", "completed", {}, None, "completed", 2001.0)
    assert scheduler.schedule(connection, 2002.0, LOG, config) == 1
    assert placement(connection)[second] == (ASSIGNED, "a")


def complete(connection, task_id, device_id, now):
    with db.write(connection):
        tasks.accept(connection, task_id, 1, device_id, now, 180.0)
        tasks.finish(connection, task_id, 1, device_id, "completed", {}, None, "completed",
                     now + 1)


def test_a_task_waits_until_every_task_it_depends_on_has_completed(store):
    """The count of unmet dependencies (migration 23) goes down one per
    completion; a dependency completed before the submit is met at once."""
    config, connection = store
    add_device(connection, "a", slots=4)
    first = tasks.submit(connection, config, "echo", {"message": "1"})
    second = tasks.submit(connection, config, "echo", {"message": "2"})
    both = tasks.submit(connection, config, "echo", {"message": "3"}, depends_on=[first, second])
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 2
    complete(connection, first, "a", 2000.0)
    assert scheduler.schedule(connection, 2002.0, LOG, config) == 0
    assert placement(connection)[both] == (QUEUED, None)
    after_first = tasks.submit(connection, config, "echo", {"message": "4"}, depends_on=[first])
    complete(connection, second, "a", 2003.0)
    assert scheduler.schedule(connection, 2005.0, LOG, config) == 2
    assert placement(connection)[both] == placement(connection)[after_first] == (ASSIGNED, "a")


def test_tasks_behind_a_gate_cost_a_pass_nothing(store):
    """5,000 tasks waiting for one running task, queued ahead of a task that
    waits for nothing: the pass that assigns it reads about as much of the
    database as with none waiting. The scheduler checked each queued task's
    dependencies as it walked the queue: every pass (one per submit and
    per result) read all of them, 0.33-0.58 s at 100,000."""
    config, connection = store
    add_device(connection, "a", slots=4)
    gate = tasks.submit(connection, config, "echo", {"message": "gate"})
    assert scheduler.schedule(connection, 2000.0, LOG, config) == 1

    def steps_of_a_pass(now):
        steps = [0]

        def count():
            steps[0] += 1
        connection.set_progress_handler(count, 100)     # one call per 100 SQLite VM steps
        try:
            assert scheduler.schedule(connection, now, LOG, config) == 1
        finally:
            connection.set_progress_handler(None, 100)
        return steps[0]

    tasks.submit(connection, config, "echo", {"message": "free"})
    alone = steps_of_a_pass(2001.0)
    task = tasks.check_task(config, "echo", {"message": "behind"}, {}, depends_on=[gate])
    with db.write(connection):
        for _ in range(5000):
            tasks.insert(connection, task)
    free = tasks.submit(connection, config, "echo", {"message": "free"})
    behind = steps_of_a_pass(2002.0)
    assert placement(connection)[free] == (ASSIGNED, "a")
    assert behind < 2 * alone + 50, (alone, behind)


def test_a_batch_spreads_over_devices_and_prefers_idle_cpus(store):
    config, connection = store
    for name, cpu in (("busy", 95.0), ("idle", 5.0)):
        add_device(connection, name, slots=2)
        with db.write(connection):
            devices.heartbeat(connection, name, {"cpu_percent": cpu}, 1500.0)
    ids = [tasks.submit(connection, config, "echo", {"message": str(n)}) for n in range(3)]
    scheduler.schedule(connection, 2000.0, LOG, config)
    state = placement(connection)
    assert [state[i][1] for i in ids] == ["idle", "busy", "idle"]


def test_why_names_the_requirement_no_device_meets(store):
    config, connection = store
    add_device(connection, "a", cores=8)
    add_device(connection, "b", cores=4)
    task_id = tasks.submit(connection, config, "echo", {"message": "x"},
                           requirements={"min_cpu_cores": 64})
    text = explain.why(connection, task_id, 2000.0)
    assert "none of the 2 online devices fits" in text and "needs 64 CPU cores" in text


def test_why_says_full_and_backing_off(store):
    config, connection = store
    add_device(connection, "a", slots=1)
    running = tasks.submit(connection, config, "shell", {"command": "x"})
    waiting = tasks.submit(connection, config, "shell", {"command": "y"})
    scheduler.schedule(connection, 2000.0, LOG, config)
    assert "all their slots are busy" in explain.why(connection, waiting, 2000.0)
    assert "assigned to a" in explain.why(connection, running, 2000.0)
    with db.write(connection):
        connection.execute("UPDATE tasks SET not_before = 2100 WHERE task_id = ?", (waiting,))
    assert "backing off" in explain.why(connection, waiting, 2000.0)


def start_and_finish(connection, device_id, started, finish_one_at):
    """Accept every task assigned to the device at `started`; finish the first."""
    with db.write(connection):
        rows = connection.execute("SELECT task_id, attempt FROM tasks WHERE device_id = ?"
                                  " AND state = ? ORDER BY task_id", (device_id, ASSIGNED)).fetchall()
        for row in rows:
            tasks.accept(connection, row["task_id"], row["attempt"], device_id, started, 180.0)
        tasks.finish(connection, rows[0]["task_id"], rows[0]["attempt"], device_id,
                     "completed", {}, None, "completed", finish_one_at)


def held_by(connection, device_id):
    return connection.execute("SELECT count(*) FROM tasks WHERE device_id = ? AND state IN"
                              " ('assigned', 'running')", (device_id,)).fetchone()[0]


def first_pass_on_a_two_slot_device(connection, config, device_id):
    """A device with 2 slots, 10 shell tasks queued, and the first pass at 2000."""
    add_device(connection, device_id, slots=2)
    for n in range(10):
        tasks.submit(connection, config, "shell", {"command": str(n)})
    turnover = scheduler.Turnover()
    assert scheduler.schedule(connection, 2000.0, LOG, config, turnover) == 2
    return turnover


def test_a_device_that_finishes_tasks_quickly_gets_some_beyond_its_slots(store):
    config, connection = store
    turnover = first_pass_on_a_two_slot_device(connection, config, "quick")
    start_and_finish(connection, "quick", 2000.0, 2000.1)
    # One slot free, and 2 x prefetch_per_slot more to wait on the device.
    assert config.prefetch_per_slot == 2
    assert scheduler.schedule(connection, 2000.2, LOG, config, turnover) == 5
    assert held_by(connection, "quick") == 6
    # Nothing finished since: nothing more, however quick it was.
    assert scheduler.schedule(connection, 2000.3, LOG, config, turnover) == 0


def test_a_result_waits_for_the_next_ones_only_while_every_quick_device_has_one_queued(
        store):
    """The room bell alone, with every quick device holding a task beyond its
    slots: its freed slot has one to start, so the pass may wait ROOM_GATHER
    and refill several results' room at once. Not for a submit, nor when a
    quick device has nothing queued, nor with nothing waiting."""
    config, connection = store
    turnover = first_pass_on_a_two_slot_device(connection, config, "quick")
    assert not turnover.buffered        # not known to be quick yet: nothing prefetched
    start_and_finish(connection, "quick", 2000.0, 2000.1)
    assert scheduler.schedule(connection, 2000.2, LOG, config, turnover) == 5
    assert turnover.buffered            # 2 running, 4 queued on the device
    room, doorbell = object(), object()
    state = {"room_bell": room, "waiting": True, "turnover": turnover}
    assert scheduler.gathers([room], state)
    assert not scheduler.gathers([doorbell], state) and not scheduler.gathers(
        [doorbell, room], state) and not scheduler.gathers([], state)
    assert not scheduler.gathers([room], dict(state, waiting=False))
    # A quick device with nothing beyond its slots: a freed slot would idle.
    def device(held, prefetch, device_id="d"):
        return {"device_id": device_id, "held": held, "slots": 2, "prefetch": prefetch}
    for devices_after_a_pass, buffered in (
            ([device(3, 2)], True), ([device(2, 2)], False),
            ([device(3, 2), device(1, 0, "long")], True),      # long tasks: no matter
            ([device(3, 2), device(2, 2, "other")], False),
            ([device(1, 0)], False)):                           # none quick: no gain
        turnover.remember(devices_after_a_pass)
        assert turnover.buffered == buffered, devices_after_a_pass


def test_a_device_busy_with_long_tasks_gets_nothing_beyond_its_slots(store):
    config, connection = store
    turnover = first_pass_on_a_two_slot_device(connection, config, "slow")
    # One finished, but the other has run for longer than PREFETCH_WINDOW.
    start_and_finish(connection, "slow", 2000.0, 2000.0 + scheduler.PREFETCH_WINDOW + 1)
    assert scheduler.schedule(connection, 2000.0 + scheduler.PREFETCH_WINDOW + 1, LOG,
                              config, turnover) == 1
    assert held_by(connection, "slow") == 2


def test_no_prefetch_without_a_setting_or_while_a_slot_elsewhere_is_idle(store):
    config, connection = store
    config.prefetch_per_slot = 1
    turnover = first_pass_on_a_two_slot_device(connection, config, "quick")
    start_and_finish(connection, "quick", 2000.0, 2000.1)
    add_device(connection, "idle", slots=1)
    # quick: 1 free slot + 2 to prefetch; idle: 1 free slot, which must be used.
    assert scheduler.schedule(connection, 2000.2, LOG, config, turnover) == 4
    assert (held_by(connection, "quick"), held_by(connection, "idle")) == (4, 1)

    config.prefetch_per_slot = 0
    start_and_finish(connection, "quick", 2000.3, 2000.3)
    assert scheduler.schedule(connection, 2000.3, LOG, config, turnover) == 0
    assert held_by(connection, "quick") == 3


def test_a_pass_reads_the_queue_batch_after_batch(store, monkeypatch):
    config, connection = store
    monkeypatch.setattr(scheduler, "BATCH", 3)
    add_device(connection, "big", slots=10)
    for n in range(5):
        tasks.submit(connection, config, "shell", {"command": str(n)})
    assert scheduler.assign_ready(connection, 2000.0, LOG, config, None) == (5, False)
    assert held_by(connection, "big") == 5


def test_a_pass_that_runs_out_of_time_says_so_and_the_next_goes_on(store, monkeypatch):
    """The scheduler passes again at once only after a pass that stopped
    short of the queue (its time ran out); that pass reads the head, then
    goes on where the last one stopped."""
    config, connection = store
    monkeypatch.setattr(scheduler, "BATCH", 2)
    add_device(connection, "big", slots=10)
    nowhere = [tasks.submit(connection, config, "shell", {"command": str(n)},
                            requirements={"device_id": "nobody"}) for n in range(6)]
    fits = tasks.submit(connection, config, "shell", {"command": "fits"})
    clock = iter(range(1000))        # each look at the time 0.03 s later
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: next(clock) * 0.03)
    cursor = scheduler.QueueCursor()
    # 0.1 s a pass: 3 looks, so a pass reads 2 rows and is cut at the third.
    assert scheduler.assign_ready(connection, 2000.0, LOG, config, None, cursor=cursor) \
        == (0, True)
    assert cursor.after is not None and cursor.after[1] in nowhere[:3]
    passes = 1
    while placement(connection)[fits][0] != ASSIGNED:
        scheduler.assign_ready(connection, 2000.0, LOG, config, None, cursor=cursor)
        passes += 1
        assert passes < 10, "the task behind those that fit nowhere was never reached"


def test_thousands_that_fit_nowhere_do_not_hide_the_task_behind_them(store):
    config, connection = store
    add_device(connection, "one", slots=1)
    specs = [{"task_type": "echo", "payload": {"message": "x"},
              "requirements": {"device_id": "nobody"}}] * (scheduler.BATCH + 100)
    tasks.submit_many(connection, config, [dict(spec) for spec in specs])
    behind = tasks.submit(connection, config, "echo", {"message": "behind"})
    scheduler.schedule(connection, 2000.0, LOG, config)
    assert placement(connection)[behind] == (ASSIGNED, "one")
