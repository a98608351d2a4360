"""report.html: the page to open after a test run, made from what the run already has.

Per dataset: the metrics table (each figure with its protocol), every sequence's figures sorted worst
first, and for the worst sequences a strip of frames: the predicted mask tinted over the frame, the ground
truth's outline drawn over it, and the flow image beside. Only the frames shown are read again; their
pictures are JPEGs in REPORT_files/ beside the page.
"""

import html
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from utils.io import read_rgb, save_image_atomic, write_text_atomic
from utils.palette import read_mask

PREDICTION = np.array([255, 60, 40], np.float32)  # tint of the predicted mask
TRUTH = np.array([40, 255, 80], np.uint8)  # outline of the ground truth
TILE_HEIGHT = 160


@dataclass
class StripFrame:
    name: str
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
    strips: dict[str, list[StripFrame]] = field(default_factory=dict)  # worst sequences' frames
    rendered: str | None = None  # its HTML, once its pictures are written


def composite(frame: StripFrame) -> np.ndarray:
    """The frame with the prediction tinted and the ground truth outlined, beside the flow image."""
    rgb = read_rgb(frame.image).astype(np.float32)
    predicted = read_mask(frame.prediction, "nonzero").astype(bool)
    rgb[predicted] = 0.5 * rgb[predicted] + 0.5 * PREDICTION
    rgb = rgb.astype(np.uint8)
    if frame.truth is not None:
        truth = read_mask(frame.truth, frame.mask_rule)
        rgb[cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) == 1] = TRUTH
    both = np.concatenate([rgb, read_rgb(frame.flow)], axis=1)
    width = round(both.shape[1] * TILE_HEIGHT / both.shape[0])
    return cv2.resize(both, (width, TILE_HEIGHT), interpolation=cv2.INTER_AREA)


def _value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _dataset_html(report: DatasetReport, files: Path, page: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_value(v)}</td><td>{html.escape(report.protocols.get(k, ''))}"
                   "</td></tr>" for k, v in report.metrics.items())
    parts = [f"<h2>{html.escape(report.title)}</h2>", "<table><tr><th>figure</th><th>value</th><th>protocol</th>"
             f"</tr>{rows}</table>"]
    figures = {k for values in report.sequences.values() for k in values}
    columns = [report.worst_by] * (report.worst_by in figures) + sorted(figures - {report.worst_by})
    order = sorted(report.sequences, key=lambda s: report.sequences[s].get(report.worst_by, float("inf")))
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(s)}</td>" + "".join(
        f"<td>{_value(report.sequences[s].get(c, '-'))}</td>" for c in columns) + "</tr>" for s in order)
    parts.append(f"<h3>Sequences, worst {html.escape(report.worst_by)} first ({len(order)})</h3>"
                 f"<table><tr><th>sequence</th>{header}</tr>{body}</table>")
    for sequence, frames in report.strips.items():
        tiles = []
        for frame in frames:
            picture = files / f"{sequence.replace('/', '_')}_{frame.name}.jpg"
            save_image_atomic(Image.fromarray(composite(frame)), picture, durable=False, quality=90)
            tiles.append(f'<figure><img src="{html.escape(picture.relative_to(page.parent).as_posix())}" '
                         f'alt="{html.escape(sequence)} {html.escape(frame.name)}"><figcaption>'
                         f"{html.escape(frame.name)}</figcaption></figure>")
        figure = report.sequences.get(sequence, {}).get(report.worst_by)
        parts.append(f"<h3>{html.escape(sequence)}: {html.escape(report.worst_by)} {_value(figure)}</h3>"
                     f"<div class=strip>{''.join(tiles)}</div>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0}figcaption{font-size:small;color:#555}.key{color:#555}"""


def write_report(path, datasets: list[DatasetReport], title: str) -> Path:
    """Write the page (and its pictures in PATH_files/); returns its path."""
    page = Path(path)
    files = page.with_name(page.stem + "_files")
    key = ("<p class=key>Strips: the predicted mask tinted red over each frame, the ground truth outlined in "
           "green, the flow image beside.</p>")
    for i, report in enumerate(datasets):  # a page rewritten after each dataset draws each one once
        if report.rendered is None:
            report.rendered = _dataset_html(report, files / f"{i}", page)
    body = "\n".join(report.rendered for report in datasets)
    write_text_atomic(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{key}\n{body}</body></html>\n",
                      page)
    return page
