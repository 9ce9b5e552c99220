"""The worker's readings and its availability policy, imported: the battery
and thermal files under a fake RC_SYSFS_ROOT, the rules and their hysteresis,
--config, and the reasons given for tasks that ran out of their limits."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "bin", "worker.py")


@pytest.fixture
def worker(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("rc_worker_policy", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SYSFS_ROOT", str(tmp_path / "sys"))
    monkeypatch.setattr(module, "PROC_ROOT", str(tmp_path / "proc"))
    (tmp_path / "proc").mkdir()
    return module


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def battery(tmp_path, capacity, status="Discharging"):
    folder = tmp_path / "sys" / "class" / "power_supply" / "BAT0"
    for name, value in (("type", "Battery"), ("capacity", capacity), ("status", status),
                        ("temp", "350")):
        write(folder / name, str(value))


def test_readings_absent_are_left_out(worker, monkeypatch):
    monkeypatch.setattr(worker, "_psutil", [None])       # as on Termux
    assert worker.sysfs_battery() is None and worker.temperature_c() is None
    metrics = worker.Metrics(worker.Power()).sample()
    for name in ("cpu_percent", "load_avg", "battery_percent", "charging", "temperature_c",
                 "disk_read_bytes", "net_bytes_recv"):
        assert name not in metrics
    assert worker.cpu_model() is None and worker.read_meminfo() == {}


def test_battery_charging_and_temperature(worker, tmp_path):
    battery(tmp_path, 55)
    assert worker.sysfs_battery() == {"percent": 55, "charging": False, "temperature_c": 35.0}
    write(tmp_path / "sys" / "class" / "power_supply" / "AC" / "type", "Mains")
    write(tmp_path / "sys" / "class" / "power_supply" / "AC" / "online", "1")
    assert worker.sysfs_battery()["charging"] is True      # "Discharging", yet plugged in
    write(tmp_path / "sys" / "class" / "thermal" / "thermal_zone0" / "temp", "48500")
    write(tmp_path / "sys" / "class" / "thermal" / "thermal_zone1" / "temp", "-273000")
    assert worker.temperature_c(worker.sysfs_battery()) == 48.5


def options(worker, *arguments):
    return worker.parse_args(["--join", "h", "--token", "t"] + list(arguments))


def test_battery_rule_has_hysteresis(worker, tmp_path):
    policy = worker.Availability(options(worker, "--min-battery", "30"), worker.Power())
    steps = [(50, True), (29, False), (35, False), (39, False), (40, True), (31, True),
             (29.5, False)]
    for capacity, expected in steps:
        battery(tmp_path, capacity)
        policy.check()
        assert policy.available is expected, (capacity, policy.reason)
    assert policy.reason == "battery 29.5% (stops below 30%, resumes at 40%)"


def test_charging_temperature_and_quiet_hours(worker, tmp_path):
    power = worker.Power()
    battery(tmp_path, 90)
    policy = worker.Availability(options(worker, "--only-when-charging"), power)
    policy.check()
    assert (policy.available, policy.reason) == (False, "not charging")
    battery(tmp_path, 90, "Charging")
    assert policy.check() and policy.available

    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0" / "temp"
    policy = worker.Availability(options(worker, "--max-temperature", "60"), power)
    for millidegrees, expected in ((50000, True), (61000, False), (57000, False),
                                   (55000, True)):
        write(zone, str(millidegrees))
        policy.check()
        assert policy.available is expected, millidegrees

    everything = options(worker, "--quiet-hours", "00:00-23:59")
    policy = worker.Availability(everything, power)
    policy.check()
    assert policy.reason == "quiet hours 00:00-23:59"


def test_owner_idle_rule(worker, monkeypatch):
    policy = worker.Availability(options(worker, "--idle-minutes", "0.001"), worker.Power())
    policy.check()
    assert not policy.available and "owner active" in policy.reason
    policy.owner.seen -= 1.0
    policy.check()
    assert policy.available
    monkeypatch.setattr(worker, "input_activity", lambda: ("typing",))
    policy.check()
    assert not policy.available


@pytest.mark.parametrize("text, expected", [("22:00-07:00", (1320, 420)),
                                            ("9:05-17:30", (545, 1050))])
def test_quiet_hours_parse(worker, text, expected):
    assert worker.hours_window(text) == expected


def test_config_file_and_command_line(worker, tmp_path):
    config = tmp_path / "worker.json"
    config.write_text('{"join": "nas:8081", "token": "t", "min_battery": 20,'
                      ' "tag": ["a", "b"], "only_when_charging": true,'
                      ' "on-unavailable": "hand-back"}')
    parsed = worker.parse_args(["--config", str(config), "--min-battery", "25"])
    assert parsed.join == ("nas", 8081) and parsed.min_battery == 25
    assert parsed.resume_battery == 35 and parsed.tags == ["a", "b"]
    assert parsed.only_when_charging and parsed.on_unavailable == "hand-back"


@pytest.mark.parametrize("arguments", [
    ["--min-battery", "101"], ["--quiet-hours", "25:00-07:00"],
    ["--min-battery", "50", "--resume-battery", "40"], ["--on-unavailable", "pause"],
    ["--max-memory", "-1"], ["--config", "/no/such/file"]])
def test_bad_policy_arguments_exit_2(arguments):
    proc = subprocess.run([sys.executable, "-I", "-S", WORKER, "--join", "h", "--token", "t"]
                          + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr


def test_help_lists_the_policy_options():
    proc = subprocess.run([sys.executable, "-I", "-S", WORKER, "--help"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    assert "resume only at PCT % (default: --min-battery + 10)" in proc.stdout
    assert "--max-temperature C" in proc.stdout


def test_limit_failures_say_which_limit(worker):
    task = worker.ShellTask((1, 1), {}, None)
    task.memory_limit, task.file_limit = 256, 10
    task.exit_code = -11
    assert task.failure("") == \
        "killed by signal 11; the task may have hit its memory limit (256 MiB)"
    task.exit_code = 2
    assert task.failure("sort: Cannot allocate memory\n") == \
        "out of memory (limit 256 MiB): exit status 2"
    assert task.failure("no such file\n") == "exit status 2"
    task.exit_code = -25      # SIGXFSZ
    assert task.failure("") == "file size limit exceeded (limit 10 MiB)"
