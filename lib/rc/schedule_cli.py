"""`rc schedule ...` and `rc service ...`: recurring tasks and services from
the command line (lib/rc/schedules.py and services.py do the work).

The web terminal runs them too: list and logs read, the rest need the
admin token (web_access)."""
import time

from rc import bell, environments, files_cli, render, schedules, services
from rc import task_options, tasks
from rc.states import PAYLOAD_FIELD, TASK_TYPES, TERMINAL_STATES

COMMANDS = ("schedule", "service")
READ_ACTIONS = ("list", "logs")     # what a reader may run in the web terminal
# What Tab offers after `schedule` and `service` in the web terminal.
ACTIONS = {"schedule": ["add", "list", "pause", "resume", "remove", "run-now"],
           "service": ["add", "list", "stop", "start", "remove", "logs"]}
SCHEDULE_COLUMNS = ["NAME", "WHEN", "TZ", "TASK", "STATE", "NEXT", "LAST", "OUTCOME"]
SERVICE_COLUMNS = ["NAME", "TASK", "PLACE", "STATE", "TASK_ID", "RUNS", "LAST_ERROR"]
SUMMARY_WIDTH = 30


def web_access(arguments):
    """"read" for looking, "admin" for changing."""
    return "read" if arguments.action in READ_ACTIONS else "admin"


# -- grammar ------------------------------------------------------------------------

def add_commands(commands, out, formats):
    """`schedule` and `service`, each with its actions, under rc's commands."""
    schedule = commands.add_parser("schedule", out=out, help="recurring tasks (cron):"
                                   " add, list, pause, resume, remove, run-now",
                                   description="Recurring tasks, fired by rc-scheduler.")
    actions = schedule.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = action(actions, out, "add", cmd_schedule_add,
                 "add a recurring task: NAME 'CRON' TYPE ARG; prints its next firing")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("when", metavar="CRON",
                     help="'*/5 * * * *', @hourly, @daily, @weekly, '@every 10m'")
    add_task_arguments(sub, timeout=True)
    sub.add_argument("--tz", metavar="ZONE",
                     help="read the cron line in this time zone (e.g. Europe/Paris);"
                     " default: the main node's local time")
    sub.add_argument("--each", action="store_true",
                     help="one task on every matching online device at each firing")
    sub.add_argument("--allow-overlap", action="store_true",
                     help="fire even while the last firing's task runs (never while"
                     " it is still queued)")
    action(actions, out, "list", cmd_schedule_list, "the schedules, next and last firing",
           [formats])
    for name, handler, text in (
            ("pause", cmd_schedule_pause, "stop firing a schedule until resumed"),
            ("resume", cmd_schedule_resume, "fire a paused schedule again (missed"
             " firings are not made up)"),
            ("remove", cmd_schedule_remove, "delete a schedule; its tasks run on"),
            ("run-now", cmd_schedule_run_now, "fire a schedule once now; prints the task")):
        action(actions, out, name, handler, text).add_argument("name", metavar="NAME")

    service = commands.add_parser("service", out=out, help="long-running tasks kept alive:"
                                  " add, list, stop, start, remove, logs",
                                  description="Services, kept running by rc-scheduler.")
    actions = service.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = action(actions, out, "add", cmd_service_add,
                 "add a service: NAME TYPE ARG, restarted whenever it ends")
    sub.add_argument("name", metavar="NAME")
    add_task_arguments(sub, timeout=False)
    sub.add_argument("--each", action="store_true",
                     help="one run on every matching device, including devices that join later")
    action(actions, out, "list", cmd_service_list, "the services and where each runs",
           [formats])
    for name, handler, text in (
            ("stop", cmd_service_stop, "stop a service: its runs are cancelled"),
            ("start", cmd_service_start, "start a stopped or failing service again"),
            ("remove", cmd_service_remove, "stop a service and delete it")):
        action(actions, out, name, handler, text).add_argument("name", metavar="NAME")
    sub = action(actions, out, "logs", cmd_service_logs,
                 "the last run's stdout and stderr (each place's)")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("-n", "--lines", type=task_options.whole_number, default=services.DEFAULT_LOG_LINES,
                     metavar="N", help="the last N lines of each stream (default %d)"
                     % services.DEFAULT_LOG_LINES)
    sub.add_argument("--json", dest="format", action="store_const", const="json",
                     help="output JSON")


def action(actions, out, name, handler, text, parents=()):
    sub = actions.add_parser(name, help=text, description=text, out=out,
                             parents=list(parents))
    sub.set_defaults(handler=handler)
    return sub


def add_task_arguments(sub, timeout):
    sub.add_argument("task_type", metavar="TYPE", help=", ".join(TASK_TYPES))
    sub.add_argument("argument", nargs="?", metavar="ARG",
                     help="the message, seconds, expression, code or command")
    task_options.add(sub, "each run's", timeout=timeout, retry_on_failure=timeout,
                     after=False)
    sub.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="an environment variable for the task; repeatable")
    files_cli.add_package_arguments(sub, "each run's")


def task_spec(arguments, context, **options):
    payload = tasks.payload_from_argument(arguments.task_type, arguments.argument)
    if arguments.env:
        payload["env"] = tasks.parse_env(arguments.env)
    try:
        packages = files_cli.python_packages(arguments.requirements, arguments.pip)
    except files_cli.FileOptionError as e:
        raise tasks.TaskError(str(e))
    if packages:
        payload[environments.PAYLOAD_FIELD] = tasks.check_packages(arguments.task_type,
                                                                   packages)
    return schedules.task_spec(context.config, arguments.task_type, payload,
                               tasks.parse_requirements(arguments.require),
                               priority=arguments.priority, retries=arguments.retries,
                               **options)


# -- schedules ------------------------------------------------------------------------

def cmd_schedule_add(arguments, context):
    spec = task_spec(arguments, context, timeout=arguments.timeout,
                     retry_on_failure=arguments.retry_on_failure or None)
    first = schedules.add(context.connection, context.config, arguments.name, arguments.when,
                          spec, arguments.tz, arguments.each, arguments.allow_overlap)
    context.audit("schedule_added", schedule=arguments.name, cron=arguments.when,
                  time_zone=arguments.tz, task_type=arguments.task_type, each=arguments.each)
    context.out.write("%s: next firing %s\n" % (arguments.name, moment(first,
                                                                        arguments.tz)))


def cmd_schedule_list(arguments, context):
    from rc import commands
    found = [context.as_read(record) for record in schedules.list_schedules(
        context.connection)]
    rows = [schedule_row(record) for record in found]
    commands.write_rows(context, arguments, rows, SCHEDULE_COLUMNS, found)


def schedule_row(record):
    return {"NAME": record["name"], "WHEN": record["cron"], "TZ": record["time_zone"] or "",
            "TASK": task_summary(record["task"]) + (" (each)" if record["each"] else ""),
            "STATE": record["state"],
            "NEXT": "" if record["paused"] else moment(record["next_fire"],
                                                        record["time_zone"]),
            "LAST": moment(record["last_run_at"], record["time_zone"]),
            "OUTCOME": record["last_outcome"] or ""}


def cmd_schedule_pause(arguments, context):
    schedules.pause(context.connection, arguments.name)
    context.audit("schedule_paused", schedule=arguments.name)
    context.out.write("%s paused\n" % arguments.name)


def cmd_schedule_resume(arguments, context):
    schedules.resume(context.connection, arguments.name)
    record = schedules.get(context.connection, arguments.name)
    context.audit("schedule_resumed", schedule=arguments.name)
    context.out.write("%s resumed: next firing %s\n"
                      % (arguments.name, moment(record["next_fire"], record["time_zone"])))


def cmd_schedule_remove(arguments, context):
    schedules.remove(context.connection, arguments.name)
    context.audit("schedule_removed", schedule=arguments.name)
    context.out.write("%s removed\n" % arguments.name)


def cmd_schedule_run_now(arguments, context):
    outcome = schedules.run_now(context.connection, context.config, arguments.name)
    bell.ring(context.config.run_dir, bell.SCHEDULER)
    context.audit("schedule_run_now", schedule=arguments.name, outcome=outcome)
    context.out.write("%s\n" % outcome)


# -- services ---------------------------------------------------------------------------

def cmd_service_add(arguments, context):
    spec = task_spec(arguments, context)
    services.add(context.connection, context.config, arguments.name, spec, arguments.each)
    context.audit("service_added", service=arguments.name, task_type=arguments.task_type,
                  each=arguments.each)
    context.out.write("%s added: rc-scheduler starts it now (`rc service list`)\n"
                      % arguments.name)


def cmd_service_list(arguments, context):
    from rc import commands
    found = [context.as_read(record) for record in services.list_services(
        context.connection, context.config)]
    rows = [row for record in found for row in service_rows(record)]
    commands.write_rows(context, arguments, rows, SERVICE_COLUMNS, found)


def service_rows(record):
    """One row per place it runs (one for a plain service)."""
    base = {"NAME": record["name"], "TASK": task_summary(record["task"])
            + (" (each)" if record["each"] else "")}
    if not record["runs"]:
        return [dict(base, STATE=record["state"])]
    return [dict(base, PLACE=run["place"] or "", STATE=run["state"], TASK_ID=run["task_id"],
                 RUNS=run["runs"], LAST_ERROR=run["last_error"] or "")
            for run in record["runs"]]


def runs_cancelled(count):
    return "%d run%s cancelled" % (count, "" if count == 1 else "s")


def cmd_service_stop(arguments, context):
    cancelled = services.stop(context.connection, context.config, arguments.name)
    context.audit("service_stopped", service=arguments.name, cancelled=cancelled)
    context.out.write("%s stopped: %s\n" % (arguments.name, runs_cancelled(cancelled)))


def cmd_service_start(arguments, context):
    services.start(context.connection, context.config, arguments.name)
    context.audit("service_started", service=arguments.name)
    context.out.write("%s started\n" % arguments.name)


def cmd_service_remove(arguments, context):
    cancelled = services.remove(context.connection, context.config, arguments.name)
    context.audit("service_removed", service=arguments.name, cancelled=cancelled)
    context.out.write("%s removed: %s\n" % (arguments.name, runs_cancelled(cancelled)))


def cmd_service_logs(arguments, context):
    found = services.logs(context.connection, context.config, arguments.name,
                          arguments.lines)
    if arguments.format == "json":
        context.out.write(render.json_text(found))
        return
    if not found:
        context.out.write("%s has not run yet\n" % arguments.name)
    for run in found:
        context.out.write("== %stask %d, %s on %s ==\n" % (
            "%s: " % run["place"] if run["place"] else "", run["task_id"], run["state"],
            run["device_id"] or "no device"))
        for stream in ("stdout", "stderr"):
            if run[stream]:
                context.out.write("%s:\n%s\n" % (stream, render.printable(run[stream])))
        if run["error"] and not run["stderr"]:
            context.out.write("error: %s\n" % render.printable(run["error"]))
        if run["state"] not in TERMINAL_STATES and not (run["stdout"] or run["stderr"]):
            context.out.write("(no run has ended yet: a run's output comes when it"
                              " ends; `rc tail %d -f` shows it as it runs)\n" % run["task_id"])


# -- shown -----------------------------------------------------------------------------

def task_summary(spec):
    field = PAYLOAD_FIELD.get(spec["task_type"])
    text = spec["task_type"]
    if field and field in spec["payload"]:
        text += " " + render.cell(spec["payload"][field])
    return render.shorten(text, SUMMARY_WIDTH)


def moment(timestamp, zone_name=None):
    """A firing time as the schedule reads it, with the zone when one is set."""
    if timestamp is None:
        return ""
    try:
        wall = schedules.wall_clock(timestamp, schedules.time_zone(zone_name))
    except schedules.ScheduleError:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return wall.strftime("%Y-%m-%d %H:%M:%S") + (" %s" % zone_name if zone_name else "")
