"""The options of a task on the command line, one shape for every command
that queues tasks (`rc submit`, `rc map`, `rc schedule add`, `rc service
add`): their names, types and help are defined here once."""
import argparse

from rc import bounded
from rc.states import PRIORITIES


def whole_number(text):
    """argparse's type for counts and ids: digits only, within what SQLite
    holds, so `--limit 99999999999999999999` is a usage error, not a traceback."""
    try:
        return bounded.whole(text, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add(sub, whose, timeout=True, retry_on_failure=True, after=True):
    """--priority, --retries and --require, and as asked --timeout,
    --retry-on-failure and --after; `whose` names the task(s) they set in
    the help ("the task's", "each task's")."""
    sub.add_argument("--priority", default="normal", metavar="|".join(PRIORITIES),
                     help="%s: urgent before high before normal before low (default normal)"
                     % whose)
    if timeout:
        sub.add_argument("--timeout", metavar="SECONDS",
                         help="how long %s run may last on its device (default task_timeout,"
                         " 300)" % whose)
    sub.add_argument("--retries", type=whole_number, metavar="N",
                     help="%s re-runs after a device is lost while running it (default"
                     " task_retries, 3)" % whose)
    if retry_on_failure:
        sub.add_argument("--retry-on-failure", action="store_true",
                         help="also retry when the task itself fails (non-zero exit,"
                         " exception)")
    sub.add_argument("--require", action="append", default=[], metavar="KEY=VALUE",
                     help="e.g. cores=4, memory_gb=2, platform=linux, tags=gpu,"
                     " label.disk=big")
    if after:
        sub.add_argument("--after", action="append", default=[], metavar="ID[,ID...]",
                         help="start only when these tasks have completed; fail if one fails")
