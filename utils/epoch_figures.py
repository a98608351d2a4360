"""An epoch's running figures: mean loss and pooled foreground IoU of the steps so far.

Kept on the device: adding a step's figures never waits for the device, and reading them (an all-reduce
over the processes under torchrun, then one copy to the host) happens once per log interval and per
epoch, not every step. Saved with mid-epoch checkpoints, so an epoch's logged figures cover the whole
epoch after a resume too.
"""

import torch

from utils import distributed


class EpochFigures:
    def __init__(self, ctx: distributed.Context, state: dict | None = None):
        self.ctx = ctx
        # loss, intersection, union, steps whose loss counted
        self.sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)
        self.steps = 0
        if state is not None:
            self.sums += state["sums"].to(ctx.device)
            self.steps = state["steps"]

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, skip_non_finite: bool) -> None:
        """One step's figures. `skip_non_finite`: a step whose loss is not finite does not count (fp16 loss
        scaling skips such a step: it is an overflow, not the model's loss); otherwise it makes the mean NaN,
        which stops the run."""
        pred, target = logits[:, 1] > logits[:, 0], target.bool()
        step = torch.stack([loss.detach().double(), (pred & target).sum().double(), (pred | target).sum().double(),
                            torch.ones((), dtype=torch.float64, device=loss.device)])
        if skip_non_finite:
            step = torch.where(loss.detach().isfinite(), step, torch.zeros_like(step))
        self.sums += step
        self.steps += 1

    def state(self) -> dict:
        return {"sums": self.sums, "steps": self.steps}

    def read(self) -> dict:
        """Over the whole global batches: every process's share (under torchrun all ranks call this together).
        `skipped`: steps whose loss did not count."""
        if not self.steps:
            return {"loss": None, "iou": None, "skipped": 0}
        loss, inter, union, counted = distributed.sum_over_ranks(self.sums, self.ctx).tolist()
        counted /= self.ctx.world_size  # every process counts each global step once
        skipped = self.steps - round(counted)
        # Each process's loss is the mean over its equal share of a global batch; their mean is the batch's.
        mean = loss / (counted * self.ctx.world_size) if counted else float("nan")
        return {"loss": mean, "iou": 1.0 if union == 0 else inter / union, "skipped": skipped}
