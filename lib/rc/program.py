"""The shape every main-node program shares: files it creates owner-only,
settings, a logger, signal handlers that only set a flag (the loop notices it
between steps), the loop."""
import os
import select
import signal
import sys

from rc import config as config_module
from rc import bell, state_dir, tls
from rc.log import Logger

PR_SET_PDEATHSIG = 1        # <linux/prctl.h>: the signal this process gets when its parent dies


def serve(name, run):
    """Run `run(config, log, should_stop)` until SIGTERM or SIGINT."""
    state_dir.keep_files_private()
    config = load_config(name)
    end_with_supervisord(config.run_dir)
    log = Logger(name, config.log_level)
    run(config, log, StopFlag())
    log.info("stopped")


def load_config(name):
    """The settings; a setting no program can use ends this one with one
    line naming it (supervisord starts it again, a second later each time,
    until the file is mended), not a traceback."""
    try:
        return config_module.load()
    except config_module.ConfigError as e:
        Logger(name).error("config_error", error=str(e))
        sys.exit(2)


def end_with_supervisord(run_dir):
    """Under supervisord, on Linux: SIGTERM to this process when supervisord
    dies, as at `make stop`. One killed with -9 (or by the OOM killer) left
    every program running, orphaned: `make run` then refused, saying another
    cluster held the ports and to start this one on others (a second set of
    programs on the same database, two local workers in one state
    directory), and `make stop` said "not running" and stopped none. The
    setting outlives exec (rc local-worker's worker.py keeps it), not fork."""
    if os.environ.get("SUPERVISOR_ENABLED") != "1" or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
        with open(os.path.join(run_dir, bell.SUPERVISOR_PID_FILE)) as f:
            supervisord = int(f.read())
    except (AttributeError, OSError, ValueError):
        return
    if os.getppid() != supervisord:         # it died before the prctl: no signal will come
        sys.exit("supervisord (pid %d) is gone" % supervisord)


def require_state(config, log):
    """The files rc-server and rc-files cannot serve without (the cluster's
    id; its certificate and key when TLS is on), or one line naming those
    missing and exit 2: a state directory damaged by hand or a partial
    restore had them fail at every start with a traceback naming no file."""
    needed = [config.cluster_id_path] + (list(tls.paths(config)) if config.tls else [])
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
        log.error("state_damaged", missing=missing, message=state_damaged_advice(config, missing))
        sys.exit(2)


def state_damaged_advice(config, missing):
    """What to do about the files require_state misses. A new cluster_id
    strands every device's secret, kept under the old one's name (each
    worker then stops with device_id_taken), so the old one is better put
    back: it is that name, in any worker's state directory."""
    if config.cluster_id_path in missing:
        return ("the state directory lacks these files. Put cluster_id back before `make run`"
                " makes a new one, under which no device that joined can connect (each stops"
                " with device_id_taken): it is the name of the rc1_ directory in a worker's"
                " state directory, %s or ~/.rc-worker on a device:"
                " (umask 077; ls %s | grep ^rc1_ > %s)"
                % (os.path.join(config.home, "worker"), os.path.join(config.home, "worker"),
                   config.cluster_id_path))
    return ("the state directory lacks these files: `make run` (or `rc init`) makes them again,"
            " a new certificate, whose fingerprint each device must then be given (`rc join`"
            " prints it)")


class StopFlag:
    """Raised by SIGTERM or SIGINT; calling it says whether it is. pause()
    sleeps between steps but ends at the signal: time.sleep would sleep its
    whole interval out (Python resumes a sleep a signal interrupted, PEP 475),
    and `make stop` waited for it (rc-reaper: half a second on average).
    Python writes each signal to the wake-up fd, which ends the select."""

    def __init__(self):
        self.raised = False
        self.wake_read, wake_write = os.pipe()
        for end in (self.wake_read, wake_write):
            os.set_blocking(end, False)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self.raise_flag)

    def raise_flag(self, *_):
        self.raised = True

    def __call__(self):
        return self.raised

    def pause(self, seconds):
        if not self.raised:
            select.select([self.wake_read], [], [], seconds)
        try:
            os.read(self.wake_read, 4096)
        except OSError:     # nothing came (EAGAIN)
            pass
