"""How the programs stop when asked: Ctrl-C (SIGINT), and SIGTERM, which SLURM, `docker stop` and `timeout`
send. Both unwind the program the same way, ending in one line and the shell's exit code for the signal
(130, 143). A long job that can stop cleanly (training) asks `stop_requests()` instead, and finishes the
step in hand and saves before it stops. A process started by torchrun also hears SIGTERM when its
launcher is gone, killed outright (`watch_launcher`), so it stops as Ctrl-C stops it rather than run on.
"""

import contextlib
import os
import select
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread wherever it is, so that it unwinds like Ctrl-C."""


class Stopped(Exception):
    """A job that stopped at a safe point when asked, its work saved; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated()


def terminate_like_ctrl_c() -> None:
    """From now on SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


class StopRequests:
    """SIGINT and SIGTERM, while installed, only note the signal; the job asks `signum` at its safe points."""

    def __init__(self):
        self.signum: int | None = None

    def _note(self, signum, frame):
        self.signum = signum


@contextlib.contextmanager
def deferred():
    """Hold Ctrl-C and SIGTERM back while the block runs (starting loader processes, say, which a signal
    landing half-way leaves half-made), then deliver the first one that came. The signals are also blocked in
    this thread, a mask the processes it starts inherit: a Ctrl-C sent to the whole process group never
    reaches a loader process or the fork server half-way through starting (where Python would print a
    traceback); the program ends them when it ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in EXIT_CODES}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, list(EXIT_CODES))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held by the mask is noted now, in `pending`
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


@contextlib.contextmanager
def stop_requests():
    requests = StopRequests()
    previous = {sig: signal.signal(sig, requests._note) for sig in EXIT_CODES}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_launcher() -> None:
    """Send this process SIGTERM when its parent (the launcher) ends, however it ends: torchrun, killed with
    SIGKILL, can no longer stop the processes it started, which would train on and race a rerun."""
    launcher = os.getppid()
    try:
        handle = os.pidfd_open(launcher)
    except (AttributeError, OSError):  # not Linux 5.3+, or the launcher is already gone
        return

    def wait():
        select.select([handle], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="depthflow-launcher-watch", daemon=True).start()
