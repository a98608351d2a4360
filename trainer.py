"""Training with the reference recipe (REFERENCE.md section 2), on one device or under torchrun.

Stage 1: YouTube-VOS 2018, 512 samples per epoch, 4000 epochs. Stage 2 continues from stage 1 with a fresh
Adam: DUTSv2 (384 samples) + DAVIS 2016 train (128) per epoch, 2000 epochs. Adam lr 1e-5, batch 16,
cross-entropy on two-class logits at the internal resolution. DAVIS 2016 val J&F every --val-every epochs
keeps the best checkpoint.

Everything needed to continue is in OUTPUT/last.pth (written atomically): model, optimizer, AMP scaler,
the epoch and step to continue from, the best score and RNG states. Samples are a pure function of
(seed, epoch, index), so a resumed run replays exactly what the stopped run would have done.
"""

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dataset import DATASETS, TRAINING_DATASETS, VALIDATION_DATASET, Source, TrainingFrames, dataset_root, scan
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.checkpoints import load_depthflow, load_pretrained_mit, read_project_checkpoint, save_project_checkpoint
from utils import distributed
from utils.device import autocast_context
from utils.errors import UserError
from utils.io import check_writable

# Training sets per stage, as "dataset:samples per epoch" (REFERENCE.md section 2).
STAGE_SOURCES = {1: "ytvos:512", 2: "duts:384,davis_train:128"}
STAGE_EPOCHS = {1: 4000, 2: 2000}
DEFAULT_BACKBONE, DEFAULT_SIZE = "mitb2", 512


def parse_sources(text: str) -> list[tuple[str, int]]:
    sources = []
    for part in text.split(","):
        name, _, samples = part.strip().partition(":")
        if name not in TRAINING_DATASETS:
            why = (f"{DATASETS[name].title} is a test set" + (", and picks best.pth" if name == VALIDATION_DATASET
                                                                 else "")) if name in DATASETS else "unknown"
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


def foreground_iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits.argmax(1).bool()
    target = target.bool()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


def train(args, stop: StopFlag | None = None) -> Path:
    """Run (or resume) one training stage; returns the output folder."""
    ctx = distributed.init(args.device)
    try:
        with stop or StopFlag() as flag:
            return _train(args, ctx, flag)
    finally:
        distributed.shutdown(ctx)


def _train(args, ctx, stop) -> Path:
    output = Path(args.output)
    if ctx.is_main:
        check_writable(output)
    overrides = args.dataset_roots
    sources = [Source(DATASETS[name], scan(DATASETS[name], dataset_root(DATASETS[name], args.data_root,
                                                                          overrides.get(name))), samples)
               for name, samples in parse_sources(args.datasets or STAGE_SOURCES[args.stage])]
    val_videos = None
    if args.val_every > 0:
        spec = DATASETS[VALIDATION_DATASET]
        val_videos = scan(spec, dataset_root(spec, args.data_root, overrides.get(VALIDATION_DATASET)))
    if args.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {ctx.world_size} processes")
    epochs = args.epochs or STAGE_EPOCHS[args.stage]

    torch.manual_seed(args.seed)
    resume = _resume_path(args, output)
    state = read_project_checkpoint(resume) if resume else None
    if state is not None:
        config = state["config"]
        asked = {"backbone": args.backbone or config["backbone"], "size": args.size or config["size"]}
        if asked != {"backbone": config["backbone"], "size": config["size"]}:
            raise UserError(f"{resume} holds a {config['backbone']} model at --size {config['size']}; this run asks "
                            f"for {asked['backbone']} at --size {asked['size']}")
        model = DepthFlow(**config)
        model.load_state_dict(state["model"])
    elif args.checkpoint:
        model = load_depthflow(args.checkpoint, backbone=args.backbone, size=args.size)
    else:
        model = DepthFlow(args.backbone or DEFAULT_BACKBONE, size=args.size or DEFAULT_SIZE)
        if args.pretrained:
            load_pretrained_mit(model, args.pretrained)
        elif ctx.is_main:
            print("warning: no --pretrained ImageNet MiT weights; the encoders start from random initialisation")
    model.to(ctx.device)
    net = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and ctx.device.type == "cuda")
    start_epoch, start_step, best = 0, 0, float("-inf")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, best = state["epoch"], state["step"], state["best"]
        set_rng_state(state["rng"])
        if ctx.is_main:
            print(f"resuming from {resume}: epoch {start_epoch + 1}, step {start_step}")

    data = TrainingFrames(sources, size=model.size, seed=args.seed)
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    per_rank = args.batch_size // ctx.world_size

    def save(path, epoch, step):
        if ctx.is_main:
            save_project_checkpoint(path, model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                    epoch=epoch, step=step, best=best, rng=rng_state(), args=_plain(vars(args)))

    for epoch in range(start_epoch, epochs):
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[i:i + per_rank] for i in range(0, len(indices), per_rank)]
        skip = start_step if epoch == start_epoch else 0
        loader = DataLoader(data, batch_sampler=batches[skip:], num_workers=args.workers,
                            pin_memory=ctx.device.type == "cuda")
        net.train()
        losses, ious, t0 = [], [], time.time()
        bar = tqdm(loader, total=len(batches) - skip, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=None if ctx.is_main else True)
        for step, batch in enumerate(bar, start=skip + 1):
            image = batch["image"].to(ctx.device, non_blocking=True)
            flow = batch["flow"].to(ctx.device, non_blocking=True)
            target = batch["mask"].to(ctx.device, non_blocking=True)
            with autocast_context(ctx.device, args.amp):
                logits = net(image, flow)
                loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            ious.append(foreground_iou(logits.detach(), target))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", iou=f"{np.mean(ious):.3f}")
            if distributed.any_rank(stop.should_stop(), ctx):
                save(output / "last.pth", epoch, step)
                if ctx.is_main:
                    print(f"stopped: saved {output / 'last.pth'} at epoch {epoch + 1}, step {step}; "
                          f"continue with --resume")
                return output
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                  "iou": float(np.mean(ious)) if ious else None, "lr": args.lr, "seconds": round(time.time() - t0, 2)}
        if val_videos is not None and (epoch + 1) % args.val_every == 0:
            if ctx.is_main:
                options = InferenceOptions(ctx.device, batch_size=per_rank, workers=args.workers, amp=args.amp)
                result = evaluate_dataset(Segmenter(model, options), DATASETS[VALIDATION_DATASET], val_videos,
                                          progress=False)
                record["davis_jf"] = result["metrics"]["J&F-Mean"]
                if record["davis_jf"] > best:
                    best = record["davis_jf"]
                    save(output / "best.pth", epoch + 1, 0)
            distributed.barrier(ctx)
        if (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == epochs:
            save(output / "last.pth", epoch + 1, 0)
        if args.save_every and (epoch + 1) % args.save_every == 0:
            save(output / f"epoch_{epoch + 1:05d}.pth", epoch + 1, 0)
        if ctx.is_main:
            with open(output / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    distributed.check_in_sync(model, ctx)
    return output


def _resume_path(args, output: Path) -> Path | None:
    if not args.resume:
        return None
    path = output / "last.pth" if args.resume == "last" else Path(args.resume)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (expected last.pth of an earlier run in --output)")
    return path


def _plain(values: dict) -> dict:
    """Arguments as plain types, so the checkpoint stays loadable with weights_only=True."""
    return {k: v if isinstance(v, int | float | str | bool | type(None)) else str(v) for k, v in values.items()}
