"""`rc map`: one command over many inputs, as GNU Parallel runs it, on the
cluster. The inputs are the arguments, the lines of stdin, or files
(--files: each goes into its task's directory); the command's replacement
strings ({} {/} {.} {/.} {//} {#}) take each input shell-quoted.

A map is a task group with a row in `maps` and one row per input in
`map_jobs` (the task that last ran it), so `rc map --resume GROUP` re-runs
only the inputs that did not complete. Tasks are queued in batches, one
transaction each; the command then waits, reading only the tasks of the
group that ended since it last looked (the task_events rows past the last
one it saw), and prints each task's stdout as it finishes, or in input
order with --keep-order. Its exit status is the number of inputs that did
not complete, at most 101, as GNU Parallel's.

The `rc` command runs it on the main node; never in the web terminal (it
reads this machine's stdin and files, and holds on until the map ends).
"""
import argparse
import codecs
import collections
import errno
import getpass
import io
import os
import re
import shlex
import shutil
import signal
import sys
import time
import tokenize
import types

from rc import bell, db, explain, files, files_cli, health, render, task_options, tasks
from rc.states import (ACTIVE_STATES, CANCELLED, COMPLETED, PAYLOAD_FIELD, QUEUED,
                       TERMINAL_STATES)

BATCH_SIZE = 500              # tasks queued in one transaction
POLL_INTERVAL = 0.005         # seconds between looks for tasks that ended, while they do
MAX_POLL_INTERVAL = 0.02      # ... and at most, while none does
PROGRESS_INTERVAL = 0.1       # seconds between redraws of the progress bar
MAX_EXIT_STATUS = 101         # GNU Parallel's: "more than 100 inputs failed"
INTERRUPTED_STATUS = 130      # a shell's status for a command stopped by Ctrl-C
MAX_INPUTS = 100000           # inputs of one map: each job's task is checked and held
                              # before the first is queued (~1 KiB each)
SHOWN_VALUE = 60              # characters of an input named in a message
MAP_TYPES = ("shell", "python_exec", "python_eval", "echo", "sleep")
# How an input is written into each type's code so that it stays one value:
# `a; rm -rf ~` must reach the command as one argument, never as two commands.
# Types whose output is a value (python_eval's repr, echo's message), not a
# stream: each is printed on a line of its own.
VALUE_TYPES = ("python_eval", "echo", "sleep")
# python_exec, python_eval: the tokens in which a value would be inside a
# string literal of the code (f-strings are tokens of their own from 3.12).
VALUE_MARK = "_rc_map_value_"
STRING_TOKENS = {tokenize.STRING} | {getattr(tokenize, name) for name in (
    "FSTRING_MIDDLE",) if hasattr(tokenize, name)}
# The shell's quoting where a replacement string stands in the command:
# bare, inside '...' or inside "..." (`echo '{}'`, a habit from find -exec).
BARE, SINGLE, DOUBLE = "bare", "single", "double"
SUBSHELL = "subshell"                              # $(...): a bare word again, even in "..."
# $((...)), ((...)), $[...]: quotes are no quotes there, and bash reads a
# name in it (a[$(id)]) as more arithmetic: only a whole number may stand there.
ARITHMETIC = "arithmetic"
# name[...] (a[{}]=1, unset 'a[{}]', read "a[{}]"): bash's subscript,
# arithmetic too, whatever quotes the value is in (a['$(id)']=1 ran id).
SUBSCRIPT = "subscript"
LIST = "list"                   # bash's x=(...), where [k]=v is a subscript too
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
WHOLE_NUMBER = re.compile(r"\A[-+]?[0-9]+\Z")
# bash reads a quoted word as a variable name or a number in places no
# quoting reaches ([[ {} -eq 1 ]], [ -v {} ], printf -v {}, unset {}) and
# runs what a subscript holds: a value a[$(id)] ran id wherever it stood;
# declare -a x={} (local, readonly, typeset) reads a value ($(id)) as a
# list to assign, and runs it too.
SUBSCRIPT_CODE = re.compile(r"(\[|=\(|\A\().*[$`]", re.S)
# Places where no escaping keeps a value one word, refused by name.
ESCAPED, DOLLAR, BACKQUOTE, ANSI, PARAMETER, COMMENT, HEREDOC, CASE, HALF_CLOSED = (
    "escaped", "dollar", "backquote", "ansi", "parameter", "comment", "heredoc", "case",
    "half closed")
REFUSED_PLACES = {
    ESCAPED: "right after a backslash (\\{}), which escapes the value's first character",
    DOLLAR: "right after a $ (${}), which makes the value an expansion",
    BACKQUOTE: "inside `...`, which reads each backslash twice",
    ANSI: "after a $'...', which bash reads to another end than sh",
    PARAMETER: "inside ${...}",
    COMMENT: "inside a # comment, which a newline in the value would end",
    HEREDOC: "after a here-document's <<, whose lines are read unquoted",
    CASE: "after a case inside $(...), whose ) may be the end of $(...)",
    HALF_CLOSED: "after a (( closed by a single ), which sh and bash read apart",
}
SPECIAL_IN_DOUBLE = re.compile(r'([\\"$`])')     # what a backslash escapes in "..."


def shell_quote(value, state):
    """The value as one word of the command where it stands: quoted when
    bare; inside quotes of the user's own, escaped for them, so that `echo
    '{}'` with an input `x$(id)` or `it's` prints it, never runs it; in
    arithmetic, a whole number or MapUsageError."""
    if state == ARITHMETIC:
        if not WHOLE_NUMBER.match(value):
            raise MapUsageError("not a whole number, which the command's arithmetic"
                                " ($((...)), a subscript a[...]) needs where the replacement"
                                " string stands")
        return value
    if SUBSCRIPT_CODE.search(value):
        raise MapUsageError("a [ (or a ( that begins it or follows =) then $ or `, which bash"
                            " runs where it reads a variable name, a number or a list"
                            " ([[ {} -eq 1 ]], [ -v {} ], printf -v {}, declare -a x={})")
    if state == SINGLE:
        return value.replace("'", "'\\''")
    if state == DOUBLE:
        return SPECIAL_IN_DOUBLE.sub(r"\\\1", value)
    return shlex.quote(value)


def python_quote(value, state):
    return repr(value)


QUOTERS = {"shell": shell_quote, "python_exec": python_quote, "python_eval": python_quote}
# GNU Parallel's replacement strings that rc map knows, and what each makes
# of the input (GNU Parallel's own rules: {.} drops the last extension of
# the last path component only, {//} is dirname with "." for a bare name).
REPLACEMENTS = {
    "": lambda value: value,
    "/": lambda value: value.rsplit("/", 1)[-1],
    "//": lambda value: (value.rsplit("/", 1)[0] or "/") if "/" in value else ".",
    ".": lambda value: re.sub(r"\.[^/.]+\Z", "", value),
    "/.": lambda value: re.sub(r"\.[^/.]+\Z", "", value.rsplit("/", 1)[-1]),
}
JOB_NUMBER = "#"
# What looks like a replacement string: {}, {/.}, {#}, and GNU Parallel's
# others ({%} {1} {..} {= perl =}), which are refused by name. Braces with
# letters or spaces inside ({print $1}, ${HOME}, {a,b}) are the command's own.
REPLACEMENT_TOKEN = re.compile(r"\{(=.*?=|[/.#%+0-9]*)\}")
KNOWN_TOKENS = "{} {/} {.} {/.} {//} {#}"
# argparse's rule: a word like -5 or -.5 is a value, not an option.
NEGATIVE_NUMBER = re.compile(r"\A-(\d+|\d*\.\d+)\Z")
TERMINAL_SQL = db.sql_list(TERMINAL_STATES)
ERASE_LINE = "\r\x1b[K"


class MapError(Exception):
    """The map cannot go on; the message, one line, says why."""


class MapUsageError(MapError):
    """The command line is wrong (exit status 2, as rc's other usage errors)."""


class Terminated(BaseException):
    """SIGTERM (`timeout 1h rc map …`, a kill) once the map has said what it
    leaves running: rc's main then ends by SIGTERM. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` keeps it."""


class NoInputs(Exception):
    """An empty stdin (`find … -newer stamp | rc map …` that found nothing):
    nothing to run, exit status 0, as GNU Parallel's and `xargs -r`; a
    cron job's map over what is new failed as a usage error whenever
    nothing was."""


# -- the command line ---------------------------------------------------------------

class HaltRule(collections.namedtuple("HaltRule", "when failures percent text")):
    __slots__ = ()

    def reached(self, failed, total):
        """Whether `failed` of `total` inputs not completed stops the map."""
        return failed >= (self.failures * total / 100.0 if self.percent else self.failures)


def halt_rule(text):
    """GNU Parallel's --halt, for failures: soon,fail=N or now,fail=N (N a
    count, or a share of the inputs with %), and its old 1 (soon,fail=1)
    and 2 (now,fail=1)."""
    text = text.strip()
    when, _, rule = {"1": "soon,fail=1", "2": "now,fail=1"}.get(text, text).partition(",")
    match = re.fullmatch(r"fail=([0-9]{1,9})(%?)", rule)
    number = int(match.group(1)) if match else 0
    if when not in ("soon", "now") or number < 1 or (match.group(2) and number > 100):
        raise argparse.ArgumentTypeError(
            "%r is not a --halt rule: give soon,fail=N or now,fail=N (N a count of"
            " failed inputs, or a share of them such as 10%%)" % text[:80])
    return HaltRule(when, number, bool(match.group(2)), text)


def add_arguments(sub):
    sub.add_argument("template", nargs="?", metavar="COMMAND",
                     help="run once per input: {} is the input (quoted), {/} its base name,"
                     " {.} without extension, {/.} both, {//} its directory, {#} the job"
                     " number; with none of them the input is appended")
    sub.add_argument("values", nargs="*", metavar="ARG",
                     help="the inputs (without them: the lines of stdin)")
    sub.add_argument("--files", nargs="+", metavar="FILE",
                     help="inputs that are files here: each goes into its task's directory"
                     " and {} is its name there")
    sub.add_argument("--type", default="shell", choices=MAP_TYPES,
                     help="the task type (default shell)")
    sub.add_argument("-k", "--keep-order", action="store_true",
                     help="print outputs in input order (default: as they finish)")
    sub.add_argument("--results", metavar="DIR",
                     help="write each input's stdout, stderr, input, state and exit_code"
                          " to DIR/N/ (N: its job number)")
    sub.add_argument("--output", action="append", metavar="GLOB",
                     help="files each task leaves (replacement strings work); repeatable")
    sub.add_argument("--into", metavar="DIR",
                     help="where the --output files go (default: here)")
    sub.add_argument("--progress", action="store_true", default=None,
                     help="a progress bar on stderr (default: when stderr is a terminal)")
    sub.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar, on a terminal too")
    sub.add_argument("--halt", type=halt_rule, metavar="soon|now,fail=N[%]",
                     help="once N inputs (or N%% of them) did not complete, cancel the"
                          " queued ones (soon) or the running ones too (now), as GNU"
                          " Parallel's --halt; --resume runs the rest later")
    sub.add_argument("--dry-run", action="store_true",
                     help="print the command each input would run, one a line, and"
                          " queue nothing (as GNU Parallel's --dry-run)")
    sub.add_argument("--resume", type=task_options.whole_number, metavar="MAP",
                     help="run again the inputs of map MAP that did not complete")
    sub.add_argument("--cancel", type=task_options.whole_number, metavar="MAP",
                     help="cancel map MAP's queued tasks and stop its running ones")
    sub.add_argument("--input", action="append", metavar="PATH",
                     help="a file or directory every task gets (as submit --input)")
    sub.add_argument("--env", action="append", metavar="KEY=VALUE",
                     help="an environment variable for every task; repeatable")
    files_cli.add_package_arguments(sub, "every task's")
    task_options.add(sub, "each task's")


# GNU Parallel's and xargs' options that rc map has not, which habit types:
# what to do instead, said in place of argparse's "unrecognized arguments".
ONE_A_LINE = ("rc map takes one input a line of stdin (names that hold a newline: --files"
              " FILE…, or find … -print0 | xargs -0 rc map CMD --files)")
FOREIGN_OPTIONS = {
    ("-j", "--jobs", "-P", "--max-procs"):
        "rc map runs as many tasks at once as the fleet has free slots"
        " (`rc slots DEVICE N` gives a device fewer)",
    ("-0", "--null", "-d", "--delimiter"): ONE_A_LINE,
    ("--bar", "--eta"): "--progress draws a progress bar with its rate and ETA",
    ("--joblog",): "--results DIR keeps each input's state and exit code",
    ("-a", "--arg-file", "::::"): "give the file's lines on stdin: rc map CMD < FILE",
    ("-I", "-i", "--replace"): "{} is the input in the command, always",
    ("-n", "--max-args", "-L", "--max-lines", "-N", "-X", "-m", "--xargs"):
        "rc map runs the command once per input",
}


def foreign_option(options, words=()):
    """A message for the first of `options` (unknown options, `-j4`,
    `--jobs=4`) or of `words` (the command and first input, as they are:
    `-0`, `::::`) that is GNU Parallel's or xargs' option; None if none."""
    for word, exact in [(option, False) for option in options] + [(w, True) for w in words]:
        name = word if exact else word.split("=", 1)[0] if word.startswith("--") else word[:2]
        for names, instead in FOREIGN_OPTIONS.items():
            if name in names:
                return "%s is GNU Parallel's or xargs' option, not rc map's: %s" % (
                    word, instead)
    return None


def file_like_an_option(words, options):
    """A message for the first of the command line's `words` (up to a --)
    that names a file here and begins with a dash but is none of rc map's
    `options` (`rc map CMD --files *` in a folder that holds -dash.txt),
    None if none: it was refused as GNU Parallel's -d option, or first
    after --files as "expected at least one argument"."""
    for word in words[:words.index("--")] if "--" in words else words:
        if word.startswith("-") and word not in options and os.path.lexists(word):
            return ("%s is a file here whose name begins with -, which reads as an option:"
                    " give it as ./%s (--files ./* keeps every name a name)" % (word, word))
    return None


def more_inputs(arguments, extra):
    """Inputs after an option (`rc map CMD -k a b`), which argparse leaves
    over since it takes positionals in one run: added to the inputs; what
    is left (an unknown option) goes back to be refused."""
    after = []
    if "--" in extra:                  # everything after it is an input
        after, extra = extra[extra.index("--") + 1:], extra[:extra.index("--")]
    words = [word for word in extra if not word.startswith("-") or word == "-"
             or NEGATIVE_NUMBER.match(word)]
    arguments.values = list(arguments.values) + words + after
    return [word for word in extra if word not in words]


def run(arguments, context, user_files, task_options):
    """The map the arguments ask for, to its end; returns the exit status.
    From cli.py: `user_files`, a context manager under which files for the
    user (--results, --into) are written, and `task_options`, submit's
    per-task options (priority, timeout, ...) checked, from the arguments."""
    if arguments.cancel is not None:
        refuse_with(arguments, "--cancel")
        return cancel_map(context, arguments.cancel)
    with user_files():
        make_directory(arguments.results)
        if arguments.output or arguments.resume is not None:
            make_directory(arguments.into)
    try:
        if arguments.dry_run:
            if arguments.resume is not None:
                raise MapUsageError("--dry-run shows a new map's commands; leave out --resume")
            return dry_run(context, arguments, task_options)
        if arguments.resume is not None:
            refuse_with(arguments, "--resume")
            plan = resumed_map(context, arguments)
        else:
            plan = new_map(context, arguments, task_options)
    except NoInputs as e:
        context.err.write(str(e))
        return 0
    return Runner(plan, arguments, context, user_files).run()


def dry_run(context, arguments, task_options):
    """Each input's command, checked as a task of the map would be (its
    length, the options), printed one a line; nothing stored or queued."""
    template, outputs, jobs, requirements, options = map_parts(arguments, task_options)
    plan = Plan(None, arguments.type, template, {}, outputs, requirements, options, None,
                len(jobs))
    field = PAYLOAD_FIELD[arguments.type]
    commands = []
    for job in jobs:
        job = Job(job.number, job.name, file=job.file)   # a --files file by its name there,
                                                         # not stored
        plan.checked_task(context.config, job)
        commands.append(plan.payload(job)[field])
    for command in commands:            # all checked first: a bad input prints nothing
        print(command)
    return 0


def make_directory(path):
    """--results and --into, made before the map starts: a directory that
    cannot be is a usage error now, not a note per input later."""
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:         # said "cannot make directory 'out': File exists"
        raise MapUsageError("%r is there and is not a directory: name a directory"
                            % path)
    except OSError as e:
        raise MapUsageError("cannot make directory %r: %s" % (path, e.strerror or e))


def refuse_with(arguments, option):
    """--resume and --cancel take the map as it was recorded."""
    given = [name for name, value in (
        ("the command", arguments.template), ("the inputs", arguments.values),
        ("--files", arguments.files), ("--output", arguments.output),
        ("--input", arguments.input), ("--env", arguments.env),
        ("--type", arguments.type != "shell"), ("--timeout", arguments.timeout),
        ("--retries", arguments.retries is not None), ("--require", arguments.require),
        ("--after", arguments.after), ("--retry-on-failure", arguments.retry_on_failure))
        if value]
    if given:
        raise MapUsageError("%s takes the command and inputs recorded with the map; leave"
                            " out %s" % (option, given[0]))


# -- replacement strings ------------------------------------------------------------

class Template:
    """A command (or an output glob) cut at its replacement strings, so that
    each job's text is one join."""

    def __init__(self, text, what, append_input=False, shell=False):
        self.literals, self.keys = [], []
        start = 0
        for match in REPLACEMENT_TOKEN.finditer(text):
            key = match.group(1)
            if key not in REPLACEMENTS and key != JOB_NUMBER:
                raise MapUsageError("unknown replacement string %s in %s %r (rc map knows"
                                    " %s)" % (match.group(0), what, text, KNOWN_TOKENS))
            self.literals.append(text[start:match.start()])
            self.keys.append(key)
            start = match.end()
        self.literals.append(text[start:])
        if append_input and not self.keys:
            # GNU Parallel's rule: a command without any gets the input at its end.
            self.literals = [text + " ", ""]
            self.keys = [""]
        self.text = text
        self.states = shell_states(self.literals, text) if shell else [BARE] * len(self.keys)

    def fill(self, value, number, quote=None, file=False):
        """The text for one job; a `file` (--files) whose name, base name or
        stem begins with a dash is put as ./-x: --files ./* lost the ./ that
        kept it a name, and a file named --checkpoint-action=exec=… in a
        mapped folder was an option to tar."""
        pieces = [self.literals[0]]
        for key, literal, state in zip(self.keys, self.literals[1:], self.states):
            if key == JOB_NUMBER:
                pieces.append(str(number))
            else:
                replaced = REPLACEMENTS[key](value)
                if file and replaced.startswith("-"):
                    replaced = "./" + replaced
                pieces.append(quote(replaced, state) if quote else replaced)
            pieces.append(literal)
        return "".join(pieces)


# -- a map's plan: what it runs -----------------------------------------------------

class Job:
    __slots__ = ("number", "value", "blob", "task_id", "state", "file")

    def __init__(self, number, value, blob=None, task_id=None, state=None, file=False):
        self.number, self.value, self.blob = number, value, blob
        self.task_id, self.state = task_id, state
        self.file = file or blob is not None      # a --files file (stored or not yet)

    @property
    def name(self):
        """What the replacement strings read: the value, or with --files the
        file's path in the task's directory."""
        return self.blob["path"] if self.blob else self.value


class Plan:
    """One map: its group, how each job's task is made, and which jobs run now."""

    def __init__(self, group_id, task_type, template, shared, outputs, requirements, options,
                 into, total):
        self.group_id, self.task_type, self.template = group_id, task_type, template
        self.shared, self.outputs = shared, outputs          # payload fields of every task
        self.requirements, self.options, self.into = requirements, options, into
        self.total = total               # inputs of the map
        self.to_run, self.to_wait = [], []   # jobs to queue now; jobs whose task is still on
        self.done_before = 0             # completed before a --resume
        self.completed = []              # those jobs, for what no run wrote of them
        self.quote = QUOTERS.get(task_type)
        self.checked = []                # to_run's tasks, checked before any is queued

    def payload(self, job):
        text = self.template.fill(job.name, job.number, self.quote, job.file)
        payload = tasks.payload_from_argument(self.task_type, text)
        payload.update(self.shared)
        if job.blob:
            payload["inputs"] = self.shared.get("inputs", []) + [job.blob]
        if self.outputs:
            payload["outputs"] = [glob.fill(job.name, job.number) for glob in self.outputs]
        return payload

    def checked_task(self, config, job):
        """The job's task as tasks.insert takes it; MapUsageError names the input."""
        try:
            return tasks.check_task(config, self.task_type, self.payload(job),
                                    self.requirements, **self.options)
        except (tasks.TaskError, MapUsageError) as e:
            raise MapUsageError("input %d (%s): %s" % (job.number, shown(job.value), e))


def shell_states(literals, command):
    """The shell's quoting at each replacement string between `literals`,
    read as sh reads them: quotes open and close, a backslash escapes the
    next character (not inside '...'), $(...) is a bare word again even
    inside "...". Where no escaping keeps a value one word (REFUSED_PLACES),
    the command is refused: `echo "$(echo {})"` escaped for "..." ran `a;id`."""
    reader = ShellReader()
    states = []
    for literal in literals[:-1]:
        reader.read(literal)
        state = reader.place()
        if state in REFUSED_PLACES:
            raise MapUsageError("a replacement string %s: rc map cannot quote a value there"
                                " (in %r); write it bare, in '...' or in \"...\""
                                % (REFUSED_PLACES[state], command[:200]))
        states.append(state)
    return states


class ShellReader:
    """Where sh stands after each piece of a command: a stack of the places
    opened and not yet closed (quotes, $(...), `...`, ${...}, comments)."""
    WORD_BREAK = " \t\n;&|()<>"

    def __init__(self):
        self.stack = [[BARE, 0]]        # [place, ( open inside its $(...)]
        self.escaped = self.dollar = False
        self.previous = ""              # the last character read
        self.word = ""                  # the bare word read so far (a name before a [?)
        self.sticky = None              # a place that lasts to the end: heredoc, case

    def place(self):
        where = self.stack[-1][0]
        self.previous = self.word = "}"     # the value is part of a word
        if self.sticky:
            return self.sticky
        places = [frame[0] for frame in self.stack]
        for refused in (COMMENT, BACKQUOTE, PARAMETER):   # '...' in "${x:-'{}'}" is no quote
            if refused in places:
                return refused
        if self.escaped:
            return ESCAPED
        if self.dollar:
            return DOLLAR
        if ARITHMETIC in places or SUBSCRIPT in places:
            return ARITHMETIC
        return where if where in (SINGLE, DOUBLE) else BARE

    def read(self, text):
        i = 0
        while i < len(text):
            i = self.step(text, i) + 1

    def step(self, text, i):
        """Reads the character at i (and what it opens); returns the last index read."""
        char, frame = text[i], self.stack[-1]
        where, after = frame[0], text[i + 1:i + 2]
        self.dollar = False
        if self.escaped:
            self.escaped = False
        elif char == "[" and where in (BARE, SUBSHELL, SINGLE, DOUBLE, LIST) and (
                NAME.match(self.word) or not self.word and (
                    self.previous == "(" or where == LIST)):
            # quoted too: unset 'a[{}]', read "a[{}]" and declare -a x='([{}]=1)' ran it
            self.open(SUBSCRIPT)
        elif where == SINGLE:
            self.close(char == "'")
        elif where == COMMENT:
            self.close(char == "\n")
        elif char == "\\":
            self.escaped = True
        elif char == "`" and where == BACKQUOTE:
            self.close(True)
        elif char == "`":
            self.open(BACKQUOTE)
        elif where == BACKQUOTE:
            pass
        elif char == "$" and after == "'" and where != DOUBLE:
            self.sticky = ANSI          # bash's $'...' escapes a quote; to sh it is '...'
        elif char == "$" and after and after in "$?#!@*-0123456789":
            i += 1                      # a special parameter: $$ is no $ before (
        elif char == "$" and text.startswith("((", i + 1) or char == "(" and text.startswith(
                "((", i) and where in (BARE, SUBSHELL) and self.previous in self.WORD_BREAK:
            self.open(ARITHMETIC)
            i += 2 if char == "$" else 1
        elif char == "$" and after == "[":
            self.sticky = ARITHMETIC    # bash's old $[...]: every value after is a number
        elif char == "$" and after in ("(", "{"):
            self.open(SUBSHELL if after == "(" else PARAMETER)
            i += 1
        elif char == "$":
            self.dollar = True
        elif where == PARAMETER and char == "}":
            self.close(True)
        elif where == DOUBLE:
            self.close(char == '"')
        elif char == "'" and where == ARITHMETIC:
            pass                        # no quote in arithmetic
        elif char in "'\"":
            self.open(SINGLE if char == "'" else DOUBLE)
        elif where == ARITHMETIC and char in "()":
            frame[1] += 1 if char == "(" else -1
            if frame[1] < 0:            # its )), or a ) that sh and bash read apart
                self.close(True)
                if after != ")":
                    self.sticky = HALF_CLOSED
                i += after == ")"
        elif where == SUBSCRIPT and char in "[]":
            frame[1] += 1 if char == "[" else -1
            self.close(frame[1] < 0)
        elif where == LIST and char in "()":
            frame[1] += 1 if char == "(" else -1
            self.close(frame[1] < 0)
        elif char == "(" and where in (BARE, SUBSHELL) and self.previous == "=":
            self.open(LIST)
        elif where not in (BARE, SUBSHELL, LIST):
            pass                        # ${...}, arithmetic's << and #, a subscript's text
        elif char == "#" and self.previous in self.WORD_BREAK:
            self.open(COMMENT)
        elif text.startswith("<<<", i):
            i += 2                      # bash's here-string: a word follows
        elif text.startswith("<<", i):
            self.sticky = HEREDOC
        elif where == SUBSHELL and char in "()":
            frame[1] += 1 if char == "(" else -1
            self.close(frame[1] < 0)
        elif where == SUBSHELL and self.previous in self.WORD_BREAK and re.match(
                r"case\s", text[i:i + 5]):
            self.sticky = CASE
        self.previous = text[i]
        self.word = "" if text[i] in self.WORD_BREAK else self.word + text[i].strip("'\"")
        return i

    def open(self, where):
        self.stack.append([where, 0])

    def close(self, closes):
        if closes and len(self.stack) > 1:
            self.stack.pop()


def refuse_value_in_string(code):
    """python_exec, python_eval: each value goes as a string literal of its
    own (repr), so one inside a literal of the code (`print('{}')`) would
    end it: `'+__import__('os').system('id')+'` would run as code. So would
    one right after a name, `print(f{})`, which makes it an f-string; and in
    code Python cannot read (an unclosed \"\"\"), a value may close it."""
    marked = REPLACEMENT_TOKEN.sub(
        lambda match: "0" if match.group(1) == JOB_NUMBER else VALUE_MARK, code)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(marked).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        raise MapUsageError("the code does not read as Python (%s): %r" % (e, code[:200]))
    if any(VALUE_MARK in token.string for token in tokens if token.type in STRING_TOKENS):
        raise MapUsageError("a replacement string inside a string literal of the code (%r):"
                            " write it bare, print({}): rc map puts each value in as a"
                            " string literal of its own" % code[:200])
    if any(VALUE_MARK in token.string != VALUE_MARK for token in tokens
           if token.type != tokenize.COMMENT):
        raise MapUsageError("a replacement string right after a name or a number (%r), as"
                            " f{}, would be read with it: write it apart, print({})"
                            % code[:200])


def shown(value):
    return repr(render.shorten(value, SHOWN_VALUE))


def new_map(context, arguments, task_options):
    task_type = arguments.type
    template, outputs, jobs, requirements, options = map_parts(arguments, task_options)
    connection, config = context.connection, context.config
    shared = shared_fields(connection, config, task_type, arguments)
    note = task_type == "shell" and files_cli.files_left_here(arguments.template,
                                                             shared.get("inputs", []))
    if note:
        context.err.write("rc map: %s\n" % note)
    note = task_type == "shell" and not arguments.files and files_cli.inputs_left_here(
        [job.value for job in jobs[:files_cli.INPUTS_LOOKED_AT]], shared.get("inputs", []))
    if note:
        context.err.write("rc map: %s\n" % note)
    into = os.path.abspath(arguments.into or ".") if outputs else None
    plan = Plan(None, task_type, template, shared, outputs, requirements, options, into,
                len(jobs))
    if arguments.files:
        store_files(connection, config, jobs)
    plan.to_run = jobs
    plan.checked = [plan.checked_task(config, job) for job in jobs]
    plan.group_id = create_group(connection, plan)
    return plan


def map_parts(arguments, task_options):
    """(the command's template, the --output templates, the jobs, the
    requirements, the task options) of a new map, each checked."""
    if not arguments.template:
        raise MapUsageError("rc map needs a command: rc map 'CMD {}' ARG…, or lines on stdin,"
                            " or --files FILE…")
    template = Template(arguments.template, "the command", append_input=True,
                        shell=arguments.type == "shell")
    if arguments.type in ("python_exec", "python_eval"):
        refuse_value_in_string(arguments.template)
    outputs = [Template(glob, "--output") for glob in arguments.output or []]
    if arguments.into and not outputs:
        raise MapUsageError("--into says where --output files go; give --output GLOB too")
    try:
        requirements = tasks.parse_requirements(arguments.require)
        options = task_options(arguments)
    except tasks.TaskError as e:
        raise MapUsageError(str(e))
    jobs = read_inputs(arguments)       # last: an empty stdin is no error, a bad option is
    return template, outputs, jobs, requirements, options


def shared_fields(connection, config, task_type, arguments):
    """--input, --env and the pip packages: the same for every task, stored once."""
    options = types.SimpleNamespace(input=arguments.input, env=arguments.env, output=None,
                                    file=None, stdin=None, pip=arguments.pip,
                                    requirements=arguments.requirements)
    try:
        return files_cli.file_payload(connection, config, task_type, None, options)
    except (files_cli.FileOptionError, tasks.TaskError) as e:
        raise MapUsageError(str(e))


def read_inputs(arguments):
    """The jobs, numbered from 1: the arguments, --files, or the lines of stdin."""
    values = list(arguments.values)
    if values[:1] == [":::"]:
        values = values[1:]            # GNU Parallel's separator, by habit
    if values and arguments.files:
        raise MapUsageError("give the inputs as ARG… or as --files FILE…, not both")
    if arguments.files:
        jobs = [Job(number, path, blob=file_input(path))
                for number, path in enumerate(arguments.files, 1)]
    elif values:
        jobs = [Job(number, value) for number, value in enumerate(values, 1)]
    else:
        jobs = [Job(number, value) for number, value in enumerate(stdin_lines(), 1)]
    if not jobs:
        raise NoInputs("rc map: stdin gave no lines: nothing to run\n")
    if len(jobs) > MAX_INPUTS:
        raise MapUsageError("a map takes at most %d inputs, not %d" % (MAX_INPUTS, len(jobs)))
    return jobs


def stdin_lines():
    """The lines of stdin, read one at a time so that neither a line longer
    than any command takes nor more than MAX_INPUTS lines is held."""
    if sys.stdin is None or sys.stdin.isatty():
        raise MapUsageError("no inputs: give ARG…, --files FILE…, or pipe lines on stdin"
                            " (seq 10 | rc map 'echo {}')")
    lines = []
    for number in range(1, MAX_INPUTS + 2):
        line = sys.stdin.buffer.readline(tasks.MAX_PAYLOAD_TEXT + 1)
        if not line:
            return lines
        if number > MAX_INPUTS:
            raise MapUsageError("a map takes at most %d inputs; stdin has more (split it:"
                                " split -l %d)" % (MAX_INPUTS, MAX_INPUTS))
        if line.endswith(b"\n"):
            line = line[:-1]
        elif len(line) > tasks.MAX_PAYLOAD_TEXT:
            raise MapUsageError("stdin line %d is over %d bytes" % (number,
                                                                  tasks.MAX_PAYLOAD_TEXT))
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise MapUsageError(
                "stdin line %d is not UTF-8 text: %s (rc map takes UTF-8 lines; iconv -f"
                " latin1 -t utf8 makes them of a Latin-1 list)" % (number, repr(line[:200])[1:]))
    return lines


def file_input(path):
    """--files: the file as its task will get it (stored later). A relative
    path keeps its directories in the task's directory (so out/a.wav and
    b/a.wav do not meet in --into); an absolute one, or one that climbs
    out with "..", goes by its base name."""
    if not os.path.exists(path):
        raise MapUsageError(str(files_cli.no_such_file("--files", path)))
    if os.path.isdir(path):
        raise MapUsageError("--files %r is a directory; give its files (--files %s*)"
                            % (path, os.path.join(path, "")))
    try:
        files_cli.readable(path, "--files")
    except files_cli.FileOptionError as e:
        raise MapUsageError(str(e))
    name = os.path.normpath(path).replace(os.sep, "/")
    if os.path.isabs(path) or name.split("/")[0] == "..":
        name = os.path.basename(name)
    # A name of bytes that are not UTF-8 (a Latin-1 one), shown as its bytes:
    # path_problem's message showed Python's 'bad\udcff.txt'.
    shown_path = os.fsencode(path).decode("utf-8", "backslashreplace")
    if shown_path != path:
        raise MapUsageError("--files '%s': the name is not UTF-8, which a file's name in a"
                            " task's directory must be; rename it, or send it in an archive"
                            % shown_path)
    problem = files.path_problem(name)
    if problem:
        raise MapUsageError("--files %r would be %r in the task's directory, which %s"
                            % (path, name, problem))
    return {"path": name, "local": path}


def store_files(connection, config, jobs):
    """Each --files file into the store, once checked that all exist."""
    for job in jobs:
        local = job.blob.pop("local")
        try:
            entry = files_cli.store_input(connection, config, job.blob["path"], local,
                                          files_cli.mode_of(local))
        except files_cli.FileOptionError as e:
            raise MapError(str(e))
        job.blob = entry


def create_group(connection, plan):
    """The group, its map row and every job, in one transaction: from here
    on `rc map --resume` knows every input, queued or not."""
    main_field = PAYLOAD_FIELD[plan.task_type]
    recorded = dict(plan.shared, **{main_field: plan.template.text})
    if plan.outputs:
        recorded["outputs"] = [glob.text for glob in plan.outputs]
    with db.write(connection):
        group_id = connection.execute(
            "INSERT INTO task_groups(created_at, task_type, payload, requirements, options,"
            " include_new) VALUES (?, ?, ?, ?, ?, 0)",
            (time.time(), plan.task_type, db.dumps(recorded), db.dumps(plan.requirements),
             db.dumps(plan.options))).lastrowid
        connection.execute("INSERT INTO maps(group_id, inputs, into_dir) VALUES (?, ?, ?)",
                           (group_id, plan.total, plan.into))
        connection.executemany(
            "INSERT INTO map_jobs(group_id, job, input, blob) VALUES (?, ?, ?, ?)",
            [(group_id, job.number, job.value, db.dumps(job.blob) if job.blob else None)
             for job in plan.to_run])
    return group_id


# -- --resume and --cancel: a map recorded earlier ----------------------------------

def recorded_map(connection, group_id):
    """The map's group and map rows; MapUsageError when it is not a map."""
    group = connection.execute("SELECT * FROM task_groups WHERE group_id = ?",
                               (group_id,)).fetchone()
    if group is None:
        raise MapUsageError("no map %d (`rc map` printed its number at the start)" % group_id)
    row = connection.execute("SELECT * FROM maps WHERE group_id = ?", (group_id,)).fetchone()
    if row is None:
        raise MapUsageError("group %d is not a map (it is a `submit --each` group; see"
                            " `rc group %d`)" % (group_id, group_id))
    return group, row


def resumed_map(context, arguments):
    connection = context.connection
    group, row = recorded_map(connection, arguments.resume)
    recorded = db.loads(group["payload"])
    task_type = group["task_type"]
    template = Template(str(recorded.pop(PAYLOAD_FIELD[task_type])), "the command",
                        append_input=True, shell=task_type == "shell")
    outputs = [Template(glob, "--output") for glob in recorded.pop("outputs", [])]
    if arguments.into and not outputs:
        raise MapUsageError("--into says where --output files go, and map %d was started"
                            " without --output: its tasks bring back no files"
                            % group["group_id"])
    into = os.path.abspath(arguments.into) if arguments.into else row["into_dir"]
    plan = Plan(group["group_id"], task_type, template, recorded, outputs,
                db.loads(group["requirements"]), db.loads(group["options"]), into,
                row["inputs"])
    for job in jobs_of(connection, plan.group_id):
        if job.state == COMPLETED:
            plan.done_before += 1
            plan.completed.append(job)
        elif job.state == QUEUED or job.state in ACTIVE_STATES:
            plan.to_wait.append(job)
        else:
            plan.to_run.append(job)       # failed, cancelled, timed out, or never queued
    restore_swept_files(connection, context.config, plan)
    plan.checked = [plan.checked_task(context.config, job) for job in plan.to_run]
    return plan


def restore_swept_files(connection, config, plan):
    """The files of the inputs to run again, stored again when the store's
    sweep removed them (files_retention_days after their last task ended,
    which a map resumed later outlives): a --files file from where the map
    read it, if it is still there unchanged. One that is not, or an --input
    (its path here is not recorded), is a MapUsageError saying so: the map
    stopped with "no file SHA in the store; `rc map --resume` tries again",
    which never could."""
    gone = "is no longer in the file store (removed files_retention_days after its last task" \
           " ended)"
    for item in plan.shared.get("inputs", []):
        if not files.exists(connection, item["sha256"]):
            raise MapUsageError("map %d's --input %s %s: run its inputs in a new map"
                                % (plan.group_id, item["path"], gone))
    for job in plan.to_run:
        if not job.blob or files.exists(connection, job.blob["sha256"]):
            continue
        why = "is not here to store again"
        if os.path.isfile(job.value):
            # Stored, then compared: a file that changed between a check and
            # the store was stored as its new bytes, and the task queued
            # named the old ones, still not in the store.
            try:
                stored, _ = files.store_path(connection, config, job.value)
            except files.FileStoreError as e:
                if e.code != "hash_mismatch":       # that one: it changed as it was read
                    raise MapUsageError("input %d (%s): %s" % (job.number, shown(job.value), e))
                stored = None
            if stored == job.blob["sha256"]:
                continue
            why = "has changed here since"
        raise MapUsageError("input %d (%s): its file %s, and %s: run it in a new map"
                            " (rc map CMD --files ...)" % (job.number, shown(job.value), gone,
                                                          why))


def jobs_of(connection, group_id):
    rows = connection.execute(
        "SELECT j.job, j.input, j.blob, j.task_id, t.state FROM map_jobs j"
        " LEFT JOIN tasks t ON t.task_id = j.task_id WHERE j.group_id = ? ORDER BY j.job",
        (group_id,))
    return [Job(row[0], row[1], db.loads(row[2]), row[3], row[4]) for row in rows]


def cancel_map(context, group_id):
    connection = context.connection
    recorded_map(connection, group_id)
    queued, stopping = tasks.cancel_group(connection, group_id, active_too=True)
    context.audit("map_cancelled", group_id=group_id, queued=queued, running=stopping,
                  user=user_name())
    if not queued and not stopping:
        context.out.write("map %d: nothing left to cancel\n" % group_id)
        return 0
    context.out.write("map %d: %d queued tasks cancelled, %d running ones asked to stop;"
                      " `rc map --resume %d` runs them again\n"
                      % (group_id, queued, stopping, group_id))
    return 0


# -- running it: queue in batches, collect what ended, print ------------------------

class Runner:
    def __init__(self, plan, arguments, context, user_files):
        self.plan, self.context, self.user_files = plan, context, user_files
        self.connection, self.config = context.connection, context.config
        self.out, self.err = context.out, context.err
        self.out_tty, self.err_tty = self.out.isatty(), self.err.isatty()
        self.keep_order, self.results = arguments.keep_order, arguments.results
        self.unsubmitted = list(zip(plan.to_run, plan.checked))
        plan.checked = None
        self.pending = {job.task_id: job for job in plan.to_wait}     # task id -> job
        self.waiting_numbers = sorted(job.number for job in plan.to_run + plan.to_wait)
        self.next_to_print, self.held = 0, {}       # --keep-order: index, finished jobs
        self.failed = 0
        self.written = {}               # --into: a file's name there -> the job that wrote it
        self.told_replaced = False
        self.without_outputs = 0        # completed inputs that left no --output file
        self.last_event, self.rechecked_at = 0, 0.0
        self.started, self.told_why = None, False
        self.progress = Progress(self.err, plan.group_id, plan.total, plan.done_before,
                                 arguments.progress)
        self.resumed = arguments.resume is not None
        self.halt, self.halted = arguments.halt, False
        self.stopped_watch = health.StoppedWatch(self.config, self.err, "map %d"
                                                 % plan.group_id, self.progress.clear)

    def run(self):
        plan = self.plan
        self.err.write("map %d: %s%s\n" % (plan.group_id, render.counted(plan.total, "input"),
                                           self.resume_note()))
        self.err.flush()
        self.context.logger.info("map_started", group_id=plan.group_id, inputs=plan.total,
                                 to_run=len(plan.to_run), task_type=plan.task_type,
                                 resumed=self.resumed)
        self.context.audit("map_resumed" if self.resumed else "map_submitted",
                           group_id=plan.group_id, inputs=plan.total, to_run=len(plan.to_run),
                           task_type=plan.task_type, user=user_name())
        self.write_unwatched()
        if not plan.to_run and not plan.to_wait:
            self.err.write("map %d: every input completed; nothing to run\n" % plan.group_id)
            return 0
        # Every task that ends from here on has a task_events row past this one.
        self.last_event = self.newest_event()
        self.started = time.monotonic()
        heard = []      # the handler only records SIGTERM; the loop acts on it
        previous = signal.signal(signal.SIGTERM, lambda number, frame: heard.append(number))
        try:
            self.recheck()
            pause = POLL_INTERVAL
            while self.unsubmitted or self.pending:
                if heard:
                    self.left_running("terminated (SIGTERM)")
                    raise Terminated()
                if self.unsubmitted:
                    self.submit_batch()
                if time.monotonic() - self.rechecked_at > self.config.map_recheck_interval:
                    self.recheck()
                self.stopped_watch.look()
                if self.collect() or self.unsubmitted:
                    pause = POLL_INTERVAL
                else:
                    # Nothing new: look less often, so that a slow map costs
                    # little CPU; a busy one is looked at every POLL_INTERVAL.
                    time.sleep(pause)
                    pause = min(pause * 2, MAX_POLL_INTERVAL)
                self.progress.draw(self.failed)
            self.stopped_watch.ended()
        except KeyboardInterrupt:
            self.interrupted()
            raise           # rc's main ends by SIGINT, as a shell's loop expects
        except BrokenPipeError:
            self.output_closed()
            raise           # rc's exit status for it, 141, and nothing more written
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.finish()

    def resume_note(self):
        if not self.resumed:
            return ""
        # Those completed are not printed again, and one that ended after an
        # interrupted run had stopped watching was never printed: say where.
        shown = "; their outputs: `rc group %d`" % self.plan.group_id \
            if self.plan.done_before else ""
        return " (%d completed before; %d to run again, %d still queued or running%s)" % (
            self.plan.done_before, len(self.plan.to_run), len(self.plan.to_wait), shown)

    def write_unwatched(self):
        """--resume: the missing --results and --into files of inputs that
        completed before (one that ended after a Ctrl-C was never written);
        what is there already is left as it is. Their stdout is not printed."""
        if not self.results and not self.plan.outputs:
            return
        for job in self.plan.completed:
            row = self.connection.execute("SELECT result, error, reason FROM tasks"
                                          " WHERE task_id = ?", (job.task_id,)).fetchone()
            if row is None:
                continue                  # pruned meanwhile
            outcome = Outcome(self, job, db.loads(row[0]) or {}, row[1] or row[2])
            self.keep(job, outcome, missing_only=True)
            for note in outcome.notes:
                self.err.write("map %d: input %d (%s) %s\n" % (
                    self.plan.group_id, job.number, shown(job.value), render.printable(note)))

    def newest_event(self):
        return self.connection.execute("SELECT max(id) FROM task_events").fetchone()[0] or 0

    def recheck(self):
        """Every task of the group that has ended, whatever the events said:
        at the start (a --resume's tasks may have ended before the first
        look) and every map_recheck_interval after, so that a missed event
        costs seconds, never a map that waits for ever."""
        self.rechecked_at = time.monotonic()
        if not self.pending:
            return False
        first = min(self.pending)
        rows = self.connection.execute(
            "SELECT task_id, state, result, error, reason FROM tasks WHERE group_id = ?"
            " AND task_id >= ? AND state IN (%s)" % TERMINAL_SQL,
            (self.plan.group_id, first)).fetchall()
        ended = self.ended(rows)
        if not ended and self.progress.done == self.progress.done_before and self.started:
            self.tell_why_nothing_ends(first)
        return ended

    def tell_why_nothing_ends(self, task_id):
        """Once, when no input has ended a while after the start (no device
        takes shell tasks, every device is drained…): `rc why` of the first,
        so that a map that cannot run does not just sit there. Not while
        one of its tasks is on a device (assigned or running): a map of
        minute-long encodes said "no input has ended after 5 s. Task 4 has
        been running on pi for 4s" every time. Nor while the main node is
        stopped, and counted from its return: at `make run` it said "no
        device is online" before the devices were back."""
        waited = time.monotonic() - max(self.started, self.stopped_watch.back_at or 0)
        if self.told_why or self.stopped_watch.stopped \
                or waited < self.config.map_recheck_interval \
                or task_id not in self.pending or self.connection.execute(
                    "SELECT 1 FROM tasks WHERE group_id = ? AND %s LIMIT 1" % db.ACTIVE_SQL,
                    (self.plan.group_id,)).fetchone():
            return
        self.told_why = True
        self.progress.clear()
        self.err.write("map %d: no input has ended after %d s. %s%s\n" % (
            self.plan.group_id, waited, explain.why(self.connection, task_id),
            "" if self.stopped_watch.stopped else health.programs_note(self.config)))
        self.err.flush()

    def submit_batch(self):
        batch, self.unsubmitted = self.unsubmitted[:BATCH_SIZE], self.unsubmitted[BATCH_SIZE:]
        group_id, connection = self.plan.group_id, self.connection
        try:
            with db.write(connection):
                for job, task in batch:
                    # Another `rc map --resume` of this map, which read the same
                    # failed task, queued it meanwhile: this one waits for that
                    # run (each queued its own, and the input ran twice).
                    now = connection.execute(
                        "SELECT task_id FROM map_jobs WHERE group_id = ? AND job = ?",
                        (group_id, job.number)).fetchone()
                    if now is not None and now[0] != job.task_id:
                        job.task_id = now[0]
                        continue
                    job.task_id = tasks.insert(connection, task, group_id=group_id)
                    connection.execute(
                        "UPDATE map_jobs SET task_id = ? WHERE group_id = ? AND job = ?",
                        (job.task_id, group_id, job.number))
        except tasks.TaskError as e:
            raise MapError("map %d: %s; `rc map --resume %d` tries again"
                           % (group_id, e, group_id))
        bell.ring(self.config.run_dir, bell.SCHEDULER)
        for job, _ in batch:
            self.pending[job.task_id] = job
        self.context.logger.info("map_batch_submitted", group_id=group_id, tasks=len(batch),
                                 first_task_id=batch[0][0].task_id,
                                 last_task_id=batch[-1][0].task_id)

    def collect(self):
        """The group's tasks that ended since the last look, handled; whether
        there were any. A terminal state comes with a task_events row in the
        same transaction, and rows are numbered in commit order, so the rows
        past the last one seen are exactly what is new."""
        newest = self.newest_event()
        if newest == self.last_event:
            return False
        # CROSS JOIN keeps the events outside: otherwise SQLite walks every
        # task of the group on each look (its index on group_id), O(n) a look.
        rows = self.connection.execute(
            "SELECT t.task_id, t.state, t.result, t.error, t.reason FROM task_events e"
            " CROSS JOIN tasks t ON t.task_id = e.task_id WHERE e.id > ? AND e.id <= ?"
            " AND e.state IN (%s) AND t.group_id = ?" % TERMINAL_SQL,
            (self.last_event, newest, self.plan.group_id)).fetchall()
        self.last_event = newest
        return self.ended(rows)

    def ended(self, rows):
        any_ended = False
        for task_id, state, result, error, reason in rows:
            job = self.pending.pop(task_id, None)
            if job is None:
                continue               # seen already, or not one this run waits for
            any_ended = True
            job.state = state
            if state == CANCELLED and reason == tasks.GROUP_CANCELLED and not self.halted:
                self.cancelled_elsewhere()
            self.progress.done += 1
            outcome = Outcome(self, job, db.loads(result) or {}, error or reason)
            if state != COMPLETED:
                self.failed += 1
            self.keep(job, outcome)
            if self.keep_order:
                self.held[job.number] = outcome
            else:
                self.show(outcome)
        if any_ended:
            if self.keep_order:
                self.show_in_order()
            self.out.flush()
        if self.halt and not self.halted and self.halt.reached(self.failed, self.plan.total):
            self.halt_map()
        return any_ended

    def halt_map(self):
        """--halt: enough inputs did not complete. What is not queued yet never
        is, the queued tasks are cancelled (and with `now` the running ones
        stopped); the map waits for its running tasks, and the inputs left
        count as not completed, for --resume to run later."""
        group_id, now = self.plan.group_id, self.halt.when == "now"
        unqueued = self.stop_queueing()
        _, running = self.counts()
        queued, stopping = tasks.cancel_group(self.connection, group_id, active_too=now)
        self.context.audit("map_halted", group_id=group_id, rule=self.halt.text, queued=queued,
                           running=stopping, unqueued=unqueued, user=user_name())
        self.progress.clear()
        self.err.write("map %d: halted (--halt %s): %d queued tasks cancelled%s, %s\n" % (
            group_id, self.halt.text, queued,
            " and %d inputs never queued" % unqueued if unqueued else "",
            "%d assigned or running ones asked to stop" % stopping if now else
            "%d assigned or running ones finish" % running))
        self.err.flush()
        if self.keep_order:
            self.show_in_order()

    def stop_queueing(self):
        """What is not queued yet never is, and counts as not completed; the
        tasks cancelled from here on are counted, not said one by one.
        Returns how many inputs were never queued."""
        self.halted = True
        never = {job.number for job, _ in self.unsubmitted}
        self.unsubmitted = []
        self.failed += len(never)
        # --keep-order prints nothing of them (none was printed: none ended).
        self.waiting_numbers = [n for n in self.waiting_numbers if n not in never]
        return len(never)

    def cancelled_elsewhere(self):
        """`rc map --cancel` (or `rc cancel --group`) from another terminal
        while this map still queued: it went on queueing the rest (20,000
        of 100,000 ran after the cancel) and said each of 80,000 cancelled
        inputs on a line of its own."""
        group_id = self.plan.group_id
        unqueued = self.stop_queueing()
        tasks.cancel_group(self.connection, group_id)       # those queued since it ran
        self.progress.clear()
        self.err.write("map %d: cancelled (`rc map --cancel %d`)%s; the assigned or running"
                       " ones finish; `rc map --resume %d` runs the rest again\n"
                       % (group_id, group_id, ": %d inputs never queued" % unqueued
                          if unqueued else "", group_id))
        self.err.flush()

    def keep(self, job, outcome, missing_only=False):
        """--results and --into: the job's streams and files, on disk here
        (`missing_only`: only those not there yet)."""
        if not self.results and not self.plan.outputs:
            return
        with self.user_files():
            if self.results and not (missing_only and os.path.exists(
                    os.path.join(self.results, str(job.number), "state"))):
                try:
                    outcome.write_results(self, self.results)
                except OSError as e:
                    outcome.notes.append("results not written: %s" % e)
            if self.plan.outputs:
                entries = files.task_files(self.connection, job.task_id)
                if job.state == COMPLETED and not missing_only and not any(
                        entry["kind"] == files.OUTPUT for entry in entries):
                    self.left_nothing(job, outcome)
                for entry in entries:
                    if entry["kind"] == files.OUTPUT and not (missing_only and os.path.lexists(
                            os.path.join(self.plan.into, *entry["name"].split("/")))):
                        try:
                            files_cli.write_out(self.connection, self.config, entry,
                                                self.plan.into)
                        except (files_cli.FileOptionError, files.FileStoreError,
                                OSError) as e:
                            outcome.notes.append("output %s not written: %s"
                                                 % (entry["name"], e))
                        else:
                            self.replaced(job, outcome, entry["name"])

    def left_nothing(self, job, outcome):
        """A completed input that left no file its --output names (`gzip
        {}` where `--output '{}.gz'` expected `a.txt.gz`, or a glob that
        matched nothing): the first is said with its names, the count at
        the end; the map's exit status was 0 with out/ empty, not a word."""
        self.without_outputs += 1
        if self.without_outputs == 1:
            outcome.notes.append("completed but left no file that --output %s names (`rc files"
                                 " %d` lists what its task has)" % (", ".join(
                                     repr(glob.fill(job.value, job.number))
                                     for glob in self.plan.outputs), job.task_id))

    def replaced(self, job, outcome, name):
        """Two inputs' outputs of one name (`--output out.txt`): the later
        replaces the earlier in --into; said once a map."""
        earlier = self.written.setdefault(name, job.number)
        if earlier != job.number and not self.told_replaced:
            self.told_replaced = True
            outcome.notes.append("output %s replaces input %d's in --into: give each input's"
                                 " outputs names of their own ('{#}.out', '{/.}.out')"
                                 % (name, earlier))

    def show_in_order(self):
        numbers = self.waiting_numbers
        while self.next_to_print < len(numbers) and numbers[self.next_to_print] in self.held:
            self.show(self.held.pop(numbers[self.next_to_print]))
            self.next_to_print += 1

    def show(self, outcome):
        if self.halted and outcome.job.state == CANCELLED:
            return      # cancelled by --halt: counted, not said one by one
        self.progress.clear()
        outcome.show(self)

    def interrupted(self):
        """Ctrl-C: on a terminal, offer to cancel what is still queued;
        otherwise leave it and say how to cancel or resume."""
        self.progress.clear()
        group_id = self.plan.group_id
        queued, active = self.counts()
        if queued and ask(self.err, "cancel the %d queued tasks of map %d? [y/N] "
                          % (queued, group_id)):
            queued, _ = tasks.cancel_group(self.connection, group_id)
            active = self.counts()[1]   # tasks ended and started while the question waited
            self.context.audit("map_cancelled", group_id=group_id, queued=queued, running=0,
                               user=user_name())
            self.err.write("map %d: %d queued tasks cancelled; %d assigned or running ones finish;"
                           " `rc map --resume %d` runs the rest again\n"
                           % (group_id, queued, active, group_id))
        else:
            self.left_running("interrupted", queued, active)
        self.err.flush()
        return INTERRUPTED_STATUS

    def left_running(self, how, queued=None, active=None):
        """Says what goes on without this rc map (a Ctrl-C answered no or
        not asked, a SIGTERM), and how to wait for it again or cancel it:
        `timeout 1h rc map …` ended it without a word."""
        group_id = self.plan.group_id
        if queued is None:
            self.progress.clear()
            queued, active = self.counts()
        unsubmitted = len(self.unsubmitted)
        self.err.write("map %d %s: %d tasks queued and %d assigned or running"
                       " go on%s; `rc map --resume %d` waits for them and runs again what did not"
                       " complete, `rc map --cancel %d` cancels them\n"
                       % (group_id, how, queued, active,
                          ", %d inputs not yet queued" % unsubmitted if unsubmitted else "",
                          group_id, group_id))
        self.err.flush()

    def output_closed(self):
        """The reader of stdout left (`rc map ... | head -1`): as GNU Parallel
        and xargs, which die of it, start nothing more (queue no more inputs,
        cancel the queued tasks; the running ones finish) and say so, where
        the map went on unseen, every input run, and rc map ended without a
        word."""
        self.progress.clear()
        group_id = self.plan.group_id
        unqueued, self.unsubmitted = len(self.unsubmitted), []
        queued, _ = tasks.cancel_group(self.connection, group_id)
        active = self.counts()[1]
        self.context.audit("map_cancelled", group_id=group_id, queued=queued, running=0,
                           unqueued=unqueued, user=user_name())
        if not (queued or unqueued or active):
            self.err.write("map %d: its output was closed (a reader such as `head` left);"
                           " every task had run: `rc group %d` shows their outputs\n"
                           % (group_id, group_id))
        else:
            self.err.write("map %d: its output was closed (a reader such as `head` left):"
                           " %d queued tasks cancelled%s, %d assigned or running ones"
                           " finish; `rc map --resume %d` runs the rest again\n"
                           % (group_id, queued, " and %d inputs never queued" % unqueued
                              if unqueued else "", active, group_id))
        self.err.flush()

    def counts(self):
        row = self.connection.execute(
            "SELECT sum(state = ?), sum(%s) FROM tasks WHERE group_id = ?" % db.ACTIVE_SQL,
            (QUEUED, self.plan.group_id)).fetchone()
        return row[0] or 0, row[1] or 0

    def finish(self):
        self.progress.draw(self.failed, final=True)
        group_id = self.plan.group_id
        if self.without_outputs > 1:
            self.err.write("map %d: %d completed inputs left no file that --output names\n"
                           % (group_id, self.without_outputs))
        if self.failed:
            self.err.write("map %d: %d of %s did not complete; `rc map --resume %d` runs"
                           " %s again\n" % (group_id, self.failed,
                                            render.counted(self.plan.total, "input"), group_id,
                                            "it" if self.failed == 1 else "them"))
        self.context.logger.info("map_finished", group_id=group_id, failed=self.failed)
        return min(self.failed, MAX_EXIT_STATUS)


class Outcome:
    """What one job left: its stdout and stderr (text, or a stored stream
    read in chunks when shown, so that a long one is never held whole), and
    a line when it did not complete."""

    def __init__(self, runner, job, result, error):
        self.job = job
        self.stdout = stream(runner.connection, job.task_id, result, "output", 0)
        if runner.plan.task_type in VALUE_TYPES and isinstance(self.stdout, str) \
                and self.stdout and not self.stdout.endswith("\n"):
            self.stdout += "\n"           # a value, not a stream: one per line
        self.stderr = stream(runner.connection, job.task_id, result, "stderr", 1)
        self.exit_code = result.get("exit_code")
        self.notes = []
        if job.state != COMPLETED:
            self.notes.append("%s%s" % (job.state, ": " + last_line(error) if
                                        last_line(error) else ""))

    def show(self, runner):
        """stdout as the task wrote it (on a terminal, escape sequences from
        a device shown as "?"), its stderr on ours, then any note."""
        copy(runner.connection, runner.config, self.stdout, runner.out, runner.out_tty,
             self.notes)
        if self.stderr or self.notes:
            runner.out.flush()
        copy(runner.connection, runner.config, self.stderr, runner.err, runner.err_tty,
             self.notes)
        for note in self.notes:          # a device's error text: never escape sequences
            runner.err.write("map %d: input %d (%s) %s\n" % (
                runner.plan.group_id, self.job.number, shown(self.job.value),
                render.printable(note)))

    def write_results(self, runner, directory):
        os.makedirs(directory, exist_ok=True)
        # DIR/N made and entered never through a link (as --into's folders):
        # in a shared DIR another local user could plant N as a link to a
        # folder of the user's, whose state, stdout... would be replaced.
        try:
            here = files_cli.open_parent(directory, [str(self.job.number), "state"])
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OSError(e.errno, "%s is a link, which rc never writes through" %
                              os.path.join(directory, str(self.job.number)))
            raise
        try:
            self.write_texts(runner, here)
        finally:
            os.close(here)

    def write_texts(self, runner, here):
        # The state goes first and comes back last: --resume takes an entry
        # with one for whole, so rc map killed half way leaves one it writes
        # again, not one short or mixed with an earlier run's (a re-run input).
        remove_at(here, "state")
        texts = [("input", self.job.value + "\n"), ("stdout", self.stdout),
                 ("stderr", self.stderr)]
        if self.exit_code is not None:
            texts.append(("exit_code", "%s\n" % self.exit_code))
        else:
            remove_at(here, "exit_code")     # an earlier run's
        texts.append(("state", self.job.state + "\n"))
        for name, text in texts:        # a partial file renamed over what was there
            with files_cli.fresh(name + ".rc-partial", "w", dir_fd=here, encoding="utf-8",
                                 errors="replace") as f:
                copy(runner.connection, runner.config, text, f, False, self.notes)
            os.replace(name + ".rc-partial", name, src_dir_fd=here, dst_dir_fd=here)


def remove_at(directory_fd, name):
    try:
        os.unlink(name, dir_fd=directory_fd)
    except FileNotFoundError:
        pass


def stream(connection, task_id, result, field, index):
    """A task's stdout or stderr in full: the inline text, or past the
    inline cap the stored copy's entry (.rc/stdout, .rc/stderr)."""
    text = result.get(field) or ""
    if not result.get("truncated"):
        return text
    entry = files.task_file(connection, task_id, files.STREAM_NAMES[index])
    return text if entry is None else entry


def copy(connection, config, source, target, terminal, notes):
    """Text, or a stored stream chunk by chunk, to `target`; on a terminal
    with escape sequences shown as "?"."""
    def put(text):
        target.write(render.printable(text) if terminal else text)
    if isinstance(source, str):
        if source:
            put(source)
        return
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        blob, _ = files.open_blob(connection, config, source["sha256"])
        with blob:
            for chunk in iter(lambda: blob.read(files.CHUNK_BYTES), b""):
                put(decoder.decode(chunk))
        put(decoder.decode(b"", True))
    except (files.FileStoreError, OSError) as e:
        notes.append("%s cannot be read from the file store: %s" % (source["name"], e))


def user_name():
    """Who ran it, for the audit log (as rc submit records it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ask(err, question):
    """A yes from the terminal (not stdin, which may be the inputs' pipe);
    no terminal, or anything but y/yes, is a no."""
    if not err.isatty():
        return False
    try:
        # Unbuffered bytes: a terminal opened "r+" as text cannot seek, which
        # Python's text layer requires.
        with open("/dev/tty", "rb+", buffering=0) as terminal:
            terminal.write(question.encode())
            answer = terminal.readline()
            if not answer.endswith(b"\n"):
                terminal.write(b"\n")      # Ctrl-D: what follows starts a line of its own
            return answer.strip().lower() in (b"y", b"yes")
    except (OSError, KeyboardInterrupt):
        return False


class Progress:
    """map 12 [#####.....] 1234/2000  62%  830/s  ETA 0:01, redrawn in place
    on stderr at most every PROGRESS_INTERVAL; only on a terminal unless
    forced (--progress) or suppressed (--no-progress)."""

    def __init__(self, err, group_id, total, done_before, wanted):
        self.err, self.group_id, self.total = err, group_id, total
        self.enabled = err.isatty() if wanted is None else wanted
        self.done_before, self.done = done_before, done_before
        self.started = time.monotonic()
        self.drawn_at, self.shown = 0.0, False

    def draw(self, failed, final=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.drawn_at < PROGRESS_INTERVAL:
            return
        self.drawn_at = now
        self.err.write(ERASE_LINE + self.line(failed, now) + ("\n" if final else ""))
        self.err.flush()
        self.shown = not final

    def line(self, failed, now):
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.done_before) / elapsed
        left = self.total - self.done
        eta = "%d:%02d" % divmod(int(left / rate), 60) if rate > 0 else "-:--"
        width = self.columns()
        tail = " %d/%d %s %.0f/s ETA %s%s" % (self.done, self.total,
                                             render.percent(self.done / self.total), rate,
                                             eta, " failed %d" % failed if failed else "")
        head = "map %d " % self.group_id
        room = max(width - len(head) - len(tail) - 3, 4)
        # Never the whole width, nor past it: a line that wraps is one that
        # ERASE_LINE does not erase, and every redraw scrolled a new one.
        return (head + render.bar(self.done / self.total, room) + tail)[:width - 1]

    def columns(self):
        """The width of the terminal the bar is drawn on: shutil asks
        stdout's (or $COLUMNS), and under `rc map … > out.txt` stdout is a
        file: it said 80 on a 40-column terminal."""
        columns = shutil.get_terminal_size((0, 0)).columns
        try:
            return columns or os.get_terminal_size(self.err.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def clear(self):
        if self.shown:
            self.err.write(ERASE_LINE)
            self.shown = False
