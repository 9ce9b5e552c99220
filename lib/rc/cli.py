"""The `rc` program on the main node: runs one command line of the grammar in
lib/rc/commands.py (which rc-web's terminal runs too) on this terminal, and
exits with its status. `bin/rc` runs this module."""
import os
import sys

from rc import commands, state_dir


def main(argv=None):
    commands.USER_UMASK = state_dir.keep_files_private()   # rc-cli.log, the audit log, backups
    try:
        return commands.run_command(sys.argv[1:] if argv is None else argv, sys.stdout,
                                    sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rc logs | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return commands.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
