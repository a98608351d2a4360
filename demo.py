"""`python run.py --demo PATH`: segment your own video (a video file or a folder of frames).

Writes, under --output (default demo_out/<video name>/):
  frames/<frame>.jpg   the decoded frames (a video file, or frames whose EXIF orientation turns them upright)
  flows/<frame>.jpg    optical flow: RAFT (--flow raft, or --raft-weights given), else OpenCV DIS
  masks/<frame>.png    DAVIS-palette masks
  source.json          the input this folder belongs to (a different input stops the run)
  overlay.mp4          the mask tinted over each frame, with the flow image beside it
  contact_sheet.png    evenly spaced overlay frames, for a quick look
"""

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from dataset import Frame, Video
from utils.errors import UserError
from utils.io import FolderLock, frame_size, list_frames, read_json, save_image_atomic, write_json_atomic
from utils.palette import save_palette_mask
from utils.progress import progress

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
TINT = np.array([255, 40, 40], np.float32)
SHEET_FRAMES = 8
SHEET_TILE_WIDTH = 640  # frame and flow side by side
DEMO_FPS = 24.0
MIN_SIDE = 16  # optical flow and the network's patch embedding need a few pixels to work on
SOURCE_RECORD = "source.json"  # which input an output folder belongs to
ORIENTATION_TAG = 0x0112  # EXIF orientation


def open_video(video_path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(video_path))
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)  # upright as players show it (a phone's rotation metadata)
    if not capture.isOpened():
        raise UserError(f"{video_path} is not a readable video file (expected one of {', '.join(VIDEO_EXTENSIONS)} "
                        f"or a folder of frames)")
    return capture


def extract_frames(video_path: Path, out_dir: Path) -> list[Path]:
    """Decode a video file to JPEG frames, streaming (never the whole video in memory), upright as players show
    them (OpenCV applies the rotation metadata phones write). A video that decodes to fewer frames than its
    header announces is damaged (truncated) and stops the run rather than give a shorter segmentation."""
    capture = open_video(video_path)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    frames = []
    with progress(total, "decoding") as bar:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            path = out_dir / f"{len(frames):05d}.jpg"
            save_image_atomic(Image.fromarray(bgr[..., ::-1]), path, quality=95)
            frames.append(path)
            bar.update(1)
    capture.release()
    if not frames:
        raise UserError(f"{video_path} holds no decodable frames (expected a video file or a folder of frames)")
    if total and len(frames) < total:
        raise UserError(f"{video_path} decodes to {len(frames)} frames, but its header announces {total}: the file is "
                        "damaged or truncated (re-encode or re-download it)")
    return frames


def upright_frames(frames: list[Path], out_dir: Path) -> list[Path]:
    """The frames as every viewer shows them: those whose EXIF orientation rotates or mirrors them are written
    upright into out_dir (a phone's photos), so masks line up with what the user sees; the rest as they are."""
    turned = []
    for path in frames:
        with Image.open(path) as image:
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
            if orientation in (0, 1):
                turned.append(path)
                continue
            upright = ImageOps.exif_transpose(image).convert("RGB")
        target = out_dir / f"{path.stem}.jpg"
        save_image_atomic(upright, target, quality=95)
        turned.append(target)
    return turned


def listed_frames(path: Path) -> list[Path] | None:
    """The frames of a folder, or None for a video file (decoded later, into the output folder)."""
    if path.is_dir():
        return list_frames(path)
    if not path.is_file():
        raise UserError(f"--demo {path}: no such file or folder")
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise UserError(f"--demo {path}: not a video file (expected {', '.join(VIDEO_EXTENSIONS)} or a folder)")
    return None


def overlay(rgb: np.ndarray, mask: np.ndarray, flow_rgb: np.ndarray) -> np.ndarray:
    tinted = rgb.astype(np.float32)
    tinted[mask == 1] = 0.45 * tinted[mask == 1] + 0.55 * TINT
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) == 1
    tinted[edge] = TINT
    return np.concatenate([tinted.astype(np.uint8), flow_rgb], axis=1)


def contact_sheet(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    blank = np.zeros_like(tiles[0])
    return np.concatenate([np.concatenate(r + [blank] * (columns - len(r)), axis=1) for r in rows], axis=0)


def claim_output(out: Path, source: Path, overwrite: bool) -> None:
    """An output folder belongs to one input: another video's flows or masks in it would be reused or mixed
    in silently. The folder records its input; a different one stops the run unless --overwrite."""
    if source.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--demo {source} lies inside the output folder {out}, whose outputs would replace or "
                        "delete it; pass another --output")
    record = out / SOURCE_RECORD
    stat = source.stat()
    here = {"source": str(source.resolve()), "size": stat.st_size if source.is_file() else None,
            "modified_ns": stat.st_mtime_ns}
    contents = [p for p in out.iterdir() if p.name != FolderLock.NAME] if out.is_dir() else []
    if record.is_file():
        previous = read_json(record)
        if previous != here:
            if not overwrite:
                raise UserError(f"{out} holds the demo of {previous.get('source')} (or of an older version of it); "
                                "pass another --output, or --overwrite to replace it")
            for path in contents:  # the lock file stays: this run holds it
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif contents:
        raise UserError(f"{out} exists and was not written by --demo; pass another --output")
    write_json_atomic(here, record)


def run_demo(args) -> Path:
    from flow_synthesis.video_flow import make_flow_backend, video_flows
    from inference import InferenceOptions, Segmenter
    from model.checkpoints import load_depthflow
    from utils.device import configure, resolve_device

    if not args.checkpoint:
        raise UserError("--demo needs --checkpoint FILE (a released DepthFlow_mitb*.pth or a --train output)")
    source = Path(args.demo)
    frames = listed_frames(source)
    if frames:  # the input is checked before the output folder is claimed for it
        height, width = frame_size(frames, min_side=MIN_SIDE)
    else:
        open_video(source).release()
    device = resolve_device(args.device)
    configure(device, args.strict_fp32)
    segmenter = Segmenter(load_depthflow(args.checkpoint, backbone=args.backbone, size=args.size),
                          InferenceOptions.from_args(args, device))
    out = Path(args.output) if args.output else Path("demo_out") / source.resolve().name
    backend = make_flow_backend(args.flow, args.raft_weights, device, flag="--flow")
    with FolderLock(out, "--output"):
        claim_output(out, source, args.overwrite)
        frames = upright_frames(frames, out / "frames") if frames else extract_frames(source, out / "frames")
        height, width = frame_size(frames, min_side=MIN_SIDE)
        print(f"{len(frames)} frames of {width}x{height}; optical flow: {backend.name}")
        video_flows(frames, out / "flows", backend, batch_size=4)
        video = Video(source.stem, tuple(Frame(f.stem, f, out / "flows" / f"{f.stem}.jpg", None) for f in frames))
        write_outputs(segmenter, video, out, (width, height))
    print(f"wrote {len(frames)} masks to {out / 'masks'}, {out / 'overlay.mp4'} and {out / 'contact_sheet.png'}")
    return out


def write_outputs(segmenter, video: Video, out: Path, size: tuple[int, int]) -> None:
    """Masks, the overlay video and the contact sheet, streaming."""
    n = len(video.frames)
    wanted = set(np.linspace(0, n - 1, min(SHEET_FRAMES, n)).round().astype(int).tolist())
    tiles = []
    # OpenCV writes by name, so the partial file goes in a private folder (mode 0700, an unpredictable name) where
    # nobody else can plant a link for it to follow; it keeps .mp4, from which OpenCV picks the container.
    private = Path(tempfile.mkdtemp(prefix=".overlay.", dir=out))
    partial = private / "overlay.mp4"
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), DEMO_FPS, (2 * size[0], size[1]))
    for frame in segmenter.frames([video]):
        save_palette_mask(frame.mask, out / "masks" / f"{video.frames[frame.index].stem}.png")
        composed = overlay(frame.image, frame.mask, frame.flow)
        writer.write(np.ascontiguousarray(composed[..., ::-1]))
        if frame.index in wanted:
            scale = min(1.0, SHEET_TILE_WIDTH / composed.shape[1])
            tiles.append(cv2.resize(composed, (round(composed.shape[1] * scale), round(composed.shape[0] * scale))))
    writer.release()
    partial.replace(out / "overlay.mp4")
    private.rmdir()
    save_image_atomic(Image.fromarray(contact_sheet(tiles)), out / "contact_sheet.png")
