"""Writing files in a background thread, so that a training loop does not wait for the disk.

`host_copy` first takes a snapshot of what is to be written (tensors copied to host memory), so the loop
can change the originals at once; `BackgroundWriter` then writes one snapshot at a time: a new write
waits for the previous one, a failed write is raised at the next call, and `wait` is called before the
program ends, so nothing is lost and nothing is written twice at once.
"""

import threading
from collections.abc import Callable

import torch


def host_copy(obj):
    """A deep copy of `obj` whose tensors are fresh host copies (dicts, lists and tuples are walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


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
