"""Evaluation metrics, computed as the official DAVIS toolkit (davis2017-evaluation) computes them.

DAVIS 2016: per-frame J (region IoU) and F (boundary F-measure), first and last frame of each sequence
dropped, per-sequence Mean / Recall / Decay with the toolkit's rules, dataset figures averaged over
sequences. FBMS, YouTube-Objects and Long-Videos: J on frames whose ground truth is non-empty, averaged per
sequence and then over sequences, as the authors' code reports them; beside it J, F and J&F with the DAVIS
rules on the annotated frames, as other papers report these sets (docs/evaluation.md).
"""

import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

BOUNDARY_THRESHOLD = 0.008


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P and G| / |P or G|; 1 where the union is empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """The toolkit's one-pixel boundary map: a pixel differs from its east, south or south-east neighbour.

    The last row compares only eastwards, the last column only southwards, and the corner is never boundary.
    """
    seg = seg.astype(bool)
    b = np.zeros_like(seg)
    # Each comparison is written only where its neighbour exists, which gives the edge rules above.
    b[:, :-1] |= seg[:, :-1] ^ seg[:, 1:]
    b[:-1, :] |= seg[:-1, :] ^ seg[1:, :]
    b[:-1, :-1] |= seg[:-1, :-1] ^ seg[1:, 1:]
    return b


def disk(radius: float) -> np.ndarray:
    """skimage.morphology.disk: {x^2 + y^2 <= r^2} on the integer grid (not OpenCV's ellipse kernel)."""
    span = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(span, span)
    return (x**2 + y**2 <= radius**2).astype(np.uint8)


def boundary_radius(shape, bound_th: float = BOUNDARY_THRESHOLD) -> float:
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape[:2]))


def _boundary_window(a: np.ndarray, b: np.ndarray, radius: int) -> tuple[slice, slice]:
    """The smallest window holding every boundary pixel of `a` and `b` plus `radius` around them.

    Dilating inside it gives exactly the full-frame dilation's values there, and zero lies outside it
    (the disk fits in the square of that radius), so F can be computed on the window alone."""
    rows = np.flatnonzero(a.any(axis=1) | b.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0) | b.any(axis=0))
    h, w = a.shape
    return (slice(max(rows[0] - radius, 0), min(rows[-1] + radius + 1, h)),
            slice(max(cols[0] - radius, 0), min(cols[-1] + radius + 1, w)))


def f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUNDARY_THRESHOLD) -> float:
    """Boundary F-measure with the toolkit's tolerance disk and its rules for empty boundaries."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    fg_boundary = seg2bmap(pred)
    gt_boundary = seg2bmap(gt)
    n_fg, n_gt = int(np.count_nonzero(fg_boundary)), int(np.count_nonzero(gt_boundary))
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        radius = boundary_radius(pred.shape, bound_th)
        window = _boundary_window(fg_boundary, gt_boundary, int(math.ceil(radius)))
        fg, gt_b = fg_boundary[window].astype(np.uint8), gt_boundary[window].astype(np.uint8)
        kernel = disk(radius)
        precision = np.count_nonzero(fg & cv2.dilate(gt_b, kernel)) / float(n_fg)
        recall = np.count_nonzero(gt_b & cv2.dilate(fg, kernel)) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def sequence_statistics(values) -> tuple[float, float, float]:
    """The toolkit's db_statistics: (Mean, Recall, Decay) of one sequence's per-frame values."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(values)
        recall = np.nanmean(values > 0.5)
        # Four bins as the toolkit cuts them, but for its cast of the bin edges to uint8, which wraps for
        # sequences of 256 frames or more (Long-Videos'): up to 255 frames the values are the toolkit's.
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


@dataclass
class FrameScore:
    index: int  # position of the frame in its sequence
    annotated: bool
    gt_empty: bool
    j: float
    f: float = float("nan")


def score_frame(index: int, pred: np.ndarray, gt: np.ndarray | None) -> FrameScore:
    """J and F of one frame; NaN for a frame without ground truth."""
    if gt is None:
        return FrameScore(index, False, True, float("nan"), float("nan"))
    return FrameScore(index, True, not gt.any(), jaccard(pred, gt), f_measure(pred, gt))


def davis_summary(sequences: dict[str, list[FrameScore]]) -> dict:
    """Per-sequence and dataset J&F statistics of the frames that count (the caller drops each sequence's
    first and last frame, as the toolkit does)."""
    per_sequence = {}
    for name, scores in sequences.items():
        scores = sorted(scores, key=lambda s: s.index)
        j_stats = sequence_statistics([s.j for s in scores])
        f_stats = sequence_statistics([s.f for s in scores])
        per_sequence[name] = {"J-Mean": j_stats[0], "J-Recall": j_stats[1], "J-Decay": j_stats[2],
                              "F-Mean": f_stats[0], "F-Recall": f_stats[1], "F-Decay": f_stats[2]}
    table = {key: _mean([s[key] for s in per_sequence.values()])
             for key in ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")}
    both = None if table["J-Mean"] is None else (table["J-Mean"] + table["F-Mean"]) / 2
    return {"metrics": {"J&F-Mean": both, **table}, "sequences": per_sequence}


def _mean(values: list[float]) -> float | None:
    """The mean over sequences; None (undefined, null in the JSON) where there is no sequence to average."""
    return float(np.mean(values)) if values else None


def j_summary(sequences: dict[str, list[FrameScore]], groups: dict[str, str] | None = None) -> dict:
    """The authors' figure: mean J over annotated frames with non-empty ground truth, per sequence, then over
    sequences.

    With `groups` (sequence -> class, YouTube-Objects), also the mean per class, and the mean of the class
    means (how other papers report YouTube-Objects); "J-Mean" stays the mean over sequences.
    """
    per_sequence = {}
    for name, scores in sequences.items():
        js = [s.j for s in scores if s.annotated and not s.gt_empty]
        if js:
            per_sequence[name] = float(np.mean(js))
    result = {"metrics": {"J-Mean": _mean(list(per_sequence.values()))}, "sequences": per_sequence}
    if groups:
        classes = sorted({groups[name] for name in per_sequence})
        result["classes"] = {c: float(np.mean([v for n, v in per_sequence.items() if groups[n] == c]))
                             for c in classes}
        result["metrics"]["J-Mean over classes"] = _mean(list(result["classes"].values()))
    return result
