"""The DepthFlow / FakeFlow network: appearance and motion encoders, summed, then the CBAM decoder."""

import torch
import torch.nn.functional as F
from torch import nn

from model.decoder import Decoder
from model.encoders import build_encoder, describe
from model.mit import HF_LAYER_NORM_EPS


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def class_masks(logits: torch.Tensor) -> torch.Tensor:
    """Bx2xHxW logits -> BxHxW uint8 masks, 1 = object: the argmax over the two classes, ties going to the
    background as argmax's do, at a small fraction of argmax's cost on a CPU."""
    return (logits[:, 1] > logits[:, 0]).view(torch.uint8)  # bools are 0/1 bytes: a view, not a conversion


class DepthFlow(nn.Module):
    """Two-stream video object segmentation network.

    Args:
        backbone: the appearance (frame) encoder (model.encoders): "mitb0" ... "mitb5", or "timm:<name>".
        size: side of the square internal resolution; the published model runs at 512.
        layer_norm_eps: MiT's block and stage LayerNorms; 1e-5 for the released checkpoints (HF transformers).
        flow_backbone: the motion (flow) encoder; None for the same as `backbone`, as in the paper. Where its
            widths differ from the appearance encoder's, a 1x1 convolution per stride maps the motion maps to
            them before the sum (`motion_projection`).
        encoders: the two encoders' descriptions as a checkpoint stores them (model.encoders.describe),
            which build them exactly as they were; by default described from the names.
    """

    def __init__(self, backbone: str = "mitb0", size: int = 512, layer_norm_eps: float = HF_LAYER_NORM_EPS,
                 flow_backbone: str | None = None, encoders: dict | None = None):
        super().__init__()
        if size % 32:
            raise ValueError(f"size must be a multiple of 32, got {size}")
        self.backbone, self.flow_backbone = backbone, flow_backbone
        self.size = size
        self.layer_norm_eps = layer_norm_eps
        self.encoders = encoders or {"appearance": describe(backbone), "motion": describe(flow_backbone or backbone)}
        self.appearance_encoder = build_encoder(self.encoders["appearance"], layer_norm_eps)
        self.motion_encoder = build_encoder(self.encoders["motion"], layer_norm_eps)
        widths, motion_widths = self.appearance_encoder.out_channels, self.motion_encoder.out_channels
        self.motion_projection = None if tuple(motion_widths) == tuple(widths) else nn.ModuleList(
            nn.Conv2d(m, a, 1) for m, a in zip(motion_widths, widths))
        self.decoder = Decoder(widths)

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """image, flow: Bx3xHxW in [0, 1]. Returns Bx2xHxW two-class logits at the input's size."""
        logits = self.forward_square(self.to_square(image), self.to_square(flow))
        return resize_bicubic(logits, tuple(image.shape[-2:]))

    def to_square(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to the internal size x size resolution, bicubically (no antialiasing), as the reference does."""
        return resize_bicubic(x, (self.size, self.size))

    def forward_square(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """The network at its internal resolution: size x size inputs in, size x size logits out. Training
        computes its loss here; the inference engine compiles this part, whose shapes never change."""
        appearance = self.appearance_encoder(image)
        motion = self.motion_encoder(flow)
        if self.motion_projection is not None:
            motion = [project(m) for project, m in zip(self.motion_projection, motion)]
        return self.decoder([a + m for a, m in zip(appearance, motion)])

    @torch.no_grad()
    def predict(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """BxHxW uint8 masks, 1 = object."""
        return class_masks(self(image, flow))
