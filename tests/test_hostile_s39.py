"""attack39: Retire-Cluster attacked from outside, aiming first at what
session 38 changed. `rc map`'s quoting read only '...' and "...": a value
after a backslash or a $, inside "$(...)", `...`, $'...', a comment or a
here-document ran as code; a python map's value after a name (f{}) became an
f-string. Each test failed before the fix its docstring names."""
import shutil
import subprocess

from cluster_harness import RC, Cluster
from rc import throttle


def shells():
    return [shell for shell in ("/bin/sh", shutil.which("bash")) if shell]


def test_rc_map_never_runs_a_value_wherever_the_command_puts_it(tmp_path):
    """Each command here ran its input's `touch` (under dash and bash) as
    `rc map --dry-run` wrote it: the value was escaped for the quotes the
    shell_states reading saw, not for where the shell stood. Each is now
    either quoted for where it stands and printed as it is, or refused
    (exit 2) with the place named; in arithmetic ($((...)), where quotes
    are none and bash reads a[$(id)] as more arithmetic) only a whole
    number may stand."""
    marker = tmp_path / "ran"
    run = "touch %s" % marker
    cluster = Cluster(tmp_path / "home")
    refused = [("echo \\{}", "a ;%s #" % run), ('echo "\\{}"', "$(%s)" % run),
               ('echo "${}"', "(%s)" % run), ('echo "`echo {}`"', "x$(%s)" % run),
               ("echo hi # {}", "x\n%s" % run), ("cat <<EOF\n{}\nEOF", "x$(%s)" % run),
               ("echo $'{}'", "\\'; %s #" % run),
               ('echo "$(case a in a) echo {};; esac)"', "a;%s" % run),
               ("echo \"${x:-'{}'}\"", "$(%s)" % run), ("echo $'a\\'b' \\\"{}", "\\\";%s;#" % run),
               ("echo $(( {} * 2 ))", "a[$(%s)]" % run)]
    printed = [('echo "$(echo {})"', "a;%s" % run), ("# don't\necho {}", "a;%s" % run),
               ('echo "$(echo "{}")"', "x$(%s)" % run), ("echo $(( {#} ))-'{}'", "it's")]
    for command, value in refused + printed + [('echo "$$(({}"', "\\';%s;#" % run)]:
        done = cluster.rc("map", "--dry-run", command, "--", value, check=False)
        if (command, value) in refused:
            assert done.returncode == 2 and ("rc map cannot quote a value there" in done.stderr
                                             or "not a whole number" in done.stderr), \
                (command, done.stdout, done.stderr)
            continue
        assert done.returncode == 0, done.stderr
        for shell in shells():
            ran = subprocess.run([shell, "-c", done.stdout], stdout=subprocess.PIPE,
                                 universal_newlines=True, cwd=str(tmp_path))
            expected = value if "{#}" not in command else "1-" + value
            assert (command, value) not in printed or ran.stdout == expected + "\n", \
                (shell, command, ran.stdout)
    assert not marker.exists()
    done = cluster.rc("map", "--dry-run", "echo $(( {} * 2 )) '{}'", "--", "21", "-3")
    assert done.stdout == "echo $(( 21 * 2 )) '21'\necho $(( -3 * 2 )) '-3'\n"


def test_a_python_maps_value_after_a_name_or_in_unreadable_code_is_refused(tmp_path):
    """`rc map --type python_exec 'print(f{})'` made each value (repr) an
    f-string, so `{__import__('os').system('id')}` ran id; code Python
    cannot read (an unclosed triple quote) went on to the device, where a
    value holding the quotes could close it. Both are refused (exit 2)."""
    marker = tmp_path / "ran"
    value = "{__import__('os').system('touch %s')}" % marker
    cluster = Cluster(tmp_path / "home")
    for code, message in (("print(f{})", "right after a name"),
                          ("print(rb{})", "right after a name"),
                          ('x = """{}', "does not read as Python")):
        done = cluster.rc("map", "--dry-run", "--type", "python_exec", code, "--", value,
                          check=False)
        if done.returncode == 0:
            subprocess.run(["python3", "-c", done.stdout], cwd=str(tmp_path))
        assert done.returncode == 2 and message in done.stderr, (code, done.stderr)
    done = cluster.rc("map", "--dry-run", "--type", "python_exec", "print({}) # {}", "--",
                      value)
    assert done.stdout == "print(%r) # %r\n" % (value, value)
    assert not marker.exists()


def test_a_mapped_file_whose_name_begins_with_a_dash_is_no_option(tmp_path):
    """`rc map 'tar czf {/.}.tgz {}' --files ./*` in a folder where someone
    left a file named `--checkpoint-action=exec=sh x`: --files ./* kept the
    ./ that made it a name, rc map dropped it (the file's path in the task's
    directory), and tar read an option that runs a command. Every
    replacement string of a --files file that begins with a dash is ./-x
    now; --output globs still name the file as it is."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "--checkpoint-action=exec=sh x").write_text("x")
    (folder / "a.txt").write_text("a")
    cluster = Cluster(tmp_path / "home")
    done = subprocess.run(
        [RC, "map", "--dry-run", "tar czf {/.}.tgz {} {/} {//}", "--output", "{/}.out",
         "--files", "./--checkpoint-action=exec=sh x", "./a.txt"], env=cluster.env,
        cwd=str(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    assert done.stdout.split("\n") == [
        "tar czf './--checkpoint-action=exec=sh x'.tgz './--checkpoint-action=exec=sh x'"
        " './--checkpoint-action=exec=sh x' .", "tar czf a.tgz a.txt a.txt .", ""], done.stderr


def test_wrong_proofs_from_ever_new_addresses_are_forgotten_once_aged():
    """A wrong proof's key (address, device) stayed in rc-server's and
    rc-files' WrongProofs until that same key came again: a task on the
    main node's local worker, binding each connection to another 127.x
    address (or a stranger cycling through an IPv6 /64), grew rc-server by
    ~560 bytes an attempt for good (20,000 wrong registers: RSS 24 -> 35 MB).
    Keys whose proofs have aged are dropped a window later; a key still
    within its window is shut out as before."""
    now = [0.0]
    proofs = throttle.WrongProofs(3, window=60.0, clock=lambda: now[0])
    for n in range(1000):
        proofs.add(("127.1.%d.%d" % (n // 250, n % 250 + 1), None))
    now[0] = 61.0
    for n in range(1000):
        proofs.add(("127.2.%d.%d" % (n // 250, n % 250 + 1), None))
    assert len(proofs.times) == 1000
    for _ in range(3):
        proofs.add(("127.3.0.1", "dev"))
    assert proofs.shut_out(("127.3.0.1", "dev")) and not proofs.shut_out(("127.4.0.1", "dev"))
