"""Stopping a training run at a step boundary, every process together, with the finished work saved.

A run stops when asked (Ctrl-C, SIGTERM from SLURM or `docker stop`, or the launcher gone: the ranks of a
killed torchrun hear SIGTERM) or when a process cannot go on (a batch it cannot load, a loader process
killed for memory). Before each step the processes agree once, over the host (gloo) group, on whether
any of them must stop; then all stop together and rank 0 saves the steps they finished, the whole global
batches' figures included. A process that runs out of memory inside a step cannot take part in the
others' gradient all-reduce, so it saves its own copy (the replicas are equal after every finished step)
and stops alone; its launcher then ends the others.

    control = RunControl(ctx, stop_requests, save)
    batch = control.take(batches)                       # a load failure is noted, not raised
    control.at_step(epoch, step, figures)               # the one agreement; saves and raises if stopping
    ...forward, backward...                             # torch.OutOfMemoryError -> control.failed_alone(...)
"""

from collections.abc import Callable, Iterator

from utils import distributed
from utils.errors import UserError, one_line
from utils.interrupts import Stopped, StopRequests

# save(epoch, step, figures, everywhere): write last.pth at (epoch, step); `everywhere`: this process writes
# even if it is not rank 0.
Save = Callable[[int, int, object, bool], None]


class RunControl:
    def __init__(self, ctx: distributed.Context, stop: StopRequests, save: Save, output_hint: str):
        self.ctx, self.stop, self.save, self.output_hint = ctx, stop, save, output_hint
        self.failure: str | None = None

    def take(self, batches: Iterator):
        """The next batch, or None after noting why it could not be loaded (a UserError naming the file or the
        loader's failure): the next `at_step` stops every process with that reason."""
        try:
            return next(batches)
        except UserError as err:
            self.failure = one_line(err)
            return None

    def at_step(self, epoch: int, done: int, figures) -> None:
        """Agree with the other processes whether to go on; if not, save the `done` finished steps of `epoch`
        and raise (Stopped for a stop request, UserError for a failure)."""
        stopping, failing = distributed.agree_any([self.stop.signum is not None, self.failure is not None],
                                                  self.ctx)
        if not (stopping or failing):
            return
        if failing:
            reason = distributed.first_message(self.failure, self.ctx)
            self.save(epoch, done, figures, False)
            distributed.barrier(self.ctx)  # none leaves (torchrun would stop the others) before rank 0 has saved
            raise UserError(f"{reason}; saved {self.output_hint} at epoch {epoch + 1}, step {done}: continue with "
                            "--resume")
        self.save(epoch, done, figures, False)
        distributed.barrier(self.ctx)
        raise Stopped(f"saved {self.output_hint} at epoch {epoch + 1}, step {done}; continue with --resume",
                      self.stop.signum or 2)

    def failed_alone(self, what: str, epoch: int, done: int, figures) -> None:
        """A failure inside a step (out of memory): this process saves the `done` finished steps itself and
        raises; the others are stopped by the launcher when it exits."""
        self.save(epoch, done, figures if not self.ctx.distributed else None, True)
        where = f" (process {self.ctx.rank} of {self.ctx.world_size})" if self.ctx.distributed else ""
        raise UserError(f"{what}{where}; saved {self.output_hint} at epoch {epoch + 1}, step {done}: continue with "
                        "--resume")
