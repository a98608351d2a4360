"""Work off the main thread: checkpoint writes during training, and per-frame work (PNG writing, scoring).

`BackgroundWriter` writes one snapshot at a time (a checkpoint taken by `host_copy`, so the loop can change
the originals at once): a new write waits for the previous one, a failed write is raised at the next call,
and `wait` is called before the program ends, so nothing is lost and nothing is written twice at once.

`map_in_threads(fn, items, workers)` runs `fn` on each item on helper threads (PNG encoding, image
decoding and NumPy release the GIL) while the caller keeps producing items, with a bounded backlog, so
memory stays flat however many items come.
"""

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def _tensors(obj, found: list) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, found)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _tensors(value, found)


def _rebuild(obj, copies: dict):
    if isinstance(obj, torch.Tensor):
        return copies[id(obj)]
    if isinstance(obj, dict):
        return {k: _rebuild(v, copies) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_rebuild(v, copies) for v in obj)
    return obj


def host_copy(obj):
    """A deep copy of `obj` (dicts, lists and tuples walked) whose tensors are fresh host copies.

    Tensors are copied as one flat buffer per device and dtype: a model and its optimizer on a GPU take a
    few copies and one synchronisation, not one per tensor (thousands for MiT-B2 and Adam). The copies
    are views of those buffers."""
    tensors: list = []
    _tensors(obj, tensors)
    groups: dict = {}
    for t in {id(t): t for t in tensors}.values():
        groups.setdefault((t.device, t.dtype), []).append(t)
    copies = {}
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to("cpu")
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            copies[id(t)] = part.view(t.shape)
    return _rebuild(obj, copies)


def all_finite(obj) -> bool:
    """True if every floating-point tensor in `obj` (a host copy) holds finite numbers only."""
    tensors: list = []
    _tensors(obj, tensors)
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


class BackgroundWriter:
    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Run `write()` in the background once the previous write has finished."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="depthflow-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # raised again in the caller's thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the last write has finished; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def map_in_threads(fn: Callable, items: Iterable, workers: int, backlog: int) -> Iterator:
    """`fn(item)` for every item, on `workers` threads (at least one), in the items' order, with at most
    `backlog` items waiting; an error in `fn` is raised in the caller's thread."""
    pending: deque = deque()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="depthflow-helper")
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) > backlog:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
