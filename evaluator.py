"""Evaluation: segment test videos and score them, or score a folder of saved masks.

One loop serves every dataset; what differs between datasets is data (dataset.DATASETS). Frames stream
through the model in batches that never span two videos; PNG writing and scoring run in a thread pool off
the main loop, with a bounded queue, so host memory does not grow with video length.

Scoring saved masks needs no model:
    python evaluator.py --dataset davis --data-root ../DB/VOS --results outputs/DAVIS16_val [--json FILE]
"""

import argparse
import contextlib
import json
import multiprocessing
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import DATASETS, DatasetSpec, Video, VideoFrames, dataset_root, scan, video_batches
from model.winograd import use_winograd, winograd_available
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import write_text_atomic
from utils.metrics import FrameScore, davis_summary, j_summary, score_frame
from utils.palette import read_mask, save_palette_mask

DEFAULT_DATA_ROOT = "../DB/VOS"


def summarise(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    if spec.metric == "davis":
        return davis_summary(scores)
    groups = {v.key: v.group for v in videos} if spec.grouped else None
    return j_summary(scores, groups)


def scored_frames(spec: DatasetSpec, video: Video) -> list[int]:
    """Frames whose scores count: DAVIS drops the first and last frame; the others need an annotation."""
    if spec.metric == "davis":
        return list(range(1, len(video.frames) - 1))
    return [i for i, f in enumerate(video.frames) if f.mask is not None]


def _finish_frame(mask: np.ndarray, gt: np.ndarray | None, out_path: Path | None, index: int, boundary: bool):
    if out_path is not None:
        save_palette_mask(mask, out_path)
    return score_frame(index, mask, gt, boundary)


def autocast_context(device: torch.device, amp: str):
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def prepare_for_inference(model, device: torch.device, *, channels_last: bool = False, compile_model: bool = False,
                          winograd: bool = False):
    """Move the model to `device` in eval mode, with the optional fast paths (README, 'Speed')."""
    if winograd:
        if device.type != "cpu":
            raise UserError(f"--winograd is for CPU inference; on {device.type} the convolution library "
                            "chooses its own algorithms (drop --winograd)")
        if not winograd_available():
            raise UserError("--winograd needs NNPACK, which this PyTorch build or this CPU lacks (drop --winograd)")
        use_winograd(model)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed frame sizes within a video: autotuned kernels pay off
    if compile_model:
        model = torch.compile(model, dynamic=False)
    return model


class Prediction(NamedTuple):
    video: Video
    index: int  # frame position in the video
    mask: np.ndarray  # HxW uint8, 1 = object
    gt: np.ndarray | None  # HxW uint8 ground truth where annotated
    image: torch.Tensor  # the loader's 3xHxW [0, 1] frame, kept so callers need not decode it again
    flow: torch.Tensor


def stream_predictions(model, videos: list[Video], mask_rule: str, device: torch.device, *, batch_size: int = 8,
                       workers: int = 2, amp: str = "off", timing: dict | None = None, desc: str = "segmenting",
                       progress: bool = True, channels_last: bool = False):
    """Yield a Prediction for every frame, in order.

    Frames are loaded by `workers` processes in batches that never span two videos; only the forward pass
    runs here. `timing["forward_s"]` accumulates forward time (synchronised on GPU), as the paper's fps.
    """
    model.eval()
    frames = VideoFrames(videos, mask_rule)
    loader = DataLoader(frames, batch_sampler=video_batches(videos, batch_size), num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    timing = {} if timing is None else timing
    timing.setdefault("forward_s", 0.0)
    with tqdm(total=len(frames), unit="frame", desc=desc, disable=None if progress else True, leave=False) as bar:
        for batch in loader:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            flow = batch["flow"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast_context(device, amp):
                masks = model(image, flow).argmax(1)  # DepthFlow.predict, also for a torch.compile'd module
            masks = masks.to(torch.uint8).cpu().numpy()
            timing["forward_s"] += time.perf_counter() - t0
            for k, mask in enumerate(masks):
                gt = batch["mask"][k].numpy() if batch["annotated"][k] else None
                yield Prediction(videos[int(batch["video"][k])], int(batch["frame"][k]), mask, gt,
                                 batch["image"][k], batch["flow"][k])
            bar.update(len(masks))


def segment_dataset(model, spec: DatasetSpec, videos: list[Video], device: torch.device, *, out_dir: Path | None,
                    batch_size: int = 8, workers: int = 2, amp: str = "off", progress: bool = True,
                    channels_last: bool = False) -> dict:
    """Segment every frame, write masks under out_dir (if given), and return the metrics and speeds.

    PNG writing and scoring run in a thread pool off the main loop, with a bounded queue, so host memory
    stays flat however long a video is.
    """
    scores = defaultdict(list)
    boundary = spec.metric == "davis"
    timing, n_frames, pending = {}, 0, deque()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        predictions = stream_predictions(model, videos, spec.mask_rule, device, batch_size=batch_size,
                                         workers=workers, amp=amp, timing=timing, desc=spec.title,
                                         progress=progress, channels_last=channels_last)
        for video, index, mask, gt, _, _ in predictions:
            out = out_dir / video.key / f"{video.frames[index].stem}.png" if out_dir is not None else None
            pending.append((pool.submit(_finish_frame, mask, gt, out, index, boundary), video.key))
            n_frames += 1
            while len(pending) > 4 * batch_size:
                future, key = pending.popleft()
                scores[key].append(future.result())
        for future, key in pending:
            scores[key].append(future.result())
    elapsed = time.perf_counter() - start
    counted = {v.key: set(scored_frames(spec, v)) for v in videos}
    result = summarise(spec, videos, {k: [s for s in scores[k] if s.index in counted[k]] for k in counted})
    result["speed"] = {"frames": n_frames, "forward_fps": n_frames / max(timing["forward_s"], 1e-9),
                       "end_to_end_fps": n_frames / max(elapsed, 1e-9)}
    return result


def _score_saved_video(job):
    spec, video, results_dir = job
    scores = []
    for index in scored_frames(spec, video):
        frame = video.frames[index]
        path = Path(results_dir) / video.key / f"{frame.stem}.png"
        if not path.is_file():
            raise UserError(f"missing result mask {path} (expected one PNG per frame, named like the frame)")
        pred = read_mask(path, "nonzero")
        gt = read_mask(frame.mask, spec.mask_rule)
        if pred.shape != gt.shape:
            raise UserError(f"result mask {path} is {pred.shape[1]}x{pred.shape[0]}, ground truth "
                            f"{frame.mask} is {gt.shape[1]}x{gt.shape[0]}")
        scores.append(score_frame(index, pred, gt, spec.metric == "davis"))
    return video.key, scores


def score_saved(spec: DatasetSpec, videos: list[Video], results_dir, workers: int = 2) -> dict:
    """Score saved masks (results_dir/<video>/<stem>.png, any nonzero pixel is object) in worker processes."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder not found: {results_dir} (expected {results_dir}/<video>/<frame>.png)")
    jobs = [(spec, v, str(results_dir)) for v in videos]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            scores = dict(pool.map(_score_saved_video, jobs))
    else:
        scores = dict(map(_score_saved_video, jobs))
    return summarise(spec, videos, scores)


def format_table(spec: DatasetSpec, result: dict) -> str:
    metrics = result["metrics"]
    lines = [f"== {spec.title} =="]
    lines.append("  ".join(f"{k:>9}" for k in metrics))
    lines.append("  ".join(f"{v:9.4f}" for v in metrics.values()))
    if "classes" in result:
        lines.append("per class (J-Mean): " + ", ".join(f"{c} {v:.4f}" for c, v in result["classes"].items()))
    if "speed" in result:
        s = result["speed"]
        lines.append(f"{s['frames']} frames; forward {s['forward_fps']:.1f} fps, "
                     f"end-to-end {s['end_to_end_fps']:.1f} fps")
    return "\n".join(lines)


def write_json(results: dict, path) -> None:
    write_text_atomic(json.dumps(results, indent=2, sort_keys=False) + "\n", path)


def check_writable(folder) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror})") from None
    return folder


def scan_datasets(names, data_root, overrides: dict) -> dict[str, list[Video]]:
    """Validate every requested test dataset before any work starts."""
    testable = [n for n, spec in DATASETS.items() if spec.metric]
    unknown = [n for n in names if n not in testable]
    if unknown:
        raise UserError(f"unknown test dataset {unknown[0]!r}; expected one of {', '.join(testable)}")
    return {n: scan(DATASETS[n], dataset_root(DATASETS[n], data_root, overrides.get(n))) for n in names}


def evaluate(model, names, data_root, overrides, output, device, *, batch_size=8, workers=2, amp="off",
             json_path=None, save_masks=True, channels_last=False, compile_model=False, winograd=False) -> dict:
    """`run.py --test`: every dataset in `names`, masks to output/<dataset folder>/, tables and JSON."""
    output = check_writable(output)
    videos = scan_datasets(names, data_root, overrides)
    model = prepare_for_inference(model, device, channels_last=channels_last, compile_model=compile_model,
                                  winograd=winograd)
    results = {}
    for name in names:
        spec = DATASETS[name]
        out_dir = output / spec.output if save_masks else None
        results[name] = segment_dataset(model, spec, videos[name], device, out_dir=out_dir, batch_size=batch_size,
                                        workers=workers, amp=amp, channels_last=channels_last)
        print(format_table(spec, results[name]), flush=True)
    write_json(results, json_path or output / "results.json")
    return results


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=[n for n in DATASETS if DATASETS[n].metric])
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"default {DEFAULT_DATA_ROOT}")
    parser.add_argument("--dataset-root", help="this dataset's own folder (default DATA_ROOT/<its folder>)")
    parser.add_argument("--results", required=True, help="folder of masks: RESULTS/<video>/<frame>.png")
    parser.add_argument("--json", help="also write the metrics to this file")
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    videos = scan(spec, dataset_root(spec, args.data_root, args.dataset_root))
    result = score_saved(spec, videos, args.results, workers=args.workers)
    print(format_table(spec, result))
    if args.json:
        write_json({args.dataset: result}, args.json)


if __name__ == "__main__":
    main()
