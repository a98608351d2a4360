import pytest

from tests.conftest import NO_SHARED_MEMORY
from utils.errors import UserError
from utils.loader_failures import dead_loader_pids, loader_failure


def test_dead_loader_processes_are_found_in_both_of_dataloaders_reports():
    """Its signal handler names one process; its check at a timeout lists them, "pid(s)" and all."""
    assert dead_loader_pids("DataLoader worker (pid 4242) exited unexpectedly with exit code 1. Details") == [4242]
    assert dead_loader_pids("DataLoader worker (pid(s) 12365, 77) exited unexpectedly") == [12365, 77]
    assert dead_loader_pids("DataLoader worker (pid 9) is killed by signal: Killed. ") == [9]
    assert dead_loader_pids("something else (pid 5)") == []


def test_a_dead_process_is_named_by_what_it_was_reading():
    failure = loader_failure(RuntimeError("DataLoader worker (pid(s) 12, 34) exited unexpectedly"),
                             lambda pids: f"frame of {pids[-1]}")
    assert isinstance(failure, UserError)
    assert str(failure).startswith("a data-loading process died while decoding frame of 34 (DataLoader worker")
    assert "a frame" in str(loader_failure(RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed.")))


@pytest.mark.parametrize("wrapped", [False, True])
def test_shared_memory_running_out_says_what_to_change(wrapped):
    """Raised in a loader process, the error reaches the main process inside DataLoader's report of it."""
    message = (f"Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               f"  ...\nRuntimeError: {NO_SHARED_MEMORY}\n") if wrapped else NO_SHARED_MEMORY
    failure = str(loader_failure(RuntimeError(message)))
    assert "ran out of shared memory (/dev/shm" in failure and "--shm-size" in failure and "--batch-size" in failure


def test_other_errors_of_a_loader_process_are_left_alone():
    """A bug in a loader process is not a dead process or a full /dev/shm, and must keep its traceback."""
    bug = "Caught RuntimeError in DataLoader worker process 1.\nOriginal Traceback:\nRuntimeError: shape mismatch"
    assert loader_failure(RuntimeError(bug)) is None
    assert loader_failure(RuntimeError("No space left on device")) is None
