"""bin/worker.py's regions: code the long-lived worker process loads only
on first use (load_region; docs/worker.md, memory). Nothing may name a
region's code before loading it, an idle worker loads none of it, and each
region's entry loads it and works, in the worker started as on a device."""
import ast
import os
import subprocess
import sys

import pytest

from test_worker import INTERPRETERS, main, short_name  # noqa: F401
from test_worker_files import check_transform, files, run, start, transform_payload  # noqa: F401
from test_worker_identity import LOOP_COMMAND, load_worker_module

EDGES = sorted(set([sys.executable] + [p for p in INTERPRETERS
                                        if "/3.6." in p or "/3.13." in p]))
REGIONS = {"files", "environments", "options", "self_test", "upgrade", "leftovers"}


def worker_source():
    from test_worker import WORKER
    with open(WORKER) as f:
        return f.read()


def region_definitions(module, source):
    """{name defined at the top level of a region: its region}, and the
    (first, last) line (from 1) of every run of a region's lines."""
    regions = module.region_lines([line.encode() for line in source.split("\n")])
    line_region = {number + 1: name for name, numbers in regions.items() for number in numbers}
    defined = {}
    for node in ast.parse(source).body:
        region = line_region.get(node.lineno)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and region:
            defined[node.name] = region
        elif isinstance(node, ast.Assign) and region:
            defined.update((target.id, region) for target in node.targets
                           if isinstance(target, ast.Name))
    return regions, line_region, defined


def unloaded_uses(source, module):
    """(line, function, name, region) of every name of a region used where
    nothing loaded that region first: outside it, a function must call
    load_region("REGION") on an earlier line; a statement that runs as the
    module loads (a default, a decorator, a class body) may not use it at all."""
    regions, line_region, defined = region_definitions(module, source)
    lines = source.split("\n")
    spawner = range(lines.index(module.SPAWNER_CODE_BEGINS) + 1,
                    lines.index(module.SPAWNER_CODE_ENDS) + 1)
    found = []

    def loads(function, region, before):
        return any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_region"
                   and node.lineno < before and len(node.args) == 1
                   and getattr(node.args[0], "value", getattr(node.args[0], "s", None)) == region
                   for node in ast.walk(function))

    def local_names(function):
        names = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
        return names

    def visit(node, function, own):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for outer in child.decorator_list + child.args.defaults + [
                        d for d in child.args.kw_defaults if d is not None]:
                    visit_expression(outer, function, own)
                for statement in child.body:
                    visit_statement(statement, child, own)
            elif isinstance(child, ast.ClassDef):
                for outer in child.decorator_list + child.bases:
                    visit_expression(outer, function, own)
                for statement in child.body:
                    visit_statement(statement, function, own)
            else:
                visit_expression(child, function, own, deep=False)
                visit(child, function, own)

    def visit_statement(statement, function, own):
        holder = ast.Module(body=[statement])
        visit(holder, function, own)

    def visit_expression(node, function, own, deep=True):
        for child in ast.walk(node) if deep else [node]:
            if not (isinstance(child, ast.Name) and child.id in defined) \
                    or defined[child.id] == own:
                continue
            if function is not None and child.id in local_names(function):
                continue
            region = defined[child.id]
            if function is None or not loads(function, region, child.lineno):
                found.append((child.lineno, getattr(function, "name", "<module>"),
                              child.id, region))

    for node in ast.parse(source).body:
        if node.lineno not in spawner:      # run by the spawner only, from the whole file
            visit_statement(node, None, line_region.get(node.lineno))
    return sorted(set(found))


def test_nothing_names_a_regions_code_before_loading_it():
    """What a region defines is not there in the long-lived worker until
    load_region: a name of it used anywhere else, without that call first,
    would be a NameError on a path a test may not take."""
    module = load_worker_module()
    source = worker_source()
    regions, _, defined = region_definitions(module, source)
    assert set(regions) == REGIONS
    assert all(name in set(defined.values()) for name in REGIONS)
    assert unloaded_uses(source, module) == []
    # The check sees a use without a load, and one at module level.
    broken = source.replace('    def fetch_ahead(self, job, unique):\n        load_region("files")\n',
                            '    def fetch_ahead(self, job, unique):\n', 1)
    broken = broken.replace("        self.pool = FilesPool()\n",
                            "        self.pool = FilesPool()\n        self.threads = Job\n", 1)
    assert broken.count("load_region") == source.count("load_region") - 1
    assert [(name, use) for _, name, use, _ in unloaded_uses(broken, module)] == [
        ("__init__", "Job"), ("fetch_ahead", "fetch_blob")]


# Appended to the long-lived worker's start (LOOP_COMMAND's): which regions'
# names it has, then the same after each region is loaded, with a line of each.
REGION_PROBE = """
names = %r
print(sorted(r for r, n in names.items() if hasattr(worker, n)))
for region in sorted(names):
    worker.load_region(region)
    first = getattr(worker, names[region])
    worker.load_region(region)
    assert getattr(worker, names[region]) is first, region
print(sorted(r for r, n in names.items() if hasattr(worker, n)), sorted(worker.regions_loaded))
print(worker.Job.__init__.__code__.co_firstlineno, worker.parse_args.__code__.co_firstlineno)
"""
ONE_NAME = {"files": "Job", "environments": "Environments", "options": "parse_args",
            "self_test": "self_test", "upgrade": "fetch_worker", "leftovers": "Leftovers"}


@pytest.mark.parametrize("python", EDGES, ids=short_name)
def test_the_worker_process_loads_each_region_on_first_use(python, tmp_path):
    """The long-lived worker's bytecode holds no region's code; load_region
    defines it from the same file, each line where it is in worker.py,
    once (a second call changes nothing)."""
    import shutil
    from test_worker import WORKER
    copy = str(tmp_path / "worker.py")
    shutil.copy(WORKER, copy)
    made = subprocess.run([python, "-I", "-S", "-c", LOOP_COMMAND, copy],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert made.returncode == 0 and "marshal" in made.stdout, made.stderr
    code = made.stdout.strip()
    code = code[:code.index(" sys.argv[0] = ")] + "\n" + REGION_PROBE % (ONE_NAME,)
    done = subprocess.run([python, "-I", "-S", "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after, lines = done.stdout.strip().split("\n")
    assert before == "[]"
    assert after == "%s %s" % (sorted(REGIONS), sorted(REGIONS))
    module = load_worker_module()
    assert lines.split() == [str(module.Job.__init__.__code__.co_firstlineno),
                             str(module.parse_args.__code__.co_firstlineno)]


def regions_loaded(worker):
    return [entry["region"] for entry in worker.events("region_loaded")]


def test_an_idle_worker_loads_no_region_and_each_entry_loads_its_own(start, files, tmp_path):
    """Started as on a device (`python -I -S worker.py`, from its bytecode):
    registered, it has loaded no region; a plain task loads "leftovers"
    where tasks run as uids of their own (root's worker), else none; a task
    with files loads "files" and works, a second loads nothing more; a task
    asking for pip packages loads "environments"; a reload of --config,
    "options"; an upgrade, "upgrade"; --self-test runs from its region."""
    import hashlib
    from test_worker import WORKER
    from test_worker_identity import controls
    config = tmp_path / "worker.json"
    config.write_text('{"output_cap": 100000}')
    worker, link = start("--config", str(config))
    assert regions_loaded(worker) == []
    as_own_uids = ["leftovers"] if os.geteuid() == 0 else []
    assert run(link, 1, "shell", {"command": "echo plain"})["status"] == "completed"
    assert regions_loaded(worker) == as_own_uids
    check_transform(files, run(link, 2, "shell", transform_payload(files)), 2)
    check_transform(files, run(link, 3, "shell", transform_payload(files)), 3)
    assert regions_loaded(worker) == as_own_uids + ["files"]
    refused = run(link, 4, "python_exec", {"code": "print(1)", "pip": ["-e ."]})
    assert refused["status"] == "failed" and "requirement specifiers" in refused["error"]
    assert regions_loaded(worker) == as_own_uids + ["files", "environments"]
    config.write_text('{"output_cap": 200000}')
    assert controls(link, "reload")[0]["detail"] == "changed: output_cap"
    with open(WORKER, "rb") as f:
        own = hashlib.sha256(f.read()).hexdigest()
    link.send("control", {"control_id": 2, "command": "upgrade", "sha256": own})
    assert link.expect("control_ack")["detail"] == "already the served worker.py; nothing to do"
    assert regions_loaded(worker) == as_own_uids + ["files", "environments", "options", "upgrade"]
    done = subprocess.run([sys.executable, "-I", "-S", WORKER, "--self-test", "--state-dir",
                           str(tmp_path / "self-test")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert done.returncode == 0 and "echo" in done.stdout and "FAILED" not in done.stdout, \
        done.stdout
