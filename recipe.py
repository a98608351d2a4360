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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from dataset import DATASETS, VALIDATION_DATASET, training_datasets
from utils.errors import UserError

SELECTIONS = ("davis", "heldout", "last")  # how best.pth is chosen


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
    sources = []
    for part in text.split(","):
        name, _, samples = part.strip().partition(":")
        if name not in training_datasets():
            why = "unknown" if name not in DATASETS else f"{DATASETS[name].title} is a test set" + (
                ", and picks best.pth" if name == VALIDATION_DATASET else "")
            raise UserError(f"--datasets: {name!r} is not a training set ({why}); expected NAME:SAMPLES with NAME "
                            f"in {', '.join(training_datasets())}")
        if not samples.isdigit() or int(samples) < 1:
            raise UserError(f"--datasets: {part.strip()!r} needs a sample count, for example {name}:128")
        if name in {n for n, _ in sources}:
            raise UserError(f"--datasets names {name} twice; give it once, with its samples per epoch")
        sources.append((name, int(samples)))
    return tuple(sources)


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
    if "sources" in values:
        values["sources"] = parse_sources(sources_text(values["sources"]))
    return values


def build_recipe(file_values: dict, flag_values: dict) -> tuple[Recipe, frozenset[str]]:
    """The recipe: the stage's (--stage, else the file's, else 1), the file's fields on it, the flags' on top;
    and the names of the fields the file and the flags set."""
    stage = flag_values.get("stage") or file_values.get("stage") or 1
    given = {**file_values, **flag_values}
    return replace(STAGES[stage], **{**given, "stage": stage}), frozenset(given)
