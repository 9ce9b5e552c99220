"""Alerts: rules in etc/rc.json (`alerts`) that the reaper checks each
minute, so someone without cron still hears about trouble.

A rule that holds writes an `alert` warning to rc-reaper's log and, when
`alert_command` is set, runs it through `sh -c` with the details in RC_ALERT_*
variables. The same alert (rule and subject) fires again only after
`alert_cooldown`; when it fired is kept in the database, so a restarted
reaper does not repeat itself.

Rules:
  {"rule": "device_offline", "after": 900}      a device offline that long
  {"rule": "queue_stuck"}                         as `rc health` sees it
  {"rule": "failure_rate", "above": 0.5, "window": 900, "min_tasks": 10}
"""
import math
import os

from rc import db, devices, health
from rc.states import COMPLETED, OFFLINE

COMMAND_TIMEOUT = 60.0      # seconds an alert command may run before it is killed
COUNT_LIMIT = 2 ** 62      # completed tasks failure_rate counts at most (SQLite's integers)
COMMANDS_AT_ONCE = 10       # alert commands started in one minute, the last for the rest
RULE_DEFAULTS = {"device_offline": {"after": 900.0},
                 "queue_stuck": {},
                 "failure_rate": {"above": 0.5, "window": 900.0, "min_tasks": 10}}

_children = []              # alert commands still running: (process, deadline)


class Alert:
    def __init__(self, rule, subject, message, since=None, **details):
        """`since`: when what it reports began (a device last heard from),
        if the alert is to fire once for it, not again after each cooldown."""
        self.rule, self.subject, self.message, self.details = rule, subject, message, details
        self.since = since

    @property
    def key(self):
        return "%s:%s" % (self.rule, self.subject)


def check_rules(rules):
    """The rules with their defaults filled in; ValueError names a bad one."""
    checked = []
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("rule"), str) \
                or rule["rule"] not in RULE_DEFAULTS:
            raise ValueError("alert rule %r: \"rule\" must be one of %s"
                             % (rule, ", ".join(RULE_DEFAULTS)))
        unknown = sorted(set(rule) - set(RULE_DEFAULTS[rule["rule"]]) - {"rule"})
        if unknown:
            raise ValueError("alert rule %r: %s takes %s, not %s"
                             % (rule, rule["rule"], ", ".join(RULE_DEFAULTS[rule["rule"]])
                                or "no options", ", ".join(unknown)))
        options = dict(RULE_DEFAULTS[rule["rule"]], **rule)
        for name, value in options.items():
            if name != "rule" and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ValueError("alert rule %r: %s must be a number" % (rule, name))
        if options.get("above", 0) > 1:         # a rate over 1 is never reached
            raise ValueError("alert rule %r: above must be a rate, 0 to 1" % (rule,))
        checked.append(options)
    return checked


def find(connection, config, rules, now, watching_since=None):
    """Every alert the rules raise now, cooldown aside. `watching_since`:
    when the main node (its reaper) started to hear devices, if known."""
    found = []
    for rule in rules:
        found.extend(RULES[rule["rule"]](connection, config, rule, now, watching_since))
    return found


def device_offline(connection, config, rule, now, watching_since=None):
    for device in devices.list_devices(connection, OFFLINE):
        if device.get("revoked"):
            continue
        quiet = now - device["last_seen"]
        # While the main node was stopped nobody could hear the device: a
        # main node started after a night off alerted at once for every
        # device, before any had had a moment to reconnect. Each gets
        # `after` from the start, as a clock jump's devices get their
        # offline_timeout from the wake-up.
        if now - max(device["last_seen"], watching_since or 0) >= rule["after"]:
            # Once for each time it goes away: a device gone for good and
            # never forgotten fired every alert_cooldown for ever (the
            # year's 1,333 such devices: 1,333 alert commands each hour).
            yield Alert("device_offline", device["device_id"],
                        "device %s offline for %ds" % (device["device_id"], quiet),
                        since=device["last_seen"], device_id=device["device_id"],
                        seconds=int(quiet))


def queue_stuck(connection, config, rule, now, watching_since=None):
    stuck = health.stuck_tasks(connection, config, now)
    if stuck:
        task_id, waited, device_id = stuck[0]
        yield Alert("queue_stuck", "queue", "queue stuck: task %d waited %ds while %s had a"
                    " free slot (%d such tasks)" % (task_id, waited, device_id, len(stuck)),
                    task_id=task_id, device_id=device_id, seconds=int(waited),
                    count=len(stuck))


def failure_rate(connection, config, rule, now, watching_since=None):
    """The same alert, on the same counts, as counting every task finished
    in the window; but the completed ones are counted only as far as the
    rate could still be over `above` (a busy window holds millions of them).
    The rate only falls as completed tasks add up, so once `enough` of them
    bring it to `above` or under, more cannot raise it again."""
    since = now - rule["window"]
    failed = connection.execute(
        "SELECT count(*) FROM tasks WHERE %s AND finished_at >= ?" % db.FAILURES_SQL,
        (since,)).fetchone()[0]
    if not failed:
        return      # a rate of 0 is never over `above`, which is not negative
    enough = completed_enough(failed, rule["above"])
    # Through tasks_finished, from the window's start: the walk passes the
    # window's failures and cancelled tasks on its way to `enough`.
    completed = connection.execute(
        "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = ? AND finished_at >= ?"
        " LIMIT ?)", (COMPLETED, since, -1 if enough is None else enough)).fetchone()[0]
    finished = failed + completed
    if finished >= max(1, rule["min_tasks"]) and failed / finished > rule["above"]:
        yield Alert("failure_rate", "tasks", "%d of %d tasks failed in the last %ds"
                    % (failed, finished, rule["window"]), failed=failed, finished=finished,
                    rate=round(failed / finished, 3))


def completed_enough(failed, above):
    """How many completed tasks bring `failed` failures to a rate of `above`
    or under (None: no number does, with `above` 0, or more than SQLite
    counts, with an `above` as small as 1e-300)."""
    if not above or failed / above >= COUNT_LIMIT:   # past what SQLite's LIMIT takes
        return None
    enough = int(failed / above) + 1
    while failed / (failed + enough) > above:      # float rounding, should it ever matter
        enough += 1
    return enough


RULES = {"device_offline": device_offline, "queue_stuck": queue_stuck,
         "failure_rate": failure_rate}


def evaluate(connection, config, log, now, watching_since=None):
    """Check the rules; fire what holds and is out of its cooldown. Returns
    the alerts fired."""
    reap_children(now)
    try:
        rules = check_rules(config.alerts)
    except ValueError as e:
        log.error("alert_rules_invalid", error=str(e))
        return []
    fired = []
    # The rules read outside the write transaction: they may read many rows,
    # and rc-server's heartbeats and results would wait behind them.
    found = list(find(connection, config, rules, now, watching_since))
    with db.write(connection):
        for alert in found:
            row = connection.execute("SELECT fired_at FROM alert_state WHERE key = ?",
                                     (alert.key,)).fetchone()
            # An alert fired later than now tells of a clock since set back (an
            # NTP step): kept, it silenced its rule for the whole step, a day.
            if row is not None and row[0] <= now and (
                    now - row[0] < config.alert_cooldown
                    or alert.since is not None and row[0] >= alert.since):
                continue
            connection.execute("INSERT OR REPLACE INTO alert_state(key, fired_at, message)"
                               " VALUES (?, ?, ?)", (alert.key, now, alert.message))
            fired.append(alert)
    for alert in fired:
        log.warning("alert", rule=alert.rule, message=alert.message, **alert.details)
    if config.alert_command:
        for alert in commanded(fired):
            run_command(config.alert_command, alert, log, now)
    return fired


def commanded(fired):
    """The alerts the command runs for: all of them up to COMMANDS_AT_ONCE,
    else the first ones and one that counts the rest (rule `alerts`): a
    fleet that drops off at once (a power cut, a router), or the first
    minute after an upgrade that finds devices gone for months, started
    one shell and its curl per device at once (1,333 on the year's database)."""
    if len(fired) <= COMMANDS_AT_ONCE:
        return fired
    rest = len(fired) - COMMANDS_AT_ONCE + 1
    return fired[:COMMANDS_AT_ONCE - 1] + [Alert(
        "alerts", "more", "%d more alerts this minute (rc logs --program rc-reaper)" % rest,
        count=rest)]


def run_command(command, alert, log, now):
    """Start the user's command without waiting: the reaper must keep sweeping."""
    import subprocess       # here only: alerts are imported by every `rc` command
    env = dict(os.environ, RC_ALERT_RULE=alert.rule, RC_ALERT_SUBJECT=str(alert.subject),
               RC_ALERT_MESSAGE=alert.message, RC_ALERT_TIME="%.3f" % now)
    env.update(("RC_ALERT_%s" % key.upper(), str(value)) for key, value in alert.details.items())
    try:
        process = subprocess.Popen(["/bin/sh", "-c", command], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        log.error("alert_command_failed", rule=alert.rule, error=str(e))
        return None
    _children.append((process, now + COMMAND_TIMEOUT))
    return process


def reap_children(now):
    """Collect finished alert commands; kill those past COMMAND_TIMEOUT."""
    for entry in list(_children):
        process, deadline = entry
        if process.poll() is not None:
            _children.remove(entry)
        elif now > deadline:
            process.kill()
            process.wait()
            _children.remove(entry)
