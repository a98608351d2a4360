"""User-facing errors: one line, non-zero exit, no traceback."""

import argparse
import functools
import signal
import sys

from utils.interrupts import EXIT_CODES, Stopped, Terminated, terminate_like_ctrl_c


class UserError(Exception):
    """A problem the user can fix (a path, a file, a flag). Its message is the whole report."""


EXIT_USER_ERROR = 2


def one_line(err: Exception) -> str:
    """The message itself. A UserError re-raised from a DataLoader worker carries the worker's traceback in its
    text; its own message is the last line, after the exception's name."""
    last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return last.split("UserError: ", 1)[-1]


def cli_entry(main):
    """Run `main`; turn a UserError, or an OS error about a path (an output folder that cannot be created, a
    full disk), into one line on stderr and exit code 2; Ctrl-C and SIGTERM into one line and exit codes
    130 and 143. Every program writes its outputs atomically and as it goes, so what was finished before
    it stopped is kept."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        terminate_like_ctrl_c()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except OSError as err:
            if err.filename is None:  # not about a path the user gave: a real failure, keep its traceback
                raise
            print(f"error: cannot use {err.filename}: {err.strerror or err} (check the path, its permissions and "
                  "the free space)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except Stopped as err:
            print(f"stopped: {err}", file=sys.stderr)
            sys.exit(EXIT_CODES[err.signum])
        except KeyboardInterrupt as err:
            what = "terminated" if isinstance(err, Terminated) else "interrupted"
            print(f"error: {what}; finished outputs are kept (a resumable command continues where it stopped)",
                  file=sys.stderr)
            sys.exit(EXIT_CODES[signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT])

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block), exit code 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
