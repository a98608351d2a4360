"""Small synthetic versions of every dataset, in exactly the real layouts (README, 'Data').

    python -m tools.toydata ROOT [--seed S --size HxW --videos N --frames F --datasets davis,fbms,...]

Each video is a textured background seen by a moving camera, with a textured object that moves on its
own. The flow image is rendered from the true motion with the colour wheel; masks are palette or grey
images as each real dataset stores them, and FBMS and YouTube-Objects leave some frames un-annotated.
DUTS-TR comes in its original layout with a depth map (16-bit PNG disparity, nearer = larger) per image,
the input of flow_synthesis; DUTSv2 is the pre-processed layout with flows from the true motion.
Deterministic for a seed; a default tree takes seconds.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dataset import YTOBJ_CLASSES
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.flow_viz import flow_to_rgb
from utils.io import save_image_atomic, write_text_atomic
from utils.palette import save_palette_mask

ALL = ("davis", "ytvos", "fbms", "ytobj", "lvid", "duts")


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
    background = texture(rng, h + 2 * margin, w + 2 * margin, saturation=0.35)
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
    image = texture(rng, h, w, saturation=0.35)
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


def write_video(video: ToyVideo, root: Path, images: str, flows: str, masks: str, rel: str, *, mask_style: str,
                stems: list[str], annotate_every: int = 1) -> None:
    for t, stem in enumerate(stems):
        _save_jpg(video.frames[t], root / images / rel / f"{stem}.jpg")
        _save_jpg(flow_to_rgb(video.flows[t]), root / flows / rel / f"{stem}.jpg")
        if t % annotate_every == 0 or t == len(stems) - 1:
            path = root / masks / rel / f"{stem}.png"
            if mask_style == "palette":
                save_palette_mask(video.masks[t], path)
            else:
                save_image_atomic(Image.fromarray(video.masks[t] * 255), path)


def generate(root, seed: int = 0, size: tuple[int, int] = (96, 128), videos: int = 3, frames: int = 12,
             datasets=ALL) -> Path:
    root = Path(root)
    h, w = size

    def rng(*key):
        return np.random.default_rng([seed, *key])

    def clip(key, n=frames):
        return render_video(rng(*key), h, w, n)

    numbered = [f"{i:05d}" for i in range(frames)]
    if "davis" in datasets:
        for split_id, split in enumerate(("train", "val")):
            names = [f"{split}{i:02d}" for i in range(videos)]
            write_text_atomic("\n".join(names) + "\n", root / "DAVIS/ImageSets/2016" / f"{split}.txt")
            for i, name in enumerate(names):
                write_video(clip((1, split_id, i)), root / "DAVIS", "JPEGImages/480p", "JPEGFlows/480p",
                            "Annotations/480p", name, mask_style="palette", stems=numbered)
    if "ytvos" in datasets:
        names = [f"yt{i:04d}" for i in range(videos)]
        write_text_atomic("\n".join(names) + "\n", root / "YTVOS18/ImageSets/train.txt")
        for i, name in enumerate(names):
            write_video(clip((2, i)), root / "YTVOS18", "train/JPEGImages", "train/JPEGFlows", "train/Annotations",
                        name, mask_style="palette", stems=[f"{5 * t:05d}" for t in range(frames)])
    if "fbms" in datasets:
        for i in range(videos):
            write_video(clip((3, i)), root / "FBMS", "TestSet/JPEGImages", "TestSet/JPEGFlows", "TestSet/Annotations",
                        f"fbms{i:02d}", mask_style="grey", stems=numbered, annotate_every=4)
    if "ytobj" in datasets:
        for c, cls in enumerate(YTOBJ_CLASSES):
            names = ["0001", "0002_b"] if c == 0 else ["0001"]
            for i, name in enumerate(names):
                write_video(clip((4, c, i)), root / "YTOBJ", "JPEGImages", "JPEGFlows", "Annotations",
                            f"{cls}/{name}", mask_style="grey", stems=numbered, annotate_every=3)
    if "lvid" in datasets:
        for i in range(videos):
            write_video(clip((5, i)), root / "LVID", "JPEGImages", "JPEGFlows", "Annotations", f"lvid{i:02d}",
                        mask_style="palette", stems=numbered, annotate_every=2)
    if "duts" in datasets:
        for i in range(8 * videos):
            image, mask, disparity, flow = render_still(rng(6, i), h, w)
            stem = f"ILSVRC2012_test_{i:08d}"
            for folder in ("DUTS-TR/DUTS-TR-Image", "DUTSv2/JPEGImages"):
                _save_jpg(image, root / folder / f"{stem}.jpg")
            for folder in ("DUTS-TR/DUTS-TR-Mask", "DUTSv2/Annotations"):
                save_image_atomic(Image.fromarray(mask * 255), root / folder / f"{stem}.png")
            depth16 = np.round(disparity * 65535).astype(np.uint16)
            save_image_atomic(Image.fromarray(depth16), root / "DUTS-TR/DUTS-TR-Depth" / f"{stem}.png")
            _save_jpg(flow_to_rgb(flow), root / "DUTSv2/JPEGFlows" / f"{stem}.jpg")
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
    parser.add_argument("root", help="folder to write the datasets into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="96x128", help="frame size HxW (default 96x128)")
    parser.add_argument("--videos", type=int, default=3, help="videos per dataset and split (default 3)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    parser.add_argument("--datasets", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    args = parser.parse_args(argv)
    chosen = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if unknown := sorted(set(chosen) - set(ALL)):
        raise UserError(f"--datasets: unknown {unknown}; expected names from {','.join(ALL)}")
    if args.videos < 1 or args.frames < 2:
        raise UserError("--videos must be at least 1 and --frames at least 2")
    root = generate(args.root, args.seed, _parse_size(args.size), args.videos, args.frames, chosen)
    print(f"wrote toy datasets ({', '.join(chosen)}) to {root}")


if __name__ == "__main__":
    main()
