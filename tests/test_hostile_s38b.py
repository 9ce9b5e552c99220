"""attack38b: the main node fed hostile rows through its own inputs. A
chain of dependencies deeper than SQLite's trigger depth (1,000), which
anyone with the admin token builds with a submit per link (or a pipeline
of a thousand steps does): the failure of its first task could not be
written, so that task could be neither cancelled, failed nor timed out.
Each test failed before the fix its docstring names."""
import pytest

from rc import config as config_module
from rc import db, tasks
from rc.states import CANCELLED, FAILED, QUEUED


@pytest.fixture
def store(tmp_path):
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    connection = db.open_database(config.db_path)
    yield config, connection
    connection.close()


def chain(connection, config, length):
    """length tasks, each depending on the one before, as that many
    submits queue them (in one transaction here, for speed); their ids."""
    ids = []
    with db.write(connection):
        for n in range(length):
            ids.append(tasks.insert(connection, tasks.check_task(
                config, "echo", {"message": str(n)}, depends_on=ids[-1:])))
    return ids


def test_the_first_task_of_a_chain_deeper_than_sqlites_trigger_depth_can_end(store):
    """Before migration 22 the cancel raised 'too many levels of trigger
    recursion' and the first task stayed queued (a failure of it from a
    device, or its timeout, was refused the same way: rolled back for ever).
    Every task behind it fails with it, naming it."""
    config, connection = store
    ids = chain(connection, config, 1500)
    assert tasks.cancel(connection, ids[0]) == CANCELLED
    states = dict(connection.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
    assert states == {CANCELLED: 1, FAILED: 1499}
    last = tasks.get(connection, ids[-1])
    assert last["reason"] == "dependency %d cancelled" % ids[0]


def test_a_failure_reaches_every_dependent_of_a_lattice_once(store):
    """Tasks that depend on many of the layer before (a lattice, paths
    without number) all fail with the task under them, and the ones beside
    it, which depend on nothing that failed, stay queued."""
    config, connection = store
    root = tasks.submit(connection, config, "echo", {"message": "root"})
    beside = tasks.submit(connection, config, "echo", {"message": "beside"})
    layer = [root, beside]
    dependents = []
    for depth in range(30):
        layer = [tasks.submit(connection, config, "echo", {"message": "%d" % depth},
                              depends_on=layer) for _ in range(3)]
        dependents += layer
    assert tasks.cancel(connection, root) == CANCELLED
    for task_id in dependents:
        assert tasks.get(connection, task_id)["state"] == FAILED
    assert tasks.get(connection, beside)["state"] == QUEUED
    events = connection.execute(
        "SELECT count(*) FROM task_events WHERE task_id IN (%s) AND state = 'failed'"
        % ",".join(map(str, dependents))).fetchone()[0]
    assert events == len(dependents)
