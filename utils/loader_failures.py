"""What a DataLoader's failures mean to the user: a loader process that died, or shared memory that ran out.

Both are the machine's limits, not bugs, and both have a fix the user can make, so each becomes one line
(a UserError) naming it. Any other error is left as it is.
"""

import os
import re
import shutil
from collections.abc import Callable

from utils.errors import UserError

SHARED_MEMORY = "/dev/shm"  # where torch's loaders put the batches they hand over

# DataLoader reports dead processes as "DataLoader worker (pid 12) ..." from its SIGCHLD handler and as
# "DataLoader worker (pid(s) 12, 34) ..." when it notices at a timeout.
_DEAD = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
# torch's message when it cannot make a shared-memory file: "unable to allocate shared memory(shm) for file
# </torch_...>: No space left on device" (older versions: "unable to write to file </torch_...>: ...").
_NO_SHARED_MEMORY = re.compile(r"</torch_[^>]*>: No space left on device")


def dead_loader_pids(message: str) -> list[int]:
    """The process ids in DataLoader's report of dead loader processes; [] for any other message."""
    found = _DEAD.search(message)
    return [int(p) for p in re.findall(r"\d+", found.group(1))] if found else []


def loader_failure(err: RuntimeError, decoding: Callable[[list[int]], str | None] | None = None) -> UserError | None:
    """One line for a loader failure the user can act on, None for any other error. `decoding(pids)`: what the
    dead processes were reading, where the caller can tell."""
    message = str(err)
    if _NO_SHARED_MEMORY.search(message):
        free = shutil.disk_usage(SHARED_MEMORY).free >> 20 if os.path.isdir(SHARED_MEMORY) else 0
        return UserError(f"the loader processes ran out of shared memory ({SHARED_MEMORY}, {free} MB free now); "
                         f"lower --workers or --batch-size, or give {SHARED_MEMORY} more room (in Docker: "
                         "--shm-size)")
    pids = dead_loader_pids(message)
    if not pids:
        return None
    reason = message.strip().splitlines()[0]
    where = decoding(pids) if decoding is not None else None
    return UserError(f"a data-loading process died while decoding {where or 'a frame'} ({reason}); if "
                     "memory ran short, lower --workers or --batch-size")
