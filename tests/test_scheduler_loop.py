"""rc-scheduler's loop on a real database, in a thread: which doorbell wakes
it, and when it listens for freed room."""
import io
import os
import threading
import time

import pytest

from cluster_harness import wait_for
from rc import bell, db, devices, scheduler, tasks
from rc import config as config_module
from rc.log import Logger
from rc.states import ASSIGNED, COMPLETED, QUEUED


@pytest.fixture
def loop(tmp_path, monkeypatch):
    """The scheduler's run() with every timed look pushed out of the way:
    only a doorbell makes it pass."""
    monkeypatch.setattr(scheduler, "IDLE_CHECK", 3600.0)
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.poll_interval, config.prefetch_per_slot = 3600.0, 0
    connection = db.open_database(config.db_path)
    data = {"device_info": {"platform": "linux"}, "hardware_specs": {"cpu_cores": 2},
            "task_types": ["shell"], "slots": 1}
    with db.write(connection):
        devices.register(connection, "one-slot", data, "127.0.0.1:1", time.time())
    stop = []
    thread = threading.Thread(target=scheduler.run,
                              args=(config, Logger("rc-scheduler", "error", io.BytesIO()),
                                    lambda: bool(stop)))
    thread.start()
    wait_for(lambda: os.path.exists(bell.path(config.run_dir, bell.SCHEDULER)), 5, "its bell")
    yield config, connection
    stop.append(True)
    bell.ring(config.run_dir, bell.SCHEDULER)
    thread.join(10)
    connection.close()


def submitted(config, connection):
    task_id = tasks.submit(connection, config, "shell", {"command": "true"})   # rings
    return task_id


def state_of(connection, task_id):
    return tasks.get(connection, task_id)["state"]


def finish(connection, task_id, device_id="one-slot"):
    """Play rc-server taking the task's result."""
    with db.write(connection):
        assert tasks.finish(connection, task_id, 1, device_id, COMPLETED, {}, None,
                            "completed", time.time())


def test_room_is_listened_for_only_while_tasks_wait_for_it(loop):
    config, connection = loop
    room = bell.path(config.run_dir, bell.SCHEDULER_ROOM)
    first = submitted(config, connection)
    wait_for(lambda: state_of(connection, first) == ASSIGNED, 5, "the first task assigned")
    # Nothing waits: a result rings nobody (rc-server's ring fails quietly).
    assert not os.path.exists(room)
    second = submitted(config, connection)
    wait_for(lambda: os.path.exists(room), 5, "the room bell, with the second task waiting")
    assert state_of(connection, second) == QUEUED
    finish(connection, first)
    bell.ring(config.run_dir, bell.SCHEDULER_ROOM)
    # No timed look would come for an hour: the ring alone gives the slot on.
    wait_for(lambda: state_of(connection, second) == ASSIGNED, 5, "the second task assigned")
    wait_for(lambda: not os.path.exists(room), 5, "the room bell closed, nothing waiting")


def test_a_slot_freed_between_the_pass_and_the_room_bell_is_not_missed(loop, monkeypatch):
    """The pass that leaves a task waiting reads the devices, then binds the
    room bell: a result committed in between rang nobody. The look right
    after binding sees its commit in data_version."""
    config, connection = loop
    first = submitted(config, connection)
    wait_for(lambda: state_of(connection, first) == ASSIGNED, 5, "the first task assigned")
    real_pass = scheduler.assign_ready

    def pass_then_result(*args, **kwargs):
        outcome = real_pass(*args, **kwargs)
        other = db.connect(config.db_path)       # rc-server's, in the scheduler's thread
        if state_of(other, first) == ASSIGNED:
            finish(other, first)                 # and no ring: nobody listens yet
        other.close()
        return outcome
    monkeypatch.setattr(scheduler, "assign_ready", pass_then_result)
    second = submitted(config, connection)
    wait_for(lambda: state_of(connection, second) == ASSIGNED, 5, "the second task assigned")


def test_a_task_waiting_for_another_goes_when_that_one_s_result_rings(loop):
    """Room to spare, but the second task depends on the first: what frees
    it is the first one's result, which rings the room bell only."""
    config, connection = loop
    data = {"device_info": {"platform": "linux"}, "hardware_specs": {"cpu_cores": 2},
            "task_types": ["shell"], "slots": 1}
    with db.write(connection):
        devices.register(connection, "another", data, "127.0.0.1:2", time.time())
    first = tasks.submit(connection, config, "shell", {"command": "true"})
    second = tasks.submit(connection, config, "shell", {"command": "true"},
                          depends_on=[first])
    wait_for(lambda: state_of(connection, first) == ASSIGNED, 5, "the first task assigned")
    wait_for(lambda: os.path.exists(bell.path(config.run_dir, bell.SCHEDULER_ROOM)), 5,
             "the room bell, with the second task waiting")
    finish(connection, first, tasks.get(connection, first)["device_id"])
    bell.ring(config.run_dir, bell.SCHEDULER_ROOM)
    wait_for(lambda: state_of(connection, second) == ASSIGNED, 5, "the second task assigned")


def test_wait_any_wakes_on_either_bell_and_swallows_its_rings(tmp_path):
    run_dir = str(tmp_path)
    work, room = bell.Bell(run_dir, bell.SCHEDULER), bell.Bell(run_dir, bell.SCHEDULER_ROOM)
    threading.Timer(0.05, bell.ring, (run_dir, bell.SCHEDULER_ROOM)).start()
    assert bell.wait_any([work, room], 5.0)
    assert not bell.wait_any([work, room], 0.01)
    bell.ring(run_dir, bell.SCHEDULER)
    assert bell.wait_any([work, room], 5.0)
    work.close()
    room.close()


def test_every_bell_binds_in_a_run_directory_as_deep_as_the_scheduler_s_allows(tmp_path):
    """A socket's path holds at most 107 bytes. The room bell's first name
    was longer than rc-scheduler's own, and in such a run directory it
    crashed rc-scheduler at its first wait for room (tasks then went out
    once per restart)."""
    run_dir = str(tmp_path / "r")
    run_dir += "x" * (106 - len(bell.path("", bell.SCHEDULER)) - len(run_dir))
    assert len(bell.path(run_dir, bell.SCHEDULER)) == 107
    for name in (bell.SCHEDULER, bell.SCHEDULER_ROOM, bell.SERVER, bell.WEB):
        bell.Bell(run_dir, name).close()


def test_a_room_bell_that_cannot_bind_leaves_the_scheduler_polling(tmp_path, monkeypatch):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})

    def refused(run_dir, name):
        raise OSError("AF_UNIX path too long")
    monkeypatch.setattr(bell, "Bell", refused)
    said = []
    state = {"waiting": True, "room_bell": None, "rung": False}
    assert scheduler.listen_for_room(config, state, lambda *line, **fields: said.append(
        (line, fields))) is False
    assert state["room_bell"] is None and not state["rung"]
    assert said[0][0][:2] == ("error", "room_bell_failed") and "too long" in said[0][1]["error"]
