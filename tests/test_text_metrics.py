"""/text/* for pipelines and Prometheus, and /stream/* Server-Sent Events,
over real HTTP against the app under waitress."""
import csv
import http.client
import io
import json
import os
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from rc import db, devices, records, tasks, web
from test_web import Client, client, serve, stop  # noqa: F401 (client is a fixture)

HOSTILE = "<img src=x onerror=alert(1)>|a\"b\\c"


def hostile_device(connection):
    with db.write(connection):
        devices.register(connection, "evil", {"device_info": {"hostname": HOSTILE},
                                              "role": HOSTILE}, "127.0.0.1:9", time.time())


# -- /text --------------------------------------------------------------------------

def test_metrics_parse_as_prometheus_and_counters_survive_a_restart(client, cluster_home,
                                                                     add_device):
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 50.0, "memory_percent": 25.0,
                              "battery": {"percent": 80}}, now=time.time() - 3)
    with db.write(connection):
        devices.register(connection, 'we"ird\\dev', {}, "x", time.time())
    done = tasks.submit(connection, config, "echo", {"message": "x"})
    tasks.cancel(connection, done)
    status, headers, text = client.request("/text/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert families["rc_tasks_finished"].type == "counter"
    assert samples[("rc_tasks_finished_total", (("state", "cancelled"),))] == 1
    assert samples[("rc_tasks_submitted_total", ())] == 1
    assert samples[("rc_devices", (("status", "online"),))] == 2
    assert samples[("rc_device_cpu_usage_ratio", (("device", "pi"),))] == 0.5
    assert samples[("rc_device_battery_ratio", (("device", "pi"),))] == 0.8
    assert samples[("rc_device_memory_bytes", (("device", "pi"),))] == 3.8 * 1024 ** 3
    assert 2.5 < samples[("rc_device_heartbeat_age_seconds", (("device", "pi"),))] < 60
    assert ("rc_device_up", (("device", 'we"ird\\dev'),)) in samples
    assert all(name.startswith("rc_") for name in families)
    # A new rc-web (a restart) reads the same counters from the database.
    server, thread = serve(config)
    try:
        again = Client(server.effective_port, "").request("/text/metrics")[2]
    finally:
        stop(server, thread)
    assert 'rc_tasks_finished_total{state="cancelled"} 1' in again


def test_the_design_documents_system_metrics_and_a_duration_histogram(client, cluster_home,
                                                                      add_device):
    """Disk, network, temperature per device and a task-duration histogram
    (issue 21), at /metrics too, where Prometheus looks by default; the
    histogram counts each finished task once, however often the reaper runs."""
    from test_upkeep import finish
    from rc import stats
    config, connection = cluster_home
    add_device("pi", metrics={"disk_percent": 40.0, "temperature_c": 51.5,
                              "load_avg": [0.5, 0.4, 0.3], "net_bytes_recv": 1000,
                              "net_bytes_sent": 2000, "disk_read_bytes": 3000,
                              "disk_write_bytes": 4000}, now=time.time())
    add_device("junk", metrics={"temperature_c": "hot", "load_avg": "x",
                                "net_bytes_recv": [1]}, now=time.time())
    now = time.time()
    ids = [tasks.submit(connection, config, "echo", {"message": str(n)}) for n in range(3)]
    for task_id, seconds in zip(ids, (0.003, 0.2, 7200.0)):
        finish(connection, task_id, "completed", now - 1 - seconds, now - 1)
    stats.record(connection, config, now + 120)
    stats.record(connection, config, now + 121)        # the same minutes: nothing more
    status, headers, text = client.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    pi = (("device", "pi"),)
    assert samples[("rc_device_disk_usage_ratio", pi)] == 0.4
    assert samples[("rc_device_temperature_celsius", pi)] == 51.5
    assert samples[("rc_device_load1", pi)] == 0.5
    assert samples[("rc_device_network_receive_bytes_total", pi)] == 1000
    assert samples[("rc_device_network_transmit_bytes_total", pi)] == 2000
    assert samples[("rc_device_disk_written_bytes_total", pi)] == 4000
    assert ("rc_device_temperature_celsius", (("device", "junk"),)) not in samples
    assert families["rc_task_duration_seconds"].type == "histogram"
    bucket = lambda le: samples[("rc_task_duration_seconds_bucket", (("le", le),))]  # noqa: E731
    assert bucket("0.005") == 1 and bucket("0.25") == 2 and bucket("3600") == 2
    assert bucket("+Inf") == 3 and samples[("rc_task_duration_seconds_count", ())] == 3
    assert 7200 < samples[("rc_task_duration_seconds_sum", ())] < 7201
    assert client.request("/api/v1/cluster/status")[0] == 200


def test_devices_work_with_cut_awk_and_csv(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi", metrics={"cpu_percent": 12.5})
    hostile_device(connection)
    text = client.request("/text/devices?header=0")[2]
    cut = subprocess.run(["cut", "-d|", "-f1,2"], input=text, stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    assert cut.splitlines() == ["evil|online", "pi|online"]
    awk = subprocess.run(["awk", "-F|", '$2 == "online" && $11 > 10 {print $1}'], input=text,
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    assert awk == "pi\n"
    assert all(line.count("|") == len(records.DEVICE_COLUMNS) - 1
               for line in text.splitlines())      # the "|" in the hostname became a space
    rows = list(csv.DictReader(io.StringIO(client.request("/text/devices?format=csv")[2])))
    assert list(rows[0]) == records.DEVICE_COLUMNS
    assert rows[0]["hostname"] == HOSTILE and rows[1]["cpu_percent"] == "12.5"
    tsv = client.request("/text/devices?format=tsv&status=offline")[2]
    assert tsv == "\t".join(records.DEVICE_COLUMNS) + "\n"


def test_status_is_key_value_lines(client, cluster_home, add_device):
    config, connection = cluster_home
    add_device("pi")
    tasks.submit(connection, config, "echo", {"message": "x"})
    lines = dict(line.split(": ", 1) for line in client.request("/text/status")[2].splitlines())
    for key in ("devices_online", "devices_total", "tasks_queued", "throughput_1m",
                "throughput_5m", "slots_total", "slots_busy", "uptime_seconds"):
        assert key in lines
    assert lines["devices_online"] == "1" and lines["slots_total"] == "2"


def test_logs_as_text(client, cluster_home):
    config, _ = cluster_home
    with open(os.path.join(config.log_dir, "rc-server.log"), "w") as f:
        f.write(json.dumps({"time": 100.5, "program": "rc-server", "level": "error",
                            "event": "bad|frame", "peer": "x"}) + "\nnot json\n")
    lines = client.request("/text/logs")[2].splitlines()
    assert lines[0] == "|".join(records.LOG_COLUMNS)
    assert lines[1] == "100.500000|rc-server|error|bad frame|peer=x"
    assert lines[2] == "||||not json"
    assert client.json("/text/logs?program=nothing")[0] == 404


# -- /stream --------------------------------------------------------------------------

class Stream:
    """One SSE connection, read line by line."""

    def __init__(self, port, path, headers=None):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.connection.request("GET", path, headers=headers or {})
        self.response = self.connection.getresponse()

    def event(self, timeout=10):
        """The next event as {"id", "event", "data"}, or {"comment": ...}."""
        deadline = time.monotonic() + timeout
        fields = {}
        while time.monotonic() < deadline:
            line = self.response.fp.readline().decode().rstrip("\n")
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            if not line:
                if "event" in fields:
                    fields["data"] = json.loads(fields["data"])
                    return fields
                continue
            name, _, value = line.partition(": ")
            if name != "retry":
                fields[name] = value
        raise AssertionError("no event within %s s" % timeout)

    def close(self):
        self.response.close()     # its file holds the socket open otherwise
        self.connection.close()


def port(client):
    return int(client.base.rsplit(":", 1)[1])


def test_task_stream_sends_changes_and_resumes_after_last_event_id(client, cluster_home):
    config, connection = cluster_home
    stream = Stream(port(client), "/stream/tasks")
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    first = tasks.submit(connection, config, "echo", {"message": "x"})
    event = stream.event()
    assert event["event"] == "task" and event["data"]["task_id"] == first
    assert event["data"]["state"] == "queued"
    stream.close()
    tasks.cancel(connection, first)                 # happens while nobody listens
    resumed = Stream(port(client), "/stream/tasks", {"Last-Event-ID": event["id"]})
    event = resumed.event()
    assert (event["data"]["task_id"], event["data"]["state"]) == (first, "cancelled")
    resumed.close()


def test_device_stream_starts_with_every_device_and_sends_changes(client, cluster_home,
                                                                  add_device):
    config, connection = cluster_home
    add_device("pi")
    stream = Stream(port(client), "/stream/devices")
    assert stream.event()["data"]["device_id"] == "pi"
    hostile_device(connection)
    event = stream.event()
    assert event["data"]["device_id"] == "evil" and event["data"]["hostname"] == HOSTILE
    stream.close()


def test_log_stream_follows_the_files(client, cluster_home):
    config, _ = cluster_home
    path = os.path.join(config.log_dir, "rc-reaper.log")
    with open(path, "w") as f:
        f.write(json.dumps({"time": 5.0, "program": "rc-reaper", "level": "info",
                            "event": "old"}) + "\n")
    stream = Stream(port(client), "/stream/logs")
    assert stream.event()["data"]["event"] == "old"
    with open(path, "a") as f:
        f.write(json.dumps({"time": 6.0, "program": "rc-reaper", "level": "warning",
                            "event": "swept", "n": 2}) + "\n")
    event = stream.event()
    assert event["id"] == "6.000000" and "WARNING swept n=2" in event["data"]["line"]
    stream.close()


def test_the_audit_stream_follows_the_audit_log(client, cluster_home):
    """?program=audit (admin) sends the lines written after it began, too:
    the files it follows are the ones it was asked for."""
    config, _ = cluster_home
    path = os.path.join(config.log_dir, "audit.log")
    with open(path, "w") as f:
        f.write(json.dumps({"time": 5.0, "event": "task_submitted", "actor": "admin"}) + "\n")
    stream = Stream(port(client), "/stream/logs?program=audit",
                    {"Authorization": "Bearer " + client.token})
    assert stream.event()["data"]["event"] == "task_submitted"
    with open(path, "a") as f:
        f.write(json.dumps({"time": 6.0, "event": "device_drained", "actor": "admin"}) + "\n")
    assert stream.event()["data"]["event"] == "device_drained"
    stream.close()


def test_a_quiet_stream_pings(client, monkeypatch):
    monkeypatch.setattr(web, "STREAM_PING_INTERVAL", 0.3)
    stream = Stream(port(client), "/stream/tasks")
    assert stream.event(timeout=5) == {"comment": "ping"}
    stream.close()


def test_streams_are_bounded_and_health_still_answers(cluster_home, capsys):
    config, connection = cluster_home
    server, thread = serve(config)
    streams = []
    try:
        streams = [Stream(server.effective_port, "/stream/devices") for _ in range(20)]
        for stream in streams:
            assert stream.response.status == 200
        client = Client(server.effective_port, "")
        timings = []
        for _ in range(10):
            started = time.perf_counter()
            assert client.json("/api/v1/health")[0] == 200
            timings.append(time.perf_counter() - started)
        streams += [Stream(server.effective_port, "/stream/tasks") for _ in range(4)]
        refused = Stream(server.effective_port, "/stream/logs")
        assert refused.response.status == 503
        assert "max_streams" in json.loads(refused.response.read())["error"]
        assert client.json("/api/v1/status")[0] == 200
        with capsys.disabled():
            print("\n/api/v1/health with 20 streams open: max %.1f ms, median %.1f ms"
                  % (max(timings) * 1000, sorted(timings)[5] * 1000))
        assert max(timings) < 1.0
    finally:
        for stream in streams:
            stream.close()
        stop(server, thread)
    # Closed streams give their slots back.
    server, thread = serve(config)
    try:
        again = [Stream(server.effective_port, "/stream/tasks") for _ in range(config.max_streams)]
        assert all(s.response.status == 200 for s in again)
        for s in again:
            s.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            s = Stream(server.effective_port, "/stream/tasks")
            status = s.response.status
            s.close()
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
    finally:
        stop(server, thread)
