"""Training with the reference recipe (README, 'Training'), on one device or under torchrun.

Stage 1: YouTube-VOS 2018, 512 samples per epoch, 4000 epochs. Stage 2 continues from stage 1 with a fresh
Adam: DUTSv2 (384 samples) + DAVIS 2016 train (128) per epoch, 2000 epochs. Adam lr 1e-5, batch 16,
cross-entropy on two-class logits at the internal resolution. DAVIS 2016 val J&F every --val-every epochs
keeps the best checkpoint.

Everything needed to continue is in OUTPUT/last.pth (written atomically): model, optimizer, AMP scaler,
the epoch and step to continue from, the best score and RNG states. Samples are a pure function of
(seed, epoch, index) and global batches do not depend on the number of processes, so a resumed run
replays exactly what the stopped run would have done, with the same or another number of processes.
"""

import json
import random
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import DATASETS, TRAINING_DATASETS, VALIDATION_DATASET, Source, TrainingFrames, dataset_root, scan
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.checkpoints import load_depthflow, load_pretrained_mit, read_project_checkpoint, save_project_checkpoint
from model.depthflow import class_masks
from transforms import frames_to_float
from utils import distributed
from utils.device import autocast_context, check_compiler
from utils.errors import UserError, deferring_ctrl_c, one_line
from utils.host_memory import init_loader_worker
from utils.io import check_writable, write_text_atomic
from utils.loader_failures import loader_failure

# Training sets per stage, as "dataset:samples per epoch" (README, 'Training').
STAGE_SOURCES = {1: "ytvos:512", 2: "duts:384,davis_train:128"}
STAGE_EPOCHS = {1: 4000, 2: 2000}
DEFAULT_BACKBONE, DEFAULT_SIZE = "mitb2", 512
LOG_EVERY = 20  # steps between progress-bar updates (each reads the running figures from the device once)
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl")  # an output folder holding one of these holds a run
# A resumed run must draw the same samples in the same global batches.
RESUME_MUST_MATCH = {"batch_size": "--batch-size", "seed": "--seed", "sources": "--datasets"}


def parse_sources(text: str) -> list[tuple[str, int]]:
    sources = []
    for part in text.split(","):
        name, _, samples = part.strip().partition(":")
        if name not in TRAINING_DATASETS:
            why = "unknown" if name not in DATASETS else f"{DATASETS[name].title} is a test set" + (
                ", and picks best.pth" if name == VALIDATION_DATASET else "")
            raise UserError(f"--datasets: {name!r} is not a training set ({why}); expected NAME:SAMPLES with NAME "
                            f"in {', '.join(TRAINING_DATASETS)}")
        if not samples.isdigit() or int(samples) < 1:
            raise UserError(f"--datasets: {part.strip()!r} needs a sample count, for example {name}:128")
        sources.append((name, int(samples)))
    return sources


class StopFlag:
    """Set by SIGINT/SIGTERM while installed; the loop asks after each step and saves before leaving."""

    def __init__(self):
        self.signalled = False
        self._previous = {}

    def should_stop(self) -> bool:
        return self.signalled

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.signalled = True


def rng_state() -> dict:
    """Global RNG states. Sampling and flips do not use them (they are seeded per sample); they are kept so
    that anything drawing from the global generators continues the same stream after a resume."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class EpochFigures:
    """Loss and pooled foreground IoU of the steps so far, kept on the device: reading them is the only
    synchronisation, done once per LOG_EVERY steps and per epoch rather than every step."""

    def __init__(self, ctx: distributed.Context):
        self.ctx = ctx
        self.sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, intersection, union
        self.steps = 0

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = class_masks(logits).bool(), target.bool()
        self.sums += torch.stack([loss.detach().double(), (pred & target).sum().double(),
                                  (pred | target).sum().double()])
        self.steps += 1

    def read(self) -> dict:
        """Over the whole global batches: every process's share (under torchrun all ranks call this together)."""
        if not self.steps:
            return {"loss": None, "iou": None}
        loss, inter, union = distributed.sum_over_ranks(self.sums, self.ctx).tolist()
        # Each process's loss is the mean over its equal share of a global batch; their mean is the batch's.
        return {"loss": loss / (self.steps * self.ctx.world_size), "iou": 1.0 if union == 0 else inter / union}


def train(args, stop: StopFlag | None = None) -> Path:
    """Run (or resume) one training stage; returns the output folder."""
    ctx = distributed.init(args.device)
    try:
        with stop or StopFlag() as flag:
            run = TrainingRun(args, ctx, flag)
            run.train()
            return run.output
    finally:
        distributed.shutdown(ctx)


class TrainingRun:
    """One stage of training: set up (data, model, optimizer, resume), then the loop."""

    def __init__(self, args, ctx: distributed.Context, stop: StopFlag):
        self.args, self.ctx, self.stop = args, ctx, stop
        self.output = Path(args.output)
        if args.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {args.batch_size} must be divisible by the {ctx.world_size} processes")
        self.epochs = args.epochs or STAGE_EPOCHS[args.stage]
        sources = parse_sources(args.datasets or STAGE_SOURCES[args.stage])
        self.sources_text = ",".join(f"{n}:{k}" for n, k in sources)  # recorded, so a resume can check it
        self.sources = [Source(DATASETS[n], scan(DATASETS[n], dataset_root(DATASETS[n], args.data_root,
                                                                           args.dataset_roots.get(n))), k)
                        for n, k in sources]
        self.val_videos = None
        if args.val_every > 0:
            spec = DATASETS[VALIDATION_DATASET]
            self.val_videos = scan(spec, dataset_root(spec, args.data_root, args.dataset_roots.get(VALIDATION_DATASET)))
        state = self._resume_state()
        torch.manual_seed(args.seed)
        self.model = self._build_model(state).to(ctx.device)
        self.net = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                           else None) if ctx.distributed else self.model
        if args.compile:
            # Static shapes: every batch but an epoch's partial last one has the same size, so it compiles
            # once (twice with a partial batch). Checkpoints keep the plain module's names (self.model).
            check_compiler(ctx.device)
            self.net = torch.compile(self.net, dynamic=False)
        # Fused Adam: one kernel for all parameters on a GPU; PyTorch's default (foreach) on a CPU.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=0.0,
                                          fused=ctx.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and ctx.device.type == "cuda")
        self.start_epoch, self.start_step, self.best = 0, 0, float("-inf")
        if state is not None:
            self._restore(state)
        self.data = TrainingFrames(self.sources, size=self.model.size, seed=args.seed)
        self.batches = GlobalBatches(len(self.data), args.batch_size, args.seed, ctx)

    def _resume_state(self) -> dict | None:
        """The checkpoint to continue, checked against this run; or None for a fresh run in an unused folder."""
        args = self.args
        if not args.resume:
            self._claim_output()
            return None
        path = self.output / "last.pth" if args.resume == "last" else Path(args.resume)
        if not path.is_file():
            raise UserError(f"--resume: no checkpoint at {path} (expected last.pth of an earlier run in --output)")
        state = read_project_checkpoint(path, training=True)
        saved = state["args"]
        before = {"batch_size": saved["batch_size"], "seed": saved["seed"], "sources": saved.get("sources")}
        now = {"batch_size": args.batch_size, "seed": args.seed, "sources": self.sources_text}
        for key, flag in RESUME_MUST_MATCH.items():
            if before[key] is not None and before[key] != now[key]:
                raise UserError(f"{path} was trained with {flag} {before[key]}, this run asks for {now[key]}; "
                                "a resumed run must draw the same batches (drop the flag, or start a new --output)")
        self.resume_path = path
        return state

    def _claim_output(self) -> None:
        """Every rank checks (so all stop together); rank 0 clears an earlier run that --overwrite replaces."""
        found = [name for name in RUN_FILES if (self.output / name).exists()]
        if found and not self.args.overwrite:
            raise UserError(f"{self.output} holds an earlier run ({found[0]}); continue it with --resume, choose "
                            "another --output, or start afresh there with --overwrite")
        if self.ctx.is_main:
            check_writable(self.output)
            for path in [self.output / name for name in RUN_FILES] + sorted(self.output.glob("epoch_*.pth")):
                path.unlink(missing_ok=True)

    def _build_model(self, state: dict | None) -> DepthFlow:
        args = self.args
        if state is not None:
            config = state["config"]
            asked = {"backbone": args.backbone or config["backbone"], "size": args.size or config["size"]}
            if asked != {"backbone": config["backbone"], "size": config["size"]}:
                raise UserError(f"{self.resume_path} holds a {config['backbone']} model at --size {config['size']}; "
                                f"this run asks for {asked['backbone']} at --size {asked['size']}")
            model = DepthFlow(**config)
            model.load_state_dict(state["model"])
            return model
        if args.checkpoint:
            return load_depthflow(args.checkpoint, backbone=args.backbone, size=args.size)
        model = DepthFlow(args.backbone or DEFAULT_BACKBONE, size=args.size or DEFAULT_SIZE)
        if args.pretrained:
            load_pretrained_mit(model, args.pretrained)
        elif self.ctx.is_main:
            print("warning: no --pretrained ImageNet MiT weights; the encoders start from random initialisation")
        return model

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step, self.best = state["epoch"], state["step"], state["best"]
        set_rng_state(state["rng"])
        if self.ctx.is_main:
            self._trim_log(self.start_epoch)
            print(f"resuming from {self.resume_path}: epoch {self.start_epoch + 1}, step {self.start_step}")

    def _trim_log(self, epochs_done: int) -> None:
        """Drop log lines of epochs after the checkpoint: they are about to be trained again."""
        log = self.output / "metrics.jsonl"
        if log.is_file():
            kept = [line for line in log.read_text().splitlines() if _logged_epoch(line) <= epochs_done]
            write_text_atomic("".join(line + "\n" for line in kept), log)

    def save(self, name: str, epoch: int, step: int) -> None:
        if self.ctx.is_main:
            args = {**_plain(vars(self.args)), "sources": self.sources_text}
            save_project_checkpoint(self.output / name, self.model, optimizer=self.optimizer.state_dict(),
                                    scaler=self.scaler.state_dict(), epoch=epoch, step=step, best=self.best,
                                    rng=rng_state(), args=args)

    def train(self) -> None:
        args, ctx = self.args, self.ctx
        loader = DataLoader(self.data, batch_sampler=self.batches.plan(self.start_epoch, self.start_step, self.epochs),
                            num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
                            prefetch_factor=4 if args.workers else None, worker_init_fn=init_loader_worker)
        with deferring_ctrl_c():
            batches = iter(loader)  # starts the loader processes
        for epoch in range(self.start_epoch, self.epochs):
            skip = self.start_step if epoch == self.start_epoch else 0
            stopped_at = self._epoch(epoch, batches, skip)
            if stopped_at is not None:
                self.save("last.pth", epoch, stopped_at)
                if ctx.is_main:
                    print(f"stopped: saved {self.output / 'last.pth'} at epoch {epoch + 1}, step {stopped_at}; "
                          "continue with --resume")
                return
            self._end_of_epoch(epoch)
        distributed.check_in_sync(self.model, ctx)

    def _epoch(self, epoch: int, batches, skip: int) -> int | None:
        """Train one epoch; returns the step at which a stop signal ended it, or None."""
        self.net.train()
        self.figures, self.epoch_start = EpochFigures(self.ctx), time.time()
        steps = self.batches.steps_per_epoch
        bar = tqdm(range(skip + 1, steps + 1), desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=None if self.ctx.is_main else True)
        done = skip
        for step in bar:
            batch = self._next_batch(batches, epoch, done)
            try:
                self._step(batch)
            except torch.OutOfMemoryError as err:
                self._save_after_failure(err, epoch, done)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UserError(f"--compile failed to compile the training step ({first}); drop --compile") from None
            done = step
            if step % LOG_EVERY == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.figures.read().items()})
            if distributed.any_rank(self.stop.should_stop(), self.ctx):
                return step
        return None

    def _next_batch(self, batches, epoch: int, done: int) -> dict:
        """The next batch; if any process fails to load its share (a corrupt file, a loader process killed for
        memory), all of them save and stop with that process's error, rather than the others waiting for it in
        the step's all-reduce."""
        try:
            batch, failure = next(batches), None
        except UserError as err:
            batch, failure = None, err
        except RuntimeError as err:  # a loader process died, or shared memory ran out
            batch, failure = None, loader_failure(err)
            if failure is None:
                raise
        if distributed.any_rank(failure is not None, self.ctx):
            message = distributed.first_message(failure and one_line(failure), self.ctx)
            self._save_after_failure(UserError(message), epoch, done, wait_for_all=True)
        return batch

    def _step(self, batch: dict) -> None:
        device = self.ctx.device
        image = frames_to_float(batch["image"].to(device, non_blocking=True))
        flow = frames_to_float(batch["flow"].to(device, non_blocking=True))
        target = batch["mask"].to(device, non_blocking=True).long()
        with autocast_context(device, self.args.amp):
            logits = self.net(image, flow)
            loss = F.cross_entropy(logits.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.figures.add(loss, logits, target)

    def _save_after_failure(self, err: Exception, epoch: int, done: int, wait_for_all: bool = False):
        """Keep the work up to the last finished step, then stop with one line saying how to continue.

        `wait_for_all`: every process is here, and none leaves before rank 0 has saved (torchrun stops the
        others as soon as one exits)."""
        self.save("last.pth", epoch, done)
        if wait_for_all:
            distributed.barrier(self.ctx)
        if isinstance(err, torch.OutOfMemoryError):
            per_process = self.args.batch_size // self.ctx.world_size
            what = (f"out of GPU memory at --batch-size {self.args.batch_size} ({per_process} a process) and --size "
                    f"{self.model.size}; lower --batch-size (README, 'Training', for the learning rate)")
        else:
            what = one_line(err)
        raise UserError(f"{what}; saved {self.output / 'last.pth'} at epoch {epoch + 1}, step {done}: continue "
                        "with --resume") from None

    def _end_of_epoch(self, epoch: int) -> None:
        args, ctx = self.args, self.ctx
        record = {"epoch": epoch + 1, **self.figures.read(), "lr": args.lr,
                  "seconds": round(time.time() - self.epoch_start, 2)}
        if self.val_videos is not None and (epoch + 1) % args.val_every == 0:
            options = InferenceOptions(ctx.device, batch_size=args.batch_size // ctx.world_size, workers=args.workers,
                                       amp=args.amp)
            result = evaluate_dataset(Segmenter(self.model, options), DATASETS[VALIDATION_DATASET],
                                      self.val_videos, progress=False, ctx=ctx)
            if ctx.is_main:
                record["davis_jf"] = result["metrics"]["J&F-Mean"]
                if record["davis_jf"] > self.best:
                    self.best = record["davis_jf"]
                    self.save("best.pth", epoch + 1, 0)
        if (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == self.epochs:
            self.save("last.pth", epoch + 1, 0)
        if args.save_every and (epoch + 1) % args.save_every == 0:
            self.save(f"epoch_{epoch + 1:05d}.pth", epoch + 1, 0)
        if ctx.is_main:
            with open(self.output / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line cut short by a kill counts as after every epoch (dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _plain(values: dict) -> dict:
    """Arguments as plain types, so the checkpoint stays loadable with weights_only=True."""
    return {k: v if isinstance(v, int | float | str | bool | type(None)) else str(v) for k, v in values.items()}
