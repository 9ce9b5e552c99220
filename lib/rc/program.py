"""The shape every main-node program shares: files it creates owner-only,
settings, a logger, signal handlers that only set a flag (the loop notices it
between steps), the loop."""
import signal

from rc import config as config_module
from rc import state_dir
from rc.log import Logger


def serve(name, run):
    """Run `run(config, log, should_stop)` until SIGTERM or SIGINT."""
    state_dir.keep_files_private()
    config = config_module.load()
    log = Logger(name, config.log_level)
    stop = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.append(True))
    run(config, log, lambda: bool(stop))
    log.info("stopped")
