"""The shape every main-node program shares: settings, a logger, signal
handlers that only set a flag (the loop notices it between steps), the loop."""
import signal

from rc import config as config_module
from rc.log import Logger


def serve(name, run):
    """Run `run(config, log, should_stop)` until SIGTERM or SIGINT."""
    config = config_module.load()
    log = Logger(name, config.log_level)
    stop = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.append(True))
    run(config, log, lambda: bool(stop))
    log.info("stopped")
