"""Training: one stage of the recipe (recipe.py) on one device, or on several under torchrun or srun.

    run = TrainingRun(recipe, settings, ctx, stop)   # set-up: data, model and optimiser, resume
    run.train()                                       # the loop: sample, forward, loss, backward, step, log,
                                                      # validate, checkpoint

Everything needed to continue is in OUTPUT/last.pth (written atomically, in the background): model,
optimizer, AMP scaler, the epoch and step to continue from, the running epoch's figures, the best score
and the recipe, which a resume must match field by field (but `epochs`, which may grow). Samples are a
pure function of (seed, epoch, index), global batches do not depend on the number of processes, and the
global random generators are seeded per step, so a resumed run replays exactly what the stopped run would
have done, with the same or another number of processes. How a run stops (Ctrl-C, SIGTERM, a failure on
any process) is utils/run_control.py's.
"""

import math
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dataset import DATASETS, VALIDATION_DATASET, Source, TrainingFrames, Video, dataset_root, scan
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.checkpoints import load_depthflow, load_pretrained, read_project_checkpoint, save_project_checkpoint
from model.losses import build_loss
from recipe import RECIPE_FLAGS, RESUMABLE_CHANGES, Recipe, recipe_differences, sources_text
from transforms import to_float
from utils import distributed, loading
from utils.background import BackgroundWriter, all_finite, host_copy
from utils.batches import GlobalBatches, seed_step
from utils.device import PinnedStaging, autocast_context, check_compiler, compile_failure, out_of_memory
from utils.epoch_figures import EpochFigures
from utils.errors import UserError
from utils.interrupts import StopRequests
from utils.io import FolderLock, check_outside, check_writable
from utils.palette import read_mask
from utils.progress import progress
from utils.run_control import RunControl
from utils.run_log import RunLog

LOG_EVERY = 20  # steps between progress updates (each reads the running figures from the device once)
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "run.json", "recipe.json")  # what a run writes
RUN_FOLDERS = ("tensorboard",)
# "heldout" selection: this share of DAVIS 2016 train's videos, drawn by the seed, picks best.pth and is never
# trained on.
HELDOUT_DATASET, HELDOUT_SHARE = "davis_train", 0.1
PICTURES = 4  # validation frames drawn in TensorBoard at each validation


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
    flow_pretrained: str | None = None  # ImageNet weights of the motion encoder, where its backbone differs
    tensorboard: bool = False  # also log to OUTPUT/tensorboard
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S


def train(recipe: Recipe, settings: RunSettings, stop: StopRequests, given: frozenset[str] | None = None) -> Path:
    """Run (or resume) one training stage; returns the output folder.

    `given`: the recipe fields the user set (run.py: a recipe file's and the flags'; default: all). A resume
    continues the saved recipe and refuses a given field that differs from it (but `epochs`); a fresh run
    started from --checkpoint takes the backbones and size the file holds unless they are given."""
    ctx = distributed.init(settings.device_name, settings.strict_fp32, settings.dist_timeout)
    run = TrainingRun(recipe, settings, ctx, stop, given)
    try:
        run.train()
    except RuntimeError as err:  # a collective that failed because another process is gone: one line
        if lost := distributed.peer_lost(err, ctx):
            raise lost from None
        raise
    finally:
        run.close()
    output = run.output
    del run  # the DDP wrapper holds the process group: release it before the group goes
    distributed.shutdown(ctx)  # only after a clean finish: after a failure the launcher ends the others
    return output


def training_data(recipe: Recipe, settings: RunSettings, output: Path):
    """(samples, the dataset that picks best.pth, its videos): the sources without the videos that select
    best.pth, checked to be disjoint from them, and the output checked to lie outside every input."""
    def root(name: str) -> Path:
        return dataset_root(DATASETS[name], settings.data_root, settings.dataset_roots.get(name))

    def videos(name: str):
        return scan(DATASETS[name], root(name))

    val_spec, val_videos = None, None
    if recipe.selection == "davis":
        val_spec, val_videos = DATASETS[VALIDATION_DATASET], videos(VALIDATION_DATASET)
    elif recipe.selection == "heldout":  # a seeded share of DAVIS 2016 train, never trained on
        candidates = videos(HELDOUT_DATASET)
        count = max(1, round(HELDOUT_SHARE * len(candidates)))
        chosen = set(random.Random(f"heldout/{recipe.seed}").sample(range(len(candidates)), count))
        val_spec, val_videos = DATASETS[HELDOUT_DATASET], [v for i, v in enumerate(candidates) if i in chosen]
    selecting = {_folder(v) for v in val_videos or []}
    held = selecting if recipe.selection == "heldout" else set()
    sources = [Source(DATASETS[n], [v for v in videos(n) if _folder(v) not in held], k) for n, k in recipe.sources]
    for source in sources:  # a split list naming a validation video, say
        if trained := next((v for v in source.videos if _folder(v) in selecting), None):
            raise UserError(f"{source.spec.title} holds {trained.key}, a video of {val_spec.title}, which picks "
                            f"best.pth ({trained.frames[0].image.parent}); the training and validation videos must be "
                            "disjoint")
    inputs = [root(n) for n, _ in recipe.sources] + ([root(val_spec.name)] if val_videos else [])
    inputs += [Path(p) for p in (settings.init_checkpoint, settings.pretrained, settings.flow_pretrained) if p]
    check_outside(output, inputs, "--output")
    data = TrainingFrames(sources, size=recipe.size, seed=recipe.seed, flip_p=recipe.flip_p)
    return data, val_spec, val_videos


class TrainingRun:
    """One stage of training: set up (data, model and optimiser, resume), then the loop."""

    def __init__(self, recipe: Recipe, settings: RunSettings, ctx: distributed.Context, stop: StopRequests,
                 given: frozenset[str] | None = None):
        self.settings, self.ctx = settings, ctx
        self.given = frozenset(RECIPE_FLAGS) if given is None else given
        self.output = Path(settings.output)
        self.writer, self.log, self.lock = BackgroundWriter(), None, None
        self.control = RunControl(ctx, stop, self._save_last, str(self.output / "last.pth"))
        try:
            self._set_up(recipe)
        except BaseException:
            self.close()  # the output folder's lock goes with a run that could not start
            raise

    def _set_up(self, recipe: Recipe) -> None:
        """Resume state, model, data, the output folder, the optimiser, in that order: every check before any
        file of an earlier run is touched."""
        state, self.resume_path = resume_state(recipe, self.settings, self.given)
        if state is not None:  # the saved recipe, extended to the epochs asked for
            recipe = replace(Recipe.from_dict(state["recipe"]),
                             epochs=recipe.epochs if "epochs" in self.given else state["recipe"]["epochs"])
        self.recipe = recipe
        torch.manual_seed(recipe.seed)
        model = initial_model(recipe, self.settings, self.given, state, say=self.ctx.is_main)
        self.recipe = replace(recipe, backbone=model.backbone, flow_backbone=model.flow_backbone, size=model.size)
        if self.recipe.batch_size % self.ctx.world_size:
            raise UserError(f"--batch-size {self.recipe.batch_size} must be divisible by the {self.ctx.world_size} "
                            "processes")
        self.data, self.val_spec, self.val_videos = training_data(self.recipe, self.settings, self.output)
        self.global_batches = GlobalBatches(len(self.data), self.recipe.batch_size, self.recipe.seed, self.ctx)
        self.steps_per_epoch = self.global_batches.steps_per_epoch
        if self.ctx.is_main:
            self.lock = claim_output(self.settings, resuming=state is not None)
        self._prepare_optimisation(model)
        self.start_epoch, self.start_step, self.best, self.figures_state = 0, 0, float("-inf"), None
        if state is not None:
            self._restore(state)
        if self.ctx.is_main:  # only now: --overwrite has cleared an earlier run's logs, TensorBoard's included
            self.log = RunLog(self.output, self.settings.tensorboard, purge_from=self.start_epoch + 1)

    # ---- the loop ---------------------------------------------------------------------------------------

    def train(self) -> None:
        recipe, ctx = self.recipe, self.ctx
        if self.start_epoch >= recipe.epochs:
            if ctx.is_main:
                print(f"{self.resume_path} has finished all {recipe.epochs} epochs; nothing to do")
            return
        if ctx.is_main:
            self._announce()
        batches = self._batches()
        for epoch in range(self.start_epoch, recipe.epochs):
            self.net.train()
            first = self.start_step if epoch == self.start_epoch else 0
            figures = EpochFigures(ctx, self.figures_state if first else None)
            with progress(self.steps_per_epoch - first, f"epoch {epoch + 1}/{recipe.epochs}", unit="step",
                          enabled=ctx.is_main) as bar:
                for step in range(first, self.steps_per_epoch):
                    batch = self.control.take(batches)
                    self.control.at_step(epoch, step, figures)  # stop or failure anywhere: save, then raise
                    seed_step(recipe.seed, epoch, step, ctx.rank)
                    try:
                        loss, logits, target = self._forward(batch)
                        self.scaler.scale(loss).backward()
                    except (torch.OutOfMemoryError, RuntimeError) as err:
                        if not out_of_memory(err):
                            raise
                        self.control.failed_alone(self._memory_hint(), epoch, step, figures)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    figures.add(loss, logits, target, skip_non_finite=self.scaler.is_enabled())
                    if (step + 1) % LOG_EVERY == 0:
                        shown = self._checked(figures.read(), epoch, step + 1)
                        bar.set_postfix({k: f"{shown[k]:.4f}" for k in ("loss", "iou")})
                    bar.update(1)
            self._end_of_epoch(epoch, figures)
        self.writer.wait()
        distributed.check_in_sync(self.model, ctx)

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, target) of one batch, its uint8 pixels made floats on the device."""
        image, flow, target = self.staging(batch["image"], batch["flow"], batch["mask"])
        image, flow, target = to_float(image), to_float(flow), target.long()
        try:
            with autocast_context(self.ctx.device, self.settings.amp):
                logits = self.net(image, flow)
                return self.loss(logits, target), logits, target
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise compile_failure(err, "the training step") from None

    def _checked(self, figures: dict, epoch: int, step: int) -> dict:
        """The figures, if the loss is still a number; otherwise the run stops, last.pth as last written.
        Under fp16 loss scaling a step whose loss overflows is skipped (GradScaler's design); a whole log
        interval of them is a diverged run."""
        diverged = figures["loss"] is not None and not math.isfinite(figures["loss"])
        skipped = figures["skipped"] - self.skipped_seen.get(epoch, 0)  # since the last look at this epoch's
        self.skipped_seen[epoch] = figures["skipped"]
        overflowing = self.scaler.is_enabled() and skipped >= LOG_EVERY
        if diverged or overflowing:
            self.writer.wait()
            last = self.output / "last.pth"
            kept = f"{last} holds the last finite state" if last.is_file() else "no checkpoint was written"
            what = f"every step's loss overflowed fp16 ({figures['skipped']} skipped)" if overflowing else \
                f"the loss became {figures['loss']}"
            raise UserError(f"{what} by epoch {epoch + 1}, step {step}; stopped without saving ({kept}); lower --lr"
                            + (" or use --amp bf16" if self.scaler.is_enabled() else ""))
        return figures

    def _end_of_epoch(self, epoch: int, figures: EpochFigures) -> None:
        """Validate (every val_every epochs and after the last), keep best.pth, write checkpoints and the log."""
        recipe, settings = self.recipe, self.settings
        start, done = self.epoch_start, epoch + 1
        record = {"epoch": done, **self._checked(figures.read(), epoch, self.steps_per_epoch), "lr": recipe.lr,
                  "selection": recipe.selection}
        if not record["skipped"]:
            del record["skipped"]
        if figures.steps < self.steps_per_epoch:
            record["figures_from_step"] = self.steps_per_epoch - figures.steps  # a resume without the epoch's start
        if self.val_videos is not None and (done % recipe.val_every == 0 or done == recipe.epochs):
            record.update(self._validate(done))
        if recipe.selection == "last" and done == recipe.epochs:
            self._save("best.pth", done, 0)
        if done % settings.checkpoint_every == 0 or done == recipe.epochs:
            self._save("last.pth", done, 0)
        if settings.save_every and done % settings.save_every == 0:
            self._save(f"epoch_{done:05d}.pth", done, 0)
        if self.ctx.is_main:
            seconds = time.time() - start  # the whole epoch: steps, validation and taking the checkpoints' copies
            record.update(seconds=round(seconds, 2), samples_per_s=round(len(self.data) / seconds, 2))
            self.log.epoch(record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
        self.epoch_start = time.time()

    def _validate(self, done: int) -> dict:
        """The selection set's J&F (all processes share its videos out); best.pth when it is the best yet."""
        ctx, recipe = self.ctx, self.recipe
        options = InferenceOptions(ctx.device, batch_size=max(1, recipe.batch_size // ctx.world_size),
                                   workers=self.settings.workers, amp=self.settings.amp)
        segmenter = Segmenter(self.model, options)
        result = evaluate_dataset(segmenter, self.val_spec, self.val_videos, progress=False, ctx=ctx)
        if not ctx.is_main:
            return {}
        score = result["metrics"]["J&F-Mean"]
        if score > self.best:
            self.best = score
            self._save("best.pth", done, 0)
        if self.log.board is not None:
            self.log.pictures(done, self._pictures(segmenter))
        return {f"{recipe.selection}_jf": score}

    def _pictures(self, segmenter: Segmenter) -> dict:
        """A few validation frames (each video's middle one): frame, flow, prediction and ground truth."""
        picked = [Video(v.name, (v.frames[len(v.frames) // 2],), v.group) for v in self.val_videos[:PICTURES]]
        pictures = {}
        for frame in segmenter.frames(picked, progress=False):
            truth = frame.video.frames[0].mask
            gt = read_mask(truth, self.val_spec.mask_rule) if truth is not None else np.zeros_like(frame.mask)
            flow = frame.flow if frame.flow.shape == frame.image.shape else np.zeros_like(frame.image)
            masks = [np.repeat(m[..., None] * 255, 3, axis=2) for m in (frame.mask, gt)]
            pictures[f"validation/{frame.video.key}"] = np.concatenate([frame.image, flow, *masks], axis=1)
        return pictures

    # ---- set-up -----------------------------------------------------------------------------------------

    def _batches(self):
        """One loader for the rest of the run; a batch that fails to load names its epoch and step."""
        plan = self.global_batches.plan(self.start_epoch, self.start_step, self.recipe.epochs)
        workers = loading.bounded_workers(self.settings.workers, len(plan), "--workers")
        loader = loading.data_loader(self.data, plan, workers)
        return loading.batches(loader, lambda k: "epoch {}, step {}".format(*(p + 1 for p in plan.position(k))))

    def _prepare_optimisation(self, model: DepthFlow) -> None:
        """The model on its device (DDP under several processes, compiled with --compile), the loss, Adam, the
        AMP scaler."""
        ctx, settings = self.ctx, self.settings
        self.model = model.to(ctx.device)
        self.net = distributed.wrap(self.model, ctx)
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
        self.staging = PinnedStaging(ctx.device)
        self.epoch_start = time.time()
        self.skipped_seen: dict[int, int] = {}  # fp16 steps skipped in each epoch, at the last look

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:  # --amp may change on resume: the scale starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step, self.best = state["epoch"], state["step"], state["best"]
        self.figures_state = state.get("figures") if self.start_step else None

    def _announce(self) -> None:
        """Say, and log in run.json and recipe.json, what this run is and how it picks best.pth."""
        recipe = self.recipe
        held = sorted(v.key for v in self.val_videos) if recipe.selection == "heldout" else []
        how = {"davis": f"the best DAVIS 2016 val J&F, every {recipe.val_every} epochs and after the last (the "
                        "reference; DAVIS 2016 val is also the paper's test set)",
               "heldout": f"the best J&F of {len(held)} held-out DAVIS 2016 train videos, never trained on, every "
                          f"{recipe.val_every} epochs and after the last ({', '.join(held)})",
               "last": "the last epoch (no validation)"}[recipe.selection]
        print(f"training {sources_text(recipe.sources)} for {recipe.epochs} epochs; best.pth: {how}")
        if self.settings.resume:
            print(f"resuming from {self.resume_path}: epoch {self.start_epoch + 1}, step {self.start_step}")
        self.log.start({"recipe": recipe.record(), "selection": how, "heldout_videos": held,
                        "processes": self.ctx.world_size}, checkpoint_bytes=self._checkpoint_bytes(),
                       checkpoints=self._checkpoints_kept())

    def _checkpoint_bytes(self) -> int:
        """A checkpoint's size: the weights and Adam's two moments of each."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _checkpoints_kept(self) -> int:
        every = self.settings.save_every
        return 2 + (self.recipe.epochs // every if every else 0)  # last.pth, best.pth and the epoch_N.pth

    def _memory_hint(self) -> str:
        per_process = self.recipe.batch_size // self.ctx.world_size
        where = "GPU" if self.ctx.device.type == "cuda" else "host"
        return (f"out of {where} memory at --batch-size {self.recipe.batch_size} ({per_process} a process) and --size "
                f"{self.model.size}; lower --batch-size (docs/training.md, for the learning rate)")

    # ---- checkpoints ------------------------------------------------------------------------------------

    def _save(self, name: str, epoch: int, step: int, figures: EpochFigures | None = None,
              everywhere: bool = False) -> None:
        """Write OUTPUT/name in the background (rank 0, or this process if `everywhere`): a host copy is taken
        first, so training goes on at once. A model whose weights are no longer finite is never written."""
        if not (self.ctx.is_main or everywhere):
            return
        state = host_copy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict(),
                           "figures": figures.state() if figures is not None else None})
        if not all_finite(state["model"]):
            raise UserError(f"the weights are no longer finite at epoch {epoch + 1}; {name} was not written "
                            "(lower --lr)")
        training = {"optimizer": state["optimizer"], "scaler": state["scaler"], "figures": state["figures"],
                    "epoch": epoch, "step": step, "best": self.best, "recipe": self.recipe.record()}
        path, model = self.output / name, self.model
        self.writer.submit(lambda: save_project_checkpoint(path, model, state_dict=state["model"], **training))

    def _save_last(self, epoch: int, step: int, figures, everywhere: bool) -> None:
        """RunControl's save: last.pth at the last finished step, written before the run stops."""
        if figures is not None:
            self._checked(figures.read(), epoch, step)
        self._save("last.pth", epoch, step, figures, everywhere)
        self.writer.wait()

    def close(self) -> None:
        self.writer.wait()
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()


def resume_state(recipe: Recipe, settings: RunSettings, given: frozenset[str]) -> tuple[dict | None, Path | None]:
    """(the checkpoint to continue, its path), checked against the given recipe fields; (None, None) for a fresh
    run."""
    if not settings.resume:
        return None, None
    path = Path(settings.output) / "last.pth" if settings.resume == "last" else Path(settings.resume)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (expected last.pth of an earlier run in --output)")
    state = read_project_checkpoint(path, training=True)
    try:
        saved = Recipe.from_dict(state["recipe"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} was written by an older version of this trainer (no recipe); start a new "
                        "run from it with --checkpoint") from None
    asked = replace(saved, **{name: getattr(recipe, name) for name in given})
    if differences := recipe_differences(saved, asked, allowed=RESUMABLE_CHANGES):
        raise UserError(f"{path} was trained with {', '.join(differences)}; a resumed run keeps its recipe, only "
                        "--epochs may change (drop the flag, or start a new --output)")
    if "epochs" in given and recipe.epochs < state["epoch"]:
        raise UserError(f"--epochs {recipe.epochs}: {path} has trained {state['epoch']} epochs already")
    return state, path


def claim_output(settings: RunSettings, resuming: bool) -> FolderLock:
    """The output folder's lock, for this run (rank 0's); a fresh run needs a folder without an earlier run, or
    --overwrite, which deletes that run's files (never the weights this run starts from)."""
    output = Path(settings.output)
    check_writable(output)
    lock = FolderLock(output, "--output").acquire()
    try:
        if not resuming:
            _clear_earlier_run(settings)
    except BaseException:
        lock.release()
        raise
    return lock


def _clear_earlier_run(settings: RunSettings) -> None:
    output = Path(settings.output)
    found = [name for name in RUN_FILES[:3] if (output / name).exists()]
    if found and not settings.overwrite:
        raise UserError(f"{output} holds an earlier run ({found[0]}); continue it with --resume, choose "
                        "another --output, or start afresh there with --overwrite")
    earlier = [output / name for name in RUN_FILES] + sorted(output.glob("epoch_*.pth"))
    for start in filter(None, (settings.init_checkpoint, settings.pretrained, settings.flow_pretrained)):
        if any(p.exists() and p.resolve() == Path(start).resolve() for p in earlier):
            raise UserError(f"--overwrite would delete {start}, the weights this run starts from; copy it out "
                            "of --output first, or choose another --output")
    for path in earlier:
        path.unlink(missing_ok=True)
    for folder in RUN_FOLDERS:
        shutil.rmtree(output / folder, ignore_errors=True)


def initial_model(recipe: Recipe, settings: RunSettings, given: frozenset[str], state: dict | None,
                  say: bool) -> DepthFlow:
    """The model a run starts from: the checkpoint it resumes, its --checkpoint, or a new one with ImageNet
    encoders where --pretrained gives them (`say`: warn of an encoder left random)."""
    if state is not None:
        model = DepthFlow(**state["config"])
        model.load_state_dict(state["model"])
        return model
    if settings.init_checkpoint:
        model = load_depthflow(settings.init_checkpoint, backbone=recipe.backbone if "backbone" in given
                               else None, size=recipe.size if "size" in given else None)
        if "flow_backbone" in given and recipe.flow_backbone != model.flow_backbone:
            raise UserError(f"--flow-backbone {recipe.flow_backbone}: {settings.init_checkpoint} holds a "
                            f"{model.flow_backbone or model.backbone} motion encoder")
        return model
    try:
        model = DepthFlow(recipe.backbone, size=recipe.size, flow_backbone=recipe.flow_backbone)
    except ValueError as err:
        raise UserError(f"--backbone {recipe.backbone}: {err}") from None
    _load_imagenet(model, settings, say)
    return model


def _load_imagenet(model: DepthFlow, settings: RunSettings, say: bool) -> None:
    same = model.flow_backbone in (None, model.backbone)
    if settings.pretrained:
        load_pretrained(model, settings.pretrained, "both" if same and not settings.flow_pretrained
                        else "appearance")
    if settings.flow_pretrained:
        load_pretrained(model, settings.flow_pretrained, "motion")
    missing = [name for name, given in (("appearance", settings.pretrained),
                                        ("motion", settings.flow_pretrained or (settings.pretrained and same)))
               if not given]
    if missing and say:
        which = " and ".join(missing) + (" encoders" if len(missing) > 1 else " encoder")
        print(f"warning: no ImageNet weights for the {which} (--pretrained"
              f"{', --flow-pretrained' if not same else ''}): random initialisation")


def _folder(video) -> Path:
    """Where a video's frames are: the identity of a video across dataset lists."""
    return video.frames[0].image.parent.resolve()
