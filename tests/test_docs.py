"""The docs cover what exists: every setting in docs/configuration.md, every
`rc` command in docs/cli.md, every operations doc that the README points to."""
import io
import os
import re

import pytest

from rc import commands
from rc.defaults import DEFAULTS

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_setting_is_in_configuration_md(key):
    assert re.search(r"^\| `%s` \|" % re.escape(key), read("configuration.md"), re.M), \
        "docs/configuration.md has no table row for %s" % key


def command_names():
    return sorted(commands.command_parsers(commands.build_parser(io.StringIO())))


@pytest.mark.parametrize("name", command_names())
def test_every_command_is_in_cli_md(name):
    assert re.search(r"^\| `rc %s[ `]" % re.escape(name), read("cli.md"), re.M), \
        "docs/cli.md has no table row for `rc %s`" % name


def test_every_option_of_logs_and_health_is_documented():
    text = read("cli.md")
    for option in ("--task", "--device", "--level", "-f", "--program", "-v", "--json"):
        assert option in text


@pytest.mark.parametrize("name", ["architecture.md", "protocol.md", "configuration.md",
                                  "http.md", "cli.md", "operations.md", "troubleshooting.md",
                                  "records.md"])
def test_the_docs_exist_and_are_linked_from_somewhere(name):
    assert read(name).startswith("# ")
    linked = read("architecture.md") + open(os.path.join(os.path.dirname(DOCS),
                                                         "README.md")).read()
    assert name in linked


def test_the_deployment_files_say_what_the_docs_promise():
    root = os.path.dirname(DOCS)
    with open(os.path.join(root, "Dockerfile")) as f:
        dockerfile = f.read()
    assert "\nUSER rc\n" in dockerfile and "EXPOSE 8080 5000" in dockerfile
    assert "VOLUME" in dockerfile and "HEALTHCHECK" in dockerfile and "rc.cli health" in dockerfile
    assert "supervisord --nodaemon" in dockerfile
    with open(os.path.join(root, "docker-compose.yml")) as f:
        compose = f.read()
    # (tests/test_container.py builds and runs both where a container engine runs)
    assert ':${RC_TCP_PORT:-8080}:8080"' in compose and ':${RC_WEB_PORT:-5000}:5000"' in compose
    assert "/var/lib/retire-cluster" in compose
    with open(os.path.join(root, "share", "systemd", "rc-main.service")) as f:
        unit = f.read()
    assert "supervisord --nodaemon" in unit and "RC_HOME=" in unit and "User=rc" in unit


class Battery:
    """A device with a battery, so the worker reports every battery field."""

    def read(self):
        return {"percent": 80.0, "charging": True, "temperature_c": 31.5}


def test_protocol_md_names_every_message_outcome_and_field_the_worker_sends():
    import importlib.util
    from rc.states import MESSAGE_TYPES, OUTCOMES
    spec = importlib.util.spec_from_file_location(
        "rc_worker_for_docs", os.path.join(os.path.dirname(DOCS), "bin", "worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    options = worker.parse_args(["--join", "h", "--token", "t"])
    # What this machine lets the worker read: a lower bound of what it sends.
    sent = (set(worker.Metrics(Battery()).sample()) | set(worker.device_info())
            | set(worker.hardware_specs(Battery(), 1.0))
            | set(worker.Availability(options, Battery()).report()))
    text = read("protocol.md")
    missing = sorted(name for name in sent | set(MESSAGE_TYPES) | set(OUTCOMES)
                     if "`%s`" % name not in text and "`device_info.%s`" % name not in text
                     and "`hardware_specs.%s`" % name not in text)
    assert not missing, "docs/protocol.md does not name %s" % ", ".join(missing)
