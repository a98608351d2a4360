"""Speed and memory of DepthFlow, written as JSON and a markdown table.

    python -m tools.bench [--device cpu|cuda] [--out bench_results] [--quick] [--checkpoint FILE]

Measures, on the chosen device:
- model forward frames/s for MiT-B0/B1/B2 at 512x512, batch 1 and batched, in float32, channels-last,
  bf16/fp16 autocast (GPU) and torch.compile (opt-in: --compile); each with its mask agreement to float32
  (mean IoU of the object masks) and, on GPU, peak device memory;
- a training step (forward, backward, Adam) per backbone;
- end-to-end `--test` frames/s on a toy video set, against a reference-style loop (the independent HF-based
  reference network of tools/reference_net.py, whole video in memory, one frame at a time, masks written
  in the loop, as the upstream code does) with the same weights, with peak host memory of each;
- FLOPs per frame, so throughput can be read against the device's peak.
--quick shrinks everything (MiT-B0, 64x64, few iterations) for the test suite.
"""

import contextlib
import copy
import json
import os
import platform
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import utils.io
from inference import InferenceOptions, Segmenter, prepare_model
from model import DepthFlow
from model.depthflow import class_masks
from model.winograd import winograd_available
from utils.device import resolve_device
from utils.errors import ArgumentParser, cli_entry
from utils.io import write_text_atomic
from utils.metrics import jaccard


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def forward_flops(model: DepthFlow, device) -> float:
    """FLOPs (2 x multiply-adds) of one frame's forward pass at the model's size."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, model.size, model.size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x, x)
    return float(counter.get_total_flops())


def variants(device, compile_model: bool):
    yield "float32", {}
    if device.type == "cpu":  # channels-last is refused on a GPU, where it measured slower
        yield "channels_last", {"channels_last": True}
    if device.type == "cpu" and winograd_available():
        yield "winograd", {"winograd": True}
        yield "winograd + channels_last", {"winograd": True, "channels_last": True}
    if device.type == "cuda":
        yield "bf16 autocast", {"amp": torch.bfloat16}
        yield "fp16 autocast", {"amp": torch.float16}
    if compile_model:
        yield "torch.compile", {"compile": True}
        if device.type == "cuda":
            yield "bf16 + torch.compile", {"amp": torch.bfloat16, "compile": True}


def bench_forward(backbone, size, batch_sizes, device, compile_model, warmup, iters, state=None):
    rows = []
    base = DepthFlow(backbone, size=size)
    if state is not None:
        base.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    frames = {b: (torch.rand(b, 3, 480, 854, generator=gen).to(device),
                  torch.rand(b, 3, 480, 854, generator=gen).to(device)) for b in batch_sizes}
    reference = {}
    for name, opts in variants(device, compile_model):
        options = InferenceOptions(device, channels_last=opts.get("channels_last", False),
                                   winograd=opts.get("winograd", False))
        run = prepare_model(copy.deepcopy(base), options)
        if opts.get("compile"):
            run = torch.compile(run, dynamic=False)
        for b in batch_sizes:
            image, flow = frames[b]
            if opts.get("channels_last"):
                image, flow = (t.contiguous(memory_format=torch.channels_last) for t in (image, flow))

            def step(run=run, image=image, flow=flow, opts=opts):
                with torch.inference_mode(), torch.autocast(device.type, dtype=opts.get("amp", torch.float32),
                                                            enabled="amp" in opts):
                    return class_masks(run(image, flow))

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(step, device, warmup, iters)
            masks = step().cpu().numpy()
            reference.setdefault(b, masks)
            row = {"backbone": backbone, "variant": name, "batch": b, "frames_per_s": b / seconds,
                   "mask_iou_vs_fp32": jaccard(masks, reference[b])}
            if device.type == "cuda":
                row["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    return rows, forward_flops(base.to(device), device)


def bench_train_step(backbone, size, batch, device, amp, warmup, iters):
    model = DepthFlow(backbone, size=size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    image = torch.rand(batch, 3, size, size, device=device)
    flow = torch.rand(batch, 3, size, size, device=device)
    target = (torch.rand(batch, size, size, device=device) > 0.7).long()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(image, flow).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, warmup, iters)


def end_to_end_variants(device):
    yield "float32", {}
    if device.type == "cpu" and winograd_available():
        yield "winograd", {"winograd": True}
    if device.type == "cuda":
        yield "bf16 autocast", {"amp": "bf16"}


def bench_end_to_end(device, size, quick, workers, backbone="mitb0", frames=None, batch_size=8):
    """Our streaming --test loop (plain, and with each fast path) vs a reference-style loop, same weights,
    same toy videos."""
    from dataset import DATASETS, scan
    from evaluator import evaluate_dataset
    from model.checkpoints import released_to_model
    from tools.toydata import generate

    try:
        from tools.reference_net import random_reference
    except ImportError:
        return None
    root = Path(tempfile.mkdtemp(prefix="depthflow-bench-"))
    try:
        frames = frames or (12 if quick else 60)
        generate(root / "toy", seed=0, size=(240, 427), videos=2, frames=frames, datasets=("davis",))
        videos = scan(DATASETS["davis"], root / "toy/DAVIS")
        n = sum(len(v.frames) for v in videos)
        reference = random_reference(backbone, size=size).to(device).eval()
        state, _ = released_to_model(reference.state_dict())
        t0 = time.perf_counter()
        ref_masks, ref_forward_s = reference_style_loop(reference, videos, root / "reference", device)
        ref_s = time.perf_counter() - t0
        report = {"backbone": backbone, "frames": n, "reference_frames_per_s": n / ref_s,
                  "forward_fps_reference": n / ref_forward_s, "ours": []}
        for name, opts in end_to_end_variants(device):
            ours = DepthFlow(backbone, size=size)
            ours.load_state_dict(state)
            options = InferenceOptions(device, batch_size=batch_size, workers=workers, amp=opts.get("amp", "off"),
                                       winograd=opts.get("winograd", False))
            out = root / name
            t0 = time.perf_counter()
            result = evaluate_dataset(Segmenter(ours, options), DATASETS["davis"], videos, out_dir=out,
                                      progress=False)
            ours_s = time.perf_counter() - t0
            masks = [np.asarray(Image.open(p)) for v in videos for p in sorted((out / v.key).glob("*.png"))]
            report["ours"].append({
                "variant": name, "frames_per_s": n / ours_s, "speedup": ref_s / ours_s,
                "forward_fps": result["speed"]["forward_fps"],
                "forward_speedup": result["speed"]["forward_fps"] * ref_forward_s / n,
                "pixel_agreement": float(np.mean([np.mean(a == b) for a, b in zip(masks, ref_masks)])),
                "mask_iou": float(np.mean([jaccard(a, b) for a, b in zip(masks, ref_masks)]))})
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def reference_style_loop(reference, videos, out_dir, device) -> tuple[list[np.ndarray], float]:
    """How the upstream evaluation runs: load the whole video, then one frame at a time, write PNGs inline.
    Returns the masks and the forward time."""
    from utils.io import read_image
    from utils.palette import save_palette_mask

    masks, forward_s = [], 0.0
    for video in videos:
        images = [torch.from_numpy(np.array(read_image(f.image, "RGB"))).permute(2, 0, 1).float() / 255
                  for f in video.frames]
        flows = [torch.from_numpy(np.array(read_image(f.flow, "RGB"))).permute(2, 0, 1).float() / 255
                 for f in video.frames]
        for frame, image, flow in zip(video.frames, images, flows):
            image, flow = image[None].to(device), flow[None].to(device)
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                mask = reference(image, flow).argmax(1)[0]
            mask = mask.to(torch.uint8).cpu().numpy()
            forward_s += time.perf_counter() - t0
            save_palette_mask(mask, out_dir / video.key / f"{frame.stem}.png")
            masks.append(mask)
    return masks, forward_s


class StandIn(torch.nn.Module):
    """A network of no cost with DepthFlow's interface, so that timing `--test` measures the host. It hands
    back masks of the frame's size, as a GPU does, saying "object" inside a centred ellipse (a mask like a
    real one, to write and score)."""

    def __init__(self):
        super().__init__()
        self._masks = {}

    def forward_internal(self, image, flow):
        h, w = image.shape[-2:]
        if (h, w) not in self._masks:
            y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            self._masks[h, w] = ((x / 0.6) ** 2 + (y / 0.5) ** 2 <= 1).to(torch.uint8)
        return self._masks[h, w].expand(len(image), -1, -1)


class HostOnlySegmenter(Segmenter):
    """The streaming loop with the device's share of the work left out: the loader's uint8 frames reach the
    stand-in without the reordering and float conversion a GPU does on its side, and the stand-in's masks
    leave as they are (a GPU resizes the logits and decides the classes). What remains is what a GPU run
    costs its host: decoding, collating, hand-overs, mask writing and scoring."""

    def __init__(self, options: InferenceOptions):
        super().__init__(StandIn(), options)

    def _to_device(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = pixels.permute(1, 0, 4, 2, 3)  # views, no copy: the stand-in reads only the shape
        return planes[0], planes[1]

    def _output(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return masks


@contextlib.contextmanager
def pil_decoding():
    """Frames decoded by PIL, as before the OpenCV path (utils.io.read_rgb), for a baseline in the same process:
    the decoder choice is a per-process setting, which loader processes inherit when they start."""
    saved, utils.io._fast_jpeg = utils.io._fast_jpeg, False
    try:
        yield
    finally:
        utils.io._fast_jpeg = saved


def bench_host_pipeline(device, workers: int, frames: int, batch_size: int) -> list[dict]:
    """`--test`'s whole loop on 854x480 toy DAVIS videos, with the stand-in network and with MiT-B0 at
    --size 32 (almost free): frames/s, and per core of the processes' share of the machine."""
    from dataset import DATASETS, scan
    from evaluator import evaluate_dataset
    from tools.toydata import generate
    from utils.device import available_cores

    root = Path(tempfile.mkdtemp(prefix="depthflow-host-"))
    try:
        generate(root / "toy", seed=0, size=(480, 854), videos=2, frames=frames // 2, datasets=("davis",))
        videos = scan(DATASETS["davis"], root / "toy/DAVIS")
        n, cores = sum(len(v.frames) for v in videos), available_cores()
        rows = []
        options = InferenceOptions(device, batch_size=batch_size, workers=workers)
        for name, segmenter, decoding in (
                ("stand-in network (host only), PIL decoding", HostOnlySegmenter(options), pil_decoding()),
                ("stand-in network (host only)", HostOnlySegmenter(options), contextlib.nullcontext()),
                ("mitb0 at --size 32", Segmenter(DepthFlow("mitb0", size=32), options), contextlib.nullcontext())):
            start, busy = time.perf_counter(), time.process_time()
            with decoding:
                evaluate_dataset(segmenter, DATASETS["davis"], videos, out_dir=root / "masks", progress=False)
            fps = n / (time.perf_counter() - start)
            # The main process's own CPU time (all its threads): on a GPU it is what launches the kernels, so
            # 1000 / this is the most frames a second one process could feed a device.
            main_ms = 1000 * (time.process_time() - busy) / n
            rows.append({"network": name, "frames": n, "workers": workers, "cores": cores, "frames_per_s": fps,
                         "frames_per_s_per_core": fps / cores, "main_process_ms_per_frame": main_ms})
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pil_training_sample(data, key) -> dict:
    """The sample `data[key]` would draw, made the way the reference recipe makes it: PIL decoding and PIL's
    bicubic resize (flips as ours), as the baseline for the loader's figures."""
    from transforms import resize_mask, to_uint8_tensor
    from utils.io import read_image
    from utils.palette import binarise, read_label_image

    epoch, i = key
    source = data.sources[0]
    rng = random.Random(f"{data.seed}/{epoch}/{i}")
    frame = rng.choice(rng.choice(source.annotated))
    size = data.transforms[0].size
    image, flow = (to_uint8_tensor(read_image(p, "RGB").resize((size, size), Image.BICUBIC))
                   for p in (frame.image, frame.flow))
    mask = torch.from_numpy(resize_mask(binarise(read_label_image(frame.mask), source.spec.mask_rule), size,
                                        "nearest").copy())
    if rng.random() < 0.5:
        image, flow, mask = image.flip(-1), flow.flip(-1), mask.flip(-1)
    if rng.random() < 0.5:
        image, flow, mask = image.flip(-2), flow.flip(-2), mask.flip(-2)
    return {"image": image, "flow": flow, "mask": mask}


def bench_training_loader(workers: int, samples: int, size: int, batch_size: int) -> dict:
    """Training samples/s from 854x480 JPEG frames at the recipe's internal size: one process making samples
    (decode, resize, flips), ours and the PIL baseline side by side; then the loader with its workers and
    the trainer's batches (adding collation and hand-over)."""
    from dataset import DATASETS, Source, TrainingFrames, scan
    from tools.toydata import generate
    from trainer import GlobalBatches
    from utils import distributed
    from utils.device import available_cores

    root = Path(tempfile.mkdtemp(prefix="depthflow-train-loader-"))
    try:
        generate(root / "toy", seed=0, size=(480, 854), videos=2, frames=12, datasets=("davis",))
        source = Source(DATASETS["davis_train"], scan(DATASETS["davis_train"], root / "toy/DAVIS"), samples)
        data = TrainingFrames([source], size=size)
        one_process = {}
        for name, make in (("ours", data.__getitem__), ("PIL", lambda key: pil_training_sample(data, key))):
            make((1, 0))
            start = time.perf_counter()
            for i in range(samples // 4):
                make((0, i))
            one_process[name] = (samples // 4) / (time.perf_counter() - start)
        plan = GlobalBatches(samples, batch_size, 0, distributed.Context(0, 1, torch.device("cpu"))).plan(0, 0, 2)
        loader = torch.utils.data.DataLoader(data, batch_sampler=plan, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        batches = iter(loader)
        next(batches)  # worker start-up is paid once per run, not per batch
        start, n = time.perf_counter(), 0
        for batch in batches:
            n += len(batch["image"])
        rate, cores = n / (time.perf_counter() - start), available_cores()
        return {"size": size, "workers": workers, "cores": cores, "samples": n, "samples_per_s": rate,
                "samples_per_s_per_core": rate / cores, "one_process_samples_per_s": one_process["ours"],
                "one_process_pil_samples_per_s": one_process["PIL"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device_name']}; torch {report['torch']}; {report['when']}", "",
             "| backbone | variant | batch | frames/s | mask IoU vs fp32 | peak device MiB |",
             "|---|---|---|---|---|---|"]
    for r in report["forward"]:
        mem = f"{r['peak_device_mib']:.0f}" if "peak_device_mib" in r else "-"
        lines.append(f"| {r['backbone']} | {r['variant']} | {r['batch']} | {r['frames_per_s']:.2f} | "
                     f"{r['mask_iou_vs_fp32']:.6f} | {mem} |")
    lines += ["", f"| backbone | GFLOPs per frame | training step, batch {report['train_batch']} (s) |",
              "|---|---|---|"]
    for b, info in report["per_backbone"].items():
        lines.append(f"| {b} | {info['gflops_per_frame']:.1f} | {info['train_step_s']:.3f} |")
    e2e = report.get("end_to_end")
    if e2e:
        lines += ["", f"`--test` against the reference-style loop ({e2e['backbone']}, same weights, {e2e['frames']} "
                  "toy frames of 427x240):", "",
                  "| loop | forward frames/s | end-to-end frames/s | forward speedup | end-to-end speedup | "
                  "pixels equal | mask IoU |", "|---|---|---|---|---|---|---|",
                  f"| reference-style | {e2e['forward_fps_reference']:.2f} | {e2e['reference_frames_per_s']:.2f} | "
                  "1.00x | 1.00x | - | - |"]
        for r in e2e["ours"]:
            lines.append(f"| ours, {r['variant']} | {r['forward_fps']:.2f} | {r['frames_per_s']:.2f} | "
                         f"{r['forward_speedup']:.2f}x | {r['speedup']:.2f}x | {100 * r['pixel_agreement']:.4f}% | "
                         f"{r['mask_iou']:.6f} |")
        lines.append("")
    host = report.get("host_pipeline")
    if host:
        lines += ["", "`--test`'s whole loop on 854x480 JPEG frames (loading, transfers, logit resize, PNGs, DAVIS "
                  "scoring):", "", "| network | frames | --workers | cores | frames/s | frames/s per core | "
                  "main process CPU ms per frame |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['frames']} | {r['workers']} | {r['cores']} | {r['frames_per_s']:.1f} | "
                  f"{r['frames_per_s_per_core']:.1f} | {r['main_process_ms_per_frame']:.2f} |" for r in host]
        lines.append("")
    loader = report.get("training_loader")
    if loader:
        lines += ["", f"Training samples from 854x480 JPEGs at {loader['size']}x{loader['size']}: one process "
                  f"makes {loader['one_process_samples_per_s']:.1f} a second (the PIL baseline "
                  f"{loader['one_process_pil_samples_per_s']:.1f}); the loader alone ({loader['samples']} samples, "
                  f"--workers {loader['workers']}, {loader['cores']} cores) {loader['samples_per_s']:.1f} samples/s, "
                  f"{loader['samples_per_s_per_core']:.1f} per core.", ""]
    lines.append(f"Peak host memory of the benchmark process: {report['peak_host_mib']:.0f} MiB.")
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench_results", help="folder for bench.json and bench.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--backbones", default="mitb0,mitb1,mitb2")
    parser.add_argument("--batch", type=int, default=8, help="the batched size (default 8)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--e2e-backbone", default="mitb0", help="backbone of the end-to-end comparison")
    parser.add_argument("--e2e-frames", type=int, help="frames per toy video in it (default 60; quick 12)")
    parser.add_argument("--skip-forward", action="store_true", help="only the end-to-end comparison")
    parser.add_argument("--host-frames", type=int, help="frames of the host-pipeline measurement (default 960, "
                                                        "long enough for a steady state; quick 16)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    size = 64 if quick else 512
    backbones = ["mitb0"] if quick else args.backbones.split(",")
    warmup, iters = (1, 2) if quick or device.type == "cpu" else (3, 10)
    report = {"device": device.type, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
              "size": size, "forward": [], "per_backbone": {},
              "train_batch": 4 if device.type == "cuda" else 2}
    for backbone in [] if args.skip_forward else backbones:
        rows, flops = bench_forward(backbone, size, [1, 2 if quick else args.batch], device, args.compile,
                                    warmup, iters)
        report["forward"] += rows
        train_s = bench_train_step(backbone, size, report["train_batch"], device,
                                   torch.bfloat16 if device.type == "cuda" else None, warmup, iters)
        report["per_backbone"][backbone] = {"gflops_per_frame": flops / 1e9, "train_step_s": train_s}
    report["end_to_end"] = bench_end_to_end(device, size, quick, args.workers, args.e2e_backbone, args.e2e_frames,
                                            args.batch)
    report["host_pipeline"] = bench_host_pipeline(device, args.workers, args.host_frames or (16 if quick else 960),
                                                  args.batch)
    report["training_loader"] = bench_training_loader(args.workers, 32 if quick else 256, size,
                                                      2 if quick else 16)
    report["peak_host_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    write_text_atomic(json.dumps(report, indent=2) + "\n", out / "bench.json")
    write_text_atomic(markdown(report), out / "bench.md")
    print(markdown(report))


if __name__ == "__main__":
    main()
