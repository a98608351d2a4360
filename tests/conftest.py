import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A subprocess that crashes in native code (SIGABRT, SIGSEGV) prints every thread's Python stack, so that a
# rare crash on CI shows where it happened.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def run_cli(*args, cwd=ROOT, timeout=600):
    """Run a project command in a subprocess: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@contextlib.contextmanager
def hearing_ctrl_c():
    """Let processes started in the block hear Ctrl-C. A shell starts background jobs with SIGINT ignored,
    and children inherit that; the tests that press Ctrl-C would then see it ignored."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def ctrl_c_once(args, ready: Path, cwd=ROOT):
    """Run a project command, press Ctrl-C (SIGINT to its whole process group, loader workers included) once
    `ready` exists, and return (returncode, stdout, stderr)."""
    with hearing_ctrl_c():
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def children(pid: int) -> list[int]:
    """The process ids of the living children of `pid` (Linux /proc)."""
    return _process_tree().get(pid, [])


def descendants(pid: int) -> list[int]:
    """The process ids of every living descendant of `pid` (Linux /proc)."""
    tree, found, todo = _process_tree(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return sorted(found)


def _process_tree() -> dict[int, list[int]]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has exited; only its parent has not read its status yet
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def assert_one_line_error(rc, stderr, *fragments):
    """A user error: non-zero exit, no traceback, one line naming what is wrong."""
    assert rc != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


def run_main(main, *argv, capsys):
    """Call a cli_entry-wrapped main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A read-only toy data tree shared by the session; copy it (toy_copy) before changing it."""
    from tools.toydata import generate

    return generate(tmp_path_factory.mktemp("toy"), seed=0, size=(64, 96), videos=2, frames=8)


@pytest.fixture
def toy_copy(toy_root, tmp_path):
    import shutil

    return Path(shutil.copytree(toy_root, tmp_path / "toy"))
