"""Several processes (DistributedDataParallel): who launched them, which GPU each takes, and the few
collectives the programs use.

Launchers, read from the environment:
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), on one node or several;
- SLURM's srun starting one task per GPU itself (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID;
  MASTER_ADDR and MASTER_PORT from the job script, docs/training.md);
- neither: one process.
Each process takes the GPU of its local rank; where the launcher gives each process one visible GPU
(SLURM --gpus-per-task=1, some Kubernetes set-ups), that GPU. An explicit --device cuda:N that is not the
process's own GPU is refused.

Decisions between processes (stop, failure) go through a host (gloo) group, so they never wait for a GPU's
queued work, and with a timeout (--dist-timeout): a process that does not answer is named.
"""

import atexit
import datetime
import os
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.device import configure, device_type, resolve_device
from utils.errors import UserError
from utils.interrupts import watch_launcher
from utils.io import FolderLock
from utils.launch import Launch, launch

DEFAULT_TIMEOUT_S = 1800  # gloo's and NCCL's own default is 30 minutes


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    # Process group for the host-side agreements: gloo, so that deciding whether to go on never waits for a
    # GPU's queued work. None: the default group (itself gloo on CPUs).
    control: object = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_device(device_name: str, where: Launch) -> str:
    """The device this process takes under a launcher: its local rank's GPU, or the one GPU it sees."""
    if where.world_size == 1 or device_type(device_name) == "cpu":
        return device_name
    visible = torch.cuda.device_count()
    if visible == 1:
        index = 0
    elif where.local_rank < visible:
        index = where.local_rank
    else:
        raise UserError(f"process {where.rank} has local rank {where.local_rank} but sees {visible} GPUs: start at "
                        "most one process per GPU on each node")
    asked = torch.device(device_name) if device_name not in ("auto", "cuda") else None
    if asked is not None and asked.index is not None and asked.index != index:
        raise UserError(f"--device {device_name}: under {where.launcher} each process takes its own GPU (here "
                        f"cuda:{index}, from its local rank {where.local_rank}); pass --device cuda or leave it out")
    return f"cuda:{index}"


def init(device_name: str, strict_fp32: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Choose the device (utils.device's precision policy on a GPU) and join the process group if several
    processes were launched (NCCL on GPU, gloo on CPU)."""
    where = launch()
    try:
        name = process_device(device_name, where)
    except RuntimeError:
        raise UserError(f"--device {device_name!r}: expected auto, cpu, cuda or cuda:N") from None
    device = resolve_device(name)
    configure(device, strict_fp32)
    if where.world_size == 1:
        return Context(0, 1, device)
    if where.launcher == "srun":
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise UserError("srun started several tasks but MASTER_ADDR is not set: export it in the job script "
                            "(the first node's host name; docs/training.md, 'SLURM')")
    if where.launcher == "torchrun":
        watch_launcher()
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"device_id": device} if device.type == "cuda" else {}  # binds NCCL to this process's GPU
        dist.init_process_group(backend, rank=where.rank, world_size=where.world_size, timeout=timeout,
                                init_method="env://", **options)
    control = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None
    Heartbeat(where.rank)
    return Context(where.rank, where.world_size, device, control, timeout_s)


def _silent(rank: int, ctx: Context) -> UserError:
    return _stopped_answering(f"process {rank} of {ctx.world_size}", ctx)


def _stopped_answering(who: str, ctx: Context) -> UserError:
    return UserError(f"process {ctx.rank} of {ctx.world_size}: {who} stopped answering (stopped, hung or gone; a "
                     f"process that failed says why in its own line); waited --dist-timeout {ctx.timeout_s:g} s")


def agree_any(flags: list[bool], ctx: Context) -> list[bool]:
    """For each flag, whether any process raised it; the same answer on every process. Rank 0 hears each
    process in turn, so one that does not answer within the timeout is named."""
    if not ctx.distributed:
        return flags
    mine = torch.tensor([float(f) for f in flags])
    if ctx.is_main:
        for rank in range(1, ctx.world_size):
            theirs = torch.empty_like(mine)
            try:
                dist.recv(theirs, src=rank, group=ctx.control)
            except RuntimeError:
                raise _silent(rank, ctx) from None
            mine = torch.maximum(mine, theirs)
    else:
        try:
            dist.send(mine, dst=0, group=ctx.control)
        except RuntimeError:
            raise _silent(0, ctx) from None
    try:
        dist.broadcast(mine, src=0, group=ctx.control)
    except RuntimeError:
        raise _silent(0, ctx) from None
    return [bool(v) for v in mine.tolist()]


# How gloo and NCCL report a peer that died, stopped or left: the failure is that process's, not this one's.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
              "nccl communicator was aborted", "process group watchdog")


def peer_lost(err: BaseException, ctx: Context) -> UserError | None:
    """A collective that failed because another process is gone, as one line naming the processes that show
    no sign of life (None for any other error)."""
    if not (ctx.distributed and isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _PEER_LOST)):
        return None
    silent = Heartbeat.silent(ctx)
    return _stopped_answering(f"process {', '.join(map(str, silent))} of {ctx.world_size}" if silent else
                              "another process", ctx)


class Heartbeat:
    """Each process counts up a key of the launcher's key-value store every second, from a thread of its own,
    so that when a collective times out the processes whose count stands still (stopped, hung, gone) can be
    named: a collective's own error does not say which peer failed.

    The thread is stopped and joined when the program ends (atexit, before Python tears itself down): a
    thread still inside a call of torch's C++ at that moment would be unwound through it and abort the
    process ("terminate called without an active exception")."""

    EVERY_S = 1.0

    def __init__(self, rank: int):
        self.rank = rank
        self.store = _store()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="depthflow-heartbeat", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def _beat(self) -> None:
        try:
            while not self.stopping.is_set():
                self.store.add(f"depthflow/heartbeat/{self.rank}", 1)
                self.stopping.wait(self.EVERY_S)
        except Exception:  # the store goes when the launcher does; a heartbeat never stops a run
            return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    @classmethod
    def silent(cls, ctx: Context) -> list[int]:
        """The other processes whose count did not move over two beats (empty if the store cannot tell)."""
        try:
            store = _store()
            keys = [f"depthflow/heartbeat/{r}" for r in range(ctx.world_size) if r != ctx.rank]
            before = [store.add(k, 0) for k in keys]
            time.sleep(2 * cls.EVERY_S)
            after = [store.add(k, 0) for k in keys]
        except Exception:
            return []
        others = [r for r in range(ctx.world_size) if r != ctx.rank]
        return [r for r, a, b in zip(others, before, after) if a == b]


def _store():
    """A client of the launcher's key-value store (torchrun's, or rank 0's under srun)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=10))


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


def lock_folder(folder, what: str, ctx: Context) -> FolderLock | None:
    """One program at a time in an output folder: rank 0 takes the folder's lock (utils.io.FolderLock) and
    every process learns whether it could, so a second launch stops whole, each of its processes with the
    line that names the first run. Returns the lock on rank 0 (release it when done), None elsewhere."""
    lock, refused = None, None
    if ctx.is_main:
        try:
            lock = FolderLock(folder, what).acquire()
        except UserError as err:
            refused = str(err)
    if reason := first_message(refused, ctx):
        raise UserError(reason)
    return lock


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.control)


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """DistributedDataParallel around `model` under several processes; the model itself otherwise.

    DDP's defaults are kept (gradient_as_bucket_view=False; its memory saving is unmeasured on a GPU here,
    docs/speed.md). MiT's depthwise convolutions receive a channels-last view of their input, so their
    weight gradients come channels-last and DDP copies them into its contiguous buckets, warning once that
    the strides differ: a copy per step of those small gradients, not an error, so the warning is not shown."""
    if not ctx.distributed:
        return model
    warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                     else None)


def shutdown(ctx: Context) -> None:
    """Leave the process group. Every process first waits for the others, so none tears down its group while
    another still talks to it."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier(group=ctx.control)
        dist.destroy_process_group()


def check_in_sync(model: torch.nn.Module, ctx: Context) -> None:
    """Fail loudly if the replicas' weights have drifted apart (they must be identical under DDP)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        local = torch.stack([p.double().sum() for p in model.parameters()]).to(ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, local) for g in gathered):
        raise RuntimeError("DDP replicas hold different weights after training")
