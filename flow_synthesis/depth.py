"""Where the synthesis gets depth: an estimator (DPT-Hybrid, the paper's; DPT-Large; Depth Anything V2) or
maps the user made, and the cache that keeps every estimated map.

Every source gives relative inverse depth (larger = nearer) at the image's size, and has a `name` that the
synthesis records. Estimated maps are kept in a DepthCache: a new set of conversion parameters then costs
only the conversion, not another pass of the estimator over 10,553 images.
"""

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.io import atomic_file, image_is_complete, json_text, read_image, save_image_atomic

# --depth-model name -> the official weight file
DEPTH_MODELS = {
    "dpt-hybrid": "dpt_hybrid-midas-501f0c75.pt",
    "dpt-large": "dpt_large-midas-2f21e586.pt",
    "depth-anything-v2-small": "depth_anything_v2_vits.pth",
    "depth-anything-v2-base": "depth_anything_v2_vitb.pth",
    "depth-anything-v2-large": "depth_anything_v2_vitl.pth",
}


class DepthFolder:
    """Precomputed depth maps: DIR/<stem>.npy (float) or DIR/<stem>.png (8/16-bit); larger = nearer.
    Maps at another resolution are resized (bilinear) to their image's."""

    def __init__(self, folder: Path, stems: list[str]):
        self.folder = Path(folder)
        self.name = f"maps from {self.folder.resolve()}"
        if not self.folder.is_dir():
            raise UserError(f"--depth-dir {folder} does not exist")
        for stem in stems:
            if not self._path(stem):
                raise UserError(f"no depth map for {stem}: expected {self.folder / stem}.png or .npy")

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


class ModelDepth:
    """An estimator loaded from its official weight file."""

    def __init__(self, model_name: str, weights, device):
        if model_name not in DEPTH_MODELS:
            raise UserError(f"--depth-model {model_name!r}: expected one of {', '.join(DEPTH_MODELS)}")
        if model_name.startswith("dpt-"):
            from flow_synthesis.dpt import load_dpt, predict_depth

            self.model = load_dpt(weights, model_name.removeprefix("dpt-")).to(device)
        else:
            from flow_synthesis.depth_anything import load_depth_anything, predict_depth

            self.model = load_depth_anything(weights, model_name.removeprefix("depth-anything-v2-")).to(device)
        self._predict = predict_depth
        self.device = device
        self.name = f"{model_name} ({Path(weights).name})"

    def __call__(self, stems, images):
        return self._predict(self.model, images, self.device)


class DepthCache:
    """Estimated maps on disk, reused only when they provably come from the same image and estimator.

    DIR/<stem>.png holds a map min-max normalised to 16 bits (the synthesis normalises depth the same way,
    so nothing it uses is lost but a rounding of 1/65535); DIR/<stem>.json records the estimator and the
    image's SHA-1. The synthesis always reads the map back from here, so a first run and a rerun make the
    same flows."""

    def __init__(self, folder: Path, source_name: str):
        self.folder, self.source_name = Path(folder), source_name

    def get(self, stem: str, image_digest: str) -> np.ndarray | None:
        record, png = self.folder / f"{stem}.json", self.folder / f"{stem}.png"
        try:
            kept = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if kept != {"model": self.source_name, "image_sha1": image_digest} or not image_is_complete(png):
            return None
        return np.asarray(Image.open(png), dtype=np.float32) / 65535

    def put(self, stem: str, image_digest: str, depth: np.ndarray) -> np.ndarray:
        d = depth.astype(np.float64) - float(depth.min())
        d16 = np.round(d / max(float(d.max()), 1e-12) * 65535).astype(np.uint16)
        # Not flushed to disk: a map lost to a power cut is estimated again.
        save_image_atomic(Image.fromarray(d16), self.folder / f"{stem}.png", durable=False)
        with atomic_file(self.folder / f"{stem}.json", durable=False) as f:
            f.write((json_text({"model": self.source_name, "image_sha1": image_digest}) + "\n").encode())
        return d16.astype(np.float32) / 65535
