"""report.html: the page to open after a test run, made from what the run already has.

At the top, what made the figures (checkpoint, its SHA-256, settings, command, code) and every dataset's
headline figures. Per dataset: its table (each figure with its protocol and the frames it counts), every
sequence's figures worst first with a small curve of J over its frames, and for the worst sequences a
strip of their worst frames by J: the frame dimmed outside the predicted mask, the prediction outlined in
yellow, the ground truth in green, the flow image beside (readable whatever the scene's colours). Only
the frames shown are read again; their pictures are JPEGs in REPORT_files/ beside the page, which each
run rewrites whole (no picture of an earlier run stays).
"""

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from utils.io import read_rgb, save_image_atomic, write_text_atomic
from utils.palette import read_mask

PREDICTION = np.array([255, 220, 0], np.uint8)  # outline of the predicted mask
TRUTH = np.array([40, 255, 80], np.uint8)  # outline of the ground truth
TILE_HEIGHT = 160
CURVE_SIZE = (160, 36)  # width, height of a sequence's J curve


@dataclass
class StripFrame:
    name: str  # its label: frame name and J
    image: Path
    flow: Path
    prediction: Path  # the saved mask
    truth: Path | None
    mask_rule: str


@dataclass
class DatasetReport:
    title: str
    metrics: dict[str, float]
    protocols: dict[str, str]
    sequences: dict[str, dict[str, float]]  # sequence -> figure -> value
    worst_by: str  # the per-sequence figure that orders the sequences
    note: str = ""  # what the figures were computed on
    strips: dict[str, list[StripFrame]] = field(default_factory=dict)  # worst sequences' worst frames
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # sequence -> (frame index, J)
    rendered: str | None = None  # its HTML, once its pictures are written


def _outline(mask: np.ndarray) -> np.ndarray:
    return cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) == 1


def composite(frame: StripFrame) -> np.ndarray:
    """The frame dimmed and greyed outside the prediction, the prediction and ground truth outlined, the flow
    image beside it."""
    rgb = read_rgb(frame.image)
    predicted = read_mask(frame.prediction, "nonzero")
    grey = rgb.mean(axis=2, keepdims=True)
    shown = np.where(predicted[..., None] == 1, rgb, 0.35 * grey + 20).astype(np.uint8)
    if frame.truth is not None:
        shown[_outline(read_mask(frame.truth, frame.mask_rule))] = TRUTH
    shown[_outline(predicted)] = PREDICTION
    flow = read_rgb(frame.flow)
    if flow.shape[:2] != shown.shape[:2]:
        flow = cv2.resize(flow, (shown.shape[1], shown.shape[0]), interpolation=cv2.INTER_AREA)
    both = np.concatenate([shown, flow], axis=1)
    width = round(both.shape[1] * TILE_HEIGHT / both.shape[0])
    return cv2.resize(both, (width, TILE_HEIGHT), interpolation=cv2.INTER_AREA)


def curve_svg(points: list[tuple[int, float]]) -> str:
    """A small inline SVG of J (0 to 1) over a sequence's frames."""
    if not points:
        return ""
    w, h = CURVE_SIZE
    first, last = points[0][0], max(points[-1][0], points[0][0] + 1)
    xy = " ".join(f"{(i - first) / (last - first) * (w - 2) + 1:.1f},{(1 - j) * (h - 2) + 1:.1f}" for i, j in points)
    shape = f'<polyline points="{xy}" fill="none" stroke="#c33" stroke-width="1.5"/>' if len(points) > 1 else \
        f'<circle cx="{w / 2}" cy="{(1 - points[0][1]) * (h - 2) + 1:.1f}" r="2" fill="#c33"/>'
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}"><rect width="{w}" height="{h}" fill="#f4f4f4"/>'
            f'<line x1="0" y1="{h / 2}" x2="{w}" y2="{h / 2}" stroke="#ccc"/>{shape}</svg>')


def _value(value) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4f}"
    return "n/a" if value is None else html.escape(str(value))


def _dataset_html(report: DatasetReport, files: Path, page: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_value(v)}</td><td>{html.escape(report.protocols.get(k, ''))}"
                   "</td></tr>" for k, v in report.metrics.items())
    parts = [f"<h2>{html.escape(report.title)}</h2>", f"<p>{html.escape(report.note)}</p>" if report.note else "",
             f"<table><tr><th>figure</th><th>value</th><th>protocol</th></tr>{rows}</table>"]
    figures = {k for values in report.sequences.values() for k in values}
    columns = [report.worst_by] * (report.worst_by in figures) + sorted(figures - {report.worst_by})
    order = sorted(report.sequences, key=lambda s: report.sequences[s].get(report.worst_by, float("inf")))
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(s)}</td><td>{curve_svg(report.curves.get(s, []))}</td>" + "".join(
        f"<td>{_value(report.sequences[s].get(c))}</td>" for c in columns) + "</tr>" for s in order)
    parts.append(f"<h3>Sequences, worst {html.escape(report.worst_by)} first ({len(order)})</h3>"
                 f"<table><tr><th>sequence</th><th>J over its frames</th>{header}</tr>{body}</table>")
    for sequence, frames in report.strips.items():
        tiles = []
        for k, frame in enumerate(frames):
            picture = files / f"{sequence.replace('/', '_')}_{k}.jpg"
            save_image_atomic(Image.fromarray(composite(frame)), picture, durable=False, quality=90)
            tiles.append(f'<figure><img src="{html.escape(picture.relative_to(page.parent).as_posix())}" '
                         f'alt="{html.escape(sequence)} {html.escape(frame.name)}"><figcaption>'
                         f"frame {html.escape(frame.name)}</figcaption></figure>")
        figure = report.sequences.get(sequence, {}).get(report.worst_by)
        parts.append(f"<h3>{html.escape(sequence)}: {html.escape(report.worst_by)} {_value(figure)}, its worst "
                     f"frames</h3><div class=strip>{''.join(tiles)}</div>")
    return "\n".join(parts)


def _summary_html(run: dict | None, datasets: list[DatasetReport]) -> str:
    parts = []
    if run:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                       for k, v in run.items())
        parts.append(f"<table>{rows}</table>")
    heads = "".join(f"<tr><td>{html.escape(d.title)}</td>" + "".join(
        f"<td>{html.escape(k)} {_value(v)}</td>" for k, v in list(d.metrics.items())[:3]) + "</tr>" for d in datasets)
    parts.append(f"<h2>Summary</h2><table>{heads}</table>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0}figcaption{font-size:small;color:#555}.key{color:#555}"""
KEY = ("<p class=key>Strips: each sequence's frames with the lowest J; the frame is dimmed outside the predicted "
       "mask, the prediction outlined in yellow, the ground truth in green, the flow image beside.</p>")


def write_report(path, datasets: list[DatasetReport], title: str, run: dict | None = None) -> Path:
    """Write the page (and its pictures in PATH_files/, whose earlier content goes); returns its path."""
    page = Path(path)
    files = page.with_name(page.stem + "_files")
    for i, report in enumerate(datasets):  # a page rewritten after each dataset draws each one once
        if report.rendered is None:
            shutil.rmtree(files / f"{i}", ignore_errors=True)
            report.rendered = _dataset_html(report, files / f"{i}", page)
    if files.is_dir():
        for stale in files.iterdir():
            if stale.name in {str(i) for i in range(len(datasets))}:
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    body = "\n".join(report.rendered for report in datasets)
    write_text_atomic(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
                      f"{_summary_html(run, datasets)}{KEY}\n{body}</body></html>\n", page)
    return page
