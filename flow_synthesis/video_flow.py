"""Optical flow for real videos: one colour-wheel flow JPEG per frame, named like the frame.

    python -m flow_synthesis.video_flow --frames path/to/frames --out path/to/flows [--raft-weights FILE]
    python -m flow_synthesis.video_flow --dataset davis --data-root ../DB/VOS [--raft-weights FILE]

Frame t gets the flow from frame t to frame t+1. The last frame has no successor; it gets the flow from
itself to the previous frame, negated (the backward flow, turned to point forward), so that every frame
has a flow image of its own motion. A one-frame video gets zero flow.

Backends: torchvision's RAFT-Large from a local weights file (raft_large_C_T_SKHT_V2-ff5fadd5.pth;
inputs scaled to [-1, 1], padded to multiples of 8 by replicating edges, cropped back after), or OpenCV's
DIS optical flow, which needs no weights.

Runs resume: OUT/flows.json records, for every flow image, the backend and the two frames it was computed
from (names and SHA-1s); a flow is kept only while that record matches the frames as they are now, so
flows of another video, of edited frames, or of a last frame that has since gained a successor are made
again. Under torchrun (`torchrun --nproc_per_node=N -m flow_synthesis.video_flow --dataset ...`) the videos
are shared out over the processes, each on its own GPU; the files are those one process writes.
"""

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import DATASETS, DEFAULT_DATA_ROOT, dataset_root, video_datasets
from utils import distributed
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.flow_viz import flow_to_rgb
from utils.io import (
    file_digest,
    frame_size,
    image_is_complete,
    list_frames,
    read_rgb,
    save_image_atomic,
    write_json_atomic,
)
from utils.progress import progress as progress_bar

RAFT_WEIGHTS = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_MIN_SIDE = 128  # its correlation pyramid needs 1/8-resolution features of at least 16 pixels: smaller
# frames are enlarged to it and their flows shrunk back (vectors scaled with them)


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad a BxCxHxW batch so H and W are multiples of `multiple`; returns the (l, r, t, b) pads."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pads, mode="replicate"), pads


def crop_padding(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pads
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


class RAFTFlow:
    name = "RAFT"

    def __init__(self, weights, device, iterations: int = 20):
        self.signature = f"RAFT-Large ({Path(weights).name}, {iterations} iterations)"
        from torchvision.models.optical_flow import raft_large

        from model.checkpoints import load_strictly, read_file

        state = read_file(weights, f"torchvision's {RAFT_WEIGHTS} (docs/flow_synthesis.md, 'Optical flow for videos')")
        self.model = raft_large(weights=None)
        load_strictly(self.model, state, weights, "torchvision's RAFT-Large")
        self.model.eval().to(device)
        self.device, self.iterations = device, iterations

    @torch.inference_mode()
    def __call__(self, first: list[np.ndarray], second: list[np.ndarray]) -> list[np.ndarray]:
        def batch(frames):
            x = torch.stack([torch.from_numpy(f).permute(2, 0, 1) for f in frames]).float().to(self.device)
            return x / 127.5 - 1.0

        h, w = first[0].shape[:2]
        scale = max(1.0, RAFT_MIN_SIDE / min(h, w))  # small frames are enlarged to RAFT's minimum, flows shrunk back
        if scale > 1:
            size = (math.ceil(w * scale), math.ceil(h * scale))
            first, second = ([cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in fs] for fs in (first, second))
        a, pads = pad_to_multiple(batch(first))
        b, _ = pad_to_multiple(batch(second))
        flow = self.model(a, b, num_flow_updates=self.iterations)[-1]
        flows = list(crop_padding(flow, pads).permute(0, 2, 3, 1).cpu().numpy())
        if scale > 1:
            big_h, big_w = flows[0].shape[:2]
            ratio = np.array([w / big_w, h / big_h], np.float32)  # pixels of the enlarged frame -> of the frame
            flows = [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) * ratio for f in flows]
        return flows


class DISFlow:
    name = "DIS (OpenCV)"

    def __init__(self, preset=cv2.DISOPTICAL_FLOW_PRESET_MEDIUM):
        self.dis = cv2.DISOpticalFlow_create(preset)
        self.signature = f"DIS (OpenCV {cv2.__version__}, preset {preset})"

    def __call__(self, first, second):
        grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (*first, *second)]
        n = len(first)
        return [self.dis.calc(grey[i], grey[n + i], None) for i in range(n)]


RECORD = "flows.json"  # in each flow folder: what each flow image was computed from


def flow_pairs(n: int) -> list[tuple[int, int]]:
    """The frames each frame's flow runs between: (t, t+1), and for the last frame (t, t-1), negated."""
    if n == 1:
        return [(0, 0)]
    return [(i, i + 1) if i + 1 < n else (i, i - 1) for i in range(n)]


def video_flows(frames: list[Path], out_dir: Path, backend, batch_size: int = 4, progress: bool = True) -> int:
    """Write out_dir/<stem>.jpg for every frame, keeping flows whose record matches; returns how many were
    computed."""
    if frames and out_dir.resolve() == frames[0].parent.resolve():
        raise UserError(f"flows would be written over the frames in {out_dir}; expected another output folder")
    frame_size(frames)  # one size per video, checked before any work
    targets = [out_dir / f"{f.stem}.jpg" for f in frames]
    digests = [file_digest(f) for f in frames]
    wanted = {f.stem: {"frames": [frames[i].name, frames[j].name], "sha1": [digests[i], digests[j]],
                       "method": backend.signature} for f, (i, j) in zip(frames, flow_pairs(len(frames)))}
    records = _read_records(out_dir / RECORD)
    todo = [i for i, f in enumerate(frames) if records.get(f.stem) != wanted[f.stem]
            or not image_is_complete(targets[i])]
    with progress_bar(len(todo), f"flows {out_dir.name}", enabled=progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for i, flow in zip(chunk, _flows(frames, chunk, backend)):
                save_image_atomic(Image.fromarray(flow_to_rgb(flow)), targets[i], quality=95)
                records[frames[i].stem] = wanted[frames[i].stem]
            write_json_atomic(records, out_dir / RECORD, indent=1, sort_keys=True)
            bar.update(len(chunk))
    return len(todo)


def _flows(frames: list[Path], chunk: list[int], backend) -> list[np.ndarray]:
    """The flows of the frames in `chunk` (a one-frame video has zero flow)."""
    pairs = [flow_pairs(len(frames))[i] for i in chunk]
    decoded = {k: read_rgb(frames[k]) for pair in pairs for k in pair}  # each frame once per chunk
    if len(frames) == 1:
        h, w = decoded[0].shape[:2]
        return [np.zeros((h, w, 2), np.float32)]
    flows = backend([decoded[i] for i, _ in pairs], [decoded[j] for _, j in pairs])
    return [flow if j > i else -flow for (i, j), flow in zip(pairs, flows)]


def _read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def dataset_videos(name: str, root: Path) -> list[tuple[Path, Path]]:
    """(frame folder, flow folder) per video of a dataset, read from the image folders (flows may not exist)."""
    spec = DATASETS[name]
    images = root / spec.images
    if not images.is_dir():
        raise UserError(f"{spec.title}: missing folder {images} (expected layout {spec.layout()})")
    depth = 2 if spec.grouped else 1
    videos = sorted(p for p in images.glob("/".join(["*"] * depth)) if p.is_dir())
    if not videos:
        raise UserError(f"{spec.title}: no videos under {images}")
    return [(v, root / spec.flows / v.relative_to(images)) for v in videos]


def make_flow_backend(method: str, raft_weights, device, iterations: int = 20, flag: str = "--method"):
    """RAFT when asked for ("raft"), or with "auto" when weights are given; DIS otherwise."""
    if method == "raft" or (method == "auto" and raft_weights):
        if not raft_weights:
            raise UserError(f"{flag} raft needs --raft-weights FILE (torchvision's {RAFT_WEIGHTS}; "
                            "python -m tools.archives fetch raft-large)")
        return RAFTFlow(raft_weights, device, iterations)
    return DISFlow()


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m flow_synthesis.video_flow", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", help="a folder of frames (.jpg/.png)")
    source.add_argument("--dataset", choices=video_datasets(),
                        help="every video of a dataset; flows go to its JPEGFlows folder")
    parser.add_argument("--out", help="with --frames: folder for the flow images")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"default {DEFAULT_DATA_ROOT}")
    parser.add_argument("--dataset-root", metavar="DIR", help="with --dataset: its own folder (default "
                                                              "DATA_ROOT/<its folder>, e.g. DATA_ROOT/DAVIS)")
    parser.add_argument("--method", choices=("auto", "raft", "dis"), default="auto",
                        help="auto: RAFT if --raft-weights is given, else DIS")
    parser.add_argument("--raft-weights", help=f"torchvision RAFT-Large weights ({RAFT_WEIGHTS})")
    parser.add_argument("--iterations", type=int, default=20, help="RAFT refinement iterations (default 20)")
    parser.add_argument("--batch-size", type=int, default=4, help="frame pairs per RAFT batch (default 4)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.frames and not args.out:
        raise UserError("--frames needs --out FOLDER for the flow images")
    if args.batch_size < 1 or args.iterations < 1:
        raise UserError("--batch-size and --iterations must be at least 1")
    if args.frames:
        jobs = [(Path(args.frames), Path(args.out))]
    else:
        spec = DATASETS[args.dataset]
        jobs = dataset_videos(args.dataset, dataset_root(spec, args.data_root, args.dataset_root))
    ctx = distributed.init(args.device)
    lock = distributed.lock_folder(Path(args.out) if args.frames else jobs[0][1].parent, "output folder", ctx)
    try:
        backend = make_flow_backend(args.method, args.raft_weights, ctx.device, args.iterations)
        if ctx.is_main:
            print(f"optical flow: {backend.name}")
        listed = [(list_frames(frames), out) for frames, out in jobs]
        mine = [listed[i] for i in distributed.shard_by_size([len(f) for f, _ in listed], ctx)]
        computed = sum(video_flows(frames, out, backend, args.batch_size) for frames, out in mine)
    finally:
        if lock is not None:
            lock.release()
    distributed.shutdown(ctx)
    who = f"rank {ctx.rank} of {ctx.world_size}: " if ctx.distributed else ""
    print(f"{who}wrote {computed} flow images for {len(mine)} video(s)")


if __name__ == "__main__":
    main()
