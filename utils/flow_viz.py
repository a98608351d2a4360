"""Optical flow <-> RGB colour-wheel images, as the method's flow JPEGs encode it.

The encoding is the Middlebury colour wheel of RAFT's flow_viz, normalised by the largest flow magnitude of
each image; torchvision's flow_to_image implements it. It normalises by one maximum over a whole batch, so
it is always called per image here.
"""

import numpy as np
import torch
from torchvision.utils import flow_to_image


def flow_to_rgb(flow) -> np.ndarray:
    """HxWx2 (or 2xHxW) flow in pixels -> HxWx3 uint8 colour-wheel image. Zero flow is white."""
    flow = torch.as_tensor(np.asarray(flow, dtype=np.float32))
    if flow.shape[0] != 2:
        flow = flow.permute(2, 0, 1)
    return flow_to_image(flow.contiguous()).permute(1, 2, 0).numpy()
