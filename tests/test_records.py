"""One shape for a device, a task and a log line (lib/rc/records.py): the
CLI's CSV and TSV, /text, /api/v1 and docs/records.md name the same fields
in the same order; and rc-web does not import the `rc` program."""
import csv
import io
import os
import re
import subprocess
import sys
import time

import orjson
import pytest

from rc import commands, db, device_logs, records, render, tasks, web

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rc(config, *argv):
    out, err = io.StringIO(), io.StringIO()
    status = commands.run_command(list(argv), out, err, config)
    assert status == 0, err.getvalue()
    return out.getvalue()


def get(app, path):
    """The app called in-process as waitress would, from 127.0.0.1."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path.split("?")[0],
               "QUERY_STRING": path.partition("?")[2], "REMOTE_ADDR": "127.0.0.1",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000",
               "HTTP_HOST": "127.0.0.1:5000", "wsgi.input": io.BytesIO(),
               "CONTENT_LENGTH": "0", "wsgi.url_scheme": "http",
               "SERVER_PROTOCOL": "HTTP/1.1"}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])
    chunks = app(environ, start_response)
    data = b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    assert answer["status"] == 200, data
    return data.decode()


@pytest.fixture
def filled(cluster_home, add_device):
    """A cluster with a drained device with figures, an idle one, and a task."""
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 12.5, "memory_percent": 40.0,
                              "battery": {"percent": 80}}, now=time.time())
    add_device("nas")
    rc(config, "drain", "pi")
    tasks.submit(connection, config, "shell", {"command": "uptime | cut -d, -f1"})
    return config, web.make_app(config)


@pytest.mark.parametrize("kind, columns", [("devices", records.DEVICE_COLUMNS),
                                          ("tasks", records.TASK_COLUMNS)])
def test_the_cli_text_and_api_name_the_same_fields(filled, kind, columns):
    config, app = filled
    cli_csv = list(csv.reader(io.StringIO(rc(config, kind, "--csv"))))
    cli_tsv = [line.split("\t") for line in rc(config, kind, "--tsv").splitlines()]
    text_csv = list(csv.reader(io.StringIO(get(app, "/text/%s?format=csv" % kind))))
    text_pipe = [line.split("|") for line in get(app, "/text/%s" % kind).splitlines()]
    assert cli_csv[0] == cli_tsv[0] == text_csv[0] == text_pipe[0] == columns
    assert len(cli_csv) == len(text_csv) == (3 if kind == "devices" else 2)
    cli_json = orjson.loads(rc(config, kind, "--json"))
    api_json = orjson.loads(get(app, "/api/v1/%s" % kind))[kind]
    for record in cli_json + api_json:
        assert set(columns) <= set(record), set(columns) - set(record)
    # The rows say what the records say (a time moves on between the two reads).
    moving = {"heartbeat_age_seconds", "age_seconds"}
    key = columns[0]
    by_key = {str(record[key]): record for record in api_json}
    for row in cli_csv[1:] + text_csv[1:]:
        fields = dict(zip(columns, row))
        expected = records.device_row(by_key[fields[key]]) if kind == "devices" \
            else records.task_row(by_key[fields[key]])
        for name in set(columns) - moving:
            assert fields[name] == render.cell(expected[name]), name


def test_status_is_one_word_and_the_flags_are_columns(filled):
    config, app = filled
    rows = list(csv.DictReader(io.StringIO(get(app, "/text/devices?format=csv"))))
    pi = [row for row in rows if row["device_id"] == "pi"][0]
    assert pi["status"] == "online" and pi["drained"] == "1" and pi["battery_percent"] == "80"
    assert float(pi["heartbeat_age_seconds"]) < 60 and float(pi["last_seen"]) > 1e9
    table = rc(config, "devices").splitlines()
    assert table[0].split() == [name.upper() for name in records.DEVICE_TABLE]
    assert [line.split()[1] for line in table[1:]] == ["online", "online,drained"]
    assert "ago" in table[2] and "ago" not in rc(config, "devices", "--tsv")


def test_log_lines_have_the_documented_columns(filled):
    config, app = filled
    with open(os.path.join(config.log_dir, "rc-server.log"), "w") as f:
        f.write(orjson.dumps({"time": 100.5, "level": "info", "event": "x", "a": 1}).decode()
                + "\n")
    assert get(app, "/text/logs").splitlines()[0].split("|") == records.LOG_COLUMNS


def test_a_device_s_own_lines_have_the_documented_columns(filled):
    config, app = filled
    connection = db.connect(config.db_path)
    with db.write(connection):
        device_logs.store(connection, "pi", [(1.7e9, "warning", "disk_low", "90%", None)],
                          time.time())
    connection.close()
    text = get(app, "/text/devices/pi/logs").splitlines()
    assert text[0].split("|") == records.DEVICE_LOG_COLUMNS
    assert text[1] == "1700000000.000000|warning|disk_low||90%"
    line = orjson.loads(get(app, "/api/v1/devices/pi/logs"))["logs"][0]
    assert set(records.DEVICE_LOG_COLUMNS) <= set(line) and line["ts"] == line["time"]


def documented_fields(heading):
    """The field names of the table under `## heading` in docs/records.md."""
    text = open(os.path.join(REPO, "docs", "records.md")).read()
    section = text.split("## %s\n" % heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| \d+ \| `([a-z_]+)` \|", section, re.M)


def test_docs_list_the_fields_in_order():
    assert documented_fields("Device") == records.DEVICE_COLUMNS
    assert documented_fields("Task") == records.TASK_COLUMNS
    assert documented_fields("Log line") == records.LOG_COLUMNS
    assert documented_fields("A device's own log line") == records.DEVICE_LOG_COLUMNS


def test_rc_web_does_not_import_the_rc_program():
    """rc-web runs the command grammar (lib/rc/commands.py), never the `rc`
    program's own module: imported in a fresh interpreter, rc.web and every
    module it imports leave rc.cli unloaded."""
    code = ("import sys, rc.web; print(' '.join(sorted(name for name in sys.modules"
            " if name.startswith('rc.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "lib")),
                            universal_newlines=True, check=True).stdout.split()
    assert "rc.commands" in loaded and "rc.records" in loaded and "rc.logs" in loaded
    assert "rc.cli" not in loaded
