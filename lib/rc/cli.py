"""The `rc` program on the main node: runs one command line of the grammar in
lib/rc/commands.py (which rc-web's terminal runs too) on this terminal, and
exits with its status. `bin/rc` runs this module."""
import os
import signal
import sys

from rc import commands, map_cli, state_dir


def main(argv=None):
    commands.USER_UMASK = state_dir.keep_files_private()   # rc-cli.log, the audit log, backups
    try:
        return commands.run_command(sys.argv[1:] if argv is None else argv, sys.stdout,
                                    sys.stderr)
    except KeyboardInterrupt:
        die_of(signal.SIGINT)
        return 128 + signal.SIGINT
    except map_cli.Terminated:
        die_of(signal.SIGTERM)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # `rc logs | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return commands.BROKEN_PIPE


def die_of(number):
    """End by the signal that ended the command (SIGINT: Ctrl-C; SIGTERM),
    not by exit status 130: a shell that hears Ctrl-C while its loop waits
    for a child goes on with the loop unless the child died of it (`for f
    in *; do rc map …; done` queued the next map after the user had
    pressed Ctrl-C)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


if __name__ == "__main__":
    sys.exit(main())
