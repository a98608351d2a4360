"""Loader processes: the one place that starts them and turns their failures into one line.

Every program loads data through a standard DataLoader, with three choices made here for all of them:
- the processes start from a fork server, a clean process that forks each of them, so that none inherits
  CUDA, threads (the program's helper threads, the loader's pinning thread) or the locks those hold;
- each loader process ends when the program does, even when it is killed outright (SIGKILL).
A loader process that dies (the kernel's out-of-memory killer; DataLoader notices within its 5-second
status check) or cannot hand over a batch (a full /dev/shm, as in a Docker container's default 64 MB)
stops the run with one line saying where.
"""

import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from utils.device import available_cores
from utils.errors import UserError
from utils.interrupts import deferred
from utils.launch import launch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HINT = ("if memory or shared memory ran short, lower --workers or --batch-size, or give /dev/shm more room "
        "(Docker: --shm-size)")


def bounded_workers(asked: int, batches: int, flag: str) -> int:
    """Loader processes for `batches` batches: at most one per batch, and at most this process's share of the
    cores (each decodes on a core of its own); says so when that is fewer than asked."""
    cores = max(1, available_cores() // max(1, launch().local_world_size))
    workers = max(0, min(asked, batches, cores))
    if workers < asked:
        print(f"note: {flag} {asked}: using {workers} loader processes ({batches} batches, {cores} cores for this "
              "process)", file=sys.stderr)
    return workers


def data_loader(dataset: Dataset, batch_sampler, workers: int) -> DataLoader:
    """A DataLoader over `dataset` whose items are batched by `batch_sampler`, in `workers` processes. Batches
    are not pinned here: the program copies them to a GPU through a few page-locked buffers of its own
    (utils.device.PinnedStaging), which bounds page-locked memory however many processes load."""
    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_project_modules())
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      multiprocessing_context=context, worker_init_fn=functools.partial(_end_with, os.getpid()))


def _end_with(program: int, worker_id: int) -> None:
    """In each loader process, once started: hear Ctrl-C and SIGTERM again (they were blocked while it started,
    utils.interrupts.deferred; the program's shutdown ends it with SIGTERM), and exit as soon as the program
    that started it has ended, however it ended.

    A loader process's parent is the fork server, not the program, so neither DataLoader's own check (its
    parent's pid) nor the kernel's parent-death signal notices a program killed outright; without this the
    loader processes, and the fork server they keep alive, would outlive it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    try:
        handle = os.pidfd_open(program)
    except (AttributeError, OSError):  # not Linux 5.3+, or the program is already gone
        handle = None

    def watch():
        if handle is not None:
            select.select([handle], [], [])  # readable once the program has exited
        else:
            while _exists(program):
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="depthflow-parent-watch", daemon=True).start()


def _project_modules() -> list[str]:
    """The project's modules this program has imported. The fork server imports them once; each loader
    process, a fork of the server, then finds them imported when it runs the program's main module again
    (as every process started this way does, before it unpickles its dataset), rather than importing them
    afresh, which costs seconds per loader process."""
    root, environment = str(PROJECT_ROOT) + os.sep, str(Path(sys.prefix).resolve()) + os.sep
    return sorted(name for name, module in list(sys.modules.items())
                  if (path := str(getattr(module, "__file__", None) or "")).startswith(root)
                  and not path.startswith(environment) and not name.startswith("__"))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:  # it exists, owned by another user
        return True
    except ProcessLookupError:
        return False


def loader_error(err: BaseException, where: str) -> UserError:
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    if isinstance(err, ConnectionError | EOFError) or "exited unexpectedly" in reason:
        reason = f"a loader process ended unexpectedly, killed for memory perhaps: {reason}"
    return UserError(f"data loading failed at {where} ({reason}); {HINT}")


def batches(loader: DataLoader, where: Callable[[int], str]) -> Iterator:
    """The loader's batches; a failure to load batch k (other than a UserError naming a bad file) stops the
    run with one line naming `where(k)`."""
    try:
        if loader.num_workers:
            # Started first: starting it unblocks Ctrl-C and SIGTERM in this thread (CPython's bpo-33613), which
            # would undo the block deferred() puts on them for the loader processes to inherit.
            resource_tracker.ensure_running()
        with deferred():  # a signal landing while the processes start would leave the loader half-made
            iterator = iter(loader)
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"cannot start the data-loading processes ({err}); {HINT}") from None
    k = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError:
            raise
        except (OSError, RuntimeError, EOFError) as err:
            raise loader_error(err, where(k)) from None
        yield batch
        k += 1
