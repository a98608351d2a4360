"""A training run's logs: OUTPUT/metrics.jsonl (one JSON line per epoch, the source of truth), OUTPUT/run.json
(the recipe, the code's git commit and the command, rewritten at every start) and, when asked, TensorBoard
event files in OUTPUT/tensorboard/ with the same figures.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from utils.errors import UserError
from utils.io import write_text_atomic

CODE_ROOT = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """The git commit of the code that runs, with "+changes" when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CODE_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CODE_ROOT,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if changed else "")


class RunLog:
    def __init__(self, output: Path, tensorboard: bool):
        self.output = Path(output)
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard); "
                                "metrics.jsonl has the same figures") from None
            self.board = SummaryWriter(str(self.output / "tensorboard"))

    def start(self, run: dict) -> None:
        """Record what this run is (recipe, ...) with the code version and the command line."""
        record = {**run, "code": code_version(), "command": " ".join(sys.argv)}
        write_text_atomic(json.dumps(record, indent=2) + "\n", self.output / "run.json")
        if self.board is not None:
            self.board.add_text("run", "```\n" + json.dumps(record, indent=2) + "\n```")

    def epoch(self, record: dict) -> None:
        """One epoch's figures: a metrics.jsonl line, and TensorBoard scalars by epoch."""
        with open(self.output / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                    self.board.add_scalar(key, value, record["epoch"])
            self.board.flush()

    def trim(self, epochs_done: int) -> None:
        """Drop lines of epochs after `epochs_done`, which are about to be trained again."""
        log = self.output / "metrics.jsonl"
        if log.is_file():
            kept = [line for line in log.read_text().splitlines() if _logged_epoch(line) <= epochs_done]
            write_text_atomic("".join(line + "\n" for line in kept), log)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line cut short by a kill counts as after every epoch (dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
