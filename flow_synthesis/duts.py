"""Convert DUTS (DUTS-TR-Image/*.jpg, DUTS-TR-Mask/*.png) into DUTSv2 (image, synthetic flow, mask).

Resumable: every output is written atomically, and OUT/manifest.jsonl gets one line per finished image
(its flow parameters) only after all its files are in place. A restart skips images whose manifest line
exists and whose files decode fully; anything else, including a truncated file, is redone. The run's
settings are kept in OUT/synthesis.json, and a restart with different settings is refused.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from flow_synthesis.depth_to_flow import SynthesisConfig, params_record, synthesise
from utils.errors import UserError
from utils.flow_viz import flow_to_rgb
from utils.io import atomic_path, image_is_complete, read_image, save_image_atomic, write_text_atomic
from utils.palette import read_mask

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


class DepthFolder:
    """Precomputed depth maps: DIR/<stem>.npy (float) or DIR/<stem>.png (8/16-bit); larger = nearer.
    Maps at another resolution are resized (bilinear) to their image's."""

    def __init__(self, folder: Path, stems: list[str]):
        self.folder = folder
        if not folder.is_dir():
            raise UserError(f"--depth-dir {folder} does not exist")
        for stem in stems:
            if not self._path(stem):
                raise UserError(f"no depth map for {stem}: expected {folder / stem}.png or .npy")

    def _path(self, stem):
        for ext in (".npy", ".png"):
            if (self.folder / f"{stem}{ext}").is_file():
                return self.folder / f"{stem}{ext}"
        return None

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        if path.suffix == ".png":
            return np.asarray(read_image(path), dtype=np.float32)
        try:
            depth = np.load(path, allow_pickle=False)  # a pickled .npy could run code
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"depth map {path} is not a plain numeric .npy array ({err})") from None
        if not isinstance(depth, np.ndarray) or not np.issubdtype(depth.dtype, np.number):
            raise UserError(f"depth map {path} holds {getattr(depth, 'dtype', type(depth))}, expected numbers")
        return depth.astype(np.float32)

    def __call__(self, stems, images):
        out = []
        for stem, rgb in zip(stems, images):
            path = self._path(stem)
            depth = np.squeeze(self._read(path))
            if depth.ndim != 2:
                raise UserError(f"depth map {path} has shape {depth.shape}, expected one channel (H x W)")
            if not np.isfinite(depth).all():
                raise UserError(f"depth map {path} holds NaN or infinite values (expected finite depths)")
            if depth.shape != rgb.shape[:2]:  # other estimators may work at their own resolution
                depth = cv2.resize(depth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
            out.append(depth)
        return out


class DPTDepth:
    def __init__(self, weights, variant, device):
        from flow_synthesis.dpt import load_dpt

        self.model = load_dpt(weights, variant).to(device)
        self.device = device

    def __call__(self, stems, images):
        from flow_synthesis.dpt import predict_depth

        return predict_depth(self.model, images, self.device)


def _finished(out_root: Path) -> set[str]:
    manifest = out_root / "manifest.jsonl"
    if not manifest.is_file():
        return set()
    stems = set()
    for line in manifest.read_text().splitlines():
        try:
            stems.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill; that image is redone
    return {s for s in stems if all(image_is_complete(p) for p in _outputs(out_root, s))}


def _outputs(out_root: Path, stem: str) -> list[Path]:
    return [out_root / "JPEGImages" / f"{stem}.jpg", out_root / "JPEGFlows" / f"{stem}.jpg",
            out_root / "Annotations" / f"{stem}.png"]


def _check_settings(out_root: Path, settings: dict) -> None:
    path = out_root / "synthesis.json"
    settings = json.loads(json.dumps(settings))  # tuples compare as the lists they are stored as
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise UserError(f"{out_root} was made with other settings ({path}); use a new --out or the same "
                            f"settings to resume")
    else:
        write_text_atomic(json.dumps(settings, indent=2) + "\n", path)


def _append(manifest: Path, record: dict) -> None:
    with open(manifest, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def convert(duts_root, out_root, depth_source, *, seed: int = 0, config: SynthesisConfig | None = None,
            save_depth=None, batch_size: int = 4, settings: dict | None = None, progress: bool = True) -> Report:
    duts_root, out_root = Path(duts_root), Path(out_root)
    config = config or SynthesisConfig()
    stems = list_duts(duts_root)
    out_root.mkdir(parents=True, exist_ok=True)
    _check_settings(out_root, {"seed": seed, "config": asdict(config), **(settings or {})})
    finished = _finished(out_root)
    report = Report(resumed=len(finished & set(stems)))
    todo = [s for s in stems if s not in finished]
    manifest = out_root / "manifest.jsonl"
    with tqdm(total=len(stems), initial=report.resumed, unit="image", desc="DUTS -> DUTSv2",
              disable=None if progress else True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = []
            for stem in todo[start:start + batch_size]:
                try:
                    mask = read_mask(duts_root / MASK_DIR / f"{stem}.png", "grey")
                    rgb = np.asarray(read_image(duts_root / IMAGE_DIR / f"{stem}.jpg", "RGB"))
                except UserError as err:
                    report.skipped.append((stem, str(err)))
                    continue
                if not mask.any():
                    report.skipped.append((stem, "empty mask"))
                    continue
                if mask.shape != rgb.shape[:2]:
                    report.skipped.append((stem, f"mask {mask.shape} and image {rgb.shape[:2]} differ in size"))
                    continue
                batch.append((stem, rgb, mask))
            depths = depth_source([b[0] for b in batch], [b[1] for b in batch]) if batch else []
            for (stem, _rgb, mask), depth in zip(batch, depths):
                flow, params = synthesise(depth, mask, stem, seed, config)
                image_out, flow_out, mask_out = _outputs(out_root, stem)
                with atomic_path(image_out) as tmp:
                    shutil.copyfile(duts_root / IMAGE_DIR / f"{stem}.jpg", tmp)
                with atomic_path(mask_out) as tmp:
                    shutil.copyfile(duts_root / MASK_DIR / f"{stem}.png", tmp)
                save_image_atomic(Image.fromarray(flow_to_rgb(flow)), flow_out, quality=95)
                if save_depth is not None:
                    d = depth - depth.min()
                    d16 = np.round(d / max(float(d.max()), 1e-12) * 65535).astype(np.uint16)
                    save_image_atomic(Image.fromarray(d16), Path(save_depth) / f"{stem}.png")
                _append(manifest, params_record(stem, params))
                report.done += 1
            bar.update(len(todo[start:start + batch_size]))
    if report.skipped:
        write_text_atomic("".join(f"{s}\t{why}\n" for s, why in report.skipped), out_root / "skipped.tsv")
    return report
