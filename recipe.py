"""The training recipe: everything that decides what a run learns, as one record.

A run is a `Recipe`. The paper's two stages are `STAGES[1]` and `STAGES[2]`; `run.py --train` starts from
one of them, then a recipe file (`--recipe FILE`, JSON with the field names below), then the flags given.
Every checkpoint stores the recipe, and run.json holds it as a file that `--recipe` reads back, so a
paper's table can cite the exact recipe of each run:

    python run.py --train --recipe runs/stage2/recipe.json --output runs/again

Stage 1: YouTube-VOS 2018, 512 samples per epoch, 4000 epochs. Stage 2 continues from stage 1 with a
fresh Adam: DUTSv2 (384 samples) + DAVIS 2016 train (128) per epoch, 2000 epochs. Adam lr 1e-5, batch 16,
cross-entropy on two-class logits at 512x512; DAVIS 2016 val J&F every 100 epochs keeps best.pth.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from dataset import DATASETS, VALIDATION_DATASET, training_datasets
from model.encoders import check_backbone
from model.losses import parse_loss
from utils.errors import UserError

SELECTIONS = ("davis", "heldout", "last")  # how best.pth is chosen
MAX_SIZE = 4096  # 8x the paper's side: larger inputs would not fit any GPU's memory (MiT's first stage alone)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a run learns. Stored in every checkpoint; a resume must match it (but for
    RESUMABLE_CHANGES)."""

    stage: int
    sources: tuple[tuple[str, int], ...]  # (training dataset, samples per epoch)
    epochs: int
    batch_size: int = 16  # global: split over the processes under torchrun
    lr: float = 1e-5  # Adam, no weight decay, constant
    size: int = 512  # internal square resolution
    backbone: str = "mitb2"  # the appearance (frame) encoder, model.encoders
    flow_backbone: str | None = None  # the motion (flow) encoder; None: the same as `backbone` (the paper's)
    flip_p: float = 0.5  # joint horizontal and (independently) vertical flips
    loss: str = "ce"  # model.losses: weighted terms joined by '+', e.g. ce+0.5*dice
    selection: str = "davis"  # best.pth by "davis" (DAVIS 2016 val, the reference), "heldout" or "last" epoch
    val_every: int = 100  # epochs between validations (and always the last epoch)
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        values = dict(values)
        values["sources"] = tuple((name, int(k)) for name, k in values["sources"])
        return cls(**values)

    def record(self) -> dict:
        """The recipe as plain JSON types (a checkpoint stays loadable with weights_only=True)."""
        values = asdict(self)
        values["sources"] = [list(s) for s in self.sources]
        return values


STAGES = {
    1: Recipe(stage=1, sources=(("ytvos", 512),), epochs=4000),
    2: Recipe(stage=2, sources=(("duts", 384), ("davis_train", 128)), epochs=2000),
}
# The flag that sets each field: its name, but --datasets for the sources.
RECIPE_FLAGS = {f.name: "--datasets" if f.name == "sources" else "--" + f.name.replace("_", "-")
                for f in fields(Recipe)}
# Fields a resumed run may change. `epochs`: the learning rate is constant and every sample and step is
# seeded by (seed, epoch, index), so a run extended from N to M epochs is the run started with M, step for
# step. Every other field changes what the finished epochs would have been.
RESUMABLE_CHANGES = ("epochs",)


def sources_text(sources) -> str:
    return ",".join(f"{name}:{k}" for name, k in sources)


def parse_sources(text: str) -> tuple[tuple[str, int], ...]:
    """'duts:384,davis_train:128' -> (("duts", 384), ("davis_train", 128)); ValueError for anything else."""
    sources = []
    for part in text.split(","):
        name, _, samples = part.strip().partition(":")
        if name not in training_datasets():
            why = "unknown" if name not in DATASETS else f"{DATASETS[name].title} is a test set" + (
                ", and picks best.pth" if name == VALIDATION_DATASET else "")
            raise ValueError(f"{name!r} is not a training set ({why}); expected NAME:SAMPLES with NAME in "
                             f"{', '.join(training_datasets())}")
        if not samples.isdigit() or int(samples) < 1:
            raise ValueError(f"{part.strip()!r} needs a sample count, for example {name}:128")
        if name in {n for n, _ in sources}:
            raise ValueError(f"{name} named twice; give it once, with its samples per epoch")
        sources.append((name, int(samples)))
    return tuple(sources)


# What each field may hold: a check per field that raises ValueError saying what was expected. Flags and
# recipe files pass through the same checks, so neither can start a run that would do something else.
def _integer(low: int | None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ValueError("expected an integer" + (f" of at least {low}" if low is not None else ""))
    return check


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _size(value) -> None:
    _integer(32)(value)
    if value > MAX_SIZE or value % 32:
        raise ValueError(f"expected a multiple of 32 from 32 to {MAX_SIZE} (the published model uses 512)")


def _lr(value) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError("expected a positive finite learning rate (the recipe uses 1e-5)")


def _probability(value) -> None:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError("expected a probability in [0, 1]")


def _text(check):
    def checked(value):
        if not isinstance(value, str):
            raise ValueError("expected a string")
        check(value)
    return checked


def _one_of(choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    return check


def _sources(value) -> None:
    if not isinstance(value, list | tuple) or not all(isinstance(s, list | tuple) and len(s) == 2 for s in value):
        raise ValueError('expected a list of [dataset, samples] pairs, for example [["duts", 384]]')
    parse_sources(sources_text(value))


FIELD_CHECKS = {
    "stage": _one_of(tuple(STAGES)), "sources": _sources, "epochs": _integer(1), "batch_size": _integer(1),
    "lr": _lr, "size": _size, "backbone": _text(check_backbone),
    "flow_backbone": lambda v: v is None or _text(check_backbone)(v), "flip_p": _probability,
    "loss": _text(parse_loss), "selection": _one_of(SELECTIONS), "val_every": _integer(1), "seed": _integer(None),
}


def check_fields(values: dict, label) -> None:
    """Each value one its recipe field can hold; otherwise one line, where `label(field)` names the value's
    origin (a flag, a recipe file's field)."""
    for name, value in values.items():
        try:
            FIELD_CHECKS[name](value)
        except ValueError as err:
            shown = sources_text(value) if name == "sources" and isinstance(value, tuple) else value
            raise UserError(f"{label(name)} {shown}: {err}") from None


def recipe_differences(saved: Recipe, asked: Recipe, allowed=()) -> list[str]:
    """One phrase per field (but `allowed`) in which `asked` differs from `saved`."""
    def shown(field, value):
        return sources_text(value) if field == "sources" else value

    return [f"{RECIPE_FLAGS[f.name]} {shown(f.name, getattr(saved, f.name))} (this run asks for "
            f"{shown(f.name, getattr(asked, f.name))})"
            for f in fields(Recipe) if f.name not in allowed and getattr(saved, f.name) != getattr(asked, f.name)]


def read_recipe_file(path) -> dict:
    """A recipe file's fields (any subset of Recipe's, or the whole record run.json holds under "recipe"), as
    the values they override: one line naming the file and the field if it is not a recipe."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--recipe {path}: no such file (expected a JSON recipe, e.g. a run's recipe.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--recipe {path} is not a JSON recipe ({err})") from None
    values = values.get("recipe", values) if isinstance(values, dict) else values
    if not isinstance(values, dict):
        raise UserError(f"--recipe {path}: expected a JSON object of recipe fields")
    known = {f.name for f in fields(Recipe)}
    if unknown := sorted(set(values) - known):
        raise UserError(f"--recipe {path}: unknown field {unknown[0]!r}; expected fields of {', '.join(sorted(known))}")
    check_fields(values, lambda name: f"--recipe {path}: {name}")
    if "sources" in values:
        values["sources"] = tuple((name, samples) for name, samples in values["sources"])
    return values


def build_recipe(file_values: dict, flag_values: dict) -> tuple[Recipe, frozenset[str]]:
    """The recipe: the stage's (--stage, else the file's, else 1), the file's fields on it, the flags' on top;
    and the names of the fields the file and the flags set."""
    stage = flag_values.get("stage") or file_values.get("stage") or 1
    given = {**file_values, **flag_values}
    return replace(STAGES[stage], **{**given, "stage": stage}), frozenset(given)
