"""One table of several runs: every dataset's figures, each with its protocol, and what differs between them.

    python -m tools.compare outputs/b0 outputs/b2 outputs/b2_tta               # a terminal table
    python -m tools.compare runs/stage2 outputs/b2 --format markdown --out table.md
    python -m tools.compare outputs/* --format csv --rows                      # a run per row

Each argument is a `run.py --test` output folder (or its results.json, or `evaluator.py --json`'s file),
or a training run's folder, whose metrics.jsonl gives its last epoch's figures and the best validation
J&F. A figure is one row per protocol (docs/evaluation.md): figures of different protocols, test-time
augmentation included, never share a row. Above the figures, the recipe fields in which the runs differ
(from each run's recipe.json, or the recipe stored in the checkpoint a test used) and the checkpoints.
"""

import argparse
import csv
import io
import json
from pathlib import Path

from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import check_outside, read_json, write_text_atomic

# Short names of the evaluator's protocols (evaluator.PROTOCOLS), for the tables' rows.
SHORT = {"the DAVIS toolkit": "toolkit", "the authors' code": "authors", "the mean of the class means": "classes",
         "the DAVIS rules": "DAVIS rules"}


def protocol_name(text: str) -> str:
    """A protocol's short name, with its test-time augmentation if any ('toolkit', 'authors [TTA ...]')."""
    tta = text[text.rindex("[") + 1:-1] if text.endswith("]") and "[TTA" in text else ""
    short = next((name for start, name in SHORT.items() if text.startswith(start)), text)
    return f"{short} [{tta}]" if tta else short


def _recipe_near(checkpoint: str) -> dict:
    """The recipe of the model a test used: recipe.json beside its checkpoint, else the checkpoint's own."""
    path = Path(checkpoint)
    if (path.parent / "recipe.json").is_file():
        return read_json(path.parent / "recipe.json")
    if path.is_file():
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True).get("recipe") or {}
        except Exception:  # a released file or anything unreadable has no recipe
            return {}
    return {}


def read_run(path: Path) -> dict:
    """{"name", "figures": {(dataset, figure, protocol): value}, "recipe", "checkpoint"} of one argument."""
    path = Path(path)
    results = path / "results.json" if path.is_dir() else path
    if results.is_file():
        data = read_json(results)
        if "datasets" not in data:
            raise UserError(f"{results} holds no figures of this project's --test (expected a 'datasets' entry)")
        figures = {(name, key.removesuffix(" (DAVIS rules)"), protocol_name(result["protocols"][key])): value
                   for name, result in data["datasets"].items() for key, value in result["metrics"].items()}
        run = data.get("run", {})
        return {"name": str(path), "figures": figures, "checkpoint": run.get("checkpoint", run.get("results", "")),
                "recipe": _recipe_near(run["checkpoint"]) if run.get("checkpoint") else {}}
    log = path / "metrics.jsonl"
    if log.is_file():
        epochs = [_epoch(line, log, n) for n, line in enumerate(log.read_text().splitlines(), 1) if line.strip()]
        if not epochs:
            raise UserError(f"{log} is empty: that run has not finished an epoch")
        last, figures = epochs[-1], {}
        for key in ("loss", "iou"):
            if key in last:
                figures["training", f"{key} (last epoch)", "training"] = last[key]
        for key in ("davis_jf", "heldout_jf"):
            if scores := [e[key] for e in epochs if e.get(key) is not None]:
                figures["validation", f"{key} (best)", "toolkit"] = max(scores)
        recipe = read_json(path / "recipe.json") if (path / "recipe.json").is_file() else {}
        return {"name": str(path), "figures": figures, "checkpoint": str(path / "best.pth"), "recipe": recipe}
    raise UserError(f"{path}: neither a --test output (results.json) nor a training run (metrics.jsonl)")


def _epoch(line: str, log: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{log} is not a metrics log this project wrote (line {number}: {err.msg})") from None


def table(runs: list[dict], by_rows: bool = False) -> list[list[str]]:
    """The comparison as rows of cells: recipe differences, checkpoints, then every figure."""
    keys = sorted({k for run in runs for k in run["recipe"]})
    differing = [k for k in keys if len({json.dumps(run["recipe"].get(k)) for run in runs}) > 1]
    rows = [["", *[run["name"] for run in runs]]]
    rows += [[f"recipe: {k}", *[json.dumps(run["recipe"].get(k)) if k in run["recipe"] else "-" for run in runs]]
             for k in differing]
    rows.append(["checkpoint", *[run["checkpoint"] for run in runs]])
    figures = list(dict.fromkeys(k for run in runs for k in run["figures"]))  # in the order the runs report them
    rows += [[f"{dataset} {figure} [{protocol}]", *[_cell(run["figures"].get((dataset, figure, protocol)))
                                                   for run in runs]] for dataset, figure, protocol in figures]
    return [list(column) for column in zip(*rows)] if by_rows else rows


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def render(rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return out.getvalue()
    if fmt == "markdown":
        escape = [[c.replace("|", "\\|") for c in row] for row in rows]
        lines = ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in escape[1:]]) + "\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n"


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.compare", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="--test output folders or results files, or training run folders")
    parser.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    parser.add_argument("--rows", action="store_true", help="a run per row (default: a run per column)")
    parser.add_argument("--out", help="write the table to this file (default: print it)")
    args = parser.parse_args(argv)
    if args.out:
        check_outside(args.out, args.runs, "--out")
    text = render(table([read_run(Path(p)) for p in args.runs], args.rows), args.format)
    if args.out:
        write_text_atomic(text, args.out)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
