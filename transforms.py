"""Training-sample transforms (docs/training.md, 'The recipe'), as the reference makes them: resize to the square
training size with PIL (bicubic for image and flow, the dataset's rule for the mask), then joint
horizontal and vertical flips of image, flow and mask.

The flow image is flipped as pixels, its colours are not remapped: that is what the reference trains on.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# "nearest": palette masks (DAVIS, YouTube-VOS), resized as 0/1 labels. "bicubic": DUTSv2's grey masks,
# resized as 8-bit grey images with PIL's bicubic filter and thresholded at half scale (level / 255 > 0.5),
# as the authors' loader does.
MASK_RESIZE = ("nearest", "bicubic")


def resize_mask(mask: np.ndarray, size: int, mode: str) -> np.ndarray:
    """HxW uint8 mask (0/1 labels for "nearest", grey levels 0-255 for "bicubic") -> size x size 0/1 uint8."""
    if mode == "nearest":
        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))
    if mode == "bicubic":
        grey = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        return (np.asarray(grey) > 127).astype(np.uint8)
    raise ValueError(f"unknown mask resize {mode!r}; expected one of {MASK_RESIZE}")


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x size x size uint8, PIL's bicubic filter."""
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> contiguous float32 in [0, 1] (torchvision's ToTensor scaling), wherever they are:
    samples travel as uint8, a quarter of float32's bytes, and become floats on the device."""
    return frames.contiguous().float().div_(255)


@dataclass(frozen=True)
class TrainTransform:
    size: int = 512
    mask_resize: str = "nearest"
    hflip_p: float = 0.5
    vflip_p: float = 0.5

    def __call__(self, image: np.ndarray, flow: np.ndarray, mask: np.ndarray, rng: random.Random):
        """HxWx3 uint8 image and flow and an HxW mask -> 3xSxS, 3xSxS and SxS uint8 tensors."""
        image_t, flow_t = resize_rgb(image, self.size), resize_rgb(flow, self.size)
        mask_t = torch.from_numpy(resize_mask(mask, self.size, self.mask_resize).copy())
        # Draw both decisions every time so the random stream does not depend on the outcomes.
        hflip, vflip = rng.random() < self.hflip_p, rng.random() < self.vflip_p
        if hflip:
            image_t, flow_t, mask_t = image_t.flip(-1), flow_t.flip(-1), mask_t.flip(-1)
        if vflip:
            image_t, flow_t, mask_t = image_t.flip(-2), flow_t.flip(-2), mask_t.flip(-2)
        return image_t, flow_t, mask_t
