"""Settings: defaults, overridden by etc/rc.json, overridden by environment.

RC_CONFIG names another config file, RC_HOME the state directory (var/ in the
checkout by default), RC_TCP_PORT, RC_WEB_PORT and RC_FILES_PORT the three ports, so that two
clusters can run side by side on one box.

`make run` (through `rc init`) records those variables in the state directory
(STARTED_WITH), and every later command with the same RC_HOME reads them back
for the ones its own environment does not set: `bin/rc join` in a new shell
prints the ports the cluster listens on, `rc health` uses its thresholds.
"""
import errno
import json
import math
import os
import socket

from rc.bounded import LARGEST as LARGEST_INT
from rc.defaults import DEFAULTS
from rc.log import LEVELS

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG_PATH = os.path.join(CHECKOUT, "etc", "rc.json")
DEFAULT_HOME = os.path.join(CHECKOUT, "var")
# The variables a cluster is started with that every command must agree on.
RECORDED_VARIABLES = ("RC_CONFIG", "RC_TCP_PORT", "RC_WEB_PORT", "RC_FILES_PORT")
STARTED_WITH = "started_with.json"    # in the state directory: those variables, as given
# Each port the main node listens on: its setting, the host setting it binds
# with, and the variable that moves it.
PORTS = (("tcp_port", "tcp_host", "RC_TCP_PORT"), ("web_port", "web_host", "RC_WEB_PORT"),
         ("files_port", "tcp_host", "RC_FILES_PORT"))
WORKER_PATH = os.path.join(CHECKOUT, "bin", "worker.py")
# The worker options `rc local-worker` gives itself (its main node, its
# secret's place, what its tasks may not see): local_worker_options may not.
LOCAL_WORKER_OWN_OPTIONS = ("--join", "--token", "--token-file", "--device-id", "--state-dir",
                            "--web-port", "--fingerprint", "--fingerprint-file", "--hide",
                            "--read-only")


# Settings that take one of a few words: checked as the file is read, so that
# `make run` and `rc` refuse a wrong one, not each program as it starts.
CHOICES = {"log_level": tuple(LEVELS),
           "read_access": ("open", "local", "token")}
# The largest number a setting that is not a whole number may be: each is
# seconds, days or a percentage, and a pause or a select() of more than ~292
# years is an OverflowError (rc-reaper died at each start on reaper_interval
# 1e308). A whole-number setting may be what SQLite holds (LARGEST_INT).
LARGEST_FLOAT = 10 ** 9          # seconds: 31 years
DAY = 86400.0
WEEK = 7 * DAY
# Settings with a smaller ceiling, where a value representable but absurd
# costs something: threads or connections held, memory or rows kept, a pause
# of more than a day in a loop (nothing looked at meanwhile), a timeout past
# a day that holds a connection or a task. max_streams 10**6 made waitress
# start a million threads. docs/configuration.md lists them.
LARGEST = {
    "max_streams": (1000, "each holds one of rc-web's threads, started with it"),
    "web_connection_limit": (65536, "each is a file descriptor of rc-web's"),
    "web_connections_per_address": (65536, "each is a file descriptor of rc-web's"),
    "max_unauthenticated": (65536, "each is a file descriptor of rc-server's"),
    "max_unauthenticated_per_address": (65536, "each is a file descriptor of rc-server's"),
    "max_profile_bytes": (1 << 20, "a frame is at most 1 MiB"),
    "max_device_slots": (1024, "each slot is a task on the device at once"),
    "instant_per_slot": (1024, "each may hold a 256 KiB payload on the device"),
    "prefetch_per_slot": (100, "each waits in the worker's memory"),
    "heartbeat_history": (10 ** 6, "rows kept per device"),
    "device_log_lines": (10 ** 6, "rows kept per device"),
    "stats_history": (10 ** 7, "rows kept, one a minute: 19 years"),
    "health_disk_free_warning": (100.0, "a percentage"),
    "health_disk_free_critical": (100.0, "a percentage"),
    "offline_timeout": (WEEK, "a device gone that long still gets tasks"),
    "lease_duration": (WEEK, "a lost device's task waits that long"),
}
LARGEST.update((key, (DAY, "a day: a longer pause or timeout holds up what waits on it"))
               for key in ("heartbeat_interval", "min_heartbeat_interval",
                           "watch_report_interval", "ping_interval", "poll_interval",
                           "reaper_interval", "map_recheck_interval", "retry_backoff",
                           "retry_backoff_max", "service_restart_backoff",
                           "service_restart_backoff_max", "auth_timeout", "frame_deadline",
                           "web_channel_timeout", "web_read_timeout", "suspect_after",
                           "disconnect_grace", "accept_timeout", "restart_hold",
                           "timeout_grace"))
# Settings 0 cannot be: a pause of none is a busy loop (rc-reaper took ~35%
# of a core with reaper_interval 0), and heartbeat_interval 0 let
# lease_duration be 0.
ABOVE_ZERO = ("heartbeat_interval", "poll_interval", "reaper_interval")
# Settings that are lists of text (local_worker_options: check_local_worker_options).
TEXT_LISTS = ("allowed_hosts",)


class ConfigError(Exception):
    """The configuration cannot be used; the message says why."""


class Config:
    """The settings of one cluster, with the paths of its state directory."""

    def __init__(self, settings, home):
        self.__dict__.update(settings)
        self.home = home
        self.db_path = os.path.join(home, "db", "rc.db")
        self.log_dir = os.path.join(home, "log")
        self.run_dir = os.path.join(home, "run")
        self.token_path = os.path.join(home, "token")          # workers join with it
        # HTTP requests that change the cluster need it; never given to workers.
        self.admin_token_path = os.path.join(home, "admin_token")
        # Names this cluster to workers, which keep one secret per cluster.
        self.cluster_id_path = os.path.join(home, "cluster_id")
        self.web_token_path = self.admin_token_path   # its name before the admin token

    def as_dict(self):
        return {key: getattr(self, key) for key in DEFAULTS}


def load(path=None, environ=None):
    environ = os.environ if environ is None else environ
    home = os.path.abspath(environ.get("RC_HOME") or DEFAULT_HOME)
    environ = dict(recorded_environment(home), **{key: value for key, value in environ.items()
                                                  if value})
    path = path or environ.get("RC_CONFIG") or DEFAULT_CONFIG_PATH
    settings = dict(DEFAULTS)
    settings.update(read_file(path))
    for key, _, variable in PORTS:
        if environ.get(variable):
            settings[key] = check(key, parse_int(variable, environ[variable]))
    check_together(settings, path)
    return Config(settings, home)


def ports_taken(config):
    """Before a start: why the cluster's programs could not all listen, if
    one port is given twice or something on this box already holds one
    (another cluster, started with only RC_TCP_PORT and RC_WEB_PORT moved?),
    saying which variable moves each, or a host setting names an address
    this machine has not; None when every one is free. Only these are
    named: the program itself reports any other reason."""
    given = {}
    for key, _, variable in PORTS:
        given.setdefault(getattr(config, key), []).append(variable)
    for port, variables in given.items():
        if len(variables) > 1:
            return ("%s are the same port, %d: the three ports must differ (README,"
                    " Configuration)" % (" and ".join(variables), port))
    for host_key in ("tcp_host", "web_host"):
        # Its program exited with cannot_listen, and make run waited 30 s
        # for it: "no sign of rc-server on 192.0.2.99:8080".
        if address_not_here(getattr(config, host_key)):
            return ("%s is %r, not an address of this machine: give one it has, or"
                    " \"0.0.0.0\" (every IPv4 address) or \"::\" (IPv6 too)"
                    " (docs/configuration.md)" % (host_key, getattr(config, host_key)))
    taken = ["%d (%s, %s)" % (getattr(config, key), key, variable)
             for key, host_key, variable in PORTS
             if port_in_use(getattr(config, host_key), getattr(config, key))]
    if not taken:
        return None
    # Ports 10, 20, ... up that are free now: +10 alone was often the next
    # cluster's (a third beside two was told the second's ports).
    step = next((step for step in range(10, 210, 10)
                 if all(getattr(config, key) + step <= 65535
                        and not port_in_use(getattr(config, host_key), getattr(config, key) + step)
                        for key, host_key, _ in PORTS)), 10)
    return ("another cluster or program on this box holds port %s: start this cluster on"
            " free ports, e.g. `RC_HOME=%s %s make run` (README, Configuration)"
            % (" and ".join(taken), config.home,
               " ".join("%s=%d" % (variable, getattr(config, key) + step)
                        for key, _, variable in PORTS)))


def address_not_here(host):
    """Whether `host` is an address (or a name of one) this machine cannot
    listen on: binding to it, on any free port, is EADDRNOTAVAIL."""
    try:
        family, address = listen_address(host, 0)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except socket.gaierror:       # a name that resolves to nothing: make run waited 30 s
        return True
    except OSError as e:
        return e.errno == errno.EADDRNOTAVAIL
    except UnicodeError:          # a name no resolver takes (a label past 63 characters)
        return True
    return False


def port_in_use(host, port):
    """Whether something on this box listens on `port` where a program
    listening on `host` would bind."""
    try:
        family, address = listen_address(host, port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    return False


def listen_address(host, port):
    """(family, address) a program listening on `host` binds: an IPv6 one
    for "::" or "::1", every IPv4 address for "" as for "0.0.0.0"."""
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return family, address


def started_with_path(home):
    return os.path.join(home, STARTED_WITH)


def recorded_environment(home):
    """The RC_CONFIG and ports the cluster in `home` was last started with
    ({} before its first start, or when the record cannot be read)."""
    try:
        with open(started_with_path(home), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {key: value for key, value in recorded.items()
            if key in RECORDED_VARIABLES and isinstance(value, str) and value}


def record_environment(home, environ=None):
    """Keep the RC_CONFIG and ports given now (RC_CONFIG as an absolute
    path) on top of those recorded before; returns what is recorded.
    Written whole or not at all, owner-only like everything in `home`."""
    environ = os.environ if environ is None else environ
    recorded = recorded_environment(home)
    for key in RECORDED_VARIABLES:
        if environ.get(key):
            recorded[key] = environ[key]
    if "RC_CONFIG" in recorded:
        recorded["RC_CONFIG"] = os.path.abspath(recorded["RC_CONFIG"])
    temporary = started_with_path(home) + ".new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, started_with_path(home))
    return recorded


def read_file(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise ConfigError("%s: not valid JSON: %s" % (path, e))
    if not isinstance(data, dict):
        raise ConfigError("%s: must hold one JSON object" % path)
    return {key: check(key, value, path) for key, value in data.items()}


def check(key, value, where="environment"):
    if key not in DEFAULTS:
        raise ConfigError("%s: unknown setting %r" % (where, key))
    default = DEFAULTS[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError("%s: %s must be %s, not %r"
                          % (where, key, type(default).__name__, value))
    if isinstance(value, float) and not math.isfinite(value):
        # Python's json reads NaN and Infinity, which JSON does not allow,
        # and NaN is not below zero: rc-reaper died at each start on it.
        raise ConfigError("%s: %s must be a finite number, not %r" % (where, key, value))
    if isinstance(value, (int, float)) and value < 0:
        raise ConfigError("%s: %s must not be negative" % (where, key))
    largest = LARGEST_FLOAT if isinstance(value, float) else LARGEST_INT
    if isinstance(value, (int, float)) and value > largest:
        raise ConfigError("%s: %s must be at most %d, not %r" % (where, key, largest, value))
    if key in LARGEST and value > LARGEST[key][0]:
        raise ConfigError("%s: %s must be at most %s (%s), not %r"
                          % (where, key, shown_number(LARGEST[key][0]), LARGEST[key][1], value))
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError("%s: %s must be one of %s, not %r"
                          % (where, key, ", ".join(CHOICES[key]), value))
    if key in TEXT_LISTS and not all(isinstance(item, str) for item in value):
        raise ConfigError("%s: %s must be a list of strings, not %r" % (where, key, value))
    if key.endswith("_port") and not 0 <= value <= 65535:
        raise ConfigError("%s: %s must be a port number (0 to 65535), not %r"
                          % (where, key, value))
    return value


def check_together(settings, where):
    for key in ABOVE_ZERO:
        if settings[key] == 0:
            raise ConfigError("%s: %s must be more than 0" % (where, key))
    # A worker gives up its tasks half a heartbeat before its lease ends, and
    # must still hear at least one heartbeat acknowledged in that time.
    check_heartbeats_fit("lease_duration", settings, where)
    # Only a heartbeat shows a device is there: a shorter wait marked a
    # connected device offline between two of them, and the reaper took back
    # what it ran (a 12 s task failed "retries spent: device offline").
    check_heartbeats_fit("offline_timeout", settings, where)
    check_local_worker_options(settings["local_worker_options"], where)
    # A rule misspelt was found only by rc-reaper, which logged
    # alert_rules_invalid each minute and raised no alert, while make run
    # said the cluster was healthy.
    from rc import alerts       # here: it brings health and the database, which config needs not
    try:
        alerts.check_rules(settings["alerts"])
    except ValueError as e:
        raise ConfigError("%s: alerts: %s" % (where, e))


def check_heartbeats_fit(key, settings, where):
    """`key` at least 1.5 heartbeat intervals, or a line giving both
    values: the file may set one and the default the other."""
    least = 1.5 * settings["heartbeat_interval"]
    if settings[key] < least:
        raise ConfigError("%s: %s must be at least 1.5 x heartbeat_interval (%g s with"
                          " heartbeat_interval %g), not %g"
                          % (where, key, least, settings["heartbeat_interval"], settings[key]))


def check_local_worker_options(options, where):
    """Strings, each an option of bin/worker.py or its value (the worker
    itself says which it does not know), none of those rc local-worker sets."""
    for option in options:
        if not isinstance(option, str):
            raise ConfigError("%s: local_worker_options must be strings (the worker's command"
                              " line), not %r" % (where, option))
        name = option.split("=", 1)[0]
        # The worker's argparse takes an abbreviation (--state for --state-dir),
        # and the last of two wins: these come after rc local-worker's own.
        if name.startswith("--") and len(name) > 2 and any(
                own.startswith(name) for own in LOCAL_WORKER_OWN_OPTIONS):
            raise ConfigError("%s: local_worker_options may not give %s: `rc local-worker`"
                              " sets it for the main node's own worker" % (where, name))


def shown_number(number):
    return "{:,}".format(int(number)) if number == int(number) else repr(number)


def parse_int(name, text):
    try:
        return int(text)
    except ValueError:
        raise ConfigError("%s must be a whole number, not %r" % (name, text))
