"""Fixtures shared by the tests: a real cluster state directory, and a
directory tasks can write into."""
import os
import pathlib
import shutil
import tempfile

import pytest

from rc import config as config_module
from rc import db, devices, state_dir

SLOWEST_FILES = os.path.join(os.path.dirname(__file__), "slowest_files.txt")


def slowest_files_first():
    """{file name: its place}, from slowest_files.txt (slowest_files.py)."""
    with open(SLOWEST_FILES) as listing:
        names = [line.split()[0] for line in listing if line.strip() and line[0] != "#"]
    return {name: place for place, name in enumerate(names)}


def pytest_collection_modifyitems(config, items):
    """The longest test files start first (make test gives xdist
    --no-loadscope-reorder, which keeps this order): started last, a
    100 s file kept one process busy while the other two had ended."""
    place = slowest_files_first()
    items.sort(key=lambda item: place.get(item.path.name, len(place)))   # stable


@pytest.fixture
def cluster_home(tmp_path, monkeypatch):
    """A fresh RC_HOME made by state_dir.init; yields (config, connection)."""
    monkeypatch.setenv("RC_HOME", str(tmp_path / "var"))
    # No etc/rc.json from the checkout: the tests see the documented defaults.
    monkeypatch.setenv("RC_CONFIG", str(tmp_path / "no-such-rc.json"))
    config = config_module.load()
    state_dir.init(config)
    connection = db.connect(config.db_path)
    yield config, connection
    connection.close()


@pytest.fixture
def add_device(cluster_home):
    """Register a device as rc-server would; returns its id."""
    config, connection = cluster_home

    def add(device_id="pi", metrics=None, now=None, **specs):
        data = {"device_info": {"hostname": device_id, "platform": "linux",
                                "architecture": "aarch64"},
                "hardware_specs": dict({"cpu_cores": 4, "memory_gb": 3.8}, **specs),
                "task_types": ["echo", "python_eval"], "tags": ["kitchen"], "slots": 2,
                "role": "compute", "protocol": 1}
        with db.write(connection):
            devices.register(connection, device_id, data, "127.0.0.1:1", now or 1.0)
            if metrics is not None:
                devices.heartbeat(connection, device_id, metrics, now or 1.0)
        return device_id
    return add


@pytest.fixture
def drop_dir():
    """A directory a task can write into (pytest's tmp_path is not: run as
    root, the worker runs each task as a uid of its own)."""
    path = tempfile.mkdtemp(prefix="rc-test-drop-")
    os.chmod(path, 0o1777)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)
