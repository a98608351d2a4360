"""Process-group setup for one device or torchrun (DistributedDataParallel), and the collectives the programs use."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.device import configure, resolve_device


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    # Process group for the host-side agreements (any_rank, first_message): gloo, so that deciding whether to
    # go on never waits for a GPU's queued work. None: the default group (itself gloo on CPUs).
    control: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_name: str, strict_fp32: bool = False) -> Context:
    """Choose the device (utils.device's precision policy on a GPU) and join the torchrun process group if
    launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    configure(device, strict_fp32)
    if world_size == 1:
        return Context(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = resolve_device(f"cuda:{local_rank}")
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id binds NCCL to this process's GPU from the start
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Context(rank, world_size, device, control)


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank if it is true on any, so all ranks take the same branch."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ctx.control)
    return bool(value.item())


def sum_over_ranks(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank, as a new tensor (`tensor` itself without torchrun)."""
    if not ctx.distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def first_message(message: str | None, ctx: Context) -> str | None:
    """On every rank, the message of the lowest rank that has one (say, the error that stops them all)."""
    if not ctx.distributed:
        return message
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, message, group=ctx.control)
    return next((m for m in gathered if m is not None), None)


def gather_to_main(obj, ctx: Context) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others); [obj] without torchrun."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj, group=ctx.control)  # host objects travel over gloo, not NCCL
    return gathered if ctx.is_main else None


def shard_by_size(sizes: list[int], ctx: Context) -> list[int]:
    """The indices this rank takes: largest first, each to the least-loaded rank, so ranks finish together."""
    loads, owner = [0] * ctx.world_size, {}
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ctx.world_size), key=lambda r: (loads[r], r))
        owner[i], loads[rank] = rank, loads[rank] + sizes[i]
    return [i for i in range(len(sizes)) if owner[i] == ctx.rank]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.control)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_in_sync(model: torch.nn.Module, ctx: Context) -> None:
    """Fail loudly if the replicas' weights have drifted apart (they must be identical under DDP)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        local = torch.stack([p.double().sum() for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, local) for g in gathered):
        raise RuntimeError("DDP replicas hold different weights after training")
