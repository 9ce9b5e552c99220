"""`rc tail ID [-f]`: a running task's output so far, and with -f as it
comes until the task ends (lib/rc/tails.py says how it reaches the main
node). Stdout goes to stdout and stderr to stderr, as if the task ran here;
a terminal gets escape sequences shown as "?", since a device chose them."""
import time

from rc import db, render, tails, task_options
from rc.states import COMPLETED, TERMINAL_STATES

FIRST_REPORT_WAIT = 3.0     # seconds `rc tail` waits for a running task's first report
FOLLOW_POLL = 0.5           # seconds between two looks of `rc tail -f`
STREAMS = (("stdout", "out"), ("stderr", "err"))


def add_arguments(sub):
    sub.add_argument("task_id", type=task_options.whole_number, metavar="ID")
    sub.add_argument("-f", "--follow", action="store_true",
                     help="go on printing its output as it comes, until it ends"
                          " (exit status 0 if it completed, else 1)")


class TailError(Exception):
    """What `rc tail` says on stderr, exit status 1."""


def run(arguments, context, finished):
    """Print the task's output so far; with --follow, go on until it ends.
    An ended task's output, and a followed task's when nothing of it was
    shown live, is finished(task_id)'s to print (`rc wait`'s way: all of it,
    and its exit status)."""
    connection, task_id = context.connection, arguments.task_id
    if arguments.follow and context.actor != "cli":
        raise TailError("rc tail -f holds the request open; use it on the main node, or"
                        " GET /api/v1/tasks/%d/output" % task_id)
    record = watched_output(connection, task_id, FIRST_REPORT_WAIT)
    if record is None:
        raise TailError("no task %d" % task_id)
    if record["state"] in TERMINAL_STATES:
        return finished(task_id)
    printer = Printer(context)
    printer.show(record)
    if not arguments.follow:
        if not printer.printed:
            context.err.write("rc tail: task %d is %s; nothing from it yet\n"
                              % (task_id, record["state"]))
        return 0
    while record["state"] not in TERMINAL_STATES:
        time.sleep(FOLLOW_POLL)
        record = watched_output(connection, task_id, 0)
        printer.show(record)
    if not printer.printed:
        return finished(task_id)
    if record["state"] == COMPLETED:
        return 0
    raise TailError("task %d %s" % (task_id, record["state"]))


def watched_output(connection, task_id, wait):
    """tails.output() of the task, which is watched for the next minute when
    it runs (written only when the watch has less than WATCH_SECONDS -
    WATCH_REFRESH left: -f looks twice a second); for up to `wait` seconds,
    until its device has reported once. None: no such task."""
    record, now = tails.output(connection, task_id), time.time()
    # A watch that had lapsed: what was kept may be old, so wait for news.
    fresh_after = now if record is not None and (record["watched_until"] or 0) < now else 0
    if record is not None and record["live"] and (record["watched_until"] or 0) \
            < now + tails.WATCH_SECONDS - tails.WATCH_REFRESH:
        with db.write(connection):
            tails.watch(connection, task_id, tails.WATCH_SECONDS, now)
    deadline = time.monotonic() + wait
    while record is not None and record["live"] and (record["updated_at"] or 0) <= fresh_after \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        record = tails.output(connection, task_id)
    return record


class Printer:
    """Writes what each stream added since it last wrote, by the byte
    offsets the records carry (a gap, when more came between two looks than
    is kept, is said on stderr)."""

    def __init__(self, context):
        self.context = context
        self.attempt = None
        self.ends = {}
        self.printed = False

    def show(self, record):
        if record["attempt"] != self.attempt:      # a new attempt writes from its start
            if self.printed:
                self.context.err.write("rc tail: attempt %s of task %d\n"
                                       % (record["attempt"], record["task_id"]))
            self.attempt, self.ends = record["attempt"], {stream: 0 for stream, _ in STREAMS}
        for stream, target in STREAMS:
            data = record[stream].encode("utf-8", "replace")
            end, shown = record[stream + "_end"], self.ends[stream]
            if end <= shown:
                continue
            new = end - shown
            if new > len(data):
                self.context.err.write("rc tail: [%d bytes of %s not kept]\n"
                                       % (new - len(data), stream))
                new = len(data)
            self.write(getattr(self.context, target), data[len(data) - new:])
            self.ends[stream] = end
            self.printed = True

    def write(self, target, data):
        text = data.decode("utf-8", "replace")
        terminal = self.context.actor != "cli" or hasattr(target, "isatty") and target.isatty()
        target.write(render.printable(text) if terminal else text)
        target.flush()

