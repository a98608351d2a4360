"""Shared memory through which loader processes hand whole batches to the main process, reused batch after batch.

A DataLoader worker normally puts each batch into a fresh shared-memory segment, whose pages the kernel
must allocate and zero as they are first written: for a batch of 854x480 frames (image and flow) that is
about 1.7 ms of kernel time a frame, a third of what the worker spends on it. Here each worker keeps a few
segments and refills them. The main process copies a batch out as it receives it (on a GPU, the loader's
pinning already does) and only then hands the segment back, so no batch a caller holds can change under it.
"""

import math
import multiprocessing
import os
import time

import torch
from torch.utils.data import get_worker_info


class SharedBatches:
    """`per_worker` reusable uint8 buffers for each of `workers` loader processes.

    Made in the main process before the loader starts its workers, which inherit it. A worker claims a free
    buffer with `empty`; the main process frees it in `receive`. With more buffers than batches a worker can
    have in flight (DataLoader's prefetch_factor), a worker never waits for one.
    """

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = per_worker
        self._free = multiprocessing.Array("b", [1] * (workers * per_worker), lock=False)
        self._buffers: dict[int, torch.Tensor] = {}  # each worker's own, made as its batches need them
        # The main process's view of each slot, kept so that the next batch through it arrives in the same
        # mapping (torch reuses a live one) with its pages already in place, rather than faulting them in again.
        self._received: dict[int, torch.Tensor] = {}

    def empty(self, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        """(slot, uint8 tensor of `shape`) to fill: shared memory in a loader process, plain memory (slot -1)
        outside one, where nothing crosses a process boundary."""
        info = get_worker_info()
        if info is None:
            return -1, torch.empty(shape, dtype=torch.uint8)
        slot = self._claim(info.id)
        size = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or len(buffer) < size:
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.uint8).share_memory_()
        return slot, buffer[:size].view(shape)

    def _claim(self, worker: int) -> int:
        parent = os.getppid()
        while True:
            for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
                if self._free[slot]:
                    self._free[slot] = 0
                    return slot
            if os.getppid() != parent:  # the main process is gone; nobody will free a slot
                os._exit(1)
            time.sleep(0.001)

    def receive(self, slot: int, batch: torch.Tensor, pinned: bool = False) -> torch.Tensor:
        """In the main process: the batch as memory of its own, its slot handed back to the worker. `pinned`:
        the loader already copied it into pinned memory."""
        if slot < 0:
            return batch
        owned = batch if pinned else batch.clone()
        if not pinned:
            self._received[slot] = batch
        self._free[slot] = 1
        return owned
