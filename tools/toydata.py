"""Small synthetic versions of every dataset of dataset.DATASETS, in exactly their layouts (docs/data.md).

    python -m tools.toydata ROOT [--seed S --size HxW --videos N --frames F --datasets davis,fbms,...
                                  --sparse-form blank|kept|missing]

The layouts come from the DatasetSpecs themselves, so a new entry of DATASETS gets toy data with no edit
here. Each video is a textured background seen by a moving camera, with a textured object that moves on
its own. The flow image is rendered from the true motion with the colour wheel; masks are palette
images for "nonzero" datasets and grey 0/255 images for "grey" ones. Sparsely annotated sets (FBMS,
YouTube-Objects, Long-Videos) annotate every third frame and the last, in one of the forms the authors'
archives hold (--sparse-form); names never hold what the authors' loaders split on. DUTS-TR also comes in
its original layout with a depth map (16-bit PNG disparity, nearer = larger) per image, the input of
flow_synthesis. Deterministic for a seed; a default tree takes seconds.

ROOT must be empty or new, or hold toy data this program wrote (with --overwrite): it never writes into
a folder holding real data.
"""

import argparse
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dataset import DATASETS, DatasetSpec
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.flow_viz import flow_to_rgb
from utils.io import save_image_atomic, write_text_atomic
from utils.palette import save_palette_mask

DUTS_TR = "duts_tr"  # DUTS-TR in its original layout, with depth maps: the input of python -m flow_synthesis
MARKER = ".toydata"  # written into ROOT: the folder holds toy data only
BACKGROUND_SATURATION = 0.0  # grey backgrounds, colourful objects: a cue a small network learns in seconds


def texture(rng: np.random.Generator, h: int, w: int, saturation: float) -> np.ndarray:
    """HxWx3 uint8 smooth colour noise at three scales; `saturation` 0 gives grey, 1 full colour."""
    out = np.zeros((h, w, 3), np.float32)
    for cell, weight in ((24, 0.5), (8, 0.3), (3, 0.2)):
        coarse = rng.random((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        out += weight * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + saturation * (out - grey)
    tint = rng.random(3).astype(np.float32)
    out = 0.6 * out + 0.4 * tint * saturation + 0.4 * grey * (1 - saturation)
    return np.clip(out * 255, 0, 255).astype(np.uint8)


def ellipse_mask(h, w, center, radii) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1).astype(np.uint8)


@dataclass
class ToyVideo:
    frames: list[np.ndarray]  # HxWx3 uint8
    flows: list[np.ndarray]  # HxWx2 float32, frame t -> t+1 (the last frame repeats the previous pair's flow)
    masks: list[np.ndarray]  # HxW 0/1 uint8


def render_video(rng: np.random.Generator, h: int, w: int, n: int) -> ToyVideo:
    margin = 4 * n + 8
    background = texture(rng, h + 2 * margin, w + 2 * margin, saturation=BACKGROUND_SATURATION)
    cam_v = rng.integers(-3, 4, size=2)
    cam = [np.array([margin, margin]) + t * cam_v for t in range(n + 1)]
    radii = rng.uniform(0.18, 0.3, size=2) * np.array([h, w])
    sprite = texture(rng, h, w, saturation=1.0)
    pos = rng.uniform(radii + 1, np.array([h, w]) - radii - 1)
    vel = rng.uniform(2, 4, size=2) * rng.choice([-1, 1], size=2)
    centers = []
    for _ in range(n + 1):
        centers.append(np.round(pos).astype(int))
        for axis in range(2):
            nxt = pos[axis] + vel[axis]
            if nxt < radii[axis] or nxt > (h, w)[axis] - radii[axis]:
                vel[axis] = -vel[axis]
            pos[axis] += vel[axis]
    frames, flows, masks = [], [], []
    for t in range(n):
        cy, cx = cam[t]
        frame = background[cy:cy + h, cx:cx + w].copy()
        mask = ellipse_mask(h, w, centers[t], radii)
        shift = centers[t] - np.array([h // 2, w // 2])
        moved = np.roll(sprite, shift=tuple(shift), axis=(0, 1))
        frame[mask == 1] = moved[mask == 1]
        flow = np.empty((h, w, 2), np.float32)
        flow[...] = -(cam[t + 1] - cam[t])[::-1]  # background moves against the camera; (dx, dy) order
        flow[mask == 1] = (centers[t + 1] - centers[t])[::-1]
        frames.append(frame)
        flows.append(flow)
        masks.append(mask)
    flows[-1] = flows[-2] if n > 1 else flows[-1]
    return ToyVideo(frames, flows, masks)


def render_still(rng: np.random.Generator, h: int, w: int):
    """A DUTS-like still: image, 0/1 mask, disparity in [0, 1] (nearer = larger), and a flow from true motion."""
    image = texture(rng, h, w, saturation=BACKGROUND_SATURATION)
    radii = rng.uniform(0.2, 0.3, size=2) * np.array([h, w])
    center = rng.uniform(radii + 1, np.array([h, w]) - radii - 1)
    mask = ellipse_mask(h, w, center, radii)
    sprite = texture(rng, h, w, saturation=1.0)
    image[mask == 1] = sprite[mask == 1]
    ground = np.linspace(0.1, 0.6, h, dtype=np.float32)[:, None].repeat(w, axis=1)
    disparity = np.where(mask == 1, rng.uniform(0.8, 1.0), ground).astype(np.float32)
    camera = rng.uniform(-6, 6, size=2).astype(np.float32)
    flow = disparity[..., None] * camera
    flow[mask == 1] += rng.uniform(-4, 4, size=2).astype(np.float32)
    return image, mask, disparity, flow


def _save_jpg(array, path):
    save_image_atomic(Image.fromarray(array), path, quality=95)


# How a sparsely annotated set (DatasetSpec.sparse) is written: "blank" (a mask for every frame, blank where the
# frame is not annotated) and "kept" (only the annotated frames, with their flows and masks) are the two forms
# the authors' archives and loaders hold; "missing" (every frame, masks on the annotated ones only) is a third
# form users build, which this project reads alike and the authors' loaders mis-pair.
SPARSE_FORMS = ("blank", "kept", "missing")
ANNOTATE_EVERY = 3  # a sparse set annotates every third frame and the last


def write_video(video: ToyVideo, root: Path, spec: DatasetSpec, rel: str, stems: list[str], form: str) -> None:
    last = len(stems) - 1
    for t, stem in enumerate(stems):
        annotated = not spec.sparse or t % ANNOTATE_EVERY == 0 or t == last
        if not annotated and form == "kept":
            continue
        _save_jpg(video.frames[t], root / spec.images / rel / f"{stem}.jpg")
        _save_jpg(flow_to_rgb(video.flows[t]), root / spec.flows / rel / f"{stem}.jpg")
        if annotated or form == "blank":
            mask = video.masks[t] if annotated else np.zeros_like(video.masks[t])
            _save_mask(mask, root / spec.masks / rel / f"{stem}.png", spec)


def _save_mask(mask: np.ndarray, path: Path, spec: DatasetSpec) -> None:
    if spec.mask_rule == "nonzero":
        save_palette_mask(mask, path)
    else:
        save_image_atomic(Image.fromarray(mask * 255), path)


def write_dataset(spec: DatasetSpec, root: Path, rng, h: int, w: int, videos: int, frames: int,
                  form: str = "blank") -> None:
    """Toy data for one DatasetSpec under root / spec.folder."""
    base = root / spec.folder
    if spec.flat:
        for i in range(8 * videos):
            image, mask, _, flow = render_still(rng(spec.name, i), h, w)
            stem = f"{spec.name}_{i:05d}"
            _save_jpg(image, base / spec.images / f"{stem}.jpg")
            _save_jpg(flow_to_rgb(flow), base / spec.flows / f"{stem}.jpg")
            _save_mask(mask, base / spec.masks / f"{stem}.png", spec)
        return
    names = [f"{spec.name}_{i:02d}" for i in range(videos)]
    if spec.grouped:  # <class>/<video>, with no '_' in either name: the authors' loader splits on it
        groups = spec.groups or ("groupa", "groupb")
        names = [f"{g}/{i + 1:04d}" for k, g in enumerate(groups) for i in range(videos if k == 0 else 1)]
    if spec.video_list:
        write_text_atomic("\n".join(names) + "\n", base / spec.video_list)
    stems = [f"{t:05d}" for t in range(frames)]
    for i, name in enumerate(names):
        write_video(render_video(rng(spec.name, i), h, w, frames), base, spec, name, stems, form)


def write_duts_tr(root: Path, rng, h: int, w: int, videos: int) -> None:
    """DUTS-TR's own layout (images, grey masks) with a disparity map per image in DUTS-TR-Depth."""
    for i in range(8 * videos):
        image, mask, disparity, _ = render_still(rng(DUTS_TR, i), h, w)
        stem = f"duts_tr_{i:05d}"
        _save_jpg(image, root / "DUTS-TR/DUTS-TR-Image" / f"{stem}.jpg")
        save_image_atomic(Image.fromarray(mask * 255), root / "DUTS-TR/DUTS-TR-Mask" / f"{stem}.png")
        depth16 = np.round(disparity * 65535).astype(np.uint16)
        save_image_atomic(Image.fromarray(depth16), root / "DUTS-TR/DUTS-TR-Depth" / f"{stem}.png")


def claim_root(root: Path, overwrite: bool) -> None:
    """ROOT must be new or empty, or hold toy data (its marker) that --overwrite replaces."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; expected a folder for the toy datasets")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise UserError(f"{root} already holds files that toydata did not write (real datasets?); it writes "
                            "only into a new or empty folder")
        if not overwrite:
            raise UserError(f"{root} holds toy data already; pass --overwrite to write it afresh, or another folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("toy datasets written by python -m tools.toydata\n")


def all_choices() -> tuple[str, ...]:
    return (*DATASETS, DUTS_TR)


def generate(root, seed: int = 0, size: tuple[int, int] = (96, 128), videos: int = 3, frames: int = 12,
             datasets=None, overwrite: bool = False, sparse_form: str = "blank") -> Path:
    """Toy data for `datasets` (default: every entry of DATASETS, and DUTS-TR with depth) under root;
    sparsely annotated sets in `sparse_form` (SPARSE_FORMS)."""
    if sparse_form not in SPARSE_FORMS:
        raise ValueError(f"unknown sparse form {sparse_form!r}; expected one of {SPARSE_FORMS}")
    root = Path(root)
    claim_root(root, overwrite)
    h, w = size

    def rng(name: str, index: int):
        return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4]), index])

    for name in datasets or all_choices():
        if name == DUTS_TR:
            write_duts_tr(root, rng, h, w, videos)
        else:
            write_dataset(DATASETS[name], root, rng, h, w, videos, frames, sparse_form)
    return root


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected HxW, for example 96x128") from None
    if h < 32 or w < 32:
        raise UserError(f"--size {text!r}: both sides must be at least 32")
    return h, w


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a new or empty folder to write the datasets into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="96x128", help="frame size HxW (default 96x128)")
    parser.add_argument("--videos", type=int, default=3, help="videos per dataset and split (default 3)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    parser.add_argument("--datasets", default=",".join(all_choices()),
                        help=f"comma-separated subset of {','.join(all_choices())}")
    parser.add_argument("--sparse-form", choices=SPARSE_FORMS, default="blank",
                        help="how FBMS, YouTube-Objects and Long-Videos hold their sparse annotation: blank (a mask "
                             "for every frame, blank where not annotated; the default), kept (only the annotated "
                             "frames) or missing (every frame, masks on the annotated ones only)")
    parser.add_argument("--overwrite", action="store_true", help="replace toy data an earlier run wrote in ROOT")
    args = parser.parse_args(argv)
    chosen = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if unknown := sorted(set(chosen) - set(all_choices())):
        raise UserError(f"--datasets: unknown {unknown}; expected names from {','.join(all_choices())}")
    if args.videos < 1 or args.frames < 3:
        raise UserError("--videos must be at least 1 and --frames at least 3")
    root = generate(args.root, args.seed, _parse_size(args.size), args.videos, args.frames, chosen, args.overwrite,
                    args.sparse_form)
    print(f"wrote toy datasets ({', '.join(chosen)}) to {root}")


if __name__ == "__main__":
    main()
