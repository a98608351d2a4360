"""Which samples each training step takes: the same global batches for any number of processes.

Each epoch's samples are permuted by a generator seeded with seed + epoch (the order torch's
DistributedSampler gives one process) and cut into global batches of `batch_size`; each of the
`world_size` processes takes its equal slice of every global batch. A last, partial global batch is cut to
a multiple of the process count so that every process steps together. Samples are (epoch, index) keys that
the dataset turns into pixels with generators of their own, so a run is the same for any number of loader
or training processes, and a resumed run replays exactly what the stopped one would have done.
"""

import random

import torch

from utils.distributed import Context


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed the global generators (Python, torch on the CPU and every GPU) for one step. Sampling and flips
    have generators of their own; this makes anything else random in a step (dropout, say) a function of
    (seed, epoch, step, process), so a resumed run draws what the uninterrupted one would have."""
    value = random.Random(f"{seed}/{epoch}/{step}/{rank}").getrandbits(63)
    random.seed(value)
    torch.manual_seed(value)


class GlobalBatches:
    """This process's share of every global batch, epoch after epoch, as (epoch, index) sample keys."""

    def __init__(self, samples: int, batch_size: int, seed: int, ctx: Context):
        self.samples, self.batch_size, self.seed, self.ctx = samples, batch_size, seed, ctx
        self.steps_per_epoch = sum(1 for _ in self._global(0))

    def _global(self, epoch: int):
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        world = self.ctx.world_size
        for start in range(0, self.samples, self.batch_size):
            batch = order[start:start + self.batch_size]
            batch = batch[:len(batch) // world * world]
            if batch:
                yield batch

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        world, rank = self.ctx.world_size, self.ctx.rank
        return [[(epoch, i) for i in batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]]
                for batch in self._global(epoch)]

    def plan(self, start_epoch: int, start_step: int, epochs: int) -> "BatchPlan":
        """Batches from (start_epoch, start_step) to the end of the run: one loader serves every epoch."""
        return BatchPlan(self, start_epoch, start_step, epochs)


class BatchPlan:
    """An iterable of the run's remaining batches, made lazily (a whole recipe holds 128,000 of them)."""

    def __init__(self, batches: GlobalBatches, start_epoch: int, start_step: int, epochs: int):
        self.batches, self.start_epoch, self.start_step, self.epochs = batches, start_epoch, start_step, epochs

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs):
            yield from self.batches.epoch(epoch)[self.start_step if epoch == self.start_epoch else 0:]

    def __len__(self) -> int:
        return (self.epochs - self.start_epoch) * self.batches.steps_per_epoch - self.start_step

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, step) of the k-th batch of the plan."""
        done = self.start_step + k
        return self.start_epoch + done // self.batches.steps_per_epoch, done % self.batches.steps_per_epoch
