"""Evaluation: segment test videos and score them, or score a folder of saved masks.

One loop serves every dataset; what differs between datasets is data (dataset.DATASETS). The engine
(inference.Segmenter) segments every frame and hands each mask to `finish`, which writes its PNG and
scores it against the ground truth. Under torchrun, videos are shared out over the processes.

Scoring saved masks needs no model:
    python evaluator.py --dataset davis --data-root ../DB/VOS --results outputs/DAVIS16_val [--json FILE]
"""

import argparse
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dataset import DATASETS, DEFAULT_DATA_ROOT, DatasetSpec, Video, dataset_root, scan, test_datasets
from inference import InferenceOptions, SegmentedFrame, Segmenter
from utils import distributed
from utils.device import default_workers
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import check_outside, check_writable, write_text_atomic
from utils.metrics import FrameScore, davis_summary, j_summary, score_frame
from utils.palette import read_mask, save_palette_mask
from utils.report import DatasetReport, StripFrame, write_report

# Which protocol each reported figure follows (docs/evaluation.md).
PROTOCOLS = {
    "davis": "the DAVIS toolkit: every frame but each sequence's first and last; per sequence, then over sequences",
    "authors": "the authors' code: annotated frames with a non-empty ground truth; per sequence, then over "
               "sequences",
    "classes": "the mean of the class means (as HGPU and others report YouTube-Objects)",
    "rules": "the DAVIS rules on the annotated frames (J = 1 where both masks are empty); per sequence, then over "
             "sequences",
}
RULES = " (DAVIS rules)"


def summarise(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    """The dataset's figures, each named with the protocol it follows (result["protocols"])."""
    if spec.metric == "davis":
        result = davis_summary(scores)
        result["protocols"] = dict.fromkeys(result["metrics"], PROTOCOLS["davis"])
        return result
    groups = {v.key: v.group for v in videos} if spec.grouped else None
    authors = j_summary(scores, groups)
    rules = davis_summary({k: [s for s in frames if s.annotated] for k, frames in scores.items()})
    metrics = dict(authors["metrics"])
    protocols = {"J-Mean": PROTOCOLS["authors"], "J-Mean over classes": PROTOCOLS["classes"]}
    for key in ("J&F-Mean", "J-Mean", "F-Mean", "J-Decay", "F-Decay"):
        metrics[key + RULES] = rules["metrics"][key]
        protocols[key + RULES] = PROTOCOLS["rules"]
    sequences = {k: {**({"J-Mean": authors["sequences"][k]} if k in authors["sequences"] else {}),
                     **{key + RULES: value for key, value in rules["sequences"][k].items()}} for k in scores}
    result = {"metrics": metrics, "protocols": {k: protocols[k] for k in metrics}, "sequences": sequences}
    if "classes" in authors:
        result["classes"] = authors["classes"]
    return result


def scored_frames(spec: DatasetSpec, video: Video) -> list[int]:
    """Frames whose scores count: DAVIS drops the first and last frame; the others need an annotation."""
    if spec.metric == "davis":
        return list(range(1, len(video.frames) - 1))
    return [i for i, f in enumerate(video.frames) if f.mask is not None]


def finish(frame: SegmentedFrame, spec: DatasetSpec, out_dir: Path | None) -> tuple[str, FrameScore]:
    """Write one frame's mask (if out_dir is given) and score it against its ground truth, if it has one."""
    video, truth = frame.video, frame.video.frames[frame.index]
    if out_dir is not None:
        save_palette_mask(frame.mask, out_dir / video.key / f"{truth.stem}.png")
    gt = read_mask(truth.mask, spec.mask_rule) if truth.mask is not None else None
    if gt is not None and gt.shape != frame.mask.shape:
        raise UserError(f"mask {truth.mask} is {gt.shape[1]}x{gt.shape[0]}, its frame {truth.image} is "
                        f"{frame.mask.shape[1]}x{frame.mask.shape[0]} (expected equal sizes)")
    return video.key, score_frame(frame.index, frame.mask, gt)


def segment_dataset(segmenter: Segmenter, spec: DatasetSpec, videos: list[Video], *, out_dir: Path | None,
                    progress: bool = True) -> tuple[dict[str, list[FrameScore]], float]:
    """Segment every frame, write masks under out_dir (if given); each video's frame scores and the network's
    time in seconds."""
    results, stats = segmenter.segment(videos, lambda frame: finish(frame, spec, out_dir), desc=spec.title,
                                       progress=progress)
    scores = defaultdict(list)
    for key, score in results:
        scores[key].append(score)
    return scores, stats.forward_s


def score_videos(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    """The dataset's metrics from its frames' scores, over the frames that count."""
    counted = {v.key: set(scored_frames(spec, v)) for v in videos}
    return summarise(spec, videos, {k: [s for s in scores.get(k, []) if s.index in counted[k]] for k in counted})


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
        scores.append(score_frame(index, pred, gt))
    return video.key, scores


def score_saved(spec: DatasetSpec, videos: list[Video], results_dir, workers: int = 2) -> dict:
    """Score saved masks (results_dir/<video>/<stem>.png, any nonzero pixel is object), on `workers` threads."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder not found: {results_dir} (expected {results_dir}/<video>/<frame>.png)")
    jobs = [(spec, v, str(results_dir)) for v in videos]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        scores = dict(pool.map(_score_saved_video, jobs))
    return summarise(spec, videos, scores)


WORST_SHOWN, FRAMES_SHOWN = 3, 4  # sequences with a strip in the report, frames in each strip


def dataset_report(spec: DatasetSpec, videos: list[Video], result: dict, masks_dir: Path) -> DatasetReport:
    """The report's part for one dataset: its figures, and strips of its worst sequences' saved masks."""
    worst_by = "J-Mean"
    report = DatasetReport(spec.title, result["metrics"], result.get("protocols", {}),
                           {k: v if isinstance(v, dict) else {worst_by: v} for k, v in result["sequences"].items()},
                           worst_by)
    by_key = {v.key: v for v in videos}
    ranked = sorted(report.sequences, key=lambda k: report.sequences[k].get(worst_by, float("inf")))
    for key in ranked[:WORST_SHOWN]:
        counted = [by_key[key].frames[i] for i in scored_frames(spec, by_key[key])]
        shown = [counted[round(i)] for i in np.linspace(0, len(counted) - 1, min(FRAMES_SHOWN, len(counted)))]
        report.strips[key] = [StripFrame(f.stem, f.image, f.flow, masks_dir / key / f"{f.stem}.png", f.mask,
                                         spec.mask_rule) for f in shown]
    return report


def format_table(spec: DatasetSpec, result: dict) -> str:
    metrics = result["metrics"]
    lines = [f"== {spec.title} =="]
    if spec.metric == "davis":
        lines.append("  ".join(f"{k:>9}" for k in metrics))
        lines.append("  ".join(f"{v:9.4f}" for v in metrics.values()))
    else:  # figures of several protocols: a line per protocol
        groups: dict[str, list[str]] = {}
        for key, value in metrics.items():
            groups.setdefault(result["protocols"][key], []).append(f"{key.removesuffix(RULES)} {value:.4f}")
        lines += [f"  {'  '.join(figures)}   [{protocol}]" for protocol, figures in groups.items()]
    if "classes" in result:
        lines.append("per class (J-Mean): " + ", ".join(f"{c} {v:.4f}" for c, v in result["classes"].items()))
    if "speed" in result:
        s = result["speed"]
        lines.append(f"{s['frames']} frames; forward {s['forward_fps']:.1f} fps, "
                     f"end-to-end {s['end_to_end_fps']:.1f} fps" + (f" ({s['processes']} processes)"
                                                                    if s["processes"] > 1 else ""))
    return "\n".join(lines)


def write_json(results: dict, path) -> None:
    write_text_atomic(json.dumps(results, indent=2, sort_keys=False) + "\n", path)


def scan_datasets(names, data_root, overrides: dict) -> dict[str, list[Video]]:
    """Validate every requested test dataset before any work starts."""
    known = test_datasets()
    if not names:
        raise UserError(f"--datasets names no dataset; expected a comma-separated subset of {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown test dataset {unknown[0]!r}; expected one of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UserError(f"--datasets names a dataset twice: {','.join(names)}")
    return {n: scan(DATASETS[n], dataset_root(DATASETS[n], data_root, overrides.get(n))) for n in names}


def speed(frames: int, forward_s: float, elapsed_s: float, processes: int = 1) -> dict:
    return {"frames": frames, "forward_fps": frames / max(forward_s, 1e-9),
            "end_to_end_fps": frames / max(elapsed_s, 1e-9), "processes": processes}


def evaluate_dataset(segmenter: Segmenter, spec: DatasetSpec, videos: list[Video], *, out_dir: Path | None = None,
                     progress: bool = True, ctx: distributed.Context | None = None) -> dict | None:
    """Segment and score one dataset: its metrics and speeds.

    Under torchrun (`ctx`), the videos are shared out over the processes, each segmented whole by one of
    them, and rank 0 scores the gathered frame scores in the dataset's own video order, so the tables equal
    a single process's; the result is on rank 0 only (None elsewhere)."""
    ctx = ctx or distributed.Context(0, 1, segmenter.device)
    mine = [videos[i] for i in distributed.shard_by_size([len(v.frames) for v in videos], ctx)]
    start = time.perf_counter()
    scores, forward_s = segment_dataset(segmenter, spec, mine, out_dir=out_dir, progress=progress and ctx.is_main)
    report = (dict(scores), sum(len(v.frames) for v in mine), forward_s, time.perf_counter() - start)
    gathered = distributed.gather_to_main(report, ctx)
    if gathered is None:
        return None
    merged = {k: v for part, *_ in gathered for k, v in part.items()}
    result = score_videos(spec, videos, merged)
    # The slowest process sets the pace of a sharded run.
    result["speed"] = speed(sum(g[1] for g in gathered), max(g[2] for g in gathered), max(g[3] for g in gathered),
                            ctx.world_size)
    return result


def checked_results_path(path) -> Path:
    """The results file, checked before any work: a folder, or a parent that cannot be written, stops."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; expected a file name, for example {path / 'results.json'}")
    check_writable(path.parent)
    return path


def evaluate(model, names: list[str], data_root, overrides: dict, output, options: InferenceOptions, *,
             json_path=None, save_masks: bool = True, ctx: distributed.Context | None = None) -> dict:
    """`run.py --test`: every dataset in `names`, masks to output/<dataset folder>/, tables and JSON.

    Under torchrun (`ctx`), videos are shared out over the processes and rank 0 writes the tables. The
    JSON is rewritten after each dataset, so a stopped run keeps the datasets it finished."""
    ctx = ctx or distributed.Context(0, 1, options.device)
    roots = [dataset_root(DATASETS[n], data_root, overrides.get(n)) for n in names if n in DATASETS]
    check_outside(output, roots, "--output")
    if json_path is not None:
        check_outside(json_path, roots, "--json")
    output = check_writable(output)
    json_path = checked_results_path(json_path or output / "results.json")
    videos = scan_datasets(names, data_root, overrides)
    segmenter = Segmenter(model, options)
    results, reports = {}, []
    for name in names:
        spec = DATASETS[name]
        out_dir = output / spec.output if save_masks else None
        result = evaluate_dataset(segmenter, spec, videos[name], out_dir=out_dir, ctx=ctx)
        if ctx.is_main:
            results[name] = result
            print(format_table(spec, result), flush=True)
            write_json(results, json_path)
            if out_dir is not None:
                reports.append(dataset_report(spec, videos[name], result, out_dir))
                write_report(output / "report.html", reports, f"DepthFlow test run: {output}")
    return results


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=test_datasets())
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"default {DEFAULT_DATA_ROOT}")
    parser.add_argument("--dataset-root", help="this dataset's own folder (default DATA_ROOT/<its folder>)")
    parser.add_argument("--results", required=True, help="folder of masks: RESULTS/<video>/<frame>.png")
    parser.add_argument("--json", help="also write the metrics to this file")
    parser.add_argument("--report", help="the HTML report (default: <RESULTS folder name>_report.html beside --json, "
                                         "or in the current folder)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="scoring threads (default: the "
                                                                             "machine's cores, up to 8)")
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    root = dataset_root(spec, args.data_root, args.dataset_root)
    results = Path(args.results)
    report = Path(args.report) if args.report else \
        (Path(args.json).parent if args.json else Path.cwd()) / f"{results.name}_report.html"
    for flag, path in (("--json", args.json), ("--report", report)):
        if path:
            check_outside(path, [root, results], flag)
    json_path = checked_results_path(args.json) if args.json else None
    videos = scan(spec, root)
    result = score_saved(spec, videos, args.results, workers=args.workers)
    print(format_table(spec, result))
    if json_path:
        write_json({args.dataset: result}, json_path)
    page = write_report(report, [dataset_report(spec, videos, result, results)], f"Scores of {results}")
    print(f"report: {page}")


if __name__ == "__main__":
    main()
