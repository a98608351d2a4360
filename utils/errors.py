"""User-facing errors: one line, non-zero exit, no traceback."""

import argparse
import contextlib
import functools
import signal
import sys
import threading


class UserError(Exception):
    """A problem the user can fix (a path, a file, a flag). Its message is the whole report."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C


@contextlib.contextmanager
def deferring_ctrl_c():
    """Hold Ctrl-C back while the block starts processes, then deliver it to whoever handles it.

    Python runs a signal's handler between bytecodes. One that lands while the process forks runs inside
    an at-fork callback (the logging module registers one), where the KeyboardInterrupt it raises is
    printed and dropped, and the run carries on as if Ctrl-C had not been pressed. Inside the block the
    handler only notes the signal; afterwards the signal is raised again under the usual handler. Children
    forked meanwhile keep the noting handler: Ctrl-C is the main process's to handle, and it stops them."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            signal.raise_signal(signal.SIGINT)


def one_line(err: UserError) -> str:
    """The message itself. A UserError re-raised from a DataLoader worker carries the worker's traceback in its
    text; its own message is the last line, after the exception's name."""
    last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return last.split("UserError: ", 1)[-1]


def cli_entry(main):
    """Run `main`; turn a UserError, or an OS error about a path (an output folder that cannot be created, a
    full disk), into one line on stderr and exit code 2, and Ctrl-C into one line and exit code 130. Every
    program writes its outputs atomically and as it goes, so what was finished before Ctrl-C is kept."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except OSError as err:
            if err.filename is None:  # not about a path the user gave: a real failure, keep its traceback
                raise
            print(f"error: cannot use {err.filename}: {err.strerror or err} (check the path and its permissions)",
                  file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("error: interrupted; finished outputs are kept (a resumable command continues where it stopped)",
                  file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block), exit code 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
