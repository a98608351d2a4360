"""The authors' test loop, as a program: the baseline that `run.py --test` is timed against (docs/speed.md).

    python -m tools.reference_test --checkpoint DepthFlow_mitb0.pth --data-root ROOT --output OUT

It runs the independent reference network (tools/reference_net.py: HF transformers 4.x encoders, loaded
from a released-format checkpoint) the way the authors' code runs theirs on DAVIS 2016 val: each video
read whole into memory as float tensors (PIL, then scaled to [0, 1]), resized to 512x512 at once, then one
frame at a time through the network, the logits resized back bicubically, softmax and the larger class
taken; masks written in the loop with torchvision's save_image, as theirs are, and scored at the end with
the DAVIS rules (utils.metrics).
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from dataset import DATASETS, scan
from model.checkpoints import read_file, released_to_model
from tools.reference_net import RefDepthFlow
from utils.errors import ArgumentParser, cli_entry
from utils.io import read_rgb
from utils.metrics import davis_summary, score_frame
from utils.palette import read_mask


def load_reference(path) -> RefDepthFlow:
    state = read_file(path, "a released-format checkpoint")
    _, backbone = released_to_model(state)
    model = RefDepthFlow(backbone)
    model.load_state_dict(state)
    return model.eval()


def as_tensor(path) -> torch.Tensor:
    return torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).float() / 255


@torch.no_grad()
def segment_video(model: RefDepthFlow, video) -> list[np.ndarray]:
    images = torch.stack([as_tensor(f.image) for f in video.frames])
    flows = torch.stack([as_tensor(f.flow) for f in video.frames])
    h, w = images.shape[-2:]
    images = F.interpolate(images, size=(512, 512), mode="bicubic")
    flows = F.interpolate(flows, size=(512, 512), mode="bicubic")
    masks = []
    for i in range(len(video.frames)):
        logits = model.vos(images[i:i + 1], flows[i:i + 1])
        logits = F.interpolate(logits, size=(h, w), mode="bicubic")
        masks.append(torch.softmax(logits, dim=1).max(dim=1)[1][0].to(torch.uint8).numpy())
    return masks


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.reference_test", description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    spec = DATASETS["davis"]
    videos = scan(spec, Path(args.data_root) / spec.folder)
    model = load_reference(args.checkpoint)
    scores, start = {}, time.perf_counter()
    for video in videos:
        masks = segment_video(model, video)
        (Path(args.output) / video.key).mkdir(parents=True, exist_ok=True)
        for mask, frame in zip(masks, video.frames):
            save_image(torch.from_numpy(mask).float(), Path(args.output) / video.key / f"{frame.stem}.png")
        # The DAVIS rules: the first and the last frame do not count.
        scores[video.key] = [score_frame(i, masks[i], read_mask(video.frames[i].mask, spec.mask_rule))
                             for i in range(1, len(masks) - 1)]
    result = davis_summary(scores)
    frames = sum(len(v.frames) for v in videos)
    print(f"J&F {result['metrics']['J&F-Mean']:.4f}; {frames} frames, {frames / (time.perf_counter() - start):.2f} "
          "frames/s")


if __name__ == "__main__":
    main()
