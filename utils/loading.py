"""Loader processes: the one place that starts them and turns their failures into one line.

Every program loads data through a standard DataLoader, with three choices made here for all of them:
- the processes start from a fork server, a clean process that forks each of them, so that none inherits
  CUDA, threads (the program's helper threads, the loader's pinning thread) or the locks those hold;
- on a GPU, a thread copies each batch into page-locked memory (`pin_memory`), from which the copy to
  the device runs asynchronously;
- each loader process ends when the program does, even when it is killed outright (SIGKILL).
A loader process that dies (the kernel's out-of-memory killer; DataLoader notices within its 5-second
status check) or cannot hand over a batch (a full /dev/shm, as in a Docker container's default 64 MB)
stops the run with one line saying where.
"""

import functools
import multiprocessing
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from utils.errors import UserError
from utils.interrupts import deferred

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HINT = ("if memory or shared memory ran short, lower --workers or --batch-size, or give /dev/shm more room "
        "(Docker: --shm-size)")


def data_loader(dataset: Dataset, batch_sampler, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over `dataset` whose items are batched by `batch_sampler`, in `workers` processes."""
    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_project_modules())
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      multiprocessing_context=context, worker_init_fn=functools.partial(_end_with, os.getpid()))


def _end_with(program: int, worker_id: int) -> None:
    """In each loader process: exit as soon as the program that started it has ended, however it ended.

    A loader process's parent is the fork server, not the program, so neither DataLoader's own check (its
    parent's pid) nor the kernel's parent-death signal notices a program killed outright; without this the
    loader processes, and the fork server they keep alive, would outlive it."""
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
    return UserError(f"data loading failed at {where} ({reason}); {HINT}")


def batches(loader: DataLoader, where: Callable[[int], str]) -> Iterator:
    """The loader's batches; a failure to load batch k (other than a UserError naming a bad file) stops the
    run with one line naming `where(k)`."""
    try:
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
