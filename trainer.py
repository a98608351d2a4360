"""Training with the reference recipe (README, 'Training'), on one device or under torchrun.

A run is a `Recipe` (what it learns: data, schedule, loss, model selection) and `RunSettings` (where and
how it runs). The two stages of the paper are `STAGES[1]` and `STAGES[2]`; run.py builds a recipe from
one of them and the flags. Stage 1: YouTube-VOS 2018, 512 samples per epoch, 4000 epochs. Stage 2
continues from stage 1 with a fresh Adam: DUTSv2 (384 samples) + DAVIS 2016 train (128) per epoch, 2000
epochs. Adam lr 1e-5, batch 16, cross-entropy on two-class logits at the internal resolution; DAVIS 2016
val J&F every 100 epochs keeps best.pth.

Everything needed to continue is in OUTPUT/last.pth (written atomically, in the background): model,
optimizer, AMP scaler, the epoch and step to continue from, the running epoch's figures, the best score
and the recipe, which a resume must match field by field. Samples are a pure function of (seed, epoch,
index), global batches do not depend on the number of processes, and the global random generators are
seeded per step, so a resumed run replays exactly what the stopped run would have done, with the same or
another number of processes.
"""

import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset import DATASETS, VALIDATION_DATASET, Source, TrainingFrames, dataset_root, scan, training_datasets
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.checkpoints import load_depthflow, load_pretrained, read_project_checkpoint, save_project_checkpoint
from model.depthflow import class_masks
from model.losses import build_loss
from transforms import to_float
from utils import distributed, loading
from utils.background import BackgroundWriter, host_copy
from utils.device import autocast_context, check_compiler, compile_failure
from utils.errors import UserError, one_line
from utils.interrupts import Stopped, StopRequests
from utils.io import check_outside, check_writable
from utils.run_log import RunLog

LOG_EVERY = 20  # steps between progress-bar updates (each reads the running figures from the device once)
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl")  # an output folder holding one of these holds a run
SELECTIONS = ("davis", "heldout", "last")  # how best.pth is chosen (Recipe.selection)
# "heldout": this share of DAVIS 2016 train's videos, drawn by the seed, selects best.pth and is never trained on.
HELDOUT_DATASET, HELDOUT_SHARE = "davis_train", 0.1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a run learns. Stored in every checkpoint; a resume must match it."""

    stage: int
    sources: tuple[tuple[str, int], ...]  # (training dataset, samples per epoch)
    epochs: int
    batch_size: int = 16  # global: split over the processes under torchrun
    lr: float = 1e-5  # Adam, no weight decay, constant
    size: int = 512  # internal square resolution
    backbone: str = "mitb2"
    flip_p: float = 0.5  # joint horizontal and (independently) vertical flips
    loss: str = "ce"  # model.losses
    selection: str = "davis"  # best.pth by "davis" (DAVIS 2016 val, the reference), "heldout" or "last" epoch
    val_every: int = 100  # epochs between validations ("davis" selection)
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        values = dict(values)
        values["sources"] = tuple((name, int(k)) for name, k in values["sources"])
        return cls(**values)


STAGES = {
    1: Recipe(stage=1, sources=(("ytvos", 512),), epochs=4000),
    2: Recipe(stage=2, sources=(("duts", 384), ("davis_train", 128)), epochs=2000),
}
# The flag that sets each field: its name, but --datasets for the sources.
RECIPE_FLAGS = {f.name: "--datasets" if f.name == "sources" else "--" + f.name.replace("_", "-")
                for f in fields(Recipe)}


@dataclass(frozen=True)
class RunSettings:
    """Where and how a run executes; these may change when it is resumed."""

    output: Path
    data_root: str
    dataset_roots: dict
    device_name: str = "auto"
    workers: int = 0
    amp: str = "off"
    compile: bool = False
    strict_fp32: bool = False
    checkpoint_every: int = 10
    save_every: int = 1000
    resume: str | None = None  # "last" or a file
    overwrite: bool = False
    init_checkpoint: str | None = None  # initial DepthFlow weights (stage 2 starts from stage 1's)
    pretrained: str | None = None  # ImageNet encoder weights
    tensorboard: bool = False  # also log to OUTPUT/tensorboard


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
        sources.append((name, int(samples)))
    return tuple(sources)


def recipe_differences(saved: Recipe, asked: Recipe) -> list[str]:
    """One phrase per field in which `asked` differs from `saved`."""
    def shown(field, value):
        return sources_text(value) if field == "sources" else value

    return [f"{RECIPE_FLAGS[f.name]} {shown(f.name, getattr(saved, f.name))} (this run asks for "
            f"{shown(f.name, getattr(asked, f.name))})"
            for f in fields(Recipe) if getattr(saved, f.name) != getattr(asked, f.name)]


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed the global generators (Python, torch on the CPU and every GPU) for one step. Sampling and flips
    have generators of their own; this makes anything else random in a step (dropout, say) a function of
    (seed, epoch, step, process), so a resumed run draws what the uninterrupted one would have."""
    value = random.Random(f"{seed}/{epoch}/{step}/{rank}").getrandbits(63)
    random.seed(value)
    torch.manual_seed(value)


class GlobalBatches:
    """This process's share of every global batch, epoch after epoch, as (epoch, index) sample keys.

    Each epoch's samples are permuted by a generator seeded with seed + epoch (the order torch's
    DistributedSampler gives one process) and cut into global batches of `batch_size`; each of the
    `world_size` processes takes its equal slice of every global batch. The sequence of global batches is
    therefore the same for any number of processes. A last, partial global batch is cut to a multiple of
    the process count so that every process steps together.
    """

    def __init__(self, samples: int, batch_size: int, seed: int, ctx: distributed.Context):
        self.samples, self.batch_size, self.seed, self.ctx = samples, batch_size, seed, ctx
        self.steps_per_epoch = sum(1 for _ in self._global(0))

    def _global(self, epoch: int):
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        world = self.ctx.world_size
        for start in range(0, self.samples, self.batch_size):
            batch = order[start:start + self.batch_size]
            batch = batch[:len(batch) // world * world]
            if batch:
                yield batch

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        world, rank = self.ctx.world_size, self.ctx.rank
        return [[(epoch, i) for i in batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]]
                for batch in self._global(epoch)]

    def plan(self, start_epoch: int, start_step: int, epochs: int) -> "BatchPlan":
        """Batches from (start_epoch, start_step) to the end of the run: one loader serves every epoch."""
        return BatchPlan(self, start_epoch, start_step, epochs)


class BatchPlan:
    """An iterable of the run's remaining batches, made lazily (a whole recipe holds 128,000 of them)."""

    def __init__(self, batches: GlobalBatches, start_epoch: int, start_step: int, epochs: int):
        self.batches, self.start_epoch, self.start_step, self.epochs = batches, start_epoch, start_step, epochs

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs):
            yield from self.batches.epoch(epoch)[self.start_step if epoch == self.start_epoch else 0:]

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, step) of the k-th batch of the plan."""
        done = self.start_step + k
        return self.start_epoch + done // self.batches.steps_per_epoch, done % self.batches.steps_per_epoch


class EpochFigures:
    """Loss and pooled foreground IoU of the epoch's steps so far, kept on the device: reading them is the only
    synchronisation, done once per LOG_EVERY steps and per epoch rather than every step. Saved with
    mid-epoch checkpoints, so an epoch's logged figures cover the whole epoch after a resume too."""

    def __init__(self, ctx: distributed.Context, state: dict | None = None):
        self.ctx = ctx
        self.sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, intersection, union
        self.steps = 0
        if state is not None:
            self.sums += state["sums"].to(ctx.device)
            self.steps = state["steps"]

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = class_masks(logits).bool(), target.bool()
        self.sums += torch.stack([loss.detach().double(), (pred & target).sum().double(),
                                  (pred | target).sum().double()])
        self.steps += 1

    def state(self) -> dict:
        return {"sums": self.sums, "steps": self.steps}

    def read(self) -> dict:
        """Over the whole global batches: every process's share (under torchrun all ranks call this together)."""
        if not self.steps:
            return {"loss": None, "iou": None}
        loss, inter, union = distributed.sum_over_ranks(self.sums, self.ctx).tolist()
        # Each process's loss is the mean over its equal share of a global batch; their mean is the batch's.
        return {"loss": loss / (self.steps * self.ctx.world_size), "iou": 1.0 if union == 0 else inter / union}


def train(recipe: Recipe, settings: RunSettings, stop: StopRequests, given: frozenset[str] | None = None) -> Path:
    """Run (or resume) one training stage; returns the output folder.

    `given`: the recipe fields the user set (run.py: the flags on the command line; default: all). A resume
    continues the saved recipe and refuses a given field that differs from it; a fresh run started from
    --checkpoint takes the backbone and size the file holds unless they are given."""
    ctx = distributed.init(settings.device_name, settings.strict_fp32)
    try:
        run = TrainingRun(recipe, settings, ctx, stop, given)
        try:
            run.train()
        finally:
            run.writer.wait()
            if run.log is not None:
                run.log.close()
        return run.output
    finally:
        distributed.shutdown(ctx)


class TrainingRun:
    """One stage of training: set up (data, model, optimizer, resume), then the loop."""

    def __init__(self, recipe: Recipe, settings: RunSettings, ctx: distributed.Context, stop: StopRequests,
                 given: frozenset[str] | None = None):
        self.settings, self.ctx, self.stop = settings, ctx, stop
        self.given = frozenset(RECIPE_FLAGS) if given is None else given
        self.output = Path(settings.output)
        self.writer = BackgroundWriter()
        self.log = RunLog(self.output, settings.tensorboard) if ctx.is_main else None
        state = self._resume_state(recipe)
        self.recipe = recipe = Recipe.from_dict(state["recipe"]) if state is not None else recipe
        torch.manual_seed(recipe.seed)
        model = self._build_model(state)
        self.recipe = recipe = replace(recipe, backbone=model.backbone, size=model.size)
        self._prepare_data()
        if state is None:
            self._claim_output()  # last of the checks: an earlier run that --overwrite replaces goes only now
        self._prepare_optimisation(model)
        self.start_epoch, self.start_step, self.best, self.figures_state = 0, 0, float("-inf"), None
        if state is not None:
            self._restore(state)

    def _prepare_data(self) -> None:
        """The sources without the videos that select best.pth, the samples and their global batches."""
        recipe, ctx = self.recipe, self.ctx
        if recipe.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {recipe.batch_size} must be divisible by the {ctx.world_size} processes")
        self.val_spec, self.val_videos = self._selection_videos()
        self.sources = [Source(DATASETS[n], self._unselected(self._scan(n)), k) for n, k in recipe.sources]
        check_outside(self.output, [self._root(n) for n, _ in recipe.sources] +
                      ([self._root(self.val_spec.name)] if self.val_videos else []), "--output")
        self._check_disjoint()
        self.data = TrainingFrames(self.sources, size=recipe.size, seed=recipe.seed, flip_p=recipe.flip_p)
        self.batches = GlobalBatches(len(self.data), recipe.batch_size, recipe.seed, ctx)

    def _prepare_optimisation(self, model: DepthFlow) -> None:
        """The model on its device (DDP under torchrun, compiled with --compile), the loss, Adam, the scaler."""
        ctx, settings = self.ctx, self.settings
        self.model = model.to(ctx.device)
        self.net = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                           else None) if ctx.distributed else self.model
        if settings.compile:
            # Static shapes: every batch but an epoch's partial last one has the same size, so it compiles
            # once (twice with a partial batch). Checkpoints keep the plain module's names (self.model).
            check_compiler(ctx.device)
            self.net = torch.compile(self.net, dynamic=False)
        self.loss = build_loss(self.recipe.loss)
        # Fused Adam: one kernel for all parameters on a GPU; PyTorch's default (foreach) on a CPU.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.recipe.lr, weight_decay=0.0,
                                          fused=ctx.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.amp == "fp16" and ctx.device.type == "cuda")

    def _root(self, name: str) -> Path:
        return dataset_root(DATASETS[name], self.settings.data_root, self.settings.dataset_roots.get(name))

    def _scan(self, name: str):
        return scan(DATASETS[name], self._root(name))

    def _selection_videos(self):
        """(dataset, videos) that pick best.pth: DAVIS 2016 val, a held-out share of DAVIS 2016 train, or none."""
        selection = self.recipe.selection
        if selection == "davis":
            return DATASETS[VALIDATION_DATASET], self._scan(VALIDATION_DATASET)
        if selection == "heldout":
            videos = self._scan(HELDOUT_DATASET)
            count = max(1, round(HELDOUT_SHARE * len(videos)))
            chosen = set(random.Random(f"heldout/{self.recipe.seed}").sample(range(len(videos)), count))
            return DATASETS[HELDOUT_DATASET], [v for i, v in enumerate(videos) if i in chosen]
        return None, None

    def _unselected(self, videos):
        """A source's videos without those that select best.pth (the held-out ones)."""
        if self.recipe.selection != "heldout":
            return videos
        held = {_folder(v) for v in self.val_videos}
        return [v for v in videos if _folder(v) not in held]

    def _check_disjoint(self) -> None:
        """No video that selects best.pth may be trained on (a split list naming a val video, say)."""
        if self.val_videos is None:
            return
        selecting = {_folder(v) for v in self.val_videos}
        for source in self.sources:
            for video in source.videos:
                if _folder(video) in selecting:
                    raise UserError(f"{source.spec.title} holds {video.key}, a video of {self.val_spec.title}, "
                                    f"which picks best.pth ({video.frames[0].image.parent}); the training and "
                                    "validation videos must be disjoint")

    def _resume_state(self, recipe: Recipe) -> dict | None:
        """The checkpoint to continue, checked against the given recipe fields; or None for a fresh run in an
        unused folder."""
        if not self.settings.resume:
            return None
        path = self.output / "last.pth" if self.settings.resume == "last" else Path(self.settings.resume)
        if not path.is_file():
            raise UserError(f"--resume: no checkpoint at {path} (expected last.pth of an earlier run in --output)")
        state = read_project_checkpoint(path, training=True)
        try:
            saved = Recipe.from_dict(state["recipe"])
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path} was written by an older version of this trainer (no recipe); start a new "
                            "run from it with --checkpoint") from None
        asked = replace(saved, **{name: getattr(recipe, name) for name in self.given})
        if differences := recipe_differences(saved, asked):
            raise UserError(f"{path} was trained with {', '.join(differences)}; a resumed run keeps its recipe "
                            "(drop the flag, or start a new --output)")
        self.resume_path = path
        return state

    def _claim_output(self) -> None:
        """Every rank checks (so all stop together); rank 0 clears an earlier run that --overwrite replaces,
        unless that would delete the weights this run starts from."""
        found = [name for name in RUN_FILES if (self.output / name).exists()]
        if found and not self.settings.overwrite:
            raise UserError(f"{self.output} holds an earlier run ({found[0]}); continue it with --resume, choose "
                            "another --output, or start afresh there with --overwrite")
        earlier = [self.output / name for name in RUN_FILES] + sorted(self.output.glob("epoch_*.pth"))
        for start in filter(None, (self.settings.init_checkpoint, self.settings.pretrained)):
            if any(p.exists() and p.resolve() == Path(start).resolve() for p in earlier):
                raise UserError(f"--overwrite would delete {start}, the weights this run starts from; copy it out "
                                "of --output first, or choose another --output")
        if self.ctx.is_main:
            check_writable(self.output)
            for path in earlier:
                path.unlink(missing_ok=True)

    def _build_model(self, state: dict | None) -> DepthFlow:
        recipe, settings = self.recipe, self.settings
        if state is not None:
            model = DepthFlow(**state["config"])
            model.load_state_dict(state["model"])
            return model
        if settings.init_checkpoint:
            return load_depthflow(settings.init_checkpoint, backbone=recipe.backbone if "backbone" in self.given
                                  else None, size=recipe.size if "size" in self.given else None)
        try:
            model = DepthFlow(recipe.backbone, size=recipe.size)
        except ValueError as err:
            raise UserError(f"--backbone {recipe.backbone}: {err}") from None
        if settings.pretrained:
            load_pretrained(model, settings.pretrained)
        elif self.ctx.is_main:
            print("warning: no --pretrained ImageNet weights; the encoders start from random initialisation")
        return model

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step, self.best = state["epoch"], state["step"], state["best"]
        self.figures_state = state.get("figures") if self.start_step else None
        if self.log is not None:
            self.log.trim(self.start_epoch)  # epochs after the checkpoint are about to be trained again

    def save(self, name: str, epoch: int, step: int, figures: EpochFigures | None = None) -> None:
        """Write OUTPUT/name in the background (rank 0): a host copy is taken first, so training goes on at
        once. A model whose weights are no longer finite is never written."""
        if not self.ctx.is_main:
            return
        if not all(p.isfinite().all() for p in self.model.parameters()):
            raise UserError(f"the weights are no longer finite at epoch {epoch + 1}; {name} was not written "
                            "(lower --lr)")
        state = host_copy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict(),
                           "figures": figures.state() if figures is not None else None})
        training = {"optimizer": state["optimizer"], "scaler": state["scaler"], "figures": state["figures"],
                    "epoch": epoch, "step": step, "best": self.best, "recipe": _recipe_record(self.recipe)}
        path, model = self.output / name, self.model
        self.writer.submit(lambda: save_project_checkpoint(path, model, state_dict=state["model"], **training))

    def train(self) -> None:
        recipe, ctx = self.recipe, self.ctx
        if self.start_epoch >= recipe.epochs:
            if ctx.is_main:
                print(f"{self.resume_path} has finished all {recipe.epochs} epochs; nothing to do")
            return
        if ctx.is_main:
            self._announce()
        plan = self.batches.plan(self.start_epoch, self.start_step, recipe.epochs)
        loader = loading.data_loader(self.data, plan, self.settings.workers, pin_memory=ctx.device.type == "cuda")
        batches = loading.batches(loader, lambda k: "epoch {}, step {}".format(*_shown(plan.position(k))))
        for epoch in range(self.start_epoch, recipe.epochs):
            self._epoch(epoch, batches, self.start_step if epoch == self.start_epoch else 0)
        self.writer.wait()
        distributed.check_in_sync(self.model, ctx)

    def _announce(self) -> None:
        """Say, and log in run.json, what this run is and how it picks best.pth."""
        recipe = self.recipe
        held = sorted(v.key for v in self.val_videos) if recipe.selection == "heldout" else []
        how = {"davis": f"the best DAVIS 2016 val J&F, every {recipe.val_every} epochs (the reference; DAVIS 2016 "
                        "val is also the paper's test set)",
               "heldout": f"the best J&F of {len(held)} held-out DAVIS 2016 train videos, never trained on, every "
                          f"{recipe.val_every} epochs ({', '.join(held)})",
               "last": "the last epoch (no validation)"}[recipe.selection]
        print(f"training {sources_text(recipe.sources)} for {recipe.epochs} epochs; best.pth: {how}")
        if self.settings.resume:
            print(f"resuming from {self.resume_path}: epoch {self.start_epoch + 1}, step {self.start_step}")
        self.log.start({"recipe": _recipe_record(recipe), "selection": how, "heldout_videos": held,
                        "processes": self.ctx.world_size})

    def _epoch(self, epoch: int, batches, skip: int) -> None:
        self.net.train()
        figures = EpochFigures(self.ctx, self.figures_state if skip else None)
        start, steps = time.time(), self.batches.steps_per_epoch
        bar = tqdm(range(skip + 1, steps + 1), desc=f"epoch {epoch + 1}/{self.recipe.epochs}", leave=False,
                   disable=None if self.ctx.is_main else True)
        done = skip
        for step in bar:
            batch = self._next_batch(batches, epoch, done, figures)
            seed_step(self.recipe.seed, epoch, step, self.ctx.rank)
            try:
                self._step(batch, figures)
            except torch.OutOfMemoryError as err:
                self._save_after_failure(err, epoch, done, figures)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                raise compile_failure(err, "the training step") from None
            done = step
            if step % LOG_EVERY == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self._finite(figures.read(), epoch, step).items()})
            if distributed.any_rank(self.stop.signum is not None, self.ctx):
                self._stop(epoch, step, figures)
        self._end_of_epoch(epoch, figures, start)

    def _finite(self, figures: dict, epoch: int, step: int) -> dict:
        """The figures, if the loss is still a number; otherwise the run stops, last.pth as last written."""
        if figures["loss"] is not None and not math.isfinite(figures["loss"]):
            self.writer.wait()
            last = self.output / "last.pth"
            kept = f"{last} holds the last finite state" if last.is_file() else "no checkpoint was written"
            raise UserError(f"the loss became {figures['loss']} by epoch {epoch + 1}, step {step}; stopped without "
                            f"saving ({kept}); lower --lr")
        return figures

    def _next_batch(self, batches, epoch: int, done: int, figures: EpochFigures) -> dict:
        """The next batch; if any process fails to load its share (a corrupt file, a loader process killed for
        memory), all of them save and stop with that process's error, rather than the others waiting for it in
        the step's all-reduce."""
        try:
            batch, failure = next(batches), None
        except UserError as err:
            batch, failure = None, err
        if distributed.any_rank(failure is not None, self.ctx):
            message = distributed.first_message(failure and one_line(failure), self.ctx)
            self._save_after_failure(UserError(message), epoch, done, figures, wait_for_all=True)
        return batch

    def _step(self, batch: dict, figures: EpochFigures) -> None:
        device = self.ctx.device
        image = to_float(batch["image"].to(device, non_blocking=True))
        flow = to_float(batch["flow"].to(device, non_blocking=True))
        target = batch["mask"].to(device, non_blocking=True).long()
        with autocast_context(device, self.settings.amp):
            logits = self.net(image, flow)
            loss = self.loss(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        figures.add(loss, logits, target)

    def _stop(self, epoch: int, step: int, figures: EpochFigures):
        """A stop request (Ctrl-C, SIGTERM): save the finished steps, then stop with the signal's exit code."""
        self._finite(figures.read(), epoch, step)
        self.save("last.pth", epoch, step, figures)
        self.writer.wait()
        raise Stopped(f"saved {self.output / 'last.pth'} at epoch {epoch + 1}, step {step}; continue with --resume",
                      self.stop.signum or 2)

    def _save_after_failure(self, err: Exception, epoch: int, done: int, figures: EpochFigures,
                            wait_for_all: bool = False):
        """Keep the work up to the last finished step, then stop with one line saying how to continue.

        `wait_for_all`: every process is here, and none leaves before rank 0 has saved (torchrun stops the
        others as soon as one exits)."""
        self.save("last.pth", epoch, done, figures)
        self.writer.wait()
        if wait_for_all:
            distributed.barrier(self.ctx)
        if isinstance(err, torch.OutOfMemoryError):
            per_process = self.recipe.batch_size // self.ctx.world_size
            what = (f"out of GPU memory at --batch-size {self.recipe.batch_size} ({per_process} a process) and "
                    f"--size {self.model.size}; lower --batch-size (README, 'Training', for the learning rate)")
        else:
            what = one_line(err)
        raise UserError(f"{what}; saved {self.output / 'last.pth'} at epoch {epoch + 1}, step {done}: continue "
                        "with --resume") from None

    def _end_of_epoch(self, epoch: int, figures: EpochFigures, start: float) -> None:
        recipe, settings, ctx = self.recipe, self.settings, self.ctx
        steps = self.batches.steps_per_epoch
        record = {"epoch": epoch + 1, **self._finite(figures.read(), epoch, steps), "lr": recipe.lr,
                  "selection": recipe.selection}
        if self.val_videos is not None and (epoch + 1) % recipe.val_every == 0:
            options = InferenceOptions(ctx.device, batch_size=max(1, recipe.batch_size // ctx.world_size),
                                       workers=settings.workers, amp=settings.amp)
            result = evaluate_dataset(Segmenter(self.model, options), self.val_spec, self.val_videos,
                                      progress=False, ctx=ctx)
            if ctx.is_main:
                key = f"{recipe.selection}_jf"  # davis_jf or heldout_jf
                record[key] = result["metrics"]["J&F-Mean"]
                if record[key] > self.best:
                    self.best = record[key]
                    self.save("best.pth", epoch + 1, 0)
        if recipe.selection == "last" and epoch + 1 == recipe.epochs:
            self.save("best.pth", epoch + 1, 0)
        if (epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == recipe.epochs:
            self.save("last.pth", epoch + 1, 0)
        if settings.save_every and (epoch + 1) % settings.save_every == 0:
            self.save(f"epoch_{epoch + 1:05d}.pth", epoch + 1, 0)
        if ctx.is_main:
            seconds = time.time() - start  # the whole epoch: steps, validation and taking the checkpoints' copies
            record.update(seconds=round(seconds, 2), samples_per_s=round(len(self.data) / seconds, 2))
            self.log.epoch(record)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _shown(position: tuple[int, int]) -> tuple[int, int]:
    """(epoch, step) counted from 1, as the progress bar shows them."""
    return position[0] + 1, position[1] + 1


def _recipe_record(recipe: Recipe) -> dict:
    """The recipe as plain types, so a checkpoint stays loadable with weights_only=True."""
    record = asdict(recipe)
    record["sources"] = [list(s) for s in recipe.sources]
    return record


def _folder(video) -> Path:
    """Where a video's frames are: the identity of a video across dataset lists."""
    return video.frames[0].image.parent.resolve()

