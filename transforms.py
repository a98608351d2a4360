"""Training-sample transforms (README, 'Training'): resize to the square training size with each
dataset's mask rule, then joint horizontal and vertical flips of image, flow and mask.

The flow image is flipped as pixels, its colours are not remapped: that is what the reference trains on.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# "nearest": palette masks (DAVIS, YouTube-VOS). "bicubic": DUTSv2's grey masks, resized as [0, 1] floats
# with bicubic interpolation and thresholded at 0.5.
MASK_RESIZE = ("nearest", "bicubic")


def resize_mask(mask: np.ndarray, size: int, mode: str) -> np.ndarray:
    """HxW 0/1 uint8 -> size x size 0/1 uint8."""
    if mode == "nearest":
        return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    if mode == "bicubic":
        soft = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BICUBIC)
        return (np.asarray(soft) > 0.5).astype(np.uint8)
    raise ValueError(f"unknown mask resize {mode!r}; expected one of {MASK_RESIZE}")


def to_uint8_tensor(rgb: Image.Image) -> torch.Tensor:
    """PIL RGB -> contiguous 3xHxW uint8 (numpy's transposing copy is several times faster than torch's)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)))


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [0, 1], wherever they are (on the device, after the copy)."""
    return frames.float().div_(255)


@dataclass(frozen=True)
class TrainTransform:
    size: int = 512
    mask_resize: str = "nearest"
    hflip_p: float = 0.5
    vflip_p: float = 0.5

    def __call__(self, image: Image.Image, flow: Image.Image, mask: np.ndarray, rng: random.Random):
        image = image.resize((self.size, self.size), Image.BICUBIC)
        flow = flow.resize((self.size, self.size), Image.BICUBIC)
        mask = resize_mask(mask, self.size, self.mask_resize)
        # uint8 until the device: a quarter of float32's bytes to move (frames_to_float converts them there).
        image_t, flow_t, mask_t = to_uint8_tensor(image), to_uint8_tensor(flow), torch.from_numpy(mask.copy())
        # Draw both decisions every time so the random stream does not depend on the outcomes.
        hflip, vflip = rng.random() < self.hflip_p, rng.random() < self.vflip_p
        if hflip:
            image_t, flow_t, mask_t = image_t.flip(-1), flow_t.flip(-1), mask_t.flip(-1)
        if vflip:
            image_t, flow_t, mask_t = image_t.flip(-2), flow_t.flip(-2), mask_t.flip(-2)
        return image_t, flow_t, mask_t
