"""The `rc` command's side of task files: what --input, --stdin, --file,
--env and --output put in a task's payload, and where `rc get` writes a
task's files. The `rc` command runs on the main node, so it reads and
writes the file store (lib/rc/files.py) directly; remote users upload with
POST /api/v1/files instead.

Every local path is checked (exists, readable) before any file is stored
or any task queued; errors are FileOptionError, naming the path.
"""
import errno
import hashlib
import os
import shlex
import stat
import sys

from rc import environments, files, tasks
from rc.states import PAYLOAD_FIELD

EXECUTABLE_MODE, PLAIN_MODE = 0o755, 0o644
INPUTS_LOOKED_AT = 100      # a map's first inputs checked for files left here: a stat each
PARTIAL_SUFFIX = ".rc-partial"   # a file being written out, renamed to its name when whole


class FileOptionError(ValueError):
    """A file option cannot be used; the message names the path and why."""


# -- submit: local files into the store and the payload ---------------------------------

def looks_like_a_script_path(task_type, argument):
    """`rc submit python_exec script.py`: the argument names a file here,
    which the device would run as code (python_exec, or python_eval, where
    `script.py` reads as a name and fails there with a NameError) or cannot
    see (a relative path in a shell command)."""
    if task_type not in tasks.FILE_TASK_TYPES + ("python_eval",) or not argument \
            or "\n" in argument or len(argument) > 4096:
        return False
    if task_type != "python_exec" and " " in argument.strip():
        return False
    if task_type == "shell" and os.path.isabs(argument):
        return False
    return os.path.isfile(argument)


def files_left_here(command, inputs):
    """A note on the words of a shell command that name a file here which is
    none of the task's inputs (`rc submit shell 'python3 sim.py'` without
    --input sim.py): the task runs in an empty directory on a device, where
    the command will not find it. None when there are none."""
    try:
        words = shlex.split(command[:4096], comments=True)
    except ValueError:
        return None
    left = unsent_files([word for word in words if not word.startswith("-") and not any(
        c in word for c in "{}$*?[=<>|;&")], inputs)
    if not left:
        return None
    return ("note: %s %s here but not an input: the task runs in an empty directory on a"
            " device, where the command will not find %s; %s sends %s" % (
                " and ".join(repr(word) for word in left[:3]),
                "is a file" if len(left) == 1 else "are files",
                "it" if len(left) == 1 else "them",
                " ".join("--input " + shlex.quote(word) for word in left[:3]),
                "it" if len(left) == 1 else "them"))


def unsent_files(words, inputs, most=3, kind=os.path.isfile):
    """Up to `most` of `words` that are relative paths of files here (or
    of what else `kind` says yes to) which none of `inputs` (payload
    entries) sends."""
    sent = {entry["path"] for entry in inputs}
    left = []
    for word in words:
        if os.path.isabs(word) or "\n" in word:
            continue
        name = os.path.normpath(word).replace(os.sep, "/")
        if name == ".." or name.startswith("../") or name in sent \
                or any(path.startswith(name + "/") for path in sent):
            continue
        if word not in left and kind(word):
            left.append(word)
            if len(left) == most:
                break
    return left


def inputs_left_here(values, inputs):
    """A note when the inputs of a shell map are files here (`ls *.txt |
    rc map 'wc -l'`, an xargs habit) sent as their names only: each task
    runs in an empty directory on a device, where its file is not; None
    when the first INPUTS_LOOKED_AT are not. It points to the shell's glob,
    not to `ls | xargs`, which splits `my file.txt` at its space."""
    left = unsent_files(values[:INPUTS_LOOKED_AT], inputs)
    if not left:
        return folders_left_here(values, inputs)
    return ("note: the input%s %s %s here, but each task runs in an empty directory on a"
            " device, where the command will not find %s; --files sends each input's file"
            " to its task (bin/rc map CMD --files *.txt)" % (
                "s" if len(left) > 1 else "",
                " and ".join(repr(value) for value in left),
                "are files" if len(left) > 1 else "is a file",
                "them" if len(left) > 1 else "it"))


def folders_left_here(values, inputs):
    """inputs_left_here() for inputs that are directories here (`ls -d */ |
    rc map 'du -s {}'`), which each failed on its device with no word why."""
    left = unsent_files(values[:INPUTS_LOOKED_AT], inputs, kind=os.path.isdir)
    if not left:
        return None
    return ("note: the input%s %s %s here, but each task runs in an empty directory on a"
            " device, where the command will not find %s; --files %s sends each of its"
            " files to a task of its own, --input %s the whole directory to every task" % (
                "s" if len(left) > 1 else "",
                " and ".join(repr(value) for value in left),
                "are directories" if len(left) > 1 else "is a directory",
                "them" if len(left) > 1 else "it",
                shlex.quote(os.path.join(left[0], "")) + "*",
                shlex.quote(left[0].rstrip("/") or left[0])))   # bad/ would be its contents


def planned_inputs(paths):
    """(path in the task directory, local path, mode) for each --input: a
    file goes by its own name; a directory as a tree under its name, or,
    written with a trailing slash (photos/), its contents at the top (as
    rsync reads it). Every file is checked readable here, before any is
    stored."""
    planned = []
    for given in paths:
        if not os.path.exists(given):
            raise no_such_file("input", given)
        if os.path.isdir(given):
            planned.extend(tree(given))
        else:
            planned.append((os.path.basename(given), given, mode_of(given)))
    for name, local, _ in planned:
        readable(local, "input")
        problem = files.path_problem(name)
        if problem:
            raise FileOptionError("input %r goes to %r, which %s" % (local, name, problem))
    seen = {}
    for name, local, _ in planned:
        if name in seen:
            raise FileOptionError("inputs %r and %r would both be %r in the task directory"
                                  % (seen[name], local, name))
        seen[name] = local
    return planned


def tree(directory):
    top = "" if directory.endswith("/") else os.path.basename(os.path.normpath(directory))
    found = []
    # A link to a directory is followed, as a link to a file is (its files
    # go; a device has no link target), unless it leads back up to itself.
    for here, subdirectories, names in os.walk(directory, followlinks=True):
        looped = link_loop(directory, here)
        if looped:
            raise FileOptionError("input %r: the link %r leads to %r, which holds it (a loop)"
                                  % (directory, here, looped))
        subdirectories.sort()
        for name in sorted(names):
            local = os.path.join(here, name)
            if os.path.islink(local) and not os.path.isfile(local):
                continue          # a dangling link carries nothing
            relative = os.path.relpath(local, directory).replace(os.sep, "/")
            found.append(((top + "/" if top else "") + relative, local, mode_of(local)))
    if not found:
        raise FileOptionError("input %r: the directory holds no files" % directory)
    return found


def link_loop(top, here):
    """Where `here` leads when it is a link to a directory that holds it on
    the way down from `top` (`up -> ..`, or a/to_b -> b and b/to_a -> a):
    following it would never end. Else None."""
    if not os.path.islink(here):
        return None
    real = os.path.realpath(here)
    inside = real.rstrip(os.sep) + os.sep
    top, path = os.path.normpath(top), os.path.dirname(os.path.normpath(here))
    while True:
        holder = os.path.realpath(path)
        if holder == real or holder.startswith(inside):
            return real
        if len(path) <= len(top):
            return None
        path = os.path.dirname(path)


def mode_of(path):
    try:
        return EXECUTABLE_MODE if os.stat(path).st_mode & stat.S_IXUSR else PLAIN_MODE
    except OSError:
        return PLAIN_MODE


def no_such_file(what, path):
    """The error for a path that is not there. One that holds `*`, `?` or
    `[` is most likely a pattern the shell matched to no file, which it
    passes on as it is (`--files *.wav` in a folder of .mp3s): say so."""
    message = "%s %r: no such file or directory" % (what, path)
    if any(c in path for c in "*?["):
        message += " (a pattern that matched no file here: the shell passes it on as it is)"
    return FileOptionError(message)


def readable(path, what):
    if not os.path.lexists(path):
        raise no_such_file(what, path)
    if not os.path.isfile(path):
        raise FileOptionError("%s %r is not a regular file" % (what, path))
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise FileOptionError("%s %r cannot be read: %s" % (what, path, e.strerror))


def file_payload(connection, config, task_type, argument, options, stdin=None):
    """The payload fields the file options stand for, their files stored.
    `options` has inputs, stdin, file, env, outputs (lists or None) as
    argparse gives them. Everything is checked before anything is stored."""
    fields = {}
    try:
        tasks.check_process_fields(task_type, [name for name, given in (
            ("inputs", options.input), ("stdin", options.stdin), ("env", options.env),
            ("outputs", options.output)) if given])
    except tasks.TaskError as e:
        raise FileOptionError(str(e))
    if options.env:
        fields["env"] = tasks.parse_env(options.env)
    packages = python_packages(getattr(options, "requirements", None),
                               getattr(options, "pip", None))
    if packages:
        fields[environments.PAYLOAD_FIELD] = tasks.check_packages(task_type, packages)
    if options.output:
        fields["outputs"] = tasks.check_outputs(options.output)
    planned = planned_inputs(options.input or [])
    if options.file:
        if task_type not in tasks.FILE_TASK_TYPES:
            raise FileOptionError("--file goes with python_exec or shell, not %s" % task_type)
        if argument:
            raise FileOptionError("give either --file or the %s, not both"
                                  % PAYLOAD_FIELD[task_type])
        readable(options.file, "--file")
        name = os.path.basename(options.file)
        if name not in {entry[0] for entry in planned}:
            planned.append((name, options.file, mode_of(options.file)))
        fields["file"] = name
    if options.stdin and options.stdin != "-":
        readable(options.stdin, "--stdin")
    if planned:
        fields["inputs"] = [store_input(connection, config, name, local, mode)
                            for name, local, mode in planned]
    if options.stdin:
        fields["stdin"] = store_stdin(connection, config, options.stdin, stdin)
    return fields


def add_package_arguments(parser, whose="the task's"):
    """--requirements and --pip, as submit, map, service and schedule take them."""
    parser.add_argument("--requirements", metavar="FILE",
                        help="pip requirements %s device installs into a cached virtual"
                        " environment first (docs/environments.md)" % whose)
    parser.add_argument("--pip", action="append", metavar="PKG==VER",
                        help="one pip requirement for that environment; repeatable")


def python_packages(requirements_file, pip):
    """--requirements FILE and --pip SPEC...: the specifiers, checked."""
    packages = []
    if requirements_file:
        readable(requirements_file, "--requirements")
        with open(requirements_file, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024 + 1)
        try:
            packages = environments.read_requirements_file(text, requirements_file)
        except environments.PackagesError as e:
            raise FileOptionError(str(e))
    return packages + list(pip or [])


def store_input(connection, config, name, local, mode):
    try:
        digest, size = files.store_path(connection, config, local)
    except files.FileStoreError as e:
        raise FileOptionError("input %r: %s" % (local, e))
    return {"path": name, "sha256": digest, "size": size, "mode": mode}


def store_stdin(connection, config, given, stdin):
    try:
        if given == "-":
            digest, size = files.store_stream(connection, config, stdin or sys.stdin.buffer,
                                              limit=config.files_quota_mb * files.MIB)
        else:
            digest, size = files.store_path(connection, config, given)
    except files.FileStoreError as e:
        raise FileOptionError("--stdin %r: %s" % (given, e))
    return {"sha256": digest, "size": size}


# -- rc files / rc get --------------------------------------------------------------------

def listed(connection, task_id):
    """The task's files as rows for a table."""
    return [{"NAME": entry["name"], "KIND": entry["kind"], "SIZE": entry["size"],
             "ATTEMPT": entry["attempt"] or "", "SHA256": entry["sha256"]}
            for entry in files.task_files(connection, task_id)]


def wanted(connection, task_id, names):
    """The files `rc get` writes: the named ones, or every output and stream."""
    entries = files.task_files(connection, task_id)
    if not names:
        return [entry for entry in entries if entry["kind"] in (files.OUTPUT, files.STREAM)]
    chosen = []
    for name in names:
        entry = files.task_file(connection, task_id, name)
        if entry is None:
            raise FileOptionError("task %d has no file %r (`rc files %d` lists them)"
                                  % (task_id, name, task_id))
        chosen.append(entry)
    return chosen


def write_out(connection, config, entry, directory):
    """One stored file to directory/name, through a temporary file renamed
    into place once its hash is checked; returns the path written. The
    folders of its name are made and entered one at a time, never through
    a link: another local user could plant one in a shared DIR (DIR/sub to
    the user's ~/.ssh) where a device's output sub/authorized_keys went."""
    fixed = entry["kind"] in (files.STREAM, files.CHECKPOINT)     # the .rc/ names
    problem = None if fixed else files.path_problem(entry["name"])
    if problem:
        raise FileOptionError("stored name %r %s; not written" % (entry["name"], problem))
    parts = entry["name"].split("/")
    target = os.path.join(directory, *parts)
    try:
        os.makedirs(directory or ".", exist_ok=True)
        parent = open_parent(directory or ".", parts)
    except OSError as e:
        raise FileOptionError("cannot write %r: %s" % (target, in_the_way(target) or (
            "a folder of its name there is a link, which rc never writes through"
            if e.errno == errno.ELOOP else e.strerror)))
    temporary = partial_name(parts[-1])
    try:
        blob, _ = files.open_blob(connection, config, entry["sha256"])
        digest = hashlib.sha256()
        with blob, fresh(temporary, dir_fd=parent) as out:
            for chunk in iter(lambda: blob.read(files.CHUNK_BYTES), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise FileOptionError("%s: the stored blob is damaged (expected %s got %s)"
                                  % (entry["name"], entry["sha256"], digest.hexdigest()))
        os.replace(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as e:            # no room, no permission, a directory of that name
        raise FileOptionError("cannot write %r: %s" % (target, e.strerror or e))
    finally:
        try:
            os.unlink(temporary, dir_fd=parent)
        except OSError:
            pass
        os.close(parent)
    return target


def partial_name(name):
    """NAME.rc-partial, the name cut short enough that it fits where NAME
    does: a file name holds 255 bytes, and an output named with 245 or
    more was never written ("File name too long")."""
    while len(os.fsencode(name + PARTIAL_SUFFIX)) > files.MAX_COMPONENT_BYTES:
        name = name[:-1]
    return name + PARTIAL_SUFFIX


def open_parent(directory, parts):
    """A descriptor of the folder a file named `parts` goes in under
    `directory`: each folder of the name made (the umask applies) and
    opened from the one before, O_NOFOLLOW; OSError (ELOOP) at a link."""
    parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o777, dir_fd=parent)
            except FileExistsError:
                pass
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=parent)
            except NotADirectoryError:       # what O_DIRECTORY says of a link
                if stat.S_ISLNK(os.lstat(part, dir_fd=parent).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                raise
            os.close(parent)
            parent = inner
    except BaseException:
        os.close(parent)
        raise
    return parent


def fresh(path, mode="wb", dir_fd=None, **options):
    """A file made anew at `path` (the umask applies), never written through
    a link someone else left there: the directory may be shared. A stale one
    (a cut run's) goes first."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o666, dir_fd=dir_fd), mode, **options)


def in_the_way(target):
    """The file where `rc get` needs a directory (-o a file), said as such."""
    parent = os.path.dirname(target)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return "%r is a file, not a directory" % parent
    return None
