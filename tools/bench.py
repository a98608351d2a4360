"""The speed check: the network alone against `--test` end to end, GPU masks against CPU masks, memory, and
training steps against whole epochs. On a GPU it is the one command to run, its GPU tests included.

    python -m tools.bench --device cuda                       # every part, about 6 minutes on one H100
    python -m tools.bench --device cpu --backbones mitb0 --frames 32

Parts, each with a time limit (--part-seconds), written to OUT/bench.json and OUT/bench.md after each part,
so a run cut short still reports what it measured:
- inference, per backbone and precision (float32, TF32 by default on a GPU, and --amp): the network's
  frames/s on batches already on the device (resize, network, resize back, class decision; no copy from
  the host in the loop), beside `--test`'s frames/s on toy 854x480 JPEG videos (loading, scoring and PNG
  writing included, compilation and warm-up excluded); their ratio; peak device memory and page-locked
  host memory;
- agreement (GPU only): the GPU masks against the CPU's float32 masks on the same frames;
- training, per backbone: a step (forward, backward, Adam) on a batch already on the device, against the
  real loop's epoch time per step, and their ratio, the share of the epoch the device is busy;
- GPU tests (GPU only): tests/test_gpu.py, its summary line.
"""

import json
import os
import platform
import shutil
import subprocess
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
from transforms import to_float
from utils.device import autocast_context, configure, default_workers, resolve_device
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else ""
    return f"{model}, {os.cpu_count()} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(device: torch.device, amp: str, compile_model: bool) -> list[tuple[str, dict]]:
    rows = [("float32" if device.type == "cpu" else "float32 (TF32)", {})]
    if device.type == "cuda" and amp != "off":
        rows.append((amp, {"amp": amp}))
    if compile_model:
        rows += [(f"{name} + compile", {**opts, "compile": True}) for name, opts in rows]
    return rows


def memory(device: torch.device) -> dict:
    """Peak device memory since the last reset, and page-locked host memory held by torch's host allocator."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "pinned_host_mib": stats.get("reserved_bytes.peak", stats.get("allocated_bytes.peak", 0)) / 2**20}


def network_fps(segmenter: Segmenter, batch: int, frame_size, seconds: float) -> tuple[float, np.ndarray]:
    """Frames/s of the engine's device work on float frames already on the device (no host copy in the loop),
    timed for about `seconds`; and the masks of the last batch."""
    device, gen = segmenter.device, torch.Generator().manual_seed(0)
    image, flow = (to_float(torch.randint(0, 256, (batch, 3, *frame_size), generator=gen, dtype=torch.uint8)
                            .to(device)) for _ in range(2))

    def step():
        return class_masks(segmenter.logits(image, flow, frame_size))

    with torch.inference_mode():
        for _ in range(2):
            masks = step()
        sync(device)
        start, frames = time.perf_counter(), 0
        while time.perf_counter() - start < seconds or frames == 0:
            masks = step()
            frames += batch
            if frames % (4 * batch) == 0:
                sync(device)
        sync(device)
    return frames / (time.perf_counter() - start), masks.cpu().numpy()


def test_fps(segmenter: Segmenter, videos, out: Path) -> float:
    """End-to-end frames/s of `--test`'s loop (evaluator.evaluate_dataset), after one warm-up video."""
    spec = DATASETS["davis"]
    evaluate_dataset(segmenter, spec, videos[:1], out_dir=out, progress=False)  # compiles, tunes, starts loaders
    start = time.perf_counter()
    result = evaluate_dataset(segmenter, spec, videos, out_dir=out, progress=False)
    return result["speed"]["frames"] / (time.perf_counter() - start)


def bench_inference(backbone: str, args, device, videos, root: Path) -> list[dict]:
    rows, reference = [], None
    base = DepthFlow(backbone, size=args.size).eval()
    for name, opts in variants(device, args.amp, args.compile):
        model = DepthFlow(backbone, size=args.size)
        model.load_state_dict(base.state_dict())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        segmenter = Segmenter(model, InferenceOptions(device, batch_size=args.batch, workers=args.workers, **opts))
        net_fps, masks = network_fps(segmenter, args.batch, args.frame_size, args.part_seconds / 4)
        reference = masks if reference is None else reference
        e2e = test_fps(segmenter, videos, root / "masks" / name)
        union = np.count_nonzero(masks | reference)
        rows.append({"backbone": backbone, "variant": name, "batch": args.batch, "network_fps": net_fps,
                     "test_fps": e2e, "ratio": e2e / net_fps,
                     "mask_iou_vs_float32": 1.0 if union == 0 else np.count_nonzero(masks & reference) / union,
                     **memory(device)})
        print(f"  {backbone} {name}: network {net_fps:.1f} frames/s, --test {e2e:.1f} frames/s", flush=True)
    return rows


def agreement(backbone: str, args, device, videos) -> dict:
    """The GPU's masks (default precision, and --amp) against the CPU's float32 masks on the same frames."""
    model = DepthFlow(backbone, size=args.size).eval()
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)  # margins like a trained network's: fewer near-ties
    few = [type(v)(v.name, v.frames[:args.agreement_frames], v.group) for v in videos[:1]]
    cpu = [f.mask for f in Segmenter(model, InferenceOptions(torch.device("cpu"), batch_size=1)).frames(few,
                                                                                                       progress=False)]
    result = {"backbone": backbone, "frames": len(cpu)}
    for name, opts in variants(device, args.amp, False):
        gpu = [f.mask for f in Segmenter(model, InferenceOptions(device, batch_size=args.batch, **opts)).frames(
            few, progress=False)]
        same = np.mean([np.mean(a == b) for a, b in zip(cpu, gpu)])
        result[name] = {"pixels_agreeing": float(same), "iou": float(
            sum(np.count_nonzero(a & b) for a, b in zip(cpu, gpu)) / max(1, sum(np.count_nonzero(a | b)
                                                                                for a, b in zip(cpu, gpu))))}
    return result


def step_seconds(backbone: str, args, device) -> float:
    """Seconds per training step (forward, backward, Adam) on a batch already on the device."""
    batch, size = args.train_batch, args.size
    model = DepthFlow(backbone, size=size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    image, flow = torch.rand(2, batch, 3, size, size, device=device)
    target = (torch.rand(batch, size, size, device=device) > 0.7).long()

    def step():
        with autocast_context(device, args.amp):
            loss = cross_entropy(model.forward_square(image, flow), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    sync(device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.part_seconds / 4 or steps == 0:
        step()
        steps += 1
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_training(backbone: str, args, device, data_root: Path, out: Path) -> dict:
    """Step time on a device-resident batch, and the real loop's epoch time per step (with its loader)."""
    from recipe import Recipe
    from trainer import RunSettings, train
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
    print(f"  {backbone}: step {step_s:.3f} s on the device, {epoch_s:.3f} s a step in an epoch", flush=True)
    return {"backbone": backbone, "batch": batch, "size": args.size, "step_s": step_s, "epoch_s_per_step": epoch_s,
            "busy": step_s / epoch_s}


def gpu_tests(seconds: float) -> dict:
    """tests/test_gpu.py in a process of its own, cut at `seconds`."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                              cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, seconds))
    except subprocess.TimeoutExpired:
        return {"summary": f"cut at {seconds:.0f} s", "returncode": None}
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return {"summary": lines[-1] if lines else proc.stderr.strip()[-300:], "returncode": proc.returncode,
            "failures": [line for line in lines if line.startswith("FAILED")]}


def markdown(report: dict) -> str:
    lines = [f"{report['device_name']}; torch {report['torch']}; {report['when']}; `{report['command']}`", ""]
    if report["inference"]:
        lines += ["| backbone | variant | batch | network frames/s | `--test` frames/s | `--test` / network | "
                  "mask IoU vs float32 | peak GPU MiB | pinned host MiB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['variant']} | {r['batch']} | {r['network_fps']:.1f} | {r['test_fps']:.1f} | "
                  f"{100 * r['ratio']:.0f}% | {r['mask_iou_vs_float32']:.6f} | {r.get('peak_gpu_mib', 0):.0f} | "
                  f"{r.get('pinned_host_mib', 0):.0f} |" for r in report["inference"]]
    for a in report["agreement"]:
        shares = [f"{k} {v['pixels_agreeing']:.5f} of pixels, IoU {v['iou']:.5f}" for k, v in a.items()
                  if isinstance(v, dict)]
        lines += ["", f"GPU vs CPU masks, {a['backbone']}, {a['frames']} frames: " + "; ".join(shares)]
    if report["training"]:
        lines += ["", "| backbone | batch | size | step (s) | epoch per step (s) | device busy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['batch']} | {r['size']} | {r['step_s']:.3f} | "
                  f"{r['epoch_s_per_step']:.3f} | {100 * r['busy']:.0f}% |" for r in report["training"]]
    if report.get("gpu_tests"):
        lines += ["", f"tests/test_gpu.py: {report['gpu_tests']['summary']}"]
    if report["cut"]:
        lines += ["", f"not measured (time limit): {', '.join(report['cut'])}"]
    return "\n".join(lines) + "\n"


def _frame_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--frame-size {text!r}: expected HxW, for example 480x854") from None
    return h, w


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", default="mitb0,mitb2")
    parser.add_argument("--batch", type=int, default=8, help="frames per forward pass (default 8)")
    parser.add_argument("--train-batch", type=int, default=16, help="training batch (default 16, the recipe's)")
    parser.add_argument("--size", type=int, default=512, help="internal size (default 512)")
    parser.add_argument("--frames", type=int, default=240, help="frames in the `--test` measurement (default 240)")
    parser.add_argument("--frame-size", default="480x854", help="HxW of the frames (default 480x854, DAVIS')")
    parser.add_argument("--train-steps", type=int, default=16, help="steps per training epoch (default 16)")
    parser.add_argument("--agreement-frames", type=int, default=4, help="frames compared on GPU and CPU")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"loader processes (default: this process's share of the cores, up to 8; here "
                             f"{default_workers()})")
    parser.add_argument("--part-seconds", type=float, default=60, help="time limit of each part (default 60)")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--no-tests", action="store_true", help="skip tests/test_gpu.py")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    args.frame_size = _frame_size(args.frame_size)
    device = resolve_device(args.device)
    configure(device)
    out = Path(args.out)
    report = {"device_name": device_name(device), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"),
              "command": "python -m tools.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "inference": [], "agreement": [], "training": [], "gpu_tests": None, "cut": []}

    def save():
        write_json_atomic(report, out / "bench.json")
        write_text_atomic(markdown(report), out / "bench.md")

    def part(name: str, run) -> None:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        try:
            run()
        except torch.OutOfMemoryError:
            report["cut"].append(f"{name} (out of memory)")
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        save()

    root = Path(tempfile.mkdtemp(prefix="depthflow-bench-"))
    try:
        from tools.toydata import generate

        count = max(2, args.frames // 60)
        generate(root / "data", size=args.frame_size, videos=count, frames=max(3, args.frames // count),
                 datasets=("davis", "davis_train"))
        davis = scan(DATASETS["davis"], root / "data/DAVIS")
        for backbone in args.backbones.split(","):
            part(f"inference {backbone}", lambda b=backbone: report["inference"].extend(
                bench_inference(b, args, device, davis, root)))
            if device.type == "cuda":
                part(f"agreement {backbone}", lambda b=backbone: report["agreement"].append(
                    agreement(b, args, device, davis)))
            if not args.no_training:
                part(f"training {backbone}", lambda b=backbone: report["training"].append(
                    bench_training(b, args, device, root / "data", root / f"train-{b}")))
        if device.type == "cuda" and not args.no_tests:
            part("GPU tests", lambda: report.update(gpu_tests=gpu_tests(4 * args.part_seconds)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
