"""Tasks: what a valid task is, submitting, cancelling, and every state change.

All writes here are fenced: an update names the (task id, attempt) and, once
assigned, the device it expects, so a stale message or a second process can
never move a task that has moved on. The database refuses to change a
terminal state at all (see db.py).
"""
import math
import random
import re
import time

from rc import bell, bounded, db, environments, files
from rc.states import (ACTIVE_STATES, ASSIGNED, CANCELLED, COMPLETED, FAILED, PAYLOAD_FIELD,
                       PRIORITIES, PRIORITY_NAMES, QUEUED, RUNNING, TASK_TYPES,
                       TERMINAL_STATES, WITHHELD)

MAX_PAYLOAD_TEXT = 256 * 1024   # bytes of code, command or message in one task
MAX_TIMEOUT = 7 * 24 * 3600.0   # seconds; a week is plenty for an old laptop
MAX_RETRIES = 100
MAX_BATCH = 10000               # tasks in one submit_many (POST /api/v1/tasks with a list)
# Queued tasks of a group cancelled in one transaction: each costs ~0.5 ms
# (its event, counter and dependency triggers), and `rc map --cancel` of
# 27,500 in one held the write lock 14 s, past every other writer's
# busy_timeout (the map still queueing them died of "database is locked").
CANCEL_BATCH = 500
# The reason a group's cancel gives its tasks: a running `rc map` that sees
# it stops queueing its inputs (`rc cancel ID` of one task does not).
GROUP_CANCELLED = "group cancelled by user"
# Seconds what a submit with a request key queued is remembered: a client
# sends a request again within minutes (rc.client waits UNREACHABLE_WAIT at
# most for an rc-web that stopped answering), so an hour is ample.
REQUEST_KEY_RETENTION = 3600.0
MAX_REQUEST_KEY = 200           # characters of a request key
# Seconds the next attempt of a running task taken from its online device
# (`rc drain --now`) waits at most for that device's last checkpoint: its
# worker stops the task, sends the checkpoint, then its answer, which ends
# the wait at once (release_after_take_back). Without the wait, another
# device took the task within the retry backoff, from an older checkpoint.
HAND_BACK_CHECKPOINT_WAIT = 30.0

# --require KEY=VALUE: which keys exist and how their value is read.
REQUIREMENT_KINDS = {
    "min_cpu_cores": "int", "min_memory_gb": "float",
    "platform": "str", "architecture": "str", "role": "str", "device_id": "str",
    "capabilities": "list", "tags": "list", "labels": "map",
}
REQUIREMENT_ALIASES = {"cores": "min_cpu_cores", "memory_gb": "min_memory_gb",
                       "arch": "architecture", "device": "device_id",
                       "capability": "capabilities", "tag": "tags"}


# Set by rc-server, not by users: devices where the task's Python
# environment failed to build, which its next attempts skip; and devices
# that gave it back unrun (give_back), which they take only when no other
# fitting device has room.
AVOID_DEVICES = "avoid_devices"
GAVE_BACK = "gave_back"
# Names one requirement may list (tags, capabilities, labels): rc-scheduler
# matches each against every device, for each task it reads at the head of
# the queue before anything else, and one task of 20,000 labels took more
# than a pass's budget (PASS_BUDGET) there on 20 devices: no task was ever
# assigned again.
MAX_REQUIRED_NAMES = 64


class TaskError(ValueError):
    """A task or a request about one is not valid; the message says why."""


class RequestKeyReused(TaskError):
    """An Idempotency-Key sent again with another request (rc-web: 422)."""


# -- what a valid task is ------------------------------------------------------

def payload_from_argument(task_type, argument):
    """The payload a command-line argument stands for, e.g. shell 'ls' ->
    {"command": "ls"}."""
    check_type(task_type)
    name = PAYLOAD_FIELD[task_type]
    if name is None:
        if argument not in (None, ""):
            raise TaskError("%s takes no argument" % task_type)
        return {}
    if argument is None:
        raise TaskError("%s needs an argument (its %s)" % (task_type, name))
    if task_type == "sleep":
        argument = parse_number("sleep seconds", argument)
    return {name: argument}


def check_type(task_type):
    if task_type not in TASK_TYPES:
        import difflib      # only on this error's path
        near = difflib.get_close_matches(str(task_type), TASK_TYPES, 1, 0.6)
        raise TaskError("unknown task type %r (%sknown: %s)"
                        % (task_type, "did you mean %s? " % near[0] if near else "",
                           ", ".join(TASK_TYPES)))


def check_payload(task_type, payload):
    """The payload as it is stored: its main field checked, and the file
    fields (inputs, stdin, env, outputs, file) when it has them."""
    check_type(task_type)
    if not isinstance(payload, dict):
        raise TaskError("payload must be an object")
    extra = check_file_fields(task_type, payload)
    if "file" in extra and PAYLOAD_FIELD[task_type] not in payload:
        return extra          # the script is an input file, not inline text
    checked = check_main_field(task_type, payload)
    checked.update(extra)
    if extra and len(db.dumps(checked)) > MAX_PAYLOAD_BYTES:
        raise TaskError("the payload is %d bytes encoded, over %d; send fewer inputs"
                        " (pack many small files into one archive)"
                        % (len(db.dumps(checked)), MAX_PAYLOAD_BYTES))
    return checked


def check_main_field(task_type, payload):
    name = PAYLOAD_FIELD[task_type]
    if name is None:
        return {}
    if name not in payload:
        raise TaskError("%s payload needs %r" % (task_type, name))
    value = payload[name]
    if task_type == "sleep":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not 0 <= value <= MAX_TIMEOUT:
            raise TaskError("sleep seconds must be a number from 0 to %d" % MAX_TIMEOUT)
    elif not isinstance(value, str):
        raise TaskError("%s %s must be text" % (task_type, name))
    elif len(value.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD_TEXT:
        raise TaskError("%s %s is over %d bytes" % (task_type, name, MAX_PAYLOAD_TEXT))
    elif "\x00" in value:
        raise TaskError("%s %s must not contain NUL" % (task_type, name))
    return {name: value}


# -- files a task reads and leaves (issue 18; the store is lib/rc/files.py) ------

MAX_INPUTS = 10000             # files placed in one task's directory
MAX_OUTPUTS = 256              # output globs of one task
MAX_ENV = 256                  # environment variables of one task
MAX_ENV_VALUE = 32 * 1024      # bytes of one variable's value
# A task_assign frame must stay under the 1 MiB frame limit with room to spare.
MAX_PAYLOAD_BYTES = 768 * 1024
# What one page of the task list holds in rc-web (GET /api/v1/tasks, the web
# terminal's `tasks`): at most this many tasks, and of their payloads and
# results at most these bytes (the first task always); the next page goes on.
MAX_PAGE_TASKS = 1000
MAX_PAGE_BYTES = 8 * 1024 * 1024
ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
FILE_TASK_TYPES = ("python_exec", "shell")      # may run a script from an input file
FILE_FIELDS = ("inputs", "stdin", "env", "outputs", "file", environments.PAYLOAD_FIELD)
PIP_TASK_TYPES = ("python_eval", "python_exec", "shell")   # may ask for packages
# Types that run a process of their own: only theirs have a directory, an
# environment and a stdin (echo, sleep and system_info run in the worker).
PROCESS_TASK_TYPES = PIP_TASK_TYPES
PROCESS_FIELDS = ("inputs", "stdin", "env", "outputs")


def check_file_fields(task_type, payload):
    """The payload's file fields, each checked; TaskError names the bad value."""
    check_process_fields(task_type, [field for field in PROCESS_FIELDS if field in payload])
    checked = {}
    if "inputs" in payload:
        checked["inputs"] = check_inputs(payload["inputs"])
    if "stdin" in payload:
        checked["stdin"] = check_blob_reference("stdin", payload["stdin"])
    if "env" in payload:
        checked["env"] = check_env(payload["env"])
    if "outputs" in payload:
        checked["outputs"] = check_outputs(payload["outputs"])
    if "file" in payload:
        checked["file"] = check_script_file(task_type, payload["file"],
                                            checked.get("inputs", []))
    if environments.PAYLOAD_FIELD in payload:
        checked[environments.PAYLOAD_FIELD] = check_packages(task_type,
                                                             payload[environments.PAYLOAD_FIELD])
    return checked


def check_process_fields(task_type, fields):
    """Inputs, stdin, env and outputs are a process's: refused for a type
    that runs none, rather than accepted and dropped."""
    if fields and task_type not in PROCESS_TASK_TYPES:
        raise TaskError("%s tasks run no process, so they take no %s; %s tasks do"
                        % (task_type, " or ".join(fields), ", ".join(PROCESS_TASK_TYPES)))


def check_packages(task_type, packages):
    if task_type not in PIP_TASK_TYPES:
        raise TaskError("%s tasks take no Python packages (pip); %s do"
                        % (task_type, ", ".join(PIP_TASK_TYPES)))
    try:
        return environments.check_packages(packages)
    except environments.PackagesError as e:
        raise TaskError(str(e))


def check_blob_reference(what, value):
    if not isinstance(value, dict):
        raise TaskError("%s must be an object with sha256 and size" % what)
    sha256, size = value.get("sha256"), value.get("size")
    if not files.is_sha256(sha256):
        raise TaskError("%s sha256 must be 64 lower-case hex digits, not %r"
                        % (what, str(sha256)[:80]))
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2 ** 62:
        raise TaskError("%s size must be a whole number of bytes, not %r"
                        % (what, str(size)[:80]))
    return {"sha256": sha256, "size": size}


def check_inputs(inputs):
    if not isinstance(inputs, list):
        raise TaskError("inputs must be a list of {path, sha256, size, mode}")
    if len(inputs) > MAX_INPUTS:
        raise TaskError("a task takes at most %d inputs, not %d" % (MAX_INPUTS, len(inputs)))
    checked, seen = [], set()
    for item in inputs:
        if not isinstance(item, dict):
            raise TaskError("each input must be an object with path, sha256, size, mode")
        path = item.get("path")
        problem = files.path_problem(path)
        if problem:
            raise TaskError("input path %r %s" % (str(path)[:200], problem))
        if path in seen:
            raise TaskError("input path %r is given twice" % path)
        seen.add(path)
        entry = dict(check_blob_reference("input %s" % path, item), path=path)
        mode = item.get("mode", 0o644)
        if mode not in (0o644, 0o755) or isinstance(mode, bool):
            raise TaskError("input %s mode must be 420 (0o644) or 493 (0o755), not %r"
                            % (path, mode))
        entry["mode"] = mode
        checked.append(entry)
    prefixes = {"/".join(p.split("/")[:n]) for p in seen for n in range(1, p.count("/") + 1)}
    clash = sorted(seen & prefixes)
    if clash:
        raise TaskError("input %r is both a file and a directory" % clash[0])
    return checked


def check_env(env):
    if not isinstance(env, dict):
        raise TaskError("env must be an object of NAME: value")
    if len(env) > MAX_ENV:
        raise TaskError("env holds at most %d variables, not %d" % (MAX_ENV, len(env)))
    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise TaskError("env name %r must match [A-Za-z_][A-Za-z0-9_]* (at most 128)"
                            % name[:200])
        if name.upper().startswith("RC_"):
            raise TaskError("env name %r: names starting with RC_ are the worker's own" % name)
        if not isinstance(value, str):      # its kind, not the value: it may be a secret
            raise TaskError("env %s must be text, not %s" % (name, json_kind(value)))
        if value == WITHHELD:
            raise TaskError("env %s is %s, what a task's value reads as without the admin"
                            " token; give the value itself" % (name, WITHHELD))
        if "\x00" in value:
            raise TaskError("env %s must not contain NUL" % name)
        if len(value.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE:
            raise TaskError("env %s is over %d bytes" % (name, MAX_ENV_VALUE))
    return dict(env)


def json_kind(value):
    """What a JSON value is, in words: a number, true or false, an object..."""
    if isinstance(value, bool):
        return "true or false"
    return {int: "a number", float: "a number", dict: "an object", list: "a list",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_outputs(outputs):
    if not isinstance(outputs, list) or not all(isinstance(glob, str) for glob in outputs):
        raise TaskError("outputs must be a list of glob patterns")
    if len(outputs) > MAX_OUTPUTS:
        raise TaskError("a task names at most %d output globs" % MAX_OUTPUTS)
    for glob in outputs:
        problem = files.path_problem(glob)
        if problem and glob.endswith("/") and not files.path_problem(glob.rstrip("/")):
            raise TaskError("output glob %r names a directory; an output is a file: %r"
                            " brings back every file under it" % (glob[:200], glob.rstrip("/")
                                                                  + "/**"))
        if problem:
            raise TaskError("output glob %r %s" % (glob[:200], problem))
    return list(outputs)


def check_script_file(task_type, path, inputs):
    if task_type not in FILE_TASK_TYPES:
        raise TaskError("file goes with %s tasks, not %s" % (" or ".join(FILE_TASK_TYPES),
                                                              task_type))
    if path not in {item["path"] for item in inputs}:
        raise TaskError("file %r must be one of the task's inputs" % (str(path)[:200],))
    return path


def parse_env(texts):
    """--env KEY=VALUE options as a dict, checked."""
    env = {}
    for text in texts:
        name, separator, value = text.partition("=")
        if not separator:
            raise TaskError("--env %r must look like KEY=VALUE" % text)
        env[name] = value
    return check_env(env)


def parse_number(what, text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise TaskError("%s must be a number, not %r" % (what, text))
    if not math.isfinite(value):
        raise TaskError("%s must be a finite number" % what)
    return value


def parse_priority(priority):
    if priority in PRIORITIES:
        return PRIORITIES[priority]
    raise TaskError("priority must be one of %s, not %r"
                    % (", ".join(PRIORITIES), priority))


def parse_requirements(texts):
    """--require KEY=VALUE options as a requirements dict; lists accumulate
    and take commas (--require tags=gpu,big)."""
    requirements = {}
    for text in texts:
        key, separator, value = text.partition("=")
        key = REQUIREMENT_ALIASES.get(key.strip(), key.strip())
        if not separator or not value.strip():
            raise TaskError("requirement %r must look like KEY=VALUE" % text)
        if key.startswith("label.") and len(key) > len("label."):
            requirements.setdefault("labels", {})[key[len("label."):]] = value.strip()
            continue
        if key not in REQUIREMENT_KINDS:
            raise TaskError("unknown requirement %r (known: %s)"
                            % (key, ", ".join(sorted(REQUIREMENT_KINDS))))
        if REQUIREMENT_KINDS[key] == "list":
            items = [item.strip() for item in value.split(",") if item.strip()]
            requirements.setdefault(key, []).extend(items)
        else:
            requirements[key] = value.strip()
    return check_requirements(requirements)


def bounded_requirement(key, value):
    """A requirement's number, in range (SQLite holds 64 bits; NaN fails
    both comparisons, and int() of inf would raise)."""
    number = parse_number(key, value)
    if number < 0:
        raise TaskError("%s cannot be negative: %s" % (key, value))
    if not number <= bounded.LARGEST:
        raise TaskError("%s must be at most %d, not %s" % (key, bounded.LARGEST, value))
    return number


def check_requirements(requirements):
    """Requirements with values of the right kind, or TaskError."""
    if not isinstance(requirements, dict):
        raise TaskError("requirements must be an object")
    checked = {}
    for key, value in requirements.items():
        kind = REQUIREMENT_KINDS.get(key)
        if kind is None:
            raise TaskError("unknown requirement %r" % key)
        if kind == "int":
            number = bounded_requirement(key, value)
            if number != int(number):
                raise TaskError("%s must be a whole number, not %s" % (key, value))
            checked[key] = int(number)
        elif kind == "float":
            checked[key] = bounded_requirement(key, value)
        elif kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise TaskError("%s must be a list of names" % key)
            if value:                   # an empty list asks for nothing
                checked[key] = sorted(set(value))
        elif kind == "map":
            checked[key] = check_labels(value)
        elif not isinstance(value, str) or not value:
            raise TaskError("%s must be a name" % key)
        else:
            checked[key] = value
        if kind in ("list", "map") and len(checked.get(key, ())) > MAX_REQUIRED_NAMES:
            raise TaskError("%s may name at most %d, not %d"
                            % (key, MAX_REQUIRED_NAMES, len(checked[key])))
    return checked


def check_labels(labels):
    """Labels: names to values, both short text."""
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= 64 and isinstance(v, str) and len(v) <= 200
            for k, v in labels.items()):
        raise TaskError("labels must map names (1-64 characters) to text")
    return dict(labels)


def unmet_requirements(requirements, device):
    """Why a device (a row of the devices table, lists decoded) cannot take a
    task with these requirements: a list of reasons, empty when it can."""
    reasons = []
    for key, wanted in requirements.items():
        if key == "min_cpu_cores" and (device["cpu_cores"] or 0) < wanted:
            reasons.append("needs %d CPU cores" % wanted)
        elif key == "min_memory_gb" and (device["memory_gb"] or 0) < wanted:
            reasons.append("needs %g GB memory" % wanted)
        elif key == "device_id" and device[key] != wanted \
                and str(device[key]).lower() == str(wanted).lower():
            # Ids are unique whatever their case, but matched as written.
            reasons.append("needs device_id=%s, not %s (write the id as the device has it)"
                           % (wanted, device[key]))
        elif key in ("platform", "architecture", "role", "device_id") \
                and device[key] != wanted:
            reasons.append("needs %s=%s" % (key, wanted))
        elif key in ("capabilities", "tags"):
            missing = set(wanted) - set(device[key])
            if missing:
                reasons.append("needs %s %s" % (key, ",".join(sorted(missing))))
        elif key == "labels":
            reasons.extend("needs label %s=%s" % (name, value)
                           for name, value in sorted(wanted.items())
                           if device["labels"].get(name) != value)
        elif key == AVOID_DEVICES and device["device_id"] in wanted:
            reasons.append("its Python environment (pip) failed to build there")
    return reasons


# -- submitting ----------------------------------------------------------------

def submit(connection, config, task_type, payload, priority="normal", timeout=None,
           retries=None, requirements=None, idempotency_key=None, retry_on_failure=False,
           depends_on=(), group_id=None):
    """Queue one task and return its id. With an idempotency key, a second
    submit of the same key returns the first task's id instead. A task that
    depends on others waits until they have completed."""
    return submit_many(connection, config, [dict(
        task_type=task_type, payload=payload, priority=priority, timeout=timeout,
        retries=retries, requirements=requirements, idempotency_key=idempotency_key,
        retry_on_failure=retry_on_failure, depends_on=depends_on)], group_id=group_id)[0]


def submit_many(connection, config, specs, group_id=None, request_key=None,
                request_sha256=None, new_group=None):
    """Queue a batch of tasks, each a dict of submit()'s arguments, in one
    transaction: all of them or, when one is refused, none (TaskError says
    which). Returns their ids in order. Thousands of tasks cost one commit
    and one ring of the scheduler's doorbell instead of one each. With a
    `request_key`, the ids are remembered under it in the same transaction
    with `request_sha256`, the request it came with (queued_for_key); a key
    already used is sqlite3.IntegrityError, and nothing is queued.
    `new_group(connection)` makes the batch's group and returns its id
    (rc-web's ?group=new) in the same transaction: a batch refused, or
    never committed (rc-web stopped before its answer), leaves no empty
    group behind."""
    if not 0 < len(specs) <= MAX_BATCH:
        raise TaskError("a batch holds 1 to %d tasks" % MAX_BATCH)
    checked = [numbered(len(specs), number, check_spec, config, spec)
               for number, spec in enumerate(specs, 1)]
    # Each task is an INSERT, with reads before it when it has a key or
    # dependencies: one plain task is one statement, which commits on its own.
    statements = len(checked) + (request_key is not None) + (new_group is not None) + sum(
        key is not None or bool(task["depends_on"]) or has_files(task["payload"])
        for task, key in checked)
    with db.write_statements(connection, statements):
        if new_group is not None:
            group_id = new_group(connection)
        ids = [numbered(len(specs), number, insert_once, connection, task, key, group_id)
               for number, (task, key) in enumerate(checked, 1)]
        if request_key is not None:
            connection.execute(
                "INSERT INTO request_keys(key, task_ids, group_id, created_at, request_sha256)"
                " VALUES (?, ?, ?, ?, ?)", (request_key, id_ranges(ids), group_id, time.time(),
                                            request_sha256))
    bell.ring(config.run_dir, bell.SCHEDULER)
    return ids


def check_request_key(key):
    """A request key as sent (an Idempotency-Key header): printable ASCII,
    1 to MAX_REQUEST_KEY characters (a UUID is 36)."""
    # Printable ASCII without spaces ("!" to "~"), asked of str's own methods:
    # a loop over the characters cost more than the rest of the check.
    if not 0 < len(key) <= MAX_REQUEST_KEY or not (key.isascii() and key.isprintable()) \
            or " " in key:
        raise TaskError("an Idempotency-Key is 1 to %d printable characters without spaces"
                        % MAX_REQUEST_KEY)
    return key


def queued_for_key(connection, key, request_sha256=None):
    """(task ids, group id) a submit with this request key queued, or None;
    RequestKeyReused when it came with another request than this one's
    `request_sha256` (never queued: the caller would think it was)."""
    row = connection.execute("SELECT task_ids, group_id, request_sha256 FROM request_keys"
                             " WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    if None not in (row[2], request_sha256) and row[2] != request_sha256:
        raise RequestKeyReused(
            "Idempotency-Key %r came with another request within the last %d s (its body"
            " or ?group= differ); send a new request with a key of its own"
            % (key, REQUEST_KEY_RETENTION))
    return ids_in_ranges(row[0]), row[1]


def id_ranges(task_ids):
    """[3, 4, 5, 9] -> "3-5,9": a batch's ids (consecutive, as one transaction
    numbers them) stay short in an audit line or a request key's row."""
    ranges, first, last = [], task_ids[0], task_ids[0]
    for task_id in task_ids[1:]:
        if task_id == last + 1:
            last = task_id
            continue
        ranges.append((first, last))
        first = last = task_id
    ranges.append((first, last))
    return ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in ranges)


def ids_in_ranges(text):
    """id_ranges() undone: "3-5,9" -> [3, 4, 5, 9]."""
    ids = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def forget_request_keys(connection, now):
    """Delete request keys past REQUEST_KEY_RETENTION; how many."""
    return connection.execute("DELETE FROM request_keys WHERE created_at < ?",
                              (now - REQUEST_KEY_RETENTION,)).rowcount


def has_files(payload):
    """Whether the task's insert also writes task_files rows (not one statement)."""
    return "inputs" in payload or "stdin" in payload


def numbered(count, number, function, *arguments):
    """function(*arguments); in a batch, its TaskError names the task."""
    try:
        return function(*arguments)
    except TaskError as e:
        if count == 1:
            raise
        raise TaskError("task %d of %d: %s" % (number, count, e))


def check_spec(config, spec):
    spec = dict(spec)
    key = spec.pop("idempotency_key", None)
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
        raise TaskError("idempotency key must be text of 1 to 200 characters")
    return check_task(config, **spec), key


def insert_once(connection, task, idempotency_key, group_id):
    """insert(), unless a task with this idempotency key exists: its id then."""
    if idempotency_key is not None:
        row = connection.execute("SELECT task_id FROM tasks WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
        if row:
            return row["task_id"]
    return insert(connection, task, idempotency_key=idempotency_key, group_id=group_id)


def check_task(config, task_type, payload, requirements=None, priority="normal",
               timeout=None, retries=None, retry_on_failure=False, depends_on=()):
    """A task as insert() takes it, every field checked and the defaults
    filled in, or TaskError. Reads nothing from the database."""
    payload = check_payload(task_type, payload)
    priority_number = parse_priority(priority)
    timeout = config.task_timeout if timeout is None else parse_number("timeout", timeout)
    if not 0 < timeout <= MAX_TIMEOUT:
        raise TaskError("timeout must be more than 0 and at most %d seconds" % MAX_TIMEOUT)
    retries = config.task_retries if retries is None else retries
    if isinstance(retries, bool) or not isinstance(retries, int) \
            or not 0 <= retries <= MAX_RETRIES:
        raise TaskError("retries must be a whole number from 0 to %d" % MAX_RETRIES)
    if not isinstance(retry_on_failure, bool):
        raise TaskError("retry_on_failure must be true or false")
    requirements = check_requirements(requirements or {})
    if environments.PAYLOAD_FIELD in payload:
        # Only a device that can build a virtual environment can run it.
        wanted = requirements.setdefault("capabilities", [])
        if environments.VENV_CAPABILITY not in wanted:
            wanted.append(environments.VENV_CAPABILITY)
    return {"task_type": task_type, "payload": payload, "priority": priority_number,
            "requirements": requirements, "timeout": timeout,
            "max_retries": retries, "retry_on_failure": retry_on_failure,
            "depends_on": check_dependencies(depends_on)}


def insert(connection, task, idempotency_key=None, group_id=None):
    """Queue a task made by check_task() and return its id, inside the
    caller's write transaction; TaskError (before writing anything) when a
    task it depends on cannot complete. The caller rings the scheduler."""
    depends_on = task["depends_on"]
    unmet = unmet_dependencies(connection, depends_on)
    cursor = connection.execute(
        "INSERT INTO tasks(task_type, payload, priority, requirements, timeout,"
        " max_retries, idempotency_key, retry_on_failure, group_id, created_at, reason,"
        " unmet_dependencies) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (task["task_type"], db.dumps(task["payload"]), task["priority"],
         db.dumps(task["requirements"]), task["timeout"], task["max_retries"],
         idempotency_key, task["retry_on_failure"], group_id, time.time(),
         "submitted" if not depends_on else "waiting for %s" % ", ".join(
             map(str, depends_on)), unmet))
    if depends_on:
        connection.executemany(
            "INSERT INTO task_dependencies(task_id, depends_on) VALUES (?, ?)",
            [(cursor.lastrowid, parent) for parent in depends_on])
    if has_files(task["payload"]):
        try:
            files.attach_inputs(connection, cursor.lastrowid, task["payload"], time.time())
        except files.MissingFile as e:
            raise TaskError(str(e))
    return cursor.lastrowid


def check_dependencies(depends_on):
    if isinstance(depends_on, (str, bytes)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in depends_on):
        raise TaskError("depends_on must be a list of task ids")
    if len(depends_on) > 1000:
        raise TaskError("a task may depend on at most 1000 others")
    return sorted(set(depends_on))


def unmet_dependencies(connection, depends_on):
    """How many of the tasks in `depends_on` have not completed yet (the
    trigger dependency_completed counts them down). TaskError when one does
    not exist or has ended other than completed: a task that can never
    start is refused, not queued."""
    unmet = 0
    for parent in depends_on:
        row = connection.execute("SELECT state FROM tasks WHERE task_id = ?",
                                 (parent,)).fetchone()
        if row is None:
            raise TaskError("no task %d to depend on" % parent)
        if row["state"] in TERMINAL_STATES and row["state"] != COMPLETED:
            raise TaskError("task %d it would depend on has already %s"
                            % (parent, row["state"]))
        unmet += row["state"] != COMPLETED
    return unmet


def parse_task_ids(texts):
    """--after 3,4 --after 7 -> [3, 4, 7]"""
    ids = []
    for text in texts:
        for item in text.split(","):
            if not item.strip().isdigit():
                raise TaskError("task id must be a whole number, not %r" % item.strip())
            ids.append(int(item))
    return ids


def cancel(connection, task_id):
    """Cancel a task: a queued one at once, an active one by asking its device
    (the result comes back as `cancelled`). Returns the task's state after."""
    with db.write(connection):
        row = connection.execute("SELECT state FROM tasks WHERE task_id = ?",
                                 (task_id,)).fetchone()
        if row is None:
            raise TaskError("no task %s" % task_id)
        state = row["state"]
        if state == QUEUED:
            connection.execute(
                "UPDATE tasks SET state = ?, finished_at = ?, reason = 'cancelled by user'"
                " WHERE task_id = ? AND state = ?", (CANCELLED, time.time(), task_id, QUEUED))
            return CANCELLED
        if state in ACTIVE_STATES:
            connection.execute("UPDATE tasks SET cancel_requested = 1 WHERE task_id = ?",
                               (task_id,))
        return state


def cancel_group(connection, group_id, active_too=False):
    """Cancel a group's queued tasks (a map's, a `submit --each`'s, a
    client's) and, with `active_too`, ask its devices to stop the active
    ones. Returns (queued cancelled, active asked to stop). The queued ones
    go CANCEL_BATCH a transaction, in queue order, with a pause after each,
    so that other writers wait a fraction of a second; the active ones
    last, with those the scheduler assigned meanwhile."""
    if connection.execute("SELECT 1 FROM task_groups WHERE group_id = ?",
                          (group_id,)).fetchone() is None:
        raise TaskError("no group %s" % group_id)
    queued, after = 0, 0
    while True:
        with db.write(connection):
            began = time.monotonic()        # the lock held from here
            ids = [row[0] for row in connection.execute(
                "SELECT task_id FROM tasks WHERE group_id = ? AND task_id > ? AND state = ?"
                " ORDER BY task_id LIMIT ?", (group_id, after, QUEUED, CANCEL_BATCH))]
            if ids:
                queued += connection.execute(
                    "UPDATE tasks SET state = ?, finished_at = ?, reason = ?"
                    " WHERE task_id IN (%s) AND state = ?" % ",".join("?" * len(ids)),
                    [CANCELLED, time.time(), GROUP_CANCELLED] + ids + [QUEUED]).rowcount
        if len(ids) < CANCEL_BATCH:
            break
        after = ids[-1]
        # As long again without the lock: a waiting writer's busy handler
        # looks every 100 ms at most, and one that took it back at once
        # starved rc map's next batch past its busy_timeout all the same.
        time.sleep(time.monotonic() - began)
    stopping = 0
    if active_too:
        with db.write(connection):
            stopping = connection.execute(
                "UPDATE tasks SET cancel_requested = 1 WHERE group_id = ? AND %s"
                % db.ACTIVE_SQL, (group_id,)).rowcount
    return queued, stopping


# -- reading -------------------------------------------------------------------

TASK_COLUMNS = ("task_id, task_type, payload, priority, requirements, timeout, max_retries,"
                " idempotency_key, state, attempt, device_id, created_at, not_before,"
                " assigned_at, started_at, finished_at, result, error, reason, progress,"
                " progress_message, cancel_requested, lease_expires, retries_used,"
                " device_losses, retry_on_failure, group_id")
# What take_back() and retry_failed() need to know of a task.
LEASE_COLUMNS = ("task_id, attempt, device_id, state, max_retries, retries_used,"
                 " device_losses, cancel_requested, retry_on_failure")


def task_dict(row):
    task = dict(row)
    for key in ("payload", "requirements", "result"):
        if key in task:
            task[key] = db.loads(task[key])
    if "priority" in task:
        task["priority"] = PRIORITY_NAMES.get(task["priority"], task["priority"])
    for key in ("cancel_requested", "retry_on_failure"):
        if key in task:
            task[key] = bool(task[key])
    return task


def get(connection, task_id):
    row = connection.execute("SELECT %s FROM tasks WHERE task_id = ?" % TASK_COLUMNS,
                             (task_id,)).fetchone()
    if row is None:
        raise TaskError("no task %s" % task_id)
    task = task_dict(row)
    task["events"] = [dict(event) for event in connection.execute(
        "SELECT time, attempt, state, device_id, reason FROM task_events"
        " WHERE task_id = ? ORDER BY id", (task_id,))]
    task["depends_on"] = [row[0] for row in connection.execute(
        "SELECT depends_on FROM task_dependencies WHERE task_id = ? ORDER BY depends_on",
        (task_id,))]
    return task


def list_tasks(connection, state=None, device_id=None, limit=100, offset=0):
    return task_page(connection, state, device_id, limit, offset)[0]


def task_page(connection, state=None, device_id=None, limit=100, offset=0, max_bytes=None,
              results=True):
    """(the tasks, newest first, whether more follow). With `max_bytes` the
    page ends early once its tasks' payloads and results pass it, the first
    always in: rc-web's page of 1,000 tasks whose results were ~1 MiB each
    (what OUTPUT_CAP lets a task print) held gigabytes for one request.
    Without `results`, each task's "result" is None, never read."""
    columns = TASK_COLUMNS if results else TASK_COLUMNS.replace(" result,", " NULL AS result,")
    clauses, parameters = [], []
    if state is not None:
        if state not in (QUEUED, ASSIGNED, RUNNING) + TERMINAL_STATES:
            raise TaskError("unknown state %r" % state)
        clauses.append("state = ?")
        parameters.append(state)
        # An unfinished state through its partial index (which SQLite uses
        # only when the query names its condition literally), not a walk of
        # every finished task back from the newest: the queue may be empty.
        if state == QUEUED:
            clauses.append(db.QUEUED_SQL)
        elif state in ACTIVE_STATES:
            clauses.append(db.ACTIVE_SQL)
    if device_id is not None:
        clauses.append("device_id = ?")
        parameters.append(device_id)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    order = "+task_id" if len(clauses) > len(parameters) else "task_id"
    # One row past the page says whether more follow (no more than SQLite holds:
    # `rc tasks --limit 9223372036854775807` was an OverflowError).
    rows = connection.execute(
        "SELECT %s FROM tasks %s ORDER BY %s DESC LIMIT ? OFFSET ?"
        % (columns, where, order), parameters + [min(limit, bounded.LARGEST - 1) + 1, offset])
    found, size = [], 0
    for row in rows:         # a row at a time: those past the page are never read
        size += len(row["payload"] or "") + len(row["result"] or "")
        if len(found) == limit or (max_bytes is not None and found and size > max_bytes):
            return found, True
        found.append(task_dict(row))
    return found, False


KEPT = "kept_"      # counter rows kept_<state>: finished tasks the table keeps


def counts_by_state(connection):
    """Tasks the database holds, by state, at the cost of the unfinished
    ones: those are counted through their partial indexes, the finished
    ones read from the counter rows kept_<state> (db.py, migration 17).
    One statement, so one snapshot: read in three, a task that finished
    between them was counted both queued and completed."""
    counts = dict.fromkeys((QUEUED, ASSIGNED, RUNNING) + TERMINAL_STATES, 0)
    counts.update(connection.execute(
        "SELECT '%s', count(*) FROM tasks WHERE %s"
        " UNION ALL SELECT state, count(*) FROM tasks WHERE %s GROUP BY state"
        " UNION ALL SELECT substr(name, %d), value FROM counters WHERE name IN (%s)"
        % (QUEUED, db.QUEUED_SQL, db.ACTIVE_SQL, len(KEPT) + 1,
           db.sql_list(KEPT + state for state in TERMINAL_STATES))))
    return counts


# -- state changes made by the main node's programs ------------------------------
# These run inside a write transaction the caller holds.

def accept(connection, task_id, attempt, device_id, now, lease):
    """The device started the task; its lease runs from now. False when the
    message is stale."""
    cursor = connection.execute(
        "UPDATE tasks SET state = ?, started_at = ?, lease_expires = ?, reason = 'accepted',"
        " bounced_by = NULL WHERE task_id = ? AND attempt = ? AND device_id = ? AND state = ?",
        (RUNNING, now, now + lease, task_id, attempt, device_id, ASSIGNED))
    return cursor.rowcount == 1


def renew_leases(connection, device_id, keys, until):
    """The device says it still runs these (task id, attempt) pairs."""
    connection.executemany(
        "UPDATE tasks SET lease_expires = ? WHERE task_id = ? AND attempt = ?"
        " AND device_id = ? AND state = ?",
        [(until, task_id, attempt, device_id, RUNNING) for task_id, attempt in keys])


def record_progress(connection, task_id, attempt, device_id, progress, message):
    cursor = connection.execute(
        "UPDATE tasks SET progress = ?, progress_message = ?"
        " WHERE task_id = ? AND attempt = ? AND device_id = ? AND state IN (?, ?)",
        (progress, message, task_id, attempt, device_id) + ACTIVE_STATES)
    return cursor.rowcount == 1


def finish(connection, task_id, attempt, device_id, state, result, error, reason, now):
    """Record the outcome of the current attempt. False when it is not the
    current attempt on that device (already finished, retried, moved)."""
    cursor = connection.execute(
        "UPDATE tasks SET state = ?, result = ?, error = ?, reason = ?, finished_at = ?,"
        " lease_expires = NULL,"
        " progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END"
        " WHERE task_id = ? AND attempt = ? AND device_id = ? AND state IN (?, ?)",
        (state, db.dumps(result), error, reason, now, state,
         task_id, attempt, device_id) + ACTIVE_STATES)
    return cursor.rowcount == 1


def take_back(connection, task, reason, now, config, charged=None, not_before=None):
    """The system lost this attempt (device gone, worker restarted, lease
    expired, refused): queue the next attempt after a backoff.

    Unless told otherwise, only an attempt that was running is charged to the
    task's retry budget and counted as a lost device; one merely assigned was
    never the task's doing. `not_before`: when the next attempt may start,
    if not after the retry backoff. A task that has lost `poison_limit` devices is
    failed rather than sent to take down another. `task` holds LEASE_COLUMNS.
    False when the task has moved on."""
    if charged is None:
        charged = task["state"] == RUNNING
    losses = task["device_losses"] + charged
    if task["cancel_requested"]:
        return _end(connection, task, CANCELLED, "cancelled; " + reason, None, now, losses)
    if charged and losses >= config.poison_limit:
        return _end(connection, task, FAILED, "poison pill: lost %d devices" % losses,
                    "the task lost %d devices; last: %s" % (losses, reason), now, losses)
    if charged and task["retries_used"] >= task["max_retries"]:
        return _end(connection, task, FAILED, "retries spent: " + reason, reason, now, losses)
    return _requeue(connection, task, reason, now, config, charged, losses, not_before)


def bounce(connection, task, device_id, reason, now, config):
    """The device gave back an attempt it had not started (not_allowed, or
    handed_back while it waited): not the task's doing, so it is given back
    (give_back(): queued again uncharged, other devices first). But a device
    that refuses what it claims to run, pinned by the task or the only one
    that fits it, would get it again and again: `bounce_limit` such answers
    in a row (no attempt started in between) fail the task, naming the
    devices. `task` holds LEASE_COLUMNS; False when it has moved on."""
    row = connection.execute("SELECT bounced_by FROM tasks WHERE task_id = ?",
                             (task["task_id"],)).fetchone()
    bounced_by = db.loads(row[0] if row else None, []) + [device_id]
    if config.bounce_limit and len(bounced_by) >= config.bounce_limit \
            and not task["cancel_requested"]:
        counts = {}
        for device in bounced_by:
            counts[device] = counts.get(device, 0) + 1
        error = ("given back %d times in a row without being started (bounce_limit), by %s;"
                 " last: %s" % (len(bounced_by), ", ".join(
                     "%s (%d)" % item for item in sorted(counts.items())), reason))
        return _end(connection, task, FAILED, "bounced: " + reason, error, now,
                    task["device_losses"])
    connection.execute("UPDATE tasks SET bounced_by = ? WHERE task_id = ? AND attempt = ?",
                       (db.dumps(bounced_by), task["task_id"], task["attempt"]))
    return give_back(connection, task, device_id, reason, now, config)


def give_back(connection, task, device_id, reason, now, config):
    """An attempt its device gave back unrun (not allowed there, handed back
    as the device became unavailable, cancelled unasked): queued again,
    charged to nothing, as a phone that went on battery should be; and the
    device named in the task's GAVE_BACK, so that the scheduler gives the
    next attempts to another fitting device with room first. A joined device
    claiming the most idle slots and giving back all it was given was the
    scheduler's choice for every task again after each backoff, for ever,
    and the devices beside it ran none. `task` holds LEASE_COLUMNS; False
    when the task has moved on."""
    row = connection.execute("SELECT requirements FROM tasks WHERE task_id = ?",
                             (task["task_id"],)).fetchone()
    requirements = db.loads(row[0], {}) if row else {}
    if isinstance(requirements, dict) and device_id not in requirements.get(GAVE_BACK, ()):
        requirements.setdefault(GAVE_BACK, []).append(device_id)
        connection.execute("UPDATE tasks SET requirements = ? WHERE task_id = ?"
                           " AND attempt = ?", (db.dumps(requirements), task["task_id"],
                                                task["attempt"]))
    return take_back(connection, task, reason, now, config, charged=False)


def release_after_take_back(connection, device_id, task_id, attempt, now):
    """The device whose `attempt` of a task was taken back from it has
    answered for it (cancelled, handed back), its last checkpoint sent
    first: the next attempt, waiting for that checkpoint
    (HAND_BACK_CHECKPOINT_WAIT), may start now. True if it was waiting."""
    return connection.execute(
        "UPDATE tasks SET not_before = ? WHERE task_id = ? AND attempt = ? AND not_before > ?"
        " AND " + files.QUEUED_AFTER_DEVICES_ATTEMPT,
        (now, task_id, attempt + 1, now, device_id)).rowcount == 1


def hand_back_unaccepted(connection, task, reason, now):
    """An attempt its device never accepted, taken from a device that stopped
    answering (suspect): queued again at once, charged to nothing. No
    backoff: a suspect device is given nothing new, so the task cannot bounce
    back to it. `task` holds LEASE_COLUMNS; False when it has moved on."""
    if task["cancel_requested"]:
        return _end(connection, task, CANCELLED, "cancelled; " + reason, None, now,
                    task["device_losses"])
    return _requeue(connection, task, reason, now, None, False, task["device_losses"],
                    not_before=now)


def environment_failed(connection, task, device_id, error, now, config):
    """The device could not build the task's Python environment (pip failed,
    no index reachable...): not the task's code failing. The attempt is
    charged and the task queued again for another device (AVOID_DEVICES);
    False when it is not (retries spent: it fails with pip's error)."""
    if task["cancel_requested"] or task["retries_used"] >= task["max_retries"]:
        return False
    row = connection.execute("SELECT requirements FROM tasks WHERE task_id = ?",
                             (task["task_id"],)).fetchone()
    requirements = db.loads(row[0], {}) if row else {}
    avoided = requirements.setdefault(AVOID_DEVICES, [])
    if device_id not in avoided:
        avoided.append(device_id)
    connection.execute("UPDATE tasks SET requirements = ? WHERE task_id = ? AND attempt = ?",
                       (db.dumps(requirements), task["task_id"], task["attempt"]))
    return device_fault(connection, task, device_id, error, now, config)


def device_fault(connection, task, device_id, error, now, config):
    """The device had no disk to start the task (another task may have filled
    it): not the task's code failing. The attempt is charged and the task
    queued again, for any device (the disk may be free by then), while its
    retries last; False when they are spent (it fails with the error)."""
    if task["cancel_requested"] or task["retries_used"] >= task["max_retries"]:
        return False
    return _requeue(connection, task, "attempt %d: %s on %s" % (task["attempt"], error,
                                                                device_id),
                    now, config, True, task["device_losses"])


def retry_failed(connection, task, state, result, error, now, config):
    """A task that asked to be retried when it fails itself: requeue it while
    its budget lasts. False when it is not to be retried."""
    if not task["retry_on_failure"] or task["cancel_requested"] \
            or task["retries_used"] >= task["max_retries"]:
        return False
    return _requeue(connection, task, "attempt %d %s: %s" % (task["attempt"], state, error),
                    now, config, True, task["device_losses"])


def _requeue(connection, task, reason, now, config, charged, losses, not_before=None):
    if not_before is None:
        not_before = now + backoff(task["attempt"], config)
    cursor = connection.execute(
        "UPDATE tasks SET state = ?, attempt = attempt + 1, device_id = NULL,"
        " not_before = ?, assigned_at = NULL, started_at = NULL, lease_expires = NULL,"
        " progress = NULL, progress_message = NULL, reason = ?,"
        " retries_used = retries_used + ?, device_losses = ?"
        " WHERE task_id = ? AND attempt = ? AND state = ?",
        (QUEUED, not_before, reason, int(charged), losses,
         task["task_id"], task["attempt"], task["state"]))
    return cursor.rowcount == 1


def _end(connection, task, state, reason, error, now, losses):
    cursor = connection.execute(
        "UPDATE tasks SET state = ?, finished_at = ?, error = ?, reason = ?,"
        " lease_expires = NULL, device_losses = ?"
        " WHERE task_id = ? AND attempt = ? AND state = ?",
        (state, now, error, reason, losses, task["task_id"], task["attempt"], task["state"]))
    return cursor.rowcount == 1


# Doublings of a backoff past which it is at its cap whatever the setting
# (10**9 s at most): at attempt 1025, float * 2 ** 1024 was OverflowError
# and the reaper failed on the task at every sweep, for good. An attempt
# that is never charged (assigned and never accepted) has no other bound.
MAX_DOUBLINGS = 64


def backoff(attempt, config):
    """Seconds before attempt+1 may start: doubling, capped, with jitter so
    that the tasks of one dead device do not all land at once."""
    delay = min(config.retry_backoff * 2 ** min(attempt - 1, MAX_DOUBLINGS),
                config.retry_backoff_max)
    return delay * random.uniform(0.5, 1.0)
