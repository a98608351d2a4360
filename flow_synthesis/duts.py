"""Convert DUTS (DUTS-TR-Image/*.jpg, DUTS-TR-Mask/*.png) into DUTSv2 (image, synthetic flow, mask).

Depth comes from a source of flow_synthesis.depth; an estimator's maps are kept in a DepthCache and
reused. Every output is written atomically, and OUT/manifest.jsonl gets one line per finished image
(its name, the SHA-1 of its image and mask, the depth source and the flow parameters drawn) once all its
files are in place. A restart keeps an image only if its line matches the image and mask as they are
now and its files decode fully; anything else, including a truncated file or an edited image, is redone.
The run's settings are kept in OUT/synthesis.json, and a restart with different settings is refused.

Under torchrun the images are shared out over the processes. Each writes its own part of the manifest
(manifest.<rank>.jsonl) as it goes; at the end the first process merges every part into manifest.jsonl
in image order, so the files are those one process writes, and a run stopped part-way resumes with any
number of processes.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from flow_synthesis.depth import DepthCache
from flow_synthesis.depth_to_flow import SynthesisConfig, params_record, synthesise
from utils import distributed
from utils.errors import UserError
from utils.flow_viz import flow_to_rgb
from utils.io import (
    append_line,
    copy_file_atomic,
    file_digest,
    image_is_complete,
    json_text,
    read_image,
    save_image_atomic,
    write_json_atomic,
    write_text_atomic,
)
from utils.palette import read_mask
from utils.progress import progress as progress_bar

IMAGE_DIR, MASK_DIR = "DUTS-TR-Image", "DUTS-TR-Mask"


@dataclass
class Report:
    done: int = 0
    resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, why)


def list_duts(duts_root: Path) -> list[str]:
    for sub in (IMAGE_DIR, MASK_DIR):
        if not (duts_root / sub).is_dir():
            raise UserError(f"missing folder {duts_root / sub} (expected DUTS-TR/{IMAGE_DIR}/*.jpg and "
                            f"DUTS-TR/{MASK_DIR}/*.png)")
    stems = sorted(p.stem for p in (duts_root / IMAGE_DIR).glob("*.jpg"))
    if not stems:
        raise UserError(f"no .jpg images in {duts_root / IMAGE_DIR}")
    return stems


def _outputs(out_root: Path, stem: str) -> list[Path]:
    return [out_root / "JPEGImages" / f"{stem}.jpg", out_root / "JPEGFlows" / f"{stem}.jpg",
            out_root / "Annotations" / f"{stem}.png"]


def _inputs(duts_root: Path, stem: str) -> tuple[Path, Path]:
    return duts_root / IMAGE_DIR / f"{stem}.jpg", duts_root / MASK_DIR / f"{stem}.png"


def _records(out_root: Path) -> dict[str, dict]:
    """Manifest lines by image, from manifest.jsonl and the parts of a run that stopped (the latest wins)."""
    records = {}
    for path in [out_root / "manifest.jsonl", *sorted(out_root.glob("manifest.*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["image"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill; that image is redone
    return records


def _finished(duts_root: Path, out_root: Path, stems: list[str], records: dict) -> set[str]:
    """Images whose manifest line matches their image and mask as they are now, and whose outputs decode."""
    done = set()
    for stem in stems:
        record = records.get(stem)
        if record is None:
            continue
        image, mask = _inputs(duts_root, stem)
        if (record.get("image_sha1"), record.get("mask_sha1")) == (file_digest(image), file_digest(mask)) and \
                all(image_is_complete(p) for p in _outputs(out_root, stem)):
            done.add(stem)
    return done


def _check_settings(out_root: Path, settings: dict) -> None:
    path = out_root / "synthesis.json"
    settings = json.loads(json_text(settings))  # tuples compare as the lists they are stored as
    if path.is_file():
        if json.loads(path.read_text()) != settings:
            raise UserError(f"{out_root} was made with other settings ({path}); use a new --out or the same "
                            f"settings to resume")
    else:
        write_json_atomic(settings, path)


def _append(manifest: Path, record: dict) -> None:
    append_line(manifest, json_text(record), durable=True)


def _merge(out_root: Path, stems: list[str], skipped: list[tuple[str, str]]) -> None:
    """One manifest.jsonl in image order (the parts removed), and skipped.tsv, as one process writes them."""
    records = _records(out_root)
    write_text_atomic("".join(json_text(records[s]) + "\n" for s in stems if s in records),
                      out_root / "manifest.jsonl")
    for part in out_root.glob("manifest.*.jsonl"):
        part.unlink()
    if skipped:
        order = {s: i for i, s in enumerate(stems)}
        write_text_atomic("".join(f"{s}\t{why}\n" for s, why in sorted(skipped, key=lambda x: order[x[0]])),
                          out_root / "skipped.tsv")


def convert(duts_root, out_root, depth_source, *, seed: int = 0, config: SynthesisConfig | None = None,
            batch_size: int = 4, cache_dir=None, progress: bool = True,
            ctx: distributed.Context | None = None) -> Report:
    """Write DUTSv2 under out_root; this process's report (under torchrun, its share of the images)."""
    duts_root, out_root = Path(duts_root), Path(out_root)
    ctx = ctx or distributed.Context(0, 1, None)
    config = config or SynthesisConfig()
    stems = list_duts(duts_root)
    if out_root.resolve() == duts_root.resolve() or out_root.resolve().is_relative_to(duts_root.resolve() / IMAGE_DIR):
        raise UserError(f"--out {out_root} would write into the DUTS images it reads; choose another folder")
    if ctx.is_main:
        out_root.mkdir(parents=True, exist_ok=True)
        _check_settings(out_root, {"seed": seed, "config": asdict(config), "depth": depth_source.name})
    distributed.barrier(ctx)
    finished = _finished(duts_root, out_root, stems, _records(out_root))
    todo = [s for s in stems if s not in finished]
    mine = todo[ctx.rank::ctx.world_size]
    report = Report(resumed=len(finished) if ctx.is_main else 0)
    cache = DepthCache(cache_dir, depth_source.name) if cache_dir is not None else None
    manifest = out_root / f"manifest.{ctx.rank}.jsonl"
    with progress_bar(len(mine), "DUTS -> DUTSv2", unit="image", enabled=progress) as bar:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            for record in _convert_batch(duts_root, out_root, chunk, depth_source, cache, seed, config, report):
                _append(manifest, record)
                report.done += 1
            bar.update(len(chunk))
    skipped = distributed.gather_to_main(report.skipped, ctx)
    if ctx.is_main:
        _merge(out_root, stems, [s for part in skipped for s in part])
    distributed.barrier(ctx)
    return report


def _convert_batch(duts_root, out_root, stems, depth_source, cache, seed, config, report) -> list[dict]:
    """Convert these images; the manifest records of those converted (the others go to report.skipped)."""
    batch = []
    for stem in stems:
        image_path, mask_path = _inputs(duts_root, stem)
        try:
            mask = read_mask(mask_path, "grey")
            rgb = np.asarray(read_image(image_path, "RGB"))
        except UserError as err:
            report.skipped.append((stem, str(err)))
            continue
        if not mask.any():
            report.skipped.append((stem, "empty mask"))
        elif mask.shape != rgb.shape[:2]:
            report.skipped.append((stem, f"mask {mask.shape} and image {rgb.shape[:2]} differ in size"))
        else:
            batch.append((stem, rgb, mask, file_digest(image_path), file_digest(mask_path)))
    depths = _depths(batch, depth_source, cache)
    records = []
    for (stem, _rgb, mask, image_sha1, mask_sha1), depth in zip(batch, depths):
        flow, params = synthesise(depth, mask, stem, seed, config)
        image_out, flow_out, mask_out = _outputs(out_root, stem)
        image_in, mask_in = _inputs(duts_root, stem)
        copy_file_atomic(image_in, image_out)
        copy_file_atomic(mask_in, mask_out)
        save_image_atomic(Image.fromarray(flow_to_rgb(flow)), flow_out, quality=95)
        records.append({**params_record(stem, params), "image_sha1": image_sha1, "mask_sha1": mask_sha1,
                        "depth": depth_source.name})
    return records


def _depths(batch, depth_source, cache) -> list[np.ndarray]:
    """Each image's depth: from the cache where it holds this image's map, else estimated (and cached)."""
    if cache is None:
        return depth_source([b[0] for b in batch], [b[1] for b in batch]) if batch else []
    depths = {b[0]: cache.get(b[0], b[3]) for b in batch}
    missing = [b for b in batch if depths[b[0]] is None]
    if missing:
        for b, depth in zip(missing, depth_source([b[0] for b in missing], [b[1] for b in missing])):
            depths[b[0]] = cache.put(b[0], b[3], depth)
    return [depths[b[0]] for b in batch]
