#!/usr/bin/env python3
"""Retire-Cluster worker: makes this device part of the cluster.

Copy this one file onto a device and run it:

    python3 worker.py --join nas.local:8080 --token-file ~/.rc-token

It connects to the main node, proves that it knows the join token (and makes
the main node prove it too), describes the device, sends heartbeats and runs
the tasks it is given. Standard library only, CPython 3.6 to 3.13; psutil and
orjson are used when they happen to be installed. docs/protocol.md is the
contract this file implements.
"""
import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections import OrderedDict

try:
    import orjson
except Exception:       # not installed, or built for another Python
    orjson = None
    import json

__version__ = "0.1.0"

###############################################################################
# Wire names: a copy of lib/rc/states.py ######################################
###############################################################################
# This file must stay one file, so it cannot import rc.states;
# tests/test_shared_definitions.py checks that the two copies agree.

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024

HELLO = "hello"
REGISTER = "register"
REGISTER_ACK = "register_ack"
HEARTBEAT = "heartbeat"
HEARTBEAT_ACK = "heartbeat_ack"
TASK_ASSIGN = "task_assign"
TASK_ACCEPT = "task_accept"
TASK_PROGRESS = "task_progress"
TASK_RESULT = "task_result"
TASK_RESULT_ACK = "task_result_ack"
TASK_CANCEL = "task_cancel"
ERROR = "error"
CONTROL = "control"
CONTROL_ACK = "control_ack"
MESSAGE_TYPES = (HELLO, REGISTER, REGISTER_ACK, HEARTBEAT, HEARTBEAT_ACK,
                 TASK_ASSIGN, TASK_ACCEPT, TASK_PROGRESS, TASK_RESULT,
                 TASK_RESULT_ACK, TASK_CANCEL, ERROR, CONTROL, CONTROL_ACK)

TASK_TYPES = ("echo", "sleep", "system_info", "python_eval", "python_exec", "shell")
INSTANT_TASK_TYPES = ("echo", "system_info")   # answered at once, without a slot
PAYLOAD_FIELD = {"echo": "message", "sleep": "seconds", "system_info": None,
                 "python_eval": "expression", "python_exec": "code",
                 "shell": "command"}

OUTCOME_COMPLETED = "completed"
OUTCOME_FAILED = "failed"
OUTCOME_TIMED_OUT = "timed_out"
OUTCOME_CANCELLED = "cancelled"
OUTCOME_NOT_ALLOWED = "not_allowed"
OUTCOME_HANDED_BACK = "handed_back"
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_TIMED_OUT,
            OUTCOME_CANCELLED, OUTCOME_NOT_ALLOWED, OUTCOME_HANDED_BACK)

###############################################################################
# Tunables ####################################################################
###############################################################################

DEFAULT_PORT = 8080             # the main node's port for workers
HEARTBEAT_INTERVAL = 60.0       # seconds between heartbeats, until register_ack says otherwise
BACKOFF_START = 0.5             # seconds before the first reconnect; doubles per failure
BACKOFF_MAX = 30.0              # seconds, the longest wait between reconnects
CONNECT_TIMEOUT = 10.0          # seconds a TCP connect may take
AUTH_TIMEOUT = 15.0             # seconds from connected to register_ack (the server allows 10)
SILENT_HEARTBEATS = 3           # heartbeat intervals without a frame: the link is presumed dead
OUTPUT_CAP = MAX_FRAME_BYTES - 64 * 1024  # bytes kept of a task's stdout, and of its stderr
DRAIN_GRACE = 2.0               # seconds to read what an exited task left in its pipes
CPU_LIMIT_MARGIN = 5            # CPU seconds past its timeout before the kernel stops a task
READ_SIZE = 256 * 1024          # bytes per read from the socket or a pipe
MAX_ERROR_CHARS = 2000          # a result's error message is cut to this length
PROGRESS_INTERVAL = 0.5         # seconds between two task_progress frames of one task
PROGRESS_LINE_MAX = 4096        # bytes; a longer stdout line is output, never progress
PROGRESS_MESSAGE_MAX = 200      # characters of a progress message that are sent
WATCHDOG_EXIT_WAIT = 2.0        # seconds a clean exit waits for the watchdog to end
CAPABILITY_TOOLS = ("python3", "gcc", "g++", "make", "git", "curl", "docker", "podman",
                    "ffmpeg", "nvidia-smi", "node", "go", "rustc", "java")
SPEED_TEST_SECONDS = 0.1        # seconds the start-up CPU benchmark runs (cpu_speed)
STORAGE_DISK_GB = 1000          # a device with at least this much disk is guessed "storage"
TERMUX_BATTERY_AGE = 60.0       # seconds an answer of termux-battery-status is kept
TERMUX_BATTERY_TIMEOUT = 5.0    # seconds termux-battery-status may take (it hangs without Termux:API)
# The availability policy (see Availability).
POLICY_INTERVAL = 5.0           # seconds between two looks at battery, heat, owner and clock
BATTERY_RESUME_MARGIN = 10      # percent above --min-battery at which tasks resume
TEMPERATURE_RESUME_MARGIN = 5.0  # degrees C below --max-temperature at which tasks resume
OWNER_CPU_BUSY = 25.0           # percent of the CPU used by other programs: the owner is busy
# Sandbox limits for each task (rlimits, where the OS has them).
TASK_OPEN_FILES = 1024          # open descriptors (RLIMIT_NOFILE)
MAX_FILE_MB = 1024              # MiB, the largest file a task may write (--max-file-size)
MIN_MEMORY_MB = 1024            # MiB; --max-memory defaults to this or half the RAM, if more

# States of the connection to the main node, in the order they happen.
DISCONNECTED = "disconnected"
CONNECTING = "connecting"
AWAIT_HELLO = "await_hello"
AWAIT_ACK = "await_ack"
READY = "ready"

###############################################################################
# Helpers: JSON, logging, proofs ##############################################
###############################################################################

if orjson is not None:
    def dumps(obj, default=None):
        return orjson.dumps(obj, default=default)

    loads = orjson.loads
else:
    def dumps(obj, default=None):
        text = json.dumps(obj, default=default, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate: escape everything instead
            return json.dumps(obj, default=default, separators=(",", ":")).encode("ascii")

    loads = json.loads

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
log_threshold = LOG_LEVELS["info"]


def log(level, event, **fields):
    """One JSON object per line on stdout, like every program of the cluster."""
    if LOG_LEVELS[level] < log_threshold:
        return
    record = {"time": round(time.time(), 6), "program": "worker", "level": level,
              "event": event}
    record.update(fields)
    try:
        sys.stdout.buffer.write(dumps(record, default=repr) + b"\n")
        sys.stdout.buffer.flush()
    except (AttributeError, OSError, ValueError):
        pass     # nowhere to log is no reason to stop working


def new_nonce():
    return os.urandom(16).hex()


def sha256_function():
    """The built-in SHA-256. hashlib would load OpenSSL, which alone costs
    more resident memory (about 4 MB) than the worker's own code."""
    for name in ("_sha2", "_sha256"):     # 3.12+, then 3.6-3.11
        try:
            return __import__(name).sha256
        except (ImportError, AttributeError):
            pass
    import hashlib
    return hashlib.sha256


HMAC_INNER = bytes(x ^ 0x36 for x in range(256))
HMAC_OUTER = bytes(x ^ 0x5C for x in range(256))


def hmac_sha256(key, message):
    """HMAC as RFC 2104 defines it, on the built-in SHA-256."""
    sha256 = sha256_function()
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(key.translate(HMAC_INNER) + message).digest()
    return sha256(key.translate(HMAC_OUTER) + inner).hexdigest()


def sign(token, role, server_nonce, worker_nonce, device_id):
    """HMAC-SHA256 of "ROLE|S|W|DEVICE_ID" under the join token, as hex."""
    message = "|".join((role, server_nonce, worker_nonce, device_id)).encode("utf-8")
    return hmac_sha256(token.encode("utf-8"), message)


def proofs_match(expected, given):
    if not isinstance(given, str):
        return False
    try:
        from _operator import _compare_digest as compare_digest   # what hmac uses
    except ImportError:
        from hmac import compare_digest
    return compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def encode_frame(message_type, data, sender_id):
    envelope = {"message_type": message_type, "sender_id": sender_id,
                "timestamp": time.time(), "message_id": os.urandom(8).hex(), "data": data}
    return dumps(envelope) + b"\n"


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_or_none(value):
    return float(value) if is_number(value) and value > 0 else None


def jitter():
    """A random factor in [0.5, 1], so that many workers do not reconnect in step."""
    return 0.5 + int.from_bytes(os.urandom(2), "big") / 131070.0


def kill_group(pgid):
    """SIGKILL a process group; True if it had a process to signal."""
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except OSError:      # already gone, or only zombies left (macOS says EPERM)
        return False


def sleep_aware_clock():
    """A monotonic clock that keeps counting while the machine is suspended,
    which time.monotonic() does not on Linux and macOS: a laptop that slept
    through its lease must notice, or it would go on with tasks that the main
    node has given to another device."""
    clock_id = {"linux": 7, "android": 7,            # CLOCK_BOOTTIME (named in 3.7+)
                "darwin": getattr(time, "CLOCK_MONOTONIC", None)}.get(sys.platform)
    try:
        time.clock_gettime(clock_id)
    except (AttributeError, TypeError, OSError):
        return time.monotonic
    return lambda: time.clock_gettime(clock_id)


contact_clock = sleep_aware_clock()


PROGRESS_MARK = b"PROGRESS "     # how a task's stdout line reporting progress begins


def parse_progress(line):
    """(percent, message) from a stdout line such as b"PROGRESS 42", b"PROGRESS 42.5%"
    or b"PROGRESS 3/10 copying" (30.0), or None when it is not one."""
    fields = line.decode("utf-8", "replace").split(None, 2)
    if len(fields) < 2 or fields[0] != "PROGRESS":
        return None
    amount = fields[1]
    try:
        if "/" in amount:
            done, total = amount.split("/")
            percent = 100.0 * float(done) / float(total)
        else:
            percent = float(amount[:-1] if amount.endswith("%") else amount)
    except (ValueError, ZeroDivisionError):
        return None
    if percent != percent:      # NaN
        return None
    message = fields[2].strip() if len(fields) > 2 else ""
    return min(max(percent, 0.0), 100.0), message[:PROGRESS_MESSAGE_MAX]


###############################################################################
# The device: profile and metrics #############################################
###############################################################################
# Read from /proc and /sys where Linux and Android have them. A value that
# cannot be read is left out, never guessed and never a crash: Android denies
# apps /proc/stat and /proc/loadavg. RC_PROC_ROOT and RC_SYSFS_ROOT move the two
# trees (the tests use them to play an Android phone with a fake battery).

PROC_ROOT = os.environ.get("RC_PROC_ROOT", "/proc")
SYSFS_ROOT = os.environ.get("RC_SYSFS_ROOT", "/sys")

_psutil = []


def optional_psutil():
    """psutil if installed. Asked only where /proc cannot answer (macOS, Android),
    because importing it costs more memory than the rest of the worker."""
    if not _psutil:
        try:
            import psutil
        except Exception:
            psutil = None
        _psutil.append(psutil)
    return _psutil[0]


def proc_path(*names):
    return os.path.join(PROC_ROOT, *names)


def sysfs_path(*names):
    return os.path.join(SYSFS_ROOT, *names)


def read_text(path):
    """A small file's text, or None when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def read_number(path):
    try:
        return float(read_text(path).strip())
    except (AttributeError, ValueError):
        return None


def list_dir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def device_platform():
    # Termux on Pythons before 3.13 reports "linux"; the scheduler wants to know.
    if os.environ.get("ANDROID_ROOT") or os.environ.get("TERMUX_VERSION"):
        return "android"
    return sys.platform


def device_info():
    uname = os.uname()
    info = {"hostname": socket.gethostname(), "platform": device_platform(),
            "architecture": uname.machine,
            "os_version": "%s %s" % (uname.sysname, uname.release),
            "python_version": "%d.%d.%d" % sys.version_info[:3]}
    name = os_name()
    if name:
        info["os_name"] = name
    return info


def os_name():
    """"Debian GNU/Linux 12 (bookworm)", "Android 14"..., or None."""
    if device_platform() == "android":
        release = run_quietly(["getprop", "ro.build.version.release"])
        return "Android %s" % release.strip() if release else "Android"
    for line in (read_text("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip("\"'") or None
    return None


def run_quietly(argv, timeout=5.0):
    """A helper program's stdout, or None if it is missing, fails or hangs."""
    if not which(argv[0]):
        return None
    import subprocess
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def hardware_specs(power=None, speed=None):
    specs = {"cpu_cores": os.cpu_count() or 1, "memory_gb": memory_gb(),
             "disk_gb": disk_gb(), "network_interfaces": network_interfaces(),
             "cpu_model": cpu_model(), "cpu_speed": speed,
             "battery": bool(power and power.read())}
    return {name: value for name, value in specs.items() if value is not None}


def cpu_model():
    """The CPU's name from /proc/cpuinfo (x86: "model name"; ARM: "Hardware"...)."""
    fields = {}
    for line in (read_text(proc_path("cpuinfo")) or "").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    for name in ("model name", "hardware", "cpu model", "processor", "model"):
        if fields.get(name) and not fields[name].isdigit():
            return fields[name]
    return None


def cpu_speed(seconds=SPEED_TEST_SECONDS):
    """Million turns of an empty Python loop per second, on one core: a Pi 3
    scores several times less than a laptop. Measured once, at start."""
    turns, start = 0, time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(20000):
            pass
        turns += 20000
        now = time.perf_counter()
    return round(turns / (now - start) / 1e6, 1)


def read_meminfo():
    """/proc/meminfo as {name: kB}; empty where there is none."""
    meminfo = {}
    for line in (read_text(proc_path("meminfo")) or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            meminfo[fields[0].rstrip(":")] = int(fields[1])
    return meminfo


def memory_gb():
    total_kb = read_meminfo().get("MemTotal")
    if total_kb:
        return round(total_kb / 1048576.0, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1073741824.0, 2)
    except (ValueError, OSError, AttributeError):
        return None


def disk_usage():
    """(total, used) bytes of the file system holding the home directory."""
    try:
        st = os.statvfs(os.path.expanduser("~"))
    except (OSError, AttributeError):
        return None
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def disk_gb():
    usage = disk_usage()
    return round(usage[0] / 1073741824.0, 1) if usage else None


def network_interfaces():
    """Interface name -> addresses, as far as this platform lets us see."""
    interfaces = {}
    try:
        for _, name in socket.if_nameindex():
            interfaces[name] = []
    except OSError:
        pass
    if sys.platform in ("linux", "android"):
        for name, addresses in interfaces.items():
            addresses.extend(ipv4_address(name))
        for name, address in ipv6_addresses():
            interfaces.setdefault(name, []).append(address)
    elif optional_psutil():
        for name, addresses in optional_psutil().net_if_addrs().items():
            interfaces[name] = [a.address for a in addresses
                                if a.family in (socket.AF_INET, socket.AF_INET6)]
    return interfaces


def ipv4_address(name):
    import fcntl
    import struct
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack("256s", name.encode()[:15])
        reply = fcntl.ioctl(probe.fileno(), 0x8915, request)    # SIOCGIFADDR
        return [socket.inet_ntoa(reply[20:24])]
    except OSError:       # no IPv4 address on it
        return []
    finally:
        probe.close()


def ipv6_addresses():
    try:
        rows = [line.split() for line in (read_text(proc_path("net", "if_inet6")) or "")
                .splitlines()]
        return [(row[5], socket.inet_ntop(socket.AF_INET6, bytes.fromhex(row[0])))
                for row in rows if len(row) >= 6]
    except (OSError, ValueError):
        return []


def which(program):
    """shutil.which without importing shutil (and the compressors it pulls in)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def capabilities():
    return [tool for tool in CAPABILITY_TOOLS if which(tool)]


def guess_role(platform, disk):
    """mobile on a phone, storage with a big disk, compute otherwise."""
    if platform == "android":
        return "mobile"
    return "storage" if disk and disk >= STORAGE_DISK_GB else "compute"


# -- battery and temperature ------------------------------------------------------

class Power(object):
    """The battery: {"percent", "charging", "temperature_c"} (each where known),
    or None without one. "charging" means on external power. Read from
    /sys/class/power_supply, else from termux-battery-status, which asks an
    Android app and is slow, so its answer is kept for a while."""

    def __init__(self):
        self.termux = which("termux-battery-status")
        self.kept, self.kept_until = None, 0.0

    def read(self):
        battery = sysfs_battery()
        if battery is None and self.termux:
            if time.monotonic() >= self.kept_until:
                self.kept = self.from_termux()
                self.kept_until = time.monotonic() + TERMUX_BATTERY_AGE
            battery = self.kept
        return battery

    def from_termux(self):
        text = run_quietly([self.termux], timeout=TERMUX_BATTERY_TIMEOUT)
        try:
            status = loads(text) if text else None
        except ValueError:
            status = None
        if not isinstance(status, dict):
            # Without the Termux:API app it hangs or fails: stop asking.
            log("warning", "termux_battery_unavailable", program=self.termux)
            self.termux = None
            return None
        battery = {"percent": status.get("percentage"),
                   "temperature_c": status.get("temperature")}
        if isinstance(status.get("plugged"), str):
            battery["charging"] = status["plugged"].upper() != "UNPLUGGED"
        return {k: v for k, v in battery.items() if v is not None}


def sysfs_battery():
    root = sysfs_path("class", "power_supply")
    supplies = [(name, (read_text(os.path.join(root, name, "type")) or "").strip().lower())
                for name in list_dir(root)]
    batteries = [os.path.join(root, name) for name, kind in supplies if kind == "battery"
                 and read_number(os.path.join(root, name, "present")) != 0]
    if not batteries:
        return None
    directory = batteries[0]
    battery = {"percent": read_number(os.path.join(directory, "capacity"))}
    status = (read_text(os.path.join(directory, "status")) or "").strip().lower()
    powered = any(read_number(os.path.join(root, name, "online")) == 1
                  for name, kind in supplies if kind != "battery")
    if status in ("charging", "full") or powered:
        battery["charging"] = True
    elif status:
        battery["charging"] = False
    tenths = read_number(os.path.join(directory, "temp"))
    if tenths is not None:
        battery["temperature_c"] = round(tenths / 10.0, 1)
    return {k: v for k, v in battery.items() if v is not None}


def temperature_c(battery=None):
    """The hottest thermal zone (or the battery), in °C, or None."""
    root = sysfs_path("class", "thermal")
    readings = [read_number(os.path.join(root, name, "temp"))
                for name in list_dir(root) if name.startswith("thermal_zone")]
    readings = [t / 1000.0 if abs(t) >= 1000 else t for t in readings if t is not None]
    if battery and "temperature_c" in battery:
        readings.append(battery["temperature_c"])
    readings = [t for t in readings if -40 < t < 150]     # a sensor that is not there
    return round(max(readings), 1) if readings else None


# -- load -------------------------------------------------------------------------

def read_cpu_times():
    """(busy, total) jiffies since boot from /proc/stat, or None."""
    try:
        fields = [int(x) for x in read_text(proc_path("stat")).split("\n", 1)[0].split()[1:9]]
        idle = fields[3] + fields[4]      # idle + iowait
    except (AttributeError, ValueError, IndexError):
        return None
    return sum(fields) - idle, sum(fields)


class CpuMeter(object):
    """CPU use of the whole device between two calls, in percent."""

    def __init__(self):
        self.sample = read_cpu_times()

    def percent(self):
        previous, self.sample = self.sample, read_cpu_times()
        if self.sample is None:
            psutil = optional_psutil()
            return psutil.cpu_percent(None) if psutil else None
        if previous is None or self.sample[1] <= previous[1]:
            return None
        return round(100.0 * (self.sample[0] - previous[0]) / (self.sample[1] - previous[1]), 1)


class Metrics(object):
    """What the heartbeat reports. A metric that cannot be read is left out."""

    def __init__(self, power):
        self.cpu = CpuMeter()
        self.power = power

    def sample(self):
        metrics = {}
        for reader in (self.cpu_and_battery, memory_percent, disk_percent, load_avg,
                       disk_io, network_io, uptime):
            try:
                metrics.update(reader() or {})
            except Exception:     # a metric is never worth a crash
                pass
        return {name: value for name, value in metrics.items() if value is not None}

    def cpu_and_battery(self):
        battery = self.power.read() or {}
        return {"cpu_percent": self.cpu.percent(), "battery_percent": battery.get("percent"),
                "charging": battery.get("charging"), "temperature_c": temperature_c(battery)}


def memory_percent():
    meminfo = read_meminfo()
    if meminfo.get("MemTotal") and "MemAvailable" in meminfo:
        return {"memory_percent":
                round(100.0 * (1 - meminfo["MemAvailable"] / float(meminfo["MemTotal"])), 1)}
    psutil = optional_psutil()
    return {"memory_percent": psutil.virtual_memory().percent if psutil else None}


def disk_percent():
    usage = disk_usage()
    return {"disk_percent": round(100.0 * usage[1] / usage[0], 1) if usage and usage[0]
            else None}


def load_avg():
    text = read_text(proc_path("loadavg"))
    if text is not None:
        return {"load_avg": [float(x) for x in text.split()[:3]]}
    if os.path.isdir(PROC_ROOT):      # Android: there, but not for us
        return None
    return {"load_avg": [round(x, 2) for x in os.getloadavg()]}      # macOS


# Block devices whose I/O is already counted on the disks beneath them.
VIRTUAL_DISKS = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")


def disk_io():
    """Bytes read and written since boot on the whole disks."""
    disks = [name for name in list_dir(sysfs_path("block")) if not name.startswith(VIRTUAL_DISKS)]
    text = read_text(proc_path("diskstats"))
    if not disks or text is None:
        return None
    read = written = 0
    for fields in (line.split() for line in text.splitlines()):
        if len(fields) >= 10 and fields[2] in disks:
            read += int(fields[5]) * 512          # sectors are always 512 bytes here
            written += int(fields[9]) * 512
    return {"disk_read_bytes": read, "disk_write_bytes": written}


def network_io():
    """Bytes received and sent since boot on every interface but loopback."""
    text = read_text(proc_path("net", "dev"))
    if text is None:
        return None
    received = sent = 0
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() != "lo" and len(fields) >= 9:
            received += int(fields[0])
            sent += int(fields[8])
    return {"net_bytes_recv": received, "net_bytes_sent": sent}


def uptime():
    text = read_text(proc_path("uptime"))
    if text is not None:
        return {"uptime_s": round(float(text.split()[0]), 1)}
    if contact_clock is not time.monotonic:        # CLOCK_BOOTTIME: time since boot
        return {"uptime_s": round(contact_clock(), 1)}
    return None


###############################################################################
# A good guest: when this device takes new tasks ###############################
###############################################################################
# The owner's rules, from the command line or --config: only while charging,
# only above a battery level, not above a temperature, only when the owner is
# idle, never in quiet hours. Each rule that stops tasks resumes them only past
# a second threshold, so that a device hovering at the limit does not flap.

class Availability(object):
    def __init__(self, options, power):
        self.options = options
        self.power = power
        self.low_battery = False
        self.hot = False
        self.owner = OwnerWatch() if options.idle_minutes else None
        self.available, self.reason = True, ""

    def report(self):
        return {"available": self.available, "reason": self.reason}

    def check(self, own_cpu_seconds=0.0):
        """Look again; True when availability changed."""
        reasons = [reason for reason in (self.battery_rule(), self.temperature_rule(),
                                         self.owner_rule(own_cpu_seconds),
                                         self.quiet_hours_rule()) if reason]
        available, reason = not reasons, "; ".join(reasons)
        changed = available != self.available
        self.available, self.reason = available, reason
        return changed

    def battery_rule(self):
        options = self.options
        if not (options.only_when_charging or options.min_battery is not None):
            return None
        battery = self.power.read() or {}
        reasons = []
        if options.only_when_charging and battery.get("charging") is False:
            reasons.append("not charging")
        percent = battery.get("percent")
        if options.min_battery is not None and percent is not None:
            if self.low_battery:
                self.low_battery = percent < options.resume_battery
            else:
                self.low_battery = percent < options.min_battery
            if self.low_battery:
                reasons.append("battery %g%% (stops below %g%%, resumes at %g%%)"
                               % (percent, options.min_battery, options.resume_battery))
        return "; ".join(reasons)

    def temperature_rule(self):
        limit = self.options.max_temperature
        if limit is None:
            return None
        now = temperature_c(self.power.read())
        if now is None:
            return None
        resume = limit - TEMPERATURE_RESUME_MARGIN
        self.hot = now > resume if self.hot else now > limit
        if self.hot:
            return "temperature %g C (stops above %g C, resumes at %g C)" % (now, limit, resume)
        return None

    def owner_rule(self, own_cpu_seconds):
        if self.owner is None:
            return None
        idle = self.owner.idle_for(own_cpu_seconds)
        wanted = self.options.idle_minutes * 60.0
        if idle >= wanted:
            return None
        return "owner active %d s ago (needs %g min idle)" % (idle, self.options.idle_minutes)

    def quiet_hours_rule(self):
        if not self.options.quiet_hours:
            return None
        start, end = self.options.quiet_hours
        now = time.localtime()
        minute = now.tm_hour * 60 + now.tm_min
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return "quiet hours %02d:%02d-%02d:%02d" % (start // 60, start % 60,
                                                        end // 60, end % 60)
        return None


class OwnerWatch(object):
    """When the owner was last seen: input on the keyboard, the mouse or a
    terminal, or other programs keeping the CPU busy. Best effort: without
    /proc/stat (Android) only input counts, and without either the owner is
    never seen, so the device counts as idle. Until then, the owner is presumed
    present since the worker started."""

    def __init__(self):
        self.seen = time.monotonic()
        self.input = input_activity()
        self.cpu = read_cpu_times()
        self.own = None

    def idle_for(self, own_cpu_seconds):
        now = time.monotonic()
        mark = input_activity()
        if mark != self.input:
            self.input = mark
            self.seen = now
        if self.others_busy(own_cpu_seconds):
            self.seen = now
        return now - self.seen

    def others_busy(self, own_cpu_seconds):
        """Did programs other than the worker and its tasks use the CPU?"""
        previous, self.cpu = self.cpu, read_cpu_times()
        own_before, self.own = self.own, own_cpu_seconds
        if previous is None or self.cpu is None or own_before is None \
                or self.cpu[1] <= previous[1]:
            return False
        try:
            ticks = os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError, AttributeError):
            ticks = 100
        busy = self.cpu[0] - previous[0] - (own_cpu_seconds - own_before) * ticks
        return 100.0 * busy / (self.cpu[1] - previous[1]) > OWNER_CPU_BUSY


INPUT_INTERRUPTS = ("i8042", "keyboard", "mouse", "touchpad", "hid", "kbd")


def input_activity():
    """Something that changes when someone types or moves the mouse: the
    interrupt counts of input devices, and when a terminal last had input
    (what `w` shows as IDLE)."""
    counts = []
    for line in (read_text(proc_path("interrupts")) or "").splitlines():
        if any(word in line.lower() for word in INPUT_INTERRUPTS):
            counts.append(sum(int(x) for x in line.split()[1:] if x.isdigit()))
    last_input = 0.0
    for directory in ("/dev/pts", "/dev"):
        for name in list_dir(directory):
            if directory == "/dev/pts" or name.startswith("tty"):
                try:
                    last_input = max(last_input, os.stat(os.path.join(directory, name)).st_atime)
                except OSError:
                    pass
    return tuple(counts), last_input


def own_cpu_seconds(task_sessions):
    """CPU seconds used by the worker, its finished tasks and the processes of
    the tasks still running (each in a session whose id is its leader's pid)."""
    times = os.times()
    total = times[0] + times[1] + times[2] + times[3]
    if not task_sessions:
        return total
    try:
        ticks = float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return total
    for pid in list_dir(PROC_ROOT):
        if pid.isdigit():
            fields = (read_text(proc_path(pid, "stat")) or ")").rsplit(")", 1)[1].split()
            if len(fields) > 12 and fields[3].isdigit() and int(fields[3]) in task_sessions:
                total += (int(fields[11]) + int(fields[12])) / ticks
    return total


###############################################################################
# Tasks #######################################################################
###############################################################################

class BadPayload(Exception):
    """The payload lacks the field this task type needs."""


def result_data(key, status, error=None, output="", stderr="", exit_code=None,
                execution_time=0.0, cpu_time=0.0, peak_memory_kb=None, truncated=False):
    """The data of a task_result."""
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS]
    return {"task_id": key[0], "attempt": key[1], "status": status, "error": error,
            "result": {"output": output, "stderr": stderr, "exit_code": exit_code,
                       "execution_time": execution_time, "cpu_time": cpu_time,
                       "peak_memory_kb": peak_memory_kb, "truncated": truncated}}


def fit_result(data, sender_id):
    """Cut output and stderr until the task_result frame fits in MAX_FRAME_BYTES."""
    result = data["result"]
    if len(result["output"]) + len(result["stderr"]) < MAX_FRAME_BYTES // 8:
        return data     # cannot be too long even if every character were escaped
    while True:
        excess = len(encode_frame(TASK_RESULT, data, sender_id)) - MAX_FRAME_BYTES
        if excess <= 0:
            return data
        result["truncated"] = True
        # Each character encodes to at least one byte, so cutting `excess`
        # characters (stderr first, it matters less) saves at least as many bytes.
        cut = excess + 64
        for name in ("stderr", "output"):
            take = min(cut, len(result[name]))
            result[name] = result[name][:len(result[name]) - take]
            cut -= take


class Task(object):
    """One attempt of a task on this device, from task_assign to task_result."""
    task_type = None
    quiet = False           # log its start and end at debug level only
    argument_types = (str,)

    def __init__(self, key, payload, timeout):
        self.key = key
        self.payload = payload if isinstance(payload, dict) else {}
        self.timeout = timeout
        self.started = None
        self.deadline = None

    def argument(self):
        name = PAYLOAD_FIELD[self.task_type]
        value = self.payload.get(name)
        if not isinstance(value, self.argument_types) or isinstance(value, bool):
            kind = "a string" if self.argument_types == (str,) else "a number"
            raise BadPayload("payload field %r must be %s" % (name, kind))
        return value

    def elapsed(self):
        return round(time.monotonic() - self.started, 6) if self.started else 0.0

    def start(self, worker):
        raise NotImplementedError

    def wake_at(self):
        """When on_time must run next (monotonic seconds), or None."""
        return None

    def on_time(self, worker, now):
        pass

    def poll(self, worker):
        """Look for an exited child process."""

    def stop(self, worker, outcome):
        worker.finish(self, outcome, error=outcome.replace("_", " "))

    def abandon(self, worker):
        """Stop at once, leave nothing behind, and report nothing."""


class EchoTask(Task):
    task_type = "echo"
    # The unit of the throughput benchmark: a log line per echo would cost
    # more than the echo itself.
    quiet = True

    def start(self, worker):
        worker.finish(self, OUTCOME_COMPLETED, output=self.argument())


class SystemInfoTask(Task):
    task_type = "system_info"

    def start(self, worker):
        info = worker.profile()
        info["system_metrics"] = worker.metrics.sample()
        worker.finish(self, OUTCOME_COMPLETED, output=dumps(info).decode("utf-8"))


class SleepTask(Task):
    """Waits in the loop's timers, so it holds a slot but no thread or process."""
    task_type = "sleep"
    argument_types = (int, float)

    def start(self, worker):
        seconds = self.argument()
        if seconds < 0:
            raise BadPayload("payload field 'seconds' must not be negative")
        self.until = self.started + seconds

    def wake_at(self):
        return min(self.until, self.deadline) if self.deadline else self.until

    def on_time(self, worker, now):
        if self.deadline is not None and self.deadline < self.until:
            worker.finish(self, OUTCOME_TIMED_OUT, error="timed out after %g s" % self.timeout)
        else:
            worker.finish(self, OUTCOME_COMPLETED)


class ProcessTask(Task):
    """Runs a child process in its own process group and a fresh directory."""
    proc = None
    workdir = None
    ending = None            # timed_out or cancelled, once decided from outside
    exit_code = None
    reaped = False
    drain_until = None
    truncated = False
    cpu_time = 0.0
    peak_memory_kb = None
    memory_limit = None      # MiB (--max-memory), for the error of a task that ran out
    file_limit = None        # MiB (--max-file-size)
    # Stdout is read line by line for PROGRESS lines (see parse_progress).
    unfinished = b""         # the start of a line that may yet be a PROGRESS line
    line_start = True        # the next byte of stdout begins a line
    progress = None          # the latest task_progress data, not sent yet
    progress_sent = float("-inf")   # when the previous one was sent (monotonic seconds)

    def command(self, value):
        """The argv; may write files into self.workdir."""
        raise NotImplementedError

    def start(self, worker):
        import subprocess
        import tempfile
        value = self.argument()
        try:
            self.workdir = tempfile.mkdtemp(prefix="rc-task-")
            self.proc = subprocess.Popen(
                self.command(value), cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=child_limits(self.timeout, worker.options))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            self.remove_workdir()
            worker.finish(self, OUTCOME_FAILED, error="cannot start: %s" % e)
            return
        worker.watchdog.group_started(self.proc.pid)
        self.memory_limit = worker.options.max_memory
        self.file_limit = worker.options.max_file_size
        self.cap = worker.options.output_cap
        self.pipes = {}         # fd -> file object, while open
        self.buffers = {}       # fd -> what was read, up to the cap
        self.stream_fds = (self.proc.stdout.fileno(), self.proc.stderr.fileno())
        for pipe in (self.proc.stdout, self.proc.stderr):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.pipes[fd] = pipe
            self.buffers[fd] = bytearray()
            worker.selector.register(fd, selectors.EVENT_READ,
                                     lambda mask, fd=fd: self.on_output(worker, fd))

    def on_output(self, worker, fd):
        if fd not in self.pipes:     # closed earlier in this turn of the loop
            return
        try:
            chunk = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close_pipe(worker, fd)
            self.maybe_done(worker)
            return
        if fd == self.stream_fds[0]:
            chunk = self.without_progress(worker, chunk)
        self.keep(fd, chunk)

    def keep(self, fd, chunk):
        buffer = self.buffers[fd]
        room = self.cap - len(buffer)
        if len(chunk) > room:
            # Keep reading and discarding, or a chatty child would block on a full pipe.
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        buffer += chunk

    def without_progress(self, worker, chunk):
        """Stdout less its PROGRESS lines, which become task_progress frames."""
        data = self.unfinished + chunk
        end = data.rfind(b"\n") + 1
        lines, tail = data[:end], data[end:]
        if PROGRESS_MARK in lines:
            lines = self.take_progress(worker, lines)
        # Hold back an unfinished line only while it may still be a PROGRESS
        # line, so that memory stays bounded and the output in order.
        if ((self.line_start or end) and len(tail) < PROGRESS_LINE_MAX
                and (tail.startswith(PROGRESS_MARK) or PROGRESS_MARK.startswith(tail))):
            self.unfinished, self.line_start = tail, True
            return lines
        self.unfinished, self.line_start = b"", False
        return lines + tail

    def take_progress(self, worker, lines):
        kept = []
        for number, line in enumerate(lines[:-1].split(b"\n")):
            parsed = None
            if ((number or self.line_start) and line.startswith(PROGRESS_MARK)
                    and len(line) < PROGRESS_LINE_MAX):
                parsed = parse_progress(line)
            if parsed is None:
                kept.append(line + b"\n")
            else:
                self.progress = {"task_id": self.key[0], "attempt": self.key[1],
                                 "progress": parsed[0], "message": parsed[1]}
                self.send_progress(worker, time.monotonic())
        return b"".join(kept)

    def progress_due(self):
        """When the latest progress may be sent (monotonic seconds), or None."""
        if self.progress is None or self.reaped or self.ending:
            return None     # nothing new, or the result (which implies 100) comes next
        return self.progress_sent + PROGRESS_INTERVAL

    def send_progress(self, worker, now):
        due = self.progress_due()
        if due is not None and now >= due:
            worker.tell(TASK_PROGRESS, self.progress)
            self.progress, self.progress_sent = None, now

    def close_pipe(self, worker, fd):
        worker.selector.unregister(fd)
        self.pipes.pop(fd).close()
        if fd == self.stream_fds[0]:        # a last line without a newline is output
            self.keep(fd, self.unfinished)
            self.unfinished = b""

    def poll(self, worker):
        if self.proc is None or self.reaped:
            return
        pid = self.proc.pid
        if hasattr(os, "waitid"):
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    return
            except ChildProcessError:
                pass
            # The unreaped leader keeps its group id reserved, so this cannot hit
            # a stranger: whatever the task left running ends with it.
            kill_group(pid)
            self.record_exit(worker, os.wait4(pid, 0))
        else:
            status = os.wait4(pid, os.WNOHANG)
            if status[0] == 0:
                return
            kill_group(pid)
            self.record_exit(worker, status)
        self.drain_until = time.monotonic() + DRAIN_GRACE
        self.maybe_done(worker)

    def record_exit(self, worker, wait_status):
        _, status, usage = wait_status
        self.reaped = True
        worker.watchdog.group_ended(self.proc.pid)
        if os.WIFSIGNALED(status):
            self.exit_code = -os.WTERMSIG(status)
        else:
            self.exit_code = os.WEXITSTATUS(status)
        self.proc.returncode = self.exit_code    # so subprocess never waits for it again
        self.cpu_time = round(usage.ru_utime + usage.ru_stime, 6)
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        divisor = 1024 if sys.platform == "darwin" else 1
        self.peak_memory_kb = int(usage.ru_maxrss // divisor)

    def wake_at(self):
        if self.reaped:
            return self.drain_until
        times = [t for t in (self.deadline, self.progress_due()) if t is not None]
        return None if self.ending or not times else min(times)

    def on_time(self, worker, now):
        self.send_progress(worker, now)
        if self.reaped:
            if now >= self.drain_until:   # something it started still holds its pipes open
                self.conclude(worker)
        elif self.deadline is not None and now >= self.deadline:
            self.stop(worker, OUTCOME_TIMED_OUT)

    def stop(self, worker, outcome):
        if self.ending or self.proc is None:
            return
        self.ending = outcome
        if self.reaped:
            self.conclude(worker)
        else:
            kill_group(self.proc.pid)     # poll() reaps it and concludes

    def maybe_done(self, worker):
        if self.reaped and not self.pipes:
            self.conclude(worker)

    def conclude(self, worker):
        for fd in list(self.pipes):
            self.close_pipe(worker, fd)
        self.remove_workdir()
        stdout, stderr = [bytes(self.buffers[fd]).decode("utf-8", "replace")
                          for fd in self.stream_fds]
        status, error = self.outcome(stderr)
        worker.finish(self, status, error=error, output=self.output_text(stdout),
                      stderr=stderr, exit_code=self.exit_code, cpu_time=self.cpu_time,
                      peak_memory_kb=self.peak_memory_kb, truncated=self.truncated)

    def outcome(self, stderr):
        if self.ending == OUTCOME_TIMED_OUT:
            return OUTCOME_TIMED_OUT, "timed out after %g s" % self.timeout
        if self.ending == OUTCOME_CANCELLED:
            return OUTCOME_CANCELLED, "cancelled"
        if self.exit_code == 0:
            return OUTCOME_COMPLETED, None
        return OUTCOME_FAILED, self.failure(stderr)

    def failure(self, stderr):
        if self.exit_code == -getattr(signal, "SIGXFSZ", 0) and self.file_limit:
            return "file size limit exceeded (limit %d MiB)" % self.file_limit
        if self.exit_code == -getattr(signal, "SIGXCPU", 0):
            return "CPU time limit exceeded"
        if self.exit_code < 0:
            error = "killed by signal %d" % -self.exit_code
        else:
            error = "exit status %d" % self.exit_code
        return self.memory_hint(error, stderr)

    def memory_hint(self, error, stderr):
        """Say so when the task probably ran out of its memory limit: an
        allocation failed, or it died of a signal that a failed one causes."""
        if not self.memory_limit:
            return error
        tail = stderr[-4000:].lower()
        if any(sign in tail for sign in OUT_OF_MEMORY_SIGNS):
            return "out of memory (limit %d MiB): %s" % (self.memory_limit, error)
        if self.exit_code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGKILL):
            return "%s; the task may have hit its memory limit (%d MiB)" % (error,
                                                                         self.memory_limit)
        return error

    def output_text(self, stdout):
        return stdout

    def abandon(self, worker):
        if self.proc is not None and not self.reaped:
            kill_group(self.proc.pid)
            try:
                self.record_exit(worker, os.wait4(self.proc.pid, 0))
            except ChildProcessError:
                worker.watchdog.group_ended(self.proc.pid)
        for fd in list(getattr(self, "pipes", ())):
            self.close_pipe(worker, fd)
        self.remove_workdir()

    def remove_workdir(self):
        if self.workdir:
            import shutil
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def write(self, name, text):
        with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as f:
            f.write(text)
        return name


# What a task's stderr says when an allocation failed (Python, C, C++, shells).
OUT_OF_MEMORY_SIGNS = ("memoryerror", "cannot allocate memory", "out of memory",
                       "bad_alloc", "memory exhausted")


def child_limits(timeout, options):
    """A preexec_fn setting the task's rlimits: no core dumps, a CPU-time limit a
    little past the timeout (the worker's own timer normally acts first; this
    covers a worker that died), address space, open files and file size."""
    try:
        import resource
    except ImportError:
        return None
    cpu_seconds = int(timeout) + 1 + CPU_LIMIT_MARGIN if timeout else None
    limits = [("RLIMIT_CORE", 0), ("RLIMIT_CPU", cpu_seconds),
              ("RLIMIT_AS", options.max_memory * 1048576 if options.max_memory else None),
              ("RLIMIT_NOFILE", TASK_OPEN_FILES),
              ("RLIMIT_FSIZE", options.max_file_size * 1048576 if options.max_file_size
               else None)]
    limits = [(getattr(resource, name), value) for name, value in limits
              if value is not None and hasattr(resource, name)]

    def limit():
        for which, value in limits:
            try:
                hard = resource.getrlimit(which)[1]
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL a second later.
                extra = 1 if which == resource.RLIMIT_CPU else 0
                if hard == resource.RLIM_INFINITY or hard > value + extra:
                    hard = value + extra
                resource.setrlimit(which, (value, hard))
            except (ValueError, OSError):
                pass      # not on this OS (macOS refuses RLIMIT_AS): run without it
    return limit


def python_executable():
    return sys.executable or which("python3") or "python3"


# Evaluates expression.txt in the child and prints repr() of the value.
EVAL_DRIVER = (
    "import sys\n"
    "with open(sys.argv[1], encoding='utf-8') as f:\n"
    "    source = f.read()\n"
    "value = eval(compile(source, '<expression>', 'eval'), {'__name__': '__main__'})\n"
    "sys.stdout.write(repr(value) + '\\n')\n")


class PythonTask(ProcessTask):
    def failure(self, stderr):
        # An uncaught exception: its last line ("ZeroDivisionError: ...") says it best.
        if "Traceback (most recent call last)" in stderr:
            last = [line for line in stderr.splitlines() if line.strip()][-1]
            if last.startswith("MemoryError") and self.memory_limit:
                return "MemoryError: out of memory (limit %d MiB)" % self.memory_limit
            return last
        return ProcessTask.failure(self, stderr)


class PythonEvalTask(PythonTask):
    task_type = "python_eval"

    def command(self, expression):
        return [python_executable(), "-I", "-c", EVAL_DRIVER,
                self.write("expression.txt", expression)]

    def output_text(self, stdout):
        return stdout[:-1] if stdout.endswith("\n") else stdout


class PythonExecTask(PythonTask):
    task_type = "python_exec"

    def command(self, code):
        return [python_executable(), "-I", self.write("script.py", code)]


class ShellTask(ProcessTask):
    task_type = "shell"

    def command(self, command):
        return [which("sh") or "/bin/sh", "-c", command]


TASK_CLASSES = {cls.task_type: cls for cls in (
    EchoTask, SleepTask, SystemInfoTask, PythonEvalTask, PythonExecTask, ShellTask)}

###############################################################################
# The watchdog: no orphaned tasks when the worker is killed ###################
###############################################################################
# Each task runs in a session of its own, so nothing ends it when the worker is
# killed with SIGKILL. A forked process reads "+PGID" and "-PGID" lines from a
# pipe; end of file means the worker is gone, however it died.

class Watchdog(object):
    pid = None
    fd = None       # the pipe's write end, while the watchdog is there

    def start(self):
        """Fork it; call before any socket is opened, so it holds none."""
        if not hasattr(os, "fork"):
            return
        read_fd, write_fd = os.pipe()        # not inherited by the tasks
        try:
            pid = os.fork()
        except OSError as e:
            os.close(read_fd)
            os.close(write_fd)
            log("warning", "watchdog_not_started", error=str(e))
            return
        if pid == 0:
            try:
                os.close(write_fd)
                watch(read_fd)
            finally:
                os._exit(0)
        os.close(read_fd)
        self.pid, self.fd = pid, write_fd

    def group_started(self, pgid):
        self.tell(b"+%d\n" % pgid)

    def group_ended(self, pgid):
        self.tell(b"-%d\n" % pgid)

    def tell(self, line):
        if self.fd is None:
            return
        try:
            os.write(self.fd, line)
        except OSError as e:     # it was killed: carry on without it
            log("warning", "watchdog_lost", error=str(e))
            self.stop()

    def stop(self):
        """Close the pipe (the watchdog exits on EOF) and reap it."""
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        give_up = time.monotonic() + WATCHDOG_EXIT_WAIT
        while time.monotonic() < give_up:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


def watch(read_fd):
    """The watchdog's life. It imports nothing, and in a session of its own and
    deaf to SIGINT, SIGTERM and SIGHUP it outlives the worker until EOF."""
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    close_all_but(read_fd)
    groups, pending = set(), b""
    while True:
        try:
            chunk = os.read(read_fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            (groups.add if line[:1] == b"+" else groups.discard)(pgid)
    killed = [pgid for pgid in sorted(groups) if kill_group(pgid)]
    if killed:
        log("warning", "orphans_killed", pgids=killed)


def close_all_but(keep):
    """Close every descriptor except stdin, stdout, stderr and `keep`."""
    for directory in ("/proc/self/fd", "/dev/fd"):     # the open ones only
        try:
            fds = [int(name) for name in os.listdir(directory)]
            break
        except (OSError, ValueError):
            pass
    else:       # the limit may be "unlimited": trying each number could take minutes
        fds = range(3, 65536)
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


###############################################################################
# The worker: one selectors loop for the connection, the tasks and signals ####
###############################################################################


class Worker(object):
    def __init__(self, options):
        self.options = options
        self.device_id = options.device_id
        self.selector = selectors.DefaultSelector()
        self.power = Power()
        self.metrics = Metrics(self.power)
        self.speed = cpu_speed()
        self.availability = Availability(options, self.power)
        self.next_policy_check = time.monotonic()
        self.queued = OrderedDict()    # (task_id, attempt) -> Task waiting for a slot
        self.running = {}              # (task_id, attempt) -> Task
        self.unacked = OrderedDict()   # (task_id, attempt) -> task_result data, until acked
        self.fenced = set()            # (task_id, attempt) we gave up, until the main node knows
        self.fenced_told = set()       # ... of those, the ones in the message awaiting its ack
        self.heartbeat_interval = options.heartbeat
        self.stop_signal = None
        self.watchdog = Watchdog()     # started by run(), not by the self-test
        # Self-fencing (see check_fence). Times are on contact_clock().
        self.fence_interval = None     # from register_ack; None: never
        self.disconnect_fence = None   # from register_ack; None: never
        self.last_contact = None       # the last frame on a registered connection
        self.lost_at = None            # when the connection was lost, until registered again
        # The connection to the main node.
        self.sock = None
        self.state = DISCONNECTED
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.backoff = BACKOFF_START
        self.connect_at = time.monotonic() if options.join else None
        self.auth_deadline = None
        self.next_heartbeat = None
        self.last_heard = None
        self.nonces = None

    # -- the loop ---------------------------------------------------------------

    def run(self):
        self.watchdog.start()
        self.install_signals()
        log("info", "worker_started", device_id=self.device_id, version=__version__,
            main_node="%s:%d" % self.options.join, task_types=list(self.options.task_types),
            slots=self.options.slots, python=sys.version.split()[0], watchdog=self.watchdog.pid)
        while self.stop_signal is None:
            self.turn()
        self.shutdown()
        return 0

    def turn(self):
        events = self.selector.select(self.select_timeout())
        # Before any frame is read or result sent: after a freeze (SIGSTOP, a
        # suspended laptop) the main node may have given our tasks to another device.
        self.check_fence()
        for key, mask in events:
            key.data(mask)
        for task in list(self.running.values()):
            task.poll(self)
        self.check_timers(time.monotonic())
        self.start_queued()
        self.flush()

    def select_timeout(self):
        now = time.monotonic()
        times = [self.connect_at, self.auth_deadline, self.next_heartbeat, self.silence_limit(),
                 self.next_policy_check]
        times.extend(task.wake_at() for task in self.running.values())
        fence_in = self.fence_in()
        if fence_in is not None:
            times.append(now + fence_in)
        times = [t for t in times if t is not None]
        # A child's exit normally wakes us through SIGCHLD; polling each second
        # covers a platform where that signal does not arrive.
        longest = 1.0 if self.running else 60.0
        if self.queued and len(self.running) < self.options.slots:
            longest = 0.0
        return max(0.0, min([longest] + [t - now for t in times]))

    def check_timers(self, now):
        if now >= self.next_policy_check:
            self.check_availability()
        if self.connect_at is not None and now >= self.connect_at:
            self.connect()
        if self.auth_deadline is not None and now >= self.auth_deadline:
            self.disconnect("no register_ack within %g s" % (CONNECT_TIMEOUT + AUTH_TIMEOUT))
        if self.state == READY and now >= self.silence_limit():
            self.disconnect("nothing heard from the main node for %g s" % (now - self.last_heard))
        if self.state == READY and now >= self.next_heartbeat:
            self.send_heartbeat()
        for task in list(self.running.values()):
            wake_at = task.wake_at()
            if wake_at is not None and now >= wake_at:
                task.on_time(self, now)

    # -- self-fencing: give tasks up before the main node gives them away -------

    def fence_in(self):
        """Seconds until our tasks must be killed unheard, or None."""
        if not (self.running or self.queued):
            return None
        limits = []
        if self.fence_interval and self.last_contact is not None:
            limits.append(self.last_contact + self.fence_interval)
        if self.disconnect_fence and self.lost_at is not None:
            limits.append(self.lost_at + self.disconnect_fence)
        return min(limits) - contact_clock() if limits else None

    def check_fence(self):
        fence_in = self.fence_in()
        if fence_in is None or fence_in > 0:
            return
        now = contact_clock()
        if self.disconnect_fence and self.lost_at is not None \
                and now - self.lost_at >= self.disconnect_fence:
            reason = "disconnected for %.1f s" % (now - self.lost_at)
        else:
            reason = "nothing from the main node for %.1f s" % (now - self.last_contact)
        # No task_result: the main node requeues these attempts on its own.
        for task in list(self.running.values()) + list(self.queued.values()):
            self.drop(task, "task_fenced", reason)
            self.fenced.add(task.key)
        self.running.clear()
        self.queued.clear()

    def drop(self, task, event, reason):
        """End a task without a result: kill what it runs, and log it."""
        task.abandon(self)
        log("warning", event, task_id=task.key[0], attempt=task.key[1],
            device_id=self.device_id, task_type=task.task_type, reason=reason)

    def silence_limit(self):
        if self.state != READY:
            return None
        return self.last_heard + SILENT_HEARTBEATS * self.heartbeat_interval + 5.0

    # -- signals: handlers only record; the loop acts --------------------------

    def install_signals(self):
        self.wakeup, wakeup_writer = socket.socketpair()
        self.wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        self.wakeup_writer = wakeup_writer          # keep it open
        signal.set_wakeup_fd(wakeup_writer.fileno())
        self.selector.register(self.wakeup, selectors.EVENT_READ, self.drain_wakeup)
        signal.signal(signal.SIGTERM, self.on_stop_signal)
        signal.signal(signal.SIGINT, self.on_stop_signal)
        # A Python handler, even one doing nothing, makes SIGCHLD write to the
        # wakeup socket, so a child's exit ends select() at once.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def on_stop_signal(self, signum, frame):
        self.stop_signal = signum

    def drain_wakeup(self, mask):
        try:
            while self.wakeup.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def shutdown(self):
        log("info", "worker_stopping", signal=self.stop_signal, running=len(self.running),
            unacknowledged=len(self.unacked))
        for task in list(self.running.values()):
            self.drop(task, "task_abandoned", "the worker is stopping")
        self.running.clear()
        if self.sock is not None:
            self.flush()
            self.sock.close()
        self.watchdog.stop()
        log("info", "worker_stopped")

    # -- the connection ----------------------------------------------------------

    def connect(self):
        host, port = self.options.join
        self.connect_at = None
        try:
            # An ASCII name as bytes spares loading the IDNA codec and its tables.
            name = host.encode("ascii") if all(ord(c) < 128 for c in host) else host
            family, kind, proto, _, address = socket.getaddrinfo(
                name, port, 0, socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            self.disconnect("cannot resolve %s: %s" % (host, e))
            return
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            sock.close()
            self.disconnect("cannot connect: %s" % os.strerror(code))
            return
        self.sock = sock
        self.state = CONNECTING
        self.auth_deadline = time.monotonic() + CONNECT_TIMEOUT + AUTH_TIMEOUT
        self.selector.register(sock, selectors.EVENT_WRITE,
                               lambda mask, sock=sock: self.on_socket(sock, mask))

    def on_socket(self, sock, mask):
        if sock is not self.sock:       # closed earlier in this turn of the loop
            return
        if self.state == CONNECTING:
            self.on_connected()
            return
        if mask & selectors.EVENT_READ:
            self.receive()
        if mask & selectors.EVENT_WRITE and sock is self.sock:
            self.flush()

    def on_connected(self):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.disconnect("cannot connect: %s" % os.strerror(code))
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.state = AWAIT_HELLO
        self.watch_socket(writing=False)
        log("info", "connected", main_node="%s:%d" % self.options.join)

    def watch_socket(self, writing):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        key = self.selector.get_key(self.sock)
        if key.events != events:
            self.selector.modify(self.sock, events, key.data)

    def disconnect(self, reason, level="warning"):
        """Close the connection (if any) and plan the next attempt."""
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.state = DISCONNECTED
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.auth_deadline = self.next_heartbeat = None
        if self.lost_at is None:
            self.lost_at = contact_clock()
        delay = self.backoff * jitter()
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.connect_at = time.monotonic() + delay
        log(level, "disconnected", reason=reason, retry_in=round(delay, 3))

    def receive(self):
        try:
            chunk = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.disconnect("read failed: %s" % e)
            return
        if not chunk:
            self.disconnect("closed by the main node")
            return
        self.last_heard = time.monotonic()
        contact = contact_clock()
        self.inbox += chunk
        sock = self.sock
        for line in self.take_frames():
            if self.state == READY:     # only a main node that proved the token counts
                self.last_contact = contact
            self.on_frame(line)
            if self.sock is not sock:     # that frame ended the connection
                return

    def take_frames(self):
        """Complete lines off the front of the inbox; an over-long one ends the link."""
        lines = self.inbox.split(b"\n")
        self.inbox = bytearray(lines.pop())
        if len(self.inbox) > MAX_FRAME_BYTES or any(len(l) > MAX_FRAME_BYTES for l in lines):
            self.send(ERROR, {"code": "frame_too_large",
                              "message": "frame over the %d byte limit" % MAX_FRAME_BYTES})
            self.flush()
            self.disconnect("the main node sent a frame over %d bytes" % MAX_FRAME_BYTES)
            return []
        return lines

    def send(self, message_type, data):
        if self.sock is not None:
            self.outbox += encode_frame(message_type, data, self.device_id)

    def tell(self, message_type, data):
        """Send only on a registered connection; task news waits for the next one."""
        if self.state == READY:
            self.send(message_type, data)

    def flush(self):
        if self.sock is None or self.state == CONNECTING:
            return
        try:
            sent = self.sock.send(self.outbox) if self.outbox else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.disconnect("write failed: %s" % e)
            return
        del self.outbox[:sent]
        self.watch_socket(writing=bool(self.outbox))

    # -- frames --------------------------------------------------------------------

    def on_frame(self, line):
        try:
            envelope = loads(line)
        except ValueError:
            envelope = None
        if (not isinstance(envelope, dict) or not isinstance(envelope.get("message_type"), str)
                or not isinstance(envelope.get("data", {}), dict)):
            log("warning", "bad_frame", frame=line[:200].decode("utf-8", "replace"))
            self.send(ERROR, {"code": "bad_frame", "message": "not a JSON envelope"})
            return
        kind, data = envelope["message_type"], envelope.get("data", {})
        if kind == ERROR:
            self.on_error(data)
        elif self.state == AWAIT_HELLO and kind == HELLO:
            self.on_hello(data)
        elif self.state == AWAIT_ACK and kind == REGISTER_ACK:
            self.on_register_ack(data)
        elif self.state != READY:
            # Above all, no task_assign before the main node has proved the token.
            self.disconnect("%s before registration" % kind[:50], level="error")
        elif kind in self.HANDLERS:
            self.HANDLERS[kind](self, data)
        else:
            log("debug", "frame_ignored", message_type=kind[:50])

    def on_error(self, data):
        code, message = data.get("code"), data.get("message")
        if code == "auth_failed":
            log("error", "auth_failed", message="wrong join token: the main node refused"
                " this worker's proof; check --token", detail=message)
        elif code == "stale_result":
            log("info", "stale_result", task_id=data.get("task_id"),
                attempt=data.get("attempt"), message=message)
        else:
            log("error" if self.state != READY else "warning", "error_from_main_node",
                code=code, message=message)

    def on_hello(self, data):
        server_nonce = data.get("nonce")
        if not isinstance(server_nonce, str) or not server_nonce:
            self.disconnect("hello without a nonce", level="error")
            return
        if data.get("protocol") != PROTOCOL_VERSION:
            log("warning", "protocol_mismatch", ours=PROTOCOL_VERSION,
                theirs=data.get("protocol"))
        self.nonces = (server_nonce, new_nonce())
        register = self.profile()
        register.update(device_id=self.device_id, protocol=PROTOCOL_VERSION,
                        nonce=self.nonces[1], active_tasks=self.active_tasks(),
                        fenced_tasks=self.tell_fenced(),
                        proof=sign(self.options.token, "rc-worker", self.nonces[0],
                                   self.nonces[1], self.device_id))
        self.send(REGISTER, register)
        self.state = AWAIT_ACK

    def on_register_ack(self, data):
        expected = sign(self.options.token, "rc-server", self.nonces[0], self.nonces[1],
                        self.device_id)
        if not proofs_match(expected, data.get("proof")):
            log("error", "server_proof_wrong", message="the main node did not prove it"
                " knows the join token; none of its tasks will run")
            self.disconnect("main node failed to prove the join token", level="error")
            return
        interval = data.get("heartbeat_interval")
        if is_number(interval) and interval > 0:
            self.heartbeat_interval = float(interval)
        # Kept through later disconnections; a main node that sends none wants no fencing.
        self.fence_interval = positive_or_none(data.get("fence_interval"))
        self.disconnect_fence = positive_or_none(data.get("disconnect_fence"))
        self.last_contact = contact_clock()
        self.lost_at = None
        self.fenced_known()
        self.state = READY
        self.auth_deadline = None
        self.backoff = BACKOFF_START
        log("info", "registered", device_id=self.device_id, resending=len(self.unacked),
            active_tasks=len(self.running) + len(self.queued),
            heartbeat_interval=self.heartbeat_interval, fence_interval=self.fence_interval,
            disconnect_fence=self.disconnect_fence)
        for result in self.unacked.values():
            self.send(TASK_RESULT, result)
        self.send_heartbeat()     # metrics for the dashboard now, not in a minute

    def on_task_assign(self, data):
        key = (data.get("task_id"), data.get("attempt"))
        if not (is_int(key[0]) and is_int(key[1])):
            self.send(ERROR, {"code": "bad_request",
                              "message": "task_assign needs integer task_id and attempt"})
            return
        if key in self.running or key in self.queued:
            log("debug", "duplicate_assign", task_id=key[0], attempt=key[1])
            return
        if key in self.unacked:       # our result was lost on the way
            self.send(TASK_RESULT, self.unacked[key])
            return
        task_type = data.get("task_type")
        if task_type not in self.options.task_types:
            self.report(result_data(key, OUTCOME_NOT_ALLOWED,
                                    error="this worker does not accept %r tasks" % task_type))
            return
        timeout = data.get("timeout")
        timeout = float(timeout) if is_number(timeout) and timeout > 0 else None
        task = TASK_CLASSES[task_type](key, data.get("payload"), timeout)
        if not self.availability.available and task_type not in INSTANT_TASK_TYPES:
            self.hand_back(task)      # assigned before our last heartbeat arrived
            return
        self.queued[key] = task

    def on_task_cancel(self, data):
        key = (data.get("task_id"), data.get("attempt"))
        if key in self.queued:
            self.finish(self.queued.pop(key), OUTCOME_CANCELLED, error="cancelled")
        elif key in self.running:
            self.running[key].stop(self, OUTCOME_CANCELLED)
        else:
            log("info", "cancel_ignored", task_id=key[0], attempt=key[1],
                reason="not running here")

    def on_task_result_ack(self, data):
        key = (data.get("task_id"), data.get("attempt"))
        if self.unacked.pop(key, None) is not None:
            log("debug", "result_acknowledged", task_id=key[0], attempt=key[1])

    def on_heartbeat_ack(self, data):
        # Hearing it is the point (see silence_limit); it also means the
        # heartbeat, and the fenced tasks it listed, are on record.
        self.fenced_known()

    def tell_fenced(self):
        """Fenced tasks for the next register or heartbeat: the main node
        requeues them without blaming the task."""
        self.fenced_told = set(self.fenced)
        return [{"task_id": key[0], "attempt": key[1]} for key in sorted(self.fenced_told)]

    def fenced_known(self):
        self.fenced -= self.fenced_told
        self.fenced_told = set()

    HANDLERS = {TASK_ASSIGN: on_task_assign, TASK_CANCEL: on_task_cancel,
                TASK_RESULT_ACK: on_task_result_ack, HEARTBEAT_ACK: on_heartbeat_ack}

    # -- tasks ---------------------------------------------------------------------

    def start_queued(self):
        # Instant tasks take no slot: they are done before the next line runs.
        for key in [key for key, task in self.queued.items()
                    if task.task_type in INSTANT_TASK_TYPES]:
            self.start_task(key, self.queued.pop(key))
        if not self.availability.available:
            for task in list(self.queued.values()):
                self.hand_back(task)
        while self.queued and len(self.running) < self.options.slots:
            self.start_task(*self.queued.popitem(last=False))

    def start_task(self, key, task):
        self.running[key] = task
        task.started = time.monotonic()
        if task.timeout:
            task.deadline = task.started + task.timeout
        if task.task_type not in INSTANT_TASK_TYPES:    # their result says it all
            self.tell(TASK_ACCEPT, {"task_id": key[0], "attempt": key[1]})
        log(self.task_log_level(task), "task_started", task_id=key[0], attempt=key[1],
            device_id=self.device_id, task_type=task.task_type)
        try:
            task.start(self)
        except BadPayload as e:
            self.finish(task, OUTCOME_FAILED, error=str(e))

    def finish(self, task, status, error=None, **result):
        self.running.pop(task.key, None)
        data = result_data(task.key, status, error, execution_time=task.elapsed(), **result)
        self.report(fit_result(data, self.device_id))
        log(self.task_log_level(task, status), "task_finished", task_id=task.key[0],
            attempt=task.key[1], device_id=self.device_id, task_type=task.task_type,
            status=status, error=error, execution_time=data["result"]["execution_time"])

    def task_log_level(self, task, status=OUTCOME_COMPLETED):
        quiet = task.quiet and status == OUTCOME_COMPLETED and not self.options.log_tasks
        return "debug" if quiet else "info"

    def report(self, data):
        """Send a task_result, and keep it until the main node acknowledges it."""
        key = (data["task_id"], data["attempt"])
        self.unacked[key] = data
        self.tell(TASK_RESULT, data)
        if data["status"] == OUTCOME_NOT_ALLOWED:
            log("info", "task_not_allowed", task_id=key[0], attempt=key[1], error=data["error"])

    def active_tasks(self):
        keys = list(self.running) + list(self.queued)
        return [{"task_id": key[0], "attempt": key[1]} for key in keys]

    def send_heartbeat(self):
        self.next_heartbeat = time.monotonic() + self.heartbeat_interval
        busy = self.running or self.queued
        self.send(HEARTBEAT, {"system_metrics": self.metrics.sample(),
                              "status": "busy" if busy else "idle",
                              "active_tasks": self.active_tasks(),
                              "fenced_tasks": self.tell_fenced(),
                              "availability": self.availability.report()})

    def profile(self):
        """What register says about this device (and system_info reports)."""
        info, specs = device_info(), hardware_specs(self.power, self.speed)
        return {"device_info": info, "hardware_specs": specs,
                "capabilities": capabilities(), "task_types": list(self.options.task_types),
                "tags": list(self.options.tags),
                "role": self.options.role or guess_role(info["platform"], specs.get("disk_gb")),
                "slots": self.options.slots, "availability": self.availability.report()}

    # -- a good guest: the availability policy --------------------------------------

    def check_availability(self):
        self.next_policy_check = time.monotonic() + self.options.policy_interval
        sessions = {task.proc.pid for task in self.running.values()
                    if getattr(task, "proc", None) is not None}
        if not self.availability.check(own_cpu_seconds(sessions)
                                       if self.availability.owner else 0.0):
            return
        available, reason = self.availability.available, self.availability.reason
        log("info" if available else "warning", "availability_changed",
            device_id=self.device_id, available=available, reason=reason)
        if self.state == READY:
            self.send_heartbeat()    # the scheduler must know now, not in a minute
        if available:
            return
        for task in list(self.queued.values()):
            self.hand_back(task)
        if self.options.on_unavailable == "hand-back":
            for task in list(self.running.values()):
                self.hand_back(task)

    def hand_back(self, task):
        """Give a task back without running it to the end: the main node
        queues it again, uncharged, for another device."""
        self.queued.pop(task.key, None)
        if task.key in self.running:
            task.abandon(self)
        self.finish(task, OUTCOME_HANDED_BACK, error=self.availability.reason or "unavailable")


###############################################################################
# Self-test: every task type, locally, without a main node ####################
###############################################################################

SELF_TEST = (("echo", {"message": "hello"}, "hello"),
             ("sleep", {"seconds": 0.1}, ""),
             ("system_info", {}, None),
             ("python_eval", {"expression": "6 * 7"}, "42"),
             ("python_exec", {"code": "print('ok')"}, "ok\n"),
             ("shell", {"command": "echo ok"}, "ok\n"))


def self_test(worker):
    import json as pretty
    worker.install_signals()
    worker.check_availability()
    found = worker.profile()
    found["system_metrics"] = worker.metrics.sample()
    found["limits"] = {"max_memory_mb": worker.options.max_memory or None,
                       "max_file_size_mb": worker.options.max_file_size or None,
                       "open_files": TASK_OPEN_FILES}
    print(pretty.dumps(found, indent=2, sort_keys=True))
    # Whatever the owner's rules say now, the point is whether tasks can run here.
    worker.availability.available, worker.next_policy_check = True, float("inf")
    for number, (task_type, payload, _) in enumerate(SELF_TEST, 1):
        worker.on_task_assign({"task_id": number, "attempt": 1, "task_type": task_type,
                               "payload": payload, "timeout": 30})
    give_up = time.monotonic() + 60
    while (worker.queued or worker.running) and time.monotonic() < give_up:
        worker.turn()
    failures = 0
    for number, (task_type, _, expected) in enumerate(SELF_TEST, 1):
        data = worker.unacked.get((number, 1), {"status": "no result", "result": {}})
        wanted = OUTCOME_COMPLETED if task_type in worker.options.task_types \
            else OUTCOME_NOT_ALLOWED
        ok = data["status"] == wanted and (wanted != OUTCOME_COMPLETED or expected is None
                                           or data["result"]["output"] == expected)
        failures += not ok
        print("%-12s %-12s %s" % (task_type, data["status"], "ok" if ok else
                                  "FAILED: %r" % (data.get("error") or data["result"],)))
    worker.shutdown()
    return 1 if failures else 0


###############################################################################
# Command line ################################################################
###############################################################################

def join_address(text):
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    import argparse
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, DEFAULT_PORT
    try:
        port = int(port)
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536:
        raise argparse.ArgumentTypeError("expected HOST or HOST:PORT, got %r" % text)
    return host, port


def positive(kind):
    import argparse

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError("must be a number above 0, got %r" % text)
        return value
    return check


def default_device_id():
    import re
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "worker"


def not_negative(kind):
    import argparse

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < 0:
            raise argparse.ArgumentTypeError("must be a number, at least 0, got %r" % text)
        return value
    return check


def percent(text):
    value = not_negative(float)(text)
    if value > 100:
        import argparse
        raise argparse.ArgumentTypeError("must be a percentage from 0 to 100, got %r" % text)
    return value


def hours_window(text):
    """HH:MM-HH:MM as (start, end) minutes after midnight; it may span midnight."""
    import argparse
    import re
    match = re.match(r"(\d{1,2}):(\d\d)-(\d{1,2}):(\d\d)\Z", text.strip())
    numbers = [int(x) for x in match.groups()] if match else [99, 0, 0, 0]
    if numbers[0] > 23 or numbers[2] > 23 or numbers[1] > 59 or numbers[3] > 59:
        raise argparse.ArgumentTypeError("expected HH:MM-HH:MM, got %r" % text)
    return numbers[0] * 60 + numbers[1], numbers[2] * 60 + numbers[3]


def default_max_memory():
    """MiB of address space per task: half the RAM, and at least MIN_MEMORY_MB."""
    gb = memory_gb() or 0
    return max(MIN_MEMORY_MB, int(gb * 1024 / 2))


def config_arguments(parser, argv):
    """--config FILE: a JSON object whose keys are the long options ("min_battery":
    20, "only_when_charging": true, "tag": ["a", "b"]), turned into arguments
    that go before the command line's, so that the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    for number, argument in enumerate(argv):
        if argument == "--config" and number + 1 < len(argv):
            path = argv[number + 1]
        elif argument.startswith("--config="):
            path = argument.split("=", 1)[1]
    if path is None:
        return argv
    import json as config_json
    try:
        with open(os.path.expanduser(path)) as f:
            settings = config_json.load(f)
    except (OSError, ValueError) as e:
        parser.error("cannot read --config %s: %s" % (path, e))
    if not isinstance(settings, dict):
        parser.error("--config %s must hold one JSON object" % path)
    arguments = []
    for key, value in settings.items():
        option = "--" + key.replace("_", "-")
        if option not in parser._option_string_actions or option == "--config":
            parser.error("--config %s: unknown setting %r" % (path, key))
        for value in (value if isinstance(value, list) else [value]):
            if value is True:
                arguments.append(option)
            elif value not in (False, None):
                arguments.extend([option, str(value)])
    return arguments + argv


def parse_args(argv=None):
    import argparse
    import re
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Join this device to a Retire-Cluster main node.")
    parser.add_argument("--config", metavar="FILE", help="a JSON file of these options"
                        " (e.g. {\"min_battery\": 30}); the command line wins")
    parser.add_argument("--join", metavar="HOST[:PORT]", type=join_address,
                        help="the main node (port %d by default)" % DEFAULT_PORT)
    parser.add_argument("--token", help="the join token (`rc token` on the main node)")
    parser.add_argument("--token-file", metavar="FILE", help="read the join token from FILE")
    parser.add_argument("--device-id", metavar="ID", default=default_device_id(),
                        help="1-64 characters of [A-Za-z0-9._-] (default: the host name)")
    parser.add_argument("--role", help="compute, storage, mobile... (default: guessed:"
                        " mobile on Android, storage with a disk of %d GB or more,"
                        " compute)" % STORAGE_DISK_GB)
    parser.add_argument("--slots", type=positive(int), default=os.cpu_count() or 1,
                        help="tasks run at once (default: CPU count, %(default)s)")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help="a free label; may be repeated")
    parser.add_argument("--allow", action="append", default=[], metavar="TYPE,...",
                        help="accept only these task types")
    parser.add_argument("--deny", action="append", default=[], metavar="TYPE,...",
                        help="never accept these task types")
    parser.add_argument("--heartbeat", type=positive(float), default=HEARTBEAT_INTERVAL,
                        metavar="SECONDS", help="until the main node says otherwise"
                        " (default: %(default)g)")
    parser.add_argument("--output-cap", type=positive(int), default=OUTPUT_CAP,
                        metavar="BYTES", help="bytes kept of a task's stdout and of its"
                        " stderr (default: %(default)d)")
    limits = parser.add_argument_group("limits on each task")
    limits.add_argument("--max-memory", type=not_negative(int), default=default_max_memory(),
                        metavar="MB", help="MiB of address space (0: no limit;"
                        " default: half the RAM, at least %d: %%(default)d)" % MIN_MEMORY_MB)
    limits.add_argument("--max-file-size", type=not_negative(int), default=MAX_FILE_MB,
                        metavar="MB", help="MiB, the largest file it may write (0: no"
                        " limit; default: %(default)d)")
    guest = parser.add_argument_group("a good guest: when this device takes new tasks")
    guest.add_argument("--only-when-charging", action="store_true",
                       help="only while on external power")
    guest.add_argument("--min-battery", type=percent, metavar="PCT",
                       help="stop below PCT %% battery")
    guest.add_argument("--resume-battery", type=percent, metavar="PCT",
                       help="resume only at PCT %% (default: --min-battery + %d)"
                       % BATTERY_RESUME_MARGIN)
    guest.add_argument("--max-temperature", type=float, metavar="C",
                       help="stop above C degrees Celsius, resume %g below"
                       % TEMPERATURE_RESUME_MARGIN)
    guest.add_argument("--idle-minutes", type=positive(float), metavar="M",
                       help="only when the owner has been idle (no keyboard, mouse or"
                       " terminal input, no other program busy) for M minutes")
    guest.add_argument("--quiet-hours", type=hours_window, metavar="HH:MM-HH:MM",
                       help="no new tasks in this window of local time")
    guest.add_argument("--on-unavailable", choices=("finish", "hand-back"), default="finish",
                       help="what running tasks do when the device becomes unavailable"
                       " (default: %(default)s)")
    guest.add_argument("--policy-interval", type=positive(float), default=POLICY_INTERVAL,
                       metavar="SECONDS", help="how often the rules are checked"
                       " (default: %(default)g)")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS, key=LOG_LEVELS.get),
                        default="info")
    parser.add_argument("--log-tasks", action="store_true",
                        help="log the start and end of every task at info level, echo"
                        " included (it is logged at debug level otherwise)")
    parser.add_argument("--self-test", action="store_true",
                        help="print the profile, run each task type locally, and exit")
    parser.add_argument("--version", action="version", version=__version__)
    options = parser.parse_args(config_arguments(parser, argv))
    if options.min_battery is not None and options.resume_battery is None:
        options.resume_battery = min(100.0, options.min_battery + BATTERY_RESUME_MARGIN)
    if options.resume_battery is not None and options.resume_battery < (options.min_battery or 0):
        parser.error("--resume-battery must be at least --min-battery")
    if not re.match(r"[A-Za-z0-9._-]{1,64}\Z", options.device_id):
        parser.error("--device-id must be 1-64 characters of [A-Za-z0-9._-]")
    options.task_types = task_types(parser, options.allow, options.deny)
    if not options.self_test:
        if options.join is None:
            parser.error("--join HOST[:PORT] is required")
        options.token = join_token(parser, options)
    return options


def task_types(parser, allow, deny):
    def names(lists):
        chosen = [name.strip() for text in lists for name in text.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(TASK_TYPES))
        if unknown:
            parser.error("unknown task type %s (known: %s)"
                         % (", ".join(unknown), ", ".join(TASK_TYPES)))
        return set(chosen)
    allowed = names(allow) or set(TASK_TYPES)
    denied = names(deny)
    return tuple(t for t in TASK_TYPES if t in allowed and t not in denied)


def join_token(parser, options):
    # Tasks run with our environment: the token must not be in it.
    token = os.environ.pop("RC_TOKEN", None)
    if options.token_file:
        try:
            with open(os.path.expanduser(options.token_file)) as f:
                token = f.read()
        except OSError as e:
            parser.error("cannot read --token-file: %s" % e)
    if options.token is not None:
        token = options.token
    token = (token or "").strip()
    if not token:
        parser.error("a join token is required: --token, --token-file or RC_TOKEN")
    return token


def main(argv=None):
    global log_threshold
    options = parse_args(argv)
    log_threshold = LOG_LEVELS[options.log_level]
    if options.self_test:
        log_threshold = LOG_LEVELS["warning"]    # the report is the output
        return self_test(Worker(options))
    return Worker(options).run()


if __name__ == "__main__":
    sys.exit(main())
