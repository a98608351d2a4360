"""Training-sample transforms (README, 'Training'): resize to the square training size with each
dataset's mask rule, then joint horizontal and vertical flips of image, flow and mask.

The flow image is flipped as pixels, its colours are not remapped: that is what the reference trains on.
Image and flow are resized by torch's antialiased bicubic filter on uint8, the filter PIL uses, in a
vectorised form about 6x faster than PIL's; it rounds differently on a fraction of a percent of values,
by 1 or 2 levels in 255 (tests/test_image_io.py).
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


def to_uint8_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> contiguous 3xHxW uint8 (numpy's transposing copy is several times faster than torch's)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)))


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x size x size uint8, bicubic with antialiasing (PIL's filter)."""
    # Seen through a permuted view the HxWx3 buffer is channels-last, the layout of torch's fast uint8 path.
    x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0].contiguous()


def frames_to_float(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 frames -> contiguous float32 in [0, 1], wherever they are (on the device, after the copy).

    `frames` may be a reordered view (the loader's HxWx3 frames seen channels first); the result is laid
    out in the view's order. `out`, a contiguous float32 tensor of the same shape, is filled instead of a
    new one: on a CPU, where batches of video frames are tens of MB, a fresh buffer costs more in page
    faults than the conversion itself."""
    if out is None:
        out = torch.empty(frames.shape, dtype=torch.float32, device=frames.device)
    return out.copy_(frames).div_(255)


@dataclass(frozen=True)
class TrainTransform:
    size: int = 512
    mask_resize: str = "nearest"
    hflip_p: float = 0.5
    vflip_p: float = 0.5

    def __call__(self, image: np.ndarray, flow: np.ndarray, mask: np.ndarray, rng: random.Random):
        """HxWx3 uint8 image and flow and an HxW mask -> 3xSxS, 3xSxS and SxS uint8 tensors."""
        # uint8 until the device: a quarter of float32's bytes to move (frames_to_float converts them there).
        image_t, flow_t = resize_rgb(image, self.size), resize_rgb(flow, self.size)
        mask_t = torch.from_numpy(resize_mask(mask, self.size, self.mask_resize).copy())
        # Draw both decisions every time so the random stream does not depend on the outcomes.
        hflip, vflip = rng.random() < self.hflip_p, rng.random() < self.vflip_p
        if hflip:
            image_t, flow_t, mask_t = image_t.flip(-1), flow_t.flip(-1), mask_t.flip(-1)
        if vflip:
            image_t, flow_t, mask_t = image_t.flip(-2), flow_t.flip(-2), mask_t.flip(-2)
        return image_t, flow_t, mask_t
