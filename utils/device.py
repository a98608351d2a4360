"""Device selection, mixed precision and the machine's core count: the few facts every program asks."""

import contextlib
import importlib.util
import os
import shutil

import torch

from utils.errors import UserError

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    return device


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
    """Data-loading processes when --workers is not given: every core, up to `limit`."""
    return max(1, min(limit, available_cores()))


def check_compiler(device: torch.device) -> None:
    """Stop with one line, before any work, if torch.compile could not build kernels for `device`."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on a GPU needs Triton, which this Python lacks (pip install triton, or drop "
                        "--compile)")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++")
                                        if c):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                        "--compile")
