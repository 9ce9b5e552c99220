"""What a new user copies from the docs is what the code has (docs33): the
defaults configuration.md gives, the routes http.md names, every option of
every `rc` command, the log events operations.md tells to look for, the
`rc health` line it shows, and the layout the README and architecture.md
draw. Each check reads the code's own tables (DEFAULTS, the app's routes,
the argparse parsers, the health report), so a change that forgets its
docs fails here."""
import argparse
import io
import json
import os
import re

import pytest

from rc import commands, config as rc_config, health, state_dir, web
from rc.defaults import DEFAULTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def code_text():
    """Every source file a program of the cluster runs: lib/rc and bin/."""
    texts = []
    for top in ("lib/rc", "bin"):
        for directory, _, names in os.walk(os.path.join(ROOT, top)):
            if "__pycache__" in directory:
                continue
            for name in names:
                if name.endswith(".py") or top == "bin":
                    texts.append(read(os.path.relpath(os.path.join(directory, name), ROOT)))
    return "\n".join(texts)


# -- settings ---------------------------------------------------------------------------

def test_every_default_configuration_md_gives_is_the_codes():
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`|]*)` \|", read("docs/configuration.md"), re.M)
    assert len(rows) >= len(DEFAULTS) - 1      # all but `alerts`, whose default is in words
    wrong = []
    for key, text in rows:
        assert key in DEFAULTS, "docs/configuration.md has a row for %s, no such setting" % key
        try:
            value = json.loads(text)
        except ValueError:
            value = text                          # `local`, `info`, `0.0.0.0`: bare strings
        if value != DEFAULTS[key]:
            wrong.append("%s: docs %s, code %r" % (key, text, DEFAULTS[key]))
    assert not wrong, "docs/configuration.md gives other defaults: " + "; ".join(wrong)


UNIT = {None: 1, "s": 1, "%": 1, "KiB": 1024, "MiB": 1024 * 1024, "GiB": 1024 ** 3,
        "day": 86400, "days": 86400, "h": 3600, "min": 60}


def test_a_default_the_prose_gives_in_passing_is_the_codes():
    """`accept_timeout` (15 s), `lease_duration`, 180 s: wherever a doc gives a
    setting's default beside its name."""
    wrong, seen = [], 0
    for name in sorted(os.listdir(DOCS)) + ["../README.md"]:
        text = read(os.path.join("docs", name))
        for key, number, unit in re.findall(
                r"`([a-z_]+)`(?: \(|, )([0-9][0-9,]*(?:\.[0-9]+)?)(?: ?(s|%|KiB|MiB|GiB|days?|h|min))?(?=[),;])",
                text):
            seen += key in DEFAULTS
            if key in DEFAULTS and float(number.replace(",", "")) * UNIT[unit or None] != DEFAULTS[key]:
                wrong.append("%s: %s %s%s, code %r" % (name, key, number, unit and " " + unit or "",
                                                       DEFAULTS[key]))
    assert seen >= 40, "the docs' defaults in passing are no longer found (%d)" % seen
    assert not wrong, "a default in the docs is not the code's: " + "; ".join(wrong)


# -- routes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_routes(tmp_path_factory):
    home = tmp_path_factory.mktemp("docs_s33")
    app = web.make_app(rc_config.load(environ={"RC_HOME": str(home)}))
    return [(route.method, route.rule) for route in app.routes]


def rule_pattern(rule):
    """A route's rule as a regular expression over the docs' spelling of it
    (/api/v1/tasks/ID/files/NAME)."""
    parts = re.split(r"<[^<>]*(?:<[^<>]*>[^<>]*)*>", rule)   # a filter's regex may hold <...>
    parts = [re.sub(r"\{[^}]*\}", "", p) for p in parts]
    return "[A-Za-z0-9_.]+".join(re.escape(p) for p in parts)


def test_every_route_the_docs_name_exists(app_routes):
    patterns = [(method, re.compile(rule_pattern(rule) + r"$")) for method, rule in app_routes]
    missing = []
    for name in sorted(os.listdir(DOCS)) + ["../README.md"]:
        text = read(os.path.join("docs", name))
        for method, path in re.findall(r"\b(GET|POST|DELETE|PUT) (/[^\s`\"'|,;)]*)", text):
            path = path.split("?")[0]
            if path.endswith("*") or path in ("/api/v1", "/api/v1/"):
                continue                          # `GET /api/v1/*`: the whole tree
            if not any(m == method and p.match(path) for m, p in patterns):
                missing.append("%s: %s %s" % (name, method, path))
    assert not missing, "no such route: " + "; ".join(missing)


def test_every_route_is_in_http_md_or_schedules_md(app_routes):
    text = read("docs/http.md") + read("docs/schedules.md")
    missing = [
        "%s %s" % (method, rule) for method, rule in app_routes
        if not re.search(r"(?:^|[\s`(])%s(?=[\s`?),.;:]|$)" % rule_pattern(rule), text, re.M)
        or method != "GET" and not re.search(r"%s %s(?=[\s`?),.;:]|$)"
                                             % (method, rule_pattern(rule)), text)]
    assert not missing, "docs/http.md (or schedules.md) does not name %s" % "; ".join(missing)


# -- rc's commands and options ----------------------------------------------------------

def parsers():
    return commands.command_parsers(commands.build_parser(io.StringIO()))


def options(parser):
    """Every option string of a command, its subcommands' too."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options(sub)
    return found


def cli_rows():
    """{command: (synopsis, description)} of docs/cli.md's table; a command may
    have several rows (submit)."""
    rows = {}
    for name, synopsis, what in re.findall(r"^\| `rc ([a-z-]+)((?:[^|\\]|\\\|)*)\| (.*)\|$",
                                           read("docs/cli.md"), re.M):
        before = rows.get(name, ("", ""))
        rows[name] = (before[0] + " " + synopsis, before[1] + " " + what)
    return rows


FLAG = r"(?<![\w-])(--?[a-z][a-z-]*)"
# Said once for every list command, above the table: "take --json, --csv, --tsv
# and --no-header".
LIST_OPTIONS = {"--json", "--csv", "--tsv", "--no-header"}
# A command whose options are a page of their own.
OWN_PAGE = {"map": "docs/map.md", "schedule": "docs/schedules.md", "service": "docs/schedules.md"}


def test_every_flag_in_a_synopsis_of_cli_md_exists():
    known, wrong = parsers(), []
    for name, (synopsis, _) in cli_rows().items():
        assert name in known, "docs/cli.md has a row for `rc %s`, no such command" % name
        wrong += ["rc %s %s" % (name, flag) for flag in re.findall(FLAG, synopsis)
                  if flag not in options(known[name])]
    assert not wrong, "docs/cli.md names options rc refuses: " + ", ".join(wrong)


def option_groups(parser):
    """The spellings of each option of a command and of its subcommands:
    [("-n", "--lines"), ...]."""
    groups = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                groups += option_groups(sub)
        elif action.option_strings:
            groups.append(tuple(action.option_strings))
    return groups


def test_every_option_of_every_command_is_documented():
    rows, missing = cli_rows(), []
    for name, parser in sorted(parsers().items()):
        text = " ".join(rows.get(name, ("", ""))) + (read(OWN_PAGE[name]) if name in OWN_PAGE else "")
        said = set(re.findall(FLAG, text)) | LIST_OPTIONS | {"-h", "--help"}
        # One spelling is enough (-n for --lines, -v for --verbose).
        missing += ["rc %s %s" % (name, "/".join(group)) for group in option_groups(parser)
                    if not set(group) & said]
    assert not missing, "documented nowhere a user looks: " + ", ".join(sorted(set(missing)))


# -- log events -------------------------------------------------------------------------

def test_the_events_operations_md_tells_to_look_for_are_logged():
    text = read("docs/operations.md")
    life = re.search(r"^\| event \| program \| when \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text, re.M)
    assert life, "docs/operations.md lost its table of a task's events"
    named = set(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", "".join(
        line.split("|")[1] for line in life.group(1).splitlines())))
    named |= set(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", re.search(
        r"^\| `rc-cli\.log` \|(.*)$", text, re.M).group(1)))
    named |= set(re.findall(r"(?:says|logged as|logs?)\s+`([a-z]+(?:_[a-z]+)+)`", text))
    assert {"task_submitted", "task_assigned", "devices_held", "main_node_stopping",
            "alert_rules_invalid"} <= named
    code = code_text()
    missing = sorted(n for n in named if not re.search(r"[\"']%s[\"']" % n, code))
    assert not missing, "docs/operations.md names events no program writes: " + ", ".join(missing)


# -- rc health's line -------------------------------------------------------------------

def shape(line):
    """A health line with its figures taken out: what the docs can promise."""
    return re.sub(r"[0-9][0-9.]*|…", "N", line)


def test_the_health_line_in_operations_md_is_the_one_rc_health_prints(tmp_path):
    example = re.search(r"^\$ bin/rc health\n(RC OK - .*)$", read("docs/operations.md"), re.M)
    assert example, "docs/operations.md lost its rc health example"
    settings = tmp_path / "rc.json"
    settings.write_text(json.dumps({"health_supervisor": False, "health_min_devices_online": 0}))
    config = rc_config.load(environ={"RC_HOME": str(tmp_path / "home"), "RC_CONFIG": str(settings)})
    state_dir.init(config)
    report = health.check(config)
    assert report.status == health.OK, report.line()
    # The example's cluster has supervisord, which this one leaves out.
    expected = example.group(1).replace("6 programs running, ", "").replace("programs_running=6 ", "")
    assert shape(report.line()) == shape(expected)


# -- the layout -------------------------------------------------------------------------

def test_the_readme_layout_names_every_program_module_and_doc():
    block = re.search(r"^## How it is built\n\n```\n(.*?)^```", read("README.md"), re.M | re.S)
    assert block, "README.md lost its layout"
    names = set(re.findall(r"[A-Za-z0-9_.-]+", block.group(1)))
    programs = [n for n in os.listdir(os.path.join(ROOT, "bin")) if n != "__pycache__"]
    modules = [n[:-3] for n in os.listdir(os.path.join(ROOT, "lib", "rc"))
               if n.endswith(".py") and n != "__init__.py"]
    docs = [n for n in os.listdir(DOCS) if n.endswith(".md")]
    missing = sorted(set(programs + modules + docs) - names)
    assert not missing, "README.md's layout does not name " + ", ".join(missing)


def test_architecture_md_says_what_every_module_is_for():
    text = read("docs/architecture.md")
    missing = sorted(n for n in os.listdir(os.path.join(ROOT, "lib", "rc"))
                     if n.endswith(".py") and n != "__init__.py" and "`%s`" % n not in text)
    assert not missing, "docs/architecture.md does not name " + ", ".join(missing)


# -- the web terminal's admin commands ---------------------------------------------------

def test_http_md_names_every_command_the_web_terminal_runs_only_with_the_admin_token():
    row = re.search(r"^\| changing: (.*)\| the admin token, always \|$", read("docs/http.md"), re.M)
    assert row, "docs/http.md lost its row of what needs the admin token"
    named = set(re.findall(r"`([a-z-]+)`", row.group(1)))
    admin = set(commands.WEB_ADMIN_COMMANDS)
    admin |= {name for name in parsers() if name in ("schedule", "service")
              and commands.web_access([name, "remove", "x"]) == "admin"}
    assert admin - named == set(), "docs/http.md does not say these need the admin token"
    named.discard("logs")                   # `logs --program audit` alone
    assert named & set(parsers()) <= admin, "docs/http.md asks the token for a reader's command"


def test_cli_md_says_which_commands_do_not_run_in_the_web_terminal():
    rows = cli_rows()
    unsaid = [name for name in commands.WEB_REFUSED
              if not re.search(r"[Mm]ain node only|[Nn]ot in the web terminal|web terminal's `%s` is its own"
                               % name, rows.get(name, ("", ""))[1])]
    assert not unsaid, "docs/cli.md does not say these do not run in the web terminal: %s" % unsaid
    runs = [name for name, (_, what) in rows.items()
            if re.search(r"Main node only|Not in the web terminal", what)   # `-f` is *main node only*
            and name not in commands.WEB_REFUSED]
    assert not runs, "docs/cli.md says these do not run in the web terminal, but they do: %s" % runs


def test_the_fields_a_text_pipeline_in_the_docs_cuts_are_the_ones_it_names():
    """`cut -d'|' -f1,11` on /text/devices (docs/http.md, README): which
    columns those are was left to the reader to count (first hour, session
    34); the comment beside each names them, and here they are checked."""
    from rc.records import DEVICE_COLUMNS
    found = 0
    for path in ("README.md", "docs/http.md"):
        for fields, names in re.findall(r"/text/devices\?header=0' \| cut -d'\|' -f([\d,]+)"
                                        r"\s+# (\S+)", read(path)):
            found += 1
            assert names.split("|") == [DEVICE_COLUMNS[int(f) - 1] for f in fields.split(",")], (
                path, fields, names)
    assert found >= 2
