"""Device selection, numeric precision and the machine's core count: the few facts every program asks.

On a GPU (one place for the policy): float32 matrix multiplies and convolutions run in TF32 unless
--strict-fp32 is given; bf16/fp16 autocast is opt-in (--amp). TF32 keeps float32's range with a 10-bit
mantissa (about 5e-4 relative), which moves logits by about 1e-3 and flips only pixels whose two logits
are that close; tests/test_gpu.py holds masks to >= 99.5% agreement with TF32 and the logits to 1e-3 of
the reference network without it. cuDNN autotuning is on: the network always runs at one shape (see
inference.py), so it tunes once per run, with its workspace capped. On a CPU, glibc keeps freed buffers
for reuse (keep_freed_buffers).
"""

import contextlib
import ctypes
import importlib.util
import os
import shutil

import torch

from utils.errors import UserError
from utils.launch import launch

AMP_MODES = ("off", "bf16", "fp16")
CUDNN_WORKSPACE_MIB = 1024  # cap on each convolution's autotuning workspace, so a 16 GB card keeps room
CPU_BUFFERS = 256 << 20  # a CPU network's activations at 512x512: tens to hundreds of MB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def device_type(name: str) -> str:
    """"cuda" or "cpu" for a --device value, without choosing the device yet (an invalid name: "cpu", for
    resolve_device to refuse later)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        return "cpu"


def resolve_device(name: str) -> torch.device:
    """The device named by --device, made the current CUDA device (so streams, events and the loader's
    pinning thread all use it); one line if this build or machine lacks it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available to this PyTorch here (use --device cpu)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


class DeviceQueue:
    """The order of work on one device: on a GPU, events recorded on that device's current stream mark when
    queued work is done, so the host waits for one batch without waiting for the next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gpu = device.type == "cuda"

    def mark(self, timing: bool = False):
        """An event at this point of the device's queue (None on a CPU, where work is done when it returns)."""
        if not self.gpu:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(torch.cuda.current_stream(self.device))
        return event


class PinnedStaging:
    """Host batches to a GPU through a fixed number of reusable page-locked buffers.

    A DataLoader that pins (pin_memory=True) pins every batch its processes have ready, each in a fresh
    page-locked block that torch's host allocator rounds up to a power of two and keeps: with 8 loader
    processes, 0.6 GB at batch 8 and 2.4 GB at batch 32. Here a batch is copied into one of `slots`
    buffers, sent to the device asynchronously from there, and the buffer is reused once that copy is done:
    page-locked memory stays at `slots` batches. On a CPU, tensors are returned as they are."""

    ALIGN = 64

    def __init__(self, device: torch.device, slots: int = 2):
        self.queue = DeviceQueue(device)
        self.slots: list[tuple[torch.Tensor | None, object]] = [(None, None)] * slots
        self.turn = 0

    def _buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.queue.gpu:
            return tensors
        sizes = [-(-t.nbytes // self.ALIGN) * self.ALIGN for t in tensors]
        buffer, copied = self.slots[self.turn]
        if copied is not None:
            copied.synchronize()  # the last copy out of this buffer has finished
        if buffer is None or buffer.numel() < sum(sizes):
            buffer = self._buffer(sum(sizes))
        out, offset = [], 0
        for tensor, size in zip(tensors, sizes):
            staged = buffer[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            staged.copy_(tensor)
            out.append(staged.to(self.queue.device, non_blocking=True))
            offset += size
        self.slots[self.turn] = (buffer, self.queue.mark())
        self.turn = (self.turn + 1) % len(self.slots)
        return tuple(out)


def keep_freed_buffers(largest: int = CPU_BUFFERS) -> bool:
    """Let glibc serve buffers up to `largest` bytes from its heap and keep what is freed there.

    By default glibc maps every buffer over a few MB fresh from the kernel and unmaps it when freed, so a CPU
    network that allocates the same activations for every frame pays their page faults every time; with
    this the next frame reuses the last one's pages. It pays on `run.py --test` on a CPU, for more peak
    memory (docs/speed.md has the side-by-side figures). Returns False, changing nothing,
    where the C library is not glibc (or accepts no threshold this large)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, largest)) and bool(mallopt(_M_TRIM_THRESHOLD, 4 * largest))


def configure(device: torch.device, strict_fp32: bool = False) -> None:
    """The device's policy: on a GPU the precision policy above and cuDNN autotuning with a bounded
    workspace; on a CPU, freed buffers kept for reuse."""
    if device.type != "cuda":
        keep_freed_buffers()
        return
    os.environ.setdefault("CUDNN_CONV_WSCAP_DBG", str(CUDNN_WORKSPACE_MIB))
    # The settings torch.compile's code generation reads (torch's newer fp32_precision switches, mixed with
    # them, make those reads fail).
    torch.set_float32_matmul_precision("highest" if strict_fp32 else "high")
    torch.backends.cudnn.allow_tf32 = not strict_fp32
    torch.backends.cudnn.benchmark = True


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on a GPU; a no-op for "off" and on the CPU (where it would only be slower)."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and job schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(limit: int = 8) -> int:
    """Data-loading processes when --workers is not given: this process's share of the cores (under torchrun,
    the node's cores divided among its processes), up to `limit`."""
    local_processes = launch().local_world_size
    return max(1, min(limit, available_cores() // max(local_processes, 1)))


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is running out of memory: on a GPU (torch.OutOfMemoryError) or on the host (the CPU
    allocator's RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err))


def compile_failure(err: Exception, what: str) -> UserError:
    """torch.compile's failure to compile `what`, as one line: the first line of its message."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UserError(f"--compile failed to compile {what} ({first}); drop --compile")


def check_compiler(device: torch.device) -> None:
    """Stop with one line, before any work, if torch.compile could not build kernels for `device`."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on a GPU needs Triton, which this Python lacks (pip install triton, or drop "
                        "--compile)")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++")
                                        if c):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                        "--compile")
