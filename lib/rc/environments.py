"""Python environments on devices (issue 22): the packages a task imports,
given as pip requirement specifiers in its payload's `pip` list, from
`rc submit --requirements FILE` or `--pip PKG==VER` (or `"pip": [...]` in
/api/v1, or the client's `pip=`).

The worker builds one virtual environment per set of specifiers, Python
version and architecture, caches it, and runs the task with it (docs/
environments.md). Only specifiers reach the device: no pip options, paths or
URLs, which would let a task's submitter point pip at anything, and which
a requirements file on a laptop would not mean on a Pi anyway.
"""
import re

# The worker's profile carries this capability where it can build one
# (the venv and ensurepip modules are there): bin/worker.py has a copy,
# checked by tests/test_shared_definitions.py.
VENV_CAPABILITY = "python_venv"
PAYLOAD_FIELD = "pip"          # the payload's list of specifiers
MAX_PACKAGES = 64              # specifiers in one task
MAX_SPECIFIER = 200            # characters in one
# name[extras] then version clauses, optionally `; marker`: PEP 508 without
# URLs (name @ url) or anything pip would read as an option or a path. Only
# spaces and tabs between the parts: a line break would start a line of its
# own in the requirements file the worker hands pip ("x ;\n-r FILE").
SPACE = r"[ \t]*"
OPERATOR = SPACE + r"(?:===|==|!=|~=|<=|>=|<|>)" + SPACE
SPECIFIER = re.compile(
    r"\A[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"                    # the project's name
    r"(?:\[[A-Za-z0-9._-]+(?:" + SPACE + "," + SPACE + r"[A-Za-z0-9._-]+)*\])?"   # [extras]
    r"(?:" + OPERATOR + r"[A-Za-z0-9.*+!_-]+"                          # version clauses
    r"(?:" + SPACE + "," + OPERATOR + r"[A-Za-z0-9.*+!_-]+)*)?"
    r"(?:" + SPACE + ";" + SPACE + r"[A-Za-z0-9_.'\"<>=!~ ()-]+)?\Z")   # ; environment marker


class PackagesError(ValueError):
    """A list of specifiers that cannot go to a device; the message says why."""


def check_packages(packages):
    """The payload's `pip` list, checked: each a plain specifier."""
    if not isinstance(packages, list) or not packages:
        raise PackagesError("pip must be a non-empty list of requirement specifiers"
                                " such as \"numpy==1.26.4\"")
    if len(packages) > MAX_PACKAGES:
        raise PackagesError("pip holds at most %d specifiers, not %d"
                                % (MAX_PACKAGES, len(packages)))
    checked = []
    for package in packages:
        if not isinstance(package, str):
            raise PackagesError("pip specifier %r must be text" % (package,))
        package = package.strip()
        if len(package) > MAX_SPECIFIER or not SPECIFIER.match(package):
            raise PackagesError(
                "pip specifier %r is not a plain requirement (name, [extras], version"
                " clauses, ; marker); pip options, paths and URLs are not sent to devices"
                % package[:MAX_SPECIFIER])
        checked.append(package)
    return checked


def read_requirements_file(text, name="requirements file"):
    """A requirements.txt's specifiers: comments and blank lines left out,
    a line pip would take as an option (-r, -e, --index-url ...) refused."""
    packages = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise PackagesError("%s line %d: %r is a pip option; only requirement"
                                    " specifiers are sent to devices" % (name, number, line))
        packages.append(line)
    if not packages:
        raise PackagesError("%s names no package" % name)
    return check_packages(packages)
