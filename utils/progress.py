"""Progress of long loops: a live bar on a terminal, plain lines in a log file.

A job whose output goes to a file (SLURM, nohup, `> log`) gets no bar, whose carriage returns make a log
unreadable, but one line on stdout, beside the program's tables, every `DEPTHFLOW_PROGRESS_SECONDS`
seconds (default 60), and one at the end: what is done out of what, the rate and the time left. stderr
keeps errors only.

    with progress(total=len(frames), desc="DAVIS 2016 val", unit="frame") as bar:
        bar.update(8)
"""

import os
import sys
import time

from tqdm import tqdm

LOG_SECONDS = float(os.environ.get("DEPTHFLOW_PROGRESS_SECONDS", "60"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LogLines:
    """tqdm's small API (update, set_postfix, close), as a line every `every` seconds on stdout."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = LOG_SECONDS):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, values: dict) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, finished: bool = False) -> None:
        self.last = now = time.monotonic()
        rate = self.n / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if finished:
            left = f", done in {_duration(now - self.start)}"
        else:
            left = f", {_duration((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        print(f"{self.desc}: {done} {self.unit}s, {rate:.3g} {self.unit}s/s{left}"
              + (f" ({self.postfix})" if self.postfix else ""), flush=True)

    def close(self) -> None:
        if self.n:
            self._line(finished=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:  # an error says its own line; no progress line after it
            self.close()


def progress(total: int | None, desc: str, unit: str = "frame", enabled: bool = True):
    """A progress display for a loop of `total` units: a bar on a terminal, lines otherwise, nothing if not
    `enabled` (processes other than rank 0, say)."""
    if enabled and not sys.stderr.isatty():
        return LogLines(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
