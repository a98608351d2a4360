"""A training run's logs: OUTPUT/metrics.jsonl (one JSON line per epoch, the source of truth), OUTPUT/run.json
(the recipe, the code's git commit and the command, rewritten at every start), OUTPUT/recipe.json (the recipe
alone, which `--recipe` reads back) and, when asked, TensorBoard event files in OUTPUT/tensorboard/ with the
same figures and pictures the trainer draws (a few validation frames at each validation).
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from utils.errors import UserError
from utils.io import append_line, json_text, write_json_atomic, write_text_atomic

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
    def __init__(self, output: Path, tensorboard: bool, purge_from: int = 1):
        """`purge_from`: the first epoch this run logs; TensorBoard drops what an earlier run logged from it
        on (epochs trained again after a resume), so no curve holds an epoch twice."""
        self.output = Path(output)
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard); "
                                "metrics.jsonl has the same figures") from None
            self.board = SummaryWriter(str(self.output / "tensorboard"), purge_step=purge_from)
        self.trim(purge_from - 1)

    def start(self, run: dict, checkpoint_bytes: int, checkpoints: int) -> None:
        """Record what this run is (recipe, ...) with the code version and the command line, and say how much
        disk its checkpoints take."""
        record = {**run, "code": code_version(), "command": " ".join(sys.argv)}
        write_json_atomic(record, self.output / "run.json")
        write_json_atomic(run["recipe"], self.output / "recipe.json")
        if self.board is not None:
            self.board.add_text("run", "```\n" + json_text(record, indent=2) + "\n```")
        need, free = checkpoint_bytes * checkpoints, shutil.disk_usage(self.output).free
        print(f"checkpoints: {checkpoint_bytes / 2**20:.0f} MB each, up to {checkpoints} kept ({need / 2**30:.1f} GB);"
              f" {free / 2**30:.1f} GB free in {self.output}")
        if need > free:
            print(f"warning: {self.output} has {free / 2**30:.1f} GB free, less than the {need / 2**30:.1f} GB this "
                  "run's checkpoints need; raise --save-every or free some space", file=sys.stderr)

    def epoch(self, record: dict) -> None:
        """One epoch's figures: a metrics.jsonl line, and TensorBoard scalars by epoch."""
        append_line(self.output / "metrics.jsonl", json_text(record))
        if self.board is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                    self.board.add_scalar(key, value, record["epoch"])
            self.board.flush()

    def pictures(self, epoch: int, pictures: dict) -> None:
        """Pictures (name -> HxWx3 uint8) in TensorBoard at this epoch."""
        for name, picture in pictures.items():
            self.board.add_image(name, picture, epoch, dataformats="HWC")
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
