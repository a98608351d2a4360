"""Speed of DepthFlow on one device: the network alone against `--test` end to end, and training steps
against whole epochs. Writes bench.json and bench.md (one table each) under --out.

    python -m tools.bench --device cuda [--backbones mitb0,mitb2] [--batch 8] [--amp bf16] [--compile]
    python -m tools.bench --device cpu --backbones mitb0 --frames 32

Inference, per backbone and variant, at the same batch size:
- network frames/s: `DepthFlow.forward` and the class decision on batches already on the device (854x480
  frames, resized to the internal size and back), the upper bound of what `--test` can reach;
- `--test` frames/s: the engine (inference.Segmenter) scoring and writing masks of toy 854x480 JPEG videos,
  loading included, compilation and warm-up excluded; their ratio is the share of the device's speed
  that reaches the user;
- the mask agreement (IoU) with float32.
Training, per backbone: the time of a step (forward, backward, Adam) on a batch already on the device,
against an epoch's time per step through the real loop (loading, transfers, logging), and their ratio,
the share of the epoch the device is busy.
"""

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dataset import DATASETS, scan
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.depthflow import class_masks
from model.losses import cross_entropy
from model.winograd import winograd_available
from utils.device import autocast_context, configure, resolve_device
from utils.errors import ArgumentParser, cli_entry
from utils.io import write_text_atomic


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {os.cpu_count()} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(device: torch.device, amp: str, compile_model: bool) -> list[tuple[str, dict]]:
    rows = [("float32" if device.type == "cpu" else "float32 (TF32)", {})]
    if device.type == "cpu" and winograd_available():
        rows.append(("winograd", {"winograd": True}))
    if device.type == "cuda" and amp != "off":
        rows.append((amp, {"amp": amp}))
    if compile_model:
        rows += [(f"{name} + compile", {**opts, "compile": True}) for name, opts in rows]
    return rows


def network_fps(segmenter: Segmenter, batch: int, frame_size, iters: int) -> tuple[float, np.ndarray]:
    """Frames/s of the engine's device work on batches already on the device; and the masks of one batch."""
    device = segmenter.device
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 2, *frame_size, 3, generator=gen) * 255).to(torch.uint8)

    def step():
        image, flow = segmenter._to_device(pixels.to(device))
        with torch.inference_mode(), autocast_context(device, segmenter.options.amp):
            logits = segmenter.network(image, flow)
        return class_masks(torch.nn.functional.interpolate(logits.float(), size=frame_size, mode="bicubic"))

    with torch.inference_mode():
        for _ in range(2):
            masks = step()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
    return batch * iters / (time.perf_counter() - start), masks.cpu().numpy()


def test_fps(segmenter: Segmenter, videos, out: Path) -> float:
    """End-to-end frames/s of `--test`'s loop (evaluator.evaluate_dataset), after one warm-up video."""
    spec = DATASETS["davis"]
    evaluate_dataset(segmenter, spec, videos[:1], out_dir=out, progress=False)  # compiles, tunes, starts loaders
    start = time.perf_counter()
    result = evaluate_dataset(segmenter, spec, videos, out_dir=out, progress=False)
    return result["speed"]["frames"] / (time.perf_counter() - start)


def bench_inference(backbone, args, device, videos, root) -> list[dict]:
    rows, reference = [], None
    base = DepthFlow(backbone, size=args.size).eval()
    for name, opts in variants(device, args.amp, args.compile):
        model = DepthFlow(backbone, size=args.size)
        model.load_state_dict(base.state_dict())
        options = InferenceOptions(device, batch_size=args.batch, workers=args.workers, **opts)
        segmenter = Segmenter(model, options)
        net_fps, masks = network_fps(segmenter, args.batch, args.frame_size, args.iters)
        reference = masks if reference is None else reference
        e2e = test_fps(segmenter, videos, root / "masks" / name)
        union = np.count_nonzero(masks | reference)
        rows.append({"backbone": backbone, "variant": name, "batch": args.batch, "network_fps": net_fps,
                     "test_fps": e2e, "ratio": e2e / net_fps,
                     "mask_iou_vs_float32": 1.0 if union == 0 else np.count_nonzero(masks & reference) / union})
    return rows


def step_seconds(backbone, args, device) -> float:
    """Seconds per training step (forward, backward, Adam) on a batch already on the device."""
    batch, size = args.train_batch, args.size
    model = DepthFlow(backbone, size=size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    image, flow = torch.rand(2, batch, 3, size, size, device=device)
    target = (torch.rand(batch, size, size, device=device) > 0.7).long()

    def step():
        with autocast_context(device, args.amp):
            loss = cross_entropy(model(image, flow), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / args.iters


def bench_training(backbone, args, device, data_root: Path, out: Path) -> dict:
    """Step time on a device-resident batch, and the real loop's epoch time per step (with its loader)."""
    from trainer import Recipe, RunSettings, train
    from utils.interrupts import StopRequests

    step_s = step_seconds(backbone, args, device)
    steps, batch = args.train_steps, args.train_batch
    recipe = Recipe(stage=2, sources=(("davis_train", steps * batch),), epochs=2, batch_size=batch, size=args.size,
                    backbone=backbone, selection="last")
    settings = RunSettings(output=out, data_root=str(data_root), dataset_roots={}, device_name=str(device),
                           workers=args.workers, amp=args.amp, compile=args.compile, checkpoint_every=1000,
                           save_every=0)
    train(recipe, settings, StopRequests())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_s = epochs[-1]["seconds"] / steps  # the second epoch: loader processes and compilation are warm
    return {"backbone": backbone, "batch": batch, "size": args.size, "step_s": step_s, "epoch_s_per_step": epoch_s,
            "busy": step_s / epoch_s}


def markdown(report: dict) -> str:
    lines = [f"{report['device_name']}; torch {report['torch']}; {report['when']}; `{report['command']}`", "",
             "| backbone | variant | batch | network frames/s | `--test` frames/s | `--test` / network | "
             "mask IoU vs float32 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['variant']} | {r['batch']} | {r['network_fps']:.1f} | {r['test_fps']:.1f} | "
              f"{100 * r['ratio']:.0f}% | {r['mask_iou_vs_float32']:.6f} |" for r in report["inference"]]
    if report["training"]:
        lines += ["", "| backbone | batch | size | step (s) | epoch per step (s) | device busy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['batch']} | {r['size']} | {r['step_s']:.3f} | "
                  f"{r['epoch_s_per_step']:.3f} | {100 * r['busy']:.0f}% |" for r in report["training"]]
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", default="mitb0,mitb2")
    parser.add_argument("--batch", type=int, default=8, help="frames per forward pass (default 8)")
    parser.add_argument("--train-batch", type=int, default=16, help="training batch (default 16, the recipe's)")
    parser.add_argument("--size", type=int, default=512, help="internal size (default 512)")
    parser.add_argument("--frames", type=int, default=480, help="frames in the `--test` measurement (default 480)")
    parser.add_argument("--frame-size", default="480x854", help="HxW of the frames (default 480x854, DAVIS')")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations of the network-only loops")
    parser.add_argument("--train-steps", type=int, default=16, help="steps per training epoch (default 16)")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    args.frame_size = tuple(int(v) for v in args.frame_size.split("x"))
    device = resolve_device(args.device)
    configure(device)
    root = Path(tempfile.mkdtemp(prefix="depthflow-bench-"))
    try:
        from tools.toydata import generate

        videos = max(2, args.frames // 60)
        generate(root / "data", size=args.frame_size, videos=videos, frames=args.frames // videos,
                 datasets=("davis", "davis_train"))
        davis = scan(DATASETS["davis"], root / "data/DAVIS")
        report = {"device_name": device_name(device), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"),
                  "command": "python -m tools.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "inference": [], "training": []}
        for backbone in args.backbones.split(","):
            report["inference"] += bench_inference(backbone, args, device, davis, root)
            if not args.no_training:
                report["training"].append(bench_training(backbone, args, device, root / "data",
                                                         root / f"train-{backbone}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    write_text_atomic(json.dumps(report, indent=2) + "\n", out / "bench.json")
    write_text_atomic(markdown(report), out / "bench.md")
    print(markdown(report))


if __name__ == "__main__":
    main()
