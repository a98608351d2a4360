"""Evaluation: segment test videos and score them, or score a folder of saved masks.

One loop serves every dataset; what differs between datasets is data (dataset.DATASETS). The engine
(inference.Segmenter) segments every frame; helper threads write each mask's PNG and score it against the
ground truth (`finish`). Under torchrun, videos are shared out over the processes.

Scoring saved masks needs no model:
    python evaluator.py --dataset davis --data-root ../DB/VOS --results outputs/DAVIS16_val [--json FILE]
"""

import argparse
import csv
import io
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dataset import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetSpec,
    Video,
    annotation_form,
    dataset_root,
    scan,
    test_datasets,
)
from inference import InferenceOptions, RunStats, SegmentedFrame, Segmenter
from utils import distributed
from utils.background import map_in_threads
from utils.device import default_workers
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import (
    FolderLock,
    check_outside,
    check_writable,
    file_digest_sha256,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from utils.metrics import FrameScore, davis_summary, j_summary, score_frame
from utils.palette import read_mask, save_palette_mask
from utils.report import DatasetReport, StripFrame, write_report
from utils.run_log import code_version

# Which protocol each reported figure follows, and on which frames (docs/evaluation.md).
PROTOCOLS = {
    "davis": "the DAVIS toolkit: every frame but each sequence's first and last; per sequence, then over sequences",
    "authors": "the authors' code: annotated frames (a mask with an object); per sequence, then over sequences",
    "classes": "the mean of the class means (as HGPU and others report YouTube-Objects)",
    "rules": "the DAVIS rules (J, F, Decay) on the annotated frames (a mask with an object); per sequence, then "
             "over sequences",
}
RULES = " (DAVIS rules)"


def truth_score(spec: DatasetSpec, index: int, pred: np.ndarray, frame, pred_name: str = "") -> FrameScore:
    """One frame's scores against its ground truth, if it has one. In a sparsely annotated set a blank mask is
    a placeholder for a frame without annotation (dataset.DatasetSpec.sparse), so it scores as one. A size
    mismatch names the prediction as `pred_name` (by default, the frame it was segmented from)."""
    gt = read_mask(frame.mask, spec.mask_rule) if frame.mask is not None else None
    if gt is not None and gt.shape != pred.shape:
        raise UserError(f"mask {frame.mask} is {gt.shape[1]}x{gt.shape[0]}, {pred_name or f'its frame {frame.image}'}"
                        f" is {pred.shape[1]}x{pred.shape[0]} (expected equal sizes)")
    if spec.sparse and gt is not None and not gt.any():
        gt = None
    return score_frame(index, pred, gt)


def scored_frames(spec: DatasetSpec, video: Video) -> list[int]:
    """Frames to score: DAVIS drops the first and last frame; the others score the frames with a mask file
    (those whose mask is blank then score as not annotated)."""
    if spec.metric == "davis":
        return list(range(1, len(video.frames) - 1))
    return [i for i, f in enumerate(video.frames) if f.mask is not None]


def frame_counts(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    """How many videos, frames, mask files and blank masks the dataset holds, and how many frames each
    protocol counted."""
    frames = sum(len(v.frames) for v in videos)
    masks = sum(len(v.annotated) for v in videos)
    annotated = sum(s.annotated for frame_scores in scores.values() for s in frame_scores)
    counts = {"videos": len(videos), "frames": frames, "mask_files": masks}
    if spec.metric == "davis":
        return {**counts, "counted": {"davis": sum(len(v.frames) - 2 for v in videos)}}
    return {**counts, "blank_masks": masks - annotated, "counted": {"authors": annotated, "rules": annotated}}


def annotation_line(spec: DatasetSpec, counts: dict) -> str:
    """One line: what the dataset holds, which form of annotation was found, which frames were scored."""
    head = f"{spec.title}: {counts['videos']} videos, {counts['frames']} frames"
    if spec.metric == "davis":
        return f"{head}, all annotated; scored on {counts['counted']['davis']} (each video's first and last dropped)"
    form = annotation_form(counts["frames"], counts["mask_files"], counts["blank_masks"])
    return f"{head}, {form}; scored on the {counts['counted']['authors']} annotated frames"


def summarise(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    """The dataset's figures, each named with the protocol it follows (result["protocols"]), the frames they
    were computed on (result["frames"], result["annotation"]) and the sequences left out for want of an
    annotated frame (result["left_out"])."""
    counts = frame_counts(spec, videos, scores)
    if spec.metric == "davis":
        result = davis_summary(scores)
        result["protocols"] = dict.fromkeys(result["metrics"], PROTOCOLS["davis"])
    else:
        result = _sparse_summary(spec, videos, scores)
    return {**result, "frames": counts, "annotation": annotation_line(spec, counts)}


def _sparse_summary(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    annotated = {k: [s for s in frames if s.annotated] for k, frames in scores.items()}
    left_out = sorted(k for k, frames in annotated.items() if not frames)
    annotated = {k: frames for k, frames in annotated.items() if frames}
    groups = {v.key: v.group for v in videos} if spec.grouped else None
    authors, rules = j_summary(annotated, groups), davis_summary(annotated)
    metrics = dict(authors["metrics"])
    protocols = {"J-Mean": PROTOCOLS["authors"], "J-Mean over classes": PROTOCOLS["classes"]}
    for key in ("J&F-Mean", "J-Mean", "F-Mean", "J-Decay", "F-Decay"):
        metrics[key + RULES] = rules["metrics"][key]
        protocols[key + RULES] = PROTOCOLS["rules"]
    sequences = {k: {"J-Mean": authors["sequences"][k], **{key + RULES: value for key, value in
                                                           rules["sequences"][k].items()}} for k in annotated}
    result = {"metrics": metrics, "protocols": {k: protocols[k] for k in metrics}, "sequences": sequences,
              "left_out": left_out}
    if "classes" in authors:
        result["classes"] = authors["classes"]
    return result


def finish(frame: SegmentedFrame, spec: DatasetSpec, out_dir: Path | None) -> tuple[str, FrameScore]:
    """Write one frame's mask (if out_dir is given) and score it against its ground truth, if it has one."""
    video, truth = frame.video, frame.video.frames[frame.index]
    if out_dir is not None:
        save_palette_mask(frame.mask, out_dir / video.key / f"{truth.stem}.png")
    return video.key, truth_score(spec, frame.index, frame.mask, truth)


def segment_dataset(segmenter: Segmenter, spec: DatasetSpec, videos: list[Video], *, out_dir: Path | None,
                    progress: bool = True) -> tuple[dict[str, list[FrameScore]], float]:
    """Segment every frame, write masks under out_dir (if given) and score them on helper threads; each video's
    frame scores and the network's time in seconds."""
    stats = RunStats()
    frames = segmenter.frames(videos, stats=stats, desc=spec.title, progress=progress)
    helpers = max(1, segmenter.options.workers)
    scores = defaultdict(list)
    for key, score in map_in_threads(lambda f: finish(f, spec, out_dir), frames, helpers,
                                     backlog=2 * segmenter.options.batch_size + helpers):
        scores[key].append(score)
    return scores, stats.forward_s


def score_videos(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> dict:
    """The dataset's metrics from its frames' scores, over the frames that count."""
    counted = {v.key: set(scored_frames(spec, v)) for v in videos}
    return summarise(spec, videos, {k: sorted((s for s in scores.get(k, []) if s.index in counted[k]),
                                              key=lambda s: s.index) for k in counted})


def _score_saved_video(job) -> tuple[str, list[FrameScore]]:
    spec, video, results_dir = job
    scores = []
    for index in scored_frames(spec, video):
        frame = video.frames[index]
        path = Path(results_dir) / video.key / f"{frame.stem}.png"
        if not path.is_file():
            raise UserError(f"missing result mask {path} (expected one PNG per frame, named like the frame)")
        scores.append(truth_score(spec, index, read_mask(path, "nonzero"), frame, f"result mask {path}"))
    return video.key, scores


def score_saved(spec: DatasetSpec, videos: list[Video], results_dir, workers: int = 2) -> tuple[dict, dict]:
    """Score saved masks (results_dir/<video>/<stem>.png, any nonzero pixel is object), on `workers` threads:
    the dataset's figures and each video's frame scores."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder not found: {results_dir} (expected {results_dir}/<video>/<frame>.png)")
    jobs = [(spec, v, str(results_dir)) for v in videos]
    scores = dict(map_in_threads(_score_saved_video, jobs, workers, backlog=2 * workers))
    return summarise(spec, videos, scores), scores


def frames_csv(spec: DatasetSpec, videos: list[Video], scores: dict[str, list[FrameScore]]) -> str:
    """Per-frame figures, a row per scored frame: sequence, frame, whether it is annotated, J and F (empty
    where a frame has no annotation)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sequence", "frame", "index", "annotated", "J", "F"])
    for video in videos:
        for s in sorted(scores.get(video.key, []), key=lambda s: s.index):
            writer.writerow([video.key, video.frames[s.index].stem, s.index, int(s.annotated),
                             *(f"{v:.6f}" if s.annotated else "" for v in (s.j, s.f))])
    return out.getvalue()


WORST_SHOWN, FRAMES_SHOWN = 3, 4  # sequences with a strip in the report, frames in each strip


def dataset_report(spec: DatasetSpec, videos: list[Video], result: dict, scores: dict[str, list[FrameScore]],
                   masks_dir: Path) -> DatasetReport:
    """The report's part for one dataset: its figures, each sequence's J over time, and for the worst
    sequences strips of their worst frames (by J), read back from the saved masks."""
    worst_by = "J-Mean"
    report = DatasetReport(spec.title, result["metrics"], result.get("protocols", {}), result["sequences"],
                           worst_by, note=result.get("annotation", ""))
    by_key = {v.key: v for v in videos}
    for key, frame_scores in scores.items():
        report.curves[key] = [(s.index, s.j) for s in frame_scores if s.annotated]
    ranked = sorted(report.sequences, key=lambda k: report.sequences[k].get(worst_by, float("inf")))
    for key in ranked[:WORST_SHOWN]:
        worst = sorted((s for s in scores.get(key, []) if s.annotated), key=lambda s: (s.j, s.index))
        shown = sorted(worst[:FRAMES_SHOWN], key=lambda s: s.index)
        report.strips[key] = [StripFrame(f"{f.stem} (J {s.j:.3f})", f.image, f.flow, masks_dir / key / f"{f.stem}.png",
                                         f.mask, spec.mask_rule)
                              for s in shown for f in (by_key[key].frames[s.index],)]
    return report


def _figure(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def format_table(spec: DatasetSpec, result: dict) -> str:
    metrics = result["metrics"]
    tta = f" [{result['tta']}]" if result.get("tta") else ""
    lines = [f"== {spec.title}{tta} =="]
    if result.get("annotation"):
        lines.append(result["annotation"])
    if spec.metric == "davis":
        lines.append("  ".join(f"{k:>9}" for k in metrics))
        lines.append("  ".join(f"{_figure(v):>9}" for v in metrics.values()))
    else:  # figures of several protocols: a line per protocol
        groups: dict[str, list[str]] = {}
        for key, value in metrics.items():
            groups.setdefault(result["protocols"][key], []).append(f"{key.removesuffix(RULES)} {_figure(value)}")
        lines += [f"  {'  '.join(figures)}   [{protocol}]" for protocol, figures in groups.items()]
    if "classes" in result:
        lines.append("per class (J-Mean): " + ", ".join(f"{c} {_figure(v)}" for c, v in result["classes"].items()))
    if result.get("left_out"):
        lines.append(f"left out, no annotated frame: {', '.join(result['left_out'])}")
    if undefined := [k for k, v in metrics.items() if v is None or v != v]:
        lines.append(f"undefined (no frame to compute them on; null in the JSON): {', '.join(undefined)}")
    if "speed" in result:
        s = result["speed"]
        lines.append(f"{s['frames']} frames; forward {s['forward_fps']:.1f} fps, "
                     f"end-to-end {s['end_to_end_fps']:.1f} fps" + (f" ({s['processes']} processes)"
                                                                    if s["processes"] > 1 else ""))
    return "\n".join(lines)


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
                     progress: bool = True, ctx: distributed.Context | None = None,
                     frame_scores: dict | None = None) -> dict | None:
    """Segment and score one dataset: its metrics and speeds (and, into `frame_scores`, every frame's scores).

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
    if frame_scores is not None:
        frame_scores.update(merged)
    if tta := segmenter.options.tta.name:
        result["tta"] = tta
        result["protocols"] = {k: f"{p} [{tta}]" for k, p in result["protocols"].items()}
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


# What a test run writes in its --output besides each dataset's mask folder.
TEST_FILES = ("results.json", "report.html", "report_files", "per_frame")


def run_record(checkpoint, options: InferenceOptions, size: int) -> dict:
    """What produced a results file: the checkpoint (and its SHA-256), the settings that change the figures,
    the command and the code."""
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_digest_sha256(checkpoint),
            "size": size, "amp": options.amp, "tta": options.tta.name or "off", "command": " ".join(sys.argv),
            "code": code_version()}


_IDENTITY = ("checkpoint_sha256", "size", "amp", "tta")  # fields whose change makes other figures


def claim_results(output: Path, json_path: Path, run: dict, overwrite: bool) -> dict:
    """The figures already in `json_path` that this run may keep: those of the same model and settings. A
    results file of another model or settings stops the run, unless --overwrite, which deletes what that test
    wrote in `output` (its mask folders, report and per-frame files), and nothing else."""
    earlier = read_json(json_path) if json_path.is_file() else None
    if earlier is None:
        return {}
    before = earlier.get("run", {})
    differ = [k for k in _IDENTITY if before.get(k) != run[k]]
    if not differ:
        return earlier.get("datasets", {})
    if not overwrite:
        raise UserError(f"{json_path} holds figures of another {'model' if 'checkpoint_sha256' in differ else 'run'} "
                        f"({before.get('checkpoint', 'unknown')}; {differ[0]} differs); a results file never mixes "
                        "two, so choose another --output, or --overwrite to replace them")
    for name in earlier.get("datasets", {}):
        if name in DATASETS and (output / DATASETS[name].output).is_dir():
            shutil.rmtree(output / DATASETS[name].output)
    for name in TEST_FILES:
        target = output / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    if json_path.exists():
        json_path.unlink()
    return {}


def evaluate(model, names: list[str], data_root, overrides: dict, output, options: InferenceOptions, *,
             checkpoint, json_path=None, overwrite: bool = False, save_masks: bool = True,
             ctx: distributed.Context | None = None) -> dict:
    """`run.py --test`: every dataset in `names`, masks to output/<dataset folder>/, tables, JSON, per-frame
    CSVs and the report.

    Under torchrun (`ctx`), videos are shared out over the processes and rank 0 writes the tables. The
    JSON is rewritten after each dataset, so a stopped run keeps the datasets it finished; it records the
    checkpoint and settings, and keeps earlier figures only if they are of the same model and settings."""
    ctx = ctx or distributed.Context(0, 1, options.device)
    output = Path(output)
    roots = [dataset_root(DATASETS[n], data_root, overrides.get(n)) for n in names if n in DATASETS]
    inputs = [*roots, Path(checkpoint)]
    check_outside(output, inputs, "--output")
    if json_path is not None:
        check_outside(json_path, inputs, "--json")
    videos = scan_datasets(names, data_root, overrides)
    segmenter = Segmenter(model, options)
    lock = None
    if ctx.is_main:
        lock = FolderLock(output, "--output").acquire()
        json_path = checked_results_path(json_path or output / "results.json")
        run = run_record(checkpoint, options, model.size)
        results = {"run": run, "datasets": claim_results(output, json_path, run, overwrite)}
        write_json_atomic(results, json_path)
    try:
        reports = []
        for name in names:
            spec = DATASETS[name]
            out_dir = output / spec.output if save_masks else None
            frame_scores: dict = {}
            result = evaluate_dataset(segmenter, spec, videos[name], out_dir=out_dir, ctx=ctx,
                                      frame_scores=frame_scores)
            if ctx.is_main:
                results["datasets"][name] = result
                print(format_table(spec, result), flush=True)
                write_json_atomic(results, json_path)
                write_text_atomic(frames_csv(spec, videos[name], frame_scores), output / "per_frame" / f"{name}.csv")
                if out_dir is not None:
                    reports.append(dataset_report(spec, videos[name], result, frame_scores, out_dir))
                    write_report(output / "report.html", reports, f"DepthFlow test run: {output}", run=results["run"])
        return results if ctx.is_main else {}
    finally:
        if lock is not None:
            lock.release()


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=test_datasets())
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"default {DEFAULT_DATA_ROOT}")
    parser.add_argument("--dataset-root", help="this dataset's own folder (default DATA_ROOT/<its folder>)")
    parser.add_argument("--results", required=True, help="folder of masks: RESULTS/<video>/<frame>.png")
    parser.add_argument("--json", help="also write the metrics to this file")
    parser.add_argument("--report", help="the HTML report (default: <RESULTS folder name>_report.html beside --json, "
                                         "or in the current folder); the per-frame CSV goes beside it")
    parser.add_argument("--workers", type=int, default=default_workers(), help="scoring threads (default: the "
                                                                             "machine's cores, up to 8)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected an integer of at least 1")
    spec = DATASETS[args.dataset]
    root = dataset_root(spec, args.data_root, args.dataset_root)
    results = Path(args.results)
    report = Path(args.report) if args.report else \
        (Path(args.json).parent if args.json else Path.cwd()) / f"{results.name}_report.html"
    per_frame = report.with_name(report.name.removesuffix(".html").removesuffix("_report") + "_frames.csv")
    for flag, path in (("--json", args.json), ("--report", report), ("--report", per_frame)):
        if path:
            check_outside(path, [root, results], flag)
    json_path = checked_results_path(args.json) if args.json else None
    videos = scan(spec, root)
    result, scores = score_saved(spec, videos, args.results, workers=args.workers)
    print(format_table(spec, result))
    if json_path:
        run = {"results": str(results.resolve()), "command": " ".join(sys.argv), "code": code_version()}
        write_json_atomic({"run": run, "datasets": {args.dataset: result}}, json_path)
    write_text_atomic(frames_csv(spec, videos, scores), per_frame)
    page = write_report(report, [dataset_report(spec, videos, result, scores, results)], f"Scores of {results}")
    print(f"report: {page}; per-frame figures: {per_frame}")


if __name__ == "__main__":
    main()
