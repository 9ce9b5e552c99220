"""The docs cover what exists: every setting in docs/configuration.md, every
`rc` command in docs/cli.md, every operations doc that the README points to."""
import io
import os
import re

import pytest

from rc import cli
from rc.defaults import DEFAULTS

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_setting_is_in_configuration_md(key):
    assert re.search(r"^\| `%s` \|" % re.escape(key), read("configuration.md"), re.M), \
        "docs/configuration.md has no table row for %s" % key


def commands():
    return sorted(cli.command_parsers(cli.build_parser(io.StringIO())))


@pytest.mark.parametrize("name", commands())
def test_every_command_is_in_cli_md(name):
    assert re.search(r"^\| `rc %s[ `]" % re.escape(name), read("cli.md"), re.M), \
        "docs/cli.md has no table row for `rc %s`" % name


def test_every_option_of_logs_and_health_is_documented():
    text = read("cli.md")
    for option in ("--task", "--device", "--level", "-f", "--program", "-v", "--json"):
        assert option in text


@pytest.mark.parametrize("name", ["architecture.md", "protocol.md", "configuration.md",
                                  "http.md", "cli.md", "operations.md", "troubleshooting.md"])
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
    assert "VOLUME" in dockerfile and "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert "supervisord --nodaemon" in dockerfile
    with open(os.path.join(root, "docker-compose.yml")) as f:
        compose = f.read()
    assert '"8080:8080"' in compose and '"5000:5000"' in compose
    assert "/var/lib/retire-cluster" in compose
    with open(os.path.join(root, "share", "systemd", "rc-main.service")) as f:
        unit = f.read()
    assert "supervisord --nodaemon" in unit and "RC_HOME=" in unit and "User=rc" in unit
