"""Host memory for processes that make and drop big buffers at a steady rate (the programs, loaders, helpers)."""

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OLD_GLIBC_LIMIT = 32 << 20  # the largest threshold older glibc versions accept

LOADER_BUFFERS = 32 << 20  # a decoded 854x480 frame is 1.2 MB, a 512x512 training sample under 2 MB
NETWORK_BUFFERS = 256 << 20  # a CPU network's activations at batch 8 and 512x512: up to hundreds of MB


def reuse_freed_buffers(largest: int = LOADER_BUFFERS) -> bool:
    """Let glibc's malloc serve buffers up to `largest` bytes from its heap, and keep what is freed there.

    By default glibc maps every buffer of more than a few hundred kB fresh from the kernel and unmaps it
    when it is freed, so each decoded 854x480 frame pays about 600 page faults (1.3 ms of kernel time on a
    3 ms decode) and a CPU forward pass at 512x512 a quarter of its time (README, 'Speed'). With this, the
    next frame or batch reuses the last one's memory. The memory kept is bounded by the process's peak
    use, which it needs for the next batch anyway. Returns False, changing nothing, where the C library is
    not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for limit in (largest, min(largest, _OLD_GLIBC_LIMIT)):
        if mallopt(_M_MMAP_THRESHOLD, limit):
            return bool(mallopt(_M_TRIM_THRESHOLD, 4 * limit))
    return False


def init_loader_worker(worker_id: int) -> None:
    """DataLoader's worker_init_fn for the frame loaders."""
    reuse_freed_buffers()
