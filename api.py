"""DepthFlow from Python: load a checkpoint, segment a frame and its flow, or a folder of frames.

    import api

    model = api.load("DepthFlow_mitb2.pth", device="cuda")          # released or trained checkpoint
    mask = api.segment(model, frame, flow)                          # HxWx3 uint8 arrays -> HxW uint8, 1 = object
    for name, mask in api.segment_folder(model, "frames/", "flows/"):   # flows: colour-wheel images, or
        ...                                                         # None to compute them (DIS, or RAFT weights)

Every function goes through the engine `run.py --test` uses (inference.Segmenter), so the masks are the
ones the command line writes. Errors are `utils.errors.UserError`s with one-line messages.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dataset import Frame, Video
from inference import TTA, InferenceOptions, Segmenter
from model.checkpoints import load_depthflow
from model.depthflow import class_masks
from utils.device import configure, resolve_device
from utils.errors import UserError
from utils.io import frame_size, list_frames


def load(checkpoint, device: str = "auto", batch_size: int | None = None, amp: str = "off",
         tta: str | None = None) -> Segmenter:
    """A segmenter for a released (DepthFlow_/FakeFlow_mitb*.pth) or trained checkpoint, on `device` ("auto":
    a GPU if there is one), `batch_size` frames at a time (default 8 on a GPU, 1 on a CPU)."""
    where = resolve_device(device)
    configure(where)
    options = InferenceOptions(where, batch_size=batch_size or (8 if where.type == "cuda" else 1), amp=amp,
                               tta=TTA.parse(tta))
    return Segmenter(load_depthflow(checkpoint), options)


def segment(model: Segmenter, frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """One frame: HxWx3 uint8 RGB frame and its colour-wheel flow image (any size) -> HxW uint8 mask."""
    for name, array in (("frame", frame), ("flow", flow)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{name}: expected an HxWx3 uint8 RGB array, got {array.dtype} {array.shape}")
    image, flow_t = (torch.from_numpy(np.array(a, copy=True)) for a in (frame, flow))
    with torch.inference_mode():
        x, y = model.to_device((image[None], flow_t[None]))
        logits = model.logits(x, y, frame.shape[:2])
    return class_masks(logits)[0].cpu().numpy()


def segment_folder(model: Segmenter, frames, flows=None, raft_weights=None) -> Iterator[tuple[str, np.ndarray]]:
    """(frame name, mask) for every frame of a folder, in natural order. `flows`: a folder of colour-wheel flow
    images named like the frames (.jpg or .png); None computes them into FRAMES/../<folder>_flows (RAFT with
    `raft_weights`, else OpenCV's DIS), reusing those already made from the same frames."""
    from flow_synthesis.video_flow import make_flow_backend, video_flows

    paths = list_frames(frames)
    frame_size(paths)
    if flows is None:
        flows = Path(frames).parent / f"{Path(frames).name}_flows"
        video_flows(paths, Path(flows), make_flow_backend("auto", raft_weights, model.device), progress=False)
    flow_of = {p.stem: p for p in list_frames(flows)}
    if missing := next((p for p in paths if p.stem not in flow_of), None):
        raise UserError(f"no flow image for frame {missing} in {flows} (expected {missing.stem}.jpg or .png)")
    video = Video(Path(frames).name, tuple(Frame(p.stem, p, flow_of[p.stem], None) for p in paths))
    for frame in model.frames([video], progress=False):
        yield video.frames[frame.index].stem, frame.mask
